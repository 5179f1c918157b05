"""data_gen: the record schema, generators, rejection sampling, splits and the distillation text mix."""

import json
import random
import re

import pytest

from common.rewards import answer_correct, format_correct, instruction_following_score
from data_gen import build
from data_gen.instructions import generate_instructions
from data_gen.math_problems import eval_problems, generate_math
from data_gen.records import (load_records, normalize_prompt, problem_records, read_jsonl, validate_record,
                              write_jsonl)
from data_gen.science_mcq import generate_science
from data_gen.teacher import rejection_sample
from data_gen.text import distill_documents


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
