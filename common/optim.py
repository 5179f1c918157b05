"""Optimizer, learning-rate schedule and --resume state for every training stage.

AdamW with float32 master weights (pure-bf16 AdamW barely moves the weights), no weight decay on
norms and biases, linear warmup then cosine decay (Puzzletron's BLD and LN-Ultra's SFT schedule).
"""

import math
import os

import torch

from common.checkpoint import load_state, save_state


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


def save_train_state(path: str, step: int, model=None, optimizer=None, **extra) -> None:
    """Everything --resume needs: weights, optimizer moments, step, RNG, any extra tensors/JSON values."""
    state = {"step": step, "torch_rng": torch.get_rng_state(), **extra}
    if model is not None:
        state["model"] = {k: v for k, v in getattr(model, "module", model).state_dict().items()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    save_state(path, state)


def load_train_state(path: str, model=None, optimizer=None, reset_optimizer: bool = False) -> dict:
    """Restore what save_train_state wrote; returns the state dict (step and extras)."""
    state = load_state(path)
    if model is not None:
        getattr(model, "module", model).load_state_dict(state["model"])
    if optimizer is not None and not reset_optimizer:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state


def latest_state(dir_: str) -> str | None:
    """The newest finished state under dir_ (named step-000123), or None."""
    if not os.path.isdir(dir_):
        return None
    done = sorted(d for d in os.listdir(dir_) if d.startswith("step-") and os.path.isfile(os.path.join(dir_, d, "COMPLETED")))
    return os.path.join(dir_, done[-1]) if done else None
