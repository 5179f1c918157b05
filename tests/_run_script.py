"""Run a stage script the way `python SCRIPT ARGS` / `python -m MODULE ARGS` would, in a process forked by
test_faults.py's fork server (which has imported torch and transformers once, so a case does not pay ~3 s of
imports). Like the interpreter: stdout/stderr go to the given files, an uncaught exception prints its traceback and
exits 1, SystemExit exits with its code (a message is printed to stderr and exits 1).

kill_at_save=N: the N-th safetensors file a resume state writes is the last thing the process does (SIGKILL right
after it, before the state's state.json and COMPLETED): a save cut off by kill -9.
"""

import os
import runpy
import signal
import sys
import traceback


def _die_at_save(n: int) -> None:
    import common.checkpoint as checkpoint
    real, calls = checkpoint.save_file, []

    def save_then_die(*args, **kwargs):
        calls.append(1)
        real(*args, **kwargs)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save_file = save_then_die


def run(argv: list[str], cwd: str, env: dict, stdout: str, stderr: str, kill_at_save: int = 0) -> None:
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    if kill_at_save:
        _die_at_save(kill_at_save)
    code = 0
    try:
        if argv[0] == "-m":  # python -m: sys.path starts with the working directory
            sys.argv = argv[1:]
            sys.path.insert(0, cwd)
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:  # python SCRIPT: sys.path starts with the script's directory
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 (what the interpreter does with an uncaught exception)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
