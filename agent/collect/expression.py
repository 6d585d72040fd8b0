"""Trigger conditions of the collection rules: a small expression language over CAN signals.

A condition is parsed once into a tree and then evaluated with numpy over a whole timeline at
a time, never point by point.

- Numbers: ``42``, ``2.5``, ``.5``, ``1e3``, ``2.5E-2``, ``0x1F``.
- Signals: ``Speed``, or qualified by its message, ``Engine.Speed``. A reference is kept as
  written. ``and``, ``or``, ``not`` and the function names are not signal names (a signal
  called ``min`` is reached qualified, ``Engine.min``); every qualified name is a signal.
- Arithmetic ``+ - * /`` and unary ``-``/``+``; comparisons ``< <= > >= == !=``, which do
  not chain (``a < b < c`` is an error: write ``a < b and b < c``); ``and``, ``or``, ``not``;
  parentheses.
- Precedence, loosest first: ``or``, ``and``, ``not``, comparison, ``+ -``, ``* /``, unary
  ``- +``. Binary operators group left to right: ``1 - 2 - 3`` is ``(1 - 2) - 3``.
- Functions: ``abs(x)``; ``min(a, b, ...)`` and ``max(a, b, ...)``, elementwise over two or
  more expressions; and over a signal's own trailing samples, ``mean(Sig, ms)``,
  ``wmin(Sig, ms)`` and ``wmax(Sig, ms)``, whose window at time t holds the samples stamped in
  (t - ms, t]. The first argument of these is a signal name and the second a positive number
  of milliseconds.

Values are float64 and NaN means unknown (a signal not seen yet). Arithmetic, ``abs``, ``min``
and ``max`` carry NaN through; every comparison with NaN is false, ``!=`` included. Where a
truth value is needed (``and``, ``or``, ``not``, the whole condition) a number is true when
it is neither zero nor NaN; where a number is needed, true is 1 and false 0. Division by zero
gives inf or NaN as IEEE 754 does. Windows skip NaN samples and are NaN when they hold none.
``min``, ``max``, ``wmin`` and ``wmax`` give +0.0 for any zero.

Errors are :class:`ExpressionError`, with the 0-based offset of the problem in ``position``;
its text gives the 1-based column: ``position 7: expected ')', found end of expression``.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias, cast

import numpy as np
import numpy.typing as npt

__all__ = ["Expression", "ExpressionError", "parse"]

Floats: TypeAlias = npt.NDArray[np.float64]
Bools: TypeAlias = npt.NDArray[np.bool_]
Ints: TypeAlias = npt.NDArray[np.int64]
# A node gives numbers or truth values; each side converts what it gets (see _number, _truth).
Value: TypeAlias = Floats | Bools

KEYWORDS: Final = frozenset({"and", "or", "not"})
FUNCTIONS: Final = ("abs", "max", "mean", "min", "wmax", "wmin")
# Parentheses, calls, signs and 'not' inside one another; the parser and the evaluation
# recurse once per level, and this keeps both far from Python's recursion limit.
MAX_NESTING: Final = 32
# Keeps t - window inside int64 for any timestamp of this era with room to spare.
MAX_WINDOW_MS: Final = 1e12

_DIGITS: Final = frozenset(string.digits)
_HEX_DIGITS: Final = frozenset(string.hexdigits)
_NAME_START: Final = frozenset(string.ascii_letters + "_")
_NAME_CHARS: Final = _NAME_START | _DIGITS
_OPERAND: Final = "a number, a signal, a function call or '('"


class ExpressionError(ValueError):
    """A condition that does not parse: where (0-based ``position``) and why (``reason``)."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(f"position {position + 1}: {reason}")
        self.position = position
        self.reason = reason

    def __reduce__(self) -> tuple[type[ExpressionError], tuple[int, str]]:
        # The default would call __init__ with the formatted message alone.
        return (type(self), (self.position, self.reason))


# --- evaluation helpers -------------------------------------------------------------------


def _number(value: Value) -> Floats:
    if value.dtype == np.bool_:
        return value.astype(np.float64)
    return cast(Floats, value)


def _truth(value: Value) -> Bools:
    if value.dtype == np.bool_:
        return cast(Bools, value)
    number = cast(Floats, value)
    # Both comparisons are false for NaN, so unknown counts as false.
    return (number < 0) | (number > 0)


def _not_equal(left: Floats, right: Floats) -> Bools:
    # np.not_equal is true for NaN; unknown must not satisfy any comparison.
    return np.less(left, right) | np.greater(left, right)


_ARITHMETIC: Final[dict[str, Callable[[Floats, Floats], Floats]]] = {
    "+": np.add,
    "-": np.subtract,
    "*": np.multiply,
    "/": np.divide,
}
_COMPARISONS: Final[dict[str, Callable[[Floats, Floats], Bools]]] = {
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
    "==": np.equal,
    "!=": _not_equal,
}


class _Series:
    """One signal's samples for the window functions of one evaluation.

    Prefix sums and sparse tables are built on first use and shared by every window over
    the signal, whatever its length.
    """

    __slots__ = (
        "_counts",
        "_neg_inf",
        "_offset",
        "_pos_inf",
        "_sums",
        "_tables",
        "times",
        "values",
    )

    def __init__(self, times: Ints, values: Floats) -> None:
        self.times = times
        self.values = values
        self._counts: Ints | None = None
        self._sums: Floats | None = None
        self._pos_inf: Ints | None = None
        self._neg_inf: Ints | None = None
        self._offset = 0.0
        self._tables: dict[str, list[Floats]] = {}

    def bounds(self, t_ns: Ints, window_ns: int) -> tuple[Ints, Ints]:
        """The samples of each point's window: indices [lo, hi)."""
        # Saturate rather than wrap for timestamps near the bottom of int64.
        start = np.maximum(t_ns, np.iinfo(np.int64).min + window_ns) - window_ns
        lo = np.searchsorted(self.times, start, side="right").astype(np.int64)
        hi = np.searchsorted(self.times, t_ns, side="right").astype(np.int64)
        return lo, hi

    def counts(self, lo: Ints, hi: Ints) -> Ints:
        """How many samples of each window are not NaN."""
        if self._counts is None:
            self._counts = _prefix(~np.isnan(self.values))
        return cast(Ints, self._counts[hi] - self._counts[lo])

    def mean(self, lo: Ints, hi: Ints) -> Floats:
        values = self.values
        if self._sums is None:
            finite = np.isfinite(values)
            # Summing distances from one sample, not the raw values, keeps the prefix sums
            # small for a signal that sits near a large value, and exact for a constant one.
            self._offset = float(values[finite][0]) if finite.any() else 0.0
            self._sums = np.concatenate(
                ([0.0], np.cumsum(np.where(finite, values - self._offset, 0.0)))
            )
            # Infinities are counted apart: in the sums one would poison every later window.
            self._pos_inf = _prefix(values == np.inf)
            self._neg_inf = _prefix(values == -np.inf)
        assert self._pos_inf is not None and self._neg_inf is not None
        count = self.counts(lo, hi)
        pos_inf = self._pos_inf[hi] - self._pos_inf[lo]
        neg_inf = self._neg_inf[hi] - self._neg_inf[lo]
        finite_count = count - pos_inf - neg_inf
        total = self._sums[hi] - self._sums[lo]
        mean = np.where(
            finite_count > 0, self._offset + total / np.maximum(finite_count, 1), np.nan
        )
        mean = np.where(pos_inf > 0, np.inf, mean)
        mean = np.where(neg_inf > 0, -np.inf, mean)
        return cast(Floats, np.where(((pos_inf > 0) & (neg_inf > 0)) | (count == 0), np.nan, mean))

    def extreme(self, kind: str, lo: Ints, hi: Ints) -> Floats:
        """wmin or wmax of each window: a sparse table, two overlapping power-of-two spans."""
        reduce = np.minimum if kind == "wmin" else np.maximum
        out = np.full(lo.shape, np.nan)
        size = self.values.size
        if size == 0:
            return out
        count = self.counts(lo, hi)
        # Empty windows are answered with a one-sample span in range and masked at the end.
        length = np.maximum(hi - lo, 1)
        start = np.minimum(lo, size - 1)
        # floor(log2(length)), exact for any int below 2**53.
        level = np.frexp(length.astype(np.float64))[1].astype(np.int64) - 1
        table = self._table(kind, int(level.max()))
        for k in range(len(table)):
            chosen = np.flatnonzero(level == k)
            if chosen.size:
                first = start[chosen]
                last = first + length[chosen] - (1 << k)
                out[chosen] = reduce(table[k][first], table[k][last])
        # + 0.0: every zero +0.0, as for min() and max().
        return cast(Floats, np.where(count > 0, out + 0.0, np.nan))

    def _table(self, kind: str, top: int) -> list[Floats]:
        table = self._tables.get(kind)
        if table is None:
            # NaN samples turn into the value that never wins; all-NaN windows are masked.
            neutral = np.inf if kind == "wmin" else -np.inf
            table = [np.where(np.isnan(self.values), neutral, self.values)]
            self._tables[kind] = table
        reduce = np.minimum if kind == "wmin" else np.maximum
        # Level k holds the extreme of the 2**k samples from each index on.
        while len(table) <= top:
            half = 1 << (len(table) - 1)
            below = table[-1]
            table.append(reduce(below[:-half], below[half:]))
        return table


def _prefix(flags: Bools) -> Ints:
    return np.concatenate(([0], np.cumsum(flags, dtype=np.int64)))


@dataclass(slots=True)
class _Context:
    t_ns: Ints
    held: Mapping[str, Floats]
    series: dict[str, _Series]


# --- the tree -----------------------------------------------------------------------------


class _Node:
    __slots__ = ()

    def evaluate(self, context: _Context) -> Value:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Number(_Node):
    value: float

    def evaluate(self, context: _Context) -> Value:
        return np.full(context.t_ns.shape, self.value, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class Signal(_Node):
    name: str

    def evaluate(self, context: _Context) -> Value:
        return context.held[self.name]


@dataclass(frozen=True, slots=True)
class Unary(_Node):
    operator: str  # "-" or "+"
    operand: _Node

    def evaluate(self, context: _Context) -> Value:
        value = _number(self.operand.evaluate(context))
        return cast(Floats, np.negative(value)) if self.operator == "-" else value


@dataclass(frozen=True, slots=True)
class Arithmetic(_Node):
    """``first op node op node ...`` of one precedence level, applied left to right.

    A chain rather than nested pairs, so that a long sum is not a deep tree.
    """

    first: _Node
    rest: tuple[tuple[str, _Node], ...]

    def evaluate(self, context: _Context) -> Value:
        result = _number(self.first.evaluate(context))
        for operator, node in self.rest:
            result = _ARITHMETIC[operator](result, _number(node.evaluate(context)))
        return result


@dataclass(frozen=True, slots=True)
class Comparison(_Node):
    operator: str
    left: _Node
    right: _Node

    def evaluate(self, context: _Context) -> Value:
        return _COMPARISONS[self.operator](
            _number(self.left.evaluate(context)), _number(self.right.evaluate(context))
        )


@dataclass(frozen=True, slots=True)
class And(_Node):
    operands: tuple[_Node, ...]

    def evaluate(self, context: _Context) -> Value:
        result = _truth(self.operands[0].evaluate(context))
        for operand in self.operands[1:]:
            result = result & _truth(operand.evaluate(context))
        return result


@dataclass(frozen=True, slots=True)
class Or(_Node):
    operands: tuple[_Node, ...]

    def evaluate(self, context: _Context) -> Value:
        result = _truth(self.operands[0].evaluate(context))
        for operand in self.operands[1:]:
            result = result | _truth(operand.evaluate(context))
        return result


@dataclass(frozen=True, slots=True)
class Not(_Node):
    operand: _Node

    def evaluate(self, context: _Context) -> Value:
        return ~_truth(self.operand.evaluate(context))


@dataclass(frozen=True, slots=True)
class Abs(_Node):
    operand: _Node

    def evaluate(self, context: _Context) -> Value:
        return cast(Floats, np.abs(_number(self.operand.evaluate(context))))


@dataclass(frozen=True, slots=True)
class Extreme(_Node):
    function: str  # "min" or "max"
    operands: tuple[_Node, ...]

    def evaluate(self, context: _Context) -> Value:
        # np.minimum/np.maximum, not fmin/fmax: one unknown operand makes the result unknown.
        reduce = np.minimum if self.function == "min" else np.maximum
        result = _number(self.operands[0].evaluate(context))
        for operand in self.operands[1:]:
            result = reduce(result, _number(operand.evaluate(context)))
        # Which zero wins a tie of -0.0 and 0.0 is numpy's choice, and shows in 1 / min(...):
        # adding 0.0 makes every zero +0.0.
        return result + 0.0


@dataclass(frozen=True, slots=True)
class Window(_Node):
    function: str  # "mean", "wmin" or "wmax"
    signal: str
    milliseconds: float
    nanoseconds: int

    def evaluate(self, context: _Context) -> Value:
        series = context.series[self.signal]
        lo, hi = series.bounds(context.t_ns, self.nanoseconds)
        if self.function == "mean":
            return series.mean(lo, hi)
        return series.extreme(self.function, lo, hi)


# --- text to tree -------------------------------------------------------------------------

_NUM, _NAME, _KEYWORD, _OP, _LPAREN, _RPAREN, _COMMA, _END = (
    "number",
    "name",
    "keyword",
    "operator",
    "(",
    ")",
    ",",
    "end",
)
_CMP_OPS: Final = frozenset(_COMPARISONS)
_TWO_CHAR_OPS: Final = frozenset({"<=", ">=", "==", "!="})
_ONE_CHAR_OPS: Final = frozenset("<>+-*/")
_MISTAKES: Final = {
    "=": "unexpected '='; compare with '=='",
    "!": "unexpected '!'; use '!=' or 'not'",
    "&": "unexpected '&'; use 'and'",
    "|": "unexpected '|'; use 'or'",
}


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    text: str
    position: int
    value: float = 0.0

    def found(self) -> str:
        return "end of expression" if self.kind == _END else repr(self.text)


def _lex(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)

    def at(j: int) -> str:
        return text[j] if j < n else ""

    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in _DIGITS or (c == "." and at(i + 1) in _DIGITS):
            tokens.append(_lex_number(text, i))
            i += len(tokens[-1].text)
        elif c in _NAME_START:
            j = i + 1
            while at(j) in _NAME_CHARS:
                j += 1
            qualified = at(j) == "."
            if qualified:
                if at(j + 1) not in _NAME_START:
                    raise ExpressionError(
                        j + 1, f"expected a signal name after {text[i : j + 1]!r}"
                    )
                j += 2
                while at(j) in _NAME_CHARS:
                    j += 1
                if at(j) == ".":
                    raise ExpressionError(
                        j, "a signal reference is 'Signal' or 'Message.Signal', with one '.'"
                    )
            name = text[i:j]
            kind = _KEYWORD if not qualified and name in KEYWORDS else _NAME
            tokens.append(_Token(kind, name, i))
            i = j
        elif text.startswith(tuple(_TWO_CHAR_OPS), i):
            tokens.append(_Token(_OP, text[i : i + 2], i))
            i += 2
        elif c in _ONE_CHAR_OPS:
            tokens.append(_Token(_OP, c, i))
            i += 1
        elif c in "(),":
            tokens.append(_Token({"(": _LPAREN, ")": _RPAREN, ",": _COMMA}[c], c, i))
            i += 1
        else:
            raise ExpressionError(i, _MISTAKES.get(c, f"unexpected character {c!r}"))
    tokens.append(_Token(_END, "", n))
    return tokens


def _lex_number(text: str, start: int) -> _Token:
    n = len(text)

    def run(j: int, allowed: frozenset[str]) -> int:
        while j < n and text[j] in allowed:
            j += 1
        return j

    if text.startswith(("0x", "0X"), start):
        end = run(start + 2, _HEX_DIGITS)
        if end == start + 2:
            raise ExpressionError(end, f"expected hex digits after {text[start:end]!r}")
    else:
        end = run(start, _DIGITS)
        if end < n and text[end] == ".":
            end = run(end + 1, _DIGITS)
        if end < n and text[end] in "eE":
            digits = end + 1
            if digits < n and text[digits] in "+-":
                digits += 1
            end = run(digits, _DIGITS)
            if end == digits:
                raise ExpressionError(
                    digits, f"expected the digits of the exponent after {text[start:digits]!r}"
                )
    literal = text[start:end]
    if end < n and (text[end] in _NAME_CHARS or text[end] == "."):
        raise ExpressionError(end, f"unexpected {text[end]!r} after the number {literal!r}")
    try:
        value = float(int(literal, 16)) if literal[1:2] in ("x", "X") else float(literal)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ExpressionError(start, f"the number {literal!r} is too large")
    return _Token(_NUM, literal, start, value)


@dataclass(frozen=True, slots=True)
class _Argument:
    node: _Node
    start: int
    end: int


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _lex(text)
        self.index = 0
        self.nesting = 0
        self.window_ns: dict[str, int] = {}
        self.window_ms: dict[str, int] = {}

    @property
    def token(self) -> _Token:
        return self.tokens[self.index]

    def advance(self) -> _Token:
        token = self.tokens[self.index]
        self.index = min(self.index + 1, len(self.tokens) - 1)
        return token

    def is_op(self, *operators: str) -> bool:
        return self.token.kind == _OP and self.token.text in operators

    def expect(self, kind: str) -> _Token:
        if self.token.kind != kind:
            raise ExpressionError(
                self.token.position, f"expected {kind!r}, found {self.token.found()}"
            )
        return self.advance()

    def whole(self) -> _Node:
        node = self.disjunction()
        token = self.token
        if token.kind == _RPAREN:
            raise ExpressionError(token.position, "unexpected ')' without a matching '('")
        if token.kind != _END:
            raise ExpressionError(
                token.position,
                f"expected an operator or the end of the expression, found {token.found()}",
            )
        return node

    def nested(self, position: int) -> None:
        """Enter one more level of nesting (undone by ``self.nesting -= 1``)."""
        self.nesting += 1
        if self.nesting > MAX_NESTING:
            raise ExpressionError(
                position,
                f"nested too deeply: more than {MAX_NESTING} levels of parentheses, calls,"
                " signs or 'not'",
            )

    def is_keyword(self, keyword: str) -> bool:
        return self.token.kind == _KEYWORD and self.token.text == keyword

    def disjunction(self) -> _Node:
        operands = [self.conjunction()]
        while self.is_keyword("or"):
            self.advance()
            operands.append(self.conjunction())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def conjunction(self) -> _Node:
        operands = [self.negation()]
        while self.is_keyword("and"):
            self.advance()
            operands.append(self.negation())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def negation(self) -> _Node:
        if self.is_keyword("not"):
            self.nested(self.advance().position)
            node = Not(self.negation())
            self.nesting -= 1
            return node
        return self.comparison()

    def comparison(self) -> _Node:
        node = self.additive()
        if self.token.kind == _OP and self.token.text in _CMP_OPS:
            operator = self.advance().text
            node = Comparison(operator, node, self.additive())
            if self.token.kind == _OP and self.token.text in _CMP_OPS:
                raise ExpressionError(
                    self.token.position,
                    f"comparisons do not chain: found {self.token.text!r} after a comparison;"
                    " join them with 'and'",
                )
        return node

    def additive(self) -> _Node:
        return self.chain(self.multiplicative, ("+", "-"))

    def multiplicative(self) -> _Node:
        return self.chain(self.unary, ("*", "/"))

    def chain(self, operand: Callable[[], _Node], operators: tuple[str, ...]) -> _Node:
        first = operand()
        rest: list[tuple[str, _Node]] = []
        while self.is_op(*operators):
            operator = self.advance().text
            rest.append((operator, operand()))
        return Arithmetic(first, tuple(rest)) if rest else first

    def unary(self) -> _Node:
        if self.is_op("-", "+"):
            token = self.advance()
            self.nested(token.position)
            node = Unary(token.text, self.unary())
            self.nesting -= 1
            return node
        return self.primary()

    def primary(self) -> _Node:
        token = self.token
        if token.kind == _NUM:
            self.advance()
            return Number(token.value)
        if token.kind == _NAME:
            self.advance()
            if self.token.kind == _LPAREN:
                return self.call(token)
            if token.text in FUNCTIONS:
                raise ExpressionError(
                    self.token.position,
                    f"expected '(' after the function {token.text!r}, found"
                    f" {self.token.found()} (function names are not signal names)",
                )
            return Signal(token.text)
        if token.kind == _LPAREN:
            self.nested(self.advance().position)
            node = self.disjunction()
            self.expect(_RPAREN)
            self.nesting -= 1
            return node
        if token.kind == _END:
            raise ExpressionError(
                token.position, f"unexpected end of expression: expected {_OPERAND}"
            )
        hint = " ('not ...' needs parentheses here)" if token.text == "not" else ""
        raise ExpressionError(token.position, f"expected {_OPERAND}, found {token.found()}{hint}")

    def call(self, name: _Token) -> _Node:
        function = name.text
        if "." in function:
            raise ExpressionError(name.position, f"{function!r} is a signal, not a function")
        if function not in FUNCTIONS:
            raise ExpressionError(
                name.position,
                f"unknown function {function!r}; the functions are {', '.join(FUNCTIONS)}",
            )
        self.nested(self.expect(_LPAREN).position)
        arguments: list[_Argument] = []
        if self.token.kind != _RPAREN:
            while True:
                start = self.token.position
                node = self.disjunction()
                previous = self.tokens[self.index - 1]
                arguments.append(_Argument(node, start, previous.position + len(previous.text)))
                if self.token.kind == _COMMA:
                    self.advance()
                elif self.token.kind == _RPAREN:
                    break
                else:
                    raise ExpressionError(
                        self.token.position,
                        f"expected ',' or ')' in the arguments of {function}(),"
                        f" found {self.token.found()}",
                    )
        close = self.advance().position
        self.nesting -= 1
        if function == "abs":
            self.count(function, arguments, close, 1, 1, "1 argument")
            return Abs(arguments[0].node)
        if function in ("min", "max"):
            self.count(function, arguments, close, 2, None, "2 or more arguments")
            return Extreme(function, tuple(argument.node for argument in arguments))
        self.count(function, arguments, close, 2, 2, "2 arguments, a signal and a window in ms")
        return self.window(function, arguments[0], arguments[1])

    def count(
        self,
        function: str,
        arguments: list[_Argument],
        close: int,
        least: int,
        most: int | None,
        wanted: str,
    ) -> None:
        given = len(arguments)
        if given < least:
            where = close
        elif most is not None and given > most:
            where = arguments[most].start
        else:
            return
        raise ExpressionError(where, f"{function}() takes {wanted}, got {given}")

    def window(self, function: str, signal: _Argument, window: _Argument) -> _Node:
        if not isinstance(signal.node, Signal):
            raise ExpressionError(
                signal.start,
                f"the first argument of {function}() must be a signal name,"
                f" found {self.text[signal.start : signal.end]!r}",
            )
        found = self.text[window.start : window.end]
        wanted = f"the window of {function}() must be a positive number of milliseconds"
        if not isinstance(window.node, Number) or window.node.value <= 0:
            raise ExpressionError(window.start, f"{wanted}, found {found!r}")
        milliseconds = window.node.value
        if milliseconds > MAX_WINDOW_MS:
            raise ExpressionError(
                window.start, f"{wanted} up to {MAX_WINDOW_MS:g}, found {found!r}"
            )
        nanoseconds = round(milliseconds * 1e6)
        if nanoseconds < 1:
            raise ExpressionError(
                window.start, f"{wanted} of at least 1e-6 (1 ns), found {found!r}"
            )
        name = signal.node.name
        self.window_ns[name] = max(self.window_ns.get(name, 0), nanoseconds)
        self.window_ms[name] = max(self.window_ms.get(name, 0), math.ceil(milliseconds))
        return Window(function, name, milliseconds, nanoseconds)


# --- the public face ----------------------------------------------------------------------


class Expression:
    """A parsed condition; build it with :func:`parse`."""

    __slots__ = ("_held", "_root", "_window_ns", "signals", "text", "windows")

    text: str
    signals: frozenset[str]  # every signal reference, as written
    windows: dict[str, int]  # per signal used in window functions: the longest window, ms

    def __init__(
        self,
        text: str,
        root: _Node,
        held: frozenset[str],
        window_ns: dict[str, int],
        window_ms: dict[str, int],
    ) -> None:
        self.text = text
        self._root = root
        self._held = held
        self._window_ns = window_ns
        self.signals = held | frozenset(window_ns)
        self.windows = window_ms

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"

    # Two rules with the same condition are the same rule: a reload or a campaign that
    # leaves them as they were keeps their open windows.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Expression) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def evaluate(
        self,
        t_ns: npt.NDArray[np.int64],
        held: Mapping[str, npt.NDArray[np.float64]],
        series: Mapping[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]],
    ) -> npt.NDArray[np.bool_]:
        """Whether the condition holds at each point of the timeline ``t_ns`` (ascending, ns).

        ``held`` gives, for each signal referenced outside a window function, its last value
        at or before each point (NaN before the first). ``series`` gives, for each signal in
        ``windows``, its samples (ascending times, values) from at least ``windows[name]`` ms
        before ``t_ns[0]``; later samples are ignored. Raises ValueError on a missing signal
        or an array of the wrong shape.
        """
        t_ns = np.asarray(t_ns, dtype=np.int64)
        if t_ns.ndim != 1:
            raise ValueError(f"the timeline must be one-dimensional, got shape {t_ns.shape}")
        points = t_ns.size
        values: dict[str, Floats] = {}
        for name in self._held:
            if name not in held:
                raise ValueError(f"no held values for signal {name!r}")
            values[name] = np.asarray(held[name], dtype=np.float64)
            if values[name].shape != (points,):
                raise ValueError(
                    f"held values of {name!r} have shape {values[name].shape},"
                    f" the timeline ({points},)"
                )
        samples: dict[str, _Series] = {}
        for name, window_ns in self._window_ns.items():
            if name not in series:
                raise ValueError(f"no samples for signal {name!r}, used in a window function")
            times = np.asarray(series[name][0], dtype=np.int64)
            readings = np.asarray(series[name][1], dtype=np.float64)
            if times.ndim != 1 or times.shape != readings.shape:
                raise ValueError(
                    f"samples of {name!r}: times of shape {times.shape},"
                    f" values of shape {readings.shape}"
                )
            if points:
                # Only the samples some window can reach: the tables are built over these.
                first = np.searchsorted(times, max(int(t_ns[0]) - window_ns, -(2**63)), "right")
                last = np.searchsorted(times, t_ns[-1], "right")
                times, readings = times[first:last], readings[first:last]
            samples[name] = _Series(times, readings)
        with np.errstate(all="ignore"):
            return _truth(self._root.evaluate(_Context(t_ns, values, samples)))


def parse(text: str) -> Expression:
    """Parse a condition once; raises :class:`ExpressionError` with where and why."""
    parser = _Parser(text)
    root = parser.whole()
    # A window's signal argument was parsed as a plain reference; it needs held values only
    # where it also appears outside a window.
    held = frozenset(_held_references(root))
    return Expression(text, root, held, parser.window_ns, parser.window_ms)


def _held_references(node: _Node) -> set[str]:
    if isinstance(node, Signal):
        return {node.name}
    if isinstance(node, Number | Window):
        return set()
    children: tuple[_Node, ...]
    if isinstance(node, Unary | Not | Abs):
        children = (node.operand,)
    elif isinstance(node, Extreme | And | Or):
        children = node.operands
    elif isinstance(node, Arithmetic):
        children = (node.first, *(operand for _, operand in node.rest))
    elif isinstance(node, Comparison):
        children = (node.left, node.right)
    else:
        raise TypeError(f"unknown node {node!r}")
    found: set[str] = set()
    for child in children:
        found |= _held_references(child)
    return found
