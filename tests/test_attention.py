"""KB attention on stock transformers models: exactness, equivalences and invariances.

Tiny random-weight llama / qwen2 / gemma3 configs test shapes and equalities; the real SmolLM2 runs where
its package is installed. None of this is evidence of answer quality (that is the training's job).
"""
import math

import pytest
import torch
from torch import nn

from atlaskv.model.adapter import AdapterConfig, AdapterError, KBAdapter
from atlaskv.model.attention import attach, detach, kb_attention
from atlaskv.model.kb_inputs import KBInputs, use_kb

D_IN = 24
torch.manual_seed(0)


def tiny_model(kind: str, attn="sdpa"):
    import transformers as tf

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama":
        cfg, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif kind == "qwen3":
        cfg, cls = tf.Qwen3Config(**common, head_dim=16), tf.Qwen3ForCausalLM
    elif kind == "gemma3":
        cfg = tf.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                               "sliding_attention", "full_attention"])
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(kind)
    cfg._attn_implementation = attn
    torch.manual_seed(1)
    model = cls(cfg).eval()
    model.requires_grad_(False)
    return model


def random_adapter(model, freq=2, seed=2):
    torch.manual_seed(seed)
    adapter = KBAdapter.for_model(model, "test-encoder", D_IN, kb_layer_frequency=freq)
    with torch.no_grad():  # random biases and LayerNorm statistics that are not trivial
        adapter.key_proj.bias.normal_(0, 0.5)
        adapter.value_proj.bias.normal_(0, 0.5)
        adapter.value_proj.weight.mul_(3)
    return adapter


def random_kb(n, batch=None, seed=3):
    g = torch.Generator().manual_seed(seed)
    shape = (n, D_IN) if batch is None else (batch, n, D_IN)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


IDS = torch.tensor([[5, 17, 3, 44, 8, 91, 23, 12, 7, 66]])
KINDS = ["llama", "qwen2", "qwen3", "gemma3"]


@pytest.mark.parametrize("kind", KINDS)
def test_no_kb_equals_stock_model(kind):
    model = tiny_model(kind)
    ref = model(IDS).logits
    attach(model, random_adapter(model))
    assert model.config._attn_implementation == "atlaskv_sdpa"
    out = model(IDS).logits
    assert (out - ref).abs().max().item() <= 1e-6
    # an empty KB also changes nothing (the KB's softmax mass is zero)
    keys, values = random_kb(0)
    out0 = model(IDS, atlaskv_kb=KBInputs(keys, values)).logits
    assert (out0 - ref).abs().max().item() <= 1e-5
    detach(model)
    assert model.config._attn_implementation == "sdpa"
    assert (model(IDS).logits - ref).abs().max().item() == 0
    assert not any("kb" in n for n, _ in model.named_parameters())  # the model stays stock


def reference_layer(adapter, layer, query, key, value, mask, scaling, q_kb, kb_keys, kb_values, scale=None):
    """KBLaM's form: materialise the KB keys (LayerNorm over the whole vector) and values, concatenate
    them in front of the text keys, one joint softmax."""
    c = adapter.config
    B, H, T, D = query.shape
    s = slice(c.slot(layer) * c.slot_width, (c.slot(layer) + 1) * c.slot_width)
    kk = adapter.full_keys(kb_keys)[..., s].reshape(*kb_keys.shape[:-1], c.num_heads, D)
    vv = adapter.value_proj(kb_values)[..., s].reshape(*kb_values.shape[:-1], c.num_heads, D)
    kk = kk.expand(B, -1, -1, -1).transpose(1, 2)  # [B,H,N,D]
    vv = vv.expand(B, -1, -1, -1).transpose(1, 2)
    k = key.repeat_interleave(H // key.shape[1], dim=1)
    v = value.repeat_interleave(H // value.shape[1], dim=1)
    s_kb = q_kb @ kk.transpose(-1, -2) * scaling
    if scale is not None:  # only KBs larger than s are damped
        s_kb = s_kb + min(0.0, math.log(scale) - math.log(kb_keys.shape[-2]))
    s_text = q_kb.new_zeros(1) + query @ k.transpose(-1, -2) * scaling + mask
    p = torch.softmax(torch.cat([s_kb, s_text], -1), -1)
    return (p @ torch.cat([vv, v], -2)).transpose(1, 2), p[..., : kb_keys.shape[-2]]


class _Module(nn.Module):
    config = None


@pytest.mark.parametrize("mode", ["pullback", "project"])
@pytest.mark.parametrize("scale", [None, 5.0, 100.0])
@pytest.mark.parametrize("shared_kb", [True, False])
def test_decomposed_merge_equals_joint_softmax(scale, shared_kb, mode):
    model = tiny_model("llama")
    adapter = random_adapter(model).double()
    B, H, Hkv, T, D, N = 2, 4, 2, 7, 16, 11
    g = torch.Generator().manual_seed(5)
    query, q_kb = torch.randn(B, H, T, D, generator=g).double(), torch.randn(B, H, T, D, generator=g).double()
    key, value = torch.randn(B, Hkv, T, D, generator=g).double(), torch.randn(B, Hkv, T, D, generator=g).double()
    keys, values = (torch.randn(N, D_IN, generator=g).double(), torch.randn(N, D_IN, generator=g).double())
    if not shared_kb:
        keys, values = (torch.randn(B, N, D_IN, generator=g).double(), torch.randn(B, N, D_IN, generator=g).double())
    mask = torch.full((T, T), float("-inf")).triu(1).double()
    layer = 2
    kb = KBInputs(keys, values, scale_factor=scale, record=True, mode=mode)
    mod = _Module()
    mod.config = model.config
    out, _ = kb_attention(mod, query, key, value, mask[None, None], 0.25, base="eager",
                          atlaskv_layer=(adapter, layer, q_kb, kb))
    ref, p_ref = reference_layer(adapter, layer, query, key, value, mask, 0.25, q_kb, keys, values, scale)
    assert (out - ref).abs().max().item() < 1e-8  # float64: only rounding differs
    assert (kb.attention[layer] - p_ref.sum(1)).abs().max().item() < 1e-8


def test_scale_factor_damps_kbs_larger_than_s_by_s_over_n():
    model = tiny_model("llama")
    adapter = random_adapter(model).double()
    g = torch.Generator().manual_seed(6)
    B, H, T, D, N = 1, 4, 5, 16, 8
    query, q_kb = torch.randn(B, H, T, D, generator=g).double(), torch.randn(B, H, T, D, generator=g).double()
    key, value = torch.randn(B, 2, T, D, generator=g).double(), torch.randn(B, 2, T, D, generator=g).double()
    keys, values = torch.randn(N, D_IN, generator=g).double(), torch.randn(N, D_IN, generator=g).double()
    mod = _Module()
    mod.config = model.config
    mass = {}
    for s in (None, float(N), 100.0, 2.0):
        kb = KBInputs(keys, values, scale_factor=s, record=True)
        kb_attention(mod, query, key, value, None, 0.25, base="eager", atlaskv_layer=(adapter, 0, q_kb, kb))
        mass[s] = kb.attention[0] / H  # mean KB mass per head (all heads share the shift)
    assert torch.allclose(mass[None], mass[float(N)], atol=1e-12)  # s = N is no shift
    assert torch.allclose(mass[None], mass[100.0], atol=1e-12)     # s > N: a small KB is never boosted
    assert (mass[2.0].sum(-1) < mass[None].sum(-1)).all()         # s < N: damped
    # per head, the KB's odds against the text shrink by exactly s / N
    odds = lambda p: p.sum(-1) / (1 - p.sum(-1))
    _, p0 = reference_layer(adapter, 0, query, key, value, torch.zeros(T, T).double(), 0.25, q_kb, keys, values)
    _, p1 = reference_layer(adapter, 0, query, key, value, torch.zeros(T, T).double(), 0.25, q_kb, keys, values, 2.0)
    ratio = odds(p1) / odds(p0)
    assert torch.allclose(ratio, torch.full_like(ratio, 2.0 / N), rtol=1e-9)
    causal = torch.full((T, T), float("-inf")).triu(1).double()  # the kernel's mask when none is given
    _, p2 = reference_layer(adapter, 0, query, key, value, causal, 0.25, q_kb, keys, values, 2.0)
    torch.testing.assert_close(mass[2.0] * H, p2.sum(1), atol=1e-9, rtol=1e-9)  # the kernel is that reference


@pytest.mark.parametrize("kind", KINDS)
def test_permuting_the_kb_permutes_attention_only(kind):
    model = tiny_model(kind)
    attach(model, random_adapter(model))
    keys, values = random_kb(9)
    kb = KBInputs(keys, values, record=True)
    out = model(IDS, atlaskv_kb=kb).logits
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    kbp = KBInputs(keys[perm], values[perm], record=True)
    outp = model(IDS, atlaskv_kb=kbp).logits
    assert (out - outp).abs().max().item() < 1e-5
    assert set(kb.attention) == set(model._atlaskv["adapter"].config.kb_layers)
    for layer, att in kb.attention.items():
        assert torch.allclose(att[..., perm], kbp.attention[layer], atol=1e-6)
    assert (model(IDS).logits - out).abs().max().item() > 1e-3  # the KB did change the output


def test_strongly_matching_entry_pulls_output_to_its_value():
    model = tiny_model("llama")
    adapter = random_adapter(model).double()
    g = torch.Generator().manual_seed(7)
    B, H, T, D = 1, 4, 3, 16
    query = torch.randn(B, H, T, D, generator=g).double()
    key, value = torch.randn(B, 2, T, D, generator=g).double(), torch.randn(B, 2, T, D, generator=g).double()
    e_key, e_val = torch.randn(1, D_IN, generator=g).double(), torch.randn(1, D_IN, generator=g).double()
    k_entry = adapter.project_keys(e_key, 0)[0]       # [H, D]
    v_entry = adapter.project_values(e_val, 0)[0]     # [H, D]
    q_kb = (k_entry * 50)[None, :, None, :].expand(B, H, T, D)  # the KB query aligned with the key
    mod = _Module()
    mod.config = model.config
    out, _ = kb_attention(mod, query, key, value, None, 0.25, base="eager",
                          atlaskv_layer=(adapter, 0, q_kb, KBInputs(e_key, e_val)))
    weak, _ = kb_attention(mod, query, key, value, None, 0.25, base="eager",
                           atlaskv_layer=(adapter, 0, -q_kb, KBInputs(e_key, e_val)))
    target = v_entry[None, None].expand(B, T, H, D)
    assert (out - target).norm() < 1e-3 * target.norm()
    assert (weak - target).norm() > 0.5 * target.norm()


def test_closed_form_key_layernorm_is_exact():
    model = tiny_model("qwen2")
    adapter = random_adapter(model).double()
    e = torch.randn(13, D_IN).double()
    full = adapter.full_keys(e)
    c = adapter.config
    for layer in c.kb_layers:
        s = slice(c.slot(layer) * c.slot_width, (c.slot(layer) + 1) * c.slot_width)
        assert torch.allclose(adapter.project_keys(e, layer).reshape(13, -1), full[:, s], atol=1e-10)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_batch_of_three_kbs_equals_three_single_calls(kind):
    model = tiny_model(kind)
    attach(model, random_adapter(model))
    ids = torch.randint(0, 97, (3, 8), generator=torch.Generator().manual_seed(1))
    sizes = [4, 7, 2]
    kbs = [random_kb(n, seed=10 + i) for i, n in enumerate(sizes)]
    single = torch.cat([model(ids[i:i + 1], atlaskv_kb=KBInputs(*kbs[i])).logits for i in range(3)])
    n = max(sizes)
    keys = torch.zeros(3, n, D_IN)
    values = torch.zeros(3, n, D_IN)
    mask = torch.zeros(3, n, dtype=torch.bool)
    for i, (k, v) in enumerate(kbs):
        keys[i, : len(k)], values[i, : len(v)], mask[i, : len(k)] = k, v, True
    batched = model(ids, atlaskv_kb=KBInputs(keys, values, mask=mask)).logits
    assert (batched - single).abs().max().item() < 1e-5
    # a shared KB broadcasts over the batch
    shared = model(ids, atlaskv_kb=KBInputs(*kbs[1])).logits
    assert (shared[1] - single[1]).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_kb_matches_stepwise_forward(kind):
    model = tiny_model(kind)
    attach(model, random_adapter(model))
    keys, values = random_kb(6)
    prompt = IDS[:, :6]
    with use_kb(KBInputs(keys, values)):
        gen = model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True)
    seq = prompt
    for step in range(8):  # full recomputation, no cache: the KB enters every step anew
        logits = model(seq, atlaskv_kb=KBInputs(keys, values), use_cache=False).logits[:, -1]
        assert (logits - gen.logits[step]).abs().max().item() < 1e-4
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq, gen.sequences)
    # the KB never enters the text KV cache
    out = model(prompt, atlaskv_kb=KBInputs(keys, values), use_cache=True)
    assert out.past_key_values.get_seq_length() == prompt.shape[1]
    no_kb = model.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8, pad_token_id=0)
    assert not torch.equal(no_kb, gen.sequences)  # the KB changed something


def test_sampling_and_streaming_with_kb():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    model = tiny_model("llama")
    attach(model, random_adapter(model))
    keys, values = random_kb(5)
    streamer = Collect()
    torch.manual_seed(0)
    with use_kb(KBInputs(keys, values)):
        out = model.generate(IDS[:, :4], do_sample=True, top_k=20, max_new_tokens=5, min_new_tokens=5,
                             pad_token_id=0, streamer=streamer)
    assert out.shape == (1, 9) and streamer.chunks[-1] is None
    assert torch.equal(torch.cat([c.reshape(-1) for c in streamer.chunks[1:-1]]), out[0, 4:])


def test_save_load_round_trip(tmp_path):
    model = tiny_model("qwen2")
    adapter = random_adapter(model)
    attach(model, adapter)
    keys, values = random_kb(6)
    before = model(IDS, atlaskv_kb=KBInputs(keys, values)).logits
    adapter.save_pretrained(tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    loaded = KBAdapter.from_pretrained(tmp_path / "ad", model=model, encoder="test-encoder")
    attach(model, loaded)
    after = model(IDS, atlaskv_kb=KBInputs(keys, values)).logits
    assert torch.equal(before, after)
    # only trained weights are stored
    from safetensors import safe_open

    with safe_open(tmp_path / "ad" / "adapter.safetensors", "pt") as f:
        names = set(f.keys())
    assert adapter.config.q_bias  # qwen2's q_proj has a bias, so its KB query heads do too
    assert names == {"key_proj.weight", "key_proj.bias", "value_proj.weight", "value_proj.bias"} | {
        f"kb_query.{l}.{w}" for l in adapter.config.kb_layers for w in ("weight", "bias")}


def test_loading_checks_model_encoder_and_files(tmp_path):
    model = tiny_model("llama")
    adapter = random_adapter(model)
    adapter.save_pretrained(tmp_path / "ad")
    with pytest.raises(AdapterError, match="trained on 'test-encoder'"):
        KBAdapter.from_pretrained(tmp_path / "ad", encoder="all-MiniLM-L6-v2")
    other = tiny_model("gemma3")
    with pytest.raises(AdapterError, match="model_type"):
        KBAdapter.from_pretrained(tmp_path / "ad", model=other)
    (tmp_path / "ad" / "adapter.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(Exception, match="safetensors|header|Error"):
        KBAdapter.from_pretrained(tmp_path / "ad")
    import json

    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cfg["encoder_dim"] = 10 ** 9
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="implausible|encoder_dim is 1000000000"):
        KBAdapter.from_pretrained(tmp_path / "ad")
    with pytest.raises(AdapterError, match="missing"):
        KBAdapter.from_pretrained(tmp_path / "nothing")


def test_kb_query_heads_start_as_q_proj_copies():
    model = tiny_model("llama")
    adapter = random_adapter(model)
    for l in adapter.config.kb_layers:
        assert torch.equal(adapter.kb_query[str(l)].weight, model.model.layers[l].self_attn.q_proj.weight)
    assert adapter.config.kb_layers == [0, 2, 4]


@pytest.mark.slow
def test_real_smollm2_no_kb_exact_and_kb_generation():
    pytest.importorskip("gguf")
    from atlaskv.model.llm import load_base_model

    model, tok = load_base_model()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    ref = model(ids).logits
    adapter = KBAdapter.for_model(model, "all-MiniLM-L6-v2", 384)
    assert adapter.config.kb_layers == list(range(0, 30, 3))
    attach(model, adapter)
    try:
        assert (model(ids).logits - ref).abs().max().item() <= 1e-6
        keys, values = torch.randn(20, 384), torch.randn(20, 384)
        kb = KBInputs(keys, values, record=True)
        with use_kb(kb):
            out = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 4 and len(kb.attention) == 10
    finally:
        detach(model)
