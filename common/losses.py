"""Losses shared by the stages, named as in the papers.

BLD (Puzzle): normalized MSE between a child subblock's output and the parent subblock's output.
Global KD (Puzzle's ablation: cosine on hidden states + KL on logits was best): forward KL with
temperature, reverse KL, cosine on hidden states, LM loss. All reduce to a mean over the tokens a mask
keeps (mask: bool (B, T), True = counts), so padded or prompt tokens never count.
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
