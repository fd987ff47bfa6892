"""Find the final answer inside a model response (or inside a worked reference solution).

Order of evidence, as `extract_answer` documents it: the text after the last thinking-finish word;
the last `\\boxed{...}` / `\\fbox{...}` (brace-matched, chained with the boxes just before it when only a
few words separate them: "\\boxed{1} and \\boxed{2}" is the answer "1, 2"); a "final answer is ..." /
"the answer is ..." / "####" phrase when it comes after the last box; then the last number, widened to
the math span around it when that span is a formula (`$(7, 6)$`, not `$x$ is 6`).

Every scan here is linear in the input and never recursive, so a megabyte of text or ten thousand
nested braces cost milliseconds.
"""

from __future__ import annotations

import re

from oreal.reward.normalize import collapse_double_escapes, sanitize, strip_outer_delimiters

DEFAULT_THINKING_FINISH_WORDS = ("</think>", "<conclude>", "**Final Answer**")

# At most this many words may separate two boxes that form one answer ("\boxed{3} for part (a) and \boxed{1}").
_MAX_CHAIN_WORDS = 4
_MAX_CHAIN_GAP = 120
_MAX_CHAIN_BOXES = 64
_CONJUNCTIONS = {"and", "or", "et", "ou", "und", "oder", "y", "o", "和", "或"}
_MAX_PHRASE = 400
_MAX_BARE = 300

_BOX = re.compile(r"\\+(?:boxed|fbox)\s*\{")
_CUE = re.compile(
    r"(?:final\s+answer\s*(?:is\b|:|：)?|\banswer\s*(?:is\b|:|：)|^\s*answer\b|####"
    r"|\bréponse\s*(?:est\b|:)|答案\s*(?:是|为|:|：))"
    r"[ \t:：]*(?:\n[ \t]*)?",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"\n\s*\n|\n(?=[A-Z*#\-])|(?<!\d)\.(?=\s|$)|\.(?=\s+[A-Z])|<\|")
_NUMBER = re.compile(
    r"\\[dtc]?frac\{-?\d+\}\{\d+\}"
    r"|(?<![A-Za-z0-9_.\\])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?%?"
    r"|(?<![A-Za-z0-9_.\\])-?\.\d+%?"
)
_BRACE = re.compile(r"[{}]")
_MATH_DELIM = re.compile(r"\$\$|\\\[|\\\]|\\\(|\\\)|(?<!\\)\$")
_WORD = re.compile(r"[^\W\d_]{2,}")
_COMMAND_OR_TEXT = re.compile(
    r"\\(?:text|textbf|textnormal|mathrm|mbox|operatorname|begin|end)\s*\{[^{}]*\}|\\[A-Za-z]+")
_ARTICLE = re.compile(r"^(?:the|a|an)\s+", re.IGNORECASE)
_CHOICE_LETTERS = "ABCDEFGHIJ"
_CHOICE_ONLY = re.compile(r"^\(?\s*([A-J])\s*\)?$")
_CHOICE_LEADING = re.compile(r"^\s*(?:\*\*)?\(?([A-J])\)?(?:\*\*)?(?=$|[\s.,:;)\]]|[^\x00-\x7f])")
_CHOICE_CUE = re.compile(r"(?:answer|réponse|respuesta|antwort|答案)\W{0,3}(?:is|est|es|ist|是|为)?",
                         re.IGNORECASE)
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z'’\\])\(?([A-HJ])\)?(?![A-Za-z'’])")


def extract_answer(text, *, stop_word=None, thinking_finish_words=DEFAULT_THINKING_FINISH_WORDS):
    """The final answer of `text` as a LaTeX/plain string, or None when it has none.

    - Only the text after the last of `thinking_finish_words` is read (the whole text if none occurs).
    - With `stop_word`, a response that does not end with it (after trailing whitespace) is unfinished:
      None.
    - Then: the last `\\boxed{...}`/`\\fbox{...}` (brace-matched), a "final answer is ..." or
      "the answer is ..." phrase, the last number. Never raises; non-strings give None.
    """
    if not isinstance(text, str) or not text:
        return None
    text = sanitize(text)
    if stop_word:
        stripped = text.rstrip()
        if not stripped.endswith(stop_word):
            return None
        text = stripped[: len(stripped) - len(stop_word)]
    cut = 0
    for word in thinking_finish_words or ():
        if word:
            at = text.rfind(word)
            if at >= 0:
                cut = max(cut, at + len(word))
    answer = _answer_in(text[cut:])
    if answer is None:
        return None
    answer = answer.strip()
    return answer or None


def reference_answer(gold) -> str | None:
    """The answer inside a reference: the reference itself when short and plain, else extracted from it.

    References are usually bare answers ("\\frac{1}{2}", "27.0"), but some datasets store a worked
    solution (boxed answer, "#### 18", "The final answer is ...").
    """
    if gold is None or isinstance(gold, bool):
        return None
    if not isinstance(gold, str):
        gold = repr(gold) if isinstance(gold, float) else str(gold)
    gold = sanitize(gold)
    if _BOX.search(gold) or len(gold) > 200 or _CUE.search(gold) or "**Final Answer**" in gold:
        found = extract_answer(gold)
        if found is not None:
            return found
    gold = gold.strip()
    return gold or None


def _answer_in(text: str) -> str | None:
    boxes = _top_level_boxes(text)
    cue = _last_cue(text)
    # a box wins, unless a "final answer" / "####" statement comes after it ("\\boxed{200} ... Final Answer:
    # The final answer is $10,455$"); a plain "our answer is correct" after the box does not count
    if boxes and not (cue and cue[0] >= boxes[-1][2] and cue[2]):
        return _box_chain(text, boxes)
    if cue:
        phrase = _phrase_answer(cue[1])
        if phrase:
            return phrase
    bare = text.strip()
    if len(bare) <= _MAX_BARE and _words_outside_math(bare) <= 1:
        return bare  # the whole text is the answer: "x^2 + 2*x + 1", "$\\frac13$", "28 percent"
    return _last_number(text)


def _top_level_boxes(text: str) -> list[tuple[int, int, int]]:
    """(start, content_start, end) of every closed box not nested in another box, in order.

    Matching braces for the whole text is one stack pass, so many boxes cost O(n) together.
    """
    starts = [m for m in _BOX.finditer(text)]
    if not starts:
        return []
    match: dict[int, int] = {}
    stack: list[int] = []
    wanted = {m.end() - 1 for m in starts}
    for brace in _BRACE.finditer(text, starts[0].end() - 1):
        i = brace.start()
        if text[i] == "{":
            stack.append(i)
        elif stack:
            j = stack.pop()
            if j in wanted:
                match[j] = i
    boxes = []
    last_end = -1
    for m in starts:
        brace = m.end() - 1
        close = match.get(brace)
        if close is None or m.start() < last_end:
            continue
        boxes.append((m.start(), m.end(), close + 1))
        last_end = close + 1
    return boxes


def _box_chain(text: str, boxes: list[tuple[int, int, int]]) -> str:
    chain = [boxes[-1]]
    for prev in reversed(boxes[-_MAX_CHAIN_BOXES:-1]):
        if not _joins(text[prev[2]:chain[-1][0]]):
            break
        chain.append(prev)
    contents: list[str] = []
    seen: set[str] = set()
    for _, content_start, end in reversed(chain):
        content = text[content_start:end - 1].strip()
        if content and content not in seen:
            seen.add(content)
            contents.append(content)
    return ", ".join(contents)


def _joins(gap: str) -> bool:
    """Whether the text between two boxes joins them into one answer: nothing but punctuation and
    math delimiters, or at most a few words around a conjunction or comma ("and", "or", ",")."""
    if len(gap) > _MAX_CHAIN_GAP:
        return False
    gap = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r" \1 ", gap)
    gap = re.sub(r"\\[A-Za-z]+|\\.", " ", gap)
    words = re.findall(r"[^\W\d_]+", gap)
    if not words:
        return True
    if len(words) > _MAX_CHAIN_WORDS:
        return False
    return bool(re.search(r"[,;]", gap)) or any(w.lower() in _CONJUNCTIONS for w in words)


def _last_cue(text: str):
    """(position, following text, is a "final answer"/"####" cue) of the last answer cue, or None."""
    last = None
    for m in _CUE.finditer(text):
        last = m
    if last is None:
        return None
    rest = text[last.end():last.end() + _MAX_PHRASE * 4]
    end = _SENTENCE_END.search(rest)
    phrase = rest[:end.start()] if end else rest
    strong = last.group().lower().startswith(("final", "####"))
    return last.start(), phrase[:_MAX_PHRASE * 2], strong


def _phrase_answer(phrase: str) -> str | None:
    """The answer inside the words after a cue: the phrase itself when it is a formula, else the value
    after its last " is ", else its first formula or number."""
    phrase = phrase.replace("**", "").replace('\\"', '"').strip().strip("\"'“”`").strip()
    phrase = re.sub(r"\s*I hope it is correct\.?$", "", phrase).strip()
    if not phrase:
        return None
    if _words_outside_math(phrase) <= 2:
        return _ARTICLE.sub("", strip_outer_delimiters(phrase)) or None
    tail = re.split(r"\s(?:is|are|was|equals|be)\s", phrase)
    if len(tail) > 1 and tail[-1].strip():
        return _phrase_answer(tail[-1])
    spans = _math_spans(phrase)
    m = _NUMBER.search(phrase)
    if spans and (m is None or spans[0][0] <= m.start()):
        return phrase[spans[0][1]:spans[0][2]].strip()
    if m:
        return m.group().strip()
    return phrase[:_MAX_PHRASE]


def _words_outside_math(s: str) -> int:
    spans = _math_spans(s)
    pieces = []
    pos = 0
    for start, _, end in spans:
        pieces.append(s[pos:start])
        pos = end
    pieces.append(s[pos:])
    outside = " ".join(pieces)
    outside = _COMMAND_OR_TEXT.sub(" ", outside)
    return len(_WORD.findall(outside))


def _math_spans(text: str) -> list[tuple[int, int, int]]:
    """(start, content_start, content_end_exclusive_of_closer... ) of math spans, paired left to right.

    Returned as (span_start, content_start, content_end); the closing delimiter follows content_end.
    """
    spans = []
    open_kind = None
    open_at = 0
    open_len = 0
    closers = {"$$": "$$", "\\[": "\\]", "\\(": "\\)", "$": "$"}
    for m in _MATH_DELIM.finditer(text):
        d = m.group()
        if open_kind is None:
            if d in closers:
                open_kind, open_at, open_len = d, m.start(), len(d)
        elif d == closers[open_kind]:
            spans.append((open_at, open_at + open_len, m.start()))
            open_kind = None
    return spans


def _last_number(text: str) -> str | None:
    last = None
    for m in _NUMBER.finditer(text):
        last = m
    if last is None:
        return None
    for start, content_start, content_end in reversed(_math_spans(text)):
        if content_start <= last.start() < content_end:
            content = text[content_start:content_end]
            if len(content) <= 300 and _words_outside_math(content) <= 1:
                return content.strip()
            break
        if content_end < last.start():
            break
    return last.group()


def choice_letter(answer) -> str | None:
    """The letter when `answer` is a bare multiple-choice letter: `C`, `(C)`, `\\text{(C)}`, `**C**`."""
    if not isinstance(answer, str):
        return None
    s = collapse_double_escapes(answer)
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|mbox|textnormal)\s*\{([^{}]*)\}", r"\1", s)
    s = strip_outer_delimiters(s.replace("**", "")).strip()
    m = _CHOICE_ONLY.match(s)
    return m.group(1) if m else None


def extract_choice(text) -> str | None:
    """The multiple-choice letter a response settles on: after an answer cue, else a leading letter
    ("B. because ..."), else the last standalone capital A-H (never the pronoun I)."""
    if not isinstance(text, str) or not text.strip():
        return None
    text = sanitize(text)[-5000:]
    letter = choice_letter(text)
    if letter:
        return letter
    cues = list(_CHOICE_CUE.finditer(text))
    if cues:
        after = text[cues[-1].end():cues[-1].end() + 200]
        after = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", after)
        m = _STANDALONE_LETTER.search(after)
        if m:
            return m.group(1)
    m = _CHOICE_LEADING.match(re.sub(r"\\(?:text|textbf)\s*\{([^{}]*)\}", r"\1", text))
    if m:
        return m.group(1)
    last = None
    for m in _STANDALONE_LETTER.finditer(text):
        last = m
    return last.group(1) if last else None
