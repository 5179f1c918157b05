"""common/data.py (chat template, loss mask, packing) and common/rewards.py (accuracy, format, IF verifiers)."""

import ast
import os
import threading

import pytest
import torch

from common.data import (SYSTEM_OFF, SYSTEM_ON, build_messages, collate, pack_examples, packed_attention_mask,
                         render_prompt, text_chunks, tokenize_sft_example)
from common.rewards import (answer_correct, extract_answer, final_answer, format_correct, has_think,
                            instruction_following_score)
from data_gen.records import make_record


def _record(reasoning=True):
    out = "<think>\n2 + 2 = 4.\n</think>\nSo the answer is \\boxed{4}." if reasoning else "The answer is \\boxed{4}."
    return make_record("math-x", "What is 2 + 2?", out, reasoning, "math", answer="4", difficulty=1)


# ----------------------------------------------------------------------------
# chat template and loss mask

def test_build_messages_puts_the_toggle_in_the_system_prompt():
    assert build_messages("hi", True) == [{"role": "system", "content": SYSTEM_ON}, {"role": "user", "content": "hi"}]
    rec = {"input": "hi"}  # a copy whose input is a string
    assert build_messages(rec, False) == [{"role": "system", "content": SYSTEM_OFF}, {"role": "user", "content": "hi"}]


def test_render_prompt_ends_with_assistant_header(tokenizer):
    p = render_prompt(tokenizer, build_messages("What is 2 + 2?", True))
    assert p == ("<|im_start|>system\ndetailed thinking on<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                 "<|im_start|>assistant\n")


@pytest.mark.parametrize("reasoning", [True, False])
def test_loss_mask_covers_only_the_assistant_response(tokenizer, reasoning):
    rec = _record(reasoning)
    ex = tokenize_sft_example(tokenizer, rec, max_len=1024)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    kept = [i for i, lab in enumerate(labels) if lab != -100]
    assert kept == list(range(kept[0], kept[-1] + 1)), "the labelled span is contiguous"
    assert all(labels[i] == ids[i] for i in kept)
    assert tokenizer.decode([ids[i] for i in kept]) == rec["output"] + "<|im_end|>"
    prompt = render_prompt(tokenizer, build_messages(rec, reasoning))
    assert tokenizer.decode(ids[:kept[0]]) == prompt  # everything before the response is masked
    assert tokenizer.decode(ids[kept[-1] + 1:]) == "\n"  # the template's newline after <|im_end|> is masked


def test_tokenize_truncates_to_max_len(tokenizer):
    ex = tokenize_sft_example(tokenizer, _record(), max_len=20)
    assert len(ex["input_ids"]) == len(ex["labels"]) == 20


# ----------------------------------------------------------------------------
# packing

def _ex(n, start):
    return {"input_ids": list(range(start, start + n)), "labels": [-100] + list(range(start + 1, start + n))}


def test_packing_restarts_position_ids_and_marks_every_token():
    rows = pack_examples([_ex(5, 10), _ex(7, 20), _ex(4, 30)], seq_len=12, pad_id=2)
    assert len(rows) == 2
    r0, r1 = rows
    assert r0["position_ids"] == list(range(5)) + list(range(7))
    assert r0["seq_ids"] == [0] * 5 + [1] * 7
    assert r0["input_ids"] == list(range(10, 15)) + list(range(20, 27))
    assert r1["position_ids"] == list(range(4)) + [0] * 8
    assert r1["seq_ids"] == [0] * 4 + [-1] * 8
    assert r1["input_ids"][4:] == [2] * 8 and r1["labels"][4:] == [-100] * 8
    assert all(len(r[k]) == 12 for r in rows for k in r)


def test_packing_truncates_long_examples():
    rows = pack_examples([_ex(20, 0), _ex(3, 50)], seq_len=8)
    assert [r["seq_ids"] for r in rows] == [[0] * 8, [0] * 3 + [-1] * 5]


def test_packed_attention_mask_is_causal_and_block_diagonal():
    seq = torch.tensor([[0, 0, 0, 1, 1, -1, -1]])
    m = packed_attention_mask(seq)
    assert m.shape == (1, 1, 7, 7) and m.dtype == torch.bool
    expected = torch.zeros(7, 7, dtype=torch.bool)
    for i in range(7):
        for j in range(i + 1):
            expected[i, j] = seq[0, i] == seq[0, j] and seq[0, i] >= 0
        expected[i, i] = True  # padding sees itself only: no empty row
    assert torch.equal(m[0, 0], expected)
    assert m[0, 0, 3, :3].sum() == 0  # example 1 never sees example 0
    assert m.any(-1).all()


def test_collate_pads_and_adds_mask():
    batch = collate([_ex(3, 10), _ex(5, 20)], pad_id=2)
    assert batch["input_ids"].tolist()[0] == [10, 11, 12, 2, 2]
    assert batch["labels"][0, 3:].tolist() == [-100, -100]
    assert batch["seq_ids"].tolist() == [[0, 0, 0, -1, -1], [0] * 5]
    assert torch.equal(batch["attention_mask"][1, 0], torch.ones(5, 5, dtype=torch.bool).tril())


def test_text_chunks_join_documents_with_eos(tokenizer):
    docs = ["The quick brown fox. " * 5, "Another document about assignment statements. " * 3]
    chunks = text_chunks(tokenizer, docs, seq_len=16)
    ids = tokenizer(docs[0], add_special_tokens=False)["input_ids"]
    assert chunks.dim() == 2 and chunks.shape[1] == 16
    assert chunks.flatten()[len(ids)].item() == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="no chunk"):
        text_chunks(tokenizer, ["hi"], seq_len=1000)


# ----------------------------------------------------------------------------
# rewards

def test_extract_answer():
    assert extract_answer("x \\boxed{3} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert extract_answer("I think 12, no, the answer is 1,234 apples") == "1234"
    assert extract_answer("Answer: (B)") == "B" and extract_answer("so the answer is -7/2.") == "-7/2"
    assert extract_answer("I think 12, no, 1,234 apples") is None  # a bare number is not a stated answer
    assert extract_answer("The answer is a little tricky: 7") is None  # "a" is a word, not option A
    assert extract_answer("no numbers here") is None


def test_final_answer_reads_only_the_answer_part():
    assert final_answer("<think>maybe \\boxed{3}</think>The answer is \\boxed{4}.") == "4"
    assert final_answer("<think>so it is \\boxed{3}</think>I am not sure.") is None  # the think block's guess
    assert final_answer("<think>2+2 is 4, so the answer is \\boxed{4}") is None     # thinking never closed


@pytest.mark.parametrize("pred,gold,ok", [
    ("So the answer is \\boxed{42}.", "42", True),
    ("So the answer is \\boxed{41}.", "42", False),
    ("The answer is \\boxed{0.5}.", "1/2", True),
    ("The answer is \\boxed{\\frac{1}{2}}.", "0.5", True),
    ("The answer is \\boxed{B}.", "B", True),
    ("The answer is \\boxed{C}.", "B", False),
    ("It is 17", "17", False),  # unboxed, unstated: a guess
    ("The answer is 17.", "17", True),
    ("<think>17</think>\\boxed{17}", "17", True),
    ("<think>\\boxed{17}", "17", False),
    ("no answer", "17", False),
    ("The answer is \\boxed{\\sqrt{4}}.", "2", True),  # needs math-verify
])
def test_answer_correct(pred, gold, ok):
    assert answer_correct(pred, gold) is ok


def test_answer_correct_works_outside_the_main_thread():
    results = []
    t = threading.Thread(target=lambda: results.append(answer_correct("\\boxed{\\sqrt{9}}", "3")))
    t.start()
    t.join()
    assert results == [True]


def test_format_correct_follows_the_toggle():
    good_on = "<think>\nsteps\n</think>\nThe answer is \\boxed{4}."
    assert format_correct(good_on, True) and has_think(good_on)
    assert not format_correct(good_on, False)
    assert not format_correct("<think>\nsteps\n</think>\n", True)  # empty answer
    assert not format_correct("The answer is 4. <think>x</think> 4", True)  # not at the start
    assert not format_correct("<think>a</think><think>b</think> 4", True)  # two blocks
    assert format_correct("The answer is \\boxed{4}.", False) and not has_think("The answer is 4")
    assert not format_correct("The answer </think> 4", False)


@pytest.mark.parametrize("constraint,good,bad", [
    ({"type": "word_count", "n": 3}, "one two three.", "one two"),
    ({"type": "include_keyword", "keyword": "Moon"}, "the moon is bright", "the moonlight is bright"),
    ({"type": "lowercase"}, "all lower case.", "Not lower."),
    ({"type": "bullet_count", "n": 2}, "- a\n- b", "- a\n- b\n- c"),
    ({"type": "json_format"}, '```json\n{"a": 1}\n```', "{a: 1}"),
    ({"type": "end_with", "phrase": "That is all."}, "Facts. That is all.", "That is all. More."),
])
def test_instruction_verifiers(constraint, good, bad):
    assert instruction_following_score(good, [constraint]) == 1.0
    assert instruction_following_score(bad, [constraint]) == 0.0


def test_instruction_following_score_is_a_fraction_and_ignores_the_think_block():
    cons = '[{"type": "lowercase"}, {"type": "word_count", "n": 2}]'  # the record's JSON string
    assert instruction_following_score("<think>\nPlan It.\n</think>\nhello world", cons) == 1.0
    assert instruction_following_score("Hello world", cons) == 0.5
    with pytest.raises(ValueError, match="unknown constraint"):
        instruction_following_score("x", [{"type": "rhyme"}])


def test_first_answer_token_weights_mark_each_examples_decision_token():
    """The toggle's decision token of every packed example (its answer's first token) gets the weight; the
    model's loss with those weights is the weighted mean of the token losses."""
    import torch.nn.functional as F
    from conftest import tiny_model

    from common.data import IGNORE, first_answer_token_weights, pack_examples

    exs = [{"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE, IGNORE, 7, 8, 9]},
           {"input_ids": [10, 11, 12, 13], "labels": [IGNORE, 11, 12, IGNORE]}]
    row = pack_examples(exs, 12)[0]
    labels = torch.tensor([row["labels"]])
    w = first_answer_token_weights(labels, 5.0)
    assert w[0].tolist() == [1, 1, 5, 1, 1, 1, 5, 1, 1, 1, 1, 1]
    assert first_answer_token_weights(labels, 1.0) is None
    model, ids = tiny_model(), torch.tensor([row["input_ids"]])
    with torch.no_grad():
        out = model(ids, labels=labels, return_logits=False, loss_weights=w)
        logits = model(ids).logits[0, :-1].float()
    tgt, keep = labels[0, 1:], labels[0, 1:] != IGNORE
    ce = F.cross_entropy(logits[keep], tgt[keep], reduction="none")
    ww = w[0, 1:][keep]
    assert out.loss.item() == pytest.approx(((ww * ce).sum() / ww.sum()).item(), rel=1e-4)


# ----------------------------------------------------------------------------
# common/ and data_gen: data flows one way

def test_common_imports_no_data_gen():
    """data_gen builds on common (records, the chat template, rewards); common reads data_gen's output as data
    (eval_sets, sft_records), never its code: no import of data_gen anywhere in common/, at the top or in a function."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "common")
    found = []
    for dirpath, _, files in os.walk(root):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            for node in ast.walk(ast.parse(open(path).read(), path)):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{os.path.relpath(path, root)}:{node.lineno} {n}" for n in names
                          if n == "data_gen" or n.startswith("data_gen.")]
    assert found == []


def test_record_problem_is_the_problem_an_evaluation_reads():
    from common.data import record_problem

    math = record_problem(_record())
    assert math == {"id": "math-x", "category": "math", "question": "What is 2 + 2?", "answer": "4", "difficulty": 1}
    chat = record_problem(make_record("chat-y", "Say hi.", "hi", False, "chat",
                                      constraints=[{"type": "lowercase"}]))
    assert chat["question"] == "Say hi." and chat["constraints"] == [{"type": "lowercase"}]
    assert "difficulty" not in chat and chat["answer"] is None
    assert instruction_following_score("hi", chat["constraints"]) == 1.0
