"""`python tests/_run_script.py N SCRIPT ARGS` (or `N -m MODULE ARGS`): run the stage script as `python SCRIPT ARGS`
would, except that the N-th safetensors file a resume state writes is the last thing the process does (SIGKILL
right after it, before the state's state.json and COMPLETED): a save cut off by kill -9.
"""

import os
import runpy
import signal
import sys


def _die_at_save(n: int) -> None:
    import common.resume as resume
    real, calls = resume.save_file, []

    def save_then_die(*args, **kwargs):
        calls.append(1)
        real(*args, **kwargs)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGKILL)
    resume.save_file = save_then_die


if __name__ == "__main__":
    n, *argv = sys.argv[1:]
    sys.path.pop(0)  # this file's directory; the script's own goes first, as with `python SCRIPT`
    if argv[0] == "-m":  # python -m: sys.path starts with the working directory
        sys.path.insert(0, os.getcwd())
        _die_at_save(int(n))
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        _die_at_save(int(n))
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")
