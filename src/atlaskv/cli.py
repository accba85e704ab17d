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


@app.command("train")
def train_cmd(
    data: List[Path] = typer.Option(..., "--data", help="Training triples (any readable format)."),
    out: Path = typer.Option(..., "--out", help="Adapter folder (checkpoint/, train_log.jsonl, loss_curve.png)."),
    steps: int = typer.Option(1000, help="Optimizer steps (a resumed run may raise it)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    batch_size: int = typer.Option(8, help="Questions per micro-batch."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW, cosine decay to 1%)."),
    base_model: Optional[str] = typer.Option(None, help="Base LLM: local HF folder (default SmolLM2-135M-Instruct)."),
    encoder: str = typer.Option("all-MiniLM-L6-v2", help="Sentence encoder of the KB embeddings."),
    kb_layer_frequency: int = typer.Option(3, help="Every n-th layer reads the KB."),
    kb_heads: str = typer.Option("query", help="KB key/value width: query (reference) or kv (GQA)."),
    question_input: bool = typer.Option(False, help="KB queries also see the question's sentence embedding."),
    retrieval_loss_weight: float = typer.Option(1.0, help="Auxiliary KB-attention loss (0 = the paper's recipe)."),
    refusal_rate: float = typer.Option(0.1, help="Share of questions whose fact is left out (answer: I don't know)."),
    distractors_max: int = typer.Option(64, help="Cap of the random-distractor curriculum."),
    shuffle_values: bool = typer.Option(False, help="Control: a wrong value behind every key."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("float32", help="Base model dtype (float32 or bfloat16)."),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: all)."),
    checkpoint_every: int = typer.Option(100),
    eval_every: int = typer.Option(50, help="Validation ACC@1 (KB of 100) every n steps; 0 = never."),
    distractors_every: int = typer.Option(100, help="Curriculum: 4 more random distractors every n steps."),
    max_minutes: Optional[float] = typer.Option(None, help="Stop cleanly after this long (then --resume)."),
):
    """Train a KB adapter on triples (frozen LLM and encoder); checkpoints, resumable."""
    from .train import TrainConfig, train

    cfg = TrainConfig(data=[str(d) for d in data], out=str(out), steps=steps, batch_size=batch_size,
                      grad_accum=grad_accum, lr=lr, base_model=base_model, encoder=encoder,
                      kb_layer_frequency=kb_layer_frequency, kb_heads=kb_heads, question_input=question_input,
                      retrieval_loss_weight=retrieval_loss_weight, refusal_rate=refusal_rate,
                      distractors_max=distractors_max, shuffle_values=shuffle_values, device=device,
                      dtype=dtype, seed=seed, threads=threads, checkpoint_every=checkpoint_every,
                      eval_every=eval_every, distractors_every=distractors_every, max_minutes=max_minutes)
    path = _run(lambda: train(cfg, resume=resume, log=lambda m: typer.echo(m, err=True)))
    typer.echo(f"adapter saved to {path}")


eval_app = typer.Typer(help="Evaluate grounding and answers.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("grounding")
def eval_grounding_cmd(
    set_dir: Path = typer.Option(..., "--set", help="Evaluation set folder (triples.tsv + questions.jsonl)."),
    sizes: str = typer.Option("10,100,1000,10000", help="KB sizes, comma-separated."),
    questions: int = typer.Option(500, help="Questions per point (all where the set has fewer)."),
    answer_questions: Optional[int] = typer.Option(None, help="Generate answers for only this many of them."),
    method: str = typer.Option("atlaskv", help="atlaskv (flat for now)."),
    no_prune: bool = typer.Option(True, "--no-prune/--prune", help="Flat KB attention (pruning: HiKVP issue)."),
    distractors: str = typer.Option("random", help="random or same-head."),
    seed: int = typer.Option(0),
    adapter: Optional[Path] = typer.Option(None, help="Adapter folder (default: the shipped one)."),
    scale_factor: Optional[float] = typer.Option(None, help="KB logits += ln(s) - ln(N) (default: adapter's)."),
    scale_mode: Optional[str] = typer.Option(None, help="shift (always), cap (only N > s) or none; default: adapter's."),
    batch_size: int = typer.Option(16),
    no_answers: bool = typer.Option(False, "--no-answers", help="Grounding accuracy only (no generation)."),
    json_out: Path = typer.Option(..., "--json", help="Where to write the results JSON."),
):
    """ACC@1/ACC@5 of the KB attention, answer exact-match with and without the gold fact."""
    from .encoder import load_encoder
    from .evaluate import eval_grounding
    from .model import AtlasKV

    if method != "atlaskv" or not no_prune:
        _fail("this version evaluates --method atlaskv --no-prune only (baselines and HiKVP come next)")
    if distractors not in ("random", "same-head"):
        _fail("--distractors must be random or same-head")
    if scale_mode not in (None, "shift", "cap", "none"):
        _fail("--scale-mode must be shift, cap or none")
    akv = _run(lambda: AtlasKV.from_pretrained(adapter))
    enc = load_encoder(akv.adapter.config.encoder)
    res = _run(lambda: eval_grounding(set_dir, [int(float(x)) for x in sizes.split(",")], akv, enc, questions,
                                      distractors, seed, batch_size, not no_answers, answer_questions,
                                      scale_factor=scale_factor, scale_mode=scale_mode))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(res, indent=1) + "\n")
    for r in res["results"]:
        typer.echo(f"N={r['kb_size']:>6}  acc1 {r['acc1']:.3f}  acc5 {r['acc5']:.3f}  answer_em {r['answer_em']}  "
                   f"without gold {r['answer_em_without_gold']}  ({r['seconds']} s)")


@app.command("ask")
def ask_cmd(question: str = typer.Argument(..., help="The question."),
            kb_dir: Path = typer.Option(..., "--kb", help="KB directory."),
            adapter: Optional[Path] = typer.Option(None, help="Adapter folder (default: the shipped one)."),
            max_new_tokens: int = typer.Option(48),
            json_out: bool = typer.Option(False, "--json")):
    """Answer a question from the KB and show the facts it attended to most."""
    import time

    from .model import AtlasKV
    from .store import KnowledgeBase

    if not question.strip():
        _fail("empty question")
    kb = _run(lambda: KnowledgeBase.open(kb_dir))
    akv = _run(lambda: AtlasKV.from_pretrained(adapter))
    t0 = time.time()
    ans = _run(lambda: akv.ask(question, kb, max_new_tokens=max_new_tokens))
    if json_out:
        typer.echo(json.dumps({"answer": ans.text, "citations": [
            {"head": t.head, "relation": t.relation, "tail": t.tail, "weight": round(w, 4)} for t, w in ans.citations],
            "kb_size": ans.kb_size, "pruned": False, "seconds": round(time.time() - t0, 3)}))
        return
    typer.echo(ans.text)
    for t, w in ans.citations:
        typer.echo(f"  {w:6.1%}  ({t.head} | {t.relation} | {t.tail})")


@app.command("version")
def version():
    """Print the atlaskv version."""
    from . import __version__

    typer.echo(__version__)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
