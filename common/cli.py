"""Argument types that reject bad numbers when the command line is parsed, with argparse's usual one-line error.

    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--save-every", type=off_or(positive_int), default=20, help="... (-1 = off)")
    p.add_argument("--max-steps", type=int_list(-1, n=3), default="-1,-1,-1")

A zero or negative budget would otherwise become one step, a silently ignored flag, or a ZeroDivisionError
deep inside a stage; here it stops before anything is loaded or written.
"""

import argparse
import math
import sys


DTYPES = ("auto", "bfloat16", "float32")


def add_dtype_arg(p, help: str = "compute dtype") -> None:
    """--dtype, the same in every stage: auto picks bf16 on CUDA and on CPUs with avx512_bf16 / AMX, float32
    elsewhere (common.dist.default_compute_dtype)."""
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help=f"{help} (auto: bf16 on CUDA and bf16-capable CPUs, else float32)")


def add_save_every_arg(p, default: int, unit: str = "optimizer steps") -> None:
    """--save-every, the same in every stage: the interval of resume states, -1 = never."""
    p.add_argument("--save-every", type=off_or(positive_int), default=default,
                   help=f"{unit} between resume states (-1 = never)")


def die(msg: str):
    """Stop a stage with a one-line "error: ..." and exit status 1. sys.exit prints it on the way out, after every
    `with progress(...)` bar has closed, so the error stays the last line on screen."""
    sys.exit(f"error: {msg}")


def _number(cast, s: str, what: str):
    try:
        v = cast(s)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{s!r} is not {what}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v


def _checked(cast, ok, need: str, what: str):
    def parse(s):
        v = _number(cast, s, what)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {need}, got {s}")
        return v
    return parse


positive_int = _checked(int, lambda v: v > 0, "> 0", "an integer")
nonneg_int = _checked(int, lambda v: v >= 0, ">= 0", "an integer")
positive_float = _checked(float, lambda v: v > 0, "> 0", "a number")
nonneg_float = _checked(float, lambda v: v >= 0, ">= 0", "a number")
fraction = _checked(float, lambda v: 0 < v <= 1, "in (0, 1]", "a number")
prob = _checked(float, lambda v: 0 <= v <= 1, "in [0, 1]", "a number")


def off_or(check):
    """-1 (the flag is off) or a value `check` accepts: type=off_or(positive_int)."""
    def parse(s):
        try:
            if float(s) == -1:
                return type(check("1"))(-1)
        except ValueError:
            pass
        try:
            return check(s)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e} (or -1 = off)") from None
    return parse


def _list(cast, what, min_value, inclusive, n):
    need = f"{'>=' if inclusive else '>'} {min_value}"

    def parse(s):
        parts = [v.strip() for v in s.split(",")] if s.strip() else []
        vals = [_number(cast, v, what) for v in parts]
        bad = [v for v in vals if (v < min_value if inclusive else v <= min_value)]
        if bad:
            raise argparse.ArgumentTypeError(f"every value must be {need}, got {s!r}")
        if n is not None and len(vals) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated values, got {s!r}")
        return vals
    return parse


def int_list(min_value: int, n: int | None = None, inclusive: bool = True):
    """Comma-separated integers, each >= min_value (> with inclusive=False); exactly n of them when n is given."""
    return _list(int, "an integer", min_value, inclusive, n)


def float_list(min_value: float, n: int | None = None, inclusive: bool = True):
    """Comma-separated numbers, each >= min_value (> with inclusive=False); exactly n of them when n is given."""
    return _list(float, "a number", min_value, inclusive, n)
