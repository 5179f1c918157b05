"""Every checkpoint is a vLLM model: vLLM's greedy tokens equal ours in float32, in a process that never imports
this repo (the checkpoint ships its config code: modeling_decilm.py + auto_map).

Runs in the vLLM venv (bash install_vllm.sh; .venv-vllm/bin/python -m pytest tests/test_vllm.py); elsewhere it
skips. Three tiny random checkpoints (head_dim 64: vLLM's CPU attention has no smaller one), 24 chat prompts
(thinking on / off) x 64 greedy tokens each:
  parent        every layer the parent block (GQA 4 heads / 2 KV heads, FFN 1024), tied embeddings: stock vLLM
  stock child   no-op attention, GQA with 4 / 2 / 1 KV heads, FFN widths 1024..256, no-op FFN: stock vLLM
  linear child  linear attention and linear FFN subblocks (+ no-op attention in layer 0, GQA, no-op FFN): only
                with the repo's plugin (vllm_plugin/); stock vLLM refuses it
  window child  window attention (W 8 / 16 / 32, below prompt + generation) next to full GQA layers: the plugin serves
                it as vLLM's per-layer sliding window; stock vLLM ignores window_length and serves full attention
Two vLLM processes, run while ours generates: stock (VLLM_PLUGINS excludes ours; engines in-process) and plugin
(engine process of its own, vLLM's default); about 2.5 minutes in all on a 2-core CPU.
"""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from common.checkpoint import AUTO_MAP, MODEL_CODE, check_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from common.generate import generate  # noqa: E402
from common.model import AttentionConfig, BlockConfig, DeciLMForCausalLM, FFNConfig, parent_block  # noqa: E402
from conftest import ROOT, f32_atol, tiny_config, tiny_tokenizer  # noqa: E402

HELPER = os.path.join(ROOT, "tests", "_vllm_generate.py")
NEW_TOKENS = 64
QUESTIONS = ["What is 12 + 30?", "What is 7 x 6?", "Name a prime number.", "Spell the word assignment.",
             "What is 99 - 57?", "Is 17 odd?", "Write a number between 1 and 9.", "What is the answer?",
             "Add 5 and 8.", "Which is larger, 31 or 13?", "Repeat after me: thinking.", "Say hello."]
SPECIAL_IDS = range(4)  # tiny tokenizer: <|endoftext|> <|im_end|> (EOS) <|pad|> <|im_start|>

# vLLM's float32 logits differ from ours by more than conftest.f32_atol's few ulps: other kernels (oneDNN / MKL GEMM
# blocking, SIMD width, FMA, vLLM's attention vs SDPA, RoPE tables vs on-the-fly cos/sin) reorder every reduction,
# and the differences compound over the layers: ~sqrt(1024) ulps per reduction of <= 1024 terms, a few reductions
# in series (on this CPU: <= 30 ulps of max |logit|). ULPS = 1024 bounds that on any x86 CPU (AVX2 or AVX-512).
# Where our top-1 / top-2 logit gap is within 2 * tolerance the greedy choice is a tie either side may break: a
# sequence is compared up to such a tie, and a divergence anywhere else fails. Near ties are rare (14 of 4,608
# positions; vLLM broke none of them here) and one breaks only where the real error exceeds the gap, so at least 16
# of the 24 sequences must be equal over all 64 tokens (on this CPU: 24 of 24 for each checkpoint).
ULPS = 1024
MIN_FULL = 16


def blk(attn="full", g=None, ffn="full", m=None, w=None) -> BlockConfig:
    return BlockConfig(AttentionConfig(n_heads_in_group=g, no_op=attn == "no_op", replace_with_linear=attn == "linear",
                                       window_length=w),
                       FFNConfig(ffn_mult=m, no_op=ffn == "no_op", replace_with_linear=ffn == "linear"))


# hidden 256, 4 heads (head_dim 64): ffn_mult 6.0 / 4.5 / 3.0 / 1.5 are FFN widths 1024 / 768 / 512 / 256
MODELS = {
    "parent": (True, [parent_block(2, 6.0)] * 4),
    "stock_child": (False, [blk(g=1, m=6.0), blk("no_op", m=3.0), blk(g=4, m=1.5), blk(g=2, ffn="no_op"),
                            blk("no_op", ffn="no_op"), blk(g=2, m=4.5)]),
    "linear_child": (False, [blk("no_op", m=3.0), blk("linear", m=6.0), blk(g=2, ffn="linear"),
                             blk("linear", ffn="linear"), blk(g=4, ffn="no_op"), blk(g=1, m=1.5)]),
    "window_child": (False, [blk(g=2, m=6.0, w=16), blk(g=1, m=3.0), blk(g=4, m=1.5, w=8), blk(g=2, m=4.5, w=32),
                             blk(g=2, m=6.0)]),
}
STOCK, PLUGIN = ("parent", "stock_child"), ("linear_child", "window_child")
WINDOWS_IGNORED = "window_child_in_stock"  # the window child's checkpoint in stock vLLM, which ignores window_length


def served_model(name: str, seed: int, full_attention: bool = False) -> DeciLMForCausalLM:
    """A tiny random model whose greedy tokens are far from ties: each layer matrix N(0, 4 / fan_in) makes the layers,
    not the input embedding, decide the next token, so greedy text is varied; embeddings and output rows N(0, 1) give
    logits of std ~16, whose top-2 gaps dwarf float32 error; special tokens' output rows are zero, so their logit (0)
    never beats the largest of ~500 Gaussian logits and every sequence runs the full 64 tokens. full_attention: the
    same model with its windows removed (what stock vLLM computes from a window checkpoint)."""
    tied, blocks = MODELS[name]
    if full_attention:  # the same weights with every window removed
        blocks = [BlockConfig(AttentionConfig(**{**b.attention.__dict__, "window_length": None}), b.ffn) for b in blocks]
    config = tiny_config(num_layers=len(blocks), hidden=256, heads=4, blocks=blocks)
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    model = DeciLMForCausalLM(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 2:
                std = 1.0 if "embed_tokens" in pname or "lm_head" in pname else 2.0 / math.sqrt(p.shape[1])
                p.normal_(0.0, std)
        model.lm_head.weight[list(SPECIAL_IDS)] = 0.0  # tied: the embedding rows too
    return model


def prompts(tok) -> list[str]:
    return [tok.apply_chat_template([{"role": "system", "content": f"detailed thinking {mode}"},
                                     {"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for mode in ("on", "off") for q in QUESTIONS]


def start_helper(spec: dict, tmp, tag: str, plugins: str | None, engine_process: bool):
    """_vllm_generate.py in a fresh `python -I` (no repo on sys.path, cwd outside the repo), in the background.
    engine_process=False runs vLLM's engine in that process (VLLM_ENABLE_V1_MULTIPROCESSING=0: starts in ~3 s instead
    of ~15 s here); True is vLLM's default, an engine process of its own (where the plugin must load again)."""
    spec_path, out_path = tmp / f"{tag}_spec.json", tmp / f"{tag}_out.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp / f"{tag}_hf_modules"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if engine_process else "0"
    log = open(tmp / f"{tag}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-I", HELPER, str(spec_path), str(out_path)], cwd=tmp, env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    return tag, proc, log, out_path


def finish_helper(started) -> dict:
    tag, proc, log, out_path = started
    try:
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    if rc != 0:
        pytest.fail(f"{tag} vLLM run failed (rc {rc}):\n{log.read()[-8000:]}")
    return json.loads(out_path.read_text())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Our greedy tokens and logits, and vLLM's tokens and logprobs, for the three checkpoints."""
    tmp = tmp_path_factory.mktemp("vllm")
    tok = tiny_tokenizer()
    texts = prompts(tok)
    models = {name: served_model(name, seed) for seed, name in enumerate(MODELS)}
    paths = {name: save_checkpoint(m, tok, str(tmp / name), stage="test") for name, m in models.items()}
    models["window_child_full"] = served_model("window_child", list(MODELS).index("window_child"), full_attention=True)
    spec = {"prompts": texts, "max_tokens": NEW_TOKENS, "logprobs": 2}
    # stock vLLM: VLLM_PLUGINS names no installed plugin, so none of the vllm.general_plugins load (ours included).
    # The plugin runs as users serve: its engine in a process of its own. Both run while we generate.
    stock = start_helper({**spec, "models": [{"name": n, "path": paths[n]} for n in STOCK]
                          + [{"name": WINDOWS_IGNORED, "path": paths["window_child"]}],
                          "refused": [{"name": n, "path": paths[n]} for n in PLUGIN]}, tmp, "stock", "none", False)
    plugin = start_helper({**spec, "models": [{"name": n, "path": paths[n]} for n in PLUGIN]}, tmp, "plugin", None,
                          True)
    ours = {}
    prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    for name, model in models.items():
        outs = generate(model, tok, texts, max_new_tokens=NEW_TOKENS, batch_size=len(texts), return_ids=True)
        ids = [o[0][1] for o in outs]
        with torch.no_grad():  # the logits at each generated position (teacher-forced on our own tokens)
            logits = [model(torch.tensor([p + g])).logits[0, len(p) - 1:len(p) - 1 + len(g)].float()
                      for p, g in zip(prompt_ids, ids)]
        ours[name] = {"path": paths.get(name), "ids": ids, "prompt_ids": prompt_ids, "logits": logits}
    stock, plugin = finish_helper(stock), finish_helper(plugin)
    return {"ours": ours, "stock": stock, "plugin": plugin, "vllm": {**stock["models"], **plugin["models"]}}


def compare(ours: dict, theirs: dict) -> dict:
    """Token-by-token comparison of greedy sequences, up to the first tie (see ULPS)."""
    full, compared, ties, failures, max_lp_err, min_gap, near = 0, 0, 0, [], 0.0, math.inf, 0
    for i, (a, b, logits) in enumerate(zip(ours["ids"], theirs["ids"], ours["logits"])):
        tol = torch.tensor([f32_atol(row, ULPS) for row in logits])  # per position
        top = logits.topk(2, -1).values
        gap = top[:, 0] - top[:, 1]
        logprobs = torch.log_softmax(logits, -1)
        n = 0
        for t, (x, y) in enumerate(zip(a, b)):
            if x != y:
                if gap[t] <= 2 * tol[t]:
                    ties += 1
                else:
                    failures.append(f"prompt {i} token {t}: ours {x}, vLLM {y}, our top-2 gap {gap[t]:.3g} "
                                    f"> 2 x tolerance {tol[t]:.3g}")
                break
            lp = theirs["logprobs"][i][t][str(y)]
            err = abs(lp - logprobs[t, x].item())
            max_lp_err = max(max_lp_err, err / tol[t].item())
            n += 1
        compared += n
        full += n == len(a) == len(b) == NEW_TOKENS
        min_gap = min(min_gap, (gap / tol).min().item())
        near += int((gap[:n] <= 2 * tol[:n]).sum())
    return {"full": full, "compared": compared, "ties": ties, "failures": failures, "near_ties": near,
            "max_logprob_err_in_tol": max_lp_err, "min_gap_in_tol": min_gap}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_vllm_greedy_tokens_equal_ours(served, name):
    ours, theirs = served["ours"][name], served["vllm"][name]
    assert theirs["prompt_ids"] == ours["prompt_ids"], "the checkpoint's tokenizer renders other prompt ids in vLLM"
    r = compare(ours, theirs)
    distinct = len({t for ids in ours["ids"] for t in ids})
    print(f"{name}: {r['full']}/{len(ours['ids'])} sequences equal over {NEW_TOKENS} tokens ({distinct} distinct "
          f"tokens), {r['compared']} tokens compared ({r['near_ties']} near ties, {r['ties']} broken); vLLM logprob "
          f"error <= {r['max_logprob_err_in_tol']:.3g} x tolerance, smallest top-2 gap {r['min_gap_in_tol']:.3g} x "
          f"tolerance; engine start {theirs['engine_start_s']} s")
    assert not r["failures"], "vLLM's greedy tokens differ from ours:\n" + "\n".join(r["failures"])
    assert r["full"] >= MIN_FULL, f"only {r['full']} sequences equal over all {NEW_TOKENS} tokens (ties: {r['ties']})"
    # where the tokens agree, vLLM's logprob of the chosen token is ours within 2 x tolerance (logit + logsumexp)
    assert r["max_logprob_err_in_tol"] <= 2.0


@pytest.mark.slow
def test_stock_vllm_ignores_windows_the_plugin_serves_them(served):
    """Stock vLLM loads a window checkpoint without a word and attends to every token: its greedy tokens are those of
    the same weights with full attention, which differ from the window model's (the window matters here); the plugin's
    equal the window model's (test_vllm_greedy_tokens_equal_ours[window_child])."""
    ours = served["ours"]
    r = compare(ours["window_child_full"], served["stock"]["models"][WINDOWS_IGNORED])
    assert not r["failures"] and r["full"] >= MIN_FULL, r["failures"][:3]
    differ = sum(a != b for a, b in zip(ours["window_child"]["ids"], ours["window_child_full"]["ids"]))
    assert differ >= len(QUESTIONS), f"only {differ} of 24 sequences change with the windows: W too large here?"


@pytest.mark.slow
def test_vllm_runs_without_this_repo(served):
    assert not served["stock"]["common_imported"] and not served["plugin"]["common_imported"]


@pytest.mark.slow
def test_stock_vllm_refuses_linear_subblocks_the_plugin_serves_them(served):
    err = served["stock"]["refused"]["linear_child"]
    assert err is not None, "stock vLLM loaded a checkpoint with linear subblocks: is the plugin still needed?"
    assert "linear_child" in served["plugin"]["models"]


@pytest.mark.slow
def test_checkpoint_ships_its_model_code(served):
    path = served["ours"]["parent"]["path"]
    with open(os.path.join(path, MODEL_CODE)) as f, open(os.path.join(ROOT, "common", "model.py")) as g:
        assert f.read() == g.read()
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["auto_map"] == AUTO_MAP
    check_checkpoint(path)
    model, _ = load_checkpoint(path, with_tokenizer=False)  # our path: the registered class, not the shipped copy
    assert type(model) is DeciLMForCausalLM


HF_REMOTE = """
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
path, ids, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(torch.tensor(ids)).logits
save_file({"logits": logits.contiguous()}, out)
print(type(model).__module__)
"""


def interpreters():
    out = [pytest.param(sys.executable, id="vllm-venv")]
    main = os.path.join(ROOT, ".venv")  # the main venv (another transformers), where install.sh made it
    if os.path.exists(os.path.join(main, "bin", "python")) and os.path.abspath(sys.prefix) != main:
        out.append(pytest.param(os.path.join(main, "bin", "python"), id="main-venv"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("python", interpreters())
def test_plain_transformers_loads_checkpoint_with_remote_code(served, python, tmp_path):
    """AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) in a process without this repo: the shipped
    code, the same logits as ours (same code, same float32 ops: equal up to thread scheduling)."""
    from safetensors.torch import load_file

    ours = served["ours"]["linear_child"]
    ids = [p[:24] for p in ours["prompt_ids"][:2]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    res = subprocess.run([python, "-I", "-c", HF_REMOTE, ours["path"], json.dumps(ids), str(tmp_path / "l.st")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip().splitlines()[-1].startswith("transformers_modules"), res.stdout
    model, _ = load_checkpoint(ours["path"], with_tokenizer=False)
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits
    got = load_file(str(tmp_path / "l.st"))["logits"]
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_plugin_refuses_unserved_variants_naming_the_layer():
    """A block config the plugin cannot serve (window attention with sink tokens: no vLLM kernel keeps them) fails when
    vLLM reads the config, in the calling process, before an engine starts, with one line naming the layer; a window
    without sinks is served, and the KV head count skips linear attention."""
    from types import SimpleNamespace

    from decilm_vllm_plugin.config import DeciLMArchConfigConvertor, check_served

    def config(window, sinks):
        full = SimpleNamespace(attention=SimpleNamespace(no_op=False, replace_with_linear=False, n_heads_in_group=2,
                                                         window_length=window, num_sink_tokens=sinks),
                               ffn=SimpleNamespace(no_op=False, ffn_mult=6.0))
        linear = SimpleNamespace(attention=SimpleNamespace(no_op=False, replace_with_linear=True, n_heads_in_group=None),
                                 ffn=SimpleNamespace(no_op=True))
        return SimpleNamespace(num_attention_heads=4, block_configs=[linear, full])

    assert DeciLMArchConfigConvertor(config(None, None), config(None, None)).get_total_num_kv_heads() == 2
    check_served(config(4096, None).block_configs[1], 1)
    check_served(config(4096, 0).block_configs[1], 1)
    with pytest.raises(ValueError, match=r"^layer 1: attention variant num_sink_tokens=4 is not served") as e:
        DeciLMArchConfigConvertor(config(4096, 4), config(4096, 4)).convert()
    assert "\n" not in str(e.value)


def test_plugin_is_a_vllm_general_plugin():
    from importlib.metadata import entry_points

    names = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert names.get("decilm_linear") == "decilm_vllm_plugin:register"
