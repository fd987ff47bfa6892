"""Numbers from syntax trees: exact rationals for as long as possible, mpmath beyond that.

Exact arithmetic (Python `Fraction`) is what keeps tiny distinct values distinct: `1/2^99` and
`1/2^98`, or `1/100!` and `1/101!`, are compared as exact rationals, never as floats. An operation
that leaves the rationals (a root that is not a perfect power, pi, trig, logs) switches to mpmath at
`WORK_DPS` significant digits, and two inexact values are equal when they agree to `REL_TOL` relative
to their size.

Guards, so that no input makes this module hang or exhaust memory: an exact rational that would
pass `MAX_EXACT_BITS` (or a factorial past `MAX_EXACT_FACTORIAL`) is `TooLarge` rather than rounded,
because rounding would make distinct values such as 10^(10^10) and 10^(10^10)+1 equal; an inexact
value whose binary exponent passes `MAX_LOG2` is `TooLarge` too. The caller compares `TooLarge`
values structurally. Sums and products have at most `MAX_TERMS` terms, and one evaluation visits
at most `MAX_STEPS` nodes.
"""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath

from oreal.reward.latex_parser import Node

WORK_DPS = 60
REL_TOL = mpmath.mpf(10) ** -30
ZERO_TOL = mpmath.mpf(10) ** -45
MAX_EXACT_BITS = 400_000
MAX_EXACT_FACTORIAL = 25_000
MAX_LOG2 = 10 ** 12
MAX_TERMS = 10_000
MAX_STEPS = 200_000


class NotNumeric(Exception):
    """The tree is not a number here (text, a tuple, a relation, a free name...)."""


class Undefined(ArithmeticError):
    """The value does not exist at this point (division by zero, log of zero...)."""


class TooLarge(ArithmeticError):
    """The value is too large (or too deep) to compare numerically."""


class Matrix:
    __slots__ = ("rows",)

    def __init__(self, rows):
        self.rows = tuple(tuple(r) for r in rows)

    @property
    def shape(self):
        return len(self.rows), len(self.rows[0]) if self.rows else 0


def is_exact(v) -> bool:
    return isinstance(v, Fraction)


def to_mp(v):
    if isinstance(v, Fraction):
        if v.denominator == 1:
            return mpmath.mpf(v.numerator)
        return mpmath.mpf(v.numerator) / v.denominator
    return v


def evaluate(node: Node, env: dict | None = None):
    """The value of `node` with free names bound by `env` (name -> value). Run it under
    `mpmath.workdps(WORK_DPS)`. Raises NotNumeric, Undefined or TooLarge."""
    return _Evaluator(env or {}).ev(node)


class _Evaluator:
    def __init__(self, env):
        self.env = env
        self.steps = 0

    def ev(self, n: Node):
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TooLarge("too many steps")
        method = getattr(self, "_" + n.kind, None)
        if method is None:
            raise NotNumeric(n.kind)
        return method(*n.args)

    # leaves
    def _num(self, value, decimals, text):
        return value

    def _sym(self, name):
        if name in self.env:
            return self.env[name]
        raise NotNumeric(f"free name {name}")

    def _const(self, name):
        if name == "pi":
            return +mpmath.pi
        if name == "E":
            return +mpmath.e
        if name == "I":
            return mpmath.mpc(0, 1)
        if name == "oo":
            return mpmath.inf
        raise NotNumeric(name)

    def _sympy(self, expr):
        if expr.is_Rational:
            return Fraction(int(expr.p), int(expr.q))
        if expr.is_infinite:
            return mpmath.inf if expr.is_extended_positive else -mpmath.inf
        value = expr.evalf(WORK_DPS + 5)
        if not value.is_number:
            raise NotNumeric("symbolic endpoint")
        return mpmath.mpmathify(complex(value)) if not value.is_real else mpmath.mpf(str(value))

    def _basenum(self, digits, base):
        try:
            return Fraction(int(digits, base))
        except ValueError:
            raise NotNumeric("bad digits for base") from None

    # arithmetic
    def _add(self, terms):
        return add_values([self.ev(t) for t in terms])

    def _neg(self, x):
        v = self.ev(x)
        if isinstance(v, Matrix):
            return Matrix([[-c for c in r] for r in v.rows])
        return -v

    def _mul(self, factors):
        value = self.ev(factors[0])
        for f in factors[1:]:
            value = mul_values(value, self.ev(f))
        return value

    def _div(self, a, b):
        return div_values(self.ev(a), self.ev(b))

    def _pow(self, a, b):
        return pow_values(self.ev(a), self.ev(b))

    def _root(self, arg, index):
        x = self.ev(arg)
        k = self.ev(index)
        if isinstance(x, Matrix) or isinstance(k, Matrix):
            raise NotNumeric("root of a matrix")
        if is_exact(k) and k.denominator == 1 and 1 < k <= 1000:
            n = int(k)
            if is_exact(x):
                if x >= 0:
                    exact = _exact_root(x, n)
                    if exact is not None:
                        return exact
                    return mpmath.root(to_mp(x), n)
                if n % 2 == 1:
                    exact = _exact_root(-x, n)
                    return -exact if exact is not None else -mpmath.root(to_mp(-x), n)
                return mpmath.root(to_mp(x), n)
            if isinstance(x, mpmath.mpf) and x < 0 and n % 2 == 1:
                return -mpmath.root(-x, n)
            return mpmath.root(x, n)
        return pow_values(x, div_values(Fraction(1), k))

    def _pm(self, *args):
        raise NotNumeric("± must be expanded first")

    def _percent(self, x):
        return div_values(self.ev(x), Fraction(100))

    def _degree(self, x):
        return mul_values(self.ev(x), mpmath.pi / 180)

    def _fact(self, x):
        v = self.ev(x)
        if is_exact(v) and v.denominator == 1:
            if v < 0:
                raise Undefined("factorial of a negative integer")
            if v <= MAX_EXACT_FACTORIAL:
                return Fraction(math.factorial(int(v)))
            raise TooLarge("exact factorial too large")
        v = to_mp(v)
        if isinstance(v, Matrix):
            raise NotNumeric("factorial of a matrix")
        if abs(v) > MAX_LOG2 // 64:
            raise TooLarge("factorial")
        return mpmath.gamma(v + 1)

    def _binom(self, n, k):
        a, b = self.ev(n), self.ev(k)
        if is_exact(a) and is_exact(b) and a.denominator == 1 and b.denominator == 1 and 0 <= a <= 100_000:
            return Fraction(math.comb(int(a), int(b))) if b >= 0 else Fraction(0)
        a, b = to_mp(a), to_mp(b)
        if abs(a) > MAX_LOG2 // 64:
            raise TooLarge("binomial")
        return mpmath.binomial(a, b)

    def _abs(self, x):
        v = self.ev(x)
        if isinstance(v, Matrix):
            raise NotNumeric("|matrix|")
        return abs(v)

    def _floor(self, x):
        v = self.ev(x)
        return Fraction(math.floor(v)) if is_exact(v) else Fraction(int(mpmath.floor(_real(v))))

    def _ceil(self, x):
        v = self.ev(x)
        return Fraction(math.ceil(v)) if is_exact(v) else Fraction(int(mpmath.ceil(_real(v))))

    def _func(self, name, arg):
        if arg.kind == "tuple" and name in ("gcd", "lcm", "max", "min"):
            values = [self.ev(a) for a in arg.args[0]]
            return _multi_arg(name, values)
        v = self.ev(arg)
        if isinstance(v, Matrix):
            raise NotNumeric("function of a matrix")
        if name in ("abs",):
            return abs(v)
        if name == "floor":
            return self._floor(arg)
        if name == "ceil":
            return self._ceil(arg)
        if name == "sqrt":
            return self._root(arg, Node("num", Fraction(2), None, "2"))
        if name in ("ln", "log"):
            if is_exact(v) and v == 1:
                return Fraction(0)
            if to_mp(v) == 0:
                raise Undefined("log 0")
            return mpmath.log(to_mp(v))
        if name == "exp":
            x = to_mp(v)
            if abs(x) > MAX_LOG2:
                raise TooLarge("exp")
            return mpmath.exp(x)
        fn = _MP_FUNCS.get(name)
        if fn is None:
            raise NotNumeric(f"function {name}")
        x = to_mp(v)
        if abs(x) > 10 ** 6 and name in ("sin", "cos", "tan", "sec", "csc", "cot"):
            raise TooLarge("trig of a huge argument")
        try:
            return fn(x)
        except (ZeroDivisionError, ValueError) as e:
            raise Undefined(str(e)) from None

    def _call(self, name, args):
        if len(args) != 1:
            raise NotNumeric("multi-argument call")
        # `f(x)` with an unknown f reads as a product, the same on both sides of a comparison
        return mul_values(self._sym(name), self.ev(args[0]))

    def _sum(self, body, var, lo, hi):
        return self._series(body, var, lo, hi, add=True)

    def _prod(self, body, var, lo, hi):
        return self._series(body, var, lo, hi, add=False)

    def _series(self, body, var, lo, hi, add):
        a, b = self.ev(lo), self.ev(hi)
        if not (is_exact(a) and is_exact(b) and a.denominator == 1 and b.denominator == 1):
            raise NotNumeric("symbolic bounds")
        if b - a > MAX_TERMS:
            raise TooLarge("too many terms")
        saved = self.env.get(var, None)
        total = Fraction(0) if add else Fraction(1)
        try:
            for k in range(int(a), int(b) + 1):
                self.env[var] = Fraction(k)
                v = self.ev(body)
                total = add_values([total, v]) if add else mul_values(total, v)
        finally:
            if saved is None:
                self.env.pop(var, None)
            else:
                self.env[var] = saved
        return total

    def _matrix(self, rows):
        return Matrix([[self.ev(c) for c in r] for r in rows])


_MP_FUNCS = {
    "sin": mpmath.sin, "cos": mpmath.cos, "tan": mpmath.tan, "sec": mpmath.sec, "csc": mpmath.csc,
    "cot": mpmath.cot, "arcsin": mpmath.asin, "arccos": mpmath.acos, "arctan": mpmath.atan,
    "arcsec": mpmath.asec, "arccsc": mpmath.acsc, "arccot": mpmath.acot, "sinh": mpmath.sinh,
    "cosh": mpmath.cosh, "tanh": mpmath.tanh, "coth": mpmath.coth, "sech": mpmath.sech, "csch": mpmath.csch,
    "sgn": mpmath.sign,
}


def _real(v):
    v = to_mp(v)
    if isinstance(v, mpmath.mpc):
        if abs(v.imag) > ZERO_TOL:
            raise NotNumeric("floor of a complex number")
        return v.real
    return v


def _multi_arg(name, values):
    if name in ("max", "min"):
        if all(is_exact(v) for v in values):
            return max(values) if name == "max" else min(values)
        reals = [_real(v) for v in values]
        return max(reals) if name == "max" else min(reals)
    if not all(is_exact(v) and v.denominator == 1 for v in values):
        raise NotNumeric(f"{name} of non-integers")
    ints = [int(v) for v in values]
    return Fraction(math.gcd(*ints) if name == "gcd" else math.lcm(*ints))


def _exact_root(x: Fraction, n: int):
    """The exact n-th root of a non-negative rational, or None when it is irrational."""
    if x.numerator.bit_length() > MAX_EXACT_BITS or x.denominator.bit_length() > MAX_EXACT_BITS:
        return None
    p = _int_root(x.numerator, n)
    q = _int_root(x.denominator, n)
    if p is None or q is None:
        return None
    return Fraction(p, q)


def _int_root(a: int, n: int):
    if a < 2:
        return a
    r = int(round(a ** (1.0 / n))) if a.bit_length() < 1000 else int(mpmath.floor(mpmath.root(a, n)))
    for c in (r - 1, r, r + 1):
        if c >= 0 and c ** n == a:
            return c
    return None


def add_values(values):
    if any(isinstance(v, Matrix) for v in values):
        if not all(isinstance(v, Matrix) for v in values) or len({v.shape for v in values}) != 1:
            raise NotNumeric("matrix plus non-matrix")
        rows = values[0].rows
        for v in values[1:]:
            rows = [[add_values([a, b]) for a, b in zip(r1, r2)] for r1, r2 in zip(rows, v.rows)]
        return Matrix(rows)
    if all(is_exact(v) for v in values):
        return sum(values, Fraction(0))
    total = mpmath.mpf(0)
    for v in values:
        total += to_mp(v)
    return total


def mul_values(a, b):
    if isinstance(a, Matrix) or isinstance(b, Matrix):
        if isinstance(a, Matrix) and isinstance(b, Matrix):
            (r, k), (k2, c) = a.shape, b.shape
            if k != k2:
                raise NotNumeric("matrix shapes do not multiply")
            return Matrix([[add_values([mul_values(a.rows[i][t], b.rows[t][j]) for t in range(k)])
                            for j in range(c)] for i in range(r)])
        m, s = (a, b) if isinstance(a, Matrix) else (b, a)
        return Matrix([[mul_values(s, x) for x in row] for row in m.rows])
    if is_exact(a) and is_exact(b):
        return a * b
    x, y = to_mp(a), to_mp(b)
    if (mpmath.isinf(x) and y == 0) or (mpmath.isinf(y) and x == 0):
        raise Undefined("0 * inf")
    return x * y


def div_values(a, b):
    if isinstance(b, Matrix):
        raise NotNumeric("division by a matrix")
    if isinstance(a, Matrix):
        return Matrix([[div_values(x, b) for x in row] for row in a.rows])
    if is_exact(b) and b == 0:
        raise Undefined("division by zero")
    if is_exact(a) and is_exact(b):
        return a / b
    y = to_mp(b)
    if y == 0:
        raise Undefined("division by zero")
    return to_mp(a) / y


def pow_values(a, b):
    if isinstance(a, Matrix) or isinstance(b, Matrix):
        if isinstance(a, Matrix) and is_exact(b) and b.denominator == 1 and 1 <= b <= 64:
            result = a
            for _ in range(int(b) - 1):
                result = mul_values(result, a)
            return result
        raise NotNumeric("matrix power")
    if is_exact(a) and is_exact(b):
        if a == 0:
            if b > 0:
                return Fraction(0)
            raise Undefined("0 to a non-positive power")
        if b.denominator == 1:
            size = max(a.numerator.bit_length(), a.denominator.bit_length())
            if a in (1, -1):
                return a ** int(b % 2)
            if abs(b) * size <= MAX_EXACT_BITS:
                return a ** int(b)
            # an exact rational too large to hold: rounding it would make distinct values
            # (10^(10^10) and 10^(10^10) + 1) equal, so it is compared structurally instead
            raise TooLarge("exact power too large")
        elif a > 0 and b.denominator <= 64 and abs(b.numerator) <= 10_000:
            exact = _exact_root(a, b.denominator)
            if exact is not None:
                return pow_values(exact, Fraction(b.numerator))
    x, y = to_mp(a), to_mp(b)
    if mpmath.isinf(y) or mpmath.isinf(x):
        raise TooLarge("infinite power")
    if x == 0:
        if _real_part(y) > 0:
            return mpmath.mpf(0)
        raise Undefined("0 to a non-positive power")
    magnitude = abs(y) * abs(mpmath.log(abs(x), 2)) if abs(x) != 1 else abs(y)
    if magnitude > MAX_LOG2:
        raise TooLarge("power too large")
    if isinstance(y, mpmath.mpf) and y == int(y) and abs(y) < 2 ** 62:
        return mpmath.power(x, int(y))
    return mpmath.power(x, y)


def _real_part(v):
    return v.real if isinstance(v, mpmath.mpc) else v


def values_equal(a, b) -> bool:
    """Exact equality for two rationals; agreement to REL_TOL (relative) for anything inexact."""
    if isinstance(a, Matrix) or isinstance(b, Matrix):
        if not (isinstance(a, Matrix) and isinstance(b, Matrix)) or a.shape != b.shape:
            return False
        return all(values_equal(x, y) for ra, rb in zip(a.rows, b.rows) for x, y in zip(ra, rb))
    if is_exact(a) and is_exact(b):
        return a == b
    x, y = to_mp(a), to_mp(b)
    if mpmath.isnan(x) or mpmath.isnan(y):
        return False
    if mpmath.isinf(x) or mpmath.isinf(y):
        return x == y
    if is_exact(a) and a == 0:
        return abs(y) <= ZERO_TOL
    if is_exact(b) and b == 0:
        return abs(x) <= ZERO_TOL
    scale = max(abs(x), abs(y))
    if scale == 0:
        return True
    return abs(x - y) <= scale * REL_TOL


def decimal_matches(decimal: Fraction, places: int, value) -> bool:
    """Whether a written decimal (`places` digits after the point) is `value` rounded or truncated to
    that many places. Used only when `value` is not itself a terminating decimal, and only for
    decimals with at least two significant digits (so 0.3 never stands for 1/3, but 0.33 does)."""
    significant = len(str(abs(decimal.numerator * 10 ** places // decimal.denominator)).lstrip("0"))
    if significant < 2:
        return False
    v = to_mp(value)
    if isinstance(v, mpmath.mpc):
        if abs(v.imag) > ZERO_TOL:
            return False
        v = v.real
    d = to_mp(decimal)
    unit = mpmath.mpf(10) ** -places
    if abs(d - v) <= unit / 2 * (1 + mpmath.mpf(10) ** -12):
        return True
    truncated = mpmath.sign(v) * mpmath.floor(abs(v) / unit) * unit
    if abs(truncated - d) <= unit * mpmath.mpf(10) ** -12:
        return True
    # a float's repr (15+ significant digits) stands for the value within float precision
    return significant >= 15 and abs(d - v) <= abs(v) * mpmath.mpf(10) ** -14
