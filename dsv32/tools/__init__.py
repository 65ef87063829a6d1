"""Tools for tool-use RL, evaluation and the server: a safe calculator, a sandboxed `python`, BM25 `lookup`,
a registry with OpenAI-style schemas, and the tool-calling loop around any text generator."""

from .calculator import CalculatorError, calculate, evaluate
from .lookup import DocumentIndex, load_documents
from .loop import Transcript, run_tool_loop
from .registry import Tool, ToolRegistry, ToolResult, default_registry
from .sandbox import Limits, Sandbox, SandboxResult, run_python

__all__ = ["calculate", "evaluate", "CalculatorError", "DocumentIndex", "load_documents", "Limits", "Sandbox",
           "SandboxResult", "run_python", "Tool", "ToolRegistry", "ToolResult", "default_registry",
           "run_tool_loop", "Transcript"]
