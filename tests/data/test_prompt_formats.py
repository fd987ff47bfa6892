"""Prompt files: every format from small sample files and from the real eval sets; malformed input."""

import json
from pathlib import Path

import pytest

from oreal.data import FORMATS, PromptFormatError, read_prompt_file
from oreal.data.formats import gsm8k_final_answer, last_boxed

SAMPLES = Path(__file__).parent / "samples"
SHARED_EVAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"


def shared_file(name: str) -> Path:
    path = SHARED_EVAL / name
    if not path.is_file():
        pytest.skip(f"real data {path} is absent (it lives in the shared/ folder beside the repository)")
    return path


def test_oreal_sample():
    examples = read_prompt_file(SAMPLES / "oreal.jsonl")
    assert [e.format for e in examples] == ["oreal"] * 4
    assert [e.gold_answer for e in examples] == ["2", "56", "5", "20"]  # the int 20 becomes "20"
    assert [e.pass_rate for e in examples] == [0.75, 0.1, 1.0, 0.5]
    assert [e.line for e in examples] == [1, 2, 3, 5]  # the blank line 4 is skipped, numbering kept
    assert examples[0].question.startswith("What is the remainder")
    assert not examples[0].prerendered


def test_areal_sample_marks_rendered_prompts():
    first, second = read_prompt_file(SAMPLES / "areal.jsonl")
    assert first.format == second.format == "areal"
    assert first.gold_answer == "8" and first.uid == "q-001" and first.prerendered
    assert second.gold_answer == "11" and second.uid == "q-002" and not second.prerendered
    assert second.meta["gold_answers"] == ["11", "11"]


def test_math_sample_answer_or_boxed_solution():
    examples = read_prompt_file(SAMPLES / "math.jsonl")
    assert [e.gold_answer for e in examples] == ["\\frac{5}{6}", "5\\sqrt{2}", "6"]
    assert examples[0].meta == {"subject": "Prealgebra", "level": 1}
    assert examples[0].uid == "sample/1.json" and examples[2].uid == "math.jsonl:3"


def test_gsm8k_sample_final_answer_without_commas():
    examples = read_prompt_file(SAMPLES / "gsm8k.jsonl")
    assert [e.gold_answer for e in examples] == ["8", "2200"]
    assert examples[1].question.startswith("A town has 1,200 houses")


@pytest.mark.parametrize("fmt", FORMATS)
def test_explicit_format_matches_detection(fmt):
    detected = read_prompt_file(SAMPLES / f"{fmt}.jsonl")
    explicit = read_prompt_file(SAMPLES / f"{fmt}.jsonl", format=fmt)
    assert [(e.question, e.gold_answer) for e in detected] == [(e.question, e.gold_answer) for e in explicit]


def test_math500_real():
    path = shared_file("math500.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    examples = read_prompt_file(path)
    assert len(examples) == 500 and {e.format for e in examples} == {"math"}
    assert [e.gold_answer for e in examples] == [row["answer"] for row in rows]
    assert [e.uid for e in examples] == [row["unique_id"] for row in rows]
    # Without the answer field, the answer comes from the solution's last \boxed{}: the same, for all 500.
    for row, example in zip(rows, examples):
        assert last_boxed(row["solution"]) == example.gold_answer


def test_gsm8k_real():
    path = shared_file("gsm8k_test.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    examples = read_prompt_file(path)
    assert len(examples) == 1319 and {e.format for e in examples} == {"gsm8k"}
    assert [e.gold_answer for e in examples] == [row["final_answer"].replace(",", "") for row in rows]
    assert sum("," in row["final_answer"] for row in rows) == 14  # the manifest's comma cases, all stripped


def test_aime_and_amc_real():
    aime = read_prompt_file(shared_file("aime24.jsonl"))
    amc = read_prompt_file(shared_file("amc23.jsonl"))
    assert len(aime) == 30 and len(amc) == 40
    assert {e.format for e in aime + amc} == {"math"}
    assert sum(e.gold_answer.startswith("0") for e in aime) == 7  # zero-padded answers kept verbatim
    assert all(e.gold_answer.lstrip("-").isdigit() for e in amc)  # AMC floats such as 27.0 become "27"
    assert amc[0].gold_answer == "27"


def test_last_boxed_nested_and_absent():
    assert last_boxed("so \\boxed{\\frac{a}{b^{2}}} and") == "\\frac{a}{b^{2}}"
    assert last_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{unclosed") is None
    assert gsm8k_final_answer("x\n#### -1,000") == "-1000"
    assert gsm8k_final_answer("no marker") is None


# --- malformed input -------------------------------------------------------------------------


def write(tmp_path, lines, name="bad.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_json_names_file_and_line(tmp_path):
    path = write(tmp_path, ['{"question": "q", "gold_answer": "1", "pass_rate": 0.5}', '{"question": oops}'])
    with pytest.raises(PromptFormatError, match=r"bad\.jsonl:2: not valid JSON"):
        read_prompt_file(path)


@pytest.mark.parametrize("line, fmt, pattern", [
    ('{"question": "q", "gold_answer": "1"}', "oreal", r":1: field 'pass_rate': missing"),
    ('{"question": "q", "gold_answer": "1", "pass_rate": 1.5}', "oreal", r"field 'pass_rate': expected a number in \[0, 1\]"),
    ('{"question": "", "gold_answer": "1", "pass_rate": 0.5}', "oreal", r"field 'question': is empty"),
    ('{"question": "q", "gold_answer": null, "pass_rate": 0.5}', "oreal", r"field 'gold_answer': expected a non-empty"),
    ('{"prompt": "p", "solutions": []}', "areal", r"field 'solutions': expected a non-empty list"),
    ('{"prompt": "p", "solutions": ["\\\\boxed{1}"]}', "areal", r"field 'query_id': missing"),
    ('{"problem": "p"}', "math", r"field 'answer': missing"),
    ('{"problem": "p", "solution": "no box here"}', "math", r"field 'solution': has no \\boxed"),
    ('{"problem": 3, "answer": "1"}', "math", r"field 'problem': expected a string, got int"),
    ('{"question": "q", "answer": "just 5"}', "gsm8k", r"field 'answer': has no final answer after '####'"),
    ('{"question": "q"}', "gsm8k", r"field 'answer': missing"),
    ('[1, 2]', "math", r":1: expected a JSON object, got list"),
])
def test_missing_or_bad_field_names_file_line_field(tmp_path, line, fmt, pattern):
    path = write(tmp_path, [line])
    with pytest.raises(PromptFormatError, match=pattern) as info:
        read_prompt_file(path, format=fmt)
    assert str(path) in str(info.value)


def test_a_later_bad_line_is_reported_with_its_number(tmp_path):
    good = '{"problem": "p", "answer": "1"}'
    path = write(tmp_path, [good, good, '{"problem": "p", "answer": ""}'])
    with pytest.raises(PromptFormatError, match=r"bad\.jsonl:3: field 'answer'"):
        read_prompt_file(path)


def test_a_line_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = '{"problem": "p", "answer": "1"}\n'.encode()
    path.write_bytes(good + '{"problem": "Caf\u00e9", "answer": "2"}\n'.encode("latin-1") + good)
    with pytest.raises(PromptFormatError, match=r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at byte 17 "):
        read_prompt_file(path)
    # a UTF-8 byte-order mark at the start of the file is not an error
    path.write_bytes(b"\xef\xbb\xbf" + good)
    assert [e.gold_answer for e in read_prompt_file(path)] == ["1"]


def test_undetectable_unknown_empty_and_missing_files(tmp_path):
    with pytest.raises(PromptFormatError, match=r":1: cannot tell the format from keys \['text'\]"):
        read_prompt_file(write(tmp_path, ['{"text": "hello"}']))
    with pytest.raises(ValueError, match=r"format: unknown prompt format 'csv'"):
        read_prompt_file(SAMPLES / "math.jsonl", format="csv")
    with pytest.raises(PromptFormatError, match="holds no prompts"):
        read_prompt_file(write(tmp_path, ["", "  "], name="empty.jsonl"))
    with pytest.raises(PromptFormatError, match=r"nope\.jsonl: cannot open"):
        read_prompt_file(tmp_path / "nope.jsonl")
