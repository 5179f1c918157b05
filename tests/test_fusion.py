"""03_ffn_fusion.py (its math: common/ffn_fusion.py): fusion equals the parallel sum, groups from the dependency
map, the fused checkpoint."""

import os

import pytest
import torch
from _stage import run_stage
from conftest import tiny_model

from common import ffn_fusion
from common.model import DeciLMForCausalLM


def hand_made_child(parent: DeciLMForCausalLM, no_attention: list[int], ffn_mults: dict | None = None):
    """The parent with attention removed in some layers; FFNs given another width keep their random init."""
    cfg = parent.config.to_dict()
    blocks = [b.to_dict() for b in parent.config.block_configs]
    for i in no_attention:
        blocks[i]["attention"] = {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False}
    for i, m in (ffn_mults or {}).items():
        blocks[i]["ffn"]["ffn_mult"] = m
    cfg["block_configs"] = blocks
    child = DeciLMForCausalLM(type(parent.config).from_dict(cfg))
    sd = parent.state_dict()
    own = child.state_dict()
    child.load_state_dict({k: sd[k] if sd[k].shape == v.shape else v for k, v in own.items()})
    return child.eval()


def randomize_norms(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layernorm" in n:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))


def test_fused_block_equals_parallel_sum():
    child = hand_made_child(tiny_model(num_layers=6), [1, 2, 3, 4], ffn_mults={2: 12.0})  # widths 256, 512, 256, 256
    randomize_norms(child)
    fused, layer_map = ffn_fusion.fuse_ffn_blocks(child, [[1, 2, 3, 4]])
    assert fused.config.num_hidden_layers == 3 and layer_map == [0, 4, 5]
    b = fused.config.block_configs[1]
    assert b.attention.no_op and fused.config.intermediate_size(1) == 256 * 5
    assert torch.equal(fused.model.layers[1].post_attention_layernorm.weight, torch.ones(64))
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        parallel = x + sum(child.model.layers[i].ffn_delta(x) for i in (1, 2, 3, 4))
        out = fused.model.layers[1](x)
    assert (out - parallel).abs().max().item() < 1e-5 * parallel.abs().max().item()
    # untouched layers are copied exactly
    assert torch.equal(fused.model.layers[2].mlp.up_proj.weight, child.model.layers[5].mlp.up_proj.weight)


def test_runs_look_through_removed_layers_and_fuse_across_them():
    """A layer Puzzle removed whole is the identity: FFN-only blocks on both sides of it form one run, and fusing
    them drops it (x + f1(x) + f3(x))."""
    child = hand_made_child(tiny_model(num_layers=5), [1, 2, 3])
    blocks = [b.to_dict() for b in child.config.block_configs]
    blocks[2]["ffn"] = {"ffn_mult": None, "no_op": True, "replace_with_linear": False}
    cfg = child.config.to_dict()
    cfg["block_configs"] = blocks
    gapped = DeciLMForCausalLM(type(child.config).from_dict(cfg))
    gapped.load_state_dict({k: v for k, v in child.state_dict().items() if not k.startswith("model.layers.2.")},
                           strict=False)
    gapped.eval()
    assert ffn_fusion.attention_free_runs(gapped.config) == [[1, 3]]
    fused, layer_map = ffn_fusion.fuse_ffn_blocks(gapped, [[1, 3]])
    assert fused.config.num_hidden_layers == 3 and layer_map == [0, 3, 4]
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        parallel = x + gapped.model.layers[1].ffn_delta(x) + gapped.model.layers[3].ffn_delta(x)
        out = fused.model.layers[1](x)
    assert (out - parallel).abs().max().item() < 1e-5 * parallel.abs().max().item()
    with pytest.raises(ValueError, match="not a run"):
        ffn_fusion.fuse_ffn_blocks(child, [[1, 3]])  # layer 2 between them is FFN-only, not removed: no


def test_attention_free_runs_and_depth():
    child = hand_made_child(tiny_model(num_layers=7), [1, 2, 4, 5, 6])
    assert ffn_fusion.attention_free_runs(child.config) == [[1, 2], [4, 5, 6]]
    assert ffn_fusion.sequential_depth(child.config) == 7 + 2


def test_merge_path_follows_dependency_map():
    dep = torch.zeros(5, 5)
    dep[0, 1], dep[1, 2], dep[0, 2], dep[2, 3], dep[1, 3], dep[0, 3] = 0.5, 0.1, 0.2, 0.05, 0.3, 0.6
    path = ffn_fusion.merge_path([[0, 1, 2, 3]], dep)
    assert [g for _, g in path] == [[[2, 3]], [[1, 2, 3]], [[0, 1, 2, 3]]]  # cheapest pair first
    assert [round(c, 3) for c, _ in path] == [0.05, 0.3, 0.6]
    assert ffn_fusion.ffn_fusion_groups(path, 10, threshold=0.35) == (2, [[1, 2, 3]])
    assert ffn_fusion.ffn_fusion_groups(path, 10, target_depth=9) == (1, [[2, 3]])
    assert ffn_fusion.ffn_fusion_groups(path, 10) == (3, [[0, 1, 2, 3]])
    assert ffn_fusion.merge_path([[0, 1, 2, 3]], dep, max_group_size=2)[-1][1] == [[0, 1], [2, 3]]


def test_dependency_map_is_zero_for_independent_blocks():
    child = hand_made_child(tiny_model(num_layers=4), [1, 2])
    with torch.no_grad():  # block 1 contributes nothing: removing it cannot change block 2
        child.model.layers[1].mlp.down_proj.weight.zero_()
    dep = ffn_fusion.dependency_map(child, torch.randint(3, 512, (2, 16)))
    assert dep.shape == (4, 4) and dep[1, 2].item() < 1e-6 and dep[0, 1].item() > 1e-4
    assert torch.all(torch.tril(dep) == 0)


def test_fused_model_logits_match_parallel_reference():
    """Whole model: the fused checkpoint computes exactly the parallel form of its groups."""
    child = hand_made_child(tiny_model(num_layers=5), [1, 2, 3])
    randomize_norms(child)
    fused, _ = ffn_fusion.fuse_ffn_blocks(child, [[1, 2, 3]])
    ids = torch.randint(3, 512, (2, 11))
    with torch.no_grad():
        m = child.model
        x = m.embed_tokens(ids)
        rope = m.rotary_emb(x, torch.arange(11)[None].expand(2, -1))
        x = m.layers[0](x, rope)
        x = x + sum(m.layers[i].ffn_delta(x) for i in (1, 2, 3))
        x = m.layers[4](x, rope)
        ref = child.lm_head(m.norm(x))
        diff = (fused(ids).logits - ref).abs().max().item()
    assert diff < 1e-4


@pytest.mark.slow
def test_fused_checkpoint_reloads_generates_and_has_the_depth_fusion_json_says(tmp_path):
    from conftest import tiny_tokenizer

    from common.checkpoint import load_checkpoint, read_json, save_checkpoint
    tok = tiny_tokenizer()
    parent = tiny_model(num_layers=6)
    save_checkpoint(parent, tok, str(tmp_path / "parent"), stage="parent")
    save_checkpoint(hand_made_child(parent, [1, 2, 3, 5]), tok, str(tmp_path / "child"), stage="child",
                    meta={"parent": str(tmp_path / "parent")})
    args = ["--child", str(tmp_path / "child"), "--out", str(tmp_path / "fused"), "--calib-tokens", "64",
            "--seq-len", "32", "--eval-tokens", "128", "--levels", "3", "--speed-new-tokens", "3",
            "--speed-prefill", "2x16", "--wandb-mode", "disabled", "--threads", "1"]
    metrics = run_stage("03_ffn_fusion.py", args)["metrics"]
    fusion = read_json(str(tmp_path / "fused" / "fusion.json"))
    assert fusion["runs"] == [[1, 2, 3]] and fusion["groups"] == [[1, 2, 3]]  # default: fuse whole runs
    assert fusion["depth_before"] == 6 + 2 and fusion["depth_after"] == 6 + 2 - 2
    assert os.path.isfile(tmp_path / "fused" / "dependency_map.png")
    assert metrics["speed"]["ratio"]["decode_tok_s_b1"] > 0 and len(metrics["levels"]) == 3
    unfused = metrics["levels"][0]  # each level: ± SE over the 4 chunks, paired difference vs the unfused child
    assert unfused["merges"] == 0 and not any(unfused["vs_unfused"].values())
    for lv in metrics["levels"]:
        assert lv["kl_parent_se"] >= 0 and len(lv["per_seq"]["next_token_acc"]) == 4
        g = lv["vs_unfused"]
        assert g["kl_parent"] == pytest.approx(lv["kl_parent"] - unfused["kl_parent"], abs=1e-9)
        assert g["next_token_acc_beyond_2se"] == (abs(g["next_token_acc"]) > 2 * g["next_token_acc_se"])
    fused, _ = load_checkpoint(str(tmp_path / "fused"))
    assert fused.config.num_hidden_layers == 4
    calls = []  # measured sequential depth: subblock modules executed in one forward
    for layer in fused.model.layers:
        for mod in (layer.self_attn, layer.mlp):
            if mod is not None:
                mod.register_forward_hook(lambda *a: calls.append(1))
    ids = tok("The assignment statement", return_tensors="pt").input_ids
    with torch.no_grad():
        fused(ids)
        assert len(calls) == fusion["depth_after"] == metrics["depth_after"]
        out = fused.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=2)
    assert out.shape[1] == ids.shape[1] + 5
    with pytest.raises(SystemExit, match="already a finished checkpoint"):
        run_stage("03_ffn_fusion.py", args)
    assert metrics["report"][0].startswith("## 03 FFN Fusion") and "| 0 | 0 | 6 | 8 |" in "\n".join(metrics["report"])

    # 04 on the unfused child, then on the fused model, same budget: the second KD completes FFN Fusion's
    # after-training table, metrics/ffn_fusion_after_kd.json (the report knows no stage)
    with open(tmp_path / "text.jsonl", "w") as f:
        f.write("\n".join('{"text": "%s"}' % ("the assignment statement binds a name %d " % i * 8) for i in range(8)))
    kd = {}
    for name, student in (("kd_unfused", "child"), ("kd", "fused")):
        kd[name] = run_stage("04_distill.py", [
            "--student", str(tmp_path / student), "--out", str(tmp_path / name), "--data", str(tmp_path / "text.jsonl"),
            "--seq-len", "32", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "1", "--eval-tokens", "64",
            "--speed-new-tokens", "0", "--metrics-name", name, "--dtype", "float32", "--wandb-mode", "disabled",
            "--threads", "1"])["metrics"]
    assert "\n".join(kd["kd"]["report"]).startswith("## 04 Global KD: kd")
    text = "\n".join(read_json(str(tmp_path / "metrics" / "ffn_fusion_after_kd.json"))["report"])
    assert text.startswith("## 03 + 04 FFN Fusion after the same KD budget")
    assert "| unfused child | " + str(tmp_path / "child") in text and "fused − unfused KL:" in text
