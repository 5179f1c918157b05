"""--resume, in one place: training states (weights, optimizer, step, RNG, extras; tensors in safetensors, the
rest in JSON) tied to the run that made them.

A training stage keeps its --resume states in <out>.state/: args.json (the arguments of the run that made
them) and step-000123/ directories (weights, optimizer moments, step, RNG, the stage's extras), the newest
`keep` of them. The rules:

  - --out must not exist yet (checked first, so a long run never ends unable to save);
  - a fresh run refuses a state directory that holds finished states (they belong to an earlier run: pass
    --resume to continue it, or delete the directory), so two runs never mix their states;
  - --resume needs a finished state and the same arguments as the run that made it, except the budget flags
    the stage names (more steps, more epochs), --lr (lowering it is the fix for a non-finite step), and flags
    that do not change the result (threads, W&B);
  - a state counts only once its COMPLETED marker is in place (written last, then the directory is renamed
    into place), and older states are deleted only after a newer one is complete, so a kill -9 at any moment
    leaves the last complete state loadable.

    states = RunStates(args.out, vars(args), resume=args.resume, budget_keys=("max_steps",))   # before heavy work
    if args.resume:
        st = states.load(model, optimizer)                  # the newest state; st["step"], extras
    ...
    states.save(step + 1, model, optimizer, history_json=json.dumps(history))
    ...
    save_checkpoint(...); states.finish()                   # the run is done: its states go
"""

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from common.checkpoint import (COMPLETED, CheckpointError, check_out_free, check_safetensors, is_complete, read_json,
                               write_json_atomic)
from common.optim import check_finite_update

# flags that may differ between a run and its resume whatever the stage: they do not change the result, or (lr)
# changing them is the documented fix for a non-finite step
FREE_KEYS = ("resume", "wandb_mode", "wandb_project", "run_name", "threads", "lr")
ARGS_FILE = "args.json"
_UNSET = object()


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
    tensors_path, skeleton_path = os.path.join(path, "tensors.safetensors"), os.path.join(path, "state.json")
    for f in (tensors_path, skeleton_path):
        if not os.path.isfile(f):
            raise CheckpointError(f"training state {path} has no {os.path.basename(f)}; delete the state to resume "
                                  f"from an earlier one")
    check_safetensors(tensors_path)
    try:
        return _unflatten(read_json(skeleton_path), load_file(tensors_path))
    except (KeyError, TypeError, OSError) as e:
        raise CheckpointError(f"training state {path} is damaged ({type(e).__name__}: {e}); delete it to resume from "
                              f"an earlier state") from None


def save_train_state(path: str, step: int, model=None, optimizer=None, **extra) -> None:
    """Everything --resume needs: weights, optimizer moments, step, RNG, any extra tensors/JSON values.
    model: a module, or its full state dict (what FSDP gathers)."""
    state = {"step": step, "torch_rng": torch.get_rng_state(), **extra}
    if isinstance(model, dict):
        state["model"] = model
    elif model is not None:
        state["model"] = {k: v for k, v in getattr(model, "module", model).state_dict().items()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    save_state(path, state)


def load_train_state(path: str, model=None, optimizer=None, reset_optimizer: bool = False) -> dict:
    """Restore what save_train_state wrote; returns the state dict (step and extras)."""
    state = load_state(path)
    if model is not None:
        getattr(model, "module", model).load_state_dict(state["model"])
    if optimizer is not None and not reset_optimizer:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state


STATE_NAME = re.compile(r"step-\d{6,}$")  # not step-000123.tmp-<pid>: a save that was cut off


def finished_states(dir_: str) -> list[str]:
    """The finished states under dir_ (named step-000123, COMPLETED inside), oldest first."""
    if not os.path.isdir(dir_):
        return []
    done = [d for d in os.listdir(dir_) if STATE_NAME.match(d) and os.path.isfile(os.path.join(dir_, d, "COMPLETED"))]
    return [os.path.join(dir_, d) for d in sorted(done, key=lambda d: int(d[5:]))]


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


class RunStates:
    """The resume states of one --out. Construct it before any heavy work: it raises CheckpointError (one line,
    with the fix) for an existing --out, stale states on a fresh run, or a resume it cannot honor.

    shard: a subdirectory per rank for stages whose ranks keep different states (01: rank0/, rank1/, ...)."""

    def __init__(self, out: str, args: dict, resume: bool, budget_keys=(), keep: int = 3, shard: str | None = None):
        self.out = out.rstrip("/")
        self.dir = self.out + ".state"
        self.shard_dir = os.path.join(self.dir, shard) if shard else self.dir
        self.args = json.loads(json.dumps(args, default=str))  # as it reads back from args.json
        self.free = set(FREE_KEYS) | set(budget_keys)
        self.keep = max(1, keep)
        self._args_written = False
        check_out_free(self.out)
        if not resume:
            if self._any_finished():
                newest = self._any_finished()[-1]
                raise CheckpointError(f"{self.dir} holds resume states of an earlier run (newest: "
                                      f"{os.path.relpath(newest, self.dir)}); pass --resume to continue that run, "
                                      f"or delete {self.dir} to start over")
            return
        if not self.latest():
            raise CheckpointError(f"--resume: no finished state in {self.shard_dir}; start without --resume")
        if not os.path.isfile(os.path.join(self.dir, ARGS_FILE)):
            raise CheckpointError(f"--resume: {self.dir} has no {ARGS_FILE}, so its states cannot be tied to a run; "
                                  f"delete it and start without --resume")
        saved = read_json(os.path.join(self.dir, ARGS_FILE)).get("args", {})
        differ = sorted(k for k in set(saved) | set(self.args)
                        if k not in self.free and saved.get(k, _UNSET) != self.args.get(k, _UNSET))
        if differ:
            shown = ", ".join(f"{_flag(k)} {saved.get(k, 'unset')!r} there, {self.args.get(k, 'unset')!r} now"
                              for k in differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
            may = ", ".join(_flag(k) for k in sorted(set(budget_keys) | {"lr"}))
            raise CheckpointError(f"--resume: the states in {self.dir} were made by a run with other arguments "
                                  f"({shown}); resume with that run's arguments (only {may} may change) or "
                                  f"choose another --out")

    # ------------------------------------------------------------------------

    def _any_finished(self) -> list[str]:
        """Finished states in the state directory and in any shard of it."""
        if not os.path.isdir(self.dir):
            return []
        subdirs = [os.path.join(self.dir, d) for d in sorted(os.listdir(self.dir))
                   if os.path.isdir(os.path.join(self.dir, d)) and not STATE_NAME.match(d)]
        return [s for d in [self.dir] + subdirs for s in finished_states(d)]

    def latest(self) -> str | None:
        """The newest finished state of this run (this shard), or None."""
        done = finished_states(self.shard_dir)
        return done[-1] if done else None

    def update_check(self, model, label: str):
        """`check_finite(loss, grad_norm, where)` for an RL update (common.rl): check_finite_update on `model`, its
        error naming the stage and this run's last good state."""
        return lambda loss, gnorm, where: check_finite_update(
            model, loss, gnorm, where=f"{label} {where}; last good state: {self.latest() or 'none'}")

    def save(self, step: int, model, optimizer, **extra) -> str:
        """Save a state named step-%06d (atomically, COMPLETED last), then drop all but the newest `keep`.
        model: a module or its full state dict (FSDP); optimizer may be None."""
        os.makedirs(self.shard_dir, exist_ok=True)
        if not self._args_written:  # first save of this process: leftovers of cut-off saves go, args are recorded
            for name in os.listdir(self.shard_dir):
                if name.startswith(".trash-") or re.match(r"step-\d+\.tmp-\d+$", name):
                    shutil.rmtree(os.path.join(self.shard_dir, name), ignore_errors=True)
            write_json_atomic(os.path.join(self.dir, ARGS_FILE), {"out": os.path.abspath(self.out), "args": self.args})
            self._args_written = True
        path = os.path.join(self.shard_dir, f"step-{step:06d}")
        save_train_state(path, step, model, optimizer, **extra)
        for old in finished_states(self.shard_dir)[:-self.keep]:
            trash = os.path.join(self.shard_dir, f".trash-{os.path.basename(old)}-{os.getpid()}")
            os.replace(old, trash)  # one rename: a kill -9 during the delete leaves no half state named step-*
            shutil.rmtree(trash, ignore_errors=True)
        return path

    def load(self, model=None, optimizer=None) -> dict:
        """Restore the newest state into model / optimizer (either may be None); returns it (step, extras)."""
        path = self.latest()
        if path is None:
            raise CheckpointError(f"--resume: no finished state in {self.shard_dir}; start without --resume")
        return load_train_state(path, model, optimizer)

    def finish(self) -> None:
        """The run's output is saved: its states are no longer needed."""
        shutil.rmtree(self.dir, ignore_errors=True)
