"""`atlaskv kb ...` and `atlaskv kg2kv`: build, inspect and update knowledge-base directories."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from atlaskv.cli.common import fail, print_info, run

kb_app = typer.Typer(help="Build, inspect and update knowledge-base directories.", no_args_is_help=True)

FORMAT_HELP = "Force the input format (tsv, csv, jsonl, nt, ttl, parquet); default: from the extension."


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
    engine: str = typer.Option("local", help="Build engine: local (this process) or ray (Ray Data; "
                                              "pip install 'atlaskv[ray]')."),
    address: Optional[str] = typer.Option(
        None, "--address", help="[ray] Cluster to use: 'auto' (the one this node belongs to) or ray://host:port; "
                                "default: start a local Ray instance. --out must be on storage every node sees."),
    actors: Optional[int] = typer.Option(None, "--actors", help="[ray] Encoder actors (default: CPUs, or GPUs "
                                                                "when --num-gpus-per-actor is set)."),
    num_gpus_per_actor: float = typer.Option(0, "--num-gpus-per-actor", help="[ray] GPUs per encoder actor (0: CPU)."),
    num_cpus_per_actor: float = typer.Option(1, "--num-cpus-per-actor", help="[ray] CPUs per encoder actor."),
    segment_rows: int = typer.Option(100_000, "--segment-rows", help="[ray] Triples per map_batches batch = per segment."),
    batch_size: int = typer.Option(256, help="Encoder batch size."),
    json_out: bool = typer.Option(False, "--json", help="Print kb info as JSON when done."),
    index: bool = typer.Option(True, "--index/--no-index", help="Also build the HiKVP tree (pruned attention)."),
):
    """Read triples, convert them to key/value records, encode them and write a new KB directory."""
    from atlaskv.kb.records import local_chat, openai_chat
    from atlaskv.kb.store import KnowledgeBase

    opts = {}
    if engine == "ray":
        from atlaskv.kb.ray_build import require_ray

        run(require_ray)  # before any work: without Ray, one line that says how to install it
        opts = dict(address=address, actors=actors, num_gpus_per_actor=num_gpus_per_actor,
                    num_cpus_per_actor=num_cpus_per_actor, segment_rows=segment_rows)
    elif engine != "local":
        fail(f"--engine must be local or ray, got {engine!r}")
    elif address is not None or actors is not None or num_gpus_per_actor:
        fail("--address, --actors and --num-gpus-per-actor need --engine ray")
    chat = None
    if llm_nouns:
        chat = local_chat() if llm_nouns == "local" else openai_chat(model=llm_nouns)
    kb = run(lambda: KnowledgeBase.build(
        triples, out, encoder=encoder, directions=directions, format=format, skip_bad=skip_bad,
        overwrite=overwrite, chat=chat, batch_size=batch_size, show_progress=None, index=index,
        engine=engine, **opts))
    last = kb.manifest["history"][-1]
    if last.get("bad") or last.get("duplicates"):
        typer.secho(f"skipped {last.get('bad', 0)} bad rows, dropped {last.get('duplicates', 0)} duplicate "
                    "triples", fg=typer.colors.YELLOW, err=True)
    print_info(kb.info(), json_out)


@kb_app.command("info")
def kb_info(kb_dir: Path = typer.Argument(..., help="KB directory."),
            json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Counts, encoder, version and size on disk of a KB."""
    from atlaskv.kb.store import KnowledgeBase

    print_info(run(lambda: KnowledgeBase.open(kb_dir)).info(), json_out)


def _update(kb_dir: Path, triples: List[Path], format, skip_bad, op: str, json_out: bool):
    from atlaskv.kb.store import KnowledgeBase

    def go():
        kb = KnowledgeBase.open(kb_dir)
        return getattr(kb, op)(triples, format=format, skip_bad=skip_bad), kb

    res, kb = run(go)
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
    from atlaskv.kb.store import KnowledgeBase

    res = run(lambda: KnowledgeBase.open(kb_dir).compact())
    typer.echo(f"compacted to version {res.version}")


@kb_app.command("merge-segments")
def kb_merge_segments(kb_dir: Path = typer.Argument(..., help="KB directory."),
                      keep: int = typer.Option(1, help="Leading segments (the build's) left as they are.")):
    """Rewrite the segments after the first KEEP as one (each live add writes one); ids, removals and the
    HiKVP index stay, nothing is re-encoded. `atlaskv serve` does this itself for small segments."""
    from atlaskv.kb.store import KnowledgeBase

    kb = run(lambda: KnowledgeBase.open(kb_dir))
    n = len(kb.manifest["segments"])
    res = run(lambda: kb.merge_segments(keep=keep))
    typer.echo(f"{n} segments -> {len(kb.manifest['segments'])}, version {res.version}")


@kb_app.command("index")
def kb_index(kb_dir: Path = typer.Argument(..., help="KB directory."),
             json_out: bool = typer.Option(False, "--json")):
    """(Re)build the HiKVP tree over the live entries (kb build makes one; adds join it live)."""
    from atlaskv.kb.store import KnowledgeBase

    kb = run(lambda: KnowledgeBase.open(kb_dir))
    res = run(lambda: kb.build_index(show_progress=not json_out))
    info = kb.info()["index"]
    typer.echo(json.dumps({"version": res.version, **info}) if json_out else
               f"indexed version {res.version}: {info['roots']:,} roots, {info['inters']:,} inter clusters, "
               f"{info['leaves']:,} leaves (largest root holds {info['largest_root_share']:.1%})")


@kb_app.command("verify")
def kb_verify(kb_dir: Path = typer.Argument(..., help="KB directory."),
              json_out: bool = typer.Option(False, "--json")):
    """Check every file's size and sha256 against the manifest; exit 1 naming the first bad file."""
    from atlaskv.kb.store import KnowledgeBase

    report = run(lambda: KnowledgeBase.open(kb_dir, verify=True).verify())
    typer.echo(json.dumps(report) if json_out else f"ok: version {report['version']}, "
               f"{report['files']} files verified, {len(report['orphans'])} orphan files")


def kg2kv_cmd(triples: List[Path] = typer.Argument(..., help="Triple files."),
              directions: str = typer.Option("tail", help="tail, head or both."),
              format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
              limit: int = typer.Option(0, help="Print at most this many records (0: all).")):
    """Print the key/value records (JSONL) that a KB would hold for these triples."""
    from atlaskv.kb.triples import read_triples
    from atlaskv.kb.records import to_jsonl, triples_to_records

    rep = run(lambda: read_triples(triples, format))
    recs = run(lambda: triples_to_records(rep.triples[: limit or None], directions))
    sys.stdout.write(to_jsonl(recs))

