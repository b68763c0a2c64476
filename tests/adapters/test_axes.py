"""jaxpeft.adapters.axes: every adapter variable gets logical axes from the base weight it adapts (abstract
init only: no weights, no devices), so on a mesh adapters shard like their base."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxpeft.adapters import AdaptedModel, IMSMConfig, LoraConfig
from jaxpeft.adapters.axes import state_axes
from jaxpeft.adapters.dora import DoraConfig
from jaxpeft.adapters.ia3 import IA3Config
from jaxpeft.adapters.kasa import KasaConfig
from jaxpeft.adapters.prefix import PrefixTuningConfig
from jaxpeft.loading.convert import unflatten_params
from jaxpeft.models import ModelConfig, build_model
from jaxpeft.models.namemap import name_map

CFG = ModelConfig(arch="llama", vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=128, max_position_embeddings=128, norm_eps=1e-5, hidden_act="silu",
                  tie_word_embeddings=False, pad_token_id=0)
Q = "['default']['modules']['layers']['self_attn']['q_proj']"
V = "['default']['modules']['layers']['self_attn']['v_proj']"


def axes_of(config) -> dict[str, tuple]:
    frozen = unflatten_params({e.flax_path: jax.ShapeDtypeStruct(e.shape, jnp.float32)
                               for e in name_map(CFG, "causal_lm")})
    model = AdaptedModel.wrap(build_model(CFG, "causal_lm")).add("default", config)
    state = jax.eval_shape(lambda f: model.init(jax.random.key(0), f), frozen)
    axes = state_axes(model, state)
    flat = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    shapes = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    out = {jax.tree_util.keystr(p): a for p, a in flat}
    assert sorted(out) == sorted(shapes) and all(len(out[k]) == len(shapes[k]) for k in out)  # one name per dim
    return out


def test_lora_a_takes_the_input_axis_b_the_output_axis_rank_replicated():
    ax = axes_of(LoraConfig(r=4, target_modules=("q_proj", "v_proj", "down_proj")))
    assert ax[f"['trainable']{Q}['lora_A']"] == ("layers", "embed", "rank")
    assert ax[f"['trainable']{Q}['lora_B']"] == ("layers", "rank", "q_heads")
    assert ax[f"['trainable']{V}['lora_B']"] == ("layers", "rank", "kv_heads")
    down = "['trainable']['default']['modules']['layers']['mlp']['down_proj']"
    assert ax[f"{down}['lora_A']"] == ("layers", "mlp", "rank") and ax[f"{down}['lora_B']"] == ("layers", "rank", "embed")


@pytest.mark.parametrize("config, leaf, want", [
    (DoraConfig(r=4), f"['trainable']{Q}['lora_magnitude_vector']", ("layers", "q_heads")),
    (IA3Config(), "['trainable']['default']['modules']['layers']['self_attn']['k_proj']['ia3_l']",
     ("layers", "kv_heads")),
    (KasaConfig(r=4), f"['extras']{Q}['kasa_drop_left']", ("layers", "embed", "rank")),
    (KasaConfig(r=4), f"['extras']{Q}['kasa_drop_right']", ("layers", "rank", "q_heads")),
    (KasaConfig(r=4), f"['trainable']{Q}['lora_diag']", ("layers", "rank")),
    (PrefixTuningConfig(num_virtual_tokens=3),
     "['trainable']['default']['modules']['layers']['self_attn']['prefix']['prefix_k']",
     ("layers", "rank", "rank", "rank")),
    (IMSMConfig(inner=LoraConfig(r=4)), "['trainable']['default']['shared']['imsm_gate']['w_a']", ("rank", "rank")),
], ids=["dora-magnitude", "ia3-vector", "kasa-left", "kasa-right", "kasa-diag", "prefix-entries", "imsm-gate"])
def test_vectors_svd_factors_prefixes_and_gates_follow_the_rule(config, leaf, want):
    assert axes_of(config)[leaf] == want
