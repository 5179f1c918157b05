"""The results tables of a run directory: each stage's stored tables, in run order, and how long each stage took.

    python -m common.report --run-dir runs/smol        # prints markdown, writes runs/smol/REPORT.md

Every stage renders its own tables (common.tables) into its metrics file as `metrics["report"]` (markdown lines)
and prints them; this joins them in the order the files were written, after run.sh's wall times. It knows no stage:
a metrics file without tables of its own is listed as metric | value.
"""

import argparse
import os

from common.checkpoint import read_run_metrics
from common.tables import generic_table, timings_table


def render(run_dir: str) -> str:
    lines = [f"# Results: {run_dir}", ""]
    metrics = read_run_metrics(run_dir)
    if isinstance(metrics.get("timings"), dict):  # run.sh's, rewritten after every stage: first, not in run order
        lines += timings_table(metrics.pop("timings"))
    for name, m in metrics.items():
        if isinstance(m, Exception):  # not valid JSON (common.checkpoint.read_run_metrics says why)
            lines += [f"## {name}", "", f"(skipped: {m})", ""]
        elif not isinstance(m, dict):  # a JSON file someone else put there (a list, a number): named, not rendered
            lines += [f"## {name}", "", f"(not a stage's metrics file: a JSON {type(m).__name__}; skipped)", ""]
        elif isinstance(m.get("report"), list):
            lines += m["report"] + [""]
        else:
            lines += generic_table(m, name)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Print the results tables of a run directory")
    p.add_argument("--run-dir", required=True)
    args = p.parse_args(argv)
    try:
        text = render(args.run_dir)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
    with open(os.path.join(args.run_dir, "REPORT.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
