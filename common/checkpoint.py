"""Checkpoints: HF save_pretrained (safetensors only) + meta.json + COMPLETED, written atomically.

A stage writes into a temporary sibling directory and renames it into place, COMPLETED last, so a
crash never leaves a half checkpoint that looks whole. Loaders read safetensors and JSON, never pickles,
and check them first: a directory that is not a finished checkpoint, or a truncated / invalid file in it,
is one CheckpointError naming it (--resume states, saved the same way: common/resume.py). metrics/<name>.json files
record the --out they belong to.
"""

import json
import os
import shutil
import subprocess
import time

import torch

COMPLETED = "COMPLETED"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The model code every checkpoint ships, as NVIDIA's nemotron-nas checkpoints do: a process that never imported this
# repo loads it with trust_remote_code=True (transformers' Auto classes, vLLM). common/model.py imports only torch,
# transformers and huggingface_hub, so the copy is self-contained. Our own loading path (load_checkpoint) never
# runs it: `import common` registers the model type, and transformers prefers registered code unless told otherwise.
MODEL_CODE = "modeling_decilm.py"
AUTO_MAP = {"AutoConfig": "modeling_decilm.DeciLMConfig", "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}


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
    """The parsed file; a file that is not UTF-8 JSON raises CheckpointError naming it (missing: FileNotFoundError)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); restore it or rerun the step "
                              f"that wrote it") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text; restore it or rerun the step that wrote it") from None


def check_safetensors(path: str) -> None:
    """Raise CheckpointError unless `path` is a whole safetensors file (header readable, every tensor's bytes there).

    Reads only the header, so it is cheap enough to run on every load; a truncated copy or a half-written file
    fails here with its name instead of deep inside the loader."""
    def bad(problem):
        raise CheckpointError(f"{path} is {problem}; restore the file or rerun the step that wrote it")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            bad(f"truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        bad("not a safetensors file (unreadable header)")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    if 8 + n + max(ends, default=0) > size:
        bad(f"truncated ({size} bytes, its header needs {8 + n + max(ends)})")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETED))


def describe_dir(path: str) -> str:
    """What an existing path is, in words, for messages: a finished checkpoint, an unfinished one, or neither."""
    if not os.path.isdir(path):
        return "a file, not a directory"
    if is_complete(path):
        return "a finished checkpoint"
    if os.path.isfile(os.path.join(path, "library.json")):
        return "a finished block library"
    if any(os.path.exists(os.path.join(path, f)) for f in ("config.json", "meta.json")):
        return f"an unfinished checkpoint (no {COMPLETED}: the stage that wrote it did not finish)"
    return "not a checkpoint" + (" (an empty directory)" if not os.listdir(path) else "")


def check_out_free(out: str) -> None:
    """Call before any work: a stage never writes into an existing --out, so a long run cannot end unable to save."""
    if os.path.exists(out):
        what = describe_dir(out)
        where = f"is already {what}" if what.startswith("a finished") else f"already exists and is {what}"
        raise CheckpointError(f"--out {out} {where}; choose another --out or delete it")


def check_checkpoint(path: str) -> None:
    """Raise CheckpointError with a one-line reason unless `path` is a finished checkpoint of ours whose files are
    whole: JSON files parse, safetensors files are complete."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist; run the stage that writes it first (see README)")
    what = describe_dir(path)
    if what.startswith("an unfinished"):
        raise CheckpointError(f"checkpoint {path} has no {COMPLETED} marker: the stage that wrote it did not finish; "
                              f"rerun that stage (with --resume where it has one)")
    if what != "a finished checkpoint":
        raise CheckpointError(f"{path} is {what}; give a checkpoint directory written by a stage of this repo "
                              f"(a local HF Llama converts with: python -m common.parent --from DIR --out DIR2)")
    config = read_json(os.path.join(path, "config.json")) if os.path.isfile(os.path.join(path, "config.json")) else {}
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "nemotron-nas":  # a Llama (or no config at all) is named before anything else is checked
        raise CheckpointError(f"{path} is not a nemotron-nas checkpoint (model_type={model_type!r}); convert a Llama "
                              f"with: python -m common.parent --from {path} --out DIR")
    if not os.path.isfile(os.path.join(path, "meta.json")):
        raise CheckpointError(f"checkpoint {path} has no meta.json; restore it or rerun the stage that wrote it")
    for name in sorted(os.listdir(path)):
        if name.endswith(".json"):
            read_json(os.path.join(path, name))
        elif name.endswith(".safetensors"):
            check_safetensors(os.path.join(path, name))
    if not any(n.endswith(".safetensors") for n in os.listdir(path)):
        raise CheckpointError(f"checkpoint {path} has no .safetensors weights; restore them or rerun the stage")


def ship_model_code(path: str) -> None:
    """Make the HF model directory `path` (its config.json written) loadable without this repo: copy common/model.py
    into it as MODEL_CODE and point config.json's auto_map at it. Directories of other model types are left alone."""
    config_path = os.path.join(path, "config.json")
    config = read_json(config_path)
    if config.get("model_type") != "nemotron-nas":
        return
    shutil.copyfile(os.path.join(REPO_ROOT, "common", "model.py"), os.path.join(path, MODEL_CODE))
    config["auto_map"] = dict(AUTO_MAP)
    tmp = f"{config_path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:  # transformers' own layout of config.json
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_path)


def save_checkpoint(model, tokenizer, out: str, stage: str, args: dict | None = None, meta: dict | None = None,
                    extra_json: dict | None = None, overwrite: bool = False, extra_files: dict | None = None) -> str:
    """Write model + tokenizer + meta.json (+ extra JSON files such as search.json) to `out` atomically.

    extra_files: {name: writer(path)} for non-JSON artifacts (plots) that belong inside the checkpoint; they are
    written into the temporary directory, so they exist before COMPLETED does.
    A nemotron-nas model also gets its model code (MODEL_CODE, config.json's auto_map: see ship_model_code), so the
    checkpoint loads with trust_remote_code=True where this repo is not importable (vLLM, plain transformers).
    """
    out = os.path.abspath(out)
    if not overwrite:
        check_out_free(out)
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model = getattr(model, "module", model)  # unwrap DDP
    model.save_pretrained(tmp, safe_serialization=True)
    ship_model_code(tmp)
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


def load_meta_matching(path: str, stages: tuple, args: dict, keys: tuple, flag: str = "--before-from") -> dict:
    """meta.json of a finished checkpoint written by one of `stages` with the same values of `keys` as `args`: an
    ablation reusing another run's measurement (e.g. the before-training evaluation) of the same input."""
    meta = load_meta(path)
    theirs = meta.get("args", {})
    diff = [k for k in keys if theirs.get(k) != args.get(k)]
    if meta.get("stage") not in stages or diff:
        raise CheckpointError(f"{flag} {path} is not a {'/'.join(stages)} run with the same "
                              f"{', '.join('--' + k.replace('_', '-') for k in (diff or keys))}; drop the flag to "
                              f"measure here")
    return meta


def load_checkpoint(path: str, dtype=torch.float32, device="cpu", with_tokenizer: bool = True):
    """(model, tokenizer) from a finished checkpoint of ours; eval mode. A quantized checkpoint (meta.json "quant")
    comes back fake-quantized (common.quant.QuantLinear projections)."""
    import common  # noqa: F401  (registers nemotron-nas with the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_checkpoint(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device).eval()
        quant = load_meta(path).get("quant")
        if quant:  # a quantized model (04 --quant): it computes with fake-quantized projections, as evaluated
            from common.quant import restore_quantized_
            restore_quantized_(model, quant)
        tokenizer = AutoTokenizer.from_pretrained(path) if with_tokenizer else None
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:  # files whole but inconsistent
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"checkpoint {path} does not load ({type(e).__name__}: {first}); restore it or rerun "
                              f"the stage that wrote it") from None
    return model, tokenizer


# ----------------------------------------------------------------------------
# metrics/<name>.json: each file records the --out it was written for, so another run cannot replace it


def _metrics_path(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, "metrics", f"{name}.json")


def check_metrics_free(run_dir: str, name: str, out: str) -> None:
    """Call at the start of a stage: refuse when metrics/<name>.json exists and was written for another --out.

    A rerun or a resumed run of the same --out may rewrite its own file; a file without an owner (older code, or
    written by hand) counts as another run's."""
    path = _metrics_path(run_dir, name)
    if not os.path.exists(path):
        return
    try:
        owner = read_json(path).get("_out")
    except (CheckpointError, AttributeError):
        owner = None
    if owner != os.path.abspath(out):
        raise CheckpointError(f"{path} already holds the metrics of {owner or 'another run'}; pass another "
                              f"--metrics-name (--stage for common.evaluate) or --run-dir, or delete that file to "
                              f"replace it")


def write_metrics(run_dir: str, stage: str, metrics: dict, out: str | None = None) -> str:
    """runs/<name>/metrics/<stage>.json: each stage's headline numbers, read by the report. With `out` (the stage's
    --out) the file records its owner and is checked again, so only a run of the same --out ever replaces it."""
    path = _metrics_path(run_dir, stage)
    if out is not None:
        check_metrics_free(run_dir, stage, out)
        metrics = {**metrics, "_out": os.path.abspath(out)}
    write_json_atomic(path, metrics)
    return path


def read_run_metrics(run_dir: str) -> dict:
    """Every metrics/<name>.json of a run directory by name, in the order they were written (the files' times): the
    run order; a file that is not valid JSON comes back as its CheckpointError. FileNotFoundError naming the fix when
    the run has no metrics directory."""
    mdir = os.path.join(run_dir, "metrics")
    if not os.path.isdir(mdir):
        raise FileNotFoundError(f"{mdir} does not exist; run the stages first (bash run.sh)")
    paths = sorted((os.path.join(mdir, f) for f in os.listdir(mdir) if f.endswith(".json")),
                   key=lambda f: (os.path.getmtime(f), f))
    out = {}
    for f in paths:
        try:
            out[os.path.basename(f)[:-5]] = read_json(f)
        except CheckpointError as e:  # half-written or not JSON: named, never a crash of the stage reading the run
            out[os.path.basename(f)[:-5]] = e
    return out
