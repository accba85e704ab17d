"""Training: batches, labels, losses, checkpoint/resume (tiny random LLM with the real tokenizer)."""
import json

import numpy as np
import pytest
import torch

from atlaskv.kb.triples import read_triples, write_triples
from atlaskv.defaults import REFUSAL
from atlaskv.train import (TrainConfig, TrainData, build_records, encode_batch, lr_factor, make_batch,
                           n_distractors, prepare_data, train)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, demo_facts):
    d = tmp_path_factory.mktemp("train")
    write_triples(read_triples(demo_facts).triples[:300], d / "facts.tsv")
    return d / "facts.tsv"


@pytest.fixture(scope="module")
def data(small_data, tmp_path_factory):
    cfg = TrainConfig(data=[str(small_data)], out="unused")
    return prepare_data(cfg, tmp_path_factory.mktemp("cache"))


def test_records_drop_ambiguous_keys():
    from atlaskv.kb.triples import Triple

    recs = build_records([Triple("A", "place of birth", "X"), Triple("B", "place of birth", "X")])
    # tail-masked keys are unique; "the entity whose place of birth is X" names two heads: dropped
    assert [(r.masked, r.key_text) for r in recs] == [("tail", "the place of birth of A"),
                                                       ("tail", "the place of birth of B")]


def test_batches_are_deterministic_and_consistent(data):
    cfg = TrainConfig(data=[], out="", batch_size=8, refusal_rate=0.3, seed=3)
    a, b = make_batch(cfg, data, 17), make_batch(cfg, data, 17)
    assert a.prompts == b.prompts and np.array_equal(a.kb_rows, b.kb_rows)
    assert make_batch(cfg, data, 18).prompts != a.prompts
    for step in range(60):
        batch = make_batch(cfg, data, step)
        assert len(set(batch.kb_rows.tolist())) == len(batch.kb_rows)
        for prompt, answer, gold in zip(batch.prompts, batch.answers, batch.gold):
            if not gold:
                assert answer == REFUSAL
                continue
            for g in gold:  # the gold position holds the fact the question asks about
                rec = data.records[batch.kb_rows[g]]
                assert rec.key_text.casefold() in prompt.casefold() and rec.value_text in answer


def test_same_relation_negatives_put_other_entities_facts_of_that_kind_in_the_kb(data):
    """With the option, every question's KB holds up to n other entities' facts of its relation and masked side
    (what a question whose fact is missing must not copy), and a refused fact still stays out."""
    def share_among_its_kind(cfg):
        met = total = 0
        for step in range(20):
            batch = make_batch(cfg, data, step)
            rows = [data.records[i] for i in batch.kb_rows]
            for prompt, answer in zip(batch.prompts, batch.answers):
                asked = max((r for r in data.records if r.key_text.casefold() in prompt.casefold()),
                            key=lambda r: len(r.key_text))
                kind = (asked.triple.relation, asked.masked)
                beside = sum((r.triple.relation, r.masked) == kind and r.key_text != asked.key_text for r in rows)
                met += beside >= min(3, len(data.by_relation[kind]) - 1)
                total += 1
                if answer == REFUSAL:
                    assert all(r.key_text != asked.key_text for r in rows)
        return met / total

    base = TrainConfig(data=[], out="", batch_size=8, refusal_rate=0.5, seed=1, distractors_start=0,
                       same_head_negatives=0, multi_entity_every=0)
    assert share_among_its_kind(TrainConfig(**{**base.__dict__, "same_relation_negatives": 3})) > 0.9
    assert share_among_its_kind(base) < 0.5


def test_distractor_curriculum():
    cfg = TrainConfig(data=[], out="", distractors_start=4, distractors_every=100, distractors_max=400)
    assert [n_distractors(cfg, s) for s in (0, 3000, 10000)] == [4, 124, 400]  # method.md §9.3 (capped)


def test_cosine_schedule():
    cfg = TrainConfig(data=[], out="", steps=100, warmup_steps=10, min_lr_ratio=0.01)
    assert lr_factor(cfg, 0) == pytest.approx(0.1) and lr_factor(cfg, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 100) == pytest.approx(0.01)


def test_labels_cover_answers_only():
    from atlaskv.model.llm import load_base_model

    pytest.importorskip("gguf")
    _, tok = load_base_model()
    bt = encode_batch(tok, ["What is the capital of Canada?", "Hi?"], ["The capital of Canada is Ottawa.", "x"], "cpu")
    labels, pm, am = bt["labels"], bt["prompt_mask"], bt["attention_mask"]
    assert ((labels != -100) & (pm == 1)).sum() == 0          # no prompt token is supervised
    assert ((labels != -100) & (am == 0)).sum() == 0          # no pad is supervised
    text = tok.decode(bt["input_ids"][0][labels[0] != -100])
    assert text == "The capital of Canada is Ottawa.<|im_end|>"
    prompt = tok.decode(bt["input_ids"][0][pm[0] == 1])
    assert prompt.startswith("<|im_start|>user\n") and "system" not in prompt


def _tiny_model_dir(tmp_path):
    import transformers as tf

    from atlaskv.model.llm import resolve_model

    pytest.importorskip("gguf")
    tok = tf.AutoTokenizer.from_pretrained(resolve_model())
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def test_resume_continues_the_same_run(tmp_path, small_data, monkeypatch):
    monkeypatch.setenv("ATLASKV_CACHE", str(tmp_path / "cache"))
    base = _tiny_model_dir(tmp_path)
    kw = dict(data=[str(small_data)], base_model=base, batch_size=4, kb_layer_frequency=2, eval_every=0,
              checkpoint_every=2, question_input=True, threads=1)
    train(TrainConfig(out=str(tmp_path / "full"), steps=6, **kw), log=lambda m: None)
    train(TrainConfig(out=str(tmp_path / "split"), steps=6, max_minutes=0, **kw), log=lambda m: None)
    state = json.loads((tmp_path / "split" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 1  # max_minutes=0 stops cleanly after the first step
    train(TrainConfig(out=str(tmp_path / "split"), steps=6, **kw), resume=True, log=lambda m: None)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "adapter.safetensors")
    b = load_file(tmp_path / "split" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    log = [json.loads(l) for l in open(tmp_path / "split" / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "full" / "loss_curve.png").stat().st_size > 0
    from atlaskv.model.adapter import read_relation_pairs

    pairs = read_relation_pairs(tmp_path / "full" / "relation_pairs.tsv")  # which kinds of fact share a head
    assert pairs and all(n <= pairs[(r, r)] for (r, s), n in pairs.items())
    assert read_relation_pairs(tmp_path / "split" / "relation_pairs.tsv") == pairs  # resumed: counted once
    with pytest.raises(FileExistsError, match="--resume"):
        train(TrainConfig(out=str(tmp_path / "full"), steps=6, **kw), log=lambda m: None)


def test_init_adapter_fine_tunes_from_its_weights_and_layout(tmp_path, small_data, monkeypatch):
    monkeypatch.setenv("ATLASKV_CACHE", str(tmp_path / "cache"))
    base = _tiny_model_dir(tmp_path)
    kw = dict(data=[str(small_data)], base_model=base, batch_size=4, eval_every=0, threads=1)
    first = train(TrainConfig(out=str(tmp_path / "first"), steps=2, kb_layer_frequency=2, question_input=True,
                              kb_scale_factor=300.0, **kw), log=lambda m: None)
    # the layout options given here are overridden by the starting adapter's
    tuned = train(TrainConfig(out=str(tmp_path / "tuned"), steps=0, init_adapter=str(first), kb_layer_frequency=1,
                              question_input=False, **kw), log=lambda m: None)
    from safetensors.torch import load_file

    a, b = load_file(first / "adapter.safetensors"), load_file(tuned / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # zero steps: the fine-tune starts exactly at the given weights
        assert torch.equal(a[k], b[k]), k
    cfg = json.loads((tuned / "adapter_config.json").read_text())
    assert cfg["kb_layer_frequency"] == 2 and cfg["question_input"] is True
    assert cfg["kb_scale_factor"] == 300.0  # its length correction kept (one mode: only KBs larger than s damped)
    assert cfg["training"]["init_from"]["path"] == str(first)
    assert cfg["training"]["init_from"]["config"]["steps"] == 2
    assert cfg["training"]["config"]["init_adapter"] == str(first)
    from atlaskv.model.adapter import read_relation_pairs

    pairs = read_relation_pairs(first / "relation_pairs.tsv")  # a fine-tune adds its facts' counts to the start's
    assert read_relation_pairs(tuned / "relation_pairs.tsv") == {k: 2 * n for k, n in pairs.items()}
    # and it moves from there when trained
    moved = train(TrainConfig(out=str(tmp_path / "moved"), steps=2, init_adapter=str(first), **kw), log=lambda m: None)
    c = load_file(moved / "adapter.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(Exception, match="adapter_config.json"):
        train(TrainConfig(out=str(tmp_path / "bad"), steps=1, init_adapter=str(tmp_path / "nowhere"), **kw),
              log=lambda m: None)


def test_token_value_fine_tune_keeps_keys_and_trains_the_value_path(tmp_path, small_data, monkeypatch):
    monkeypatch.setenv("ATLASKV_CACHE", str(tmp_path / "cache"))
    base = _tiny_model_dir(tmp_path)
    kw = dict(data=[str(small_data)], base_model=base, batch_size=4, eval_every=2, threads=1)
    first = train(TrainConfig(out=str(tmp_path / "first"), steps=1, kb_layer_frequency=2, **kw), log=lambda m: None)
    tuned = train(TrainConfig(out=str(tmp_path / "tok"), steps=2, init_adapter=str(first),
                              value_source="encoder+llm_copy", token_gain_init=3.0, trainable="values", **kw),
                  log=lambda m: None)
    from safetensors.torch import load_file

    from atlaskv.model.values import TOKEN_GAIN_UNIT

    a, b = load_file(first / "adapter.safetensors"), load_file(tuned / "adapter.safetensors")
    assert set(b) - set(a) == {"token_map", "token_gain"}
    for k in a:  # only the value path learns
        assert torch.equal(a[k], b[k]) == (not k.startswith("value_proj.")), k
    assert b["token_gain"][:-1].abs().max() < 0.1 and abs(float(b["token_gain"][-1]) * TOKEN_GAIN_UNIT - 3.0) < 1.0
    cfg = json.loads((tuned / "adapter_config.json").read_text())
    assert cfg["value_source"] == "encoder+llm_copy"
    log = [json.loads(l) for l in open(tuned / "train_log.jsonl")]
    assert "val_answer_acc_kb100" in log[-1]


def test_phrasings_ask_tail_questions_in_their_relations_words(data, tmp_path):
    """--phrasings: about half the single-fact tail questions of a relation the file has come in one of its
    phrasings, with the head in place; the rest, and head questions, stay templates."""
    from atlaskv.train import read_phrasings

    rels = sorted({r.triple.relation for r in data.records})[::2]  # half the relations have phrasings
    f = tmp_path / "phrasings.tsv"
    f.write_text("relation\tquestion\n" + "".join(f"{r}\tWhich {r} goes with {{head}}, really?\n" for r in rels), "utf-8")
    base = TrainConfig(data=[], out="", batch_size=8, seed=2, multi_entity_every=0)
    with_file = TrainData(**{**data.__dict__, "phrasings": read_phrasings(f)})
    phrased = asked = 0
    for step in range(40):
        batch = make_batch(base, with_file, step)
        for prompt, gold in zip(batch.prompts, batch.gold):
            for g in gold:
                rec = data.records[batch.kb_rows[g]]
                if rec.masked == "tail" and rec.triple.relation in rels:
                    asked += 1
                    if prompt == f"Which {rec.triple.relation} goes with {rec.triple.head}, really?":
                        phrased += 1
                    else:
                        assert rec.key_text.casefold() in prompt.casefold()
    assert asked > 10 and 0.25 < phrased / asked < 0.75


@pytest.mark.parametrize("text,problem", [("place of birth\n", "expected relation<TAB>question"),
                                          ("place of birth\tWhere was he born?\n", "{head} exactly once"),
                                          ("place of birth\tWhere was {head} born in {year}?\n", "no other braces"),
                                          ("relation\tquestion\n", "no phrasings")])
def test_bad_phrasings_file_names_the_line(tmp_path, text, problem):
    from atlaskv.train import read_phrasings

    f = tmp_path / "p.tsv"
    f.write_text(text, "utf-8")
    with pytest.raises(ValueError, match=problem.replace("{", r"\{").replace("}", r"\}")) as e:
        read_phrasings(f)
    assert str(f) in str(e.value)


def test_relation_aliases_rename_a_share_of_facts_and_keep_multi_valued_keys_whole(tmp_path):
    """--relation-aliases: about --alias-rate of a relation's facts carry one of its "train" aliases (held-out rows
    are never used), the key text reads the alias, and ambiguity is judged under the relation's own name:
    renaming part of the people born in X must not make one of them look like the only one."""
    from atlaskv.kb.triples import Triple
    from atlaskv.train import read_relation_aliases, rename_relations

    f = tmp_path / "aliases.tsv"
    f.write_text("relation\talias\tsplit\nplace of birth\tbirthPlace\ttrain\nplace of birth\tbirth_town\ttrain\n"
                 "place of birth\tnatal place\theldout\n", "utf-8")
    aliases = read_relation_aliases(f)
    assert aliases == {"place of birth": ["birthPlace", "birth_town"]}
    triples = [Triple(f"P{i}", "place of birth", "X" if i < 50 else f"C{i}") for i in range(400)]
    renamed, canonical = rename_relations(triples, aliases, 0.5, seed=0)
    assert canonical == {"birthPlace": "place of birth", "birth_town": "place of birth"}
    names = [t.relation for t in renamed]
    assert 0.4 < sum(n != "place of birth" for n in names) / len(names) < 0.6
    assert set(names) == {"place of birth", "birthPlace", "birth_town"}
    assert [(t.head, t.tail) for t in renamed] == [(t.head, t.tail) for t in triples]
    assert rename_relations(triples, aliases, 0.5, seed=0)[0] == renamed  # seeded
    recs = build_records(renamed, canonical)
    tails = {r.triple.head: r for r in recs if r.masked == "tail"}
    assert len(tails) == 400 and tails["P3"].key_text == f"the {nouns_of(renamed[3].relation)} of P3"
    heads = [r for r in recs if r.masked == "head"]
    assert heads and all(r.triple.tail != "X" for r in heads)  # 50 people born in X: no head record names one
    pair = [Triple("A", "birthPlace", "X"), Triple("B", "place of birth", "X")]  # what the canonical name guards:
    assert [r.masked for r in build_records(pair, {"birthPlace": "place of birth"})] == ["tail", "tail"]
    assert [r.masked for r in build_records(pair)] == ["tail", "head", "tail", "head"]


def nouns_of(relation: str) -> str:
    from atlaskv.kb.records import ENTITY, RelationNouns

    return RelationNouns().template(relation, "tail").replace(f" of {ENTITY}", "").removeprefix("the ")


@pytest.mark.parametrize("text,problem", [("place of birth\n", "expected relation<TAB>alias"),
                                          ("place of birth\tPlace Of Birth\n", "own name"),
                                          ("relation\talias\tsplit\nplace of birth\tbirthPlace\theldout\n",
                                           "no aliases")])
def test_bad_aliases_file_names_the_line(tmp_path, text, problem):
    from atlaskv.train import read_relation_aliases

    f = tmp_path / "a.tsv"
    f.write_text(text, "utf-8")
    with pytest.raises(ValueError, match=problem) as e:
        read_relation_aliases(f)
    assert str(f) in str(e.value)


def test_an_alias_that_names_another_relation_is_refused():
    from atlaskv.kb.triples import Triple
    from atlaskv.train import rename_relations

    with pytest.raises(ValueError, match="'country'"):
        rename_relations([Triple("A", "nationality", "B"), Triple("C", "country", "D")],
                         {"nationality": ["country"]}, 0.5, seed=0)


def test_aliases_for_relations_the_data_lacks_stop_before_the_encoding(small_data, tmp_path):
    f = tmp_path / "aliases.tsv"
    f.write_text("relation\talias\nfavourite colour\tfavouriteColour\n", "utf-8")
    cfg = TrainConfig(data=[str(small_data)], out="unused", relation_aliases=str(f))
    with pytest.raises(ValueError, match="none of its relations is in the training data") as e:
        prepare_data(cfg, tmp_path / "cache")
    assert str(f) in str(e.value)
