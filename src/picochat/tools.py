"""The tools the engine runs for the model: a safe calculator.

A model calls a tool by writing `<|tool_call|>` expression `<|/tool_call|>`; the engine hands the
expression's ids to `ToolCalls.result_ids` and feeds the answer back into the sequence as
`<|tool_result|>` result `<|/tool_result|>`. The calculator parses the expression with `ast` and
evaluates only numbers and arithmetic operators (never `eval`); an expression it refuses or cannot
compute gets TOOL_ERROR_TEXT back.
"""

from __future__ import annotations

import ast
import math
import operator

from picochat.tokenizer import TOOL_CALL_END_ID, TOOL_CALL_ID, TOOL_RESULT_END_ID, TOOL_RESULT_ID

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 100
MAX_MAGNITUDE = 10**18  # larger intermediate or final values are refused
TOOL_ERROR_TEXT = "error"  # what the model sees when its expression cannot be computed


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot compute."""


_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        value = _UNARY_OPS[type(node.op)](_evaluate(node.operand))
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {right} is larger than {MAX_EXPONENT}")
        try:
            value = _BINARY_OPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result too large") from None
    else:
        raise CalculatorError(f"only numbers, + - * / // % ** and parentheses are allowed, not {ast.dump(node)[:60]}")
    if isinstance(value, complex):
        raise CalculatorError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is not a finite number")
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError(f"a value exceeds {MAX_MAGNITUDE:.0e}")
    return value


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression safely; return the result as text ("12", "2.5").

    Integral results print without a decimal point; others with up to 10 significant digits.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as err:  # ValueError: null bytes in the source
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from err
    value = _evaluate(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.10g}"


class ToolCalls:
    """A tokenizer's tool-call token ids, and the tool's answer to a call as ids to feed back."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.call, self.end_call, self.result, self.end_result = TOOL_CALL_ID, TOOL_CALL_END_ID, TOOL_RESULT_ID, TOOL_RESULT_END_ID

    def result_ids(self, expression_ids: list[int]) -> list[int]:
        """`<|tool_result|>` answer `<|/tool_result|>` for the ids between a call's markers."""
        try:
            answer = calculate(self.tokenizer.decode(expression_ids))
        except CalculatorError:
            answer = TOOL_ERROR_TEXT
        return [self.result, *self.tokenizer.encode(answer), self.end_result]
