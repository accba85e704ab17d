"""The refusal rule on cited facts and answers (model/refusal.py): pure functions, no model."""
import pytest

from atlaskv.kb.triples import Triple
from atlaskv.model.refusal import names_value, refuses, support_of, verdict

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
