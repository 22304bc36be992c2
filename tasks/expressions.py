"""The small expression language of the ``derive`` transform.

``parse_expression('round(price * quantity, 2)')`` builds a tree of
:class:`Expr` nodes; :func:`evaluate_expression` runs it on a whole Arrow
batch with ``pyarrow.compute`` (one kernel call per node, never a Python loop
over rows). Nothing is ever ``eval``-ed: the text goes through a tokenizer and
a precedence-climbing parser, and function names come from an allow-list.

Grammar (loosest binding first)::

    expr        := or_expr
    or_expr     := and_expr ('or' and_expr)*
    and_expr    := not_expr ('and' not_expr)*
    not_expr    := 'not' not_expr | comparison
    comparison  := additive (('==' | '!=' | '<' | '<=' | '>' | '>=') additive)?
    additive    := term (('+' | '-') term)*
    term        := unary (('*' | '/' | '%') unary)*
    unary       := '-' unary | primary
    primary     := NUMBER | STRING | 'true' | 'false' | 'null'
                 | NAME '(' [expr (',' expr)*] ')'     -- function call
                 | NAME | `back quoted name`            -- column
                 | '(' expr ')'

Keywords and function names are case-insensitive; column names are not.
Strings use single quotes with ``''`` for a quote; backquotes name columns
that are not identifiers (`` `order id` ``, ``` `` ``` for a backquote).
Comparisons do not chain (``a < b < c`` is a syntax error).

Semantics:

* nulls propagate through operators and functions (``and``/``or`` use
  Kleene logic: ``null or true`` is true); ``coalesce``, ``is_null``,
  ``is_valid`` and ``min``/``max`` (which skip nulls) are the ways to handle them;
* ``+ - *`` and unary minus use Arrow's checked kernels: an overflow raises
  :class:`DataError`, it never wraps around;
* ``/`` is true division: integer / integer gives float64; division by zero
  (integer or float) raises :class:`DataError` rather than producing
  ``inf``/``NaN``/null. Write ``a / if_else(b == 0, null, b)`` to get null
  instead (both branches of ``if_else`` are computed, so ``if_else(b == 0,
  null, a / b)`` would still fail);
* ``%`` is the remainder with the sign of the dividend, as in SQL and C
  (``-7 % 2 == -1``); modulo by zero raises :class:`DataError`;
* integer literals are int64 and decimals like ``1.5`` float64; mixed types
  follow Arrow's promotion to the wider type (``int32_col + 1`` is int64, so
  it only overflows beyond the int64 range). ``null`` takes the type of the
  value it meets, a number meeting a decimal column becomes a decimal
  (``price * 1.1`` stays exact), and a string literal compared with a
  timestamp, date or decimal column is parsed as such
  (``created >= '2024-01-01'``).

Errors: a syntax error or unknown function raises :class:`ConfigurationError`
with the position; a type mismatch found while evaluating (``upper(42)``)
raises :class:`ConfigurationError` too, since no row could ever succeed; a
value that fails (overflow, division by zero, a failed cast) raises
:class:`DataError` naming the expression, the column and an example value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from ferry.backends.errors import ConfigurationError, DataError

__all__ = [
    "Expr",
    "Column",
    "Literal",
    "Unary",
    "Binary",
    "Call",
    "FUNCTIONS",
    "parse_expression",
    "evaluate_expression",
    "first_failing_row",
]


# --------------------------------------------------------------------------
# Syntax tree
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Expr:
    """Base class of expression nodes.

    ``source`` is the slice of the original text the node was parsed from;
    it is only used in messages and does not take part in equality.
    """

    source: str = field(default="", compare=False, repr=False, kw_only=True)

    def columns(self) -> set[str]:
        """Names of every column the expression reads."""
        return set().union(*(child.columns() for child in self.children()))

    def children(self) -> tuple["Expr", ...]:
        """Direct sub-expressions."""
        return ()

    def __str__(self) -> str:
        return self.source or repr(self)


@dataclass(frozen=True)
class Column(Expr):
    """A column reference."""

    name: str

    def columns(self) -> set[str]:
        return {self.name}


@dataclass(frozen=True)
class Literal(Expr):
    """A constant: int, float, str, bool or None."""

    value: Any


@dataclass(frozen=True)
class Unary(Expr):
    """``-x`` (op ``'-'``) or ``not x`` (op ``'not'``)."""

    op: str
    operand: Expr

    def children(self) -> tuple[Expr, ...]:
        return (self.operand,)


@dataclass(frozen=True)
class Binary(Expr):
    """An infix operation: arithmetic, comparison, ``and`` or ``or``."""

    op: str
    left: Expr
    right: Expr

    def children(self) -> tuple[Expr, ...]:
        return (self.left, self.right)


@dataclass(frozen=True)
class Call(Expr):
    """A call of an allowed function (see :data:`FUNCTIONS`)."""

    name: str
    args: tuple[Expr, ...]

    def children(self) -> tuple[Expr, ...]:
        return self.args


# --------------------------------------------------------------------------
# Functions
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Function:
    min_args: int
    max_args: int | None  # None: any number
    call: Callable[..., Any]
    # Positions of arguments that must be literals, with the kind expected:
    # "int" (a whole number), "natural" (a whole number >= 0) or "type" (a type name string).
    literals: dict[int, str] = field(default_factory=dict)
    # Literal arguments (nulls, numbers meeting decimals) take the type of the other arguments.
    unify: bool = False


def _substr(value, start: int, length: int | None = None):
    stop = None if length is None else start + length
    return pc.utf8_slice_codeunits(value, start=start, stop=stop)


def _concat(*values):
    # binary_join_element_wise wants one string type for every argument.
    large = any(pa.types.is_large_string(v.type) for v in values)
    target = pa.large_string() if large else pa.string()
    values = [v if v.type == target else pc.cast(v, target) for v in values]
    return pc.binary_join_element_wise(*values, pa.scalar("", target))


def _round(value, ndigits: int = 0):
    # Half away from zero, like SQL's ROUND (Arrow's default is half to even).
    return pc.round(value, ndigits=ndigits, round_mode="half_towards_infinity")


def _cast(value, type_name: str):
    return pc.cast(value, _parse_type(type_name), safe=True)


def _parse_type(type_name: str) -> pa.DataType:
    # Imported lazily: backends.types is written separately and imports nothing from here.
    from ferry.backends.types import parse_arrow_type

    return parse_arrow_type(type_name)


#: The allow-list of functions, by (lower-case) name.
FUNCTIONS: dict[str, _Function] = {
    "upper": _Function(1, 1, pc.utf8_upper),
    "lower": _Function(1, 1, pc.utf8_lower),
    "length": _Function(1, 1, pc.utf8_length),
    "trim": _Function(1, 1, pc.utf8_trim_whitespace),
    "substr": _Function(2, 3, _substr, literals={1: "natural", 2: "natural"}),
    "concat": _Function(1, None, _concat),
    "abs": _Function(1, 1, pc.abs_checked),
    "round": _Function(1, 2, _round, literals={1: "int"}),
    "floor": _Function(1, 1, pc.floor),
    "ceil": _Function(1, 1, pc.ceil),
    "sqrt": _Function(1, 1, pc.sqrt_checked),
    "coalesce": _Function(1, None, pc.coalesce, unify=True),
    "if_else": _Function(3, 3, pc.if_else, unify=True),
    "is_null": _Function(1, 1, pc.is_null),
    "is_valid": _Function(1, 1, pc.is_valid),
    "year": _Function(1, 1, pc.year),
    "month": _Function(1, 1, pc.month),
    "day": _Function(1, 1, pc.day),
    "hour": _Function(1, 1, pc.hour),
    "minute": _Function(1, 1, pc.minute),
    "second": _Function(1, 1, pc.second),
    "day_of_week": _Function(1, 1, pc.day_of_week),
    "date": _Function(1, 1, lambda v: pc.cast(v, pa.date32(), safe=True)),
    "cast": _Function(2, 2, _cast, literals={1: "type"}),
    "min": _Function(1, None, pc.min_element_wise, unify=True),
    "max": _Function(1, None, pc.max_element_wise, unify=True),
}


def _remainder(left, right):
    if hasattr(pc, "remainder_checked"):
        return pc.remainder_checked(left, right)
    # pyarrow < 21 has no remainder kernel: a - b * trunc(a / b).
    quotient = pc.divide_checked(left, right)
    if not pa.types.is_integer(quotient.type):
        quotient = pc.trunc(quotient)
    return pc.subtract_checked(left, pc.multiply_checked(right, quotient))


def _divide(left, right):
    # True division: two integers are divided as float64. The cast may round
    # integers beyond 2**53, which is the documented price of float division.
    if _is_integer_like(left.type) and _is_integer_like(right.type):
        left = pc.cast(left, pa.float64(), safe=False)
        right = pc.cast(right, pa.float64(), safe=False)
    return pc.divide_checked(left, right)


def _is_integer_like(arrow_type: pa.DataType) -> bool:
    return pa.types.is_integer(arrow_type) or pa.types.is_null(arrow_type)


_BINARY_FUNCTIONS: dict[str, Callable[[Any, Any], Any]] = {
    "+": pc.add_checked,
    "-": pc.subtract_checked,
    "*": pc.multiply_checked,
    "/": _divide,
    "%": _remainder,
    "==": pc.equal,
    "!=": pc.not_equal,
    "<": pc.less,
    "<=": pc.less_equal,
    ">": pc.greater,
    ">=": pc.greater_equal,
    "and": pc.and_kleene,
    "or": pc.or_kleene,
}

_COMPARISONS = frozenset({"==", "!=", "<", "<=", ">", ">="})

# Binding power of infix operators (higher binds tighter); `not` sits between
# `and` and the comparisons, unary minus above `*`.
_PRECEDENCE = {"or": 1, "and": 2, **{op: 4 for op in _COMPARISONS}, "+": 5, "-": 5, "*": 6, "/": 6, "%": 6}
_NOT_PRECEDENCE = 3
_UNARY_MINUS_PRECEDENCE = 7

_KEYWORDS = frozenset({"and", "or", "not", "true", "false", "null"})


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    kind: str  # number, string, name, quoted, op, eof
    value: Any
    start: int
    end: int


_NUMBER = re.compile(r"\d+(\.\d+)?([eE][+-]?\d+)?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = ("==", "!=", "<=", ">=", "<", ">", "+", "-", "*", "/", "%", "(", ")", ",")
_HINTS = {
    "=": "use '==' to compare",
    '"': "use 'single quotes' for strings and `backquotes` for column names",
    "&": "use 'and'",
    "|": "use 'or'",
    "!": "use 'not' or '!='",
}


def _tokenize(text: str, fail: Callable[[str, int], Exception]) -> list[_Token]:
    tokens: list[_Token] = []
    pos, end = 0, len(text)
    while pos < end:
        char = text[pos]
        if char.isspace():
            pos += 1
            continue
        if char.isdigit():
            match = _NUMBER.match(text, pos)
            literal = match.group(0)
            value: Any = int(literal) if match.group(1) is None and match.group(2) is None else float(literal)
            tokens.append(_Token("number", value, pos, match.end()))
            pos = match.end()
        elif char == "'" or char == "`":
            value, stop = _quoted(text, pos, char, fail)
            tokens.append(_Token("string" if char == "'" else "quoted", value, pos, stop))
            pos = stop
        elif char.isalpha() or char == "_":
            match = _NAME.match(text, pos)
            tokens.append(_Token("name", match.group(0), pos, match.end()))
            pos = match.end()
        else:
            for op in _OPERATORS:
                if text.startswith(op, pos):
                    tokens.append(_Token("op", op, pos, pos + len(op)))
                    pos += len(op)
                    break
            else:
                hint = _HINTS.get(char)
                raise fail(f"unexpected character {char!r}" + (f" ({hint})" if hint else ""), pos)
    tokens.append(_Token("eof", None, end, end))
    return tokens


def _quoted(text: str, start: int, quote: str, fail) -> tuple[str, int]:
    """Read a quoted string or name starting at ``start``; a doubled quote escapes itself."""
    parts, pos = [], start + 1
    while True:
        stop = text.find(quote, pos)
        if stop < 0:
            what = "string" if quote == "'" else "column name"
            raise fail(f"unterminated {what} (missing closing {quote})", start)
        parts.append(text[pos:stop])
        if text.startswith(quote * 2, stop):
            parts.append(quote)
            pos = stop + 2
            continue
        return "".join(parts), stop + 1


# --------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------


def parse_expression(text: str, *, source: str | None = None, path: str | None = None) -> Expr:
    """Parse ``text`` into an :class:`Expr`.

    Raises :class:`ConfigurationError` on a syntax error (with the 1-based
    character position and what was expected), an unknown function (listing
    the allowed ones), a wrong number of arguments or an unknown type name in
    ``cast``. ``source``/``path`` only serve the error message.
    """
    if not isinstance(text, str):
        raise ConfigurationError(f"expected an expression string, got {type(text).__name__}", source=source, path=path)
    return _Parser(text, source, path).parse()


class _Parser:
    def __init__(self, text: str, source: str | None, path: str | None):
        self.text = text
        self.source = source
        self.path = path
        self.tokens = _tokenize(text, self.error)
        self.index = 0

    # -- helpers -----------------------------------------------------------

    def error(self, message: str, pos: int) -> ConfigurationError:
        err = ConfigurationError(
            f"invalid expression {self.text!r} at position {pos + 1}: {message}",
            source=self.source,
            path=self.path,
        )
        err.position = pos + 1
        return err

    @property
    def current(self) -> _Token:
        return self.tokens[self.index]

    def advance(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def is_op(self, value: str) -> bool:
        return self.current.kind == "op" and self.current.value == value

    def keyword(self, token: _Token | None = None) -> str | None:
        token = token or self.current
        if token.kind == "name" and token.value.lower() in _KEYWORDS:
            return token.value.lower()
        return None

    def describe(self, token: _Token) -> str:
        if token.kind == "eof":
            return "end of expression"
        return repr(self.text[token.start : token.end])

    def expect(self, op: str, what: str) -> _Token:
        if not self.is_op(op):
            raise self.error(f"expected {what}, found {self.describe(self.current)}", self.current.start)
        return self.advance()

    def span(self, start: int, end: int) -> str:
        return self.text[start:end]

    # -- grammar -----------------------------------------------------------

    def parse(self) -> Expr:
        if self.current.kind == "eof":
            raise self.error("expected an expression, found nothing", 0)
        node, _, _ = self.expression(0)
        if self.current.kind != "eof":
            raise self.error(
                f"expected an operator or the end, found {self.describe(self.current)}", self.current.start
            )
        return node

    def infix_operator(self) -> str | None:
        token = self.current
        if token.kind == "op" and token.value in _PRECEDENCE:
            return token.value
        keyword = self.keyword(token)
        return keyword if keyword in ("and", "or") else None

    def expression(self, min_precedence: int) -> tuple[Expr, int, int]:
        left, start, end = self.prefix()
        while True:
            op = self.infix_operator()
            if op is None or _PRECEDENCE[op] < min_precedence:
                return left, start, end
            precedence = _PRECEDENCE[op]
            self.advance()
            # Left-associative: the right side only takes tighter operators.
            right, _, end = self.expression(precedence + 1)
            left = Binary(op, left, right, source=self.span(start, end))
            if op in _COMPARISONS and self.infix_operator() in _COMPARISONS:
                raise self.error(
                    "comparisons do not chain; write (a < b) and (b < c)", self.current.start
                )

    def prefix(self) -> tuple[Expr, int, int]:
        token = self.current
        keyword = self.keyword(token)
        if token.kind == "number":
            self.advance()
            return self.literal(token.value, token.start, token.end), token.start, token.end
        if token.kind == "string":
            self.advance()
            return Literal(token.value, source=self.span(token.start, token.end)), token.start, token.end
        if token.kind == "quoted":
            self.advance()
            return Column(token.value, source=self.span(token.start, token.end)), token.start, token.end
        if keyword in ("true", "false", "null"):
            self.advance()
            value = {"true": True, "false": False, "null": None}[keyword]
            return Literal(value, source=token.value), token.start, token.end
        if keyword == "not":
            self.advance()
            operand, _, end = self.expression(_NOT_PRECEDENCE)
            return Unary("not", operand, source=self.span(token.start, end)), token.start, end
        if token.kind == "name" and keyword is None:
            self.advance()
            if self.is_op("("):
                return self.call(token)
            return Column(token.value, source=token.value), token.start, token.end
        if self.is_op("-"):
            self.advance()
            number = self.current
            if number.kind == "number":
                # Fold -5 into one literal so that -9223372036854775808 is representable.
                self.advance()
                return self.literal(-number.value, token.start, number.end), token.start, number.end
            operand, _, end = self.expression(_UNARY_MINUS_PRECEDENCE)
            return Unary("-", operand, source=self.span(token.start, end)), token.start, end
        if self.is_op("("):
            self.advance()
            inner, _, _ = self.expression(0)
            close = self.expect(")", "')' to close the '(' at position %d" % (token.start + 1))
            return inner, token.start, close.end
        raise self.error(
            "expected a value (a column, a literal, a function call or '('), "
            f"found {self.describe(token)}",
            token.start,
        )

    def literal(self, value: Any, start: int, end: int) -> Literal:
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise self.error("integer literal does not fit in int64", start)
        return Literal(value, source=self.span(start, end))

    def call(self, name_token: _Token) -> tuple[Expr, int, int]:
        name = name_token.value.lower()
        function = FUNCTIONS.get(name)
        if function is None:
            raise self.error(
                f"unknown function {name_token.value!r}; allowed functions: {', '.join(sorted(FUNCTIONS))}",
                name_token.start,
            )
        self.advance()  # "("
        args: list[Expr] = []
        if not self.is_op(")"):
            while True:
                arg, _, _ = self.expression(0)
                args.append(arg)
                if not self.is_op(","):
                    break
                self.advance()
        close = self.expect(")", f"',' or ')' in the arguments of {name}()")
        self.check_arguments(name, function, args, name_token.start)
        node = Call(name, tuple(args), source=self.span(name_token.start, close.end))
        return node, name_token.start, close.end

    def check_arguments(self, name: str, function: _Function, args: list[Expr], pos: int) -> None:
        count = len(args)
        if count < function.min_args or (function.max_args is not None and count > function.max_args):
            if function.max_args is None:
                expected = f"at least {function.min_args}"
            elif function.min_args == function.max_args:
                expected = str(function.min_args)
            else:
                expected = f"{function.min_args} to {function.max_args}"
            raise self.error(f"{name}() takes {expected} argument(s), got {count}", pos)
        for index, kind in function.literals.items():
            if index >= count:
                continue
            arg = args[index]
            value = arg.value if isinstance(arg, Literal) else None
            if kind == "type":
                if not isinstance(value, str):
                    raise self.error(f"argument {index + 1} of {name}() must be a type name in quotes, e.g. 'int64'", pos)
                try:
                    _parse_type(value)
                except ConfigurationError as exc:
                    raise self.error(f"{name}(): {exc.message}", pos) from None
            elif type(value) is not int or (kind == "natural" and value < 0):
                what = "a whole number >= 0" if kind == "natural" else "a whole number"
                raise self.error(f"argument {index + 1} of {name}() must be {what}", pos)


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


class _Failure(Exception):
    """Internal: an Arrow kernel refused the values of one node."""

    def __init__(self, node: Expr, error: Exception):
        super().__init__(str(error))
        self.node = node
        self.error = error


def evaluate_expression(expr: Expr, batch: pa.RecordBatch, *, explain: bool = True) -> pa.Array:
    """Evaluate ``expr`` on every row of ``batch``; constants are broadcast.

    Returns an array of ``batch.num_rows`` values. Raises
    :class:`ConfigurationError` for a missing column or a type mismatch and
    :class:`DataError` when values fail (overflow, division by zero, a failed
    cast). With ``explain`` (the default) a failing batch is bisected to name
    the first failing row and its input values; pass ``explain=False`` when
    the caller isolates rows itself.
    """
    try:
        return _evaluate(expr, batch)
    except _Failure as failure:
        first = failure
    # The failure path: decide whether it is about the data at all.
    try:
        _evaluate(expr, _empty(batch))
    except _Failure as constant:
        raise ConfigurationError(
            f"expression {expr.source!r} always fails: {constant.error} in {constant.node.source!r}"
        ) from constant.error
    row = None
    if batch.num_rows == 1:
        row = 0
    elif explain:
        row = first_failing_row(lambda part: _evaluate(expr, part), batch, errors=(_Failure,))
        if row is not None:
            try:
                _evaluate(expr, batch.slice(row, 1))
            except _Failure as single:
                first = single  # the single row's failure names the exact node
    raise _data_error(expr, first, batch, row) from first.error


def _data_error(expr: Expr, failure: _Failure, batch: pa.RecordBatch, row: int | None) -> DataError:
    node = failure.node
    reason = f"{failure.error} in {node.source!r}"
    if node is not expr:
        reason += f" (expression {expr.source!r})"
    columns = sorted(node.columns())
    column = columns[0] if len(columns) == 1 else None
    value = None
    if row is not None:
        if batch.num_rows > 1:
            reason += f" at row {row}"
        value = _row_values(batch, columns, row)
    err = DataError(reason, column=column, value=value)
    err.reason = reason
    err.expression = expr.source
    err.row = row
    return err


def _row_values(batch: pa.RecordBatch, columns: list[str], row: int) -> Any:
    values = {}
    for name in columns:
        index = batch.schema.get_field_index(name)
        if index >= 0:
            values[name] = batch.column(index)[row].as_py()
    if len(values) == 1:
        return next(iter(values.values()))
    return ", ".join(f"{name}={value!r}" for name, value in values.items()) or None


def first_failing_row(
    func: Callable[[pa.RecordBatch], Any],
    batch: pa.RecordBatch,
    *,
    errors: tuple[type[BaseException], ...] = (DataError,),
) -> int | None:
    """Index of the first row of ``batch`` on which ``func`` raises one of ``errors``.

    Assumes ``func(batch)`` fails and rows are independent; bisects with
    about log2(rows) calls on ever smaller slices. Returns ``None`` when no
    single row fails on its own.
    """

    def fails(part: pa.RecordBatch) -> bool:
        try:
            func(part)
        except errors:
            return True
        return False

    start, length = 0, batch.num_rows
    while length > 1:
        half = length // 2
        if fails(batch.slice(start, half)):
            length = half
        else:
            start, length = start + half, length - half
    if length == 1 and fails(batch.slice(start, 1)):
        return start
    return None


def _empty(batch: pa.RecordBatch) -> pa.RecordBatch:
    return batch.slice(0, 0)


def _evaluate(expr: Expr, batch: pa.RecordBatch) -> pa.Array:
    value = _Evaluator(batch).eval(expr)
    if isinstance(value, pa.Scalar):
        value = pa.repeat(value, batch.num_rows)
    elif isinstance(value, pa.ChunkedArray):
        value = value.combine_chunks()
    return value


class _Evaluator:
    """Evaluates nodes to Arrow arrays (columns) or scalars (constants)."""

    def __init__(self, batch: pa.RecordBatch):
        self.batch = batch

    def eval(self, node: Expr):
        if isinstance(node, Column):
            return self.column(node)
        if isinstance(node, Literal):
            return pa.scalar(node.value)
        if isinstance(node, Unary):
            operand = self.eval(node.operand)
            kernel = pc.negate_checked if node.op == "-" else pc.invert
            return self.run(node, kernel, [operand])
        if isinstance(node, Binary):
            left, right = self.eval(node.left), self.eval(node.right)
            comparison = node.op in _COMPARISONS
            left = _adapt_literal(node.left, left, right.type, comparison, node.right)
            right = _adapt_literal(node.right, right, left.type, comparison, node.left)
            return self.run(node, _BINARY_FUNCTIONS[node.op], [left, right])
        if isinstance(node, Call):
            return self.call(node)
        raise TypeError(f"not an expression node: {node!r}")

    def column(self, node: Column):
        index = self.batch.schema.get_field_index(node.name)
        if index < 0:
            available = ", ".join(self.batch.schema.names) or "(none)"
            raise ConfigurationError(f"unknown column {node.name!r}; available columns: {available}")
        array = self.batch.column(index)
        if pa.types.is_dictionary(array.type):
            # Kernels such as utf8_upper have no dictionary variant.
            array = array.cast(array.type.value_type)
        return array

    def call(self, node: Call):
        function = FUNCTIONS[node.name]
        literal_positions = function.literals
        values = []
        for index, arg in enumerate(node.args):
            if index in literal_positions:
                values.append(arg.value)  # passed as a plain option, e.g. round's ndigits
            else:
                values.append(self.eval(arg))
        if function.unify:
            values = _unify(node.args, values, skip_first=node.name == "if_else")
        return self.run(node, function.call, values)

    def run(self, node: Expr, kernel: Callable[..., Any], args: Sequence[Any]):
        try:
            return kernel(*args)
        except pa.ArrowInvalid as exc:
            raise _Failure(node, exc) from exc
        except (pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            types = ", ".join(str(a.type) for a in args if isinstance(a, (pa.Array, pa.ChunkedArray, pa.Scalar)))
            raise ConfigurationError(
                f"cannot evaluate {node.source!r}: it does not apply to {types or 'these arguments'} ({exc})"
            ) from None


def _adapt_literal(node: Expr, value, other_type: pa.DataType, comparison: bool, other: Expr):
    """Give a literal operand the type of the value it meets: nulls, decimals, dates (see module docs)."""
    if not isinstance(node, Literal) or isinstance(other, Literal):
        return value
    literal = node.value
    if pa.types.is_null(other_type):
        return value
    if literal is None:
        return pa.scalar(None, other_type)
    if isinstance(literal, bool):
        return value
    if isinstance(literal, (int, float)) and pa.types.is_decimal(other_type):
        return pa.scalar(Decimal(repr(literal)))
    if isinstance(literal, str) and comparison and (
        pa.types.is_timestamp(other_type) or pa.types.is_date(other_type) or pa.types.is_decimal(other_type)
    ):
        from ferry.backends.filters import coerce_literal

        return coerce_literal(literal, other_type, column=other.source or str(other))
    return value


def _unify(nodes: Sequence[Expr], values: list, *, skip_first: bool) -> list:
    """Give literal arguments the type of the first non-literal one (nulls, decimals)."""
    offset = 1 if skip_first else 0  # if_else: the condition keeps its own type
    candidates = list(zip(nodes[offset:], values[offset:]))
    anchor = next(((n, v) for n, v in candidates if not isinstance(n, Literal)), None)
    if anchor is None:
        # Only literals: still give a typed null the other literals' type.
        anchor = next(((n, v) for n, v in candidates if not pa.types.is_null(v.type)), None)
        if anchor is None:
            return values
    anchor_node, anchor_value = anchor
    adapted = list(values[:offset])
    for node, value in candidates:
        if node is anchor_node:
            adapted.append(value)
        elif isinstance(node, Literal) and node.value is None:
            adapted.append(pa.scalar(None, anchor_value.type))
        else:
            adapted.append(_adapt_literal(node, value, anchor_value.type, False, anchor_node))
    return adapted
