"""Blockwise local distillation (Puzzle §3, decoupled BLD), the training half of 01_bld.py's block library.

Each subblock variant of a layer is initialized from the parent's own subblock (Puzzletron):

    stats = calibration_stats(parent, ids, batch_size, want_lstsq)    FFN channel activations, X^T X / X^T Y
    sb = init_variant(parent, layer, "ffn", cfg, stats, "lstsq")      a Subblock with its kind's init (variants.py)

then learns to reproduce the parent subblock's output from the parent's input (normalized MSE). Decoupled: one parent
forward per batch feeds every variant of every layer (bld_step).
"""

import torch

from common.losses import normalized_mse
from common.puzzle import SUBBLOCKS, Subblock, embed, parent_subblock_state
from common.variants import init_subblock


@torch.no_grad()
def calibration_stats(parent, ids, batch_size, want_lstsq):
    """Per layer: mean |a_j| of the FFN's channels, and X^T X, X^T Y of each subblock (for least squares)."""
    L = parent.config.num_hidden_layers
    stats = [{"act": 0.0, "n": 0} for _ in range(L)]
    for i in range(0, len(ids), batch_size):
        x, rope = embed(parent, ids[i:i + batch_size])
        for l, layer in enumerate(parent.model.layers):
            for sub in SUBBLOCKS:
                norm = layer.input_layernorm if sub == "attention" else layer.post_attention_layernorm
                xin = norm(x).float().flatten(0, 1)
                y = (layer.attn_delta(x, rope) if sub == "attention" else layer.ffn_delta(x))
                if sub == "ffn":
                    m = layer.mlp
                    a = m.act_fn(m.gate_proj(xin)) * m.up_proj(xin)
                    stats[l]["act"] = stats[l]["act"] + a.abs().sum(0)
                    stats[l]["n"] += a.shape[0]
                if want_lstsq:
                    yf = y.float().flatten(0, 1)
                    stats[l][sub + "_xtx"] = stats[l].get(sub + "_xtx", 0) + xin.double().T @ xin.double()
                    stats[l][sub + "_xty"] = stats[l].get(sub + "_xty", 0) + xin.double().T @ yf.double()
                x = x + y
    return stats


@torch.no_grad()
def init_variant(parent, l, sub, cfg, stats, linear_init):
    """A Subblock for variant `cfg` of layer l, weights derived from the parent's layer l by its kind's init
    (common/variants.py)."""
    sb = Subblock(parent.config, l, sub, cfg)
    ps = parent_subblock_state(parent.model.layers[l], sub)
    new = init_subblock(parent.config, sub, cfg, ps, stats[l], linear_init)
    sb.load_state_dict({k: t.float().clone() for k, t in new.items()})
    return sb


def bld_step(parent, ids, jobs_at, modules, autocast, train=True):
    """Run the parent layer by layer once; each variant gets the parent's input and learns its output.
    jobs_at: {(layer, subblock): [variant keys]}; modules: {key: Subblock}. Returns {key: loss}."""
    losses = {}
    with torch.no_grad(), autocast():
        x, rope = embed(parent, ids)
    for l, layer in enumerate(parent.model.layers):
        for sub in SUBBLOCKS:
            with torch.no_grad(), autocast():
                target = layer.attn_delta(x, rope) if sub == "attention" else layer.ffn_delta(x)
            for key in jobs_at.get((l, sub), []):
                with torch.set_grad_enabled(train), autocast():
                    loss = normalized_mse(modules[key](x, rope), target)
                if train:
                    loss.backward()
                losses[key] = loss.item()
            x = x + target
    return losses
