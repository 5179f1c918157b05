"""The results tables, as markdown lines: each stage renders its own and stores them in its metrics file
(metrics["report"]) and prints them; `common.report` joins the stored tables of a run directory in run order.

Cells say what a reader can use: floats to 3 significant digits, whole numbers from 100 up, an accuracy with "± SE
(n=...)", a paired gap with its SE and whether it exceeds 2 SE.
"""

import functools
import json

from common.stats import gap_label, paired_gaps, ratio_se


def _never_fails(render):
    """A stage renders its tables after its checkpoint is saved and before its metrics file is written: a metrics
    dict of an unexpected shape falls back to the metric | value listing instead of losing the file."""
    @functools.wraps(render)
    def safe(m, name, *rest):
        try:
            return render(m, name, *rest)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            return generic_table(m, name) + [f"({render.__name__} could not render this file: {e!r})", ""]
    return safe


def _fmt(v):
    """What a reader can use: floats to 3 significant digits ("4.97", "0.0312"), whole from 100 up ("1,234")."""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "-" if v is None else str(v)


def _acc(a, n=None, se=None, sign=""):
    """An accuracy (or a gain, sign="+") to 2 decimals, with its standard error and sample size when known:
    "0.32 ± 0.05 (n=100)"."""
    if a is None:
        return "-"
    return f"{a:{sign}.2f}" + (f" ± {se:.2f}" if se is not None else "") + (f" (n={n})" if n else "")


def _val(v, n=None, se=None, sign=""):
    """A score that is not a rate (a reward model's logit) like _acc: 3 significant digits, "± se", "(n=...)"."""
    if v is None:
        return "-"
    return f"{v:{sign}.3g}" + (f" ± {se:.2g}" if se is not None else "") + (f" (n={n})" if n else "")


def _pm(v, se=None):
    """A measured value with its standard error where the metrics file has one: "2.33 ± 0.041"; else the value
    itself (formatted by _table)."""
    return v if se is None or v is None else f"{_fmt(v)} ± {se:.2g}"


def _gaps(rows, vs: str, ref, label: str):
    """The paired-difference cells of an ablation table, from rows[i][vs] (common.stats.paired_gaps against the
    reference row `ref`): ΔKL and Δacc, each ± its paired SE, and which of the two gaps exceed 2 paired SE."""
    out = []
    for r in rows:
        g = r.get(vs)
        if r is ref or not g:
            out.append(("-", "-", label if r is ref else "-"))
            continue
        out.append((_val(g.get("kl_parent"), se=g.get("kl_parent_se"), sign="+"),
                    _val(g.get("next_token_acc"), se=g.get("next_token_acc_se"), sign="+"), gap_label(g)))
    return out


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return out + [""]


def timings_table(m: dict) -> list[str]:
    """run.sh's metrics/timings.json: seconds per stage and the total."""
    rows = [(k, v, v / 60) for k, v in m.items()]
    rows.append(("total", sum(m.values()), sum(m.values()) / 60))
    return ["## Wall time per stage (this machine)", ""] + _table(["stage", "seconds", "minutes"], rows)


def generic_table(m: dict, name: str) -> list[str]:
    """Any metrics file without tables of its own: every scalar as metric | value."""
    flat = {k: f"{v:,.0f}" if k.endswith(("_s", "seconds")) and isinstance(v, float) else v  # seconds: whole
            for k, v in _scalars(m).items() if not k.startswith("args.")}
    return [f"## {name}", ""] + _table(["metric", "value"], list(flat.items()))


def _speed_ratios(m: dict, title: str) -> list[str]:
    """common.evaluate.speed_eval's ratios (model / reference per measure) as a one-row table; [] without them."""
    ratio = (m.get("speed") or {}).get("ratio")
    return [title, ""] + _table(list(ratio), [list(ratio.values())]) if ratio else []


def _scalars(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if k.startswith("_"):  # bookkeeping (e.g. "_out": the run that owns the file), not a result
            continue
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[prefix + k] = v
    return out


# ----------------------------------------------------------------------------
# The tables of each stage (the stage calls its own and stores the lines in its metrics file)


@_never_fails
def evaluation_tables(m, name):
    """common.evaluate: text quality against the parent, generation (the parent's row beside the model's where the
    model is another checkpoint), speed and its ratio."""
    t, sp = m.get("text", {}), m.get("speed", {})
    lines = [f"## Evaluation suite: {name} ({m.get('model')}, {m.get('dtype')})", ""]
    lines += _table(["LM loss", "next-token acc", "KL(parent‖model)", "top-1 agreement", "tokens"],
                    [(t.get("lm_loss"), t.get("next_token_acc"), t.get("kl_parent"), t.get("top1_agreement"),
                      t.get("tokens"))])
    pg = m.get("parent_gen") if m.get("parent") and m.get("parent") != m.get("model") else None
    rows = []
    for mode, k in (("thinking on", "gen_on"), ("thinking off", "gen_off"), ("instruction following", "gen_if")):
        for who, g in ((mode, m.get(k, {})), (f"{mode}, parent", (pg or {}).get(k)))[:2 if pg else 1]:
            g = g or {}
            rows.append((who, _acc(g.get("accuracy"), g.get("n")), g.get("accuracy_multistep"),
                         g.get("format_compliance"), g.get("mean_response_tokens"), g.get("instruction_score")))
    lines += _table(["generation", "accuracy", "multi-step acc", "format", "mean tokens", "IF score"], rows)
    if sp.get("model"):
        keys = [k for k in sp["model"] if not k.startswith("peak")]
        lines += _table(["speed (tok/s)", *keys],
                        [("model", *[sp["model"][k] for k in keys]), ("parent", *[sp["parent"][k] for k in keys]),
                         ("ratio", *[sp["ratio"][k] for k in keys])])
    return lines


def _retention(m, k):
    """04's next-token retention of `k` ("before"/"after") with its paired SE over the evaluation chunks,
    "0.898 ± 0.015"; the stored ratio alone where the metrics file has no per-chunk values."""
    try:
        r, se = ratio_se(m[k]["per_seq"]["next_token_acc"], m["parent"]["per_seq"]["next_token_acc"])
    except (KeyError, TypeError, ValueError):
        return (m.get("retention") or {}).get(k)
    return _pm(r, se)


@_never_fails
def bld_tables(m, _):
    """01: the library's BLD summary, then each variant's replace-one-block score over the layers (mean / max KL to
    the parent with only that block replaced, top-1 agreement, BLD's validation loss before and after)."""
    lines = ["## 01 Block library (BLD)", ""] + _table(
        ["variants", "trained", "steps", "tokens", "tok/s", "parent forwards / batch", "val loss init → BLD",
         "improved by BLD", "scoring s"],
        [(m["variants"], m["trained_variants"], m["bld_steps"], m["bld_tokens"], m["bld_tok_per_s"],
          m["parent_forwards_per_batch"], f"{_fmt(m['val_loss_init_mean'])} → {_fmt(m['val_loss_bld_mean'])}",
          m["variants_improved_by_bld"], f"{m['score_seconds']:,.0f}")])
    if m.get("by_variant"):
        lines += ["Replace-one-block scores per variant, over the layers:", ""] + _table(
            ["variant", "layers", "mean KL", "max KL", "top-1 agree", "BLD val loss init → trained"],
            [(v["variant"], v["layers"], v["mean_kl"], v["max_kl"], v["top1_agreement"],
              f"{_fmt(v['val_loss_init'])} → {_fmt(v['val_loss_bld'])}" if "val_loss_bld" in v else "-")
             for v in m["by_variant"]])
    return lines


def _speed(r):
    """measured speedup (min-max over the paired rounds) as "1.52 (1.49-1.55)"."""
    if r.get("measured_speedup_min") is None:
        return _fmt(r["measured_speedup"])
    return f"{r['measured_speedup']:.2f} ({r['measured_speedup_min']:.2f}-{r['measured_speedup_max']:.2f})"


@_never_fails
def mip_tables(m, name):
    sc = m.get("scenario")
    where = (f"; scenario {sc['name']}: batch {sc['batch']}, prompt {sc['prefill']}, {sc['gen_len']} new tokens, "
             f"KV {sc['kv_dtype']}") if sc else ""
    lines = [f"## 02 Puzzle search: {name} (predicted {m['predicted_speedup']:.2f}x, measured "
             f"{m['measured_speedup']:.2f}x, next-token retention {m['next_token_acc_retention']:.3f}{where})", ""]
    if m.get("ceiling_speedup") is not None:
        lines += [f"Cost model: the parent and {len(m.get('cost_check') or []) - 1} random children predicted within "
                  f"{m['cost_check_max_abs_error']:.1%} of their measured speed; the main child measured twice agrees "
                  f"within {m['repeat_agreement']:.1%}; the ceiling (every block removed) is {m['ceiling_speedup']:.2f}x."
                  f" Speedups: median of the paired rounds (min-max).", ""]
    cols = ["method", "measured speedup", "predicted", "error", "of ceiling", "params", "KL", "next-token acc",
            "top-1 agree"]
    row = lambda r: (r["method"], _speed(r), r["predicted_speedup"],  # noqa: E731
                     f"{r['prediction_error']:+.1%}" if r.get("prediction_error") is not None else "-",
                     r.get("fraction_of_ceiling"), r["params"],
                     _pm(r["kl"], r.get("kl_se")), _pm(r["next_token_acc"], r.get("next_token_acc_se")),
                     _pm(r["top1_agreement"], r.get("top1_agreement_se")))
    if m.get("baselines"):
        base = m["baselines"]
        rows, bcols = [row(r) for r in base], cols
        if any(r.get("vs_mip") for r in base):  # paired quality gaps to the MIP child, same chunks
            bcols = cols + ["ΔKL vs MIP", "Δacc vs MIP", "gap > 2 SE"]
            rows = [r + g for r, g in zip(rows, _gaps(base, "vs_mip", base[0], "MIP"))]
        if any("kl_sum_predicted" in r for r in base):  # the MIP's additive quality model vs the measured KL
            bcols = bcols + ["sum of block KLs", "layers without attention"]
            rows = [r + (b.get("kl_sum_predicted"), b.get("attention_replaced")) for r, b in zip(rows, base)]
        lines += ["Baselines at the child's predicted runtime:", ""] + _table(bcols, rows)
    if m.get("sweep"):
        lines += ["Pareto sweep (min-speedup targets):", ""] + _table(cols, [row(r) for r in m["sweep"]])
    if m.get("cost_check"):
        lines += ["Cost check (the parent and random children, predicted vs measured):", ""] + _table(
            ["model", "measured speedup", "predicted", "error"],
            [(r.get("method", "?"), _speed(r), r["predicted_speedup"], f"{r['prediction_error']:+.1%}")
             for r in m["cost_check"]])
    return lines


@_never_fails
def fusion_tables(m, _):
    lines = [f"## 03 FFN Fusion ({m['child']}): sequential depth {m['depth_before']} → {m['depth_after']}", ""]
    levels = m["levels"]
    cols = ["merges", "fused blocks", "layers", "depth", "max dependency", "KL", "next-token acc"]
    rows = [(lv["merges"], lv["fused_blocks"], lv["num_layers"], lv["depth"], lv["max_dependency"],
             _pm(lv["kl_parent"], lv.get("kl_parent_se")), _pm(lv["next_token_acc"], lv.get("next_token_acc_se")))
            for lv in levels]
    if any(lv.get("vs_unfused") for lv in levels):  # paired differences vs the unfused child, same chunks
        cols += ["ΔKL vs unfused", "Δacc vs unfused", "gap > 2 SE"]
        ref = next((lv for lv in levels if lv["merges"] == 0), None)
        rows = [r + g for r, g in zip(rows, _gaps(levels, "vs_unfused", ref, "unfused"))]
    lines += _table(cols, rows)
    return lines + _speed_ratios(m, "Fused vs unfused, same run:")


@_never_fails
def distill_tables(m, name):
    lines = [f"## 04 Global KD: {name} ({m['student']}, loss {m['loss']}, {m['tokens']:,} tokens)", ""]
    rows = [(k, _pm(m[k].get("kl_parent"), m[k].get("kl_parent_se")),
             _pm(m[k].get("next_token_acc"), m[k].get("next_token_acc_se")), _retention(m, k),
             m[k].get("top1_agreement")) for k in ("before", "after") if m.get(k)]
    lines += _table(["", "KL", "next-token acc", "retention", "top-1 agree"], rows)
    return lines + _speed_ratios(m, "Speed vs the teacher (ratios):")


@_never_fails
def kd_ablation_tables(m, _):
    pacc = (m.get("parent") or {}).get("next_token_acc")
    table = m["table"]
    lines = [f"## 04 KD loss ablation ({m['student']}, {m['tokens_per_trial']:,} tokens per trial)", ""]
    cols = ["loss", "KL", "next-token acc", "retention", "top-1 agree", "LM loss"]
    rows = [(r["loss"], _pm(r.get("kl_parent"), r.get("kl_parent_se")),
             _pm(r.get("next_token_acc"), r.get("next_token_acc_se")),
             r.get("next_token_acc") / pacc if pacc and r.get("next_token_acc") else None,
             r.get("top1_agreement"), r.get("lm_loss")) for r in table]
    if any(r.get("vs_best") for r in table):  # paired differences vs the lowest-KL row, same chunks
        cols += ["ΔKL vs best", "Δacc vs best", "gap > 2 SE"]
        ref = next((r for r in table if r["loss"] == m.get("best")), None)
        rows = [r + g for r, g in zip(rows, _gaps(table, "vs_best", ref, "best"))]
        lines += ["± = standard error over the evaluation chunks; Δ = paired difference vs the lowest-KL row, "
                  "a finding only where the gap exceeds 2 paired SE (one seed: training noise comes on top).", ""]
    return lines + _table(cols, rows)


@_never_fails
def sft_tables(m, _):
    lines = [f"## 05 SFT with the reasoning toggle (init {m['init']}, {m['train_tokens']:,} tokens)", ""]
    rows = []
    for mode in ("on", "off"):
        for who in ("parent", "before", "after"):
            if m.get(f"{who}_{mode}_accuracy") is not None:
                rows.append((f"thinking {mode}", {"before": "init", "after": "SFT"}.get(who, who),
                             _acc(m[f"{who}_{mode}_accuracy"], m.get("eval_problems")),
                             *[m.get(f"{who}_{mode}_{k}") for k in ("accuracy_multistep", "format_compliance",
                                                                   "mean_response_tokens")]))
    lines += _table(["mode", "model", "accuracy", "multi-step acc", "format", "mean tokens"], rows)
    t = m.get("toggle") or {}
    if t.get("n"):
        lines += [f"The toggle after SFT (first {t['max_new_tokens']} tokens, {t['n']} held-out problems): opens a "
                  f"think block {_acc(t['think_rate_on'], se=t['think_rate_on_se'])} with \"on\", "
                  f"{_acc(t['think_rate_off'], se=t['think_rate_off_se'])} with \"off\" (target >= 0.95 / <= 0.05).", ""]
    return lines


@_never_fails
def grpo_tables(m, name):
    """06 GRPO: held-out accuracy before/after (± standard error, n), the paired gain, and the filter's counts."""
    n = m.get("eval_problems")
    lines = [f"## 06 GRPO ({name}: policy {m['policy']}, {m['rollout_steps']} rollout steps, pass-rate filter "
             f"{'on' if m.get('filter') else 'off'}, curriculum {'on' if m.get('curriculum') else 'off'})", "",
             f"Prompts: {m['candidates']} candidates, {m['dropped_by_filter']} dropped by the filter, "
             f"{m['pass_rate_zero']} with pass rate 0, {m['kept_prompts']} kept. Held-out problems: n = {n} per mode.", ""]
    rows = []
    for mode in ("on", "off"):
        def acc(who):
            return _acc(m.get(f"{who}_{mode}_accuracy"), n, m.get(f"{who}_{mode}_accuracy_se"))
        rows.append((f"thinking {mode}", acc("before"), acc("after"),
                     _acc(m.get(f"gain_{mode}"), se=m.get(f"gain_{mode}_se"), sign="+"),
                     m.get(f"before_{mode}_format_compliance"), m.get(f"after_{mode}_format_compliance"),
                     m.get(f"after_{mode}_mean_response_tokens")))
    return lines + _table(["mode", "accuracy before", "accuracy after", "gain (paired SE)", "format before",
                           "format after", "mean tokens after"], rows)


@_never_fails
def rlhf_tables(m, name):
    """07 RLOO / RPO / GRPO-vs-RM: held-out instruction following, the reward model's score of the answers and
    math ("nothing lost"), before and after with standard errors, n, and the paired gain."""
    online = f", {m['online_iterations']} online iterations" if m.get("online_iterations") else ""
    lines = [f"## 07 {m['algo']}{' ' + m['rpo_loss'] if m.get('rpo_loss') else ''} ({name}: policy {m['policy']}, "
             f"{m['steps']} steps{online})", ""]
    rows = []
    for key, label in (("if_off_all_met", "IF all constraints met (off)"), ("if_on_all_met", "IF all met (on)"),
                       ("if_off_fraction_met", "IF fraction met (off)"), ("if_on_fraction_met", "IF fraction met (on)"),
                       ("if_off_rm_score", "reward-model score (IF, off)"), ("if_on_rm_score", "reward-model score (IF, on)"),
                       ("math_on_accuracy", "math accuracy, thinking on"), ("math_off_accuracy", "math accuracy, thinking off"),
                       ("math_on_format_compliance", "toggle format, on"), ("math_off_format_compliance", "toggle format, off")):
        if m.get(f"after_{key}") is None:
            continue
        n = m.get("eval_math_problems" if key.startswith("math") else "eval_if_prompts")
        cell = _val if "rm_score" in key else _acc
        rows.append((label, n, *[cell(m.get(f"{w}_{key}"), se=m.get(f"{w}_{key}_se"), sign="+" if w == "gain" else "")
                                 for w in ("before", "after", "gain")]))
    lines += _table(["held-out", "n", "before", "after", "gain (paired SE)"], rows)
    if m.get("sampled_reward_per_iteration"):
        lines += ["Online RPO, mean reward of the sampled answers per iteration: " +
                  " → ".join(_fmt(v) for v in m["sampled_reward_per_iteration"]), ""]
    return lines


@_never_fails
def reward_model_tables(m, name):
    """07 reward model: pairwise accuracy on held-out pairs, per kind; the unseen kind was never trained on."""
    kinds = [k[len("after_accuracy_"):] for k in m if k.startswith("after_accuracy_") and not k.endswith("_se")]
    lines = [f"## 07 Reward model ({name}: {m['steps']} steps, {m['eval_pairs']} held-out pairs)", ""]
    rows = [("held-out pairs of the trained kinds", _acc(m.get("before_heldout_accuracy"), se=m.get("before_heldout_accuracy_se")),
             _acc(m.get("after_heldout_accuracy"), se=m.get("after_heldout_accuracy_se")))]
    rows += [(f"{k}{' (never trained on)' if k == m.get('unseen_kind') else ''}", _acc(m.get(f"before_accuracy_{k}")),
              _acc(m.get(f"after_accuracy_{k}"))) for k in kinds]
    return lines + _table(["pairwise accuracy", "before training", "after"], rows)


@_never_fails
def quant_tables(metrics: dict, title: str) -> list[str]:
    """04 --quant: PTQ / QAT / QAD (/ QAD from the model itself) against the full-precision model, each cell with its
    paired gap."""
    def cell(r, k, digits=3):
        if k not in r:
            return "-"
        d = f" ({r['d_' + k]:+.{digits}f} ± {r['d_' + k + '_se']:.{digits}f})" if "d_" + k in r and r["method"] != "bf16" else ""
        return f"{r[k]:.{digits}f}{d}"
    n = {k: next((r[f"{k}_n"] for r in metrics["table"] if f"{k}_n" in r), 0) for k in ("math_on", "if")}
    lines = [f"## {title}", "",
             f"{metrics['format'].upper()} ({'weights + activations' if metrics['quant_acts'] else 'weights'}, "
             f"{metrics['quantized_linears']} projections) of {metrics['student']}; {metrics['tokens_per_method']} "
             f"training tokens per method; math n={n['math_on']} per mode, IF n={n['if']}; each cell: value (Δ ± "
             f"paired SE vs the full-precision row \"bf16\")", "",
             "| method | KL to full precision | next-token acc | math on | math off | think format on | format off "
             "| IF all-met |", "|---|---|---|---|---|---|---|---|"]
    for r in metrics["table"]:
        kl = f"{r['kl_parent']:.4f} ± {r['kl_parent_se']:.4f}" if "kl_parent" in r else "-"
        lines.append(f"| {r['method']} | {kl} | {cell(r, 'next_token_acc', 4)} | {cell(r, 'math_on')} "
                     f"| {cell(r, 'math_off')} | {cell(r, 'format_on')} | {cell(r, 'format_off')} | {cell(r, 'if')} |")
    if metrics["findings"]:
        lines += ["", "findings: " + json.dumps(metrics["findings"])]
    return lines + [""]


def rpo_loss_table(runs: list[dict], policy: str, steps: int) -> list[str]:
    """The paper's choice of loss: the offline RPO runs of one policy at one budget (07's metrics) side by side; []
    for fewer than two (an online run is not at the same budget)."""
    runs = [m for m in runs if isinstance(m, dict) and m.get("algo") == "rpo" and not m.get("online_iterations")
            and m.get("policy") == policy and m.get("steps") == steps]
    if len(runs) < 2:
        return []
    rows = [(m["rpo_loss"], m["steps"], _val(m.get("before_if_off_rm_score")), _val(m.get("after_if_off_rm_score")),
             _val(m.get("gain_if_off_rm_score"), se=m.get("gain_if_off_rm_score_se"), sign="+"),
             _acc(m.get("gain_if_off_all_met"), se=m.get("gain_if_off_all_met_se"), sign="+"),
             _acc(m.get("gain_math_on_accuracy"), se=m.get("gain_math_on_accuracy_se"), sign="+"))
            for m in runs]
    return ["## 07 RPO: the loss at the same budget", ""] + _table(
        ["loss", "steps", "RM score before", "after", "gain (paired SE)", "IF all-met gain", "math (on) gain"], rows)


def fusion_after_kd(fused: dict, unfused: dict) -> list[str]:
    """FFN Fusion's table after training: the fused child and the unfused child after the same KD budget (two of
    04's metrics), quality on the same evaluation chunks (paired) and speed vs the parent."""
    if not (fused.get("after") and unfused.get("after")):
        return []
    rows = []
    for label, m in (("unfused child", unfused), ("fused child", fused)):
        a, sp = m["after"], (m.get("speed") or {}).get("ratio", {})
        rows.append((label, m["student"], m["tokens"], _pm(a["kl_parent"], a.get("kl_parent_se")),
                     _pm(a["next_token_acc"], a.get("next_token_acc_se")), _retention(m, "after"),
                     *[sp.get(k) for k in sorted(sp)]))
    keys = sorted((fused.get("speed") or {}).get("ratio", {}))
    lines = ["## 03 + 04 FFN Fusion after the same KD budget", ""]
    lines += _table(["model", "student", "KD tokens", "KL", "next-token acc", "retention", *[f"{k} vs parent"
                                                                                           for k in keys]], rows)
    a, b = fused["after"], unfused["after"]
    try:
        g, n = paired_gaps(a, b), len(a["per_seq"]["kl_parent"])
    except (KeyError, ValueError):  # older metrics without per-chunk values, or other chunks: no paired line
        return lines + [""]
    for k, name in (("kl_parent", "KL"), ("next_token_acc", "next-token acc")):
        lines.append(f"fused − unfused {name}: {g[k]:+.3g} ± {g[k + '_se']:.2g} (paired over {n} chunks; "
                     f"{'beyond' if g[k + '_beyond_2se'] else 'within'} 2 SE)")
    return lines + [""]
