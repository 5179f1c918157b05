"""The results tables: every stage's metrics/<stage>.json lined up, plus how long each stage took.

    python -m common.report --run-dir runs/smol        # prints markdown, writes runs/smol/REPORT.md
"""

import argparse
import json
import os

STAGE_ORDER = ["parent", "bld", "child", "fused", "distilled", "sft", "grpo", "rlhf"]


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _scalars(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[prefix + k] = v
    return out


def load_metrics(run_dir: str) -> dict:
    mdir = os.path.join(run_dir, "metrics")
    if not os.path.isdir(mdir):
        raise FileNotFoundError(f"{mdir} does not exist; run the stages first (bash run.sh)")
    names = [f[:-5] for f in os.listdir(mdir) if f.endswith(".json")]
    ordered = sorted(names, key=lambda n: (STAGE_ORDER.index(n) if n in STAGE_ORDER else len(STAGE_ORDER), n))
    return {n: json.load(open(os.path.join(mdir, n + ".json"))) for n in ordered}


def render(run_dir: str) -> str:
    metrics = load_metrics(run_dir)
    lines = [f"# Results: {run_dir}", ""]
    timings = metrics.pop("timings", None)
    if timings:
        lines += ["## Wall time per stage (this machine)", "", "| stage | seconds | minutes |", "|---|---|---|"]
        lines += [f"| {k} | {v} | {v / 60:.1f} |" for k, v in timings.items()]
        lines += [f"| total | {sum(timings.values())} | {sum(timings.values()) / 60:.1f} |", ""]
    for stage, m in metrics.items():
        flat = {k: v for k, v in _scalars(m).items() if not k.startswith("args.")}
        lines += [f"## {stage}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in flat.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Print the results tables of a run directory")
    p.add_argument("--run-dir", required=True)
    args = p.parse_args(argv)
    text = render(args.run_dir)
    with open(os.path.join(args.run_dir, "REPORT.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
