"""KG2KV: relation -> noun rules, the per-(relation, side) cache, record construction, LLM converter."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from atlaskv.kb.triples import Triple, read_eval_set, read_triples
from atlaskv.kb.records import (FB15K_RELATIONS, RelationNouns, clean_noun, noun_messages, openai_chat,
                           rule_template, triples_to_records)


@pytest.mark.parametrize("relation, side, template", [
    ("place of birth", "tail", "the place of birth of {entity}"),         # Wikidata noun phrase as is
    ("place of birth", "head", "the entity whose place of birth is {entity}"),
    ("was born in", "tail", "the place of birth of {entity}"),            # verb phrase -> noun
    ("produces", "tail", "the product of {entity}"),
    ("produces", "head", "the producer of {entity}"),                     # agent noun
    ("directed by", "tail", "the director of {entity}"),                  # passive -> agent noun
    ("directed by", "head", "the entity directed by {entity}"),
    ("placeOfBirth", "tail", "the place of birth of {entity}"),           # camelCase predicate
    ("/people/person/place_of_birth", "tail", "the place of birth of {entity}"),  # FB15k-237 table
    ("/people/person/spouse_s./people/marriage/spouse", "tail", "the spouse of {entity}"),
    ("collaborates with", "tail", "the entity that {entity} collaborates with"),  # unknown verb: grammatical
    ("located in", "head", "the entity located in {entity}"),
    ("followedBy", "tail", "the successor of {entity}"),                  # DBpedia sequences
    ("precededBy", "tail", "the predecessor of {entity}"),
    ("followedBy", "head", "the predecessor of {entity}"),                # A followedBy B: A is B's predecessor
])
def test_rule_templates(relation, side, template):
    assert rule_template(relation, side) == template


def test_tail_and_head_records():
    t = Triple("Apple", "produces", "iPhone")
    tail, head = triples_to_records([t], directions="both")
    assert (tail.masked, tail.key_text, tail.value_text) == ("tail", "the product of Apple", "iPhone")
    assert (head.masked, head.key_text, head.value_text) == ("head", "the producer of iPhone", "Apple")
    assert tail.question == "What is the product of Apple?"
    assert tail.answer == "The product of Apple is iPhone."
    assert tail.triple == head.triple == t  # both entries cite the same triple


def test_directions_validated():
    with pytest.raises(ValueError, match="directions"):
        triples_to_records([("a", "b", "c")], directions="sideways")


def test_eval_set_keys_match_its_readme(shared):
    """eval/README.md: the key string is `the <relation> of <head>` and the value is the tail."""
    triples, questions = read_eval_set(shared / "eval" / "fb15k")
    recs = triples_to_records(triples[:500])
    assert all(r.key_text == f"the {r.triple.relation} of {r.triple.head}" for r in recs)
    assert all(r.value_text == r.triple.tail for r in recs)
    # fb15k questions are exactly our tail-masked questions
    by_triple = {r.triple: r.question for r in recs}
    hits = [q for q in questions if q.triple in by_triple]
    assert hits and all(by_triple[q.triple] == q.question for q in hits)


def test_fb15k_train_relations_read_well(shared):
    """Every relation of the real FB15k-237 train split gets a readable key (no paths, no underscores)."""
    rep = read_triples(shared / "data" / "fb15k-237" / "train.txt")
    rels = sorted({t.relation for t in rep.triples})
    assert len(rels) == 237 and set(rels) <= set(FB15K_RELATIONS)
    for rel in rels:
        for side in ("tail", "head"):
            tpl = rule_template(rel, side)
            assert "/" not in tpl and "_" not in tpl and tpl.count("{entity}") == 1, (rel, side, tpl)


def test_cache_computes_once_per_relation_and_side():
    calls = []

    def chat(messages):
        calls.append(messages[-1]["content"])
        return "Collaborator."

    nouns = RelationNouns(chat=chat)
    triples = [Triple(f"person {i}", "collaborates with", f"person {i + 1}") for i in range(50)]
    recs = triples_to_records(triples, "both", nouns)
    assert len(recs) == 100
    assert calls == ["relation: collaborates with, missing: tail", "relation: collaborates with, missing: head"]
    assert recs[0].key_text == "the collaborator of person 0"
    # known relations never reach the LLM; a saved cache is reused as is
    triples_to_records([Triple("a", "produces", "b")], "both", nouns)
    assert nouns.llm_calls == 2
    again = RelationNouns.from_json(json.loads(json.dumps(nouns.to_json())))
    assert again.template("collaborates with", "tail") == "the collaborator of {entity}"


def test_unusable_llm_reply_falls_back_to_rules():
    nouns = RelationNouns(chat=lambda m: "I think the answer might be something long and chatty here")
    assert nouns.template("collaborates with", "tail") == rule_template("collaborates with", "tail")


@pytest.mark.parametrize("reply, noun", [("Producer", "producer"), ("the product.", "product"),
                                         ("**owner**\nbecause...", "owner"), ("", None), ("a/b", None)])
def test_clean_noun(reply, noun):
    assert clean_noun(reply) == noun


def test_prompt_has_few_shot_and_rules():
    msgs = noun_messages("sells", "tail")
    assert msgs[0]["role"] == "system" and "agent noun" in msgs[0]["content"]
    assert [m["content"] for m in msgs[1:5]] == ["relation: produces, missing: head", "producer",
                                                  "relation: produces, missing: tail", "product"]
    assert msgs[-1]["content"] == "relation: sells, missing: tail"


class _ChatHandler(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _ChatHandler.seen.append((self.path, self.headers.get("Authorization"), body))
        last = body["messages"][-1]["content"]
        noun = "teammate" if "missing: tail" in last else "team member"
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": noun}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


def test_openai_compatible_chat_endpoint():
    server = HTTPServer(("127.0.0.1", 0), _ChatHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        chat = openai_chat(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="tiny", api_key="k")
        nouns = RelationNouns(chat=chat)
        recs = triples_to_records([Triple("Ann", "plays alongside", "Bob")], "both", nouns)
        assert [r.key_text for r in recs] == ["the teammate of Ann", "the team member of Bob"]
        path, auth, body = _ChatHandler.seen[0]
        assert path == "/v1/chat/completions" and auth == "Bearer k" and body["model"] == "tiny"
    finally:
        server.shutdown()


@pytest.mark.slow
def test_local_llm_converter_gives_a_noun():
    """The real default LLM (SmolLM2-135M) through the method.md §4.2 prompt."""
    pytest.importorskip("gguf")
    from atlaskv.kb.records import local_chat

    chat = local_chat()
    reply = chat(noun_messages("manufactures", "head"))
    noun = clean_noun(reply)
    assert noun, f"unusable reply {reply!r}"  # the model's own answer, not the rule fallback
    nouns = RelationNouns(chat=chat)
    assert nouns.template("manufactures", "head") == f"the {noun} of {{entity}}" and nouns.llm_calls == 1
