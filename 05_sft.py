"""Stage 5: SFT with the reasoning toggle ("detailed thinking on/off" in the system prompt).

LN-Nano's staged curriculum (REFERENCE.md "SFT and the reasoning toggle"):
  stage 1  reasoning data only (math, science) -- prevents repetitive completions
  stage 2  non-reasoning responses mixed in   -- teaches the toggle
  stage 3  a small chat / instruction-following blend
Token-level cross entropy on assistant tokens only; examples packed into fixed-length rows with
positions and attention kept within each example; warmup + cosine per stage; bf16 autocast.

    python 05_sft.py --init runs/smol/parent --data data/smol --out runs/smol/sft_parent --max-steps 6,42,12 --lr 3e-4,2e-4,1e-4 --grad-accum 1 --eval-problems 32 --metrics-name sft_parent   # CPU, ~22 min
    torchrun --standalone --nproc_per_node 8 05_sft.py --init ... --seq-len 4096 --epochs 1,1,1 --batch-size 8
    python 05_sft.py --init runs/smol/parent --data data/smol --out /tmp/sft --max-steps 2,2,2 --eval-problems 8
    python 05_sft.py ... --resume       # continue a cut-off run from <out>.state/ (the last 3 states are kept)

A non-finite loss or gradient stops the run before the optimizer step, so no saved state holds NaN weights.
"""

import argparse
import json
import os
import random
import time

import torch

from common.checkpoint import CheckpointError, check_metrics_free, load_checkpoint, load_meta, save_checkpoint
from common.checkpoint import write_metrics
from common.cli import (add_dtype_arg, add_save_every_arg, die, float_list, fraction, int_list, nonneg_float, nonneg_int,
                        off_or, positive_float, positive_int, prob)
from common.data import IGNORE, collate, first_answer_token_weights, pack_examples, tokenize_sft_example
from common.dist import (autocast_ctx, compute_cleanup, compute_init, print0, progress, resolve_dtype, shard_list,
                         wrap_ddp)
from common.evaluate import math_both_modes, toggle_eval
from common.gen_cache import GenCacheError, add_gen_cache_args, open_gen_cache
from common.optim import NonFiniteError, check_finite_update, check_finite_weights, lr_at, make_adamw, set_lr
from common.resume import RunStates
from common.tables import sft_tables
from common.tracking import add_wandb_args, init_wandb
from data_gen.math_problems import eval_problems
from data_gen.records import load_records

# ----------------------------------------------------------------------------
# Arguments

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--init", required=True, help="checkpoint to fine-tune (the distilled child, or the parent)")
p.add_argument("--data", required=True, help="directory with train.jsonl / validation.jsonl from data_gen.build")
p.add_argument("--out", required=True, help="output checkpoint directory, e.g. runs/smol/sft")
# curriculum: one value per stage (reasoning-only, +non-reasoning, +chat/IF)
p.add_argument("--epochs", type=int_list(1, n=3), default="1,1,1", help="epochs per stage")
p.add_argument("--max-steps", type=int_list(-1, n=3), default="-1,-1,-1",
               help="cap on optimizer steps per stage (-1 = no cap, 0 = skip the stage)")
p.add_argument("--lr", type=float_list(0, n=3, inclusive=False), default="1e-4,5e-5,2e-5",
               help="peak learning rate per stage (LN-Nano stage 1: 1e-4)")
p.add_argument("--chat-fraction", type=fraction, default=0.25, help="stage 3: chat/IF share of the blend")
# optimization
p.add_argument("--seq-len", type=positive_int, default=512, help="packed row length")
p.add_argument("--batch-size", type=positive_int, default=4, help="packed rows per micro-batch per rank")
p.add_argument("--grad-accum", type=positive_int, default=2)
p.add_argument("--warmup-frac", type=prob, default=0.1, help="LN-Ultra: 10%% warmup then cosine")
p.add_argument("--min-lr-frac", type=prob, default=0.1)
p.add_argument("--weight-decay", type=nonneg_float, default=0.0)
p.add_argument("--grad-clip", type=positive_float, default=1.0)
p.add_argument("--max-train-examples", type=off_or(positive_int), default=-1, help="cap on training records (-1 = all)")
p.add_argument("--seed", type=nonneg_int, default=0)
add_dtype_arg(p, "autocast compute dtype")
add_save_every_arg(p, 50)
p.add_argument("--resume", action="store_true", help="continue from the last state in <out>.state/ (the same "
               "arguments; --epochs, --max-steps, --lr and --save-every may change)")
# evaluation
p.add_argument("--eval-problems", type=nonneg_int, default=64, help="held-out problems per mode (0 = skip)")
p.add_argument("--eval-max-new-tokens", type=positive_int, default=320, help="room for the longest worked solutions")
p.add_argument("--toggle-weight", type=positive_float, default=20.0,
               help="loss weight of each answer's first token, where the toggle decides whether a think block opens "
                    "(1 = plain token-level cross entropy, as in the paper; 20 made the toggle hold on every run here)")
p.add_argument("--toggle-problems", type=nonneg_int, default=100,
               help="held-out problems for the toggle check after SFT: think-block rate on / off (0 = skip)")
p.add_argument("--run-dir", default=None, help="where metrics/sft.json goes (default: the parent of --out)")
p.add_argument("--metrics-name", default="sft", help="metrics/<name>.json, e.g. sft_parent for SFT from the parent")
add_gen_cache_args(p)
add_wandb_args(p)
args = p.parse_args()
user_config = vars(args).copy()
epochs, max_steps, lrs = args.epochs, args.max_steps, args.lr  # one value per curriculum stage
run_dir = args.run_dir or os.path.dirname(os.path.abspath(args.out))
# ----------------------------------------------------------------------------
# Validation: everything read from disk checked before any work (--out free, <out>.state/ holds only this run's
# states, metrics/<name>.json is ours)

try:
    states = RunStates(args.out, user_config, resume=args.resume,
                       budget_keys=("epochs", "max_steps", "save_every", "no_gen_cache"))
    check_metrics_free(run_dir, args.metrics_name, args.out)
    init_meta = load_meta(args.init)
    gen_cache = open_gen_cache(run_dir, args)
except (CheckpointError, GenCacheError) as e:
    die(e)

# ----------------------------------------------------------------------------
# Init

ddp, rank, local_rank, world_size, device = compute_init(args.seed)
dtype = resolve_dtype(args.dtype, device)
wandb_run = init_wandb(args.wandb_project, args.run_name or "sft", user_config, mode=args.wandb_mode)
model, tokenizer = load_checkpoint(args.init, dtype=torch.float32, device=device)  # fp32 master weights
parent_path = init_meta.get("parent") if init_meta.get("stage") != "parent" else args.init
print0(f"init {args.init} (stage {init_meta.get('stage')}); {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")

# ----------------------------------------------------------------------------
# Data: the three curriculum stages as lists of tokenized examples

try:
    train = load_records(args.data, "train")
except (FileNotFoundError, ValueError) as e:
    die(e)
records = [dict(r) for r in train]
if args.max_train_examples > 0:
    records = random.Random(args.seed).sample(records, min(len(records), args.max_train_examples))
reasoning_on = [r for r in records if r["reasoning"] == "on" and r["category"] != "chat"]
reasoning_off = [r for r in records if r["reasoning"] == "off" and r["category"] != "chat"]
chat = [r for r in records if r["category"] == "chat"]
rng = random.Random(args.seed)
# stage 3 replays on/off records beside the chat set so chat makes up --chat-fraction of the blend
replay = int(len(chat) * (1 - args.chat_fraction) / max(args.chat_fraction, 1e-6) / 2)
stage_records = [
    reasoning_on,                                   # 1: reasoning only
    reasoning_on + reasoning_off,                   # 2: the toggle
    rng.sample(reasoning_on, min(replay, len(reasoning_on))) + rng.sample(reasoning_off, min(replay, len(reasoning_off))) + chat,
]
if not reasoning_on or not reasoning_off:
    die(f"{args.data} needs reasoning on and off records (found {len(reasoning_on)} on, "
             f"{len(reasoning_off)} off); build it with python -m data_gen.build --out {args.data}")


def packed_rows(recs, epoch_seed):
    """Tokenize, shuffle (same order on every rank and on resume), pack, and keep this rank's rows. The on and
    off versions of a problem stay adjacent, so they share a row: one batch shows the same prompt answered both
    ways, and the system prompt is the only thing that tells them apart."""
    groups = {}
    for r in recs:
        ex = tokenize_sft_example(tokenizer, r, args.seq_len)
        if all(label == IGNORE for label in ex["labels"]):  # the response starts past --seq-len: nothing to learn
            cut_off.add((r["id"], r["reasoning"]))
            continue
        groups.setdefault(r["id"], []).append(ex)
    order = list(groups.values())
    random.Random(epoch_seed).shuffle(order)
    return shard_list(pack_examples([e for g in order for e in g], args.seq_len), rank, world_size)


# rows and steps of every stage up front (same order on resume): a budget that gives no step stops here
cut_off = set()
try:
    stage_rows = [[row for e in range(epochs[s])
                   for row in packed_rows(stage_records[s], epoch_seed=args.seed * 1000 + s * 100 + e)]
                  for s in range(3)]
except ValueError as e:
    die(e)
if cut_off:
    print0(f"skipped {len(cut_off)} examples whose response starts after --seq-len {args.seq_len} tokens")
per_step = args.batch_size * args.grad_accum
stage_steps = [min(len(rows) // per_step, max_steps[s]) if max_steps[s] >= 0 else len(rows) // per_step
               for s, rows in enumerate(stage_rows)]
short = [s + 1 for s in range(3) if max_steps[s] != 0 and stage_steps[s] == 0]
if not any(max_steps):  # zero steps would save an untrained "SFT" checkpoint
    die("--max-steps 0,0,0 skips every SFT stage, so nothing would be trained; give a stage some steps")
if short:
    die(f"SFT stage(s) {short} get no optimizer step ({[len(r) for r in stage_rows]} packed rows per "
             f"stage, {per_step} per step = --batch-size x --grad-accum); lower those, raise --epochs, or skip a "
             f"stage with 0 in its place in --max-steps")


# ----------------------------------------------------------------------------
# Evaluation before training, both modes (the parent's numbers come from the same problems). Answers a model of the
# same weights already gave (the parent's, from SFT of another line) come from the run's generation cache

problems = eval_problems(args.eval_problems, seed=1234) if args.eval_problems > 0 else []


def eval_both_modes(m, who):
    return math_both_modes(m, tokenizer, problems, args.eval_max_new_tokens, args.eval_max_new_tokens, dtype=dtype,
                           cache=gen_cache, who=who)


before = eval_both_modes(model, "before SFT") if rank == 0 and not args.resume else {}

# ----------------------------------------------------------------------------
# Training loop over the curriculum



raw_model = model
model = wrap_ddp(model, device) if ddp else model
optimizer = make_adamw(raw_model.named_parameters(), lrs[0], betas=(0.9, 0.95), weight_decay=args.weight_decay)
start = {"stage": 0, "step": 0, "global_step": 0}
history, tokens_seen, seconds_before = [], 0, 0.0
if args.resume:  # weights, moments, RNG, and the bookkeeping: loss history, tokens, wall time, the eval before
    st = states.load(raw_model, optimizer)
    start = {"stage": int(st["stage"]), "step": int(st["stage_step"]), "global_step": int(st["step"])}
    history, tokens_seen = json.loads(st["history_json"]), int(st["tokens_seen"])
    seconds_before, before = float(st["train_seconds"]), json.loads(st["before_eval_json"])
    print0(f"resumed from {states.latest()}: stage {start['stage'] + 1}, step {start['step']}")

t0 = time.time() - seconds_before
model.train()
for s in range(start["stage"], 3):
    rows, steps = stage_rows[s], stage_steps[s]
    warmup = int(args.warmup_frac * steps)
    first = start["step"] if s == start["stage"] else 0
    print0(f"SFT stage {s + 1}: {len(stage_records[s])} records -> {len(rows)} packed rows/rank, {steps} steps, lr {lrs[s]}")
    with progress(range(first, steps), initial=first, total=steps, desc=f"SFT stage {s + 1}", unit="step") as bar:
        for step in bar:
            lr = lr_at(step, steps, lrs[s], warmup, lrs[s] * args.min_lr_frac)
            set_lr(optimizer, lr)
            loss_sum = 0.0
            for micro in range(args.grad_accum):
                i = (step * args.grad_accum + micro) * args.batch_size
                batch = collate(rows[i:i + args.batch_size])
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast_ctx(device, dtype):
                    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False,
                                return_logits=False,
                                loss_weights=first_answer_token_weights(batch["labels"], args.toggle_weight))
                (out.loss / args.grad_accum).backward()
                loss_sum += out.loss.item() / args.grad_accum
                tokens_seen += int((batch["seq_ids"] >= 0).sum())
            gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip).item()
            try:  # a NaN loss, or a NaN/inf gradient under a finite loss, never reaches the weights
                check_finite_update(raw_model, loss_sum, gnorm, f"SFT stage {s + 1} step {step + 1} "
                                    f"(last good state: {states.latest() or 'none'})")
            except NonFiniteError as e:
                die(e)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            start["global_step"] += 1
            history.append({"stage": s + 1, "step": step, "loss": loss_sum, "grad_norm": gnorm})
            wandb_run.log({"sft/loss": loss_sum, "sft/lr": lr, "sft/grad_norm": gnorm, "sft/stage": s + 1,
                           "sft/tok_per_s": tokens_seen / (time.time() - t0)}, step=start["global_step"])
            if step % 10 == 0 or step == steps - 1:
                print0(f"stage {s + 1} step {step + 1}/{steps} loss {loss_sum:.4f} lr {lr:.2e} "
                       f"{tokens_seen / (time.time() - t0):.0f} tok/s")
            if rank == 0 and args.save_every > 0 and (step + 1) % args.save_every == 0 and step + 1 < steps:
                try:
                    check_finite_weights(raw_model, f"SFT stage {s + 1} step {step + 1}")
                except NonFiniteError as e:
                    die(e)
                states.save(start["global_step"], raw_model, optimizer, stage=s, stage_step=step + 1,
                            tokens_seen=tokens_seen, train_seconds=time.time() - t0, history_json=json.dumps(history),
                            before_eval_json=json.dumps(before))

# ----------------------------------------------------------------------------
# Evaluate after, save, report

try:
    check_finite_weights(raw_model, "SFT")
except NonFiniteError as e:
    die(e)
after = eval_both_modes(raw_model, "after SFT") if rank == 0 else {}
toggle = {}  # the toggle where it decides (first tokens), on more problems than the full-answer evaluation
if rank == 0 and args.toggle_problems:
    raw_model.eval()
    with autocast_ctx(device, dtype):
        toggle = toggle_eval(raw_model, tokenizer, eval_problems(args.toggle_problems, seed=4321), cache=gen_cache,
                             desc="after SFT: toggle")
parent_res = {}  # the table's reference row: the parent on the same problems (when SFT did not start from it)
if rank == 0 and problems and parent_path and os.path.abspath(parent_path) != os.path.abspath(args.init):
    parent_res = eval_both_modes(load_checkpoint(parent_path, dtype=torch.float32, device=device,
                                                 with_tokenizer=False)[0], "parent")
if rank == 0:
    metrics = {"init": args.init, "train_tokens": tokens_seen * world_size, "wall_s": round(time.time() - t0, 1),
               "final_loss": history[-1]["loss"] if history else None, "eval_problems": len(problems)}
    for when, res in (("parent", parent_res), ("before", before), ("after", after)):
        for mode, r in res.items():
            for k in ("accuracy", "accuracy_multistep", "format_compliance", "mean_response_tokens"):
                metrics[f"{when}_{mode}_{k}"] = r.get(k)
    metrics["toggle"] = toggle
    for mode, r in after.items():
        table = wandb_run.Table(columns=["mode", "prompt", "response", "correct"]) if hasattr(wandb_run, "Table") else None
        if table is not None:
            for sample in r["samples"]:
                table.add_data(mode, sample["prompt"], sample["response"], sample["correct"])
            wandb_run.log({f"sft/samples_{mode}": table})
    save_checkpoint(raw_model, tokenizer, args.out, stage="sft", args=user_config,
                    meta={"parent": parent_path, "init": args.init, "metrics": metrics, "history": history})
    metrics["report"] = sft_tables(metrics, args.metrics_name)
    metrics_path = write_metrics(run_dir, args.metrics_name, metrics, out=args.out)
    states.finish()
    print0("\n" + "\n".join(metrics["report"]))
    print0(f"checkpoint: {args.out}; metrics: {metrics_path}")
wandb_run.finish()
compute_cleanup()
