"""04_distill.py --quant: PTQ / QAT / QAD (+ self-generated data) of a model into its own fake-quantized copy, from one
command, each row paired against the full-precision model; the saved checkpoint comes back fake-quantized."""

import pytest
import torch
from _stage import run_stage
from conftest import tiny_model, tiny_tokenizer

from common.checkpoint import load_checkpoint, read_json, save_checkpoint
from common.quant import QuantLinear
from data_gen import build


pytestmark = pytest.mark.slow  # every test reads one 04 --quant run (~20 s)


@pytest.fixture(scope="module")
def qad_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("qad")
    save_checkpoint(tiny_model(), tiny_tokenizer(), str(d / "model"), stage="rpo")
    build.main(["--out", str(d / "data"), "--math", "40", "--science", "10", "--instructions", "10",
                "--eval-math", "6", "--eval-instructions", "4"])
    run_stage("04_distill.py", [
        "--student", str(d / "model"), "--out", str(d / "qad"), "--quant", "nvfp4", "--data", str(d / "data"),
        "--quant-methods", "ptq,qat,qad,qad_self", "--seq-len", "64", "--batch-size", "2", "--grad-accum", "1",
        "--tokens", "512", "--lr", "2e-5", "--weight-decay", "0", "--eval-tokens", "256", "--eval-problems", "4",
        "--eval-if", "3", "--dtype", "float32", "--wandb-mode", "disabled", "--threads", "1",
        "--metrics-name", "qad_nvfp4"])
    return d


def test_one_command_writes_every_row_paired_against_full_precision(qad_run):
    m = read_json(str(qad_run / "metrics" / "qad_nvfp4.json"))
    rows = {r["method"]: r for r in m["table"]}
    assert list(rows) == ["bf16", "ptq", "qat", "qad", "qad_self"] and m["saved"] == "qad"
    assert m["quantized_linears"] == 28 and m["tokens_per_method"] == 512
    assert rows["bf16"]["kl_parent"] == 0.0
    for name in ("ptq", "qat", "qad", "qad_self"):
        r = rows[name]
        assert r["kl_parent"] > 0 and r["kl_parent_se"] >= 0
        for k in ("math_on", "math_off", "format_on", "format_off", "if"):
            assert f"d_{k}" in r and f"d_{k}_se" in r
        assert r["math_on_n"] == 4 and r["if_n"] == 3
    # QAD trains on exactly the KL it is evaluated by: it must end closer to the teacher than the untrained PTQ
    assert rows["qad"]["kl_parent"] < rows["ptq"]["kl_parent"]
    assert "kl_qad_over_qat" in m["findings"] and "qad_within_2se_of_bf16" in m["findings"]


def test_the_checkpoint_is_the_qad_model_rounded_and_reloads_fake_quantized(qad_run):
    meta = read_json(str(qad_run / "qad" / "meta.json"))
    assert meta["quant"]["format"] == "nvfp4" and meta["quant"]["method"] == "qad"
    assert len(meta["quant"]["act_amax"]) == 28
    model, _ = load_checkpoint(str(qad_run / "qad"))
    q = model.model.layers[1].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.fmt == "nvfp4" and q.act_amax > 0
    assert torch.equal(q.quantized_weight(), q.weight)  # stored on the grid already (its fused group's amax)
    # the full-precision input is untouched, and the quantized model differs from it
    full, _ = load_checkpoint(str(qad_run / "model"))
    ids = torch.randint(3, 512, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, full(ids).logits, atol=1e-3)


def test_bad_quant_flags_exit_with_one_line(qad_run, capsys):
    base = ["--student", str(qad_run / "model"), "--quant", "fp8", "--wandb-mode", "disabled"]
    for extra, msg in ((["--out", str(qad_run / "x1"), "--quant-methods", "ptq,gptq"], "--quant-methods"),
                       (["--out", str(qad_run / "x2"), "--quant-methods", "qad_self", "--data", "mix"], "train.jsonl"),
                       (["--out", str(qad_run / "qad")], "qad"),
                       (["--out", str(qad_run / "x3"), "--loss-ablation", "fkl;lm"], "two tables")):
        with pytest.raises(SystemExit) as e:
            run_stage("04_distill.py", base + extra)
        assert msg in str(e.value) and "\n" not in str(e.value)
    assert not (qad_run / "x1").exists()


def test_the_run_report_prints_the_stages_own_table(qad_run):
    from common.report import render
    text = render(str(qad_run))
    assert "## qad_nvfp4" in text and "| qad_self |" in text and "KL to full precision" in text
