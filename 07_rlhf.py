"""Stage 7: instruction-following RL (RLOO with a verifier), a Bradley-Terry reward model, and RLHF against it
(RPO offline or online, GRPO with the reward model's score): LN-Super / LN-Nano / LN-Ultra's last stages.

  --algo rloo            k samples per instruction prompt (both toggle modes); reward = fraction of the prompt's
                         constraints met (--all-met: 1 only when all are) minus the KL to the frozen initial policy
                         (TRL's way: r_i - beta * sum_t (logpi - logpi_ref)); leave-one-out baseline
                         b_i = (sum_j r_j - r_i) / (k - 1), A_i = r_i - b_i; common.rl's clipped update.
  --train-reward-model   a scalar head on the last token of --policy, loss -log sigmoid(r_chosen - r_rejected), on
                         data_gen.preferences pairs (--heldout-kind left out) plus, with --policy-pairs, the
                         policy's own samples ranked by the verifiers; pairwise accuracy on held-out pairs per kind.
  --algo rpo             --rpo-loss rpo_sq | rpo_bwd_kl | rpo_fwd_kl | dpo (common.losses) on preference pairs:
                         offline from --pairs (rewards from --reward-model, else the file's chosen_reward /
                         rejected_reward, else the verifiers), or --online N iterations of: k answers per prompt
                         from the current policy, scored (reward model, else verifier), best paired with worst, train.
                         The reference of delta_pi is the frozen initial policy (offline and online alike).
  --algo grpo-rm         GRPO (06's update, common.rl) with the reward model's score as the reward, k3 KL in the
                         loss (LN-Ultra: 8 samples, beta 1e-3).
Training prompts come from data_gen.instructions.rl_instructions, never the evaluation prompts (held out by meaning:
instruction_key). Evaluation before and after, on rank 0: held-out instruction following (all constraints met and
fraction met, standard errors, paired gains), the reward model's score of those answers (when one is loaded), and
"nothing lost": held-out math accuracy and format compliance with thinking on and off.

    python 07_rlhf.py --algo rloo --policy runs/smol/grpo --data data/smol --out runs/smol/rloo                 # CPU
    python 07_rlhf.py --train-reward-model --policy runs/smol/sft_parent --data data/smol --out runs/smol/reward_model
    python 07_rlhf.py --algo rpo --reward-model runs/smol/reward_model --policy runs/smol/rloo --data data/smol --out runs/smol/rpo
    torchrun --standalone --nproc_per_node 8 07_rlhf.py --algo rpo --online 2 --reward-model DIR --policy DIR --data DIR --out DIR --pairs-per-step 64 --k 8
    python 07_rlhf.py --algo rloo --policy runs/smol/grpo --data /tmp/d --out /tmp/rloo --steps 2 --prompts-per-step 2 --eval-if 8 --eval-math 2   # smoke
"""

import argparse
import json
import os
import random
import shutil
import time

import torch

from common.checkpoint import (CheckpointError, check_metrics_free, load_checkpoint, load_meta, load_meta_matching,
                               read_run_metrics, save_checkpoint, write_metrics)
from common.cli import add_dtype_arg, add_save_every_arg, die, nonneg_float, nonneg_int, positive_float, positive_int, prob
from common.data import build_messages, end_of_turn_id, render_prompt
from common.dist import all_reduce_sum, autocast_ctx, compute_cleanup, compute_init, print0, progress, resolve_dtype, shard_list
from common.evaluate import generation_eval
from common.stats import mean_se
from common.tables import reward_model_tables, rlhf_tables, rpo_loss_table
from common.gen_cache import add_gen_cache_args, greedy_generate, open_gen_cache
from common.generate import add_generator_args, check_generator_args, rollout_generator
from common.losses import LOSS_TYPES, RPO_LOSSES, rloo_advantages
from common.optim import NonFiniteError, check_finite_weights, lr_at, make_adamw, set_lr
from common.resume import RunStates
from common.reward_model import (RewardModel, check_reward_model, load_reward_model, pairwise_accuracy, reward_scores,
                                 save_reward_model, train_reward_model_step)
from common.rewards import verifier_reward
from common.rl import (Pairs, PolicyLossConfig, PreferenceConfig, Rollout, rollout_logprobs, sample_by_mode, sequence_kl,
                       train_on_pairs, train_on_rollout)
from common.tracking import DummyWandb, add_wandb_args, init_wandb, wandb_table
from data_gen.instructions import generate_instructions, rl_instructions
from data_gen.math_problems import eval_problems, rl_problems
from data_gen.preferences import KINDS, heldout_prompts, preference_pairs, read_pairs, write_pairs

# ----------------------------------------------------------------------------
# Arguments

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--algo", choices=["rloo", "rpo", "grpo-rm"], default=None)
p.add_argument("--train-reward-model", action="store_true", help="train a Bradley-Terry reward model instead")
p.add_argument("--policy", required=True, help="checkpoint to train (with --train-reward-model: the backbone)")
p.add_argument("--data", required=True, help="data directory; the preference pairs file is written here on first use")
p.add_argument("--out", required=True, help="output checkpoint directory, e.g. runs/smol/rloo")
p.add_argument("--reward-model", default=None, help="07 --train-reward-model output: rpo's pair rewards, grpo-rm's "
               "reward; its score of the policy's answers joins the evaluation")
p.add_argument("--pairs", default=None, help="preference pairs JSONL (default <data>/preference_pairs.jsonl, written "
               "from data_gen.preferences on first use, without --heldout-kind)")
# prompts (rloo, grpo-rm, online rpo, --policy-pairs)
p.add_argument("--num-prompts", type=positive_int, default=256, help="training prompts in the pool")
p.add_argument("--math-fraction", type=prob, default=0.0, help="share of math prompts in the pool (verifier: accuracy)")
p.add_argument("--on-fraction", type=prob, default=0.5, help="share of prompts with 'detailed thinking on'")
# rollouts
p.add_argument("--steps", type=positive_int, default=None, help="rollout steps (rloo, grpo-rm), optimizer steps "
               "(offline rpo, reward model), optimizer steps per iteration (online rpo); default per algorithm")
p.add_argument("--prompts-per-step", type=positive_int, default=4, help="prompts per rollout, all ranks")
p.add_argument("--k", type=positive_int, default=4, help="samples per prompt: RLOO's k, GRPO's group, online RPO's candidates")
p.add_argument("--temperature", type=positive_float, default=1.0)
p.add_argument("--top-p", type=prob, default=1.0)
p.add_argument("--max-new-tokens", type=positive_int, default=256, help="completion budget (thinking on)")
p.add_argument("--max-new-tokens-off", type=positive_int, default=96, help="completion budget with thinking off")
p.add_argument("--gen-batch-size", type=positive_int, default=64, help="rows per generate call")
add_generator_args(p)  # rloo, grpo-rm and online rpo sample through it; every policy evaluation decodes through it
# rewards
p.add_argument("--all-met", action="store_true", help="verifier reward 1 only when every constraint is met")
p.add_argument("--w-format", type=nonneg_float, default=0.0, help="+ w * [toggle format kept] in the verifier reward")
p.add_argument("--beta", type=nonneg_float, default=None, help="KL to the initial policy; rloo: in the reward "
               "(TRL 0.05), grpo-rm: k3 in the loss (LN-Ultra 1e-3)")
# policy update (rloo, grpo-rm)
p.add_argument("--loss-type", default=None, choices=LOSS_TYPES, help="token-loss normalization (rloo dapo, grpo-rm grpo)")
p.add_argument("--eps-low", type=nonneg_float, default=0.2)
p.add_argument("--eps-high", type=nonneg_float, default=0.2)
p.add_argument("--steps-per-rollout", type=positive_int, default=2, help="optimizer steps per rollout")
# RPO
p.add_argument("--rpo-loss", default="rpo_sq", choices=RPO_LOSSES)
p.add_argument("--rpo-beta", type=positive_float, default=0.03, help="implicit reward scale (LN-Nano 3e-2, LN-Super 1e-5)")
p.add_argument("--rpo-eta", type=positive_float, default=1.0, help="reward margin scale (LN-Super 3)")
p.add_argument("--online", type=nonneg_int, default=0, help="online RPO iterations (0: offline from --pairs; LN-Super 2)")
p.add_argument("--pairs-per-step", type=positive_int, default=8, help="pairs per optimizer step, all ranks (rpo, reward model)")
p.add_argument("--min-margin", type=nonneg_float, default=0.0, help="online pairs: best - worst reward must exceed this")
# reward model
p.add_argument("--num-pairs", type=positive_int, default=512, help="pairs written to a new pairs file")
p.add_argument("--heldout-kind", default="truncated", choices=list(KINDS) + ["none"],
               help="pair kind left out of training and measured on held-out pairs: what the model does not know")
p.add_argument("--policy-pairs", type=nonneg_int, default=0, help="+ pairs of the policy's samples on this many "
               "prompts, best and worst by the verifiers")
# optimization
p.add_argument("--lr", type=nonneg_float, default=None, help="default per algorithm")
p.add_argument("--warmup-steps", type=nonneg_int, default=0)
p.add_argument("--weight-decay", type=nonneg_float, default=0.0)
p.add_argument("--grad-clip", type=positive_float, default=1.0)
p.add_argument("--micro-batch", type=positive_int, default=8, help="completions (rpo, reward model: pairs) per forward")
add_dtype_arg(p)
p.add_argument("--seed", type=nonneg_int, default=0)
add_save_every_arg(p, 4, "steps (online: iterations)")
p.add_argument("--resume", action="store_true", help="continue from the last state in <out>.state/")
# evaluation
p.add_argument("--eval-if", type=nonneg_int, default=100, help="held-out instruction prompts (0 = skip)")
p.add_argument("--eval-if-modes", default="off", choices=["off", "on", "on,off"], help="toggle modes of the IF eval")
p.add_argument("--eval-math", type=nonneg_int, default=50, help="held-out math problems per mode (0 = skip)")
p.add_argument("--eval-pairs", type=nonneg_int, default=200, help="held-out pairs for the reward model (0 = skip)")
p.add_argument("--no-eval-rm", action="store_true", help="skip the reward model's score of the eval answers")
p.add_argument("--eval-max-new-tokens", type=positive_int, default=320)
p.add_argument("--eval-max-new-tokens-off", type=positive_int, default=96)
p.add_argument("--eval-batch-size", type=positive_int, default=32)
p.add_argument("--before-from", default=None, help="an earlier 07 run of the same --policy, evaluation and reward "
               "model whose before-training evaluation to reuse (a loss ablation)")
p.add_argument("--samples-every", type=positive_int, default=4, help="steps between W&B sample tables")
p.add_argument("--run-dir", default=None, help="where metrics/<name>.json goes (default: the parent of --out)")
p.add_argument("--metrics-name", default=None, help="default rlhf_<algo> (rpo: rlhf_rpo_<loss>[_online])")
add_gen_cache_args(p)
add_wandb_args(p)
args = p.parse_args()

# ----------------------------------------------------------------------------
# Validation: every flag and everything read from disk checked before the first model loads; then the
# per-algorithm defaults of the None flags

if args.train_reward_model == (args.algo is not None):
    die("give exactly one of --algo rloo|rpo|grpo-rm and --train-reward-model")
algo = "reward_model" if args.train_reward_model else args.algo
if algo == "grpo-rm" and not args.reward_model:
    die("--algo grpo-rm needs --reward-model DIR (train one with --train-reward-model)")
if args.online and algo != "rpo":
    die(f"--online {args.online} is for --algo rpo (got {algo})")
if args.k < 2 and (algo in ("rloo", "grpo-rm") or args.online or args.policy_pairs):
    die(f"--k {args.k}: a group of one has no baseline and no pair; use e.g. --k 4")
if args.generator == "vllm" and algo == "reward_model":
    die("--generator vllm decodes a policy's rollouts and evaluations; --train-reward-model decodes none: drop the flag")
try:
    check_generator_args(args)
except ValueError as e:
    die(e)
DEFAULTS = {"rloo": dict(lr=1e-5, beta=0.05, loss_type="dapo", steps=16),
            "grpo-rm": dict(lr=1e-5, beta=1e-3, loss_type="grpo", steps=16),
            "rpo": dict(lr=5e-6, steps=16), "reward_model": dict(lr=2e-5, steps=64)}
for k, v in DEFAULTS[algo].items():
    if getattr(args, k) is None:
        setattr(args, k, v)
        print0(f"--{k.replace('_', '-')} {v} (the {algo} default)")
if args.metrics_name is None:
    args.metrics_name = {"rpo": f"rlhf_rpo_{args.rpo_loss}" + ("_online" if args.online else "")}.get(
        algo, f"rlhf_{algo.replace('-', '_')}")
user_config = vars(args).copy()
run_dir = args.run_dir or os.path.dirname(os.path.abspath(args.out))
pairs_path = args.pairs or os.path.join(args.data, "preference_pairs.jsonl")
offline = algo == "reward_model" or (algo == "rpo" and not args.online)
file_pairs = None
try:  # everything read from disk is checked before the first model loads
    policy_meta = load_meta(args.policy)
    if args.reward_model:
        check_reward_model(args.reward_model)
    if offline and (args.pairs is not None or os.path.exists(pairs_path)):
        file_pairs = read_pairs(pairs_path)
    states = RunStates(args.out, user_config, resume=args.resume,
                       budget_keys=("steps", "online", "save_every", "no_gen_cache"), keep=3)
    check_metrics_free(run_dir, args.metrics_name, args.out)
    gen_cache = open_gen_cache(run_dir, args)
    reused_before = None
    if args.before_from and algo != "reward_model":  # what the earlier run must share with this one
        keys = ("policy", "reward_model", "no_eval_rm", "eval_if", "eval_if_modes", "eval_math", "eval_max_new_tokens",
                "eval_max_new_tokens_off")
        reused_before = load_meta_matching(args.before_from, ("rlhf_rloo", "rlhf_rpo", "rlhf_grpo-rm"), vars(args),
                                           keys).get("before")
        if not reused_before:
            die(f"--before-from {args.before_from} holds no before-training evaluation; drop the flag to evaluate here")
except (CheckpointError, ValueError) as e:
    die(e)
# where RPO's rewards come from: the reward model, else the file's, else the verifiers (online: model or verifier)
reward_source = None
if algo == "rpo" and (args.rpo_loss != "dpo" or args.online):
    reward_source = "reward model" if args.reward_model else "verifier"
    if offline and not args.reward_model and file_pairs is not None:
        if all("chosen_reward" in r and "rejected_reward" in r for r in file_pairs):
            reward_source = "file"
        else:
            blind = next((i for i, r in enumerate(file_pairs) if not (r.get("constraints") or r.get("answer"))), None)
            if blind is not None:
                die(f"{pairs_path}: pair {blind + 1} ({file_pairs[blind]['id']}) has no chosen_reward/rejected_reward "
                    f"and nothing a verifier can check (constraints or answer); pass --reward-model DIR, add the "
                    f"rewards, or use --rpo-loss dpo")

# ----------------------------------------------------------------------------
# Init

ddp, rank, local_rank, world_size, device = compute_init(args.seed)
dtype = resolve_dtype(args.dtype, device)
wandb_run = init_wandb(args.wandb_project, args.run_name or args.metrics_name, user_config, mode=args.wandb_mode)
model, tokenizer = load_checkpoint(args.policy, dtype=torch.float32, device=device)  # fp32 master weights
if not all(torch.isfinite(w).all() for w in model.parameters()):  # sampling would fail deep inside generate
    die(f"{args.policy} holds non-finite weights; start from a checkpoint whose training did not diverge")
pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
eot = end_of_turn_id(tokenizer)
rm = trained = None
if algo == "reward_model":
    rm = trained = RewardModel(model)  # the backbone trains with its head
elif args.reward_model:
    rm, rm_tok = load_reward_model(args.reward_model, device=device)
    rm.requires_grad_(False)
    if rm_tok.get_vocab() != tokenizer.get_vocab():
        die(f"--reward-model {args.reward_model} has another tokenizer than --policy {args.policy}; train the reward "
            f"model from a checkpoint of the same line")
ref_model = None
if algo == "rpo" or (algo in ("rloo", "grpo-rm") and args.beta > 0):  # the frozen initial policy
    ref_model = load_checkpoint(args.policy, dtype=torch.float32, device=device, with_tokenizer=False)[0]
    ref_model.requires_grad_(False)
trained = trained or model
# the sampler of rloo / grpo-rm / online rpo and the decoder of every policy evaluation: the policy itself, or a
# colocated vLLM engine synced after every update (offline RPO: before each evaluation)
generator = rollout_generator(args, args.policy, model, dtype, args.seed) if algo != "reward_model" else model
print0(f"{algo}: policy {args.policy} (stage {policy_meta.get('stage')}); reward model {args.reward_model or '-'}; "
       f"compute dtype {dtype}; world size {world_size}"
       + (f"; sampler {'vLLM' if generator is not model else 'HF generate'}" if algo != "reward_model" else "")
       + (f"; RPO rewards from the {reward_source}" if reward_source else ""))

# ----------------------------------------------------------------------------
# Prompts and pairs: training data never shares a meaning with an evaluation prompt

policy_eval = algo != "reward_model"
eval_if_set = generate_instructions(args.eval_if, 0, heldout=True) if args.eval_if and policy_eval else []
eval_math_set = eval_problems(args.eval_math, 0) if args.eval_math and policy_eval else []
heldout = heldout_prompts(max(500, args.eval_if, args.eval_pairs), math_sizes=(args.eval_math, args.eval_pairs))
if_modes = args.eval_if_modes.split(",")


def prompt_text(r) -> str:
    return render_prompt(tokenizer, build_messages(r["input"], r["on"]))


def verify(r, text) -> dict:
    return verifier_reward(text, r["on"], r.get("constraints"), r.get("answer"), args.all_met, args.w_format)


def prompt_pool(n: int) -> list[dict]:
    """n training prompts (instruction following, and math with --math-fraction), shuffled, each with its mode."""
    n_math = round(n * args.math_fraction)
    chat = rl_instructions(n - n_math, args.seed, exclude=[q for q in heldout if q.get("constraints")])
    math_ = rl_problems(n_math, args.seed, exclude=[q for q in heldout if not q.get("constraints")]) if n_math else []
    rng = random.Random(f"pool:{args.seed}")
    recs = [{"id": q["id"], "input": q["question"], "constraints": q.get("constraints"), "answer": q.get("answer")}
            for q in chat + math_]
    rng.shuffle(recs)
    for r in recs:
        r["on"] = rng.random() < args.on_fraction
    return recs


def encode(texts: list[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []


def pair_ids(recs: list[dict]) -> Pairs:
    """File pairs -> token ids: the rendered prompt, each answer followed by the end-of-turn token unless the pair
    says it was cut off (chosen_ended / rejected_ended false)."""
    for r in recs:
        r["on"] = r["reasoning"] == "on"
    prompts = encode([prompt_text(r) for r in recs])
    chosen, rejected = ([ids + ([eot] if r.get(f"{k}_ended", True) else []) for r, ids in zip(recs, encode([r[k] for r in recs]))]
                        for k in ("chosen", "rejected"))
    return Pairs(prompts, chosen, rejected)


def sample_pairs(recs: list[dict], score_with_rm: bool) -> tuple[list[dict], Pairs, float]:
    """k answers per prompt from the current policy; each prompt's best and worst answer (by the reward model, else
    the verifier) become a pair when their rewards differ by more than --min-margin. Returns (pair records for
    logging, Pairs, mean reward of all answers)."""
    order, ro = sample_by_mode(generator, tokenizer, [prompt_text(r) for r in recs], [r["on"] for r in recs], args.k,
                               args.max_new_tokens, args.max_new_tokens_off, args.temperature, args.top_p,
                               args.gen_batch_size, dtype) if recs else ([], Rollout([], [], [], args.k))
    rows = [recs[i] for i in order for _ in range(args.k)]
    if score_with_rm:
        rewards = reward_scores(rm, ro.prompt_ids, ro.completion_ids, pad_id, args.micro_batch, dtype).tolist()
    else:
        rewards = [verify(r, t)["reward"] for r, t in zip(rows, ro.texts)]
    ends = {eot, tokenizer.eos_token_id}
    logs, keep = [], []
    for g, i in enumerate(order):
        rs = rewards[g * args.k:(g + 1) * args.k]
        best, worst = g * args.k + rs.index(max(rs)), g * args.k + rs.index(min(rs))
        if max(rs) - min(rs) > args.min_margin:
            keep.append((best, worst))
            r = recs[i]
            logs.append({"id": f"policy-{r['id']}-{'on' if r['on'] else 'off'}", "kind": "policy_sample",
                         "input": r["input"], "reasoning": "on" if r["on"] else "off",
                         "constraints": json.dumps(r["constraints"]) if r.get("constraints") else None,
                         "answer": r.get("answer"), "chosen": ro.texts[best], "rejected": ro.texts[worst],
                         "chosen_ended": ro.completion_ids[best][-1:] != [] and ro.completion_ids[best][-1] in ends,
                         "rejected_ended": ro.completion_ids[worst][-1:] != [] and ro.completion_ids[worst][-1] in ends,
                         "chosen_reward": rewards[best], "rejected_reward": rewards[worst]})
    pairs = Pairs([ro.prompt_ids[b] for b, _ in keep], [ro.completion_ids[b] for b, _ in keep],
                  [ro.completion_ids[w] for _, w in keep], torch.tensor([float(rewards[b]) for b, _ in keep]),
                  torch.tensor([float(rewards[w]) for _, w in keep]))
    return logs, pairs, sum(rewards) / max(1, len(rewards))


def pair_rewards(recs: list[dict], pairs: Pairs) -> Pairs:
    """Fill in RPO's rewards (reward_source) for a batch of file pairs."""
    if reward_source == "reward model":
        pairs.reward_chosen = reward_scores(rm, pairs.prompt_ids, pairs.chosen_ids, pad_id, args.micro_batch, dtype)
        pairs.reward_rejected = reward_scores(rm, pairs.prompt_ids, pairs.rejected_ids, pad_id, args.micro_batch, dtype)
    elif reward_source == "file":
        pairs.reward_chosen = torch.tensor([float(r["chosen_reward"]) for r in recs])
        pairs.reward_rejected = torch.tensor([float(r["rejected_reward"]) for r in recs])
    elif reward_source == "verifier":
        pairs.reward_chosen = torch.tensor([verify(r, r["chosen"])["reward"] for r in recs])
        pairs.reward_rejected = torch.tensor([verify(r, r["rejected"])["reward"] for r in recs])
    return pairs


try:
    if offline and file_pairs is None:  # the default pairs file, written once (rank 0), read by every rank
        if rank == 0:
            kinds = [k for k in KINDS if k != args.heldout_kind]
            write_pairs(pairs_path, preference_pairs(args.num_pairs, args.seed, kinds=kinds, exclude=heldout))
            print0(f"wrote {args.num_pairs} preference pairs ({', '.join(kinds)}) to {pairs_path}")
        if ddp:
            torch.distributed.barrier()
        file_pairs = read_pairs(pairs_path)
except ValueError as e:
    die(e)
pool = prompt_pool(args.num_prompts) if not offline or args.policy_pairs else []
if algo == "reward_model":
    dropped = sum(r.get("kind") == args.heldout_kind for r in file_pairs)
    file_pairs = [r for r in file_pairs if r.get("kind") != args.heldout_kind]
    policy_pairs_path = args.out.rstrip("/") + ".policy_pairs.jsonl"  # kept for --resume, then moved into the output
    if rank == 0 and not args.resume and os.path.exists(policy_pairs_path):
        os.remove(policy_pairs_path)  # a fresh run samples its own (this one is from a run killed before its first state)
    if args.policy_pairs and not os.path.exists(policy_pairs_path) and rank == 0:
        logs = sample_pairs(pool[:args.policy_pairs], score_with_rm=False)[0]
        write_pairs(policy_pairs_path, logs)
        print0(f"policy samples: {len(logs)} pairs from {args.policy_pairs} prompts (verifier-ranked)")
    if ddp:
        torch.distributed.barrier()
    if args.policy_pairs:
        file_pairs += read_pairs(policy_pairs_path)
    print0(f"reward model: {len(file_pairs)} training pairs ({dropped} of held-out kind {args.heldout_kind} dropped)")
if offline and not file_pairs:
    die(f"{pairs_path}: no training pairs left (every pair is of --heldout-kind {args.heldout_kind}?)")


# a fixed order of work, so a resumed run continues the same batches
if offline:
    per_epoch = len(file_pairs)
    order_rng = random.Random(f"pairs:{args.seed}")
    epochs = -(-args.steps * args.pairs_per_step // per_epoch)
    pair_order = [i for _ in range(epochs) for i in order_rng.sample(range(per_epoch), per_epoch)]
else:
    need = (args.online * args.steps * args.pairs_per_step) if args.online else args.steps * args.prompts_per_step
    schedule = [pool[i % len(pool)] for i in range(need)]
total = args.online or args.steps  # units of the loop: iterations (online rpo) or steps

# ----------------------------------------------------------------------------
# Evaluation (rank 0): held-out instruction following (+ the reward model's score), math on/off, or held-out pairs


def eval_policy(m) -> dict:
    """Per-prompt lists (so gains can be paired): if_<mode> {met, all_met, format[, rm_score]}, math_<mode>. Greedy
    answers the run's generation cache holds for these weights (the previous stage's "after") are reused."""
    if not (eval_if_set or eval_math_set):
        return {}
    engine = generator if generator is not m else None  # vLLM decodes, synced with these weights first
    if engine is not None:
        engine.update_weights(m)
    m.eval()
    out = {}
    with autocast_ctx(device, dtype):
        for mode in if_modes if eval_if_set else ():
            recs = [{"input": q["question"], "constraints": q["constraints"], "on": mode == "on"} for q in eval_if_set]
            prompts = [prompt_text(r) for r in recs]
            budget = args.eval_max_new_tokens if mode == "on" else args.eval_max_new_tokens_off
            outs = greedy_generate(m, tokenizer, prompts, budget, args.eval_batch_size, cache=gen_cache, engine=engine)
            scored = [verifier_reward(t, r["on"], r["constraints"]) for r, (t, _) in zip(recs, outs)]
            res = {"met": [s["score"] for s in scored], "all_met": [s["correct"] for s in scored],
                   "format": [s["format"] for s in scored], "samples": [[q, t] for q, (t, _) in zip(prompts[:3], outs)]}
            if rm is not None and not args.no_eval_rm and algo != "reward_model":
                res["rm_score"] = reward_scores(rm, encode(prompts), [ids for _, ids in outs], pad_id,
                                                args.micro_batch, dtype).tolist()
            out[f"if_{mode}"] = res
        for mode in ("on", "off") if eval_math_set else ():
            r = generation_eval(m, tokenizer, eval_math_set, reasoning=mode == "on", batch_size=args.eval_batch_size,
                                cache=gen_cache, engine=engine,
                                max_new_tokens=args.eval_max_new_tokens if mode == "on" else args.eval_max_new_tokens_off)
            out[f"math_{mode}"] = {"correct": [float(c) for c in r["correct"]], "format_compliance": r["format_compliance"],
                                   "mean_response_tokens": r["mean_response_tokens"]}
    m.train()
    return out


eval_pairs = preference_pairs(args.eval_pairs, 0, heldout=True) if algo == "reward_model" and args.eval_pairs else []


def eval_reward_model() -> dict:
    """Pairwise accuracy on held-out pairs, per kind (the --heldout-kind one was never trained on)."""
    if not eval_pairs:
        return {}
    ids = pair_ids(eval_pairs)
    acc = pairwise_accuracy(rm, ids.prompt_ids, ids.chosen_ids, ids.rejected_ids, pad_id, args.micro_batch, dtype)
    return {"accuracy": acc, "kinds": [r["kind"] for r in eval_pairs]}


def evaluate() -> dict:
    if rank != 0:
        return {}
    return eval_reward_model() if algo == "reward_model" else eval_policy(model)


# ----------------------------------------------------------------------------
# Optimizer, resume

optimizer = make_adamw(trained.named_parameters(), args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
loss_cfg = PolicyLossConfig(loss_type=args.loss_type, eps_low=args.eps_low, eps_high=args.eps_high,
                            beta=args.beta if algo == "grpo-rm" else 0.0, steps_per_rollout=args.steps_per_rollout,
                            micro_batch=args.micro_batch, grad_clip=args.grad_clip, max_new_tokens=args.max_new_tokens,
                            dtype=dtype, is_mode=args.is_correction, is_cap=args.is_cap)
pref_cfg = PreferenceConfig(loss_type=args.rpo_loss, beta=args.rpo_beta, eta=args.rpo_eta,
                            micro_batch=max(1, args.micro_batch // 2), grad_clip=args.grad_clip, dtype=dtype)
start, history, before = 0, [], {}
if args.resume:
    st = states.load(trained, optimizer)
    start, history, before = int(st["step"]), json.loads(st["history_json"]), json.loads(st["before_json"])
    print0(f"resumed from {states.latest()}: {start} of {total} {'iterations' if args.online else 'steps'}")
    if generator is not model:
        generator.update_weights(model)
elif reused_before is not None:
    before = reused_before if rank == 0 else {}
    print0(f"evaluation before: reused from {args.before_from}")
else:
    t0 = time.time()
    before = evaluate()
    print0(f"evaluation before: {time.time() - t0:.0f} s")

check_finite = states.update_check(trained, algo)

# ----------------------------------------------------------------------------
# Training loop: one unit = a rollout step (rloo, grpo-rm), an optimizer step (offline rpo, reward model), or an
# iteration of sampling + --steps optimizer steps (online rpo)


def rollout_step(batch: list[dict]) -> tuple[dict, list]:
    """RLOO or GRPO-vs-RM on this rank's prompts: sample k per prompt, reward, update."""
    order, ro = sample_by_mode(generator, tokenizer, [prompt_text(r) for r in batch], [r["on"] for r in batch], args.k,
                               args.max_new_tokens, args.max_new_tokens_off, args.temperature, args.top_p,
                               args.gen_batch_size, dtype) if batch else ([], Rollout([], [], [], args.k))
    rows = [batch[i] for i in order for _ in range(args.k)]
    scored = [verify(r, t) for r, t in zip(rows, ro.texts)]
    all_rows, adv, old, kl = list(range(len(rows))), None, None, torch.zeros(len(rows))
    if algo == "grpo-rm":
        rewards = reward_scores(rm, ro.prompt_ids, ro.completion_ids, pad_id, args.micro_batch, dtype)
        raw = rewards.clone()
    else:
        raw = torch.tensor([s["reward"] for s in scored], dtype=torch.float32)
        if args.beta > 0:  # TRL's RLOO: the KL to the initial policy is part of the reward
            model.eval()
            old = rollout_logprobs(model, ro, all_rows, pad_id, device, args.micro_batch, dtype)
            kl = sequence_kl(old, rollout_logprobs(ref_model, ro, all_rows, pad_id, device, args.micro_batch, dtype), all_rows)
        rewards = raw - args.beta * kl
        adv = rloo_advantages(rewards, args.k)
    st = train_on_rollout(model, optimizer, ro, rewards, loss_cfg, device, pad_id,
                          ref_model if algo == "grpo-rm" else None, check_finite, advantages=adv, old_logprobs=old)
    n = max(1.0, all_reduce_sum(float(len(rows))))
    rec = {"prompt_ids": [r["id"] for r in batch], "reward": all_reduce_sum(float(raw.sum())) / n,
           "fraction_met": all_reduce_sum(sum(s["score"] for s in scored)) / n,
           "all_met": all_reduce_sum(sum(s["correct"] for s in scored)) / n,
           "format": all_reduce_sum(sum(s["format"] for s in scored)) / n,
           "kl_seq": all_reduce_sum(float(kl.sum())) / n, "kl_ref": st["kl_ref"],
           "completion_tokens": all_reduce_sum(float(ro.num_tokens)) / n,
           "zero_signal_frac": all_reduce_sum(float(st["zero_signal_groups"])) / max(1.0, all_reduce_sum(float(st["groups"]))),
           "clip_fraction": st["clip_fraction"], "loss": st["loss"], "grad_norm": st["grad_norm"],
           "gen_s": ro.gen_seconds, "train_s": st["train_seconds"],
           "is_log_ratio": st["is_log_ratio"], "is_masked_fraction": st["is_masked_fraction"]}
    samples = [("on" if r["on"] else "off", prompt_text(r), t, float(x))
               for r, t, x in list(zip(rows, ro.texts, raw.tolist()))[::args.k][:2]]
    return rec, samples


def pair_step(step: int) -> tuple[dict, list]:
    """One optimizer step on the next --pairs-per-step file pairs (this rank's share): RPO or the reward model."""
    idx = shard_list(pair_order[step * args.pairs_per_step:(step + 1) * args.pairs_per_step], rank, world_size)
    recs = [file_pairs[i] for i in idx]
    pairs = pair_ids(recs)
    if algo == "reward_model":
        st = train_reward_model_step(rm, optimizer, pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids, pad_id,
                                     args.micro_batch, args.grad_clip, dtype, check_finite)
        return st, []
    st = train_on_pairs(model, optimizer, pair_rewards(recs, pairs), pref_cfg, device, pad_id, ref_model, check_finite)
    rc = pairs.reward_chosen.tolist() if pairs.reward_chosen is not None else [None] * len(recs)
    rr = pairs.reward_rejected.tolist() if pairs.reward_rejected is not None else [None] * len(recs)
    return st, [(r["reasoning"], prompt_text(r), r["chosen"], r["rejected"], a, b) for r, a, b in zip(recs, rc, rr)][:2]


def online_iteration(it: int) -> tuple[dict, list]:
    """Online RPO: sample pairs from the current policy on this iteration's prompts, then --steps optimizer steps."""
    n_prompts = args.steps * args.pairs_per_step
    batch = shard_list(schedule[it * n_prompts:(it + 1) * n_prompts], rank, world_size)
    logs, pairs, mean_r = sample_pairs(batch, score_with_rm=reward_source == "reward model")
    chunks = [list(range(len(pairs)))[s::args.steps] for s in range(args.steps)]  # same step count on every rank
    stats = [train_on_pairs(model, optimizer, pairs.select(c), pref_cfg, device, pad_id, ref_model, check_finite)
             for c in chunks]
    done = [s for s in stats if s["optimizer_steps"]]
    rec = {"sampled_reward": all_reduce_sum(mean_r * len(batch)) / max(1.0, all_reduce_sum(float(len(batch)))),
           "pairs": int(all_reduce_sum(float(len(pairs)))), "optimizer_steps": len(done),
           "loss": sum(s["loss"] for s in done) / max(1, len(done)),
           "pref_accuracy": sum(s["pref_accuracy"] for s in done) / max(1, len(done)),
           "reward_margin": sum(s["reward_margin"] or 0.0 for s in done) / max(1, len(done)),
           "grad_norm": max((s["grad_norm"] for s in done), default=None)}
    return rec, [(lg["reasoning"], lg["input"], lg["chosen"], lg["rejected"], lg["chosen_reward"], lg["rejected_reward"])
                 for lg in logs[:2]]


columns = {"rloo": ["step", "mode", "prompt", "completion", "reward"], "grpo-rm": ["step", "mode", "prompt", "completion", "rm_score"],
           "rpo": ["step", "mode", "prompt", "chosen", "rejected", "r_chosen", "r_rejected"]}.get(algo)
sample_rows, t_start = [], time.time()
with progress(range(start, total), desc=algo, unit="iteration" if args.online else "step", initial=start, total=total) as bar:
    for step in bar:
        lr = lr_at(step, total, args.lr, args.warmup_steps, args.lr)  # warmup, then constant
        set_lr(optimizer, lr)
        try:
            if args.online:
                rec, samples = online_iteration(step)
            elif offline:
                rec, samples = pair_step(step)
            else:
                rec, samples = rollout_step(shard_list(schedule[step * args.prompts_per_step:(step + 1) * args.prompts_per_step],
                                                       rank, world_size))
            check_finite_weights(trained, where=f"{algo} step {step + 1}")
            if generator is not model:
                generator.update_weights(model)  # colocated vLLM: the next rollout samples from the updated policy
        except NonFiniteError as e:
            die(e)
        rec = {"step": step + 1, "lr": lr, **rec}
        history.append(rec)
        wandb_run.log({f"{algo}/{k}": v for k, v in rec.items() if isinstance(v, (int, float))}, step=step + 1)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({k: f"{rec[k]:.3f}" for k in ("reward", "sampled_reward", "loss", "accuracy") if rec.get(k) is not None})
        sample_rows += [(step + 1, *s) for s in samples]
        if columns and (step + 1) % args.samples_every == 0 and not isinstance(wandb_run, DummyWandb):
            wandb_run.log({f"{algo}/samples": wandb_table(columns, sample_rows)}, step=step + 1)
        if rank == 0 and args.save_every > 0 and (step + 1) % args.save_every == 0 and step + 1 < total:
            states.save(step + 1, trained, optimizer, history_json=json.dumps(history), before_json=json.dumps(before))

# ----------------------------------------------------------------------------
# Evaluate after, save, report


def summarize(before: dict, after: dict) -> dict:
    """Means with standard errors before and after, and paired gains (the same prompts, greedy)."""
    out = {}
    for name in sorted(set(before) | set(after)):
        if name.startswith("math_"):
            fields = {"accuracy": "correct"}
        elif name.startswith("if_"):
            fields = {"all_met": "all_met", "fraction_met": "met", "format_compliance": "format", "rm_score": "rm_score"}
        else:  # the reward model's held-out pairs: overall on trained kinds, and per kind
            continue
        for key, field in fields.items():
            for when, res in (("before", before), ("after", after)):
                if field in res.get(name, {}):
                    out[f"{when}_{name}_{key}"], out[f"{when}_{name}_{key}_se"] = mean_se(res[name][field])
            if field in before.get(name, {}) and field in after.get(name, {}):
                d = [a - b for a, b in zip(after[name][field], before[name][field])]
                out[f"gain_{name}_{key}"], out[f"gain_{name}_{key}_se"] = mean_se(d)
        if name.startswith("math_"):
            for when, res in (("before", before), ("after", after)):
                if name in res:
                    out[f"{when}_{name}_format_compliance"] = res[name]["format_compliance"]
    if "accuracy" in after:  # reward model
        for when, res in (("before", before), ("after", after)):
            if not res:
                continue
            seen = [a for a, k in zip(res["accuracy"], res["kinds"]) if k != args.heldout_kind]
            out[f"{when}_heldout_accuracy"], out[f"{when}_heldout_accuracy_se"] = mean_se(seen)
            for kind in KINDS:
                out[f"{when}_accuracy_{kind}"] = mean_se([a for a, k in zip(res["accuracy"], res["kinds"]) if k == kind])[0]
        out["unseen_kind"] = args.heldout_kind
    return out


if rank == 0:
    t0 = time.time()
    after = evaluate()
    metrics = {"algo": algo, "policy": args.policy, "reward_model": args.reward_model, "steps": args.steps,
               "online_iterations": args.online, "rpo_loss": args.rpo_loss if algo == "rpo" else None,
               "reward_source": reward_source, "train_wall_s": round(time.time() - t_start, 1),
               "eval_if_prompts": len(eval_if_set), "eval_math_problems": len(eval_math_set), "eval_pairs": len(eval_pairs),
               **summarize(before, after)}
    for k in ("reward", "sampled_reward", "loss", "accuracy", "pref_accuracy"):
        if history and history[-1].get(k) is not None:
            metrics[f"final_{k}"] = history[-1][k]
    if args.online:
        metrics["sampled_reward_per_iteration"] = [h["sampled_reward"] for h in history]
    samples = {k: v.get("samples") for k, v in after.items() if isinstance(v, dict) and "samples" in v}
    meta = {"parent": policy_meta.get("parent") or args.policy, "init": args.policy, "reward_model": args.reward_model,
            "pairs": pairs_path if offline else None, "metrics": metrics, "history": history, "samples": samples,
            "before": before}  # per-item results: --before-from of a later ablation reuses them
    if algo == "reward_model":  # the policy samples it trained on travel with it
        metrics["report"] = reward_model_tables(metrics, args.metrics_name)
        extra = {"policy_pairs.jsonl": lambda path: shutil.copy(policy_pairs_path, path)} if args.policy_pairs else None
        save_reward_model(rm, tokenizer, args.out, args=user_config, meta=meta, extra_files=extra)
        if args.policy_pairs:
            os.remove(policy_pairs_path)
        if not isinstance(wandb_run, DummyWandb) and after:
            wandb_run.log({"reward_model/heldout_pairs": wandb_table(
                ["kind", "mode", "prompt", "chosen", "rejected", "right"],
                [(r["kind"], r["reasoning"], r["input"][0]["content"], r["chosen"], r["rejected"], a)
                 for r, a in list(zip(eval_pairs, after["accuracy"]))[:100]])})
    else:
        metrics["report"] = rlhf_tables(metrics, args.metrics_name)
        save_checkpoint(model, tokenizer, args.out, stage=f"rlhf_{algo}", args=user_config, meta=meta)
    write_metrics(run_dir, args.metrics_name, metrics, out=args.out)
    states.finish()
    print0("\n" + "\n".join(metrics["report"]))
    if algo == "rpo" and not args.online:  # every offline RPO run of this policy and budget side by side: the loss
        losses = rpo_loss_table(read_run_metrics(run_dir).values(), args.policy, args.steps)
        if losses:  # one file, rewritten by each such run, so the report shows the table once, after the last
            write_metrics(run_dir, "rlhf_rpo_losses", {"report": losses})
            print0("\n".join(losses))
    print0(f"checkpoint: {args.out}; metrics: {os.path.join(run_dir, 'metrics', args.metrics_name + '.json')}")
wandb_run.finish()
if generator is not model:
    generator.shutdown()  # before compute_cleanup: under torchrun the engine's groups hang off ours
compute_cleanup()
