"""Checkpoints: HF save_pretrained (safetensors only) + meta.json + COMPLETED, written atomically.

A stage writes into a temporary sibling directory and renames it into place, COMPLETED last, so a
crash never leaves a half checkpoint that looks whole. Loaders read safetensors and JSON, never pickles.
Training state for --resume (optimizer, step, RNG) is saved the same way: tensors in safetensors,
everything else in JSON.
"""

import json
import os
import shutil
import subprocess
import time

import torch
from safetensors.torch import load_file, save_file

COMPLETED = "COMPLETED"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used; the message says why and what to do."""


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json_atomic(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETED))


def check_checkpoint(path: str) -> None:
    """Raise CheckpointError with a one-line reason unless `path` is a finished checkpoint of ours."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist; run the stage that writes it first (see README)")
    if not is_complete(path):
        raise CheckpointError(f"checkpoint {path} has no {COMPLETED} marker: the stage that wrote it did not finish; "
                              f"rerun that stage (with --resume where it has one)")
    cfg_path = os.path.join(path, "config.json")
    model_type = read_json(cfg_path).get("model_type") if os.path.exists(cfg_path) else None
    if model_type != "nemotron-nas":
        raise CheckpointError(f"{path} is not a nemotron-nas checkpoint (model_type={model_type!r}); convert a Llama "
                              f"with: python -m common.parent --from {path} --out DIR")


def save_checkpoint(model, tokenizer, out: str, stage: str, args: dict | None = None, meta: dict | None = None,
                    extra_json: dict | None = None, overwrite: bool = False, extra_files: dict | None = None) -> str:
    """Write model + tokenizer + meta.json (+ extra JSON files such as search.json) to `out` atomically.

    extra_files: {name: writer(path)} for non-JSON artifacts (plots) that belong inside the checkpoint; they are
    written into the temporary directory, so they exist before COMPLETED does.
    """
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        state = "a finished checkpoint" if is_complete(out) else "a directory without COMPLETED"
        raise CheckpointError(f"{out} already exists ({state}); choose another --out or delete it first")
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model = getattr(model, "module", model)  # unwrap DDP
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    info = {"stage": stage, "args": args or {}, "git_commit": git_commit(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {})}
    write_json_atomic(os.path.join(tmp, "meta.json"), info)
    for name, obj in (extra_json or {}).items():
        write_json_atomic(os.path.join(tmp, name), obj)
    for name, writer in (extra_files or {}).items():
        writer(os.path.join(tmp, name))
    with open(os.path.join(tmp, COMPLETED), "w") as f:
        f.write(info["time"] + "\n")
    if os.path.exists(out):  # overwrite=True: move the old one aside first, drop it only after the rename
        old = f"{tmp}.old"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


def load_meta(path: str) -> dict:
    check_checkpoint(path)
    return read_json(os.path.join(path, "meta.json"))


def load_checkpoint(path: str, dtype=torch.float32, device="cpu", with_tokenizer: bool = True):
    """(model, tokenizer) from a finished checkpoint of ours; eval mode."""
    import common  # noqa: F401  (registers nemotron-nas with the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_checkpoint(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if with_tokenizer else None
    return model, tokenizer


def write_metrics(run_dir: str, stage: str, metrics: dict) -> str:
    """runs/<name>/metrics/<stage>.json: each stage's headline numbers, read by the report."""
    path = os.path.join(run_dir, "metrics", f"{stage}.json")
    write_json_atomic(path, metrics)
    return path


# ----------------------------------------------------------------------------
# Training state for --resume: safetensors for tensors, JSON for the rest.


def _flatten(prefix, obj, tensors):
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().clone()  # clone: tied weights share storage
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(f"{prefix}.{k}", v, tensors)] for k, v in obj.items()]}  # keeps int keys
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)]}
    return obj


def _unflatten(node, tensors):
    if isinstance(node, dict) and "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if isinstance(node, dict) and "__dict__" in node:
        return {k: _unflatten(v, tensors) for k, v in node["__dict__"]}
    if isinstance(node, dict) and "__list__" in node:
        return [_unflatten(v, tensors) for v in node["__list__"]]
    return node


def save_state(path: str, state: dict) -> None:
    """Save a nested dict of tensors / numbers / strings (e.g. optimizer.state_dict(), RNG, step) atomically."""
    tensors: dict = {}
    skeleton = _flatten("s", state, tensors)
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    save_file(tensors, os.path.join(tmp, "tensors.safetensors"))
    write_json_atomic(os.path.join(tmp, "state.json"), skeleton)
    with open(os.path.join(tmp, COMPLETED), "w") as f:
        f.write("ok\n")
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def load_state(path: str) -> dict:
    if not is_complete(path):
        raise CheckpointError(f"training state {path} is incomplete (no {COMPLETED}); delete it or start without --resume")
    tensors = load_file(os.path.join(path, "tensors.safetensors"))
    return _unflatten(read_json(os.path.join(path, "state.json")), tensors)

