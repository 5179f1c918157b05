"""One GRPO step of ours (common.rl) vs TRL's GRPOTrainer: same model, prompts, G, length, loss, dtype; one run.

    pip install -r requirements-bench.txt                  # TRL, optional (the benchmark's only extra dependency)
    python benchmarks/bench_grpo.py                        # SmolLM2 parent, 4 prompts x 8 completions x 64 tokens
    python benchmarks/bench_grpo.py --threads 1            # the same while another CPU job runs
    python benchmarks/bench_grpo.py --rounds 1 --max-new-tokens 8 --dtype float32    # quick look
    .venv-vllm/bin/python benchmarks/bench_grpo.py --sides ours,vllm --model runs/smol/sft_parent   # per generator

Sides (--sides, any of them, timed in alternating order): `ours` (our trainer, our decoder on the policy itself),
`vllm` (our trainer, rollouts sampled by a colocated vLLM engine: 06_grpo.py --generator vllm; needs install_vllm.sh's
venv) and `trl` (TRL's GRPOTrainer, HF generate; needs requirements-bench.txt).

One step = sample G completions for each prompt (temperature 1, top_p 1, top_k 0: the full distribution), score
them (common.rewards.math_reward, thinking on), group-normalized advantages, the clipped surrogate with the `grpo`
normalization (per-sequence token mean, then the batch mean), beta = 0 (no reference model), one optimizer step
(AdamW, not fused, grad clip 1.0) over all 4 x G completions in micro-batches of --micro-batch.

  ours  sample_rollout -> math_reward -> train_on_rollout (PolicyLossConfig(steps_per_rollout=1)), timed as a whole.
  vllm  the engine takes this round's fresh weights (VLLMGenerator.update_weights + prefix-cache reset: the sync 06
        runs after every optimizer step, timed as "sync"), samples the rollout with the sampler's log-probs, then the
        same math_reward -> train_on_rollout, with 06's default importance-sampling correction (sequence mask, cap 3;
        pi_old is the training forward's own detached log-probs, as on our side, so it adds no forward).
  TRL   GRPOTrainer(max_steps=1).train(), timed from the callback's on_step_begin to its on_step_end: the window
        holds TRL's own generation (inside training_step / _prepare_inputs), reward, the per_device_train_batch_size
        x gradient_accumulation_steps = 4 x G micro-batches, gradient clipping, optimizer step and zero_grad; the
        trainer's construction, dataloader and end-of-train bookkeeping stay outside it.

Both sides start every round from a fresh copy of the same float32 weights with a fresh optimizer (TRL: a new
trainer per round, built outside the timing), and take the same compute dtype: with bf16, ours runs under
common.dist.autocast_ctx (CPU autocast over float32 master weights) and TRL under `bf16=True` (accelerate's
autocast over float32 weights), for generation and training alike; the table's dtype line shows what a linear
layer of each side actually computed in. Settings matched on TRL that differ from its defaults:
gradient_checkpointing=False (TRL defaults it on; ours has none), optim="adamw_torch" (not fused, as ours); top_k=0
is TRL's default too. TRL runs our model class as is; only the backbone's output gets the attribute TRL's fused LM
head reads (adapt_for_trl).
Each side gets a warm-up round, then rounds alternate ours / TRL, the order flipping every round (ours-TRL,
TRL-ours, ...) so a trend in machine load hits both; the table reports medians, min-max and the per-round ratios
(each round's two steps ran back to back: on a machine whose load drifts, their median is the steadier figure).
Both seed torch with the same number each round, but their rows come in a different order, so the samples differ:
the table shows the completion tokens each side generated.

Groups whose rewards are all equal carry no gradient; ours drops them before the forward (common.rl), TRL runs
them. --reward dense adds a tiny length term to math_reward so no group is all-equal and both sides train on
every completion (the like-for-like training cost); --reward math is what 06_grpo.py optimizes.

Where the time goes (see the table's split): generation is ours (common.generate.decode, finished rows leave the
batch) vs HF `generate` over the same model; at 64 tokens from the untrained parent nearly every completion runs
to the limit, so the two cost about the same; TRL's extra time is in its training forward/backward, where its fused LM head runs
its torch fallback on CPU (the Triton kernel is CUDA/XPU only): it projects every prompt and completion position
(ours: only the completion's, logits_to_keep), also computes the entropy, and in the backward recomputes each
logits tile and does both gradient matmuls in float32.
"""

import argparse
import copy
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.checkpoint import load_checkpoint  # noqa: E402
from common.data import build_messages, render_prompt  # noqa: E402
from common.dist import resolve_dtype  # noqa: E402
from common.generate import load_generator  # noqa: E402
from common.optim import make_adamw  # noqa: E402
from common.rewards import math_reward  # noqa: E402
from common.rl import PolicyLossConfig, sample_rollout, train_on_rollout  # noqa: E402
from data_gen.math_problems import rl_problems  # noqa: E402


def reward_fn(kind: str):
    """text, gold -> float. 'dense': math_reward plus 1e-3 per character, so a group's rewards are (almost) never
    all equal; the same function serves both sides."""
    def score(text: str, gold) -> float:
        r = math_reward(text, gold, reasoning=True)["reward"]
        return r + 1e-3 * len(text) if kind == "dense" else r
    return score


class DtypeProbe:
    """Records the output dtype of one linear layer, separately with and without autograd (generation runs under
    no_grad / inference_mode, training with grad): the compute dtype each phase really used."""

    def __init__(self, model):
        layer = next(m for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
        self.seen = {"gen": set(), "train": set()}
        self.handle = layer.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.seen["train" if torch.is_grad_enabled() else "gen"].add(str(output.dtype).removeprefix("torch."))

    def summary(self) -> str:
        self.handle.remove()
        return " / ".join(",".join(sorted(self.seen[k])) or "-" for k in ("gen", "train"))


class BackboneOutput(tuple):
    """Our backbone returns (hidden, cache, hidden_states); TRL's fused LM head reads `.last_hidden_state` off the
    backbone's output. A tuple with that attribute serves both (our causal-LM forward unpacks it as before)."""

    @property
    def last_hidden_state(self):
        return self[0]


def adapt_for_trl(model):
    """The only change on TRL's copy: the backbone's output container (same modules, same computation)."""
    model.model.register_forward_hook(lambda module, args, out: BackboneOutput(out))
    return model


class OptimizerTimer:
    """Seconds inside optimizer.step (torch's step pre/post hooks)."""

    def __init__(self, optimizer):
        self.seconds, self._t = 0.0, 0.0
        optimizer.register_step_pre_hook(lambda *a: setattr(self, "_t", time.perf_counter()))
        optimizer.register_step_post_hook(self._done)

    def _done(self, *args):
        self.seconds += time.perf_counter() - self._t


# ----------------------------------------------------------------------------
# One step of each side


def ours_step(base, tok, prompts, answers, args, dtype, score, seed, engine=None) -> dict:
    """Our step; with `engine` (a colocated VLLMGenerator) the rollout is sampled by vLLM after syncing it with this
    round's weights."""
    model = copy.deepcopy(base)
    optimizer = make_adamw(model.named_parameters(), args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    opt_timer = OptimizerTimer(optimizer)
    probe = DtypeProbe(model)
    cfg = PolicyLossConfig(loss_type="grpo", beta=0.0, steps_per_rollout=1, micro_batch=args.micro_batch,
                           max_new_tokens=args.max_new_tokens, dtype=dtype)
    G = args.group_size
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if engine is not None:
        engine.update_weights(model)
    sync = time.perf_counter() - t0
    ro = sample_rollout(model if engine is None else engine, tok, prompts, group_size=G,
                        max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, batch_size=G * len(prompts),
                        dtype=dtype)
    t1 = time.perf_counter()
    rewards = torch.tensor([score(text, answers[i // G]) for i, text in enumerate(ro.texts)])
    t2 = time.perf_counter()
    stats = train_on_rollout(model, optimizer, ro, rewards, cfg, torch.device("cpu"), tok.pad_token_id)
    t3 = time.perf_counter()
    dtypes = probe.summary()  # gen / train; the engine's generation never passes through our model
    if engine is not None:
        dtypes = f"{engine.compute_setting} / {dtypes.split(' / ')[1]}"
    return {"total": t3 - t0, "sync": sync, "gen": ro.gen_seconds, "score": t2 - t1, "optimizer": opt_timer.seconds,
            "fwd_bwd": stats["train_seconds"] - opt_timer.seconds, "other": (t3 - t0) - sync - ro.gen_seconds
            - (t2 - t1) - stats["train_seconds"], "tokens": ro.num_tokens, "trained_groups": stats["groups"]
            - stats["zero_signal_groups"], "groups": stats["groups"], "dtype": dtypes}


def trl_step(base, tok, prompts, answers, args, dtype, score, seed, out_dir) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    G, n = args.group_size, len(prompts)
    timings = {"gen": 0.0, "score": 0.0, "optimizer": 0.0, "tokens": 0}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            timings["t0"] = time.perf_counter()

        def on_pre_optimizer_step(self, a, state, control, **kw):
            timings["t_opt"] = time.perf_counter()

        def on_optimizer_step(self, a, state, control, **kw):
            timings["optimizer"] += time.perf_counter() - timings["t_opt"]

        def on_step_end(self, a, state, control, **kw):
            timings["total"] = time.perf_counter() - timings["t0"]

    def accuracy_reward(prompts, completions, answer, **kw):  # TRL passes dataset columns as keyword arguments
        t = time.perf_counter()
        out = [score(c, a) for c, a in zip(completions, answer)]
        timings["score"] += time.perf_counter() - t
        return out

    model = adapt_for_trl(copy.deepcopy(base)).train()
    generate = model.generate

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        out = generate(*a, **kw)
        timings["gen"] += time.perf_counter() - t
        eos = kw["generation_config"].eos_token_id
        eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        for row in out[:, kw["input_ids"].shape[1]:].tolist():  # counted as ours: up to and including the first EOS
            timings["tokens"] += next((k + 1 for k, tid in enumerate(row) if tid in eos), len(row))
        return out

    model.generate = timed_generate
    probe = DtypeProbe(model)
    config = GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=dtype == torch.bfloat16, fp16=False, seed=seed,
        # one optimizer step = n prompts x G completions, in micro-batches of args.micro_batch
        num_generations=G, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=n * G // args.micro_batch, max_steps=1, num_iterations=1,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        loss_type="grpo", beta=0.0, epsilon=0.2, scale_rewards="group",
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False,
        report_to="none", logging_steps=10**6, save_strategy="no", eval_strategy="no", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0)
    data = Dataset.from_list([{"prompt": p, "answer": a} for p, a in zip(prompts, answers)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=model, reward_funcs=accuracy_reward, args=config, train_dataset=data,
                              processing_class=tok, callbacks=[StepTimer()])
        trainer.remove_callback(PrinterCallback)  # the end-of-train summary line
        torch.manual_seed(seed)
        trainer.train()
    t = timings
    t["fwd_bwd"] = t["total"] - t["gen"] - t["score"] - t["optimizer"]  # includes TRL's batch prep and bookkeeping
    t.update(sync=0.0, other=0.0, trained_groups=n, groups=n, dtype=probe.summary())
    del trainer, model
    gc.collect()
    return t


# ----------------------------------------------------------------------------
# Main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/smol/parent", help="a checkpoint of ours (both sides load it)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8, help="G completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8, help="completions per forward/backward, both sides")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--reward", choices=("math", "dense"), default="dense",
                   help="math: math_reward (06_grpo.py); dense: + a tiny length term, every group trains")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per side (after one warm-up each)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads; 1 where another job shares a 2-core machine (2 would oversubscribe it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sides", default="ours,trl",
                   help="comma list of ours (our decoder), vllm (colocated vLLM sampler), trl (TRL's GRPOTrainer)")
    args = p.parse_args(argv)
    sides_asked = args.sides.split(",")
    if len(sides_asked) < 2 or len(set(sides_asked)) != len(sides_asked) or set(sides_asked) - {"ours", "vllm", "trl"}:
        raise SystemExit(f"--sides {args.sides!r}: give two or three distinct sides of ours, vllm, trl "
                         "(e.g. ours,trl or ours,vllm)")
    n_rows = args.prompts * args.group_size
    if args.rounds < 1 or n_rows % args.micro_batch:
        raise ValueError(f"need --rounds >= 1 and prompts x group-size ({n_rows}) divisible by --micro-batch "
                         f"({args.micro_batch}); got --rounds {args.rounds}")
    versions = ""
    if "trl" in sides_asked:
        try:
            import trl
        except ImportError:
            raise SystemExit("--sides trl needs TRL: pip install -r requirements-bench.txt (or leave trl out)") \
                from None
        versions += f", trl {trl.__version__}"
    if "vllm" in sides_asked:
        try:
            import vllm
        except ImportError:
            raise SystemExit("--sides vllm needs vLLM: bash install_vllm.sh, then run with .venv-vllm/bin/python "
                             "(or leave vllm out)") from None
        versions += f", vllm {vllm.__version__}"
    import transformers
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, "cpu")

    base, tok = load_checkpoint(args.model)  # float32 master weights; each round deep-copies them
    problems = rl_problems(args.prompts, seed=0)
    prompts = [render_prompt(tok, build_messages(q["question"], True)) for q in problems]
    answers = [q["answer"] for q in problems]
    if tok(prompts)["input_ids"] != tok(prompts, add_special_tokens=False)["input_ids"]:
        raise ValueError("the tokenizer adds special tokens: TRL's prompt ids would differ from ours")
    score = reward_fn(args.reward)
    out_dir = tempfile.mkdtemp(prefix="bench_grpo_")
    print(f"{args.model}: {args.prompts} prompts x {args.group_size} completions x {args.max_new_tokens} new tokens, "
          f"micro-batch {args.micro_batch}, {str(dtype).removeprefix('torch.')}, {args.threads} threads, "
          f"reward {args.reward}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{versions.removeprefix(', ')}", flush=True)

    engine = None
    if "vllm" in sides_asked:  # one engine for all rounds, as 06 holds one for the whole stage (its start not timed)
        engine, _ = load_generator(args.model, dtype=dtype, backend="vllm", colocate=True, seed=args.seed)
    step = {"ours": lambda s: ours_step(base, tok, prompts, answers, args, dtype, score, s),
            "vllm": lambda s: ours_step(base, tok, prompts, answers, args, dtype, score, s, engine=engine),
            "trl": lambda s: trl_step(base, tok, prompts, answers, args, dtype, score, s, out_dir)}
    sides = {name: step[name] for name in sides_asked}
    results = {name: [] for name in sides}
    for r in range(-1, args.rounds):  # round -1: warm-up (first-call allocations, oneDNN primitives), not counted
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]  # A-B, B-A, ...: a load trend hits every side
        for name in order:
            res = sides[name](args.seed + max(r, 0))
            tag = "warm-up" if r < 0 else f"round {r + 1}/{args.rounds}"
            print(f"  {tag:<11} {name:<4} {res['total']:6.1f} s  (sync {res['sync']:4.2f}, gen {res['gen']:5.1f}, "
                  f"score {res['score']:4.2f}, fwd+bwd {res['fwd_bwd']:5.1f}, optimizer {res['optimizer']:4.2f}; "
                  f"{res['tokens']} tokens, "
                  f"{res['trained_groups']}/{res['groups']} groups trained)", flush=True)
            if r >= 0:
                results[name].append(res)

    # ----------------------------------------------------------------------------
    # Report
    def med(name, key):
        return statistics.median(x[key] for x in results[name])

    print("\n| side | step s (median) | min-max | sync | generation | scoring | fwd+bwd | optimizer | other | "
          "completion tokens | groups trained | compute dtype gen / train |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in sides:
        tot = [x["total"] for x in results[name]]
        print(f"| {name} | {med(name, 'total'):.2f} | {min(tot):.2f}-{max(tot):.2f} | {med(name, 'sync'):.2f} | "
              f"{med(name, 'gen'):.2f} | {med(name, 'score'):.3f} | {med(name, 'fwd_bwd'):.2f} | "
              f"{med(name, 'optimizer'):.2f} | {med(name, 'other'):.2f} | {med(name, 'tokens'):.0f} | "
              f"{med(name, 'trained_groups'):.0f}/{args.prompts} | {results[name][0]['dtype']} |")
    print()
    for a, b in [("ours", "trl"), ("vllm", "ours"), ("vllm", "trl")]:
        if a in sides and b in sides:
            ratios = [x["total"] / y["total"] for x, y in zip(results[a], results[b])]  # adjacent steps, paired
            ratio = med(a, "total") / med(b, "total")
            target = f"  (target <= 0.8: {'met' if ratio <= 0.8 else 'NOT met'})" if (a, b) == ("ours", "trl") else ""
            print(f"ratio {a}/{b} (median step time): {ratio:.3f}{target}; per-round: "
                  + ", ".join(f"{x:.3f}" for x in ratios) + f"  (median {statistics.median(ratios):.3f})")
    shutil.rmtree(out_dir, ignore_errors=True)
    if engine is not None:
        engine.shutdown()
    print("columns are medians over rounds (seconds); TRL's fwd+bwd also holds its batch preparation and "
          "bookkeeping (step - generation - scoring - optimizer); ours' other: tokenizing and padding outside those; "
          "vllm's sync: the weight reload and prefix-cache reset before sampling.")


if __name__ == "__main__":
    main()
