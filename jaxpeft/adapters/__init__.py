"""Adapters: named PEFT methods attached to a linen model by intercepting its layers.

May import jaxpeft.models and jaxpeft.loading; never training code. `AdaptedModel` is the entry point;
each method (LoRA, DoRA, (IA)^3, KaSA, PiSSA, CorDA, SORSA, SVFit, SALT, AdaLoRA, prefix tuning, P-tuning v2, APT; IMSM wraps any of them) is one module registering itself in `method.METHODS`.
"""
from jaxpeft.adapters import adalora as _adalora  # noqa: F401  (each import registers its method)
from jaxpeft.adapters import apt as _apt  # noqa: F401
from jaxpeft.adapters import corda as _corda  # noqa: F401
from jaxpeft.adapters import dora as _dora  # noqa: F401
from jaxpeft.adapters import full as _full  # noqa: F401
from jaxpeft.adapters import ia3 as _ia3  # noqa: F401
from jaxpeft.adapters import imsm as _imsm  # noqa: F401  (after the methods it may wrap)
from jaxpeft.adapters import kasa as _kasa  # noqa: F401
from jaxpeft.adapters import lora as _lora  # noqa: F401
from jaxpeft.adapters import pissa as _pissa  # noqa: F401
from jaxpeft.adapters import prefix as _prefix  # noqa: F401
from jaxpeft.adapters import ptuning_v2 as _ptuning_v2  # noqa: F401
from jaxpeft.adapters import salt as _salt  # noqa: F401
from jaxpeft.adapters import sorsa as _sorsa  # noqa: F401
from jaxpeft.adapters import svfit as _svfit  # noqa: F401
from jaxpeft.adapters.adalora import AdaloraConfig
from jaxpeft.adapters.apt import APTConfig
from jaxpeft.adapters.config import AdapterConfig
from jaxpeft.adapters.corda import CordaConfig
from jaxpeft.adapters.core import ALL, AdaptedModel, AdapterState, drop_adapter
from jaxpeft.adapters.dora import DoraConfig
from jaxpeft.adapters.full import FullConfig
from jaxpeft.adapters.ia3 import IA3Config
from jaxpeft.adapters.imsm import IMSMConfig
from jaxpeft.adapters.kasa import KasaConfig
from jaxpeft.adapters.lora import LoraConfig
from jaxpeft.adapters.merge import merge, unmerge
from jaxpeft.adapters.method import METHODS, DenseMethod, Method, PrefixMethod, register
from jaxpeft.adapters.native_io import load_adapter, load_any, save_adapter, save_any
from jaxpeft.adapters.partition import (count_parameters, partitioned_optimizer, split_state,
                                       trainable_parameters_line)
from jaxpeft.adapters.peft_io import export_peft, import_peft
from jaxpeft.adapters.pissa import PissaConfig
from jaxpeft.adapters.prefix import PrefixTuningConfig
from jaxpeft.adapters.ptuning_v2 import PTuningV2Config
from jaxpeft.adapters.salt import SaltConfig
from jaxpeft.adapters.sorsa import SorsaConfig
from jaxpeft.adapters.svfit import SvfitConfig

__all__ = ["ALL", "APTConfig", "AdaloraConfig", "AdaptedModel", "AdapterConfig", "AdapterState", "CordaConfig", "DenseMethod", "DoraConfig", "FullConfig",
           "IA3Config", "IMSMConfig", "KasaConfig", "LoraConfig", "METHODS", "Method", "PTuningV2Config", "PissaConfig", "PrefixMethod", "PrefixTuningConfig", "SaltConfig",
           "SorsaConfig", "SvfitConfig",
           "count_parameters", "drop_adapter", "export_peft", "import_peft", "load_adapter", "load_any", "merge",
           "partitioned_optimizer", "register", "save_adapter", "save_any", "split_state", "trainable_parameters_line",
           "unmerge"]
