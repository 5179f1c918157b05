"""Stage 1: Puzzle's block library, decoupled blockwise local distillation (BLD), replace-one-block scores.

For every parent layer, every subblock variant (attention: parent, fewer KV heads, windows of the parent attention,
linear, no_op; FFN: parent width, narrower widths, linear, no_op; common/variants.py, one entry per kind) is
initialized from the parent's weights (Puzzletron: FFN channels by ||W_down[:,j]||*mean|a_j|, KV heads mean-pooled,
a window = the parent attention's weights, linear = W_o@W_v / W_down@W_up or a least-squares fit), then trained
to reproduce the parent subblock's output from the parent's own input (normalized MSE). Decoupled BLD: one parent
forward per batch feeds every variant of every layer. Then each variant alone is put into the
parent and scored on held-out text: KL(parent||model) (Puzzle's score), LM loss, top-1 agreement.
Scoring is per block, as in Puzzle: every (attention, FFN) pair of a layer replaces that whole layer alone; the
scoring text is its own split of the mix (first chunk of each of many documents), disjoint from the text the
evaluation suite reports on and the text 02's baselines select layers on.

    python 01_bld.py --parent runs/smol/parent --out runs/smol/library               # CPU, ~10 min (defaults)
    torchrun --standalone --nproc_per_node 8 01_bld.py --parent ... --out ... --num-seqs 4096 --seq-len 1024
    python 01_bld.py --parent /tmp/tiny/parent --out /tmp/tiny/library --num-seqs 8 --seq-len 32 --score-seqs 2 \
        --window-sizes 8,16
    python 01_bld.py ... --resume           # continue a crashed run from <out>.state/

Under torchrun the (layer, variant) jobs are divided among ranks: each rank runs the same parent forward on the
same batch and trains only its share; rank 0 gathers the library. Output: <out>/library.json, variants/, scores.json.
"""

import argparse
import math
import os
import shutil
import time

import torch
from safetensors.torch import load_file, save_file

from common.bld import bld_step, calibration_stats, init_variant
from common.checkpoint import (CheckpointError, check_checkpoint, check_metrics_free, load_checkpoint,
                               write_json_atomic, write_metrics)
from common.cli import (add_dtype_arg, add_save_every_arg, die, int_list, nonneg_float, nonneg_int, positive_float,
                        positive_int, prob)
from common.data import bld_documents, spread_chunks, text_chunks
from common.dist import autocast_ctx, compute_cleanup, compute_init, print0, progress, resolve_dtype, shard_list
from common.tables import bld_tables
from common.tracking import add_wandb_args, init_wandb
from common.model import ffn_mult_to_intermediate_size
from common.variants import config_to_dict
from common.optim import NonFiniteError, check_finite_update, check_finite_weights, lr_at, make_adamw, set_lr
from common.resume import RunStates
from common.puzzle import (SUBBLOCKS, attention_variants, ffn_variants, pair_key, replace_one_block_scores,
                           subblock_params, variant_key, variant_path)

# ----------------------------------------------------------------------------
# Arguments


def auto_or_list(s):
    """'auto' or a comma list of positive integers (possibly empty: no such variants)."""
    return s if s == "auto" else int_list(1)(s)


p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--parent", required=True, help="parent checkpoint, e.g. runs/smol/parent")
p.add_argument("--out", required=True, help="library directory, e.g. runs/smol/library")
p.add_argument("--data", default=None, help="local .txt/.jsonl ('text' field); default: the distillation mix")
# search space (per layer)
p.add_argument("--kv-heads", type=auto_or_list, default="auto",
               help="fewer-KV-head variants, comma list ('auto' = every divisor)")
p.add_argument("--ffn-widths", type=auto_or_list, default="auto",
               help="narrower FFN widths, multiples of 256 ('auto' = all)")
p.add_argument("--window-sizes", type=int_list(1), default="32,64",
               help="window attention variants: the parent attention over the last W tokens, comma list of W "
                    "('' = none; sized below --score-seq-len and --seq-len, where a window changes the output)")
p.add_argument("--window-sinks", type=nonneg_int, default=0,
               help="sink tokens S of every window variant (the first S tokens stay visible; vLLM serves S = 0)")
p.add_argument("--no-linear", action="store_true", help="drop the linear-replacement variants")
p.add_argument("--no-noop", action="store_true", help="drop the no_op variants")
p.add_argument("--linear-init", default="lstsq", choices=["lstsq", "weights"], help="least squares or W_o@W_v")
p.add_argument("--calib-seqs", type=positive_int, default=8, help="sequences for channel scores / least squares")
# BLD
p.add_argument("--num-seqs", type=positive_int, default=96,
               help="training sequences (CPU budget; Puzzle used ~1B tokens)")
p.add_argument("--seq-len", type=positive_int, default=256)
p.add_argument("--batch-size", type=positive_int, default=4)
p.add_argument("--epochs", type=positive_int, default=1)
p.add_argument("--lr", type=positive_float, default=1e-4, help="Puzzletron BLD: 1e-4")
p.add_argument("--warmup-frac", type=prob, default=0.1)
p.add_argument("--min-lr-frac", type=prob, default=0.1)
p.add_argument("--weight-decay", type=nonneg_float, default=0.1)
p.add_argument("--grad-clip", type=positive_float, default=1.0)
p.add_argument("--val-seqs", type=positive_int, default=4, help="BLD validation sequences (loss before/after)")
add_dtype_arg(p, "autocast compute dtype")
add_save_every_arg(p, 20)
p.add_argument("--resume", action="store_true", help="continue from <out>.state/ (the same arguments; --epochs, "
               "--lr, --dtype, --save-every and the scoring sizes may change)")
p.add_argument("--seed", type=nonneg_int, default=0)
# replace-one-block scoring
p.add_argument("--score-seqs", type=positive_int, default=8,
               help="scoring sequences for the block scores (one per document first; time ~ blocks x tokens)")
p.add_argument("--score-seq-len", type=positive_int, default=128)
p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
p.add_argument("--run-dir", default=None, help="where metrics/ goes (default: parent of --out)")
p.add_argument("--metrics-name", default="bld", help="metrics/<this>.json")
add_wandb_args(p)
args = p.parse_args()
user_config = vars(args).copy()

# ----------------------------------------------------------------------------
# Init: CPU threads and torchrun's ranks, first: each rank keeps its own resume states, which validation checks

torch.set_num_threads(args.threads)
ddp, rank, local_rank, world_size, device = compute_init()

# ----------------------------------------------------------------------------
# Validation: every flag and input checked before anything is loaded or written

run_dir = args.run_dir or os.path.dirname(os.path.abspath(args.out))
work = args.out.rstrip("/") + ".partial"  # variants land here; renamed to --out when everything is written
if args.num_seqs < args.batch_size:
    die(f"--num-seqs {args.num_seqs} is less than one batch (--batch-size {args.batch_size}): BLD would take no "
        f"step; raise --num-seqs or lower --batch-size")
try:  # --out free, states of this run only (one per rank), metrics/<name>.json ours, the parent a whole checkpoint
    run_states = RunStates(args.out, {**user_config, "world_size": world_size}, resume=args.resume, keep=1,
                           budget_keys=("epochs", "save_every", "dtype", "score_seqs", "score_seq_len"),
                           shard=f"rank{rank}")
    check_metrics_free(run_dir, args.metrics_name, args.out)
    check_checkpoint(args.parent)
except CheckpointError as e:
    die(str(e))
try:  # the distillation mix (or --data): its train part for BLD, its scoring part for the block scores
    train_docs, score_docs = bld_documents(args.data, "train"), bld_documents(args.data, "score")
except ValueError as e:
    die(str(e))
short = [w for w in args.window_sizes if w + args.window_sinks >= min(args.seq_len, args.score_seq_len)]
if short:
    print0(f"note: window sizes {short} (+ {args.window_sinks} sinks) cover --seq-len {args.seq_len} or "
           f"--score-seq-len {args.score_seq_len}: there they equal the parent's attention, so BLD and the block "
           f"scores cannot tell them apart; pick windows below both")

# ----------------------------------------------------------------------------
# W&B, autocast dtype, seed

if os.path.isdir(work) and not args.resume and rank == 0:  # a cut-off fresh run's variants
    shutil.rmtree(work)
if ddp:
    torch.distributed.barrier()
wandb_run = init_wandb(args.wandb_project, args.run_name or "bld", user_config, mode=args.wandb_mode, master=rank == 0)
ptdtype = resolve_dtype(args.dtype, device)
autocast = lambda: autocast_ctx(device, ptdtype)  # noqa: E731
torch.manual_seed(args.seed)

# ----------------------------------------------------------------------------
# Parent and search space

try:
    parent, tokenizer = load_checkpoint(args.parent, device=device)
except CheckpointError as e:
    die(str(e))
for p_ in parent.parameters():
    p_.requires_grad_(False)
config = parent.config
if any(b.to_dict() != config.block_configs[0].to_dict() for b in config.block_configs):
    die(f"{args.parent} is not a homogeneous parent (its blocks differ); BLD needs the parent's own layers")
H, pkv = config.num_attention_heads, config.num_attention_heads // config.block_configs[0].attention.n_heads_in_group
pw = ffn_mult_to_intermediate_size(config.block_configs[0].ffn.ffn_mult, config.hidden_size)
try:
    auto_kv, auto_w = [d for d in range(1, pkv) if pkv % d == 0 and H % d == 0], list(range(256, pw, 256))
    space = {"attention": attention_variants(config, auto_kv if args.kv_heads == "auto" else args.kv_heads,
                                             not args.no_linear, not args.no_noop, args.window_sizes,
                                             args.window_sinks),
             "ffn": ffn_variants(config, auto_w if args.ffn_widths == "auto" else args.ffn_widths,
                                 not args.no_linear, not args.no_noop)}
except ValueError as e:
    die(str(e))
entries = []
for l in range(config.num_hidden_layers):
    for sub in SUBBLOCKS:
        for v in space[sub]:
            entries.append({"key": variant_key(l, sub, v["name"]), "layer": l, "subblock": sub, "name": v["name"],
                            "parent": v["parent"], "config_obj": v["config"],
                            "config": config_to_dict(v["config"]),
                            "params": subblock_params(config, sub, v["config"])})
trainable = [e for e in entries if not e["parent"] and not e["config"]["no_op"]]
mine = shard_list(trainable)  # this rank's (layer, variant) jobs
print0(f"library: {len(entries)} variants ({len(trainable)} trained) over {config.num_hidden_layers} layers; "
       f"attention {[v['name'] for v in space['attention']]}, ffn {[v['name'] for v in space['ffn']]}; "
       f"{len(mine)} jobs on rank {rank}/{world_size}")

# ----------------------------------------------------------------------------
# Data: BLD's training and validation sequences, from the train documents

try:
    chunks = torch.as_tensor(text_chunks(tokenizer, train_docs, args.seq_len))
except ValueError:
    die(f"the training text makes no sequence of {args.seq_len} tokens; give more --data or a shorter length")
need = args.num_seqs + args.val_seqs
if len(chunks) < need:
    die(f"only {len(chunks)} training sequences of {args.seq_len} tokens in the data, need {need} "
        f"(--num-seqs {args.num_seqs} + --val-seqs {args.val_seqs}); lower them or give more --data")
g = torch.Generator().manual_seed(args.seed)
chunks = chunks[torch.randperm(len(chunks), generator=g)[:need]].to(device)
train_ids, val_ids = chunks[:args.num_seqs], chunks[args.num_seqs:]
batches = [train_ids[i:i + args.batch_size] for _ in range(args.epochs)
           for i in range(0, args.num_seqs - args.batch_size + 1, args.batch_size)]
total_steps = len(batches)

# ----------------------------------------------------------------------------
# Block library: every variant initialized from the parent

t0 = time.time()
want_lstsq = args.linear_init == "lstsq" and any(e["config"]["replace_with_linear"] for e in mine)
stats = calibration_stats(parent, train_ids[:args.calib_seqs], args.batch_size, want_lstsq)
modules = torch.nn.ModuleDict()
jobs_at = {}
for e in mine:
    modules[e["key"]] = init_variant(parent, e["layer"], e["subblock"], e["config_obj"], stats, args.linear_init)
    jobs_at.setdefault((e["layer"], e["subblock"]), []).append(e["key"])
del stats
modules.to(device)
os.makedirs(os.path.join(work, "variants", "init"), exist_ok=True)
for key, m in modules.items():
    save_file({k: v.contiguous().cpu() for k, v in m.state_dict().items()}, variant_path(work, key, init=True))
val_init = {}
for i in range(0, len(val_ids), args.batch_size):
    for k, v in bld_step(parent, val_ids[i:i + args.batch_size], jobs_at, modules, autocast, train=False).items():
        val_init[k] = val_init.get(k, 0.0) + v * len(val_ids[i:i + args.batch_size]) / len(val_ids)
print0(f"init from parent: {time.time() - t0:.1f}s")

optimizer = make_adamw(modules.named_parameters(), args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
curves, start = {k: [] for k in modules}, 0
if args.resume:
    try:
        st = run_states.load(modules, optimizer)
    except CheckpointError as e:
        die(str(e))
    start, curves = st["step"], {k: list(st["curves"][k]) for k in modules}
    print0(f"resumed from {run_states.latest()} at step {start}/{total_steps}")

# ----------------------------------------------------------------------------
# BLD loop

t0, tokens_seen = time.time(), 0
with progress(range(start, total_steps), initial=start, total=total_steps, desc="BLD", unit="step") as bar:
    for step in bar:
        lr = lr_at(step, total_steps, args.lr, int(args.warmup_frac * total_steps), args.min_lr_frac * args.lr)
        set_lr(optimizer, lr)
        losses = bld_step(parent, batches[step], jobs_at, modules, autocast)
        mean_loss = sum(losses.values()) / max(1, len(losses))
        norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), args.grad_clip) for m in modules.values()]
        bad = [k for k, v in losses.items() if not math.isfinite(v)]
        where = f"BLD step {step + 1}" + (f" for {bad[:3]}" if bad else "")
        try:  # a NaN gradient with a finite loss must not reach the weights (and the next state)
            check_finite_update(modules, mean_loss, torch.stack(norms).norm().item() if norms else 0.0,
                                f"{where} (last good state: {run_states.latest() or 'none'})")
        except NonFiniteError as e:
            die(str(e))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for k, v in losses.items():
            curves[k].append(v)
        tokens_seen += batches[step].numel()
        tok_s = tokens_seen / (time.time() - t0)
        print0(f"step {step + 1}/{total_steps} | lr {lr:.2e} | mean BLD loss {mean_loss:.4f} | {tok_s:.0f} tok/s")
        wandb_run.log({"step": step + 1, "lr": lr, "bld/mean_loss": mean_loss, "bld/tok_per_s": tok_s,
                       **{f"bld/{k}": v for k, v in losses.items()}})
        if args.save_every > 0 and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            try:
                check_finite_weights(modules, f"BLD step {step + 1}")
            except NonFiniteError as e:
                die(str(e))
            run_states.save(step + 1, modules, optimizer, curves=curves)  # keep=1: optimizer moments are large
bld_time = time.time() - t0
bld_tok_s = tokens_seen * 1.0 / bld_time if tokens_seen else 0.0

val_final = {}
for i in range(0, len(val_ids), args.batch_size):
    for k, v in bld_step(parent, val_ids[i:i + args.batch_size], jobs_at, modules, autocast, train=False).items():
        val_final[k] = val_final.get(k, 0.0) + v * len(val_ids[i:i + args.batch_size]) / len(val_ids)
try:
    check_finite_weights(modules, f"BLD step {total_steps}")
except NonFiniteError as e:
    die(str(e))
for key, m in modules.items():
    save_file({k: v.contiguous().cpu() for k, v in m.state_dict().items()}, variant_path(work, key))
local = {k: {"loss_curve": curves[k], "val_loss_init": val_init[k], "val_loss_bld": val_final[k]} for k in modules}
if ddp:
    torch.distributed.barrier()  # every rank's variants are on disk

# ----------------------------------------------------------------------------
# Replace-one-block scores of every (attention, FFN) pair on the scoring text (sharded over ranks like BLD)

t1 = time.time()
try:  # spread over documents: the first chunk of each scoring document, then the second, ...
    held = spread_chunks(tokenizer, score_docs, args.score_seq_len, args.score_seqs)
except ValueError:
    die(f"the scoring text makes fewer than --score-seqs {args.score_seqs} sequences of {args.score_seq_len} "
        f"tokens; lower them or give more --data")
held = held.to(device)
by_layer = {}
for e in entries:
    by_layer.setdefault((e["layer"], e["subblock"]), []).append(e)
pairs = [(l, a, f) for l in range(config.num_hidden_layers) for a in by_layer[(l, "attention")]
         for f in by_layer[(l, "ffn")] if not (a["parent"] and f["parent"])]
my_pairs = shard_list(pairs)
needed = {e["key"]: e for _, a, f in my_pairs for e in (a, f) if not e["parent"]}
states = {k: (None if e["config"]["no_op"] else load_file(variant_path(work, k))) for k, e in needed.items()}
scores = replace_one_block_scores(parent, held, my_pairs, states, args.batch_size, autocast)
score_time = time.time() - t1
if ddp:
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, (scores, local))
    scores, local = {}, {}
    for s, loc in gathered:
        scores.update(s)
        local.update(loc)
if rank == 0:
    base = scores.pop("__base__")
    names = {sub: [v["name"] for v in space[sub]] for sub in SUBBLOCKS}
    pa, pf = (next(v["name"] for v in space[sub] if v["parent"]) for sub in SUBBLOCKS)
    for l in range(config.num_hidden_layers):  # the parent's own block: the parent itself (score 0)
        scores[pair_key(l, pa, pf)] = {"kl": 0.0, **{k: base[k] for k in ("lm_loss", "next_token_acc")},
                                       "top1_agreement": 1.0}
    for v in scores.values():
        v["lm_loss_delta"] = v["lm_loss"] - base["lm_loss"]
    # a subblock variant's own score: its block with the parent's other subblock (the table below)
    variant_scores = {e["key"]: scores[pair_key(e["layer"], *((e["name"], pf) if e["subblock"] == "attention"
                                                             else (pa, e["name"])))] for e in entries}
    print0(f"replace-one-block scores: {len(pairs)} blocks ({len(names['attention'])} attention x "
           f"{len(names['ffn'])} FFN variants per layer) on {held.numel()} tokens from "
           f"{len(held)} sequences in {score_time:.0f}s")

# ----------------------------------------------------------------------------
# Save: library.json + scores.json, then rename into place; metrics

if rank == 0:
    lib_entries = []
    for e in entries:
        d = {k: v for k, v in e.items() if k != "config_obj"}
        d.update(local.get(e["key"], {}))
        lib_entries.append(d)
    n_forwards = 1  # decoupled BLD: one parent forward per batch feeds all variants
    bld_stats = {"steps": total_steps, "tokens": total_steps * args.batch_size * args.seq_len,
                 "tok_per_s": bld_tok_s, "seconds": bld_time, "parent_forwards_per_batch": n_forwards,
                 "world_size": world_size}
    library = {"parent": os.path.abspath(args.parent), "num_layers": config.num_hidden_layers,
               "hidden_size": config.hidden_size, "score_default": "kl",
               "space": {s: [{"name": v["name"], "config": config_to_dict(v["config"]), "parent": v["parent"]}
                             for v in space[s]] for s in SUBBLOCKS},
               "variants": lib_entries, "bld": bld_stats, "args": user_config}
    write_json_atomic(os.path.join(work, "scores.json"), {"parent": base, "pairs": scores,
                                                         "variants": variant_scores,
                                                         "held_out_tokens": held.numel()})
    write_json_atomic(os.path.join(work, "library.json"), library)
    os.replace(work, args.out)
    run_states.finish()
    trained = [e for e in lib_entries if "val_loss_bld" in e]
    improved = sum(e["val_loss_bld"] < e["val_loss_init"] for e in trained)
    by_variant = []  # mean replace-one-block score of each variant over the layers
    for sub in SUBBLOCKS:
        for v in space[sub]:
            es = [e for e in lib_entries if e["subblock"] == sub and e["name"] == v["name"]]
            kls = [variant_scores[e["key"]]["kl"] for e in es]
            by_variant.append({"variant": f"{sub}:{v['name']}", "layers": len(es), "mean_kl": sum(kls) / len(kls),
                               "max_kl": max(kls), "top1_agreement": sum(variant_scores[e["key"]]["top1_agreement"]
                                                                        for e in es) / len(es),
                               **({"val_loss_init": sum(e["val_loss_init"] for e in es) / len(es),
                                   "val_loss_bld": sum(e["val_loss_bld"] for e in es) / len(es)}
                                  if "val_loss_bld" in es[0] else {})})
    metrics = {"variants": len(entries), "trained_variants": len(trained), "bld_steps": total_steps,
               "bld_tokens": bld_stats["tokens"], "bld_tok_per_s": bld_tok_s, "parent_forwards_per_batch": 1,
               "val_loss_init_mean": sum(e["val_loss_init"] for e in trained) / max(1, len(trained)),
               "val_loss_bld_mean": sum(e["val_loss_bld"] for e in trained) / max(1, len(trained)),
               "variants_improved_by_bld": improved, "score_seconds": score_time,
               "parent_lm_loss": base["lm_loss"], "by_variant": by_variant}
    metrics["report"] = bld_tables(metrics, args.metrics_name)
    metrics_path = write_metrics(run_dir, args.metrics_name, metrics, out=args.out)
    wandb_run.log({f"summary/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    print0("\n" + "\n".join(metrics["report"]))
    print0(f"library: {args.out}; metrics: {metrics_path}")
wandb_run.finish()
compute_cleanup()

