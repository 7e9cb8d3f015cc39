"""The public API: ``__all__`` is what the package really exports, and each name is documented.

``__all__`` is compared with the module's own source: every name it imports from
the package's modules (the lazily served ones too) or defines at top level. A
name exported but not listed, listed but not exported, or listed but not
resolving to its module's object fails. The public verbs (the exported
functions) document their arguments and show an example, as the safetensors
docs do.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import types

import pytest

import lora_prune
import lora_prune.testing

PACKAGES = [lora_prune, lora_prune.testing]


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements at module level, those under ``if TYPE_CHECKING:`` included."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If):
            out += _top_level(node.body) + _top_level(node.orelse)
        else:
            out.append(node)
    return out


def _bound(node: ast.stmt, package: str) -> dict[str, str | None]:
    """The names ``node`` binds that the package exports -> their module (None: this one)."""
    if isinstance(node, ast.ImportFrom):
        source = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
        if source.partition(".")[0] != package.partition(".")[0]:
            return {}  # typing, __future__, importlib: the module's tools, not its API
        return {alias.asname or alias.name: source for alias in node.names}
    if isinstance(node, ast.FunctionDef | ast.ClassDef):
        # Dunder functions (__getattr__, __dir__) are the module's hooks, not exports.
        names = [] if node.name.startswith("__") else [node.name]
    elif isinstance(node, ast.Assign):
        names = [t.id for t in node.targets if isinstance(t, ast.Name)]
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        names = [node.target.id]
    else:
        names = []
    return dict.fromkeys(names)


def exports(module: types.ModuleType) -> dict[str, str | None]:
    """What ``module``'s source exports: name -> the package module it is imported from,
    None where ``module`` defines it. Private names are left out; dunders such as
    ``__version__`` are public by convention, ``__all__`` is the list under test."""
    found: dict[str, str | None] = {}
    for node in _top_level(ast.parse(inspect.getsource(module)).body):
        found.update(_bound(node, module.__name__))
    return {
        name: source
        for name, source in found.items()
        if name != "__all__" and (not name.startswith("_") or name.endswith("__"))
    }


#: The exported functions (lowercase, as PEP 8 names them): read here without resolving the
#: lazy ones, so that collecting this file imports no more than ``import lora_prune`` does.
VERBS = sorted(n for n in lora_prune.__all__ if n.islower() and not n.startswith("_"))


def _own_doc(obj: object) -> str:
    """The object's own docstring; dataclasses' generated signature does not count."""
    doc = inspect.getdoc(obj) or ""
    if dataclasses.is_dataclass(obj) and doc.startswith(f"{getattr(obj, '__name__', '')}("):
        return ""
    return doc


def test_exported_names_are_exactly_the_public_api() -> None:
    for module in PACKAGES:
        exported = exports(module)
        assert sorted(module.__all__) == sorted(exported), module.__name__  # no name twice
        for name, source in exported.items():
            value = getattr(module, name)  # lazily served names resolve too
            if source is not None:
                assert value is getattr(importlib.import_module(source), name), name
        # And at run time: nothing else the module serves (dir() lists the lazy names too)
        # is a class or function of the package.
        unlisted = [
            name
            for name in dir(module)
            if not name.startswith("_") and name not in module.__all__
            if not isinstance(obj := getattr(module, name), types.ModuleType)
            if getattr(obj, "__module__", "").partition(".")[0] == lora_prune.__name__
        ]
        assert unlisted == [], module.__name__
    # Were the source reading to find nothing and __all__ emptied, all of the above would pass.
    assert {"read_lora", "analyze", "SlimResult", "LoraPruneError", "__version__"} <= set(
        exports(lora_prune)
    )


@pytest.mark.parametrize("module", PACKAGES)
def test_every_exported_callable_has_a_docstring(module: types.ModuleType) -> None:
    names: list[str] = module.__all__
    undocumented = [
        name
        for name in names
        if callable(getattr(module, name)) and len(_own_doc(getattr(module, name))) < 20
    ]
    assert undocumented == []


@pytest.mark.parametrize("verb", VERBS)
def test_public_verbs_document_arguments_and_an_example(verb: str) -> None:
    fn = getattr(lora_prune, verb)
    assert inspect.isfunction(fn)
    doc = _own_doc(fn)
    assert "Args:" in doc
    assert "Example::" in doc
    args = doc.split("Args:", 1)[1].split("Example::", 1)[0]
    params = [p for p in inspect.signature(fn).parameters if p != "self"]
    # Each parameter is named in the Args section (grouped names like "a, b:" count).
    missing = [p for p in params if p not in args]
    assert missing == []


def test_lazy_verbs_are_the_submodules_own() -> None:
    from lora_prune.analysis import analyze
    from lora_prune.check import run_check
    from lora_prune.verify import verify_slim

    assert lora_prune.analyze is analyze
    assert lora_prune.run_check is run_check
    assert lora_prune.verify_slim is verify_slim
    assert set(dir(lora_prune)) >= set(lora_prune.__all__)
    with pytest.raises(AttributeError):
        _ = lora_prune.no_such_name


@pytest.mark.parametrize(
    "module_name", ["blocks", "errors", "slim", "resize", "verdict", "safetensors_io"]
)
def test_submodule_all_names_exist(module_name: str) -> None:
    module = __import__(f"lora_prune.{module_name}", fromlist=["__all__"])
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []
    assert len(set(module.__all__)) == len(module.__all__)


def test_the_whole_exception_tree_is_exported_from_the_root() -> None:
    # The package docstring promises every error a user can cause at the top level.
    import lora_prune.errors as errors

    tree = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, lora_prune.LoraPruneError)
    }
    assert tree <= set(lora_prune.__all__), sorted(tree - set(lora_prune.__all__))
