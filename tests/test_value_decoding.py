"""Value decoding (model/decoding.py): a started cited value is finished as stored, the answer ends once it is
out, several values of one key are all named, and a restated question gets no copy votes. The rules run on
a word-level tokenizer and hand-made prefill attention here; on the real model in test_demo_answers_*."""
import re

import numpy as np
import pytest
import torch

from atlaskv.kb.triples import Triple
from atlaskv.kb.view import KBView
from atlaskv.model.decoding import SpokenStreamer, ValueDecoding, spoken
from atlaskv.model.kb_inputs import KBInputs

STOP = 0


class WordTok:
    """" word" and "word" are different tokens, punctuation is its own token (like a BPE vocabulary)."""

    def __init__(self):
        self.vocab = {"<stop>": STOP}

    def _id(self, piece):
        return self.vocab.setdefault(piece, len(self.vocab))

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self._id(p) for p in re.findall(r" ?\w+| ?[^\w\s]", text)]}

    def convert_tokens_to_ids(self, token):
        return self._id(token)

    def decode(self, ids, skip_special_tokens=False):
        inv = {i: p for p, i in self.vocab.items()}
        return "".join(inv[i] for i in ids)


def setup(question, facts, weights, tok=None, push=0.0, trust=False, note_logprob=False):
    """A processor for one question over `facts` whose prefill attention is `weights` (most first); no push
    unless asked (the fake model's preferences are only 5 logits strong); the refusal rule's trust only if
    asked (it needs the question's text)."""
    tok = tok or WordTok()
    n = len(facts)
    view = KBView.from_arrays(np.zeros((n, 4), np.float32), np.zeros((n, 4), np.float32),
                              [Triple(*f) for f in facts], None)
    kb = KBInputs(torch.zeros(n, 4), torch.zeros(n, 4), view=view, flat_rows=np.arange(n), record=True)
    kb.recorded.attention[0] = torch.tensor(weights, dtype=torch.float32)[None, None, :]
    prompt = torch.tensor([tok(question)["input_ids"]])
    return ValueDecoding(kb, tok, prompt, None, [STOP], push=push, questions=[question] if trust else None,
                         note_logprob=note_logprob), tok, prompt


def greedy(proc, tok, prompt, prefer: str, steps=12, strength=5.0):
    """Decode with the processor; the 'model' prefers the words of `prefer` in order (by `strength` logits),
    then anything."""
    want = tok(prefer)["input_ids"]
    ids = prompt
    for i in range(steps):
        scores = torch.zeros(1, len(tok.vocab) + 50)
        if i < len(want):
            scores[0, want[i]] = strength
        scores = proc(ids, scores)
        nxt = int(scores[0].argmax())
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        if nxt == STOP:
            break
    return tok.decode(ids[0, prompt.shape[1]:].tolist())


FACTS = [("Humphrey Bogart", "spouse", "Lauren Bacall"), ("Bing Crosby", "spouse", "Kathryn Grant"),
         ("Humphrey Bogart", "place of birth", "New York City")]


def test_a_started_value_can_only_end_as_stored_and_the_answer_then_ends():
    proc, tok, prompt = setup("Who was the spouse of Humphrey Bogart?", FACTS, [0.8, 0.1, 0.1])
    # the model would write "Lauren Bacceaga ..." and go on
    assert greedy(proc, tok, prompt, "His spouse was Lauren Baccea and more words") == \
        "His spouse was Lauren Bacall.<stop>"


def test_values_of_entries_far_below_the_first_do_not_steer():
    proc, tok, prompt = setup("Who was the spouse of Humphrey Bogart?", FACTS, [0.8, 0.1, 0.1])
    out = greedy(proc, tok, prompt, "Kathryn Hepburn was his spouse")  # Kathryn Grant holds 1/8 of the first
    assert out.startswith("Kathryn Hepburn")


def test_a_value_opened_by_a_weak_word_counts_from_its_second_token():
    facts = [("Help", "writer", "Paul McCartney"), ("Help", "performer", "The Beatles")]
    proc, tok, prompt = setup("Who wrote Help?", facts, [0.6, 0.4])
    assert greedy(proc, tok, prompt, "The song was written by Paul McCartney") == \
        "The song was written by Paul McCartney.<stop>"
    # ... unless it is the first-cited value: then "The" opens it
    proc, tok, prompt = setup("Who performed Help?", facts[::-1], [0.6, 0.4])
    assert greedy(proc, tok, prompt, "The song was performed by The Beatles") == "The Beatles.<stop>"


def test_until_a_value_is_out_each_cited_value_s_first_token_is_pushed_by_its_weight():
    proc, tok, prompt = setup("Who was the spouse of Humphrey Bogart?", FACTS, [0.8, 0.1, 0.1], push=8.0)
    ids = torch.cat([prompt, torch.tensor([tok("His spouse was")["input_ids"]])], 1)
    out = proc(ids, torch.zeros(1, len(tok.vocab) + 10))
    lauren, kathryn = tok(" Lauren")["input_ids"][0], tok(" Kathryn")["input_ids"][0]
    assert out[0, lauren] == 8.0 and out[0, kathryn] == 0.0  # Kathryn Grant weighs under a quarter of the first
    assert greedy(proc, tok, prompt, "His spouse was Kathryn Hepburn") == "Lauren Bacall.<stop>"


def test_several_values_of_the_first_cited_key_are_all_named():
    facts = [("Alien", "genre", "Horror"), ("Alien", "genre", "Science Fiction"), ("Alien", "genre", "Thriller"),
             ("Jaws", "genre", "Drama")]
    proc, tok, prompt = setup("What are the genres of Alien?", facts, [0.3, 0.3, 0.3, 0.02])
    out = greedy(proc, tok, prompt, "The genres of Alien are Horror films", steps=20)
    assert out.startswith("The genres of Alien are Horror,") and out.endswith(".<stop>")
    for v in ("Horror", "Science Fiction", "Thriller"):
        assert out.count(v) == 1
    assert " and " in out and "Drama" not in out


def test_a_value_restated_with_the_question_does_not_end_the_answer():
    facts = [("Stade de France", "owner", "France")]
    proc, tok, prompt = setup("Who owns Stade de France?", facts, [1.0])
    assert greedy(proc, tok, prompt, "Stade de France is owned by France and more") == \
        "Stade de France is owned by France.<stop>"  # " de France" restates; " by France" answers
    proc, tok, prompt = setup("Who owns Stade de France?", facts, [1.0])
    assert greedy(proc, tok, prompt, "France owns it") == "France.<stop>"


def test_a_name_of_the_question_s_head_is_restated_without_a_push():
    facts = [("Jeanne Lamon", "instrument", "violin")]
    proc, tok, prompt = setup("Which instrument does Jeanne Lamon play?", facts, [1.0], push=8.0)
    # the model prefers its words by 10 logits, more than the push of 8 but not more than 8 + 5: pushed after
    # "Jeanne" it would say "Jeanne violin"; inside the cited head's name only its next token may follow
    scores = torch.zeros(1, 64)
    ids = torch.cat([prompt, torch.tensor([tok("Jeanne")["input_ids"]])], 1)
    allowed = torch.isfinite(proc(ids, scores.clone())[0]).nonzero().flatten().tolist()
    assert allowed == tok(" Lamon")["input_ids"]
    assert greedy(proc, tok, prompt, "Jeanne Lamon plays the violin", strength=10.0) == \
        "Jeanne Lamon plays the violin.<stop>"


def test_a_value_that_opens_like_the_head_is_finished_once_the_head_is_out():
    facts = [("Bleach: Fade to Black", "prequel", "Bleach: The DiamondDust Rebellion")]
    proc, tok, prompt = setup("What is the prequel of Bleach: Fade to Black?", facts, [1.0])
    # the model would restate the head a second time where the value belongs
    assert greedy(proc, tok, prompt, "The prequel of Bleach: Fade to Black is Bleach: Fade to Black", steps=20) \
        == "The prequel of Bleach: Fade to Black is Bleach: The DiamondDust Rebellion.<stop>"


def test_a_value_whose_words_the_question_also_asks_is_finished():
    facts = [("Kampala", "time zone", "East Africa Time Zone-US")]
    proc, tok, prompt = setup("Which time zone is Kampala in?", facts, [1.0])
    # "time zone" stands in the question, but "East Africa Time Zone" does not: it is the value, not a restatement
    assert greedy(proc, tok, prompt, "East Africa Time Zone: East Africa Time Zone") == \
        "East Africa Time Zone-US.<stop>"


def test_restating_the_question_takes_the_copy_votes_back():
    proc, tok, prompt = setup("Who was the spouse of Humphrey Bogart?", FACTS, [0.8, 0.1, 0.1])
    answer = tok("The spouse of")["input_ids"]
    ids = torch.cat([prompt, torch.tensor([answer])], 1)
    added = torch.zeros(1, len(tok.vocab) + 5)
    added[0, tok(" Lauren")["input_ids"][0]] = 7.0
    proc.kb.call.copy_added = added
    scores = torch.zeros_like(added) + added  # what the LM head gave, votes included
    out = proc(ids, scores.clone())
    assert torch.equal(out, torch.zeros_like(added))  # " spouse of" stands in the question: votes taken back


@pytest.mark.parametrize("enabled", [True, False])
def test_value_processors_are_optional(enabled):
    from atlaskv.model.decoding import value_processors

    kb = KBInputs(torch.zeros(2, 4), torch.zeros(2, 4))
    out = value_processors(kb, WordTok(), torch.zeros(1, 3, dtype=torch.long), None, [STOP], enabled)
    assert len(out) == int(enabled) and kb.record == enabled
    assert value_processors(None, WordTok(), torch.zeros(1, 3, dtype=torch.long), None, [STOP]) == []


# ------------------------------------------------------------------------------------------------ the real model
DEMO = [__import__("json").loads(line) for line in open(__import__("pathlib").Path(__file__).resolve().parents[1]
                                                       / "examples" / "demo" / "questions.jsonl")]


@pytest.fixture(scope="module")
def demo_kb(tmp_path_factory, demo_facts, encoder):
    """The demo questions' facts among 400 of the demo KG's (HiKVP index as built)."""
    from atlaskv.kb.store import KnowledgeBase
    from atlaskv.kb.triples import read_triples

    facts = read_triples(demo_facts).triples
    gold = {(q["head"], q["relation"], q["tail"]) for q in DEMO}
    kept = [t for t in facts if tuple(t) in gold] + [t for t in facts if tuple(t) not in gold][:400]
    return KnowledgeBase.build(kept, tmp_path_factory.mktemp("vd") / "kb", encoder=encoder)


def test_demo_answers_name_the_gold_value_cleanly(trained_model, demo_kb):
    from atlaskv.evaluation.metrics import answer_flags

    values = sorted({t.tail for t in demo_kb.view().triples(np.arange(len(demo_kb)))})
    for q in DEMO:
        ans = trained_model.ask(q["question"], demo_kb)
        assert ans.citations[0][0].tail == q["tail"], (q, ans.citations[:2])
        flags = answer_flags(ans.text, q["tail"], values, ended=True, question=q["question"])
        assert flags["exact"] and ans.text.endswith("."), (q["question"], ans.text, flags)
        free = trained_model.ask(q["question"], demo_kb, value_decoding=False)
        assert free.citations == ans.citations  # decoding changes the words, not what is cited


def test_every_value_of_a_multi_valued_key_is_named(trained_model, tmp_path, encoder):
    from atlaskv.evaluation.multi_valued import named_values
    from atlaskv.kb.store import KnowledgeBase

    facts = [("Alien", "genre", "Horror"), ("Alien", "genre", "Science Fiction"), ("Alien", "director", "Ridley Scott"),
             ("Jaws", "genre", "Thriller"), ("Jaws", "director", "Steven Spielberg"), ("Heat", "genre", "Crime Fiction")]
    kb = KnowledgeBase.build(facts, tmp_path / "kb", encoder=encoder)
    q = "What are the genres of Alien?"
    ans = trained_model.ask(q, kb, prune=False)
    assert named_values(ans.text, [f[2] for f in facts], q) == {"Horror", "Science Fiction"}, ans.text
    assert {t.tail for t, _ in ans.citations[:2]} == {"Horror", "Science Fiction"}


def test_a_row_another_processor_ruled_out_is_left_alone():
    proc, tok, prompt = setup("Who was the spouse of Humphrey Bogart?", FACTS, [0.8, 0.1, 0.1])
    ids = torch.cat([prompt, torch.tensor([tok("Lauren Bacall.")["input_ids"]])], 1)  # only the end may follow
    scores = torch.zeros(1, len(tok.vocab) + 5)
    scores[0, STOP] = float("-inf")  # min_new_tokens forbids it
    out = proc(ids, scores.clone())
    assert torch.isfinite(out).any()


def test_an_answer_that_names_no_value_cannot_loop():
    proc, tok, prompt = setup("How was Letters from Iwo Jima released?", [("Letters from Iwo Jima", "release medium", "DVD")],
                              [1.0])
    looping = "I can give a summary of the response of the response of the response"
    answer = greedy(proc, tok, prompt, looping, steps=20)
    words = answer.replace("<stop>", "").split()
    grams = list(zip(words, words[1:], words[2:]))
    assert len(grams) == len(set(grams)) and answer == "I can give a summary of the response of the<stop>"
    # tokens compare by their words: " The country is" repeats "The country is"
    proc, tok, prompt = setup("Which is the country of Bret McKenzie?", [("Bret McKenzie", "nationality", "New Zealand")],
                              [1.0])
    answer = greedy(proc, tok, prompt, "The country is Canada. The country is Australia", steps=20)
    assert answer == "The country is Canada. The country<stop>"
    # the question's own words are free to come back: restating is how answers open
    proc, tok, prompt = setup("Who was the spouse of Humphrey Bogart?", FACTS, [0.8, 0.1, 0.1])
    assert greedy(proc, tok, prompt, "The spouse of Humphrey Bogart was Lauren") == \
        "The spouse of Humphrey Bogart was Lauren Bacall.<stop>"


def test_an_answer_whose_top_fact_the_refusal_rule_accepts_names_a_value():
    """The model's own "I don't know." (learned for facts the KB lacks) may not open an answer the refusal
    rule accepts, nor may the turn end before a value is named; where the rule would refuse, both stay free."""
    proc, tok, prompt = setup("Who was the spouse of Humphrey Bogart?", FACTS, [0.8, 0.1, 0.1], push=8.0, trust=True)
    assert proc.refusal_first == {tok("I")["input_ids"][0], tok(" I")["input_ids"][0]}
    assert greedy(proc, tok, prompt, "I don't know.", strength=9.0) == "Lauren Bacall.<stop>"
    # SmolLM2 also opens answers with a spaced first token (" I don't know."): banned alike
    proc, tok, prompt = setup("Who was the spouse of Humphrey Bogart?", FACTS, [0.8, 0.1, 0.1], push=8.0, trust=True)
    assert greedy(proc, tok, prompt, " I don't know.", strength=9.0) == "Lauren Bacall.<stop>"
    proc, tok, prompt = setup("Who was the spouse of Humphrey Bogart?", FACTS, [0.8, 0.1, 0.1], push=8.0, trust=True)
    assert greedy(proc, tok, prompt, "His spouse was", strength=9.0) == "His spouse was Lauren Bacall.<stop>"
    # the question names no cited head (Cary Grant): the rule would refuse, the model may say so itself
    proc, tok, prompt = setup("Who was the spouse of Cary Grant?", FACTS, [0.8, 0.1, 0.1], push=8.0, trust=True)
    assert greedy(proc, tok, prompt, "I don't know.", strength=9.0).startswith("I don't know.")
    # two values about as cited: no support, no trust
    proc, tok, prompt = setup("Who was the spouse of Humphrey Bogart?", FACTS, [0.5, 0.45, 0.05], push=8.0, trust=True)
    proc.values = proc._cited_values()
    assert proc.trusted == [False]


def test_the_models_own_refusal_is_the_rules_to_say_from_a_lower_support(monkeypatch):
    """Between OWN_REFUSAL_BELOW and the trust guard's support the answer may not open with the model's own "I
    don't know." (the refusal rule decides), but it may still end without a value; below it the model is free."""
    import atlaskv.model.decoding as decoding

    monkeypatch.setattr(decoding, "OWN_REFUSAL_BELOW", 1.5)
    # Lauren Bacall 0.5 against the birthplace's 0.3: support 1.67, under the trust guard's 1.86
    proc, tok, prompt = setup("Who was the spouse of Humphrey Bogart?", FACTS, [0.5, 0.2, 0.3], push=8.0, trust=True)
    assert not greedy(proc, tok, prompt, "I don't know.", strength=9.0).startswith("I")
    assert proc.no_own_refusal == [True] and proc.trusted == [False]
    proc, tok, prompt = setup("Who was the spouse of Humphrey Bogart?", FACTS, [0.5, 0.2, 0.3], push=8.0, trust=True)
    assert torch.isfinite(proc(prompt, torch.zeros(1, len(tok.vocab) + 50))[0, STOP])  # no value forced
    # support 1.11: the model may refuse itself
    proc, tok, prompt = setup("Who was the spouse of Humphrey Bogart?", FACTS, [0.5, 0.05, 0.45], push=8.0, trust=True)
    assert greedy(proc, tok, prompt, "I don't know.", strength=9.0).startswith("I don't know.")


def test_a_value_started_in_one_token_form_is_not_restarted_in_the_other():
    """A value is matched in both its forms (after a space, at the start of a line); once the answer is deep
    in one form, the other form's first token must not restart it (SmolLM2 wrote "S.S. Robur S.S. Robur Siena":
    " Siena" opens with " S", the spaced form's first token)."""
    facts = [("Walla Walla College", "location", "Walla Walla Valley")]
    proc, tok, prompt = setup("Where is the college?", facts, [1.0])
    assert greedy(proc, tok, prompt, "Walla Walla Walla Walla Valley") == "Walla Walla Valley.<stop>"


def test_the_models_own_logprob_of_the_top_value_is_noted_before_any_push():
    """value_logprob (a refusal signal): the best log-probability the model itself gave the top-cited value's
    first token while the value was not yet said, read before the push; a value the model wants scores high,
    one it has to be pushed to scores low."""
    def noted(prefer):
        proc, tok, prompt = setup("Who was the spouse of Humphrey Bogart?", FACTS, [0.8, 0.1, 0.1], push=12.0,
                                  note_logprob=True)
        answer = greedy(proc, tok, prompt, prefer)
        return proc.value_logprob[0], answer

    wanted, answer = noted("Lauren Bacall .")
    pushed, pushed_answer = noted("Sometimes people")
    assert "Lauren Bacall" in answer and "Lauren Bacall" in pushed_answer  # pushed there either way
    # preferred by 5 logits among ~60 tokens: log(e^5 / (e^5 + 60)) = -0.3; another preferred: -log(e^5 + 60) = -5.3
    assert wanted > -1.0 and pushed < -5.0


def test_an_opening_article_that_goes_straight_into_a_value_is_left_out_of_the_text():
    """SmolLM2 answers a question worded without "the" with "The" and the pushed value ("The Male.", "The Berlin.":
    112 of 200 answers on the dev set in held-out phrasings): the text leaves that article out, the tokens (and
    with them every decoding and refusal rule) stay as they are; a stream holds the article back one token."""
    facts = [("Robert De Niro", "place of birth", "Greenwich Village"), ("Robert De Niro", "gender", "Male")]
    proc, tok, prompt = setup("Robert De Niro was born where?", facts, [0.8, 0.2])
    assert greedy(proc, tok, prompt, "The Greenwich Village") == "The Greenwich Village.<stop>"
    answer = tok("The Greenwich Village.")["input_ids"] + [STOP]
    assert tok.decode(spoken([proc], 0, answer)).strip() == "Greenwich Village.<stop>"
    # ... and a word the model put between them ("The state Iowa.")
    assert tok.decode(spoken([proc], 0, tok("The place Greenwich Village.")["input_ids"])).strip() == "Greenwich Village."
    for text in ("The place of birth is Greenwich Village.", "Greenwich Village.", "The", "The place, Greenwich Village."):
        ids = tok(text)["input_ids"]
        assert spoken([proc], 0, ids) == ids  # no value straight after an article (and a word): the text is the tokens
    assert spoken([], 0, answer) == answer  # no value decoding, nothing left out
    # a value that opens with the article keeps it
    facts = [("Help", "performer", "The Beatles"), ("Help", "writer", "Paul McCartney")]
    proc, tok, prompt = setup("Who performed Help?", facts, [0.6, 0.4])
    greedy(proc, tok, prompt, "The Beatles")
    ids = tok("The Beatles.")["input_ids"]
    assert spoken([proc], 0, ids) == ids

    class Collect:
        def __init__(self):
            self.puts = []

        def put(self, value):
            self.puts.append(value.reshape(-1).tolist())

        def end(self):
            self.puts.append("end")

    facts = [("Robert De Niro", "place of birth", "Greenwich Village"), ("Robert De Niro", "gender", "Male")]
    for text, streamed in (("The Greenwich Village.", "Greenwich Village."), ("The place of birth.", "The place of birth."),
                           ("The", "The"), ("The place Greenwich Village.", "Greenwich Village."), ("The place", "The place")):
        proc, tok, prompt = setup("Robert De Niro was born where?", facts, [0.8, 0.2])
        greedy(proc, tok, prompt, "x", steps=1)  # the prefill's call: the cited values are known
        inner = Collect()
        stream = SpokenStreamer(inner, [proc])
        stream.put(prompt)
        for t in tok(text)["input_ids"]:
            stream.put(torch.tensor([t]))
        stream.end()
        assert inner.puts[0] == prompt.reshape(-1).tolist() and inner.puts[-1] == "end"
        assert tok.decode([t for p in inner.puts[1:-1] for t in p]).strip() == streamed
