"""Sentence encoders: the shipped MiniLM (offline) and an OpenAI-compatible endpoint."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from atlaskv.kb.encoder import EncoderError, OpenAIEncoder, load_encoder


def test_default_encoder_offline_and_meaningful(encoder):
    assert encoder.name == "all-MiniLM-L6-v2" and encoder.dim == 384
    e = encoder.encode(["the place of birth of Barack Obama", "Where was Barack Obama born?",
                        "the time zone of St. Louis"])
    assert e.shape == (3, 384) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-3)  # MiniLM's pipeline normalises
    # the paraphrased question is closer to its own key than to an unrelated key
    assert e[0] @ e[1] > e[2] @ e[1] + 0.2


def test_batching_does_not_change_embeddings(encoder):
    texts = [f"the capital of country number {i}" for i in range(37)]
    a = encoder.encode(texts, batch_size=5)
    b = encoder.encode(texts, batch_size=64)
    assert np.allclose(a, b, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_encoder_is_loaded_once(encoder):
    assert load_encoder("sentence-transformers/all-MiniLM-L6-v2") is encoder


def test_unknown_local_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(EncoderError, match="cannot load sentence encoder"):
        load_encoder(str(tmp_path / "no-such-model"))


class _EmbeddingHandler(BaseHTTPRequestHandler):
    requests: list = []
    fail_next = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _EmbeddingHandler.requests.append((self.path, self.headers.get("Authorization"), body))
        if _EmbeddingHandler.fail_next:
            _EmbeddingHandler.fail_next -= 1
            self.send_response(503)
            self.end_headers()
            return
        # deterministic 8-d embedding from the text, returned out of order to test re-sorting
        data = [{"index": i, "embedding": [float(len(t)), float(sum(map(ord, t)) % 97)] + [float(i)] * 6}
                for i, t in enumerate(body["input"])]
        out = json.dumps({"data": data[::-1], "model": body["model"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


@pytest.fixture()
def embedding_server(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _EmbeddingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    _EmbeddingHandler.requests.clear()
    yield server
    server.shutdown()


def test_openai_encoder_batches_and_orders(embedding_server):
    enc = OpenAIEncoder("text-embedding-3-large")
    assert enc.name == "openai:text-embedding-3-large" and enc.dim == 8
    texts = [f"text {i}" * (i % 3 + 1) for i in range(10)]
    e = enc.encode(texts, batch_size=4)
    assert e.shape == (10, 8)
    assert [row[0] for row in e] == [float(len(t)) for t in texts]  # order restored from "index"
    batches = [r[2]["input"] for r in _EmbeddingHandler.requests[1:]]
    assert [len(b) for b in batches] == [4, 4, 2]
    path, auth, body = _EmbeddingHandler.requests[0]
    assert path == "/v1/embeddings" and auth == "Bearer sk-test" and body["model"] == "text-embedding-3-large"


def test_openai_encoder_retries_server_errors(embedding_server):
    enc = OpenAIEncoder("m")
    _EmbeddingHandler.fail_next = 1
    assert enc.encode(["x"]).shape == (1, 8)


def test_openai_encoder_builds_a_kb(embedding_server, tmp_path):
    from atlaskv.kb.store import KBError, KnowledgeBase

    kb = KnowledgeBase.build([("Ada Lovelace", "place of birth", "London")], tmp_path / "kb",
                             encoder="openai:m")
    assert kb.encoder_name == "openai:m" and kb.dim == 8
    with pytest.raises(KBError, match="refusing to mix"):
        kb.add([("Alan Turing", "place of birth", "London")], encoder="all-MiniLM-L6-v2")
