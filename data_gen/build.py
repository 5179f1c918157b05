"""Build the post-training data set: math (levels 1-5), science MCQ, instruction following; reasoning on/off.

    python -m data_gen.build --out data/smol                                   # templates only (seconds)
    python -m data_gen.build --out data/smol --tokenizer runs/smol/parent      # data card in tokens
    python -m data_gen.build --out data/smol --teacher runs/smol/sft --samples 8 --teacher-problems 200

Writes DIR/{train,validation,test}.jsonl, DIR/eval.jsonl, DIR/rl_math.jsonl (06_grpo.py's RL prompt pool) and
DIR/data_card.json. Everything is held out by meaning, not by prompt string: a problem's `meaning_key` is what it
asks with names and wording removed (math_problems.semantic_key, science_mcq.science_key,
instructions.instruction_key; see SEMANTIC_KEYS).

  eval.jsonl        math_problems.eval_problems + held-out instruction prompts: keys in the reserved eval bucket
                    (records.in_eval_bucket of the key), as are the stages' own evaluation sets (05, 06, 07: any
                    size, any seed). Ordered, not shuffled: the math problems round robin over the levels (1, 2, 3,
                    4, 5, 1, 2, ...), so any prefix is balanced across levels, then the instruction prompts as drawn
                    (a prefix is generate_instructions(n, seed, heldout=True)); a problem's on and off records are
                    adjacent. common.evaluate --data DIR takes its gen suite's sets as such prefixes
  train/validation/test, rl_math.jsonl
                    keys outside that bucket, so no renamed or reworded copy of any evaluation problem; checked here
                    against eval.jsonl and every evaluation set the stages draw (preferences.heldout_prompts), and a
                    candidate that still shares a key would be dropped and counted in data_card.json
  the split         per category, problems grouped by key and the groups cut into train/validation/test: no meaning
                    (and no problem id: the on/off versions of a problem stay together) lands in two splits

With --overwrite, an old DIR/preference_pairs.jsonl (07_rlhf.py's, written on first use) is removed: it was drawn
against the old data set's held-out sets.
"""

import argparse
import os
import random
import sys
from collections import defaultdict

from common.checkpoint import check_checkpoint, write_json_atomic
from common.cli import nonneg_int, positive_int, prob
from data_gen.instructions import generate_instructions, instruction_key
from data_gen.math_problems import eval_problems, generate_math, rl_problems, semantic_key
from data_gen.preferences import heldout_prompts
from data_gen.records import key_text, problem_records, read_jsonl, write_jsonl
from data_gen.science_mcq import generate_science, science_key

SPLITS = ("train", "validation", "test")
KEYS = {"math": semantic_key, "science": science_key, "chat": instruction_key}
SEMANTIC_KEYS = {  # written to data_card.json
    "math": "math_problems.semantic_key: (level, template, the numbers sorted, answer); the template is the "
            "question with numbers -> '#', person names -> '<name>', items -> '<item>' and wording variants merged "
            "('Add # and #.' = 'What is # + #?'), so problems differing only in names, items or phrasing share a key",
    "science": "science_mcq.science_key: the question stem (not the order of the options, so not the letter)",
    "chat": "instructions.instruction_key: (topic, the constraints); not the task phrase or the order of the asks",
}


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
    ap.add_argument("--rl-math", type=nonneg_int, default=512, help="math problems in the RL prompt pool "
                    "rl_math.jsonl (0 = leave it to 06_grpo.py, which writes it on first use)")
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


def meaning_key(p: dict) -> tuple:
    """(category, the category's semantic key): what a problem or record asks, with names and wording removed."""
    return p["category"], KEYS[p["category"]](p)


def drop_heldout_meanings(problems: list[dict], banned: set) -> tuple[list[dict], dict]:
    """Drop every problem whose meaning_key is in `banned` (the evaluation sets' keys), and any later problem sharing
    a key with an earlier one; return the rest and the counts."""
    seen, out, dropped = set(), [], {"eval_collisions": 0, "near_duplicates": 0}
    for p in problems:
        k = meaning_key(p)
        if k in banned:
            dropped["eval_collisions"] += 1
        elif k in seen:
            dropped["near_duplicates"] += 1
        else:
            seen.add(k)
            out.append(p)
    return out, dropped


def split_by_meaning(problems: list[dict], val_frac: float, test_frac: float, seed: int) -> dict[str, list[dict]]:
    """Per category, group problems by meaning_key, shuffle the groups and cut them into validation, test and train:
    near-duplicates (same key, other names or wording) land in one split, and so do the on/off versions of a problem
    (one prompt, one key, one id). Deterministic: groups are ordered by key text before the seeded shuffle."""
    out = {s: [] for s in SPLITS}
    by_cat = defaultdict(lambda: defaultdict(list))
    for p in problems:
        by_cat[p["category"]][key_text(meaning_key(p))].append(p)
    for cat in sorted(by_cat):
        groups = [sorted(g, key=lambda p: p["id"]) for _, g in sorted(by_cat[cat].items())]
        random.Random(f"{seed}:{cat}").shuffle(groups)
        n = sum(len(g) for g in groups)
        n_val, n_test, taken = round(val_frac * n), round(test_frac * n), 0
        for g in groups:  # a group that straddles a cut goes whole to the earlier split
            out["validation" if taken < n_val else "test" if taken < n_val + n_test else "train"] += g
            taken += len(g)
    return out


def round_robin_by_level(problems: list[dict]) -> list[dict]:
    """Math problems reordered one level at a time in turn (the first of each level, then the second of each,
    ...), each level keeping its order: any prefix holds the levels in equal shares (up to one)."""
    by_level = defaultdict(list)
    for p in problems:
        by_level[p["difficulty"]].append(p)
    rows = [by_level[lv] for lv in sorted(by_level)]
    return [row[k] for k in range(max(map(len, rows), default=0)) for row in rows if k < len(row)]


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
    rl_path = os.path.join(args.out, "rl_math.jsonl")
    if not args.overwrite and any(os.path.exists(f) for f in files + ([rl_path] if args.rl_math else [])):
        raise SystemExit(f"error: {args.out} already has data; pass --overwrite or choose another --out")
    tok = None  # everything read from disk is checked before the first file is written
    if args.tokenizer:
        tok = load_local_tokenizer(args.tokenizer)
    if args.teacher:
        check_checkpoint(args.teacher)

    # held-out sets first: eval.jsonl, and every evaluation set the stages draw (seeds 0 and 1234, their sizes)
    evalset = round_robin_by_level(eval_problems(args.eval_math, args.seed)) + generate_instructions(
        args.eval_instructions, args.seed, heldout=True)
    heldout = evalset + heldout_prompts(max(500, args.eval_instructions), math_sizes=(args.eval_math,))
    banned = {meaning_key(p) for p in heldout}

    # training candidates: generators draw keys outside the eval bucket, distinct within each generator
    drawn = {c: {} for c in KEYS}  # per category: draws rejected for their key
    problems = (generate_math(args.math, args.seed, stats=drawn["math"])
                + generate_science(args.science, args.seed, stats=drawn["science"])
                + generate_instructions(args.instructions, args.seed, stats=drawn["chat"]))
    problems, dropped = drop_heldout_meanings(problems, banned)
    by_split = split_by_meaning(problems, args.val_frac, args.test_frac, args.seed)
    rng = random.Random(args.seed)
    splits = {s: to_records(ps, args.chat_reasoning_frac, rng) for s, ps in by_split.items()}
    splits["eval"] = to_records(evalset, 1.0, rng)
    rl_pool = rl_problems(args.rl_math, args.seed, exclude=[q for q in heldout if q["category"] == "math"])

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

    # no problem and no meaning in two splits, no evaluation meaning in any split or in the RL pool
    keys = {s: {meaning_key(r) for r in recs} for s, recs in splits.items()}
    keys["rl_math"] = {meaning_key(p) for p in rl_pool}
    ids = {s: {r["id"] for r in recs} for s, recs in splits.items()}
    for x, y in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not ids[x] & ids[y] and not keys[x] & keys[y], (x, y)
    assert not any(keys[s] & banned for s in SPLITS + ("rl_math",))

    for s, recs in splits.items():
        if s != "eval":  # eval.jsonl keeps its order: prefixes are the evaluation sets (docstring)
            random.Random(f"{args.seed}:{s}").shuffle(recs)
        path = os.path.join(args.out, f"{s}.jsonl")
        write_jsonl(path, recs, overwrite=args.overwrite)
        if args.parquet:
            from data_gen.records import load_records
            load_records(path).to_parquet(os.path.join(args.out, f"{s}.parquet"))
    read_jsonl(files[0])  # the written file reads back and validates
    if args.rl_math:
        write_jsonl(rl_path, [problem_records(p, modes=("on",))[0] for p in rl_pool], overwrite=args.overwrite)
    stale = os.path.join(args.out, "preference_pairs.jsonl")
    if args.overwrite and os.path.exists(stale):
        os.remove(stale)
        print(f"removed {stale} (drawn against the old data set; 07_rlhf.py writes a new one on first use)")

    card = data_card(splits, tok)
    card.update(args=vars(args), problems=len(problems), rl_math=len(rl_pool) if args.rl_math else None,
                dropped_duplicates=sum(dropped.values()),
                semantic_key={
                    "definition": SEMANTIC_KEYS,
                    "split": "held-out sets draw only keys in the eval bucket (records.in_eval_bucket: sha1 of the "
                             "key's JSON, first byte % 8 == 0), train/validation/test and the RL pool only keys "
                             "outside it; train/validation/test are cut by key (build.split_by_meaning)",
                    "dropped": {c: {"eval_bucket": drawn[c]["other_side"],
                                    "near_duplicates": drawn[c]["near_duplicates"]} for c in KEYS},
                    "dropped_eval_collisions": dropped["eval_collisions"],
                    "dropped_near_duplicates_across_generators": dropped["near_duplicates"]},
                teacher={k: v for k, v in teacher_stats.items() if k != "pass_rate"} if teacher_stats else None)
    write_json_atomic(os.path.join(args.out, "data_card.json"), card)
    if teacher_stats:
        write_json_atomic(os.path.join(args.out, "teacher_pass_rate.json"), teacher_stats["pass_rate"])
    print_card(card)
    rejected = {c: drawn[c]["other_side"] + drawn[c]["near_duplicates"] for c in KEYS}
    print(f"wrote {', '.join(files)}{', rl_math.jsonl' if args.rl_math else ''}; held out by semantic key: "
          f"{dropped['eval_collisions']} candidates shared a key with an evaluation problem (dropped), draws rejected "
          f"for their key (eval bucket or near-duplicate): {rejected}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        sys.exit(f"error: {e}")
