"""Print pip constraints that pin every declared dependency to its declared minimum.

Reads pyproject.toml's ``dependencies`` and the extras named on the command line
(default: render, gguf, test) and writes ``name==minimum`` for each requirement
with a lower bound whose marker holds on this Python. The judges
(test-constraints.txt) are left out: they are pinned exactly already.
`.ci/minima` installs with these constraints and runs the quick tier, so a
minimum in pyproject is one that has been run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same fallback as lora_prune.check.policy
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _judges() -> set[str]:
    lines = (ROOT / "test-constraints.txt").read_text().splitlines()
    return {canonicalize_name(Requirement(x).name) for x in lines if x and not x.startswith("#")}


def minima(extras: list[str]) -> list[str]:
    """``name==version`` for every bounded-below requirement of the core and ``extras``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    judges = _judges()
    pins: dict[str, str] = {}
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name in judges or name == "lora-prune" or (req.marker and not req.marker.evaluate()):
            continue
        lows = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
        if not lows:
            raise SystemExit(f"error: {text!r} has no lower bound, pyproject.toml, declare one")
        low = max(lows, key=Version)
        if name in pins and pins[name] != low:
            raise SystemExit(f"error: {name} has two minima ({pins[name]}, {low}), pyproject.toml")
        pins[name] = low
    return [f"{name}=={low}" for name, low in sorted(pins.items())]


if __name__ == "__main__":
    print("\n".join(minima(sys.argv[1:] or ["render", "gguf", "test"])))
