"""jaxpeft.parallel.mesh: logical axes -> PartitionSpecs by the rules (checked on abstract meshes, so any shape
works on this 1-device process), and make_mesh's sizes and errors."""
from __future__ import annotations

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from jaxpeft.parallel import DEFAULT_RULES, MeshError, batch_sharding, make_mesh, spec_for

MESH = AbstractMesh((2, 4, 2), ("data", "fsdp", "tensor"))


def test_default_rules_split_the_model_dim_over_fsdp_and_heads_mlp_vocab_over_tensor():
    assert spec_for(("layers", "embed", "q_heads"), (30, 576, 576), MESH) == P(None, "fsdp", "tensor")
    assert spec_for(("layers", "mlp", "embed"), (30, 1536, 576), MESH) == P(None, "tensor", "fsdp")
    assert spec_for(("vocab", "embed"), (49152, 576), MESH) == P("tensor", "fsdp")
    assert spec_for(("layers", "embed"), (30, 576), MESH) == P(None, "fsdp")
    assert spec_for(("layers", "embed", "rank"), (30, 576, 8), MESH) == P(None, "fsdp")  # ranks replicated
    assert spec_for(("batch",), (16,), MESH) == P(("data", "fsdp"))


def test_a_split_that_does_not_divide_the_dim_is_dropped_not_padded():
    # 9 (e.g. heads) does not divide by tensor=2: that dim stays whole
    assert spec_for(("kv_heads",), (9,), MESH) == P()
    assert spec_for(("batch",), (6,), MESH) == P("data")  # 6 rows: data (2) fits, data*fsdp (8) does not
    assert spec_for(("embed",), (6,), MESH) == P()


def test_a_mesh_axis_is_used_once_per_array_and_size_one_axes_never():
    rules = dict(DEFAULT_RULES, mlp="fsdp")
    assert spec_for(("embed", "mlp"), (64, 128), MESH, rules) == P("fsdp")  # 'fsdp' taken by embed already
    one = AbstractMesh((8, 1, 1), ("data", "fsdp", "tensor"))
    assert spec_for(("layers", "embed", "q_heads"), (2, 64, 64), one) == P()
    assert spec_for(("batch",), (16,), one) == P("data")


def test_custom_rules_map_names_to_several_axes_or_none():
    rules = {"embed": ("fsdp", "tensor"), "q_heads": None}
    assert spec_for(("embed", "q_heads"), (64, 64), MESH, rules) == P(("fsdp", "tensor"))
    assert spec_for(("unknown_name", "embed"), (4, 64), MESH, rules) == P(None, ("fsdp", "tensor"))


def test_make_mesh_fills_minus_one_and_names_bad_sizes():
    mesh = make_mesh()  # this process has 1 CPU device
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert batch_sharding(mesh).spec == P(None)
    with pytest.raises(MeshError, match="needs 8 devices but there are 1"):
        make_mesh(2, 4, 1)
    with pytest.raises(MeshError, match="not divisible by 2"):
        make_mesh(-1, 2, 1)
    with pytest.raises(MeshError, match="at most one -1"):
        make_mesh(-1, -1, 1)
