"""The public API: the exported names are exactly these, and each is documented.

Adding or removing a public name is a decision, so this list changes with it
(as httpx guards its ``__all__``). The public verbs document their arguments and
show an example, as the safetensors docs do.
"""

from __future__ import annotations

import dataclasses
import inspect
import types

import pytest

import lora_prune
import lora_prune.testing

EXPORTED = {
    "BLOCK_IDS",
    "Analysis",
    "AnalyzeSettings",
    "AutoResult",
    "BlockIndexError",
    "BlockSpecError",
    "BlockStats",
    "CheckResult",
    "CorruptFileError",
    "Criterion",
    "IncompleteFileError",
    "LoraFile",
    "LoraModule",
    "LoraPruneError",
    "LoraReport",
    "MissingDependencyError",
    "ModuleResize",
    "ModelMismatchError",
    "NoEffectError",
    "NotASubsetError",
    "NotSafetensorsError",
    "OutputError",
    "OutputExistsError",
    "Policy",
    "ResizeResult",
    "SameFileError",
    "SlimPlan",
    "SlimResult",
    "UnknownKeysError",
    "UnreadableFileError",
    "UnsafeFileError",
    "UnsupportedAdapterError",
    "UnsupportedLoraError",
    "UsageError",
    "VerifyResult",
    "WrongBaseModelError",
    "__version__",
    "analyze",
    "auto_keep",
    "format_block_spec",
    "inspect_lora",
    "load_policy",
    "parse_block_spec",
    "plan_slim",
    "read_lora",
    "resize_lora",
    "run_check",
    "slim_lora",
    "verify_slim",
}

VERBS = (
    "read_lora",
    "inspect_lora",
    "plan_slim",
    "slim_lora",
    "resize_lora",
    "parse_block_spec",
    "format_block_spec",
    "analyze",
    "verify_slim",
    "auto_keep",
    "run_check",
    "load_policy",
)

TESTING_EXPORTED = {
    "ADAPTERS",
    "ALPHA_KEY_GRAMMARS",
    "GRAMMARS",
    "PEFT_METADATA_GRAMMARS",
    "SYNTH_DTYPES",
    "SynthModule",
    "SynthSpec",
    "default_blocks",
    "diffusers_linear_shapes",
    "expected_scale",
    "planted_lora",
    "supported_blocks",
    "synth_metadata",
    "synth_modules",
    "synth_tensors",
    "write_synth_lora",
}


def _own_doc(obj: object) -> str:
    """The object's own docstring; dataclasses' generated signature does not count."""
    doc = inspect.getdoc(obj) or ""
    if dataclasses.is_dataclass(obj) and doc.startswith(f"{getattr(obj, '__name__', '')}("):
        return ""
    return doc


def test_exported_names_are_exactly_the_public_api() -> None:
    assert set(lora_prune.__all__) == EXPORTED
    assert len(lora_prune.__all__) == len(EXPORTED)  # no name listed twice
    assert set(lora_prune.testing.__all__) == TESTING_EXPORTED


@pytest.mark.parametrize("module", [lora_prune, lora_prune.testing])
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
    assert set(dir(lora_prune)) >= EXPORTED
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
