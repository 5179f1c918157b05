"""01_bld.py on a tiny random parent: BLD lowers every trained variant's loss, no_op scores worse than the parent
block, every (attention, FFN) pair is scored by replacing its whole layer (not by adding subblock scores), the
scoring text spans many documents, two gloo ranks build the same library as one, --resume continues where a crash
stopped; window variants start as the parent's attention and are trained and scored like the others."""

import json
import os
import subprocess
import sys

import pytest
import torch
from _stage import run_stage
from conftest import F32_EPS, ROOT, f32_atol, near_ties, tiny_model, tiny_tokenizer
from safetensors.torch import load_file

import common.bld
from common.checkpoint import save_checkpoint
from common.data import bld_documents
from common.model import parent_block
from common.puzzle import pair_key, variant_key


def make_parent(root) -> str:
    """A tiny parent (4 layers, hidden 64, 4 heads / 2 KV heads, FFN 512) with a tokenizer, and a text file."""
    path = os.path.join(root, "parent")
    if not os.path.exists(path):
        model = tiny_model(blocks=[parent_block(2, 12.0) for _ in range(4)])  # 12 * 64 * 2 / 3 = 512
        save_checkpoint(model, tiny_tokenizer(), path, stage="parent")
    text = os.path.join(root, "text.txt")
    if not os.path.exists(text):
        from common.text_corpus import distill_documents
        docs = [d.replace("\n", " ") for d in distill_documents("train")[:40]]
        with open(text, "w") as f:
            f.write("\n".join(docs) + "\n")
    return path


def bld_argv(root, out, **over):
    flags = {"--parent": os.path.join(root, "parent"), "--out": out, "--data": os.path.join(root, "text.txt"),
             "--num-seqs": 64, "--seq-len": 32, "--batch-size": 4, "--epochs": 2, "--lr": 1e-3, "--val-seqs": 4,
             "--score-seqs": 2, "--score-seq-len": 32, "--dtype": "float32", "--threads": 1, "--calib-seqs": 4,
             "--linear-init": "weights", "--save-every": -1, "--wandb-mode": "disabled", "--window-sizes": ""}
    flags.update(over)
    return [str(a) for kv in flags.items() for a in kv]


def build_library(root, name="library", **over) -> str:
    make_parent(root)
    out = os.path.join(root, name)
    if not os.path.exists(out):
        run_stage("01_bld.py", bld_argv(root, out, **over))
    return out


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("puzzle"))
    return root, build_library(root)


def read(path):
    with open(path) as f:
        return json.load(f)


def test_bld_lowers_every_trained_variants_loss(lib):
    _, out = lib
    library = read(os.path.join(out, "library.json"))
    trained = [e for e in library["variants"] if "val_loss_bld" in e]
    assert len(trained) == 4 * (2 + 2)  # per layer: attention kv1, linear; FFN w256, linear
    for e in trained:
        assert e["val_loss_bld"] < e["val_loss_init"], e["key"]
        assert len(e["loss_curve"]) == library["bld"]["steps"] == 32  # 64 seqs / batch 4 x 2 epochs
    assert library["bld"]["parent_forwards_per_batch"] == 1
    assert os.path.exists(os.path.join(out, "variants", "init", trained[0]["key"] + ".safetensors"))
    report = "\n".join(read(os.path.join(os.path.dirname(out), "metrics", "bld.json"))["report"])
    assert "## 01 Block library (BLD)" in report and "| attention:no_op | 4 |" in report  # a row per variant


def test_no_op_scores_worse_than_parent_block(lib):
    _, out = lib
    scores = read(os.path.join(out, "scores.json"))["variants"]
    for layer in range(4):
        for sub, parent_name in (("attention", "kv2"), ("ffn", "w512")):
            noop, par = scores[variant_key(layer, sub, "no_op")], scores[variant_key(layer, sub, parent_name)]
            assert noop["kl"] > par["kl"] == 0.0
            assert noop["top1_agreement"] < 1.0 == par["top1_agreement"]


def test_every_block_is_scored_by_replacing_its_whole_layer(lib):
    """A pair's score is that of the parent with the whole layer replaced, measured, not the sum of its subblocks'
    scores: removing layer 1 entirely (no_op + no_op) equals a direct KL of the parent without layer 1."""
    import torch.nn.functional as F

    from common.checkpoint import load_checkpoint
    from common.data import spread_chunks
    from common.puzzle import set_subblock
    from common.model import AttentionConfig, FFNConfig

    root, out = lib
    scores = read(os.path.join(out, "scores.json"))
    pairs, space = scores["pairs"], read(os.path.join(out, "library.json"))["space"]
    names = {s: [v["name"] for v in space[s]] for s in space}
    assert len(pairs) == 4 * len(names["attention"]) * len(names["ffn"])
    assert pairs[pair_key(0, "kv2", "w512")]["kl"] == 0.0
    parent, tok = load_checkpoint(os.path.join(root, "parent"))
    held = spread_chunks(tok, bld_documents(os.path.join(root, "text.txt"), "score"), 32, 2)
    with torch.no_grad():
        plogp = F.log_softmax(parent(held).logits.float(), -1)
        set_subblock(parent, 1, "attention", AttentionConfig(no_op=True), None)
        set_subblock(parent, 1, "ffn", FFNConfig(no_op=True), None)
        z = parent(held).logits.float()
        logp = F.log_softmax(z, -1)
    kl = (plogp.exp() * (plogp - logp)).sum(-1).mean().item()
    both = pairs[pair_key(1, "no_op", "no_op")]["kl"]
    assert both == pytest.approx(kl, rel=0, abs=f32_atol(z))
    parts = pairs[pair_key(1, "no_op", "w512")]["kl"] + pairs[pair_key(1, "kv2", "no_op")]["kl"]
    assert abs(both - parts) > 1e-3 * both  # the subblock scores do not add up to the block's
    assert scores["variants"][variant_key(1, "ffn", "no_op")] == pairs[pair_key(1, "kv2", "no_op")]


def test_scores_in_a_childs_context_are_direct_kls_to_the_parent(lib):
    """02's --rescore-rounds: a block scored alone in a child (not the parent) gets the KL to the parent of that child
    with the block swapped in, measured directly; swapping the parent's own block back in counts too."""
    import torch.nn.functional as F

    from common.checkpoint import load_checkpoint
    from common.data import spread_chunks
    from common.puzzle import assemble_child, load_library, load_variant_state, replace_one_block_scores

    root, out = lib
    library, _ = load_library(out)
    entries = {(e["layer"], e["subblock"], e["name"]): e for e in library["variants"]}
    parent, tok = load_checkpoint(os.path.join(root, "parent"))
    held = spread_chunks(tok, bld_documents(os.path.join(root, "text.txt"), "score"), 32, 2)
    own = {(l, s): ("kv2" if s == "attention" else "w512") for l in range(4) for s in ("attention", "ffn")}
    choice = {**own, (0, "attention"): "no_op", (2, "ffn"): "w256", (3, "attention"): "linear"}
    states = {e["key"]: load_variant_state(out, e, parent) for e in entries.values()}
    swaps = [{(1, "attention"): "no_op", (1, "ffn"): "linear"}, {(0, "attention"): "kv2"},
             {(2, "ffn"): "w512", (2, "attention"): "kv1"}]
    pairs = []
    for sw in swaps:
        l = next(iter(sw))[0]
        new = {**choice, **sw}
        pairs.append((l, entries[(l, "attention", new[(l, "attention")])], entries[(l, "ffn", new[(l, "ffn")])]))
    base = assemble_child(parent, out, entries, choice)
    got = replace_one_block_scores(base, held, pairs, states, 2, torch.no_grad, reference=parent, base=choice)
    # two float32 paths (one model swapped in place, chunked vocabulary passes; a fresh child, whole passes) agree to
    # float32's error on any CPU (conftest.f32_atol), not to what one CPU's kernels gave
    with torch.no_grad():
        pz = parent(held).logits.float()
        plogp = F.log_softmax(pz, -1)

        def kl(ch):
            z = assemble_child(parent, out, entries, ch)(held).logits.float()
            logp = F.log_softmax(z, -1)
            return (plogp.exp() * (plogp - logp)).sum(-1).mean().item(), max(f32_atol(z), f32_atol(pz))

        direct, tol = kl(choice)
        assert got["__base__"]["kl"] == pytest.approx(direct, rel=0, abs=tol)
        # the other scores, with vocabulary chunks that straddle sequences (5 rows) and that do not (default)
        z = base(held).logits.float()
        nll = F.cross_entropy(z[:, :-1].flatten(0, 1), held[:, 1:].flatten())
        acc = (z[:, :-1].argmax(-1) == held[:, 1:]).float().mean()
        agree = (z.argmax(-1) == plogp.argmax(-1)).float().mean()
        tol = f32_atol(z)
        flips = near_ties(z, tol) + near_ties(pz, tol)  # argmax rates may differ by the positions that can flip
        odd = replace_one_block_scores(base, held, [], states, 2, torch.no_grad, reference=parent, base=choice,
                                       chunk_rows=5)["__base__"]
        for s in (got["__base__"], odd):
            assert s["lm_loss"] == pytest.approx(nll.item(), rel=0, abs=tol)
            assert s["next_token_acc"] == pytest.approx(acc.item(), rel=0, abs=flips + F32_EPS)
            assert s["top1_agreement"] == pytest.approx(agree.item(), rel=0, abs=flips + F32_EPS)
        for (l, a, f), sw in zip(pairs, swaps):
            direct, tol = kl({**choice, **sw})
            assert got[pair_key(l, a["name"], f["name"])]["kl"] == pytest.approx(direct, rel=0, abs=tol)
    assert base(held).logits.sub(assemble_child(parent, out, entries, choice)(held).logits).abs().max() == 0  # undone


def test_scoring_chunks_spread_over_documents():
    from common.data import spread_chunks

    tok = tiny_tokenizer()
    docs = ["alpha beta gamma delta " * 40, "one two three four five " * 40, "red green blue " * 40]
    ids = spread_chunks(tok, docs, 16, 4)
    firsts = [tok(d, add_special_tokens=False)["input_ids"][:16] for d in docs]
    assert [r.tolist() for r in ids[:3]] == firsts  # the first chunk of each document before any second chunk
    with pytest.raises(ValueError, match="need 1000"):
        spread_chunks(tok, docs, 16, 1000)


def test_refuses_to_overwrite_finished_library(lib):
    root, out = lib
    with pytest.raises(SystemExit) as e:
        run_stage("01_bld.py", bld_argv(root, out))
    assert e.value.code != 0


def same_library(a, b, atol=1e-5):
    la, lb = read(os.path.join(a, "library.json")), read(os.path.join(b, "library.json"))
    assert [e["key"] for e in la["variants"]] == [e["key"] for e in lb["variants"]]
    for ea, eb in zip(la["variants"], lb["variants"]):
        if "val_loss_bld" in ea:
            assert ea["val_loss_bld"] == pytest.approx(eb["val_loss_bld"], rel=1e-4, abs=1e-6)
            wa = load_file(os.path.join(a, "variants", ea["key"] + ".safetensors"))
            wb = load_file(os.path.join(b, "variants", eb["key"] + ".safetensors"))
            for k in wa:
                torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-4)
    sa, sb = read(os.path.join(a, "scores.json"))["pairs"], read(os.path.join(b, "scores.json"))["pairs"]
    for k in sa:
        assert sa[k]["kl"] == pytest.approx(sb[k]["kl"], rel=1e-3, abs=1e-6)


@pytest.mark.slow
def test_bld_two_gloo_ranks_match_one_rank(lib):
    root, out = lib
    out2 = os.path.join(root, "library_2ranks")
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "01_bld.py")] + bld_argv(root, out2, **{"--metrics-name": "bld_2ranks"})
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read(os.path.join(out2, "library.json"))["bld"]["world_size"] == 2
    same_library(out, out2)


def test_resume_continues_where_it_stopped(lib, monkeypatch):
    root, out = lib
    out2 = os.path.join(root, "library_resumed")
    real_step, calls = common.bld.bld_step, {"n": 0}

    def crashing_step(*a, train=True, **kw):
        if train:
            calls["n"] += 1
            if calls["n"] == 4:
                raise RuntimeError("simulated crash")
        return real_step(*a, train=train, **kw)

    monkeypatch.setattr(common.bld, "bld_step", crashing_step)  # 01_bld.py imports it when it runs
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage("01_bld.py", bld_argv(root, out2, **{"--save-every": 3, "--metrics-name": "bld_resumed"}))
    assert not os.path.exists(out2) and os.path.isdir(out2 + ".state")
    monkeypatch.setattr(common.bld, "bld_step", real_step)
    run_stage("01_bld.py", bld_argv(root, out2, **{"--save-every": 3, "--metrics-name": "bld_resumed"}) + ["--resume"])
    assert not os.path.exists(out2 + ".state")
    same_library(out, out2)


# ----------------------------------------------------------------------------
# Window variants (--window-sizes): the parent attention over the last W tokens


@pytest.fixture(scope="module")
def window_lib(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("window_bld"))
    return root, build_library(root, **{"--window-sizes": "4,8", "--kv-heads": "",
                                        "--ffn-widths": ""})


def test_window_variants_start_as_the_parent_attention_and_are_trained_and_scored(window_lib):
    """A window variant's initial weights are the parent attention's (and its norm's), unchanged; it has the
    parent's parameters; at 32 tokens the window changes the output, BLD lowers that loss, and every pair with a
    window is scored by replacing its whole layer."""
    from common.checkpoint import load_checkpoint
    from common.puzzle import load_library, parent_subblock_state

    root, out = window_lib
    library, pairs = load_library(out)
    names = [v["name"] for v in library["space"]["attention"]]
    assert names == ["kv2", "kv2-win4", "kv2-win8", "linear", "no_op"]
    assert library["space"]["attention"][1]["config"] == {"n_heads_in_group": 2, "no_op": False,
                                                          "replace_with_linear": False, "window_length": 4}
    assert "window_length" not in library["space"]["attention"][0]["config"]  # other variants' configs as before
    parent, _ = load_checkpoint(os.path.join(root, "parent"))
    by_key = {e["key"]: e for e in library["variants"]}
    for layer in range(4):
        own = parent_subblock_state(parent.model.layers[layer], "attention")
        for w in (4, 8):
            e = by_key[variant_key(layer, "attention", f"kv2-win{w}")]
            init = load_file(os.path.join(out, "variants", "init", e["key"] + ".safetensors"))
            assert init.keys() == own.keys() and all(torch.equal(init[k], own[k]) for k in own)
            assert e["params"] == by_key[variant_key(layer, "attention", "kv2")]["params"]
            assert e["val_loss_init"] > 1e-3  # the window matters at --seq-len 32
            assert e["val_loss_bld"] < e["val_loss_init"], e["key"]
            for f in ("w512", "linear", "no_op"):
                assert pairs[pair_key(layer, f"kv2-win{w}", f)]["kl"] > 0
