"""Procedural math with exact answers, difficulty 1..5 (the OpenMath role in the recipe, at toy scale).

    1  one step: add/subtract two 2-digit numbers
    2  one step: multiplication, or 3-digit add/subtract
    3  two-step expressions (operator precedence, parentheses)
    4  word problems, 2-3 steps (shopping, ages, rates)
    5  word problems, 3-4 steps

Each problem carries a worked solution (`think`, a few short lines), a final sentence and a short answer, all
ending in \\boxed{N}. `eval_problems` draws from the reserved eval bucket (records.in_eval_bucket) with its own
seed space, so it never overlaps what `generate_math` produces.
"""

import random

from data_gen.records import sample_unique

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena", "Mia", "Noor",
         "Omar", "Pia", "Ravi", "Sara", "Tom", "Uma", "Yuki", "Zoe"]
ITEMS = ["pen", "notebook", "apple", "ticket", "sticker", "candle", "marker", "cookie", "book", "plant"]


def _add(a, b):
    """a + b, split into tens and ones: '47 + 38 = 47 + 30 + 8 = 77 + 8 = 85'."""
    hi, lo = b - b % 10, b % 10
    return f"{a} + {b} = {a} + {hi} + {lo} = {a + hi} + {lo} = {a + b}" if hi and lo else f"{a} + {b} = {a + b}"


def _sub(a, b):
    hi, lo = b - b % 10, b % 10
    return f"{a} - {b} = {a} - {hi} - {lo} = {a - hi} - {lo} = {a - b}" if hi and lo else f"{a} - {b} = {a - b}"


def _mul(a, b):
    """a × b by place value of the larger factor: '23 × 7 = 20 × 7 + 3 × 7 = 140 + 21 = 161'."""
    hi, lo = a - a % 10, a % 10
    if a < 10 or lo == 0:
        return f"{a} × {b} = {a * b}"
    return f"{a} × {b} = {hi} × {b} + {lo} × {b} = {hi * b} + {lo * b} = {a * b}"


def level1(r):
    a, b = r.randint(10, 99), r.randint(10, 99)
    if r.random() < 0.5:
        q = r.choice(["What is {} + {}?", "Compute {} + {}.", "Add {} and {}."])
        return q.format(a, b), [_add(a, b) + "."], a + b
    a, b = max(a, b), min(a, b)
    q = r.choice(["What is {} - {}?", "Compute {} - {}.", "Subtract {1} from {0}."])
    return q.format(a, b), [_sub(a, b) + "."], a - b


def level2(r):
    kind = r.choice(["mul", "mul", "add3", "sub3"])
    if kind == "mul":
        a, b = r.choice([(r.randint(12, 99), r.randint(3, 9)), (r.randint(11, 30), r.randint(11, 19))])
        return r.choice(["What is {} × {}?", "Multiply {} by {}."]).format(a, b), [_mul(a, b) + "."], a * b
    a, b = r.randint(100, 999), r.randint(100, 999)
    if kind == "add3":
        return f"What is {a} + {b}?", [_add(a, b) + "."], a + b
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", [_sub(a, b) + "."], a - b


def level3(r):
    a, b, c = r.randint(2, 40), r.randint(2, 12), r.randint(2, 12)
    form = r.randrange(3)
    if form == 0:  # precedence: multiply first
        return (f"What is {a} + {b} × {c}?",
                [f"Multiply first: {b} × {c} = {b * c}.", f"Then {a} + {b * c} = {a + b * c}."], a + b * c)
    if form == 1:
        return (f"What is ({a} + {b}) × {c}?", [f"Parentheses first: {a} + {b} = {a + b}.",
                f"Then {_mul(a + b, c)}."], (a + b) * c)
    c = r.randint(1, a * b - 1) if a * b > 1 else 0
    return f"What is {a} × {b} - {c}?", [f"First {_mul(a, b)}.", f"Then {a * b} - {c} = {a * b - c}."], a * b - c


def _shop(r, with_change):
    n, it, q, p = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 9), r.randint(2, 15)
    it2, p2 = r.choice([i for i in ITEMS if i != it]), r.randint(2, 20)
    q_text = f"{n} buys {q} {it}s at ${p} each and one {it2} for ${p2}."
    steps = [f"{q} {it}s cost {q} × {p} = {q * p} dollars.", f"Adding the {it2}: {q * p} + {p2} = {q * p + p2}."]
    total = q * p + p2
    if not with_change:
        return q_text + f" How many dollars does {n} spend?", steps, total
    bill = r.choice([b for b in (20, 50, 100, 200) if b >= total])
    steps.append(f"Change from ${bill}: {bill} - {total} = {bill - total}.")
    return q_text + f" {n} pays with a ${bill} bill. How many dollars of change does {n} get?", steps, bill - total


def level4(r):
    kind = r.randrange(4)
    if kind == 0:
        return _shop(r, with_change=r.random() < 0.5)
    if kind == 1:
        n, k, a, y = r.choice(NAMES), r.randint(2, 5), r.randint(3, 12), r.randint(2, 10)
        return (f"{n} is {k} times as old as a cousin who is {a}. How old will {n} be in {y} years?",
                [f"Now {n} is {k} × {a} = {k * a}.", f"In {y} years: {k * a} + {y} = {k * a + y}."], k * a + y)
    if kind == 2:
        rate, m, s = r.randint(3, 25), r.randint(2, 12), r.randint(5, 60)
        return (f"A tank holds {s} liters. A pump adds {rate} liters per minute for {m} minutes. How many liters are "
                f"in the tank now?", [f"The pump adds {rate} × {m} = {rate * m} liters.",
                                      f"Total: {s} + {rate * m} = {s + rate * m}."], s + rate * m)
    n, p1, d1, p2, d2 = r.choice(NAMES), r.randint(5, 30), r.randint(2, 7), r.randint(5, 30), r.randint(2, 7)
    return (f"{n} reads {p1} pages a day for {d1} days, then {p2} pages a day for {d2} days. How many pages is that?",
            [f"First part: {p1} × {d1} = {p1 * d1}.", f"Second part: {p2} × {d2} = {p2 * d2}.",
             f"Total: {p1 * d1} + {p2 * d2} = {p1 * d1 + p2 * d2}."], p1 * d1 + p2 * d2)


def level5(r):
    kind = r.randrange(3)
    if kind == 0:  # 4 steps
        n, (i1, i2) = r.choice(NAMES), r.sample(ITEMS, 2)
        q1, p1, q2, p2 = r.randint(2, 6), r.randint(2, 12), r.randint(2, 6), r.randint(2, 12)
        t = q1 * p1 + q2 * p2
        bill = r.choice([b for b in (50, 100, 200) if b >= t])
        return (f"{n} buys {q1} {i1}s at ${p1} each and {q2} {i2}s at ${p2} each, and pays with ${bill}. How many "
                f"dollars of change does {n} get?",
                [f"{i1.capitalize()}s: {q1} × {p1} = {q1 * p1}.", f"{i2.capitalize()}s: {q2} × {p2} = {q2 * p2}.",
                 f"Total: {q1 * p1} + {q2 * p2} = {t}.", f"Change: {bill} - {t} = {bill - t}."], bill - t)
    if kind == 1:  # 3 steps
        a, b, c = r.sample(NAMES, 3)
        x, d = r.randint(4, 15), r.randint(2, 9)
        return (f"{a} is {x} years old. {b} is {d} years older than {a}, and {c} is twice as old as {b}. What is the "
                f"sum of their three ages?", [f"{b}: {x} + {d} = {x + d}.", f"{c}: 2 × {x + d} = {2 * (x + d)}.",
                f"Sum: {x} + {x + d} + {2 * (x + d)} = {x + 3 * (x + d)}."], x + 3 * (x + d))
    h1, s1, h2, s2 = r.randint(2, 5), r.randint(30, 90), r.randint(1, 4), r.randint(30, 90)
    back = r.randint(10, h1 * s1 + h2 * s2 - 1)
    d = h1 * s1 + h2 * s2
    return (f"A car drives {h1} hours at {s1} km per hour, then {h2} hours at {s2} km per hour, then drives {back} km "
            f"back. How far from the start is it, in km?", [f"First leg: {h1} × {s1} = {h1 * s1}.",
            f"Second leg: {h2} × {s2} = {h2 * s2}.", f"Out: {h1 * s1} + {h2 * s2} = {d}.",
            f"After driving back: {d} - {back} = {d - back}."], d - back)


LEVELS = {1: level1, 2: level2, 3: level3, 4: level4, 5: level5}


def make_problem(r: random.Random, level: int) -> dict:
    question, steps, answer = LEVELS[level](r)
    return {"category": "math", "question": question, "answer": str(answer), "difficulty": level,
            "think": "\n".join(steps), "final": f"So the answer is \\boxed{{{answer}}}.",
            "short": f"The answer is \\boxed{{{answer}}}."}


def _by_level(n: int, rng: random.Random, levels, heldout: bool) -> list[dict]:
    counts = [n // len(levels) + (i < n % len(levels)) for i in range(len(levels))]
    return [p for lv, k in zip(levels, counts) for p in sample_unique(lambda r: make_problem(r, lv), k, rng, heldout)]


def generate_math(n: int, seed: int = 0, levels=(1, 2, 3, 4, 5)) -> list[dict]:
    """n distinct training problems, levels in equal shares, none in the eval bucket."""
    return _by_level(n, random.Random(seed), levels, heldout=False)


def eval_problems(n: int = 200, seed: int = 0, levels=(1, 2, 3, 4, 5)) -> list[dict]:
    """The fixed held-out eval set: its own seed space and only eval-bucket prompts (disjoint from training)."""
    return _by_level(n, random.Random(f"eval-math:{seed}"), levels, heldout=True)
