"""`AdapterConfig`: the fields every adapter method shares (targeting, layer selection, saved modules).

Imports nothing from jaxpeft. Method configs (LoraConfig, ...) subclass it as frozen dataclasses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AdapterConfig:
    r"""Targeting shared by every method.

    target_modules: PEFT-style list of module-name suffixes (a name matches when it equals the entry or
        ends with '.' + entry), or one regex string matched in full against the canonical per-layer HF
        module path (e.g. r'model\\.layers\\.\\d+\\.self_attn\\.(q|v)_proj'). None = the method's default
        targets for the architecture.
    exclude_modules: same forms; matching modules are not adapted.
    layers_to_transform: only these layer indices (others keep the base behaviour).
    rank_pattern / alpha_pattern: {pattern: value} overriding r / alpha per module; the first pattern
        with re.match(rf"(.*\.)?({pattern})$", hf_module_path) wins, as in PEFT.
    modules_to_save: top-level modules trained in full alongside the adapter (e.g. ('classifier',)).
    """

    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    modules_to_save: tuple[str, ...] = ()

    method: str = field(default="", init=False)
    """Registry name of the method (set by each subclass)."""

    def __post_init__(self) -> None:
        # normalise lists and dicts (from YAML/JSON) to hashable tuples: configs are static jit arguments
        for key in ("target_modules", "exclude_modules"):
            v = getattr(self, key)
            if isinstance(v, list):
                object.__setattr__(self, key, tuple(v))
        for key in ("layers_to_transform", "modules_to_save"):
            v = getattr(self, key)
            if isinstance(v, (list, int)):
                object.__setattr__(self, key, tuple(v) if isinstance(v, list) else (v,))
        for key in ("rank_pattern", "alpha_pattern"):
            v = getattr(self, key)
            if isinstance(v, dict):
                object.__setattr__(self, key, tuple(v.items()))

    def options_for(self, hf_module: str) -> dict[str, Any]:
        """Per-module overrides (e.g. {'r': 16}) from rank_pattern / alpha_pattern for one HF module path."""
        import re

        out: dict[str, Any] = {}
        for key, patterns in (("r", self.rank_pattern), ("alpha", self.alpha_pattern)):
            for pat, value in patterns:
                if re.match(rf"(.*\.)?({pat})$", hf_module):
                    out[key] = value
                    break
        return out
