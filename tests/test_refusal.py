"""The refusal rule on cited facts and answers (model/refusal.py): pure functions, no model."""
import pytest

from atlaskv.kb.triples import Triple
from atlaskv.model.refusal import backing, must_name, names_value, refuses, support_of, verdict

JFK = "What is the burial place of John F. Kennedy?"
BURIALS = [(Triple("John F. Kennedy", "place of burial", "Arlington National Cemetery"), 0.5),
           (Triple("Robert F. Kennedy", "place of burial", "Arlington National Cemetery"), 0.3),
           (Triple("John F. Kennedy", "place of death", "Dallas"), 0.2)]


def test_facts_that_agree_on_the_value_support_it():
    assert support_of(BURIALS) == pytest.approx(4.0)  # (0.5 + 0.3) / 0.2
    assert verdict(JFK, BURIALS, 3.0) == "answer"
    assert not refuses(JFK, BURIALS, 3.0)


def test_a_fact_about_an_entity_the_question_does_not_name_is_refused_whatever_the_answer():
    q = "What is the burial place of Jacqueline Kennedy?"
    assert verdict(q, BURIALS, 3.0) == "refuse"
    assert refuses(q, BURIALS, 3.0, answer="Arlington National Cemetery.")
    assert verdict(q, [], 3.0) == "refuse" and refuses("", [], 3.0)


def test_a_named_entitys_fact_of_the_same_kind_cited_after_a_neighbours_backs_an_answer_naming_its_value():
    """Seen on pararel at 1,000 pruned: The Blind Beggar's location cited first for "Where can Mauricie be
    found?", Mauricie's own fact after it, and the answer "Quebec." was refused by the head check."""
    q = "Where can Mauricie be found?"
    cited = [(Triple("The Blind Beggar", "location", "London"), 0.6),
             (Triple("Mauricie", "administrative location", "Quebec"), 0.3)]
    assert backing(q, cited) == 1 and must_name(q, cited) == "Quebec"
    assert verdict(q, cited, 1.0) == "if_unnamed"  # whatever the support: a neighbour was cited first
    assert not refuses(q, cited, 1.0, answer="Quebec.")
    assert refuses(q, cited, 1.0, answer="London.") and refuses(q, cited, 1.0)
    assert backing("", cited) == 0 and backing(q, []) is None
    assert backing("Where can Jane Doe be found?", cited) is None
    assert verdict("Where can Jane Doe be found?", cited) == "refuse"


def test_a_named_entitys_fact_of_another_kind_backs_nothing():
    """fb15k-para without the gold fact: Toy Story's language cited first for "In what language was The
    Hunger Games made?", The Hunger Games' film format after it; "IMAX." must not pass."""
    q = "In what language was The Hunger Games made?"
    cited = [(Triple("Toy Story", "language", "English Language"), 0.6),
             (Triple("The Hunger Games", "film format", "IMAX"), 0.3)]
    assert backing(q, cited) is None and refuses(q, cited, 1.0, answer="IMAX.")
    # relation words, whatever the spelling: camelCase, Freebase paths
    assert backing("Where was Ada born?", [(Triple("Bob", "birthPlace", "X"), 0.6),
                                           (Triple("Ada", "place of birth", "London"), 0.3)]) == 1
    assert backing("Where was Ada born?", [(Triple("Bob", "place of death", "X"), 0.6),
                                           (Triple("Ada", "place of birth", "London"), 0.3)]) is None


def test_a_part_of_the_questions_name_backs_nothing():
    """WebNLG without the gold fact: "Auburn, Washington" cited first for Auburn, Alabama, then Alabama's own
    country; the question names "Alabama" only as part of a longer name."""
    q = "Which country is Auburn, Alabama in?"
    cited = [(Triple("Auburn, Washington", "country", "United States"), 0.6),
             (Triple("Alabama", "country", "United States"), 0.3)]
    assert backing(q, cited) is None and refuses(q, cited, 1.0, answer="United States.")


def test_low_support_waits_for_the_answer():
    assert verdict(JFK, BURIALS, 5.0) == "if_unnamed"
    assert not refuses(JFK, BURIALS, 5.0, answer="He is buried at Arlington National Cemetery.")
    assert refuses(JFK, BURIALS, 5.0, answer="He died in Dallas.")
    assert refuses(JFK, BURIALS, 5.0)  # the prefill alone: refused


def test_refusal_off_answers_everything():
    assert verdict("anything", [], 0) == "answer" and not refuses("anything", [], 0)


@pytest.mark.parametrize("answer, named", [
    ("Arlington National Cemetery.", True), ("the ARLINGTON national-cemetery", True),
    ("Arlington National", False), ("Arlington National Cemetery Annex", True), ("", False)])
def test_a_value_is_named_by_its_whole_words(answer, named):
    assert names_value(answer, "Arlington National Cemetery") is named
    assert not names_value("John F. Kennedy", "John F. Kennedy Jr.")
