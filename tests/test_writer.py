"""The server's KB writer (serve/writer.py): writes that wait together are committed together, and each
request still gets its own counts; an acknowledged write is in the published snapshot."""
import threading

import pytest

from atlaskv.kb.store import KnowledgeBase
from atlaskv.serve.writer import KBWriter, WriteJob

import hash_encoder  # noqa: F401  (registers the test encoder)


def make(tmp_path):
    kb = KnowledgeBase.build([("a", "r", "1"), ("b", "r", "2")], tmp_path / "kb", encoder="test-hash-16", index=False)
    published = []
    writer = KBWriter(lambda: published[-1] if published else kb, published.append, max_queue=8)
    return kb, writer, published


def job(op, items):
    from atlaskv.kb.store import clean_triples

    triples, dup = clean_triples(items)
    return WriteJob(op, triples, dup)


def test_a_group_of_adds_is_one_version_with_counts_per_request(tmp_path):
    kb, writer, published = make(tmp_path)
    run = [job("add", [("c", "r", "3"), ("a", "r", "1")]),          # one new, one known
           job("add", [("c", "r", "3"), ("d", "r", "4"), ("d", "r", "4")]),  # c added just before; d twice
           job("add", [("e", "r", "5")])]
    writer._apply("add", run)
    assert [(j.result.added, j.result.duplicates) for j in run] == [(1, 1), (1, 2), (1, 0)]
    assert {j.result.version for j in run} == {kb.version + 1}
    now = published[-1]
    assert now.version == kb.version + 1 and len(now) == 5 and all(j.live_triples == 5 for j in run)
    assert KnowledgeBase.open(kb.path).version == now.version

    rm = [job("remove", [("c", "r", "3"), ("zz", "r", "0")]), job("remove", [("c", "r", "3"), ("a", "r", "1")])]
    writer._apply("remove", rm)
    assert [(j.result.removed, j.result.not_found) for j in rm] == [(1, 1), (1, 1)]
    assert sorted(t.head for t in published[-1].triples()) == ["b", "d", "e"]


def test_concurrent_writes_are_all_applied(tmp_path):
    kb, writer, published = make(tmp_path)
    results = []

    def add(i):
        results.append(writer.submit("add", [(f"x{i}", "r", "v")]).wait().result)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.added for r in results) == 8
    final = KnowledgeBase.open(kb.path)
    assert len(final) == 10 and published[-1].version == final.version
    assert final.version <= kb.version + 8  # some were committed together


def test_a_forward_in_flight_pauses_between_layers_while_a_write_is_applied():
    """Writes go first inside a forward pass (scheduler.pause_between_layers): the scheduler's thread stops at
    the next decoder layer while the writer holds `quiet`, resumes when it is set, and computes the same
    logits; other threads are never held."""
    import time

    import torch
    import transformers as tf

    from atlaskv.serve.scheduler import pause_between_layers

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        expected = model(ids).logits
    quiet = threading.Event()
    out, done = {}, threading.Event()

    def scheduler():
        with torch.no_grad():
            out["logits"] = model(ids).logits
        done.set()

    thread = threading.Thread(target=scheduler)
    handles = pause_between_layers(model, quiet, thread)
    try:
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected)  # this thread is not held, quiet or not
        thread.start()
        time.sleep(0.3)
        assert not done.is_set()  # held at the first layer while the "write" runs
        quiet.set()
        assert done.wait(10)
        thread.join()
        assert torch.equal(out["logits"], expected)
    finally:
        for h in handles:
            h.remove()


def test_passing_thread_returns_or_raises_in_the_caller():
    """Loading and KB writes run in a thread that ends with them (serve/threads.py): the caller gets the result,
    or the error itself, and the work did run in another thread."""
    import threading

    from atlaskv.serve.threads import in_passing_thread

    caller = threading.get_ident()
    assert in_passing_thread(threading.get_ident) != caller
    assert in_passing_thread(lambda: 41 + 1) == 42
    with pytest.raises(KeyError, match="missing"):
        in_passing_thread(lambda: {}["missing"])
    assert not [t for t in threading.enumerate() if t.name == "atlaskv-passing"]  # it ended
