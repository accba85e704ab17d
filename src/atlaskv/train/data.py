"""Training data: the config, records from triples, and the batches (questions, answers, a KB per batch)."""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from atlaskv.defaults import REFUSAL
from atlaskv.kb.encoder import DEFAULT_ENCODER, encode_records, load_encoder
from atlaskv.kb.records import RelationNouns, answer_for, make_record
from atlaskv.kb.triples import Triple, read_triples
from atlaskv.model.chat import chat_text

QUESTION_TEMPLATES = [
    "What is {k}?", "Tell me {k}.", "Do you know {k}?", "Can you tell me {k}?", "What's {k}?",
    "Which is {k}?", "Identify {k}.", "I would like to know {k}.", "Please tell me {k}.", "Name {k}.",
    "Who or what is {k}?", "Give me {k}.", "Could you tell me {k}?", "{K}?", "Look up {k}.",
    "Do you happen to know {k}?",
]


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    base_model: str | None = None
    encoder: str = DEFAULT_ENCODER
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.01
    kb_layer_frequency: int = 3
    question_input: bool = False
    value_source: str | None = None  # the value path (values.py): "encoder" or "encoder+llm_copy"; None: the init adapter's, else "encoder"
    token_gain_init: float = 0.0    # token values: starting absolute gain of the last KB layer (others start at 0)
    trainable: str = "all"          # "values": only the value path learns (keys and KB queries stay as initialised)
    kb_scale_factor: float | None = None  # inference setting stored in the adapter (mode "cap"), not trained
    answer_loss_weight: float = 1.0
    retrieval_loss_weight: float = 1.0
    distractors_start: int = 4
    distractors_every: int = 100
    distractors_max: int = 64
    same_head_negatives: int = 2
    same_relation_negatives: int = 0  # per question, other entities' facts of its relation (and masked side)
    phrasings: str | None = None      # TSV relation<TAB>question with {head}: natural ways to ask for a tail
    phrasing_rate: float = 0.5        # ... the share of single-fact tail questions asked in one of them
    relation_aliases: str | None = None  # TSV relation<TAB>alias[<TAB>split]: other names of a relation
    alias_rate: float = 0.5           # ... the share of its facts renamed (seeded by `seed`)
    multi_entity_every: int = 3
    refusal_rate: float = 0.1
    head_masked_rate: float = 0.3
    shuffle_values: bool = False
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    checkpoint_every: int = 100
    eval_every: int = 50
    threads: int | None = None
    max_minutes: float | None = None  # stop cleanly (checkpoint + adapter) after this long; --resume goes on
    init_adapter: str | None = None  # fine-tune: start from this adapter's weights ("default": the shipped one)


# ------------------------------------------------------------------------------------------------ data
@dataclass
class TrainData:
    records: list                 # KVRecord
    key_emb: np.ndarray           # [R, d_in] float32
    value_emb: np.ndarray
    by_relation: dict = field(default_factory=dict)   # relation -> record indices
    by_kept: dict = field(default_factory=dict)       # kept entity -> record indices (hard negatives)
    relation_p: np.ndarray | None = None
    relations: list = field(default_factory=list)
    digest: str = ""
    phrasings: dict = field(default_factory=dict)     # relation -> questions with {head} (TrainConfig.phrasings)
    canonical: dict = field(default_factory=dict)     # alias -> the relation it renames (TrainConfig.relation_aliases)

    def relation_of(self, record) -> str:
        """The record's relation under its own name (an alias renames it only in the key text)."""
        return self.canonical.get(record.triple.relation, record.triple.relation)


def read_phrasings(path: str | Path) -> dict[str, list[str]]:
    """relation -> questions from a TSV of `relation<TAB>question` lines (a `relation<TAB>question` header is
    skipped); every question holds `{head}` once and no other braces. A bad line stops with its number."""
    out: dict[str, list[str]] = {}
    lines = Path(path).read_text("utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip() or (n == 1 and line.strip().casefold() == "relation\tquestion"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ValueError(f"{path}:{n}: expected relation<TAB>question, got {line[:80]!r}")
        rel, q = parts[0].strip(), parts[1].strip()
        if q.count("{head}") != 1 or q.replace("{head}", "").count("{") or q.replace("{head}", "").count("}"):
            raise ValueError(f"{path}:{n}: the question must hold {{head}} exactly once and no other braces: {q[:80]!r}")
        out.setdefault(rel, []).append(q)
    if not out:
        raise ValueError(f"{path}: no phrasings")
    return out


def read_relation_aliases(path: str | Path) -> dict[str, list[str]]:
    """relation -> aliases from a TSV of `relation<TAB>alias` or `relation<TAB>alias<TAB>split` lines (a header
    starting `relation<TAB>alias` is skipped; rows whose split is not "train" are held out and skipped). A bad
    line stops with its number."""
    out: dict[str, list[str]] = {}
    lines = Path(path).read_text("utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip() or (n == 1 and line.casefold().startswith("relation\talias")):
            continue
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            raise ValueError(f"{path}:{n}: expected relation<TAB>alias[<TAB>split], got {line[:80]!r}")
        if parts[0].casefold() == parts[1].casefold():
            raise ValueError(f"{path}:{n}: the alias is the relation's own name: {parts[1]!r}")
        if len(parts) == 3 and parts[2] != "train":
            continue
        out.setdefault(parts[0], []).append(parts[1])
    if not out:
        raise ValueError(f"{path}: no aliases")
    return out


def rename_relations(triples: list[Triple], aliases: dict[str, list[str]], rate: float,
                     seed: int) -> tuple[list[Triple], dict[str, str]]:
    """`rate` of each aliased relation's facts carry one of its aliases (seeded), and alias -> relation. An
    alias that is another relation's own name would merge two kinds of fact: it stops with the pair."""
    names = {t.relation for t in triples}
    canonical: dict[str, str] = {}
    for rel, alist in aliases.items():
        for a in alist:
            if a in names or canonical.get(a, rel) != rel:
                raise ValueError(f"alias {a!r} of {rel!r} is also the name of {canonical.get(a, a)!r}")
            canonical[a] = rel
    rng = np.random.default_rng([seed, 7])
    out = []
    for t in triples:
        own = aliases.get(t.relation)
        if own and rng.random() < rate:
            t = Triple(t.head, own[int(rng.integers(len(own)))], t.tail)
        out.append(t)
    return out, canonical


def build_records(triples: list[Triple], canonical: dict[str, str] | None = None) -> list:
    """Tail- and head-masked records whose key names exactly one value (ambiguous keys dropped). With aliases
    (`canonical`: alias -> relation), ambiguity is judged under the relation's own name: renaming part of "the
    people of nationality X" must not make one of them look like the only one."""
    nouns = RelationNouns()
    canonical = canonical or {}
    recs = [make_record(t, side, nouns) for t in triples for side in ("tail", "head")]
    own = [make_record(Triple(t.head, canonical[t.relation], t.tail), side, nouns).key_text
           if t.relation in canonical else None for t in triples for side in ("tail", "head")]
    group = [(o or r.key_text).casefold() for r, o in zip(recs, own)]
    values_by_key = defaultdict(set)
    for r, g in zip(recs, group):
        values_by_key[g].add(r.value_text.casefold())
    return [r for r, g in zip(recs, group) if len(values_by_key[g]) == 1]


def prepare_data(cfg: TrainConfig, cache_dir: Path) -> TrainData:
    phrasings = read_phrasings(cfg.phrasings) if cfg.phrasings else {}  # a bad file stops before the encoding
    aliases = read_relation_aliases(cfg.relation_aliases) if cfg.relation_aliases else {}
    triples = read_triples(cfg.data).triples
    canonical: dict[str, str] = {}
    if aliases:
        if not {t.relation for t in triples} & set(aliases):
            raise ValueError(f"{cfg.relation_aliases}: none of its relations is in the training data "
                             f"(e.g. {sorted(aliases)[0]!r}); nothing would be renamed")
        triples, canonical = rename_relations(triples, aliases, cfg.alias_rate, cfg.seed)
    records = build_records(triples, canonical)
    digest = hashlib.sha256("\n".join(f"{r.key_text}\t{r.value_text}" for r in records).encode()).hexdigest()[:16]
    key_emb, value_emb = encode_records(load_encoder(cfg.encoder), records, show_progress=True, cache_dir=cache_dir)
    data = TrainData(records, key_emb, value_emb, digest=digest, canonical=canonical)
    for i, r in enumerate(records):  # by the relation's own name: its aliases share its sampling and neighbours
        data.by_relation.setdefault((data.relation_of(r), r.masked), []).append(i)
        kept = r.triple.head if r.masked == "tail" else r.triple.tail
        data.by_kept.setdefault(kept, []).append(i)
    data.relations = sorted(data.by_relation)
    counts = np.array([len(data.by_relation[k]) for k in data.relations], float)
    data.relation_p = np.sqrt(counts) / np.sqrt(counts).sum()  # balance: gender must not drown time zone
    data.phrasings = phrasings
    return data


def n_distractors(cfg: TrainConfig, step: int) -> int:
    return min(cfg.distractors_start * (step // cfg.distractors_every + 1), cfg.distractors_max)


@dataclass
class Batch:
    prompts: list[str]
    answers: list[str]
    kb_rows: np.ndarray           # record indices in the KB, in KB order
    gold: list[list[int]]         # per sample: positions in the KB of its own facts ([] for refusals)


def make_batch(cfg: TrainConfig, data: TrainData, step: int, rng: np.random.Generator | None = None) -> Batch:
    rng = rng or np.random.default_rng([cfg.seed, step])
    multi = cfg.multi_entity_every > 0 and step % cfg.multi_entity_every == cfg.multi_entity_every - 1
    prompts, facts_of, refusal, kb = [], [], [], []
    for _ in range(cfg.batch_size):
        facts = []
        for _ in range(2 if multi else 1):
            masked = "head" if rng.random() < cfg.head_masked_rate else "tail"
            for _ in range(10):
                rel = data.relations[rng.choice(len(data.relations), p=data.relation_p)]
                if rel[1] == masked:
                    break
            facts.append(int(rng.choice(data.by_relation[rel])))
        refusal.append(rng.random() < cfg.refusal_rate)
        keys = [data.records[i].key_text for i in facts]
        tpl = QUESTION_TEMPLATES[rng.integers(len(QUESTION_TEMPLATES))]
        prompts.append(tpl.format(k=keys[0], K=keys[0][0].upper() + keys[0][1:]) if len(keys) == 1
                       else f"What is {keys[0]}, and what is {keys[1]}?")
        # users ask "Where did X die?", not only "the place of death of X": natural phrasings of the relation
        # (the RNG is only drawn on when the relation has some, so runs without them keep their batches)
        rec = data.records[facts[0]]
        own = data.phrasings.get(data.relation_of(rec)) if len(facts) == 1 and rec.masked == "tail" else None
        if own and rng.random() < cfg.phrasing_rate:
            prompts[-1] = own[rng.integers(len(own))].replace("{head}", rec.triple.head)
        for i in facts:  # hard negatives: other facts about the same entity
            kept = data.records[i].triple.head if data.records[i].masked == "tail" else data.records[i].triple.tail
            others = [j for j in data.by_kept.get(kept, []) if j != i]
            if others:
                kb += [int(j) for j in rng.choice(others, min(cfg.same_head_negatives, len(others)), replace=False)]
            # neighbours of the same kind: in a large KB the gender of many people sits beside the asked one; without
            # them in training, a question whose fact is missing copies a neighbour's "Male" (docs/training.md)
            if cfg.same_relation_negatives:
                rec = data.records[i]
                pool = data.by_relation[(data.relation_of(rec), rec.masked)]
                picks = rng.choice(len(pool), min(cfg.same_relation_negatives + 1, len(pool)), replace=False)
                kb += [int(pool[p]) for p in picks if pool[p] != i][:cfg.same_relation_negatives]
        facts_of.append(facts)
    kb += [int(j) for j in rng.integers(0, len(data.records), n_distractors(cfg, step))]
    # the same fact drawn for a refusal and for an answered question: answer both
    needed = {i for f, r in zip(facts_of, refusal) if not r for i in f}
    refusal = [r and not (set(f) & needed) for f, r in zip(facts_of, refusal)]
    # a refused fact must not sneak in as another question's negative or distractor
    banned = {i for f, r in zip(facts_of, refusal) if r for i in f}
    kb += [i for f, r in zip(facts_of, refusal) if not r for i in f]
    kb_rows = np.array(list(dict.fromkeys(i for i in kb if i not in banned)), dtype=np.int64)
    rng.shuffle(kb_rows)
    pos = {int(i): p for p, i in enumerate(kb_rows)}
    answers = [REFUSAL if r else " ".join(answer_for(data.records[i].key_text, data.records[i].value_text) for i in f)
               for f, r in zip(facts_of, refusal)]
    gold = [[] if r else [pos[i] for i in f] for f, r in zip(facts_of, refusal)]
    return Batch(prompts, answers, kb_rows, gold)


# ------------------------------------------------------------------------------------------------ model io
def answer_suffix(tokenizer) -> str:
    """What closes a trained answer: the chat format's end-of-turn token (<|im_end|>, Gemma's <end_of_turn>)."""
    from atlaskv.model.chat import end_of_turn

    return end_of_turn(tokenizer)


def encode_batch(tokenizer, prompts: list[str], answers: list[str], device) -> dict:
    """input_ids, attention_mask, labels (-100 outside answers), prompt_mask (question tokens)."""
    ids, labels, pmask = [], [], []
    suffix = answer_suffix(tokenizer)
    for q, a in zip(prompts, answers):
        p = tokenizer(chat_text(tokenizer, q), add_special_tokens=False)["input_ids"]
        t = tokenizer(a + suffix, add_special_tokens=False)["input_ids"]
        ids.append(p + t)
        labels.append([-100] * len(p) + t)
        pmask.append([1] * len(p) + [0] * len(t))
    n = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = {
        "input_ids": torch.tensor([x + [pad] * (n - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids]),
        "labels": torch.tensor([x + [-100] * (n - len(x)) for x in labels]),
        "prompt_mask": torch.tensor([x + [0] * (n - len(x)) for x in pmask]),
    }
    return {k: v.to(device) for k, v in out.items()}
