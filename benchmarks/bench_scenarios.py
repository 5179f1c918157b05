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
With --eval-seq-len L: each model's quality next to its speed, KL to the parent and next-token accuracy on --eval-seqs
held-out chunks of L tokens (common.evaluate.TextEval, float32, the chunks 02 --eval-seq-len L evaluates on), and
every pair of models' paired difference (common.stats.paired_gaps: the gap, its paired SE, beyond 2 SE or not).
--scenarios none skips the timing. Writes <out> (default <run-dir>/metrics/scenarios.json) and prints the tables.
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
from common.evaluate import TextEval  # noqa: E402
from common.stats import gap_label, paired_gaps  # noqa: E402
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


def quality(paths: dict, parent: str, seq_len: int, num_seqs: int) -> dict:
    """{name: KL to the parent, next-token accuracy, their SEs and per-chunk values} in float32, and
    {"a - b": paired gaps} for every pair of models."""
    ref, tok = load_checkpoint(paths[parent])
    tev = TextEval(ref, tok, seq_len=seq_len, num_seqs=num_seqs, batch_size=4)
    rows = {parent: tev.parent_metrics}
    for n, path in paths.items():
        if n != parent:
            rows[n] = tev(load_checkpoint(path, with_tokenizer=False)[0].eval())
    names = [n for n in paths if n != parent]
    gaps = {f"{a} - {b}": paired_gaps(rows[a], rows[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    return {"seq_len": seq_len, "num_seqs": len(tev.ids), "models": rows, "paired": gaps}


def quality_table(q: dict) -> str:
    lines = [f"quality: {q['num_seqs']} held-out chunks of {q['seq_len']} tokens (float32)",
             "| model | KL to the parent | next-token acc |", "|---|---|---|"]
    for n, r in q["models"].items():
        lines.append(f"| {n} | {r['kl_parent']:.4f} ± {r['kl_parent_se']:.4f} | {r['next_token_acc']:.4f} ± "
                     f"{r['next_token_acc_se']:.4f} |")
    lines += ["| pair (paired over the chunks) | KL gap | acc gap |", "|---|---|---|"]
    for pair, g in q["paired"].items():
        lines.append(f"| {pair} | {g['kl_parent']:+.4f} ± {g['kl_parent_se']:.4f} | {g['next_token_acc']:+.4f} ± "
                     f"{g['next_token_acc_se']:.4f} | beyond 2 SE: {gap_label(g)}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--parent", default="parent", help="the reference checkpoint, in --run-dir (or a path)")
    p.add_argument("--models", required=True, help="checkpoints in --run-dir (or paths), comma-separated")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="'none', or of " + ", ".join(
        f"{k} {v['batch']} x ({v['prefill']} + {v['gen_len']})" for k, v in SCENARIOS.items()))
    p.add_argument("--rounds", type=positive_int, default=5, help="paired rounds per scenario (after one warm-up)")
    p.add_argument("--decode-steps", type=positive_int, default=None,
                   help="decode steps timed per run, scaled to the scenario's generated tokens (default: all)")
    p.add_argument("--weight-bytes", type=positive_float, default=2.0)
    p.add_argument("--kv-dtype", default="bf16", choices=["bf16", "fp8"])
    add_dtype_arg(p)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--eval-seq-len", type=int, default=0, help="tokens per held-out chunk for KL / accuracy (0: skip)")
    p.add_argument("--eval-seqs", type=positive_int, default=32, help="held-out chunks for KL / accuracy")
    p.add_argument("--out", default=None, help="JSON (default: <run-dir>/metrics/scenarios.json)")
    args = p.parse_args(argv)
    scenarios = [] if args.scenarios == "none" else [s for s in args.scenarios.split(",") if s]
    if (not scenarios and args.scenarios != "none") or set(scenarios) - set(SCENARIOS):
        die(f"--scenarios {args.scenarios!r}: choose from {', '.join(SCENARIOS)}, or none")
    if args.eval_seq_len < 0 or (not scenarios and not args.eval_seq_len):
        die(f"--eval-seq-len {args.eval_seq_len}: give a positive length (with --scenarios none, nothing else is "
            f"measured)")
    names = [m for m in args.models.split(",") if m]
    if not names or len(set(names)) != len(names) or args.parent in names:
        die(f"--models {args.models!r}: give distinct checkpoints other than the parent ({args.parent})")
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, "cpu")
    paths = {n: n if os.path.isdir(n) and not os.path.isdir(os.path.join(args.run_dir, n)) else
             os.path.join(args.run_dir, n) for n in [args.parent] + names}
    models = {}
    for n, path in paths.items():
        try:
            models[n] = load_checkpoint(path, dtype=dtype, with_tokenizer=False)[0].eval()
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
    if args.eval_seq_len:
        del models  # the timing copies; quality is measured in float32
        result["quality"] = quality(paths, args.parent, args.eval_seq_len, args.eval_seqs)
        print(quality_table(result["quality"]), flush=True)
    out = args.out or os.path.join(args.run_dir, "metrics", "scenarios.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json_atomic(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
