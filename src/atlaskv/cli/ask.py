"""`atlaskv ask`, `chat`, `serve` and `ui`: answers from a KB, in a terminal, over HTTP or on a web page."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from atlaskv.cli.common import ROUTE_HELP, SHORTLIST_HELP, TOP_K_HELP, fail, print_info, prune_options, run
from atlaskv.defaults import (LACKING_RATIO, MAX_BATCH, MAX_NEW_TOKENS, PRUNE_ROUTE, PRUNE_SHORTLIST, PRUNE_TOP_K_TEXT,
                              REFUSE_BELOW)

REFUSE_HELP = ("Answer \"I don't know.\" when the question does not name the most-cited fact's entity, or the "
               "facts naming the most-cited value weigh under this many times the heaviest fact naming another "
               "value and the answer does not name it (0: never; calibrated in "
               "benchmarks/results/answer_targets/refusal_rules.json).")
LACKING_HELP = ("... or when a fact the KB lacks about the answer's entity draws the question this many times the "
                "attention of the fact backing the answer (0: never; calibrated in "
                "benchmarks/results/refusal_v7/rules.json).")


def ask_cmd(question: str = typer.Argument(..., help="The question."),
            kb_dir: Path = typer.Option(..., "--kb", help="KB directory."),
            adapter: Optional[Path] = typer.Option(None, help="Adapter folder (default: the shipped one)."),
            max_new_tokens: int = typer.Option(MAX_NEW_TOKENS),
            refuse_below: float = typer.Option(REFUSE_BELOW, help=REFUSE_HELP),
            lacking_ratio: float = typer.Option(LACKING_RATIO, help=LACKING_HELP),
            no_prune: bool = typer.Option(False, "--no-prune", help="Flat KB attention over every entry "
                                                                  "(default: HiKVP when the KB has an index)."),
            top_k: str = typer.Option(PRUNE_TOP_K_TEXT, "--top-k", help=TOP_K_HELP),
            route: str = typer.Option(PRUNE_ROUTE, help=ROUTE_HELP),
            shortlist: int = typer.Option(PRUNE_SHORTLIST, min=0, help=SHORTLIST_HELP),
            json_out: bool = typer.Option(False, "--json")):
    """Answer a question from the KB and show the facts it attended to most."""
    import time

    if not question.strip():
        fail("empty question")
    cfg = prune_options(top_k, route, False, True, "selected", shortlist)
    kb, akv = _load(kb_dir, adapter)
    t0 = time.time()
    ans = run(lambda: akv.ask(question, kb, max_new_tokens=max_new_tokens, prune=False if no_prune else None,
                               prune_config=cfg))
    ans = ans.or_refusal(refuse_below, lacking_ratio) if refuse_below > 0 else ans
    if json_out:
        typer.echo(json.dumps({"answer": ans.text, "citations": [
            {"head": t.head, "relation": t.relation, "tail": t.tail, "weight": round(w, 4)} for t, w in ans.citations],
            "kb_size": ans.kb_size, "pruned": bool(getattr(ans, "pruned", False)), "refused": ans.refused,
            "missing": list(ans.missing) if ans.refused and ans.missing else None,
            "seconds": round(time.time() - t0, 3)}))
        return
    _print_answer(ans)


def _load(kb_dir: Path, adapter: Optional[Path]):
    """The KB, then the model: the errors people hit first (no KB there, a KB encoded with another
    encoder than the adapter reads) come in one line, before the slow model load."""
    from atlaskv.model.atlaskv import AtlasKV, default_adapter_dir
    from atlaskv.kb.store import KnowledgeBase

    kb = run(lambda: KnowledgeBase.open(kb_dir))
    cfg = Path(adapter or default_adapter_dir()) / "adapter_config.json"
    if cfg.is_file():
        want = json.loads(cfg.read_text("utf-8")).get("encoder")
        if want and kb.encoder_name != want:
            fail(f"KB {kb_dir} was built with encoder {kb.encoder_name!r}, but the adapter expects {want!r}: "
                  f"rebuild it with `atlaskv kb build ... --encoder {want}` (or pass the matching --adapter)")
    return kb, run(lambda: AtlasKV.from_pretrained(adapter))


def _print_answer(ans, console=None) -> None:
    """The answer, then a small table of the facts it attended to most."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    console.print(ans.text, markup=False)
    if ans.refused and ans.missing:
        console.print(f"(the KB holds no {ans.missing[1]!r} fact about {ans.missing[0]})", markup=False, style="dim")
    if not ans.citations:
        return
    t = Table(box=box.SIMPLE, title=f"cited facts (KB of {ans.kb_size:,})", title_justify="left",
              show_edge=False, pad_edge=False)
    for col in ("weight", "head", "relation", "tail"):
        t.add_column(col, justify="right" if col == "weight" else "left")
    for tr, w in ans.citations:
        t.add_row(f"{w:.1%}", tr.head, tr.relation, tr.tail)
    console.print(t)



CHAT_HELP = """commands:
  /add head | relation | tail      add a fact to the KB (live, saved in the KB directory)
  /remove head | relation | tail   remove a fact
  /kb                              KB info        /reset   forget the conversation
  /help                            this help      /quit    leave (or Ctrl-D)"""


def chat_cmd(kb_dir: Path = typer.Option(..., "--kb", help="KB directory."),
             adapter: Optional[Path] = typer.Option(None, help="Adapter folder (default: the shipped one)."),
             max_new_tokens: int = typer.Option(MAX_NEW_TOKENS),
             turns: int = typer.Option(3, help="Earlier question/answer turns kept as context."),
             refuse_below: float = typer.Option(REFUSE_BELOW, help=REFUSE_HELP),
             lacking_ratio: float = typer.Option(LACKING_RATIO, help=LACKING_HELP)):
    """Multi-turn chat over a KB, with /add, /remove and /kb commands that change the KB live."""
    from rich.console import Console

    kb, akv = _load(kb_dir, adapter)
    console = Console(highlight=False)
    _history(write=False)
    typer.echo(f"KB {kb_dir}: {len(kb):,} facts. Ask a question, or /help.")
    messages: list[dict] = []
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            typer.echo()
            break
        if not line:
            continue
        if line.startswith("/"):
            messages = _chat_command(line, kb, messages)
            if messages is None:
                break
            continue
        messages = messages[-2 * turns:] if turns > 0 else []
        messages.append({"role": "user", "content": line})
        try:
            ans = akv.ask(messages, kb, max_new_tokens=max_new_tokens)
            ans = ans.or_refusal(refuse_below, lacking_ratio) if refuse_below > 0 else ans
        except Exception as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED)
            messages.pop()
            continue
        if ans.refused:  # the rule's words, not the model's: kept as context, they make it refuse again
            messages.pop()  # the same question once /add has given the KB its fact
        else:
            messages.append({"role": "assistant", "content": ans.text})
        _print_answer(ans, console)
    _history(write=True)


def _chat_command(line: str, kb, messages: list[dict]) -> list[dict] | None:
    """Run one /command of the chat: the conversation to go on with, None to leave."""
    cmd, _, arg = line.partition(" ")
    if cmd in ("/quit", "/exit"):
        return None
    elif cmd == "/kb":
        print_info(kb.info(), False)
    elif cmd == "/reset":
        return []
    elif cmd in ("/add", "/remove"):
        parts = [p.strip() for p in arg.split("|")]
        if len(parts) != 3 or not all(parts):
            typer.secho(f"usage: {cmd} head | relation | tail", fg=typer.colors.YELLOW)
            return messages
        try:
            res = getattr(kb, cmd[1:])([tuple(parts)])
        except Exception as e:  # a busy or broken KB must not end the session
            typer.secho(f"error: {e}", fg=typer.colors.RED)
            return messages
        done, verb, none = ((res.added, "added", " (already there)") if cmd == "/add"
                            else (res.removed, "removed", " (not found)"))
        typer.echo(f"{verb} {done}{'' if done else none}; KB version {kb.version}, {len(kb):,} facts")
    else:
        typer.echo(CHAT_HELP)
    return messages


def _history(write: bool) -> None:
    """readline: arrow keys and history across sessions, only for a person typing."""
    if not sys.stdin.isatty():
        return
    import readline

    history_file = Path.home() / ".atlaskv_history"
    try:
        (readline.write_history_file if write else readline.read_history_file)(history_file)
    except OSError:
        pass


def serve_cmd(kb_dir: Path = typer.Option(..., "--kb", help="KB directory."),
              host: str = typer.Option("127.0.0.1", help="Address to bind (not localhost: set ATLASKV_API_KEY)."),
              port: int = typer.Option(8000),
              adapter: Optional[Path] = typer.Option(None, help="Adapter folder (default: the shipped one)."),
              max_tokens: int = typer.Option(512, help="Largest max_tokens a request may ask for."),
              max_body_bytes: int = typer.Option(1 << 20, help="Largest request body (413 above)."),
              max_queue: int = typer.Option(64, help="Requests waiting (beyond the batch) before 503."),
              max_batch: int = typer.Option(MAX_BATCH, help="Answers decoded together (continuous batching)."),
              refuse_below: float = typer.Option(REFUSE_BELOW, help=REFUSE_HELP),
              lacking_ratio: float = typer.Option(LACKING_RATIO, help=LACKING_HELP)):
    """OpenAI-compatible server: /v1/chat/completions (with citations), /v1/models, /v1/kb/triples, /v1/kb,
    /health, and the web page at /. With ATLASKV_API_KEY set, every request needs
    `Authorization: Bearer <key>` (the page asks for it)."""

    import uvicorn

    _warn_if_open(host)
    app_ = _app(kb_dir, adapter, max_tokens=max_tokens, max_body_bytes=max_body_bytes, max_queue=max_queue,
                max_batch=max_batch, refuse_below=refuse_below, lacking_ratio=lacking_ratio)
    uvicorn.run(app_, host=host, port=port, log_level="info")


DEMO_KB, DEMO_FACTS = Path("build/demo_kb"), Path("examples/demo/facts.tsv")


def ui_cmd(kb_dir: Path = typer.Option(DEMO_KB, "--kb", help="KB directory (built from --facts when missing)."),
           facts: Path = typer.Option(DEMO_FACTS, help="Facts to build the KB from when --kb has none "
                                                       "(like `make demo`)."),
           host: str = typer.Option("127.0.0.1", help="Address to bind (not localhost: set ATLASKV_API_KEY)."),
           port: int = typer.Option(8000),
           adapter: Optional[Path] = typer.Option(None, help="Adapter folder (default: the shipped one)."),
           open_browser: bool = typer.Option(True, "--open/--no-open", help="Open the page in a browser, "
                                                                           "when this machine has a display.")):
    """The web page on the demo KB: ask with streamed answers and their cited facts, add and remove facts,
    browse the KB. Builds the KB first when missing, serves it (the same server as `atlaskv serve`) and
    prints the page's address."""
    import threading

    import uvicorn

    if not (kb_dir / "manifest.json").is_file():
        if not facts.is_file():
            fail(f"no KB at {kb_dir} and no facts file {facts} to build it from: run this in the atlaskv "
                 "checkout, or pass --kb (a built KB) or --facts")
        from atlaskv.kb.store import KnowledgeBase

        typer.echo(f"building {kb_dir} from {facts} (once) ...")
        run(lambda: KnowledgeBase.build(facts, kb_dir))
    _warn_if_open(host)
    server = uvicorn.Server(uvicorn.Config(_app(kb_dir, adapter), host=host, port=port, log_level="warning"))
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # every address: this machine's is one
    url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/"
    threading.Thread(target=_announce, args=(server, url, open_browser), daemon=True).start()
    server.run()


def _app(kb_dir: Path, adapter: Optional[Path], **limits):
    """The server app over the KB and the model, its KB cache and first steps warm before the first request;
    loaded in a thread that ends, so that only the model's thread keeps torch's worker pool (serve/threads.py)."""
    from atlaskv.serve.routes import create_app
    from atlaskv.serve.threads import in_passing_thread

    def build():
        kb, akv = _load(kb_dir, adapter)
        run(lambda: akv.kb_inputs(kb))
        app = create_app(akv, kb, **limits)
        run(app.state.service.warm_up)
        return app
    return in_passing_thread(build, name="atlaskv-load")


def _warn_if_open(host: str) -> None:
    if host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get("ATLASKV_API_KEY"):
        typer.secho(f"warning: serving on {host} without ATLASKV_API_KEY: anyone who can reach it can read and "
                    "change the KB", fg=typer.colors.YELLOW, err=True)


def _announce(server, url: str, open_browser: bool) -> None:
    """Once the server listens: print the page's address and open it where a browser can show it (not a
    text browser taking over this terminal on a machine without a display)."""
    import time
    import webbrowser

    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.1)
    typer.echo(f"atlaskv ui: open {url}  (Ctrl-C to stop)")
    has_display = sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if open_browser and has_display:
        try:
            webbrowser.open(url)
        except Exception:  # no usable browser: the printed address is enough
            pass
