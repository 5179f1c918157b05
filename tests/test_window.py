"""Window attention (window_length W, num_sink_tokens S; gpt-oss-puzzle's window layers, NVIDIA's keys): a query
sees the last W real tokens (itself included) and its row's first S. Equal to full attention when W covers the
sequence; equal otherwise to a plain softmax over an explicit boolean mask, in prefill and in step-by-step decoding,
for a left-padded batch too (a row attends as it would alone); the cache never holds more than S + W - 1 positions;
the config saves, loads and validates. Then the window as a Puzzle variant (common/variants.py): its KV bytes
(min(tokens, W + S) positions per sequence), parameters, initialization from the parent, its runtime measured with
its bounded cache."""

import math

import pytest
import torch
from conftest import f32_atol, tiny_config, tiny_tokenizer

from common.generate import decode, left_pad
from common.model import (Attention, AttentionConfig, BlockConfig, DeciLMConfig, DeciLMForCausalLM, FFNConfig,
                          WindowCacheLayer)

WINDOW_LAYERS = (0, 2)  # of 4: layers 1 and 3 keep full attention


def window_config(W, S=None, layers=WINDOW_LAYERS, num_layers=4):
    blocks = [BlockConfig(AttentionConfig(n_heads_in_group=2, window_length=W if i in layers else None,
                                          num_sink_tokens=S if i in layers else None), FFNConfig(ffn_mult=6.0))
              for i in range(num_layers)]
    return tiny_config(num_layers=num_layers, blocks=blocks)


def window_model(W, S=None, seed=0, **kw):
    """A tiny model with window layers, the weights of the full-attention model of the same seed."""
    torch.manual_seed(seed)
    full = DeciLMForCausalLM(tiny_config(num_layers=kw.get("num_layers", 4))).eval()
    model = DeciLMForCausalLM(window_config(W, S, **kw)).eval()
    model.load_state_dict(full.state_dict())
    return model, full


@torch.no_grad()
def reference_logits(model, ids, attention_mask=None):
    """The model's logits with every attention a plain softmax over an explicit boolean mask (B, q, k): per row, r =
    the index among the row's real tokens; key j is visible to query i when j is real, j <= i and, in a window layer,
    r_i - r_j < W or r_j < S; a padded query sees only itself. Position ids count real tokens (HF's rule)."""
    B, T = ids.shape
    real = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    r = real.long().cumsum(-1) - 1
    x = model.model.embed_tokens(ids)
    rope = model.model.rotary_emb(x, r.clamp(min=0))
    i = torch.arange(T)
    for layer, block in zip(model.model.layers, model.config.block_configs):
        attn, a = layer.self_attn, block.attention
        if isinstance(attn, Attention):
            q, k, v = attn.qkv(layer.input_layernorm(x), rope)
            rep = attn.n_heads // attn.n_kv
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            allowed = real[:, None, :] & (i[None, None, :] <= i[None, :, None])
            if a.window_length is not None:
                rq, rk = r[:, :, None], r[:, None, :]
                allowed &= (rq - rk < a.window_length) | (rk < (a.num_sink_tokens or 0))
            allowed |= torch.eye(T, dtype=torch.bool)
            s = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
            y = torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), -1) @ v
            x = x + attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        elif attn is not None:
            x = x + layer.attn_delta(x)
        if layer.mlp is not None:
            x = x + layer.ffn_delta(x)
    return model.lm_head(model.model.norm(x))


def assert_close(got, want):
    tol = f32_atol(want)
    err = (got - want).abs().max().item()
    assert err <= tol, f"max |diff| {err:.3g} > float32 tolerance {tol:.3g}"


def cached_positions(cache, layers=WINDOW_LAYERS):
    return [cache.layers[i].keys.shape[-2] for i in layers]


# ----------------------------------------------------------------------------
# Prefill


@pytest.mark.parametrize("W,S", [(20, None), (64, None), (20, 3), (500, 7)])
def test_window_covering_the_sequence_equals_full_attention(W, S):
    model, full = window_model(W, S)
    ids = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, full(ids).logits)
        g = dict(max_new_tokens=6, do_sample=False, pad_token_id=2)
        short = ids[:, :14]  # 14 + 6 = 20 tokens <= W
        assert torch.equal(model.generate(short, attention_mask=torch.ones_like(short), **g),
                           full.generate(short, attention_mask=torch.ones_like(short), **g))


@pytest.mark.parametrize("W,S", [(1, None), (4, None), (5, 2), (3, 3), (7, 1)])
def test_window_prefill_equals_explicit_masked_attention(W, S):
    model, full = window_model(W, S)
    ids = torch.randint(3, 512, (3, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(ids).logits
    assert_close(got, reference_logits(model, ids))
    assert (got - full(ids).logits).abs().max() > 1e-3  # the window matters at this length


# ----------------------------------------------------------------------------
# Cached decoding


@pytest.mark.parametrize("W,S,prefill,chunk", [(4, None, 7, 1), (5, 2, 3, 1), (5, 2, 9, 3), (1, 0, 6, 1),
                                               (6, 4, 2, 2)])
def test_window_decoding_step_by_step_equals_masked_attention(W, S, prefill, chunk):
    """Prefill some tokens, then feed the rest `chunk` at a time through the cache: every step's logits are the
    reference's at those positions, and after every step a window layer caches at most S + W - 1 positions."""
    model, _ = window_model(W, S)
    ids = torch.randint(3, 512, (2, 22), generator=torch.Generator().manual_seed(3))
    want = reference_logits(model, ids)
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True)
        cache, got = out.past_key_values, [out.logits]
        assert all(isinstance(cache.layers[i], WindowCacheLayer) for i in WINDOW_LAYERS)
        assert max(cached_positions(cache)) <= (S or 0) + W - 1
        for t in range(prefill, ids.shape[1], chunk):
            out = model(ids[:, t:t + chunk], past_key_values=cache, use_cache=True)
            got.append(out.logits)
            assert max(cached_positions(cache)) <= (S or 0) + W - 1, cached_positions(cache)
            assert cache.layers[1].keys.shape[-2] == min(t + chunk, ids.shape[1])  # a full layer keeps everything
    assert_close(torch.cat(got, 1), want)
    assert cache.get_seq_length(0) == ids.shape[1]


def padded_batch(lengths, seed=4):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]
    ids, mask = left_pad(rows, pad=2)
    return rows, ids, mask


@pytest.mark.parametrize("W,S", [(4, None), (5, 2), (3, 4)])
def test_left_padded_batch_attends_as_each_row_alone(W, S):
    """A left-padded batch (generate.py's layout: position ids count real tokens), prefilled then decoded one token at
    a time with a growing attention mask: at every real position the logits are the masked reference's and those of
    the row run alone; padding spreads the rows' sinks, so the cache holds at most S + W - 1 + (the padding spread)."""
    model, _ = window_model(W, S)
    rows, ids, mask = padded_batch([18, 11, 5])
    want = reference_logits(model, ids, mask)
    prefill = 8
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=pos[:, :prefill], use_cache=True)
        cache, got = out.past_key_values, [out.logits]
        spread = (S or 0) and int((mask == 0).sum(-1).max() - (mask == 0).sum(-1).min())
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                        past_key_values=cache, use_cache=True)
            got.append(out.logits)
            assert max(cached_positions(cache)) <= (S or 0) + W - 1 + spread, cached_positions(cache)
    got = torch.cat(got, 1)
    for b, row in enumerate(rows):
        n = len(row)
        alone = reference_logits(model, torch.tensor([row]))[0]
        assert_close(got[b, -n:], want[b, -n:])
        assert_close(want[b, -n:], alone)


@pytest.mark.parametrize("S", [None, 2])
def test_greedy_decode_of_a_padded_batch_equals_each_row_alone(S):
    """common.generate.decode (left padding, rows leave the batch at EOS): a row's tokens do not depend on the other
    rows or on its padding, also past the window."""
    model, _ = window_model(4, S)
    rows, ids, mask = padded_batch([15, 9, 4], seed=5)
    batch = decode(model, ids, mask, 12, eos=[1], pad=2)
    for b, row in enumerate(rows):
        one = decode(model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), 12, eos=[1], pad=2)
        assert batch[b].tolist() == one[0].tolist()
    # and they are the greedy tokens of the masked reference, fed back one by one
    for b, row in enumerate(rows[:1]):
        seq = list(row)
        for _ in range(12):
            seq.append(int(reference_logits(model, torch.tensor([seq]))[0, -1].argmax()))
        assert batch[b].tolist() == seq[len(row):]


# ----------------------------------------------------------------------------
# The config: saved, loaded, validated


def test_window_config_round_trips_and_writes_its_keys_only_where_set(tmp_path):
    from common.checkpoint import load_checkpoint, save_checkpoint

    model, full = window_model(5, 2)
    d = model.config.to_dict()
    assert d["block_configs"][0]["attention"] == {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False,
                                                  "window_length": 5, "num_sink_tokens": 2}
    assert "window_length" not in d["block_configs"][1]["attention"]
    assert all("window_length" not in b["attention"] and "num_sink_tokens" not in b["attention"]
               for b in full.config.to_dict()["block_configs"])  # configs without windows stay as they were
    path = save_checkpoint(model, tiny_tokenizer(), str(tmp_path / "win"), stage="test")
    loaded, _ = load_checkpoint(path, with_tokenizer=False)
    assert loaded.config.block_configs[2].attention == AttentionConfig(n_heads_in_group=2, window_length=5,
                                                                       num_sink_tokens=2)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    only_w = window_model(5)[0].config.to_dict()["block_configs"][0]["attention"]
    assert only_w["window_length"] == 5 and "num_sink_tokens" not in only_w


@pytest.mark.parametrize("attention,match", [
    ({"no_op": True, "window_length": 8}, r"layer 0: window_length=8 needs full attention"),
    ({"replace_with_linear": True, "window_length": 8}, r"layer 0: window_length=8 needs full attention"),
    ({"n_heads_in_group": 2, "window_length": 0}, r"layer 0: window_length=0 needs full attention and W >= 1"),
    ({"n_heads_in_group": 2, "num_sink_tokens": 4}, r"layer 0: num_sink_tokens=4 needs a window_length"),
    ({"n_heads_in_group": 2, "window_length": 8, "num_sink_tokens": -1}, r"layer 0: num_sink_tokens=-1 must be >= 0"),
    ({"n_heads_in_group": 2, "sliding_window": 8}, r"layer 0 attention: unknown variant key sliding_window=8"),
])
def test_bad_window_configs_fail_with_one_line_naming_the_layer(attention, match):
    blocks = [{"attention": attention, "ffn": {"ffn_mult": 6.0}}] + [
        {"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 6.0}}] * 3
    with pytest.raises(ValueError, match=match) as e:
        DeciLMConfig(**{**tiny_config().to_dict(), "block_configs": blocks})
    assert "\n" not in str(e.value)


def test_a_cache_filled_as_full_attention_is_refused_for_a_window_layer():
    from transformers.cache_utils import DynamicCache

    model, full = window_model(4)
    ids = torch.randint(3, 512, (1, 6))
    cache = full(ids, use_cache=True).past_key_values
    assert isinstance(cache, DynamicCache)
    with pytest.raises(ValueError, match="layer 0 is a window layer but its cache was filled as a full layer"):
        model(ids[:, :1], past_key_values=cache, use_cache=True)


# ----------------------------------------------------------------------------
# The window as a Puzzle variant (common/variants.py)


def test_every_variant_kind_prices_the_module_it_builds():
    """One entry per kind: its name, its parameter count (= the built module with its norm), its KV heads, and
    which vLLM serves it."""
    from common.model import num_params
    from common.puzzle import Subblock
    from common.variants import kind_of, plugin_vllm_serves, stock_vllm_serves, subblock_params, variant_name

    config = tiny_config()
    cases = [("attention", AttentionConfig(n_heads_in_group=2), "gqa", "kv2", True, True),
             ("attention", AttentionConfig(n_heads_in_group=4), "gqa", "kv1", True, True),
             ("attention", AttentionConfig(n_heads_in_group=2, window_length=8), "window", "kv2-win8", False, True),
             ("attention", AttentionConfig(n_heads_in_group=2, window_length=8, num_sink_tokens=4), "window",
              "kv2-win8-s4", False, False),
             ("attention", AttentionConfig(replace_with_linear=True), "linear", "linear", False, True),
             ("attention", AttentionConfig(no_op=True), "no_op", "no_op", True, True),
             ("ffn", FFNConfig(ffn_mult=6.0), "swiglu", "w256", True, True),
             ("ffn", FFNConfig(ffn_mult=12.0), "swiglu", "w512", True, True),
             ("ffn", FFNConfig(replace_with_linear=True), "linear", "linear", False, True),
             ("ffn", FFNConfig(no_op=True), "no_op", "no_op", True, True)]
    for sub, cfg, kind, name, stock, plugin in cases:
        assert kind_of(sub, cfg).kind == kind and variant_name(config, sub, cfg) == name
        assert subblock_params(config, sub, cfg) == num_params(Subblock(config, 1, sub, cfg)), name
        assert subblock_params(config, sub, {k: v for k, v in cfg.__dict__.items() if v is not None}) == \
            subblock_params(config, sub, cfg)  # library.json's dicts read the same
        assert stock_vllm_serves(1, sub, cfg) == stock and plugin_vllm_serves(1, sub, cfg) == plugin, name
    no_op = {"no_op": True}
    assert not stock_vllm_serves(0, "attention", no_op) and plugin_vllm_serves(0, "attention", no_op)


def test_window_kv_bytes_count_min_tokens_and_w_plus_s_positions():
    """NVIDIA Puzzletron's rule: a window layer caches min(prompt + generated, W + S) positions per sequence; full
    attention every token; linear / no-op none. The evaluation suite's per-token bytes follow it."""
    from common.evaluate import kv_cache_bytes_per_token
    from common.variants import kv_bytes, kv_cache_bytes, kv_cache_bytes_per_layer

    config = tiny_config()
    per_token = 2 * 2 * 16 * 2  # K and V, 2 KV heads x head_dim 16, bf16
    win = AttentionConfig(n_heads_in_group=2, window_length=8, num_sink_tokens=2)
    for tokens in (1, 10, 11, 1280):
        assert kv_bytes(config, "attention", win, tokens, "bf16", batch=3) == 3 * min(tokens, 10) * per_token
        assert kv_bytes(config, "attention", AttentionConfig(n_heads_in_group=2), tokens) == tokens * per_token
    assert kv_bytes(config, "attention", win, 1280, "fp8") * 2 == kv_bytes(config, "attention", win, 1280, "bf16")
    for cfg in (AttentionConfig(no_op=True), AttentionConfig(replace_with_linear=True)):
        assert kv_bytes(config, "attention", cfg, 1280) == 0
    model, full = window_model(8, 2)
    assert kv_cache_bytes_per_layer(model.config, 100) == [10 * per_token, 100 * per_token] * 2
    assert kv_cache_bytes(model.config, 4, 100) == 4 * 220 * per_token
    for tokens in (6, 100):  # float32 weights: 4-byte cache entries
        assert kv_cache_bytes_per_token(model, tokens) * tokens == pytest.approx(
            sum(kv_cache_bytes_per_layer(model.config, tokens, "fp32")))
    assert kv_cache_bytes_per_token(model) == kv_cache_bytes_per_token(full) == 4 * 2 * 2 * 16 * 4


def test_window_search_space_and_its_errors():
    from common.puzzle import attention_variants

    config = tiny_config()
    names = [v["name"] for v in attention_variants(config, [1], window_sizes=[16, 4, 16], window_sinks=2)]
    assert names == ["kv2", "kv1", "kv2-win4-s2", "kv2-win16-s2", "linear", "no_op"]
    with pytest.raises(ValueError, match="--window-sizes 0"):
        attention_variants(config, [], window_sizes=[0])
    with pytest.raises(ValueError, match="--window-sinks -1"):
        attention_variants(config, [], window_sizes=[4], window_sinks=-1)


def test_costs_time_a_window_with_its_bounded_cache(monkeypatch):
    """common/costs.py times a window variant swapped into the parent at the scenario's lengths, and every forward it
    times runs the window layers with a WindowCacheLayer of at most S + W - 1 positions (the decode cost it prices)."""
    from common import costs
    from common.model import DeciLMModel
    from common.variants import SUBBLOCKS, config_to_dict, search_space

    seen, real = [], DeciLMModel.forward

    def spy(self, *a, **kw):
        out = real(self, *a, **kw)
        for i, b in enumerate(self.config.block_configs):
            if b.attention.window_length is not None and out[1] is not None:
                layer = out[1].layers[i]
                seen.append((type(layer), layer.keys.shape[-2]))
        return out

    monkeypatch.setattr(DeciLMModel, "forward", spy)
    torch.manual_seed(0)
    parent = DeciLMForCausalLM(tiny_config()).eval()
    space = {s: [{**v, "config": config_to_dict(v["config"])} for v in search_space(
        parent.config, s, window_sizes=[4], window_sinks=1, linear=False, no_op=False)] for s in SUBBLOCKS}
    c = costs.measure_block_runtimes(parent, space, batch=1, prefill=12, gen_len=3, repeats=1, decode_steps=2)
    assert "attention:kv2-win4-s1" in c["block_runtime_s"]
    assert seen and all(t is WindowCacheLayer and n <= 1 + 4 - 1 for t, n in seen), seen[:4]
    assert parent.config.block_configs[0].attention.window_length is None  # the parent itself is left as it was
