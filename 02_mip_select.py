"""Stage 2: Puzzle's search. Measured costs per block variant, a MIP (pulp/CBC) under hardware constraints,
the chosen child assembled from the block library, and the baselines measured in the same harness.

Costs per (layer, variant): parameters; memory = weights + KV cache for a serving scenario (batch, prefill
length, generation length, KV dtype; a window layer caches min(prefill + generated, W + S) positions per sequence,
common/variants.py); runtime measured here for that scenario inside the full model (common/costs.py):
the variant swapped into all but one of the parent's layers, timed paired with the parent, (median difference) /
layers, no_op = 0,
never clipped; plus the ceiling, the parent with every block removed. Cached per device, threads, scenario, dtype and
parent architecture in runs/<name>/costs/ (on CUDA when there is one). Before the search, the cost model predicts the
parent and --cost-check random children, which are timed to show its error. Every assembled child is timed paired with
the parent (median of per-round ratios, min-max kept), so a machine that drifts in speed cannot tilt the speedups;
the main child is timed again at the end to show how well a measurement repeats.
The MIP picks exactly one block (attention, FFN pair) per layer minimizing the summed replace-one-block block score
(KL by default) under any of: max parameters, max memory, min throughput speedup, max latency.
--rescore-rounds N (not in Puzzle, off by default): score every block again alone in the chosen child (KL to the
parent, on 01's scoring text) and solve again, for blocks whose damage compounds (attention removals do; FFN
narrowings add up: benchmarks/score_additivity.py measures both); the other score's baseline gets the same rounds.

    python 02_mip_select.py --library runs/smol/library --out runs/smol/child --min-speedup 1.5 \
        --sweep 1.25,2,2.5,3                        # CPU, ~5 min with baselines (~1 of it costs, then cached)
    python 02_mip_select.py --library ... --out ... --max-memory-gib 0.5 --kv-tokens 300000 --kv-dtype fp8
    python 02_mip_select.py --library ... --out ... --scenario long --max-memory-gib 0.4   # windows pay at long context
    python 02_mip_select.py --library /tmp/tiny/library --out /tmp/tiny/child --max-params 0.9 --batch 2 \
        --prefill 16 --gen-len 4 --eval-seqs 2 --no-baselines                # tiny smoke run

Serving scenarios (--scenario): short (default; batch 8, prefill 128, generate 64), a small chat batch on this CPU;
long (batch 8, prefill 1024, generate 256), where the KV cache outweighs the weights and window attention pays.
--batch / --prefill / --gen-len override the preset. At short context the LM head and per-layer overhead weigh
heavily, so attention removal buys less than on a GPU at 300K tokens.
Output: <out> checkpoint + search.json (constraints, solutions, predicted vs measured costs, cost check, baselines,
repeat) + pareto.png.
"""

import argparse
import copy
import os
import random
import statistics

import torch

from common.costs import SCENARIOS, cost_cache_path, cost_key, measure_block_runtimes, paired_speedup
from common.costs import read_cached_costs
from common.costs import swap_variants
from common.dist import autocast_ctx, print0, progress, resolve_dtype
from common.evaluate import TextEval
from common.mip import block_costs, blocks_of, greedy_blocks, solve_mip, tightest_feasible
from common.stats import paired_gaps
from common.tables import mip_tables
from common.tracking import add_wandb_args, init_wandb
from common.checkpoint import CheckpointError, check_checkpoint, load_checkpoint, save_checkpoint, write_json_atomic
from common.checkpoint import check_metrics_free, check_out_free, write_metrics
from common.cli import add_dtype_arg, die, float_list, nonneg_int, off_or, positive_float, positive_int
from common.data import bld_documents, spread_chunks
from common.quant import DTYPE_BYTES, calibrate_kv_scales, kv_calibration_chunks, set_kv_cache_fp8_
from common.model import num_params
from common.puzzle import assemble_child, load_library, load_variant_state, pair_key, replace_one_block_scores
from common.variants import KINDS, SUBBLOCKS, config_from_dict, kind_of, kv_bytes, plugin_vllm_serves, stock_vllm_serves
from common.text_corpus import distill_documents

# ----------------------------------------------------------------------------
# Arguments

# kinds --exclude-kinds may leave out: all but the parent's own (gqa attention, swiglu FFN), which every layer keeps
ALL_KINDS = sorted({k.kind for kinds in KINDS.values() for k in kinds} - {"gqa", "swiglu"})

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--library", required=True, help="block library from 01_bld.py, e.g. runs/smol/library")
p.add_argument("--out", required=True, help="child checkpoint directory, e.g. runs/smol/child")
p.add_argument("--parent", default=None, help="parent checkpoint (default: the one the library was built from)")
# serving scenario (costs)
p.add_argument("--scenario", default="short", choices=sorted(SCENARIOS),
               help="preset batch / prefill / gen-len: " + "; ".join(
                   f"{k} {v['batch']} x ({v['prefill']} + {v['gen_len']})" for k, v in SCENARIOS.items()))
p.add_argument("--batch", type=positive_int, default=None, help="sequences (default: the scenario's)")
p.add_argument("--prefill", type=positive_int, default=None, help="prompt tokens per sequence (the scenario's)")
p.add_argument("--gen-len", type=positive_int, default=None, help="generated tokens per sequence (the scenario's)")
p.add_argument("--kv-dtype", default="bf16", choices=sorted(DTYPE_BYTES), help="KV cache dtype (fp8 = e4m3)")
p.add_argument("--kv-tokens", type=off_or(positive_int), default=-1,
               help="cached tokens for memory, all sequences (-1 = batch*(prefill+gen)); a window layer caches "
                    "min(kv-tokens / batch, W + S) per sequence")
p.add_argument("--weight-bytes", type=positive_float, default=2.0, help="bytes per weight for memory (bf16 = 2)")
add_dtype_arg(p, "dtype the runtimes are measured in")
p.add_argument("--cost-layers", type=off_or(positive_int), default=-1,
               help="layers each variant is swapped into for its runtime (-1 = all but one)")
p.add_argument("--cost-repeats", type=positive_int, default=5, help="paired rounds per block cost (median)")
p.add_argument("--cost-decode-steps", type=positive_int, default=8, help="decode steps timed per block-cost run")
p.add_argument("--cost-check", type=nonneg_int, default=3,
               help="random children timed to check the cost model's predicted speedups")
p.add_argument("--speed-repeats", type=positive_int, default=5,
               help="paired parent/child rounds per model (median of the per-round speedups)")
p.add_argument("--speed-decode-steps", type=positive_int, default=16,
               help="decode steps timed per speed run (scaled)")
p.add_argument("--remeasure", action="store_true", help="ignore the cost cache for this device and scenario")
# constraints (-1 = off)
p.add_argument("--max-params", type=off_or(positive_float), default=-1,
               help="max parameters; <= 1 means a fraction of the parent")
p.add_argument("--max-memory-gib", type=off_or(positive_float), default=-1, help="max weights + KV cache in GiB")
p.add_argument("--min-speedup", type=off_or(positive_float), default=-1,
               help="min throughput speedup over the parent")
p.add_argument("--max-latency", type=off_or(positive_float), default=-1, help="max seconds for the scenario")
# search
p.add_argument("--score", default="kl", choices=["kl", "lm_loss"], help="replace-one-block score to minimize")
p.add_argument("--rescore-rounds", type=nonneg_int, default=0,
               help="not in Puzzle: score every block again alone in the chosen child (KL still to the parent) "
                    "and solve again, up to this many times; for blocks whose damage compounds (attention "
                    "removals), which scores taken in the parent miss (~6 min per round per score on this CPU)")
p.add_argument("--serving", default="any", choices=["any", "stock-vllm", "vllm-plugin"],
               help="stock-vllm: only blocks stock vLLM serves without the repo's plugin (no linear subblocks, "
                    "no windows, no no-op attention in layer 0); vllm-plugin: only blocks vLLM serves with the "
                    "plugin (no windows with sink tokens); common/variants.py says which")
p.add_argument("--exclude-kinds", default="", help="variant kinds left out of the search, comma-separated, e.g. "
               "window (the same search without window attention); kinds: " + ", ".join(ALL_KINDS))
p.add_argument("--num-solutions", type=positive_int, default=1)
p.add_argument("--min-hamming", type=nonneg_int, default=2, help="min layers whose block differs between solutions")
p.add_argument("--time-limit", type=positive_int, default=60, help="CBC seconds per solve")
p.add_argument("--sweep", type=float_list(0, inclusive=False), default="",
               help="min-speedup values for the Pareto front, e.g. 1.25,1.5,2,2.5,3")
p.add_argument("--no-baselines", action="store_true", help="skip greedy / depth / uniform / init-only")
# evaluation
p.add_argument("--eval-seqs", type=positive_int, default=32,
               help="held-out sequences for KL / accuracy (SE over them)")
p.add_argument("--eval-seq-len", type=positive_int, default=128)
p.add_argument("--threads", type=positive_int, default=2)
p.add_argument("--run-dir", default=None, help="where metrics/ and costs/ go (default: parent of --out)")
p.add_argument("--metrics-name", default="mip", help="metrics/<this>.json (one per child, e.g. mip_2x)")
add_wandb_args(p)
args = p.parse_args()
for k, v in SCENARIOS[args.scenario].items():  # the preset fills what the command line left unset
    if getattr(args, k) is None:
        setattr(args, k, v)
args.exclude_kinds = {k for k in args.exclude_kinds.split(",") if k}
user_config = vars(args).copy()

# ----------------------------------------------------------------------------
# Validation: every flag and everything read from disk checked before the search starts

if args.exclude_kinds - set(ALL_KINDS):
    die(f"--exclude-kinds: unknown kind(s) {', '.join(sorted(args.exclude_kinds - set(ALL_KINDS)))}; "
        f"choose from {', '.join(ALL_KINDS)}")
if not any(v > 0 for v in (args.max_params, args.max_memory_gib, args.min_speedup, args.max_latency)):
    die("no constraint given: set --min-speedup, --max-params, --max-memory-gib or --max-latency")
run_dir = args.run_dir or os.path.dirname(os.path.abspath(args.out))
try:  # --out free, metrics/<name>.json ours, the library and its parent whole
    check_out_free(args.out)
    check_metrics_free(run_dir, args.metrics_name, args.out)
    library, scores = load_library(args.library)
    parent_path = args.parent or library["parent"]
    check_checkpoint(parent_path)
except CheckpointError as e:
    die(str(e))
L = library["num_layers"]
if args.cost_layers > L:
    die(f"--cost-layers {args.cost_layers}: the parent has only {L} layers")

# ----------------------------------------------------------------------------
# Init: the parent, on the device the costs are measured on

torch.set_num_threads(args.threads)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # costs are measured where it runs
try:
    parent, tokenizer = load_checkpoint(parent_path, device=device)
except CheckpointError as e:
    die(str(e))
config = parent.config
wandb_run = init_wandb(args.wandb_project, args.run_name or "mip", user_config, mode=args.wandb_mode)
speed_dtype = resolve_dtype(args.dtype, device)
entries = {(e["layer"], e["subblock"], e["name"]): e for e in library["variants"]}
items = sorted(entries)
space = library["space"]

# ----------------------------------------------------------------------------
# Costs: parameters, memory (weights + KV cache), runtime measured inside the full model (common/costs.py)

kv_tokens = args.kv_tokens if args.kv_tokens > 0 else args.batch * (args.prefill + args.gen_len)
nonblock_params = num_params(parent) - sum(num_params(layer) for layer in parent.model.layers)
params = {it: entries[it]["params"] for it in items}

seq_tokens = kv_tokens / args.batch  # per sequence: what a window layer's min(tokens, W + S) is taken of
memory = {it: params[it] * args.weight_bytes
          + kv_bytes(config, it[1], entries[it]["config"], seq_tokens, args.kv_dtype, args.batch) for it in items}
parent_fast = copy.deepcopy(parent).to(speed_dtype)  # every runtime is measured in the speed dtype
timed_layers = max(1, L - 1) if args.cost_layers < 0 else args.cost_layers  # layers each variant is timed in
scenario = f"b{args.batch}-p{args.prefill}-g{args.gen_len}-k{timed_layers}"
cost_id = cost_key(args.threads, scenario, speed_dtype, config, space)  # device, ..., parent architecture
cost_path = cost_cache_path(run_dir, cost_id)
try:
    costs = None if args.remeasure else read_cached_costs(cost_path, cost_id)
except CheckpointError:
    die(f"the runtime cost cache {cost_path} is damaged; pass --remeasure to measure the costs again")
if costs is not None:
    print0(f"runtime costs from cache {cost_path}")
else:
    print0(f"measuring block runtimes in the full model, scenario {scenario} {cost_id['dtype']} (each variant in "
           f"{timed_layers} of {L} layers, {args.cost_repeats} paired rounds)")
    costs = {"key": cost_id, **measure_block_runtimes(parent_fast, space, args.batch, args.prefill, args.gen_len,
                                                      args.cost_repeats, args.cost_decode_steps, timed_layers)}
    write_json_atomic(cost_path, costs)
runtime = {it: costs["block_runtime_s"][f"{it[1]}:{it[2]}"] for it in items}
parent_rt, nonblock_rt = costs["parent_runtime_s"], costs["nonblock_runtime_s"]
ceiling_rt, ceiling_speedup = costs["ceiling_runtime_s"], costs["ceiling_speedup"]
print0(f"parent {parent_rt * 1e3:.1f} ms; non-block (predicted) {nonblock_rt * 1e3:.1f} ms; ceiling (every block "
       f"removed, measured) {ceiling_rt * 1e3:.1f} ms = at most {ceiling_speedup:.2f}x on this device")
nonblock_mem = nonblock_params * args.weight_bytes
parent_params = num_params(parent)

# ----------------------------------------------------------------------------
# Search space and block scores; the cost model's prediction for any child

names = {s: [v["name"] for v in space[s]] for s in SUBBLOCKS}
all_blocks = [(l, a, f) for l in range(L) for a in names["attention"] for f in names["ffn"]]
blocks = all_blocks  # the search space
if args.serving != "any":  # the child must load in stock vLLM (users who deploy without the plugin) / in vLLM
    serves = stock_vllm_serves if args.serving == "stock-vllm" else plugin_vllm_serves
    blocks = [(l, a, f) for l, a, f in all_blocks if all(
        serves(l, s, entries[(l, s, n)]["config"]) for s, n in (("attention", a), ("ffn", f)))]
if args.exclude_kinds:
    blocks = [(l, a, f) for l, a, f in blocks if not any(kind_of(s, entries[(l, s, n)]["config"]).kind
                                                          in args.exclude_kinds
                                                          for s, n in (("attention", a), ("ffn", f)))]


def score_table(name, over=None):  # per block: its own replace-one-block score (01 scored every pair)
    key = "kl" if name == "kl" else "lm_loss_delta"
    return {b: scores[pair_key(*b)][key] for b in (blocks if over is None else over)}


score_of = score_table(args.score)
any_score, any_kl = score_table(args.score, all_blocks), score_table("kl", all_blocks)  # for any child's prediction


def predicted(choice):
    its = [(l, s, n) for (l, s), n in choice.items()]
    rt = sum(runtime[i] for i in its) + nonblock_rt
    return {"params": sum(params[i] for i in its) + nonblock_params,
            "memory_bytes": sum(memory[i] for i in its) + nonblock_mem, "runtime_s": rt,
            "speedup": parent_rt / rt, "score": sum(any_score[b] for b in blocks_of(choice)),
            "kl_sum": sum(any_kl[b] for b in blocks_of(choice))}


def constraints_for(min_speedup=None):
    """{cname: (cost per subblock, constant, budget)} of the constraint flags given; `min_speedup` replaces
    --min-speedup (the sweep's targets)."""
    cons = {}
    if args.max_params > 0:
        budget = args.max_params * parent_params if args.max_params <= 1 else args.max_params
        cons["max_params"] = (params, nonblock_params, budget)
    if args.max_memory_gib > 0:
        cons["max_memory"] = (memory, nonblock_mem, args.max_memory_gib * 2 ** 30)
    ms = args.min_speedup if min_speedup is None else min_speedup
    if ms > 0:
        cons["min_speedup"] = (runtime, nonblock_rt, parent_rt / ms)
    if args.max_latency > 0:
        cons["max_latency"] = (runtime, nonblock_rt, args.max_latency)
    return cons


def explain_infeasible(cons):
    """The error of an infeasible search: the constraint that binds, with the tightest value it can take while the
    others hold."""
    fmt = {"max_params": lambda v: f"--max-params {v:.0f} ({v / parent_params:.3f} of the parent)",
           "max_memory": lambda v: f"--max-memory-gib {v / 2 ** 30:.4f}",
           "min_speedup": lambda v: f"--min-speedup {parent_rt / v:.3f}",
           "max_latency": lambda v: f"--max-latency {v:.4f}"}
    for cname in cons:
        best = tightest_feasible(blocks, cons, cname, args.time_limit)
        if best is not None and best > cons[cname][2] * (1 + 1e-9):
            return f"infeasible: {cname} is binding; the tightest feasible value is {fmt[cname](best)}"
    return "infeasible: the constraints together cannot be met; loosen any of " + ", ".join(cons)


def speed_row(choice, fast):
    """`fast` (a model in the speed dtype) timed paired with the parent, next to its predicted speedup."""
    row = paired_speedup(parent_fast, fast, args.batch, args.prefill, args.gen_len, args.speed_repeats,
                         args.speed_decode_steps)
    pred = predicted(choice)["speedup"]
    return {**row, "predicted_speedup": pred, "prediction_error": row["measured_speedup"] / pred - 1,
            "fraction_of_ceiling": row["measured_speedup"] / ceiling_speedup}


# ----------------------------------------------------------------------------
# Cost check: the parent and random children, predicted vs measured, before the cost model is trusted

rng = random.Random(0)
checks = [("parent", {(l, s): n for l, s, n in items if entries[(l, s, n)]["parent"]})]
checks += [(f"random child {i + 1}", {(l, s): rng.choice(names[s]) for l in range(L) for s in SUBBLOCKS})
           for i in range(args.cost_check)]
check_model, cost_check = copy.deepcopy(parent_fast), []
for label, choice in progress(checks, desc="cost check", unit="model"):
    undo = swap_variants(check_model, {(l, s): config_from_dict(s, entries[(l, s, n)]["config"])
                                       for (l, s), n in choice.items() if not entries[(l, s, n)]["parent"]})
    r = {"method": label, **speed_row(choice, check_model)}
    undo()
    cost_check.append(r)
    print0(f"  cost check {label:<16} predicted {r['predicted_speedup']:.2f}x measured {r['measured_speedup']:.2f}x"
           f" [{r['measured_speedup_min']:.2f}-{r['measured_speedup_max']:.2f}] error {r['prediction_error']:+.1%}")
del check_model
worst = max(cost_check, key=lambda r: abs(r["prediction_error"]))
if abs(worst["prediction_error"]) > 0.1:
    print0(f"warning: the runtime cost model is off by {worst['prediction_error']:+.1%} on the {worst['method']}; "
           f"predicted speedups are that uncertain (try --remeasure, more --cost-repeats)")

# ----------------------------------------------------------------------------
# Search: the MIP (and K diverse solutions)

cons = constraints_for()  # validation made sure there is one
solutions = []
for k in range(args.num_solutions):
    choice, status = solve_mip(score_of, cons, args.time_limit, solutions, args.min_hamming)
    if choice is None:
        if k == 0:
            die(explain_infeasible(cons))
        print0(f"only {k} solutions at Hamming distance >= {args.min_hamming}")
        break
    solutions.append(choice)
print0(f"MIP: {len(solutions)} solution(s); predicted {predicted(solutions[0])}")

# Optional: scores in the context of the chosen child. Puzzle scores each block alone in the parent and adds the
# scores; where changes compound (each attention removal costs more once others are gone) the sum underrates a
# child, so score every block alone in the chosen child (its KL to the parent), solve again, repeat
if args.rescore_rounds:
    largs = library["args"]
    held = spread_chunks(tokenizer, bld_documents(largs["data"], "score"), largs["score_seq_len"],
                         largs["score_seqs"]).to(device)
    states = {e["key"]: load_variant_state(args.library, e, parent) for e in entries.values()}
    score_dtype = resolve_dtype(largs["dtype"], device)


def rescore(choice, score_name, cons):
    """Round r scores every block alone in round r's child and solves again; the child kept is the one with the
    best score (KL or LM loss) measured on the scoring text, round 0 being Puzzle's own solution."""
    key, seen, rounds = ("kl" if score_name == "kl" else "lm_loss"), [], []
    for r in range(args.rescore_rounds + 1):
        last = r == args.rescore_rounds
        base = assemble_child(parent, args.library, entries, choice)
        own = {l: (choice[(l, "attention")], choice[(l, "ffn")]) for l in range(L)}
        pairs = [] if last else [(l, entries[(l, "attention", a)], entries[(l, "ffn", f)]) for l, a, f in blocks
                                 if own[l] != (a, f)]
        ctx = replace_one_block_scores(base, held, pairs, states, 4, lambda: autocast_ctx(device, score_dtype),
                                       reference=parent, base=choice)
        at_base = ctx.pop("__base__")
        seen.append((at_base[key], choice))
        rounds.append({"round": r, "kl": at_base["kl"], "lm_loss": at_base["lm_loss"], "attention_replaced": sum(
            not entries[(l, "attention", a)]["parent"] for l, (a, _) in own.items())})
        print0(f"rescoring ({score_name}) round {r}: the child's scoring-text KL {at_base['kl']:.4f}, LM loss "
               f"{at_base['lm_loss']:.4f}")
        if last:
            break
        table = {(l, a, f): (ctx[pair_key(l, a, f)] if own[l] != (a, f) else at_base)[key] for l, a, f in blocks}
        new, _ = solve_mip(table, cons, args.time_limit)
        rounds[-1]["changed_subblocks"] = sum(new[k] != choice[k] for k in choice)
        if rounds[-1]["changed_subblocks"] == 0:
            break
        choice = new
    kept = min(range(len(seen)), key=lambda i: seen[i][0])
    print0(f"rescoring ({score_name}): keeps round {kept}'s child")
    return seen[kept][1], {"rounds": rounds, "kept_round": kept}


rescored = {}
if args.rescore_rounds:
    solutions[0], rescored[args.score] = rescore(solutions[0], args.score, cons)

# ----------------------------------------------------------------------------
# Assemble children from the library; measure speed and quality against the parent in this run

tev = TextEval(parent, tokenizer, seq_len=args.eval_seq_len, num_seqs=args.eval_seqs, batch_size=4)
parent_times = []  # the parent's time from every paired measurement (the table's parent runtime: their median)

# --kv-dtype fp8: every child runs what the memory model counts, an FP8 KV cache with per-layer scales calibrated
# on training text (disjoint from the evaluation text), so its KL includes the cache's rounding
kv_calib = kv_calibration_chunks(tokenizer, 8192, 256).split(8) if args.kv_dtype == "fp8" else None


def measure(choice, init=False, label=""):
    child = assemble_child(parent, args.library, entries, choice, init)
    if kv_calib is not None:
        set_kv_cache_fp8_(child, *calibrate_kv_scales(child, kv_calib))
    q = tev(child)
    fast = copy.deepcopy(child).to(speed_dtype)
    for m in fast.modules():  # timed without the fake-quant rounding: a real FP8 cache costs less, not more
        if hasattr(m, "kv_fp8"):
            m.kv_fp8 = False
    row = {"method": label, **speed_row(choice, fast), "params": num_params(child),
           "kl": q["kl_parent"], "next_token_acc": q["next_token_acc"], "top1_agreement": q["top1_agreement"],
           "lm_loss": q["lm_loss"], "kl_se": q["kl_parent_se"], "next_token_acc_se": q["next_token_acc_se"],
           "top1_agreement_se": q["top1_agreement_se"], "per_seq": q["per_seq"],
           # the MIP's additive model of quality (sum of replace-one-block KLs) next to the measured KL, and how
           # many layers lost their attention: where replacements interact, the measured KL departs from the sum
           "kl_sum_predicted": predicted(choice)["kl_sum"],
           "attention_replaced": sum(not entries[(l, s, n)]["parent"] for (l, s), n in choice.items()
                                     if s == "attention")}
    parent_times.append(row["parent_runtime_s"])
    print0(f"  {label:<28} predicted {row['predicted_speedup']:.2f}x measured {row['measured_speedup']:.2f}x "
           f"[{row['measured_speedup_min']:.2f}-{row['measured_speedup_max']:.2f}] "
           f"({row['prediction_error']:+.1%}) KL {row['kl']:.4f} acc {row['next_token_acc']:.3f}")
    return row, child


pq = tev(parent)
tag = ", rescored" if args.rescore_rounds else ""
main_row, child = measure(solutions[0], label=f"MIP ({'KL' if args.score == 'kl' else 'LM-loss'} score{tag})")

# ----------------------------------------------------------------------------
# Sweep: the Pareto front (predicted quality vs measured speed)

sweep = []
for v in progress(args.sweep, desc="Pareto sweep", unit="child"):
    ch, _ = solve_mip(score_of, constraints_for(v), args.time_limit)
    if ch is None:
        print0(f"  sweep {v}x: infeasible")
        continue
    row, _ = measure(ch, label=f"MIP >= {v}x")
    sweep.append({"target_speedup": v, **row, "solution": {f"{l}.{s}": n for (l, s), n in sorted(ch.items())}})


# ----------------------------------------------------------------------------
# Baselines in the same harness, at the main child's predicted runtime


@torch.no_grad()
def block_influence(parent, tokenizer, num_seqs, seq_len):
    """Per layer mean 1 - cos(h_in, h_out) (ShortGPT's block influence: the layers whose output is most like their
    input go first), on the selection text: disjoint from the evaluation text the baseline is then judged on."""
    ids = spread_chunks(tokenizer, distill_documents("select"), seq_len, num_seqs).to(parent.device)
    hs = parent(ids, output_hidden_states=True, use_cache=False).hidden_states
    return [(1 - torch.nn.functional.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1)).mean().item()
            for i in range(len(hs) - 1)]


baselines = [main_row]
target_rt = predicted(solutions[0])["runtime_s"]
block_budget = target_rt - nonblock_rt
pa, pf = [v["name"] for v in space["attention"] if v["parent"]][0], [v["name"] for v in space["ffn"] if v["parent"]][0]


def rt_of(choice):
    return sum(runtime[(l, s, n)] for (l, s), n in choice.items()) + nonblock_rt


if not args.no_baselines:
    other = "lm_loss" if args.score == "kl" else "kl"
    other_cons = {"runtime": (runtime, nonblock_rt, target_rt)}
    ch, _ = solve_mip(score_table(other), other_cons, args.time_limit)
    if ch and args.rescore_rounds:
        ch, rescored[other] = rescore(ch, other, other_cons)
    if ch:
        baselines.append(measure(ch, label=f"MIP ({'LM-loss' if other == 'lm_loss' else 'KL'} score{tag})")[0])
    greedy = greedy_blocks(score_of, block_costs(runtime, blocks), block_budget)
    baselines.append(measure(greedy, label="greedy per-layer")[0])
    if "no_op" in names["attention"] and "no_op" in names["ffn"]:
        bi = block_influence(parent, tokenizer, args.eval_seqs, args.eval_seq_len)  # ShortGPT's layer ranking
        depth = {(l, s): (pa if s == "attention" else pf) for l in range(L) for s in SUBBLOCKS}
        for l in sorted(range(L), key=lambda i: bi[i]):
            if rt_of(depth) <= target_rt:
                break
            depth[(l, "attention")], depth[(l, "ffn")] = "no_op", "no_op"
        baselines.append(measure(depth, label="depth pruning (BI)")[0])
    widths = sorted((n for n in names["ffn"] if n.startswith("w")), key=lambda n: -int(n[1:]))
    uni = None
    for w in widths:
        uni = {(l, s): (pa if s == "attention" else w) for l in range(L) for s in SUBBLOCKS}
        if rt_of(uni) <= target_rt:
            break
    baselines.append(measure(uni, label=f"uniform FFN {uni[(0, 'ffn')]}")[0])
    baselines.append(measure(solutions[0], init=True, label="MIP, init-only library")[0])
for r in baselines[1:]:  # quality gaps to the MIP child, paired over the same evaluation chunks
    r["vs_mip"] = paired_gaps(r, main_row)

# ----------------------------------------------------------------------------
# Repeat: the main child timed again at the end of the run; a measurement that repeats agrees within ~5%

repeat = {"method": "MIP (repeat)", **speed_row(solutions[0], copy.deepcopy(child).to(speed_dtype))}
parent_times.append(repeat["parent_runtime_s"])
repeat["agreement"] = abs(main_row["measured_speedup"] - repeat["measured_speedup"]) / main_row["measured_speedup"]
print0(f"  {repeat['method']:<28} measured {repeat['measured_speedup']:.2f}x, the first time "
       f"{main_row['measured_speedup']:.2f}x: they differ by {repeat['agreement']:.1%}")


# ----------------------------------------------------------------------------
# Save: the child checkpoint with search.json, pareto.png, metrics


def plot_pareto(sweep, baselines, cost_check, path):
    """Left: the Pareto front (KL vs measured speedup). Right: measured vs predicted speedup, with the ±10% band.
    Error bars: the min-max of the per-round speedups."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def spread(rows):  # error bar lengths below and above the median
        return [[r["measured_speedup"] - r["measured_speedup_min"] for r in rows],
                [r["measured_speedup_max"] - r["measured_speedup"] for r in rows]]

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5))
    sw = sorted(sweep, key=lambda r: r["measured_speedup"])
    ax.errorbar([r["measured_speedup"] for r in sw], [r["kl"] for r in sw], xerr=spread(sw), fmt="o-", capsize=3,
                label="MIP sweep (measured)")
    ax.plot([r["predicted_speedup"] for r in sw], [r["kl"] for r in sw], "x", color="gray",
            label="MIP sweep (predicted speed)")
    for i, b in enumerate(baselines):  # baselines[0]: the MIP child itself
        ax.errorbar([b["measured_speedup"]], [b["kl"]], xerr=spread([b]), fmt="*" if i == 0 else "s", capsize=3,
                    markersize=10 if i == 0 else 6, label=b["method"])
    ax.set_xlabel("measured throughput speedup over the parent")
    ax.set_ylabel("KL(parent || child), held-out")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    groups = [("MIP sweep", sw, "o"), ("baselines", baselines, "s"), ("cost check", cost_check, "^")]
    vals = [r[k] for _, rows, _ in groups for r in rows for k in ("predicted_speedup", "measured_speedup_min",
                                                                  "measured_speedup_max")]
    xs = [max(0.0, min(vals + [1.0]) * 0.9), max(vals) * 1.05]
    bx.plot(xs, xs, "k-", lw=0.8, label="measured = predicted")
    bx.fill_between(xs, [0.9 * x for x in xs], [1.1 * x for x in xs], color="gray", alpha=0.2, label="±10%")
    for name, rows, marker in groups:
        bx.errorbar([r["predicted_speedup"] for r in rows], [r["measured_speedup"] for r in rows], yerr=spread(rows),
                    fmt=marker, capsize=3, label=name)
    bx.set_xlim(*xs)
    bx.set_ylim(*xs)
    bx.set_xlabel("predicted speedup (cost model)")
    bx.set_ylabel("measured speedup (median, min-max)")
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


parent_s = statistics.median(parent_times)
pred = predicted(solutions[0])
unserved = [f"layer {l} {s} {n}" for (l, s), n in sorted(solutions[0].items())
            if not stock_vllm_serves(l, s, entries[(l, s, n)]["config"])]
no_vllm = [f"layer {l} {s} {n}" for (l, s), n in sorted(solutions[0].items())
           if not plugin_vllm_serves(l, s, entries[(l, s, n)]["config"])]
search = {"scenario": {"name": args.scenario, "batch": args.batch, "prefill": args.prefill, "gen_len": args.gen_len,
                       "kv_dtype": args.kv_dtype, "kv_tokens": kv_tokens, "device": cost_id["device"]},
          "constraints": {k: v[2] for k, v in cons.items()}, "score": args.score,
          "solution": [{"layer": l, "attention": solutions[0][(l, "attention")], "ffn": solutions[0][(l, "ffn")]}
                       for l in range(L)],
          "solutions": [[{"layer": l, "attention": s[(l, "attention")], "ffn": s[(l, "ffn")]} for l in range(L)]
                        for s in solutions],
          "predicted": pred, "measured": main_row, "predicted_speedup": pred["speedup"],
          "measured_speedup": main_row["measured_speedup"], "parent": {**pq, "params": parent_params,
                                                                       "runtime_s": parent_s},
          "nonblock": {"params": nonblock_params, "runtime_s": nonblock_rt, "memory_bytes": nonblock_mem},
          "ceiling_runtime_s": ceiling_rt, "ceiling_speedup": ceiling_speedup,
          "cost_check": {"max_abs_error": abs(worst["prediction_error"]), "rows": cost_check},
          "rescore_rounds": rescored, "repeat": repeat, "costs_cache": cost_path, "costs_key": cost_id,
          "baselines": baselines, "sweep": sweep,
          "serving": {"restricted_to": args.serving, "stock_vllm": not unserved, "needs_plugin": unserved,
                      "not_served_by_vllm": no_vllm}}
child = child.to(parent.dtype)
try:
    save_checkpoint(child, tokenizer, args.out, stage="mip", args=user_config, extra_json={"search.json": search},
                    meta={"parent": library["parent"], "library": os.path.abspath(args.library)},
                    extra_files={"pareto.png": lambda path: plot_pareto(sweep, baselines, cost_check, path)}
                    if sweep else None)
except CheckpointError as e:
    die(str(e))
metrics = {"predicted_speedup": pred["speedup"], "measured_speedup": main_row["measured_speedup"],
           "params": main_row["params"], "kl": main_row["kl"], "next_token_acc": main_row["next_token_acc"],
           "next_token_acc_retention": main_row["next_token_acc"] / max(1e-9, pq["next_token_acc"]),
           "top1_agreement": main_row["top1_agreement"], "prediction_error": main_row["prediction_error"],
           "kl_se": main_row["kl_se"], "per_seq": main_row["per_seq"],  # paired comparisons between children
           "ceiling_speedup": ceiling_speedup, "cost_check_max_abs_error": abs(worst["prediction_error"]),
           "repeat_agreement": repeat["agreement"], "repeat": repeat, "cost_check": cost_check,
           "baselines": baselines, "sweep": sweep,
           "scenario": {"name": args.scenario, "batch": args.batch, "prefill": args.prefill, "gen_len": args.gen_len,
                        "kv_dtype": args.kv_dtype}}
metrics["report"] = mip_tables(metrics, args.metrics_name)
metrics_path = write_metrics(run_dir, args.metrics_name, metrics, out=args.out)
wandb_run.log({k: v for k, v in metrics.items() if isinstance(v, float)})
print0(f"\nscenario {args.scenario}: batch {args.batch}, prefill {args.prefill}, generate {args.gen_len}, KV "
       f"{args.kv_dtype}; parent {parent_s:.2f}s, acc {pq['next_token_acc']:.3f}; ceiling {ceiling_speedup:.2f}x")
print0("\n" + "\n".join(metrics["report"]))
if unserved:
    print0(f"note: stock vLLM cannot serve {len(unserved)} of the child's subblocks ({', '.join(unserved[:3])}"
           f"{', ...' if len(unserved) > 3 else ''}): serve it with the repo's plugin (bash install_vllm.sh), or "
           f"search with --serving stock-vllm")
if no_vllm:
    print0(f"note: vLLM cannot serve {len(no_vllm)} of the child's subblocks, not even with the plugin "
           f"({', '.join(no_vllm[:3])}{', ...' if len(no_vllm) > 3 else ''}: windows with sink tokens); search "
           f"with --serving vllm-plugin to serve it")
print0(f"checkpoint: {args.out}; metrics: {metrics_path}")
wandb_run.finish()
