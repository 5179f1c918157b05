"""Run a stage script in this process, as `python SCRIPT ARGS` would.

The stages are flat scripts (module-level code, nanochat's layout): nothing to import, so a test runs one by its path
with sys.argv set, and gets back the script's globals (its `metrics`, `history`, `args`, ...). A stage that stops
with common.cli.die raises SystemExit("error: ...") here, as `python SCRIPT` would exit with it.
"""

import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_stage(script: str, argv) -> dict:
    """`python <ROOT>/<script> *argv` in this process; returns the script's module globals."""
    path = os.path.join(ROOT, script)
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [path, *map(str, argv)]
    sys.path.insert(0, ROOT)
    try:
        return runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
