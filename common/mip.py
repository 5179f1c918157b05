"""The Puzzle MIP (Puzzle §MIP), solved by 02_mip_select.py with pulp + CBC: a grouped knapsack that picks exactly one
block (attention, FFN pair) per layer, minimizing the summed replace-one-block scores under hardware constraints.

    score_of    {(layer, attention name, FFN name): the block's score}   one binary per block
    constraints {cname: (cost per (layer, subblock, name), constant, budget)}
                a block costs its attention's plus its FFN's; the constant is what lies outside the blocks
    choice      {(layer, "attention"): name, (layer, "ffn"): name}        what solve_mip returns

greedy_blocks() is the paper's greedy ablation over the same per-block tables.
"""

import warnings

import pulp


def block_costs(cost, blocks):
    """{(layer, attention, ffn): cost}: a block's runtime, parameters or memory is its attention's plus its FFN's."""
    return {(l, a, f): cost[(l, "attention", a)] + cost[(l, "ffn", f)] for l, a, f in blocks}


def blocks_of(choice):
    """[(layer, attention, ffn)] of a choice {(layer, subblock): name}."""
    return [(l, choice[(l, "attention")], choice[(l, "ffn")]) for l in sorted({l for l, _ in choice})]


def greedy_blocks(score_of, rt_of, budget):
    """The paper's greedy ablation: each layer alone picks its best block within an equal share of the runtime
    budget, then what the shares left is spent on the upgrade with the most score saved per second, while one fits.
    Both `score_of` and `rt_of` are per block {(layer, attention, ffn): value}. Returns a choice like solve_mip's."""
    L = max(b[0] for b in score_of) + 1
    per_layer = [[b for b in score_of if b[0] == l] for l in range(L)]
    pick = []
    for bs in per_layer:
        ok = [b for b in bs if rt_of[b] <= budget / L] or [min(bs, key=lambda b: rt_of[b])]
        pick.append(min(ok, key=lambda b: score_of[b]))
    while True:
        left = budget - sum(rt_of[b] for b in pick)
        ups = [((score_of[pick[b[0]]] - score_of[b]) / max(rt_of[b] - rt_of[pick[b[0]]], 1e-12), b)
               for bs in per_layer for b in bs
               if score_of[b] < score_of[pick[b[0]]] and rt_of[b] - rt_of[pick[b[0]]] <= left]
        if not ups:
            break
        _, b = max(ups)
        pick[b[0]] = b
    return {**{(l, "attention"): a for l, a, _ in pick}, **{(l, "ffn"): f for l, _, f in pick}}


def solve_mip(score_of, constraints, time_limit, exclude=(), min_hamming=0):
    """score_of: {(layer, attention name, FFN name): the block's replace-one-block score}; constraints: {cname:
    (cost per (layer, subblock, name), constant, budget)}. One binary per block, exactly one block per layer.

    Returns (choice {(layer, "attention"): name, (layer, "ffn"): name}, status). `exclude`: earlier solutions
    whose blocks the new one must differ from in at least min_hamming layers.
    """
    blocks = sorted(score_of)
    L = max(b[0] for b in blocks) + 1
    prob = pulp.LpProblem("puzzle", pulp.LpMinimize)
    x = {b: prob.add_variable(f"x{i}", cat="Binary") for i, b in enumerate(blocks)}
    prob += pulp.lpSum(score_of[b] * x[b] for b in blocks)
    for l in range(L):
        prob += pulp.lpSum(x[b] for b in blocks if b[0] == l) == 1
    for cname, (cost, const, budget) in constraints.items():
        bc = block_costs(cost, blocks)
        prob += pulp.lpSum(bc[b] * x[b] for b in blocks) + const <= budget, cname
    for prev in exclude:  # diverse solutions: keep at most L - d of an earlier solution's blocks
        prob += pulp.lpSum(x[(l, prev[(l, "attention")], prev[(l, "ffn")])] for l in range(L)) <= L - min_hamming
    with warnings.catch_warnings():  # pulp 3.3 bundles CBC behind PULP_CBC_CMD and flags it for pulp 4
        warnings.simplefilter("ignore", DeprecationWarning)
        status = prob.solve(pulp.PULP_CBC_CMD(msg=0, timeLimit=time_limit))
    if pulp.LpStatus[status] != "Optimal":
        return None, pulp.LpStatus[status]
    chosen = [b for b in blocks if x[b].value() > 0.5]
    return {**{(l, "attention"): a for l, a, _ in chosen}, **{(l, "ffn"): f for l, _, f in chosen}}, "Optimal"


def tightest_feasible(blocks, constraints, cname, time_limit):
    """The smallest value constraint `cname` can take with every other constraint kept (None if those fail)."""
    cost, const, _ = constraints[cname]
    others = {k: v for k, v in constraints.items() if k != cname}
    choice, _ = solve_mip(block_costs(cost, blocks), others, time_limit)
    return None if choice is None else sum(cost[(l, s, n)] for (l, s), n in choice.items()) + const
