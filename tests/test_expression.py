"""The trigger-condition language (agent.collect.expression): parsing, errors, and evaluation
against a plain point-by-point reference written here, on generated expressions and data."""

from __future__ import annotations

import math
import operator
import pickle
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.collect.expression import Expression, ExpressionError, parse

NAN = math.nan
INF = math.inf


def run(text: str, **held: Sequence[float]) -> list[bool]:
    """Evaluate on a timeline as long as the held values (1 point when there are none)."""
    points = len(next(iter(held.values()))) if held else 1
    t_ns = np.arange(points, dtype=np.int64) * 1_000_000
    arrays = {name: np.array(values, dtype=np.float64) for name, values in held.items()}
    result = parse(text).evaluate(t_ns, arrays, {})
    assert result.dtype == np.bool_ and result.shape == (points,)
    return [bool(flag) for flag in result]


# --- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "1 - 2 - 3 == -4",  # left to right, not 1 - (2 - 3) == 2
        "8 / 4 / 2 == 1",
        "2 * 3 + 4 == 10",
        "2 + 3 * 4 == 14",
        "-2 * 3 == -6",
        "- -2 == 2",
        "2 * -3 == -6",
        "-2 - -3 == 1",
        "+2 == 2",
        "(1 + 2) * 3 == 9",
        "1 + 2 > 2 and 3 > 2",
        "1 or 0 and 0 == 1",  # 1 or (0 and (0 == 1))
        "(1 < 2) == 1",
        "(2 > 1) + 1 == 2",
        "not 0",
        "not not 1",
        "1 or 0 and 0",  # 1 or (0 and 0)
        "not (1 and 0)",
        "abs(-3) == 3 and min(4, 2, 3) == 2 and max(4, 2, 3) == 4",
        "min(1 + 1, 3) * 2 == 4",
        "0x1F == 31",
        "1e3 == 1000",
    ],
)
def test_true_constant_expressions(text: str) -> None:
    assert run(text) == [True]


@pytest.mark.parametrize(
    "text", ["(1 or 0) and 0", "1 and 0 or 0", "not 1 + 1", "0 / 0", "1 - 1", "-1 > 0"]
)
def test_false_constant_expressions(text: str) -> None:
    assert run(text) == [False]


def test_not_binds_looser_than_comparison_and_tighter_than_and() -> None:
    a = [0.0, 0.0, 5.0, 5.0, NAN]
    b = [0.0, 1.0, 0.0, 1.0, 1.0]
    # (not (a > 1)) and b; not ((a > 1) and b) would be [T, T, T, F, T].
    assert run("not a > 1 and b", a=a, b=b) == [False, True, False, False, True]
    assert run("not (a > 1 and b)", a=a, b=b) == [True, True, True, False, True]


def test_qualified_names_are_kept_as_written() -> None:
    expression = parse("Engine.Speed > 3000 and Speed < 10 or Brake.min == 1 or Msg.and")
    assert expression.signals == frozenset({"Engine.Speed", "Speed", "Brake.min", "Msg.and"})
    assert expression.windows == {}
    assert expression.text == "Engine.Speed > 3000 and Speed < 10 or Brake.min == 1 or Msg.and"
    assert repr(expression) == f"Expression({expression.text!r})"


def test_keywords_and_function_names_are_lowercase_only() -> None:
    assert parse("AND or Not or MEAN").signals == frozenset({"AND", "Not", "MEAN"})


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        ("42", 42.0),
        ("007", 7.0),
        ("2.5", 2.5),
        (".5", 0.5),
        ("5.", 5.0),
        ("1e3", 1000.0),
        ("1E3", 1000.0),
        ("2.5E-2", 0.025),
        ("2.5e+2", 250.0),
        (".5e1", 5.0),
        ("0x1F", 31.0),
        ("0X1f", 31.0),
        ("0xFFFFFFFFFFFFFFFF", float(2**64 - 1)),
        ("1.7976931348623157e308", 1.7976931348623157e308),
    ],
)
def test_numbers(literal: str, value: float) -> None:
    assert run(f"x == {literal}", x=[value, value + 1]) == [True, value + 1 == value]


def test_signals_and_windows() -> None:
    expression = parse("mean(A.x, 500) > wmax(A.x, 1500) or wmin(b, 2.5) < c + mean(A.x, 20)")
    assert expression.signals == frozenset({"A.x", "b", "c"})
    # The longest window per signal, rounded up to whole ms.
    assert expression.windows == {"A.x": 1500, "b": 3}
    assert isinstance(expression, Expression)


def test_a_window_signal_needs_samples_not_held_values() -> None:
    t_ns = np.array([0, 1_000_000], dtype=np.int64)
    times = np.array([0, 1_000_000], dtype=np.int64)
    values = np.array([1.0, 3.0])
    expression = parse("mean(s, 2) > 1.5")
    result = expression.evaluate(t_ns, {}, {"s": (times, values)})
    assert result.tolist() == [False, True]
    with pytest.raises(ValueError, match="no samples for signal 's'"):
        expression.evaluate(t_ns, {}, {})
    with pytest.raises(ValueError, match="no held values for signal 's'"):
        parse("s + mean(s, 2)").evaluate(t_ns, {}, {"s": (times, values)})
    with pytest.raises(ValueError, match="shape"):
        parse("s").evaluate(t_ns, {"s": values[:1]}, {})


# --- errors ---------------------------------------------------------------------------------

NESTED = "nested too deeply: more than 32 levels of parentheses, calls, signs or 'not'"
ERRORS = [
    ("", 0, "unexpected end of expression: expected a number, a signal, a function call or '('"),
    ("   ", 3, "unexpected end of expression: expected a number, a signal, a function call or '('"),
    ("a +", 3, "unexpected end of expression: expected a number, a signal, a function call or '('"),
    ("a * * b", 4, "expected a number, a signal, a function call or '(', found '*'"),
    ("a and or b", 6, "expected a number, a signal, a function call or '(', found 'or'"),
    (
        "1 + not a",
        4,
        "expected a number, a signal, a function call or '(', found 'not'"
        " ('not ...' needs parentheses here)",
    ),
    ("a $ b", 2, "unexpected character '$'"),
    ("speed \u00b0", 6, "unexpected character '\u00b0'"),
    ("a = 1", 2, "unexpected '='; compare with '=='"),
    ("!a", 0, "unexpected '!'; use '!=' or 'not'"),
    ("a && b", 2, "unexpected '&'; use 'and'"),
    ("a || b", 2, "unexpected '|'; use 'or'"),
    ("(a + 1", 6, "expected ')', found end of expression"),
    ("(a + 1 b", 7, "expected ')', found 'b'"),
    ("((a)", 4, "expected ')', found end of expression"),
    ("a + 1)", 5, "unexpected ')' without a matching '('"),
    ("a b", 2, "expected an operator or the end of the expression, found 'b'"),
    ("abs(a) 2", 7, "expected an operator or the end of the expression, found '2'"),
    ("a (b)", 0, "unknown function 'a'; the functions are abs, max, mean, min, wmax, wmin"),
    ("1 + foo(2)", 4, "unknown function 'foo'; the functions are abs, max, mean, min, wmax, wmin"),
    ("A.b(1)", 0, "'A.b' is a signal, not a function"),
    (
        "mean > 1",
        5,
        "expected '(' after the function 'mean', found '>' (function names are not signal names)",
    ),
    ("abs()", 4, "abs() takes 1 argument, got 0"),
    ("abs(a, b)", 7, "abs() takes 1 argument, got 2"),
    ("min(a)", 5, "min() takes 2 or more arguments, got 1"),
    ("max()", 4, "max() takes 2 or more arguments, got 0"),
    ("mean(a)", 6, "mean() takes 2 arguments, a signal and a window in ms, got 1"),
    ("wmin(a, 10, 20)", 12, "wmin() takes 2 arguments, a signal and a window in ms, got 3"),
    ("max(a, b", 8, "expected ',' or ')' in the arguments of max(), found end of expression"),
    ("max(a b)", 6, "expected ',' or ')' in the arguments of max(), found 'b'"),
    ("max(a,)", 6, "expected a number, a signal, a function call or '(', found ')'"),
    ("mean(a + 1, 5)", 5, "the first argument of mean() must be a signal name, found 'a + 1'"),
    ("wmax(3, 5)", 5, "the first argument of wmax() must be a signal name, found '3'"),
    ("mean(a, 0)", 8, "the window of mean() must be a positive number of milliseconds, found '0'"),
    (
        "wmin(a,  -5)",
        9,
        "the window of wmin() must be a positive number of milliseconds, found '-5'",
    ),
    ("mean(a, b)", 8, "the window of mean() must be a positive number of milliseconds, found 'b'"),
    (
        "mean(a, 2 * 3)",
        8,
        "the window of mean() must be a positive number of milliseconds, found '2 * 3'",
    ),
    (
        "mean(a, 1e13)",
        8,
        "the window of mean() must be a positive number of milliseconds up to 1e+12, found '1e13'",
    ),
    (
        "mean(a, 1e-7)",
        8,
        "the window of mean() must be a positive number of milliseconds of at least 1e-6 (1 ns),"
        " found '1e-7'",
    ),
    (
        "a < b < c",
        6,
        "comparisons do not chain: found '<' after a comparison; join them with 'and'",
    ),
    (
        "1 == 1 != 0",
        7,
        "comparisons do not chain: found '!=' after a comparison; join them with 'and'",
    ),
    ("1e", 2, "expected the digits of the exponent after '1e'"),
    ("2.5E-", 5, "expected the digits of the exponent after '2.5E-'"),
    ("0x", 2, "expected hex digits after '0x'"),
    ("0xG1", 2, "expected hex digits after '0x'"),
    ("12abc", 2, "unexpected 'a' after the number '12'"),
    ("0x1FG", 4, "unexpected 'G' after the number '0x1F'"),
    ("1.5.3", 3, "unexpected '.' after the number '1.5'"),
    ("1e999", 0, "the number '1e999' is too large"),
    ("Msg.", 4, "expected a signal name after 'Msg.'"),
    ("Msg.1x", 4, "expected a signal name after 'Msg.'"),
    ("A.b.c", 3, "a signal reference is 'Signal' or 'Message.Signal', with one '.'"),
    ("(" * 33 + "a" + ")" * 33, 32, NESTED),
    ("-" * 40 + "a", 32, NESTED),
    ("abs(" * 20 + "not " * 13 + "a" + ")" * 20, 4 * 20 + 4 * 12, NESTED),
]


@pytest.mark.parametrize(("text", "position", "reason"), ERRORS)
def test_errors_say_where_and_why(text: str, position: int, reason: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        parse(text)
    error = caught.value
    assert (error.position, error.reason) == (position, reason)
    assert str(error) == f"position {position + 1}: {reason}"
    assert isinstance(error, ValueError)


def test_nesting_up_to_the_limit_and_long_chains() -> None:
    assert run("(" * 32 + "a" + ")" * 32, a=[1.0, 0.0]) == [True, False]
    # Chains of one precedence level are flat, however long: no recursion per term.
    assert run(" + ".join(["a"] * 5000) + " == 5000", a=[1.0, 2.0]) == [True, False]
    assert run(" - ".join(["a"] * 3000) + " == -2998", a=[1.0]) == [True]
    assert run(" or ".join(["a > 1 and a < 3"] * 2000), a=[2.0, 4.0]) == [True, False]


def test_the_briefs_examples_read_as_given() -> None:
    with pytest.raises(ExpressionError, match=r"^position 1: unexpected end of expression"):
        parse("")
    with pytest.raises(ExpressionError, match=r"^position 7: expected '\)'"):
        parse("(a + 1")


def test_errors_pickle() -> None:
    error = ExpressionError(3, "expected ')', found 'b'")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.position, copy.reason, str(copy)) == (3, error.reason, str(error))


# --- evaluation: fixed cases ----------------------------------------------------------------


def test_numbers_are_true_when_neither_zero_nor_nan() -> None:
    assert run("a", a=[NAN, 0.0, -0.0, 1.0, -2.0, INF, 5e-324]) == [
        False,
        False,
        False,
        True,
        True,
        True,
        True,
    ]


@pytest.mark.parametrize("op", ["<", "<=", ">", ">=", "==", "!="])
def test_every_comparison_with_unknown_is_false(op: str) -> None:
    assert run(f"a {op} b", a=[NAN, 1.0, NAN], b=[1.0, NAN, NAN]) == [False] * 3
    assert run(f"not a {op} b", a=[NAN], b=[NAN]) == [True]


def test_division_by_zero_is_silent_ieee() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run("1 / a == 1 / 0", a=[0.0, -0.0, 1.0]) == [True, False, False]
        assert run("1 / a < 0", a=[-0.0]) == [True]
        assert run("a / a == a / a", a=[0.0]) == [False]  # NaN
        assert run("a * 1e308 * 10 > 1e308", a=[1.0]) == [True]
        assert run("a - a", a=[INF]) == [False]


def test_min_and_max_carry_unknown_and_give_positive_zero() -> None:
    assert run("min(a, 1) < 2 or max(a, 1) > 0", a=[NAN]) == [False]
    assert run("1 / min(a, -0) > 0 and 1 / max(-0, a) > 0", a=[0.0, -0.0]) == [True, True]


def test_booleans_are_numbers_where_numbers_are_needed() -> None:
    assert run("(a > 1) + (a > 2) == 2", a=[0.0, 1.5, 3.0]) == [False, False, True]
    assert run("-(a > 1) == -1", a=[0.0, 3.0]) == [False, True]


def test_an_empty_timeline() -> None:
    empty = np.zeros(0, dtype=np.int64)
    result = parse("a > 1 or mean(s, 5) > 1").evaluate(
        empty, {"a": np.zeros(0)}, {"s": (np.array([1], dtype=np.int64), np.array([2.0]))}
    )
    assert result.dtype == np.bool_ and result.shape == (0,)


def test_the_result_is_a_new_array() -> None:
    held = np.array([1.0, 0.0])
    result = parse("+a").evaluate(np.arange(2, dtype=np.int64), {"a": held}, {})
    result[:] = False
    assert held.tolist() == [1.0, 0.0]


# --- the reference evaluator -----------------------------------------------------------------

Scalar = float | bool


@dataclass(frozen=True)
class Data:
    t_ns: list[int]
    held: dict[str, list[float]]
    series: dict[str, tuple[list[int], list[float]]]

    def arrays(
        self,
    ) -> tuple[
        npt.NDArray[np.int64],
        dict[str, npt.NDArray[np.float64]],
        dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]],
    ]:
        return (
            np.array(self.t_ns, dtype=np.int64),
            {name: np.array(values, dtype=np.float64) for name, values in self.held.items()},
            {
                name: (np.array(times, dtype=np.int64), np.array(values, dtype=np.float64))
                for name, (times, values) in self.series.items()
            },
        )

    def window(self, signal: str, ms: float, point: int) -> list[float]:
        """The signal's non-NaN samples in (t - ms, t], by a walk over all of them."""
        t = self.t_ns[point]
        width = round(ms * 1_000_000)
        times, values = self.series[signal]
        return [
            value
            for time, value in zip(times, values, strict=True)
            if t - width < time <= t and not math.isnan(value)
        ]


Reference = Callable[[Data, int], Scalar]


def number(value: Scalar) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    return value


def truth(value: Scalar) -> bool:
    if isinstance(value, bool):
        return value
    return value != 0.0 and not math.isnan(value)


def divide(a: float, b: float) -> float:
    if b == 0.0:
        if a == 0.0 or math.isnan(a):
            return NAN
        return math.copysign(INF, a) * math.copysign(1.0, b)
    return a / b


def extreme(values: Sequence[float], pick: Callable[[Sequence[float]], float]) -> float:
    if any(math.isnan(value) for value in values):
        return NAN
    return pick(values) + 0.0


def window_extreme(values: list[float], pick: Callable[[Sequence[float]], float]) -> float:
    return pick(values) + 0.0 if values else NAN


def window_mean(values: list[float]) -> float:
    if not values:
        return NAN
    if INF in values and -INF in values:
        return NAN
    if INF in values or -INF in values:
        return INF if INF in values else -INF
    return math.fsum(values) / len(values)


ARITHMETIC: dict[str, Callable[[float, float], float]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": divide,
}
COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


# --- generated expressions --------------------------------------------------------------------

# How tightly a piece of text binds; a child that binds looser than its place needs parentheses.
OR, AND, NOT, CMP, ADD, MUL, UNARY, ATOM = range(8)
SIGNALS = ("a", "b", "Msg.c")
WINDOW_MS = (0.5, 1, 2.5, 4)


@dataclass(frozen=True)
class Generated:
    text: str
    binds: int
    reference: Reference
    held: frozenset[str]
    windows: tuple[tuple[str, float], ...]


def place(child: Generated, needed: int, extra_parentheses: bool) -> str:
    if child.binds < needed or extra_parentheses:
        return f"({child.text})"
    return child.text


@st.composite
def literals(draw: st.DrawFn) -> Generated:
    kind = draw(st.sampled_from(["int", "hex", "exponent", "float"]))
    if kind == "float":
        value = draw(
            st.one_of(
                st.sampled_from([0.5, 2.5, 0.1, 1e-5, 1e300]),
                st.floats(min_value=0, allow_infinity=False, allow_nan=False),
            )
        )
        text = repr(value)
    else:
        whole = draw(st.one_of(st.integers(0, 3), st.integers(0, 2**70)))
        value = float(whole)
        if kind == "int":
            text = str(whole)
        elif kind == "hex":
            text = draw(st.sampled_from(["0x", "0X"])) + format(whole, "x")
        else:
            text = f"{whole}e0"
    return Generated(text, ATOM, lambda data, point: value, frozenset(), ())


@st.composite
def signal_references(draw: st.DrawFn) -> Generated:
    name = draw(st.sampled_from(SIGNALS))
    return Generated(name, ATOM, lambda data, point: data.held[name][point], frozenset({name}), ())


@st.composite
def window_calls(draw: st.DrawFn) -> Generated:
    function = draw(st.sampled_from(["wmin", "wmax"]))
    name = draw(st.sampled_from(SIGNALS))
    ms = draw(st.sampled_from(WINDOW_MS))
    pick = min if function == "wmin" else max

    def reference(data: Data, point: int) -> Scalar:
        return window_extreme(data.window(name, ms, point), pick)

    return Generated(f"{function}({name}, {ms})", ATOM, reference, frozenset(), ((name, ms),))


def combine(text: str, binds: int, reference: Reference, *parts: Generated) -> Generated:
    return Generated(
        text,
        binds,
        reference,
        frozenset().union(*(part.held for part in parts)),
        sum((part.windows for part in parts), ()),
    )


def extend(children: st.SearchStrategy[Generated]) -> st.SearchStrategy[Generated]:
    # Mostly none; sometimes redundant ones, which must not change anything.
    parens = st.sampled_from([False, False, False, True])
    spacing = st.sampled_from([" ", "", "  "])

    @st.composite
    def arithmetic(draw: st.DrawFn) -> Generated:
        op = draw(st.sampled_from("+-*/"))
        left, right = draw(children), draw(children)
        binds = ADD if op in "+-" else MUL
        gap = draw(spacing)
        # Left-associative: an equal-binding right operand needs parentheses.
        first = place(left, binds, draw(parens))
        text = f"{first}{gap}{op}{gap}{place(right, binds + 1, draw(parens))}"
        function = ARITHMETIC[op]

        def reference(data: Data, point: int) -> Scalar:
            return function(
                number(left.reference(data, point)), number(right.reference(data, point))
            )

        return combine(text, binds, reference, left, right)

    @st.composite
    def comparison(draw: st.DrawFn) -> Generated:
        op = draw(st.sampled_from(sorted(COMPARISONS)))
        left, right = draw(children), draw(children)
        gap = draw(spacing)
        text = f"{place(left, ADD, draw(parens))}{gap}{op}{gap}{place(right, ADD, draw(parens))}"
        function = COMPARISONS[op]

        def reference(data: Data, point: int) -> Scalar:
            a, b = number(left.reference(data, point)), number(right.reference(data, point))
            return not (math.isnan(a) or math.isnan(b)) and function(a, b)

        return combine(text, CMP, reference, left, right)

    @st.composite
    def logic(draw: st.DrawFn) -> Generated:
        keyword = draw(st.sampled_from(["and", "or"]))
        left, right = draw(children), draw(children)
        binds = AND if keyword == "and" else OR
        text = (
            f"{place(left, binds, draw(parens))} {keyword} {place(right, binds + 1, draw(parens))}"
        )

        def reference(data: Data, point: int) -> Scalar:
            a, b = truth(left.reference(data, point)), truth(right.reference(data, point))
            return (a and b) if keyword == "and" else (a or b)

        return combine(text, binds, reference, left, right)

    @st.composite
    def negation(draw: st.DrawFn) -> Generated:
        child = draw(children)

        def reference(data: Data, point: int) -> Scalar:
            return not truth(child.reference(data, point))

        return combine(f"not {place(child, NOT, draw(parens))}", NOT, reference, child)

    @st.composite
    def sign(draw: st.DrawFn) -> Generated:
        op = draw(st.sampled_from("-+"))
        child = draw(children)

        def reference(data: Data, point: int) -> Scalar:
            value = number(child.reference(data, point))
            return -value if op == "-" else value

        return combine(f"{op}{place(child, UNARY, draw(parens))}", UNARY, reference, child)

    @st.composite
    def call(draw: st.DrawFn) -> Generated:
        function = draw(st.sampled_from(["abs", "min", "max"]))
        count = 1 if function == "abs" else draw(st.integers(2, 3))
        arguments = [draw(children) for _ in range(count)]
        text = f"{function}({', '.join(argument.text for argument in arguments)})"

        def reference(data: Data, point: int) -> Scalar:
            values = [number(argument.reference(data, point)) for argument in arguments]
            if function == "abs":
                return abs(values[0])
            return extreme(values, min if function == "min" else max)

        return combine(text, ATOM, reference, *arguments)

    return st.one_of(arithmetic(), comparison(), logic(), negation(), sign(), call())


expressions = st.recursive(
    st.one_of(literals(), signal_references(), window_calls()), extend, max_leaves=10
)

values = st.one_of(
    st.sampled_from([NAN, 0.0, -0.0, 1.0, -1.0, 2.0, 0.5, 3.0, INF, -INF]),
    st.floats(allow_nan=True, allow_infinity=True),
)


@st.composite
def data_sets(draw: st.DrawFn, value_strategy: st.SearchStrategy[float] = values) -> Data:
    points = draw(st.integers(1, 8))
    start = draw(st.integers(0, 10**15))
    # Steps of 0.5 ms against windows of 0.5 to 4 ms; equal timestamps allowed.
    steps = draw(st.lists(st.integers(0, 3), min_size=points, max_size=points))
    t_ns = [start + 500_000 * sum(steps[: i + 1]) for i in range(points)]
    held = {
        name: draw(st.lists(value_strategy, min_size=points, max_size=points)) for name in SIGNALS
    }
    series: dict[str, tuple[list[int], list[float]]] = {}
    for name in SIGNALS:
        count = draw(st.integers(0, 14))
        gaps = draw(st.lists(st.integers(0, 3), min_size=count, max_size=count))
        # From 5 ms before the timeline, on a 0.25 ms grid that hits window edges exactly.
        times = [start - 5_000_000 + 250_000 * sum(gaps[: i + 1]) for i in range(count)]
        samples = draw(st.lists(value_strategy, min_size=count, max_size=count))
        series[name] = (times, samples)
    return Data(t_ns, held, series)


@settings(max_examples=300, deadline=None)
@given(generated=expressions, data=data_sets())
def test_generated_expressions_match_the_reference(generated: Generated, data: Data) -> None:
    expression = parse(generated.text)
    longest: dict[str, int] = {}
    for name, ms in generated.windows:
        longest[name] = max(longest.get(name, 0), math.ceil(ms))
    assert expression.signals == generated.held | frozenset(longest)
    assert expression.windows == longest

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may print a numpy warning
        result = expression.evaluate(*data.arrays())
    expected = [truth(generated.reference(data, point)) for point in range(len(data.t_ns))]
    assert result.tolist() == expected, generated.text


# --- windows --------------------------------------------------------------------------------


def window_expected(function: str, data: Data, name: str, ms: float) -> list[float]:
    pick = {"wmin": min, "wmax": max}.get(function)
    expected = []
    for point in range(len(data.t_ns)):
        samples = data.window(name, ms, point)
        expected.append(window_mean(samples) if pick is None else window_extreme(samples, pick))
    return expected


def check_window(function: str, data: Data, name: str, ms: float, tolerance: float) -> None:
    """The function's value at every point, compared inside the language with the reference
    passed in as a held signal (public API only)."""
    expected = window_expected(function, data, name, ms)
    t_ns, held, series = data.arrays()
    held = {"want": np.array(expected), "tolerance": np.full(len(expected), tolerance)}
    call = f"{function}({name}, {ms})"
    known = parse(f"{call} == {call}").evaluate(t_ns, held, series)
    assert known.tolist() == [not math.isnan(value) for value in expected], call
    close = parse(f"{call} == want or abs({call} - want) <= tolerance").evaluate(t_ns, held, series)
    assert close.tolist() == known.tolist(), (call, expected)


@settings(max_examples=200, deadline=None)
@given(
    data=data_sets(
        st.one_of(
            st.sampled_from([NAN, INF, -INF, 0.0, -0.0]),
            st.floats(min_value=-1e6, max_value=1e6),
        )
    ),
    ms=st.sampled_from(WINDOW_MS),
)
def test_windows_match_a_walk_over_the_samples(data: Data, ms: float) -> None:
    check_window("wmin", data, "b", ms, 0.0)
    check_window("wmax", data, "Msg.c", ms, 0.0)
    # Mean comes from prefix sums: rounding of the order of the running total.
    total = math.fsum(abs(value) for value in data.series["a"][1] if math.isfinite(value))
    check_window("mean", data, "a", ms, 1e-12 * (total + 1))


def test_long_windows_against_numpy_per_point() -> None:
    # Deep sparse-table levels (windows of up to ~2000 samples), NaN runs and history
    # before the timeline.
    rng = np.random.default_rng(7)
    times = np.cumsum(rng.integers(0, 3_000_000, 6000)).astype(np.int64)
    values = rng.normal(0.0, 100.0, times.size)
    values[rng.random(times.size) < 0.05] = np.nan
    values[1000:1400] = np.nan
    t_ns = np.sort(rng.integers(times[1500], times[-1] + 10_000_000, 1500)).astype(np.int64)
    for ms in (1, 7, 150, 2500):
        width = ms * 1_000_000
        lo = np.searchsorted(times, t_ns - width, side="right")
        hi = np.searchsorted(times, t_ns, side="right")
        want: dict[str, list[float]] = {"mean": [], "wmin": [], "wmax": []}
        for first, last in zip(lo, hi, strict=True):
            window = values[first:last]
            window = window[~np.isnan(window)]
            empty = window.size == 0
            want["mean"].append(NAN if empty else float(np.mean(window)))
            want["wmin"].append(NAN if empty else float(np.min(window)))
            want["wmax"].append(NAN if empty else float(np.max(window)))
        for function, expected in want.items():
            call = f"{function}(s, {ms})"
            held = {"want": np.array(expected)}
            series = {"s": (times, values)}
            same = parse(
                f"abs({call} - want) <= 1e-9 or not ({call} == {call} or want == want)"
            ).evaluate(t_ns, held, series)
            assert same.all(), (call, np.flatnonzero(~same)[:5])
            assert parse(call).windows == {"s": ms}


def test_conditions_compare_and_hash_by_their_text() -> None:
    # A reload or a campaign that brings a trigger rule back unchanged keeps its state.
    assert parse("SPEED > 60") == parse("SPEED > 60")
    assert hash(parse("SPEED > 60")) == hash(parse("SPEED > 60"))
    assert parse("SPEED > 60") != parse("SPEED > 61")
    assert parse("SPEED > 60") != "SPEED > 60"
