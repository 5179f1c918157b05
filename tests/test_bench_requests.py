"""benchmarks/bench_requests.py: two-phase budget forcing, requests/s from tokens/s, its files, bad input."""

import importlib.util
import json
import os

import pytest

from common.checkpoint import save_checkpoint
from common.rewards import THINK_CLOSE
from conftest import ROOT, tiny_model, tiny_tokenizer
from data_gen.math_problems import eval_problems

_spec = importlib.util.spec_from_file_location("bench_requests", os.path.join(ROOT, "benchmarks", "bench_requests.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run: two tiny models, 3 problems, budget 8, 1 speed round."""
    d = tmp_path_factory.mktemp("req")
    tok = tiny_tokenizer()
    save_checkpoint(tiny_model(seed=0), tok, str(d / "parent"), stage="parent")
    save_checkpoint(tiny_model(seed=1, num_layers=2), tok, str(d / "child"), stage="test")
    bench.main(["--models", f"parent={d / 'parent'},child={d / 'child'}", "--out", str(d / "out"), "--problems", "3",
                "--budgets", "8", "--rounds", "1", "--answer-tokens", "6", "--max-new-tokens-on", "12",
                "--batch", "2", "--prompt-len", "16", "--gen-len", "4", "--dtype", "float32"])
    return d / "out"


def thinking_model(tok, seed=0):
    """A tiny random model that opens every completion with <think> (its first tokens forced through the logits),
    then rambles: it never closes the block by itself."""
    import torch

    model = tiny_model(seed=seed)
    think = tok("<think>\n", add_special_tokens=False)["input_ids"]
    forward, step = model.forward, [0]

    def forced_forward(*a, **kw):
        out = forward(*a, **kw)
        step[0] = 0 if kw.get("past_key_values") is None else step[0] + 1  # a prefill starts a completion
        if step[0] < len(think):
            forced = torch.full_like(out.logits[:, -1], -1e4)
            forced[:, think[step[0]]] = 1e4
            out.logits[:, -1] = forced
        return out

    model.forward = forced_forward
    return model


def test_budget_forcing_closes_the_block_and_stays_within_the_budget():
    tok = tiny_tokenizer()
    problems = eval_problems(3, seed=0)
    outs = bench.budget_forced(thinking_model(tok), tok, problems, budget=8, answer_tokens=6, batch_size=2)
    tag = bench.n_tokens(tok, bench.FORCED_CLOSE)
    for o in outs:
        assert o["response"].startswith("<think>\n") and not o["no_think"]
        thinking, sep, answer = o["response"].partition(bench.FORCED_CLOSE)
        assert sep and THINK_CLOSE not in thinking  # the tag follows the thinking
        assert o["forced"] and o["thinking_tokens"] == bench.n_tokens(tok, thinking) <= 8
        assert o["tokens"] == o["thinking_tokens"] + tag + bench.n_tokens(tok, answer)
        assert bench.n_tokens(tok, answer) <= 6 + 2  # 6 generated tokens, re-tokenized


def test_budget_forcing_keeps_the_models_own_close_and_forces_it_otherwise(monkeypatch):
    """A model that closes its thinking is cut at its own </think> (not forced); one that does not is forced; the
    answer is generated from prompt + thinking + "</think>\\n"."""
    tok = tiny_tokenizer()
    calls = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc=None, **kw):
        calls.append((list(prompts), max_new_tokens))
        if len(calls) == 1:
            return [["<think>\nabc</think>\nThe answer is 4."], ["<think>\nlong thoughts that never end"]]
        return [["The answer is 4."], ["The answer is 5."]]

    monkeypatch.setattr(bench, "generate", fake_generate)
    problems = eval_problems(2, seed=0)
    outs = bench.budget_forced(None, tok, problems, budget=64, answer_tokens=10, batch_size=2)
    assert [o["forced"] for o in outs] == [False, True]
    assert outs[0]["response"] == "<think>\nabc" + bench.FORCED_CLOSE + "The answer is 4."
    assert outs[1]["response"].startswith("<think>\nlong thoughts that never end" + bench.FORCED_CLOSE)
    assert calls[0][1] == 64 and calls[1][1] == 10
    assert calls[1][0][0] == calls[0][0][0] + "<think>\nabc" + bench.FORCED_CLOSE
    tag = bench.n_tokens(tok, bench.FORCED_CLOSE)
    assert outs[0]["tokens"] == bench.n_tokens(tok, "<think>\nabc") + tag + bench.n_tokens(tok, "The answer is 4.")
    # a budget smaller than the decoded thinking re-tokenizes to: cut to the budget
    calls.clear()
    outs = bench.budget_forced(None, tok, problems, budget=3, answer_tokens=10, batch_size=2)
    assert [o["thinking_tokens"] for o in outs] == [3, 3]
    # no think tag at all (a model without the toggle): the answer as it stands, nothing forced, no second phase
    calls.clear()
    monkeypatch.setattr(bench, "generate", lambda *a, **kw: calls.append(a) or [["The answer is 4."], ["5"]])
    outs = bench.budget_forced(None, tok, problems, budget=64, answer_tokens=10, batch_size=2)
    assert len(calls) == 1 and [o["response"] for o in outs] == ["The answer is 4.", "5"]
    assert [(o["no_think"], o["forced"], o["thinking_tokens"]) for o in outs] == [(True, False, 0)] * 2
    assert outs[0]["tokens"] == bench.n_tokens(tok, "The answer is 4.")


def test_requests_per_second_is_tokens_per_second_over_tokens_per_request(run):
    res = json.loads((run / "requests.json").read_text())
    assert [r["effort"] for r in res["rows"][:3]] == ["off", "on, budget 8", "on"]
    by = {(r["model"], r["effort"]): r for r in res["rows"]}
    for r in res["rows"]:
        assert r["req_s"] == pytest.approx(r["tok_s"] / r["tokens"])
        assert r["tokens"] == pytest.approx(sum(r["tokens_per_problem"]) / 3)
        assert r["accuracy"] == pytest.approx(sum(r["correct"]) / 3)
        parent = by["parent", r["effort"]]
        assert r["req_s_ratio"] == pytest.approx(r["req_s"] / parent["req_s"])
        assert r["req_s_ratio_min"] <= r["req_s_ratio"] <= r["req_s_ratio_max"]
    for r in res["rows"]:  # the tiny random models never open a think block: nothing to force, the answer stands
        if r["effort"] == "on, budget 8":
            assert r["thinking_tokens_max"] <= 8 and r["no_think"] + r["forced"] <= 1
    assert res["speed"]["parent"]["ratio"] == 1.0
    assert by["child", "off"]["tok_s"] == res["speed"]["child"]["tok_s"]


def test_pairwise_statement_names_a_flip_between_per_token_and_per_request():
    # paired ratios to the parent decide, not the medians of tok/s (here drift makes b's median look faster)
    speed = {"a": {"tok_s": 90.0, "ratio": 2.0}, "b": {"tok_s": 100.0, "ratio": 1.0}}
    rows = [{"model": "a", "effort": "off", "tokens": 10.0, "tokens_per_problem": [10, 10], "req_s": 20.0},
            {"model": "a", "effort": "on", "tokens": 400.0, "tokens_per_problem": [400, 400], "req_s": 0.5},
            {"model": "b", "effort": "off", "tokens": 10.0, "tokens_per_problem": [10, 10], "req_s": 10.0},
            {"model": "b", "effort": "on", "tokens": 100.0, "tokens_per_problem": [100, 100], "req_s": 1.0}]
    (s,) = bench.per_token_vs_per_request(rows, speed)
    assert s.startswith("a vs b: a wins per token (2.00x tok/s) but loses per request at on (0.50x req/s")
    rows[1] |= {"tokens": 10.0, "tokens_per_problem": [10, 10], "req_s": 20.0}
    assert bench.per_token_vs_per_request(rows, speed) == ["a vs b: a wins per token (2.00x tok/s) and per request "
                                                           "at every effort"]


def test_outputs_written(run):
    assert (run / "requests.png").stat().st_size > 1000
    assert (run / "requests.png").read_bytes()[:4] == b"\x89PNG"
    res = json.loads((run / "requests.json").read_text())
    assert len(res["table"].splitlines()) == 2 + 2 * 3  # header, rule, 2 models x 3 efforts
    assert (run / "requests.md").read_text().count("| parent |") == 3
    assert len(res["statements"]) == 1


@pytest.mark.parametrize("argv, expect", [
    (["--budgets", "0,64"], "--budgets"), (["--budgets", "a"], "--budgets"), (["--budgets", ""], "--budgets"),
    (["--models", "parent"], "--models")])
def test_bad_flags_give_one_line_error(argv, expect, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--models", "p=/nonexistent", "--out", "/tmp/x"] + argv)
    assert e.value.code != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in last and expect in last


def test_missing_checkpoint_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.main(["--models", f"p={tmp_path / 'none'}", "--out", str(tmp_path / "out")])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "does not exist" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()
