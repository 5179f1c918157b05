"""RLHF (07_rlhf.py; common/losses.py's RLOO / Bradley-Terry / RPO objectives, common/reward_model.py, common/rl.py's
train_on_pairs, data_gen/preferences.py): hand-computed advantages and losses, the reward model on a separable toy
set and on disk, the preference pairs differ as documented, prompts held out by meaning, a tiny policy that learns
a learnable reward under RLOO, RPO and GRPO-vs-reward-model, and the stage end to end (checkpoints, metrics,
resume after kill -9, one-line errors)."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, tiny_model, tiny_tokenizer

from common.checkpoint import CheckpointError, save_checkpoint
from common.losses import (RPO_LOSSES, bradley_terry_loss, dpo, preference_loss, rloo_advantages, rpo_bwd_kl,
                           rpo_fwd_kl, rpo_sq)
from common.reward_model import (HEAD_FILE, RewardModel, check_reward_model, load_reward_model, pairwise_accuracy,
                                 reward_scores, save_reward_model, train_reward_model_step)
from common.rl import (Pairs, PolicyLossConfig, PreferenceConfig, rollout_logprobs, sample_rollout, sequence_kl,
                       train_on_pairs, train_on_rollout)

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------
# objectives against hand-computed values


def test_rloo_baseline_and_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    a = rloo_advantages(r, 4)
    # b_0 = (2 - 1) / 3, A_0 = 1 - 1/3; b_1 = (2 - 0) / 3, A_1 = -2/3
    assert torch.allclose(a[:4], torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    assert torch.allclose(a[4:8], torch.tensor([3.0, -1.0, -1.0, -1.0]))  # b_4 = 0, b_5 = 3/3
    assert torch.allclose(a[8:], torch.zeros(4), atol=1e-7)  # equal rewards: no signal
    assert torch.allclose(a, 4 / 3 * (r.view(-1, 4) - r.view(-1, 4).mean(1, keepdim=True)).view(-1))  # k/(k-1) (r - mean)
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(r, 1)


def test_sequence_kl_is_the_summed_log_ratio():
    old = {0: torch.tensor([-1.0, -2.0]), 1: torch.tensor([-0.5])}
    ref = {0: torch.tensor([-1.5, -1.0]), 1: torch.tensor([-0.5])}
    assert sequence_kl(old, ref, [0, 1]).tolist() == [0.5 - 1.0, 0.0]


def test_rpo_losses_hand_computed():
    beta = 0.5
    dpi, dr = torch.tensor([2.0, 4.0, -2.0]), torch.tensor([1.0, 1.0, 1.0])
    assert rpo_sq(dpi, dr, beta).tolist() == pytest.approx([0.0, 1.0, 4.0])  # zero when beta*dpi = eta*dr
    sig = (lambda x: 1 / (1 + math.exp(-x)))

    def bern_kl(p, q):
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    # bwd: KL(sigmoid(dr) || sigmoid(beta dpi)); fwd: the other direction; both zero where they agree (dpi = 2)
    assert rpo_bwd_kl(dpi, dr, beta).tolist() == pytest.approx([0.0, bern_kl(sig(1), sig(2)), bern_kl(sig(1), sig(-1))])
    assert rpo_fwd_kl(dpi, dr, beta).tolist() == pytest.approx([0.0, bern_kl(sig(2), sig(1)), bern_kl(sig(-1), sig(1))])
    assert dpo(dpi, 0.1).tolist() == pytest.approx([-math.log(sig(0.1 * x)) for x in (2.0, 4.0, -2.0)])
    # stable far out: no inf / NaN at large margins
    big = torch.tensor([1e4, -1e4])
    assert torch.isfinite(rpo_bwd_kl(big, torch.tensor([3.0, 3.0]), 1.0)).all()
    assert torch.isfinite(rpo_fwd_kl(big, torch.tensor([3.0, 3.0]), 1.0)).all()
    for kind in RPO_LOSSES:
        assert torch.equal(preference_loss(dpi, dr, kind, beta), {"rpo_sq": rpo_sq, "rpo_bwd_kl": rpo_bwd_kl,
                           "rpo_fwd_kl": rpo_fwd_kl}[kind](dpi, dr, beta) if kind != "dpo" else dpo(dpi, beta))
    with pytest.raises(ValueError, match="reward margins"):
        preference_loss(dpi, None, "rpo_sq", beta)


def test_preference_losses_push_toward_the_chosen_answer():
    """At the start (policy = reference, delta_pi = 0) with the chosen answer rewarded higher, every loss's gradient
    raises delta_pi; rpo_sq and the KLs stop at beta*dpi = dr, DPO never does."""
    for kind in RPO_LOSSES:
        dpi = torch.zeros(1, requires_grad=True)
        preference_loss(dpi, torch.tensor([2.0]), kind, 0.5).sum().backward()
        assert dpi.grad.item() < 0, kind  # gradient descent increases delta_pi
    for kind in ("rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl"):
        dpi = torch.tensor([4.0], requires_grad=True)  # beta*dpi = dr: the optimum
        preference_loss(dpi, torch.tensor([2.0]), kind, 0.5).sum().backward()
        assert dpi.grad.abs().item() < 1e-6, kind


def test_bradley_terry_loss_and_accuracy_on_a_separable_toy_set():
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([-1.0])).item() == pytest.approx(-math.log(1 / (1 + math.exp(-2))))
    # a linear scorer on 2-d points whose preference is the sign of x0 - x1 learns to rank every pair right
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 2, generator=g), torch.randn(256, 2, generator=g)
    chosen = torch.where(((a[:, 0] - a[:, 1]) > (b[:, 0] - b[:, 1]))[:, None], a, b)
    rejected = torch.where(((a[:, 0] - a[:, 1]) > (b[:, 0] - b[:, 1]))[:, None], b, a)
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([w], lr=1.0)
    losses = []
    for _ in range(50):
        loss = bradley_terry_loss(chosen @ w, rejected @ w).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2)) and losses[-1] < 0.2
    assert ((chosen @ w) > (rejected @ w)).float().mean().item() == 1.0


# ----------------------------------------------------------------------------
# the reward model: a tiny one learns a separable token preference; save / load round trip; bad paths

PROMPTS = ["What is 1 + 2?", "Add 3 and 4.", "hello", "detailed thinking on"]


def _toy_pairs(tok, n, g):
    """chosen completions use token ids below 256, rejected ones above: separable by content."""
    prompts = tok(PROMPTS, add_special_tokens=False)["input_ids"]
    return ([prompts[i % 4] for i in range(n)], [torch.randint(3, 256, (8,), generator=g).tolist() for _ in range(n)],
            [torch.randint(256, 512, (8,), generator=g).tolist() for _ in range(n)])


@pytest.fixture(scope="module")
def toy_reward_model():
    tok = tiny_tokenizer()
    rm = RewardModel(tiny_model(seed=1))
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    test = _toy_pairs(tok, 32, g)
    before = sum(pairwise_accuracy(rm, *test, tok.pad_token_id, dtype=torch.float32)) / 32
    losses = [train_reward_model_step(rm, opt, *_toy_pairs(tok, 16, g), tok.pad_token_id, micro_batch=16,
                                      dtype=torch.float32)["loss"] for _ in range(8)]
    after = sum(pairwise_accuracy(rm, *test, tok.pad_token_id, dtype=torch.float32)) / 32
    return rm.requires_grad_(False).eval(), tok, before, after, losses


def test_tiny_reward_model_learns_a_separable_preference(toy_reward_model):
    _, _, before, after, losses = toy_reward_model
    assert before < 0.8 and after == 1.0, (before, after)
    assert losses[-1] < 0.1 < losses[0], losses


def test_reward_model_save_load_round_trip(toy_reward_model, tmp_path):
    rm, tok, *_ = toy_reward_model
    save_reward_model(rm, tok, str(tmp_path / "rm"), args={"lr": 1.0}, meta={"init": "toy"})
    assert os.path.isfile(tmp_path / "rm" / HEAD_FILE) and os.path.isfile(tmp_path / "rm" / "COMPLETED")
    loaded, tok2 = load_reward_model(str(tmp_path / "rm"))
    g = torch.Generator().manual_seed(5)
    p, c, _ = _toy_pairs(tok, 6, g)
    assert torch.equal(reward_scores(rm, p, c, tok.pad_token_id), reward_scores(loaded, p, c, tok.pad_token_id))
    assert json.load(open(tmp_path / "rm" / "meta.json"))["reward_head"] == HEAD_FILE
    # a policy checkpoint is not a reward model; a missing path says so
    save_checkpoint(tiny_model(), tok, str(tmp_path / "policy"), stage="parent")
    with pytest.raises(CheckpointError, match="not a reward model"):
        check_reward_model(str(tmp_path / "policy"))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_reward_model(str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------
# a tiny policy learns a learnable reward (fraction of low token ids, ~0.5 at init) under each algorithm


def _low_token_reward(completion_ids) -> torch.Tensor:
    return torch.tensor([sum(t < 256 for t in c) / max(1, len(c)) for c in completion_ids])


def _tiny_policy(lr):
    torch.manual_seed(0)
    model, tok = tiny_model(), tiny_tokenizer()
    model.generation_config.eos_token_id = None  # never stop early: every completion is 8 tokens
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    return model, tok, copy.deepcopy(model).requires_grad_(False), opt


def _rises(curve, by=0.1):
    return sum(curve[-2:]) / 2 > sum(curve[:2]) / 2 + by


def test_rloo_with_kl_in_the_reward_learns_a_reward():
    model, tok, ref, opt = _tiny_policy(1e-2)
    cfg = PolicyLossConfig(loss_type="dapo", steps_per_rollout=2, micro_batch=16, max_new_tokens=8, dtype=torch.float32)
    curve, kls = [], []
    for _ in range(8):
        ro = sample_rollout(model, tok, PROMPTS, group_size=8, max_new_tokens=8, dtype=torch.float32)
        r = _low_token_reward(ro.completion_ids)
        curve.append(r.mean().item())
        rows = list(range(len(r)))
        old = rollout_logprobs(model, ro, rows, tok.pad_token_id, CPU, 16, torch.float32)
        kl = sequence_kl(old, rollout_logprobs(ref, ro, rows, tok.pad_token_id, CPU, 16, torch.float32), rows)
        kls.append(kl.mean().item())
        r = r - 0.05 * kl
        train_on_rollout(model, opt, ro, r, cfg, CPU, tok.pad_token_id, advantages=rloo_advantages(r, 8), old_logprobs=old)
    assert kls[0] == 0.0 and kls[-1] > 0  # the policy starts at the reference and moves away from it
    assert _rises(curve), curve


def test_rpo_on_best_and_worst_samples_learns_a_reward():
    model, tok, ref, opt = _tiny_policy(1e-2)
    cfg = PreferenceConfig(loss_type="rpo_sq", beta=0.1, eta=5.0, micro_batch=4, dtype=torch.float32)
    curve, accs = [], []
    for _ in range(8):  # online RPO: pair each prompt's best and worst sample
        ro = sample_rollout(model, tok, PROMPTS, group_size=8, max_new_tokens=8, dtype=torch.float32)
        r = _low_token_reward(ro.completion_ids)
        curve.append(r.mean().item())
        best = [g * 8 + int(r[g * 8:(g + 1) * 8].argmax()) for g in range(4)]
        worst = [g * 8 + int(r[g * 8:(g + 1) * 8].argmin()) for g in range(4)]
        pairs = Pairs([ro.prompt_ids[i] for i in best], [ro.completion_ids[i] for i in best],
                      [ro.completion_ids[i] for i in worst], r[best], r[worst])
        st = train_on_pairs(model, opt, pairs, cfg, CPU, tok.pad_token_id, ref)
        accs.append(st["pref_accuracy"])
    assert accs[0] == 0.0 and st["delta_pi"] > 0  # delta_pi = 0 at the start, positive once it learned
    assert _rises(curve), curve


def test_grpo_against_a_reward_model_raises_its_score(toy_reward_model):
    rm, *_ = toy_reward_model
    model, tok, _, opt = _tiny_policy(1e-2)
    cfg = PolicyLossConfig(loss_type="grpo", steps_per_rollout=2, micro_batch=16, max_new_tokens=8, dtype=torch.float32)
    curve = []
    for _ in range(8):
        ro = sample_rollout(model, tok, PROMPTS, group_size=8, max_new_tokens=8, dtype=torch.float32)
        r = reward_scores(rm, ro.prompt_ids, ro.completion_ids, tok.pad_token_id, dtype=torch.float32)
        curve.append(r.mean().item())
        train_on_rollout(model, opt, ro, r, cfg, CPU, tok.pad_token_id)
    assert _rises(curve, by=1.0), curve


def test_train_on_pairs_with_rewards_detached_and_policy_equal_to_reference():
    """delta_pi is 0 (up to rounding) when the policy is the reference; rewards carry no gradient."""
    model, tok, ref, opt = _tiny_policy(0.0)
    p = tok(PROMPTS[:2], add_special_tokens=False)["input_ids"]
    rc = torch.tensor([1.0, 2.0], requires_grad=True)
    st = train_on_pairs(model, opt, Pairs(p, [[5, 6, 7], [8]], [[9], [10, 11]], rc, torch.zeros(2)),
                        PreferenceConfig("rpo_sq", micro_batch=1, dtype=torch.float32), CPU, tok.pad_token_id, ref)
    assert abs(st["delta_pi"]) < 1e-5 and rc.grad is None and st["optimizer_steps"] == 1
    assert st["loss"] == pytest.approx((1.0 ** 2 + 2.0 ** 2) / 2, rel=1e-5)  # (beta*0 - eta*dr)^2, eta 1


# ----------------------------------------------------------------------------
# data: pairs differ as documented, prompts held out by meaning, bad pairs files


def test_preference_pairs_differ_as_documented_and_hold_out_a_kind():
    from data_gen.preferences import KINDS, heldout_prompts, pair_differs_as_documented, preference_pairs
    heldout = heldout_prompts()
    train = preference_pairs(200, 0, kinds=[k for k in KINDS if k != "truncated"], exclude=heldout)
    test = preference_pairs(50, 0, heldout=True)
    assert {p["kind"] for p in train} == set(KINDS) - {"truncated"} and {p["kind"] for p in test} == set(KINDS)
    assert all(pair_differs_as_documented(p) for p in train + test)
    assert {p["reasoning"] for p in train} == {"on", "off"}
    assert not {p["input"][0]["content"] for p in train} & {p["input"][0]["content"] for p in test}
    wrong_mode = next(p for p in train if p["kind"] == "wrong_mode" and p["reasoning"] == "off")
    assert "<think>" in wrong_mode["rejected"] and "<think>" not in wrong_mode["chosen"]


def test_training_prompts_are_held_out_from_evaluation_by_meaning():
    from data_gen.instructions import generate_instructions, instruction_key, rl_instructions
    from data_gen.preferences import heldout_prompts, preference_pairs
    heldout = heldout_prompts(500)
    evals = generate_instructions(100, 0, heldout=True)  # 07's default evaluation prompts are inside `heldout`
    assert {instruction_key(q) for q in evals} <= {instruction_key(q) for q in heldout}
    pool = rl_instructions(512, 0, exclude=heldout)
    assert len(pool) == 512 and not {instruction_key(q) for q in pool} & {instruction_key(q) for q in heldout}
    pairs = preference_pairs(300, 0, exclude=heldout)  # the pairs RPO trains on offline: held out the same way
    assert not {instruction_key(p) for p in pairs if p["constraints"]} & {instruction_key(q) for q in heldout}
    # the key sees through wording (the task phrase, the order of the asks), not through the constraints
    q = evals[0]
    reworded = {"question": q["question"].replace("Tell me about", "Describe"), "constraints": list(reversed(q["constraints"]))}
    assert instruction_key(reworded) == instruction_key(q)
    assert instruction_key({**q, "constraints": q["constraints"][1:]}) != instruction_key(q)


def test_pairs_file_with_a_missing_field_names_file_line_and_field(tmp_path):
    from data_gen.preferences import read_pairs
    good = {"id": "a", "input": "hi", "reasoning": "off", "chosen": "hello", "rejected": "no"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({k: v for k, v in good.items() if k != "rejected"}) + "\n")
    with pytest.raises(ValueError) as e:
        read_pairs(str(path))
    msg = str(e.value)
    assert f"{path}:2" in msg and "rejected" in msg and "\n" not in msg
    path.write_text(json.dumps({**good, "chosen_reward": "high"}) + "\n")
    with pytest.raises(ValueError, match=":1: field chosen_reward"):
        read_pairs(str(path))
    with pytest.raises(ValueError, match="no such pairs file"):
        read_pairs(str(tmp_path / "none.jsonl"))


# ----------------------------------------------------------------------------
# 07_rlhf.py end to end on a tiny model (subprocesses, tiny budgets)

SMALL = ["--max-new-tokens", "12", "--max-new-tokens-off", "8", "--eval-if", "4", "--eval-math", "2",
         "--eval-max-new-tokens", "8", "--eval-max-new-tokens-off", "8", "--wandb-mode", "disabled"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "WANDB_MODE": "disabled"}


def _cmd(d, out, *extra):
    return [sys.executable, os.path.join(ROOT, "07_rlhf.py"), "--policy", str(d / "policy"), "--data", str(d / "data"),
            "--out", str(d / out), *SMALL, *extra]


def _run_all(cmds: dict) -> dict:
    """Run several 07 commands at once (their start-up overlaps); {name: CompletedProcess-like}."""
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
             for k, c in cmds.items()}
    out = {}
    for k, pr in procs.items():
        so, se = pr.communicate(timeout=300)
        out[k] = subprocess.CompletedProcess(pr.args, pr.returncode, so, se)
    return out


def _metrics(d, name):
    return json.load(open(d / "metrics" / f"{name}.json"))


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A tiny policy, a reward model trained by 07 on it, and one run of every algorithm."""
    d = tmp_path_factory.mktemp("rlhf")
    save_checkpoint(tiny_model(), tiny_tokenizer(), str(d / "policy"), stage="parent")
    (d / "data").mkdir()
    rm = _run_all({"rm": _cmd(d, "rm", "--train-reward-model", "--steps", "4", "--num-pairs", "40", "--eval-pairs", "20",
                              "--lr", "1e-3", "--policy-pairs", "2")})["rm"]
    assert rm.returncode == 0, rm.stderr[-3000:]
    runs = _run_all({
        "rloo": _cmd(d, "rloo", "--algo", "rloo", "--steps", "6", "--prompts-per-step", "2", "--save-every", "1",
                     "--reward-model", str(d / "rm"), "--eval-if-modes", "on,off"),
        "rpo": _cmd(d, "rpo", "--algo", "rpo", "--reward-model", str(d / "rm"), "--steps", "2", "--pairs-per-step", "4"),
        "rpo_online": _cmd(d, "rpo_online", "--algo", "rpo", "--rpo-loss", "rpo_bwd_kl", "--online", "2", "--steps", "2",
                           "--pairs-per-step", "2", "--reward-model", str(d / "rm")),
        "grpo_rm": _cmd(d, "grpo_rm", "--algo", "grpo-rm", "--reward-model", str(d / "rm"), "--steps", "2",
                        "--prompts-per-step", "2"),
    })
    return d, runs


@pytest.mark.slow
def test_reward_model_stage_writes_head_pairs_and_per_kind_accuracy(stage):
    d, _ = stage
    assert os.path.isfile(d / "rm" / "COMPLETED") and os.path.isfile(d / "rm" / HEAD_FILE)
    assert os.path.isfile(d / "rm" / "policy_pairs.jsonl") and not os.path.exists(d / "rm.policy_pairs.jsonl")
    meta = json.load(open(d / "rm" / "meta.json"))
    assert meta["init"] == str(d / "policy") and meta["pairs"] == str(d / "data" / "preference_pairs.jsonl")
    kinds = {json.loads(line)["kind"] for line in open(d / "data" / "preference_pairs.jsonl")}
    assert "truncated" not in kinds and len(kinds) == 4  # the held-out kind never reaches the training file
    m = _metrics(d, "rlhf_reward_model")
    assert m["unseen_kind"] == "truncated" and m["eval_pairs"] == 20
    assert "| truncated (never trained on) |" in "\n".join(m["report"])
    for k in ("before_heldout_accuracy", "after_heldout_accuracy", "after_heldout_accuracy_se", "after_accuracy_truncated"):
        assert m[k] is not None, k
    load_reward_model(str(d / "rm"))


@pytest.mark.slow
def test_every_algorithm_writes_a_checkpoint_and_before_after_metrics(stage):
    d, runs = stage
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr[-3000:])
        assert os.path.isfile(d / name / "COMPLETED") and not os.path.exists(d / f"{name}.state"), name
        assert json.load(open(d / name / "meta.json"))["init"] == str(d / "policy")
        assert "| held-out | n | before | after | gain (paired SE) |" in r.stdout  # the stored tables, printed
    m = _metrics(d, "rlhf_rloo")
    for mode in ("on", "off"):  # IF with standard errors and paired gains, the reward model's score, math on/off
        for k in ("all_met", "fraction_met", "rm_score", "format_compliance"):
            assert f"before_if_{mode}_{k}" in m and f"after_if_{mode}_{k}" in m, (mode, k)
        assert m[f"after_if_{mode}_all_met_se"] is not None and f"gain_if_{mode}_fraction_met_se" in m
        assert f"after_math_{mode}_accuracy" in m and f"after_math_{mode}_format_compliance" in m
    assert m["eval_if_prompts"] == 4
    assert any(line.startswith("| IF all constraints met (off) | 4 |") for line in m["report"])
    assert _metrics(d, "rlhf_rpo_rpo_sq")["reward_source"] == "reward model"
    online = _metrics(d, "rlhf_rpo_rpo_bwd_kl_online")
    assert len(online["sampled_reward_per_iteration"]) == 2 and "after_if_off_rm_score" in online
    assert "final_reward" in _metrics(d, "rlhf_grpo_rm")


@pytest.mark.slow
def test_rloo_resume_after_kill_continues_the_same_batches(stage):
    d, runs = stage
    proc = subprocess.Popen(_cmd(d, "killed", "--algo", "rloo", "--steps", "6", "--prompts-per-step", "2",
                                 "--save-every", "1", "--reward-model", str(d / "rm"), "--eval-if-modes", "on,off",
                                 "--metrics-name", "killed"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    marker = d / "killed.state" / "step-000002" / "COMPLETED"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = subprocess.run(_cmd(d, "killed", "--algo", "rloo", "--steps", "6", "--prompts-per-step", "2",
                                  "--save-every", "1", "--reward-model", str(d / "rm"), "--eval-if-modes", "on,off",
                                  "--metrics-name", "killed", "--resume"),
                             capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.load(open(d / "rloo" / "meta.json"))["history"]
    b = json.load(open(d / "killed" / "meta.json"))["history"]
    assert [h["prompt_ids"] for h in a] == [h["prompt_ids"] for h in b]
    assert [h["completion_tokens"] for h in a] == [h["completion_tokens"] for h in b]  # same samples (RNG restored)
    m_a, m_b = _metrics(d, "rlhf_rloo"), _metrics(d, "killed")
    assert m_a["before_if_off_rm_score"] == m_b["before_if_off_rm_score"]  # the before-eval came back from the state


def _last_line(r):
    return r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_bad_input_is_one_line_and_writes_nothing(stage, tmp_path):
    d, _ = stage
    pairs = tmp_path / "pairs.jsonl"
    good = {"id": "a", "input": "hi", "reasoning": "off", "chosen": "hello", "rejected": "no", "chosen_reward": 1.0,
            "rejected_reward": 0.0}
    pairs.write_text(json.dumps(good) + "\n" + json.dumps({k: v for k, v in good.items() if k != "rejected"}) + "\n")
    rs = _run_all({
        "pairs": _cmd(d, "bad_pairs", "--algo", "rpo", "--pairs", str(pairs)),
        "not_rm": _cmd(d, "bad_rm", "--algo", "grpo-rm", "--reward-model", str(d / "policy")),
        "exists": _cmd(d, "rpo", "--algo", "rpo", "--reward-model", str(d / "rm")),  # a finished --out
    })
    for name, r in rs.items():
        assert r.returncode != 0 and "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        assert _last_line(r).startswith("error:"), (name, r.stderr[-2000:])
    assert f"{pairs}:2" in _last_line(rs["pairs"]) and "rejected" in _last_line(rs["pairs"])
    assert "not a reward model" in _last_line(rs["not_rm"]) and "--train-reward-model" in _last_line(rs["not_rm"])
    assert "already a finished checkpoint" in _last_line(rs["exists"])
    for out in ("bad_pairs", "bad_rm"):
        assert not os.path.exists(d / out)
    assert os.path.isfile(d / "rpo" / "COMPLETED")


@pytest.mark.slow
def test_before_from_reuses_the_before_evaluation_of_the_same_policy_and_eval(stage):
    d, _ = stage
    rs = _run_all({
        "dpo": _cmd(d, "dpo", "--algo", "rpo", "--rpo-loss", "dpo", "--reward-model", str(d / "rm"), "--steps", "1",
                    "--pairs-per-step", "4", "--before-from", str(d / "rpo")),
        "other_eval": _cmd(d, "bad_before", "--algo", "rpo", "--rpo-loss", "dpo", "--reward-model", str(d / "rm"),
                           "--before-from", str(d / "rloo"), "--metrics-name", "bad_before"),  # rloo: IF on,off
    })
    assert rs["dpo"].returncode == 0, rs["dpo"].stderr[-3000:]
    assert "reused from" in rs["dpo"].stdout
    a, b = _metrics(d, "rlhf_rpo_dpo"), _metrics(d, "rlhf_rpo_rpo_sq")
    before = [k for k in b if k.startswith("before_")]
    assert before and all(a[k] == b[k] for k in before)
    r = rs["other_eval"]
    assert r.returncode != 0 and _last_line(r).startswith("error: --before-from") and "--eval-if-modes" in _last_line(r)
    assert not os.path.exists(d / "bad_before")


@pytest.mark.slow
def test_rpo_and_reward_model_updates_on_two_ranks_equal_one_process(tmp_path):
    """Data parallel: two ranks holding 3 and 2 of five pairs give the same weights as one process with all five
    (losses normalized by the global pair count, gradients summed across ranks)."""
    script = os.path.join(ROOT, "tests", "_rlhf_ddp.py")
    procs = {name: subprocess.Popen(launcher + [script, str(tmp_path / name), os.path.join(ROOT, "tests")], env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, launcher in (("one", [sys.executable]), ("two", [sys.executable, "-m", "torch.distributed.run",
                                                                         "--standalone", "--nproc_per_node", "2"]))}
    for name, pr in procs.items():
        assert pr.wait(timeout=240) == 0, (name, pr.stderr.read()[-2000:])
    one, two = (json.load(open(tmp_path / n)) for n in ("one", "two"))
    start, one, two = one["start"], one["after"], two["after"]
    assert any(abs(one[k] - start[k]) > 1e-4 for k in start)  # it did update
    for k, v in one.items():
        assert two[k] == pytest.approx(v, rel=1e-4, abs=1e-4), k
