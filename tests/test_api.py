"""The public API (``import spaceevo``): every name resolves, type checkers see the same names as
the lazy loader, and every command's function is typed to return a dataclass."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import types
import typing
from pathlib import Path

import pytest

import spaceevo
import spaceevo.latency

COMMAND_FUNCTIONS = ["run", "search_space", "search_block_lut", "train_supernet", "extract", "export", "evaluate", "evaluate_model"]
LATENCY_FUNCTIONS = ["build_table", "predict_latency", "measure_latency", "validate_latency"]


def _type_checking_names(module_file: str) -> set[str]:
    """Names bound by the imports inside ``if TYPE_CHECKING:`` of a module."""
    tree = ast.parse(Path(module_file).read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    names |= {alias.asname or alias.name.split(".")[0] for alias in stmt.names}
    return names


@pytest.mark.parametrize("module", [spaceevo, spaceevo.latency], ids=["spaceevo", "spaceevo.latency"])
def test_every_public_name_resolves_and_type_checkers_see_it(module) -> None:
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    public = set(module.__all__) - {"__version__"}
    assert _type_checking_names(module.__file__) == public


@pytest.mark.parametrize(
    "module, name", [(spaceevo, n) for n in COMMAND_FUNCTIONS] + [(spaceevo.latency, n) for n in LATENCY_FUNCTIONS]
)
def test_each_command_function_returns_a_dataclass(module, name) -> None:
    function = getattr(module, name)
    returned = typing.get_type_hints(function, globalns=vars(importlib.import_module(function.__module__)))["return"]
    if typing.get_origin(returned) in (typing.Union, types.UnionType):  # X | None: None only where documented
        returned = next(t for t in typing.get_args(returned) if t is not type(None))
    assert inspect.isclass(returned) and dataclasses.is_dataclass(returned), f"{name} returns {returned}"
    assert hasattr(returned, "to_dict") or hasattr(returned, "summary"), f"{returned.__name__} has no JSON form"
