"""Functions that travel as source text: get a function's source, load it back.

A map, reduce or finalize function is shipped to workers as the dedented source of a
module-level function plus the name to call after executing that source in a fresh
namespace (README, "The map-reduce protocol").  Errors name the function, so that a
job's traceback or a command's one-line message points at the culprit.
"""
from __future__ import annotations

import inspect
import textwrap
from typing import Any, Callable

from zarkov.errors import ZarkovError


class FunctionError(ZarkovError):
    """A shipped function that cannot be loaded (syntax error, missing name)."""


def source_of(func: Callable[..., Any]) -> tuple[str, str]:
    """The (dedented source, name) pair that ships ``func``.

    Raises FunctionError when the source is not available (a lambda defined inline
    in a longer expression, a builtin, a function typed at an interactive prompt).
    """
    name = getattr(func, "__name__", None)
    if not name or name == "<lambda>":
        raise FunctionError(f"{func!r}: only named module-level functions can be shipped")
    try:
        text = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError) as e:
        raise FunctionError(f"function '{name}': source not available ({e})") from None
    return text, name


def load(text: str, name: str, what: str = "function") -> Callable[..., Any]:
    """Execute ``text`` in a fresh namespace and return its ``name``.

    ``what`` (``map``, ``reduce`` …) only improves the error message.
    """
    namespace: dict[str, Any] = {"__name__": f"zarkov_shipped_{name}"}
    try:
        code = compile(text, f"<{what} {name}>", "exec")
    except SyntaxError as e:
        raise FunctionError(f"{what} '{name}' does not compile: {e.msg} "
                            f"(line {e.lineno})") from None
    exec(code, namespace)
    func = namespace.get(name)
    if not callable(func):
        raise FunctionError(f"{what} source does not define a function named '{name}'")
    return func
