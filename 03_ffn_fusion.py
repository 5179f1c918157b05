"""Stage 3: FFN Fusion -- fuse runs of attention-free FFN blocks into single wide FFNs (arXiv 2503.18908).

After Puzzle removes attention, runs of consecutive FFN-only blocks appear: x -> x + f1(x) -> x' + f2(x') ...
When the blocks of a run barely depend on each other, the run is replaced by one parallel step on the run's
input, x + f1(x) + f2(x) + ..., which for SwiGLU FFNs is exactly one wider SwiGLU: gate/up rows concatenated,
down columns concatenated, each block's RMSNorm gain folded into its gate/up input columns (W' = W diag(g)),
the fused block's norm gain set to ones. The fused model has fewer layers (one per fused group) and is saved
as an ordinary nemotron-nas checkpoint (attention no_op, ffn_mult of the summed width), so our model,
NVIDIA's DeciLM code and vLLM's nemotron_nas load it unchanged. The fusion math: common/ffn_fusion.py.

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
import time

import torch

from common.checkpoint import (CheckpointError, check_metrics_free, check_out_free, load_checkpoint, load_meta,
                               save_checkpoint, write_metrics)
from common.cli import add_dtype_arg, die, nonneg_float, nonneg_int, off_or, positive_int
from common.data import text_chunks
from common.dist import autocast_ctx, print0, progress, resolve_dtype
from common.evaluate import TextEval, speed_eval
from common.ffn_fusion import (attention_free_runs, dependency_map, ffn_fusion_groups, fuse_ffn_blocks, merge_path,
                               sequential_depth)
from common.stats import paired_gaps
from common.tables import fusion_tables
from common.text_corpus import distill_documents
from common.tracking import add_wandb_args, init_wandb

# ----------------------------------------------------------------------------
# Arguments


def batch_x_len(s: str) -> str:
    """'BxT' with B and T positive integers (e.g. 4x128)."""
    parts = s.split("x")
    if len(parts) != 2 or not all(v.isdigit() and int(v) > 0 for v in parts):
        raise argparse.ArgumentTypeError(f"expected BATCHxLENGTH of positive numbers, e.g. 4x128; got {s!r}")
    return s


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
add_wandb_args(p)
args = p.parse_args()
user_config = vars(args).copy()

# ----------------------------------------------------------------------------
# Validation: every input checked before anything is loaded or written


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


run_dir = args.run_dir or os.path.dirname(os.path.abspath(args.out))
try:  # --out free, metrics/<name>.json ours, the child and its reference finished checkpoints
    check_out_free(args.out)
    check_metrics_free(run_dir, args.metrics_name, args.out)
    meta = load_meta(args.child)
    parent_path = resolve_parent(args.child, meta, args.parent)
    load_meta(parent_path)
except CheckpointError as e:
    die(str(e))
bs, T = (int(v) for v in args.speed_prefill.split("x"))

# ----------------------------------------------------------------------------
# Init and model

torch.set_num_threads(args.threads)
torch.manual_seed(args.seed)
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

# ----------------------------------------------------------------------------
# Dependency map on calibration text, the merge path, the groups to fuse

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

# ----------------------------------------------------------------------------
# Quality at several fusion levels (the paper's "layers fused vs accuracy" table)

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

# ----------------------------------------------------------------------------
# Fuse, time fused vs unfused in the same run

fused, layer_map = fuse_ffn_blocks(child, groups)
depth_after = sequential_depth(fused.config)
speed = {}
if args.speed_new_tokens > 0:
    speed = speed_eval(copy.deepcopy(fused).to(dtype), copy.deepcopy(child).to(dtype), batch_sizes=sorted({1, bs}),
                       prompt_len=T, gen_len=args.speed_new_tokens)

# ----------------------------------------------------------------------------
# Save


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


fusion = {"child": args.child, "parent": parent_path, "runs": runs, "groups": groups, "layer_map": layer_map,
          "depth_before": depth_before, "depth_after": depth_after,
          "layers_before": cfg.num_hidden_layers, "layers_after": fused.config.num_hidden_layers,
          "merge_path": [{"cost": c, "groups": g} for c, g in path], "dependency_map": dep.tolist(),
          "calib_tokens": calib.numel(), "levels": levels, "speed": speed}
child_map = meta.get("layer_map") or list(range(cfg.num_hidden_layers))  # compose with an earlier fusion
save_checkpoint(fused, tokenizer, args.out, stage="ffn_fusion", args=user_config,
                meta={"parent": parent_path, "input": os.path.abspath(args.child), "layer_map": [child_map[k] for k in layer_map],
                      "metrics": {"before": before, "after": after, "speed": speed}},
                extra_json={"fusion.json": fusion},
                extra_files={"dependency_map.png": lambda png: plot_dependency_map(
                    dep, runs, groups, png,
                    f"FFN Fusion dependency map ({os.path.basename(args.child.rstrip('/'))}); red = fused")})

metrics = {"child": args.child, "fused": args.out, "depth_before": depth_before, "depth_after": depth_after,
           "layers_before": cfg.num_hidden_layers, "layers_after": fused.config.num_hidden_layers,
           "groups": groups, "quality_before": before, "quality_after": after, "speed": speed, "levels": levels}
metrics["report"] = fusion_tables(metrics, args.metrics_name)
metrics_path = write_metrics(run_dir, args.metrics_name, metrics, out=args.out)
wandb_run.log({"fusion/depth_before": depth_before, "fusion/depth_after": depth_after,
               **{f"fusion/before_{k}": v for k, v in before.items() if isinstance(v, float)},
               **{f"fusion/after_{k}": v for k, v in after.items() if isinstance(v, float)},
               **{f"fusion/speed_ratio_{k}": v for k, v in speed.get("ratio", {}).items()}})
wandb_run.finish()

# ----------------------------------------------------------------------------
# Report

print("\n" + "\n".join(metrics["report"]))
print(f"sequential depth {depth_before} -> {depth_after}; layers {cfg.num_hidden_layers} -> "
      f"{fused.config.num_hidden_layers}; fused at {n_merges} merges")
print(f"checkpoint: {args.out}; metrics: {metrics_path}")
