"""`atlaskv` command line: a thin typer layer over the Python API, with the API's names.

kb.py: kb build/info/add/remove/compact/index/verify, kg2kv; ask.py: ask, chat, serve, ui;
evaluate.py: train, eval grounding, bench scale; common.py: what they share. Nothing here imports torch
until a command runs (`atlaskv --help` stays fast)."""
from __future__ import annotations

import typer

from atlaskv.cli import ask, evaluate, kb

app = typer.Typer(help="atlaskv: a knowledge graph inside a frozen LLM's attention.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(kb.kb_app, name="kb")
app.add_typer(evaluate.eval_app, name="eval")
app.add_typer(evaluate.bench_app, name="bench")
app.command("kg2kv")(kb.kg2kv_cmd)
app.command("train")(evaluate.train_cmd)
app.command("ask")(ask.ask_cmd)
app.command("chat")(ask.chat_cmd)
app.command("serve")(ask.serve_cmd)
app.command("ui")(ask.ui_cmd)


@app.command("version")
def version():
    """Print the atlaskv version."""
    from atlaskv import __version__

    typer.echo(__version__)


def main():  # pragma: no cover
    app()
