"""Parse one normalised answer (LaTeX or plain text) into a small syntax tree.

Our own tokenizer and recursive-descent parser, because sympy's LaTeX parser needs antlr and gives
up on what models actually write (`\\frac12`, `\\sqrt3`, `1 1/4`, `x \\in [0, 1)`, `(11,7) or (7,11)`).
The tree (`Node`) keeps structure that sympy would evaluate away: tuples versus sets versus bare lists,
interval brackets, relation chains, `\\pm`, percent and degree marks, matrices, text. `evaluate.py`
turns scalar parts into numbers; `equivalence.py` decides what the structure means.

Reading conventions (TeX where TeX is clear, plain text where models write plain text):
- `\\frac12`, `\\frac 34`, `\\sqrt3`: one character per brace-less argument (TeX).
- `x^23` is `x^{23}` (plain text habit); `2e5` is scientific notation.
- An integer followed by `\\frac{p}{q}` (integers) or by ` p/q` is a mixed number: `918\\frac{1}{2}`.
- Letter runs: known functions (`sin`, `sqrt`, `log`, ...), `pi`, `and`/`or` (list separators), unit
  and other words of four or more letters are words; shorter runs are products of single letters.
- `i` is the imaginary unit, `e` Euler's number, `\\pi` pi; other letters are variables.
- A comma between a 1-3 digit group and exact 3-digit groups is a thousands separator outside
  brackets (`12,000,023`); inside brackets it separates items (`[1,500]`) unless a group starts
  with 0 (`(1,000)`).

Guards: input longer than `MAX_CHARS` or nested deeper than `MAX_DEPTH` raises `ParseError`.
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_CHARS = 3000
MAX_DEPTH = 120
MAX_TOKENS = 2000


class ParseError(ValueError):
    """The answer is not something this parser understands."""


class Node:
    """One syntax-tree node: `kind` plus positional `args` (children are Nodes or tuples of Nodes).

    Kinds: num(value: Fraction, decimals: int|None, text), sym(name), const(pi|E|I|oo), add(terms),
    neg(x), mul(factors), div(a, b), pow(a, b), func(name, arg), root(arg, index), fact(x), binom(n, k),
    abs(x), floor(x), ceil(x), pm(a|None, b, sign) (a ± b), percent(x), degree(x), call(name, args),
    sum(body, var, lo, hi), prod(...), matrix(rows), tuple(items, open, close), set(items),
    list(items, how) with how in {bare, group}, setop(op, a, b), rel(items, ops), text(str), ellipsis(),
    ratio(items), time(str), basenum(digits, base), empty().
    """

    __slots__ = ("kind", "args")

    def __init__(self, kind: str, *args):
        self.kind = kind
        self.args = args

    def __eq__(self, other):
        return isinstance(other, Node) and self.kind == other.kind and self.args == other.args

    def __hash__(self):
        return hash((self.kind, self.args))

    def __repr__(self):
        return f"{self.kind}{self.args!r}"

    def walk(self):
        """Every node of the tree, depth first (iterative, so deep trees are safe)."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            for a in node.args:
                if isinstance(a, Node):
                    stack.append(a)
                elif isinstance(a, tuple):
                    for b in a:
                        if isinstance(b, Node):
                            stack.append(b)
                        elif isinstance(b, tuple):
                            stack.extend(x for x in b if isinstance(x, Node))


def num(value, text=None, decimals=None) -> Node:
    return Node("num", Fraction(value), decimals, text or str(value))


# ----------------------------------------------------------------------------------------------
# Tokenizer

FUNCTIONS = {
    "sin", "cos", "tan", "sec", "csc", "cot", "arcsin", "arccos", "arctan", "arcsec", "arccsc", "arccot",
    "sinh", "cosh", "tanh", "coth", "sech", "csch", "log", "ln", "lg", "exp", "sqrt", "gcd", "lcm", "max", "min",
    "det", "deg", "arg", "sgn", "abs", "floor", "ceil",
}
_RELATIONS = {
    "le": "<=", "leq": "<=", "leqslant": "<=", "leqq": "<=", "ge": ">=", "geq": ">=", "geqslant": ">=", "geqq": ">=",
    "ne": "!=", "neq": "!=", "lt": "<", "gt": ">", "approx": "~=", "simeq": "~=", "thickapprox": "~=",
    "cong": "~=", "equiv": "=", "in": "in", "to": "=>", "rightarrow": "=>", "Rightarrow": "=>",
    "implies": "=>", "Longrightarrow": "=>", "longrightarrow": "=>", "iff": "=>", "Leftrightarrow": "=>",
}
_OPERATORS = {"cdot": "*", "times": "*", "ast": "*", "div": "/", "colon": ":"}
_SET_OPS = {"cup": "cup", "cap": "cap", "setminus": "setminus", "backslash": "setminus"}
_ELLIPSIS = {"ldots", "cdots", "dots", "dotsc", "dotsb", "vdots", "ddots"}
_IGNORED = {
    "left", "right", "big", "Big", "bigg", "Bigg", "bigl", "bigr", "Bigl", "Bigr", "displaystyle",
    "textstyle", "scriptstyle", "limits", "nolimits", "quad", "qquad", "hfill", "nonumber", "notag",
    "boxed", "fbox", "mathstrut", "strut", "hline", "noindent", "qed", "square", "blacksquare", "therefore",
    "because", "phantom", "hspace", "vspace",
}
_COMMANDS = {"frac", "binom", "sqrt", "sum", "prod", "lfloor", "rfloor", "lceil", "rceil", "infty", "pi",
             "emptyset", "varnothing", "circ", "prime", "choose"}
_TEXT_COMMANDS = {"text", "textbf", "textit", "textrm", "textnormal", "mathrm", "mbox", "mathit", "textsf",
                  "texttt", "mathtt", "mathsf", "emph", "textup", "hbox"}
_DECORATIONS = {"mathbf", "boldsymbol", "bm", "vec", "overline", "overrightarrow", "overleftrightarrow",
                "hat", "bar", "tilde", "widehat", "widetilde", "mathbb", "mathcal", "mathfrak", "dot",
                "ddot", "underline", "mathscr", "check", "breve"}
_UNIT_WORDS = {
    "cm", "mm", "km", "m", "in", "inch", "inches", "ft", "feet", "foot", "yd", "yard", "yards", "mi", "mile", "miles",
    "kg", "mg", "g", "lb", "lbs", "oz", "ounce", "ounces", "pounds", "pound", "gram", "grams", "ton", "tons",
    "sec", "secs", "second", "seconds", "min", "mins", "minute", "minutes", "hr", "hrs", "hour", "hours", "day", "days",
    "week", "weeks", "month", "months", "year", "years", "dollars", "dollar", "cents", "cent", "units", "unit",
    "mph", "kph", "meter", "meters", "metre", "metres", "liter", "liters", "litre", "litres", "ml", "sq", "square",
    "cubic", "yuan", "euros", "euro", "people", "students", "degrees", "degree", "radians", "rad", "ways",
    "times", "percent",
}
_WORD_FUNCS = {"sqrt", "sin", "cos", "tan", "log", "ln", "exp", "sec", "csc", "cot", "arcsin", "arccos", "arctan",
               "sinh", "cosh", "tanh", "gcd", "lcm", "max", "min", "abs", "floor", "ceil"}

_TOKEN = re.compile(
    r"(?P<space>\s+)"
    r"|(?P<begin>\\begin\s*\{\s*(?P<benv>[A-Za-z]+\*?)\s*\})"
    r"|(?P<end>\\end\s*\{\s*(?P<eenv>[A-Za-z]+\*?)\s*\})"
    r"|(?P<rowsep>\\\\)"
    r"|(?P<cmd>\\(?:[A-Za-z]+|.))"
    r"|(?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+(?![A-Za-z]))?|\.\d+)"
    r"|(?P<letters>[A-Za-z]+)"
    r"|(?P<uword>[^\W\d_]+)"
    r"|(?P<op2><=|>=|!=|=>|->|==|\*\*|:=)"
    r"|(?P<op>[-+*/^_!',;:|()\[\]{}&=<>%°?.])",
    re.DOTALL,
)
_THOUSANDS = re.compile(r"[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?(?![\d])")


class Token:
    __slots__ = ("kind", "value", "space", "start", "end")

    def __init__(self, kind, value, space, start, end):
        self.kind, self.value, self.space, self.start, self.end = kind, value, space, start, end

    def __repr__(self):
        return f"{self.kind}:{self.value!r}"


def _brace_group(s: str, open_at: int) -> int:
    """Index just past the `}` matching the `{` at `open_at`."""
    depth = 0
    for j in range(open_at, len(s)):
        c = s[j]
        if c == "{" and (j == 0 or s[j - 1] != "\\"):
            depth += 1
        elif c == "}" and (j == 0 or s[j - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return j + 1
    raise ParseError("unbalanced braces")


def tokenize(s: str) -> list[Token]:
    if len(s) > MAX_CHARS:
        raise ParseError(f"answer longer than {MAX_CHARS} characters")
    tokens: list[Token] = []
    pos = 0
    space = False
    depth = 0
    n = len(s)

    def add(kind, value, start, end):
        nonlocal space
        if len(tokens) >= MAX_TOKENS:
            raise ParseError("too many tokens")
        tokens.append(Token(kind, value, space, start, end))
        space = False

    while pos < n:
        m = _TOKEN.match(s, pos)
        if m is None:
            add("junk", s[pos], pos, pos + 1)
            pos += 1
            continue
        kind = m.lastgroup
        text = m.group()
        start, end = m.start(), m.end()
        if kind == "space":
            space = True
        elif kind == "begin":
            env = m.group("benv").rstrip("*")
            if env == "array" and end < n and s[end:end + 1].strip() == "" and s[end:].lstrip().startswith("{"):
                end = _brace_group(s, s.index("{", end))
            elif env == "array" and s.startswith("{", end):
                end = _brace_group(s, end)
            add("begin", env, start, end)
            depth += 1
        elif kind == "end":
            add("end", m.group("eenv").rstrip("*"), start, end)
            depth = max(0, depth - 1)
        elif kind == "rowsep":
            add("rowsep", "\\\\", start, end)
        elif kind == "cmd":
            name = text[1:]
            end = _command(s, name, start, end, add)
        elif kind == "num":
            if (depth == 0 or re.match(r"\d{1,3}(?:,\d{3})*,0", s[start:])) and (tm := _THOUSANDS.match(s, start)):
                text = tm.group().replace(",", "")
                end = tm.end()
            add("num", text, start, end)
        elif kind == "letters":
            _letters(text, start, add)
        elif kind == "uword":
            add("word", text, start, end)
        elif kind in ("op", "op2"):
            value = {"**": "^", "==": "=", "->": "=>", ":=": "="}.get(text, text)
            if value in ("(", "[", "{"):
                depth += 1
            elif value in (")", "]", "}"):
                depth = max(0, depth - 1)
            add("op", value, start, end)
        pos = end
    return tokens


def _command(s, name, start, end, add) -> int:
    """Emit the token(s) for `\\name` and return where scanning continues."""
    if name in _TEXT_COMMANDS or name in _DECORATIONS or name == "operatorname":
        rest = end
        while rest < len(s) and s[rest] == " ":
            rest += 1
        if rest < len(s) and s[rest] == "{":
            close = _brace_group(s, rest)
            content = s[rest + 1:close - 1]
        elif rest < len(s) and name in _DECORATIONS:
            close = rest + 1
            content = s[rest]
        else:
            return end
        if name in _TEXT_COMMANDS:
            inner = content.strip()
            if inner.lower() in ("and", "or", ",", "or,", "and,"):
                add("sep", inner.lower(), start, close)
            else:
                add("text", content, start, close)
        elif name == "operatorname":
            add("word", content.strip(), start, close)
        else:
            add("id", re.sub(r"[\\\s{}]", "", content) or name, start, close)
        return close
    if name in ("{", "lbrace"):
        add("op", "\\{", start, end)
    elif name in ("}", "rbrace"):
        add("op", "\\}", start, end)
    elif name in ("|", "vert", "lvert", "rvert", "Vert", "lVert", "rVert", "mid"):
        add("op", "|", start, end)
    elif name == "langle":
        add("op", "(", start, end)
    elif name == "rangle":
        add("op", ")", start, end)
    elif name in _RELATIONS:
        add("rel", _RELATIONS[name], start, end)
    elif name in _OPERATORS:
        add("op", _OPERATORS[name], start, end)
    elif name in ("pm", "mp"):
        add("pm", "+-" if name == "pm" else "-+", start, end)
    elif name in _SET_OPS:
        add("setop", _SET_OPS[name], start, end)
    elif name in _ELLIPSIS:
        add("ellipsis", "...", start, end)
    elif name in FUNCTIONS:
        add("func", name, start, end)
    elif name in _COMMANDS:
        add("cmd", name, start, end)
    elif name == "%":
        add("op", "%", start, end)
    elif name in _IGNORED or len(name) == 1:
        pass  # spacing (`\,`), sizing, `\$`, `\#`, `\&` and friends
    elif name in ("neg", "lnot"):
        add("junk", name, start, end)
    else:
        add("id", name, start, end)  # greek letters and unknown commands are names
    return end


def _letters(run: str, start: int, add) -> None:
    low = run.lower()
    if low in ("and", "or"):
        add("sep", low, start, start + len(run))
    elif low in _WORD_FUNCS:
        add("func", low, start, start + len(run))
    elif low == "pi":
        add("cmd", "pi", start, start + len(run))
    elif low in ("inf", "infty", "infinity"):
        add("cmd", "infty", start, start + len(run))
    elif len(run) >= 2 and (low in _UNIT_WORDS or len(run) >= 4):
        add("word", run, start, start + len(run))
    else:
        for k, c in enumerate(run):
            add("id", c, start + k, start + k + 1)


# ----------------------------------------------------------------------------------------------
# Parser

_ATOM_STARTS = {"num", "id", "cmd", "func", "begin", "text", "word"}
_TIME = re.compile(r"^\d{1,2}:\d{2}(?::\d{2})?$")


def parse(text: str) -> Node:
    """Parse a normalised answer. Raises ParseError on anything it does not understand."""
    text = text.strip()
    if not text:
        raise ParseError("empty answer")
    if _TIME.match(text):
        return Node("time", text.lstrip("0") or "0")
    parser = _Parser(text, tokenize(text))
    node = parser.parse_top()
    if parser.i != len(parser.toks):
        raise ParseError(f"unexpected {parser.toks[parser.i].value!r}")
    return node


class _Parser:
    def __init__(self, src: str, toks: list[Token]):
        self.src = src
        self.toks = toks
        self.i = 0
        self.depth = 0
        self.abs_depth = 0

    # -- helpers
    def peek(self, k=0):
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def at(self, kind, value=None, k=0):
        t = self.peek(k)
        return t is not None and t.kind == kind and (value is None or t.value == value)

    def at_op(self, *values, k=0):
        t = self.peek(k)
        return t is not None and t.kind == "op" and t.value in values

    def take(self):
        t = self.toks[self.i]
        self.i += 1
        return t

    def expect_op(self, value):
        if not self.at_op(value):
            got = self.peek()
            raise ParseError(f"expected {value!r}, got {got.value if got else 'end'!r}")
        return self.take()

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError("nested too deeply")

    def leave(self):
        self.depth -= 1

    # -- lists
    def parse_top(self) -> Node:
        groups = self.parse_items(closers=())
        return _list_from_groups(groups)

    def parse_items(self, closers, stop_kinds=()) -> list[list[Node]]:
        """Items separated by `,` `;` and/or words, up to a closer (not consumed) or the end.

        Returns groups: `;` starts a new group (`p=5,q=2; p=7,q=2`)."""
        groups: list[list[Node]] = [[]]
        while True:
            t = self.peek()
            if t is None or (t.kind == "op" and t.value in closers) or t.kind in stop_kinds:
                break
            if t.kind == "op" and t.value == ";":
                self.take()
                if groups[-1]:
                    groups.append([])
                continue
            if (t.kind == "op" and t.value == ",") or t.kind == "sep":
                self.take()
                continue
            if t.kind == "ellipsis":
                self.take()
                groups[-1].append(Node("ellipsis"))
                continue
            before = self.i
            groups[-1].append(self.parse_relation())
            if self.i == before:
                raise ParseError(f"unexpected {t.value!r}")
            t = self.peek()
            if t is not None and not ((t.kind == "op" and t.value in closers + (",", ";"))
                                      or t.kind in ("sep", "ellipsis") or t.kind in stop_kinds):
                raise ParseError(f"unexpected {t.value!r}")
        return [g for g in groups if g]

    # -- relations and sets
    def parse_relation(self) -> Node:
        items = [self.parse_setexpr()]
        ops = []
        while self.at("rel") or self.at_op("=", "<", ">", "<=", ">=", "!=", "=>"):
            ops.append(self.take().value)
            if self.peek() is None:
                raise ParseError("relation without right-hand side")
            items.append(self.parse_setexpr())
        if ops:
            return Node("rel", tuple(items), tuple(ops))
        return items[0]

    def parse_setexpr(self) -> Node:
        left = self.parse_ratio()
        while self.at("setop"):
            op = self.take().value
            left = Node("setop", op, left, self.parse_ratio())
        return left

    def parse_ratio(self) -> Node:
        first = self.parse_additive()
        if not self.at_op(":"):
            return first
        items = [first]
        while self.at_op(":"):
            self.take()
            if self.at("ellipsis"):
                self.take()
                items.append(Node("ellipsis"))
            else:
                items.append(self.parse_additive())
        return Node("ratio", tuple(items))

    # -- arithmetic
    def parse_additive(self) -> Node:
        self.enter()
        try:
            left = self.parse_term()
            while True:
                if self.at_op("+"):
                    self.take()
                    left = _add(left, self.parse_term())
                elif self.at_op("-"):
                    self.take()
                    left = _add(left, Node("neg", self.parse_term()))
                elif self.at("pm"):
                    sign = self.take().value
                    left = Node("pm", left, self.parse_term(), sign)
                else:
                    return left
        finally:
            self.leave()

    def parse_term(self) -> Node:
        left = self.parse_unary()
        while True:
            t = self.peek()
            if t is None:
                return left
            if t.kind == "op" and t.value == "*":
                self.take()
                left = _mul(left, self.parse_unary())
            elif t.kind == "op" and t.value == "/":
                self.take()
                left = Node("div", left, self.parse_unary())
            elif self._starts_atom(t):
                mixed = self._mixed_number(left)
                if mixed is not None:
                    left = mixed
                    continue
                right = self.parse_power()
                left = _mul(left, right)
            else:
                return left

    def _starts_atom(self, t) -> bool:
        if t.kind == "cmd" and t.value in ("rfloor", "rceil"):
            return False
        if t.kind in _ATOM_STARTS:
            return True
        if t.kind == "op":
            if t.value in ("(", "\\{"):
                return True
            if t.value == "[":
                return False  # `2[...]` is never a product in answers; `[` opens an item
            if t.value == "|":
                return self.abs_depth == 0
        return False

    def _mixed_number(self, left: Node):
        """`918\\frac{1}{2}` or `1 1/4`: an integer followed directly by a proper integer fraction."""
        if not _is_integer_literal(left):
            return None
        t = self.peek()
        if t.kind == "cmd" and t.value == "frac":
            save = self.i
            try:
                frac = self.parse_power()
            except ParseError:
                self.i = save
                return None
            if (frac.kind == "div" and all(_is_integer_literal(a) for a in frac.args)
                    and 0 < frac.args[0].args[0] < frac.args[1].args[0] and not self._starts_atom_safe()):
                return Node("add", (left, frac))
            self.i = save
            return None
        if (t.kind == "num" and t.space and self.at_op("/", k=1) and self.at("num", k=2)
                and "." not in t.value and "." not in self.peek(2).value):
            nxt = self.peek(3)
            if nxt is None or not (nxt.kind in _ATOM_STARTS or (nxt.kind == "op" and nxt.value in ("^", "("))):
                a, b = int(self.peek().value), int(self.peek(2).value)
                if 0 < a < b:
                    self.i += 3
                    return Node("add", (left, Node("div", num(a), num(b))))
        return None

    def _starts_atom_safe(self):
        t = self.peek()
        return t is not None and self._starts_atom(t)

    def parse_unary(self) -> Node:
        self.enter()
        try:
            if self.at_op("-"):
                self.take()
                return Node("neg", self.parse_unary())
            if self.at_op("+"):
                self.take()
                return self.parse_unary()
            if self.at("pm"):
                sign = self.take().value
                return Node("pm", None, self.parse_unary(), sign)
            return self.parse_power()
        finally:
            self.leave()

    def parse_power(self) -> Node:
        base = self.parse_postfix()
        if self.at_op("^"):
            self.take()
            base = self._postfix_ops(Node("pow", base, self.parse_exponent()))
        return base

    def parse_exponent(self) -> Node:
        self.enter()
        try:
            if self.at_op("-"):
                self.take()
                return Node("neg", self.parse_exponent())
            if self.at_op("+"):
                self.take()
                return self.parse_exponent()
            base = self.parse_postfix(exponent=True)
            if self.at_op("^"):
                self.take()
                return Node("pow", base, self.parse_exponent())
            return base
        finally:
            self.leave()

    def parse_postfix(self, exponent=False) -> Node:
        node = self.parse_atom(exponent=exponent)
        return self._postfix_ops(node)

    def _postfix_ops(self, node: Node) -> Node:
        while True:
            t = self.peek()
            if t is None or t.kind != "op":
                if t is not None and t.kind == "cmd" and t.value == "prime":
                    self.take()
                    node = _prime(node)
                    continue
                return node
            if t.value == "!" and not self.at_op("=", k=1):
                self.take()
                node = Node("fact", node)
            elif t.value == "'":
                self.take()
                node = _prime(node)
            elif t.value == "%":
                self.take()
                node = Node("percent", node)
            elif t.value == "°":
                self.take()
                node = Node("degree", node)
            elif t.value == "_" and node.kind == "num":
                self.take()
                base = self._raw_arg()
                if not base.isdigit():
                    raise ParseError("bad base subscript")
                node = Node("basenum", node.args[2], int(base))
            else:
                return node

    # -- atoms
    def parse_atom(self, exponent=False) -> Node:
        self.enter()
        try:
            return self._atom(exponent)
        finally:
            self.leave()

    def _atom(self, exponent) -> Node:
        t = self.peek()
        if t is None:
            raise ParseError("unexpected end")
        kind, value = t.kind, t.value
        if kind == "num":
            self.take()
            return _number(value)
        if kind == "id":
            self.take()
            return self._name(value)
        if kind == "text":
            self.take()
            return _text_node(value)
        if kind == "word":
            self.take()
            return Node("text", value)
        if kind == "func":
            self.take()
            return self._function(value)
        if kind == "cmd":
            self.take()
            return self._command(value)
        if kind == "begin":
            self.take()
            return self._environment(value)
        if kind == "ellipsis":
            self.take()
            return Node("ellipsis")
        if kind == "op":
            if value in ("(", "["):
                return self._bracket()
            if value == "\\{":
                self.take()
                items = self._flat_items(("\\}",))
                self.expect_op("\\}")
                return Node("set", tuple(items))
            if value == "{":
                self.take()
                groups = self.parse_items(("}",))
                self.expect_op("}")
                node = _list_from_groups(groups)
                return node
            if value == "|" and self.abs_depth == 0:
                self.take()
                self.abs_depth += 1
                try:
                    inner = self.parse_additive()
                finally:
                    self.abs_depth -= 1
                self.expect_op("|")
                return Node("abs", inner)
        raise ParseError(f"unexpected {value!r}")

    def _name(self, name: str) -> Node:
        if self.at_op("_"):
            self.take()
            name = f"{name}_{self._raw_arg()}"
        if name in ("pi",):
            return Node("const", "pi")
        if name == "e":
            return Node("const", "E")
        if name == "i":
            return Node("const", "I")
        if name in ("infty", "infinity"):
            return Node("const", "oo")
        if self.at_op("(") and not self.peek().space and len(name.split("_")[0]) == 1:
            args = self._bracket()
            if args.kind == "tuple":
                return Node("call", name, args.args[0])
            return Node("call", name, (args,))
        return Node("sym", name)

    def _raw_arg(self) -> str:
        """The raw source text of a subscript: `{...}` or one token."""
        t = self.peek()
        if t is None:
            raise ParseError("missing subscript")
        if t.kind == "op" and t.value == "{":
            depth = 0
            start = t.end
            while True:
                t = self.peek()
                if t is None:
                    raise ParseError("unbalanced subscript")
                self.take()
                if t.kind == "op" and t.value == "{":
                    depth += 1
                elif t.kind == "op" and t.value == "}":
                    depth -= 1
                    if depth == 0:
                        return re.sub(r"\s+", "", self.src[start:t.start])
        self.take()
        if t.kind == "num" and len(t.value) > 1 and "." not in t.value:
            return t.value  # `x_12` reads as x_{12}
        return re.sub(r"\s+", "", self.src[t.start:t.end])

    def _arg(self) -> Node:
        """A command argument: `{...}` or one character/token (TeX: `\\frac12` is 1/2)."""
        t = self.peek()
        if t is None:
            raise ParseError("missing argument")
        if t.kind == "op" and t.value == "{":
            self.take()
            groups = self.parse_items(("}",))
            self.expect_op("}")
            node = _list_from_groups(groups)
            return node
        if t.kind == "num" and len(t.value) > 1:
            first, rest = t.value[0], t.value[1:]
            if first == ".":
                raise ParseError("bad argument")
            self.toks[self.i] = Token("num", rest, False, t.start + 1, t.end)
            return num(int(first))
        if t.kind == "op" and t.value == "(":
            return self._bracket()
        return self.parse_atom()

    def _function(self, name: str) -> Node:
        power = None
        base = None
        if name == "sqrt":
            return self._sqrt()
        if self.at_op("^"):
            self.take()
            power = self.parse_exponent()
        if self.at_op("_") and name == "log":
            self.take()
            base = self._arg()
            if power is None and self.at_op("^"):
                self.take()
                power = self.parse_exponent()
        if self.at_op("("):
            arg = self._bracket()
        elif self.at_op("{"):
            arg = self._arg()
        else:
            arg = self.parse_power()
            while self.peek() is not None and self.peek().kind in ("num", "id", "cmd") and not (
                    self.peek().kind == "cmd" and self.peek().value in ("sum", "prod")):
                arg = _mul(arg, self.parse_power())
        node = Node("func", name, arg)
        if base is not None:
            node = Node("div", Node("func", "ln", arg), Node("func", "ln", base))
        elif name == "lg":
            node = Node("div", Node("func", "ln", arg), Node("func", "ln", num(10)))
        if power is not None:
            if power == Node("neg", num(1)) and name in ("sin", "cos", "tan", "sec", "csc", "cot"):
                return Node("func", "arc" + name, arg)
            node = Node("pow", node, power)
        return node

    def _sqrt(self) -> Node:
        index = None
        if self.at_op("["):
            self.take()
            index = self.parse_additive()
            self.expect_op("]")
        arg = self._arg()
        return Node("root", arg, index if index is not None else num(2))

    def _command(self, name: str) -> Node:
        if name == "frac":
            a = self._arg()
            b = self._arg()
            return Node("div", a, b)
        if name in ("binom", "choose"):
            return Node("binom", self._arg(), self._arg())
        if name == "sqrt":
            return self._sqrt()
        if name == "pi":
            return Node("const", "pi")
        if name == "infty":
            return Node("const", "oo")
        if name in ("emptyset", "varnothing"):
            return Node("empty")
        if name in ("lfloor", "lceil"):
            inner = self.parse_additive()
            close = "rfloor" if name == "lfloor" else "rceil"
            if not self.at("cmd", close):
                raise ParseError(f"missing \\{close}")
            self.take()
            return Node("floor" if name == "lfloor" else "ceil", inner)
        if name in ("sum", "prod"):
            return self._big_operator(name)
        raise ParseError(f"unexpected \\{name}")

    def _big_operator(self, name: str) -> Node:
        var, lo, hi = None, None, None
        for _ in range(2):
            if self.at_op("_"):
                self.take()
                sub = self._arg()
                if sub.kind == "rel" and sub.args[1] == ("=",) and sub.args[0][0].kind == "sym":
                    var, lo = sub.args[0][0].args[0], sub.args[0][1]
                else:
                    raise ParseError("unsupported index")
            elif self.at_op("^"):
                self.take()
                hi = self._arg()
        if var is None or hi is None:
            raise ParseError("unsupported sum")
        body = self.parse_term()
        return Node(name, body, var, lo, hi)

    def _environment(self, env: str) -> Node:
        rows: list[list[Node]] = [[]]
        while True:
            t = self.peek()
            if t is None:
                raise ParseError(f"missing \\end{{{env}}}")
            if t.kind == "end":
                self.take()
                break
            if t.kind == "rowsep":
                self.take()
                rows.append([])
                continue
            if t.kind == "op" and t.value == "&":
                self.take()
                if not rows[-1]:
                    rows[-1].append(None)
                continue
            rows[-1].append(self.parse_relation())
            t = self.peek()
            if t is not None and not (t.kind in ("end", "rowsep") or (t.kind == "op" and t.value == "&")):
                raise ParseError(f"unexpected {t.value!r} in {env}")
        rows = [r for r in rows if r]
        if any(c is None for r in rows for c in r):
            raise ParseError("empty matrix cell")
        if env.endswith("matrix") or env == "array":
            if not rows or len({len(r) for r in rows}) != 1:
                raise ParseError("ragged matrix")
            return Node("matrix", tuple(tuple(r) for r in rows))
        items = [c for r in rows for c in r]
        return items[0] if len(items) == 1 else Node("list", tuple(items), "bare")

    def _bracket(self) -> Node:
        open_tok = self.take()
        items = self._flat_items((")", "]"))
        t = self.peek()
        if t is None or t.kind != "op" or t.value not in (")", "]"):
            raise ParseError("unclosed bracket")
        close = self.take().value
        if len(items) == 1 and open_tok.value == "(" and close == ")":
            return items[0]
        if len(items) == 1 and open_tok.value == "[" and close == "]" and items[0].kind not in ("list",):
            return items[0]
        if not items:
            raise ParseError("empty brackets")
        return Node("tuple", tuple(items), open_tok.value, close)

    def _flat_items(self, closers) -> list[Node]:
        groups = self.parse_items(closers)
        items = [item for g in groups for item in g]
        return items


def _number(text: str) -> Node:
    if "e" in text or "E" in text:
        mantissa, _, exp = text.replace("E", "e").partition("e")
        value = Fraction(mantissa) * Fraction(10) ** int(exp)
        return Node("num", value, None, text)
    decimals = len(text.split(".", 1)[1]) if "." in text else None
    digits = text.replace(".", "").lstrip("0")
    if len(digits) > 4000:
        raise ParseError("number literal too long")
    return Node("num", Fraction(text), decimals, text)


def _text_node(content: str) -> Node:
    inner = content.strip()
    if re.fullmatch(r"-?\d+(?:\.\d+)?", inner):
        return _number(inner) if not inner.startswith("-") else Node("neg", _number(inner[1:]))
    if re.fullmatch(r"[A-Za-z]", inner):
        return Node("sym", inner) if inner not in ("e", "i") else Node("const", "E" if inner == "e" else "I")
    return Node("text", inner)


def _is_integer_literal(n: Node) -> bool:
    return n.kind == "num" and n.args[1] is None and n.args[0].denominator == 1 and "e" not in n.args[2].lower()


def _prime(node: Node) -> Node:
    if node.kind == "sym":
        return Node("sym", node.args[0] + "'")
    raise ParseError("prime on a non-name")


def _add(a: Node, b: Node) -> Node:
    terms = (a.args[0] if a.kind == "add" else (a,)) + (b,)
    return Node("add", terms)


def _mul(a: Node, b: Node) -> Node:
    # units and other words after a value are annotations ("35 cm", "15 cm^2", "10 \text{ units}")
    if _is_annotation(b) and not _is_annotation(a):
        return a
    if _is_annotation(a) and not _is_annotation(b):
        return b
    factors = (a.args[0] if a.kind == "mul" else (a,)) + (b,)
    return Node("mul", factors)


def _is_annotation(n: Node) -> bool:
    if n.kind == "text":
        return True
    if n.kind == "pow" and n.args[0].kind == "text":
        return True
    if n.kind == "mul":
        return all(_is_annotation(f) for f in n.args[0])
    return False


def _list_from_groups(groups: list[list[Node]]) -> Node:
    if not groups:
        raise ParseError("empty")
    if len(groups) == 1:
        items = groups[0]
        return items[0] if len(items) == 1 else Node("list", tuple(items), "bare")
    items = [g[0] if len(g) == 1 else Node("list", tuple(g), "group") for g in groups]
    return Node("list", tuple(items), "bare")
