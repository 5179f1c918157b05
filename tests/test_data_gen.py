"""data_gen: the record schema, generators, rejection sampling, splits and the distillation text mix."""

import json
import random
import re
from itertools import cycle

import pytest

from common.rewards import answer_correct, format_correct, instruction_following_score
from data_gen import build
from data_gen.instructions import generate_instructions, instruction_key
from data_gen.math_problems import (ITEMS, NAMES, eval_problems, generate_math, make_problem, rl_problems,
                                    semantic_key, template_of)
from data_gen.records import (in_eval_bucket, load_records, normalize_prompt, problem_id, problem_records, read_jsonl,
                              sample_unique, validate_record, write_jsonl)
from data_gen.science_mcq import generate_science, science_key
from data_gen.teacher import rejection_sample
from common.text_corpus import distill_documents


def _some_records():
    ps = generate_math(5, 1) + generate_science(3, 1) + generate_instructions(3, 1)
    return [r for p in ps for r in problem_records(p, ("on", "off"))]


# ----------------------------------------------------------------------------
# records

def test_records_round_trip_through_datasets(tmp_path):
    recs = _some_records()
    path = str(tmp_path / "train.jsonl")
    assert write_jsonl(path, recs) == len(recs)
    ds = load_records(str(tmp_path), "train")
    assert len(ds) == len(recs)
    assert [dict(row) for row in ds] == recs
    chat = [row for row in ds if row["category"] == "chat"][0]
    assert json.loads(chat["constraints"])[0]["type"]
    assert ds[0]["input"][0]["role"] == "user"


def test_string_input_copies_are_accepted(tmp_path):
    path = tmp_path / "copy.jsonl"
    raw = {"id": "a", "input": "What is 1 + 1?", "output": "The answer is 2.", "reasoning": "off",
           "system_prompt": "detailed thinking off", "category": "math", "generator": "x", "license": "cc-by-4.0"}
    path.write_text(json.dumps(raw) + "\n")
    assert read_jsonl(str(path))[0]["input"] == [{"role": "user", "content": "What is 1 + 1?"}]
    ds = load_records(str(path))
    assert ds[0]["input"] == [{"role": "user", "content": "What is 1 + 1?"}] and ds[0]["answer"] is None


@pytest.mark.parametrize("line,message", [
    ('{"id": "a", "input": [', "malformed JSON"),
    ('{"id": "a"}', "missing field"),
    (None, "reasoning"),  # reasoning "maybe"
    (None, "system_prompt"),  # toggle and system prompt disagree
    (None, "<think>"),  # reasoning on without a think block
])
def test_malformed_records_name_file_and_line(tmp_path, line, message):
    good = _some_records()[1]  # reasoning off
    bad = dict(good)
    if message == "reasoning":
        bad["reasoning"] = "maybe"
    elif message == "system_prompt":
        bad["system_prompt"] = "detailed thinking on"
    elif message == "<think>":
        bad.update(reasoning="on", system_prompt="detailed thinking on")
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + (line or json.dumps(bad)) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2") + ".*" + re.escape(message)):
        read_jsonl(str(path))
    with pytest.raises(ValueError, match=re.escape(f"{path}:2")):
        load_records(str(path))


def test_validate_record_says_the_fix():
    with pytest.raises(ValueError, match=r"^x\.jsonl:7: .*; use 'on' or 'off'$"):
        validate_record({**_some_records()[0], "reasoning": "yes"}, "x.jsonl:7")


def test_write_jsonl_refuses_to_overwrite(tmp_path):
    path = str(tmp_path / "a.jsonl")
    write_jsonl(path, _some_records())
    with pytest.raises(ValueError, match="exists"):
        write_jsonl(path, _some_records()[:1])
    assert len(read_jsonl(path)) == len(_some_records())
    write_jsonl(path, _some_records()[:1], overwrite=True)
    assert len(read_jsonl(path)) == 1


# ----------------------------------------------------------------------------
# generators

def test_math_answers_are_exact_and_responses_well_formed():
    ps = generate_math(100, seed=3)
    assert [sum(p["difficulty"] == lv for p in ps) for lv in range(1, 6)] == [20] * 5
    for p in ps:
        on, off = problem_records(p)
        assert on["id"] == off["id"] and on["reasoning"] == "on" and off["reasoning"] == "off"
        assert format_correct(on["output"], True) and format_correct(off["output"], False)
        assert answer_correct(on["output"], p["answer"]) and answer_correct(off["output"], p["answer"])
        last = re.findall(r"= (-?\d+)", p["think"])[-1]  # the worked steps end at the answer
        assert last == p["answer"]
        for lhs, rhs in re.findall(r"(\d[\d ×+-]*?) = (\d+)", p["think"]):  # every line's arithmetic is right
            assert eval(lhs.replace("×", "*")) == int(rhs), (lhs, rhs, p["think"])
        tail = re.escape(f" = {p['answer']}, so the answer is \\boxed{{{p['answer']}}}.")
        assert re.fullmatch(r"\d[\d ×+-]*" + tail, off["output"]), off  # "off": the last operation, then the answer
        assert len(on["output"]) < 640  # traces fit the eval's 320 new tokens (~2 characters per token)
    assert generate_math(100, seed=3) == ps and generate_math(100, seed=4) != ps


def test_column_arithmetic_traces():
    from data_gen.math_problems import calc
    assert calc(47, "+", 38) == (["7 + 8 = 15, so far 5, carry 1.", "4 + 3 + 1 = 8, so far 85.",
                                  "So 47 + 38 = 85."], 85)
    assert calc(52, "-", 38)[0][:2] == ["12 - 8 = 4, so far 4, borrow 1.", "5 - 1 - 3 = 1, so far 14."]
    assert calc(23, "×", 7)[0][:2] == ["3 × 7 = 21, so far 1, carry 2.", "2 × 7 + 2 = 16, so far 161."]
    assert calc(6, "×", 7) == (["6 × 7 = 42."], 42)
    r = random.Random(0)
    for _ in range(300):  # the digits written so far always spell the result
        a, b, d = r.randint(0, 9999), r.randint(0, 9999), r.randint(2, 9)
        for x, op, y in ((a, "+", b), (max(a, b), "-", min(a, b)), (a, "×", d)):
            lines, v = calc(x, op, y)
            if len(lines) > 1:
                assert int(re.findall(r"so far (\d+)", lines[-2])[0]) == v == eval(f"{x}{op}{y}".replace("×", "*"))


def test_eval_set_is_fixed_and_disjoint_from_training_problems():
    ev = eval_problems(300, seed=0)
    assert ev == eval_problems(300, seed=0)
    train = generate_math(3000, seed=0) + generate_math(3000, seed=1)
    assert not {normalize_prompt(p["question"]) for p in ev} & {normalize_prompt(p["question"]) for p in train}
    assert all(p["id"].startswith("eval-") for p in ev)
    assert len({semantic_key(p) for p in ev}) == len(ev)  # no two eval problems ask the same thing


def test_science_mcq_answer_is_the_correct_letter():
    for p in generate_science(50, seed=0):
        assert p["answer"] in "ABCD"
        assert re.search(rf"^{p['answer']}\) ", p["question"], flags=re.M)
        assert answer_correct(problem_records(p)[0]["output"], p["answer"])


def test_instruction_templates_satisfy_their_constraints():
    ps = generate_instructions(200, seed=0)
    types = {c["type"] for p in ps for c in p["constraints"]}
    assert types == {"word_count", "include_keyword", "lowercase", "bullet_count", "json_format", "end_with"}
    for p in ps:
        for rec in problem_records(p, ("on", "off")):
            assert instruction_following_score(rec["output"], rec["constraints"]) == 1.0


# ----------------------------------------------------------------------------
# teacher: rejection sampling with a scripted generate_fn

def _scripted(answers_by_prompt):
    calls = []

    def generate_fn(prompts, n, temperature, top_p, max_new_tokens):
        calls.append((len(prompts), n, temperature, top_p))
        return [[(f"<think>\nwork {i}\n</think>\nSo it is \\boxed{{{a}}}." if a is not None else "no think \\boxed{1}")
                 for i, a in enumerate(answers_by_prompt[p])] for p in prompts]
    return generate_fn, calls


def test_rejection_sampling_keeps_exactly_the_correct_solutions():
    probs = [{"id": "p1", "question": "Q1", "category": "math", "answer": "12", "difficulty": 1},
             {"id": "p2", "question": "Q2", "category": "math", "answer": "1/2", "difficulty": 2}]
    fn, calls = _scripted({"Q1": ["12", "13", None, "12.0"], "Q2": ["0.5", "2", "3", "4"]})
    recs, stats = rejection_sample(probs, fn, n_samples=4, generator="runs/x/teacher")
    assert calls == [(2, 4, 0.6, 0.95)]  # reasoning on: temperature 0.6, top_p 0.95
    assert [(r["id"], r["output"]) for r in recs] == [
        ("p1", "<think>\nwork 0\n</think>\nSo it is \\boxed{12}."),
        ("p1", "<think>\nwork 3\n</think>\nSo it is \\boxed{12.0}."),
        ("p2", "<think>\nwork 0\n</think>\nSo it is \\boxed{0.5}.")]
    assert all(r["generator"] == "runs/x/teacher" and r["reasoning"] == "on" for r in recs)
    assert stats["pass_rate"] == {"p1": 0.5, "p2": 0.25}
    assert (stats["kept"], stats["wrong"], stats["bad_format"]) == (3, 4, 1)


def test_majority_vote_without_ground_truth():
    probs = [{"id": "s1", "question": "Q1", "category": "science", "answer": None},
             {"id": "s2", "question": "Q2", "category": "science", "answer": None}]
    fn, _ = _scripted({"Q1": ["B", "C", "B", "A"], "Q2": ["A", "B", "C", "D"]})
    recs, stats = rejection_sample(probs, fn, n_samples=4)
    assert [r["output"][-4:] for r in recs] == ["{B}.", "{B}."]
    assert {r["answer"] for r in recs} == {"B"} and stats["no_majority"] == 1


# ----------------------------------------------------------------------------
# build.py

def test_build_splits_by_problem_id_and_excludes_the_eval_set(tmp_path, capsys):
    out = str(tmp_path / "d")
    build.main(["--out", out, "--math", "300", "--science", "60", "--instructions", "60", "--eval-math", "100",
                "--eval-instructions", "20", "--val-frac", "0.1", "--test-frac", "0.1"])
    splits = {s: read_jsonl(f"{out}/{s}.jsonl") for s in ("train", "validation", "test", "eval")}
    ids = {s: {r["id"] for r in recs} for s, recs in splits.items()}
    for a in ids:
        for b in ids:
            assert a == b or not ids[a] & ids[b], (a, b)
    prompts = {s: {normalize_prompt(r["input"][0]["content"]) for r in recs} for s, recs in splits.items()}
    assert not prompts["eval"] & (prompts["train"] | prompts["validation"] | prompts["test"])
    assert {r["input"][0]["content"] for r in splits["eval"] if r["category"] == "math"} == \
        {p["question"] for p in eval_problems(100, 0)}
    math_train = [r for r in splits["train"] if r["category"] == "math"]
    assert sum(r["reasoning"] == "on" for r in math_train) == sum(r["reasoning"] == "off" for r in math_train)
    card = json.load(open(f"{out}/data_card.json"))
    assert card["splits"]["train"]["math/on"]["count"] == 240
    assert "math/on" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--overwrite"):
        build.main(["--out", out])


def test_eval_jsonl_orders_math_round_robin_by_level_so_every_prefix_is_balanced(eval_data):
    """eval.jsonl (23 math problems: 5, 5, 5, 4, 4 per level) lists math one level at a time in turn, each
    problem's on and off records adjacent, then the instruction prompts in the order drawn."""
    recs = read_jsonl(f"{eval_data}/eval.jsonl")
    math = [r for r in recs if r["category"] == "math"]
    assert [r["id"] for r in math[0::2]] == [r["id"] for r in math[1::2]]  # on, off of one problem
    assert [r["reasoning"] for r in math[:2]] == ["on", "off"]
    assert [r["difficulty"] for r in math[0::2]] == [1, 2, 3, 4, 5] * 4 + [1, 2, 3]
    # the same problems as before, only reordered: each level keeps the order eval_problems drew it in
    drawn = eval_problems(23, 0)
    for lv in range(1, 6):
        assert [r["input"][0]["content"] for r in math[0::2] if r["difficulty"] == lv] == \
            [p["question"] for p in drawn if p["difficulty"] == lv]
    chat = [r for r in recs if r["category"] == "chat"][0::2]
    assert [r["input"][0]["content"] for r in chat] == [p["question"] for p in generate_instructions(6, 0, True)]
    assert [r["category"] for r in recs] == ["math"] * 46 + ["chat"] * 12


# ----------------------------------------------------------------------------
# held out by meaning: the semantic key

def _renamed(p: dict, k: int) -> dict:
    """p with every person name and item swapped for others (the k-th choice): the same problem in other words."""
    q = p["question"]
    for names in (NAMES, ITEMS):
        used = sorted({w for w in names if re.search(rf"\b{w}s?\b", q)}, key=len, reverse=True)
        free = [w for w in names if w not in used]
        for i, w in enumerate(used):
            q = re.sub(rf"\b{w}(s?)\b", rf"{free[(k + i) % len(free)]}\1", q)
    return {**p, "question": q, "id": problem_id("math", q)}


def test_semantic_key_ignores_names_and_wording_not_numbers():
    shop = "{} buys 3 {}s at $4 each and one {} for $5. How many dollars does {} spend?"
    a = {"question": shop.format("Ana", "pen", "apple", "Ana"), "answer": "17", "difficulty": 4}
    b = {"question": shop.format("Omar", "cookie", "book", "Omar"), "answer": "17", "difficulty": 4}
    assert semantic_key(a) == semantic_key(b)  # only names and items differ
    assert semantic_key({**b, "question": b["question"].replace("$5", "$6"), "answer": "18"}) != semantic_key(a)
    assert semantic_key({**a, "difficulty": 5}) != semantic_key(a)
    tank = "A tank holds 5 liters. A pump adds 3 liters per minute for 4 minutes. How many liters are in the tank now?"
    assert semantic_key({"question": tank, "answer": "17", "difficulty": 4}) != semantic_key(a)  # another template
    sub = {"question": "Subtract 38 from 52.", "answer": "14", "difficulty": 1}
    assert semantic_key(sub) == semantic_key({**sub, "question": "What is 52 - 38?"})  # a wording variant
    assert semantic_key(sub) != semantic_key({**sub, "question": "Subtract 37 from 51."})  # other numbers
    # a record read from disk has the key of its problem
    p = generate_math(5, seed=3)[-1]
    assert semantic_key(problem_records(p)[0]) == semantic_key(p)
    # every wording variant of a template is merged: as many templates per level as the generators have
    r = random.Random(0)
    n_templates = {lv: len({template_of(make_problem(r, lv)["question"]) for _ in range(2000)}) for lv in range(1, 6)}
    assert n_templates == {1: 2, 2: 3, 3: 3, 4: 5, 5: 3}
    # the other held-out kinds: the order of the options is not the meaning of a science question
    q = generate_science(1, seed=0)[0]
    stem, *options, last = q["question"].split("\n")
    assert science_key({**q, "question": "\n".join([stem, *reversed(options), last])}) == science_key(q)
    c = generate_instructions(1, seed=0)[0]
    assert instruction_key({**c, "constraints": list(reversed(c["constraints"]))}) == instruction_key(c)


def test_near_duplicates_fall_on_one_side_of_every_split():
    """The old bug: the eval bucket hashed the prompt string, so a renamed copy of an eval problem could be drawn for
    training. By the key, a problem and its renamed copies are on one side of the eval bucket and in one split."""
    from data_gen.build import split_by_meaning
    r = random.Random(0)
    problems = [make_problem(r, lv) for lv in (4, 5) for _ in range(100)]
    pairs = [({**p, "id": problem_id("math", p["question"])}, _renamed(p, k)) for k in range(3) for p in problems]
    pairs = [(a, b) for a, b in pairs if a["question"] != b["question"]]
    assert len(pairs) > 400 and all(semantic_key(a) == semantic_key(b) for a, b in pairs)
    split_old = [(a, b) for a, b in pairs if in_eval_bucket(normalize_prompt(a["question"]))
                 != in_eval_bucket(normalize_prompt(b["question"]))]
    assert len(split_old) > 50  # by prompt string these near-duplicates were split between eval and training
    assert all(in_eval_bucket(semantic_key(a)) == in_eval_bucket(semantic_key(b)) for a, b in pairs)
    # a generator keeps one problem per key, on the key's side: of a pair the old rule split, one is drawn, once
    a, b = split_old[0]
    side, stats = in_eval_bucket(semantic_key(a)), {}
    with pytest.raises(ValueError, match="distinct meaning"):
        sample_unique(lambda _, it=cycle([a, b]): dict(next(it)), 2, None, side, key=semantic_key, stats=stats)
    assert stats == {"near_duplicates": 1, "other_side": 0}
    with pytest.raises(ValueError, match="distinct meaning"):
        sample_unique(lambda _, it=cycle([a, b]): dict(next(it)), 1, None, not side, key=semantic_key)
    # train/validation/test: each pair lands whole in one split, and the splits are cut near the asked fractions
    problems = list({p["id"]: p for ab in pairs for p in ab}.values())  # each problem and its 1-3 renamed copies
    split = split_by_meaning(problems, 0.2, 0.2, seed=0)
    side = {p["id"]: s for s, ps in split.items() for p in ps}
    assert all(side[a["id"]] == side[b["id"]] for a, b in pairs)
    assert sorted(side) == sorted(p["id"] for p in problems)
    for s in ("validation", "test"):  # a group of up to 4 that straddles a cut goes whole to one side
        assert abs(len(split[s]) - round(0.2 * len(problems))) < 4, s
    assert split == split_by_meaning(list(reversed(problems)), 0.2, 0.2, seed=0)  # deterministic, order-free


def test_no_training_set_shares_a_key_with_any_evaluation_set():
    """Any size and seed: the stages' sets (05: seed 1234; 06, 07: seed 0; eval.jsonl, whose prefixes
    common.evaluate reads) and any other."""
    evals = [q for n, s in ((4, 0), (30, 0), (100, 0), (200, 0), (8, 1234), (32, 1234), (64, 1234), (37, 7))
             for q in eval_problems(n, s)]
    train = generate_math(3000, seed=0) + generate_math(1000, seed=5) + rl_problems(512, seed=0)
    assert not {semantic_key(p) for p in evals} & {semantic_key(p) for p in train}
    chat_eval = generate_instructions(300, 0, heldout=True) + generate_instructions(50, 3, heldout=True)
    chat_train = generate_instructions(1000, 0)
    assert not {instruction_key(p) for p in chat_eval} & {instruction_key(p) for p in chat_train}
    sci = generate_science(100, 0, heldout=True), generate_science(1000, 0)
    assert not {science_key(p) for p in sci[0]} & {science_key(p) for p in sci[1]}


def test_built_data_holds_out_every_evaluation_problem_by_meaning(tmp_path):
    from data_gen.build import meaning_key
    out = str(tmp_path / "d")
    build.main(["--out", out, "--math", "600", "--science", "100", "--instructions", "100", "--eval-math", "100",
                "--eval-instructions", "30", "--rl-math", "256", "--val-frac", "0.1", "--test-frac", "0.1"])
    files = {s: read_jsonl(f"{out}/{s}.jsonl") for s in ("train", "validation", "test", "eval", "rl_math")}
    keys = {s: {meaning_key(r) for r in recs} for s, recs in files.items()}
    assert len(files["rl_math"]) == 256
    stage_evals = ([q for n, s in ((4, 0), (30, 0), (100, 0), (8, 1234), (32, 1234), (64, 1234))
                    for q in eval_problems(n, s)] + generate_instructions(100, 0, heldout=True))
    held = keys["eval"] | {meaning_key(q) for q in stage_evals}
    for s in ("train", "validation", "test", "rl_math"):
        assert not keys[s] & held, s
    for x, y in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not keys[x] & keys[y], (x, y)
    card = json.load(open(f"{out}/data_card.json"))["semantic_key"]
    assert set(card["definition"]) == {"math", "science", "chat"} and card["dropped_eval_collisions"] == 0
    assert card["dropped"]["math"]["eval_bucket"] > 0  # draws whose meaning is reserved for evaluation


# ----------------------------------------------------------------------------
# the distillation text mix

def test_distill_documents_split_by_document():
    train, held = distill_documents("train"), distill_documents("heldout")
    assert not set(train) & set(held)
    assert 0.1 < len(held) / (len(train) + len(held)) < 0.2
    assert sum(map(len, train)) > 500_000
    assert distill_documents("heldout") == held
    with pytest.raises(ValueError):
        distill_documents("test")


def test_build_with_a_teacher_checkpoint_runs_end_to_end(tmp_path, capsys):
    """The real path: load_checkpoint + common.generate on a tiny random model (it keeps nothing, but runs)."""
    from common.checkpoint import save_checkpoint
    from conftest import tiny_model, tiny_tokenizer

    ckpt = save_checkpoint(tiny_model(), tiny_tokenizer(), str(tmp_path / "teacher"), stage="test")
    out = str(tmp_path / "d")
    build.main(["--out", out, "--math", "20", "--science", "5", "--instructions", "5", "--eval-math", "5",
                "--eval-instructions", "2", "--teacher", ckpt, "--samples", "2", "--teacher-problems", "3",
                "--teacher-max-new-tokens", "8", "--tokenizer", ckpt])
    card = json.load(open(f"{out}/data_card.json"))
    assert card["teacher"]["samples"] == 6 and card["length_unit"] == "tokens"
    assert "teacher: kept" in capsys.readouterr().out
