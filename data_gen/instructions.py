"""Chat / instruction following with checkable constraints (IFEval-style), for SFT stage 3, RLOO and eval.

Each prompt asks about a topic under 1-3 constraints; `constraints` (a JSON list of {"type", ...}) is stored on
the record and checked by common.rewards.instruction_following_score, one verifier per type:
    word_count {n} | include_keyword {keyword} | lowercase | bullet_count {n} | json_format | end_with {phrase}
The template response satisfies every constraint (asserted here). All problems get a reasoning-off record;
`think` is set so build.py can add reasoning-on versions for a fraction of them.
Held out by meaning (`instruction_key`: topic and constraints, not the task phrase or the order of the asks): the
eval bucket is decided by that key, so no training prompt is a rewording of an evaluation prompt.
"""

import json
import random

from common.rewards import instruction_following_score
from data_gen.records import distinct_outside, sample_unique

TOPICS = {
    "the ocean": ["The ocean covers about seventy percent of the planet.", "Most of its water is salty.",
                  "Tides come from the pull of the moon.", "Whales and plankton both live there.",
                  "Deep water stays cold and dark all year."],
    "volcanoes": ["A volcano is an opening where molten rock escapes.", "Lava cools into new rock.",
                  "Ash from eruptions can travel very far.", "Many volcanoes sit along plate boundaries.",
                  "Some islands were built entirely by volcanoes."],
    "honey bees": ["Honey bees live in large colonies.", "Each colony has one queen.",
                   "Workers collect nectar and pollen from flowers.", "Bees dance to share where food is.",
                   "Their pollination helps many crops grow."],
    "the moon": ["The moon orbits the Earth about once a month.", "It has no air to breathe.",
                 "Its phases come from changing sunlight.", "People first walked there in 1969.",
                 "Craters cover much of its surface."],
    "bicycles": ["A bicycle turns pedal power into motion.", "Gears make hills easier to climb.",
                 "Cycling is good exercise for the heart.", "Bikes produce no exhaust.",
                 "A helmet makes riding safer."],
    "sleep": ["Adults need about eight hours of sleep.", "Sleep helps the brain store memories.",
              "Screens before bed can delay sleep.", "A regular schedule improves rest.",
              "Dreams happen mostly during rapid eye movement sleep."],
    "rainforests": ["Rainforests get rain almost every day.", "They hold more than half of all animal species.",
                    "Their trees release a lot of oxygen.", "Many medicines come from their plants.",
                    "Logging has destroyed large areas of them."],
    "coffee": ["Coffee is brewed from roasted beans.", "It contains caffeine, which keeps people alert.",
               "The plant first grew in Ethiopia.", "Brazil grows more coffee than any other country.",
               "Too much coffee can disturb sleep."],
}
TASKS = ["Tell me about {t}.", "Describe {t}.", "Give me some facts about {t}.", "What should I know about {t}?",
         "Write a short note on {t}."]
ENDINGS = ["Hope this helps.", "That is all.", "Thanks for asking.", "Any other questions?"]


def make_problem(r: random.Random) -> dict:
    topic = r.choice(list(TOPICS))
    facts = r.sample(TOPICS[topic], 4)
    shape = r.choice(["plain", "bullets", "words", "json"])
    lower = r.random() < 0.35
    ending = r.choice(ENDINGS) if shape != "json" and r.random() < 0.3 else None
    if lower and ending:
        ending = ending.lower()
    cons, asks = [], []
    if shape == "bullets":
        n = r.randint(2, 4)
        text = "\n".join(f"- {f}" for f in facts[:n])
        cons.append({"type": "bullet_count", "n": n}); asks.append(f"Use exactly {n} bullet points ('- ').")
    elif shape == "words":
        text = " ".join(facts[:r.randint(1, 3)])  # whole sentences: n is whatever they add up to
        n = len(text.split()) + len(ending.split() if ending else [])
        cons.append({"type": "word_count", "n": n}); asks.append(f"Answer in exactly {n} words.")
    elif shape == "json":
        text = json.dumps({"topic": topic, "facts": facts[:2]})
        cons.append({"type": "json_format"}); asks.append("Wrap your whole answer in JSON.")
    else:
        text = " ".join(facts[:2])
    if ending:
        text = f"{text} {ending}" if shape == "words" else f"{text}\n{ending}"
        cons.append({"type": "end_with", "phrase": ending}); asks.append(f'End your answer with "{ending}"')
    if lower:
        text = text.lower()
        cons.append({"type": "lowercase"}); asks.append("Write in all lowercase letters.")
    keywords = [w.strip(".,\"'").lower() for w in text.split()]
    keywords = [w for w in keywords if len(w) >= 5 and w.isalpha() and w not in (ending or "").lower()]
    if keywords and (r.random() < 0.5 or not asks):
        kw = r.choice(keywords)
        cons.append({"type": "include_keyword", "keyword": kw}); asks.append(f'Include the keyword "{kw}".')
    if not cons:  # always at least one checkable constraint
        cons.append({"type": "lowercase"}); asks.append("Write in all lowercase letters.")
        text = text.lower()
    r.shuffle(asks)
    assert instruction_following_score(text, cons) == 1.0, (text, cons)
    plan = "; ".join(asks).lower().rstrip(".")
    return {"category": "chat", "question": r.choice(TASKS).format(t=topic) + " " + " ".join(asks),
            "answer": None, "difficulty": len(cons), "constraints": cons, "short": text, "final": text,
            "think": f"The user wants facts about {topic}. Constraints: {plan}. I will check each one."}


def generate_instructions(n: int, seed: int = 0, heldout: bool = False, stats=None) -> list[dict]:
    """n prompts of distinct meaning (instruction_key), all inside (heldout) or outside the eval bucket by that key:
    the held-out sets (heldout=True, any n: they are prefixes of one sequence) share no meaning with training."""
    rng = random.Random(f"eval-chat:{seed}") if heldout else random.Random(seed + 2_000_003)
    return sample_unique(make_problem, n, rng, heldout, key=instruction_key, stats=stats)


def instruction_key(p: dict) -> tuple:
    """What an instruction prompt asks, independent of its wording: (topic, its constraints). "Tell me about the
    moon. Use exactly 3 bullet points." and "Describe the moon. Use exactly 3 bullet points." share a key. Takes a
    problem (question, constraints) or a record (input messages, constraints as JSON). Held-out sets are held out
    by this key, not by the prompt string."""
    text = p.get("question") or p.get("input")
    if isinstance(text, list):  # a record's chat messages: the user turn
        text = " ".join(m["content"] for m in text if m.get("role") == "user")
    topic = next((t for t in TOPICS if t in text), None)
    cons = p.get("constraints") or []
    if isinstance(cons, str):
        cons = json.loads(cons)
    return topic, tuple(sorted(json.dumps(c, sort_keys=True) for c in cons))


def rl_instructions(n: int, seed: int = 0, exclude: list[dict] = ()) -> list[dict]:
    """n training instruction prompts for RL and preference pairs (their own seed space), none sharing an
    instruction_key with each other or with `exclude` (a check for sets drawn some other way), none with a key in the
    eval bucket (so none shared with any evaluation set)."""
    rng = random.Random(f"rl-chat:{seed}")
    return distinct_outside(lambda: sample_unique(make_problem, n, rng, heldout=False, key=instruction_key),
                            instruction_key, n, exclude, "instruction prompts")
