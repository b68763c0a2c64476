"""Full fine-tuning as a method: every top-level module is trained (a copy of the base tree is the trainable
tree, and is what checkpoints save). Imports the adapter method base only.
"""
from __future__ import annotations

from dataclasses import dataclass

from jaxpeft.errors import AdapterError
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.method import DenseMethod, register


@dataclass(frozen=True)
class FullConfig(AdapterConfig):
    """Train all parameters. `modules_to_save` may restrict training to some top-level modules (e.g.
    ('classifier',) = a linear probe); empty = the whole model."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "method", "full")
        if self.target_modules is not None or self.layers_to_transform is not None:
            raise AdapterError("method 'full' trains whole modules: use modules_to_save, not target_modules or "
                             "layers_to_transform")


class Full(DenseMethod):
    """No dense interception: the core trains the modules_to_save copies (all modules by default)."""

    name = "full"
    config_cls = FullConfig

    def default_targets(self, arch: str) -> tuple[str, ...]:
        return ()


register(Full())
