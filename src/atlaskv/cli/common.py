"""What the command modules share: one-line errors, the info table, the HiKVP options.

Imports typer and the defaults only: `atlaskv --help` must not load torch (the heavy imports sit inside
the commands)."""
from __future__ import annotations

import json

import typer

TOP_K_HELP = "HiKVP top-k per level: roots,inter,leaves."
ROUTE_HELP = "HiKVP routing: kbq (the LLM's KB query heads, the paper), question (sentence embedding), both."
SHORTLIST_HELP = ("HiKVP route both: candidates per level that the KB query heads score, those nearest the question "
                  "(0: every candidate, as the paper).")


def fail(msg: str, code: int = 1):
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def run(fn):
    """Turn the library's own errors into one clear line and exit code 1 (no traceback)."""
    from atlaskv.model.adapter import AdapterError
    from atlaskv.kb.encoder import EncoderError
    from atlaskv.kb.triples import KGFormatError
    from atlaskv.kb.store import KBError

    try:
        return fn()
    except (KGFormatError, KBError, EncoderError, AdapterError, FileNotFoundError, ValueError) as e:
        fail(str(e))


def print_info(info: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(show_header=False, box=None)
    for k, v in info.items():
        t.add_row(f"[bold]{k}[/]", f"{v:,}" if isinstance(v, int) else str(v))
    Console().print(t)


def prune_options(top_k: str, route: str, per_head: bool, reuse: bool, scale_n: str, shortlist: int):
    """PruneConfig from the CLI's spelling (shared by ask, eval and bench)."""
    from atlaskv.model.pruning import PruneConfig

    try:
        return PruneConfig(top_k=tuple(int(x) for x in top_k.split(",")), route=route, per_head=per_head,
                           reuse=reuse, scale_n=scale_n, shortlist=shortlist)
    except ValueError as e:
        fail(f"--top-k/--route/--scale-n/--shortlist: {e}")
