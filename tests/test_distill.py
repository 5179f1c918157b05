"""04_distill.py: KD losses, training steps, two-process DDP, resume, NaN handling, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from _stage import run_stage
from conftest import ROOT, tiny_model, tiny_tokenizer

from common.checkpoint import is_complete, load_checkpoint, read_json, save_checkpoint
from common.losses import kd_loss
from common.model import DeciLMForCausalLM


def hand_made_child(parent, no_attention):
    cfg = parent.config.to_dict()
    blocks = [b.to_dict() for b in parent.config.block_configs]
    for i in no_attention:
        blocks[i]["attention"] = {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False}
    cfg["block_configs"] = blocks
    child = DeciLMForCausalLM(type(parent.config).from_dict(cfg))
    sd = parent.state_dict()
    child.load_state_dict({k: sd[k] for k in child.state_dict()})
    return child.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny parent, a child without attention in two layers (meta 'parent' -> parent), a jsonl text file."""
    d = tmp_path_factory.mktemp("kd")
    tok = tiny_tokenizer()
    parent = tiny_model(num_layers=4)
    save_checkpoint(parent, tok, str(d / "parent"), stage="parent")
    # the student starts from other random weights, so every KD loss has room to fall
    save_checkpoint(hand_made_child(tiny_model(seed=1, num_layers=4), [1, 2]), tok, str(d / "child"), stage="child",
                    meta={"parent": str(d / "parent")})
    from pydoc_data.topics import topics
    with open(d / "text.jsonl", "w") as f:
        for name in ("assignment", "if", "while", "for", "try", "with", "function", "class"):
            f.write(json.dumps({"text": topics[name][:400]}) + "\n")
    return d


def argv(d, out, *extra):
    return ["--student", str(d / "child"), "--out", str(d / out), "--data", str(d / "text.jsonl"), "--seq-len", "32",
            "--batch-size", "2", "--grad-accum", "2", "--dtype", "float32", "--eval-tokens", "0",
            "--wandb-mode", "disabled", "--threads", "1", *extra]


def distill(d, out, *extra) -> dict:
    """`python 04_distill.py` with argv(d, out, *extra), in this process: the script's globals (`history` is the
    loss curve of a KD run)."""
    return run_stage("04_distill.py", argv(d, out, *extra))


def test_each_kd_loss_is_zero_for_identical_teacher_and_student():
    m = tiny_model(num_layers=3)
    ids = torch.randint(3, 512, (2, 12))
    with torch.no_grad():
        out = m(ids, output_hidden_states=True)
        for name in ("fkl", "rkl", "cosine"):
            for pairs in (None, [(1, 1), (2, 2), (3, 3)]):
                loss, _ = kd_loss(out, out, {name: 1.0}, ids, temperature=2.0, layer_pairs=pairs)
                assert abs(loss.item()) < 1e-5, name


@pytest.mark.parametrize("loss", ["fkl", "rkl", "cosine", "lm", "cosine,fkl"])
def test_each_kd_loss_decreases_in_a_few_steps(ckpts, loss):
    hist = distill(ckpts, f"dec-{loss}", "--loss", loss, "--max-steps", "8", "--lr", "1e-3",
                   "--warmup-frac", "0", "--save-every", "-1", "--metrics-name", f"dec-{loss}")["history"]
    assert len(hist) == 8 and hist[-1]["loss"] < 0.97 * hist[0]["loss"], [h["loss"] for h in hist]
    assert all(k in hist[0] for k in loss.split(","))


def test_distilled_checkpoint_records_parent_and_metrics(ckpts):
    distill(ckpts, "full", "--max-steps", "2", "--eval-tokens", "64", "--cpt-tokens", "128",
            "--metrics-name", "full")
    meta = read_json(str(ckpts / "full" / "meta.json"))
    assert meta["parent"] == str(ckpts / "parent") and meta["layer_map"] == [0, 1, 2, 3]
    m = read_json(str(ckpts / "metrics" / "full.json"))
    assert [h["phase"] for h in m["history"]] == ["kd", "kd", "cpt"]  # 128 CPT tokens = one step
    assert 0 < m["retention"]["after"] and m["retention"]["after_se"] >= 0 and m["before"]["next_token_acc"] >= 0
    model, _ = load_checkpoint(str(ckpts / "full"))
    assert model.config.num_hidden_layers == 4
    with pytest.raises(SystemExit, match="already a finished checkpoint"):
        distill(ckpts, "full", "--max-steps", "2")


def test_loss_ablation_rows_carry_se_and_paired_gaps_to_the_lowest_kl_row(ckpts, capsys):
    distill(ckpts, "abl", "--loss-ablation", "lm;fkl", "--max-steps", "2", "--lr", "1e-3",
            "--eval-tokens", "128", "--metrics-name", "abl")
    m = read_json(str(ckpts / "metrics" / "abl.json"))
    table = m["table"]
    assert [r["loss"] for r in table] == ["none (no uptraining)", "lm", "fkl"]
    best = min(table, key=lambda r: r["kl_parent"])
    assert m["best"] == best["loss"] and not any(best["vs_best"][k] for k in best["vs_best"])  # 0, 0, False
    for r in table:
        assert len(r["per_seq"]["kl_parent"]) == 4 and r["kl_parent_se"] > 0 and r["next_token_acc_se"] >= 0
        g = r["vs_best"]
        assert g["kl_parent"] == pytest.approx(r["kl_parent"] - best["kl_parent"]) and g["kl_parent"] >= 0
        for k in ("kl_parent", "next_token_acc"):
            assert g[f"{k}_beyond_2se"] == (abs(g[k]) > 2 * g[f"{k}_se"])
    out = capsys.readouterr().out
    assert "| gap > 2 SE |" in out and out.count("| best |") == 1 and " ± " in out


def test_resume_reproduces_the_uninterrupted_loss_curve_and_nan_keeps_last_good_state(ckpts):
    common = ["--max-steps", "6", "--save-every", "2", "--lr", "1e-3"]
    ref = distill(ckpts, "ref", *common, "--metrics-name", "ref")["history"]
    # a NaN at step 3 stops the run without writing the checkpoint; states after steps 2 survive
    with pytest.raises(SystemExit, match="loss is nan at kd step 3 .last good state: .*step-000002.*--resume"):
        distill(ckpts, "int", *common, "--debug-nan-step", "3", "--metrics-name", "int")
    assert not os.path.exists(ckpts / "int") and is_complete(str(ckpts / "int.state" / "step-000002"))
    resumed = distill(ckpts, "int", *common, "--resume", "--metrics-name", "int")["history"]
    assert [h["step"] for h in resumed] == list(range(6))
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in ref], rel=1e-5)
    a, _ = load_checkpoint(str(ckpts / "ref"), with_tokenizer=False)
    b, _ = load_checkpoint(str(ckpts / "int"), with_tokenizer=False)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_reset_optimizer_resumes_with_fresh_moments(ckpts):
    common = ["--max-steps", "4", "--save-every", "2", "--lr", "1e-3"]
    with pytest.raises(SystemExit):
        distill(ckpts, "rst", *common, "--debug-nan-step", "2", "--metrics-name", "rst")
    hist = distill(ckpts, "rst", *common, "--resume", "--reset-optimizer", "--metrics-name", "rst")["history"]
    assert len(hist) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)


@pytest.fixture(scope="module")
def one_process(ckpts):
    return distill(ckpts, "one", "--max-steps", "3", "--lr", "1e-3", "--save-every", "-1",
                   "--metrics-name", "one")["history"]


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_two_process_gloo_matches_one_process_with_doubled_accumulation(ckpts, one_process, wrapper):
    two_args = argv(ckpts, f"two_{wrapper}", "--max-steps", "3", "--lr", "1e-3", "--save-every", "-1",
                    "--metrics-name", f"two_{wrapper}", *(["--fsdp"] if wrapper == "fsdp" else []))
    two_args[two_args.index("--grad-accum") + 1] = "1"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "04_distill.py"), *two_args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    two = read_json(str(ckpts / "metrics" / f"two_{wrapper}.json"))
    assert two["world_size"] == 2
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in one_process], rel=1e-4)
    a, _ = load_checkpoint(str(ckpts / "one"), with_tokenizer=False)
    b, _ = load_checkpoint(str(ckpts / f"two_{wrapper}"), with_tokenizer=False)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bad_input_exits_with_one_line(ckpts, tmp_path):
    with pytest.raises(SystemExit, match="error: .*does not exist"):
        distill(ckpts, "bad", "--student", str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match="unknown loss 'mse'"):
        distill(ckpts, "bad", "--loss", "mse")
    with pytest.raises(SystemExit, match="no finished state"):
        distill(ckpts, "bad", "--resume")
