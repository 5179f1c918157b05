"""FFN Fusion (arXiv 2503.18908): attention-free runs, the block dependency map, and fusing a run of FFNs into one
wide FFN. 03_ffn_fusion.py measures and saves; the math lives here so tests check it on hand-made models.

After Puzzle removes attention, runs of consecutive FFN-only blocks appear: x -> x + f1(x) -> x' + f2(x') ...
When the blocks of a run barely depend on each other, the run becomes one parallel step on the run's input,
x + f1(x) + f2(x) + ..., which for SwiGLU FFNs is exactly one wider SwiGLU (fuse_ffn_blocks).

    runs = attention_free_runs(config)            # [[1, 2, 3], ...]: maximal runs of FFN-only blocks
    dep = dependency_map(model, calib_ids, layers)  # dep[i, j]: how much block j depends on block i
    path = merge_path(runs, dep)                  # cheapest-first merges of adjacent groups inside each run
    n, groups = ffn_fusion_groups(path, sequential_depth(config), threshold, target_depth)
    fused, layer_map = fuse_ffn_blocks(model, groups)
"""

import torch

from common.model import (AttentionConfig, BlockConfig, DeciLMConfig, DeciLMForCausalLM, FFNConfig,
                          intermediate_size_to_ffn_mult)

# ----------------------------------------------------------------------------
# Runs, dependency map, groups


def is_ffn_only(block: BlockConfig) -> bool:
    """A block FFN Fusion can fuse: attention removed, a SwiGLU FFN present."""
    return block.attention.no_op and not block.ffn.no_op and not block.ffn.replace_with_linear


def is_empty(block: BlockConfig) -> bool:
    """A block Puzzle removed whole (attention and FFN no_op): the identity, so it neither breaks nor joins a run."""
    return block.attention.no_op and block.ffn.no_op


def attention_free_runs(config: DeciLMConfig) -> list[list[int]]:
    """Maximal runs (length >= 2) of consecutive FFN-only blocks, looking through removed (empty) blocks."""
    runs, cur = [], []
    for i, b in enumerate(config.block_configs):
        if is_empty(b):
            continue
        if is_ffn_only(b):
            cur.append(i)
        else:
            runs.append(cur) if len(cur) > 1 else None
            cur = []
    if len(cur) > 1:
        runs.append(cur)
    return runs


def sequential_depth(config: DeciLMConfig) -> int:
    """Subblocks executed one after another in a forward pass (attention and FFN each count one)."""
    return sum((not b.attention.no_op) + (not b.ffn.no_op) for b in config.block_configs)


@torch.no_grad()
def dependency_map(model, ids: torch.Tensor, layers: list[int] | None = None) -> torch.Tensor:
    """dep[i, j] (i < j, both in `layers`, default all): cosine distance between block j's contribution and the
    same with block i's removed from j's input, averaged over calibration tokens. Other entries stay 0."""
    m = model.model
    hs = m(ids, use_cache=False, output_hidden_states=True)[2]  # hs[k] = input of layer k
    pos = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    rope = m.rotary_emb(hs[0], pos)
    L = len(m.layers)
    contrib = [(hs[k + 1] - hs[k]).float() for k in range(L)]
    dep = torch.zeros(L, L)
    layers = sorted(layers) if layers is not None else list(range(L))
    for j in layers:
        for i in (i for i in layers if i < j):
            x = hs[j] - contrib[i].to(hs[j].dtype)
            c = (m.layers[j](x, rope) - x).float()
            cos = torch.nn.functional.cosine_similarity(c, contrib[j], dim=-1)
            dep[i, j] = (1 - cos).mean().item()
    return dep


def merge_path(runs: list[list[int]], dep: torch.Tensor, max_group_size: int = -1):
    """Cheapest-first agglomerative merging of adjacent groups inside each run.
    Returns [(cost, groups_after_merge)], groups as lists of layer indices; cost = max dep across the two groups."""
    groups = [[[i] for i in run] for run in runs]
    path = []
    while True:
        best = None
        for r, gs in enumerate(groups):
            for k in range(len(gs) - 1):
                if max_group_size > 0 and len(gs[k]) + len(gs[k + 1]) > max_group_size:
                    continue
                cost = max(dep[i, j].item() for i in gs[k] for j in gs[k + 1])
                if best is None or cost < best[0]:
                    best = (cost, r, k)
        if best is None:
            return path
        cost, r, k = best
        groups[r][k:k + 2] = [groups[r][k] + groups[r][k + 1]]
        path.append((cost, [g for gs in groups for g in gs if len(g) > 1]))


def ffn_fusion_groups(path, depth_before: int, threshold: float = -1.0, target_depth: int = -1) -> tuple[int, list]:
    """How many merges of the path to apply: stop at the threshold or at the target depth; all by default."""
    n = 0
    for cost, _ in path:
        if target_depth > 0 and depth_before - n <= target_depth:
            break
        if threshold >= 0 and cost > threshold:
            break
        n += 1
    return n, (path[n - 1][1] if n else [])


# ----------------------------------------------------------------------------
# Fusion: one wide SwiGLU per group


@torch.no_grad()
def fuse_ffn_blocks(model: DeciLMForCausalLM, fused_groups: list[list[int]]):
    """A new model where each group of consecutive FFN-only layers (empty layers between them are dropped) is one
    layer computing x + sum_i f_i(x): gate/up rows concatenated, down columns concatenated, each block's RMSNorm
    gain folded into its gate/up input columns (W' = W diag(g)), the fused block's norm gain set to ones.
    Returns (model, layer_map): layer_map[k] = the last original layer whose output new layer k reproduces."""
    cfg = model.config
    starts = {g[0]: g for g in fused_groups}
    sd = model.state_dict()
    new_sd = {k: v for k, v in sd.items() if not k.startswith("model.layers.")}
    blocks, layer_map, i = [], [], 0
    while i < cfg.num_hidden_layers:
        g = starts.get(i, [i])
        new = len(blocks)
        if len(g) == 1:
            blocks.append(cfg.block_configs[i])
            pre = f"model.layers.{i}."
            new_sd.update({f"model.layers.{new}.{k[len(pre):]}": v for k, v in sd.items() if k.startswith(pre)})
        else:
            if any(not (is_ffn_only(cfg.block_configs[j]) if j in g else is_empty(cfg.block_configs[j]))
                   for j in range(g[0], g[-1] + 1)) or g != sorted(g):
                raise ValueError(f"group {g} is not a run of consecutive attention-free SwiGLU blocks")
            gate, up, down, gate_b, up_b, down_b = [], [], [], [], [], []
            for j in g:
                pre = f"model.layers.{j}."
                gain = sd[pre + "post_attention_layernorm.weight"].double()[None, :]  # W' = W diag(g)
                gate.append(sd[pre + "mlp.gate_proj.weight"].double() * gain)
                up.append(sd[pre + "mlp.up_proj.weight"].double() * gain)
                down.append(sd[pre + "mlp.down_proj.weight"].double())
                if cfg.mlp_bias:
                    gate_b.append(sd[pre + "mlp.gate_proj.bias"])
                    up_b.append(sd[pre + "mlp.up_proj.bias"])
                    down_b.append(sd[pre + "mlp.down_proj.bias"].double())
            dtype = sd[f"model.layers.{g[0]}.mlp.gate_proj.weight"].dtype
            pre = f"model.layers.{new}."
            new_sd[pre + "mlp.gate_proj.weight"] = torch.cat(gate, 0).to(dtype)
            new_sd[pre + "mlp.up_proj.weight"] = torch.cat(up, 0).to(dtype)
            new_sd[pre + "mlp.down_proj.weight"] = torch.cat(down, 1).to(dtype)
            if cfg.mlp_bias:
                new_sd[pre + "mlp.gate_proj.bias"] = torch.cat(gate_b)
                new_sd[pre + "mlp.up_proj.bias"] = torch.cat(up_b)
                new_sd[pre + "mlp.down_proj.bias"] = torch.stack(down_b).sum(0).to(dtype)
            new_sd[pre + "post_attention_layernorm.weight"] = torch.ones(cfg.hidden_size, dtype=dtype)
            width = sum(cfg.intermediate_size(j) for j in g)  # each a multiple of 256, so the sum is too
            blocks.append(BlockConfig(AttentionConfig(no_op=True),
                                      FFNConfig(ffn_mult=intermediate_size_to_ffn_mult(width, cfg.hidden_size))))
        layer_map.append(g[-1])
        i = g[-1] + 1
    d = cfg.to_dict()
    d.update(num_hidden_layers=len(blocks), block_configs=[b.to_dict() for b in blocks])
    fused = DeciLMForCausalLM(DeciLMConfig.from_dict(d)).to(next(model.parameters()).dtype)
    fused.load_all_weights(new_sd, "the fused weights")
    fused.generation_config = model.generation_config
    return fused.eval(), layer_map
