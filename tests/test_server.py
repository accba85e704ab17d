"""The OpenAI-compatible server over real HTTP on localhost, driven by the official openai client, with the
real SmolLM2 + the shipped adapter + the bundled demo KB (one model load and one KB build per module)."""
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("gguf")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
import httpx

from atlaskv.defaults import MAX_NEW_TOKENS, REFUSAL, REFUSE_BELOW
from atlaskv.model.atlaskv import AtlasKV
from atlaskv.serve.routes import create_app
from atlaskv.kb.store import KnowledgeBase

pytestmark = pytest.mark.slow
KEY = "sk-test-" + "x" * 24
MAX_BODY = 32 * 1024
# not in the demo KB; without it the model answers "Nigeria"
NEW_FACT = {"head": "Mount Kilimanjaro", "relation": "country", "tail": "Tanzania"}
NEW_Q = "What is the country of Mount Kilimanjaro?"


@pytest.fixture(scope="module")
def model(trained_model):
    return trained_model


@pytest.fixture(scope="module")
def kb(tmp_path_factory, demo_facts, encoder):
    return KnowledgeBase.build(demo_facts, tmp_path_factory.mktemp("srv") / "kb", encoder=encoder)


@pytest.fixture(scope="module")
def url(model, kb):
    app = create_app(model, kb, api_key=KEY, max_body_bytes=MAX_BODY, max_tokens=128)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held until uvicorn takes the socket over
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, question, **kw):
    r = client.chat.completions.create(model="atlaskv", messages=[{"role": "user", "content": question}], **kw)
    return r.choices[0].message.content, r.model_extra["atlaskv"]


def cited(extra):
    return [(c["head"], c["relation"], c["tail"]) for c in extra["citations"]]


def test_plain_completion_with_citations(client):
    text, extra = ask(client, "What is the capital of Canada?")
    assert "Ottawa" in text
    assert cited(extra)[0] == ("Canada", "capital", "Ottawa")
    assert all(0 < c["weight"] <= 1 for c in extra["citations"]) and 0 < extra["kb_attention_mass"] < 1
    assert extra["kb_size"] > 3000 and extra["refused"] is False
    assert extra["support"] is None or extra["support"] > REFUSE_BELOW  # None: no cited fact names another value


def test_says_so_when_no_fact_fits(client):
    q = "What is the capital of Wakanda?"  # nothing in the KB: the model alone would invent a city
    text, extra = ask(client, q)
    assert text == REFUSAL and extra["refused"] is True and extra["citations"]
    assert all("Wakanda" not in c["head"] for c in extra["citations"])  # no cited fact is about it
    chunks = list(client.chat.completions.create(model="atlaskv", messages=[{"role": "user", "content": q}],
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == REFUSAL
    assert chunks[-1].model_extra["atlaskv"]["refused"] is True


def test_says_which_fact_it_lacks(client):
    """The demo KB holds nine facts about John F. Kennedy but not his birthplace: refused over HTTP, streamed or
    not, with the missing fact named (model/probes.py)."""
    q = "What is the place of birth of John F. Kennedy?"
    text, extra = ask(client, q)
    assert text == REFUSAL and extra["refused"] is True
    assert extra["missing"] == ["John F. Kennedy", "place of birth"] and cited(extra)[0][0] == "John F. Kennedy"
    chunks = list(client.chat.completions.create(model="atlaskv", messages=[{"role": "user", "content": q}],
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == REFUSAL
    assert chunks[-1].model_extra["atlaskv"]["missing"] == ["John F. Kennedy", "place of birth"]
    _, extra = ask(client, "What is the capital of Canada?")
    assert extra["missing"] is None


def test_streamed_completion_matches_plain(client):
    q = "What is the music composer of Jurassic Park?"
    plain, plain_extra = ask(client, q)
    chunks = list(client.chat.completions.create(model="atlaskv", messages=[{"role": "user", "content": q}],
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.strip() == plain and "John Williams" in plain  # greedy: streaming gives the same answer
    assert chunks[-1].choices[0].finish_reason == "stop"
    extras = [c.model_extra.get("atlaskv") for c in chunks]
    assert all(e is None for e in extras[:-1])  # citations come once, in the final chunk
    assert cited(extras[-1]) == cited(plain_extra) and cited(extras[-1])[0][0] == "Jurassic Park"


def test_live_add_then_delete(client, url):
    h = {"Authorization": f"Bearer {KEY}"}
    before = httpx.get(url + "/health", headers=h).json()["kb"]
    r = httpx.post(url + "/v1/kb/triples", json={"triples": [NEW_FACT]}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json() == {"added": 1, "duplicates": 0, "version": before["version"] + 1,
                        "triples": before["triples"] + 1}
    text, extra = ask(client, NEW_Q)  # the very next request sees the new fact
    # grounding, not wording: the new fact must be the most-cited one. Whether the 135M model then says
    # "Tanzania" or an embedding neighbour ("Kenya") is the known value-to-words weakness (README Results).
    assert cited(extra)[0] == tuple(NEW_FACT.values())
    r = httpx.request("DELETE", url + "/v1/kb/triples", json={"triples": [NEW_FACT]}, headers=h)
    assert r.json() == {"removed": 1, "not_found": 0, "version": before["version"] + 2,
                        "triples": before["triples"]}
    text, extra = ask(client, NEW_Q)
    assert all(c[0] != NEW_FACT["head"] for c in cited(extra)) and "Tanzania" not in text
    r = httpx.request("DELETE", url + "/v1/kb/triples", json={"triples": [NEW_FACT]}, headers=h)
    assert r.json()["removed"] == 0 and r.json()["not_found"] == 1


def test_api_key_required(url):
    for key in ("", "sk-wrong", KEY[:-1]):
        bad = openai.OpenAI(base_url=url + "/v1", api_key=key or "unset", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401
    r = httpx.get(url + "/health")  # no header at all
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == ["atlaskv-SmolLM2-135M-Instruct"]
    r = httpx.get(url + "/health", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["kb"]["triples"] > 3000


def test_oversized_body_is_413(client):
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, "What is the capital of Canada? " * 2000)  # ~60 KB > 32 KiB
    assert e.value.status_code == 413 and "body" in e.value.message


def test_malformed_and_invalid_requests_get_json_errors(url, client):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(url + "/v1/chat/completions", content=b'{"messages": [', headers=h)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": "x"}, headers=h)
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/kb/triples", json={"triples": [{"head": " ", "relation": "r", "tail": "t"}]}, headers=h)
    assert r.status_code == 422
    for bad in ({"max_tokens": 100_000}, {"messages": [{"role": "user", "content": "hi"}] * 100}):
        with pytest.raises(openai.UnprocessableEntityError):
            client.chat.completions.create(**{"model": "atlaskv", "messages": [{"role": "user", "content": "hi"}],
                                              **bad})
    r = httpx.get(url + "/v1/nope", headers=h)
    assert r.status_code == 404 and "error" in r.json()


def test_eight_concurrent_clients(url, model, kb):
    qs = [json.loads(line) for line in open(kb_questions()).readlines()[:8]]
    # the reference: the same greedy answers asked one by one (the server is idle while this runs)
    expected = [model.ask(q["question"], kb, max_new_tokens=MAX_NEW_TOKENS).or_refusal().text for q in qs]

    def one(q):
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        return ask(c, q["question"])

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, qs))
    for q, exp, (text, extra) in zip(qs, expected, got):
        assert text == exp
        assert cited(extra)[0] == (q["head"], q["relation"], q["tail"])


def kb_questions():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "examples" / "demo" / "questions.jsonl"


def test_kb_write_does_not_wait_for_answers(client, url):
    """Eight answers in flight: an add posted behind them is acknowledged before the last of them ends (the
    serial server answered it after all eight), and a question asked after the acknowledgement reads it."""
    qs = [json.loads(line)["question"] for line in open(kb_questions()).readlines()[:8]]
    fact = {"head": "Mount Vesuvius", "relation": "country", "tail": "Italy"}
    ended = []

    def one(q):
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        ask(c, q, max_tokens=32)
        ended.append(time.perf_counter())

    threads = [threading.Thread(target=one, args=(q,)) for q in qs]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the asks are in (the first prefills alone take longer than this)
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/v1/kb/triples", json={"triples": [fact]}, headers=h, timeout=120)
    acked = time.perf_counter()
    for t in threads:
        t.join()
    try:
        assert r.status_code == 200 and r.json()["added"] == 1
        assert acked < max(ended), "the write waited for every answer"
        text, extra = ask(client, "What is the country of Mount Vesuvius?")
        assert extra["kb_version"] >= r.json()["version"]
        assert cited(extra)[0] == ("Mount Vesuvius", "country", "Italy")
    finally:
        httpx.request("DELETE", url + "/v1/kb/triples", json={"triples": [fact]}, headers=h, timeout=120)


def test_warm_up_changes_nothing_stored(model, tmp_path, demo_facts, encoder):
    """`atlaskv serve` warms the first steps up before it listens (KBService.warm_up): an answer over the KB
    and a write's encoder passes run once, and the KB stays as it was (same version, same files)."""
    from atlaskv.serve.service import KBService

    kb = KnowledgeBase.build(demo_facts, tmp_path / "kb", encoder=encoder)
    before = (kb.version, sorted(p.name for p in kb.path.iterdir()))
    seconds = KBService(model, kb).warm_up()
    again = KnowledgeBase.open(kb.path)
    assert seconds > 0 and (again.version, sorted(p.name for p in again.path.iterdir())) == before
