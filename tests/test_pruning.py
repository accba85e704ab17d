"""HiKVP: the tree (index.py) and the pruned search (pruning.py) against flat attention.

Tiny random-weight models check equalities and id bookkeeping; quality lives in the benchmarks.
"""
import numpy as np
import pytest
import torch

from atlaskv.model.attention import attach, kb_attention

from atlaskv.model.kb_inputs import KBInputs
from atlaskv.kb.index import build_hierarchy, gather_children, nearest_centroid
from atlaskv.kb.view import ArraySource
from atlaskv.model.pruning import LayerScorer, PruneConfig, PrunedKB, gather, search
from test_attention import D_IN, IDS, _Module, random_adapter, random_kb, tiny_model


def clustered(n, d=D_IN, centers=12, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)) * 3
    return (c[rng.integers(0, centers, n)] + rng.standard_normal((n, d))).astype(np.float32)


@pytest.mark.parametrize("m", [1, 2, 9, 500, 3000])
def test_tree_covers_every_leaf_once_with_paper_sizes(m):
    x = clustered(m)
    h = build_hierarchy(x)
    assert np.array_equal(np.sort(h.inter_children), np.arange(m))
    r, i = len(h.roots), len(h.inters)
    assert r <= int(np.ceil(m ** (1 / 3))) and i <= int(np.ceil(m ** (2 / 3))) + r  # >= 1 per root
    assert np.array_equal(np.sort(h.root_children), np.arange(i))
    # centroids are the means of their members (roots: of all their leaves)
    for j in range(i):
        members = h.inter_children[h.inter_offsets[j]:h.inter_offsets[j + 1]]
        assert len(members) > 0
        np.testing.assert_allclose(h.inters[j], x[members].mean(0), atol=1e-4)
    for k in range(r):
        inters = h.root_children[h.root_offsets[k]:h.root_offsets[k + 1]]
        leaves = np.concatenate([h.inter_children[h.inter_offsets[j]:h.inter_offsets[j + 1]] for j in inters])
        np.testing.assert_allclose(h.roots[k], x[leaves].mean(0), atol=1e-4)


def test_tree_is_balanced_on_clustered_data():
    h = build_hierarchy(clustered(20000, centers=40))
    s = h.stats()
    assert s["largest_root_share"] < 0.2 and s["largest_inter"] < 12 * s["mean_inter"], s


def test_gather_children_and_additions():
    off = torch.tensor([0, 2, 2, 5])
    ch = torch.tensor([7, 8, 1, 2, 3])
    assert gather_children(off, ch, torch.tensor([2, 0])).tolist() == [1, 2, 3, 7, 8]
    assert gather_children(off, ch, torch.tensor([1])).tolist() == []
    x = clustered(300)
    h = build_hierarchy(x)
    new = clustered(5, seed=9)
    where = nearest_centroid(new, h.inters)
    h2 = h.with_additions(np.arange(300, 305), where)
    for leaf, j in zip(range(300, 305), where):
        assert leaf in h2.inter_children[h2.inter_offsets[j]:h2.inter_offsets[j + 1]]
    assert h2.num_leaves == 305 and np.array_equal(np.sort(h2.inter_children), np.arange(305))


def pruned_kb(keys, values, top_k, live=None, **cfg):
    h = build_hierarchy(keys.numpy())
    cfg.setdefault("route", "kbq")  # tiny models have no sentence encoder
    return PrunedKB(h, ArraySource(keys.numpy()), ArraySource(values.numpy()), live=live,
                    config=PruneConfig(top_k=top_k, **cfg))


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("per_head", [False, True])
def test_pruning_that_keeps_everything_equals_flat(kind, per_head):
    model = tiny_model(kind)
    attach(model, random_adapter(model))
    keys, values = random_kb(60)
    flat = KBInputs(keys, values, record=True, scale_factor=30.0)
    ref = model(IDS, atlaskv_kb=flat).logits
    kb = KBInputs(pruned=pruned_kb(keys, values, (10**6,) * 3, per_head=per_head), record=True, scale_factor=30.0)
    out = model(IDS, atlaskv_kb=kb).logits
    assert (out - ref).abs().max().item() < 1e-5
    # the recorded attention is the flat one, mapped through the kept positions
    (pos, w), = kb.summed_attention()
    (_, w_flat), = flat.summed_attention()
    dense = torch.zeros(60).index_add_(0, pos, w)
    torch.testing.assert_close(dense, flat.summed_attention()[0][1].new_zeros(60).index_add_(
        0, flat.summed_attention()[0][0], w_flat), atol=1e-4, rtol=1e-4)


def test_gathered_values_belong_to_the_kept_keys():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(400, D_IN, generator=g), torch.randn(400, D_IN, generator=g)
    kb = pruned_kb(keys, values, (2, 3, 5))
    picks = [[torch.tensor([5, 17, 399])], [torch.tensor([0, 1])]]
    sel = gather(kb, picks, 1)
    assert sel.positions.tolist() == [[[5, 17, 399]], [[0, 1, -1]]]
    for b in range(2):
        p = sel.positions[b, 0][sel.valid[b, 0]]
        assert torch.equal(sel.keys[b, 0][sel.valid[b, 0]], keys[p])
        assert torch.equal(sel.values[b, 0][sel.valid[b, 0]], values[p])
    assert sel.keys[1, 0, 2].abs().sum() == 0


def test_pulled_back_scores_equal_full_projection():
    model = tiny_model("llama")
    adapter = random_adapter(model).double()
    g = torch.Generator().manual_seed(1)
    H, T, D, layer = 4, 3, 16, 2
    q = torch.randn(H, T, D, generator=g).double()
    e = torch.randn(7, D_IN, generator=g).double()
    w, b = adapter.layer_weights(layer, "key")
    rep = H // w.shape[0]
    scorer = LayerScorer(q, w.repeat_interleave(rep, 0), b.repeat_interleave(rep, 0), 0.25, None)
    got = scorer.logits(e, adapter.key_inv_std(e))
    c = adapter.config
    s = slice(c.slot(layer) * c.slot_width, (c.slot(layer) + 1) * c.slot_width)
    k = adapter.full_keys(e)[:, s].reshape(7, c.num_heads, D).repeat_interleave(rep, 1)   # [n, H, D]
    ref = torch.einsum("htd,nhd->htn", q, k) * 0.25
    torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-9)


def test_removed_leaves_are_never_selected():
    g = torch.Generator().manual_seed(2)
    keys, values = torch.randn(300, D_IN, generator=g), torch.randn(300, D_IN, generator=g)
    live = np.ones(300, bool)
    live[::2] = False
    model = tiny_model("llama")
    adapter = random_adapter(model)
    kb = pruned_kb(keys, values, (10**6, 10**6, 16), live=live)
    scorer = LayerScorer(torch.randn(4, 5, 16), *adapter.layer_weights(0, "key"), 0.25, None)  # query-width KB heads
    (kept,) = search(kb, adapter, scorer, None, "kbq")
    assert len(kept) == 16 and (kept % 2 == 1).all()
    assert kb.size == 150


def test_question_routing_finds_the_nearest_leaf_and_batches_match_single():
    model = tiny_model("llama")
    attach(model, random_adapter(model))
    keys = torch.from_numpy(clustered(2000, seed=3))
    values = torch.randn(2000, D_IN)
    qemb = keys[[11, 1500]] + 0.01
    kb = pruned_kb(keys, values, (4, 8, 5), route="question")
    ids = torch.cat([IDS, IDS.flip(1)])
    batch = KBInputs(pruned=kb, question_emb=qemb, record=True)
    out = model(ids, atlaskv_kb=batch).logits
    for b, gold in enumerate([11, 1500]):
        assert gold in batch.selected[0][b].tolist()  # the retriever's own nearest neighbour survives pruning
        single = KBInputs(pruned=kb, question_emb=qemb[b:b + 1], record=True)
        assert (model(ids[b:b + 1], atlaskv_kb=single).logits - out[b:b + 1]).abs().max() < 1e-5


@pytest.mark.parametrize("route", ["kbq", "both"])
@pytest.mark.parametrize("reuse", [True, False])
def test_generate_with_pruned_kb_runs_all_routes(route, reuse):
    from atlaskv.model.kb_inputs import use_kb

    model = tiny_model("llama")
    attach(model, random_adapter(model))
    keys, values = random_kb(800)
    kb = KBInputs(pruned=pruned_kb(keys, values, (3, 5, 4), route=route, reuse=reuse, per_head=True),
                  question_emb=torch.randn(1, D_IN), record=True)
    with use_kb(kb):
        out = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
    assert out.shape[1] == IDS.shape[1] + 4
    for layer, pos in kb.selected.items():
        kept = pos[pos >= 0]
        assert len(kept) >= 4 and kept.max() < 800
        assert kb.attention[layer].shape[-1] == pos.shape[-1]


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("per_head", [False, True])
def test_decode_step_equals_the_two_softmax_merge(kind, per_head):
    """Decode steps over a kept selection take the one-softmax path (no grad); with grad on, the same step
    runs the two-softmax merge. Left padding, a length shift and unequal leaf counts per sample included."""
    model = tiny_model(kind)
    attach(model, random_adapter(model))
    keys, values = random_kb(300)
    ids = torch.tensor([[0, 0, 0, 5, 17, 3, 44, 8], [9, 91, 23, 12, 7, 66, 4, 2]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    steps = torch.tensor([[31, 32, 33], [41, 42, 43]])
    logits = {}
    for fused in (True, False):
        kb = KBInputs(pruned=pruned_kb(keys, values, (3, 4, 5), per_head=per_head), scale_factor=20.0,
                      token_mask=mask.bool())
        with torch.no_grad():
            out = model(ids, attention_mask=mask, atlaskv_kb=kb, use_cache=True)
        cache, m, rows = out.past_key_values, mask, []
        for t in range(steps.shape[1]):
            m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
            with torch.set_grad_enabled(not fused):
                out = model(steps[:, t:t + 1], attention_mask=m, past_key_values=cache, atlaskv_kb=kb, use_cache=True)
            cache = out.past_key_values
            rows.append(out.logits[:, -1].detach())
        if fused:
            assert any(k[0] == "decode" for s in kb.call.selections.values() for k in s.cache), "fused path not taken"
        logits[fused] = torch.stack(rows)
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)


def _both_search(kb, adapter, q, qemb, memo=None):
    from atlaskv.model.pruning import SearchMemo

    scorer = LayerScorer(q, *adapter.layer_weights(0, "key"), 0.25, None)
    return search(kb, adapter, scorer, qemb, "both", memo or SearchMemo(kb))[0]


def test_shortlist_changes_nothing_when_it_covers_every_candidate():
    g = torch.Generator().manual_seed(5)
    keys, values = torch.from_numpy(clustered(3000, seed=5)), torch.randn(3000, D_IN, generator=g)
    adapter = random_adapter(tiny_model("llama"))
    q, qemb = torch.randn(4, 5, 16, generator=g), keys[7] + 0.01
    for top_k in [(3, 6, 8), (10**6, 10**6, 8)]:
        full = _both_search(pruned_kb(keys, values, top_k, route="both", shortlist=0), adapter, q, qemb)
        wide = _both_search(pruned_kb(keys, values, top_k, route="both", shortlist=3000), adapter, q, qemb)
        assert torch.equal(full, wide)


def test_shortlist_kbq_reranks_the_question_nearest_candidates():
    """Route both with a shortlist: the question's own top k_L over all candidates, united with the KB
    query's top k_L among the `shortlist` candidates nearest the question (every leaf is a candidate here)."""
    g = torch.Generator().manual_seed(6)
    keys, values = torch.from_numpy(clustered(2000, seed=6)), torch.randn(2000, D_IN, generator=g)
    adapter = random_adapter(tiny_model("llama"))
    q, qemb = torch.randn(4, 5, 16, generator=g), keys[42] + 0.01
    k_l, s = 6, 40
    kb = pruned_kb(keys, values, (10**6, 10**6, k_l), route="both", shortlist=s)
    got = _both_search(kb, adapter, q, qemb)
    cos = torch.nn.functional.normalize(keys, dim=-1) @ torch.nn.functional.normalize(qemb, dim=-1)
    short = cos.topk(s).indices
    scorer = LayerScorer(q, *adapter.layer_weights(0, "key"), 0.25, None)
    kbq = short[scorer.route_scores(keys[short], adapter.key_inv_std(keys[short]), False)[0].topk(k_l).indices]
    expected = torch.unique(torch.cat([kbq, cos.topk(k_l).indices]))
    assert torch.equal(torch.sort(got).values, expected)
    assert 42 in got.tolist()


def test_search_memo_reads_each_row_once_and_returns_the_stored_rows():
    from atlaskv.model.pruning import SearchMemo

    g = torch.Generator().manual_seed(7)
    keys, values = torch.from_numpy(clustered(1500, seed=7)), torch.randn(1500, D_IN, generator=g)
    kb = pruned_kb(keys, values, (3, 6, 8), route="both", shortlist=50)
    reads = []
    fetch = kb.fetch
    kb.fetch = lambda pos, which: reads.append((which, len(pos))) or fetch(pos, which)
    memo = SearchMemo(kb)
    pos = np.array([9, 3, 1400, 3, 77])
    assert torch.equal(memo.take(pos, "keys"), keys[pos])
    assert torch.equal(memo.take(np.array([77, 5, 9]), "keys"), keys[[77, 5, 9]])
    assert torch.equal(memo.take(pos, "values"), values[pos])
    assert reads == [("keys", 4), ("keys", 1), ("values", 4)]   # repeats and earlier rows are not read again
    # a search sharing the memo of earlier layers keeps the same leaves as a fresh one
    adapter = random_adapter(tiny_model("llama"))
    q, qemb = torch.randn(4, 5, 16, generator=g), keys[100] + 0.01
    assert torch.equal(_both_search(kb, adapter, q, qemb, memo), _both_search(kb, adapter, q, qemb))
