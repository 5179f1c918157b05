"""Stage 2: Puzzle's search. Measured costs per block variant, a MIP (pulp/CBC) under hardware constraints,
the chosen child assembled from the block library, and the baselines measured in the same harness.

Costs per (layer, variant): parameters; memory = weights + KV cache for a serving scenario (batch, prefill
length, generation length, KV dtype); runtime measured here for that scenario: one base block + k copies of the
variant minus the base alone, over k, median of repeats, the two timed interleaved (cached per device and
scenario in runs/<name>/costs/; on CUDA when there is one). Every assembled child is timed interleaved with the
parent (ABAB), so a machine that drifts in speed during the run cannot tilt the measured speedups.
The MIP picks exactly one attention and one FFN variant per layer minimizing the summed replace-one-block score
(KL by default) under any of: max parameters, max memory, min throughput speedup, max latency.

    python 02_mip_select.py --library runs/smol/library --out runs/smol/child --min-speedup 1.5 \
        --sweep 1.25,1.5,2,2.5,3                                           # CPU, ~8 min with baselines
    python 02_mip_select.py --library ... --out ... --max-memory-gib 0.5 --kv-tokens 300000 --kv-dtype fp8
    python 02_mip_select.py --library /tmp/tiny/library --out /tmp/tiny/child --max-params 0.9 --batch 2 \
        --prefill 16 --gen-len 4 --eval-seqs 2 --no-baselines                # tiny smoke run

Serving scenario default (batch 8, prefill 128, generate 64): a small chat batch on this CPU. At short context
the LM head and per-layer overhead weigh heavily, so attention removal buys less than on a GPU at 300K tokens.
Output: <out> checkpoint + search.json (constraints, solutions, predicted vs measured costs, baselines) + pareto.png.
"""

import argparse
import copy
import os
import platform
import re
import statistics
import sys
import time
import warnings

import pulp
import torch

from common.dist import print0, progress, resolve_dtype, sync
from common.evaluate import TextEval
from common.tracking import add_wandb_args, init_wandb
from common.checkpoint import CheckpointError, load_checkpoint, read_json, save_checkpoint, write_json_atomic
from common.checkpoint import check_metrics_free, check_out_free, write_metrics
from common.cli import float_list, nonneg_int, off_or, positive_float, positive_int
from common.fp8 import DTYPE_BYTES, kv_bytes_per_token
from common.model import DeciLMConfig, DeciLMForCausalLM, num_params
from common.puzzle import SUBBLOCKS, load_library, load_variant_state, set_subblock, variant_config_from_dict

# ----------------------------------------------------------------------------
# Arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--library", required=True, help="block library from 01_bld.py, e.g. runs/smol/library")
    p.add_argument("--out", required=True, help="child checkpoint directory, e.g. runs/smol/child")
    p.add_argument("--parent", default=None, help="parent checkpoint (default: the one the library was built from)")
    # serving scenario (costs)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--prefill", type=positive_int, default=128, help="prompt tokens per sequence")
    p.add_argument("--gen-len", type=positive_int, default=64, help="generated tokens per sequence")
    p.add_argument("--kv-dtype", default="bf16", choices=sorted(DTYPE_BYTES), help="KV cache dtype (fp8 = e4m3)")
    p.add_argument("--kv-tokens", type=off_or(positive_int), default=-1,
                   help="cached tokens for memory (-1 = batch*(prefill+gen))")
    p.add_argument("--weight-bytes", type=positive_float, default=2.0, help="bytes per weight for memory (bf16 = 2)")
    p.add_argument("--speed-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="dtype the runtimes are measured in (auto: bf16 where it is fast)")
    p.add_argument("--cost-copies", type=positive_int, default=4,
                   help="k copies of the variant on top of the base block")
    p.add_argument("--cost-repeats", type=positive_int, default=5, help="median of this many timings")
    p.add_argument("--cost-decode-steps", type=positive_int, default=8, help="decode steps timed per block-cost run")
    p.add_argument("--speed-repeats", type=positive_int, default=3,
                   help="paired parent/child timings per model (median)")
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
    p.add_argument("--num-solutions", type=positive_int, default=1)
    p.add_argument("--min-hamming", type=nonneg_int, default=2, help="min differing subblock choices between solutions")
    p.add_argument("--time-limit", type=positive_int, default=60, help="CBC seconds per solve")
    p.add_argument("--sweep", type=float_list(0, inclusive=False), default="",
                   help="min-speedup values for the Pareto front, e.g. 1.25,1.5,2,2.5,3")
    p.add_argument("--no-baselines", action="store_true", help="skip greedy / depth / uniform / init-only")
    # evaluation
    p.add_argument("--eval-seqs", type=positive_int, default=8, help="held-out sequences for KL / accuracy")
    p.add_argument("--eval-seq-len", type=positive_int, default=128)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--run-dir", default=None, help="where metrics/ and costs/ go (default: parent of --out)")
    p.add_argument("--metrics-name", default="mip", help="metrics/<this>.json (one per child, e.g. mip_2x)")
    add_wandb_args(p)
    return p.parse_args(argv)


def die(msg):
    sys.exit(f"error: {msg}")  # printed at exit, after any progress bar has closed


# ----------------------------------------------------------------------------
# Runtime: one serving scenario (prefill the batch, then decode gen-len tokens with the KV cache)


@torch.no_grad()
def scenario_run(model, ids, gen_len, decode_steps):
    """Wall seconds of one prefill + gen_len greedy decode steps (decode_steps of them timed, scaled to gen_len)."""
    sync()
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    sync()
    t1 = time.perf_counter()
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(decode_steps):
        out = model(nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    t2 = time.perf_counter()
    return (t1 - t0) + (t2 - t1) * gen_len / max(1, decode_steps)


def scenario_seconds(models, batch, prefill, gen_len, repeats, decode_steps=None) -> list[float]:
    """Median scenario seconds of each model in `models`, timed interleaved (ABAB...), so a machine that
    speeds up or slows down during the run moves every model's timings alike and their ratios stay fair."""
    decode_steps = gen_len if decode_steps is None else min(decode_steps, gen_len)
    V = min(m.config.vocab_size for m in models)
    ids = torch.randint(3, V, (batch, prefill), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(models[0].parameters()).device)
    times = [[] for _ in models]
    for r in range(repeats + 1):  # the first round warms up
        for i, m in enumerate(models):
            t = scenario_run(m, ids, gen_len, decode_steps)
            if r:
                times[i].append(t)
    return [statistics.median(t) for t in times]


def device_name(threads):
    if torch.cuda.is_available():
        return re.sub(r"[^A-Za-z0-9]+", "-", f"cuda-{torch.cuda.get_device_name()}").strip("-")
    name = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        m = re.search(r"model name\s*:\s*(.+)", open("/proc/cpuinfo").read())
        name = m.group(1) if m else name
    return re.sub(r"[^A-Za-z0-9]+", "-", f"cpu-{name}-t{threads}").strip("-")


def measure_block_runtimes(parent, space, args, dtype):
    """{subblock:name: seconds} for the scenario: (base + k copies) - base, over k. no_op costs 0."""
    cfg0 = parent.config.block_configs[0]
    base_cfg = parent.config.to_dict()

    def stack(blocks):
        c = dict(base_cfg, vocab_size=8, num_hidden_layers=len(blocks), block_configs=blocks)
        torch.manual_seed(0)
        return DeciLMForCausalLM(DeciLMConfig(**c)).to(device=parent.device, dtype=dtype).eval()

    base_model = stack([cfg0.to_dict()])

    def extra(blocks):  # seconds the stack takes beyond the base block, base and stack timed interleaved
        base, total = scenario_seconds([base_model, stack(blocks)], args.batch, args.prefill, args.gen_len,
                                       args.cost_repeats, args.cost_decode_steps)
        return total - base

    out = {}
    variants = [(sub, v) for sub in SUBBLOCKS for v in space[sub]]
    for sub, v in progress(variants, desc="block runtimes", unit="variant"):
        if v["config"].get("no_op"):
            out[f"{sub}:{v['name']}"] = 0.0
            continue
        blk = cfg0.to_dict()
        blk[sub] = v["config"]
        if sub == "attention":  # isolate the attention: the copies carry no FFN
            blk["ffn"] = {"ffn_mult": None, "no_op": True, "replace_with_linear": False}
        else:
            blk["attention"] = {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False}
        k = args.cost_copies
        key = f"{sub}:{v['name']}"
        out[key] = max(0.0, extra([cfg0.to_dict()] + [blk] * k) / k)
        print0(f"  runtime {key:<18} {out[key] * 1e3:8.2f} ms")
    return out


# ----------------------------------------------------------------------------
# The MIP (Puzzle §MIP): a grouped knapsack, one variant per (layer, subblock)


def solve_mip(items, L, score_of, constraints, time_limit, exclude=(), min_hamming=0):
    """items: [(layer, subblock, name)]; constraints: {cname: (cost dict, constant, budget)}.

    Returns (choice dict {(layer, sub): name}, status). `exclude`: earlier solutions to stay min_hamming away from.
    """
    prob = pulp.LpProblem("puzzle", pulp.LpMinimize)
    x = {it: prob.add_variable(f"x_{it[0]}_{it[1]}_{re.sub(r'[^A-Za-z0-9]', '_', it[2])}", cat="Binary") for it in items}
    prob += pulp.lpSum(score_of[it] * x[it] for it in items)
    for l in range(L):
        for sub in SUBBLOCKS:
            prob += pulp.lpSum(x[it] for it in items if it[0] == l and it[1] == sub) == 1
    for cname, (cost, const, budget) in constraints.items():
        prob += pulp.lpSum(cost[it] * x[it] for it in items) + const <= budget, cname
    for prev in exclude:  # diverse solutions: share at most 2L - d choices with each earlier one
        prob += pulp.lpSum(x[(l, s, n)] for (l, s), n in prev.items()) <= 2 * L - min_hamming
    with warnings.catch_warnings():  # pulp 3.3 bundles CBC behind PULP_CBC_CMD and flags it for pulp 4
        warnings.simplefilter("ignore", DeprecationWarning)
        status = prob.solve(pulp.PULP_CBC_CMD(msg=0, timeLimit=time_limit))
    if pulp.LpStatus[status] != "Optimal":
        return None, pulp.LpStatus[status]
    return {(it[0], it[1]): it[2] for it in items if x[it].value() > 0.5}, "Optimal"


def tightest_feasible(items, L, constraints, cname, time_limit):
    """The smallest value constraint `cname` can take with every other constraint kept (None if those fail)."""
    cost, const, _ = constraints[cname]
    others = {k: v for k, v in constraints.items() if k != cname}
    choice, _ = solve_mip(items, L, cost, others, time_limit)
    return None if choice is None else sum(cost[(l, s, n)] for (l, s), n in choice.items()) + const


# ----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    user_config = vars(args).copy()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # costs are measured where it runs
    run_dir = args.run_dir or os.path.dirname(os.path.abspath(args.out))
    try:  # everything read from disk is checked before the search starts
        check_out_free(args.out)
        check_metrics_free(run_dir, args.metrics_name, args.out)
        library, scores = load_library(args.library)
        parent, tokenizer = load_checkpoint(args.parent or library["parent"], device=device)
    except CheckpointError as e:
        die(str(e))
    config, L = parent.config, library["num_layers"]
    wandb_run = init_wandb(args.wandb_project, args.run_name or "mip", user_config, mode=args.wandb_mode)
    speed_dtype = resolve_dtype(args.speed_dtype, device)
    entries = {(e["layer"], e["subblock"], e["name"]): e for e in library["variants"]}
    items = sorted(entries)
    space = library["space"]

    # ------------------------------------------------------------------------
    # Costs: parameters, memory (weights + KV cache), measured runtime (cached per device and scenario)
    kv_tokens = args.kv_tokens if args.kv_tokens > 0 else args.batch * (args.prefill + args.gen_len)
    nonblock_params = num_params(parent) - sum(num_params(layer) for layer in parent.model.layers)
    params = {it: entries[it]["params"] for it in items}

    def kv_bytes(it):
        c = entries[it]["config"]
        if it[1] != "attention" or c["no_op"] or c["replace_with_linear"]:
            return 0
        return kv_tokens * kv_bytes_per_token(config.num_attention_heads // c["n_heads_in_group"], config.head_dim,
                                              args.kv_dtype)

    memory = {it: params[it] * args.weight_bytes + kv_bytes(it) for it in items}
    scenario = f"b{args.batch}-p{args.prefill}-g{args.gen_len}-{str(speed_dtype).removeprefix('torch.')}"
    cost_path = os.path.join(run_dir, "costs", f"{device_name(args.threads)}__{scenario}.json")
    if os.path.exists(cost_path) and not args.remeasure:
        try:
            costs = read_json(cost_path)
        except CheckpointError:
            die(f"the runtime cost cache {cost_path} is damaged; pass --remeasure to measure the costs again")
        print0(f"runtime costs from cache {cost_path}")
    else:
        print0(f"measuring block runtimes for scenario {scenario} (k={args.cost_copies}, {args.cost_repeats} repeats)")
        t0 = time.time()
        block_rt = measure_block_runtimes(parent, space, args, speed_dtype)
        [parent_s] = scenario_seconds([copy.deepcopy(parent).to(speed_dtype)], args.batch, args.prefill, args.gen_len,
                                      args.cost_repeats, args.cost_decode_steps)
        pa = [v["name"] for v in space["attention"] if v["parent"]][0]
        pf = [v["name"] for v in space["ffn"] if v["parent"]][0]
        # embeddings, final norm, LM head and per-step overhead: what the parent's layers do not explain. Timing
        # noise can push the difference to <= 0 on tiny models; floor it so no child is predicted to take 0 s.
        nonblock = max(0.01 * parent_s, parent_s - L * (block_rt[f"attention:{pa}"] + block_rt[f"ffn:{pf}"]))
        costs = {"device": device_name(args.threads), "scenario": scenario, "block_runtime_s": block_rt,
                 "parent_runtime_s": parent_s, "nonblock_runtime_s": nonblock, "seconds": time.time() - t0}
        write_json_atomic(cost_path, costs)
    runtime = {it: costs["block_runtime_s"][f"{it[1]}:{it[2]}"] for it in items}
    parent_rt, nonblock_rt = costs["parent_runtime_s"], costs["nonblock_runtime_s"]
    nonblock_mem = nonblock_params * args.weight_bytes
    parent_params = num_params(parent)

    def score_table(name):
        key = "kl" if name == "kl" else "lm_loss_delta"
        return {it: (0.0 if entries[it]["parent"] else scores[entries[it]["key"]][key]) for it in items}

    score_of = score_table(args.score)

    def predicted(choice):
        its = [(l, s, n) for (l, s), n in choice.items()]
        rt = sum(runtime[i] for i in its) + nonblock_rt
        return {"params": sum(params[i] for i in its) + nonblock_params,
                "memory_bytes": sum(memory[i] for i in its) + nonblock_mem, "runtime_s": rt,
                "speedup": parent_rt / rt, "score": sum(score_of[i] for i in its),
                "kl_sum": sum(score_table("kl")[i] for i in its)}

    def constraints_for(min_speedup=None):
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
        fmt = {"max_params": lambda v: f"--max-params {v:.0f} ({v / parent_params:.3f} of the parent)",
               "max_memory": lambda v: f"--max-memory-gib {v / 2 ** 30:.4f}",
               "min_speedup": lambda v: f"--min-speedup {parent_rt / v:.3f}",
               "max_latency": lambda v: f"--max-latency {v:.4f}"}
        for cname in cons:
            best = tightest_feasible(items, L, cons, cname, args.time_limit)
            if best is not None and best > cons[cname][2] * (1 + 1e-9):
                return f"infeasible: {cname} is binding; the tightest feasible value is {fmt[cname](best)}"
        return "infeasible: the constraints together cannot be met; loosen any of " + ", ".join(cons)

    # ------------------------------------------------------------------------
    # Search: the MIP (and K diverse solutions)
    cons = constraints_for()
    if not cons:
        die("no constraint given: set --min-speedup, --max-params, --max-memory-gib or --max-latency")
    solutions = []
    for k in range(args.num_solutions):
        choice, status = solve_mip(items, L, score_of, cons, args.time_limit, solutions, args.min_hamming)
        if choice is None:
            if k == 0:
                die(explain_infeasible(cons))
            print0(f"only {k} solutions at Hamming distance >= {args.min_hamming}")
            break
        solutions.append(choice)
    print0(f"MIP: {len(solutions)} solution(s); predicted {predicted(solutions[0])}")

    # ------------------------------------------------------------------------
    # Assemble children from the library; measure speed and quality against the parent in this run
    tev = TextEval(parent, tokenizer, seq_len=args.eval_seq_len, num_seqs=args.eval_seqs, batch_size=4)
    parent_fast = copy.deepcopy(parent).to(speed_dtype)
    parent_times = []  # the parent's time from every paired measurement (the table's parent runtime: their median)

    def assemble(choice, init=False):
        child = copy.deepcopy(parent)
        for (l, sub), name in sorted(choice.items()):
            e = entries[(l, sub, name)]
            state = load_variant_state(args.library, e, parent, init=init and not e["parent"])
            set_subblock(child, l, sub, variant_config_from_dict(sub, e["config"]), state)
        return child.eval()

    def measure(choice, init=False, label=""):
        child = assemble(choice, init)
        q = tev(child)
        fast = copy.deepcopy(child).to(speed_dtype)
        p_s, s = scenario_seconds([parent_fast, fast], args.batch, args.prefill, args.gen_len, args.speed_repeats,
                                  args.speed_decode_steps)
        parent_times.append(p_s)
        row = {"method": label, "measured_speedup": p_s / s, "measured_runtime_s": s, "parent_runtime_s": p_s,
               "predicted_speedup": predicted(choice)["speedup"], "params": num_params(child),
               "kl": q["kl_parent"], "next_token_acc": q["next_token_acc"], "top1_agreement": q["top1_agreement"],
               "lm_loss": q["lm_loss"]}
        print0(f"  {label:<28} predicted {row['predicted_speedup']:.2f}x measured {row['measured_speedup']:.2f}x "
               f"KL {row['kl']:.4f} acc {row['next_token_acc']:.3f}")
        return row, child

    pq = tev(parent)
    main_row, child = measure(solutions[0], label="MIP (KL score)" if args.score == "kl" else "MIP (LM-loss score)")

    # ------------------------------------------------------------------------
    # Sweep: the Pareto front (predicted quality vs measured speed)
    sweep = []
    for v in progress(args.sweep, desc="Pareto sweep", unit="child"):
        ch, _ = solve_mip(items, L, score_of, constraints_for(v), args.time_limit)
        if ch is None:
            print0(f"  sweep {v}x: infeasible")
            continue
        row, _ = measure(ch, label=f"MIP >= {v}x")
        sweep.append({"target_speedup": v, **row, "solution": {f"{l}.{s}": n for (l, s), n in sorted(ch.items())}})

    # ------------------------------------------------------------------------
    # Baselines in the same harness, at the main child's predicted runtime
    baselines = [main_row]
    target_rt = predicted(solutions[0])["runtime_s"]
    block_budget = target_rt - nonblock_rt
    names = {s: [v["name"] for v in space[s]] for s in SUBBLOCKS}
    pa, pf = [v["name"] for v in space["attention"] if v["parent"]][0], [v["name"] for v in space["ffn"] if v["parent"]][0]

    def rt_of(choice):
        return sum(runtime[(l, s, n)] for (l, s), n in choice.items()) + nonblock_rt

    if not args.no_baselines:
        other = "lm_loss" if args.score == "kl" else "kl"
        ch, _ = solve_mip(items, L, score_table(other), {"runtime": (runtime, nonblock_rt, target_rt)}, args.time_limit)
        if ch:
            baselines.append(measure(ch, label=f"MIP ({'LM-loss' if other == 'lm_loss' else 'KL'} score)")[0])
        greedy = {}  # the paper's greedy ablation: each layer alone picks its best pair within an equal share
        for l in range(L):
            pairs = [(score_of[(l, "attention", a)] + score_of[(l, "ffn", f)], runtime[(l, "attention", a)] +
                      runtime[(l, "ffn", f)], a, f) for a in names["attention"] for f in names["ffn"]]
            ok = [p for p in pairs if p[1] <= block_budget / L] or [min(pairs, key=lambda p: p[1])]
            _, _, a, f = min(ok)
            greedy[(l, "attention")], greedy[(l, "ffn")] = a, f
        baselines.append(measure(greedy, label="greedy per-layer")[0])
        if "no_op" in names["attention"] and "no_op" in names["ffn"]:
            bi = block_influence(parent, tev)  # ShortGPT: drop the layers whose output is most like their input
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

    # ------------------------------------------------------------------------
    # Save: the child checkpoint with search.json, pareto.png, metrics
    parent_s = statistics.median(parent_times)
    pred = predicted(solutions[0])
    uses_linear = any(entries[(l, s, n)]["config"]["replace_with_linear"] for (l, s), n in solutions[0].items())
    search = {"scenario": {"batch": args.batch, "prefill": args.prefill, "gen_len": args.gen_len,
                           "kv_dtype": args.kv_dtype, "kv_tokens": kv_tokens, "device": costs["device"]},
              "constraints": {k: v[2] for k, v in cons.items()}, "score": args.score,
              "solution": [{"layer": l, "attention": solutions[0][(l, "attention")], "ffn": solutions[0][(l, "ffn")]}
                           for l in range(L)],
              "solutions": [[{"layer": l, "attention": s[(l, "attention")], "ffn": s[(l, "ffn")]} for l in range(L)]
                            for s in solutions],
              "predicted": pred, "measured": main_row, "predicted_speedup": pred["speedup"],
              "measured_speedup": main_row["measured_speedup"], "parent": {**pq, "params": parent_params,
                                                                           "runtime_s": parent_s},
              "nonblock": {"params": nonblock_params, "runtime_s": nonblock_rt, "memory_bytes": nonblock_mem},
              "costs_cache": cost_path, "baselines": baselines, "sweep": sweep,
              "vllm_note": ("uses replace_with_linear: NVIDIA's HF code runs it, vLLM's nemotron_nas does not"
                            if uses_linear else "")}
    child = child.to(parent.dtype)
    try:
        save_checkpoint(child, tokenizer, args.out, stage="mip", args=user_config, extra_json={"search.json": search},
                        meta={"parent": library["parent"], "library": os.path.abspath(args.library)},
                        extra_files={"pareto.png": lambda path: plot_pareto(sweep, baselines, path)} if sweep else None)
    except CheckpointError as e:
        die(str(e))
    metrics = {"predicted_speedup": pred["speedup"], "measured_speedup": main_row["measured_speedup"],
               "params": main_row["params"], "kl": main_row["kl"], "next_token_acc": main_row["next_token_acc"],
               "next_token_acc_retention": main_row["next_token_acc"] / max(1e-9, pq["next_token_acc"]),
               "top1_agreement": main_row["top1_agreement"], "baselines": baselines, "sweep": sweep}
    metrics_path = write_metrics(run_dir, args.metrics_name, metrics, out=args.out)
    wandb_run.log({k: v for k, v in metrics.items() if isinstance(v, float)})
    print0(f"\nscenario: batch {args.batch}, prefill {args.prefill}, generate {args.gen_len}, KV {args.kv_dtype}; "
           f"parent {parent_s:.2f}s, acc {pq['next_token_acc']:.3f}")
    print0(f"{'method':<30}{'speedup':>9}{'params':>12}{'KL':>9}{'acc':>8}{'top1':>8}")
    for r in baselines + [dict(s, method=f"sweep {s['method']}") for s in sweep]:
        print0(f"{r['method']:<30}{r['measured_speedup']:>8.2f}x{r['params']:>12,}{r['kl']:>9.4f}"
               f"{r['next_token_acc']:>8.3f}{r['top1_agreement']:>8.3f}")
    if uses_linear:
        print0("note: " + search["vllm_note"])
    print0(f"checkpoint: {args.out}; metrics: {metrics_path}")
    wandb_run.finish()


@torch.no_grad()
def block_influence(parent, tev):
    """Per layer mean 1 - cos(h_in, h_out) on the held-out sequences (ShortGPT's block influence)."""
    ids = tev.ids.to(parent.device)
    hs = parent(ids, output_hidden_states=True, use_cache=False).hidden_states
    return [(1 - torch.nn.functional.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1)).mean().item()
            for i in range(len(hs) - 1)]


def plot_pareto(sweep, baselines, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = sorted((s["measured_speedup"], s["kl"]) for s in sweep)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="MIP sweep (measured)")
    ax.plot([s["predicted_speedup"] for s in sweep], [s["kl"] for s in sweep], "x", color="gray",
            label="MIP sweep (predicted speed)")
    for b in baselines[1:]:
        ax.plot(b["measured_speedup"], b["kl"], "s", label=b["method"])
    ax.set_xlabel("measured throughput speedup over the parent")
    ax.set_ylabel("KL(parent || child), held-out")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)



if __name__ == "__main__":
    main()
