"""Answer extraction and comparison: the tricky spellings greedy generations produce."""
import pytest

from lpq.eval.answers import (clean_number, extract_gsm8k, extract_math, gsm8k_target, last_boxed, math_equal,
                              normalize_math, numbers_equal)
from lpq.eval.tasks.utils import gsm8k_process_results, math_process_results


@pytest.mark.parametrize("response, expected", [
    ("She pays 3 * 6 = 18 dollars.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("####18.00", "18"),
    ("Total is $5 + $7 = $12. The answer is $12.", "12"),
    ("It drops by 3 degrees, so -3 is the change.\n#### -3", "-3"),
    ("First 2 apples, then 3 more, so 5 apples in all.", "5"),          # no marker: last number
    ("#### 3.50", "3.5"),
    ("The answer is 7. Question: what is 2 + 2?", "7"),               # a hallucinated next question
    ("I do not know.", ""),
])
def test_extract_gsm8k(response, expected):
    assert extract_gsm8k(response) == expected


def test_gsm8k_target_and_numeric_equality():
    assert gsm8k_target("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == "72"
    assert gsm8k_target("... #### 1,000") == "1000"
    with pytest.raises(ValueError, match="####"):
        gsm8k_target("no marker")
    assert numbers_equal("18.0", "18") and numbers_equal("$1,000", "1000") and not numbers_equal("18", "19")
    assert not numbers_equal("", "")
    assert clean_number("0.50") == "0.5"


@pytest.mark.parametrize("text, expected", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("first \\boxed{1}, finally \\boxed{2}", "2"),                    # the last box wins
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed 5", "5"),
    ("\\fbox{x^2}", "x^2"),
    ("\\boxed{7} then an unclosed \\boxed{3", "7"),                  # unbalanced last box: the earlier one
    ("no box here", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("prediction, reference", [
    ("\\dfrac{14}{3}", "\\frac{14}{3}"),
    ("\\frac12", "\\frac{1}{2}"),
    ("0.5", "\\frac{1}{2}"),
    ("90^\\circ", "90"),
    ("x = 5", "x=5"),
    ("5", "x=5"),
    ("\\text{Evelyn}", "\\text{Evelyn}"),
    ("Evelyn", "\\text{Evelyn}"),
    ("(3,\\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("11\\sqrt{2}", "11\\sqrt2"),
    ("1,000", "1000"),
    (".25", "0.25"),
    ("10\\%", "10"),
    ("5\\text{ cm}", "5"),
    ("-\\frac{3}{4}", "-0.75"),
])
def test_math_equal_accepts_equivalent_spellings(prediction, reference):
    assert math_equal(prediction, reference)


@pytest.mark.parametrize("prediction, reference", [
    ("\\frac{1}{3}", "\\frac{1}{2}"),
    ("", "0"),
    ("1,-2", "1,2"),
    ("x^5 - x^4", "x^5 + x^4"),
    ("52_8", "52"),
])
def test_math_equal_rejects_different_answers(prediction, reference):
    assert not math_equal(prediction, reference)


def test_extract_math_fallback_and_normalize():
    assert extract_math("We get 4.\nThe answer is $\\frac{3}{56}$.") == "\\frac{3}{56}"
    assert extract_math("nothing final") == ""
    assert normalize_math("\\left( 1, 2 \\right)") == "(1,2)"


def test_task_process_results_use_the_same_extraction():
    assert gsm8k_process_results({"answer": "work\n#### 1,200"}, ["so #### 1200."]) == {"exact_match": 1}
    assert gsm8k_process_results({"answer": "#### 12"}, ["it is 13"]) == {"exact_match": 0}
    assert math_process_results({"answer": "\\frac{14}{3}"}, ["... = \\boxed{\\dfrac{14}{3}}"]) == {"exact_match": 1}
    assert math_process_results({"answer": "3"}, ["\\boxed{4}"]) == {"exact_match": 0}
