"""common.gen_cache: greedy answers reused per model fingerprint, on tiny models with the tiny ChatML tokenizer."""

import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

import common.gen_cache as gen_cache
from common.checkpoint import load_checkpoint, save_checkpoint
from common.evaluate import generation_eval, main
from common.gen_cache import GenCache, GenCacheError, greedy_generate, model_fingerprint

PROBLEMS = [{"question": f"What is {a} + {b}?", "answer": str(a + b), "difficulty": 1}
            for a, b in ((1, 2), (30, 4), (5, 61), (7, 8), (9, 10))]
PROMPTS = ["What is 12 + 30?", "The answer is", "system user assistant"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are op-overhead bound: one thread is faster and does not wait on a busy second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def decoded(monkeypatch):
    """The prompts of every call to the generator behind the cache, one list per call."""
    calls, real = [], gen_cache.generate

    def spy(model, tokenizer, prompts, **kw):
        calls.append(list(prompts))
        return real(model, tokenizer, prompts, **kw)
    monkeypatch.setattr(gen_cache, "generate", spy)
    return calls


def test_second_eval_on_overlapping_problems_decodes_only_the_new_ones(tmp_path, decoded):
    model, tok = tiny_model(seed=3), tiny_tokenizer()
    cache = GenCache(str(tmp_path / "gen_cache"))
    first = generation_eval(model, tok, PROBLEMS[:3], reasoning=True, max_new_tokens=8, cache=cache)
    second = generation_eval(model, tok, PROBLEMS[1:], reasoning=True, max_new_tokens=8, cache=cache)
    assert [len(c) for c in decoded] == [3, 2]  # the two shared problems were not decoded again
    assert second["correct"][:2] == first["correct"][1:] and second["samples"][:2] == first["samples"][1:]
    # the next stage opens the same directory: everything is there, in the order asked
    again = generation_eval(model, tok, PROBLEMS, reasoning=True, max_new_tokens=8,
                            cache=GenCache(str(tmp_path / "gen_cache")))
    assert len(decoded) == 2
    assert again["samples"] == first["samples"] and again["correct"] == first["correct"] + second["correct"][2:]
    # the other toggle mode is another prompt: decoded
    generation_eval(model, tok, PROBLEMS[:1], reasoning=False, max_new_tokens=8, cache=cache)
    assert len(decoded) == 3


def test_one_changed_weight_changes_the_fingerprint_and_misses(tmp_path, decoded):
    model, tok = tiny_model(), tiny_tokenizer()
    fp = model_fingerprint(model, tok)
    save_checkpoint(model, tok, str(tmp_path / "m"), stage="test")
    assert model_fingerprint(load_checkpoint(str(tmp_path / "m"), with_tokenizer=False)[0], tok) == fp  # reloaded
    with torch.no_grad():
        for name, t in model.state_dict().items():  # each tensor, one element by one ulp
            flat, old = t.view(-1), t.view(-1)[5].clone()
            flat[5] = torch.nextafter(old, torch.tensor(float("inf")))
            assert model_fingerprint(model, tok) != fp, name
            flat[5] = old
    assert model_fingerprint(model, tok) == fp
    cache = GenCache(str(tmp_path / "gen_cache"))
    greedy_generate(model, tok, PROMPTS, 6, cache=cache)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[3, 7] += 1e-3
    greedy_generate(model, tok, PROMPTS, 6, cache=cache)
    assert len(decoded) == 2


def test_other_budget_or_compute_dtype_misses(tmp_path, decoded):
    model, tok = tiny_model(), tiny_tokenizer()
    cache = GenCache(str(tmp_path / "gen_cache"))
    a = greedy_generate(model, tok, PROMPTS, 6, cache=cache)
    greedy_generate(model, tok, PROMPTS, 5, cache=cache)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        greedy_generate(model, tok, PROMPTS, 6, cache=cache)
    assert len(decoded) == 3
    assert greedy_generate(model, tok, PROMPTS, 6, cache=cache) == a and len(decoded) == 3
    assert greedy_generate(model, tok, PROMPTS, 6) == a and len(decoded) == 4  # no cache: decoded, same answers


@pytest.mark.parametrize("damage", [b'{"prompt": "x", "max_new', b'{"prompt": "x"}\n', b"\xff\xfe not text\n"])
def test_corrupt_cache_file_is_a_one_line_error_naming_it(tmp_path, damage):
    cache = GenCache(str(tmp_path / "gen_cache"))
    cache.put("f" * 32, {("a prompt", 6, "cpu float32 autocast off"): ("an answer", [5, 1])})
    path = cache.path("f" * 32)
    assert GenCache(str(tmp_path / "gen_cache")).get("f" * 32, "a prompt", 6, "cpu float32 autocast off") == \
        ("an answer", [5, 1])
    with open(path, "ab") as f:
        f.write(damage)
    with pytest.raises(GenCacheError) as e:
        GenCache(str(tmp_path / "gen_cache"))
    msg = str(e.value)
    assert path in msg and "delete the file" in msg and "\n" not in msg


def test_evaluate_cli_reuses_the_run_cache_and_no_gen_cache_turns_it_off(tmp_path, decoded, eval_data):
    tok = tiny_tokenizer()
    save_checkpoint(tiny_model(), tok, str(tmp_path / "parent"), stage="parent")
    save_checkpoint(tiny_model(seed=1), tok, str(tmp_path / "child"), stage="test")

    def run(stage, *extra):
        main(["--model", str(tmp_path / "child"), "--parent", str(tmp_path / "parent"), "--stage", stage,
              "--run-dir", str(tmp_path), "--quick", "--suites", "gen", "--data", eval_data, *extra])
        m = json.load(open(tmp_path / "metrics" / f"{stage}.json"))
        return {k: m[k] for k in ("gen_on", "gen_off", "gen_if", "parent_gen", "samples")}

    off = run("a", "--no-gen-cache")
    assert len(decoded) == 6 and not (tmp_path / "gen_cache").exists()  # 3 suites x (model, parent)
    assert run("b") == off and len(decoded) == 12
    assert len(list((tmp_path / "gen_cache").glob("*.jsonl"))) == 2  # one file per model
    assert run("c") == off and len(decoded) == 12  # every answer of both models from the cache
    (tmp_path / "gen_cache" / "bad.jsonl").write_text("not json\n")
    with pytest.raises(GenCacheError, match="bad.jsonl line 1"):
        run("d")
    assert run("d", "--no-gen-cache") == off
