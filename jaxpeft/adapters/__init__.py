"""Adapters: named PEFT methods attached to a linen model by intercepting its layers.

May import jaxpeft.models and jaxpeft.loading; never training code. `AdaptedModel` is the entry point;
each method (LoRA, DoRA, (IA)^3, ...) is one module registering itself in `method.METHODS`.
"""
from jaxpeft.adapters import dora as _dora  # noqa: F401  (each import registers its method)
from jaxpeft.adapters import full as _full  # noqa: F401
from jaxpeft.adapters import ia3 as _ia3  # noqa: F401
from jaxpeft.adapters import lora as _lora  # noqa: F401
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.core import ALL, AdaptedModel, AdapterState, drop_adapter
from jaxpeft.adapters.dora import DoraConfig
from jaxpeft.adapters.full import FullConfig
from jaxpeft.adapters.ia3 import IA3Config
from jaxpeft.adapters.lora import LoraConfig
from jaxpeft.adapters.method import METHODS, DenseMethod, register

__all__ = ["ALL", "AdaptedModel", "AdapterConfig", "AdapterState", "DenseMethod", "DoraConfig", "FullConfig", "IA3Config", "LoraConfig", "METHODS",
           "drop_adapter", "register"]
