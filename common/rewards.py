"""Rewards and verifiers shared by data generation (rejection sampling), GRPO, RLOO and evaluation.

    answer_correct("... so the total is \\boxed{0.5}", "1/2")   # True (math-verify, gold first)
    format_correct("<think>\\n2+2=4\\n</think>\\nThe answer is \\boxed{4}.", reasoning=True)  # True
    instruction_following_score("hello world", [{"type": "word_count", "n": 2}])  # 1.0

Accuracy follows LN-Ultra's GRPO setup with math-verify standing in for the LLM judge; format follows the
reasoning toggle (think block first when on, no think tags when off). The instruction-following verifiers
are one function per constraint type written by data_gen/instructions.py.
"""

import json
import re
import threading
from collections.abc import Callable
from fractions import Fraction

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?"
# "the answer is 42", "Answer: 7/2", "the answer is (B)": the explicit form without a box
_ANSWER_IS = re.compile(rf"\banswer\s*(?:is|:|=)\s*:?\s*\$?\(?({_NUMBER}|(?-i:[A-Z])(?![A-Za-z]))", re.I)  # letter: capital


# ----------------------------------------------------------------------------
# accuracy

def extract_answer(text: str) -> str | None:
    """The final answer stated explicitly: the content of the last \\boxed{...} (nested braces allowed), else what
    follows the last "answer is" / "answer:" (a number or a single option letter), else None. A bare number
    elsewhere in the text is not an answer: a guess or an intermediate result must not count as correct.
    Callers pass the answer part only (final_answer strips the think block)."""
    start = text.rfind("\\boxed{")
    if start >= 0:
        depth, i = 1, start + len("\\boxed{")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j].strip()
    stated = _ANSWER_IS.findall(text)
    return stated[-1].replace(",", "") if stated else None


def final_answer(text: str) -> str | None:
    """The answer of a completion: extract_answer on the part after </think>. A think block that never closed
    (thinking cut off by the budget) has no answer part: None, even when the block holds a number."""
    if THINK_OPEN in text and THINK_CLOSE not in text:
        return None
    return extract_answer(strip_think(text))


def _as_number(s: str) -> Fraction | None:
    s = s.strip().strip("$").replace(",", "").replace(" ", "")
    m = re.fullmatch(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", s)
    if m:
        s = f"{m.group(1)}/{m.group(2)}"
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def answer_key(answer: str) -> str:
    """A canonical form for comparing and voting: numbers as reduced fractions ("0.50" -> "1/2"), else lowercase."""
    n = _as_number(answer)
    return str(n) if n is not None else answer.strip().lower()


def answer_correct(pred_text: str, gold) -> bool:
    """Does the final answer of `pred_text` (final_answer: boxed or "the answer is", after </think>) equal `gold`?

    Exact match first (numbers as fractions, so "0.5" == "1/2"; letters case-insensitively), then math-verify
    `verify(parse(gold), parse(pred))`, gold first. math-verify's timeouts use signal.alarm, which only works in
    the main thread: elsewhere they are switched off. Any math-verify error counts as "not equal".
    """
    if gold is None or pred_text is None:
        return False
    pred = final_answer(pred_text)
    if pred is None:
        return False
    gold = str(gold).strip()
    if pred.strip().lower() == gold.lower():
        return True
    a, b = _as_number(pred), _as_number(gold)
    if a is not None and b is not None:
        return a == b
    try:
        from math_verify import parse, verify
        t = 5 if threading.current_thread() is threading.main_thread() else None
        return bool(verify(parse(f"${gold}$", parsing_timeout=t), parse(f"\\boxed{{{pred}}}", parsing_timeout=t),
                           timeout_seconds=t))
    except Exception:  # math-verify raises on odd input and on timeouts: treat as wrong
        return False


# ----------------------------------------------------------------------------
# format (the reasoning toggle)

def has_think(text: str) -> bool:
    return THINK_OPEN in text or THINK_CLOSE in text


def strip_think(text: str) -> str:
    """The answer part: everything after the last </think> (the whole text when there is none)."""
    i = text.rfind(THINK_CLOSE)
    return text[i + len(THINK_CLOSE):].strip() if i >= 0 else text.strip()


def format_correct(text: str, reasoning: bool) -> bool:
    """On: exactly one <think>...</think> block, at the start, then a non-empty answer. Off: no think tags."""
    if not reasoning:
        return not has_think(text)
    t = text.lstrip()
    if not t.startswith(THINK_OPEN) or t.count(THINK_OPEN) != 1 or t.count(THINK_CLOSE) != 1:
        return False
    return bool(t.split(THINK_CLOSE, 1)[1].strip())


# ----------------------------------------------------------------------------
# instruction following: one verifier per constraint type in data_gen/instructions.py

def _words(text: str) -> list[str]:
    return [w for w in text.split() if any(c.isalnum() for c in w)]


def _bullets(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.match(r"\s*[-*\u2022]\s+\S", ln)]


def _json_ok(text: str) -> bool:
    t = text.strip()
    m = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", t, flags=re.S)  # a fenced block counts too
    try:
        json.loads(m.group(1) if m else t)
        return True
    except ValueError:
        return False


VERIFIERS: dict[str, Callable[[str, dict], bool]] = {
    "word_count": lambda t, c: len(_words(t)) == c["n"],
    "include_keyword": lambda t, c: re.search(rf"\b{re.escape(c['keyword'].lower())}\b", t.lower()) is not None,
    "lowercase": lambda t, c: t == t.lower() and any(ch.isalpha() for ch in t),
    "bullet_count": lambda t, c: len(_bullets(t)) == c["n"],
    "json_format": lambda t, c: _json_ok(t),
    "end_with": lambda t, c: t.rstrip().endswith(c["phrase"]),
}


def instruction_following_score(text: str, constraints) -> float:
    """Fraction of constraints satisfied by the answer part of `text` (think block removed).

    `constraints` is a list of {"type": ..., ...} or its JSON string (the record's `constraints` field).
    """
    if isinstance(constraints, str):
        constraints = json.loads(constraints)
    if not constraints:
        return 1.0
    answer = strip_think(text)
    for c in constraints:
        if c["type"] not in VERIFIERS:
            raise ValueError(f"unknown constraint type {c['type']!r}; known: {sorted(VERIFIERS)}")
    return sum(VERIFIERS[c["type"]](answer, c) for c in constraints) / len(constraints)


# ----------------------------------------------------------------------------
# the reasoning-RL reward (GRPO): accuracy + format


def math_reward(text: str, gold, reasoning: bool, w_accuracy: float = 1.0, w_format: float = 0.5,
                gate: bool = True) -> dict:
    """LN-Ultra's GRPO reward for one completion: w_accuracy * [final answer == gold] + w_format * [toggle format
    kept]. Accuracy reads the answer part only (after </think>), so a correct number inside an unfinished think
    block earns nothing. gate=True: a completion that breaks the toggle (no think block with thinking on, think
    tags with it off) earns 0 whatever its answer. Without the gate, a policy whose thinking often runs out of
    budget learns to answer "on" prompts without thinking (seen here: "on" format 1.00 -> 0.09 in 12 rollouts).
    Returns {"reward", "accuracy", "format"} (the parts as 0/1 floats, for logging)."""
    acc = float(answer_correct(text, gold))
    fmt = float(format_correct(text, reasoning))
    reward = w_accuracy * acc + w_format * fmt
    return {"reward": reward * fmt if gate else reward, "accuracy": acc, "format": fmt}


# ----------------------------------------------------------------------------
# the verifiable reward of instruction-following RL and RLHF (07): verifiers, plus the toggle's format


def verifier_reward(text: str, reasoning: bool, constraints=None, answer=None, all_met: bool = False,
                    w_format: float = 0.0) -> dict:
    """A prompt with constraints scores the fraction of them met (all_met: 1 only when every one is); a math
    prompt scores its final answer (as math_reward); reward = score + w_format * [toggle format kept].
    Returns {"reward", "score", "correct" (every constraint met / the answer right, 0 or 1), "format"}."""
    if constraints:
        met = instruction_following_score(text, constraints)
        score = float(met == 1.0) if all_met else met
    elif answer is not None:
        met = score = float(answer_correct(text, answer))
    else:
        met = score = 0.0
    fmt = float(format_correct(text, reasoning))
    return {"reward": score + w_format * fmt, "score": met, "correct": float(met == 1.0), "format": fmt}
