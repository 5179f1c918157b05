"""Build the post-training data set: math (levels 1-5), science MCQ, instruction following; reasoning on/off.

    python -m data_gen.build --out data/smol                                   # templates only (seconds)
    python -m data_gen.build --out data/smol --tokenizer runs/smol/parent      # data card in tokens
    python -m data_gen.build --out data/smol --teacher runs/smol/sft --samples 8 --teacher-problems 200

Writes DIR/{train,validation,test}.jsonl (split by problem id: the on/off versions of a problem stay together),
DIR/eval.jsonl (the held-out eval set: math_problems.eval_problems + held-out instruction prompts, from the
reserved eval bucket, so disjoint from the splits by construction and checked here), and DIR/data_card.json.
"""

import argparse
import os
import random
import sys
from collections import defaultdict

from common.checkpoint import check_checkpoint, write_json_atomic
from common.cli import nonneg_int, positive_int, prob
from data_gen.instructions import generate_instructions
from data_gen.math_problems import eval_problems, generate_math
from data_gen.records import normalize_prompt, problem_records, read_jsonl, write_jsonl
from data_gen.science_mcq import generate_science

SPLITS = ("train", "validation", "test")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory, e.g. data/smol")
    ap.add_argument("--seed", type=nonneg_int, default=0)
    # sizes (problems; math and science give an on and an off record each)
    ap.add_argument("--math", type=nonneg_int, default=2000)
    ap.add_argument("--science", type=nonneg_int, default=500)
    ap.add_argument("--instructions", type=nonneg_int, default=300)
    ap.add_argument("--chat-reasoning-frac", type=prob, default=0.3, help="chat problems that also get an 'on' record")
    ap.add_argument("--eval-math", type=nonneg_int, default=200)
    ap.add_argument("--eval-instructions", type=nonneg_int, default=100)
    ap.add_argument("--val-frac", type=prob, default=0.05)
    ap.add_argument("--test-frac", type=prob, default=0.05)
    # teacher traces (rejection sampling) for train math problems
    ap.add_argument("--teacher", default=None, help="checkpoint that writes reasoning traces")
    ap.add_argument("--samples", type=positive_int, default=4, help="solutions sampled per problem")
    ap.add_argument("--teacher-problems", type=positive_int, default=200,
                    help="train math problems sent to the teacher")
    ap.add_argument("--teacher-max-new-tokens", type=positive_int, default=192)
    ap.add_argument("--teacher-batch-size", type=positive_int, default=16)
    # output
    ap.add_argument("--tokenizer", default=None, help="a local directory with a tokenizer (e.g. runs/smol/parent): "
                    "report lengths in its tokens (else characters)")
    ap.add_argument("--parquet", action="store_true", help="also write <split>.parquet")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if not (0 <= args.val_frac < 1 and 0 <= args.test_frac < 1 and args.val_frac + args.test_frac < 1):
        raise ValueError(f"--val-frac {args.val_frac} and --test-frac {args.test_frac} must be >= 0 and sum to < 1")
    if args.math + args.science + args.instructions == 0:
        raise ValueError("--math, --science and --instructions are all 0: nothing to build; ask for some problems")
    return args


def dedupe(problems: list[dict], banned: set[str]) -> tuple[list[dict], int]:
    """Drop repeated prompts and any prompt of the eval set (by normalized prompt)."""
    seen, out = set(banned), []
    for p in problems:
        key = normalize_prompt(p["question"])
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out, len(problems) - len(out)


def split_by_id(problems: list[dict], val_frac: float, test_frac: float, seed: int) -> dict[str, list[dict]]:
    """Per category, shuffle problem ids and cut them into train/validation/test: no id lands in two splits."""
    out = {s: [] for s in SPLITS}
    by_cat = defaultdict(list)
    for p in problems:
        by_cat[p["category"]].append(p)
    for cat in sorted(by_cat):
        ps = sorted(by_cat[cat], key=lambda p: p["id"])
        random.Random(f"{seed}:{cat}").shuffle(ps)
        n_val, n_test = round(val_frac * len(ps)), round(test_frac * len(ps))
        out["validation"] += ps[:n_val]
        out["test"] += ps[n_val:n_val + n_test]
        out["train"] += ps[n_val + n_test:]
    return out


def to_records(problems: list[dict], chat_on_frac: float, rng: random.Random) -> list[dict]:
    recs = []
    for p in problems:
        modes = ("on", "off") if p["category"] != "chat" or rng.random() < chat_on_frac else ("off",)
        recs += problem_records(p, modes)
    return recs


def data_card(splits: dict[str, list[dict]], tokenizer=None) -> dict:
    """Counts and lengths per split x category x reasoning. Length = the whole templated example in tokens when
    a tokenizer is given, else characters of prompt + response."""
    from common.data import tokenize_sft_example
    card = {"length_unit": "tokens" if tokenizer else "chars", "splits": {}}
    for split, recs in splits.items():
        groups = defaultdict(list)
        for r in recs:
            n = (len(tokenize_sft_example(tokenizer, r, 10**9)["input_ids"]) if tokenizer else
                 sum(len(m["content"]) for m in r["input"]) + len(r["output"]))
            groups[f"{r['category']}/{r['reasoning']}"].append(n)
        card["splits"][split] = {k: {"count": len(v), "mean_len": round(sum(v) / len(v), 1), "max_len": max(v)}
                                 for k, v in sorted(groups.items())}
    return card


def print_card(card: dict) -> None:
    print(f"{'split':<11} {'category/reasoning':<20} {'count':>6} {'mean_' + card['length_unit']:>12} "
          f"{'max_' + card['length_unit']:>10}")
    for split, groups in card["splits"].items():
        for k, g in groups.items():
            print(f"{split:<11} {k:<20} {g['count']:>6} {g['mean_len']:>12} {g['max_len']:>10}")
        print(f"{split:<11} {'total':<20} {sum(g['count'] for g in groups.values()):>6}")


def load_local_tokenizer(path: str):
    """A tokenizer from a local directory; never a hub id (nothing is downloaded at run time)."""
    if not os.path.isdir(path):
        raise ValueError(f"--tokenizer {path} is not a local directory; give a checkpoint directory with tokenizer "
                         f"files, e.g. runs/smol/parent")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 (tokenizers raises plain Exception for a broken tokenizer.json)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"--tokenizer {path} has no readable tokenizer ({first}); give a checkpoint directory "
                         f"with tokenizer files, e.g. runs/smol/parent") from None


def main(argv=None):
    args = parse_args(argv)
    files = [os.path.join(args.out, f"{s}.jsonl") for s in SPLITS + ("eval",)]
    if not args.overwrite and any(os.path.exists(f) for f in files):
        raise SystemExit(f"error: {args.out} already has data; pass --overwrite or choose another --out")
    tok = None  # everything read from disk is checked before the first file is written
    if args.tokenizer:
        tok = load_local_tokenizer(args.tokenizer)
    if args.teacher:
        check_checkpoint(args.teacher)

    # held-out eval set first: everything else is deduped against it
    evalset = eval_problems(args.eval_math, args.seed) + generate_instructions(args.eval_instructions, args.seed,
                                                                               heldout=True)
    banned = {normalize_prompt(p["question"]) for p in evalset}

    problems = (generate_math(args.math, args.seed) + generate_science(args.science, args.seed)
                + generate_instructions(args.instructions, args.seed))
    problems, dropped = dedupe(problems, banned)
    by_split = split_by_id(problems, args.val_frac, args.test_frac, args.seed)
    rng = random.Random(args.seed)
    splits = {s: to_records(ps, args.chat_reasoning_frac, rng) for s, ps in by_split.items()}
    splits["eval"] = to_records(evalset, 1.0, rng)

    teacher_stats = None
    if args.teacher:
        from data_gen.teacher import load_teacher, rejection_sample
        generate_fn, render = load_teacher(args.teacher, args.teacher_batch_size)
        todo = [p for p in by_split["train"] if p["category"] == "math"][:args.teacher_problems]
        recs, teacher_stats = rejection_sample(todo, generate_fn, args.samples, reasoning=True, render=render,
                                               max_new_tokens=args.teacher_max_new_tokens, generator=args.teacher)
        splits["train"] += recs
        print(f"teacher: kept {teacher_stats['kept']} of {teacher_stats['samples']} samples "
              f"({teacher_stats['wrong']} wrong, {teacher_stats['bad_format']} bad format)")

    # no problem in two splits, nothing from the eval set in any split
    ids = {s: {r["id"] for r in recs} for s, recs in splits.items()}
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"] or ids["validation"] & ids["test"])
    assert not any(normalize_prompt(r["input"][0]["content"]) in banned for s in SPLITS for r in splits[s])

    for s, recs in splits.items():
        random.Random(f"{args.seed}:{s}").shuffle(recs)
        path = os.path.join(args.out, f"{s}.jsonl")
        write_jsonl(path, recs, overwrite=args.overwrite)
        if args.parquet:
            from data_gen.records import load_records
            load_records(path).to_parquet(os.path.join(args.out, f"{s}.parquet"))
    read_jsonl(files[0])  # the written file reads back and validates

    card = data_card(splits, tok)
    card.update(args=vars(args), problems=len(problems), dropped_duplicates=dropped,
                teacher={k: v for k, v in teacher_stats.items() if k != "pass_rate"} if teacher_stats else None)
    write_json_atomic(os.path.join(args.out, "data_card.json"), card)
    if teacher_stats:
        write_json_atomic(os.path.join(args.out, "teacher_pass_rate.json"), teacher_stats["pass_rate"])
    print_card(card)
    print(f"wrote {', '.join(files)} ({dropped} duplicate or eval-set prompts dropped)")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        sys.exit(f"error: {e}")
