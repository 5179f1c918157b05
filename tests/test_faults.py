"""Fault injection: every stage script, run in its own process on tiny models, meets bad input and injected faults
and answers with a non-zero exit, a one-line "error: ..." as stderr's last line (no traceback), and no finished file
changed (sha256 of every file of the run directory before and after; only new resume states may appear).

Faults: bad paths, corrupt files (truncated safetensors, invalid JSON, non-UTF-8 or empty data), bad numbers,
NaN loss, a NaN/overflowing gradient under a finite loss, kill -9 in the middle of a save, stale states of another
run, an existing --out that is not a checkpoint, a metrics file of another run.

Each case runs in its own copy of one tiny "world" (hard links, so a copy costs nothing), two at a time, each as
`python SCRIPT ARGS` in a fresh interpreter (a kill story through _run_script.py, which arms the kill). An earlier
version forked every case from one multiprocessing forkserver (imports paid once); under CI load a case once got
another case's output and its reference run failed, so every case now pays its own ~4 s of imports.
A stage is added by rows in CASES (and, for a training stage, a row in STATEFUL):
    Case(script, name, argv with "{d}" for the case's directory, expected part of the message, setup(d) or None)
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from conftest import ROOT, tiny_model, tiny_tokenizer

from common.checkpoint import save_checkpoint, write_json_atomic
from common.resume import finished_states, load_state

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ERROR_LINE = re.compile(r"^(\S+: )?error: ")  # ours, or argparse's "<prog>: error: argument --x: ..."


# ----------------------------------------------------------------------------
# The world: tiny checkpoints (good and poisoned), data, a finished block library and its metrics file


def poisoned(kind: str):
    """A tiny model whose training must stop: 'nan' has a NaN weight (NaN loss); 'overflow' computes exactly what an
    ordinary model computes (finite, normal loss) but one FFN's norm gain is scaled up by 1e30 and its gate/up
    weights down by as much, so that FFN's weight gradients are 1e30 times too large (an inf gradient norm);
    'nangrad' has embeddings so large that every RMSNorm overflows to 0 in the forward (finite loss) and to NaN
    in the backward."""
    m = tiny_model(seed=1, num_layers=2)
    with torch.no_grad():
        if kind == "nan":
            m.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
        elif kind == "overflow":
            layer, s = m.model.layers[1], 1e30
            layer.post_attention_layernorm.weight.mul_(s)
            layer.mlp.gate_proj.weight.div_(s)
            layer.mlp.up_proj.weight.div_(s)
        else:
            m.model.embed_tokens.weight.mul_(1e37)
    return m


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("world"))
    tok = tiny_tokenizer()
    save_checkpoint(tiny_model(num_layers=2), tok, f"{d}/parent", stage="parent")
    save_checkpoint(tiny_model(seed=2, num_layers=2), tok, f"{d}/child", stage="child", meta={"parent": f"{d}/parent"})
    for kind in ("nan", "overflow", "nangrad"):
        save_checkpoint(poisoned(kind), tok, f"{d}/{kind}", stage="child", meta={"parent": f"{d}/parent"})
    from data_gen import build
    build.main(["--out", f"{d}/data", "--math", "24", "--science", "8", "--instructions", "8", "--eval-math", "4",
                "--eval-instructions", "2"])
    from common.text_corpus import distill_documents
    with open(f"{d}/text.txt", "w") as f:
        f.write("\n".join(doc.replace("\n", " ") for doc in distill_documents("train")[:30]) + "\n")
    r = run(["01_bld.py", *BLD, "--metrics-name", "bld"], d, out="library")  # a finished library + metrics/bld.json
    assert r.returncode == 0, r.stderr[-2000:]
    os.makedirs(f"{d}/notes")  # a directory that is not a checkpoint
    with open(f"{d}/notes/todo.txt", "w") as f:
        f.write("not a checkpoint\n")
    return d


def case_dir(world: str, dest: str) -> str:
    """A copy of the world (hard links) whose JSON files name the copy's paths, not the world's."""
    shutil.copytree(world, dest, copy_function=os.link)
    for root, _, files in os.walk(dest):
        for name in files:
            p = os.path.join(root, name)
            if name.endswith(".json"):
                with open(p) as f:
                    text = f.read()
                if world in text:
                    os.unlink(p)  # never write through a hard link into the world
                    with open(p, "w") as f:
                        f.write(text.replace(world, dest))
    return dest


def snapshot(d: str) -> dict:
    out = {}
    for root, _, files in os.walk(d):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, d)] = hashlib.sha256(f.read()).hexdigest()
    return out


def command(script: str, args, d: str, out: str | None = None) -> list[str]:
    """argv after `python`: SCRIPT ARGS or -m MODULE ARGS, "{d}" filled in."""
    argv = [a.replace("{d}", d) for a in args] + ([] if out is None else ["--out", f"{d}/{out}"])
    return [*(script.split() if script.startswith("-m ") else [os.path.join(ROOT, script)]), *argv]


def run(args, d, out=None, kill_at_save=0, timeout=300) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` in d; kill_at_save=N: kill -9 it in the middle of its N-th state save."""
    argv = command(args[0], args[1:], d, out)
    if kill_at_save:
        argv = [os.path.join(ROOT, "tests", "_run_script.py"), str(kill_at_save), *argv]
    try:
        return subprocess.run([sys.executable, *argv], cwd=d, env=ENV, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(argv, f"timeout after {timeout} s", e.stdout, e.stderr)


# ----------------------------------------------------------------------------
# Setups: each breaks one thing in the case's directory (replacing files, never writing through a hard link)


def replace(rel, data):
    def setup(d):
        p = os.path.join(d, rel)
        if os.path.exists(p):
            os.unlink(p)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    return setup


def truncate(rel):
    def setup(d):
        with open(os.path.join(d, rel), "rb") as f:
            data = f.read()
        replace(rel, data[:len(data) // 2])(d)
    return setup


def remove(rel):
    return lambda d: os.unlink(os.path.join(d, rel))


def metrics_of_another_run(name):
    return lambda d: write_json_atomic(f"{d}/metrics/{name}.json", {"_out": "/elsewhere/runs/x/out", "score": 1.0})


def records_then_latin1(d):
    """data/train.jsonl: two good records, then one written in Latin-1 (line 3)."""
    with open(f"{d}/data/train.jsonl", "rb") as f:
        good = f.readlines()[:2]
    replace("data/train.jsonl", b"".join(good) + good[1].replace(b'"output": "', b'"output": "caf\xe9 ', 1))(d)


LATIN1_TXT = b"first line\nsecond line\nthird line, caf\xe9\n"
SAFETENSORS = "model.safetensors"
NOT_A_CHECKPOINT = "already exists and is not a checkpoint"


# ----------------------------------------------------------------------------
# The table: (script, case, argv, expected part of the one-line message, setup)


@dataclass
class Case:
    script: str
    name: str
    args: list
    expect: str
    setup: Callable | None = None

    @property
    def id(self):
        return f"{os.path.basename(self.script.split()[-1]).removesuffix('.py')}-{self.name}"


BLD = ["--parent", "{d}/parent", "--data", "{d}/text.txt", "--num-seqs", "8", "--seq-len", "32", "--batch-size", "4",
       "--val-seqs", "2", "--score-seqs", "2", "--score-seq-len", "32", "--calib-seqs", "2", "--linear-init", "weights",
       "--dtype", "float32", "--threads", "1", "--save-every", "-1", "--wandb-mode", "disabled"]
BLD_CASE = BLD + ["--out", "{d}/lib2", "--metrics-name", "bld2"]
MIP = ["--library", "{d}/library", "--out", "{d}/child2", "--max-params", "0.9", "--batch", "1", "--prefill", "8",
       "--gen-len", "2", "--cost-repeats", "1", "--cost-layers", "1", "--speed-repeats", "1", "--eval-seqs", "1",
       "--eval-seq-len", "16", "--threads", "1", "--dtype", "float32", "--no-baselines", "--wandb-mode",
       "disabled", "--metrics-name", "mip2"]
FUSE = ["--child", "{d}/child", "--out", "{d}/fused", "--calib-tokens", "32", "--seq-len", "16", "--eval-tokens", "32",
        "--levels", "1", "--speed-new-tokens", "0", "--threads", "1", "--wandb-mode", "disabled"]
KD = ["--student", "{d}/child", "--data", "{d}/text.txt", "--seq-len", "16", "--batch-size", "2", "--grad-accum", "1",
      "--tokens", "96", "--eval-tokens", "0", "--dtype", "float32", "--threads", "1", "--save-every", "-1",
      "--wandb-mode", "disabled"]
KD_CASE = KD + ["--out", "{d}/kd"]
SFT = ["--init", "{d}/parent", "--data", "{d}/data", "--seq-len", "128", "--batch-size", "2", "--grad-accum", "1",
       "--max-steps", "2,2,2", "--eval-problems", "0", "--toggle-problems", "0", "--save-every", "-1",
       "--wandb-mode", "disabled"]
SFT_CASE = SFT + ["--out", "{d}/sft"]
GRPO = ["--policy", "{d}/parent", "--data", "{d}/data", "--num-prompts", "4", "--filter-samples", "2",
        "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "6", "--max-new-tokens-off", "4",
        "--eval-problems", "0", "--steps", "3", "--dtype", "float32", "--save-every", "-1", "--wandb-mode", "disabled"]
GRPO_CASE = GRPO + ["--out", "{d}/grpo"]
RLHF = ["--algo", "rpo", "--policy", "{d}/parent", "--data", "{d}/data", "--steps", "2", "--pairs-per-step", "2",
        "--eval-if", "0", "--eval-math", "0", "--eval-pairs", "0", "--dtype", "float32", "--save-every", "-1",
        "--wandb-mode", "disabled", "--out", "{d}/rlhf"]
PAIR = {"id": "p1", "input": "Say hi.", "reasoning": "off", "chosen": "hi", "rejected": "no"}
CONVERT = ["--out", "{d}/converted"]
BUILD = ["--out", "{d}/data2", "--math", "4", "--science", "2", "--instructions", "2", "--eval-math", "2",
         "--eval-instructions", "1"]
EVAL = ["--model", "{d}/parent", "--parent", "{d}/parent", "--stage", "ev", "--run-dir", "{d}", "--quick",
        "--suites", "text", "--threads", "1"]
LLAMA_CONFIG = json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64})

CASES = [
    # 01: block library
    Case("01_bld.py", "bad-path", BLD_CASE + ["--parent", "{d}/nope"], "checkpoint {d}/nope does not exist"),
    Case("01_bld.py", "truncated-safetensors", BLD_CASE, "parent/model.safetensors is truncated",
         truncate(f"parent/{SAFETENSORS}")),
    Case("01_bld.py", "non-utf8-data", BLD_CASE + ["--data", "{d}/bad.txt"], "bad.txt:3: not UTF-8",
         replace("bad.txt", LATIN1_TXT)),
    Case("01_bld.py", "bad-number", BLD_CASE + ["--num-seqs", "0"], "argument --num-seqs: must be > 0"),
    Case("01_bld.py", "zero-steps", BLD_CASE + ["--num-seqs", "2"], "less than one batch"),
    Case("01_bld.py", "nan-loss", BLD_CASE + ["--parent", "{d}/nan"], "loss is nan at BLD step 1"),
    Case("01_bld.py", "nan-grad-finite-loss", BLD_CASE + ["--parent", "{d}/overflow"],
         "gradient norm is inf with a finite loss"),
    Case("01_bld.py", "out-not-a-checkpoint", BLD_CASE + ["--out", "{d}/notes"], NOT_A_CHECKPOINT),
    Case("01_bld.py", "resume-without-state", BLD_CASE + ["--resume"], "--resume: no finished state"),
    Case("01_bld.py", "metrics-of-another-run", BLD_CASE + ["--metrics-name", "bld"], "metrics/bld.json already holds"),
    # 02: search
    Case("02_mip_select.py", "bad-path", MIP + ["--library", "{d}/nope"], "block library {d}/nope does not exist"),
    Case("02_mip_select.py", "invalid-library-json", MIP, "library/library.json is not valid JSON",
         replace("library/library.json", "{\n  \"parent\": ")),
    Case("02_mip_select.py", "truncated-variant", MIP, "L001-ffn-linear.safetensors is truncated",
         truncate("library/variants/L001-ffn-linear.safetensors")),
    Case("02_mip_select.py", "bad-number", MIP + ["--sweep", "1.5,0"], "argument --sweep: every value must be > 0"),
    Case("02_mip_select.py", "out-not-a-checkpoint", MIP + ["--out", "{d}/notes"], NOT_A_CHECKPOINT),
    Case("02_mip_select.py", "metrics-of-another-run", MIP + ["--metrics-name", "bld"], "already holds the metrics"),
    # 03: FFN fusion
    Case("03_ffn_fusion.py", "bad-path", FUSE + ["--child", "{d}/nope"], "checkpoint {d}/nope does not exist"),
    Case("03_ffn_fusion.py", "unfinished-child", FUSE, "has no COMPLETED marker", remove("child/COMPLETED")),
    Case("03_ffn_fusion.py", "invalid-meta", FUSE, "child/meta.json is not valid JSON",
         replace("child/meta.json", "{")),
    Case("03_ffn_fusion.py", "bad-number", FUSE + ["--speed-prefill", "4x0"], "argument --speed-prefill"),
    Case("03_ffn_fusion.py", "out-not-a-checkpoint", FUSE + ["--out", "{d}/notes"], NOT_A_CHECKPOINT),
    # 04: global KD
    Case("04_distill.py", "bad-path", KD_CASE + ["--student", "{d}/nope"], "checkpoint {d}/nope does not exist"),
    Case("04_distill.py", "teacher-not-a-checkpoint", KD_CASE + ["--teacher", "{d}/notes"],
         "notes is not a checkpoint"),
    Case("04_distill.py", "not-nemotron", KD_CASE, "not a nemotron-nas checkpoint",
         replace("child/config.json", LLAMA_CONFIG)),
    Case("04_distill.py", "empty-data", KD_CASE + ["--data", "{d}/empty.jsonl"], "empty.jsonl is empty",
         replace("empty.jsonl", "")),
    Case("04_distill.py", "bad-number", KD_CASE + ["--lr", "0"], "argument --lr: must be > 0"),
    Case("04_distill.py", "zero-steps", KD_CASE + ["--tokens", "16"], "less than one optimizer step"),
    Case("04_distill.py", "nan-loss", KD_CASE + ["--debug-nan-step", "1", "--save-every", "1"],
         "loss is nan at kd step 1 (last good state: {d}/kd.state/step-000001)"),
    Case("04_distill.py", "nan-grad-finite-loss", KD_CASE + ["--student", "{d}/overflow"],
         "gradient norm is inf with a finite loss"),
    Case("04_distill.py", "out-not-a-checkpoint", KD_CASE + ["--out", "{d}/notes"], NOT_A_CHECKPOINT),
    Case("04_distill.py", "metrics-of-another-run", KD_CASE, "metrics/distill.json already holds",
         metrics_of_another_run("distill")),
    # 05: SFT
    Case("05_sft.py", "bad-path", SFT_CASE + ["--init", "{d}/nope"], "checkpoint {d}/nope does not exist"),
    Case("05_sft.py", "non-utf8-data", SFT_CASE, "train.jsonl:3: not UTF-8", records_then_latin1),
    Case("05_sft.py", "empty-data", SFT_CASE, "train.jsonl: no records", replace("data/train.jsonl", "")),
    Case("05_sft.py", "bad-number", SFT_CASE + ["--lr", "1e-4,0,1e-5"], "argument --lr: every value must be > 0"),
    Case("05_sft.py", "zero-steps", SFT_CASE + ["--max-steps", "0,0,0"], "nothing would be trained"),
    Case("05_sft.py", "too-little-data", SFT_CASE + ["--batch-size", "64"], "stage(s) [1, 2, 3] get no optimizer step"),
    Case("05_sft.py", "nan-loss", SFT_CASE + ["--init", "{d}/nan"], "loss is nan at SFT stage 1 step 1"),
    Case("05_sft.py", "nan-grad-finite-loss", SFT_CASE + ["--init", "{d}/nangrad"],
         "gradient norm is nan (first in model.embed_tokens.weight) with a finite loss"),
    Case("05_sft.py", "out-not-a-checkpoint", SFT_CASE + ["--out", "{d}/notes"], NOT_A_CHECKPOINT),
    Case("05_sft.py", "resume-without-state", SFT_CASE + ["--resume"], "--resume: no finished state"),
    Case("05_sft.py", "metrics-of-another-run", SFT_CASE, "metrics/sft.json already holds",
         metrics_of_another_run("sft")),
    # 06: GRPO
    Case("06_grpo.py", "bad-path", GRPO_CASE + ["--policy", "{d}/nope"], "checkpoint {d}/nope does not exist"),
    Case("06_grpo.py", "policy-not-a-checkpoint", GRPO_CASE + ["--policy", "{d}/notes"], "notes is not a checkpoint"),
    Case("06_grpo.py", "bad-number", GRPO_CASE + ["--group-size", "0"], "argument --group-size: must be > 0"),
    Case("06_grpo.py", "no-prompt-with-answer", GRPO_CASE + ["--prompts", "{d}/noans.jsonl"],
         "noans.jsonl has no prompt with an answer",
         replace("noans.jsonl", json.dumps({"id": "m1", "input": "What is 2 + 2?", "output": "4", "reasoning": "off",
                                            "system_prompt": "detailed thinking off",
                                            "category": "math", "answer": None}) + "\n")),
    Case("06_grpo.py", "empty-prompts", GRPO_CASE + ["--prompts", "{d}/empty.jsonl"], "empty.jsonl",
         replace("empty.jsonl", "")),
    Case("06_grpo.py", "nan-weights", GRPO_CASE + ["--policy", "{d}/nan"], "holds non-finite weights"),
    Case("06_grpo.py", "out-not-a-checkpoint", GRPO_CASE + ["--out", "{d}/notes"], NOT_A_CHECKPOINT),
    Case("06_grpo.py", "resume-without-state", GRPO_CASE + ["--resume"], "--resume: no finished state"),
    Case("06_grpo.py", "metrics-of-another-run", GRPO_CASE, "metrics/grpo.json already holds",
         metrics_of_another_run("grpo")),
    # 07: RLHF
    Case("07_rlhf.py", "bad-path", RLHF + ["--policy", "{d}/nope"], "checkpoint {d}/nope does not exist"),
    Case("07_rlhf.py", "pairs-missing-field", RLHF + ["--pairs", "{d}/pairs.jsonl", "--rpo-loss", "dpo"],
         "pairs.jsonl:2: missing field(s) rejected",
         replace("pairs.jsonl", json.dumps(PAIR) + "\n" + json.dumps({k: v for k, v in PAIR.items() if k != "rejected"})
                 + "\n")),
    Case("07_rlhf.py", "reward-model-not-one", RLHF + ["--reward-model", "{d}/child"], "is a checkpoint but not a reward model"),
    Case("07_rlhf.py", "bad-number", RLHF + ["--k", "0"], "argument --k: must be > 0"),
    Case("07_rlhf.py", "nan-weights", RLHF + ["--policy", "{d}/nan"], "holds non-finite weights"),
    Case("07_rlhf.py", "out-not-a-checkpoint", RLHF + ["--out", "{d}/notes"], NOT_A_CHECKPOINT),
    # the parent conversion, the data builder, the evaluation suite
    Case("-m common.parent", "bad-path", CONVERT + ["--from", "{d}/nope"], "no such directory"),
    Case("-m common.parent", "not-llama", CONVERT + ["--from", "{d}/gpt2"], "model_type='gpt2'",
         replace("gpt2/config.json", '{"model_type": "gpt2"}')),
    Case("-m common.parent", "bin-only", CONVERT + ["--from", "{d}/binonly"], "only pytorch_model.bin",
         lambda d: [replace("binonly/config.json", LLAMA_CONFIG)(d), replace("binonly/pytorch_model.bin", b"PK")(d)]),
    Case("-m common.parent", "truncated-safetensors", CONVERT + ["--from", "{d}/trunc"], "is truncated",
         lambda d: [replace("trunc/config.json", LLAMA_CONFIG)(d), replace(f"trunc/{SAFETENSORS}", b"\x10\x00")(d)]),
    Case("-m data_gen.build", "tokenizer-not-local", BUILD + ["--tokenizer", "HuggingFaceTB/SmolLM2-135M"],
         "is not a local directory"),
    Case("-m data_gen.build", "bad-number", BUILD + ["--val-frac", "1.5"], "argument --val-frac: must be in [0, 1]"),
    Case("-m common.evaluate", "truncated-safetensors", EVAL, "model.safetensors is truncated",
         truncate(f"parent/{SAFETENSORS}")),
    Case("-m common.evaluate", "bad-number", EVAL + ["--text-seqs", "0"], "argument --text-seqs"),
    Case("-m common.evaluate", "metrics-of-another-run", EVAL + ["--stage", "bld"], "already holds the metrics"),
]


def assert_one_line_error(r, expect=""):
    assert r.returncode != 0, r.stdout[-1500:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert ERROR_LINE.match(last), r.stderr[-2000:]
    assert expect in last, (expect, last)


def bar_draws(stderr: str, desc: str) -> list[re.Match]:
    """Every state a tqdm bar named desc drew on stderr ("desc:  33%|###   | 1/3 [...]")."""
    return list(re.finditer(rf"{re.escape(desc)}: +\d+%\|[^|\r\n]*\| (\d+)/(\d+) ", stderr))


def assert_nothing_finished_changed(before, after):
    """Every file that was there is unchanged; new files are resume states (and 01's unfinished <out>.partial/)."""
    assert [p for p in before if after.get(p) != before[p]] == []
    assert [p for p in after if p not in before and ".state/" not in p and ".partial/" not in p] == []


def assert_states_whole_and_finite(d):
    for state_dir in (os.path.join(d, n) for n in os.listdir(d) if n.endswith(".state")):
        for sub in [state_dir] + [os.path.join(state_dir, s) for s in os.listdir(state_dir) if s.startswith("rank")]:
            for path in finished_states(sub):
                st = load_state(path)
                assert all(torch.isfinite(t).all() for t in st["model"].values()), path


# ----------------------------------------------------------------------------
# Kill -9 in the middle of a save, then: a fresh run refuses the stale states, a resume with other arguments
# refuses, a resume with the same arguments finishes with the whole history. One row per training stage.


def load(path):
    with open(path) as f:
        return json.load(f)


@dataclass
class Stateful:
    script: str
    args: list          # a run of >= 3 optimizer steps that saves a state after each (the 2nd save is cut off)
    out: str
    metrics: str
    record: Callable    # record(d, out, metrics) -> (per-step losses, other numbers) of the finished run
    steps: int          # optimizer steps of the whole run
    shard: str = ""     # where the states of rank 0 live under <out>.state/
    bar: str = ""       # the training loop's progress bar (its description), shown at the resumed step

    @property
    def id(self):
        return "kill9-" + self.script.removesuffix(".py")


STATEFUL = [
    Stateful("01_bld.py", BLD + ["--num-seqs", "12", "--save-every", "1", "--metrics-name", "bld_k"], "lib_k", "bld_k",
             lambda d, out, m: (load(f"{d}/{out}/library.json")["variants"][2]["loss_curve"], {}), 3, shard="rank0",
             bar="BLD"),
    Stateful("04_distill.py", KD + ["--save-every", "1", "--metrics-name", "kd_k"], "kd_k", "kd_k",
             lambda d, out, m: ([h["loss"] for h in load(f"{d}/metrics/{m}.json")["history"]], {}), 3, bar="kd"),
    Stateful("05_sft.py", SFT + ["--save-every", "1", "--metrics-name", "sft_k"], "sft_k", "sft_k",
             lambda d, out, m: ([h["loss"] for h in load(f"{d}/{out}/meta.json")["history"]],
                                {"train_tokens": load(f"{d}/metrics/{m}.json")["train_tokens"]}), 6, bar="SFT stage 1"),
    # GRPO: a random tiny policy earns equal rewards (no update), so the record is what was sampled per step
    Stateful("06_grpo.py", GRPO + ["--save-every", "1", "--metrics-name", "grpo_k"], "grpo_k", "grpo_k",
             lambda d, out, m: ([h["completion_tokens"] for h in load(f"{d}/{out}/meta.json")["history"]],
                                {"prompts": [h["prompt_ids"] for h in load(f"{d}/{out}/meta.json")["history"]]}), 3),
]


def kill_then_resume(world, d, s):
    """The whole story of one stage, observed for the test to check; and the same run uninterrupted."""
    d = case_dir(world, d)
    args, shard = [s.script, *s.args], os.path.join(f"{d}/{s.out}.state", s.shard)
    obs = {"d": d, "killed": run(args, d, out=s.out, kill_at_save=2)}  # the 2nd save is cut off
    obs["finished"] = [os.path.basename(p) for p in finished_states(shard)]
    obs["cut_off"] = [n for n in os.listdir(shard) if ".tmp-" in n] if os.path.isdir(shard) else []
    obs["nothing_final"] = not os.path.exists(f"{d}/{s.out}") and not os.path.exists(f"{d}/metrics/{s.metrics}.json")
    before = snapshot(d)
    obs["fresh"] = run(args, d, out=s.out)  # a new run into the same --out: the states are another run's
    obs["other"] = run(args + ["--seed", "1", "--resume"], d, out=s.out)  # a resume whose arguments differ
    obs["unchanged"] = snapshot(d) == before
    obs["resumed"] = run(args + ["--resume"], d, out=s.out)
    obs["states_gone"] = not os.path.exists(f"{d}/{s.out}.state")
    obs["record"] = s.record(d, s.out, s.metrics) if obs["resumed"].returncode == 0 else None
    ref = run(args + ["--metrics-name", "ref"], d, out="ref")
    obs["reference"] = s.record(d, "ref", "ref") if ref.returncode == 0 else ref.stderr[-2000:]
    return obs


# ----------------------------------------------------------------------------
# Every case and every story in one pool; the tests check what was observed


def selected_ids(session) -> set:
    """The ids of the cases and stories the tests selected in this run (-k, -m, a node id) need."""
    ids = set()
    for item in session.items:
        if item.module.__name__ == __name__ and hasattr(item, "callspec"):
            ids.update(getattr(v, "id", v) for v in item.callspec.params.values())
    return ids


@pytest.fixture(scope="module")
def results(world, tmp_path_factory, request):
    """Every selected case and kill story, two at a time (the long stories first): {id: what was observed}."""
    root, wanted = str(tmp_path_factory.mktemp("cases")), selected_ids(request.session)

    def one(case):
        d = case_dir(world, os.path.join(root, case.id))
        if case.setup:
            case.setup(d)
        before = snapshot(d)
        r = run([case.script, *case.args], d)
        return d, before, r, snapshot(d)

    jobs = [(s.id, lambda s=s: kill_then_resume(world, os.path.join(root, s.id), s)) for s in STATEFUL if s.id in wanted]
    jobs += [(c.id, lambda c=c: one(c)) for c in CASES if c.id in wanted]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [(name, pool.submit(job)) for name, job in jobs]
        return {name: f.result() for name, f in futures}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fault_gives_one_line_error_and_changes_nothing(results, case):
    d, before, r, after = results[case.id]
    assert_one_line_error(r, case.expect.replace("{d}", d))
    assert_nothing_finished_changed(before, after)
    assert_states_whole_and_finite(d)  # a state saved before a NaN step holds no NaN


@pytest.mark.parametrize("case_id, bar", [("01_bld-nan-loss", "BLD"), ("04_distill-nan-loss", "kd"),
                                          ("05_sft-nan-loss", "SFT stage 1")])
@pytest.mark.slow
def test_nan_mid_training_closes_the_progress_bar_before_the_error(results, case_id, bar):
    """The training loop's bar is on screen when the NaN stops it; its last state is drawn before the error line."""
    r = results[case_id][2]
    draws = bar_draws(r.stderr, bar)
    assert draws and draws[-1].start() < r.stderr.rindex("error: "), r.stderr[-2000:]
    assert_one_line_error(r)


@pytest.mark.slow
@pytest.mark.parametrize("s", STATEFUL, ids=lambda s: s.id)
def test_kill9_mid_save_then_stale_states_refused_and_resume_completes(results, s):
    obs = results[s.id]
    assert obs["killed"].returncode == -9, obs["killed"].stderr[-2000:]
    assert obs["finished"] == ["step-000001"] and obs["cut_off"]  # the cut-off save never counts as a state
    assert_states_whole_and_finite(obs["d"])
    assert obs["nothing_final"]
    assert_one_line_error(obs["fresh"], "holds resume states of an earlier run")
    assert_one_line_error(obs["other"], "--seed 0 there, 1 now")
    assert obs["unchanged"]
    assert obs["resumed"].returncode == 0, obs["resumed"].stderr[-3000:]
    assert obs["states_gone"]
    if s.bar:  # the resumed run's bar starts at the step of its state, not at 0
        assert [m.group(1) for m in bar_draws(obs["resumed"].stderr, s.bar)][:1] == ["1"], obs["resumed"].stderr[-2000:]
    assert not isinstance(obs["reference"], str), obs["reference"]  # the uninterrupted run's stderr, had it failed
    (losses, other), (ref_losses, ref_other) = obs["record"], obs["reference"]
    assert len(losses) == s.steps and other == ref_other  # the history and counts from before the kill were kept
    assert losses == pytest.approx(ref_losses, rel=1e-5)  # and the run continued as if never stopped


def test_run_states_keep_the_newest_and_let_only_budget_flags_change(tmp_path):
    from common.checkpoint import CheckpointError
    from common.resume import RunStates
    out, args = str(tmp_path / "run"), {"seed": 0, "lr": 1e-3, "max_steps": 10, "threads": 2}
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    states = RunStates(out, args, resume=False, budget_keys=("max_steps",), keep=3)
    for step in range(1, 6):
        states.save(step, model, optimizer, history_json="[]")
    assert [os.path.basename(p) for p in finished_states(out + ".state")] == ["step-000003", "step-000004",
                                                                              "step-000005"]
    # what a kill -9 can leave: a save cut off after its COMPLETED, before the rename; a prune cut off mid-delete
    for leftover in ("step-000009.tmp-123", ".trash-step-000002-123"):
        os.makedirs(f"{out}.state/{leftover}")
        open(f"{out}.state/{leftover}/COMPLETED", "w").close()
    assert states.latest().endswith("step-000005")
    more = RunStates(out, {**args, "max_steps": 20, "lr": 1e-4, "threads": 1}, resume=True, budget_keys=("max_steps",))
    assert more.load(model, optimizer)["step"] == 5
    more.save(6, model, optimizer, history_json="[]")  # the first save of a process clears the leftovers
    assert sorted(os.listdir(out + ".state")) == ["args.json", "step-000004", "step-000005", "step-000006"]
    with pytest.raises(CheckpointError, match=r"--seed 0 there, 1 now\); .*only --lr, --max-steps may change"):
        RunStates(out, {**args, "seed": 1}, resume=True, budget_keys=("max_steps",))
    with pytest.raises(CheckpointError, match="pass --resume to continue that run, or delete"):
        RunStates(out, args, resume=False)
