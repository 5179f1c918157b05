"""RL rollouts through a colocated vLLM engine on the CPU (vllm-cpu; run in .venv-vllm, as test.sh does):
after a weight sync the engine samples from the new weights (the prefix cache is reset: without the reset a prompt
seen before the sync reuses KV of the old weights), the sampler's log-probs agree with the training forward's, FP8
generation is refused where the engine has no FP8 kernels, and 06_grpo.py runs end to end with --generator vllm."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process (colocated), as 06 runs it
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402
from conftest import ROOT, tiny_model, tiny_tokenizer  # noqa: E402

from common.checkpoint import save_checkpoint  # noqa: E402
from common.data import render_prompt  # noqa: E402
from common.gen_cache import GenCache, compute_setting, greedy_generate, model_fingerprint  # noqa: E402
from common.generate import VLLMGenerator, generate, load_generator  # noqa: E402
from common.model import parent_block  # noqa: E402
from common.rl import rollout_logprobs, sample_rollout  # noqa: E402

WORDS = "alpha beta gamma delta red green blue one two three four five assignment target value list".split()


def policy(seed: int):
    """A tiny policy vLLM's CPU attention runs (head_dim 64). Weights of std 0.1, not 0.02: at 0.02 every prompt
    and seed answers with one repeated token; at 0.1 two seeds answer every prompt differently."""
    return tiny_model(seed=seed, hidden=128, heads=2, kv_heads=1, num_layers=2, initializer_range=0.1,
                      blocks=[parent_block(2, 2.0) for _ in range(2)])  # FFN 2.0 * 128 * 2 / 3 -> 256


def prompts(n=16):
    """n chat prompts of 200+ tokens (more than one KV block of 128, which prefix caching keeps), thinking on and off."""
    tok = tiny_tokenizer()
    out = []
    for i in range(n):
        words = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(160))
        system = "detailed thinking on" if i % 2 else "detailed thinking off"
        out.append(render_prompt(tok, [{"role": "system", "content": system},
                                       {"role": "user", "content": f"What is {i} + {2 * i}? {words}"}]))
    return out


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm_rl")
    a, b = policy(0), policy(1)
    save_checkpoint(a, tiny_tokenizer(), str(d / "a"), stage="parent")
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the engine sizes its KV cache itself, as in a stage (run.sh)
    gen, tok = load_generator(str(d / "a"), dtype=torch.float32, backend="vllm", colocate=True)
    return gen, tok, a, b


def ids_of(outs):
    return [o[0][1] for o in outs]


def test_after_a_weight_sync_the_engine_samples_the_new_weights_not_stale_prefix_kv(engine):
    gen, tok, a, b = engine
    ps = prompts()
    ours_a = ids_of(generate(a, tok, ps, max_new_tokens=24, return_ids=True))
    ours_b = ids_of(generate(b, tok, ps, max_new_tokens=24, return_ids=True))
    assert sum(x != y for x, y in zip(ours_a, ours_b)) >= 8  # the two policies really answer differently
    assert ids_of(gen.generate(ps, max_new_tokens=24, return_ids=True)) == ours_a  # the prompts' KV is now cached
    # the hazard: vLLM's reload alone keeps the prefix cache, so the same prompts reuse KV of the old weights
    state = [(k, v.detach().float()) for k, v in b.state_dict().items()]
    gen.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state), "is_checkpoint_format": True})
    stale = ids_of(gen.generate(ps, max_new_tokens=24, return_ids=True))
    assert sum(x != y for x, y in zip(stale, ours_b)) >= 4
    # update_weights (reload + prefix-cache reset): the engine's answers are the new policy's own, token for token
    gen.update_weights(a)
    assert ids_of(gen.generate(ps, max_new_tokens=24, return_ids=True)) == ours_a
    gen.update_weights(b)
    assert ids_of(gen.generate(ps, max_new_tokens=24, return_ids=True)) == ours_b
    gen.update_weights(a)


def test_sampler_logprobs_agree_with_the_training_forward(engine):
    """The log-probs vLLM reports for the tokens it sampled are the training forward's, to float32 error across two
    implementations (1e-3 per token: ~1e4 ulps of |logit| + log V, for other kernels and summation orders): the
    importance weights of a float32 engine are 1 up to that, and no sequence is masked."""
    gen, tok, a, _ = engine
    ro = sample_rollout(gen, tok, prompts(4), group_size=4, max_new_tokens=16, temperature=1.0)
    assert ro.sampler_logprobs is not None and len(ro.sampler_logprobs) == 16
    assert [len(x) for x in ro.sampler_logprobs] == [len(c) for c in ro.completion_ids]
    assert len({tuple(c) for c in ro.completion_ids}) > 4  # sampled, not greedy copies
    own = rollout_logprobs(a.eval(), ro, list(range(16)), tok.pad_token_id, torch.device("cpu"), 8, torch.float32)
    worst = max(float((own[r] - torch.tensor(ro.sampler_logprobs[r])).abs().max()) for r in range(16))
    assert worst < 1e-3, worst


def test_greedy_evaluation_through_the_engine_equals_ours_and_is_cached_apart(engine, tmp_path):
    """An RL stage's evaluation decoded by its engine (greedy_generate(engine=...)): in float32 the engine's answers
    are our decoder's, token for token; the generation cache files them under the engine's compute setting, so a
    later evaluation reuses answers only from the decoder that made them."""
    gen, tok, a, b = engine
    gen.update_weights(a)
    ps, cache = prompts(8), GenCache(str(tmp_path / "cache"))
    ours = greedy_generate(a, tok, ps, 24, cache=cache)
    theirs = greedy_generate(a, tok, ps, 24, cache=cache, engine=gen)
    assert [list(i) for _, i in theirs] == [list(i) for _, i in ours] and all(len(i) > 0 for _, i in ours)
    assert [t for t, _ in theirs] == [t for t, _ in ours]
    computes = {k[2] for k in cache.answers[model_fingerprint(a, tok)]}
    assert computes == {compute_setting(a), "vllm cpu float32"}
    gen.update_weights(b)  # the cache is keyed by the weights: the other policy's answers are decoded, not reused
    assert [list(i) for _, i in greedy_generate(b, tok, ps, 24, cache=cache, engine=gen)] == \
        ids_of(generate(b, tok, ps, max_new_tokens=24, return_ids=True))
    gen.update_weights(a)


def test_a_variant_stock_vllm_cannot_serve_is_refused_before_an_engine_starts(tmp_path, monkeypatch):
    """Without the plugin (VLLM_PLUGINS leaving it out), a child with linear attention is refused by name before any
    engine starts; with the plugin loaded the same checkpoint passes the check."""
    from common.generate import check_vllm_serves
    from common.model import AttentionConfig, BlockConfig, FFNConfig

    blocks = [parent_block(2, 2.0), BlockConfig(AttentionConfig(replace_with_linear=True), FFNConfig(ffn_mult=2.0))]
    m = tiny_model(hidden=128, heads=2, kv_heads=1, num_layers=2, blocks=blocks)
    save_checkpoint(m, tiny_tokenizer(), str(tmp_path / "linear"), stage="mip")
    monkeypatch.setenv("VLLM_PLUGINS", "")
    with pytest.raises(ValueError, match="layer 1's linear attention is not served by stock vLLM; install the repo's "
                                         "plugin"):
        VLLMGenerator(str(tmp_path / "linear"))
    monkeypatch.delenv("VLLM_PLUGINS")
    check_vllm_serves(str(tmp_path / "linear"))  # the plugin (install_vllm.sh installs it) serves it


def test_fp8_generation_is_refused_on_the_cpu_before_an_engine_starts(tmp_path):
    save_checkpoint(policy(0), tiny_tokenizer(), str(tmp_path / "parent"), stage="parent")
    with pytest.raises(ValueError, match="vllm-cpu lacks; drop --fp8-generation"):
        VLLMGenerator(str(tmp_path / "parent"), quantization="fp8")


def tiny_rl_run(tmp_path, script: str, *flags):
    """run(out, *more, timeout=600): `script` on a tiny saved policy with --generator vllm (float32, short
    completions), in a fresh interpreter, --out tmp_path/out."""
    save_checkpoint(policy(0), tiny_tokenizer(), str(tmp_path / "policy"), stage="parent")
    (tmp_path / "data").mkdir()
    cmd = [sys.executable, os.path.join(ROOT, script), "--policy", str(tmp_path / "policy"), "--data",
           str(tmp_path / "data"), "--max-new-tokens", "12", "--max-new-tokens-off", "8", "--wandb-mode", "disabled",
           "--generator", "vllm", "--dtype", "float32", *flags]
    env = {**os.environ, "PYTHONPATH": ROOT, "VLLM_CPU_KVCACHE_SPACE": "1"}
    return lambda out, *more, timeout=600: subprocess.run(cmd + ["--out", str(tmp_path / out), *more],
                                                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                                                          env=env)


@pytest.mark.slow
def test_grpo_runs_with_the_vllm_generator_and_corrects_for_the_sampler(tmp_path):
    """06_grpo.py --generator vllm on the CPU: rollouts from the colocated engine, weights synced after every
    optimizer step, the importance-sampling statistics recorded, a clean exit (no process-group error at shutdown);
    --fp8-generation is a one-line error before any work."""
    run = tiny_rl_run(tmp_path, "06_grpo.py", "--num-prompts", "8", "--filter-samples", "2", "--prompts-per-step", "2",
                      "--group-size", "4", "--steps", "2", "--eval-problems", "2", "--eval-max-new-tokens", "12",
                      "--eval-max-new-tokens-off", "8")
    r = run("bad", "--fp8-generation", timeout=120)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: --fp8-generation needs")
    r = run("grpo")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Invalid process group" not in r.stderr
    history = json.load(open(tmp_path / "grpo" / "meta.json"))["history"]
    assert len(history) == 2
    for h in history:
        assert h["completion_tokens"] > 0
        assert h["is_masked_fraction"] is None or 0 <= h["is_masked_fraction"] <= 1
    assert any(h["is_log_ratio"] is not None for h in history)  # groups with signal were trained and corrected
    m = json.load(open(tmp_path / "grpo" / "meta.json"))["metrics"]  # before / after decoded by the engine
    assert all(m[f"{w}_{mode}_accuracy"] is not None for w in ("before", "after") for mode in ("on", "off"))
    assert "thinking on (2 prompts): vLLM" in r.stdout + r.stderr


@pytest.mark.slow
def test_rloo_runs_with_the_vllm_generator(tmp_path):
    """07_rlhf.py --algo rloo --generator vllm on the CPU: instruction-following rollouts from the colocated engine,
    synced after every step, the importance-sampling statistics recorded, a clean exit; --generator vllm for an
    stage that decodes nothing (the reward model) is a one-line error before any work; offline RPO decodes its
    evaluations through the engine."""
    run = tiny_rl_run(tmp_path, "07_rlhf.py", "--num-prompts", "8", "--prompts-per-step", "2", "--k", "4", "--steps", "2",
                      "--eval-if", "0", "--eval-math", "0")
    r = run("bad", "--train-reward-model", timeout=120)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: --generator vllm decodes")
    r = run("rloo", "--algo", "rloo")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Invalid process group" not in r.stderr and "sampler vLLM" in r.stdout + r.stderr
    history = json.load(open(tmp_path / "rloo" / "meta.json"))["history"]
    assert len(history) == 2 and all(h["completion_tokens"] > 0 for h in history)
    assert all(h["is_masked_fraction"] is None or 0 <= h["is_masked_fraction"] <= 1 for h in history)
    r = run("rpo", "--algo", "rpo", "--steps", "1", "--eval-math", "2", "--eval-max-new-tokens", "12",
            "--eval-max-new-tokens-off", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sampler vLLM" in r.stdout + r.stderr and "thinking on (2 prompts): vLLM" in r.stdout + r.stderr


@pytest.mark.slow
def test_grpo_under_torchrun_runs_one_engine_per_rank(tmp_path):
    """torchrun with 2 gloo ranks on the CPU: each rank runs its own colocated engine (vLLM's external launcher on
    the rank's process group), the ranks train together, and the stage exits cleanly (the engines shut down before
    the stage's process group is destroyed)."""
    save_checkpoint(policy(0), tiny_tokenizer(), str(tmp_path / "policy"), stage="parent")
    (tmp_path / "data").mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "06_grpo.py"), "--policy", str(tmp_path / "policy"), "--data", str(tmp_path / "data"),
           "--out", str(tmp_path / "grpo"), "--generator", "vllm", "--dtype", "float32", "--num-prompts", "8",
           "--filter-samples", "2", "--prompts-per-step", "2", "--group-size", "4", "--steps", "2",
           "--eval-problems", "0", "--max-new-tokens", "12", "--max-new-tokens-off", "8", "--wandb-mode", "disabled"]
    env = {**os.environ, "PYTHONPATH": ROOT, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "world size 2" in out and "generator vLLM" in out
    assert "Invalid process group" not in out and "Traceback" not in out, out[-3000:]
    assert len(json.load(open(tmp_path / "grpo" / "meta.json"))["history"]) == 2


@pytest.mark.slow
def test_bench_grpo_times_a_step_with_each_generator(tmp_path):
    """benchmarks/bench_grpo.py --sides ours,vllm: one GRPO step with our decoder and with the colocated engine
    (synced, then sampling, then the same update), side by side, with the paired ratio; a repeated or unknown side is
    a one-line error."""
    save_checkpoint(policy(0), tiny_tokenizer(), str(tmp_path / "policy"), stage="parent")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_grpo.py"), "--model", str(tmp_path / "policy"),
           "--prompts", "2", "--group-size", "4", "--max-new-tokens", "8", "--micro-batch", "4", "--rounds", "1",
           "--dtype", "float32", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": ROOT, "VLLM_CPU_KVCACHE_SPACE": "1"}
    r = subprocess.run(cmd + ["--sides", "ours,vllm"], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in r.stdout.splitlines() if line.startswith("| ") and not line.startswith("| side")}
    assert set(rows) == {"ours", "vllm"}
    for name, row in rows.items():
        assert 0 < int(row[9]) <= 2 * 4 * 8  # completion tokens: 8 samples of at most 8 tokens
        assert row[10] == "2/2"  # --reward dense: every group has signal, so both sides train on all of them
    assert rows["vllm"][11].startswith("vllm cpu float32 / float32")  # sampled by the engine, trained by us
    assert rows["ours"][11] == "float32 / float32"
    ratio = next(line for line in r.stdout.splitlines() if line.startswith("ratio vllm/ours"))
    assert float(ratio.split(":")[1].split(";")[0]) > 0
    for bad in ("ours,ours", "ours,sglang"):
        r = subprocess.run(cmd + ["--sides", bad], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
        assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(f"--sides '{bad}'")
