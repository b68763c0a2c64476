"""jaxpeft: parameter-efficient fine-tuning of pretrained transformers in JAX/Flax.

The public API, by layer (each imports only the layers above it in this list):

- `jaxpeft.load_pretrained(path_or_name, task=...)`: a checkpoint (HF folder, .gguf, asset name, hub id) as a
  linen module plus a plain parameter tree (`jaxpeft.loading`; `jaxpeft.loading.save_hf_folder` writes one back).
- `jaxpeft.models`: the backbones (`ModelConfig`, `build_model`), the name map, the KV cache.
- `jaxpeft.adapters`: `AdaptedModel.wrap(module).add(name, LoraConfig(...))`, one config class per method
  (LoraConfig, DoraConfig, IA3Config, KasaConfig, PissaConfig, CordaConfig, SorsaConfig, SvfitConfig, SaltConfig,
  AdaloraConfig, PrefixTuningConfig, PTuningV2Config, APTConfig, IMSMConfig, FullConfig), `merge`,
  `export_peft` / `import_peft` (Hugging Face PEFT folders), `save_any` / `load_any`.
- `jaxpeft.generation.generate`: jitted decoding with a KV cache.
- `jaxpeft.parallel`: device meshes and shardings (`make_mesh`), `jax.distributed` start-up.
- `jaxpeft.train`: `run(config)` (the `jaxpeft train` job), `evaluate`, `load_config` / `RunConfig`.
- `jaxpeft.bundled`: the small datasets shipped with the package (`data.path: bundled:NAME`).
- `jaxpeft.cli`: the `jaxpeft` command; `jaxpeft.reference` generates docs/reference.md.
"""
__version__ = "0.1.0"

__all__ = ["__version__", "load_pretrained"]


def __getattr__(name):  # lazy, so `import jaxpeft` stays cheap (no jax import for `--help`)
    if name == "load_pretrained":
        from jaxpeft.loading.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'jaxpeft' has no attribute {name!r}")
