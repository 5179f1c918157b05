"""Preference pairs for the reward model and RPO (07_rlhf.py): one prompt, a chosen and a rejected answer.

Every pair starts from a data_gen problem whose template answer is right (an instruction prompt with checkable
constraints, data_gen.instructions, or a math word problem, data_gen.math_problems) in one toggle mode. The chosen
answer is that answer in the mode's format ("<think>steps</think> answer" when on, the short answer when off); the
rejected answer differs from it in the one way the pair's `kind` names:

  constraint_violation  instruction prompt; the rejected answer breaks one of the prompt's constraints (an extra
                        word, a bullet missing, a capital letter where lowercase was asked, the keyword or the
                        closing phrase dropped, broken JSON): the verifier scores it below 1
  wrong_answer          math prompt; the rejected answer's final number is off (the worked steps are unchanged)
  unhelpful             either prompt; the rejected answer is a polite non-answer ("I'm not sure about that.")
  truncated             either prompt; the rejected answer stops part-way with no final answer (thinking on: inside
                        the think block, which never closes)
  wrong_mode            either prompt; the rejected answer is in the other mode's format: no think block with
                        thinking on, a think block with thinking off

Held out by meaning: heldout=True pairs come from the evaluation bucket (data_gen.records.in_eval_bucket of the
semantic key, the meanings the evaluation sets use); training pairs draw only keys outside it, and also exclude
every prompt that shares a meaning (instruction_key, semantic_key) with `exclude`. `kinds` chooses the kinds, so one kind can be left out of training and measured on held-out pairs:
what the reward model does not know.

A pair, one JSON object per line (07_rlhf.py --pairs):
  {"id", "kind", "category", "input": [{"role": "user", "content": ...}], "reasoning": "on" | "off",
   "chosen": str, "rejected": str, "constraints": JSON string or null, "answer": str or null,
   optional "chosen_reward" and "rejected_reward": numbers (RPO's rewards when no reward model scores the pairs),
   optional "chosen_ended" and "rejected_ended": false when the answer was cut off (no end-of-turn token after it;
   default true)}

    python -m data_gen.preferences --out data/smol/preference_pairs.jsonl --n 512 --kinds all
"""

import argparse
import json
import os
import random
import re

from common.data import json_lines
from common.rewards import format_correct, instruction_following_score, verifier_reward
from data_gen.instructions import generate_instructions, rl_instructions
from data_gen.math_problems import eval_problems, rl_problems

KINDS = ("constraint_violation", "wrong_answer", "unhelpful", "truncated", "wrong_mode")
REQUIRED = ("id", "input", "reasoning", "chosen", "rejected")
UNHELPFUL = ["I'm not sure about that.", "That is a good question. You could look it up.",
             "I cannot help with that right now.", "It depends on many things."]


# ----------------------------------------------------------------------------
# the chosen answer and its corruptions

def answer_text(p: dict, on: bool) -> str:
    return f"<think>\n{p['think']}\n</think>\n{p['final']}" if on else p["short"]


def _break_constraint(text: str, constraints: list[dict], r: random.Random) -> str:
    """The answer with one of its constraints broken (chosen at random among those this function can break)."""
    c = r.choice(constraints)
    t = c["type"]
    if t == "word_count":
        return "so " + text  # lowercase, so no other constraint breaks
    if t == "include_keyword":
        return re.sub(rf"\b{re.escape(c['keyword'])}\b", "thing", text, flags=re.I)
    if t == "lowercase":
        return re.sub(r"[a-z]", lambda m: m.group(0).upper(), text, count=1)
    if t == "bullet_count":
        lines = text.splitlines()
        last = max(i for i, ln in enumerate(lines) if ln.startswith("- "))
        return "\n".join(lines[:last] + lines[last + 1:])
    if t == "json_format":
        return text.lstrip()[1:]  # the opening brace dropped
    if t == "end_with":
        return text.rstrip()[:-len(c["phrase"])].rstrip()
    raise ValueError(f"unknown constraint type {t!r}")


def _wrong_answer(p: dict, on: bool, r: random.Random) -> str:
    wrong = int(p["answer"]) + r.choice([-10, -2, -1, 1, 2, 10])
    boxed = f"\\boxed{{{p['answer']}}}"
    return answer_text(p, on).replace(boxed, f"\\boxed{{{wrong}}}")


def _truncated(p: dict, on: bool) -> str:
    if on:  # cut inside the thinking: the think block never closes, there is no answer
        lines = p["think"].splitlines()
        words = " ".join(lines[:max(1, len(lines) // 2)]).split()
        return "<think>\n" + " ".join(words[:max(2, len(words) // 2)])
    if p.get("answer") is not None:  # "a + b = c, so the answer is ...": stop before the result
        return p["short"].split(" = ")[0].strip()
    words = p["short"].split()
    return " ".join(words[:max(1, len(words) // 2)])


def make_pair(p: dict, kind: str, on: bool, r: random.Random) -> dict:
    chosen = answer_text(p, on)
    cons = p.get("constraints")
    if kind == "constraint_violation":
        if not cons:
            raise ValueError("constraint_violation pairs need an instruction prompt")
        rejected = _break_constraint(p["final"], cons, r)
        rejected = f"<think>\n{p['think']}\n</think>\n{rejected}" if on else rejected
    elif kind == "wrong_answer":
        if cons or p.get("answer") is None:
            raise ValueError("wrong_answer pairs need a math prompt")
        rejected = _wrong_answer(p, on, r)
    elif kind == "unhelpful":
        rejected = r.choice(UNHELPFUL)
        rejected = f"<think>\nI do not know what to say.\n</think>\n{rejected}" if on else rejected
    elif kind == "truncated":
        rejected = _truncated(p, on)
    elif kind == "wrong_mode":
        rejected = answer_text(p, not on)
    else:
        raise ValueError(f"unknown pair kind {kind!r}; use one of {KINDS}")
    mode = "on" if on else "off"
    return {"id": f"{kind}-{p['id']}-{mode}", "kind": kind, "category": p["category"],
            "input": [{"role": "user", "content": p["question"]}], "reasoning": mode, "chosen": chosen,
            "rejected": rejected, "constraints": json.dumps(cons) if cons else None,
            "answer": None if p.get("answer") is None else str(p["answer"]), "rejected_ended": kind != "truncated"}


def heldout_prompts(n_instructions: int = 500, math_sizes=()) -> list[dict]:
    """The evaluation prompts of the pipeline, for `exclude=` (a second check: training sets draw no key of the
    eval bucket, so they share no meaning with any evaluation set of any size anyway). Instruction sets are
    prefixes of one sequence (generate_instructions(n, 0, heldout=True)), so the first n_instructions cover every
    smaller set; math sets of different sizes are not (eval_problems draws level by level), so the sizes the
    stages use are listed (05: seed 1234; 06, 07 and build.py's eval.jsonl, whose prefixes common.evaluate reads: seed 0)
    plus `math_sizes` (seed 0)."""
    sizes = {(n, 0) for n in (20, 30, 50, 100, 200, *math_sizes)} | {(n, 1234) for n in (32, 50, 64, 100)}
    return generate_instructions(n_instructions, 0, heldout=True) + [q for n, s in sorted(sizes) for q in eval_problems(n, s)]


def pair_verifier_rewards(pair: dict) -> tuple[float, float]:
    """(chosen, rejected) verifier scores plus format (common.rewards.verifier_reward with w_format 1): the
    rewards a pair gets when no reward model scores it."""
    on = pair["reasoning"] == "on"
    return tuple(verifier_reward(pair[k], on, pair.get("constraints"), pair.get("answer"), w_format=1.0)["reward"]
                 for k in ("chosen", "rejected"))


# ----------------------------------------------------------------------------
# the pair sets

def preference_pairs(n: int, seed: int = 0, heldout: bool = False, kinds=KINDS, on_fraction: float = 0.5,
                     exclude: list[dict] = ()) -> list[dict]:
    """n pairs, the kinds in equal shares (constraint_violation on instruction prompts, wrong_answer on math, the
    others on both alternately). heldout=True: prompts from the evaluation bucket; otherwise training prompts that
    share no meaning with `exclude` (instruction and math problems, e.g. every evaluation set)."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"unknown pair kind(s) {sorted(unknown) or kinds}; use some of {KINDS}")
    r = random.Random(f"prefs:{seed}:{heldout}")
    counts = [n // len(kinds) + (i < n % len(kinds)) for i in range(len(kinds))]
    if heldout:
        chat, math = generate_instructions(n, seed, heldout=True), eval_problems(n, seed)
    else:
        chat = rl_instructions(n, seed + 1000, exclude=[p for p in exclude if p.get("constraints")])
        math = rl_problems(n, seed + 1000, exclude=[p for p in exclude if not p.get("constraints")])
    r.shuffle(math)  # rl_problems / eval_problems come level by level
    pools, out = {"chat": iter(chat), "math": iter(math)}, []
    for kind, k in zip(kinds, counts):
        made = 0
        while made < k:
            src = {"constraint_violation": "chat", "wrong_answer": "math"}.get(kind, ("chat", "math")[made % 2])
            try:
                pair = make_pair(next(pools[src]), kind, r.random() < on_fraction, r)
            except StopIteration:
                raise ValueError(f"ran out of {src} prompts for {n} pairs; ask for fewer") from None
            if pair_differs_as_documented(pair):  # e.g. a truncation that happens to keep the right number: next
                out.append(pair)
                made += 1
    return out


def pair_differs_as_documented(pair: dict) -> bool:
    """The chosen answer passes the verifier in its mode's format; the rejected one fails in its kind's way."""
    on = pair["reasoning"] == "on"
    c, rj = pair_verifier_rewards(pair)
    if c != 2.0 or not format_correct(pair["chosen"], on):
        return False
    kind = pair["kind"]
    if kind == "constraint_violation":
        return instruction_following_score(pair["rejected"], pair["constraints"]) < 1.0
    if kind == "wrong_mode":
        return not format_correct(pair["rejected"], on)
    return rj < c


# ----------------------------------------------------------------------------
# JSON lines

def read_pairs(path: str) -> list[dict]:
    """Every line parsed and checked; the first bad one raises ValueError naming file:line and the field."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such pairs file; write one with `python -m data_gen.preferences --out {path}`")
    out = []
    for i, rec in json_lines(path):
        where = f"{path}:{i}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: a pair is a JSON object, got {type(rec).__name__}")
        missing = [k for k in REQUIRED if k not in rec]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}; every pair needs "
                             f"{', '.join(REQUIRED)} (see data_gen/preferences.py)")
        if isinstance(rec["input"], str):
            rec["input"] = [{"role": "user", "content": rec["input"]}]
        if not isinstance(rec["input"], list) or not rec["input"] or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in rec["input"]):
            raise ValueError(f"{where}: field input must be a string or a list of {{role, content}} messages")
        if rec["reasoning"] not in ("on", "off"):
            raise ValueError(f"{where}: field reasoning is {rec['reasoning']!r}; use 'on' or 'off'")
        for k in ("chosen", "rejected"):
            if not isinstance(rec[k], str) or not rec[k].strip():
                raise ValueError(f"{where}: field {k} is empty or not a string")
        for k in ("chosen_reward", "rejected_reward"):
            if k in rec and (isinstance(rec[k], bool) or not isinstance(rec[k], (int, float))):
                raise ValueError(f"{where}: field {k} is {rec[k]!r}; use a number or leave it out")
        for k in ("chosen_ended", "rejected_ended"):
            if k in rec and not isinstance(rec[k], bool):
                raise ValueError(f"{where}: field {k} is {rec[k]!r}; use true or false or leave it out")
        if isinstance(rec.get("constraints"), list):
            rec["constraints"] = json.dumps(rec["constraints"])
        rec.setdefault("kind", "unknown")
        out.append(rec)
    if not out:
        raise ValueError(f"{path}: no pairs (the file is empty)")
    return out


def write_pairs(path: str, pairs: list[dict], overwrite: bool = False) -> int:
    """Atomically (tmp file + rename); refuses an existing file unless overwrite."""
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} exists; pass --overwrite or choose another --out")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return len(pairs)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write preference pairs (training or held-out) as JSON lines")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default="all", help=f"comma list of {','.join(KINDS)}, or all")
    ap.add_argument("--heldout", action="store_true", help="pairs on evaluation-bucket prompts")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    kinds = KINDS if args.kinds == "all" else tuple(k.strip() for k in args.kinds.split(","))
    try:
        pairs = preference_pairs(args.n, args.seed, args.heldout, kinds, exclude=heldout_prompts())
        n = write_pairs(args.out, pairs, args.overwrite)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {n} pairs to {args.out}")


if __name__ == "__main__":
    main()
