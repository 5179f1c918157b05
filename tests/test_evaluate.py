"""The evaluation suite and the generation interface, on tiny models with the tiny ChatML tokenizer."""

import copy
import json
import statistics
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from common.checkpoint import save_checkpoint
from common.data import eval_sets
from common.evaluate import TEXT_METRICS, TextEval, evaluate_checkpoint, generation_eval, main, speed_eval
from common.stats import gap_label, paired_diff, paired_gaps, ratio_se
from common.generate import decode, generate, left_pad


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are op-overhead bound: one thread is faster, and on a busy 2-core machine two OpenMP
    threads wait on each other at every op (seen here: 6 s instead of 0.05 s per tiny generate)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def parent_and_eval():
    model, tok = tiny_model(), tiny_tokenizer()
    return model, tok, TextEval(model, tok, seq_len=32, num_seqs=6, batch_size=4)


def perturbed(model, scale=0.05, seed=1):
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.model.layers[1].parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


def test_text_eval_parent_against_itself_has_zero_kl_and_full_agreement(parent_and_eval):
    model, _, tev = parent_and_eval
    assert tev.ids.shape == (6, 32) and tev.num_tokens == 192
    m = tev(model)  # a real forward, not the cached shortcut
    assert m["kl_parent"] == 0.0 and m["top1_agreement"] == 1.0
    assert m["lm_loss"] == pytest.approx(tev.parent_metrics["lm_loss"], abs=1e-6)
    assert m["next_token_acc"] == tev.parent_metrics["next_token_acc"]


def test_text_eval_perturbed_model_has_positive_kl_matching_exact_float64_kl(parent_and_eval):
    model, _, tev = parent_and_eval
    child = perturbed(model)
    m = tev(child)
    assert m["kl_parent"] > 0 and m["top1_agreement"] < 1
    with torch.no_grad():  # the exact KL(parent || child), float64, no cache
        lp = model(tev.ids).logits.double().log_softmax(-1)
        lq = child(tev.ids).logits.double().log_softmax(-1)
        exact = (lp.exp() * (lp - lq)).sum(-1).mean().item()
        agree = (lp.argmax(-1) == lq.argmax(-1)).double().mean().item()
    assert m["kl_parent"] == pytest.approx(exact, rel=1e-3)  # the float16 cache is exact enough
    assert m["top1_agreement"] == pytest.approx(agree)
    assert tev(perturbed(model, scale=0.2))["kl_parent"] > m["kl_parent"]  # a larger change, a larger KL


def test_text_eval_se_is_the_standard_error_of_the_per_chunk_values(parent_and_eval):
    model, _, tev = parent_and_eval
    child = perturbed(model)
    m = tev(child)
    with torch.no_grad():  # each chunk's values by hand, float64, no cache
        lp = model(tev.ids).logits.double().log_softmax(-1)
        lq = child(tev.ids).logits.double().log_softmax(-1)
    tgt = tev.ids[:, 1:]
    by_hand = {"lm_loss": -lq[:, :-1].gather(-1, tgt[..., None]).squeeze(-1).mean(1),
               "next_token_acc": (lq[:, :-1].argmax(-1) == tgt).double().mean(1),
               "kl_parent": (lp.exp() * (lp - lq)).sum(-1).mean(1),
               "top1_agreement": (lp.argmax(-1) == lq.argmax(-1)).double().mean(1)}
    for k, v in by_hand.items():
        v = v.tolist()
        assert len(m["per_seq"][k]) == 6 and m["per_seq"][k] == pytest.approx(v, rel=1e-3), k
        assert m[f"{k}_se"] > 0 and m[f"{k}_se"] == pytest.approx(statistics.stdev(v) / 6 ** 0.5, rel=5e-3), k
        assert statistics.mean(m["per_seq"][k]) == pytest.approx(m[k]), k  # the per-chunk values average to it


def test_paired_diff_of_a_model_against_itself_is_zero(parent_and_eval):
    model, _, tev = parent_and_eval
    a, b = tev(perturbed(model)), tev(perturbed(model, scale=0.2))
    for k in TEXT_METRICS:
        assert paired_diff(a, a, k) == (0.0, 0.0)
        assert paired_diff(tev(model), tev.parent_metrics, k) == pytest.approx((0.0, 0.0), abs=1e-6)
    d, se = paired_diff(b, a, "kl_parent")  # a larger perturbation: a larger KL, by more than its noise here
    assert d == pytest.approx(b["kl_parent"] - a["kl_parent"]) and 0 < se < d
    g = paired_gaps(b, a)
    assert g["kl_parent"] == d and g["kl_parent_se"] == se and g["kl_parent_beyond_2se"] == (d > 2 * se)
    assert gap_label(paired_gaps(a, a)) == "no"
    assert gap_label({"kl_parent_beyond_2se": True, "next_token_acc_beyond_2se": True}) == "KL, acc"
    assert gap_label({"kl_parent_beyond_2se": False, "next_token_acc_beyond_2se": True}) == "acc"
    assert paired_gaps(a, a) == {"kl_parent": 0.0, "kl_parent_se": 0.0, "kl_parent_beyond_2se": False,
                                 "next_token_acc": 0.0, "next_token_acc_se": 0.0, "next_token_acc_beyond_2se": False}
    with pytest.raises(ValueError, match="same evaluation chunks"):
        paired_diff(a, {"per_seq": {"kl_parent": [0.0]}}, "kl_parent")


def test_ratio_se_matches_the_spread_of_the_ratio_over_resampled_evaluations():
    """Retention's paired SE: over many simulated evaluations (chunk difficulty shared by both models), the SE
    ratio_se reports matches the actual spread of the ratio of means, and is far below the unpaired SE."""
    g = np.random.default_rng(0)
    ratios, ses, unpaired = [], [], []
    for _ in range(2000):
        hard = g.normal(0.42, 0.05, 16)  # per-chunk parent accuracy
        child = 0.9 * hard + g.normal(0, 0.01, 16)
        r, se = ratio_se(list(child), list(hard))
        ratios.append(r), ses.append(se), unpaired.append(child.std(ddof=1) / 4 / hard.mean())
    assert np.mean(ratios) == pytest.approx(0.9, abs=0.002)
    assert np.mean(ses) == pytest.approx(np.std(ratios), rel=0.1)
    assert np.mean(ses) < np.mean(unpaired) / 3
    assert ratio_se([0.5, 0.3], [0.5, 0.3]) == (1.0, 0.0)
    with pytest.raises(ValueError, match="paired items"):
        ratio_se([0.5], [0.5, 0.3])


def test_generate_returns_n_samples_per_prompt():
    model, tok = tiny_model(), tiny_tokenizer()
    outs = generate(model, tok, ["What is 2 + 2?", "Hi"], n=2, temperature=1.0, max_new_tokens=6, seed=0)
    assert len(outs) == 2 and all(len(o) == 2 and all(isinstance(s, str) for s in o) for o in outs)


def test_greedy_generate_matches_model_generate_per_prompt_under_left_padding():
    model, tok = tiny_model(seed=3), tiny_tokenizer()
    prompts = ["What is 12 + 30?", "The answer is", "system user assistant detailed thinking on off, a longer one"]
    outs = generate(model, tok, prompts, max_new_tokens=10, batch_size=3)  # one batch, three lengths
    for p, o in zip(prompts, outs):
        ids = tok(p, add_special_tokens=False, return_tensors="pt").input_ids
        ref = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        ref = ref.tolist()
        ref = ref[:ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref
        assert o == [tok.decode(ref, skip_special_tokens=True)]


def test_sampled_decode_draws_what_hf_generate_draws():
    """One row, the same seed: our decode loop and transformers' model.generate (temperature, top-p, top_k 0)
    sample the very same tokens, so the sampling rule is HF's."""
    model, tok = tiny_model(seed=3), tiny_tokenizer()
    ids = tok("What is 12 + 30?", add_special_tokens=False, return_tensors="pt").input_ids
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
        torch.manual_seed(5)
        ref = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                             eos_token_id=[10**6], pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        torch.manual_seed(5)
        out = decode(model, ids, torch.ones_like(ids), 12, [10**6], tok.pad_token_id, temperature, top_p)[0]
        assert out.tolist() == ref.tolist()


def test_one_prefill_per_group_draws_what_hf_generate_draws_for_its_copies():
    """copies=3: the prompt is prefilled once and its cache shared by three rows; under one seed the rows sample
    exactly what model.generate draws with num_return_sequences=3 (which prefills all three), with prompts of
    other lengths in the batch; greedy copies equal the prompt decoded alone."""
    model, tok = tiny_model(seed=3), tiny_tokenizer()
    prompts = ["What is 12 + 30?", "system user assistant detailed thinking on off, a longer one"]
    ids, mask = left_pad([tok(p, add_special_tokens=False).input_ids for p in prompts], tok.pad_token_id)
    torch.manual_seed(5)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0,
                         num_return_sequences=3, eos_token_id=[10**6], pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    torch.manual_seed(5)
    out = decode(model, ids, mask, 12, [10**6], tok.pad_token_id, 1.0, copies=3)
    assert out.shape == (6, 12) and out.tolist() == ref.tolist()
    assert len({tuple(r) for r in out.tolist()}) > 2  # the copies are separate draws, not one row repeated
    greedy = decode(model, ids, mask, 12, [10**6], tok.pad_token_id, copies=2)
    assert greedy.tolist() == decode(model, ids, mask, 12, [10**6], tok.pad_token_id).repeat_interleave(2, 0).tolist()


def test_decode_drops_finished_rows_without_changing_the_others():
    """A row that stops early leaves the batch and its KV cache: the other rows' tokens are exactly those of a
    batch where nothing stopped, and the stopped row is padded after its EOS."""
    model, tok = tiny_model(seed=3), tiny_tokenizer()
    prompts = ["What is 12 + 30?", "The answer is", "system user assistant detailed thinking on off, a longer one"]
    never, pad = [10**6], tok.pad_token_id
    ids, mask = left_pad([tok(p, add_special_tokens=False).input_ids for p in prompts], pad)
    assert mask.sum(1).tolist() == [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
    full = decode(model, ids, mask, 12, never, pad)
    others = set(full[1:].flatten().tolist())
    k, stop = next((k, t) for k, t in enumerate(full[0].tolist()) if t not in others and k < 11)  # only row 0 has it
    cut = decode(model, ids, mask, 12, [stop], pad)
    assert cut[1:].tolist() == full[1:].tolist()
    assert cut[0, :k + 1].tolist() == full[0, :k + 1].tolist() and set(cut[0, k + 1:].tolist()) <= {pad}


def test_generate_cuts_at_stop_string():
    model, tok = tiny_model(seed=3), tiny_tokenizer()
    full = generate(model, tok, ["The answer is"], max_new_tokens=10)[0][0]
    stop = full[2:4]
    cut = generate(model, tok, ["The answer is"], max_new_tokens=10, stop=[stop])[0][0]
    assert stop not in cut and full.startswith(cut)


def test_generate_progress_bar_leaves_outputs_unchanged(capsys):
    model, tok = tiny_model(seed=3), tiny_tokenizer()
    prompts = ["What is 12 + 30?", "The answer is", "Hi"]
    sampled = {"n": 2, "temperature": 1.0, "seed": 0, "return_ids": True}  # the same RNG draws with the bar
    for kw, steps in (({}, 12), (sampled, 18)):  # rows / batch_size 2 = 2 or 3 batches of 6 decode steps
        plain = generate(model, tok, prompts, max_new_tokens=6, batch_size=2, **kw)
        capsys.readouterr()
        assert generate(model, tok, prompts, max_new_tokens=6, batch_size=2, desc="gen test", **kw) == plain
        assert f"gen test: 100%|██████████| {steps}/{steps}" in capsys.readouterr().err


def test_speed_eval_same_model_gives_positive_numbers_and_ratios():
    model = tiny_model()
    s = speed_eval(model, model, batch_sizes=(1, 2), prompt_len=16, gen_len=8, repeats=3)
    for k, v in s["model"].items():
        assert v > 0 and s["parent"][k] > 0
        assert s["ratio"][k] == v / s["parent"][k]  # no timing bound: speed is benchmarked, not tested
    assert s["ratio"]["peak_mem_mb_b2"] == 1.0 and s["memory"].startswith("computed")


def test_generation_eval_scores_accuracy_and_format():
    model, tok = tiny_model(), tiny_tokenizer()
    problems = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "Say hi.", "answer": None,
                "constraints": [{"type": "lowercase"}]}]
    m = generation_eval(model, tok, problems, reasoning=False, max_new_tokens=8, batch_size=2)
    assert m["n"] == 2 and 0 <= m["accuracy"] <= 1 and m["mean_response_tokens"] > 0
    assert m["format_compliance"] == 1.0  # reasoning off: compliant unless the random model writes a think tag
    assert len(m["samples"]) == 2 and "instruction_score" in m


def test_evaluate_checkpoint_parent_against_itself_is_all_ones(eval_data):
    model, tok = tiny_model(), tiny_tokenizer()
    m = evaluate_checkpoint(model, model, tok, quick=True, gen_sets=eval_sets(eval_data))
    assert m["text"]["kl_parent"] == 0.0 and m["retention"]["next_token_acc"] == 1.0
    assert set(m["speed"]["ratio"].values()) == {1.0}
    assert m["parent_gen"]["gen_on"]["accuracy"] == m["gen_on"]["accuracy"]
    assert m["gen_on"]["n"] == 4 and m["gen_if"]["n"] == 2 and "instruction_score" in m["gen_if"]


@pytest.fixture
def gen_calls(monkeypatch):
    """(desc, problems) of every generation_eval call of the gen suite; the real evaluation runs."""
    import common.evaluate as ev

    calls, real = [], ev.generation_eval

    def spy(model, tokenizer, problems, *a, **kw):
        calls.append((kw["desc"], list(problems)))
        return real(model, tokenizer, problems, *a, **kw)
    monkeypatch.setattr(ev, "generation_eval", spy)
    return calls


def test_gen_suite_needs_its_sets_and_reuses_parent_gen_only_on_the_same_problems(eval_data, gen_calls):
    parent, child, tok = tiny_model(), perturbed(tiny_model()), tiny_tokenizer()
    with pytest.raises(ValueError, match="gen suite needs the evaluation sets.*eval_sets"):
        evaluate_checkpoint(child, parent, tok, suites=("gen",), quick=True)
    with pytest.raises(ValueError, match="asks for 30 math problems .*--eval-math"):
        evaluate_checkpoint(child, parent, tok, suites=("gen",), quick=True, gen_problems=30,
                            gen_sets=eval_sets(eval_data))
    assert gen_calls == []  # nothing ran before the check
    sets = eval_sets(eval_data)
    first = evaluate_checkpoint(child, parent, tok, suites=("gen",), quick=True, gen_sets=sets)
    assert sum(d.startswith("parent:") for d, _ in gen_calls) == 3
    again = evaluate_checkpoint(child, parent, tok, suites=("gen",), quick=True, gen_sets=sets,
                                parent_gen=first["parent_gen"])
    assert sum(d.startswith("parent:") for d, _ in gen_calls) == 3  # the same problems: the parent's numbers reused
    assert again["parent_gen"] == first["parent_gen"]
    other = {"math": sets["math"][1:], "chat": sets["chat"]}  # same sizes and budgets, other problems
    m = evaluate_checkpoint(child, parent, tok, suites=("gen",), quick=True, gen_sets=other,
                            parent_gen=first["parent_gen"])
    assert sum(d.startswith("parent:") for d, _ in gen_calls) == 6  # never the parent's numbers of other problems
    assert m["settings"]["gen_sets_sha1"] != first["settings"]["gen_sets_sha1"]
    assert m["parent_gen"]["settings"] == m["settings"]


def test_cli_gen_suite_takes_the_first_math_problems_of_eval_jsonl_balanced_over_levels(tmp_path, eval_data,
                                                                                      gen_calls):
    tok = tiny_tokenizer()
    save_checkpoint(tiny_model(), tok, str(tmp_path / "parent"), stage="parent")
    main(["--model", str(tmp_path / "parent"), "--parent", str(tmp_path / "parent"), "--stage", "parent",
          "--run-dir", str(tmp_path), "--quick", "--suites", "gen", "--data", eval_data, "--gen-problems", "10",
          "--if-problems", "3", "--no-gen-cache"])
    records = [json.loads(line) for line in open(f"{eval_data}/eval.jsonl")]
    ids = {c: list(dict.fromkeys(r["id"] for r in records if r["category"] == c)) for c in ("math", "chat")}
    (_, on), (_, off), (_, chat) = gen_calls  # the parent against itself: evaluated once
    assert [p["id"] for p in on] == [p["id"] for p in off] == ids["math"][:10]
    assert Counter(p["difficulty"] for p in on) == {1: 2, 2: 2, 3: 2, 4: 2, 5: 2}
    assert [p["id"] for p in chat] == ids["chat"][:3] and all(isinstance(p["constraints"], list) for p in chat)
    m = json.load(open(tmp_path / "metrics" / "parent.json"))
    assert m["gen_on"]["n"] == 10 and sorted(m["gen_on"]["accuracy_by_level"]) == ["1", "2", "3", "4", "5"]
    assert m["settings"]["gen_problems"] == 10 and m["gen_if"]["n"] == 3


def test_cli_gen_suite_without_data_is_a_one_line_error(tmp_path):
    save_checkpoint(tiny_model(), tiny_tokenizer(), str(tmp_path / "parent"), stage="parent")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "parent"), "--parent", str(tmp_path / "parent"), "--stage", "parent",
              "--run-dir", str(tmp_path), "--quick", "--suites", "text,gen"])
    assert e.value.code == ("error: --data: the gen suite needs the evaluation sets; give a directory written by "
                            "python -m data_gen.build")
    assert not (tmp_path / "metrics" / "parent.json").exists()


def test_cli_writes_metrics_for_a_child_against_its_parent(tmp_path, eval_data):
    tok = tiny_tokenizer()
    save_checkpoint(tiny_model(), tok, str(tmp_path / "parent"), stage="parent")
    save_checkpoint(perturbed(tiny_model()), tok, str(tmp_path / "child"), stage="test")
    main(["--model", str(tmp_path / "child"), "--parent", str(tmp_path / "parent"), "--stage", "child",
          "--run-dir", str(tmp_path), "--quick", "--suites", "text,gen", "--data", eval_data])
    m = json.load(open(tmp_path / "metrics" / "child.json"))
    assert m["stage"] == "child" and m["dtype"] in ("float32", "bfloat16")
    assert m["text"]["kl_parent"] > 0 and 0 < m["text"]["top1_agreement"] < 1
    assert set(m["retention"]) >= {"next_token_acc", "gen_on_accuracy"} and "speed" not in m


def test_toggle_eval_counts_think_blocks_opened_per_mode(monkeypatch):
    import common.evaluate as ev

    def fake(model, tok, prompts, max_new_tokens, batch_size, cache, desc):  # thinks only when told "on"
        return [("<think>\nLet me", []) if "detailed thinking on" in p else (" The answer is 4.", []) for p in prompts]

    monkeypatch.setattr(ev, "greedy_generate", fake)
    problems = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(5)]
    r = ev.toggle_eval(None, tiny_tokenizer(), problems)
    assert (r["n"], r["think_rate_on"], r["think_rate_off"], r["think_rate_on_se"]) == (5, 1.0, 0.0, 0.0)
