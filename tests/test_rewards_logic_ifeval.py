"""Logic puzzles (reasoning-gym) and instruction following (IFEval checks)."""
import json

import pytest

import rewards
from rewards import ifeval_checks as ic
from rewards.logic_grader import EXCLUDED_TASKS

TASKS = ("graph_color", "sudoku", "boxnet", "family_relationships", "prime_factorization",
         "basic_arithmetic")


@pytest.fixture(scope="module")
def logic():
    return {r["task"]: r for r in rewards.logic_records(TASKS, size=1, seed=3)}


def _ans(text):
    return f"<think>reasoning</think>Final: <answer>{text}</answer>"


def test_logic_records_are_seeded_and_json_safe():
    a = rewards.logic_records(("basic_arithmetic", "family_relationships"), size=2, seed=7)
    b = rewards.logic_records(("basic_arithmetic", "family_relationships"), size=2, seed=7)
    c = rewards.logic_records(("basic_arithmetic", "family_relationships"), size=2, seed=8)
    assert a == b and a != c and len(a) == 4
    assert json.loads(json.dumps(a)) == a
    assert {r["domain"] for r in a} == {"logic"}
    with pytest.raises(ValueError, match="game_of_life_halting"):
        rewards.logic_records(("game_of_life_halting",), size=1)


def test_logic_oracle_answers_score_one(logic):
    for task in ("sudoku", "family_relationships", "prime_factorization", "basic_arithmetic"):
        assert rewards.score(logic[task], _ans(logic[task]["entry"]["answer"])) == 1.0, task
    coloring = logic["graph_color"]["entry"]["metadata"]["possible_answer"]
    assert rewards.score(logic["graph_color"], _ans(json.dumps(coloring))) == 1.0


def test_logic_wrong_malformed_and_padded_answers(logic):
    fam = logic["family_relationships"]
    oracle = fam["entry"]["answer"]
    assert rewards.score(fam, _ans("grandfather-in-law-x")) == 0.0
    assert rewards.score(fam, "</think>" + oracle) == 0.0  # no <answer> tag
    assert rewards.score(logic["prime_factorization"], _ans("not a number")) == 0.0  # raises inside
    assert rewards.score(logic["graph_color"], _ans("{not json")) == 0.0
    assert rewards.score(logic["boxnet"], _ans("[]")) < 1.0
    # basic_arithmetic keeps reasoning-gym's default scorer, which would pay len(o)/len(a) for
    # padding; the strict replacement pays nothing for hedging.
    arith = logic["basic_arithmetic"]
    assert rewards.score(arith, _ans(arith["entry"]["answer"] + " or 12345")) == 0.0


def test_logic_record_errors(logic):
    with pytest.raises(rewards.RecordError, match="'task'"):
        rewards.score({"domain": "logic", "task": "chess960", "entry": {}}, _ans("x"))
    with pytest.raises(rewards.RecordError, match="excluded"):
        rewards.score({**logic["sudoku"], "task": sorted(EXCLUDED_TASKS)[0]}, _ans("x"))
    with pytest.raises(rewards.RecordError, match="'entry'"):
        rewards.score({"domain": "logic", "task": "sudoku", "entry": "text"}, _ans("x"))


def _if(ids, kwargs, text):
    return rewards.score({"domain": "ifeval", "instruction_id_list": ids, "kwargs": kwargs},
                         "<think>plan</think>" + text)


# (instruction id, kwargs, a response that follows it, one that does not)
CASES = [
    ("keywords:existence", {"keywords": ["apple", "pie"]}, "Apple PIE.", "apple only"),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"},
     "cat and Cat", "one cat"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "badger is fine", "a bad day"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
     "Zoo", "zz"),
    ("language:response_language", {"language": "de"},
     "Das ist ein kurzer deutscher Satz über das Wetter heute.",
     "This is a short English sentence about the weather today."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Dr. Smith went home. He slept.", "One. Two. Three."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A\n***\nB", "A\n***\n***\nB"),
    ("length_constraints:number_words", {"num_words": 4, "relation": "at least"},
     "one two three four", "one two three"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First part.\n\n\"Then, more.", "First part.\n\nNext part."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] at [place]",
     "[name] only"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nP.S. bye", "Hi. PS bye"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n- b", "* a\n* b\n* c"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*one* and **two**", "*one* and * *"),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\na\nSECTION 2\nb", "SECTION 1\nonly"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{a: 1}"),
    ("detectable_format:title", {}, "<<My Title>>\ntext", "<<>> no title"),
    ("combination:two_responses", {}, "first\n******\nsecond", "same\n******\nsame"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say hi. Hi!", "Hi! Say hi."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Done. Any other questions?\"", "Any other questions? Done."),
    ("startend:quotation", {}, '"quoted"', 'not "quoted"'),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "VERY WELL-KNOWN words", "Very well-KNOWN CAPS"),
    ("change_case:english_capital", {}, "THIS IS AN ENGLISH SENTENCE WRITTEN IN CAPITALS.",
     "This is an English sentence."),
    ("change_case:english_lowercase", {}, "this is an english sentence in lower case letters.",
     "This is an English sentence."),
    ("punctuation:no_comma", {}, "no commas here", "one, two"),
]


@pytest.mark.parametrize("iid,kwargs,good,bad", CASES, ids=[c[0] for c in CASES])
def test_each_instruction_follows_and_fails(iid, kwargs, good, bad):
    assert _if([iid], [kwargs], good) == 1.0
    assert _if([iid], [kwargs], bad) == 0.0


def test_every_ifeval_id_is_covered():
    assert {c[0] for c in CASES} == set(ic.CHECKS)


def test_ifeval_fraction_none_kwargs_and_errors():
    ids = ["punctuation:no_comma", "detectable_format:title", "keywords:existence"]
    kwargs = [{"keywords": None}, {}, {"keywords": ["tea"], "num_words": None}]
    assert _if(ids, kwargs, "<<T>> tea, please") == pytest.approx(2 / 3)
    assert _if(ids, kwargs, "") == 0.0  # an empty answer follows nothing (official strict rule)
    # A check that cannot run on its kwargs (wrong relation) counts as not followed.
    assert _if(["length_constraints:number_words"], [{"num_words": 1, "relation": "about"}],
               "a b") == 0.0
    with pytest.raises(rewards.RecordError, match=r"instruction_id_list\[1\]"):
        _if(["punctuation:no_comma", "made:up"], [{}, {}], "x")
    with pytest.raises(rewards.RecordError, match="'kwargs'"):
        _if(["punctuation:no_comma"], [], "x")


def test_language_detection_is_deterministic():
    text = "Ceci est une phrase courte."
    assert len({ic.detect_language(text) for _ in range(5)}) == 1
    assert ic.detect_language("12345 !!!") is None
