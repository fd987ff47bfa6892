"""Syntax tree -> sympy, for the questions numbers cannot answer: solving an inequality in one
variable (`1 <= |z| <= 3/2` is `[-3/2, -1] U [1, 3/2]`) and the symbolic last resort
(`simplify(a - b) == 0`, structural equality of sums with symbolic bounds).

Runs only in the judge's worker processes, under their hard timeout. Powers with large numeric
exponents are built unevaluated so that construction itself never computes a huge integer.
"""

from __future__ import annotations

from fractions import Fraction

import sympy

from oreal.reward.latex_parser import Node

_FUNCS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "sec": sympy.sec, "csc": sympy.csc, "cot": sympy.cot,
    "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan, "arcsec": sympy.asec, "arccsc": sympy.acsc,
    "arccot": sympy.acot, "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh, "coth": sympy.coth,
    "sech": sympy.sech, "csch": sympy.csch, "ln": sympy.log, "log": sympy.log, "exp": sympy.exp,
    "abs": sympy.Abs, "floor": sympy.floor, "ceil": sympy.ceiling, "sgn": sympy.sign,
}
_RELATIONS = {"<": sympy.Lt, "<=": sympy.Le, ">": sympy.Gt, ">=": sympy.Ge, "!=": sympy.Ne, "=": sympy.Eq}


class NotConvertible(ValueError):
    pass


def to_sympy(node: Node, symbols: dict | None = None):
    """The sympy expression for a scalar tree (real symbols). Raises NotConvertible."""
    symbols = {} if symbols is None else symbols
    return _Converter(symbols).cv(node)


class _Converter:
    def __init__(self, symbols):
        self.symbols = symbols

    def symbol(self, name):
        if name not in self.symbols:
            self.symbols[name] = sympy.Symbol(name, real=True)
        return self.symbols[name]

    def cv(self, n: Node):
        k, a = n.kind, n.args
        if k == "num":
            return sympy.Rational(a[0].numerator, a[0].denominator)
        if k == "sym":
            return self.symbol(a[0])
        if k == "const":
            return {"pi": sympy.pi, "E": sympy.E, "I": sympy.I, "oo": sympy.oo}[a[0]]
        if k == "add":
            return sympy.Add(*[self.cv(t) for t in a[0]])
        if k == "neg":
            return -self.cv(a[0])
        if k == "mul":
            return sympy.Mul(*[self.cv(f) for f in a[0]])
        if k == "div":
            return self.cv(a[0]) / self.cv(a[1])
        if k == "pow":
            base, exp = self.cv(a[0]), self.cv(a[1])
            big = exp.is_Number and abs(exp) > 1000
            return sympy.Pow(base, exp, evaluate=not big)
        if k == "root":
            index = self.cv(a[1])
            return sympy.root(self.cv(a[0]), index) if index != 2 else sympy.sqrt(self.cv(a[0]))
        if k == "func" and a[0] in _FUNCS:
            return _FUNCS[a[0]](self.cv(a[1]))
        if k == "func" and a[0] == "sqrt":
            return sympy.sqrt(self.cv(a[1]))
        if k == "abs":
            return sympy.Abs(self.cv(a[0]))
        if k == "floor":
            return sympy.floor(self.cv(a[0]))
        if k == "ceil":
            return sympy.ceiling(self.cv(a[0]))
        if k == "fact":
            x = self.cv(a[0])
            if x.is_Number and abs(x) > 5000:
                return sympy.factorial(x, evaluate=False)
            return sympy.factorial(x)
        if k == "binom":
            return sympy.binomial(self.cv(a[0]), self.cv(a[1]))
        if k == "percent":
            return self.cv(a[0]) / 100
        if k == "degree":
            return self.cv(a[0]) * sympy.pi / 180
        if k == "call" and len(a[1]) == 1:
            return self.symbol(a[0]) * self.cv(a[1][0])
        if k in ("sum", "prod"):
            body, var, lo, hi = a
            fn = sympy.Sum if k == "sum" else sympy.Product
            return fn(self.cv(body), (self.symbol(var), self.cv(lo), self.cv(hi)))
        if k == "basenum":
            try:
                return sympy.Integer(int(a[0], a[1]))
            except ValueError:
                raise NotConvertible("bad digits") from None
        if k == "sympy":
            return a[0]
        raise NotConvertible(k)


def free_symbol_names(node: Node) -> set[str]:
    names = set()
    bound = set()
    for n in node.walk():
        if n.kind == "sym":
            names.add(n.args[0])
        elif n.kind == "call":
            names.add(n.args[0])
        elif n.kind in ("sum", "prod"):
            bound.add(n.args[1])
    return names - bound


def solve_real_set(rel: Node):
    """The solution set of an inequality chain in one variable, as a sympy Set, or None."""
    items, ops = rel.args
    names = set()
    for item in items:
        names |= free_symbol_names(item)
    if len(names) != 1:
        return None
    symbols: dict = {}
    try:
        exprs = [to_sympy(item, symbols) for item in items]
    except NotConvertible:
        return None
    var = symbols[next(iter(names))]
    result = sympy.S.Reals
    for (left, right), op in zip(zip(exprs, exprs[1:]), ops):
        if op not in _RELATIONS:
            return None
        condition = _RELATIONS[op](left, right)
        if condition is sympy.true:
            continue
        if condition is sympy.false:
            return sympy.S.EmptySet
        part = sympy.solveset(condition, var, domain=sympy.S.Reals)
        result = sympy.Intersection(result, part)
    return result


def real_set_intervals(s):
    """A sympy set as (lo, hi, lo_closed, hi_closed) tuples of sympy numbers, or None if not a finite
    union of intervals and points."""
    if s is sympy.S.EmptySet:
        return []
    parts = s.args if isinstance(s, sympy.Union) else (s,)
    out = []
    for p in parts:
        if isinstance(p, sympy.Interval):
            out.append((p.start, p.end, not p.left_open, not p.right_open))
        elif isinstance(p, sympy.FiniteSet):
            for x in p.args:
                out.append((x, x, True, True))
        elif p == sympy.S.Reals:
            out.append((-sympy.oo, sympy.oo, False, False))
        elif isinstance(p, sympy.Complement) and p.args[0] == sympy.S.Reals and isinstance(p.args[1], sympy.FiniteSet):
            points = sorted(p.args[1].args, key=lambda v: float(v))
            edges = [-sympy.oo] + list(points) + [sympy.oo]
            out.extend((lo, hi, False, False) for lo, hi in zip(edges, edges[1:]))
        else:
            return None
    return out


def symbolic_equal(a: Node, b: Node) -> bool:
    """Last resort for scalars numbers could not decide: identical sympy trees, or simplify(a-b) == 0."""
    symbols: dict = {}
    try:
        x, y = to_sympy(a, symbols), to_sympy(b, symbols)
    except (NotConvertible, TypeError, ValueError, ZeroDivisionError):
        return False
    if x == y:
        return True
    try:
        return sympy.simplify(x - y) == 0
    except Exception:  # sympy raises a zoo of exception types on odd input
        return False


def as_fraction(value) -> Fraction | None:
    if isinstance(value, sympy.Rational):
        return Fraction(int(value.p), int(value.q))
    return None
