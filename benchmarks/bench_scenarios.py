"""The best architecture depends on the scenario (gpt-oss-puzzle: 1.63x at long context, 1.22x at short): every model
of a run measured against the parent in every serving scenario of 02, in one run.

    python benchmarks/bench_scenarios.py --run-dir runs/smol --models child,child_long,child_long_nowin
    python benchmarks/bench_scenarios.py --run-dir runs/smol --models child --scenarios short --rounds 1  # smoke

Per scenario (common.costs.SCENARIOS: batch x (prompt + generated tokens)): the parent and every model, timed by
common.costs.scenario_seconds (prefill, then KV-cache greedy decoding: our model's bounded cache for window layers),
interleaved in every round and in reverse order every other round, after one warm-up round. A model's speedup is the
median over rounds of t_parent / t_model (each round's pair timed back to back), with the min-max of those ratios.
Memory is computed, not measured: weights (2 bytes each, --weight-bytes) + the KV cache of the scenario's batch at
prompt + generated tokens (common.variants.kv_cache_bytes: a window layer holds min(tokens, W + S) positions).
Writes <out> (default <run-dir>/metrics/scenarios.json) and prints one table per scenario.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common.checkpoint import CheckpointError, load_checkpoint, write_json_atomic  # noqa: E402
from common.cli import add_dtype_arg, die, positive_float, positive_int  # noqa: E402
from common.costs import SCENARIOS, scenario_seconds  # noqa: E402
from common.dist import resolve_dtype  # noqa: E402
from common.variants import kv_cache_bytes  # noqa: E402


def memory_gib(model, scenario: dict, weight_bytes: float, kv_dtype: str) -> dict:
    weights = weight_bytes * sum(p.numel() for p in model.parameters())
    kv = kv_cache_bytes(model.config, scenario["batch"], scenario["prefill"] + scenario["gen_len"], kv_dtype)
    return {"weights_gib": weights / 2 ** 30, "kv_gib": kv / 2 ** 30, "memory_gib": (weights + kv) / 2 ** 30}


def measure(models: dict, scenario: dict, rounds: int, decode_steps: int | None) -> dict:
    """{name: per-round seconds} of every model (the parent first), interleaved."""
    names = list(models)
    times = scenario_seconds([models[n] for n in names], scenario["batch"], scenario["prefill"], scenario["gen_len"],
                             rounds, decode_steps, per_round=True)
    return dict(zip(names, times))


def table(name: str, scenario: dict, rows: dict) -> str:
    lines = [f"scenario {name}: batch {scenario['batch']} x ({scenario['prefill']} + {scenario['gen_len']}) tokens",
             "| model | seconds (median) | speedup vs parent (min-max) | memory GiB (weights + KV) |",
             "|---|---|---|---|"]
    for m, r in rows.items():
        lines.append(f"| {m} | {r['seconds']:.2f} | {r['speedup']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})"
                     f" | {r['memory_gib']:.3f} ({r['weights_gib']:.3f} + {r['kv_gib']:.3f}) |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--parent", default="parent", help="the reference checkpoint, in --run-dir (or a path)")
    p.add_argument("--models", required=True, help="checkpoints in --run-dir (or paths), comma-separated")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="of " + ", ".join(
        f"{k} {v['batch']} x ({v['prefill']} + {v['gen_len']})" for k, v in SCENARIOS.items()))
    p.add_argument("--rounds", type=positive_int, default=5, help="paired rounds per scenario (after one warm-up)")
    p.add_argument("--decode-steps", type=positive_int, default=None,
                   help="decode steps timed per run, scaled to the scenario's generated tokens (default: all)")
    p.add_argument("--weight-bytes", type=positive_float, default=2.0)
    p.add_argument("--kv-dtype", default="bf16", choices=["bf16", "fp8"])
    add_dtype_arg(p)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--out", default=None, help="JSON (default: <run-dir>/metrics/scenarios.json)")
    args = p.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    if not scenarios or set(scenarios) - set(SCENARIOS):
        die(f"--scenarios {args.scenarios!r}: choose from {', '.join(SCENARIOS)}")
    names = [m for m in args.models.split(",") if m]
    if not names or len(set(names)) != len(names) or args.parent in names:
        die(f"--models {args.models!r}: give distinct checkpoints other than the parent ({args.parent})")
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, "cpu")
    models = {}
    for n in [args.parent] + names:
        path = n if os.path.isdir(n) and not os.path.isdir(os.path.join(args.run_dir, n)) else \
            os.path.join(args.run_dir, n)
        try:
            models[n] = load_checkpoint(path, dtype=dtype)[0].eval()
        except (CheckpointError, OSError) as e:
            die(f"{path}: {e}")

    result = {"run_dir": args.run_dir, "dtype": str(dtype).replace("torch.", ""), "threads": args.threads,
              "rounds": args.rounds, "date": time.strftime("%Y-%m-%d"), "scenarios": {}}
    for s in scenarios:
        sc = SCENARIOS[s]
        t = measure(models, sc, args.rounds, args.decode_steps)
        rows = {}
        for n in models:
            ratios = [tp / tm for tp, tm in zip(t[args.parent], t[n])]
            rows[n] = {"seconds": statistics.median(t[n]), "speedup": statistics.median(ratios),
                       "speedup_min": min(ratios), "speedup_max": max(ratios), "rounds_s": t[n],
                       **memory_gib(models[n], sc, args.weight_bytes, args.kv_dtype)}
        result["scenarios"][s] = {**sc, "models": rows}
        print(table(s, sc, rows), flush=True)
    out = args.out or os.path.join(args.run_dir, "metrics", "scenarios.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json_atomic(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
