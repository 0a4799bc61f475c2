import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxrl_llm.parallel import DEFAULT_RULES, batch_sharding, logical_to_pspec, make_mesh


def test_make_mesh_fill_and_errors():
    mesh = make_mesh({"fsdp": 2, "data": -1})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1, "expert": 1}
    assert dict(make_mesh().shape)["data"] == jax.device_count()
    with pytest.raises(ValueError, match="needs 16 devices but 8 are available"):
        make_mesh({"data": 4, "tensor": 4})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 2})
    with pytest.raises(ValueError, match="not divisible"):
        make_mesh({"tensor": 3, "data": -1})


def test_rules_table_and_reuse_of_axes():
    assert logical_to_pspec(("embed", "heads", "head_dim")) == P("fsdp", "tensor", None)
    # a mesh axis is used once per array: the second dimension mapped to `tensor` is replicated
    assert logical_to_pspec(("heads", "mlp")) == P("tensor", None)
    rules = dict(DEFAULT_RULES, embed=None, mlp=("fsdp", "tensor"))
    assert logical_to_pspec(("embed", "mlp"), rules) == P(None, ("fsdp", "tensor"))
    mesh = make_mesh({"data": 8})
    assert batch_sharding(mesh).spec == P("data", None)
    # size-1 mesh axes are dropped from specs
    assert logical_to_pspec(("embed", "mlp"), mesh=mesh) == P(None, None)
