"""The cheap verdicts `judge()` reaches inline, before any worker process is involved.

Same text after normalisation, two multiple-choice letters, or two plain numbers (integers,
decimals, `a/b`, `\\frac{a}{b}`, with thousands separators) are decided here with exact `Fraction`
arithmetic and the same decimal policy as `equivalence.py` (which calls this first, so both paths
agree). Everything here is linear-time string work: safe on any input.

Decimal policies (how a written decimal may stand for a value that is not a terminating decimal):
- "relative" (default): within a relative 1e-4, as the rule judgers of the recipes' originals
  (Qwen-style `math_equal`, `isclose(rel_tol=1e-4)`) and Math-Verify at its default precision judge;
  `2.6667 = 8/3`, `2.6668 = 8/3`, but `0.33 != 1/3`.
- "rounding" (lenient, an option): the value rounded or truncated to the written places, with at least
  two significant digits (`0.33 = 1/3`). As a training reward it pays a policy for dropping exact forms.
"""

from __future__ import annotations

import re
from fractions import Fraction

from oreal.reward.extract import choice_letter
from oreal.reward.latex_parser import MAX_CHARS
from oreal.reward.normalize import canonical_string, normalize_answer

_PLAIN_NUMBER = re.compile(r"(-)?(\d+(?:\.\d*)?|\.\d+)")
_PLAIN_FRACTION = re.compile(r"(-)?(?:(\d+)/(\d+)|\\frac\{(\d+)\}\{(\d+)\})")
_GROUPED = re.compile(r"-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")

DECIMAL_POLICIES = ("relative", "rounding")
DEFAULT_DECIMAL_POLICY = "relative"
RELATIVE_TOLERANCE = Fraction(1, 10**4)  # math.isclose(rel_tol=1e-4), as the seeds' `math_equal`


def check_decimal_policy(policy: str) -> str:
    if policy not in DECIMAL_POLICIES:
        raise ValueError(f"decimal_policy: {policy!r} is not one of {', '.join(DECIMAL_POLICIES)}")
    return policy


class QuickVerdict:
    """Duck-type twin of `equivalence.Verdict` (kept here so this module stays import-light)."""

    __slots__ = ("equal", "reason")

    def __init__(self, equal: bool, reason: str):
        self.equal = equal
        self.reason = reason

    def __repr__(self):
        return f"QuickVerdict({self.equal}, {self.reason!r})"


def quick_verdict(pred: str, gold: str, decimal_policy: str = DEFAULT_DECIMAL_POLICY):
    """A verdict when the answers are decidable without parsing, else None."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p or not g:
        return QuickVerdict(False, "empty")
    if canonical_string(p) == canonical_string(g):
        return QuickVerdict(True, "match")
    cp, cg = choice_letter(p), choice_letter(g)
    if cp and cg:
        return QuickVerdict(cp == cg, "match" if cp == cg else "different")
    if len(p) > MAX_CHARS or len(g) > MAX_CHARS:
        return QuickVerdict(False, "unparsed")  # the parser refuses these; only the exact match above counts
    np_, ng = plain_number(p), plain_number(g)
    if np_ is None or ng is None:
        return None
    equal = numbers_equal(np_, ng, decimal_policy)
    return QuickVerdict(equal, "equivalent" if equal else "different")


def plain_number(s: str):
    """(value, decimal places or None) for a plain number string, else None."""
    s = s.strip()
    if _GROUPED.fullmatch(s):
        s = s.replace(",", "")
    m = _PLAIN_NUMBER.fullmatch(s)
    if m:
        body = m.group(2)
        if len(body) > 4000:
            return None
        value = Fraction(body.rstrip(".") or "0")
        places = len(body.split(".", 1)[1]) if "." in body and not body.endswith(".") else None
        return (-value if m.group(1) else value), places
    m = _PLAIN_FRACTION.fullmatch(s)
    if m:
        a, b = (m.group(2), m.group(3)) if m.group(2) is not None else (m.group(4), m.group(5))
        if len(a) > 4000 or len(b) > 4000 or int(b) == 0:
            return None
        value = Fraction(int(a), int(b))
        return (-value if m.group(1) else value), None
    return None


def numbers_equal(x, y, decimal_policy: str = DEFAULT_DECIMAL_POLICY) -> bool:
    (vx, px), (vy, py) = x, y
    if vx == vy:
        return True
    if px is not None and py is None:
        return decimal_stands_for(vx, px, vy, decimal_policy)
    if py is not None and px is None:
        return decimal_stands_for(vy, py, vx, decimal_policy)
    return False


def decimal_stands_for(written: Fraction, places: int, value: Fraction,
                       decimal_policy: str = DEFAULT_DECIMAL_POLICY) -> bool:
    """Whether the written decimal stands for the rational `value` under `decimal_policy` (module docstring).
    Exact-rational twin of `equivalence._decimal_equal` for a rational `value`."""
    if is_terminating(value):
        return False
    if check_decimal_policy(decimal_policy) == "relative":
        return abs(written - value) <= RELATIVE_TOLERANCE * max(abs(written), abs(value))
    significant = len(str(abs(written.numerator * 10 ** places // written.denominator)).lstrip("0"))
    if significant < 2:
        return False
    unit = Fraction(1, 10 ** places)
    if abs(written - value) <= unit / 2:
        return True
    truncated = Fraction(int(value / unit)) * unit
    if truncated == written:
        return True
    return significant >= 15 and abs(written - value) <= abs(value) * Fraction(1, 10 ** 14)


def is_terminating(v: Fraction) -> bool:
    d = v.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1
