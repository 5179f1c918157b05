"""Science-style multiple choice: unit conversions with plausible distractors; the ground truth is the letter.

    How many grams are in 3.5 kilograms?
    A) 350  B) 3500  C) 35  D) 35000        -> answer "B"

Difficulty 1: scale up by an integer amount (km -> m); 2: scale down, decimals (m -> km); 3: temperature.
Held out by meaning (`science_key`: the question stem, not the order of the options or so the letter), like math.
"""

import random

from data_gen.records import sample_unique

# (big unit, small unit, how many small units in one big unit)
UNITS = [("kilometer", "meter", 1000), ("meter", "centimeter", 100), ("centimeter", "millimeter", 10),
         ("kilogram", "gram", 1000), ("gram", "milligram", 1000), ("liter", "milliliter", 1000),
         ("hour", "minute", 60), ("minute", "second", 60), ("day", "hour", 24), ("week", "day", 7),
         ("kilowatt", "watt", 1000), ("kilojoule", "joule", 1000)]


def fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.4f}".rstrip("0").rstrip(".")


def _question(r):
    """(question stem, explanation, correct value, distractor values, difficulty)."""
    kind = r.random()
    if kind < 0.1:  # temperature: K = C + 273
        c = r.randint(-40, 120)
        return (f"What is {c} degrees Celsius in kelvin?", f"K = C + 273, so {c} + 273 = {c + 273}.", c + 273,
                [c - 273, c + 373, 273 - c, c + 237], 3)
    big, small, f = r.choice(UNITS)
    if kind < 0.55:  # big -> small: multiply
        x = r.choice([r.randint(2, 20), r.randint(2, 20) + 0.5])
        v = x * f
        return (f"How many {small}s are in {fmt(x)} {big}s?",
                f"1 {big} = {f} {small}s, so {fmt(x)} {big}s = {fmt(x)} × {f} = {fmt(v)} {small}s.", v,
                [v / 10, v * 10, x + f, x * f * f, v / 100], 1)
    v = r.choice([r.randint(2, 30), r.randint(2, 30) + 0.5, r.randint(11, 99) / 10])
    x = v * f
    return (f"How many {big}s make {fmt(x)} {small}s?",
            f"1 {big} = {f} {small}s, so {fmt(x)} {small}s = {fmt(x)} / {f} = {fmt(v)} {big}s.", v,
            [v * 10, v / 10, x * f, x - f, v * 100], 2)


def make_problem(r: random.Random) -> dict:
    stem, why, v, wrong, difficulty = _question(r)
    options = [fmt(v)] + list(dict.fromkeys(fmt(w) for w in wrong if fmt(w) != fmt(v)))[:3]
    r.shuffle(options)
    letter = "ABCD"[options.index(fmt(v))]
    question = stem + "\n" + "\n".join(f"{L}) {o}" for L, o in zip("ABCD", options)) + "\nAnswer with the letter."
    return {"category": "science", "question": question, "answer": letter, "difficulty": difficulty,
            "think": f"{why}\nThat is option {letter}.", "final": f"So the answer is \\boxed{{{letter}}}.",
            "short": f"The answer is \\boxed{{{letter}}}."}


def science_key(p: dict) -> tuple:
    """What a question asks, independent of how its options are shuffled: ("science", the stem line). Takes a problem
    (question) or a record (input messages)."""
    text = p.get("question") or p.get("input")
    if isinstance(text, list):  # a record's chat messages: the user turn
        text = " ".join(m["content"] for m in text if m.get("role") == "user")
    return "science", text.strip().split("\n")[0].strip()


def generate_science(n: int, seed: int = 0, heldout: bool = False, stats=None) -> list[dict]:
    """n questions of distinct stems, all inside (heldout) or outside the eval bucket (by science_key)."""
    rng = random.Random(f"eval-science:{seed}") if heldout else random.Random(seed + 1_000_003)
    return sample_unique(make_problem, n, rng, heldout, key=science_key, stats=stats)
