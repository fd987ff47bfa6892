"""`PromptDataset`: prompts from local JSONL files, re-sampled by difficulty, rendered on access.

    dataset = PromptDataset.from_jsonl(["train.jsonl"], renderer=PromptRenderer(tokenizer),
                                       resampling=DifficultyResampling())
    prompt = dataset[i]          # Prompt(example, text, input_ids)

Index `i` runs over the re-sampled list (a prompt repeated 6 times has 6 indices); `examples`
keeps each prompt once. Rendering and tokenising happen on access, so loading a large file costs
only the JSON parse.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from oreal.data.difficulty import DifficultyResampling
from oreal.data.formats import PromptExample, read_prompt_file
from oreal.data.templates import PromptRenderer


@dataclass
class Prompt:
    """A prompt ready for the rollout engine: `text` rendered, `input_ids` tokenised (None without a tokenizer)."""

    example: PromptExample
    text: str
    input_ids: list[int] | None
    index: int  # position in the re-sampled list

    @property
    def gold_answer(self) -> str:
        return self.example.gold_answer


class PromptDataset:
    """A list of prompts with an optional difficulty re-sampling table and a renderer."""

    def __init__(self, examples: Sequence[PromptExample], *, renderer: PromptRenderer | None = None,
                 resampling: DifficultyResampling | None = None):
        self.examples = list(examples)
        self.renderer = renderer
        self.resampling = resampling
        self.order = resampling.expand([e.pass_rate for e in self.examples]) if resampling else \
            list(range(len(self.examples)))
        if not self.order:
            raise ValueError(f"resampling: no prompt is left after difficulty re-sampling of "
                             f"{len(self.examples)} prompts (drop_at={resampling.drop_at}); relax the table")

    @classmethod
    def from_jsonl(cls, paths: str | os.PathLike | Iterable[str | os.PathLike], *, format: str = "auto",
                   renderer: PromptRenderer | None = None,
                   resampling: DifficultyResampling | None = None) -> PromptDataset:
        """Prompts from one or more JSONL files, each detected (or held to `format`) on its own."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = list(paths)
        if not paths:
            raise ValueError("paths: no prompt file given")
        examples = [example for path in paths for example in read_prompt_file(path, format)]
        return cls(examples, renderer=renderer, resampling=resampling)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> Prompt:
        if not -len(self.order) <= index < len(self.order):
            raise IndexError(f"index {index} is out of range for {len(self.order)} prompts")
        index %= len(self.order)
        example = self.examples[self.order[index]]
        if self.renderer is None:
            return Prompt(example, example.question, None, index)
        if self.renderer.tokenizer is None:
            return Prompt(example, self.renderer.render(example), None, index)
        text, ids = self.renderer.render_and_encode(example)
        return Prompt(example, text, ids, index)

    def batch(self, indices: Iterable[int]) -> list[Prompt]:
        """The prompts at these indices (what a sampler's `next_indices()` returns)."""
        return [self[i] for i in indices]
