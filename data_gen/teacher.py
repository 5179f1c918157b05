"""Teacher traces with rejection sampling (the OpenMath pipeline, as in Llama-Nemotron's SFT data).

    records, stats = rejection_sample(problems, generate_fn, n_samples=8)

A teacher writes `n_samples` solutions per problem (reasoning on: temperature 0.6, top_p 0.95; off: greedy).
With a ground truth, a solution is kept when its final answer matches it (common.rewards.answer_correct);
without one, when it agrees with the majority answer (at least 2 votes), which becomes the record's `answer`.
Solutions must also have the right format for the toggle. `stats["pass_rate"]` (problem id -> fraction correct)
is what GRPO's pass-rate filter and curriculum read.
"""

from collections import Counter

from common.data import build_messages
from common.rewards import answer_correct, answer_key, final_answer, format_correct
from data_gen.records import make_record


def _vote_key(text: str) -> str | None:
    a = final_answer(text)
    return None if a is None else answer_key(a)


def rejection_sample(problems: list[dict], generate_fn, n_samples: int = 4, reasoning: bool = True,
                     temperature: float | None = None, top_p: float | None = None, max_new_tokens: int = 256,
                     render=None, generator: str = "teacher", max_keep: int | None = None) -> tuple[list[dict], dict]:
    """Records (same format as the templates, generator = the teacher) for the accepted solutions, and stats.

    `problems`: dicts with id, question, category, answer (or None), difficulty.
    `generate_fn(prompts, n, temperature, top_p, max_new_tokens) -> list[list[str]]`.
    `render(messages) -> str` turns [system, user] into the prompt text; default: the question alone.
    """
    if temperature is None:
        temperature, top_p = (0.6, 0.95) if reasoning else (0.0, 1.0)
    top_p = 1.0 if top_p is None else top_p
    render = render or (lambda msgs: msgs[-1]["content"])
    prompts = [render(build_messages(p["question"], reasoning)) for p in problems]
    outs = generate_fn(prompts, n_samples, temperature, top_p, max_new_tokens)
    if len(outs) != len(problems):
        raise ValueError(f"generate_fn returned {len(outs)} lists for {len(problems)} prompts")
    records, stats = [], {"samples": 0, "kept": 0, "bad_format": 0, "wrong": 0, "no_majority": 0, "pass_rate": {}}
    for p, samples in zip(problems, outs):
        stats["samples"] += len(samples)
        ok_format = [s.strip() for s in samples if format_correct(s, reasoning)]
        stats["bad_format"] += len(samples) - len(ok_format)
        gold = p.get("answer")
        if gold is None:  # no ground truth: majority vote (science questions in the paper)
            votes = Counter(k for k in map(_vote_key, ok_format) if k is not None)
            top = votes.most_common(1)
            if not top or top[0][1] < 2:
                stats["no_majority"] += 1
                continue
            gold = final_answer(next(s for s in ok_format if _vote_key(s) == top[0][0]))
            good = [s for s in ok_format if _vote_key(s) == top[0][0]]
        else:
            good = [s for s in ok_format if answer_correct(s, gold)]
            stats["pass_rate"][p["id"]] = len(good) / max(1, len(samples))
        stats["wrong"] += len(ok_format) - len(good)
        good = list(dict.fromkeys(good))[:max_keep]  # distinct solutions only
        stats["kept"] += len(good)
        records += [make_record(p["id"], p["question"], s, reasoning, p["category"], gold, p.get("difficulty"),
                                generator=generator) for s in good]
    return records, stats


def load_teacher(path: str, batch_size: int = 16):
    """(generate_fn, render) for a checkpoint of ours, using common.generate and the checkpoint's chat template."""
    from common.checkpoint import load_checkpoint
    from common.data import render_prompt
    from common.generate import generate

    model, tokenizer = load_checkpoint(path)

    def generate_fn(prompts, n, temperature, top_p, max_new_tokens):
        return generate(model, tokenizer, prompts, n=n, temperature=temperature, top_p=top_p,
                        max_new_tokens=max_new_tokens, batch_size=batch_size)
    return generate_fn, (lambda msgs: render_prompt(tokenizer, msgs))
