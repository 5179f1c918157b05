"""Losses shared by the stages, named as in the papers.

BLD (Puzzle): normalized MSE between a child subblock's output and the parent subblock's output.
Global KD (Puzzle's ablation: cosine on hidden states + KL on logits was best): forward KL with
temperature, reverse KL, cosine on hidden states, LM loss, and kd_loss, their weighted sum (04_distill.py's
objective). All reduce to a mean over the tokens a mask keeps (mask: bool (B, T), True = counts), so padded or
prompt tokens never count.
"""

import torch
import torch.nn.functional as F


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def normalized_mse(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Puzzle's BLD loss: ||y_hat - y||^2 / (||y||^2 + eps), over the whole batch, in float32."""
    pred, target = pred.float(), target.float()
    return (pred - target).pow(2).sum() / (target.pow(2).sum() + eps)


def forward_kl(student_logits, teacher_logits, temperature: float = 1.0, mask=None) -> torch.Tensor:
    """KL(teacher || student) per token (the distillation KL), scaled by T^2 as in Hinton et al."""
    t = temperature
    s_logp = F.log_softmax(student_logits.float() / t, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return _masked_mean(per_token, mask) * t * t


def reverse_kl(student_logits, teacher_logits, temperature: float = 1.0, mask=None) -> torch.Tensor:
    """KL(student || teacher) per token: mode-seeking."""
    t = temperature
    s_logp = F.log_softmax(student_logits.float() / t, dim=-1)
    t_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    return _masked_mean(per_token, mask) * t * t


def cosine_hidden(student_hidden, teacher_hidden, mask=None) -> torch.Tensor:
    """Mean (1 - cos) between hidden states at matched positions (one tensor or a list of layers)."""
    if isinstance(student_hidden, (list, tuple)):
        return torch.stack([cosine_hidden(s, t, mask) for s, t in zip(student_hidden, teacher_hidden)]).mean()
    per_token = 1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
    return _masked_mean(per_token, mask)


def lm_loss(logits, labels, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross entropy; labels are the input ids (shifted here), ignore_index skipped."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=ignore_index)


KD_LOSSES = ("fkl", "rkl", "cosine", "lm")


def kd_loss(s_out, t_out, losses: dict, ids, temperature=1.0, layer_pairs=None) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the selected KD_LOSSES (losses: name -> weight) between the student's and the teacher's
    outputs; layer_pairs = [(student_idx, teacher_idx)] into hidden_states. Returns (total, {name: value})."""
    parts = {}
    if "fkl" in losses:
        parts["fkl"] = forward_kl(s_out.logits, t_out.logits, temperature)
    if "rkl" in losses:
        parts["rkl"] = reverse_kl(s_out.logits, t_out.logits, temperature)
    if "cosine" in losses:
        pairs = layer_pairs or [(-1, -1)]
        parts["cosine"] = cosine_hidden([s_out.hidden_states[a] for a, _ in pairs],
                                        [t_out.hidden_states[b] for _, b in pairs])
    if "lm" in losses:
        parts["lm"] = lm_loss(s_out.logits, ids)
    total = sum(losses[k] * v for k, v in parts.items())
    return total, {k: v.item() for k, v in parts.items()}


# ----------------------------------------------------------------------------
# Policy-gradient objectives (GRPO, LN-Ultra's reasoning RL; the same clipped surrogate serves RLOO in 07).
# Shapes: per-token tensors are (B, T) over completion tokens, `mask` bool (B, T) marks real completion tokens,
# advantages are per completion (B,).

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-normalized advantage A_i = (r_i - mean_g r) / (std_g r + eps), rewards laid out group by group
    (B = groups x group_size). Dr. GRPO drops the division (scale_by_std=False): it biases toward too-easy and
    too-hard prompts. std is the sample std (n - 1), as in TRL and NeMo-RL."""
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def zero_signal_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool (groups,): True where every completion of the prompt got the same reward, so every advantage is 0
    and the group carries no policy-gradient signal (DAPO drops these)."""
    r = rewards.float().view(-1, group_size)
    return (r == r[:, :1]).all(dim=1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) on samples from pi: exp(ref - logp) - (ref - logp) - 1 >= 0,
    unbiased, zero where the two agree."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float = 0.2, eps_high: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO/GRPO per-token loss -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho = exp(logp - old_logp).
    Returns (loss (B, T), clipped (B, T) bool: where the clipped term was the active one, i.e. no gradient flows).
    DAPO's clip-higher is eps_high > eps_low."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(ratio.dtype)
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def normalize_token_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, num_seqs: float,
                         num_tokens: float, max_len: int) -> torch.Tensor:
    """Reduce per-token losses l_{i,t} of a (micro-)batch to the scalar whose gradients, summed over the
    micro-batches of one optimizer step, give the step's loss. `num_seqs` / `num_tokens` are the totals over the
    whole step (all micro-batches), so accumulation does not change the objective:
      grpo     mean_i ( (1/|o_i|) sum_t l_{i,t} )             sequence mean, then batch mean (GRPO paper)
      dapo     sum_{i,t} l_{i,t} / sum_i |o_i|                 token level over the batch (DAPO)
      dr_grpo  sum_{i,t} l_{i,t} / (N * L_max), L_max fixed    a constant, no length bias (Dr. GRPO)
    """
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * m).sum(1) / m.sum(1).clamp_min(1.0)).sum() / num_seqs
    if loss_type == "dapo":
        return (per_token * m).sum() / max(num_tokens, 1.0)
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / (num_seqs * max_len)
    raise ValueError(f"loss_type={loss_type!r}; use one of {LOSS_TYPES}")


# ----------------------------------------------------------------------------
# RLHF objectives (07_rlhf.py): RLOO's leave-one-out baseline, the Bradley-Terry reward-model loss, and the
# preference losses of RPO (reward-aware preference optimization, NeMo-Aligner's names) with DPO as the baseline.
# Per pair: delta_pi = sum_t (logpi - logpi_ref)[chosen] - sum_t (logpi - logpi_ref)[rejected] (the policy's
# implicit reward margin, before beta) and delta_r = eta * (r_chosen - r_rejected) (the reward model's margin).

RPO_LOSSES = ("rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl", "dpo")


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO: A_i = r_i - b_i with the leave-one-out baseline b_i = (sum_j r_j - r_i) / (k - 1), rewards laid out
    group by group (k samples per prompt). Equals k / (k - 1) * (r_i - mean r): unbiased, no std division."""
    if k < 2:
        raise ValueError(f"rloo_advantages: k={k}; the leave-one-out baseline needs k >= 2 samples per prompt")
    r = rewards.float().view(-1, k)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (k - 1)
    return (r - baseline).view(-1)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Reward-model loss -log sigmoid(r_chosen - r_rejected), per pair (reduce it yourself)."""
    return -F.logsigmoid(r_chosen.float() - r_rejected.float())


def _bernoulli_kl(logit_p: torch.Tensor, logit_q: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(sigmoid(logit_p)) || Bernoulli(sigmoid(logit_q))), from log-sigmoids (stable for large logits)."""
    lp1, lp0 = F.logsigmoid(logit_p), F.logsigmoid(-logit_p)
    lq1, lq0 = F.logsigmoid(logit_q), F.logsigmoid(-logit_q)
    return lp1.exp() * (lp1 - lq1) + lp0.exp() * (lp0 - lq0)


def dpo(delta_pi: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO: -log sigmoid(beta * delta_pi); ignores the reward margin (every pair counts the same)."""
    return -F.logsigmoid(beta * delta_pi.float())


def rpo_sq(delta_pi: torch.Tensor, delta_r: torch.Tensor, beta: float) -> torch.Tensor:
    """RPO, squared distance: (beta * delta_pi - delta_r)^2: the implicit margin is regressed onto the reward margin."""
    return (beta * delta_pi.float() - delta_r.float()) ** 2


def rpo_bwd_kl(delta_pi: torch.Tensor, delta_r: torch.Tensor, beta: float) -> torch.Tensor:
    """RPO, Bernoulli KL(sigmoid(delta_r) || sigmoid(beta * delta_pi)): zero where the two preference
    probabilities agree."""
    return _bernoulli_kl(delta_r.float(), beta * delta_pi.float())


def rpo_fwd_kl(delta_pi: torch.Tensor, delta_r: torch.Tensor, beta: float) -> torch.Tensor:
    """RPO, Bernoulli KL(sigmoid(beta * delta_pi) || sigmoid(delta_r)): the other direction."""
    return _bernoulli_kl(beta * delta_pi.float(), delta_r.float())


def preference_loss(delta_pi: torch.Tensor, delta_r: torch.Tensor | None, loss_type: str, beta: float) -> torch.Tensor:
    """Per-pair loss of one of RPO_LOSSES (delta_r may be None for dpo)."""
    if loss_type == "dpo":
        return dpo(delta_pi, beta)
    if loss_type not in RPO_LOSSES:
        raise ValueError(f"loss_type={loss_type!r}; use one of {RPO_LOSSES}")
    if delta_r is None:
        raise ValueError(f"{loss_type} needs reward margins (delta_r); only dpo works without rewards")
    return {"rpo_sq": rpo_sq, "rpo_bwd_kl": rpo_bwd_kl, "rpo_fwd_kl": rpo_fwd_kl}[loss_type](delta_pi, delta_r, beta)
