"""extract_answer: thinking words, stop words, boxes, cues, last-number fallback, linear time."""

import random
import time

import pytest

from oreal.reward import extract_answer, reference_answer
from oreal.reward.extract import choice_letter, extract_choice


def test_last_box_with_nested_braces_wins():
    text = r"First \boxed{5}. Then $\boxed{\frac{1}{\sqrt{2}}}$ is right."
    assert extract_answer(text) == r"\frac{1}{\sqrt{2}}"


def test_fbox_and_double_escaped_box():
    assert extract_answer(r"so \fbox{42}") == "42"
    assert extract_answer(r"so \\boxed{004}") == "004"


def test_only_text_after_last_thinking_word_is_read():
    text = r"<think>maybe \boxed{3}</think> after thinking: \boxed{4} <think>x</think> final \boxed{7}"
    assert extract_answer(text) == "7"
    assert extract_answer(r"<think>\boxed{3}</think>") is None  # nothing after the thinking
    assert extract_answer(r"draft \boxed{1} **Final Answer** \boxed{2}") == "2"
    assert extract_answer(r"a \boxed{1} <conclude> b \boxed{9}", thinking_finish_words=()) == "9"


def test_stop_word_marks_unfinished():
    assert extract_answer(r"so \boxed{5}", stop_word="<|im_end|>") is None
    assert extract_answer("so \\boxed{5}<|im_end|>\n", stop_word="<|im_end|>") == "5"


def test_boxes_joined_by_a_few_words_form_one_answer():
    assert extract_answer(r"\boxed{-2} and \boxed{1}.") == "-2, 1"
    assert extract_answer(r"\boxed{(3, 3)} \text{ for part (a) and } \boxed{(1, 1)}") == "(3, 3), (1, 1)"
    # many words in between: only the last box
    assert extract_answer(r"\boxed{1} no no no no no \boxed{2}") == "2"
    # a repeated answer is one answer
    assert extract_answer(r"$\boxed{5}$ $\boxed{5}$") == "5"


def test_final_answer_after_box_overrides_it_but_plain_remarks_do_not():
    assert extract_answer(r"interest \boxed{200} ... Final Answer: The final answer is $10,455$. I hope") == "10,455"
    assert extract_answer(r"$\boxed{44}$. Check: ..., so our answer is correct.") == "44"


def test_cues_and_number_fallback():
    assert extract_answer("Step one. The answer is 2/3. Thanks") == "2/3"
    assert extract_answer("work\n#### 1,450,000") == "1,450,000"
    assert extract_answer("Final Answer: The largest $n$ is 34.") == "34"
    assert extract_answer("blah blah so we get 12 apples and then 17 pears") == "17"
    assert extract_answer(r"the ordered pair that solves it is $(7, 6)$. <|im_start|>user") == "(7, 6)"
    assert extract_answer("how many? just about $1$ or so") == "1"


def test_bare_short_answer_is_taken_whole():
    assert extract_answer("x^2 + 2*x + 1") == "x^2 + 2*x + 1"
    assert extract_answer(r"$\frac13 $") == r"$\frac13 $"


@pytest.mark.parametrize("text", [None, "", "   ", "no numbers at all here, just words", r"\boxed{}", 17,
                                  b"\\boxed{1}"])
def test_nothing_to_extract_gives_none(text):
    assert extract_answer(text) is None


def test_unclosed_box_is_not_an_answer_box():
    assert extract_answer(r"\boxed{7}, then we get \boxed{\frac{1}{2}") == "7"


def test_random_boxed_integers_round_trip():
    rng = random.Random(1234)
    for _ in range(200):
        value = rng.randint(-10 ** 9, 10 ** 9)
        noise = " ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(0, 20)))
        assert extract_answer(f"{noise} so the result is $\\boxed{{{value}}}$. {noise}") == str(value)


def test_linear_time_on_huge_inputs():
    big = "x " * 500_000 + r"\boxed{" + "{" * 10_000 + "7" + "}" * 10_000 + "}"
    start = time.perf_counter()
    assert extract_answer(big).endswith("7" + "}" * 10_000)
    assert extract_answer("\\boxed{1}" * 100_000) == "1"
    assert time.perf_counter() - start < 5.0  # linear: a quadratic scan takes minutes here


def test_reference_answer_takes_answer_out_of_solutions():
    assert reference_answer(r"$\frac{1}{2}$") == r"$\frac{1}{2}$"
    assert reference_answer(27.0) == "27.0"
    assert reference_answer("Janet sells 16 - 3 = 13.\n#### 18") == "18"
    assert reference_answer(r"... so $n = \boxed{1,-2}.$") == "1,-2"
    assert reference_answer(None) is None


def test_choice_letters():
    assert choice_letter(r"\text{(C)}") == "C"
    assert choice_letter("**B**") == "B"
    assert choice_letter("C + 1") is None
    assert extract_choice("The answer is for sure D, it can't be A or B") == "D"
    assert extract_choice("It's not A because it doesn't make sense, therefore I think it's B") == "B"
    assert extract_choice("B。不是 A") == "B"
