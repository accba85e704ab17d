"""The CLI: thin over the API, contract JSON, clear one-line errors."""
import json

import pytest
from typer.testing import CliRunner

from atlaskv.cli import app

runner = CliRunner()


def test_every_command_has_help():
    for args in (["--help"], ["kb", "--help"], ["kb", "build", "--help"], ["kb", "info", "--help"],
                 ["kb", "add", "--help"], ["kb", "remove", "--help"], ["kb", "compact", "--help"],
                 ["kb", "merge-segments", "--help"],
                 ["kb", "verify", "--help"], ["train", "--help"], ["eval", "grounding", "--help"],
                 ["ask", "--help"], ["kg2kv", "--help"], ["chat", "--help"], ["serve", "--help"],
                 ["ui", "--help"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 0 and "Usage" in r.output, args


def test_build_info_add_remove_verify(tmp_path):
    facts = tmp_path / "facts.tsv"
    facts.write_text("Ada Lovelace\tplace of birth\tLondon\nAlan Turing\tplace of birth\tMaida Vale\n")
    r = runner.invoke(app, ["kb", "build", str(facts), "--out", str(tmp_path / "kb"), "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["kb", "info", str(tmp_path / "kb"), "--json"])
    info = json.loads(r.output)
    assert info["triples"] == 2 and info["encoder"] == "all-MiniLM-L6-v2" and info["dim"] == 384
    assert info["format_version"] == 1 and info["version"] == 1 and info["bytes_on_disk"] > 0
    more = tmp_path / "more.jsonl"
    more.write_text('{"head": "Grace Hopper", "relation": "place of birth", "tail": "New York City"}\n')
    r = runner.invoke(app, ["kb", "add", str(tmp_path / "kb"), str(more), "--json"])
    assert json.loads(r.output)["added"] == 1
    r = runner.invoke(app, ["kb", "remove", str(tmp_path / "kb"), str(facts), "--json"])
    assert json.loads(r.output) == {"added": 0, "removed": 2, "duplicates": 0, "not_found": 0, "version": 3,
                                    "triples": 1}
    r = runner.invoke(app, ["kb", "verify", str(tmp_path / "kb")])
    assert r.exit_code == 0 and r.output.startswith("ok: version 3")
    r = runner.invoke(app, ["kb", "merge-segments", str(tmp_path / "kb"), "--keep", "0"])
    assert r.exit_code == 0 and r.output.strip() == "2 segments -> 1, version 4", r.output
    r = runner.invoke(app, ["kb", "info", str(tmp_path / "kb"), "--json"])
    assert json.loads(r.output)["triples"] == 1


def test_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n")
    r = runner.invoke(app, ["kb", "build", str(bad), "--out", str(tmp_path / "kb")])
    assert r.exit_code == 1 and "bad.tsv:1:" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["kb", "info", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "no KB directory" in r.output
    r = runner.invoke(app, ["ask", "  ", "--kb", str(tmp_path)])
    assert r.exit_code == 1 and "empty question" in r.output


@pytest.mark.slow
def test_ask_json_contract(tmp_path, demo_facts):
    pytest.importorskip("gguf")
    r = runner.invoke(app, ["kb", "build", str(demo_facts), "--out", str(tmp_path / "kb")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["ask", "What is the capital of Canada?", "--kb", str(tmp_path / "kb"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert set(out) == {"answer", "citations", "kb_size", "pruned", "seconds", "refused", "missing"}
    assert out["refused"] is False and out["missing"] is None
    assert "Ottawa" in out["answer"]  # the shipped adapter answers from the KB
    assert out["citations"][0] == {"head": "Canada", "relation": "capital", "tail": "Ottawa",
                                   "weight": out["citations"][0]["weight"]}
    from atlaskv.kb.store import KnowledgeBase

    indexed = KnowledgeBase.open(tmp_path / "kb").manifest.get("index") is not None
    assert out["kb_size"] > 3000 and out["pruned"] is indexed  # an indexed KB is read through HiKVP


FACTS = [("Canada", "capital", "Ottawa"), ("Elvis Presley", "place of death", "Memphis"),
         ("Memphis", "time zone", "Central Time Zone"), ("Michael Jackson", "place of birth", "Gary")]


@pytest.fixture(scope="module")
def small_kb(tmp_path_factory, encoder):
    from atlaskv.kb.store import KnowledgeBase

    return KnowledgeBase.build(FACTS, tmp_path_factory.mktemp("cli") / "kb", encoder=encoder).path


def test_cli_reads_the_shared_defaults_without_torch():
    """Every entry point reads atlaskv.defaults; the CLI shows them in --help without importing torch."""
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from atlaskv.cli import app; "
            "out = CliRunner().invoke(app, ['ask', '--help']).output; "
            "from atlaskv.defaults import LACKING_RATIO, REFUSE_BELOW, PRUNE_TOP_K_TEXT; "
            "assert str(REFUSE_BELOW) in out and PRUNE_TOP_K_TEXT in out, out; "
            "assert '--lacking-ratio' in out and str(LACKING_RATIO) in out, out; "
            "out = CliRunner().invoke(app, ['eval', 'grounding', '--help']).output; "
            "assert '--lacking-ratio' in out and str(LACKING_RATIO) in out, out; "
            "out = CliRunner().invoke(app, ['train', '--help']).output; "
            "assert '--same-relation-negatives' in out and '--phrasings' in out and '--phrasing-rate' in out "
            "and '--relation-aliases' in out and '--alias-rate' in out, out; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**__import__("os").environ, "COLUMNS": "200"})


def test_kb_from_another_encoder_is_refused_before_loading_the_model(tmp_path):
    import numpy as np

    from atlaskv.kb.store import KnowledgeBase

    class Other:
        name, dim = "other-encoder", 384

        def encode(self, texts, batch_size=256, show_progress=None):
            return np.ones((len(texts), 384), np.float32)

    KnowledgeBase.build(FACTS[:1], tmp_path / "kb", encoder=Other())
    for args in (["ask", "What?", "--kb"], ["chat", "--kb"], ["serve", "--kb"]):
        r = runner.invoke(app, [*args, str(tmp_path / "kb")])
        assert r.exit_code == 1 and "built with encoder 'other-encoder'" in r.output
        assert "expects 'all-MiniLM-L6-v2'" in r.output and "Traceback" not in r.output
    for args in (["chat", "--kb"], ["serve", "--kb"]):
        r = runner.invoke(app, [*args, str(tmp_path / "nope")])
        assert r.exit_code == 1 and "no KB directory" in r.output


@pytest.mark.slow
def test_ask_prints_answer_then_cited_facts(small_kb):
    pytest.importorskip("gguf")
    r = runner.invoke(app, ["ask", "What is the capital of Canada?", "--kb", str(small_kb)])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert "Ottawa" in lines[0]
    assert "cited facts (KB of 4)" in r.output and "weight" in r.output
    first = next(line for line in lines if "%" in line)
    assert "Canada" in first and "capital" in first and "Ottawa" in first  # most-attended fact first


@pytest.mark.slow
def test_chat_multi_turn_with_live_kb_commands(small_kb):
    pytest.importorskip("gguf")
    script = "\n".join([
        "What is the place of death of Elvis Presley?",
        "What is the time zone of Memphis?",            # a second turn, the first one kept as context
        "What is the country of Mount Kilimanjaro?",    # not in the KB yet
        "/add Mount Kilimanjaro | country | Tanzania",
        "What is the country of Mount Kilimanjaro?",
        "/remove Mount Kilimanjaro | country | Tanzania",
        "/remove Mount Kilimanjaro | country | Tanzania",
        "/add only two | parts",
        "/kb",
        "/quit",
    ]) + "\n"
    r = runner.invoke(app, ["chat", "--kb", str(small_kb)], input=script)
    assert r.exit_code == 0, r.output
    out = r.output
    assert "Memphis" in out and "Central Time Zone" in out
    assert "added 1; KB version 2, 5 facts" in out
    assert "I don't know." in out.split("added 1")[0]
    after_add = out.split("added 1")[1]
    answer = after_add.split("\n")[1]
    assert "Tanzania" in answer and "I don't know" not in answer  # answered from the new fact, no longer refused
    first = next(line for line in after_add.splitlines() if "%" in line)
    assert "Mount Kilimanjaro" in first and "Tanzania" in first  # the new fact is the most-cited one
    assert "removed 1; KB version 3, 4 facts" in out and "removed 0 (not found)" in out
    assert "usage: /add head | relation | tail" in out and "triples" in out  # /kb prints the info table


@pytest.mark.slow
def test_serve_command_answers_over_http(small_kb):
    pytest.importorskip("gguf")
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ATLASKV_API_KEY": "k3y"}
    proc = subprocess.Popen([sys.executable, "-m", "atlaskv.cli", "serve", "--kb", str(small_kb), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, h = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k3y"}
        for _ in range(600):
            try:
                if httpx.get(url + "/health", headers=h).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        assert httpx.get(url + "/health").status_code == 401
        r = httpx.post(url + "/v1/chat/completions", headers=h, timeout=120,
                       json={"model": "atlaskv",
                             "messages": [{"role": "user", "content": "What is the capital of Canada?"}]})
        assert r.status_code == 200 and "Ottawa" in r.json()["choices"][0]["message"]["content"]
        assert r.json()["atlaskv"]["citations"][0]["tail"] == "Ottawa"
    finally:
        proc.terminate()
        proc.wait(10)
