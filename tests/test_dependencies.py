"""What pyproject.toml declares matches what the code imports, and how mypy reads it.

Each third-party package is declared in the extra whose modules import it (the
core must install without the render extra), every core dependency is used by
the core, and every partly typed library is read as Any by mypy (pyproject's
``follow_imports = "skip"`` list), so that the strict check gives the same
verdict with every release the ranges allow.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same fallback as lora_prune.check.policy
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE = ROOT / "lora_prune"

#: Import names whose distribution is named otherwise.
DISTRIBUTION = {"PIL": "pillow", "skimage": "scikit-image", "yaml": "pyyaml"}
#: Imported by the core only lazily, where installed, with a fallback when not.
OPTIONAL_IN_CORE = {
    "yaml": "comfy: extra_model_paths.yaml beyond the plain subset it parses itself",
    "gguf": "comfy: GGUF transformers' tensors (without it, a one-line reason)",
    "matplotlib": "charts: analyze's charts, from the render extra (without it, a one-line reason)",
}
#: Declared for a library that imports them, not for an import of ours.
USED_THROUGH = {
    "sentencepiece": "transformers' T5 tokenizer of real FLUX.1 checkpoints",
    "tomli": "check/policy on Python 3.10 (tomllib elsewhere)",
}
#: Typed libraries mypy follows: pinned judges, stub packages or a bounded range.
FOLLOWED = {
    "torch", "numpy", "PIL", "click", "pytest", "_pytest", "hypothesis", "pandas",
    "packaging", "tomli", "typing_extensions",
}  # fmt: skip


def _imports(files: Iterable[Path]) -> dict[str, set[str]]:
    """Top-level third-party module -> the files importing it (lazy imports included)."""
    local = {
        p.stem for folder in ("tests", "benchmarks", "fuzz") for p in (ROOT / folder).glob("*.py")
    }
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local and top != "lora_prune":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _declared(requirements: Iterable[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def _dist(module: str) -> str:
    return canonicalize_name(DISTRIBUTION.get(module, module))


def test_each_package_is_declared_where_it_is_imported() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    core_declared = _declared(PYPROJECT["project"]["dependencies"])
    render_declared = _declared(extras["render"]) | _declared(extras["gguf"])
    render_files = list((PACKAGE / "render").rglob("*.py"))
    core_files = [p for p in PACKAGE.rglob("*.py") if (PACKAGE / "render") not in p.parents]
    core = _imports(core_files)
    render = _imports(render_files)

    undeclared = {m: f for m, f in core.items() if _dist(m) not in core_declared}
    assert set(undeclared) == set(OPTIONAL_IN_CORE), undeclared
    undeclared = {
        m: f for m, f in render.items() if _dist(m) not in core_declared | render_declared
    }
    assert not undeclared, undeclared
    unused = core_declared - {_dist(m) for m in core} - set(USED_THROUGH)
    assert not unused, f"core dependencies no core module imports: {sorted(unused)}"
    unused = render_declared - {_dist(m) for m in render} - set(USED_THROUGH)
    unused -= {_dist(m) for m in OPTIONAL_IN_CORE}
    assert not unused, f"render dependencies no render module imports: {sorted(unused)}"


def test_every_partly_typed_library_is_read_as_any_by_mypy() -> None:
    mypy = PYPROJECT["tool"]["mypy"]
    files = [p for tree in mypy["files"] for p in sorted((ROOT / tree).rglob("*.py"))]
    assert len(files) > 100
    skipped = {
        module.removesuffix(".*")
        for override in mypy["overrides"]
        if override.get("follow_imports") == "skip"
        for module in override["module"]
    }
    imported = _imports(files)
    neither = {m: sorted(f)[:3] for m, f in imported.items() if m not in FOLLOWED | skipped}
    assert not neither, (
        f"add each to pyproject's follow_imports = 'skip' list (or to FOLLOWED if it is "
        f"typed and its version is pinned or bounded): {neither}"
    )
    # The libraries whose annotations changed under a release are among them.
    assert {"diffusers", "transformers", "accelerate", "gguf", "peft"} <= skipped
