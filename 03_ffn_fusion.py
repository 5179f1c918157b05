"""Stage 3: FFN Fusion -- fuse runs of attention-free FFN blocks into single wide FFNs (arXiv 2503.18908).

After Puzzle removes attention, runs of consecutive FFN-only blocks appear: x -> x + f1(x) -> x' + f2(x') ...
When the blocks of a run barely depend on each other, the run is replaced by one parallel step on the run's
input, x + f1(x) + f2(x) + ..., which for SwiGLU FFNs is exactly one wider SwiGLU: gate/up rows concatenated,
down columns concatenated, each block's RMSNorm gain folded into its gate/up input columns (W' = W diag(g)),
the fused block's norm gain set to ones. The fused model has fewer layers (one per fused group) and is saved
as an ordinary nemotron-nas checkpoint (attention no_op, ffn_mult of the summed width), so our model,
NVIDIA's DeciLM code and vLLM's nemotron_nas load it unchanged.

Which blocks to fuse comes from the pairwise dependency map on calibration text:
    dep[i, j] = mean over tokens of cosine_distance( c_j(x_j), c_j(x_j - c_i(x_i)) )
where c_k(x) is block k's contribution to the residual stream and x_k its input: how much block j's output
changes when block i's contribution is taken out of its input. Adjacent groups inside a run are merged
cheapest-first (cost = the largest dep between them) until --threshold or --target-depth stops it; each
merge shortens the sequential depth by one block. The quality of several fusion levels along that merge
path is measured (the paper's "layers fused vs accuracy" table), and the chosen one is timed against the
unfused model in the same run (decode latency at batch 1, prefill throughput).

    python 03_ffn_fusion.py --child runs/smol/child --out runs/smol/fused                 # CPU, ~3-4 min idle
    python 03_ffn_fusion.py --child runs/big/child --out runs/big/fused --device cuda \\
        --calib-tokens 65536 --eval-tokens 262144                                         # one GPU (forward only)
    python 03_ffn_fusion.py --child /tmp/child --out /tmp/fused --calib-tokens 128 \\
        --eval-tokens 256 --levels 2 --speed-new-tokens 4 --wandb-mode disabled           # tiny smoke run

Outputs: <out>/ (checkpoint + fusion.json + dependency_map.png), <run-dir>/metrics/<--metrics-name>.json
(default ffn_fusion.json).
"""

import argparse
import copy
import math
import os
import sys
import time

import torch

from common.checkpoint import (CheckpointError, check_metrics_free, check_out_free, load_checkpoint, load_meta,
                               save_checkpoint, write_metrics)
from common.cli import add_dtype_arg, nonneg_float, nonneg_int, off_or, positive_int
from common.model import (AttentionConfig, BlockConfig, DeciLMConfig, DeciLMForCausalLM, FFNConfig,
                          intermediate_size_to_ffn_mult)
from common.text_corpus import distill_documents

# ----------------------------------------------------------------------------
# Arguments


def batch_x_len(s: str) -> str:
    """'BxT' with B and T positive integers (e.g. 4x128)."""
    parts = s.split("x")
    if len(parts) != 2 or not all(v.isdigit() and int(v) > 0 for v in parts):
        raise argparse.ArgumentTypeError(f"expected BATCHxLENGTH of positive numbers, e.g. 4x128; got {s!r}")
    return s


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", required=True, help="checkpoint to fuse (02's child, or any of ours)")
    p.add_argument("--out", required=True, help="output checkpoint directory, e.g. runs/smol/fused")
    p.add_argument("--parent", default=None, help="reference for KL / retention (default: the child's meta 'parent')")
    p.add_argument("--run-dir", default=None, help="where metrics/ goes (default: parent dir of --out)")
    p.add_argument("--metrics-name", default="ffn_fusion", help="metrics/<this>.json")
    # which groups to fuse
    p.add_argument("--threshold", type=off_or(nonneg_float), default=-1.0,
                   help="merge while the largest dependency <= this (-1 = off)")
    p.add_argument("--target-depth", type=off_or(positive_int), default=-1,
                   help="merge until this many sequential subblocks remain (-1 = off)")
    p.add_argument("--max-group-size", type=off_or(positive_int), default=-1,
                   help="most blocks in one fused FFN (-1 = no limit)")
    # data
    p.add_argument("--map-all", action="store_true", help="dependency map over every layer (L^2/2 block forwards), "
                   "not only the attention-free runs")
    p.add_argument("--calib-tokens", type=positive_int, default=512, help="calibration tokens for the dependency map")
    p.add_argument("--seq-len", type=positive_int, default=256)
    p.add_argument("--eval-tokens", type=positive_int, default=4096,
                   help="held-out tokens for KL / next-token accuracy")
    p.add_argument("--levels", type=positive_int, default=4,
                   help="fusion levels in the quality table (merge-path points)")
    # speed
    p.add_argument("--speed-new-tokens", type=nonneg_int, default=16,
                   help="decode steps timed at batch 1 (0 = skip speed)")
    p.add_argument("--speed-prefill", type=batch_x_len, default="4x128",
                   help="full batch x prompt length for the speed measure")
    p.add_argument("--device", default="cpu")
    add_dtype_arg(p, "dtype for map, eval and speed")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=nonneg_int, default=0)
    from common.tracking import add_wandb_args
    add_wandb_args(p)
    return p


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
    layer computing x + sum_i f_i(x). Returns (model, layer_map): layer_map[k] = the last original layer whose
    output new layer k reproduces."""
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
    if cfg.tie_word_embeddings:
        new_sd.pop("lm_head.weight", None)
    missing, unexpected = fused.load_state_dict(new_sd, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"fused weights do not match the fused config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    fused.generation_config = model.generation_config
    return fused.eval(), layer_map


def plot_dependency_map(dep: torch.Tensor, runs, fused_groups, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    L = dep.shape[0]
    masked = dep.clone()
    masked[torch.tril(torch.ones(L, L, dtype=torch.bool)) | (dep == 0)] = float("nan")  # not measured
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(masked.T.numpy(), cmap="viridis", origin="upper")  # row j (dependent), column i (removed)
    for g in fused_groups:  # outline fused groups
        ax.add_patch(plt.Rectangle((g[0] - 0.5, g[0] - 0.5), len(g), len(g), fill=False, edgecolor="red", lw=1.5))
    ax.set_xlabel("block i (contribution removed)")
    ax.set_ylabel("block j (contribution measured)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="cosine distance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------
# Main


def resolve_parent(child_path: str, meta: dict, given: str | None) -> str:
    """The reference checkpoint: --parent, else the child's meta 'parent', else the child itself."""
    if given:
        return given
    if meta.get("stage") == "parent":
        return child_path
    cand = meta.get("parent")
    if cand and os.path.isdir(cand):
        return cand
    raise CheckpointError(f"{child_path}/meta.json names no parent checkpoint ({cand!r}); pass --parent PATH")


def main(argv=None):
    args = build_parser().parse_args(argv)
    user_config = vars(args).copy()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run_dir = args.run_dir or os.path.dirname(os.path.abspath(args.out))
    try:
        check_out_free(args.out)
        check_metrics_free(run_dir, args.metrics_name, args.out)
        meta = load_meta(args.child)
        parent_path = resolve_parent(args.child, meta, args.parent)
        load_meta(parent_path)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    bs, T = (int(v) for v in args.speed_prefill.split("x"))

    from common.data import text_chunks
    from common.dist import autocast_ctx, print0, progress, resolve_dtype
    from common.evaluate import TextEval, speed_eval
    from common.stats import gap_label, paired_gaps
    from common.tracking import init_wandb

    wandb_run = init_wandb(args.wandb_project, args.run_name or "ffn_fusion", user_config, mode=args.wandb_mode)
    print(f"parent (reference) {parent_path}")
    dtype = resolve_dtype(args.dtype, args.device)
    child, tokenizer = load_checkpoint(args.child, dtype=torch.float32, device=args.device)  # fuse in float32
    parent, _ = load_checkpoint(parent_path, dtype=dtype, device=args.device, with_tokenizer=False)
    cfg = child.config
    runs = attention_free_runs(cfg)
    depth_before = sequential_depth(cfg)
    print(f"child {args.child}: {cfg.num_hidden_layers} layers, sequential depth {depth_before}, "
          f"attention-free runs {[(r[0], r[-1]) for r in runs]}")

    # -------------------------------------------------------------------- dependency map on calibration text
    t0 = time.time()
    chunks = text_chunks(tokenizer, distill_documents("train"), args.seq_len)
    n_rows = max(1, math.ceil(args.calib_tokens / args.seq_len))
    calib = torch.as_tensor(chunks[:n_rows]).to(args.device)
    with autocast_ctx(args.device, dtype):
        dep = dependency_map(child, calib, None if args.map_all else [i for r in runs for i in r])
    path = merge_path(runs, dep, args.max_group_size)
    n_merges, groups = ffn_fusion_groups(path, depth_before, args.threshold, args.target_depth)
    print(f"dependency map on {calib.numel()} tokens in {time.time() - t0:.1f}s; merge path of {len(path)} merges, "
          f"applying {n_merges}: groups {groups}")

    # -------------------------------------------------------------------- quality at several fusion levels
    text_eval = TextEval(parent, tokenizer, max_tokens=args.eval_tokens, seq_len=args.seq_len)
    level_points = sorted({round(k * len(path) / max(1, args.levels - 1)) for k in range(args.levels)} | {n_merges})
    levels = []
    for n in progress(level_points, desc="fusion levels", unit="level"):
        gs = path[n - 1][1] if n else []
        model_n = (fuse_ffn_blocks(child, gs)[0] if n else copy.deepcopy(child)).to(dtype)
        q = text_eval(model_n)
        levels.append({"merges": n, "fused_blocks": sum(len(g) for g in gs), "fused_groups": len(gs),
                       "num_layers": model_n.config.num_hidden_layers, "depth": sequential_depth(model_n.config),
                       "max_dependency": path[n - 1][0] if n else 0.0, **q})
        levels[-1]["vs_unfused"] = paired_gaps(q, levels[0])  # paired over the same chunks; levels[0] is unfused
        print0(f"level {n:>3} merges: depth {levels[-1]['depth']}, acc {q['next_token_acc']:.4f}, "
               f"kl {q['kl_parent']:.4f}")
    before = next(lv for lv in levels if lv["merges"] == 0)
    after = next(lv for lv in levels if lv["merges"] == n_merges)

    # -------------------------------------------------------------------- fuse, time fused vs unfused
    fused, layer_map = fuse_ffn_blocks(child, groups)
    depth_after = sequential_depth(fused.config)
    speed = {}
    if args.speed_new_tokens > 0:
        speed = speed_eval(copy.deepcopy(fused).to(dtype), copy.deepcopy(child).to(dtype), batch_sizes=sorted({1, bs}),
                           prompt_len=T, gen_len=args.speed_new_tokens)

    # -------------------------------------------------------------------- save
    fusion = {"child": args.child, "parent": parent_path, "runs": runs, "groups": groups, "layer_map": layer_map,
              "depth_before": depth_before, "depth_after": depth_after,
              "layers_before": cfg.num_hidden_layers, "layers_after": fused.config.num_hidden_layers,
              "merge_path": [{"cost": c, "groups": g} for c, g in path], "dependency_map": dep.tolist(),
              "calib_tokens": calib.numel(), "levels": levels, "speed": speed}
    child_map = meta.get("layer_map") or list(range(cfg.num_hidden_layers))  # compose with an earlier fusion
    save_checkpoint(fused, tokenizer, args.out, stage="ffn_fusion", args=user_config,
                    meta={"parent": parent_path, "input": args.child, "layer_map": [child_map[k] for k in layer_map],
                          "metrics": {"before": before, "after": after, "speed": speed}},
                    extra_json={"fusion.json": fusion},
                    extra_files={"dependency_map.png": lambda path: plot_dependency_map(
                        dep, runs, groups, path,
                        f"FFN Fusion dependency map ({os.path.basename(args.child.rstrip('/'))}); red = fused")})

    metrics = {"child": args.child, "fused": args.out, "depth_before": depth_before, "depth_after": depth_after,
               "layers_before": cfg.num_hidden_layers, "layers_after": fused.config.num_hidden_layers,
               "groups": groups, "quality_before": before, "quality_after": after, "speed": speed, "levels": levels}
    metrics_path = write_metrics(run_dir, args.metrics_name, metrics, out=args.out)
    wandb_run.log({"fusion/depth_before": depth_before, "fusion/depth_after": depth_after,
                   **{f"fusion/before_{k}": v for k, v in before.items() if isinstance(v, float)},
                   **{f"fusion/after_{k}": v for k, v in after.items() if isinstance(v, float)},
                   **{f"fusion/speed_ratio_{k}": v for k, v in speed.get("ratio", {}).items()}})
    wandb_run.finish()

    # -------------------------------------------------------------------- report
    print(f"\nFFN Fusion of {args.child} -> {args.out} (± = standard error over the {len(text_eval.ids)} evaluation "
          f"chunks; Δ = paired difference vs unfused)")
    print("| fused blocks | groups | layers | seq. depth | max dep | KL(parent||model) | next-token acc | top-1 agree "
          "| ΔKL vs unfused | Δacc vs unfused | gap > 2 SE |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    pm = lambda d, k, fmt=".4f": f"{d[k]:{fmt}} ± {d[k + '_se']:.2g}" if d else "-"  # noqa: E731
    for lv in levels:
        mark = " *" if lv["merges"] == n_merges else ""
        g = lv["vs_unfused"] if lv["merges"] else {}
        gap = "-" if lv["merges"] == 0 else gap_label(g)
        print(f"| {lv['fused_blocks']}{mark} | {lv['fused_groups']} | {lv['num_layers']} | {lv['depth']} | "
              f"{lv['max_dependency']:.3f} | {pm(lv, 'kl_parent')} | {pm(lv, 'next_token_acc')} | "
              f"{lv['top1_agreement']:.4f} | {pm(g, 'kl_parent', '+.3g')} | {pm(g, 'next_token_acc', '+.3g')} "
              f"| {gap} |")
    if speed:
        print(f"\nspeed, fused vs unfused in the same run ({speed.get('dtype')}, prompt {T}):")
        print("| measure | unfused | fused | fused/unfused |\n|---|---|---|---|")
        for k, r in speed["ratio"].items():
            print(f"| {k} | {speed['parent'][k]:.2f} | {speed['model'][k]:.2f} | {r:.3f} |")
    print(f"sequential depth {depth_before} -> {depth_after}; layers {cfg.num_hidden_layers} -> "
          f"{fused.config.num_hidden_layers}; * = saved")
    print(f"checkpoint: {args.out}; metrics: {metrics_path}")
    return metrics


if __name__ == "__main__":
    main()
