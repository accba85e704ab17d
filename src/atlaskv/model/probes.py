"""Does the KB hold the fact the question asks for? Keys the KB lacks, scored by the prefill's own attention.

When a KB holds some of an entity's facts but not the one asked ("Is Linda Ronstadt male or female?" with only
her nationality stored), the KB attention still finds her, and her nationality comes first. The trained
adapter tells the kinds of fact apart when both are there; here one is missing. So the entity's keys for the
relations it lacks ("the gender of Linda Ronstadt", one per relation the KB knows) are scored as if they were
stored: each alone against the prefill's own KB queries and softmax normaliser (attention.py records them),
summed over KB layers, heads and prompt tokens as a citation is. A lacking key that draws clearly more
attention than the fact backing the answer (refusal.backing) says the question asks for a fact the KB does
not hold: the refusal rule refuses (refusal.verdict, at defaults.LACKING_RATIO).

    lacking = lacking_fact(adapter, encoder, kb_in, question)   # Lacking(relation, ratio, ...) or None

Cost per answer: the sentence encoder on at most LACKING_KEYS short key texts (cached), and one small product
per KB layer; nothing runs the LLM again.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from atlaskv.defaults import LACKING_KIND_SHARE, TOP_CITATIONS
from atlaskv.kb.records import ENTITY, RelationNouns
from atlaskv.model.refusal import backing

LACKING_KEYS = 16  # lacking keys scored per answer: the relations whose key templates are nearest the question
HELD_SCAN = 32     # most-cited rows read for the relations the entity holds (a held key the question asks for
                   # is cited near the top: it is the same key)


@dataclass(frozen=True)
class Lacking:
    relation: str | None        # the relation whose lacking key drew the most attention (None: none lacking)
    ratio: float                # its weight over the backing fact's: over 1, the question reads more like it
    fact: tuple | None = None   # the backing fact (head, relation, tail)
    top: tuple = ()             # the best few (relation, ratio), most first


@torch.no_grad()
def absent_key_weights(adapter, kb_in, keys: torch.Tensor, sample: int = 0,
                       token_mask: torch.Tensor | None = None, last_tokens: int | None = None) -> torch.Tensor:
    """[P]: the KB attention each key embedding ([P, d_in]) would have drawn in this prefill, each alone (it
    joins the softmax on its own; nothing else moves), summed as citations are. Needs record=True.
    `last_tokens`: only the prompt's last tokens count (a chat's last question, not the turns before it)."""
    readers = kb_in.recorded.readers
    if not readers:
        raise ValueError("no recorded prefill: run the KB call with record=True first")
    total = None
    for layer, (q, scaling, shift, lse) in readers.items():
        f = q.dtype
        w_k, b_k = adapter.layer_weights(layer, "key")
        e = keys.to(w_k.dtype)
        inv = adapter.key_inv_std(e).to(f)                                              # [P]
        k = (torch.einsum("hdi,pi->hpd", w_k.to(f), e.to(f)) + b_k.to(f)[:, None, :]) * inv[None, :, None]
        s = (q[sample] @ k.transpose(-1, -2)) * scaling                                 # [H, T, P]
        if torch.is_tensor(shift):
            s = s + shift[sample if shift.shape[0] > 1 else 0]                          # [G, 1, 1]
        p = torch.exp(s - lse[sample])
        if token_mask is not None:
            p = p * token_mask[sample, :p.shape[1], None].to(f)
        if last_tokens is not None and last_tokens < p.shape[1]:
            p = p[:, p.shape[1] - last_tokens:]
        w = p.sum((0, 1))
        total = w if total is None else total + w
    return total


def lacking_fact(adapter, encoder, kb_in, question: str, sample: int = 0,
                 limit: int | None = LACKING_KEYS, relations: str = "trained",
                 last_tokens: int | None = None, nearer_only: bool = True) -> Lacking | None:
    """How much more a fact the KB lacks about the answer's entity draws the question than the fact backing the
    answer; None when nothing backs one (or the view knows no key templates). `limit`: score only the lacking
    relations whose templates ("the gender of it") are nearest the question (None: all). Reads the KBView the
    call was given (kb_in.view: its key templates, triples and key embeddings). `relations`: which lacking
    relations are compared (compared_relations; "trained", the shipped check, or "unseen" / "every", also those
    the adapter never saw: _trained_templates).
    `nearer_only`: only relations whose template is nearer the question than the backing fact's ("the gender
    of it" against "the nationality of it" for "Is X male or female?"); when none is, nothing is encoded, which
    is the common case of an answerable question (False: every lacking relation, up to `limit`).
    `last_tokens`: score the prompt's last tokens only (a chat's last question: the earlier turns' words, "the
    place of death of Elvis Presley", would draw the entity's lacking "place of death" key)."""
    view = kb_in.view
    templates = view.key_templates() if view.key_templates is not None else None
    if not templates or not kb_in.recorded.readers:
        return None
    mask = kb_in.token_mask
    rows, weights = kb_in.cited_rows(mask)[sample]
    scanned = view.triples(rows[:HELD_SCAN])
    cited = list(zip(scanned[:TOP_CITATIONS], weights[:TOP_CITATIONS].tolist()))
    at = backing(question, cited)
    if at is None:
        return None
    fact = scanned[at]
    held = {t.relation for t in scanned if t.head == fact.head}
    rels = compared_relations(adapter, templates, held, fact.relation, relations)
    if not rels:
        return Lacking(None, 0.0, tuple(fact))
    if nearer_only or (limit is not None and len(rels) > limit):
        q = _question_vector(encoder, kb_in, question, sample)
        shapes = embed(encoder, [templates[r].replace(ENTITY, "it") for r in rels])
        near = shapes @ q
        order = np.argsort(-near, kind="stable")
        if nearer_only and fact.relation in templates:
            floor = float(embed(encoder, [templates[fact.relation].replace(ENTITY, "it")])[0] @ q)
            order = [i for i in order if near[i] > floor]
        rels = [rels[i] for i in order[:limit]]
        if not rels:
            return Lacking(None, 0.0, tuple(fact))
    keys = np.concatenate([view.keys.take(np.array([rows[at]], np.int64)),
                           embed(encoder, [templates[r].replace(ENTITY, fact.head) for r in rels])])
    device = next(adapter.parameters()).device
    w = absent_key_weights(adapter, kb_in, torch.from_numpy(keys).float().to(device), sample, mask, last_tokens)
    ratios = (w[1:] / w[0].clamp_min(1e-30)).tolist()
    order = np.argsort(ratios)[::-1]
    return Lacking(rels[order[0]], round(ratios[order[0]], 4), tuple(fact),
                   tuple((rels[i], round(ratios[i], 4)) for i in order[:5]))


def compared_relations(adapter, templates: dict[str, str], held: set[str], backing_relation: str,
                       relations: str = "trained") -> list[str]:
    """The relations whose lacking keys are compared for an entity holding the `held` relations (among them the
    backing fact's): those the KB knows (`templates`: relation -> key template) and the entity lacks, that an
    entity holding these facts may hold at all (_kinds, where the adapter knows both relations). `relations`:
    "trained" (shipped), only kinds of fact the adapter learned to tell apart (none when the backing fact is of
    a kind it never saw); "unseen", only pairs where one relation is a kind it never saw (what "trained" leaves
    out); "every", all."""
    if relations not in ("trained", "unseen", "every"):
        raise ValueError(f"relations must be trained, unseen or every, got {relations!r}")
    rels = [r for r in templates if r not in held]
    known = _trained_templates(adapter)
    if known is None:
        return rels if relations != "unseen" else []
    kinds = _kinds(adapter)
    if relations == "trained":
        if templates.get(backing_relation) not in known:
            return []
        rels = [r for r in rels if templates[r] in known]
        if kinds is not None:
            mine = [kinds.get(templates[r], frozenset()) for r in held if r in templates]
            rels = [r for r in rels if any(templates[r] in k for k in mine)]
        return rels
    if relations == "unseen" and templates.get(backing_relation) in known:
        rels = [r for r in rels if templates[r] not in known]
    mine = [kinds[templates[r]] for r in held if kinds is not None and templates.get(r) in kinds]
    return [r for r in rels if not mine or templates[r] not in known or any(templates[r] in k for k in mine)]


def _trained_templates(adapter) -> frozenset[str] | None:
    """The key templates of the relations the adapter was trained on (None: not recorded, every relation
    counts). On relation names it never saw (Wikidata's "component", "location of formation") its attention
    ranks an entity's keys erratically: calibrated on FB15k-237's relations, the check refused 15 % of
    ParaRel's answerable questions (docs/results.md, refusal v6)."""
    return _derived(adapter, "trained_relations",
                    lambda rels: frozenset(RelationNouns().template(r, "tail") for r in rels))


def _kinds(adapter) -> dict[str, frozenset[str]] | None:
    """key template -> the templates of the relations that at least LACKING_KIND_SHARE of the training heads
    holding it also hold (None: the adapter recorded no relation pairs). A film holds a release medium, never a
    "regular TV show"; a person has a place of birth, not a "country of origin": without this the check refused
    such answers whenever the near-synonym drew the question ("How was The Delta Force made available to
    viewers?" -> DVD, refused for the lacking regular TV show; docs/results.md, refusal v7)."""
    def build(pairs) -> dict[str, frozenset[str]]:
        nouns = RelationNouns()
        tpl = {r: nouns.template(r, "tail") for pair in pairs for r in pair}
        kinds: dict[str, set[str]] = {}
        for (r, s), n in pairs.items():
            if n >= LACKING_KIND_SHARE * pairs.get((r, r), 0) and n > 0:
                kinds.setdefault(tpl[r], set()).add(tpl[s])
        return {k: frozenset(v) for k, v in kinds.items()}
    return _derived(adapter, "relation_pairs", build)


def _derived(adapter, name: str, build):
    """build(adapter.<name>), kept on the adapter until that attribute is replaced; None when it is empty
    (not recorded)."""
    source = getattr(adapter, name, None)
    if not source:
        return None
    cache = adapter.__dict__.setdefault("_probe_cache", {})
    hit = cache.get(name)
    if hit is None or hit[0] is not source:
        hit = cache[name] = (source, build(source))
    return hit[1]


def _question_vector(encoder, kb_in, question: str, sample: int) -> np.ndarray:
    if kb_in.question_emb is not None:
        q = kb_in.question_emb[sample if kb_in.question_emb.shape[0] > 1 else 0].float().cpu().numpy()
    else:
        q = embed(encoder, [question])[0]
    return q / max(float(np.linalg.norm(q)), 1e-12)


_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()
_CACHE_SIZE = 65536
_LOCK = threading.Lock()


def embed(encoder, texts: list[str]) -> np.ndarray:
    """[n, d] unit sentence embeddings of `texts`, each text encoded once per process (an LRU cache: the
    same entity's keys and the templates recur from question to question)."""
    name = getattr(encoder, "name", type(encoder).__name__)
    with _LOCK:
        found = {t: _CACHE[(name, t)] for t in texts if (name, t) in _CACHE}
        for t in found:
            _CACHE.move_to_end((name, t))
    new = [t for t in dict.fromkeys(texts) if t not in found]
    if new:
        out = np.asarray(encoder.encode(new), np.float32)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        with _LOCK:
            for t, v in zip(new, out):
                _CACHE[(name, t)] = found[t] = v
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return np.stack([found[t] for t in texts])
