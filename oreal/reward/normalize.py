"""String-level clean-up of one extracted answer, before any parsing.

Everything here is a handful of linear regular-expression passes, so it is safe to run inline on any
input (a megabyte of text costs milliseconds). Parsing and mathematics live in `latex_parser.py` and
`equivalence.py`; this module only removes presentation that never changes the value:

- math delimiters (`$`, `$$`, `\\(`, `\\)`, `\\[`, `\\]`), `\\boxed{}` / `\\fbox{}` wrappers, `\\left`/`\\right`,
  `\\displaystyle`, spacing commands, trailing punctuation and a stray trailing backslash;
- `\\dfrac`, `\\tfrac`, `\\cfrac` -> `\\frac`; `\\dbinom`, `\\tbinom` -> `\\binom`;
- thousands separators written explicitly (`{,}`, `,\\!`, `\\,` between digit groups, `1 000`);
- degree marks (`^\\circ`, `^{\\circ}`, `°`, `\\degree`) -> `°`; percent (`\\%`, `percent`, `pct`) -> `%`;
  currency (`\\$`) is dropped;
- double-escaped commands (`\\\\frac` as found in JSON-escaped strings) -> `\\frac`.
"""

from __future__ import annotations

import re

# Commands whose double-escaped spelling (`\\frac`) is collapsed to one backslash. Only names that
# are unambiguous after a LaTeX line break, so `a \\ b` inside a matrix stays a row separator.
_KNOWN_COMMANDS = (
    "boxed|fbox|frac|dfrac|tfrac|cfrac|sqrt|left|right|pi|infty|cdot|times|div|pm|mp|le|leq|ge|geq|ne|neq|"
    "lt|gt|in|cup|cap|text|textbf|mathrm|mbox|sin|cos|tan|cot|sec|csc|log|ln|exp|alpha|beta|gamma|delta|"
    "theta|lambda|mu|sigma|omega|phi|circ|approx|begin|end|binom|dbinom|quad|qquad|emptyset|varnothing|"
    "ldots|cdots|dots|mathbf|vec|overline|angle|leqslant|geqslant|neq|setminus|mathbb|operatorname"
)
_DOUBLE_ESCAPED = re.compile(r"(?<!\\)\\\\(?=(?:" + _KNOWN_COMMANDS + r")(?![A-Za-z]))")

_BOX_OPEN = re.compile(r"\\+(?:boxed|fbox)\s*\{")
_SPACING = re.compile(
    r"\\(?:qquad|quad)|(?<!\\)\\[,;:! ]|~"
    r"|\\(?:displaystyle|textstyle|scriptstyle|limits|nolimits)(?![A-Za-z])"
)
_SIZING = re.compile(
    r"\\(?:left|right|big|Big|bigg|Bigg)[lr]?(?![A-Za-z])\s*"
    r"(\\\{|\\\}|\\\||[()\[\]|.]|\\[lr]?[vV]ert|\\[lr]angle|\\[lr]floor|\\[lr]ceil)?"
)
_FRAC_VARIANTS = re.compile(r"\\[dtc]frac(?![A-Za-z])")
_BINOM_VARIANTS = re.compile(r"\\[dt]binom(?![A-Za-z])")
_DEGREE = re.compile(
    r"\s*\\(?:text|mbox|textnormal|mathrm)\s*\{\s*degrees?\s*\}|(?<=\d)\s*degrees?\b"
    r"|\^\s*\{?\s*\\circ\s*\}?|\\degree(?![A-Za-z])|\^\s*\{\s*\\text\{\s*o\s*\}\s*\}|°|º"
)
_PERCENT = re.compile(r"\\%|\s*\b(?:percentage|percent|pct)\b|％")
_THOUSANDS_EXPLICIT = re.compile(r"(?<=\d)(?:\s*\{\s*,\s*\}\s*(?=\d)|,\\!\s*|\\,(?=\d{3}(?!\d))|\{,\}\s*)")
_SPACE_THOUSANDS = re.compile(r"-?\d{1,3}(?: \d{3})+(?:\.\d+)?")
_PMOD = re.compile(r"\\(?:pmod|mod)\s*\{[^{}]*\}|\\pmod\s*\d+")
_DOLLAR_ESCAPED = re.compile(r"\\\$")
_UNICODE_MINUS = str.maketrans({"−": "-", "–": "-", "—": "-", "×": r"\times ", "·": r"\cdot ", "÷": r"\div ",
                                "≤": r"\le ", "≥": r"\ge ", "≠": r"\ne ", "≈": r"\approx ", "∞": r"\infty ",
                                "π": r"\pi ", "√": r"\sqrt ", "±": r"\pm ", "∪": r"\cup ", "∩": r"\cap ",
                                "∈": r"\in ", "…": r"\ldots ", "⋯": r"\cdots ", "\u00a0": " ", "\u200b": ""})
_OUTER_DELIMS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
_TRAILING_JUNK = " \t\r\n\f\v.,;:?。，\\"  # not "!": 10! is a factorial


def sanitize(text: str) -> str:
    """Make any Python string safe to regex and print: lone surrogates and NULs are replaced."""
    if not isinstance(text, str):
        text = str(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text.replace("\x00", " ")


def collapse_double_escapes(text: str) -> str:
    """`\\\\frac` -> `\\frac` for known command names (JSON-escaped LaTeX pasted verbatim)."""
    return _DOUBLE_ESCAPED.sub(r"\\", text) if "\\\\" in text else text


def strip_outer_delimiters(s: str) -> str:
    """Remove math delimiters and surrounding whitespace/punctuation, repeatedly."""
    while True:
        before = s
        s = s.strip().rstrip(_TRAILING_JUNK).lstrip(" \t\r\n\f\v:")
        for left, right in _OUTER_DELIMS:
            if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
                s = s[len(left):len(s) - len(right)]
                break
        # unbalanced leftovers such as `12 $ and $13` inside a box
        if s.startswith("$") and s.count("$") % 2 == 1:
            s = s[1:]
        if s.endswith("$") and s.count("$") % 2 == 1:
            s = s[:-1]
        if s == before:
            return s


def unwrap_boxes(s: str) -> str:
    """Replace every `\\boxed{X}` / `\\fbox{X}` by `X` (brace-matched; unmatched boxes are left alone)."""
    out = []
    pos = 0
    for _ in range(10_000):
        m = _BOX_OPEN.search(s, pos)
        if not m:
            break
        depth = 1
        j = m.end()
        n = len(s)
        while j < n and depth:
            c = s[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            j += 1
        if depth:
            break
        out.append(s[pos:m.start()])
        out.append(unwrap_boxes(s[m.end():j - 1]) if _BOX_OPEN.search(s, m.end(), j - 1) else s[m.end():j - 1])
        pos = j
    out.append(s[pos:])
    return "".join(out)


def normalize_answer(answer: str) -> str:
    """The presentation-free form of one answer string (see the module docstring)."""
    s = sanitize(answer)
    s = collapse_double_escapes(s)
    s = s.translate(_UNICODE_MINUS)
    s = strip_outer_delimiters(s)
    if "box" in s:
        s = unwrap_boxes(s)
        s = strip_outer_delimiters(s)
    s = _FRAC_VARIANTS.sub(r"\\frac", s)
    s = _BINOM_VARIANTS.sub(r"\\binom", s)
    s = _SIZING.sub(lambda m: "" if m.group(1) in (None, ".") else m.group(1), s)
    s = _THOUSANDS_EXPLICIT.sub("", s)
    s = _SPACING.sub(" ", s)
    s = _PMOD.sub("", s)
    s = _DEGREE.sub("°", s)
    s = _PERCENT.sub("%", s)
    s = _DOLLAR_ESCAPED.sub("", s)
    if "$" in s:
        s = s.replace("$", " ")  # math delimiters left inside an answer ("12 $ and $ 13")
    s = strip_outer_delimiters(s)
    if _SPACE_THOUSANDS.fullmatch(s):
        s = s.replace(" ", "")
    return s.strip()


_WS = re.compile(r"\s+")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mbox|mathit|textsf|emph)\s*\{([^{}]*)\}")


def canonical_string(answer: str) -> str:
    """A comparison key for exact matching: normalised, text wrappers removed, no whitespace."""
    s = _TEXT_WRAPPER.sub(r"\1", normalize_answer(answer))
    s = _WS.sub("", s)
    return _strip_outer_groups(s) if s.startswith("{") else s


def _strip_outer_groups(s: str) -> str:
    """`{{x}}` -> `x`: peel brace pairs that enclose the whole string, in one linear pass."""
    match: dict[int, int] = {}
    stack: list[int] = []
    for i, c in enumerate(s):
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            match[stack.pop()] = i
    k = 0
    n = len(s)
    while 2 * k < n and match.get(k) == n - 1 - k:
        k += 1
    return s[k:n - k] if k else s
