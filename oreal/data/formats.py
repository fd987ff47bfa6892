"""Prompt file formats: one JSON object a line, in the layouts that math-RL datasets ship.

| format  | dataset                     | fields read                                             |
|---------|-----------------------------|---------------------------------------------------------|
| `oreal` | OREAL-RL-Prompts            | `question`, `gold_answer`, `pass_rate`                  |
| `areal` | AReaL-boba                  | `prompt`, `solutions` (list), `query_id` (or `qid`)     |
| `math`  | MATH, MATH-500, AIME, AMC   | `problem`, and `answer` or a `solution` with `\\boxed{}` |
| `gsm8k` | GSM8K                       | `question`, `answer` ending in `#### N`                 |

`read_prompt_file(path, format="auto")` detects the format from the first record's keys (in the
order of the table) and then holds every line to it. A malformed line or a missing field raises
`PromptFormatError` naming the file, the line and the field; nothing is skipped silently.

Answers become strings: numbers lose a spurious `.0` (AMC's `27.0` -> `27`); GSM8K answers lose
their thousands commas (`1,450,000` -> `1450000`). AReaL-boba prompts usually arrive already
rendered in a chat format; such prompts are marked `prerendered` and sent to the model as they are.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

FORMATS = ("oreal", "areal", "math", "gsm8k")

# Markers of text that already went through a chat template (DeepSeek-R1, ChatML, Llama-3, Llama-2).
CHAT_MARKERS = ("<｜User｜>", "<|im_start|>", "<|start_header_id|>", "[INST]")


class PromptFormatError(ValueError):
    """A prompt file that cannot be read: names the file, the line (1-based) and the field."""

    def __init__(self, path, line: int | None, message: str, field_name: str | None = None):
        where = f"{path}" if line is None else f"{path}:{line}"
        what = f"field '{field_name}': " if field_name else ""
        super().__init__(f"{where}: {what}{message}")
        self.path, self.line, self.field = str(path), line, field_name


@dataclass
class PromptExample:
    """One prompt as read from a file, before templating.

    `question` is the problem text (or, when `prerendered`, the whole model input); `gold_answer`
    is the reference answer the judger compares with; `pass_rate` is the fraction of an earlier
    model's samples that were right (OREAL-RL-Prompts only, else None).
    """

    question: str
    gold_answer: str
    pass_rate: float | None = None
    uid: str = ""
    format: str = ""
    source: str = ""
    line: int = 0
    prerendered: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":
        # `\boxed 5` (no braces) ends at the next whitespace or `$`.
        rest = text[i:].split("$")[0].split()
        return rest[0] if rest else None
    depth, body_start = 0, i + 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[body_start:j]
    return None


def answer_to_text(value: Any) -> str | None:
    """A JSON answer value as a string; integral floats lose `.0`. None for values that are no answer."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value.strip()
    return None


def gsm8k_final_answer(answer: str) -> str | None:
    """The text after the last `####` of a GSM8K worked answer, thousands commas removed."""
    if "####" not in answer:
        return None
    final = answer.rsplit("####", 1)[1].strip()
    if final.replace(",", "").lstrip("-").replace(".", "", 1).isdigit():
        final = final.replace(",", "")
    return final or None


def detect_format(row: dict) -> str | None:
    """The first format whose identifying fields are all present in `row`, or None."""
    if "gold_answer" in row and "question" in row:
        return "oreal"
    if "prompt" in row and "solutions" in row:
        return "areal"
    if "problem" in row:
        return "math"
    if "question" in row and "answer" in row:
        return "gsm8k"
    return None


class _Row:
    """Field access that turns a missing or mistyped field into a `PromptFormatError`."""

    def __init__(self, row: dict, path, line: int):
        self.row, self.path, self.line = row, path, line

    def fail(self, name: str | None, message: str):
        raise PromptFormatError(self.path, self.line, message, name)

    def text(self, name: str, *, required: bool = True) -> str | None:
        if name not in self.row:
            if required:
                self.fail(name, f"missing (keys present: {sorted(self.row)})")
            return None
        value = self.row[name]
        if not isinstance(value, str):
            self.fail(name, f"expected a string, got {type(value).__name__}")
        if not value.strip():
            self.fail(name, "is empty")
        return value

    def answer(self, name: str, *, required: bool = True) -> str | None:
        if name not in self.row:
            if required:
                self.fail(name, f"missing (keys present: {sorted(self.row)})")
            return None
        value = answer_to_text(self.row[name])
        if not value:
            self.fail(name, f"expected a non-empty string or number, got {self.row[name]!r}")
        return value

    def uid(self, *names: str) -> str:
        for name in names:
            if self.row.get(name) is not None:
                return str(self.row[name])
        return f"{os.path.basename(str(self.path))}:{self.line}"


def _parse_oreal(r: _Row) -> PromptExample:
    pass_rate = r.row.get("pass_rate")
    if "pass_rate" not in r.row:
        r.fail("pass_rate", "missing (OREAL-RL-Prompts rows carry the pass rate used for difficulty re-sampling)")
    if isinstance(pass_rate, bool) or not isinstance(pass_rate, (int, float)) or not 0.0 <= pass_rate <= 1.0:
        r.fail("pass_rate", f"expected a number in [0, 1], got {pass_rate!r}")
    return PromptExample(question=r.text("question"), gold_answer=r.answer("gold_answer"),
                         pass_rate=float(pass_rate), uid=r.uid("id", "uid", "query_id"))


def _parse_areal(r: _Row) -> PromptExample:
    prompt = r.text("prompt")
    solutions = r.row.get("solutions")
    if not isinstance(solutions, list) or not solutions or not all(isinstance(s, str) for s in solutions):
        r.fail("solutions", f"expected a non-empty list of strings, got {solutions!r:.80}")
    if "query_id" not in r.row and "qid" not in r.row:
        r.fail("query_id", "missing (AReaL-boba rows name their query as 'query_id' or 'qid')")
    answers = [last_boxed(s) or s.strip() for s in solutions]
    if not answers[0]:
        r.fail("solutions", "first solution is empty")
    return PromptExample(question=prompt, gold_answer=answers[0], uid=r.uid("query_id", "qid"),
                         prerendered=any(marker in prompt for marker in CHAT_MARKERS),
                         meta={"gold_answers": answers, "task": r.row.get("task", "math")})


def _parse_math(r: _Row) -> PromptExample:
    problem = r.text("problem")
    answer = r.answer("answer", required=False)
    if answer is None:
        solution = r.row.get("solution")
        if not isinstance(solution, str):
            r.fail("answer", "missing, and there is no 'solution' string to take a \\boxed{} answer from")
        answer = last_boxed(solution)
        if not answer:
            r.fail("solution", "has no \\boxed{...} answer, and there is no 'answer' field")
    meta = {k: r.row[k] for k in ("subject", "level") if k in r.row}
    return PromptExample(question=problem, gold_answer=answer, uid=r.uid("unique_id", "id", "idx"), meta=meta)


def _parse_gsm8k(r: _Row) -> PromptExample:
    question = r.text("question")
    answer = r.text("answer")
    final = gsm8k_final_answer(answer)
    if final is None:
        r.fail("answer", "has no final answer after '####' (GSM8K answers end in '#### N')")
    return PromptExample(question=question, gold_answer=final, uid=r.uid("idx", "id"))


_PARSERS = {"oreal": _parse_oreal, "areal": _parse_areal, "math": _parse_math, "gsm8k": _parse_gsm8k}


def parse_row(row: dict, format: str, *, path="<memory>", line: int = 0) -> PromptExample:
    """One JSON object of the given format as a `PromptExample`."""
    if format not in _PARSERS:
        raise ValueError(f"format: unknown prompt format {format!r}; expected 'auto' or one of {FORMATS}")
    if not isinstance(row, dict):
        raise PromptFormatError(path, line, f"expected a JSON object, got {type(row).__name__}")
    example = _PARSERS[format](_Row(row, path, line))
    example.format, example.source, example.line = format, str(path), line
    return example


def iter_jsonl(path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded JSON) for each non-blank line; bad JSON raises `PromptFormatError`."""
    try:
        handle = open(path, "rb")  # decoded line by line, so a bad byte is reported with its line
    except OSError as error:
        raise PromptFormatError(path, None, f"cannot open ({error.strerror})") from error
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise PromptFormatError(path, number, (
                    f"not UTF-8 text (byte 0x{raw[error.start]:02x} at byte {error.start + 1} of the line); "
                    "re-encode the file as UTF-8")) from None
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as error:
                raise PromptFormatError(path, number, f"not valid JSON ({error.msg} at column {error.colno})") from None


def read_prompt_file(path, format: str = "auto") -> list[PromptExample]:
    """Every prompt in one JSONL file; `format` is one of `FORMATS` or "auto" (detected from line 1)."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format: unknown prompt format {format!r}; expected 'auto' or one of {FORMATS}")
    examples = []
    for number, row in iter_jsonl(path):
        if format == "auto":
            if not isinstance(row, dict):
                raise PromptFormatError(path, number, f"expected a JSON object, got {type(row).__name__}")
            format = detect_format(row)
            if format is None:
                raise PromptFormatError(path, number, (
                    f"cannot tell the format from keys {sorted(row)}; expected OREAL (question, gold_answer, "
                    "pass_rate), AReaL (prompt, solutions, query_id), MATH (problem, answer|solution) or "
                    "GSM8K (question, answer with '####'); pass format=... to choose"))
        examples.append(parse_row(row, format, path=path, line=number))
    if not examples:
        raise PromptFormatError(path, None, "holds no prompts (the file is empty)")
    return examples
