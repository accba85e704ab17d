"""`atlaskv` command line: a thin typer layer over the Python API, with the API's names."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(help="atlaskv: a knowledge graph inside a frozen LLM's attention.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
kb_app = typer.Typer(help="Build, inspect and update knowledge-base directories.", no_args_is_help=True)
app.add_typer(kb_app, name="kb")

FORMAT_HELP = "Force the input format (tsv, csv, jsonl, nt, ttl, parquet); default: from the extension."


def _fail(msg: str, code: int = 1):
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _run(fn):
    """Turn the library's own errors into one clear line and exit code 1 (no traceback)."""
    from .encoder import EncoderError
    from .kg import KGFormatError
    from .store import KBError

    try:
        return fn()
    except (KGFormatError, KBError, EncoderError, FileNotFoundError, ValueError) as e:
        _fail(str(e))


def _print_info(info: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(show_header=False, box=None)
    for k, v in info.items():
        t.add_row(f"[bold]{k}[/]", f"{v:,}" if isinstance(v, int) else str(v))
    Console().print(t)


@kb_app.command("build")
def kb_build(
    triples: List[Path] = typer.Argument(..., help="Triple files (tsv csv jsonl nt ttl parquet)."),
    out: Path = typer.Option(..., "--out", "-o", help="KB directory to create."),
    encoder: str = typer.Option("all-MiniLM-L6-v2", help="Sentence encoder: name, local path or openai:<model>."),
    directions: str = typer.Option("tail", help="Masked side per entry: tail, head or both."),
    format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad rows (reported) instead of stopping."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing KB at --out (atomically)."),
    llm_nouns: Optional[str] = typer.Option(
        None, "--llm-nouns",
        help="Phrase unknown relations with an LLM: 'local' (default LLM) or an OpenAI-compatible model "
             "name (endpoint from OPENAI_BASE_URL / OPENAI_API_KEY)."),
    engine: str = typer.Option("local", help="Build engine (local; ray comes with the Ray issue)."),
    batch_size: int = typer.Option(256, help="Encoder batch size."),
    json_out: bool = typer.Option(False, "--json", help="Print kb info as JSON when done."),
):
    """Read triples, convert them to key/value records, encode them and write a new KB directory."""
    from .kg2kv import local_chat, openai_chat
    from .store import KnowledgeBase

    if engine != "local":
        _fail(f"engine {engine!r} is not available in this version (only 'local')")
    chat = None
    if llm_nouns:
        chat = local_chat() if llm_nouns == "local" else openai_chat(model=llm_nouns)
    kb = _run(lambda: KnowledgeBase.build(
        triples, out, encoder=encoder, directions=directions, format=format, skip_bad=skip_bad,
        overwrite=overwrite, chat=chat, batch_size=batch_size, show_progress=None))
    last = kb.manifest["history"][-1]
    if last.get("bad") or last.get("duplicates"):
        typer.secho(f"skipped {last.get('bad', 0)} bad rows, dropped {last.get('duplicates', 0)} duplicate "
                    "triples", fg=typer.colors.YELLOW, err=True)
    _print_info(kb.info(), json_out)


@kb_app.command("info")
def kb_info(kb_dir: Path = typer.Argument(..., help="KB directory."),
            json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Counts, encoder, version and size on disk of a KB."""
    from .store import KnowledgeBase

    _print_info(_run(lambda: KnowledgeBase.open(kb_dir)).info(), json_out)


def _update(kb_dir: Path, triples: List[Path], format, skip_bad, op: str, json_out: bool):
    from .store import KnowledgeBase

    def go():
        kb = KnowledgeBase.open(kb_dir)
        return getattr(kb, op)(triples, format=format, skip_bad=skip_bad), kb

    res, kb = _run(go)
    out = {"added": res.added, "removed": res.removed, "duplicates": res.duplicates,
           "not_found": res.not_found, "version": res.version, "triples": len(kb)}
    if json_out:
        typer.echo(json.dumps(out))
    else:
        typer.echo(", ".join(f"{k} {v:,}" for k, v in out.items()))


@kb_app.command("add")
def kb_add(kb_dir: Path = typer.Argument(..., help="KB directory."),
           triples: List[Path] = typer.Argument(..., help="Triple files to add."),
           format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
           skip_bad: bool = typer.Option(False, "--skip-bad"),
           json_out: bool = typer.Option(False, "--json")):
    """Add triples live (new segment + atomic manifest); triples already present are skipped."""
    _update(kb_dir, triples, format, skip_bad, "add", json_out)


@kb_app.command("remove")
def kb_remove(kb_dir: Path = typer.Argument(..., help="KB directory."),
              triples: List[Path] = typer.Argument(..., help="Files listing the triples to remove."),
              format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
              skip_bad: bool = typer.Option(False, "--skip-bad"),
              json_out: bool = typer.Option(False, "--json")):
    """Remove triples (tombstones + atomic manifest); unknown triples are counted as not found."""
    _update(kb_dir, triples, format, skip_bad, "remove", json_out)


@kb_app.command("compact")
def kb_compact(kb_dir: Path = typer.Argument(..., help="KB directory.")):
    """Rewrite live entries into one segment and drop tombstoned ones."""
    from .store import KnowledgeBase

    res = _run(lambda: KnowledgeBase.open(kb_dir).compact())
    typer.echo(f"compacted to version {res.version}")


@kb_app.command("verify")
def kb_verify(kb_dir: Path = typer.Argument(..., help="KB directory."),
              json_out: bool = typer.Option(False, "--json")):
    """Check every file's size and sha256 against the manifest; exit 1 naming the first bad file."""
    from .store import KnowledgeBase

    report = _run(lambda: KnowledgeBase.open(kb_dir, verify=True).verify())
    typer.echo(json.dumps(report) if json_out else f"ok: version {report['version']}, "
               f"{report['files']} files verified, {len(report['orphans'])} orphan files")


@app.command("kg2kv")
def kg2kv_cmd(triples: List[Path] = typer.Argument(..., help="Triple files."),
              directions: str = typer.Option("tail", help="tail, head or both."),
              format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
              limit: int = typer.Option(0, help="Print at most this many records (0: all).")):
    """Print the key/value records (JSONL) that a KB would hold for these triples."""
    from .kg import read_triples
    from .kg2kv import to_jsonl, triples_to_records

    rep = _run(lambda: read_triples(triples, format))
    recs = _run(lambda: triples_to_records(rep.triples[: limit or None], directions))
    sys.stdout.write(to_jsonl(recs))


@app.command("version")
def version():
    """Print the atlaskv version."""
    from . import __version__

    typer.echo(__version__)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
