"""Matching a LoRA against a model's modules, without torch: the attach plan, or the mismatch report.

The render engine describes the model once (:class:`ModelIndex`: for every
module path a LoRA may target, its kind and shape, and each component's width)
and attaches what :func:`plan_attach` returns. Every LoRA module is checked
before a tensor is read: an adapter the engine cannot apply, a module with no
counterpart, a delta of the wrong width. All mismatches come back in one
:class:`~lora_prune.errors.ModelMismatchError`, which names the base model the
LoRA's widths belong to when a family knows them (``Family.known_widths``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from .adapters import (
    APPLIED_ROLES,
    FULL_ROLES,
    UNRENDERABLE_ROLES,
    alpha_problem,
    bias_rows,
    delta_io,
    factor_problem,
    missing_factor,
)
from .blocks import OTHER
from .errors import CorruptFileError, ModelMismatchError, UnsupportedAdapterError
from .families import FAMILIES
from .keys import Target
from .lora import LoraFile, LoraModule

__all__ = ["AttachPlan", "ModelIndex", "ModelModule", "plan_attach"]

#: How many offending modules an error message names.
_SHOW = 3
# Roles that only carry a scalar or are read through LoraModule.scale.
SCALAR_ROLES = frozenset({"alpha"})


@dataclass(frozen=True)
class ModelModule:
    """One module of the model, as matching sees it.

    ``kind`` is ``linear`` (a 2-D weight: ``rows`` out, ``in_features`` in),
    ``norm`` (a normalisation layer with ``rows`` features) or ``other``;
    ``type_name`` names its class in messages.
    """

    kind: Literal["linear", "norm", "other"]
    type_name: str
    rows: int = 0
    in_features: int = 0


@dataclass(frozen=True)
class ModelIndex:
    """What the model has: its components, its modules by ``"<component>:<path>"``, its widths."""

    components: frozenset[str]
    lookup: Callable[[str], ModelModule | None]
    #: component -> its hidden width (None where unknown)
    widths: Mapping[str, int | None]


@dataclass
class AttachPlan:
    """A LoRA module checked against the model, before its tensors are read."""

    module: LoraModule
    hook_keys: list[str]  # "<component>:<module path>" per target module
    rows: list[int]  # output rows per target module
    in_features: int


@dataclass(frozen=True)
class _Mismatch:
    module: LoraModule
    reason: str
    lora_in: int | None = None
    model_in: int | None = None


def _shape(module: LoraModule, role: str) -> tuple[int, ...]:
    return tuple(module.tensors[role].shape)


def lora_io(module: LoraModule) -> tuple[int, int] | None:
    """(in, out) of a linear module's delta from the header shapes; None for bias-only modules."""
    path = str(module.stem)
    problem = factor_problem(module) or alpha_problem(module)
    if problem is not None:
        raise CorruptFileError(problem, path, "re-save or re-download the LoRA")
    lacking = missing_factor(module)
    if lacking is not None:
        raise CorruptFileError(
            f"module has no lora_{lacking[1]} tensor", path, "re-save or re-download the LoRA"
        )
    return delta_io(module)


def check_adapter(module: LoraModule) -> None:
    """Refuse roles and adapters the render engine does not apply, and doubled roles."""
    for role in module.tensors:
        base = role.split("#")[0]
        if base in UNRENDERABLE_ROLES:
            raise UnsupportedAdapterError(
                f"{UNRENDERABLE_ROLES[base]} is not supported by the render engine",
                module.tensors[role].name,
                "render with a tool that supports it, or drop this module",
            )
        if "#" in role and base not in SCALAR_ROLES:
            raise CorruptFileError(
                f"two tensors give module {module.stem!r} its {base}",
                module.tensors[role].name,
                "keep one naming per module and re-save the LoRA",
            )
    if module.adapter == "unsupported":
        raise UnsupportedAdapterError(
            f"adapter roles {sorted(module.tensors)} are not supported by the render engine",
            module.stem,
            "drop this module",
        )


def plan_attach(lora: LoraFile, model: ModelIndex) -> list[AttachPlan]:
    """The attach plan of every LoRA module with a delta, or one error naming every mismatch."""
    plans: list[AttachPlan] = []
    problems: list[_Mismatch] = []
    for module in lora.modules.values():
        check_adapter(module)
        if module.block == OTHER or module.target is None:
            problems.append(_Mismatch(module, f"matches no module of {lora.family.display}"))
            continue
        if module.adapter == "empty":
            continue  # only an alpha: there is no delta to attach
        plan = _plan_module(lora, module, module.target, model, problems)
        if plan is not None:
            plans.append(plan)
    if problems:
        raise _mismatch_error(lora, model, problems)
    return plans


def _plan_module(
    lora: LoraFile,
    module: LoraModule,
    target: Target,
    model: ModelIndex,
    problems: list[_Mismatch],
) -> AttachPlan | None:
    if target.kind == "other":
        raise UnsupportedAdapterError(
            f"text-encoder weight {target.name} is no Linear layer (an embedding or "
            "layer norm, as ComfyUI's LoRA extractor writes): the render engine does not "
            "apply these",
            module.stem,
            f"slim the LoRA without block {module.block} (--drop {module.block}) to render the rest",
        )
    if target.model not in model.components:
        attribute = lora.family.components.get(target.model, target.model)
        problems.append(_Mismatch(module, f"the pipeline has no {attribute}"))
        return None
    keys = [f"{target.model}:{path}" for path in target.modules]
    found = [model.lookup(k) for k in keys]
    missing = [p for p, m in zip(target.modules, found, strict=True) if m is None]
    if missing:
        reason = f"has no counterpart {missing[0]} in the model"
        hint = lora.family.explain_missing(missing[0])
        problems.append(_Mismatch(module, f"{reason} ({hint})" if hint else reason))
        return None
    modules = [m for m in found if m is not None]
    roles = {r.split("#")[0] for r in module.tensors} - SCALAR_ROLES
    if target.kind == "norm":
        return _plan_norm(module, keys, modules, roles, problems)
    return _plan_linear(module, target, keys, modules, roles, problems)


def _plan_norm(
    module: LoraModule,
    keys: list[str],
    modules: list[ModelModule],
    roles: set[str],
    problems: list[_Mismatch],
) -> AttachPlan | None:
    """A norm layer's full-weight diff: its size must be the layers' features."""
    bad = sorted(roles - FULL_ROLES)
    if bad:
        raise UnsupportedAdapterError(
            f"{'/'.join(bad)} on a norm layer is not supported by the render engine",
            module.stem,
            "drop this module",
        )
    if any(m.kind != "norm" for m in modules):
        problems.append(_Mismatch(module, f"targets {modules[0].type_name}, not a norm layer"))
        return None
    rows = [m.rows for m in modules]
    shapes = sorted({_shape(module, r) for r in roles})
    if shapes != [(sum(rows),)]:
        problems.append(
            _Mismatch(module, f"norm tensors of shape {shapes}, model has {sum(rows)} features")
        )
        return None
    return AttachPlan(module, keys, rows, sum(rows))


def _plan_linear(
    module: LoraModule,
    target: Target,
    keys: list[str],
    modules: list[ModelModule],
    roles: set[str],
    problems: list[_Mismatch],
) -> AttachPlan | None:
    """A Linear target (or a fused row split of several): the delta's in/out must match."""
    bad = sorted(roles - APPLIED_ROLES)
    if bad:
        raise UnsupportedAdapterError(
            f"roles {bad} are not supported by the render engine",
            module.stem,
            "drop this module",
        )
    if any(m.kind != "linear" for m in modules):
        problems.append(_Mismatch(module, f"targets {modules[0].type_name}, not a Linear layer"))
        return None
    rows = [m.rows for m in modules]
    ins = {m.in_features for m in modules}
    model_in = ins.pop() if len(ins) == 1 else -1
    io = lora_io(module)
    extra_rows = bias_rows(module)
    out_ok = (io is None or io[1] == sum(rows)) and (extra_rows is None or extra_rows == sum(rows))
    in_ok = io is None or io[0] == model_in
    if target.swap_halves and sum(rows) % 2:
        out_ok = False
    if not (out_ok and in_ok):
        lora_in, lora_out = io if io is not None else (None, extra_rows)
        problems.append(
            _Mismatch(
                module,
                f"LoRA {lora_in}->{lora_out}, model {model_in}->{sum(rows)}",
                lora_in,
                model_in,
            )
        )
        return None
    return AttachPlan(module, keys, rows, model_in)


def _known_widths(component: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for family in FAMILIES:
        out.update(family.known_widths.get(component, {}))
    return out


def _mismatch_error(
    lora: LoraFile, model: ModelIndex, problems: list[_Mismatch]
) -> ModelMismatchError:
    shown = "; ".join(f"{p.module.stem}: {p.reason}" for p in problems[:_SHOW])
    more = f" and {len(problems) - _SHOW} more" if len(problems) > _SHOW else ""
    what = (
        f"{len(problems)} of {len(lora.modules)} LoRA modules do not fit the model ({shown}{more})"
    )
    # The likely base model: the LoRA's input width on layers that read the model's hidden width.
    components = lora.family.components
    for component in components:
        width = model.widths.get(component)
        widths = Counter(
            p.lora_in
            for p in problems
            if p.module.target is not None
            and p.module.target.model == component
            and p.model_in == width
            and p.lora_in not in (None, -1, width)
        )
        if width is None or not widths:
            continue
        lora_width = widths.most_common(1)[0][0]
        assert lora_width is not None
        label = "hidden" if component == "transformer" else f"{components[component]} width"
        base = _known_widths(component).get(lora_width, "another model")
        what += (
            f"; this LoRA is for {base} ({label} {lora_width}) but the model has {label} {width}"
        )
        break
    return ModelMismatchError(
        what, lora.path, "render with the base model the LoRA was trained for"
    )
