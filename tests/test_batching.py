"""Continuous batching (model/batching.py) with the real SmolLM2 + shipped adapter: answers that start apart and
decode together are token for token the answers asked alone, on the demo KB and on a HiKVP-pruned KB of real
FB15k-237 facts (every row keeps its own leaves); sampling stays within its budget; the scheduler answers
requests that arrive while others decode."""
import json
import threading

import pytest
import torch

from atlaskv.defaults import REFUSAL, REFUSE_BELOW
from atlaskv.kb.store import KnowledgeBase
from atlaskv.kb.triples import read_triples
from atlaskv.model.batching import BatchDecoder, PromptTooLong, Request
from atlaskv.model.kb_inputs import merged
from atlaskv.model.refusal import names_value

pytestmark = pytest.mark.slow
EXTRA = ["Who is the spouse of Humphrey Bogart?", "Where was Michael Jackson born?", "What is the capital of Mars?"]


@pytest.fixture(scope="module")
def demo_kb(tmp_path_factory, demo_facts, encoder):
    return KnowledgeBase.build(demo_facts, tmp_path_factory.mktemp("batch") / "kb", encoder=encoder)


@pytest.fixture(scope="module")
def fb15k_kb(tmp_path_factory, shared, encoder):
    triples = read_triples(shared / "eval" / "fb15k" / "triples.tsv").triples[:400]
    kb = KnowledgeBase.build(triples, tmp_path_factory.mktemp("batch") / "fb", encoder=encoder)
    assert kb.info()["index"] is not None  # HiKVP: each answer keeps its own leaves
    return kb, triples


def demo_questions():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "demo" / "questions.jsonl"
    return [json.loads(line)["question"] for line in path.read_text().splitlines()] + EXTRA


def staggered(decoder: BatchDecoder, questions, kb, **kw):
    """Start the questions a few decode steps apart, so they join a batch already running."""
    seqs = []
    for i, q in enumerate(questions):
        seq = decoder.start(q, kb, **kw)
        seqs.append(seq)
        decoder.join(seq)
        for _ in range(i % 3):
            decoder.step()
    while decoder.rows:
        decoder.step()
    return seqs


def same(lone, seq):
    return lone.text == seq.answer.text and [t for t, _ in lone.citations] == [t for t, _ in seq.answer.citations]


def test_batched_answers_are_the_lone_answers(trained_model, demo_kb):
    qs = demo_questions()
    lone = [trained_model.ask(q, demo_kb, max_new_tokens=32) for q in qs]
    seqs = staggered(BatchDecoder(trained_model), qs, demo_kb, max_new_tokens=32)
    assert all(s.done for s in seqs)
    mismatched = [(q, a.text, s.answer.text) for q, a, s in zip(qs, lone, seqs) if not same(a, s)]
    assert not mismatched
    assert any("Lauren Bacall" in s.answer.text for s in seqs)


def test_batched_answers_over_pruned_fb15k(trained_model, fb15k_kb, shared):
    kb, triples = fb15k_kb
    facts = set(triples)
    qs = [q for q in map(json.loads, (shared / "eval" / "fb15k" / "questions.jsonl").read_text().splitlines())
          if (q["head"], q["relation"], q["tail"]) in {tuple(t) for t in facts}][:8]
    assert len(qs) == 8
    texts = [q["question"] for q in qs]
    lone = [trained_model.ask(t, kb, max_new_tokens=24) for t in texts]
    assert all(a.pruned for a in lone)
    seqs = staggered(BatchDecoder(trained_model), texts, kb, max_new_tokens=24)
    assert [s.answer.text for s in seqs] == [a.text for a in lone]
    assert all(same(a, s) for a, s in zip(lone, seqs))
    # the rows read different leaves, and each cites its own gold fact first
    cited = [s.answer.citations[0][0] for s in seqs]
    assert sum((c.head, c.relation, c.tail) == (q["head"], q["relation"], q["tail"]) for c, q in zip(cited, qs)) >= 7


def test_a_group_prefilled_over_one_snapshot_answers_as_alone(trained_model, fb15k_kb, shared):
    """Serving admits a group over one KB snapshot: its KB layers run once for the batch (kb_inputs.merged), then
    each row gets its own part. Every row's answer, citations and kept leaves are those of the question alone."""
    kb, triples = fb15k_kb
    facts = {tuple(t) for t in triples}
    qs = [q for q in map(json.loads, (shared / "eval" / "fb15k" / "questions.jsonl").read_text().splitlines())
          if (q["head"], q["relation"], q["tail"]) in facts][8:14]
    texts = [q["question"] for q in qs] + ["What is the capital of Mars?"]
    assert len({len(trained_model.chat_ids(t)[0]) for t in texts}) > 1  # prompts of several lengths: left padding
    lone = [trained_model.ask(t, kb, max_new_tokens=24) for t in texts]
    assert merged([trained_model.kb_inputs(kb) for _ in range(2)], None) is not None  # the path under test
    decoder = BatchDecoder(trained_model)
    seqs = decoder.start_many([Request(t, kb, max_new_tokens=24) for t in texts])
    alone = [BatchDecoder(trained_model).start(t, kb, max_new_tokens=1) for t in texts]
    for seq, one in zip(seqs, alone):
        mine, its = seq.kb_in.call.selections, one.kb_in.call.selections
        assert mine.keys() == its.keys()
        for key in its:
            assert torch.equal(mine[key].positions, its[key].positions)
        assert seq.kb_in.recorded.selected.keys() == one.kb_in.recorded.selected.keys()
        for layer, a in one.kb_in.recorded.attention.items():
            torch.testing.assert_close(seq.kb_in.recorded.attention[layer][..., -a.shape[1]:, :], a,
                                       atol=1e-4, rtol=1e-3)
    for seq in seqs:
        decoder.join(seq)
    while decoder.rows:
        decoder.step()
    assert [s.answer.text for s in seqs] == [a.text for a in lone]
    assert all(same(a, s) for a, s in zip(lone, seqs))


def test_a_group_over_a_flat_kb_answers_as_alone(trained_model, tmp_path, demo_facts, encoder):
    """The same over a KB without a HiKVP tree (every row attends to every entry)."""
    facts = read_triples(demo_facts).triples[:60]
    kb = KnowledgeBase.build(facts, tmp_path / "flat", encoder=encoder, index=False)
    assert kb.info()["index"] is None
    texts = [f"What is the {t.relation} of {t.head}?" for t in facts[:5:2]] + ["Where was Michael Jackson born?"]
    lone = [trained_model.ask(t, kb, max_new_tokens=16) for t in texts]
    assert merged([trained_model.kb_inputs(kb) for _ in range(2)], None) is not None
    decoder = BatchDecoder(trained_model)
    seqs = decoder.start_many([Request(t, kb, max_new_tokens=16) for t in texts])
    for seq in seqs:
        decoder.join(seq)
    while decoder.rows:
        decoder.step()
    assert all(same(a, s) for a, s in zip(lone, seqs))


def test_refusal_ends_at_the_prefill(trained_model, demo_kb):
    decoder = BatchDecoder(trained_model)
    seq = decoder.start("What is the country of Mount Kilimanjaro?", demo_kb, refuse_below=REFUSE_BELOW)
    assert seq.done and seq.answer.refused and seq.generated == []
    decoder.join(seq)
    assert decoder.rows == []


def test_sampling_and_limits(trained_model, demo_kb):
    decoder = BatchDecoder(trained_model)
    seqs = []
    for i, q in enumerate(demo_questions()[:4]):
        seq = decoder.start(q, demo_kb, max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9)
        seq.generator = torch.Generator().manual_seed(i)
        decoder.join(seq)
        seqs.append(seq)
    while decoder.rows:
        decoder.step()
    assert all(s.done and 1 <= len(s.generated) <= 6 for s in seqs)
    with pytest.raises(PromptTooLong, match="at most 5"):
        decoder.start("What is the capital of Canada?", demo_kb, max_prompt_tokens=5)


def test_scheduler_answers_requests_that_arrive_while_others_decode(trained_model, demo_kb):
    from atlaskv.serve.scheduler import QueueFull, Scheduler

    sched = Scheduler(trained_model, lambda: demo_kb, max_batch=4, max_queue=2, refuse_below=REFUSE_BELOW,
                      max_prompt_tokens=2048, prune_config=None, top_citations=5)
    qs = demo_questions()[:6]
    lone = {q: trained_model.ask(q, demo_kb, max_new_tokens=32).or_refusal().text for q in qs}
    tickets = []
    for q in qs:
        while True:
            try:
                tickets.append(sched.submit([{"role": "user", "content": q}], {"max_new_tokens": 32}))
                break
            except QueueFull:  # at most 2 wait: the rest come in while the first ones decode
                threading.Event().wait(0.05)
    got = [t.wait().seq.answer.text for t in tickets]
    assert got == [lone[q] for q in qs]
    assert sched.load() == (0, 0)


def test_scheduler_survives_a_kb_it_cannot_read(trained_model, demo_kb):
    """A request whose KB snapshot cannot be read gets the error; the next one is answered as usual."""
    from atlaskv.serve.scheduler import Scheduler

    calls = []

    def snapshot():
        calls.append(1)
        if len(calls) == 1:
            raise FileNotFoundError("manifest.json")
        return demo_kb

    sched = Scheduler(trained_model, snapshot, max_batch=4, max_queue=4, refuse_below=REFUSE_BELOW,
                      max_prompt_tokens=2048, prune_config=None, top_citations=5)
    first = sched.submit([{"role": "user", "content": "What is the capital of Canada?"}], {"max_new_tokens": 16})
    with pytest.raises(FileNotFoundError):
        first.wait()
    second = sched.submit([{"role": "user", "content": "What is the capital of Canada?"}], {"max_new_tokens": 16})
    assert "Ottawa" in second.wait().seq.answer.text


def test_a_low_support_answer_streams_once_it_names_the_top_value(trained_model, demo_kb):
    """The refusal rule's "if_unnamed" verdict (here every answer's: a support bar no fact reaches): the
    answer's tokens are held back until it names the most-cited value, then streamed at once; an answer that
    ends without naming it is refused and has streamed nothing."""
    tok = trained_model.tokenizer
    decoder = BatchDecoder(trained_model)
    step, got = [0], []
    seq = decoder.start("What is the capital of Canada?", demo_kb, max_new_tokens=32, refuse_below=1e9,
                        on_token=lambda t: got.append((t, step[0])))
    decoder.join(seq)
    while decoder.rows:
        step[0] += 1
        decoder.step()
    top = seq.answer.citations[0][0].tail
    assert top == "Ottawa" and not seq.answer.refused and "Ottawa" in seq.answer.text
    assert [t for t, _ in got] == seq.generated
    named_at = next(i for i in range(1, len(seq.generated) + 1)
                    if names_value(tok.decode(seq.generated[:i], skip_special_tokens=True), top))
    assert named_at > 1  # something was held back
    # token i is chosen at step i (token 0 by the prefill); those before the value come out with its last token
    assert [s for _, s in got] == [max(i, named_at - 1) for i in range(len(got))]

    got.clear()
    seq = decoder.start("What is the capital of Canada?", demo_kb, max_new_tokens=1, refuse_below=1e9,
                        on_token=lambda t: got.append((t, 0)))
    assert seq.done and len(seq.generated) == 1 and seq.answer.refused and seq.answer.text == REFUSAL and got == []


def test_an_opening_article_before_the_value_is_left_out_of_text_and_stream(trained_model, demo_kb):
    """Asked without a "the" to restate, SmolLM2 opens "The" and value decoding pushes the value: the tokens are
    "The Male." and the user reads "Male.", alike from ask, ask's stream and a batched, streamed answer."""
    tok, q = trained_model.tokenizer, "Is Elvis Presley a man or a woman?"
    decoder, got = BatchDecoder(trained_model), []
    seq = decoder.start(q, demo_kb, max_new_tokens=32, refuse_below=REFUSE_BELOW, on_token=got.append)
    decoder.join(seq)
    while decoder.rows:
        decoder.step()
    assert tok.decode(seq.generated, skip_special_tokens=True).startswith("The Male")  # what the model wrote
    assert seq.answer.text == "Male." and not seq.answer.refused
    assert tok.decode(got, skip_special_tokens=True).strip() == "Male."
    assert trained_model.ask(q, demo_kb).text == "Male."
    assert "".join(trained_model.stream(q, demo_kb)).strip() == "Male."
