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


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(ValueError, match=r"logical axes \['layers'\] are not in the rules table"):
        logical_to_pspec(("layers", "embed"))
    assert logical_to_pspec((None, "embed"), {"embed": None}) == P(None, None)


def test_shard_model_places_by_rules_and_replicates_indivisible_dims():
    import numpy as np
    from flax import nnx

    from jaxrl_llm.models import Decoder, ModelConfig
    from jaxrl_llm.parallel import model_shardings, shard_model

    # vocab 30 is not divisible by tensor=4: that dimension is replicated rather than failing
    cfg = ModelConfig(model_type="llama", vocab_size=30, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=4)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model))}
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    shard_model(model, mesh)
    assert model.embed[...].sharding.spec == P(None, "fsdp")
    assert model.layers[0].attn.q[...].sharding.spec == P("fsdp", "tensor", None)
    # kv_heads=2 does not divide over tensor=4 either
    assert model.layers[0].attn.k[...].sharding.spec == P("fsdp", None, None)
    assert model.layers[0].mlp.down[...].sharding.spec == P("tensor", "fsdp")
    shardings = dict(nnx.to_flat_state(model_shardings(model, mesh)))
    for path, value in nnx.to_flat_state(nnx.state(model)):
        np.testing.assert_array_equal(np.asarray(value), before[path])
        got = shardings[path]
        got = got.get_value() if isinstance(got, nnx.Variable) else got
        assert value.get_value().sharding.is_equivalent_to(got, value.get_value().ndim)
