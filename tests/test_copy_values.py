"""Copy values (value_source "encoder+llm_copy"): each value's token write follows the text, writing the
value's next token once its first is out and nothing once all of it is. Tiny random models: the algebra and
its state over decode steps. Quality lives in benchmarks/results (not here)."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from atlaskv.model.adapter import AdapterError, KBAdapter
from atlaskv.model.attention import attach
from atlaskv.model.kb_inputs import KBInputs
from atlaskv.model.values import TokenValues
from test_attention import D_IN, IDS, random_adapter, random_kb, tiny_model
from test_pruning import pruned_kb
from test_token_values import _Emb, _Tok

M = 4  # copy_tokens


def adapters(model, gain=0.6):
    """(reference, copy adapter): two copy adapters with the same weights. The reference is fed values
    whose id columns are -1, so nothing ever matches and each entry writes the token embedding it is given:
    the constant token write the copy matching is checked against."""
    base = random_adapter(model)
    out = []
    for _ in range(2):
        a = KBAdapter(replace(base.config, value_source="encoder+llm_copy", copy_tokens=M))
        a.load_state_dict(base.state_dict(), strict=False)
        with torch.no_grad():
            a.token_gain.fill_(gain)
        out.append(a)
    return out


def copy_kb(n=12, seed=4):
    """Sentence parts, and for each entry 1-3 token ids (first token without a space: id + 1)."""
    g = torch.Generator().manual_seed(seed)
    keys, values = random_kb(n)
    ids = torch.full((n, M + 1), -1.0)
    for e in range(n):
        k = int(torch.randint(1, 4, (1,), generator=g))
        toks = torch.randint(60, 90, (k,), generator=g).float()
        ids[e, 0], ids[e, 1:1 + k] = toks[0] + 1, toks
    return keys, values, ids


def with_ids(model, values, ids, which=None):
    """Values as the reference reads them, with token `which[e]` of entry e in the token part (0 = the
    first, -1 = none) and no ids, and as the copy adapter reads them ([... ; E[first]; ids])."""
    table = model.get_input_embeddings().weight.detach()
    first = table[ids[:, 1].long()]
    copy = torch.cat([values, first, ids], -1)
    no_ids = torch.full_like(ids, -1.0)
    if which is None:
        return torch.cat([values, first, no_ids], -1), copy
    tok = torch.stack([table[ids[e, 1 + w].long()] if w >= 0 else torch.zeros(table.shape[1])
                       for e, w in enumerate(which)])
    return torch.cat([values, tok, no_ids], -1), copy


def test_without_matches_copy_values_write_their_first_token():
    model = tiny_model("llama")
    tok_ad, copy_ad = adapters(model)
    keys, values, ids = copy_kb()
    ids[:, 1:2] = 95  # no entry's first token occurs in IDS
    ids[:, 0] = 96
    v_tok, v_copy = with_ids(model, values, ids)
    attach(model, tok_ad)
    ref = model(IDS, atlaskv_kb=KBInputs(keys, v_tok)).logits
    attach(model, copy_ad)
    out = model(IDS, atlaskv_kb=KBInputs(keys, v_copy)).logits
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("bare", [False, True])
def test_after_the_first_token_an_entry_writes_its_next_and_then_nothing(bare):
    """One token at a time over the cache, the reference swapping the token adapter's KB each step."""
    model = tiny_model("llama")
    tok_ad, copy_ad = adapters(model)
    keys, values, ids = copy_kb()
    ids[1:][(ids[1:] >= 68) & (ids[1:] <= 72)] += 10  # only entry 0 holds tokens 69-71
    ids[0, 1:] = torch.tensor([70.0, 71.0, -1, -1])  # entry 0: two tokens
    ids[0, 0] = 69.0
    steps = [[5], [69 if bare else 70], [71], [8], [70]]
    # token written by entry 0 at each step: first, next, none (all of it is out), and none from then on
    # (writing its first again after a comma made answers loop: "Memphis, Memphis, Memphis")
    wants = [0, 1, -1, -1, -1]
    _, v_copy = with_ids(model, values, ids)
    attach(model, copy_ad)
    kb = KBInputs(keys, v_copy)
    cache = DynamicCache()
    got = [model(torch.tensor([s]), atlaskv_kb=kb, past_key_values=cache, use_cache=True).logits for s in steps]
    attach(model, tok_ad)
    cache = DynamicCache()
    for s, w, g in zip(steps, wants, got):
        which = [w] + [0] * (len(ids) - 1)
        v_tok, _ = with_ids(model, values, ids, which)
        ref = model(torch.tensor([s]), atlaskv_kb=KBInputs(keys, v_tok), past_key_values=cache, use_cache=True).logits
        assert (g - ref).abs().max().item() < 1e-5


def test_one_prefill_equals_decode_steps_and_a_new_prompt_starts_afresh():
    model = tiny_model("llama")
    _, copy_ad = adapters(model)
    keys, values, ids = copy_kb()
    seq = torch.tensor([[5, int(ids[2, 1]), int(ids[2, 2]) if ids[2, 2] >= 0 else 9, 17,
                         int(ids[3, 0]), 8]])
    _, v_copy = with_ids(model, values, ids)
    attach(model, copy_ad)
    full = model(seq, atlaskv_kb=KBInputs(keys, v_copy)).logits
    kb, cache = KBInputs(keys, v_copy), DynamicCache()
    for _ in range(2):  # the same KB object for a second prompt: no state left from the first
        steps = torch.cat([model(seq[:, t:t + 1], atlaskv_kb=kb, past_key_values=cache, use_cache=True).logits
                           for t in range(seq.shape[1])], 1)
        assert (steps - full).abs().max().item() < 1e-4
        cache = DynamicCache()


@pytest.mark.parametrize("copy_logit_gain", [0.0, 2.0])
@torch.no_grad()  # the copy logits are inference-only
def test_pruned_copy_values_equal_flat(copy_logit_gain):
    model = tiny_model("llama")
    _, copy_ad = adapters(model)
    copy_ad.config.copy_logit_gain = copy_logit_gain
    keys, values, ids = copy_kb(60)
    seq = torch.tensor([[5, int(ids[7, 1]), 17, int(ids[9, 0]), 8]])
    _, v_copy = with_ids(model, values, ids)
    attach(model, copy_ad)
    ref = model(seq, atlaskv_kb=KBInputs(keys, v_copy, scale_factor=30.0)).logits
    kb = KBInputs(pruned=pruned_kb(keys, v_copy, (10**6,) * 3), scale_factor=30.0)
    assert (model(seq, atlaskv_kb=kb).logits - ref).abs().max().item() < 1e-5


def test_copy_payload_and_config_checks(tmp_path):
    m, tok = _Emb(), _Tok()
    tv = TokenValues(m, tok, copy_tokens=3)
    out = tv.encode(["ab", "abcdef"])
    assert out.shape == (2, 8 + 4)
    spaced = tok([" ab"])["input_ids"][0]
    np.testing.assert_allclose(out[0, :8], m.emb.weight.detach()[spaced[0]].numpy(), rtol=1e-6)
    assert out[0, 8:].tolist() == [tok(["ab"])["input_ids"][0][0], *spaced[:3]]
    assert out[1, 9:].tolist() == tok([" abcdef"])["input_ids"][0][:3]
    model = tiny_model("llama")
    _, copy_ad = adapters(model)
    assert copy_ad.config.value_dim == D_IN + 64 + M + 1
    copy_ad.save_pretrained(tmp_path / "a")
    cfg = (tmp_path / "a" / "adapter_config.json").read_text()
    for legacy in ('"value_tokens": 1', '"kb_heads": "query"', '"copy_logit_mode": "add"'):  # old files still load
        (tmp_path / "a" / "adapter_config.json").write_text(cfg.replace("{", "{" + legacy + ",", 1))
        assert KBAdapter.from_pretrained(tmp_path / "a").config == copy_ad.config
    for removed in ('"value_tokens": 2', '"kb_heads": "kv"', '"copy_logit_norm": "mass"'):
        (tmp_path / "a" / "adapter_config.json").write_text(cfg.replace("{", "{" + removed + ",", 1))
        with pytest.raises(AdapterError, match="was removed"):
            KBAdapter.from_pretrained(tmp_path / "a")


def _share_votes(kb, layer, ids, vocab):
    """The copy-logit votes a fresh prompt expects: each entry's share of the last KB layer's KB attention at
    the last position, on its first value token."""
    a = kb.attention[layer][0, -1]
    share = a / a.sum()
    votes = torch.zeros(vocab)
    votes.index_add_(0, ids[:, 1].long(), share)
    return votes


@torch.no_grad()  # the copy logits are inference-only
def test_copy_logits_add_gain_times_each_entrys_share_on_its_next_token():
    model = tiny_model("llama")
    _, copy_ad = adapters(model, gain=0.0)  # the pointer alone: no residual write
    keys, values, ids = copy_kb()
    ids[:, 1:] = torch.where(ids[:, 1:] >= 0, ids[:, 1:], -1.0)
    _, v_copy = with_ids(model, values, ids)
    attach(model, copy_ad)
    kb = KBInputs(keys, v_copy, record=True)
    ref = model(IDS, atlaskv_kb=kb).logits
    copy_ad.config.copy_logit_gain = 3.0
    out = model(IDS, atlaskv_kb=KBInputs(keys, v_copy)).logits
    assert (out[:, :-1] - ref[:, :-1]).abs().max().item() == 0  # only the next token's logits move
    last = copy_ad.config.kb_layers[-1]
    votes = _share_votes(kb, last, ids, out.shape[-1])
    torch.testing.assert_close(out[0, -1] - ref[0, -1], 3.0 * votes, atol=1e-5, rtol=1e-4)


@torch.no_grad()  # the copy logits are inference-only
def test_copy_logits_follow_the_answer_and_stop_once_the_value_is_out():
    model = tiny_model("llama")
    _, copy_ad = adapters(model, gain=0.0)
    keys, values, ids = copy_kb()
    ids[1:][(ids[1:] >= 68) & (ids[1:] <= 72)] += 10  # only entry 0 holds tokens 69-71
    ids[0, 1:] = torch.tensor([70.0, 71.0, -1, -1])
    ids[0, 0] = 69.0
    _, v_copy = with_ids(model, values, ids)
    attach(model, copy_ad)

    def moved(steps):
        outs = []
        for g in (0.0, 5.0):
            copy_ad.config.copy_logit_gain = g
            kb, cache = KBInputs(keys, v_copy), DynamicCache()
            for s in steps:
                o = model(torch.tensor([s]), atlaskv_kb=kb, past_key_values=cache, use_cache=True).logits
            outs.append(o[0, -1])
        return outs[1] - outs[0]

    assert moved([[5]])[70] > 0 and moved([[5]])[71] == 0        # votes for its first token
    d = moved([[5], [70]])
    assert d[71] > 0 and d[70] == 0                                 # then for its next one
    d = moved([[5], [70], [71], [8]])
    assert d.abs().max() == 0   # once one entry's value is out nobody votes (others' values trailed after it)


@torch.no_grad()  # the copy logits are inference-only
def test_copy_logits_steer_generate():
    model = tiny_model("llama")
    _, copy_ad = adapters(model, gain=0.0)
    keys, values, ids = copy_kb(60)
    _, v_copy = with_ids(model, values, ids)
    attach(model, copy_ad)
    # the question names a one-token value; then a new chat turn (eos, bos): the answer has said nothing yet
    one = int((ids[:, 2] < 0).nonzero()[0])
    prompt = torch.cat([IDS[:, :3], ids[None, one, 1:2].long(), IDS[:, 3:], torch.tensor([[2, 1]])], 1)
    kb = KBInputs(keys, v_copy, record=True, scale_factor=30.0)
    model(prompt, atlaskv_kb=kb)
    top = _share_votes(kb, copy_ad.config.kb_layers[-1], ids, 97).argmax()
    copy_ad.config.copy_logit_gain = 1e4  # the votes decide
    from atlaskv.model.kb_inputs import use_kb
    with use_kb(KBInputs(keys, v_copy, scale_factor=30.0)):
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False)
    assert int(out[0, -1]) == int(top)


def test_copy_logit_settings_round_trip_and_are_checked(tmp_path):
    model = tiny_model("llama")
    _, copy_ad = adapters(model)
    copy_ad.config.copy_logit_gain = 6.0
    copy_ad.save_pretrained(tmp_path / "a")
    back = KBAdapter.from_pretrained(tmp_path / "a")
    assert back.config.copy_logit_gain == 6.0
    for field_, bad, msg in (("copy_logit_gain", -1.0, "copy_logit_gain"),
                             ("copy_logit_gain", float("nan"), "copy_logit_gain")):
        a = KBAdapter(replace(copy_ad.config, **{field_: bad}))
        a.save_pretrained(tmp_path / "b")
        with pytest.raises(AdapterError, match=msg):
            KBAdapter.from_pretrained(tmp_path / "b")


def test_copy_logits_stay_out_of_training_forwards():
    model = tiny_model("llama")
    _, copy_ad = adapters(model, gain=0.0)
    keys, values, ids = copy_kb()
    _, v_copy = with_ids(model, values, ids)
    attach(model, copy_ad)
    ref = model(IDS, atlaskv_kb=KBInputs(keys, v_copy)).logits
    copy_ad.config.copy_logit_gain = 5.0
    assert (model(IDS, atlaskv_kb=KBInputs(keys, v_copy)).logits - ref).abs().max().item() == 0
