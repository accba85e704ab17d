"""The CLI: thin over the API, contract JSON, clear one-line errors."""
import json

import pytest
from typer.testing import CliRunner

from atlaskv.cli import app

runner = CliRunner()


def test_every_command_has_help():
    for args in (["--help"], ["kb", "--help"], ["kb", "build", "--help"], ["kb", "info", "--help"],
                 ["kb", "add", "--help"], ["kb", "remove", "--help"], ["kb", "compact", "--help"],
                 ["kb", "verify", "--help"], ["train", "--help"], ["eval", "grounding", "--help"],
                 ["ask", "--help"], ["kg2kv", "--help"]):
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
    assert set(out) == {"answer", "citations", "kb_size", "pruned", "seconds"}
    assert "Ottawa" in out["answer"]  # the shipped adapter answers from the KB
    assert out["citations"][0] == {"head": "Canada", "relation": "capital", "tail": "Ottawa",
                                   "weight": out["citations"][0]["weight"]}
    assert out["kb_size"] > 3000 and out["pruned"] is False
