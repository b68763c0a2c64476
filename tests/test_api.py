"""The public API is documented: every public module, function and class of jaxpeft has a docstring,
`help(jaxpeft)` lists the entry points, and `jaxpeft.adapters.__all__` names only things that exist."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import pydoc

import jaxpeft

SKIP_MODULES = {"jaxpeft.reference"}  # a generator script's module: checked by tests/test_reference.py


def _modules():
    for info in pkgutil.walk_packages(jaxpeft.__path__, "jaxpeft."):
        if info.name not in SKIP_MODULES and not any(p.startswith("_") for p in info.name.split(".")[1:]):
            yield importlib.import_module(info.name)


def test_every_public_module_function_class_and_method_has_a_docstring():
    missing = []
    for mod in _modules():
        if not (mod.__doc__ or "").strip():
            missing.append(mod.__name__)
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                if not (obj.__doc__ or "").strip():
                    missing.append(f"{mod.__name__}.{name}")
            if inspect.isclass(obj):
                for mname, member in vars(obj).items():
                    if mname.startswith("_") or not inspect.isfunction(member):
                        continue
                    if not (inspect.getdoc(member) or "").strip():
                        missing.append(f"{mod.__name__}.{name}.{mname}")
    assert not missing, f"{len(missing)} public names without a docstring: {missing}"


def test_help_of_the_package_lists_its_entry_points():
    text = pydoc.render_doc(jaxpeft, renderer=pydoc.plaintext)
    for name in ("load_pretrained", "jaxpeft.adapters", "jaxpeft.train", "AdaptedModel", "LoraConfig", "run",
                 "jaxpeft.generation", "jaxpeft.bundled"):
        assert name in text, f"help(jaxpeft) does not mention {name}"


def test_adapters_all_lists_existing_public_names_including_every_method_config():
    import jaxpeft.adapters as adapters

    assert all(hasattr(adapters, name) for name in adapters.__all__)
    configs = {m.config_cls.__name__ for m in adapters.METHODS.values()}
    assert configs <= set(adapters.__all__), configs - set(adapters.__all__)
    assert {"AdaptedModel", "merge", "export_peft", "import_peft"} <= set(adapters.__all__)
