"""Are two final answers the same mathematics? `is_equivalent(pred, gold)`.

Both answers are normalised (`normalize.py`), compared as strings, then parsed (`latex_parser.py`) and
compared by meaning. This function has no time limit of its own (its parts are bounded by the guards
in `latex_parser` and `evaluate`); `judge()` runs it in a killable worker under a hard timeout.

Policy, one line per choice:

- Numbers are exact rationals while possible: `27.0 = 27`, `025 = 25`, `0.5 = 1/2 = \\frac12`,
  `918\\frac{1}{2} = 918.5` (mixed number), `1,450,000 = 1450000`, `2.5e3 = 2500`. Two exact values are
  equal only when identical, so tiny distinct values never collapse (`1/2^{99} != 1/2^{98}`,
  `1/100! != 1/101!`). Irrational values (radicals, pi, e, logs, trig) are compared at 60 significant
  digits and must agree to 30.
- A written decimal against a value that is not a terminating decimal (`1/3`, `\\sqrt 2`, `\\pi`) matches
  when it lies within a relative 1e-4 of it, the rule of the recipes' original judgers (Qwen-style
  `math_equal`, `isclose(rel_tol=1e-4)`): `2.6667 = 8/3`, `1.4142 = \\sqrt 2`, but `0.33 != 1/3` and
  `3.14 != \\pi` (a coarse rounding of an exact answer is wrong). Against a terminating value a decimal
  must be exact (`5.001 != 5`). Option `decimal_policy="rounding"` (lenient, the policy before issue 18):
  the value rounded or truncated to the written places, with two significant digits (`0.33 = 1/3`,
  `0.3 != 1/3`); as a training reward it pays a policy for dropping exact forms.
- Percent: `28\\% = 28` and `28\\% = 0.28` (the sign is dropped or applied); degrees: `90^\\circ = 90`
  and `90^\\circ = \\pi/2`. Units and other words after a value are dropped (`125 miles`, `15 cm^2`,
  `\\$10`). `\\text{...}` around a number or one letter is that number or letter.
- Expressions with variables are equal when they agree at random points (variables positive reals,
  names bounding a sum get integers), so `\\sqrt{1/n} = 1/\\sqrt{n}`; sympy `simplify` is the fallback.
- `x = 5` (a name on the left: a letter, `f(x)`, `|AB|`, `A:B`, `(p, q)`) is the value `5`; a chain
  `x = 2+3 = 5` is its last value; `a + 3z = 0` is an equation, equal to another equation when the
  two differ by a non-zero factor (`2x+4y-3=0` = `y = -x/2 + 3/4`). `\\approx` parts are dropped.
- Ordered: `(a, b)` tuples (and a bare list against a tuple). Unordered: bare lists (`1, 2`),
  `\\{...\\}` sets, roots written with `\\pm`, several boxed answers; duplicates do not count.
  Lists of assignments compare name by name when both sides name the same names.
- Intervals: brackets decide open/closed; `(a, b)` against an interval, union or inequality is an
  interval; an inequality in one variable is its solution set (`-x > -1` = `x < 1`,
  `1 \\le |z| \\le 3/2` = `[-3/2,-1] \\cup [1,3/2]`, `x \\in [-2, 7]` = `-2 \\le x \\le 7`).
- Matrices: same shape, equal entries; matrix sums and products are evaluated; a column or row vector
  equals the tuple of its entries.
- `i` is the imaginary unit, `e` is Euler's number. Multiple-choice letters compare as letters
  (`(C)`, `\\text{C}`, `C Cecile`). Other text compares case-insensitively, ignoring spaces.
- Times `12:00` compare as text; ratios `a:b` compare up to a common factor.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from fractions import Fraction
from itertools import product

import mpmath

from oreal.reward.numeric_value import (WORK_DPS, ZERO_TOL, Matrix, NotNumeric, TooLarge, Undefined, decimal_matches,
                                        evaluate, is_exact, to_mp, values_equal)
from oreal.reward.extract import choice_letter
from oreal.reward.latex_parser import Node, ParseError, num, parse
from oreal.reward.fastpath import (DEFAULT_DECIMAL_POLICY, RELATIVE_TOLERANCE, check_decimal_policy, is_terminating,
                                   quick_verdict)
from oreal.reward.normalize import normalize_answer

MAX_ITEMS = 64
MAX_PM_EXPANSIONS = 16
POINTS = 3
MAX_POINT_TRIES = 8

EQUAL_REASONS = ("match", "equivalent")


@dataclass(frozen=True)
class Verdict:
    """`equal`, and why: match (same text), equivalent, different, unparsed, empty."""

    equal: bool
    reason: str


def is_equivalent(pred, gold, *, decimal_policy: str = DEFAULT_DECIMAL_POLICY) -> bool:
    """True when the two answer strings state the same mathematics (see the module docstring)."""
    return compare(pred, gold, decimal_policy=decimal_policy).equal


def compare(pred, gold, *, decimal_policy: str = DEFAULT_DECIMAL_POLICY) -> Verdict:
    """`is_equivalent` with the reason. Never raises on any input but an unknown `decimal_policy`."""
    check_decimal_policy(decimal_policy)
    if not isinstance(pred, str) or not isinstance(gold, str):
        return Verdict(False, "empty")
    try:
        quick = quick_verdict(pred, gold, decimal_policy)
        if quick is not None:
            return Verdict(quick.equal, quick.reason)
        p, g = normalize_answer(pred), normalize_answer(gold)
        letter = _choice_verdict(p, g)
        if letter is not None:
            return letter
        try:
            a, b = parse(p), parse(g)
        except (ParseError, RecursionError, ValueError, OverflowError, ZeroDivisionError):
            return Verdict(False, "unparsed")
        with mpmath.workdps(WORK_DPS):
            equal = _Comparer(decimal_policy).equal(a, b)
        return Verdict(equal, "equivalent" if equal else "different")
    except (RecursionError, MemoryError, ArithmeticError, NotNumeric, ValueError, TypeError):
        return Verdict(False, "different")


# ------------------------------------------------------------------------------------------------
# multiple choice

_LEADING_CHOICE = re.compile(r"^\(?([A-J])\)?(?:[\s.:)\-]+[^\W\d_][^\d=+*/^\\]*)?$")
_CUE_CHOICE = re.compile(r"answer\s*(?:is|:)\s*\(?([A-J])\)?(?![A-Za-z])", re.IGNORECASE)


def _choice_verdict(p: str, g: str):
    cp, cg = choice_letter(p), choice_letter(g)
    if cp and cg:
        return Verdict(cp == cg, "match" if cp == cg else "different")
    if not (cp or cg):
        return None
    letter, other = (cp, g) if cp else (cg, p)
    other = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", other).strip()
    m = _CUE_CHOICE.search(other) or _LEADING_CHOICE.match(other)
    if m:
        same = m.group(1) == letter
        return Verdict(same, "equivalent" if same else "different")
    return None


# ------------------------------------------------------------------------------------------------
# meaning of one answer


def _free_names(node: Node) -> set[str]:
    names, bound = set(), set()
    for n in node.walk():
        if n.kind in ("sym", "call"):
            names.add(n.args[0])
        elif n.kind in ("sum", "prod"):
            bound.add(n.args[1])
    return names - bound


def _bound_names(node: Node) -> set[str]:
    """Names used in the bounds of a sum or product: they get integer values at random points."""
    out = set()
    for n in node.walk():
        if n.kind in ("sum", "prod"):
            out |= _free_names(n.args[2]) | _free_names(n.args[3])
    return out


def _has_numeral(node: Node) -> bool:
    return any(n.kind in ("num", "const") for n in node.walk())


def _name_like(n: Node) -> bool:
    """A left-hand side that names a value: `x`, `x_1`, `f(x)`, `AB`, `|AB|`, `A:B`, `NO/BO`, `(p, q)`."""
    k = n.kind
    if k in ("sym", "call"):
        return True
    if k == "mul":
        return all(f.kind == "sym" for f in n.args[0])
    if k == "abs":
        return _name_like(n.args[0])
    if k in ("ratio",):
        return all(_name_like(x) for x in n.args[0])
    if k == "div":
        return _name_like(n.args[0]) and _name_like(n.args[1])
    if k == "tuple":
        return all(_name_like(x) for x in n.args[0])
    return False


def _key(n: Node) -> str:
    if n.kind == "sym":
        return n.args[0]
    return repr(n)


def meaning(n: Node) -> Node:
    """Unwrap presentation: one-item lists, value assignments, approximations, implications."""
    if n.kind == "list" and len(n.args[0]) == 1:
        return meaning(n.args[0][0])
    if n.kind != "rel":
        return n
    items, ops = list(n.args[0]), list(n.args[1])
    if "=>" in ops:
        last = len(ops) - 1 - ops[::-1].index("=>")
        items, ops = items[last + 1:], ops[last + 1:]
        if not ops:
            return meaning(items[0])
    if "~=" in ops:
        exact = [op for op in ops if op != "~="]
        if exact:
            cut = ops.index("~=")
            if cut == 0:
                items, ops = items[1:], ops[1:]
            else:
                items, ops = items[:cut + 1], ops[:cut]
        elif _name_like(items[0]):
            return Node("assign", _key(items[0]), meaning(items[-1]))
        else:
            return meaning(items[0])
        if not ops:
            return meaning(items[0])
    if all(op == "=" for op in ops):
        lhs, rhs = items[0], items[-1]
        if _name_like(lhs):
            return Node("assign", _key(lhs), meaning(rhs), Node("rel", (lhs, rhs), ("=",)))
        if len(items) >= 3:
            return meaning(rhs)
        if not _free_names(lhs) and not _free_names(rhs):
            return meaning(rhs)
        return Node("rel", (lhs, rhs), ("=",))
    if ops == ["in"] and _name_like(items[0]):
        return Node("assign", _key(items[0]), meaning(items[1]))
    return Node("rel", tuple(items), tuple(ops))


def expand_pm(n: Node) -> list[Node]:
    """All sign choices of `±`/`∓` in `n` (at most MAX_PM_EXPANSIONS)."""
    if not any(x.kind == "pm" for x in n.walk()):
        return [n]
    if n.kind == "pm":
        a, b, sign = n.args
        firsts = expand_pm(a) if a is not None else [None]
        out = []
        for first in firsts:
            for second in expand_pm(b):
                plus, minus = (second, Node("neg", second))
                for s in ((plus, minus) if sign == "+-" else (minus, plus)):
                    out.append(s if first is None else Node("add", (first, s)))
        return out[:MAX_PM_EXPANSIONS]
    options = []
    for arg in n.args:
        if isinstance(arg, Node):
            options.append(expand_pm(arg))
        elif isinstance(arg, tuple) and all(isinstance(x, Node) for x in arg):
            combos = list(product(*[expand_pm(x) for x in arg])) if arg else [()]
            options.append([tuple(c) for c in combos[:MAX_PM_EXPANSIONS]])
        else:
            options.append([arg])
    return [Node(n.kind, *combo) for combo in list(product(*options))[:MAX_PM_EXPANSIONS]]


def _decimal_places(n: Node):
    """(value, places) when `n` is a written decimal literal (optionally negated), else None."""
    sign = 1
    if n.kind == "neg":
        n, sign = n.args[0], -1
    if n.kind == "num" and n.args[1] is not None:
        return sign * n.args[0], n.args[1]
    return None


def _is_infinite(n: Node) -> bool:
    if n.kind == "neg":
        n = n.args[0]
    return n.kind == "const" and n.args[0] == "oo"


def _text_key(n: Node) -> str:
    return re.sub(r"[\s\W_]+", "", n.args[0]).lower()


_INEQUALITIES = {"<", "<=", ">", ">=", "!="}


def _is_setlike(n: Node) -> bool:
    if n.kind in ("setop", "empty"):
        return True
    if n.kind == "rel":
        return any(op in _INEQUALITIES for op in n.args[1])
    if n.kind == "tuple" and len(n.args[0]) == 2:
        if (n.args[1], n.args[2]) in (("[", ")"), ("(", "]")):
            return True
        return any(_is_infinite(x) for x in n.args[0])
    if n.kind == "list":  # `x < 1 or x > 2`
        return all(meaning(x).kind == "rel" and _is_setlike(meaning(x)) for x in n.args[0])
    return False


# ------------------------------------------------------------------------------------------------
# comparison


class _Comparer:
    def __init__(self, decimal_policy: str = DEFAULT_DECIMAL_POLICY):
        self.rng = random.Random(0x0EA1)
        self.decimal_policy = decimal_policy

    def equal(self, a: Node, b: Node) -> bool:
        a, b = meaning(a), meaning(b)
        if a.kind == "assign" and b.kind == "assign":
            return self.equal(a.args[1], b.args[1])
        for x, y in ((a, b), (b, a)):  # `y = -x/2 + 3/4` against the equation `2x + 4y - 3 = 0`
            if x.kind == "assign" and len(x.args) > 2 and y.kind == "rel" and y.args[1] == ("=",):
                return self.relations_equal(x.args[2], y)
        if a.kind == "assign":
            return self.equal(a.args[1], b)
        if b.kind == "assign":
            return self.equal(a, b.args[1])
        ka, kb = a.kind, b.kind
        if ka == "text" or kb == "text":
            return ka == kb and _text_key(a) == _text_key(b)
        if ka in ("time", "ratio") or kb in ("time", "ratio"):
            return self.ratios_equal(a, b)
        if ka == "matrix" or kb == "matrix":
            return self.matrices_equal(a, b)
        if _is_setlike(a) or _is_setlike(b):
            ra, rb = self.real_set(a), self.real_set(b)
            if ra is not None and rb is not None:
                return self.real_sets_equal(ra, rb)
        if ka == "rel" and kb == "rel":
            return self.relations_equal(a, b)
        if ka == "rel" or kb == "rel":
            return False
        if self._is_collection(a) or self._is_collection(b):
            return self.collections_equal(a, b)
        return self.scalars_equal(a, b)

    # -- collections
    @staticmethod
    def _is_collection(n: Node) -> bool:
        return n.kind in ("list", "tuple", "set", "ellipsis") or any(x.kind == "pm" for x in n.walk())

    def _items(self, n: Node):
        """(items, mode, brackets): mode is ordered (tuples), unordered (sets, ±), or bare (plain lists)."""
        if n.kind == "list":
            mode = "ordered" if n.args[1] == "group" else "bare"
            items = [meaning(x) for x in n.args[0]]
            if mode == "bare":
                items = _records(self._flatten_pm(items))
            return items, mode, None
        if n.kind == "tuple":
            return [meaning(x) for x in n.args[0]], "ordered", (n.args[1], n.args[2])
        if n.kind == "set":
            return self._flatten_pm([meaning(x) for x in n.args[0]]), "unordered", None
        expanded = expand_pm(n)
        return expanded, ("unordered" if len(expanded) > 1 else "bare"), None

    @staticmethod
    def _flatten_pm(items):
        out = []
        for x in items:
            out.extend(expand_pm(x) if x.kind != "assign" else [x])
        return out

    def collections_equal(self, a: Node, b: Node) -> bool:
        ia, ma, ba = self._items(a)
        ib, mb, bb = self._items(b)
        if len(ia) > MAX_ITEMS or len(ib) > MAX_ITEMS:
            return False
        if ma == "ordered" and mb == "ordered":
            if ba and bb and ba != bb:
                return False
            return len(ia) == len(ib) and all(self.equal(x, y) for x, y in zip(ia, ib))
        if (ma, mb) in (("ordered", "bare"), ("bare", "ordered")):
            if len(ia) == len(ib) and len(ia) > 1:
                return all(self.equal(x, y) for x, y in zip(ia, ib))
            if len(ia) == 1 or len(ib) == 1:
                return len(ia) == len(ib) and self.equal(ia[0], ib[0])
            return False
        if all(x.kind == "assign" for x in ia) and all(y.kind == "assign" for y in ib):
            names_a = {x.args[0] for x in ia}
            if names_a == {y.args[0] for y in ib}:
                return all(self._same_set([x.args[1] for x in ia if x.args[0] == k],
                                          [y.args[1] for y in ib if y.args[0] == k]) for k in names_a)
        return self._same_set(ia, ib)

    def _same_set(self, ia, ib) -> bool:
        if any(x.kind == "ellipsis" for x in ia) != any(y.kind == "ellipsis" for y in ib):
            return False
        return (all(any(self._item_equal(x, y) for y in ib) for x in ia)
                and all(any(self._item_equal(x, y) for x in ia) for y in ib))

    def _item_equal(self, x, y) -> bool:
        if x.kind == "ellipsis" or y.kind == "ellipsis":
            return x.kind == y.kind
        return self.equal(x, y)

    # -- matrices
    def matrices_equal(self, a: Node, b: Node) -> bool:
        if a.kind == "matrix" and b.kind == "matrix":
            ra, rb = a.args[0], b.args[0]
            if len(ra) != len(rb) or any(len(x) != len(y) for x, y in zip(ra, rb)):
                return False
            return all(self.equal(x, y) for rx, ry in zip(ra, rb) for x, y in zip(rx, ry))
        m, other = (a, b) if a.kind == "matrix" else (b, a)
        if other.kind in ("tuple", "list"):
            cells = [c for row in m.args[0] for c in row]
            rows, cols = len(m.args[0]), len(m.args[0][0])
            items = other.args[0]
            if (rows == 1 or cols == 1) and len(items) == len(cells):
                return all(self.equal(x, y) for x, y in zip(cells, items))
            return False
        try:
            va, vb = evaluate(a), evaluate(b)
        except (NotNumeric, Undefined, TooLarge):
            return False
        return values_equal(va, vb)

    # -- ratios and times
    def ratios_equal(self, a: Node, b: Node) -> bool:
        if a.kind == "time" and b.kind == "time":
            return a.args[0] == b.args[0]
        a, b = _as_ratio(a), _as_ratio(b)
        if a.kind != "ratio" or b.kind != "ratio":
            r, s = (a, b) if a.kind == "ratio" else (b, a)
            return len(r.args[0]) == 2 and s.kind != "ratio" and self.scalars_equal(Node("div", *r.args[0]), s)
        xa, xb = a.args[0], b.args[0]
        if len(xa) != len(xb):
            return False
        if [x.kind == "ellipsis" for x in xa] != [y.kind == "ellipsis" for y in xb]:
            return False
        pairs = [(x, y) for x, y in zip(xa, xb) if x.kind != "ellipsis"]
        x0, y0 = pairs[0]
        return all(self.scalars_equal(Node("mul", (x, y0)), Node("mul", (y, x0))) for x, y in pairs[1:])

    # -- intervals and inequalities
    def real_set(self, n: Node):
        """(lo, hi, lo_closed, hi_closed) intervals of a real set, or None when `n` is not one."""
        k = n.kind
        if k == "tuple" and len(n.args[0]) == 2:
            lo, hi = n.args[0]
            return [(lo, hi, n.args[1] == "[", n.args[2] == "]")]
        if k == "empty":
            return []
        if k == "set" and len(n.args[0]) <= MAX_ITEMS:
            return [(x, x, True, True) for x in n.args[0]]
        if k == "setop" and n.args[0] == "cup":
            left, right = self.real_set(meaning(n.args[1])), self.real_set(meaning(n.args[2]))
            if left is None or right is None:
                return None
            return left + right
        if k == "rel" and all(op in _INEQUALITIES for op in n.args[1]):
            return self._solve(n)
        if k == "list" and _is_setlike(n) and len({frozenset(_free_names(x)) for x in n.args[0]}) == 1:
            parts = []
            for item in n.args[0]:
                part = self.real_set(meaning(item))
                if part is None:
                    return None
                parts.extend(part)
            return parts
        return None

    def _solve(self, rel: Node):
        items, ops = rel.args
        with_names = [i for i, x in enumerate(items) if _free_names(x)]
        if len(with_names) == 1 and items[with_names[0]].kind in ("sym", "call"):
            s = with_names[0]
            if "!=" in ops:
                if len(items) != 2:
                    return None
                c = items[1 - s]
                return [(Node("neg", Node("const", "oo")), c, False, False), (c, Node("const", "oo"), False, False)]
            lo, hi, lo_closed, hi_closed = Node("neg", Node("const", "oo")), Node("const", "oo"), False, False
            for i, op in enumerate(ops):
                left, right = items[i], items[i + 1]
                if i == s:  # x op right
                    bound, upper = right, op in ("<", "<=")
                elif i + 1 == s:  # left op x
                    bound, upper = left, op in (">", ">=")
                else:
                    continue
                closed = op in ("<=", ">=")
                if upper:
                    hi, hi_closed = bound, closed
                else:
                    lo, lo_closed = bound, closed
            return [(lo, hi, lo_closed, hi_closed)]
        from oreal.reward import sympy_bridge

        try:
            solved = sympy_bridge.solve_real_set(rel)
        except Exception:  # sympy's solvers raise many exception types on odd input
            return None
        if solved is None:
            return None
        parts = sympy_bridge.real_set_intervals(solved)
        if parts is None:
            return None
        return [(Node("sympy", lo), Node("sympy", hi), lc, hc) for lo, hi, lc, hc in parts]

    def real_sets_equal(self, ra, rb) -> bool:
        ra, rb = self._sorted_merged(ra), self._sorted_merged(rb)
        if ra is None or rb is None or len(ra) != len(rb):
            return False
        for (lo1, hi1, lc1, hc1), (lo2, hi2, lc2, hc2) in zip(ra, rb):
            if not (self.scalars_equal(lo1, lo2) and self.scalars_equal(hi1, hi2)):
                return False
            if not _is_infinite(lo1) and lc1 != lc2:
                return False
            if not _is_infinite(hi1) and hc1 != hc2:
                return False
        return True

    def _sorted_merged(self, parts):
        keyed = []
        for part in parts:
            try:
                lo = to_mp(evaluate(part[0]))
                hi = to_mp(evaluate(part[1]))
                lo = lo.real if isinstance(lo, mpmath.mpc) else lo
                hi = hi.real if isinstance(hi, mpmath.mpc) else hi
            except (NotNumeric, Undefined, TooLarge):
                return list(parts)
            keyed.append((lo, hi, part))
        keyed.sort(key=lambda t: (t[0], t[1]))
        merged: list = []
        for lo, hi, part in keyed:
            if merged:
                plo, phi, prev = merged[-1]
                if phi == lo and (prev[3] or part[2]) or phi > lo:
                    if hi >= phi:
                        merged[-1] = (plo, hi, (prev[0], part[1], prev[2], part[3] if hi > phi else prev[3] or part[3]))
                    continue
            merged.append((lo, hi, part))
        return [m[2] for m in merged]

    # -- relations
    def relations_equal(self, a: Node, b: Node) -> bool:
        (ia, oa), (ib, ob) = a.args, b.args
        if len(ia) == 2 and len(ib) == 2:
            fa, sa = _canonical_relation(ia, oa[0])
            fb, sb = _canonical_relation(ib, ob[0])
            if sa != sb:
                return False
            return self.proportional(fa, fb, positive=sa != "=")
        if oa != ob or len(ia) != len(ib):
            return False
        return all(self.scalars_equal(x, y) for x, y in zip(ia, ib))

    def proportional(self, fa: Node, fb: Node, positive: bool) -> bool:
        names = _free_names(fa) | _free_names(fb)
        if not names:
            return False
        ratios = []
        for env in self._points(names, _bound_names(fa) | _bound_names(fb)):
            try:
                va, vb = evaluate(fa, env), evaluate(fb, env)
            except Undefined:
                continue
            except (NotNumeric, TooLarge):
                return False
            za, zb = values_equal(va, Fraction(0)), values_equal(vb, Fraction(0))
            if za and zb:
                continue
            if za or zb:
                return False
            ratios.append(to_mp(va) / to_mp(vb))
            if len(ratios) >= POINTS:
                break
        if len(ratios) < 2 or not all(values_equal(r, ratios[0]) for r in ratios[1:]):
            return False
        r0 = ratios[0]
        if positive:
            return not isinstance(r0, mpmath.mpc) and r0 > 0
        return True

    # -- scalars
    def scalars_equal(self, a: Node, b: Node) -> bool:
        ka, kb = a.kind, b.kind
        for mark in ("percent", "degree"):
            if ka == mark and kb == mark:
                return self.scalars_equal(a.args[0], b.args[0])
            if ka == mark or kb == mark:
                marked, other = (a, b) if ka == mark else (b, a)
                inner = marked.args[0]
                if self.scalars_equal(inner, other):
                    return True
                return self.scalars_equal(_apply_mark(mark, inner), other)
        if ka == "basenum" or kb == "basenum":
            if ka == "basenum" and kb == "basenum":
                return a.args == b.args or self._constants_equal(a, b)
            based, other = (a, b) if ka == "basenum" else (b, a)
            if other.kind == "num" and other.args[2] == based.args[0]:
                return True
            return self._constants_equal(based, other)
        if ka == "sympy" or kb == "sympy":
            return self._constants_equal(a, b)
        names = _free_names(a) | _free_names(b)
        if not names:
            return self._constants_equal(a, b)
        return self._identity(a, b, names)

    def _constants_equal(self, a: Node, b: Node) -> bool:
        try:
            va, vb = evaluate(a), evaluate(b)
        except TooLarge:
            return a == b
        except (NotNumeric, Undefined):
            return False
        da, db = _decimal_places(a), _decimal_places(b)
        if da is not None and db is None:
            return _decimal_equal(da, vb, self.decimal_policy)
        if db is not None and da is None:
            return _decimal_equal(db, va, self.decimal_policy)
        return values_equal(va, vb)

    def _identity(self, a: Node, b: Node, names) -> bool:
        agreed = 0
        for env in self._points(names, _bound_names(a) | _bound_names(b)):
            try:
                va, vb = evaluate(a, env), evaluate(b, env)
            except Undefined:
                continue
            except TooLarge:
                return a == b
            except NotNumeric:
                break
            if not values_equal(va, vb):
                return False
            agreed += 1
            if agreed >= POINTS:
                return True
        if agreed >= 2:
            return True
        from oreal.reward.sympy_bridge import symbolic_equal

        return symbolic_equal(a, b)

    def _points(self, names, integer_names):
        """MAX_POINT_TRIES random assignments: positive reals in (0.5, 2.5), integers 3..9 for sum bounds."""
        names = sorted(names)
        for _ in range(MAX_POINT_TRIES):
            env = {}
            for name in names:
                if name in integer_names:
                    env[name] = Fraction(self.rng.randint(3, 9))
                else:
                    env[name] = mpmath.mpf(self.rng.randrange(10 ** 40)) / 10 ** 40 * 2 + mpmath.mpf("0.5")
            yield env


def _records(items: list[Node]) -> list[Node]:
    """`p=5, q=2 and p=7, q=2` -> two records (p, q): assignments whose names repeat in blocks."""
    if len(items) < 4 or not all(x.kind == "assign" for x in items):
        return items
    names = [x.args[0] for x in items]
    for size in range(2, len(items) // 2 + 1):
        block = names[:size]
        if len(set(block)) == size and len(items) % size == 0 and names == block * (len(items) // size):
            return [Node("list", tuple(items[i:i + size]), "group") for i in range(0, len(items), size)]
    return items


def _apply_mark(mark: str, inner: Node) -> Node:
    if mark == "percent":
        dec = _decimal_places(inner)
        if dec is not None:
            value, places = dec
            return Node("num", value / 100, places + 2, "")
        return Node("div", inner, num(100))
    return Node("mul", (inner, Node("div", Node("const", "pi"), num(180))))


def _as_ratio(n: Node) -> Node:
    if n.kind == "time":
        parts = n.args[0].split(":")
        return Node("ratio", tuple(num(int(p)) for p in parts))
    return n


def _canonical_relation(items, op):
    """(f, kind) with the relation read as `f kind 0`, kind in {=, <, <=, !=}."""
    left, right = items
    if op in (">", ">="):
        left, right, op = right, left, {">": "<", ">=": "<="}[op]
    return Node("add", (left, Node("neg", right))), op


def _decimal_equal(decimal, value, decimal_policy: str) -> bool:
    written, places = decimal
    if values_equal(written, value):
        return True
    if is_exact(value) and is_terminating(value):
        return False
    if isinstance(value, Matrix):
        return False
    if decimal_policy == "rounding":
        return decimal_matches(written, places, value)
    return _within_relative(written, value)


def _within_relative(written: Fraction, value) -> bool:
    """`isclose(written, value, rel_tol=1e-4)` for a real value (a complex one must be real within ZERO_TOL)."""
    v = to_mp(value)
    if isinstance(v, mpmath.mpc):
        if abs(v.imag) > ZERO_TOL:
            return False
        v = v.real
    d = to_mp(written)
    return abs(d - v) <= to_mp(RELATIVE_TOLERANCE) * max(abs(d), abs(v))
