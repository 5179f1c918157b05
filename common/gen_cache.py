"""Greedy answers cached per model, so no stage decodes again what it or an earlier stage already decoded.

    cache = GenCache("runs/smol/gen_cache")            # what 05, 06, 07 and common.evaluate pass (--no-gen-cache: None)
    generation_eval(model, tokenizer, problems, reasoning=True, max_new_tokens=320, cache=cache)
    outs = greedy_generate(model, tokenizer, prompts, max_new_tokens=96, cache=cache)   # [(text, ids)] per prompt

A greedy answer is a function of exactly what its key holds:
  model_fingerprint(model, tokenizer)  sha256 over every state-dict tensor's bytes (with its name, dtype and shape),
                                       the config, the EOS ids and the tokenizer: any changed weight changes it
  prompt                               the exact rendered chat text (the toggle's system prompt included)
  max_new_tokens
  compute_setting(model)               device type, weight dtype and the autocast dtype in force at the call
so any stage that asks for an answer of the same weights finds it, overlapping problem sets included: 05's parent
row and the parent's "before" of SFT from the parent, 06's "after" and 07's "before" of the same checkpoint.
A fingerprint of the 135M parent in float32 takes ~0.5 s on this CPU (0.33 s of it sha256 over the 540 MB of
weights, the rest the 49k-entry vocabulary), against about a minute per evaluation batch of 32 answers.

Files: one per fingerprint, <dir>/<fingerprint>.jsonl, one line per answer {"prompt", "max_new_tokens", "compute",
"text", "ids"} (ids: the decoded tokens, through the first EOS). After a call that decoded something the file is
rewritten whole, atomically (a temporary file renamed into place), merged with what another process wrote
meanwhile. A file that does not parse is an error naming it, never skipped: delete it and its answers are decoded
again.

Only greedy decoding is cached (there is no temperature here): a sampled rollout is a draw, and drawing again is
the point. A cached answer is one valid greedy answer of those weights, not necessarily the exact bits a new call
would give: batched decoding pads each batch differently, and logits that differ in the last bits can break a
near-tie between two tokens the other way.
"""

import hashlib
import json
import os

import torch

from common.dist import print0
from common.generate import _eos_ids, generate

# config keys that say where a model came from, not what it computes (the weights' dtype is hashed with them)
_BOOKKEEPING = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "_commit_hash",
                "auto_map"}


def add_gen_cache_args(p) -> None:
    """--no-gen-cache, for every stage that evaluates by greedy generation."""
    p.add_argument("--no-gen-cache", action="store_true", help="decode every evaluation answer again instead of "
                   "reusing the greedy answers of the same weights in <run-dir>/gen_cache/ (common.gen_cache)")


def open_gen_cache(run_dir: str, args) -> "GenCache | None":
    """The run directory's cache, or None under --no-gen-cache. Raises GenCacheError for a damaged file."""
    return None if args.no_gen_cache else GenCache(os.path.join(run_dir, "gen_cache"))


class GenCacheError(ValueError):
    """A generation cache file that cannot be used; the message names it and says to delete it."""


def model_fingerprint(model, tokenizer=None) -> str:
    """sha256 (hex, 32 digits) of the weights, config, EOS ids and tokenizer: equal for a model and its saved and
    reloaded copy, different as soon as one weight differs. Tied tensors are hashed once."""
    model = getattr(model, "module", model)  # DDP
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model_fingerprint needs a torch module, got {type(model).__name__}; pass cache=None")
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _BOOKKEEPING}
    h.update(json.dumps([config, _eos_ids(model, tokenizer) if tokenizer is not None else None],
                        sort_keys=True, default=str).encode())
    if tokenizer is not None:
        h.update(json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens,
                             getattr(tokenizer, "chat_template", None)], default=str).encode())
    seen = {}
    for name, t in model.state_dict().items():
        where = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{seen.get(where, '')}\n".encode())
        if where in seen and t.numel():  # a tied weight: the same bytes as the first name it appeared under
            continue
        seen[where] = name
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:32]


def compute_setting(model) -> str:
    """How the forward runs at this call: device type, weight dtype, autocast dtype (or off)."""
    p = next(getattr(model, "module", model).parameters())
    dev = p.device.type
    amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    return f"{dev} {str(p.dtype).removeprefix('torch.')} autocast {str(amp).removeprefix('torch.') if amp else 'off'}"


class GenCache:
    """The greedy answers under one directory, read (and checked) when constructed, written after each call."""

    def __init__(self, directory: str):
        self.dir = directory
        self.answers: dict[str, dict] = {}  # fingerprint -> {(prompt, max_new_tokens, compute): (text, ids)}
        if os.path.isdir(directory):
            for name in sorted(os.listdir(directory)):
                if name.endswith(".jsonl"):
                    self.answers[name.removesuffix(".jsonl")] = self._read(os.path.join(directory, name))

    def path(self, fingerprint: str) -> str:
        return os.path.join(self.dir, f"{fingerprint}.jsonl")

    @staticmethod
    def _read(path: str) -> dict:
        out = {}
        try:
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    try:
                        r = json.loads(line)
                        key, ans = (r["prompt"], r["max_new_tokens"], r["compute"]), (r["text"], r["ids"])
                        ok = (isinstance(key[0], str) and isinstance(key[1], int) and isinstance(key[2], str)
                              and isinstance(ans[0], str) and isinstance(ans[1], list)
                              and all(isinstance(i, int) for i in ans[1]))
                    except (ValueError, TypeError, KeyError):
                        ok = False
                    if not ok:
                        raise GenCacheError(f"generation cache {path} line {n} is not a cached answer; delete the "
                                            f"file (its answers are decoded again)")
                    out[key] = (ans[0], list(ans[1]))
        except UnicodeDecodeError:
            raise GenCacheError(f"generation cache {path} is not UTF-8 text; delete the file (its answers are "
                                f"decoded again)") from None
        return out

    def get(self, fingerprint: str, prompt: str, max_new_tokens: int, compute: str):
        """(text, ids), or None when this model never answered this prompt under these settings."""
        return self.answers.get(fingerprint, {}).get((prompt, max_new_tokens, compute))

    def put(self, fingerprint: str, new: dict) -> None:
        """Add {(prompt, max_new_tokens, compute): (text, ids)} and rewrite the model's file atomically."""
        path = self.path(fingerprint)
        merged = self._read(path) if os.path.exists(path) else {}  # what another process added since we read it
        merged.update(self.answers.get(fingerprint, {}))
        merged.update(new)
        self.answers[fingerprint] = merged
        os.makedirs(self.dir, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            for (prompt, mnt, compute), (text, ids) in merged.items():
                f.write(json.dumps({"prompt": prompt, "max_new_tokens": mnt, "compute": compute, "text": text,
                                    "ids": ids}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                    cache: GenCache | None = None, desc: str | None = None, engine=None) -> list[tuple[str, list[int]]]:
    """The greedy answer to each rendered prompt as (text, ids), ids through the first EOS (common.generate's
    return_ids). With `cache`, only the prompts it has no answer for (this model, budget and compute setting) are
    decoded, once each, and their answers are added to it. `desc` names the progress bar. `engine` (a
    common.generate.VLLMGenerator holding `model`'s weights) decodes instead of our decoder; its answers are cached
    under the engine's own compute setting, never mixed with ours."""
    def run(ps, label):
        if engine is not None:
            if label:
                print0(f"{label}: vLLM")
            return [o[0][:2] for o in engine.generate(ps, temperature=0.0, max_new_tokens=max_new_tokens,
                                                      return_ids=True)]
        return [o[0] for o in generate(model, tokenizer, ps, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       return_ids=True, desc=label)]
    if cache is None:
        return run(prompts, desc and f"{desc} ({len(prompts)} prompts)")
    fp = model_fingerprint(model, tokenizer)
    compute = engine.compute_setting if engine is not None else compute_setting(model)
    found = {p: cache.get(fp, p, max_new_tokens, compute) for p in prompts}
    todo = [p for p, a in found.items() if a is None]  # distinct prompts, in order
    reused = len(prompts) - sum(found[p] is None for p in prompts)
    if todo:
        new = dict(zip(todo, run(todo, desc and f"{desc} ({len(todo)} prompts" +
                                 (f", {reused} more from the cache)" if reused else ")"))))
        cache.put(fp, {(p, max_new_tokens, compute): tuple(a) for p, a in new.items()})
        found.update(new)
    elif desc and prompts:
        print0(f"{desc}: all {len(prompts)} answers from the generation cache ({cache.path(fp)})")
    return [tuple(found[p]) for p in prompts]
