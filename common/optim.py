"""Optimizer, learning-rate schedule and the finite-update guard for every training stage (--resume states:
common/resume.py).

AdamW with float32 master weights (pure-bf16 AdamW barely moves the weights), no weight decay on
norms and biases, linear warmup then cosine decay (Puzzletron's BLD and LN-Ultra's SFT schedule).

A finite loss does not make a finite update: an overflowing gradient (finite loss, inf or NaN gradient
norm) would let optimizer.step() write NaN weights into the next saved state. So every training step is

    loss.backward(); gnorm = clip_grad_norm_(...)
    check_finite_update(model, loss, gnorm, where)      # before optimizer.step()
    optimizer.step()
    check_finite_weights(model, where)                  # before a state or checkpoint is saved
"""

import math

import torch



def make_adamw(params, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.1, named: bool = True):
    """AdamW; with named=True `params` is named_parameters() and 1-D tensors get no weight decay."""
    if named:
        params = [(n, p) for n, p in params if p.requires_grad]
        decay = [p for n, p in params if p.dim() >= 2]
        no_decay = [p for n, p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for p in params if p.requires_grad], "weight_decay": weight_decay}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=False)


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Linear warmup to lr over warmup_steps, then cosine to min_lr at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


class NonFiniteError(ValueError):
    """A NaN/inf loss, gradient or weight; the message names where and says what to do."""


FIX = "stopped before it reached the weights; rerun with --resume (from the last good state) and a lower --lr"


def _first_bad(named_tensors) -> str | None:
    """The first name whose tensor holds a NaN/inf, else None."""
    for name, t in named_tensors:
        if t is not None and not bool(torch.isfinite(t.detach()).all()):
            return name
    return None


def check_finite_update(model, loss: float, grad_norm: float, where: str) -> None:
    """Raise NonFiniteError unless the step's loss and gradient norm (clip_grad_norm_'s return) are finite.
    Call after the backward pass and before optimizer.step(), on every rank (the norm is global under DDP)."""
    loss, grad_norm = float(loss), float(grad_norm)
    if not math.isfinite(loss):
        raise NonFiniteError(f"loss is {loss} at {where}; {FIX}")
    if not math.isfinite(grad_norm):  # name a NaN/inf gradient if there is one (an overflowing norm alone has none)
        bad = _first_bad((n, p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad)  # FSDP2: this rank's shard
                         for n, p in getattr(model, "module", model).named_parameters())
        first = f" (first in {bad})" if bad else ""
        raise NonFiniteError(f"gradient norm is {grad_norm}{first} with a finite loss ({loss:.4g}) at {where}; {FIX}")


def check_finite_weights(model, where: str) -> None:
    """Raise NonFiniteError if any weight is NaN/inf. `model` is a module or a state dict; one pass over the
    weights, so stages call it before saving (states, checkpoints), not every step."""
    named = model.items() if isinstance(model, dict) else getattr(model, "module", model).named_parameters()
    named = ((n, t.full_tensor() if hasattr(t, "full_tensor") else t) for n, t in named)  # FSDP2 shards
    bad = _first_bad(named)
    if bad:
        raise NonFiniteError(f"weight {bad} is not finite after {where}; nothing was saved from it; rerun with "
                             f"--resume (from the last good state) and a lower --lr")
