"""KG2KV: a triple (head, relation, tail) becomes a key/value record (method.md §4).

Tail-masked:  key "the <noun> of <head>"        -> value <tail>   ("the place of birth of Obama" -> "Honolulu")
Head-masked:  key "the <agent noun> of <tail>"  -> value <head>   ("the producer of iPhone" -> "Apple")

A relation is turned into a key *template* (with "{entity}" for the kept side) once per (relation, side),
by rules or by an optional LLM, and the result is cached (and stored in the KB), never computed per triple.

Rules, in order:
  1. a table of known relations: the 237 FB15k-237 Freebase paths (data/fb15k237_relations.tsv) and
     common verb phrases ("was born in" -> "place of birth", "produces" -> "product" / "producer");
  2. passive "<verb>ed by" (directed by -> director) and active "<verb>s" (produces -> product, producer)
     through a small morphology table;
  3. a noun phrase ("place of birth", Wikidata style) is used as is; its head side reads
     "the entity whose place of birth is <tail>";
  4. anything else verbal reads "the entity that <head> <relation>" / "the entity that <relation> <tail>",
     which is always grammatical (the reference's naive mode wrote "the produces of X").
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Iterable, Literal, Sequence

from atlaskv.kb.triples import Triple

Side = Literal["tail", "head"]
DIRECTIONS = ("tail", "head", "both")
ENTITY = "{entity}"


@dataclass(frozen=True)
class KVRecord:
    """One KB entry. `masked` says which side of the triple is the value."""
    triple: Triple
    masked: Side
    key_text: str
    value_text: str
    question: str
    answer: str


# ---------------------------------------------------------------------------------------------------
# Relation text normalisation

def readable_relation(relation: str) -> str:
    """'placeOfBirth' / 'place_of_birth' / 'http://x/place_of_birth' -> 'place of birth'.

    Plain text keeps its case ("regular TV show"); machine names (IRIs, camelCase, snake_case) are lowercased.
    """
    r = relation.strip()
    machine = "://" in r or r.startswith("/") or (" " not in r and ("_" in r or re.search(r"[a-z][A-Z]", r)))
    if "://" in r or r.startswith("/"):
        r = re.split(r"[/#]", r.rstrip("/#"))[-1] or r
    if machine:
        r = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", r).replace("_", " ").lower()
    return re.sub(r"\s+", " ", r).strip()


# ---------------------------------------------------------------------------------------------------
# Rule tables

def _load_fb15k_table() -> dict[str, tuple[str, str]]:
    try:
        text = resources.files("atlaskv").joinpath("data/fb15k237_relations.tsv").read_text("utf-8")
    except FileNotFoundError:
        return {}
    rows = csv.DictReader(text.splitlines(), delimiter="\t")
    return {r["relation_path"]: (r["phrase"], r.get("inverse_phrase") or "") for r in rows}


FB15K_RELATIONS: dict[str, tuple[str, str]] = _load_fb15k_table()

# verb phrase -> (tail noun, head noun); "" = no natural noun for that side (generic template is used)
KNOWN_VERB_PHRASES: dict[str, tuple[str, str]] = {
    "born in": ("place of birth", ""), "was born in": ("place of birth", ""),
    "is born in": ("place of birth", ""), "birthplace": ("place of birth", ""),
    "born on": ("date of birth", ""), "was born on": ("date of birth", ""),
    "died in": ("place of death", ""), "died on": ("date of death", ""), "buried in": ("place of burial", ""),
    "lives in": ("place of residence", "resident"), "resides in": ("place of residence", "resident"),
    "located in": ("location", ""), "is located in": ("location", ""),
    "headquartered in": ("headquarters location", ""), "is headquartered in": ("headquarters location", ""),
    "works for": ("employer", "employee"), "works at": ("employer", "employee"),
    "employed by": ("employer", "employee"), "is employed by": ("employer", "employee"),
    "educated at": ("alma mater", "alumnus"), "studied at": ("alma mater", "alumnus"),
    "graduated from": ("alma mater", "graduate"), "attended": ("alma mater", "alumnus"),
    "married to": ("spouse", "spouse"), "is married to": ("spouse", "spouse"), "married": ("spouse", "spouse"),
    "citizen of": ("country of citizenship", "citizen"), "is a citizen of": ("country of citizenship", "citizen"),
    "member of": ("affiliation", "member"), "is a member of": ("affiliation", "member"),
    "part of": ("larger whole", "component"), "is part of": ("larger whole", "component"),
    "has part": ("component", "larger whole"), "contains": ("component", "container"),
    "instance of": ("type", "instance"), "is a": ("type", "instance"), "is an": ("type", "instance"),
    "subclass of": ("superclass", "subclass"),
    "capital of": ("country", "capital"), "is the capital of": ("country", "capital"),
    "has capital": ("capital", "country"), "capital": ("capital", "country"),
    "speaks": ("language spoken", "speaker"), "plays": ("instrument", "player"),
    "plays for": ("team", "player"), "won": ("award", "winner"), "received": ("award", "recipient"),
    "starred in": ("film", "cast member"), "acted in": ("film", "actor"),
    "named after": ("namesake", ""), "shares border with": ("neighbor", "neighbor"),
    "produces": ("product", "producer"), "produce": ("product", "producer"),
    "founded": ("organization founded", "founder"), "owns": ("property", "owner"),
    "wrote": ("work", "author"), "writes": ("work", "author"), "directed": ("film directed", "director"),
    "created": ("creation", "creator"), "creates": ("creation", "creator"),
    "developed": ("product developed", "developer"), "develops": ("product", "developer"),
    "invented": ("invention", "inventor"), "discovered": ("discovery", "discoverer"),
    "leads": ("organization led", "leader"), "manages": ("organization managed", "manager"),
    "governs": ("territory governed", "governor"), "sells": ("sale", "seller"),
    "achieved": ("achievement", "achiever"), "achieves": ("achievement", "achiever"),
    "advises": ("advisee", "advisor"), "teaches": ("subject taught", "teacher"),
    "is participated by": ("participant", "participation"), "has purpose": ("purpose", "origin"),
    # sequences: "A followed by B" names A's successor ("the entity that A followed by" read as nothing)
    "followed by": ("successor", "predecessor"), "succeeded by": ("successor", "predecessor"),
    "preceded by": ("predecessor", "successor"), "follows": ("predecessor", "successor"),
}

# base verb -> (agent noun, object noun); used for "<verb>s X" and "<verb>ed by X"
VERB_NOUNS: dict[str, tuple[str, str]] = {
    "produce": ("producer", "product"), "direct": ("director", "film"), "write": ("author", "work"),
    "create": ("creator", "creation"), "found": ("founder", "organization founded"),
    "own": ("owner", "property"), "develop": ("developer", "product"), "design": ("designer", "design"),
    "compose": ("composer", "composition"), "publish": ("publisher", "publication"),
    "manufacture": ("manufacturer", "product"), "invent": ("inventor", "invention"),
    "discover": ("discoverer", "discovery"), "build": ("builder", "building"), "lead": ("leader", "group led"),
    "manage": ("manager", "organization managed"), "govern": ("governor", "territory governed"),
    "advise": ("advisor", "advisee"), "teach": ("teacher", "subject taught"), "sell": ("seller", "sale"),
    "achieve": ("achiever", "achievement"), "perform": ("performer", "performance"),
    "paint": ("painter", "painting"), "sing": ("singer", "song"), "record": ("recorder", "recording"),
    "translate": ("translator", "translation"), "edit": ("editor", "edited work"),
    "illustrate": ("illustrator", "illustration"), "fund": ("funder", "funded project"),
    "sponsor": ("sponsor", "sponsored entity"), "operate": ("operator", "operation"),
    "employ": ("employer", "employee"), "train": ("trainer", "trainee"), "coach": ("coach", "team coached"),
    "narrate": ("narrator", "narrated work"), "play": ("player", "role"), "distribute": ("distributor", "distributed work"),
    "host": ("host", "hosted event"), "organize": ("organizer", "event organized"),
    "specialize": ("specialist", "specialty"), "influence": ("influence", "influenced person"),
}
_IRREGULAR_PARTICIPLES = {"written": "write", "built": "build", "led": "lead", "sung": "sing",
                          "sold": "sell", "taught": "teach", "made": "make", "founded": "found"}
_STATIVE_PARTICIPLES = {"located", "based", "headquartered", "situated", "named", "known", "set", "buried",
                        "listed", "housed", "centered", "centred", "made", "written", "owned", "directed"}
_AUXILIARIES = {"is", "was", "are", "were", "has", "had", "have", "been", "be", "does", "did",
                "can", "will", "would", "may", "became", "becomes"}
_TRAILING_PREPOSITIONS = {"by", "in", "to", "from", "at", "on", "with", "for", "into", "as", "of", "about"}


def _verb_base(word: str) -> str | None:
    """'produces' -> 'produce', 'directed' -> 'direct', 'written' -> 'write'; None if not a known verb."""
    if word in _IRREGULAR_PARTICIPLES:
        return _IRREGULAR_PARTICIPLES[word]
    for suffix, add in (("ies", "y"), ("es", ""), ("s", ""), ("ied", "y"), ("ed", ""), ("ed", "e"),
                        ("d", ""), ("", "")):
        if suffix and not word.endswith(suffix):
            continue
        stem = word[: len(word) - len(suffix)] if suffix else word
        for cand in (stem + add, stem[:-1] if len(stem) > 2 and stem[-1] == stem[-2] else None):
            if cand and cand in VERB_NOUNS:
                return cand
    return None


def _looks_verbal(words: list[str]) -> bool:
    # "produces", "is part of", "works for" are verbal; "record label", "directed film" are noun phrases
    one_inflected_verb = len(words) == 1 and (base := _verb_base(words[0])) is not None and base != words[0]
    return words[0] in _AUXILIARIES or words[-1] in _TRAILING_PREPOSITIONS or one_inflected_verb


def rule_template(relation: str, side: Side) -> str:
    """Key template for `relation` with the kept entity as {entity}; `side` is the masked side."""
    if relation in FB15K_RELATIONS:
        phrase, inverse = FB15K_RELATIONS[relation]
        return _noun_template(phrase, inverse, side)
    rel = readable_relation(relation)
    if rel.lower() in KNOWN_VERB_PHRASES:
        tail_noun, head_noun = KNOWN_VERB_PHRASES[rel.lower()]
        if side == "tail" or head_noun:
            return _noun_template(tail_noun, head_noun, side)
        return _verbal_template(rel, side)
    words = rel.lower().split()
    if not words:
        raise ValueError("empty relation")
    # passive "<aux>? <participle> by": directed by -> tail is the director
    if words[-1] == "by":
        core = [w for w in words[:-1] if w not in _AUXILIARIES]
        base = _verb_base(core[-1]) if core else None
        if base:
            agent, _ = VERB_NOUNS[base]
            # "the film of Spielberg" loses the relation; "the entity directed by Spielberg" keeps it
            return f"the {agent} of {ENTITY}" if side == "tail" else f"the entity {' '.join(core)} by {ENTITY}"
    # active "<verb>s": produces -> tail is the product, head is the producer
    if len(words) == 1 and (base := _verb_base(words[0])) and words[0] != base:
        agent, obj = VERB_NOUNS[base]
        return f"the {obj} of {ENTITY}" if side == "tail" else f"the {agent} of {ENTITY}"
    if _looks_verbal(words):
        return _verbal_template(rel, side)
    return _noun_template(rel, "", side)


def _verbal_template(rel: str, side: Side) -> str:
    """Always grammatical: "the entity that Apple produces" / "the entity located in Paris"."""
    if side == "tail":
        return f"the entity that {ENTITY} {rel}"
    stative = rel.split()[0] in _STATIVE_PARTICIPLES  # "located in" needs no "that"; "died in" does
    return f"the entity {rel} {ENTITY}" if stative else f"the entity that {rel} {ENTITY}"


def _noun_template(noun: str, inverse: str, side: Side) -> str:
    if side == "tail":
        return f"the {noun} of {ENTITY}"
    if inverse:
        return f"the {inverse} of {ENTITY}"
    return f"the entity whose {noun} is {ENTITY}"


# ---------------------------------------------------------------------------------------------------
# Optional LLM converter (method.md §4.2 prompt), local default LLM or any OpenAI-compatible endpoint

NOUN_SYSTEM_PROMPT = (
    "Convert a relation phrase to its natural noun equivalent based on entity position. "
    "If the head is missing and the relation is passive, give the agent noun (govern -> governor, "
    "advise -> advisor, specialize -> specialist). If the tail is missing and the relation is active, "
    "give the object noun (produce -> production or product, achieve -> achievement, sell -> sale). "
    "Special cases: 'is participated by' -> participation (head) / participant (tail); "
    "'has purpose' -> origin (head) / purpose (tail). Output only the noun."
)
NOUN_FEW_SHOT = [("produces", "head", "producer"), ("produces", "tail", "product")]


def noun_messages(relation: str, side: Side) -> list[dict]:
    msgs = [{"role": "system", "content": NOUN_SYSTEM_PROMPT}]
    for rel, missing, noun in NOUN_FEW_SHOT:
        msgs += [{"role": "user", "content": f"relation: {rel}, missing: {missing}"},
                 {"role": "assistant", "content": noun}]
    msgs.append({"role": "user", "content": f"relation: {readable_relation(relation)}, missing: {side}"})
    return msgs


def clean_noun(text: str) -> str | None:
    """First line of a model's reply, as a short lowercase noun phrase; None if unusable."""
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    line = re.sub(r"^(the|a|an)\s+", "", line.strip().strip("\"'`*.:;,!").lower())
    line = re.sub(r"\s+", " ", line)
    if not line or len(line.split()) > 6 or not re.fullmatch(r"[\w' -]+", line):
        return None
    return line


def openai_chat(base_url: str | None = None, model: str = "gpt-4o-mini", api_key: str | None = None,
                timeout: float = 60.0) -> Callable[[list[dict]], str]:
    """A chat function over an OpenAI-compatible /chat/completions endpoint (env OPENAI_BASE_URL/KEY)."""
    import os

    import httpx

    url = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
    key = api_key or os.environ.get("OPENAI_API_KEY")
    client = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {key}"} if key else {})

    def chat(messages: list[dict]) -> str:
        r = client.post(f"{url}/chat/completions",
                        json={"model": model, "messages": messages, "temperature": 0, "max_tokens": 12})
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]

    return chat


def local_chat(model_name: str | None = None) -> Callable[[list[dict]], str]:
    """A chat function over the local default LLM (greedy, a few tokens)."""
    from atlaskv.model.llm import load_base_model

    model, tok = load_base_model(model_name)

    def chat(messages: list[dict]) -> str:
        import torch

        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=8, do_sample=False)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    return chat


# ---------------------------------------------------------------------------------------------------
# The cache: (relation, side) -> template, computed once

class RelationNouns:
    """Maps (relation, masked side) to a key template, by rules or an LLM, computing each once.

    `chat` (optional) is a function messages -> reply text; when given, relations that the rule
    tables do not know (rules 3-4) are asked to it, and a usable reply becomes "the <noun> of {entity}".
    """

    def __init__(self, cache: dict[str, str] | None = None, chat: Callable[[list[dict]], str] | None = None):
        self.cache: dict[str, str] = dict(cache or {})
        self.chat = chat
        self.llm_calls = 0

    @staticmethod
    def _key(relation: str, side: Side) -> str:
        return f"{side}\t{relation}"

    def template(self, relation: str, side: Side) -> str:
        k = self._key(relation, side)
        if k not in self.cache:
            self.cache[k] = self._compute(relation, side)
        return self.cache[k]

    def _compute(self, relation: str, side: Side) -> str:
        known = relation in FB15K_RELATIONS or readable_relation(relation).lower() in KNOWN_VERB_PHRASES
        if self.chat is not None and not known:
            self.llm_calls += 1
            noun = clean_noun(self.chat(noun_messages(relation, side)))
            if noun:
                return f"the {noun} of {ENTITY}"
        return rule_template(relation, side)

    def to_json(self) -> dict[str, str]:
        return dict(sorted(self.cache.items()))

    @classmethod
    def from_json(cls, data: dict[str, str], chat=None) -> "RelationNouns":
        return cls(data, chat)


# ---------------------------------------------------------------------------------------------------
# Records

def question_for(key_text: str) -> str:
    return f"What is {key_text}?"


def answer_for(key_text: str, value_text: str) -> str:
    return f"{key_text[0].upper()}{key_text[1:]} is {value_text}."


def make_record(triple: Triple, side: Side, nouns: RelationNouns) -> KVRecord:
    kept, value = (triple.head, triple.tail) if side == "tail" else (triple.tail, triple.head)
    key = nouns.template(triple.relation, side).replace(ENTITY, kept)
    return KVRecord(triple, side, key, value, question_for(key), answer_for(key, value))


def triples_to_records(triples: Iterable[Triple | Sequence[str]], directions: str = "tail",
                       nouns: RelationNouns | None = None) -> list[KVRecord]:
    """KB entries for `triples`: tail-masked by default; 'both' gives two entries citing one triple."""
    if directions not in DIRECTIONS:
        raise ValueError(f"directions must be one of {DIRECTIONS}, got {directions!r}")
    nouns = nouns if nouns is not None else RelationNouns()
    sides: tuple[Side, ...] = ("tail", "head") if directions == "both" else (directions,)  # type: ignore
    out = []
    for t in triples:
        t = t if isinstance(t, Triple) else Triple(*t)
        out.extend(make_record(t, s, nouns) for s in sides)
    return out


def to_jsonl(records: Iterable[KVRecord]) -> str:
    return "".join(json.dumps({"head": r.triple.head, "relation": r.triple.relation, "tail": r.triple.tail,
                               "masked": r.masked, "key": r.key_text, "value": r.value_text,
                               "question": r.question, "answer": r.answer}, ensure_ascii=False) + "\n"
                   for r in records)
