"""Safe arithmetic: the expression is parsed with `ast` and only number nodes, + - * / // % **, unary signs,
parentheses and a few `math` functions are evaluated (never `eval`). Integers stay exact; sizes are bounded so
that `9**9**9` or a 10,000-character expression is refused instead of eating the machine.

    calculate("2 * (3 + 4) ** 2")      # '98'
    calculate("sqrt(2) / 2")           # '0.707106781187'
"""

from __future__ import annotations

import ast
import math
import operator

MAX_CHARS = 500          # expression length
MAX_NODES = 200          # AST nodes
MAX_INT_BITS = 4096      # about 1,233 decimal digits
MAX_EXPONENT = 10_000    # |b| in a ** b

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil,
              "log": math.log, "log10": math.log10, "log2": math.log2, "exp": math.exp, "sin": math.sin,
              "cos": math.cos, "tan": math.tan, "min": min, "max": max, "factorial": math.factorial,
              "gcd": math.gcd}
_CONSTANTS = {"pi": math.pi, "e": math.e}

SCHEMA = {"type": "function", "function": {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression exactly: numbers, + - * / // % **, parentheses and "
                   f"{', '.join(sorted(_FUNCTIONS))}, pi, e (^ also means **).",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string",
                                                                   "description": "e.g. 12 * (3 + 4)"}},
                   "required": ["expression"], "additionalProperties": False}}}


class CalculatorError(ValueError):
    """The expression is not allowed or cannot be evaluated; the message says why."""


def _check(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalculatorError(f"result {value!r} is not a number")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"result has more than {MAX_INT_BITS} bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not finite")
    return value


def _pow(base, exp):
    if abs(exp) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {exp} is larger than {MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 and abs(base) > 1:
        if (abs(base).bit_length() - 1) * exp > MAX_INT_BITS:   # lower bound of the result's size
            raise CalculatorError(f"result has more than {MAX_INT_BITS} bits")
    result = base ** exp
    if isinstance(result, complex):
        raise CalculatorError("result is complex (negative number to a fractional power)")
    return result


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _check(_pow(left, right))
        return _check(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS \
            and not node.keywords:
        args = [_eval(a) for a in node.args]
        if node.func.id == "factorial" and args and isinstance(args[0], int) and args[0] > 1000:
            raise CalculatorError("factorial argument larger than 1000")
        return _check(_FUNCTIONS[node.func.id](*args))
    what = type(node).__name__
    if isinstance(node, ast.Name):
        what = f"name {node.id!r}"
    elif isinstance(node, ast.Call):
        what = "this function call"
    raise CalculatorError(f"{what} is not allowed; use numbers, + - * / // % **, parentheses, "
                          f"{', '.join(sorted(_FUNCTIONS))}, pi, e")


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; CalculatorError when it is not allowed or fails."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("expected a non-empty expression string")
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"expression longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip().replace("^", "**"), mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"syntax error at column {e.offset}: {e.msg}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError(f"expression has more than {MAX_NODES} parts")
    try:
        return _eval(tree)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except (OverflowError, TypeError, ValueError) as e:
        if isinstance(e, CalculatorError):
            raise
        raise CalculatorError(str(e)) from None


def format_number(value: int | float) -> str:
    """Integers exactly; integral floats without '.0'; other floats to 12 significant digits."""
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.12g}"


def calculate(expression: str) -> str:
    """The calculator tool: the formatted value (errors raise CalculatorError for the registry to report)."""
    return format_number(evaluate(expression))
