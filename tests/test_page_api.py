"""The web page's files and the read-only KB endpoints it uses (GET /v1/kb, GET /v1/kb/search), without a
model or a browser (tests/test_ui.py drives the page itself in Chromium)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from atlaskv.kb.store import KnowledgeBase
from atlaskv.kb.triples import Triple
from atlaskv.serve.routes import create_app
from hash_encoder import HashEncoder

KEY = "sk-page-" + "p" * 24
AUTH = {"Authorization": f"Bearer {KEY}"}
STATIC = Path(__file__).resolve().parents[1] / "src" / "atlaskv" / "serve" / "static"
FACTS = [Triple("Paris", "country", "France"), Triple("Paris", "mayor", "Anne Hidalgo"),
         Triple("Paris Hilton", "gender", "Female"), Triple("Comparison of Paris", "genre", "essay"),
         Triple("Lyon", "country", "France"), Triple("Berlin", "country", "Germany")]


class StubModel:
    """The KB endpoints never reach the model."""
    class adapter:
        class config:
            base_model = "stub"

    def __getattr__(self, name):
        raise AssertionError(f"the model was reached ({name})")


@pytest.fixture(params=["tail", "both"])
def client(tmp_path, request):
    kb = KnowledgeBase.build(FACTS, tmp_path / "kb", encoder=HashEncoder(), directions=request.param)
    with TestClient(create_app(StubModel(), kb.path, api_key=KEY), raise_server_exceptions=False) as c:
        yield c


def test_page_files_are_served_without_the_key_with_a_strict_policy(client):
    for path, kind in (("/", "text/html"), ("/static/app.js", "text/javascript"), ("/static/style.css", "text/css")):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert r.headers["cache-control"] == "no-cache"
    assert client.get("/static/../routes.py").status_code == 404
    assert client.get("/static/index.html").status_code == 404


def test_page_loads_nothing_from_elsewhere_and_keeps_the_key_in_memory():
    text = "".join((STATIC / f).read_text("utf-8") for f in ("index.html", "app.js", "style.css"))
    assert set(re.findall(r"https?://[^\s\"'`)]+", text)) == {"http://www.w3.org/2000/svg"}  # no CDN, no fonts
    js = (STATIC / "app.js").read_text("utf-8")
    assert not re.search(r"(localStorage|sessionStorage|document\.cookie|indexedDB)", js)
    assert re.search(r'headers\["Authorization"\] = "Bearer " \+ apiKey', js)


def test_kb_endpoints_need_the_key(client):
    for path in ("/v1/kb", "/v1/kb/search?head=Paris"):
        r = client.get(path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get(path + ("&" if "?" in path else "?") + f"api_key={KEY}").status_code == 401


def test_overview(client):
    r = client.get("/v1/kb", headers=AUTH)
    assert r.status_code == 200
    kb = r.json()
    assert kb["triples"] == 6 and kb["version"] == 1 and kb["encoder"] == "test-hash-16" and kb["dim"] == 16
    assert kb["model"] == "atlaskv-stub" and kb["refuse_below"] > 0 and kb["lacking_ratio"] > 0 and "path" not in kb
    assert kb["relations"] == [{"relation": "country", "count": 3}, {"relation": "gender", "count": 1},
                               {"relation": "genre", "count": 1}, {"relation": "mayor", "count": 1}]


def test_search_ranks_exact_then_prefix_then_contains(client):
    r = client.get("/v1/kb/search", params={"head": "paris"}, headers=AUTH)
    res = r.json()
    assert r.status_code == 200 and res["total"] == 4 and res["query"] == "paris" and res["version"] == 1
    assert [tuple(t.values()) for t in res["triples"]] == [
        ("Paris", "country", "France"), ("Paris", "mayor", "Anne Hidalgo"), ("Paris Hilton", "gender", "Female"),
        ("Comparison of Paris", "genre", "essay")]
    res = client.get("/v1/kb/search", params={"head": " Paris ", "limit": 1}, headers=AUTH).json()
    assert res["total"] == 4 and res["triples"] == [{"head": "Paris", "relation": "country", "tail": "France"}]
    res = client.get("/v1/kb/search", params={"limit": 2}, headers=AUTH).json()
    assert res["total"] == 6 and [t["head"] for t in res["triples"]] == ["Berlin", "Comparison of Paris"]
    assert client.get("/v1/kb/search", params={"head": "Rome"}, headers=AUTH).json()["triples"] == []
    # a regex or LIKE pattern is plain text here
    assert client.get("/v1/kb/search", params={"head": "P.r%"}, headers=AUTH).json()["total"] == 0


@pytest.mark.parametrize("limit", ["0", "501", "x", "-1", "1.5", "\u00b2", "9" * 40])
def test_search_refuses_a_bad_limit_with_a_json_error(client, limit):
    r = client.get("/v1/kb/search", params={"head": "Paris", "limit": limit}, headers=AUTH)
    assert r.status_code == 422 and "limit" in r.json()["error"]["message"]


def test_search_text_over_the_limit_is_refused(client):
    r = client.get("/v1/kb/search", params={"head": "x" * 2001}, headers=AUTH)
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error"


def test_updates_show_in_the_next_read(client):
    new = {"head": "Paris", "relation": "twinned with", "tail": "Rome"}
    assert client.post("/v1/kb/triples", json={"triples": [new]}, headers=AUTH).json()["version"] == 2
    kb = client.get("/v1/kb", headers=AUTH).json()
    assert kb["version"] == 2 and kb["triples"] == 7 and {"relation": "twinned with", "count": 1} in kb["relations"]
    res = client.get("/v1/kb/search", params={"head": "Paris"}, headers=AUTH).json()
    assert res["version"] == 2 and new in res["triples"]
    client.request("DELETE", "/v1/kb/triples", json={"triples": [new]}, headers=AUTH)
    res = client.get("/v1/kb/search", params={"head": "Paris"}, headers=AUTH).json()
    assert res["version"] == 3 and new not in res["triples"] and res["total"] == 4
