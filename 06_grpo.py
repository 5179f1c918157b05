"""Stage 6: reasoning RL with GRPO (LN-Ultra), with the pass-rate filter and an easy-to-hard curriculum.

Per rollout step: P prompts (math with ground-truth answers, "detailed thinking on" or "off"), G samples each at
temperature 1 / top_p 1; reward = accuracy (the final answer after </think>, common.rewards.answer_correct) +
format (think block when on, none when off); group-normalized advantages; the clipped surrogate with optional
k3 KL to the frozen initial policy; `--steps-per-rollout` optimizer steps over minibatches of the groups.
Data step (the paper's): sample k answers per candidate prompt from `--filter-model` (default the policy), drop
prompts it already solves (pass rate >= 0.75), order the rest from easy to hard. The pass rates are cached
beside the prompts, so a rerun (or --resume) does not resample. Loss normalizations (common.losses):
  grpo     mean_i ( (1/|o_i|) sum_t l_it )          sequence mean, then mean over completions
  dapo     sum_it l_it / sum_i |o_i|                 token level over the batch
  dr_grpo  sum_it l_it / (N * max_new_tokens)        constant normalizer, advantages not divided by the std
Log-probabilities are recomputed with the training forward (common/rl.py says why).

    python 06_grpo.py --policy runs/smol/sft_parent --data data/smol --out runs/smol/grpo --num-prompts 64 --steps 12 --prompts-per-step 8 --lr 3e-6   # CPU, run.sh
    torchrun --standalone --nproc_per_node 8 06_grpo.py --policy ... --prompts-per-step 72 --group-size 16 --steps-per-rollout 2 --fp8-generation
    python 06_grpo.py --policy runs/smol/sft_parent --data data/smol --out /tmp/grpo --steps 2 --num-prompts 8 --filter-samples 2 --eval-problems 4   # smoke
"""

import argparse
import json
import os
import random
import time

import torch

from common.checkpoint import (CheckpointError, check_metrics_free, load_checkpoint, load_meta, load_meta_matching,
                               save_checkpoint, write_json_atomic, write_metrics)
from common.cli import add_dtype_arg, add_save_every_arg, die, fraction, nonneg_float, nonneg_int, positive_float, positive_int, prob
from common.data import build_messages, render_prompt
from common.dist import all_reduce_sum, compute_cleanup, compute_init, print0, progress, resolve_dtype, shard_list
from common.evaluate import math_both_modes
from common.gen_cache import GenCacheError, add_gen_cache_args, open_gen_cache
from common.generate import add_generator_args, check_generator_args, rollout_generator
from common.losses import LOSS_TYPES
from common.optim import NonFiniteError, check_finite_weights, lr_at, make_adamw, set_lr
from common.resume import RunStates
from common.rewards import math_reward
from common.rl import PolicyLossConfig, Rollout, curriculum_order, pass_rate_filter, sample_by_mode, train_on_rollout
from common.stats import mean_se
from common.tables import grpo_tables
from common.tracking import DummyWandb, add_wandb_args, init_wandb, wandb_table
from data_gen.math_problems import eval_problems, rl_problems, semantic_key
from data_gen.records import problem_records, read_jsonl, write_jsonl

# ----------------------------------------------------------------------------
# Arguments

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--policy", required=True, help="checkpoint to train (e.g. runs/smol/sft_parent)")
p.add_argument("--data", required=True, help="data directory; the RL prompt pool and its pass rates live here")
p.add_argument("--out", required=True, help="output checkpoint directory, e.g. runs/smol/grpo")
p.add_argument("--prompts", default=None, help="JSONL of math records with answer and difficulty "
               "(default: <data>/rl_math.jsonl, written from data_gen on first use)")
# prompts and the pass-rate filter
p.add_argument("--num-prompts", type=positive_int, default=96, help="candidate prompts from the pool")
p.add_argument("--on-fraction", type=prob, default=0.5, help="share of prompts with 'detailed thinking on'")
p.add_argument("--filter-model", default=None, help="model whose pass rates filter the prompts (default: the policy)")
p.add_argument("--filter-samples", type=positive_int, default=8, help="k samples per candidate prompt")
p.add_argument("--max-pass-rate", type=fraction, default=0.75, help="drop prompts with pass rate >= this")
p.add_argument("--min-pass-rate", type=fraction, default=0.0, help="also drop prompts with pass rate below this (0.1 at "
               "k=8: those never solved, whose groups carry no signal; LN-Ultra kept them)")
p.add_argument("--no-filter", action="store_true", help="ablation: keep every candidate prompt")
p.add_argument("--no-curriculum", action="store_true", help="shuffle instead of ordering easy -> hard")
# rollouts
p.add_argument("--steps", type=positive_int, default=12, help="rollout steps")
p.add_argument("--prompts-per-step", type=positive_int, default=4, help="prompts per rollout (all ranks; LN-Ultra 72)")
p.add_argument("--group-size", type=positive_int, default=8, help="G samples per prompt (LN-Ultra 16)")
p.add_argument("--temperature", type=positive_float, default=1.0)
p.add_argument("--top-p", type=fraction, default=1.0)
p.add_argument("--max-new-tokens", type=positive_int, default=256, help="completion budget (on mode)")
p.add_argument("--max-new-tokens-off", type=positive_int, default=96, help="completion budget with thinking off")
p.add_argument("--gen-batch-size", type=positive_int, default=64, help="rows per generate call")
add_generator_args(p)
# rewards
p.add_argument("--w-accuracy", type=nonneg_float, default=1.0)
p.add_argument("--w-format", type=nonneg_float, default=0.5)
p.add_argument("--no-format-gate", action="store_true", help="ablation: credit a correct answer even when the toggle "
               "format is broken (common.rewards.math_reward)")
# loss and optimization
p.add_argument("--loss-type", default="grpo", choices=LOSS_TYPES)
p.add_argument("--eps-low", type=nonneg_float, default=0.2)
p.add_argument("--eps-high", type=nonneg_float, default=0.2, help="DAPO clip-higher: 0.28")
p.add_argument("--beta", type=nonneg_float, default=0.0, help="k3 KL weight to the initial policy (0: no reference)")
p.add_argument("--steps-per-rollout", type=positive_int, default=2, help="optimizer steps per rollout (LN-Ultra 2)")
p.add_argument("--lr", type=nonneg_float, default=2e-6)
p.add_argument("--warmup-steps", type=nonneg_int, default=0)
p.add_argument("--weight-decay", type=nonneg_float, default=0.0)
p.add_argument("--grad-clip", type=positive_float, default=1.0)
p.add_argument("--micro-batch", type=positive_int, default=8, help="completions per forward/backward")
add_dtype_arg(p)
p.add_argument("--seed", type=nonneg_int, default=0)
add_save_every_arg(p, 4, "rollout steps")
p.add_argument("--resume", action="store_true", help="continue from the last state in <out>.state/")
# evaluation
p.add_argument("--eval-problems", type=nonneg_int, default=100, help="held-out problems per mode (0 = skip)")
p.add_argument("--eval-max-new-tokens", type=positive_int, default=320)
p.add_argument("--eval-max-new-tokens-off", type=positive_int, default=96)
p.add_argument("--before-from", default=None, help="GRPO checkpoint of the same policy whose before-GRPO "
               "evaluation to reuse (an ablation)")
p.add_argument("--samples-every", type=positive_int, default=4, help="rollout steps between W&B sample tables")
p.add_argument("--run-dir", default=None, help="where metrics/<name>.json goes (default: the parent of --out)")
p.add_argument("--metrics-name", default="grpo")
add_gen_cache_args(p)
add_wandb_args(p)
args = p.parse_args()
user_config = vars(args).copy()

# ----------------------------------------------------------------------------
# Validation: every flag and everything read from disk checked before any work

if args.group_size < 2:
    die("--group-size must be >= 2 (a group of one has no baseline); use e.g. --group-size 8")
try:
    check_generator_args(args)
except ValueError as e:
    die(e)
run_dir = args.run_dir or os.path.dirname(os.path.abspath(args.out))
try:
    policy_meta = load_meta(args.policy)
    filter_path = args.filter_model or args.policy
    if filter_path != args.policy:
        load_meta(filter_path)
    # budget flags may grow on --resume; anything else must match the run that wrote the states
    states = RunStates(args.out, user_config, resume=args.resume, budget_keys=("steps", "save_every", "no_gen_cache"),
                       keep=3)
    check_metrics_free(run_dir, args.metrics_name, args.out)
    gen_cache = open_gen_cache(run_dir, args)
except (CheckpointError, GenCacheError) as e:
    die(e)

# ----------------------------------------------------------------------------
# Init

ddp, rank, local_rank, world_size, device = compute_init(args.seed)
dtype = resolve_dtype(args.dtype, device)
wandb_run = init_wandb(args.wandb_project, args.run_name or "grpo", user_config, mode=args.wandb_mode)
model, tokenizer = load_checkpoint(args.policy, dtype=torch.float32, device=device)  # fp32 master weights
if not all(torch.isfinite(w).all() for w in model.parameters()):  # sampling would fail deep inside generate
    die(f"{args.policy} holds non-finite weights; start from a checkpoint whose training did not diverge")
pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
parent_path = policy_meta.get("parent") or args.policy
ref_model = None
if args.beta > 0:  # frozen initial policy for the KL term
    ref_model = load_checkpoint(args.policy, dtype=torch.float32, device=device, with_tokenizer=False)[0]
    ref_model.requires_grad_(False)
generator = rollout_generator(args, args.policy, model, dtype, args.seed)  # the policy itself, or colocated vLLM
print0(f"policy {args.policy} (stage {policy_meta.get('stage')}); compute dtype {dtype}; "
       f"generator {'vLLM' if generator is not model else 'HF generate'}; world size {world_size}")

# ----------------------------------------------------------------------------
# Prompts: the RL pool (never the evaluation problems), modes, pass-rate filter, curriculum

eval_set = eval_problems(args.eval_problems, seed=0) if args.eval_problems > 0 else []
# every held-out set of the pipeline (this stage's; eval.jsonl's 200, whose first 30 are the suite's; 05's 32), held
# out by meaning
heldout = eval_set + eval_problems(200, seed=0) + eval_problems(32, seed=1234)
pool_path = args.prompts or os.path.join(args.data, "rl_math.jsonl")
try:
    if args.prompts is None and not os.path.exists(pool_path) and rank == 0:
        pool = rl_problems(max(args.num_prompts, 512), seed=0, exclude=heldout)
        write_jsonl(pool_path, [problem_records(p, modes=("on",))[0] for p in pool])
        print0(f"wrote the RL prompt pool {pool_path} ({len(pool)} math problems)")
    if ddp:
        torch.distributed.barrier()
    records = read_jsonl(pool_path)
except ValueError as e:
    die(e)
banned = {semantic_key(q) for q in heldout}
candidates = [r for r in records if r.get("answer") not in (None, "") and semantic_key(r) not in banned]
if not candidates:
    die(f"{pool_path} has no prompt with an answer outside the evaluation set ({len(records)} records); "
             f"give math records with an 'answer' field")
candidates = candidates[:args.num_prompts]
mode_rng = random.Random(f"modes:{args.seed}")
for r in candidates:
    r["reasoning_on"] = mode_rng.random() < args.on_fraction


def prompt_text(r) -> str:
    return render_prompt(tokenizer, build_messages(r["input"], r["reasoning_on"]))


def rewards_of(rs, texts) -> list[dict]:
    return [math_reward(t, r["answer"], r["reasoning_on"], args.w_accuracy, args.w_format, gate=not args.no_format_gate)
            for r, t in zip(rs, texts)]


def sample_records(gen, rs, n) -> tuple[list[dict], Rollout]:
    """n samples per record (one generate call per mode: the two have different budgets); the records in rollout
    order and the Rollout, whose group g belongs to the g-th record returned."""
    order, rollout = sample_by_mode(gen, tokenizer, [prompt_text(r) for r in rs], [r["reasoning_on"] for r in rs], n,
                                    args.max_new_tokens, args.max_new_tokens_off, args.temperature, args.top_p,
                                    args.gen_batch_size, dtype)
    return [rs[i] for i in order], rollout


# pass rates, cached beside the prompts: key = filter model + sampling settings, value = {id|mode: pass rate}
cache_path = pool_path.removesuffix(".jsonl") + ".pass_rates.json"
fingerprint = json.dumps({"model": os.path.abspath(filter_path), "model_time": load_meta(filter_path).get("time"),
                          "k": args.filter_samples, "temperature": args.temperature, "top_p": args.top_p,
                          "max_new_tokens": [args.max_new_tokens, args.max_new_tokens_off],
                          "w": [args.w_accuracy, args.w_format]}, sort_keys=True)
cache = {}
if os.path.exists(cache_path):
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        die(f"{cache_path} is not valid JSON ({e}); delete it to resample the pass rates")
rates = cache.get(fingerprint, {})


def key(r):
    return f"{r['id']}|{'on' if r['reasoning_on'] else 'off'}"


todo = [r for r in candidates if key(r) not in rates] if not (args.no_filter and args.no_curriculum) else []
filter_seconds = 0.0
if todo and rank == 0:  # the filter runs once, on rank 0, and is cached for every rank and every rerun
    t0 = time.time()
    fgen = generator if filter_path == args.policy else load_checkpoint(filter_path, dtype=torch.float32,
                                                                       device=device, with_tokenizer=False)[0]
    print0(f"pass-rate filter: {len(todo)} prompts x {args.filter_samples} samples from {filter_path}")
    for s in progress(range(0, len(todo), 16), desc="pass rates", unit="x16 prompts"):
        order, ro = sample_records(fgen, todo[s:s + 16], args.filter_samples)
        k = args.filter_samples
        for i, r in enumerate(order):
            texts = ro.texts[i * k:(i + 1) * k]
            rates[key(r)] = sum(x["accuracy"] for x in rewards_of([r] * k, texts)) / k
        cache[fingerprint] = rates
        write_json_atomic(cache_path, cache)  # after every chunk: a killed filter resumes where it stopped
    filter_seconds = time.time() - t0
    del fgen
if ddp:  # the other ranks read what rank 0 measured
    torch.distributed.barrier()
    if os.path.exists(cache_path):
        with open(cache_path) as f:
            rates = json.load(f).get(fingerprint, {})
cand_rates = [rates.get(key(r), 0.0) for r in candidates]
kept, counts = pass_rate_filter(candidates, cand_rates, *((2.0, 0.0) if args.no_filter else
                                                          (args.max_pass_rate, args.min_pass_rate)))
dropped, n_zero, hard = counts["dropped"], counts["zero"], counts["dropped_hard"]
print0(f"pass-rate filter: {len(candidates)} candidates, {dropped} dropped (pass rate >= {args.max_pass_rate}), "
       f"{n_zero} with pass rate 0" + (f", {hard} dropped as unsolved (< {args.min_pass_rate})" if hard else "") +
       f", {len(kept)} kept" + (" (--no-filter)" if args.no_filter else ""))
if not kept:
    die(f"every prompt was filtered out: of {len(candidates)} candidates {dropped} have pass rate >= "
             f"{args.max_pass_rate} and {hard} below --min-pass-rate {args.min_pass_rate} under {filter_path}; "
             f"widen the band or use more --num-prompts")
kept = curriculum_order(kept, [rates.get(key(r), 0.0) for r in kept], args.seed, curriculum=not args.no_curriculum)
torch.manual_seed(args.seed + rank)  # rollouts sample the same whether the filter ran now or came from the cache
need = args.steps * args.prompts_per_step
schedule = [kept[i % len(kept)] for i in range(need)]  # cycles the filtered set when the budget asks for more

# ----------------------------------------------------------------------------
# Evaluation before training (held-out, both modes); answers the run's generation cache holds for these weights (an
# earlier evaluation of the same checkpoint) are reused. With the vLLM generator the engine decodes them too (synced
# with the weights first; before and after through the same engine, so the gain stays paired)


def eval_both_modes(m) -> dict:
    return math_both_modes(m, tokenizer, eval_set, args.eval_max_new_tokens, args.eval_max_new_tokens_off, dtype=dtype,
                           cache=gen_cache, engine=generator if generator is not model else None)


def reuse_before(path) -> dict:
    """The before-GRPO evaluation stored in another GRPO checkpoint of the same policy, problems and budgets."""
    try:
        m = load_meta_matching(path, ("grpo",), vars(args), ("policy", "eval_problems", "eval_max_new_tokens",
                                                              "eval_max_new_tokens_off"))["metrics"]
    except CheckpointError as e:
        die(e)
    print0(f"before: reused from {path}")
    return {mode: {k: m.get(f"before_{mode}_{k}") for k in ("accuracy", "accuracy_multistep", "format_compliance",
                                                            "mean_response_tokens", "correct")}
            for mode in ("on", "off")}


# ----------------------------------------------------------------------------
# Optimizer, resume

optimizer = make_adamw(model.named_parameters(), args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
loss_cfg = PolicyLossConfig(loss_type=args.loss_type, eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta,
                            steps_per_rollout=args.steps_per_rollout, micro_batch=args.micro_batch,
                            grad_clip=args.grad_clip, max_new_tokens=args.max_new_tokens, dtype=dtype,
                            is_mode=args.is_correction, is_cap=args.is_cap)
start, history, before = 0, [], {}
if args.resume:
    st = states.load(model, optimizer)
    start, history = int(st["step"]), json.loads(st["history_json"])
    before = json.loads(st["before_json"])
    print0(f"resumed from {states.latest()}: rollout step {start} of {args.steps}")
    if generator is not model:
        generator.update_weights(model)
elif rank == 0 and args.before_from:  # an ablation of the same policy: its "before" is already measured
    before = reuse_before(args.before_from)
elif rank == 0:
    t0 = time.time()
    before = eval_both_modes(model)
    if before:
        print0(f"before: accuracy on {before['on']['accuracy']:.3f} / off {before['off']['accuracy']:.3f} "
               f"({len(eval_set)} problems each, {time.time() - t0:.0f} s)")

check_finite = states.update_check(model, "GRPO")

# ----------------------------------------------------------------------------
# Training loop: rollout -> rewards -> update

sample_rows, t_start = [], time.time()
with progress(range(start, args.steps), desc="GRPO", unit="rollout", initial=start, total=args.steps) as bar:
    for step in bar:
        lr = lr_at(step, args.steps, args.lr, args.warmup_steps, args.lr)  # warmup, then constant (NeMo-RL)
        set_lr(optimizer, lr)
        batch = shard_list(schedule[step * args.prompts_per_step:(step + 1) * args.prompts_per_step], rank, world_size)
        # generation: one rollout per mode (the two have different completion budgets), groups kept whole
        order, rollout = sample_records(generator, batch, args.group_size) if batch else ([], Rollout([], [], [], args.group_size))
        gen_s = rollout.gen_seconds
        rows = [r for r in order for _ in range(args.group_size)]
        # scoring
        t0 = time.time()
        scored = rewards_of(rows, rollout.texts)
        rewards = torch.tensor([s["reward"] for s in scored], dtype=torch.float32)
        score_s = time.time() - t0
        try:
            st = train_on_rollout(model, optimizer, rollout, rewards, loss_cfg, device, pad_id, ref_model, check_finite)
            check_finite_weights(model, where=f"GRPO rollout step {step + 1}")
        except NonFiniteError as e:
            die(e)
        if generator is not model:
            generator.update_weights(model)  # colocated vLLM: the next rollout samples from the updated policy
        n = all_reduce_sum(float(len(scored)))
        rec = {"step": step + 1, "lr": lr, "prompt_ids": [r["id"] for r in batch],
               "reward": all_reduce_sum(float(rewards.sum())) / n,
               "accuracy": all_reduce_sum(sum(s["accuracy"] for s in scored)) / n,
               "format": all_reduce_sum(sum(s["format"] for s in scored)) / n,
               "completion_tokens": all_reduce_sum(float(rollout.num_tokens)) / n,
               "zero_signal_frac": all_reduce_sum(float(st["zero_signal_groups"])) / max(1.0, all_reduce_sum(float(st["groups"]))),
               "clip_fraction": st["clip_fraction"], "kl_ref": st["kl_ref"], "loss": st["loss"], "grad_norm": st["grad_norm"],
               "rollout_tok_s": all_reduce_sum(float(rollout.num_tokens)) / max(gen_s, 1e-9),
               "gen_s": gen_s, "score_s": score_s, "train_s": st["train_seconds"],
               "is_log_ratio": st["is_log_ratio"], "is_masked_fraction": st["is_masked_fraction"]}
        history.append(rec)
        wandb_run.log({f"grpo/{k}": v for k, v in rec.items() if isinstance(v, (int, float))}, step=step + 1)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(reward=f"{rec['reward']:.2f}", acc=f"{rec['accuracy']:.2f}", zero=f"{rec['zero_signal_frac']:.2f}")
        sample_rows += [(step + 1, "on" if r["reasoning_on"] else "off", prompt_text(r), t, s["reward"], s["accuracy"], s["format"])
                        for r, t, s in list(zip(rows, rollout.texts, scored))[::args.group_size][:2]]
        if (step + 1) % args.samples_every == 0 and not isinstance(wandb_run, DummyWandb):
            wandb_run.log({"grpo/samples": wandb_table(["step", "mode", "prompt", "completion", "reward", "accuracy",
                                                        "format"], sample_rows)}, step=step + 1)
        if rank == 0 and args.save_every > 0 and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            states.save(step + 1, model, optimizer, history_json=json.dumps(history), before_json=json.dumps(before))

# ----------------------------------------------------------------------------
# Evaluate after, save, report

if rank == 0:
    t0 = time.time()
    after = eval_both_modes(model)
    metrics = {"policy": args.policy, "candidates": len(candidates), "dropped_by_filter": dropped,
               "dropped_unsolved": hard, "min_pass_rate": 0.0 if args.no_filter else args.min_pass_rate,
               "pass_rate_zero": n_zero, "kept_prompts": len(kept), "filter": not args.no_filter,
               "curriculum": not args.no_curriculum, "filter_seconds": round(filter_seconds, 1),
               "rollout_steps": args.steps, "train_wall_s": round(time.time() - t_start, 1),
               "eval_problems": len(eval_set), "final_reward": history[-1]["reward"] if history else None}
    for when, res in (("before", before), ("after", after)):
        for mode, r in res.items():
            for k in ("accuracy", "accuracy_multistep", "format_compliance", "mean_response_tokens"):
                metrics[f"{when}_{mode}_{k}"] = r.get(k)
            metrics[f"{when}_{mode}_correct"] = r.get("correct")
    for mode in ("on", "off") if before and after else ():
        n_eval = len(eval_set)
        for when in ("before", "after"):
            a = metrics[f"{when}_{mode}_accuracy"]
            metrics[f"{when}_{mode}_accuracy_se"] = (a * (1 - a) / n_eval) ** 0.5
        d = [int(x) - int(y) for x, y in zip(after[mode]["correct"], before[mode]["correct"])]
        metrics[f"gain_{mode}"], metrics[f"gain_{mode}_se"] = mean_se(d)  # paired over the same problems
    save_checkpoint(model, tokenizer, args.out, stage="grpo", args=user_config,
                    meta={"parent": parent_path, "init": args.policy, "metrics": metrics, "history": history})
    metrics["report"] = grpo_tables(metrics, args.metrics_name)
    write_metrics(run_dir, args.metrics_name, metrics, out=args.out)
    states.finish()
    print0("\n" + "\n".join(metrics["report"]))
    print0(f"checkpoint: {args.out}; metrics: {os.path.join(run_dir, 'metrics', args.metrics_name + '.json')}")
wandb_run.finish()
if generator is not model:
    generator.shutdown()  # before compute_cleanup: under torchrun the engine's groups hang off ours
compute_cleanup()
