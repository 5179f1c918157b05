"""Stage 4: global knowledge distillation (Puzzle's "uptraining") of a child from its parent.

The student is any checkpoint of ours (02's child, 03's fused child); the teacher is its parent, found by
following the student's meta.json "parent" (or --teacher). Losses, selectable and combinable (--loss,
"name" or "name:weight", comma-separated): fkl (forward KL on logits, temperature --temperature), rkl
(reverse KL), cosine (1 - cos on hidden states), lm (next-token cross entropy). Default cosine,fkl: the best
in Puzzle's ablation (adding lm to KD hurt there). An optional continued-pretraining phase with the LM loss
follows KD (--cpt-tokens), as LN-Ultra did (65B tokens KD, then 88B CPT).

What cosine matches (--cosine-on): "layers" = the output of every student layer against the teacher layer
whose output it reproduces (the identity for a child with the parent's layer count; the layer_map in
meta.json for a fused child, where a fused layer stands for the last layer of its group); "final" = only the
last layer's output (the residual stream before the final norm). "auto" = layers when the map is known.

Packed sequences of the distillation mix (common.text_corpus, kept apart from the evaluation suite's held-out
text) or any text data set `datasets` can load (--data a .jsonl/.json/.txt/.parquet/.csv file or directory,
--text-column). DDP under torchrun (FSDP2 with --fsdp), gradient accumulation, warmup + cosine, bf16
autocast where supported, gradient clipping. A non-finite or exploding loss stops the run with a message and
leaves the last good state in <out>.state/ (so does a finite loss whose gradient is not: NaN/inf never reaches
the weights); --resume continues with the same schedule and data order (the same arguments, except the budget
flags and --lr); --reset-optimizer resumes with fresh AdamW moments (what LN-Ultra needed after its gradient
explosions). The last 3 states are kept; they are deleted once the checkpoint is saved.

    python 04_distill.py --student runs/smol/child --out runs/smol/distilled        # CPU: 96k tokens, ~10 min
    torchrun --standalone --nproc_per_node 8 04_distill.py --student runs/big/child --out runs/big/distilled \\
        --tokens 200000000 --seq-len 4096 --batch-size 4 --grad-accum 4              # 8 GPUs
    python 04_distill.py --student /tmp/child --out /tmp/kd --tokens 2048 --seq-len 64 --eval-tokens 256 \\
        --wandb-mode disabled                                                          # tiny smoke run
    python 04_distill.py --student runs/smol/child --out runs/smol/kd_ablation --tokens 16384 \\
        --loss-ablation "lm;fkl;cosine;cosine,fkl;cosine,fkl,lm"                      # Puzzle's loss table

Quantization (--quant fp8|nvfp4): the model becomes its own student. Its attention and FFN projections compute
with fake-quantized weights and activations (common.quant; NVFP4's activation scales calibrated on the training
rows), and the full-precision model is the teacher (or --teacher). --quant-methods, each from the same quantized
start and, when trained, at the same token budget: ptq (quantize once, no training), qat (cross entropy on the
data), qad (KL(teacher || student) only, temperature 1: "Quantization-Aware Distillation for NVFP4 Inference
Accuracy Recovery"), qad_self (QAD on the teacher's own sampled answers to the data's prompts, the paper's
self-generated data). Data: --data a data_gen.build directory (its train.jsonl conversations rendered with the
chat template, all tokens trained), or the text sources above. Every row is evaluated against the teacher: text KL
and next-token accuracy, math thinking on / off (--eval-problems held-out problems), think-format compliance,
instruction following (--eval-if), each gap paired against the full-precision model. <out> holds the first trained
method's model (qad by default), weights rounded to the format, the format in meta.json "quant" (load_checkpoint
restores the fake-quantized model; common.export writes the serving engine's layout).

    python 04_distill.py --student runs/smol/rpo --out runs/smol/qad_nvfp4 --quant nvfp4 --data data/smol \
        --quant-methods ptq,qat,qad,qad_self --tokens 16384 --metrics-name qad_nvfp4   # the QAD table

Outputs: <out>/ (checkpoint), <run-dir>/metrics/<--metrics-name>.json (default distill.json).
"""

import argparse
import copy
import json
import os
import random
import time

import torch

from common.checkpoint import (CheckpointError, check_metrics_free, check_out_free, load_checkpoint, load_meta,
                               read_json, read_run_metrics, save_checkpoint, write_metrics)
from common.cli import (add_dtype_arg, add_save_every_arg, die, nonneg_float, nonneg_int, off_or, positive_float,
                        positive_int, prob)
from common.data import build_messages, chat_documents, load_text_documents, render_prompt, sft_records, text_chunks
from common.dist import (all_reduce_mean, autocast_ctx, compute_init, print0, progress, resolve_dtype, wrap_ddp,
                         wrap_fsdp)
from common.evaluate import TextEval, generation_eval, math_both_modes, speed_eval
from common.generate import generate
from common.losses import KD_LOSSES, kd_loss
from common.optim import NonFiniteError, check_finite_update, check_finite_weights, lr_at, make_adamw, set_lr
from common.quant import (FORMATS, QuantLinear, calibrate_act_amax, dequantize_model_, fake_quant_weight,
                          quantize_model_)
from common.resume import RunStates
from common.stats import mean_se, paired_diff, paired_gaps, ratio_se
from common.tables import distill_tables, fusion_after_kd, kd_ablation_tables, quant_tables
from common.text_corpus import distill_documents
from common.tracking import add_wandb_args, init_wandb
from data_gen.instructions import generate_instructions
from data_gen.math_problems import eval_problems

QUANT_METHODS = {"ptq": None, "qat": {"lm": 1.0}, "qad": {"fkl": 1.0}, "qad_self": {"fkl": 1.0}}  # method -> loss

# ----------------------------------------------------------------------------
# Arguments

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--student", required=True, help="checkpoint to train (the child, the fused child, ...)")
p.add_argument("--teacher", default=None, help="default: follow the student's meta.json 'parent'")
p.add_argument("--out", required=True, help="output checkpoint directory, e.g. runs/smol/distilled")
p.add_argument("--run-dir", default=None, help="where metrics/ goes (default: parent dir of --out)")
p.add_argument("--metrics-name", default="distill", help="metrics/<this>.json")
# losses
p.add_argument("--loss", default="cosine,fkl", help=f"comma-separated name[:weight], names {KD_LOSSES}")
p.add_argument("--temperature", type=positive_float, default=1.0, help="KL temperature (fkl, rkl)")
p.add_argument("--cosine-on", default="auto", choices=["auto", "layers", "final"], help="matched hidden states")
p.add_argument("--loss-ablation", default="", help="';'-separated --loss specs trained from the same init; "
               "writes a table, no checkpoint (e.g. 'lm;fkl;cosine;cosine,fkl;cosine,fkl,lm')")
# quantization (QAD and its baselines)
p.add_argument("--quant", default=None, choices=FORMATS, help="QAD mode: train the model into its own "
               "fake-quantized copy (the teacher: the model itself, or --teacher)")
p.add_argument("--quant-methods", default="ptq,qat,qad", help=f"comma-separated, from {tuple(QUANT_METHODS)}")
p.add_argument("--quant-acts", action=argparse.BooleanOptionalAction, default=True,
               help="quantize the projections' input activations too (W8A8 / W4A4)")
p.add_argument("--self-temperature", type=positive_float, default=1.0, help="qad_self: the teacher's sampling")
p.add_argument("--eval-problems", type=nonneg_int, default=100, help="--quant: held-out math problems per mode")
p.add_argument("--eval-if", type=nonneg_int, default=100, help="--quant: held-out instruction prompts")
p.add_argument("--max-new-tokens-on", type=positive_int, default=320, help="--quant: math answer budget, thinking on")
p.add_argument("--max-new-tokens-off", type=positive_int, default=80, help="--quant: answer budget, thinking off")
# data
p.add_argument("--data", default="mix", help="'mix' (common.text_corpus distillation mix), a data_gen.build directory "
               "(its train.jsonl conversations) or a local data set path")
p.add_argument("--text-column", default="text")
p.add_argument("--seq-len", type=positive_int, default=256, help="packed row length")
# optimization
p.add_argument("--tokens", type=positive_int, default=98304, help="KD token budget (CPU: 96k tokens ~ 10 min)")
p.add_argument("--max-steps", type=off_or(positive_int), default=-1,
               help="cap on KD optimizer steps (-1 = from --tokens)")
p.add_argument("--cpt-tokens", type=nonneg_int, default=0,
               help="continued pretraining (LM loss) after KD (0 = off)")
p.add_argument("--batch-size", type=positive_int, default=4, help="rows per micro-batch per rank")
p.add_argument("--grad-accum", type=positive_int, default=2, help="micro-batches per optimizer step per rank")
p.add_argument("--lr", type=positive_float, default=2e-4)
p.add_argument("--cpt-lr", type=positive_float, default=5e-5)
p.add_argument("--warmup-frac", type=prob, default=0.1)
p.add_argument("--min-lr-frac", type=prob, default=0.1)
p.add_argument("--weight-decay", type=nonneg_float, default=0.1)
p.add_argument("--grad-clip", type=positive_float, default=1.0)
p.add_argument("--explode-factor", type=off_or(positive_float), default=10.0,
               help="stop when loss > this x recent mean (-1 = off)")
add_dtype_arg(p, "autocast compute dtype")
p.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP (resume then resets the optimizer)")
p.add_argument("--seed", type=nonneg_int, default=0)
p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads per process")
# resume
add_save_every_arg(p, 20)
p.add_argument("--resume", action="store_true", help="continue from the last state in <out>.state/ (the same "
               "arguments; the budgets, --lr, --cpt-lr, --save-every and --reset-optimizer may change)")
p.add_argument("--reset-optimizer", action="store_true", help="with --resume: fresh optimizer moments")
p.add_argument("--debug-nan-step", type=off_or(nonneg_int), default=-1,
               help="testing: make the loss NaN at this step (-1 = off)")
# evaluation
p.add_argument("--eval-tokens", type=nonneg_int, default=4096, help="held-out tokens at start and end (0 = skip)")
p.add_argument("--speed-new-tokens", type=nonneg_int, default=0,
               help="decode steps for a speed check vs teacher (0 = skip)")
add_wandb_args(p)
args = p.parse_args()
user_config = vars(args).copy()

# ----------------------------------------------------------------------------
# Validation: every flag combination and input checked before anything is loaded or written


def parse_losses(spec: str) -> dict:
    out = {}
    for part in filter(None, (s.strip() for s in spec.split(","))):
        name, _, w = part.partition(":")
        if name not in KD_LOSSES:
            raise ValueError(f"unknown loss {name!r} in --loss {spec!r}; choose from {KD_LOSSES}")
        out[name] = float(w) if w else 1.0
    if not out:
        raise ValueError(f"--loss {spec!r} names no loss; e.g. --loss cosine,fkl")
    return out


def parse_quant_methods(spec: str) -> list[str]:
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in methods if m not in QUANT_METHODS]
    if bad or not methods or len(set(methods)) != len(methods):
        raise ValueError(f"--quant-methods {spec!r}: give distinct names from {tuple(QUANT_METHODS)}")
    return methods


def resolve_teacher(student: str, given: str | None) -> str:
    """Follow meta.json 'parent' links until a checkpoint of stage 'parent' (or one with no further parent)."""
    if given:
        load_meta(given)
        return given
    path, seen = student, set()
    while True:
        meta = load_meta(path)
        nxt = meta.get("parent")
        if meta.get("stage") == "parent" and path != student:
            return path
        if not nxt or not os.path.isdir(nxt) or nxt in seen:
            if path == student:
                raise CheckpointError(f"{student}/meta.json names no parent checkpoint ({nxt!r}); pass --teacher PATH")
            return path
        seen.add(path)
        path = nxt


run_dir = args.run_dir or os.path.dirname(os.path.abspath(args.out))
ablation = [s.strip() for s in args.loss_ablation.split(";") if s.strip()]
try:
    specs = [parse_losses(s) for s in (ablation or [args.loss])]
    methods = parse_quant_methods(args.quant_methods) if args.quant else []
except ValueError as e:
    die(str(e))
if args.reset_optimizer and not args.resume:
    die("--reset-optimizer only applies with --resume")
if (ablation or args.quant) and (args.resume or args.cpt_tokens):
    die(f"{'--quant' if args.quant else '--loss-ablation'} runs short trials from one init; drop --resume / "
        f"--cpt-tokens")
if ablation and args.quant:
    die("--loss-ablation and --quant are two tables; run them as two commands")
if "qad_self" in methods and not os.path.isfile(os.path.join(args.data, "train.jsonl")):
    die(f"qad_self samples the teacher on the prompts of --data, but {args.data} has no train.jsonl; give a "
        f"data_gen.build directory")
world_size = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's ranks, as compute_init reads them below
per_step = args.batch_size * args.grad_accum * world_size
for flag, tokens in (("--tokens", args.tokens), ("--cpt-tokens", args.cpt_tokens or per_step * args.seq_len)):
    if tokens < per_step * args.seq_len:  # a run of zero steps would save an untrained "distilled" checkpoint
        die(f"{flag} {tokens} is less than one optimizer step ({per_step * args.seq_len} tokens = batch-size x "
            f"grad-accum x ranks x seq-len); raise {flag} or lower those")
states = None  # the ablation and the quantization table keep no resume states (short trials from one init)
try:
    if args.quant:
        check_out_free(args.out)
    elif not ablation:  # --out free, and <out>.state/ holds only this run's states (budget flags may grow)
        states = RunStates(args.out, user_config, resume=args.resume, keep=3, budget_keys=(
            "tokens", "max_steps", "cpt_tokens", "cpt_lr", "save_every", "reset_optimizer", "debug_nan_step",
            "explode_factor", "speed_new_tokens"))
    check_metrics_free(run_dir, args.metrics_name, args.out)
    # QAD's teacher is the model itself at full precision
    teacher_path = (args.teacher or args.student) if args.quant else resolve_teacher(args.student, args.teacher)
    student_meta = load_meta(args.student)
    load_meta(teacher_path)
    n_s, n_t = (read_json(os.path.join(ckpt, "config.json"))["num_hidden_layers"]
                for ckpt in (args.student, teacher_path))
except (ValueError, CheckpointError) as e:
    die(str(e))
# matched hidden states for the cosine loss: student layer k reproduces teacher layer layer_map[k]
layer_map = student_meta.get("layer_map") or (list(range(n_s)) if n_s == n_t else None)
cosine_on = args.cosine_on if args.cosine_on != "auto" else ("layers" if layer_map else "final")
if cosine_on == "layers" and not layer_map:
    die(f"--cosine-on layers needs a layer map (student {n_s} layers, teacher {n_t}); use final")

# ----------------------------------------------------------------------------
# Init and models

torch.set_num_threads(args.threads)
ddp, rank, local_rank, world_size, device = compute_init()
torch.manual_seed(args.seed)
wandb_run = init_wandb(args.wandb_project, args.run_name or args.metrics_name, user_config,
                       mode=args.wandb_mode, master=rank == 0)
cdtype = resolve_dtype(args.dtype, device)
student, tokenizer = load_checkpoint(args.student, dtype=torch.float32, device=device)  # fp32 master weights
teacher, _ = load_checkpoint(teacher_path, dtype=cdtype, device=device, with_tokenizer=False)
teacher.requires_grad_(False)
autocast = lambda: autocast_ctx(device, cdtype)  # noqa: E731
layer_pairs = [(k + 1, j + 1) for k, j in enumerate(layer_map)] if cosine_on == "layers" else [(-1, -1)]
print0(f"student {args.student} ({n_s} layers), teacher {teacher_path} ({n_t} layers); cosine on {cosine_on}")

# ----------------------------------------------------------------------------
# Data: packed rows, one global order


def load_documents(data: str, text_column: str, tokenizer) -> list[str]:
    if data == "mix":
        return distill_documents("train")
    if os.path.isfile(os.path.join(data, "train.jsonl")) and os.path.isfile(os.path.join(data, "data_card.json")):
        return chat_documents(tokenizer, sft_records(data))
    return load_text_documents(data, text_column)


try:
    rows = torch.as_tensor(text_chunks(tokenizer, load_documents(args.data, args.text_column, tokenizer), args.seq_len))
except ValueError as e:
    die(str(e))
if len(rows) == 0:
    die(f"--data {args.data} gives no packed row of {args.seq_len} tokens; lower --seq-len")
kd_steps = args.tokens // (per_step * args.seq_len)
kd_steps = min(kd_steps, args.max_steps) if args.max_steps > 0 else kd_steps
cpt_steps = args.cpt_tokens // (per_step * args.seq_len) if args.cpt_tokens > 0 else 0
phases = [("kd", kd_steps, args.lr)] + ([("cpt", cpt_steps, args.cpt_lr)] if cpt_steps else [])
print0(f"{len(rows)} packed rows of {args.seq_len}; {per_step * args.seq_len} tokens/step; "
       + ", ".join(f"{n} {s} steps" for n, s, _ in phases))


def micro_batch(global_step: int, micro: int) -> torch.Tensor:
    """Rows of this rank's micro-batch: a fixed function of the step, so resume and world size keep the order."""
    g = (global_step * args.grad_accum + micro) * world_size + rank  # global micro-batch index
    idx = []
    for k in range(g * args.batch_size, (g + 1) * args.batch_size):
        epoch, j = divmod(k, len(rows))
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        idx.append(perm[j].item())
    return rows[idx].to(device)


# ----------------------------------------------------------------------------
# Evaluation against the teacher (rank 0)

text_eval = None
if rank == 0 and args.eval_tokens > 0:
    text_eval = TextEval(teacher, tokenizer, max_tokens=args.eval_tokens, seq_len=args.seq_len)


def evaluate(model):
    if text_eval is None:
        return {}
    with autocast():
        return text_eval(model)  # eval mode inside, training mode restored


parent_eval = (getattr(text_eval, "parent_metrics", None) or evaluate(teacher)) if text_eval else {}

# ----------------------------------------------------------------------------
# Training: KD, then CPT with the LM loss alone

cpt = {"lm": 1.0}
before = {}  # the start-of-run evaluation, kept in every resume state


def train(model0, losses, resume_from=None, trial=""):
    """KD (then CPT) phases; returns the history. Exits non-zero on a NaN / exploding loss. trial: the bar's
    label for an ablation trial."""
    model = model0
    model.train()
    if args.fsdp:
        model = wrap_fsdp(model0, device)
    elif ddp:
        model = wrap_ddp(model0, device)
    optimizer = make_adamw(model.named_parameters(), args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    start, history = 0, []
    if resume_from:
        st = states.load(None, optimizer if not (args.reset_optimizer or args.fsdp) else None)
        start, history = int(st["step"]), json.loads(st["history_json"])
        print0(f"resumed from {resume_from} at step {start}" + (" with a fresh optimizer" if args.reset_optimizer else ""))
    total = sum(s for _, s, _ in phases)
    t0, tokens = time.time(), 0
    with progress(range(start, total), initial=start, total=total, unit="step") as bar:
        for step in bar:
            phase, offset = phases[0], 0
            for ph in phases:  # which phase this global step is in
                if step < offset + ph[1]:
                    phase = ph
                    break
                offset += ph[1]
            name, steps, peak = phase
            if step in (start, offset):  # this run's first step or a phase's: name it on the bar
                bar.set_description(name + trial)
            lr = lr_at(step - offset, steps, peak, int(args.warmup_frac * steps), peak * args.min_lr_frac)
            set_lr(optimizer, lr)
            obj = losses if name == "kd" else cpt
            loss_sum, parts_sum = torch.zeros((), device=device), {}
            for micro in range(args.grad_accum):
                ids = micro_batch(step, micro)
                need_hidden = "cosine" in obj
                with torch.no_grad(), autocast():
                    t_out = (teacher(ids, use_cache=False, output_hidden_states=need_hidden)
                             if set(obj) != {"lm"} else None)
                with autocast():
                    s_out = model(ids, use_cache=False, output_hidden_states=need_hidden)
                loss, parts = kd_loss(s_out, t_out, obj, ids, args.temperature, layer_pairs)
                if step == args.debug_nan_step:
                    loss = loss * float("nan")
                (loss / args.grad_accum).backward()
                loss_sum += loss.detach() / args.grad_accum
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v / args.grad_accum
                tokens += ids.numel() * world_size
            loss_val = all_reduce_mean(loss_sum).item() if world_size > 1 else loss_sum.item()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            gnorm = gnorm.full_tensor().item() if hasattr(gnorm, "full_tensor") else gnorm.item()
            last = (states.latest() if states else None) or "none (set --save-every)"
            try:  # a NaN loss, or a NaN/inf gradient under a finite loss, never reaches the weights
                check_finite_update(model, loss_val, gnorm, f"{name} step {step} (last good state: {last})")
            except NonFiniteError as e:
                die(str(e))
            recent = [h["loss"] for h in history[-10:] if h["phase"] == name]
            recent_mean = sum(recent) / max(1, len(recent))
            if args.explode_factor > 0 and len(recent) >= 3 and loss_val > args.explode_factor * recent_mean:
                die(f"{name} loss {loss_val:.4g} at step {step} is exploding (> {args.explode_factor}x recent mean); "
                    f"stopped without saving. Last good state: {last}; rerun with --resume --reset-optimizer and a "
                    f"lower --lr")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append({"step": step, "phase": name, "loss": loss_val, "lr": lr, "grad_norm": gnorm,
                            **parts_sum})
            tps = tokens / (time.time() - t0)
            wandb_run.log({f"{name}/loss": loss_val, f"{name}/lr": lr, f"{name}/grad_norm": gnorm,
                           f"{name}/tok_per_s": tps, **{f"{name}/{k}": v for k, v in parts_sum.items()}}, step=step)
            if step % 5 == 0 or step == total - 1:
                print0(f"{name} step {step + 1}/{total} loss {loss_val:.4f} "
                       + " ".join(f"{k} {v:.4f}" for k, v in parts_sum.items()) + f" lr {lr:.2e} {tps:.0f} tok/s")
            if args.save_every > 0 and (step + 1) % args.save_every == 0 and step + 1 < total and states is not None:
                save_state(model, optimizer, step + 1, history)
    return history, model


def full_state(model):
    if args.fsdp:  # gather the shards on every rank
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return getattr(model, "module", model).state_dict()


def save_state(model, optimizer, step, history):
    sd = full_state(model)
    if rank == 0:  # weights, AdamW moments, step, RNG, the loss curve so far and the start-of-run eval
        try:
            check_finite_weights(sd, f"{history[-1]['phase']} step {step - 1}")
        except NonFiniteError as e:
            die(str(e))
        states.save(step, sd, None if args.fsdp else optimizer, history_json=json.dumps(history),
                    before_json=json.dumps(before))
    if world_size > 1:
        torch.distributed.barrier()


# ----------------------------------------------------------------------------
# --loss-ablation: one table, no checkpoint

if ablation:
    init_state = copy.deepcopy(student.state_dict())
    table = [{"loss": "none (no uptraining)", **evaluate(student)}]
    for spec, losses in zip(ablation, specs):
        student.load_state_dict(init_state)
        hist, _ = train(student, losses, trial=f" ({spec})")
        table.append({"loss": spec, "final_train_loss": hist[-1]["loss"], **evaluate(student)})
        print0(f"ablation {spec}: {table[-1]}")
    best = None
    if rank == 0 and text_eval is not None:  # each row against the lowest-KL row, paired over the same chunks
        best = min(table, key=lambda r: r["kl_parent"])
        for r in table:
            r["vs_best"] = paired_gaps(r, best)
    if rank == 0:
        metrics = {"student": args.student, "teacher": teacher_path, "tokens_per_trial": kd_steps * per_step * args.seq_len,
                   "parent": parent_eval, "cosine_on": cosine_on, "best": best and best["loss"], "table": table}
        metrics["report"] = kd_ablation_tables(metrics, args.metrics_name)
        metrics_path = write_metrics(run_dir, args.metrics_name, metrics, out=args.out)
        print("\n" + "\n".join(metrics["report"]))
        print(f"metrics: {metrics_path} (an ablation saves no checkpoint)")

# ----------------------------------------------------------------------------
# --quant: the PTQ / QAT / QAD table (the teacher's own data, each method's evaluation, the findings)


def teacher_generations(teacher, tokenizer, args, tokens: int, autocast) -> torch.Tensor:
    """Packed rows of the teacher's own answers (sampled at --self-temperature) to the prompts of --data, in both
    reasoning modes as the records ask: QAD's self-generated data. At least `tokens` tokens."""
    records = sft_records(args.data)
    random.Random(args.seed).shuffle(records)
    docs, used, n_tokens = [], 0, 0
    while n_tokens < tokens + args.seq_len and used < len(records):
        batch = records[used:used + 32]
        used += len(batch)
        prompts = [render_prompt(tokenizer, build_messages(r, r.get("reasoning") == "on")) for r in batch]
        with autocast():
            outs = generate(teacher, tokenizer, prompts, temperature=args.self_temperature, max_new_tokens=256,
                            seed=args.seed + used, desc="teacher's own answers")
        new = chat_documents(tokenizer, [{**r, "output": o[0]} for r, o in zip(batch, outs)])
        docs += new
        n_tokens += sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in new)
    rows = text_chunks(tokenizer, docs, args.seq_len)
    print0(f"qad_self: {len(docs)} teacher answers, {len(rows)} packed rows of {args.seq_len}")
    return rows


def quant_eval(model, who):
    """Text KL / accuracy against the teacher, math on / off with think-format compliance, IF all-met, on the
    held-out sets below (math_set, if_set)."""
    out = {"text": evaluate(model), "math": math_both_modes(model, tokenizer, math_set, args.max_new_tokens_on,
                                                            args.max_new_tokens_off, dtype=cdtype, who=who)}
    if if_set:
        model.eval()
        with autocast():
            out["if"] = generation_eval(model, tokenizer, if_set, False, args.max_new_tokens_off, batch_size=32,
                                        desc=f"{who}: instruction following")
    model.eval()
    return out


def _paired(a: list, b: list) -> tuple[float, float]:
    return mean_se([float(x) - float(y) for x, y in zip(a, b)])


def quant_rows(table: dict) -> list[dict]:
    """One row per method: each figure with its SE, and its gap to the full-precision row paired over the same
    chunks / problems."""
    ref = table["bf16"]
    rows = []
    for name, r in table.items():
        row = {"method": name}
        if r["text"]:
            row |= {k: r["text"][k] for k in ("kl_parent", "kl_parent_se", "next_token_acc", "next_token_acc_se")}
            row["d_next_token_acc"], row["d_next_token_acc_se"] = paired_diff(r["text"], ref["text"], "next_token_acc")
        items = [(f"math_{mode}", r["math"].get(mode), ref["math"].get(mode)) for mode in ("on", "off")]
        items += [("if", r.get("if"), ref.get("if"))]
        for key, g, g0 in items:
            if not g:
                continue
            row[f"{key}_n"] = g["n"]
            row[key], row[f"{key}_se"] = mean_se([float(c) for c in g["correct"]])
            row[f"d_{key}"], row[f"d_{key}_se"] = _paired(g["correct"], g0["correct"])
            if key.startswith("math"):
                fmt = f"format_{key[5:]}"
                row[fmt], row[f"{fmt}_se"] = mean_se([float(c) for c in g["format_ok"]])
                row[f"d_{fmt}"], row[f"d_{fmt}_se"] = _paired(g["format_ok"], g0["format_ok"])
        rows.append(row)
    return rows


def quant_findings(table: dict) -> dict:
    """The paper's claims at this scale: QAD's KL to the full-precision model <= 1/10 of QAT's (and below it by
    > 2 paired SE); QAD within 2 SE of full precision on math and the toggle."""
    out = {}
    if "qad" in table and "qat" in table and table["qad"]["text"]:
        d, se = paired_diff(table["qad"]["text"], table["qat"]["text"], "kl_parent")
        qad_kl, qat_kl = table["qad"]["text"]["kl_parent"], table["qat"]["text"]["kl_parent"]
        out |= {"kl_qad_over_qat": qad_kl / qat_kl if qat_kl else None, "kl_qad_minus_qat": d,
                "kl_qad_minus_qat_se": se, "qad_kl_below_qat_beyond_2se": d < -2 * se,
                "kl_goal_met": bool(qat_kl and qad_kl <= qat_kl / 10)}
    if "qad" in table:
        within = {}
        for mode in ("on", "off"):
            g, g0 = table["qad"]["math"].get(mode), table["bf16"]["math"].get(mode)
            if g:
                for key in ("correct", "format_ok"):
                    d, se = _paired(g[key], g0[key])
                    within[f"{'math' if key == 'correct' else 'format'}_{mode}"] = abs(d) <= 2 * se
        out["qad_within_2se_of_bf16"] = within
    return out


if args.quant:
    math_set = eval_problems(args.eval_problems, seed=0) if args.eval_problems else []
    if_set = generate_instructions(args.eval_if, seed=0, heldout=True) if args.eval_if else []
    table = {"bf16": quant_eval(teacher, "bf16")}
    n_quant = quantize_model_(student, args.quant, args.quant_acts)
    if args.quant == "nvfp4" and args.quant_acts:  # static activation scales from the first training rows
        calib = rows[:2 * args.batch_size].to(device)
        with autocast():
            calibrate_act_amax(student, calib.split(args.batch_size))
    init_state = copy.deepcopy(student.state_dict())
    data_rows, self_rows, keep = rows, None, None
    for m in methods:
        student.load_state_dict(init_state)
        if m == "qad_self" and self_rows is None:
            self_rows = teacher_generations(teacher, tokenizer, args, kd_steps * per_step * args.seq_len, autocast)
        rows = self_rows if m == "qad_self" else data_rows  # micro_batch reads `rows`
        if QUANT_METHODS[m]:
            train(student, QUANT_METHODS[m], trial=f" ({m})")
        table[m] = quant_eval(student, m)
        if keep is None and QUANT_METHODS[m] or m == "qad":  # the checkpoint: qad, else the first trained one
            keep = (m, copy.deepcopy(student.state_dict()))
    rows = data_rows
    keep = keep or ("ptq", init_state)
    if rank == 0:
        metrics = {"student": args.student, "teacher": teacher_path, "format": args.quant,
                   "quant_acts": args.quant_acts, "quantized_linears": n_quant, "methods": methods,
                   "tokens_per_method": kd_steps * per_step * args.seq_len, "data": args.data,
                   "saved": keep[0], "table": quant_rows(table), "findings": quant_findings(table)}
        student.load_state_dict(keep[1])
        with torch.no_grad():  # the checkpoint holds the rounded weights: what the quantized model computes with
            for mod in student.modules():
                if isinstance(mod, QuantLinear):
                    mod.weight.copy_(fake_quant_weight(mod.weight, mod.fmt))
        quant = {"format": args.quant, "quant_acts": args.quant_acts, "method": keep[0],
                 "act_amax": {n: mod.act_amax for n, mod in student.named_modules()
                              if isinstance(mod, QuantLinear) and mod.act_amax is not None}}
        dequantize_model_(student)
        save_checkpoint(student, tokenizer, args.out, stage="qad", args=user_config,
                        meta={"parent": teacher_path, "input": args.student, "quant": quant,
                              "metrics": {"table": metrics["table"], "findings": metrics["findings"]}})
        metrics["report"] = quant_tables(metrics, args.metrics_name)
        metrics_path = write_metrics(run_dir, args.metrics_name, metrics, out=args.out)
        print("\n" + "\n".join(metrics["report"]))
        print(f"checkpoint ({keep[0]}): {args.out}; metrics: {metrics_path}")


# ----------------------------------------------------------------------------
# KD (+ CPT), save, the table (`history`, the loss curve, stays a module global: tests read it back)

def fusion_pair(metrics: dict):
    """(fused, unfused): this KD and another KD of this run directory at the same token budget, one of a fused model
    (03's output), the other of the child it fused; None when the other half has not run."""
    def fused_from(student):  # the unfused child a 03 output was made from, else None
        try:
            m = load_meta(student)
        except CheckpointError:
            return None
        return os.path.realpath(m["input"]) if m.get("stage") == "ffn_fusion" and m.get("input") else None
    try:
        runs = read_run_metrics(run_dir)
    except FileNotFoundError:
        return None
    me, my_child = os.path.realpath(args.student), fused_from(args.student)
    for name, m in runs.items():
        if name == args.metrics_name or not isinstance(m, dict) or m.get("tokens") != metrics["tokens"] \
                or not m.get("after") or not m.get("student"):
            continue
        if my_child == os.path.realpath(m["student"]):
            return metrics, m
        if fused_from(m["student"]) == me:
            return m, metrics
    return None


if not ablation and not args.quant:  # the third mode: KD itself
    resume_from = None
    if args.resume:
        resume_from = states.latest()
        st = states.load()  # weights before wrapping (DDP broadcasts, FSDP shards them)
        student.load_state_dict(st["model"])
        before = json.loads(st.get("before_json", "{}"))
    else:
        before = evaluate(student)

    history, model = train(student, specs[0], resume_from)
    sd = full_state(model)
    after, speed = {}, {}
    if rank == 0:
        try:
            check_finite_weights(sd, f"{history[-1]['phase']} step {history[-1]['step']}")
        except NonFiniteError as e:
            die(str(e))
        if args.fsdp:  # the trained module is sharded in place: evaluate and save an unsharded copy
            student = load_checkpoint(args.student, dtype=torch.float32, device=device, with_tokenizer=False)[0]
        student.load_state_dict(sd)
        after = evaluate(student)
        if args.speed_new_tokens > 0:
            speed = speed_eval(copy.deepcopy(student).to(cdtype).eval(), teacher.eval(), batch_sizes=(1, 4),
                               prompt_len=args.seq_len, gen_len=args.speed_new_tokens)
        pacc = parent_eval.get("next_token_acc")
        retention = {}  # the child's next-token accuracy over the parent's on the same chunks, with its paired SE
        for k, m in (("before", before), ("after", after)):
            r, se = ratio_se(m["per_seq"]["next_token_acc"], parent_eval["per_seq"]["next_token_acc"]) if m and pacc else (None, None)
            retention |= {k: r, f"{k}_se": se}
        metrics = {"student": args.student, "teacher": teacher_path, "out": args.out, "loss": args.loss,
                   "cosine_on": cosine_on, "tokens": sum(s for _, s, _ in phases) * per_step * args.seq_len,
                   "kd_steps": kd_steps, "cpt_steps": cpt_steps, "world_size": world_size,
                   "parent": parent_eval, "before": before, "after": after, "retention": retention, "speed": speed,
                   "history": history}
        save_checkpoint(student, tokenizer, args.out, stage="distill", args=user_config,
                        meta={"parent": teacher_path, "input": args.student, "layer_map": layer_map,
                              "metrics": {k: metrics[k] for k in ("before", "after", "retention", "speed", "tokens")}})
        metrics["report"] = distill_tables(metrics, args.metrics_name)
        metrics_path = write_metrics(run_dir, args.metrics_name, metrics, out=args.out)
        states.finish()
        wandb_run.log({f"eval/{when}_{k}": v for when, m in (("before", before), ("after", after)) for k, v in m.items()
                       if isinstance(v, float)})  # not the per-chunk lists
        print("\n" + "\n".join(metrics["report"]))
        pair = fusion_pair(metrics)
        if pair:  # this KD completes FFN Fusion's after-training comparison: its own file, shown once by the report
            fusion = fusion_after_kd(*pair)
            write_metrics(run_dir, "ffn_fusion_after_kd", {"report": fusion})
            print("\n".join(fusion))
        print(f"checkpoint: {args.out}; metrics: {metrics_path}")
    if world_size > 1:
        torch.distributed.barrier()
wandb_run.finish()
