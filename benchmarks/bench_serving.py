"""The speedup where the model is served: parent vs Puzzle child vs fused vs distilled in vLLM, next to 02's
predicted speedup and the same models measured in our own forward, in one run (run in .venv-vllm: bash install_vllm.sh).

    .venv-vllm/bin/python benchmarks/bench_serving.py --run-dir runs/smol              # 02's scenario and batch 1
    .venv-vllm/bin/python benchmarks/bench_serving.py --run-dir runs/smol --rounds 7 --models parent,child

Scenario (02's): `--batch` prompts of `--prefill` random tokens, exactly `--gen-len` new tokens each (EOS ignored),
greedy; and the same at batch 1. Every model gets its own engine (eager, prefix caching off: the same prompts come
back every round), all alive at once; each round times every engine back to back, in reverse order every other
round (machine drift hits all alike), after one warm-up round. The speedup of a round is t_parent / t_model; the
table gives the median over rounds and the min-max. "ours" times our model on the same scenario
(common.costs.scenario_seconds, KV-cache decoding, interleaved the same way) in the same dtype.
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine; unset, vLLM-CPU reserves most of the RAM
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common.checkpoint import load_checkpoint, read_json  # noqa: E402
from common.costs import scenario_seconds  # noqa: E402
from common.dist import resolve_dtype  # noqa: E402


def predicted_speedup(path: str) -> float | None:
    """02's predicted speedup of the child a checkpoint descends from (search.json in it or in its parent chain)."""
    for _ in range(4):
        if os.path.exists(os.path.join(path, "search.json")):
            return read_json(os.path.join(path, "search.json"))["predicted_speedup"]
        meta = read_json(os.path.join(path, "meta.json"))
        nxt = meta.get("args", {}).get("student") or meta.get("args", {}).get("child")
        if not nxt:
            return None
        path = nxt
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/smol")
    p.add_argument("--models", default="parent,child,fused,distilled", help="checkpoint directories in --run-dir")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="auto", help="auto: bf16 where the CPU has avx512_bf16, else float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON with every round (default: <run-dir>/metrics/serving.json)")
    args = p.parse_args()
    from vllm import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    names = args.models.split(",")
    paths = {n: os.path.join(args.run_dir, n) for n in names}
    for n, path in paths.items():
        if not os.path.exists(os.path.join(path, "COMPLETED")):
            sys.exit(f"error: {path} is not a finished checkpoint; run run.sh's stages first or pick --models")
    engines = {}
    for n, path in paths.items():
        t0 = time.time()
        engines[n] = LLM(model=path, trust_remote_code=True, dtype=str(dtype).removeprefix("torch."), seed=0,
                         enforce_eager=True, enable_prefix_caching=False, max_model_len=args.prefill + args.gen_len)
        print(f"engine {n}: {time.time() - t0:.0f} s")
    vocab = min(e.get_tokenizer().vocab_size for e in engines.values())
    ours = {n: load_checkpoint(path, dtype=dtype, with_tokenizer=False)[0].eval() for n, path in paths.items()}
    results = {"run_dir": args.run_dir, "dtype": str(dtype), "threads": args.threads, "scenarios": {}}
    for batch in (args.batch, 1):
        ids = torch.randint(3, vocab, (batch, args.prefill), generator=torch.Generator().manual_seed(0)).tolist()
        prompts = [{"prompt_token_ids": x} for x in ids]
        params = SamplingParams(temperature=0.0, max_tokens=args.gen_len, min_tokens=args.gen_len, ignore_eos=True)
        secs = {n: [] for n in names}
        for r in range(args.rounds + 1):  # round 0 warms up
            for n in (names if r % 2 else names[::-1]):
                t0 = time.perf_counter()
                out = engines[n].generate(prompts, params, use_tqdm=False)
                t = time.perf_counter() - t0
                assert all(len(o.outputs[0].token_ids) == args.gen_len for o in out)
                if r:
                    secs[n].append(t)
        with torch.no_grad():
            own = scenario_seconds([ours[n] for n in names], batch, args.prefill, args.gen_len, args.rounds,
                                   per_round=True)
        rows = {}
        for i, n in enumerate(names):
            v = [a / b for a, b in zip(secs[names[0]], secs[n])]
            o = [a / b for a, b in zip(own[0], own[i])]
            rows[n] = {"vllm_s": statistics.median(secs[n]), "vllm_speedup": statistics.median(v),
                       "vllm_speedup_min": min(v), "vllm_speedup_max": max(v), "ours_s": statistics.median(own[i]),
                       "ours_speedup": statistics.median(o), "ours_speedup_min": min(o), "ours_speedup_max": max(o),
                       "predicted_speedup": predicted_speedup(paths[n]) if n != names[0] else 1.0,
                       "vllm_over_ours_s": statistics.median(secs[n]) / statistics.median(own[i])}
        results["scenarios"][f"batch {batch}, prompt {args.prefill}, {args.gen_len} new tokens"] = rows
    for scen, rows in results["scenarios"].items():
        print(f"\n{scen}, {dtype}, {args.threads} threads, median of {args.rounds} interleaved rounds (min-max)")
        print("| model | 02 predicted | ours measured | vLLM measured | vLLM s / ours s |")
        print("|---|---|---|---|---|")
        for n, r in rows.items():
            pred = "-" if r["predicted_speedup"] is None else f"{r['predicted_speedup']:.2f}x"
            print(f"| {n} | {pred} | {r['ours_speedup']:.2f}x ({r['ours_speedup_min']:.2f}-{r['ours_speedup_max']:.2f})"
                  f" | {r['vllm_speedup']:.2f}x ({r['vllm_speedup_min']:.2f}-{r['vllm_speedup_max']:.2f}) | "
                  f"{r['vllm_over_ours_s']:.2f} |")
    out = args.out or os.path.join(args.run_dir, "metrics", "serving.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":  # vLLM's engine processes are spawned: they re-import this file
    main()
