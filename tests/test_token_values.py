"""The token part of copy values (value_source "encoder+llm_copy"), with no text matched (id columns -1, so
each entry writes the token embedding it carries): the algebra on tiny random models, save/load, and the
value sources of flat, pruned and stored KBs. Quality lives in benchmarks/results (not here)."""
import numpy as np
import pytest
import torch

from atlaskv.model.adapter import AdapterError, KBAdapter
from atlaskv.model.attention import attach
from atlaskv.model.kb_inputs import KBInputs
from atlaskv.model.values import TOKEN_GAIN_UNIT, TokenValueSource, TokenValues
from test_attention import D_IN, IDS, random_adapter, random_kb, tiny_model
from test_pruning import pruned_kb


M = 4  # copy_tokens


def token_adapter(model, gain=0.7, seed=2):
    base = random_adapter(model, seed=seed)
    from dataclasses import replace

    adapter = KBAdapter(replace(base.config, value_source="encoder+llm_copy", copy_tokens=M))
    adapter.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        adapter.token_gain.copy_(torch.linspace(-gain, gain, len(adapter.config.kb_layers)))
        adapter.token_map.add_(0.1 * torch.randn_like(adapter.token_map))
    return base, adapter


def with_tokens(values, hidden, seed=5):
    """[sentence part; a random token part; id columns of -1 (no value ever matches the text)]."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([values, torch.randn(*values.shape[:-1], hidden, generator=g),
                      torch.full((*values.shape[:-1], M + 1), -1.0)], -1)


def test_zero_gain_equals_the_sentence_value_adapter():
    model = tiny_model("llama")
    base, adapter = token_adapter(model)
    with torch.no_grad():
        adapter.token_gain.zero_()
    keys, values = random_kb(20)
    attach(model, base)
    ref = model(IDS, atlaskv_kb=KBInputs(keys, values)).logits
    attach(model, adapter)
    out = model(IDS, atlaskv_kb=KBInputs(keys, with_tokens(values, 64))).logits
    assert (out - ref).abs().max().item() < 1e-5
    with torch.no_grad():
        adapter.token_gain.fill_(0.5)
    moved = model(IDS, atlaskv_kb=KBInputs(keys, with_tokens(values, 64))).logits
    assert (moved - ref).abs().max().item() > 1e-3  # and the token part does reach the output


def test_value_weights_are_the_documented_sum():
    """value_l(e) = W_v e_s + b_v + unit * g_l R_l A t, and each head's share lands along t (o_proj R_l,h A t
    is the projection of A t onto that head's output space: never against it)."""
    model = tiny_model("llama")
    _, adapter = token_adapter(model)
    adapter = adapter.double().bind(model)  # fp64: the token part is ~256x the sentence part (TOKEN_GAIN_UNIT)
    c = adapter.config
    e = with_tokens(torch.randn(3, D_IN), c.hidden_size).double()
    attn = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    for i, l in enumerate(c.kb_layers):
        got = adapter.project_values(e, l).reshape(3, -1)
        s = slice(c.slot(l) * c.slot_width, (c.slot(l) + 1) * c.slot_width)
        t = e[:, D_IN:D_IN + c.hidden_size] @ adapter.token_map.T
        want = adapter.value_proj(e[:, :D_IN])[:, s] + TOKEN_GAIN_UNIT * adapter.token_gain[i] * t @ adapter.token_readout[i].T
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        w_o = attn[l].o_proj.weight.double().view(c.hidden_size, c.num_heads, c.head_dim)
        r = adapter.token_readout[i].view(c.num_heads, c.head_dim, c.hidden_size)
        for h in range(c.num_heads):
            written = t @ (w_o[:, h] @ r[h]).T                                  # [3, hidden]
            assert ((written * t).sum(-1) >= -1e-4).all()
            # a projection: applying it twice changes nothing
            torch.testing.assert_close(written @ (w_o[:, h] @ r[h]).T, written, atol=1e-3, rtol=1e-3)


def test_pruned_token_values_equal_flat():
    model = tiny_model("llama")
    _, adapter = token_adapter(model)
    attach(model, adapter)
    keys, values = random_kb(60)
    values = with_tokens(values, 64)
    ref = model(IDS, atlaskv_kb=KBInputs(keys, values, scale_factor=30.0)).logits
    kb = KBInputs(pruned=pruned_kb(keys, values, (10**6,) * 3), scale_factor=30.0)
    assert (model(IDS, atlaskv_kb=kb).logits - ref).abs().max().item() < 1e-5


def test_save_load_keeps_token_weights_and_rebinds(tmp_path):
    model = tiny_model("llama")
    _, adapter = token_adapter(model)
    attach(model, adapter)
    adapter.save_pretrained(tmp_path / "a")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "a" / "adapter.safetensors")
    assert "token_map" in saved and "token_gain" in saved and "token_readout" not in saved  # derived, not stored
    loaded = KBAdapter.from_pretrained(tmp_path / "a", model=model)
    with pytest.raises(AdapterError, match="not bound"):
        loaded.layer_weights(loaded.config.kb_layers[0], "value")
    attach(model, loaded)
    keys, values = random_kb(10)
    values = with_tokens(values, 64)
    out = model(IDS, atlaskv_kb=KBInputs(keys, values)).logits
    attach(model, adapter)
    assert (model(IDS, atlaskv_kb=KBInputs(keys, values)).logits - out).abs().max().item() < 1e-6
    # a file without the token weights does not pass for a token-value adapter
    (tmp_path / "b").mkdir()
    from safetensors.torch import save_file

    save_file({k: v for k, v in saved.items() if not k.startswith("token_")}, tmp_path / "b" / "adapter.safetensors")
    (tmp_path / "b" / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    with pytest.raises(AdapterError, match="missing"):
        KBAdapter.from_pretrained(tmp_path / "b")
    bad = (tmp_path / "a" / "adapter_config.json").read_text().replace('"encoder+llm_copy"', '"tokens"')
    (tmp_path / "b" / "adapter_config.json").write_text(bad)
    with pytest.raises(AdapterError, match="value_source"):
        KBAdapter.from_pretrained(tmp_path / "b")
    removed = bad.replace('"tokens"', '"encoder+llm_tokens"')  # a removed variant says so
    (tmp_path / "b" / "adapter_config.json").write_text(removed)
    with pytest.raises(AdapterError, match="was removed"):
        KBAdapter.from_pretrained(tmp_path / "b")


class _Tok:
    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[(ord(ch) % 90) + 1 for ch in t] for t in texts]}


class _Emb:
    def __init__(self):
        self.emb = torch.nn.Embedding(97, 8)

    def get_input_embeddings(self):
        return self.emb


def test_token_values_are_the_first_token_and_sources_append_them():
    m, tok = _Emb(), _Tok()
    tv = TokenValues(m, tok, copy_tokens=3)
    out = tv.encode(["ab", "abcdef", "ab"])
    w = m.emb.weight.detach()
    ids = tok([" abcdef"])["input_ids"][0][:3]
    np.testing.assert_allclose(out[1, :8], w[ids[0]].numpy(), rtol=1e-6)
    assert out[1, 8:].tolist() == [tok(["abcdef"])["input_ids"][0][0], *ids]
    np.testing.assert_array_equal(out[0], out[2])
    base = np.arange(20, dtype=np.float32).reshape(5, 4)
    texts = ["x", "yy", "zzz", "x", "w"]

    class Rows:
        def take(self, p):
            return base[p]

    src = TokenValueSource(Rows(), lambda p: [texts[i] for i in p], tv)
    got = src.take(np.array([3, 1, 3]))
    np.testing.assert_array_equal(got[:, :4], base[[3, 1, 3]])
    np.testing.assert_allclose(got[:, 4:], tv.encode(["x", "yy", "x"]))
    assert src.take(np.zeros(0, np.int64)).shape == (0, 4 + 8 + 4)
