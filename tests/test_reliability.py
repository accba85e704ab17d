"""Reliability and security (issue 9): corruption, untrusted files, no pickle, the server's auth and input
limits, and a short SIGKILL run of the CLI writers. Fast parts only; the long kill and load runs are
benchmarks/kill_kb.py and benchmarks/load_server.py (committed results, docs/reliability.md).

KBs here are built with a deterministic hash 'encoder', so no sentence model is loaded except by the
kill test (which runs the real CLI in subprocesses)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from atlaskv.kb.triples import Triple
from atlaskv.kb.store import KBError, KnowledgeBase
from hash_encoder import HashEncoder

REPO = Path(__file__).resolve().parents[1]


FACTS = [Triple(f"person {i}", "place of birth", f"city {i % 7}") for i in range(40)]


@pytest.fixture()
def kb_path(tmp_path) -> Path:
    """A KB with every kind of file: two segments, a HiKVP index with a live addition, a tombstone file."""
    kb = KnowledgeBase.build(FACTS[:30], tmp_path / "kb", encoder=HashEncoder())
    kb.add(FACTS[30:])
    kb.remove(FACTS[:3])
    assert kb.verify()["orphans"] == []
    return kb.path


def _kinds(kb: Path) -> set[str]:
    return {re.sub(r"-\d+", "", Path(rel).name) for rel in json.loads((kb / "manifest.json").read_text())["files"]}


# ---------------------------------------------------------------------------------------------- corruption
def _damage(p: Path, how: str) -> None:
    data = bytearray(p.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01  # one bit, in the middle: same size, only the checksum can tell
        p.write_bytes(bytes(data))
    elif how == "truncate":
        p.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "append":
        p.write_bytes(bytes(data) + b"\x00")
    elif how == "delete":
        p.unlink()


@pytest.mark.parametrize("how", ["flip", "truncate", "append", "delete"])
def test_every_kb_file_damaged_is_detected_and_named(kb_path, how):
    """Each file the manifest lists (records, embeddings, index, index additions, tombstones), damaged in
    turn: `kb verify` and open(verify=True) fail naming it; a size change or a missing file already fails
    a plain open. Restored, the KB verifies again (the check can pass)."""
    from typer.testing import CliRunner

    from atlaskv.cli import app

    files = json.loads((kb_path / "manifest.json").read_text())["files"]
    assert len(files) >= 12 and {"seg.records.parquet", "seg.keys.f16.npy", "seg.values.f16.npy",
                                 "removed.npy", "add.npy", "hikvp.roots.npy"} <= _kinds(kb_path)
    runner = CliRunner()
    for rel in files:
        p = kb_path / rel
        good = p.read_bytes()
        _damage(p, how)
        with pytest.raises(KBError, match=re.escape(p.name)):
            KnowledgeBase.open(kb_path, verify=True)
        if how != "flip":
            with pytest.raises(KBError, match=re.escape(p.name)):
                KnowledgeBase.open(kb_path)
        r = runner.invoke(app, ["kb", "verify", str(kb_path)])
        assert r.exit_code == 1 and p.name in r.output and "Traceback" not in r.output, r.output
        p.write_bytes(good)
        assert KnowledgeBase.open(kb_path, verify=True).verify()["ok"]


def _edit(kb: Path, fn) -> None:
    m = json.loads((kb / "manifest.json").read_text())
    fn(m)
    (kb / "manifest.json").write_text(json.dumps(m))


def _set(path: str, value):
    def fn(m):
        *parents, last = path.split(".")
        node = m
        for k in parents:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[int(last) if isinstance(node, list) else last] = value(node[int(last) if isinstance(node, list) else last]) \
            if callable(value) else value
    return fn


MANIFEST_EDITS = [
    ("triples count +1", _set("counts.triples", lambda v: v + 1), "counts do not add up"),
    ("entries count -1", _set("counts.entries", lambda v: v - 1), "counts do not add up"),
    ("stored entries +5", _set("counts.entries_total", lambda v: v + 5), "counts do not add up"),
    ("segment rows +1", _set("segments.0.rows", lambda v: v + 1), "segments hold"),
    ("segment rows 10^13", _set("segments.0.rows", 10**13), "segment 0 rows"),
    ("negative version", _set("version", -1), "version is -1"),
    ("version as text", _set("version", "2"), "version is '2'"),
    ("encoder dim 10^9", _set("encoder.dim", 10**9), "encoder dim is 1000000000"),
    ("removed count +1", _set("removed.count", lambda v: v + 1), "counts do not add up"),
    ("segment path outside", _set("segments.0.keys", "../../../etc/passwd"), "not a file listed"),
    ("unlisted segment file", _set("segments.0.values", "segments/seg-000009.values.f16.npy"), "not a file listed"),
    ("index stem outside", _set("index.stem", "../../evil"), "index file"),
    ("tombstone path outside", _set("removed.file", "/etc/passwd"), "not a file listed"),
    ("listed file outside", lambda m: m["files"].update({"../../outside": {"bytes": 1, "sha256": "0" * 64}}),
     "escapes the KB directory"),
    ("file size as text", lambda m: next(iter(m["files"].values())).update(bytes="12"), "size of"),
    ("no counts", lambda m: m.pop("counts"), "malformed manifest"),
    ("segments not a list", _set("segments", "seg"), "malformed manifest"),
    ("future format", _set("format_version", 99), "not supported"),
]


@pytest.mark.parametrize("name,edit,message", MANIFEST_EDITS, ids=[e[0] for e in MANIFEST_EDITS])
def test_edited_manifest_is_refused_on_open(kb_path, name, edit, message):
    _edit(kb_path, edit)
    with pytest.raises(KBError, match=re.escape(message)) as e:
        KnowledgeBase.open(kb_path)
    assert str(kb_path / "manifest.json") in str(e.value)


def test_consistent_but_false_counts_are_caught_by_verify(kb_path):
    """Counts edited to agree with each other, but not with the tombstone file: only reading it can tell."""
    def lie(m):
        m["removed"]["count"] += 1
        m["counts"]["removed_entries"] += 1
        m["counts"]["entries"] -= 1
        m["counts"]["triples"] -= 1
    _edit(kb_path, lie)
    KnowledgeBase.open(kb_path)
    with pytest.raises(KBError, match=r"removed-\d+\.npy: .*expected 4 int64"):
        KnowledgeBase.open(kb_path, verify=True)


def test_broken_manifest_files(kb_path):
    mf = kb_path / "manifest.json"
    mf.write_bytes(b'{"format": "atlaskv-kb", "format_version": 1, ')
    with pytest.raises(KBError, match="manifest.json: not valid JSON"):
        KnowledgeBase.open(kb_path)
    mf.write_bytes(b"\xff\xfe")
    with pytest.raises(KBError, match="manifest.json: not valid JSON"):
        KnowledgeBase.open(kb_path)
    with open(mf, "wb") as f:  # 65 MB, sparse: refused by size before it is read
        f.truncate(65 << 20)
    with pytest.raises(KBError, match="over the .* limit"):
        KnowledgeBase.open(kb_path)


def test_build_killed_between_its_renames_is_recovered(tmp_path):
    """An overwrite build renames old -> .kb.replaced-<pid>, then new -> kb; killed in between, `kb` is gone:
    the next open puts the old KB back (its builder is dead), and the next build clears stale temp dirs."""
    kb = KnowledgeBase.build(FACTS[:5], tmp_path / "kb", encoder=HashEncoder())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    os.rename(kb.path, tmp_path / f".kb.replaced-{pid}")
    (tmp_path / f".kb.building-{pid}").mkdir()
    again = KnowledgeBase.open(tmp_path / "kb", verify=True)
    assert sorted(again.triples()) == sorted(FACTS[:5])
    KnowledgeBase.build(FACTS[5:9], tmp_path / "kb", encoder=HashEncoder(), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kb"]
    # the temp dir of a build that is still running (here: our parent's pid, alive) is never touched
    (tmp_path / f".kb.building-{os.getppid()}").mkdir()
    KnowledgeBase.build(FACTS[:2], tmp_path / "kb", encoder=HashEncoder(), overwrite=True)
    assert (tmp_path / f".kb.building-{os.getppid()}").is_dir()


# ---------------------------------------------------------------------------------------------- no pickle
PICKLE_PATTERNS = [
    (re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b", re.M), "pickle module"),
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
    (re.compile(r"np\.load\((?![^)]*allow_pickle\s*=\s*False)"), "np.load without allow_pickle=False"),
    (re.compile(r"\.read_pickle\(|pickle\.loads?\("), "read_pickle / pickle.load"),
    (re.compile(r"trust_remote_code\s*=\s*True"), "trust_remote_code=True"),
]


def _pickle_findings(text: str) -> list[str]:
    return [why for rx, why in PICKLE_PATTERNS if rx.search(text)]


def test_no_pickle_anywhere_in_the_package():
    # the scanner itself catches what it is for
    assert _pickle_findings("import pickle\n") and _pickle_findings("x = torch.load(f)\n")
    assert _pickle_findings("np.load(p, allow_pickle=True)") and _pickle_findings("np.load(p)")
    assert not _pickle_findings("np.load(p, mmap_mode='r', allow_pickle=False)\ntorch.load(f, weights_only=True)")
    sources = sorted((REPO / "src" / "atlaskv").rglob("*.py"))
    assert len(sources) > 10
    found = {str(p.relative_to(REPO)): _pickle_findings(p.read_text("utf-8")) for p in sources}
    assert {k: v for k, v in found.items() if v} == {}


def test_kb_and_adapter_files_are_json_parquet_npy_safetensors_only(kb_path):
    kinds = {p.suffix or p.name for p in kb_path.rglob("*") if p.is_file()}
    assert kinds <= {".json", ".parquet", ".npy", ".lock"}, kinds
    for p in kb_path.rglob("*.npy"):
        assert np.load(p, allow_pickle=False).dtype != object
    adapter = REPO / "src" / "atlaskv" / "adapters" / "default"
    assert {p.suffix for p in adapter.iterdir()} <= {".json", ".safetensors", ".md", ".png", ".jsonl", ".txt", ".tsv"}


# ---------------------------------------------------------------------------------------------- adapters
@pytest.fixture(scope="module")
def adapter_copy(tmp_path_factory) -> Path:
    src = REPO / "src" / "atlaskv" / "adapters" / "default"
    out = tmp_path_factory.mktemp("adapter") / "ad"
    out.mkdir()
    for name in ("adapter_config.json", "adapter.safetensors"):
        shutil.copy(src / name, out / name)
    return out


def _variant(base: Path, tmp: Path, **changes) -> Path:
    out = tmp / "variant"
    out.mkdir()
    cfg = json.loads((base / "adapter_config.json").read_text())
    cfg.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    os.link(base / "adapter.safetensors", out / "adapter.safetensors")
    return out


@pytest.mark.parametrize("changes,message", [
    ({"encoder_dim": 10**9}, "encoder_dim is 1000000000"),
    ({"num_layers": 10**6}, "num_layers is 1000000"),
    ({"head_dim": -64}, "head_dim is -64"),
    ({"hidden_size": "576"}, "hidden_size is '576'"),
    ({"num_heads": 1.5}, "num_heads is 1.5"),
    ({"q_bias": "no"}, "q_bias must be true or false"),
    ({"kb_heads": "all"}, "kb_heads other than 'query' was removed"),
    ({"layer_norm_eps": -1}, "out of range"),
    ({"format_version": 7}, "format_version 7"),
    ({"pickle": "cos\nsystem\n"}, "not a valid adapter config"),
])
def test_adapter_with_absurd_config_is_refused(adapter_copy, tmp_path, changes, message):
    from atlaskv.model.adapter import AdapterError, KBAdapter

    with pytest.raises(AdapterError, match=re.escape(message)):
        KBAdapter.from_pretrained(_variant(adapter_copy, tmp_path, **changes))


def test_adapter_files_outside_or_oversized_or_foreign_are_refused(adapter_copy, tmp_path):
    from atlaskv.model.adapter import AdapterError, KBAdapter

    assert KBAdapter.from_pretrained(adapter_copy).num_parameters() > 0  # the real one loads
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name in ("adapter.safetensors", "adapter_config.json"):
        ad = tmp_path / f"link-{name}"
        ad.mkdir()
        for other in ("adapter.safetensors", "adapter_config.json"):
            if other == name:
                shutil.copy(adapter_copy / other, outside / other)
                (ad / other).symlink_to(outside / other)
            else:
                os.link(adapter_copy / other, ad / other)
        with pytest.raises(AdapterError, match="outside the adapter folder"):
            KBAdapter.from_pretrained(ad)
    big = _variant(adapter_copy, tmp_path)
    (big / "adapter.safetensors").unlink()
    with open(big / "adapter.safetensors", "wb") as f:  # 10 GB, sparse: refused by size, never read
        f.truncate(10 << 30)
    with pytest.raises(AdapterError, match="more than the"):
        KBAdapter.from_pretrained(big)
    (big / "adapter.safetensors").unlink()
    import pickle  # noqa: S403 - writing one, to check it is refused

    (big / "adapter.safetensors").write_bytes(pickle.dumps({"key_proj.weight": [1.0]}))
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        KBAdapter.from_pretrained(big)
    (big / "adapter_config.json").write_bytes(b" " * (2 << 20))
    with pytest.raises(AdapterError, match="is not an adapter config"):
        KBAdapter.from_pretrained(big)


# ---------------------------------------------------------------------------------------------- server
KEY = "sk-reliability-" + "k" * 24


class StubModel:
    """The server's auth and input checks run before the model: a model that must never be called."""
    class adapter:
        class config:
            base_model = "stub"

    def __getattr__(self, name):
        raise AssertionError(f"the model was reached ({name}) by a request that should have been refused")


@pytest.fixture()
def served(kb_path, monkeypatch):
    from starlette.testclient import TestClient

    import atlaskv.serve.routes as server

    calls = []
    real = server.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(server.hmac, "compare_digest", spy)
    app = server.create_app(StubModel(), kb_path, api_key=KEY, max_body_bytes=64 * 1024)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, calls, kb_path


ROUTES = [("GET", "/health", None), ("GET", "/v1/models", None),
          ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
          ("POST", "/v1/kb/triples", {"triples": [{"head": "x", "relation": "y", "tail": "z"}]}),
          ("DELETE", "/v1/kb/triples", {"triples": [{"head": "person 5", "relation": "place of birth",
                                                     "tail": "city 5"}]})]
BAD_AUTH = [
    ("no header", {}, ""),
    ("empty bearer", {"Authorization": "Bearer "}, ""),
    ("wrong key", {"Authorization": "Bearer sk-wrong"}, ""),
    ("key minus last char", {"Authorization": f"Bearer {KEY[:-1]}"}, ""),
    ("key plus a char", {"Authorization": f"Bearer {KEY}x"}, ""),
    ("key prefix only", {"Authorization": f"Bearer {KEY[:8]}"}, ""),
    ("basic scheme", {"Authorization": "Basic " + __import__("base64").b64encode(f"u:{KEY}".encode()).decode()}, ""),
    ("token scheme", {"Authorization": f"Token {KEY}"}, ""),
    ("no scheme", {"Authorization": KEY}, ""),
    ("no space", {"Authorization": f"Bearer{KEY}"}, ""),
    ("key twice", {"Authorization": f"Bearer {KEY} {KEY}"}, ""),
    ("x-api-key header", {"X-API-Key": KEY}, ""),
    ("api-key header", {"api-key": KEY}, ""),
    ("query api_key", {}, f"?api_key={KEY}"),
    ("query key", {}, f"?key={KEY}"),
    ("query access_token", {}, f"?access_token={KEY}"),
    ("cookie", {"Cookie": f"api_key={KEY}; Authorization=Bearer {KEY}"}, ""),
]


def test_auth_bypass_attempts_are_all_rejected(served):
    client, calls, kb_path = served
    version = KnowledgeBase.open(kb_path).version
    n = 0
    for label, headers, query in BAD_AUTH:
        for method, route, body in ROUTES:
            r = client.request(method, route + query, headers=headers, json=body)
            assert r.status_code == 401, (label, route, r.status_code, r.text)
            err = r.json()["error"]
            assert err["type"] == "authentication_error" and KEY not in r.text, (label, route)
            n += 1
    assert n == len(BAD_AUTH) * len(ROUTES) == 85
    assert KnowledgeBase.open(kb_path).version == version  # nothing was written by any of them
    # the right key passes, with the scheme in any case, and the comparison is hmac.compare_digest
    calls.clear()
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = client.get("/health", headers={"Authorization": f"{scheme} {KEY}"})
        assert r.status_code == 200 and r.json()["kb"]["version"] == version
    assert len(calls) == 3 and all(b == KEY.encode() for _, b in calls)


def test_kb_updates_with_the_key(served):
    client, _, kb_path = served
    h = {"Authorization": f"Bearer {KEY}"}
    r = client.post("/v1/kb/triples", headers=h, json={"triples": [{"head": "Ada", "relation": "r", "tail": "t"}]})
    assert r.status_code == 200 and r.json()["added"] == 1, r.text
    r = client.request("DELETE", "/v1/kb/triples", headers=h,
                       json={"triples": [{"head": "Ada", "relation": "r", "tail": "t"}]})
    assert r.status_code == 200 and r.json()["removed"] == 1, r.text
    assert Triple("Ada", "r", "t") not in KnowledgeBase.open(kb_path, verify=True).triples()


def _deep(n: int) -> bytes:
    return b'{"messages": ' + b"[" * n + b"]" * n + b"}"


MALFORMED = [
    ("truncated JSON", "POST", "/v1/chat/completions", b'{"messages": [', 400),
    ("not JSON", "POST", "/v1/chat/completions", b"messages=hi", 400),
    ("invalid UTF-8", "POST", "/v1/chat/completions", b'{"messages": "\xff\xfe"}', 400),
    ("empty body", "POST", "/v1/kb/triples", b"", 400),
    ("nested 30,000 deep", "POST", "/v1/chat/completions", _deep(30_000), 400),
    ("5,000-digit number", "POST", "/v1/chat/completions", b'{"max_tokens": ' + b"9" * 5000 + b"}", 400),
    ("lone surrogate", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400),
    ("lone surrogate in triple", "POST", "/v1/kb/triples",
     b'{"triples": [{"head": "\\udfff", "relation": "r", "tail": "t"}]}', 400),
    ("NaN tokens", "POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "q"}], "max_tokens": NaN}',
     422),
    ("array body", "POST", "/v1/chat/completions", b"[]", 422),
    ("no messages", "POST", "/v1/chat/completions", b'{"model": "x"}', 422),
    ("empty messages", "POST", "/v1/chat/completions", b'{"messages": []}', 422),
    ("bad role", "POST", "/v1/chat/completions", b'{"messages": [{"role": "root", "content": "q"}]}', 422),
    ("image part", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}', 422),
    ("no user message", "POST", "/v1/chat/completions", b'{"messages": [{"role": "system", "content": "q"}]}', 422),
    ("max_tokens 10^6", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "q"}], "max_tokens": 1000000}', 422),
    ("max_tokens 0", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "q"}], "max_tokens": 0}', 422),
    ("n = 5", "POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "q"}], "n": 5}', 422),
    ("temperature 99", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "q"}], "temperature": 99}', 422),
    ("100 messages", "POST", "/v1/chat/completions",
     json.dumps({"messages": [{"role": "user", "content": "q"}] * 100}).encode(), 422),
    ("triples not a list", "POST", "/v1/kb/triples", b'{"triples": "a b c"}', 422),
    ("no triples", "POST", "/v1/kb/triples", b'{"triples": []}', 422),
    ("blank head", "POST", "/v1/kb/triples", b'{"triples": [{"head": " ", "relation": "r", "tail": "t"}]}', 422),
    ("head over 2,000 chars", "POST", "/v1/kb/triples",
     json.dumps({"triples": [{"head": "h" * 2001, "relation": "r", "tail": "t"}]}).encode(), 422),
    ("number as head", "DELETE", "/v1/kb/triples", b'{"triples": [{"head": 1, "relation": "r", "tail": "t"}]}', 422),
    ("NUL in triple", "POST", "/v1/kb/triples", b'{"triples": [{"head": "a\\u0000", "relation": "r", "tail": "t"}]}',
     422),
    ("body over the limit", "POST", "/v1/kb/triples", b'{"triples": "' + b"x" * (100 * 1024) + b'"}', 413),
    ("body 20x the limit", "POST", "/v1/chat/completions", b" " * (20 * 64 * 1024), 413),
    ("unknown route", "GET", "/v1/admin", None, 404),
    ("wrong method", "PUT", "/v1/kb/triples", b"{}", 405),
]


@pytest.mark.parametrize("label,method,route,body,status", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_and_oversized_requests_get_4xx_json(served, label, method, route, body, status):
    client, _, kb_path = served
    version = KnowledgeBase.open(kb_path).version
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = client.request(method, route, content=body, headers=h)
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and err["type"]
    assert KnowledgeBase.open(kb_path).version == version


def test_body_over_the_limit_without_content_length(served):
    """A chunked upload has no Content-Length to refuse early: the 413 must still come, as JSON."""
    client, _, _ = served

    def chunks():
        for _ in range(40):
            yield b" " * 4096

    r = client.post("/v1/kb/triples", content=chunks(), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_bad_content_length_header(served):
    client, _, _ = served
    r = client.post("/v1/kb/triples", content=b"{}", headers={"Authorization": f"Bearer {KEY}",
                                                              "Content-Length": "-5"})
    assert 400 <= r.status_code < 500


# ---------------------------------------------------------------------------------------------- SIGKILL
@pytest.mark.slow
def test_killed_cli_writers_leave_a_committed_kb(tmp_path):
    """A handful of SIGKILLs (one per writer: build, add, remove, compact, after its first write) through
    benchmarks/kill_kb.py; the committed run is 100 kills (benchmarks/results/kill_kb.json)."""
    out = tmp_path / "kill.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kill_kb.py"), "--kills", "4", "--no-calibrate",
                        "--modes", "write", "--base", "40", "--seed", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["kills"] >= 4 and res["failures"] == 0 and res["final_writer_cleaned_up"]
    assert set(res["kills_by_op"]) == {"build", "add", "remove", "compact"}
    assert all(k["ok"] for k in res["runs"])
