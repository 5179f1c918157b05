"""GRPO (06_grpo.py, common/rl.py, the objectives in common/losses.py): hand-computed advantages and loss
normalizations, the clipped surrogate's trust region, k3 KL, filter and curriculum order, and a tiny policy that
learns a learnable reward (and does not at lr 0)."""

import copy
import math

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from common.losses import clipped_surrogate, group_advantages, kl_k3, normalize_token_loss, zero_signal_groups
from common.rl import (PolicyLossConfig, Rollout, curriculum_order, pad_rows, pass_rate_filter, sample_rollout,
                       sampler_is_weights, train_on_rollout)


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(4 * 0.25 / 3)  # sample std of (1, 0, 0, 1)
    a = group_advantages(r, 4, eps=0.0)
    assert torch.allclose(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std)
    assert torch.equal(group_advantages(r, 4)[4:], torch.zeros(4))  # equal rewards: no signal, no NaN
    assert torch.allclose(group_advantages(r, 4, scale_by_std=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert zero_signal_groups(r, 4).tolist() == [False, True]


def test_loss_normalizations_hand_computed():
    per_tok = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert normalize_token_loss(per_tok, mask, "grpo", num_seqs=2, num_tokens=4, max_len=5).item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert normalize_token_loss(per_tok, mask, "dapo", num_seqs=2, num_tokens=4, max_len=5).item() == pytest.approx(10 / 4)
    assert normalize_token_loss(per_tok, mask, "dr_grpo", num_seqs=2, num_tokens=4, max_len=5).item() == pytest.approx(10 / 10)
    # micro-batches with the step's totals add up to the whole batch's loss
    for kind in ("grpo", "dapo", "dr_grpo"):
        whole = normalize_token_loss(per_tok, mask, kind, 2, 4, 5)
        parts = sum(normalize_token_loss(per_tok[i:i + 1], mask[i:i + 1], kind, 2, 4, 5) for i in range(2))
        assert parts.item() == pytest.approx(whole.item())
    with pytest.raises(ValueError, match="loss_type"):
        normalize_token_loss(per_tok, mask, "ppo", 2, 4, 5)


@pytest.mark.parametrize("adv,log_ratio,grad_zero", [
    (1.0, math.log(1.5), True),     # A > 0 above 1 + eps: clipped, no gradient
    (1.0, math.log(0.5), False),    # A > 0 below 1 - eps: the unclipped term is the min, gradient flows
    (-1.0, math.log(0.5), True),    # A < 0 below 1 - eps: clipped
    (-1.0, math.log(1.5), False),   # A < 0 above 1 + eps: pessimistic unclipped term, gradient flows
    (1.0, math.log(1.1), False),    # inside the trust region
])
def test_clipped_surrogate_gradient_outside_trust_region(adv, log_ratio, grad_zero):
    logp = torch.tensor([[log_ratio - 1.0]], requires_grad=True)
    old = torch.tensor([[-1.0]])
    loss, clipped = clipped_surrogate(logp, old, torch.tensor([adv]), 0.2, 0.2)
    loss.sum().backward()
    assert (logp.grad.abs().item() == 0.0) == grad_zero
    assert bool(clipped.item()) == grad_zero
    ratio = math.exp(log_ratio)
    assert loss.item() == pytest.approx(-min(ratio * adv, min(max(ratio, 0.8), 1.2) * adv))


def test_asymmetric_clip_higher():
    logp, old = torch.tensor([[math.log(1.25)]]), torch.tensor([[0.0]])
    assert clipped_surrogate(logp, old, torch.tensor([1.0]), 0.2, 0.2)[1].item()       # 1.25 > 1.2: clipped
    assert not clipped_surrogate(logp, old, torch.tensor([1.0]), 0.2, 0.28)[1].item()  # DAPO's 1.28: not


def test_k3_kl_zero_when_equal_and_positive_otherwise():
    lp = torch.log_softmax(torch.randn(4, 7), -1)
    assert torch.equal(kl_k3(lp, lp), torch.zeros_like(lp))
    assert (kl_k3(lp, lp + 0.3) > 0).all() and (kl_k3(lp, lp - 0.3) > 0).all()
    # unbiased: E_pi[k3] = KL(pi || ref) over a full distribution
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    assert (p * kl_k3(p.log(), q.log())).sum().item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-5)


def test_pass_rate_filter_and_curriculum_order():
    items, rates = ["a", "b", "c", "d", "e"], [0.0, 0.875, 0.5, 0.75, 0.25]
    kept, counts = pass_rate_filter(items, rates, 0.75)
    assert kept == ["a", "c", "e"] and counts == {"candidates": 5, "dropped": 2, "zero": 1, "dropped_hard": 0, "kept": 3}
    assert curriculum_order(kept, [0.0, 0.5, 0.25]) == ["c", "e", "a"]  # easy (high pass rate) to hard
    kept, counts = pass_rate_filter(items, rates, 0.75, min_pass_rate=0.1)  # never solved: no signal either
    assert kept == ["c", "e"] and counts["dropped_hard"] == 1 and counts["kept"] == 2
    shuffled = curriculum_order(items, rates, seed=3, curriculum=False)
    assert sorted(shuffled) == items and shuffled == curriculum_order(items, rates, seed=3, curriculum=False)


def test_pad_rows_puts_completions_in_one_slice():
    b = pad_rows([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], pad_id=0)
    assert b["prompt_len"] == 3
    assert b["input_ids"].tolist() == [[5, 6, 7, 9, 10, 0], [0, 0, 8, 11, 12, 13]]
    assert b["completion_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]


# ----------------------------------------------------------------------------
# a tiny policy learns a learnable reward


def _low_token_reward(rollout: Rollout) -> torch.Tensor:
    """Fraction of completion tokens with id < 256 (half of the tiny vocab): ~0.5 at random init."""
    return torch.tensor([sum(t < 256 for t in c) / max(1, len(c)) for c in rollout.completion_ids])


def _run_tiny_grpo(lr: float, steps: int = 8, **cfg_kw):
    torch.manual_seed(0)
    model, tok = tiny_model(), tiny_tokenizer()
    start = copy.deepcopy(model.state_dict())
    model.generation_config.eos_token_id = None  # never stop early: every completion is 8 tokens
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    cfg = PolicyLossConfig(micro_batch=8, max_new_tokens=8, dtype=torch.float32, **cfg_kw)
    prompts = ["What is 1 + 2?", "Add 3 and 4.", "hello", "detailed thinking on"]
    curve = []
    for _ in range(steps):
        ro = sample_rollout(model, tok, prompts, group_size=8, max_new_tokens=8, dtype=torch.float32)
        r = _low_token_reward(ro)
        curve.append(r.mean().item())
        train_on_rollout(model, opt, ro, r, cfg, torch.device("cpu"), pad_id=tok.pad_token_id)
    return curve, start, model


def test_tiny_policy_learns_a_reward_and_not_at_lr_zero():
    curve, _, _ = _run_tiny_grpo(lr=1e-2, steps_per_rollout=2)
    assert sum(curve[-2:]) / 2 > sum(curve[:2]) / 2 + 0.2, curve
    flat, start, model = _run_tiny_grpo(lr=0.0, steps=4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in start.items())  # lr 0: weights never move
    assert max(flat) - min(flat) < 0.2, flat


def test_micro_batching_does_not_change_the_update():
    """The same rollout trained with micro-batches of 2 and of 16 gives the same weights (global normalizers)."""
    torch.manual_seed(1)
    base, tok = tiny_model(), tiny_tokenizer()
    ro = sample_rollout(base, tok, ["a b", "c d e f"], group_size=4, max_new_tokens=6, dtype=torch.float32)
    r = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.25])
    out = []
    for mb in (2, 16):
        for kind in ("grpo", "dapo"):
            m = copy.deepcopy(base)
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            st = train_on_rollout(m, opt, ro, r, PolicyLossConfig(loss_type=kind, micro_batch=mb, grad_clip=1e9,
                                                                  dtype=torch.float32), torch.device("cpu"), tok.pad_token_id)
            assert st["zero_signal_groups"] == 0 and st["optimizer_steps"] == 1
            out.append((kind, m.state_dict()))
    for (k1, a), (k2, b) in zip(out[:2], out[2:]):
        assert k1 == k2 and all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_second_minibatch_ratio_is_to_the_sampling_policy(monkeypatch):
    """Two optimizer steps per rollout: pi_old is computed only for the second minibatch's rows (the first trains
    on the sampling policy itself: its pi_old is its own detached log-probs); the weights equal those of the same
    update given pi_old of every row up front, and the second step's ratios are to the sampler (tokens clip)."""
    import common.rl as rl

    torch.manual_seed(1)
    base, tok = tiny_model(), tiny_tokenizer()
    ro = sample_rollout(base, tok, ["a b", "c d e f", "g h"], group_size=4, max_new_tokens=6, dtype=torch.float32)
    r = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.25, 0.0, 0.0, 1.0, 0.5])
    cfg = PolicyLossConfig(steps_per_rollout=2, micro_batch=4, grad_clip=1e9, eps_low=0.05, eps_high=0.05,
                           dtype=torch.float32)
    every = rl.rollout_logprobs(base.eval(), ro, list(range(12)), tok.pad_token_id, torch.device("cpu"), 4,
                                torch.float32)
    asked, real = [], rl.rollout_logprobs
    monkeypatch.setattr(rl, "rollout_logprobs", lambda m, ro_, rows, *a: asked.append(sorted(rows)) or real(m, ro_, rows, *a))
    ws, stats = [], []
    for old in (None, every):
        m = copy.deepcopy(base)
        stats.append(train_on_rollout(m, torch.optim.SGD(m.parameters(), lr=3.0), ro, r, cfg, torch.device("cpu"),
                                      tok.pad_token_id, old_logprobs=old))
        ws.append(m.state_dict())
    assert asked == [[4, 5, 6, 7]]  # groups 0 and 2 train first, group 1 after the update
    assert [s["optimizer_steps"] for s in stats] == [2, 2] and stats[0]["clip_fraction"] > 0
    assert all(torch.allclose(ws[0][n], ws[1][n], atol=1e-6) for n in ws[0])


def test_sampler_is_weights_hand_computed():
    """TRL's sampler/learner correction: sequence_mask weighs every token of a sequence by exp(sum_t log pi_old - log
    mu) and zeroes a sequence whose weight exceeds the cap; token_truncate caps each token's ratio. Padding counts
    nothing."""
    old = torch.zeros(3, 3)
    mu = torch.tensor([[-0.1, -0.1, -0.1], [-0.5, -0.5, -0.5], [0.2, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 0]])
    w, masked = sampler_is_weights(old, mu, mask, "sequence_mask", 3.0)
    assert w[0].tolist() == pytest.approx([math.exp(0.3)] * 3)  # 1.35 <= 3: kept
    assert w[1].tolist() == [0.0, 0.0, 0.0] and masked.tolist() == [False, True, False]  # e^1.5 = 4.48 > 3
    assert w[2].tolist() == pytest.approx([math.exp(-0.2)] * 3)  # the padded -9s are not summed
    w, masked = sampler_is_weights(old, mu, mask, "token_truncate", 1.5)
    assert w[1].tolist() == pytest.approx([1.5] * 3) and w[0].tolist() == pytest.approx([math.exp(0.1)] * 3)
    assert not masked.any()
    with pytest.raises(ValueError, match="sequence_mask, token_truncate or off"):
        sampler_is_weights(old, mu, mask, "tis", 3.0)


def test_is_correction_leaves_a_matching_sampler_alone_and_drops_a_mismatched_one():
    """A rollout whose sampler log-probs equal the learner's trains exactly as one without them (and as one with
    the correction off); a sampler that gave every token of group 0 0.5 nats more than the learner does is
    down-weighted there (another update); a sampler far below the learner on every sequence (weight > cap) masks
    everything: no update."""
    import common.rl as rl

    torch.manual_seed(1)
    base, tok = tiny_model(), tiny_tokenizer()
    ro = sample_rollout(base, tok, ["a b", "c d e f"], group_size=4, max_new_tokens=6, dtype=torch.float32)
    r = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.25])
    own = rl.rollout_logprobs(base.eval(), ro, list(range(8)), tok.pad_token_id, torch.device("cpu"), 8, torch.float32)
    cfg = PolicyLossConfig(micro_batch=8, grad_clip=1e9, dtype=torch.float32)

    def update(sampler, mode="sequence_mask"):
        m = copy.deepcopy(base)
        ro.sampler_logprobs = sampler
        st = train_on_rollout(m, torch.optim.SGD(m.parameters(), lr=1.0), ro, r,
                              PolicyLossConfig(**{**cfg.__dict__, "is_mode": mode}), torch.device("cpu"),
                              tok.pad_token_id)
        return m.state_dict(), st

    plain, st0 = update(None)
    assert st0["is_log_ratio"] is None
    same, st1 = update([own[i].tolist() for i in range(8)])
    assert st1["is_masked_fraction"] == 0 and abs(st1["is_log_ratio"]) < 1e-5
    assert all(torch.allclose(plain[n], same[n], atol=1e-6) for n in plain)
    off, _ = update([(own[i] - 5.0).tolist() for i in range(8)], mode="off")  # off: the sampler's numbers unused
    assert all(torch.equal(plain[n], off[n]) for n in plain)
    far, st2 = update([(own[i] - 5.0).tolist() for i in range(8)])  # pi_old / mu = e^(5 * len) > 3 everywhere
    assert st2["is_masked_fraction"] == 1.0
    assert all(torch.equal(far[n], base.state_dict()[n]) for n in far)  # every sequence masked: nothing moved
    tilted, st3 = update([(own[i] + (0.5 if i < 4 else 0.0)).tolist() for i in range(8)])
    assert st3["is_masked_fraction"] == 0 and st3["is_log_ratio"] < 0
    assert any(not torch.allclose(plain[n], tilted[n], atol=1e-6) for n in plain)  # group 0 down-weighted


def test_zero_signal_groups_are_skipped():
    torch.manual_seed(2)
    model, tok = tiny_model(), tiny_tokenizer()
    ro = sample_rollout(model, tok, ["x", "y"], group_size=4, max_new_tokens=4, dtype=torch.float32)
    before = copy.deepcopy(model.state_dict())
    st = train_on_rollout(model, torch.optim.SGD(model.parameters(), lr=1.0), ro, torch.ones(8),
                          PolicyLossConfig(dtype=torch.float32), torch.device("cpu"), tok.pad_token_id)
    assert st["zero_signal_groups"] == 2 and st["optimizer_steps"] == 0 and st["trained_tokens"] == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ----------------------------------------------------------------------------
# 06_grpo.py end to end on a tiny model: resume after kill -9, the filter's cache, bad input

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from conftest import ROOT  # noqa: E402

from common.checkpoint import save_checkpoint  # noqa: E402

SMALL = ["--num-prompts", "8", "--filter-samples", "2", "--prompts-per-step", "2", "--group-size", "4",
         "--max-new-tokens", "12", "--max-new-tokens-off", "8", "--eval-problems", "0", "--wandb-mode", "disabled"]


def _grpo(tmp_path, out, *extra, wait=True):
    cmd = [sys.executable, os.path.join(ROOT, "06_grpo.py"), "--policy", str(tmp_path / "policy"),
           "--data", str(tmp_path / "data"), "--out", str(tmp_path / out), "--metrics-name", out, *SMALL, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def grpo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    save_checkpoint(tiny_model(), tiny_tokenizer(), str(d / "policy"), stage="parent")
    (d / "data").mkdir()
    return d


def _history(path):
    return json.load(open(os.path.join(path, "meta.json")))["history"]


@pytest.mark.slow
def test_grpo_resume_after_kill_continues_the_same_batches(grpo_dir):
    full = _grpo(grpo_dir, "full", "--steps", "10", "--save-every", "1")
    assert full.returncode == 0, full.stderr[-2000:]
    assert os.path.exists(grpo_dir / "data" / "rl_math.pass_rates.json")  # the filter's cache, beside the prompts
    assert not os.path.exists(grpo_dir / "full.state")  # a finished run's states are gone
    proc = _grpo(grpo_dir, "killed", "--steps", "10", "--save-every", "1", wait=False)
    marker = grpo_dir / "killed.state" / "step-000003" / "COMPLETED"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = _grpo(grpo_dir, "killed", "--steps", "10", "--save-every", "1", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _history(grpo_dir / "full"), _history(grpo_dir / "killed")
    assert [h["prompt_ids"] for h in a] == [h["prompt_ids"] for h in b]
    assert [h["completion_tokens"] for h in a] == [h["completion_tokens"] for h in b]  # same samples (RNG restored)


def _last_line(r):
    return r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_grpo_bad_input_is_one_line(grpo_dir, tmp_path):
    (tmp_path / "notckpt").mkdir()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "06_grpo.py"), "--policy", str(tmp_path / "notckpt"),
                        "--data", str(grpo_dir / "data"), "--out", str(tmp_path / "o"), "--wandb-mode", "disabled"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode != 0 and _last_line(r).startswith("error:") and "Traceback" not in r.stderr
    # a prompt file without answers
    rec = {"id": "m1", "input": "What is 2 + 2?", "output": "4", "reasoning": "off",
           "system_prompt": "detailed thinking off", "category": "math", "answer": None}
    (tmp_path / "noans.jsonl").write_text(json.dumps(rec) + "\n")
    r = _grpo(grpo_dir, "noans", "--steps", "1", "--prompts", str(tmp_path / "noans.jsonl"))
    assert r.returncode != 0 and "no prompt with an answer" in _last_line(r) and "Traceback" not in r.stderr
    # a bad number
    r = _grpo(grpo_dir, "badnum", "--group-size", "0")
    assert r.returncode != 0 and "--group-size" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(grpo_dir / "noans") and not os.path.exists(grpo_dir / "badnum")


@pytest.mark.slow
def test_grpo_everything_filtered_names_threshold_and_counts(grpo_dir):
    ok = _grpo(grpo_dir, "cached", "--steps", "1")  # fills the pass-rate cache (a random model: all 0)
    assert ok.returncode == 0, ok.stderr[-2000:]
    cache_path = grpo_dir / "data" / "rl_math.pass_rates.json"
    cache = json.load(open(cache_path))
    for rates in cache.values():  # pretend the filter model solves every prompt
        for k in rates:
            rates[k] = 1.0
    json.dump(cache, open(cache_path, "w"))
    r = _grpo(grpo_dir, "allgone", "--steps", "1")
    assert r.returncode != 0 and "every prompt was filtered out" in _last_line(r) and "0.75" in _last_line(r)
    assert "pass-rate filter:" in r.stdout and "samples from" not in r.stdout  # the cache was read, not resampled
    assert not os.path.exists(grpo_dir / "allgone")
    nofilter = _grpo(grpo_dir, "nofilter", "--steps", "1", "--no-filter")
    assert nofilter.returncode == 0, nofilter.stderr[-2000:]
    os.remove(cache_path)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_update_on_two_ranks_equals_one_process(tmp_path, loss_type):
    """Data parallel GRPO: two ranks with two prompt groups each (one rank drops a zero-signal group, so the ranks
    run different numbers of backward passes) give the same weights as one process with all four groups."""
    script = os.path.join(ROOT, "tests", "_grpo_ddp.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    out = {}
    for name, launcher in (("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])):
        subprocess.run(launcher + [script, str(tmp_path / name), os.path.join(ROOT, "tests"), loss_type], check=True,
                       env=env, timeout=240, capture_output=True)
        out[name] = json.load(open(tmp_path / name))
    moved = tiny_model().state_dict()
    assert any(abs(out["one"][n] - moved[n].double().sum().item()) > 1e-4 for n in out["one"])  # it did update
    for n, v in out["one"].items():
        assert out["two"][n] == pytest.approx(v, rel=1e-4, abs=1e-4), n


def test_rl_prompts_are_held_out_from_evaluation_by_meaning():
    from data_gen.math_problems import eval_problems, rl_problems, semantic_key
    heldout = eval_problems(100, seed=0) + eval_problems(30, seed=0) + eval_problems(32, seed=1234)
    pool = rl_problems(512, seed=0, exclude=heldout)
    assert len(pool) == 512 and len({p["id"] for p in pool}) == 512
    assert not {semantic_key(p) for p in pool} & {semantic_key(p) for p in heldout}
    # the key sees through wording and names, not through numbers
    a = {"question": "Add 59 and 80.", "answer": "139", "difficulty": 1}
    assert semantic_key(a) == semantic_key({"question": "What is 80 + 59?", "answer": "139", "difficulty": 1})
    assert semantic_key(a) != semantic_key({"question": "Add 59 and 81.", "answer": "140", "difficulty": 1})


def test_overflowing_gradient_stops_before_the_weights_change():
    """A policy whose forward is finite but whose gradient overflows (one FFN's norm gain x1e30, its gate/up weights
    /1e30: the same function): check_finite_update raises before optimizer.step, and no weight moved."""
    from common.optim import NonFiniteError, check_finite_update
    torch.manual_seed(3)
    model, tok = tiny_model(), tiny_tokenizer()
    with torch.no_grad():
        layer = model.model.layers[1]
        layer.post_attention_layernorm.weight.mul_(1e30)
        layer.mlp.gate_proj.weight.div_(1e30)
        layer.mlp.up_proj.weight.div_(1e30)
    ro = sample_rollout(model, tok, ["a", "b"], group_size=4, max_new_tokens=4, dtype=torch.float32)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NonFiniteError, match="gradient norm is inf with a finite loss"):
        train_on_rollout(model, torch.optim.AdamW(model.parameters(), lr=1e-3), ro,
                         torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]), PolicyLossConfig(dtype=torch.float32),
                         torch.device("cpu"), tok.pad_token_id,
                         check_finite=lambda loss, g, where: check_finite_update(model, loss, g, where))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_math_reward_reads_the_answer_part_and_gates_on_the_toggle():
    from common.rewards import math_reward
    good = "<think>\n2 + 2 = 4\n</think>\nSo the answer is \\boxed{4}."
    assert math_reward(good, "4", reasoning=True) == {"reward": 1.5, "accuracy": 1.0, "format": 1.0}
    assert math_reward(good.replace("\\boxed{4}", "\\boxed{5}"), "4", True)["reward"] == 0.5  # format only
    assert math_reward("<think>\n2 + 2 = 4, \\boxed{4}", "4", True)["accuracy"] == 0.0  # thinking cut off: no answer
    skipped = "2 + 2 = 4, so the answer is \\boxed{4}."  # right answer, no thinking although it was asked for
    assert math_reward(skipped, "4", True)["reward"] == 0.0
    assert math_reward(skipped, "4", True, gate=False)["reward"] == 1.0
    assert math_reward(good, "4", reasoning=False)["reward"] == 0.0  # think tags with thinking off
    assert math_reward(skipped, "4", reasoning=False)["reward"] == 1.5
