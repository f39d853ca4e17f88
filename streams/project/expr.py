"""Request features as declared expressions: a small, safe subset of Python over one event's fields.

An expression names fields of the scored event as plain names and combines
them with arithmetic (``+ - * / // % **``), comparisons (``== != < <= > >=``,
``in`` / ``not in`` a tuple of literals, ``is None``), ``and`` / ``or`` /
``not``, ``a if cond else b``, literals, and calls of the functions in
:data:`FUNCTIONS`. Nothing else parses: no attributes, subscripts, lambdas,
comprehensions or other names, so an expression cannot reach anything but the
event's own values. It is compiled once into a Python function (fast: no
interpreter of our own walks it per event).

A value is a float: ``True``/``False`` count as 1.0/0.0. When the expression
cannot be computed for an event (a field is null, a logarithm of zero, a
division by zero), the feature takes its ``default``.

>>> f = compile_expr("log1p(max(amount, 0))", {"amount"})
>>> round(f({"amount": 9.0}), 4)
2.3026
>>> compile_expr("merchant_category == 'digital_goods'", {"merchant_category"})({"merchant_category": "books"})
0.0
>>> compile_expr("amount.real", {"amount"})
Traceback (most recent call last):
...
streams.project.expr.ExpressionError: 'amount.real': attribute access is not allowed
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

__all__ = ["FUNCTIONS", "ExpressionError", "compile_expr", "guarded", "names_in"]

RowFn = Callable[[Mapping[str, Any]], float]


def _coalesce(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "abs": abs, "min": min, "max": max, "round": round,
    "log": math.log, "log1p": math.log1p, "log10": math.log10, "exp": math.exp, "sqrt": math.sqrt,
    "floor": math.floor, "ceil": math.ceil, "float": float, "len": len, "coalesce": _coalesce,
}
"""The functions an expression may call."""

_ROW = "__row"
_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
_UNARY = (ast.USub, ast.UAdd, ast.Not)
_COMPARE = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn, ast.Is, ast.IsNot)
_ALLOWED = (ast.Constant, ast.Name, ast.Load, ast.IfExp, ast.BoolOp, ast.And, ast.Or, ast.Tuple, ast.BinOp,
            ast.UnaryOp, ast.Compare, ast.Call, *_BINOPS, *_UNARY, *_COMPARE)
_WHAT = {ast.Attribute: "attribute access", ast.Subscript: "a subscript", ast.Lambda: "a lambda",
         ast.NamedExpr: "an assignment", ast.ListComp: "a comprehension", ast.GeneratorExp: "a comprehension",
         ast.DictComp: "a comprehension", ast.SetComp: "a comprehension", ast.Starred: "a starred argument"}


class ExpressionError(ValueError):
    """An expression that does not parse, or uses something outside the allowed subset."""


def _parse(text: str) -> ast.expr:
    try:
        return ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ExpressionError(f"{text!r} is not a valid expression: {exc.msg}") from None


def names_in(text: str) -> set[str]:
    """The field names ``text`` reads (function names left out); raises :class:`ExpressionError`."""
    tree = _parse(text)
    _check(tree, text)
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id not in FUNCTIONS}


def _check(node: ast.AST, text: str) -> None:
    """Raise unless every node of ``node`` is in the allowed subset (operators are nodes of their own)."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call) and (not (isinstance(sub.func, ast.Name) and sub.func.id in FUNCTIONS)
                                          or sub.keywords):
            raise ExpressionError(f"{text!r}: {ast.unparse(sub.func)}(...) is not an allowed function (allowed: "
                                  f"{', '.join(sorted(FUNCTIONS))}; positional arguments only)")
        if isinstance(sub, ast.Constant) and not isinstance(sub.value, (int, float, str, bool, type(None))):
            raise ExpressionError(f"{text!r}: literal {sub.value!r} is not a number, string, boolean or None")
        if isinstance(sub, ast.Tuple) and not all(isinstance(e, ast.Constant) for e in sub.elts):
            raise ExpressionError(f"{text!r}: a tuple may hold literals only (for `in`)")
        if not isinstance(sub, _ALLOWED):
            what = _WHAT.get(type(sub), f"{type(sub).__name__} ({ast.unparse(sub) if isinstance(sub, ast.expr) else 'operator'})")
            raise ExpressionError(f"{text!r}: {what} is not allowed")


class _Rows(ast.NodeTransformer):
    """Field names become reads of the event: ``amount`` -> ``__row['amount']``."""

    def visit_Name(self, node: ast.Name) -> ast.expr:
        if node.id in FUNCTIONS:
            return node
        return ast.copy_location(ast.Subscript(ast.Name(_ROW, ast.Load()), ast.Constant(node.id), ast.Load()), node)


def compile_expr(text: str, fields: Collection[str], default: float = 0.0) -> RowFn:
    """A function of one event (a mapping of field values) computing ``text`` as a float.

    Every name must be one of ``fields`` or :data:`FUNCTIONS` (else :class:`ExpressionError`, naming it).
    The function returns ``default`` when the expression fails or gives ``None`` for an event."""
    tree = _parse(text)
    _check(tree, text)
    unknown = sorted(n for n in names_in(text) if n not in fields)
    if unknown:
        raise ExpressionError(f"{text!r}: unknown field{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, unknown))} (fields: {', '.join(sorted(fields))})")
    body = _Rows().visit(tree)
    fn = ast.Expression(ast.Lambda(ast.arguments(posonlyargs=[], args=[ast.arg(_ROW)], kwonlyargs=[],
                                                 kw_defaults=[], defaults=[]), body))
    code = compile(ast.fix_missing_locations(fn), f"<expression {text!r}>", "eval")
    # no builtins: the validated tree can only reach the event and FUNCTIONS
    raw: Callable[[Mapping[str, Any]], Any] = eval(code, {"__builtins__": {}, **FUNCTIONS})
    return guarded(raw, default)


def guarded(fn: Callable[[Mapping[str, Any]], Any], default: float) -> RowFn:
    """``fn`` as a float-valued function of an event that gives ``default`` when ``fn`` fails or gives None
    (a null field, a logarithm of zero, a division by zero): a bad value never stops a stage."""

    def value(row: Mapping[str, Any]) -> float:
        try:
            out = fn(row)
            return default if out is None else float(out)
        except (ArithmeticError, TypeError, ValueError, KeyError):
            return default

    return value
