"""Procedural math with exact answers, difficulty 1..5 (the OpenMath role in the recipe, at toy scale).

    1  one step: add/subtract two 2-digit numbers
    2  one step: 2-digit x 1-digit multiplication, or 3-digit add/subtract
    3  two-step expressions (operator precedence, parentheses)
    4  word problems, 2-3 steps (shopping, ages, rates)
    5  word problems, 3-4 steps

Each problem carries a worked solution (`think`), a final sentence and a short answer (the last operation and
its result: the concise reply of "detailed thinking off"), all ending in \\boxed{N}.
The worked solution does every multi-digit operation column by column, right to left, one single-digit fact
per line with the digits written so far ("7 + 8 = 15, so far 5, carry 1."): the long-form arithmetic a small
model can follow, which is what thinking buys over answering at once. Every product has a one-digit factor.
Held out by meaning, not by string: `semantic_key` is what a problem asks with the surface removed (level, template
with wording variants merged, the numbers, the answer; not the names, the items, the phrasing). `eval_problems`
draws only keys in the reserved eval bucket (records.in_eval_bucket of the key), with its own seed space;
`generate_math` and `rl_problems` draw only keys outside it. So no training or RL problem is a renamed or reworded
copy of an evaluation problem, whatever the sizes and seeds of the sets (05's, 06's, common.evaluate's, eval.jsonl).
"""

import random
import re

from data_gen.records import distinct_outside, sample_unique

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena", "Mia", "Noor",
         "Omar", "Pia", "Ravi", "Sara", "Tom", "Uma", "Yuki", "Zoe"]
ITEMS = ["pen", "notebook", "apple", "ticket", "sticker", "candle", "marker", "cookie", "book", "plant"]


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def _so_far(line: str, written: str, note: str = "") -> str:
    return f"{line}, so far {written}{note}."


def _column_add(a: int, b: int) -> list[str]:
    """'47 + 38' -> ['7 + 8 = 15, so far 5, carry 1.', '4 + 3 + 1 = 8, so far 85.']"""
    da, db, carry, written, lines = _digits(a), _digits(b), 0, "", []
    for i in range(max(len(da), len(db))):
        terms = [d[i] for d in (da, db) if i < len(d)] + ([carry] if carry else [])
        s = sum(terms)
        carry, written = s // 10, str(s % 10) + written
        expr = " + ".join(map(str, terms))
        lines.append(_so_far(f"{expr} = {s}" if len(terms) > 1 else expr, written, ", carry 1" if carry else ""))
    if carry:
        lines.append(_so_far("write the carry 1", "1" + written))
    return lines


def _column_sub(a: int, b: int) -> list[str]:
    """a >= b. '52 - 38' -> ['12 - 8 = 4, so far 4, borrow 1.', '5 - 1 - 3 = 1, so far 14.']"""
    da, db, borrow, written, lines = _digits(a), _digits(b), 0, "", []
    for i, x in enumerate(da):
        y = db[i] if i < len(db) else 0
        v, out = x - borrow - y, 0
        if v < 0:
            v, out = v + 10, 1
        parts = [f"1{x}" if out else str(x)] + (["1"] if borrow else []) + ([str(y)] if i < len(db) else [])
        expr = " - ".join(parts)
        written = str(v) + written
        lines.append(_so_far(f"{expr} = {v}" if len(parts) > 1 else expr, written, ", borrow 1" if out else ""))
        borrow = out
    return lines


def _column_mul(a: int, d: int) -> list[str]:
    """a x one digit d. '23 × 7' -> ['3 × 7 = 21, so far 1, carry 2.', '2 × 7 + 2 = 16, so far 161.']"""
    carry, written, lines = 0, "", []
    da = _digits(a)
    for i, x in enumerate(da):
        s = x * d + carry
        expr = f"{x} × {d}" + (f" + {carry}" if carry else "")
        last = i == len(da) - 1
        carry, written = (0, str(s) + written) if last else (s // 10, str(s % 10) + written)
        lines.append(_so_far(f"{expr} = {s}", written, f", carry {carry}" if carry else ""))
    return lines


def calc(a: int, op: str, b: int) -> tuple[list[str], int]:
    """The worked lines of `a op b` (column by column unless both are one digit), ending 'So a op b = r.'"""
    r = {"+": a + b, "-": a - b, "×": a * b}[op]
    if a < 10 and b < 10:
        return [f"{a} {op} {b} = {r}."], r
    if op == "+":
        work = _column_add(a, b)
    elif op == "-":
        assert a >= b, (a, b)
        work = _column_sub(a, b)
    else:
        big, small = (a, b) if b < 10 else (b, a)
        assert small < 10, f"{a} × {b}: products need a one-digit factor"
        work = _column_mul(big, small)
    return work + [f"So {a} {op} {b} = {r}."], r


def step(label: str, a: int, op: str, b: int) -> tuple[list[str], int]:
    """One step of a word problem: '<label>: a op b.' then its worked lines."""
    lines, r = calc(a, op, b)
    if len(lines) == 1:  # a one-digit fact: 'Multiply first: 3 × 5 = 15.'
        return [f"{label}: {lines[0]}"], r
    return [f"{label}: {a} {op} {b}."] + lines, r


def level1(r):
    a, b = r.randint(10, 99), r.randint(10, 99)
    if r.random() < 0.5:
        q = r.choice(["What is {} + {}?", "Compute {} + {}.", "Add {} and {}."])
        return q.format(a, b), calc(a, "+", b)[0], a + b
    a, b = max(a, b), min(a, b)
    q = r.choice(["What is {} - {}?", "Compute {} - {}.", "Subtract {1} from {0}."])
    return q.format(a, b), calc(a, "-", b)[0], a - b


def level2(r):
    kind = r.choice(["mul", "mul", "add3", "sub3"])
    if kind == "mul":
        a, b = r.randint(12, 99), r.randint(3, 9)
        return r.choice(["What is {} × {}?", "Multiply {} by {}."]).format(a, b), calc(a, "×", b)[0], a * b
    a, b = r.randint(100, 999), r.randint(100, 999)
    if kind == "add3":
        return f"What is {a} + {b}?", calc(a, "+", b)[0], a + b
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", calc(a, "-", b)[0], a - b


def _steps(*specs):
    """Chain word-problem steps: each spec is (label, a, op, b) where a or b may be a callable of the results so
    far. Returns (lines, results)."""
    lines, results = [], []
    for label, a, op, b in specs:
        a, b = (x(results) if callable(x) else x for x in (a, b))
        ls, v = step(label, a, op, b)
        lines += ls
        results.append(v)
    return lines, results


def level3(r):
    a, b, c = r.randint(2, 40), r.randint(2, 9), r.randint(2, 9)
    form = r.randrange(3)
    if form == 0:  # precedence: multiply first
        lines, res = _steps(("Multiply first", b, "×", c), ("Then add", a, "+", lambda v: v[0]))
        return f"What is {a} + {b} × {c}?", lines, res[-1]
    if form == 1:
        lines, res = _steps(("Parentheses first", a, "+", b), ("Then multiply", lambda v: v[0], "×", c))
        return f"What is ({a} + {b}) × {c}?", lines, res[-1]
    c = r.randint(1, a * b - 1)
    lines, res = _steps(("Multiply first", a, "×", b), ("Then subtract", lambda v: v[0], "-", c))
    return f"What is {a} × {b} - {c}?", lines, res[-1]


def _shop(r, with_change):
    n, it, q, p = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 9), r.randint(2, 15)
    it2, p2 = r.choice([i for i in ITEMS if i != it]), r.randint(2, 20)
    q_text = f"{n} buys {q} {it}s at ${p} each and one {it2} for ${p2}."
    specs = [(f"The {it}s cost", q, "×", p), (f"Adding the {it2}", lambda v: v[0], "+", p2)]
    if not with_change:
        lines, res = _steps(*specs)
        return q_text + f" How many dollars does {n} spend?", lines, res[-1]
    total = q * p + p2
    bill = r.choice([b for b in (20, 50, 100, 200) if b >= total])
    lines, res = _steps(*specs, (f"Change from ${bill}", bill, "-", lambda v: v[1]))
    return q_text + f" {n} pays with a ${bill} bill. How many dollars of change does {n} get?", lines, res[-1]


def level4(r):
    kind = r.randrange(4)
    if kind == 0:
        return _shop(r, with_change=r.random() < 0.5)
    if kind == 1:
        n, k, a, y = r.choice(NAMES), r.randint(2, 5), r.randint(3, 12), r.randint(2, 10)
        lines, res = _steps((f"Now {n} is", k, "×", a), (f"In {y} years", lambda v: v[0], "+", y))
        return f"{n} is {k} times as old as a cousin who is {a}. How old will {n} be in {y} years?", lines, res[-1]
    if kind == 2:
        rate, m, s = r.randint(3, 25), r.randint(2, 9), r.randint(5, 60)
        lines, res = _steps(("The pump adds", rate, "×", m), ("Total", s, "+", lambda v: v[0]))
        return (f"A tank holds {s} liters. A pump adds {rate} liters per minute for {m} minutes. How many liters are "
                f"in the tank now?", lines, res[-1])
    n, p1, d1, p2, d2 = r.choice(NAMES), r.randint(5, 30), r.randint(2, 7), r.randint(5, 30), r.randint(2, 7)
    lines, res = _steps(("First part", p1, "×", d1), ("Second part", p2, "×", d2),
                        ("Total", lambda v: v[0], "+", lambda v: v[1]))
    return (f"{n} reads {p1} pages a day for {d1} days, then {p2} pages a day for {d2} days. How many pages is that?",
            lines, res[-1])


def level5(r):
    kind = r.randrange(3)
    if kind == 0:  # 4 steps
        n, (i1, i2) = r.choice(NAMES), r.sample(ITEMS, 2)
        q1, p1, q2, p2 = r.randint(2, 6), r.randint(2, 12), r.randint(2, 6), r.randint(2, 12)
        t = q1 * p1 + q2 * p2
        bill = r.choice([b for b in (50, 100, 200) if b >= t])
        lines, res = _steps((f"{i1.capitalize()}s", q1, "×", p1), (f"{i2.capitalize()}s", q2, "×", p2),
                            ("Total", lambda v: v[0], "+", lambda v: v[1]), ("Change", bill, "-", lambda v: v[2]))
        return (f"{n} buys {q1} {i1}s at ${p1} each and {q2} {i2}s at ${p2} each, and pays with ${bill}. How many "
                f"dollars of change does {n} get?", lines, res[-1])
    if kind == 1:  # 3 steps
        a, b, c = r.sample(NAMES, 3)
        x, d = r.randint(4, 15), r.randint(2, 9)
        lines, res = _steps((b, x, "+", d), (c, 2, "×", lambda v: v[0]), ("Sum", x, "+", lambda v: v[0]),
                            ("Sum", lambda v: v[2], "+", lambda v: v[1]))
        return (f"{a} is {x} years old. {b} is {d} years older than {a}, and {c} is twice as old as {b}. What is the "
                f"sum of their three ages?", lines, res[-1])
    h1, s1, h2, s2 = r.randint(2, 5), r.randint(30, 90), r.randint(1, 4), r.randint(30, 90)
    back = r.randint(10, h1 * s1 + h2 * s2 - 1)
    lines, res = _steps(("First leg", h1, "×", s1), ("Second leg", h2, "×", s2),
                        ("Out", lambda v: v[0], "+", lambda v: v[1]), ("After driving back", lambda v: v[2], "-", back))
    return (f"A car drives {h1} hours at {s1} km per hour, then {h2} hours at {s2} km per hour, then drives {back} km "
            f"back. How far from the start is it, in km?", lines, res[-1])


LEVELS = {1: level1, 2: level2, 3: level3, 4: level4, 5: level5}


def make_problem(r: random.Random, level: int) -> dict:
    question, steps, answer = LEVELS[level](r)
    last = steps[-1].split(": ")[-1].removeprefix("So ").rstrip(".")  # the last operation, 'a op b = answer'
    return {"category": "math", "question": question, "answer": str(answer), "difficulty": level,
            "think": "\n".join(steps), "final": f"So the answer is \\boxed{{{answer}}}.",
            "short": f"{last}, so the answer is \\boxed{{{answer}}}."}


def _by_level(n: int, rng: random.Random, levels, heldout: bool, stats=None) -> list[dict]:
    counts = [n // len(levels) + (i < n % len(levels)) for i in range(len(levels))]
    return [p for lv, k in zip(levels, counts)
            for p in sample_unique(lambda r: make_problem(r, lv), k, rng, heldout, key=semantic_key, stats=stats)]


def generate_math(n: int, seed: int = 0, levels=(1, 2, 3, 4, 5), stats=None) -> list[dict]:
    """n training problems of distinct meaning, levels in equal shares, no semantic key in the eval bucket."""
    return _by_level(n, random.Random(seed), levels, heldout=False, stats=stats)


def eval_problems(n: int = 200, seed: int = 0, levels=(1, 2, 3, 4, 5)) -> list[dict]:
    """The fixed held-out eval set: its own seed space and only eval-bucket semantic keys (disjoint by meaning from
    every training set, at any n and seed)."""
    return _by_level(n, random.Random(f"eval-math:{seed}"), levels, heldout=True)


# ----------------------------------------------------------------------------
# the semantic key

_NAME = re.compile(r"\b(?:" + "|".join(NAMES) + r")\b")
_ITEM = re.compile(r"\b(?:" + "|".join(ITEMS) + r")s?\b")
# the wording variants of one template (level1, level2) -> its first wording
WORDINGS = {"Compute # + #.": "What is # + #?", "Add # and #.": "What is # + #?",
            "Compute # - #.": "What is # - #?", "Subtract # from #.": "What is # - #?",
            "Multiply # by #.": "What is # × #?"}


def template_of(question: str) -> str:
    """The question's template: numbers -> '#', names -> '<name>', items -> '<item>', wording variants merged.
    'Ana buys 3 pens at $4 each ...' and 'Omar buys 3 cookies at $4 each ...' have one template."""
    t = _ITEM.sub("<item>", _NAME.sub("<name>", re.sub(r"\d+", "#", question.strip())))
    return WORDINGS.get(t, t)


def semantic_key(p: dict) -> tuple:
    """What a problem asks, independent of names and wording: (level, template, its numbers sorted, answer).
    "Add 59 and 80." and "What is 80 + 59?" share a key, as do two shopping problems that differ only in who buys
    which items; other numbers, another template or another level give another key. Takes a problem (question)
    or a record (input messages). Held-out sets are held out by this key, not by the prompt string."""
    text = p.get("question") or p.get("input")
    if isinstance(text, list):  # a record's chat messages: the user turn
        text = " ".join(m["content"] for m in text if m.get("role") == "user")
    return (p.get("difficulty"), template_of(text), tuple(sorted(int(x) for x in re.findall(r"\d+", text))),
            str(p.get("answer")))


def rl_problems(n: int, seed: int = 0, exclude: list[dict] = (), levels=(1, 2, 3, 4, 5)) -> list[dict]:
    """n training problems of distinct meaning for RL prompts (their own seed space): no semantic key in the eval
    bucket (so none shared with any evaluation set) and none shared with `exclude` (a check for sets drawn some
    other way)."""
    rng = random.Random(f"rl-math:{seed}")
    return distinct_outside(lambda: _by_level(n, rng, levels, heldout=False), semantic_key, n, exclude,
                            "math problems")
