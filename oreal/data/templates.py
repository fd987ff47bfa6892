"""Rendering a prompt for the policy: chat template or a plain format string, system prompt, suffix.

`PromptRenderer(tokenizer, template="chat")` sends `[system?, user: question + instruction]` through
the tokenizer's own chat template (`apply_chat_template(..., add_generation_prompt=True)`), which is
what a chat model was trained on. A plain template is a format string with the placeholders
`{question}` (required), `{system}` and `{instruction}`; when `{instruction}` is absent the
instruction is appended to the question. Prompts marked `prerendered` (AReaL-boba files ship
rendered prompts) pass through untouched.
"""

from __future__ import annotations

import string

from oreal.data.formats import PromptExample

DEFAULT_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
_PLACEHOLDERS = {"question", "system", "instruction"}


class PromptRenderer:
    """Turns a `PromptExample` into model-input text and token ids.

    Args:
        tokenizer: a Hugging Face tokenizer; needed for `encode` and for `template="chat"`.
        template: "chat" (the tokenizer's chat template) or a format string (see module docstring).
        system_prompt: system message; None for none (the chat template may add its own default).
        instruction: appended to every question; "" for none.
    """

    def __init__(self, tokenizer=None, template: str = "chat", system_prompt: str | None = None,
                 instruction: str = DEFAULT_INSTRUCTION):
        if not isinstance(template, str) or not template:
            raise ValueError(f"template: expected 'chat' or a format string with {{question}}, got {template!r}")
        if template != "chat":
            try:
                fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
            except ValueError as error:
                raise ValueError(f"template: {template!r} is not a valid format string ({error})") from None
            unknown = fields - _PLACEHOLDERS
            if unknown:
                raise ValueError(f"template: unknown placeholder(s) {sorted(unknown)} in {template!r}; "
                                 f"allowed: {{question}}, {{system}}, {{instruction}}")
            if "question" not in fields:
                raise ValueError(f"template: {template!r} has no {{question}} placeholder")
            self._fields = fields
        elif tokenizer is None:
            raise ValueError("template: 'chat' needs a tokenizer (pass tokenizer=...) or use a plain template")
        elif not getattr(tokenizer, "chat_template", None):
            raise ValueError("template: 'chat' was asked for, but the tokenizer has no chat template; "
                             "pass a plain template such as 'Question: {question}\\nAnswer:'")
        self.tokenizer, self.template = tokenizer, template
        self.system_prompt, self.instruction = system_prompt, instruction or ""

    def render(self, example: PromptExample | str) -> str:
        """The text the policy sees for this prompt."""
        if isinstance(example, PromptExample) and example.prerendered:
            return example.question
        question = example.question if isinstance(example, PromptExample) else example
        if self.template == "chat":
            messages = []
            if self.system_prompt:
                messages.append({"role": "system", "content": self.system_prompt})
            messages.append({"role": "user", "content": question + self.instruction})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        values = {"system": self.system_prompt or "", "instruction": self.instruction}
        values["question"] = question if "instruction" in self._fields else question + self.instruction
        return self.template.format(**values)

    def encode(self, example: PromptExample | str) -> list[int]:
        """Token ids of `render(example)` (see `render_and_encode`)."""
        return self.render_and_encode(example)[1]

    def render_and_encode(self, example: PromptExample | str) -> tuple[str, list[int]]:
        """`(text, token ids)` of one prompt.

        Rendered chat text already holds the special tokens the template adds, so no more are added;
        a plain template gets the tokenizer's usual special tokens (a BOS for Llama tokenizers).
        """
        if self.tokenizer is None:
            raise ValueError("tokenizer: encoding a prompt needs a tokenizer; pass PromptRenderer(tokenizer=...)")
        text = self.render(example)
        chat_text = self.template == "chat" or (isinstance(example, PromptExample) and example.prerendered)
        return text, list(self.tokenizer(text, add_special_tokens=not chat_text)["input_ids"])
