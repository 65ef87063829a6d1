"""Tools by name, with OpenAI-style JSON schemas (for `chat.render(..., tools=)` and the server) and one `call`
that never raises: bad JSON, unknown tools, wrong arguments and tool failures come back as error results the
model can read.

    registry = default_registry(documents=["Paris is the capital of France."])
    registry.schemas()                                       # [{'type': 'function', 'function': {...}}, ...]
    registry.call("calculator", '{"expression": "6*7"}')     # ToolResult(content='42', error=False)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from .calculator import SCHEMA as CALCULATOR_SCHEMA
from .calculator import calculate
from .lookup import LOOKUP_SCHEMA, DocumentIndex
from .sandbox import PYTHON_SCHEMA, Limits, Sandbox

_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}


@dataclass
class ToolResult:
    content: str
    error: bool = False


@dataclass
class Tool:
    """A callable tool: `fn(**arguments) -> str`; exceptions become error results."""
    schema: dict      # {"type": "function", "function": {"name", "description", "parameters"}}
    fn: Callable[..., str]

    @property
    def name(self) -> str:
        return self.schema["function"]["name"]


def _check_arguments(args: dict, params: dict) -> str | None:
    """The first way `args` breaks the schema's top level (required, types, unknown keys), or None."""
    props = params.get("properties", {})
    for key in params.get("required", []):
        if key not in args:
            return f"missing required argument {key!r}"
    for key, value in args.items():
        if key not in props:
            if params.get("additionalProperties", True) is False:
                return f"unknown argument {key!r}; expected {sorted(props)}"
            continue
        want = _TYPES.get(props[key].get("type"))
        if want and (not isinstance(value, want) or (want is not bool and isinstance(value, bool))):
            return f"argument {key!r} must be a {props[key]['type']}, got {type(value).__name__}"
    return None


class ToolRegistry:
    def __init__(self, tools: list[Tool] | None = None, *, max_output_chars: int = 4000):
        self.tools: dict[str, Tool] = {}
        self.max_output_chars = max_output_chars
        for tool in tools or []:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        fn = tool.schema.get("function", {}) if isinstance(tool.schema, dict) else {}
        if tool.schema.get("type") != "function" or not fn.get("name") or not isinstance(fn.get("parameters"), dict):
            raise ValueError(f"ToolRegistry.register: schema must be {{'type': 'function', 'function': {{'name', "
                             f"'description', 'parameters': {{...}}}}}}, got {tool.schema!r}")
        if tool.name in self.tools:
            raise ValueError(f"ToolRegistry.register: a tool named {tool.name!r} is already registered")
        self.tools[tool.name] = tool

    @property
    def names(self) -> list[str]:
        return list(self.tools)

    def schemas(self) -> list[dict]:
        return [t.schema for t in self.tools.values()]

    def call(self, name: str, arguments: str | dict) -> ToolResult:
        tool = self.tools.get(name)
        if tool is None:
            return ToolResult(f"error: unknown tool {name!r}; available: {', '.join(self.tools)}", True)
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError as e:
                return ToolResult(f"error: arguments are not valid JSON ({e})", True)
        if not isinstance(arguments, dict):
            return ToolResult("error: arguments must be a JSON object", True)
        problem = _check_arguments(arguments, tool.schema["function"]["parameters"])
        if problem:
            return ToolResult(f"error: {problem}", True)
        try:
            out = str(tool.fn(**arguments))
        except Exception as e:  # a tool's failure is information for the model, not a crash of the loop
            return ToolResult(f"error: {e}", True)
        if len(out) > self.max_output_chars:
            out = out[:self.max_output_chars] + f"\n[truncated to {self.max_output_chars} characters]"
        return ToolResult(out)


def default_registry(*, documents=None, limits: Limits | None = None, python: bool = True,
                     calculator: bool = True) -> ToolRegistry:
    """calculator, python (sandboxed) and, when `documents` are given, lookup over them."""
    registry = ToolRegistry()
    if calculator:
        registry.register(Tool(CALCULATOR_SCHEMA, calculate))
    if python:
        sandbox = Sandbox(limits)
        registry.register(Tool(PYTHON_SCHEMA, lambda code: sandbox.run(code).text()))
    if documents is not None:
        index = DocumentIndex(documents)
        registry.register(Tool(LOOKUP_SCHEMA, lambda query, k=3: index(query, k=max(1, min(k, 10)))))
    return registry
