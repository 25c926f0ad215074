"""Math and STEM domains: equivalent forms, wrong, malformed and adversarial answers."""
import time

import pytest

import rewards
from rewards.pool import RewardPool
from rewards.stem_grader import choice_letter, numbers_close, predicted_answer


def _math(gold, response, **kw):
    return rewards.score({"domain": "math", "answer": gold}, response, **kw)


@pytest.mark.parametrize("gold,boxed", [
    ("0.5", r"\frac{1}{2}"), (r"\frac{1}{2}", "0.5"), ("1/2", r"\dfrac{2}{4}"),
    (r"10\%", "0.1"), ("(x+1)^2", "x^2+2x+1"), ("[1,2)", "[1,2)"), (r"\{1,2\}", r"\{2,1\}"),
    (r"\sqrt{2}", r"\sqrt 2"), ("1000", "1,000"), ("x=3", "3"), ("3", r"\text{3}"),
])
def test_equivalent_forms_score_one(gold, boxed):
    assert _math(gold, rf"<think>work</think>The answer is $\boxed{{{boxed}}}$.") == 1.0


@pytest.mark.parametrize("gold,response", [
    ("3", r"</think>\boxed{4}"),
    ("2", r"</think>\boxed{2.0001}"),
    ("[1,2)", r"</think>\boxed{[1,2]}"),
    ("5", r"</think>\boxed{5} on second thought \boxed{6}"),  # the LAST box counts
    ("5", "</think>The answer is 5."),  # no box -> 0 (DeepScaleR rule)
    ("5", r"<think>\boxed{5}</think>I am not sure."),  # a box only inside the reasoning
    ("5", r"\boxed{5}"),  # no </think>: unanswered under think_mode="require"
    ("5", r"</think>\boxed{}"), ("5", r"</think>\boxed{5"),  # empty / unclosed
    # hedging: several candidates in one box never count as the answer
    ("3", r"</think>\boxed{3, 4}"), ("3", r"</think>\boxed{3 \text{ or } 4}"),
    ("3", r"</think>\boxed{\{3,4\}}"), ("3", r"</think>\boxed{3 \pm 1}"),
    ("3", r"</think>\boxed{x}"),
])
def test_wrong_and_malformed_score_zero(gold, response):
    assert _math(gold, response) == 0.0


def test_gold_list_and_optional_think():
    rec = {"domain": "math", "answer": ["12", r"\frac{24}{2}", "twelve"]}
    assert rewards.score(rec, r"</think>\boxed{12.0}") == 1.0
    assert _math("7", r"\boxed{7}", think_mode="optional") == 1.0


def test_math_record_errors():
    with pytest.raises(rewards.RecordError, match="'answer'"):
        _math([], r"</think>\boxed{1}")
    with pytest.raises(rewards.RecordError, match="'answer'"):
        _math(["1", None], r"</think>\boxed{1}")


def test_pathological_expression_is_bounded():
    with RewardPool(1) as pool:
        t0 = time.monotonic()
        r, d = pool.score_batch([{"domain": "math", "answer": "3"}] * 2,
                                [r"</think>\boxed{9^{9^{9^{9}}}}", r"</think>\boxed{3}"],
                                timeout_s=1.5, return_details=True)
        assert r == [0.0, 1.0]
        assert d.status[0] in ("timeout", "ok") and time.monotonic() - t0 < 12


def test_stem_helpers():
    assert [choice_letter(s) for s in ["B", "(B)", "B)", "B. 42 m", r"\text{B}", "b", "AB"]] == \
        ["B", "B", "B", "B", "B", None, None]
    assert numbers_close(9.81, 9.8) and not numbers_close(9.81, 9.7)
    assert numbers_close(0.0, 0.0) and not numbers_close(0.0, 1e-3)
    assert predicted_answer("so...\n**Final Answer:** C") == "C"
    assert predicted_answer("nothing here") is None


@pytest.mark.parametrize("gold,response,reward", [
    ("B", r"</think>\boxed{B}", 1.0), ("B", "</think>Answer: (B) since v = d/t", 1.0),
    ("B", r"</think>\boxed{A}", 0.0), ("B", r"</think>\boxed{b}", 0.0),
    ("B", r"</think>\boxed{A} or \boxed{B}", 1.0), ("B", "</think>B", 0.0),  # no box / line
    ("9.81", r"</think>\boxed{9.8}", 1.0), ("9.81", r"</think>\boxed{9.6}", 0.0),
    ("6.02e23", r"</think>\boxed{6.0e23}", 1.0), (r"\frac{\pi}{2}", r"</think>\boxed{\pi/2}", 1.0),
    ("H_2O", r"</think>\boxed{H_2O}", 1.0), ("B", "no think tag \\boxed{B}", 0.0),
])
def test_stem_rewards(gold, response, reward):
    assert rewards.score({"domain": "stem", "answer": gold}, response) == reward


# Cases modelled on math-verify's own regression tests (tests/test_all.py), as boxed answers.
@pytest.mark.parametrize("gold,boxed,reward", [
    ("1,22", "1.22", 1.0), ("0,111", "0.111", 1.0), ("1000,99", "1000.99", 1.0),
    ("7425000", "7,425,000", 1.0), ("10/9", r"\frac{10}{9}", 1.0), ("-10/9", r"-\frac{10}{9}", 1.0),
    ("1/3", r"\frac13", 1.0), (r"\sqrt{3}", r"\sqrt3", 1.0), ("1/3", r"\cfrac{1}{3}", 1.0),
    ("1/3", r"\left( \frac{1}{3} \right)", 1.0), ("1/3", r"\frac{1}{3} \text{meters}", 1.0),
    ("1/3", r"k = \frac{1}{3}", 1.0), ("[0,1)", "[0,1)", 1.0), ("[0,9)", "[0,1)", 0.0),
    ("(0,9)", "[0,9)", 0.0), (r"28\%", "28", 1.0), ("0.28", "28", 0.0), ("28", "28/100", 0.0),
    ("14916", "14{,}916", 1.0), (r"\text{Evelyn}", r"\text{Evelyn}", 1.0), ("2", "AZYUK2A", 0.0),
])
def test_math_verify_style_cases(gold, boxed, reward):
    assert _math(gold, rf"<think>w</think>so $\boxed{{{boxed}}}$") == reward


# DeepScaleR's rule (cases modelled on the tests of its public ports): answer after </think>,
# in a box; a boxed gold is read as its content.
@pytest.mark.parametrize("response,gold,reward", [
    (r"Let me analyze...</think>The answer is \boxed{42}", "42", 1.0),
    (r"Thinking...</think>The answer is \boxed{wrong}", "42", 0.0),
    (r"The answer is \boxed{42}", "42", 0.0), (r"</think>The answer is 42", "42", 0.0),
    (r"</think>\boxed{42}", r"\boxed{42}", 1.0), (r"</think>\boxed{123}", "42", 0.0),
])
def test_deepscaler_rule_cases(response, gold, reward):
    assert _math(gold, response) == reward
