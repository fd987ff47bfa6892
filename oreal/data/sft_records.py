"""Supervised fine-tuning records: JSONL, one example per line, in any of three layouts (told apart per line).

- chat: `messages` (also `message_data`, OREAL's/XTuner's name, or ShareGPT's `conversations` with
  `from`/`value`): a list of turns `{"role": "system"|"user"|"assistant", "content": str}` ending in
  an assistant turn. The loss is on that last assistant turn; everything before it is the prompt,
  rendered verbatim by the tokenizer's chat template.
- pair: a prompt and its response: `prompt` / `question` / `problem` / `query` with `response` /
  `solution` / `completion` / `output` (a MATH row's `problem` + worked `solution` is a pair; so is
  what the demo task writes). The prompt is a bare question: SFT renders it exactly as the RL
  trainer renders its prompts (template, system prompt, instruction), so SFT and RL see one format.

Every record becomes an `SFTRecord`; a malformed line is a ValueError naming the file, line and field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAT_FIELDS = ("messages", "message_data", "conversations")
PROMPT_FIELDS = ("prompt", "question", "problem", "query")
RESPONSE_FIELDS = ("response", "solution", "completion", "output")
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class SFTRecord:
    """One example: the `response` the loss is on, after either a bare `question` or chat `messages`."""

    response: str
    question: str | None = None  # rendered by the RL trainer's prompt renderer
    messages: tuple[dict, ...] | None = None  # the turns before the response, rendered by the chat template
    answer: str = ""  # the gold answer when the record carries one (kept for reference, not trained on)

    def text(self) -> str:
        """All of the record's text (what a tokenizer built from the data should cover)."""
        before = self.question if self.messages is None else "\n".join(m["content"] for m in self.messages)
        return f"{before}\n{self.response}"


def _chat_record(turns: Any, field: str, where: str) -> SFTRecord:
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: field {field!r} must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: {field}[{i}] is not an object")
        if "role" in turn:
            role, content = turn.get("role"), turn.get("content")
        else:  # ShareGPT
            role, content = _SHAREGPT_ROLES.get(turn.get("from")), turn.get("value")
        if role not in ROLES:
            raise ValueError(f"{where}: {field}[{i}] has role {turn.get('role', turn.get('from'))!r}; "
                             f"expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: {field}[{i}] has no text content")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise ValueError(f"{where}: the last turn of {field!r} must be a non-empty assistant turn (the response "
                         "the loss is on)")
    if not any(m["role"] == "user" for m in messages[:-1]):
        raise ValueError(f"{where}: {field!r} has no user turn before the response")
    return SFTRecord(response=messages[-1]["content"], messages=tuple(messages[:-1]))


def _pair_record(row: dict, where: str) -> SFTRecord:
    prompt_key = next((k for k in PROMPT_FIELDS if k in row), None)
    response_key = next((k for k in RESPONSE_FIELDS if k in row), None)
    if prompt_key is None:
        raise ValueError(f"{where}: no SFT example: expected chat turns ({' / '.join(CHAT_FIELDS)}) or a prompt "
                         f"({' / '.join(PROMPT_FIELDS)}) with its response ({' / '.join(RESPONSE_FIELDS)})")
    if response_key is None:
        expected = "solution" if prompt_key == "problem" else "response"
        raise ValueError(f"{where}: field {expected!r} is missing or empty (the response to {prompt_key!r}; "
                         f"any of {', '.join(RESPONSE_FIELDS)})")
    for key in (prompt_key, response_key):
        if not isinstance(row[key], str) or not row[key].strip():
            raise ValueError(f"{where}: field {key!r} is missing or empty (SFT data needs the prompt and its "
                             "response)")
    answer = row.get("answer", row.get("gold_answer", ""))
    return SFTRecord(response=row[response_key], question=row[prompt_key],
                     answer="" if answer is None else str(answer))


def parse_sft_row(row: Any, where: str = "<memory>") -> SFTRecord:
    """One JSON object as an `SFTRecord` (see the module docstring for the layouts)."""
    if isinstance(row, SFTRecord):
        return row
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    chat_key = next((k for k in CHAT_FIELDS if k in row), None)
    if chat_key is not None:
        return _chat_record(row[chat_key], chat_key, where)
    return _pair_record(row, where)


def _rows(path: str | os.PathLike):
    """(where, JSON value) of every non-blank line of `path`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc})") from None


def read_sft_records(path: str | os.PathLike) -> list[SFTRecord]:
    """The records of an SFT JSONL file, in file order."""
    return [parse_sft_row(row, where) for where, row in _rows(path)]


def read_sft_rows(path: str | os.PathLike) -> list[dict]:
    """The raw JSON objects of an SFT JSONL file, each checked to be a valid example (`parse_sft_row`)."""
    rows = []
    for where, row in _rows(path):
        parse_sft_row(row, where)
        rows.append(row)
    return rows
