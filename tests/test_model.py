"""AtlasKV end to end on the real SmolLM2 + a real KB (untrained adapter: mechanics, not quality)."""
import pytest
import torch

pytest.importorskip("gguf")

from atlaskv.model.adapter import AdapterError, KBAdapter
from atlaskv.model.kb_inputs import KBInputs
from atlaskv.kb.triples import Triple
from atlaskv.model.llm import resolve_model
from atlaskv.model.atlaskv import AtlasKV
from atlaskv.kb.store import KnowledgeBase

FACTS = [("Elvis Presley", "place of death", "Memphis"), ("Memphis", "time zone", "Central Time Zone"),
         ("Michael Jackson", "place of birth", "Gary"), ("Canada", "capital", "Ottawa")]


@pytest.fixture(scope="module")
def akv():
    torch.manual_seed(0)
    return AtlasKV.from_base_model(str(resolve_model()))  # any local HF model directory works


@pytest.fixture(scope="module")
def kb(tmp_path_factory, encoder):
    return KnowledgeBase.build(FACTS, tmp_path_factory.mktemp("m") / "kb", encoder=encoder)


def test_generate_stream_and_ask(akv, kb):
    q = "What is the capital of Canada?"
    text = akv.generate(q, kb, max_new_tokens=12)
    assert isinstance(text, str) and text
    assert "".join(akv.stream(q, kb, max_new_tokens=12)).strip() == text  # streaming = same greedy answer
    ans = akv.ask(q, kb, max_new_tokens=12)
    assert ans.text == text and ans.kb_size == 4
    assert {t for t, _ in ans.citations} <= {Triple(*f) for f in FACTS} and len(ans.citations) == 4
    weights = [w for _, w in ans.citations]
    assert weights == sorted(weights, reverse=True) and abs(sum(weights) - 1) < 1e-5
    assert 0 < ans.kb_attention_mass < 1


def test_kb_changes_nothing_when_absent(akv):
    ids = akv.chat_ids("What is the capital of Canada?")
    from atlaskv.model.attention import detach, attach

    with torch.no_grad():
        with_hooks = akv.model(ids).logits
        detach(akv.model)
        stock = akv.model(ids).logits
        attach(akv.model, akv.adapter)
    assert (with_hooks - stock).abs().max().item() <= 1e-6


def test_bf16_model_merges_in_fp32():
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    m32 = tf.LlamaForCausalLM(cfg).eval()
    m16 = tf.LlamaForCausalLM(cfg).eval()
    m16.load_state_dict(m32.state_dict())
    m16 = m16.to(torch.bfloat16)
    from atlaskv.model.attention import attach

    ad = KBAdapter.for_model(m32, "e", 8)
    attach(m32, ad)
    attach(m16, ad)
    kb = (torch.randn(5, 8), torch.randn(5, 8))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        a = m32(ids, atlaskv_kb=KBInputs(*kb)).logits
        b = m16(ids, atlaskv_kb=KBInputs(*kb)).logits.float()
    assert torch.isfinite(b).all() and (a - b).abs().max().item() < 0.1


def test_encoder_mismatch_is_refused(akv, tmp_path, monkeypatch):
    import atlaskv.kb.encoder as enc_mod

    class Fake:
        name, dim = "other-encoder", 384

        def encode(self, texts, batch_size=256, show_progress=None):
            import numpy as np

            return np.ones((len(texts), 384), np.float32)

    other = KnowledgeBase.build(FACTS[:1], tmp_path / "kb", encoder=Fake())
    with pytest.raises(AdapterError, match="built with encoder 'other-encoder'"):
        akv.ask("What?", other)


def test_no_shipped_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(AdapterError, match="no trained adapter at"):
        AtlasKV.from_pretrained(tmp_path / "nothing")
