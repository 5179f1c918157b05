"""The Llama-Nemotron post-training record, and reading/writing it as JSON lines.

One record = one (prompt, response) pair with the reasoning toggle; the "on" and "off" versions of a problem
share `id`, so splits keep them together. Fields follow Llama-Nemotron-Post-Training-Dataset, plus `answer`,
`difficulty`, `id` and `constraints` (instruction-following checks, a JSON string) for RL and evaluation.
"""

import hashlib
import json
import os
import re

import datasets

from common.data import json_lines

FIELDS = ("id", "input", "output", "reasoning", "system_prompt", "category", "generator", "license", "answer",
          "difficulty", "constraints")
SYSTEM_PROMPTS = {"on": "detailed thinking on", "off": "detailed thinking off"}
LICENSE = "cc-by-4.0"
# An explicit schema: with it `datasets` never has to guess a column's type from a block of all-null values.
FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "input": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    "output": datasets.Value("string"), "reasoning": datasets.Value("string"),
    "system_prompt": datasets.Value("string"), "category": datasets.Value("string"),
    "generator": datasets.Value("string"), "license": datasets.Value("string"),
    "answer": datasets.Value("string"), "difficulty": datasets.Value("int64"),
    "constraints": datasets.Value("string"),
})


def make_record(id: str, prompt: str, output: str, reasoning: bool, category: str, answer=None, difficulty=None,
                generator: str = "template", constraints=None) -> dict:
    on = "on" if reasoning else "off"
    return {"id": id, "input": [{"role": "user", "content": prompt}], "output": output, "reasoning": on,
            "system_prompt": SYSTEM_PROMPTS[on], "category": category, "generator": generator, "license": LICENSE,
            "answer": None if answer is None else str(answer), "difficulty": difficulty,
            "constraints": None if constraints is None else json.dumps(constraints)}


def normalize_record(rec: dict) -> dict:
    """A copy with every field present: a string `input` becomes one user message, missing optionals None."""
    rec = dict(rec)
    if isinstance(rec.get("input"), str):
        rec["input"] = [{"role": "user", "content": rec["input"]}]
    for k in ("answer", "difficulty", "constraints", "license", "generator"):
        rec.setdefault(k, None)
    if isinstance(rec.get("constraints"), list):
        rec["constraints"] = json.dumps(rec["constraints"])
    if rec["answer"] is not None:
        rec["answer"] = str(rec["answer"])
    return rec


def validate_record(rec, where: str) -> None:
    """Raise ValueError('<where>: <problem>; <fix>') unless `rec` is a well-formed (normalized) record."""
    def bad(problem, fix):
        raise ValueError(f"{where}: {problem}; {fix}")
    if not isinstance(rec, dict):
        bad(f"record is a {type(rec).__name__}, not an object", "write one JSON object per line")
    missing = [k for k in ("id", "input", "output", "reasoning", "system_prompt", "category") if k not in rec]
    if missing:
        bad(f"missing field(s) {missing}", "add them (see data_gen/records.py FIELDS)")
    msgs = rec["input"]
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str) for m in msgs):
        bad("`input` must be a non-empty list of {role: 'user', content: str}",
            "put the system prompt in `system_prompt`, not in `input`")
    if rec["reasoning"] not in SYSTEM_PROMPTS:
        bad(f"`reasoning` is {rec['reasoning']!r}", "use 'on' or 'off'")
    if rec["system_prompt"] != SYSTEM_PROMPTS[rec["reasoning"]]:
        bad(f"`system_prompt` {rec['system_prompt']!r} does not match reasoning={rec['reasoning']!r}",
            f"use {SYSTEM_PROMPTS[rec['reasoning']]!r}")
    if not isinstance(rec["output"], str) or not rec["output"].strip():
        bad("`output` is empty or not a string", "drop the record or fill in the response")
    think = rec["output"].lstrip().startswith("<think>")
    if think != (rec["reasoning"] == "on"):
        bad(f"reasoning={rec['reasoning']!r} but output {'starts' if think else 'does not start'} with <think>",
            "reasoning-on outputs start with <think>...</think>, reasoning-off outputs have no think block")
    if rec.get("difficulty") is not None and not isinstance(rec["difficulty"], int):
        bad(f"`difficulty` is {rec['difficulty']!r}", "use an int or null")
    if not isinstance(rec["id"], str) or not rec["id"]:
        bad(f"`id` is {rec['id']!r}", "use a non-empty string shared by the on/off versions of a problem")


def normalize_prompt(text: str) -> str:
    """A prompt compared as text (problem ids, exact repeats): lowercase, whitespace collapsed."""
    return re.sub(r"\s+", " ", text.strip().lower())


def key_text(key) -> str:
    """A key as stable text (the same on every machine and Python): a string as is, a tuple as JSON."""
    return key if isinstance(key, str) else json.dumps(key, ensure_ascii=False)


def in_eval_bucket(key) -> bool:
    """1 in 8 meanings (by a stable hash of a problem's key: its semantic key, or a normalized prompt) are reserved
    for the held-out sets; training sets never draw them, so every held-out set of any size or seed is disjoint by
    meaning from every training set."""
    return hashlib.sha1(key_text(key).encode()).digest()[0] % 8 == 0


# ----------------------------------------------------------------------------
# JSON lines

def write_jsonl(path: str, records, overwrite: bool = False) -> int:
    """Validate and write records atomically (tmp file + rename); refuse an existing file unless overwrite."""
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} exists; pass overwrite=True (--overwrite) or choose another --out")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    n = 0
    with open(tmp, "w") as f:
        for n, rec in enumerate(records, 1):
            rec = normalize_record(rec)
            validate_record(rec, f"{path}: record {n}")
            f.write(json.dumps({k: rec.get(k) for k in FIELDS}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return n


def read_jsonl(path: str, allow_empty: bool = False) -> list[dict]:
    """Every line parsed, normalized and validated; the first bad line (not UTF-8, not JSON, not a record) raises
    ValueError naming file:line, and so does a file with no record unless allow_empty."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file; build it with `python -m data_gen.build --out DIR`")
    out = []
    for i, rec in json_lines(path, fix="re-encode the file as UTF-8 or rebuild it with `python -m data_gen.build`"):
        if isinstance(rec, dict):
            rec = normalize_record(rec)
        validate_record(rec, f"{path}:{i}")
        out.append(rec)
    if not out and not allow_empty:
        raise ValueError(f"{path}: no records (the file is empty); rebuild it with "
                         f"`python -m data_gen.build --out DIR`")
    return out


def load_records(path_or_dir: str, split: str = "train") -> datasets.Dataset:
    """A datasets.Dataset of records from DIR/<split>.jsonl (or one .jsonl file)."""
    path = os.path.join(path_or_dir, f"{split}.jsonl") if os.path.isdir(path_or_dir) else path_or_dir
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file; build it with `python -m data_gen.build --out DIR`")
    records = read_jsonl(path)  # validates every line first, so a bad one is named by file:line
    try:
        return datasets.load_dataset("json", data_files=path, split="train", features=FEATURES)
    except Exception:  # not our exact layout (e.g. string `input` copies): build it from the normalized records
        return datasets.Dataset.from_list([{k: r.get(k) for k in FIELDS} for r in records], features=FEATURES)


# ----------------------------------------------------------------------------
# problems -> records

def problem_id(category: str, prompt: str) -> str:
    """Stable id from the prompt, so the same problem gets the same id on every machine and run."""
    return f"{category}-{hashlib.sha1(normalize_prompt(prompt).encode()).hexdigest()[:12]}"


def sample_unique(make_problem, n: int, rng, heldout: bool = False, key=None, stats=None) -> list[dict]:
    """n problems from `make_problem(rng)` of distinct meaning, all inside (heldout) or outside the eval bucket.

    `key(problem)` is the problem's meaning (e.g. math_problems.semantic_key; default: the normalized prompt): the
    bucket is decided by the key, not by the prompt string, so two wordings of one problem (other names, other
    phrasing) always fall on the same side, and at most one of them is kept. `stats` (a dict, optional) counts the
    draws rejected for their key: "near_duplicates" (the key of a problem already drawn, in other words) and
    "other_side" (the key belongs to the other side of the eval bucket)."""
    key = key or (lambda p: normalize_prompt(p["question"]))
    stats = {} if stats is None else stats
    for name in ("near_duplicates", "other_side"):
        stats.setdefault(name, 0)
    prompts, keys, out = set(), set(), []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        p = make_problem(rng)
        prompt = normalize_prompt(p["question"])
        if prompt in prompts:  # the very same prompt again: not counted
            continue
        prompts.add(prompt)
        k = key(p)
        if in_eval_bucket(k) != heldout:
            stats["other_side"] += 1
        elif k in keys:
            stats["near_duplicates"] += 1
        else:
            keys.add(k)
            p["id"] = ("eval-" if heldout else "") + problem_id(p["category"], p["question"])
            out.append(p)
    raise ValueError(f"only {len(out)} problems of distinct meaning after many draws; ask for fewer than {n}")


def distinct_outside(draw, key, n: int, exclude: list[dict], what: str) -> list[dict]:
    """n items of distinct `key` from repeated `draw()` batches, none with a key of `exclude`; ValueError naming
    `what` if 50 batches do not give n."""
    banned = {key(p) for p in exclude}
    out, seen = [], set()
    for _ in range(50):
        for p in draw():
            k = key(p)
            if k not in banned and k not in seen:
                seen.add(k)
                out.append(p)
        if len(out) >= n:
            return out[:n]
    raise ValueError(f"only {len(out)} {what} of distinct meaning outside the evaluation set; ask for fewer than {n}")


def problem_records(p: dict, modes=("on", "off")) -> list[dict]:
    """The reasoning-on ("<think>steps</think> final") and -off ("short") records of one problem, same id."""
    out = []
    for mode in modes:
        text = f"<think>\n{p['think']}\n</think>\n{p['final']}" if mode == "on" else p["short"]
        out.append(make_record(p["id"], p["question"], text, mode == "on", p["category"], p.get("answer"),
                               p.get("difficulty"), constraints=p.get("constraints")))
    return out
