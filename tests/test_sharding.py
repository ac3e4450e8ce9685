"""Sharding: same logits/gradients on 1 device, 8x data, 2x4 fsdp x tensor; params sharded per the rules."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxeff import sharding
from jaxeff.config import ModelConfig
from jaxeff.models import Llama

CFG = ModelConfig(
  vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=4, scan_layers=True
)
MESHES = {"one": None, "data8": {"data": 8}, "fsdp2_tensor4": {"fsdp": 2, "tensor": 4}}


def _loss(model, tokens):
  logits = model(tokens[:, :-1])
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def _run(mesh_shape):
  mesh = None if mesh_shape is None else sharding.make_mesh(mesh_shape, jax.devices()[:8])
  model = sharding.create_sharded(lambda: Llama(CFG, rngs=nnx.Rngs(0)), mesh)
  tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, 64, dtype=jnp.int32)
  step = nnx.jit(lambda m, t: (m(t), nnx.grad(_loss)(m, t)))
  if mesh is None:
    logits, grads = step(model, tokens)
  else:
    with jax.set_mesh(mesh):
      tokens = jax.device_put(tokens, jax.NamedSharding(mesh, sharding.logical_to_spec(("batch", None))))
      logits, grads = step(model, tokens)
  return model, logits, grads


@pytest.fixture(scope="module")
def reference():
  return _run(None)


@pytest.mark.parametrize("mesh", ["data8", "fsdp2_tensor4"])
def test_logits_and_grads_agree_across_meshes(mesh, reference):
  _, ref_logits, ref_grads = reference
  model, logits, grads = _run(MESHES[mesh])
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=2e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-6, rtol=1e-4)


def test_params_sharded_as_rules_say():
  model, _, _ = _run(MESHES["fsdp2_tensor4"])
  expect = {
    ("embed_tokens", "embedding"): P("tensor", "fsdp"),  # (vocab, embed)
    ("layers", "mlp", "gate_proj", "kernel"): P(None, "fsdp", "tensor"),  # (layers, embed, mlp)
    ("layers", "mlp", "down_proj", "kernel"): P(None, "tensor", "fsdp"),
    ("layers", "self_attn", "k_proj", "kernel"): P(None, "fsdp", "tensor"),
    ("lm_head", "kernel"): P("fsdp", "tensor"),
    ("norm", "scale"): P(),
  }
  state = nnx.state(model, nnx.Param)
  for path, spec in expect.items():
    v = state
    for p in path:
      v = v[p]
    arr = v[...]
    assert arr.sharding.spec == spec, path
    # Really split: each device holds 1/(number of shards) of the array.
    n_shards = np.prod([dict(fsdp=2, tensor=4)[a] for a in spec if a])
    assert arr.addressable_shards[0].data.size == arr.size // n_shards


def test_logical_to_spec_uses_each_mesh_axis_once():
  assert sharding.logical_to_spec(("batch", "seq", "embed")) == P(("data", "fsdp"), None, None)
  assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")


def test_mesh_errors():
  with pytest.raises(sharding.MeshError, match="does not divide"):
    sharding.make_mesh({"data": -1, "tensor": 3}, jax.devices()[:8])
  with pytest.raises(sharding.MeshError, match="needs 16 devices"):
    sharding.make_mesh({"data": 4, "fsdp": 4}, jax.devices()[:8])
  with pytest.raises(sharding.MeshError, match="unknown mesh axes"):
    sharding.make_mesh({"model": 2}, jax.devices()[:8])


def test_place_sends_each_device_only_its_shard():
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4}, jax.devices()[:8])
  host = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
  target = jax.NamedSharding(mesh, P("fsdp", "tensor"))
  requested = []

  class Recording(np.ndarray):
    def __getitem__(self, index):
      requested.append(np.empty(self.shape)[index].shape)
      return np.asarray(self).__getitem__(index)

  placed = sharding.place({"w": host.view(Recording)}, {"w": target})["w"]
  assert placed.sharding == target
  assert requested == [(32, 8)] * 8  # one block per device, never the whole array
  np.testing.assert_array_equal(np.asarray(placed), host)


def test_hf_load_is_born_sharded(tmp_path, monkeypatch):
  """jaxeff.hf.load places every weight by its logical axes without a whole copy on one device."""
  import jaxeff.hf

  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  jaxeff.hf.save(model, cfg, tmp_path / "hf")
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4}, jax.devices()[:8])
  monkeypatch.setattr(jax, "device_put", lambda *a, **k: pytest.fail("device_put of a whole array"))
  loaded, _ = jaxeff.hf.load(tmp_path / "hf", mesh=mesh)
  kernel = loaded.layers[0].mlp.gate_proj.kernel[...]
  assert kernel.sharding.spec == P("fsdp", "tensor") and kernel.addressable_shards[0].data.shape == (16, 16)
  for a, b in zip(jax.tree.leaves(nnx.state(loaded)), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unknown_logical_name_raises_instead_of_replicating():
  from jaxeff.errors import ShardingError

  with pytest.raises(ShardingError, match="unknown logical axis 'embd'"):
    sharding.logical_to_spec((sharding.BATCH, "embd"))
  with pytest.raises(ShardingError, match="unknown logical axis"):
    sharding.constrain(jnp.zeros((2, 3)), ("batch", "sequence"))  # checked even without a mesh
  with pytest.raises(ShardingError, match="not in"):
    with sharding.axis_rules({**sharding.LOGICAL_RULES, sharding.MLP: "model"}):
      pass


def test_rules_override_reaches_parameters_and_activations():
  """A different table (MLP replicated instead of on tensor) changes the parameters' shardings
  and the activations' constraints inside the compiled program, through `axis_rules`."""
  mesh = sharding.make_mesh({"data": 2, "tensor": 4})
  rules = {**sharding.LOGICAL_RULES, sharding.MLP: None}
  assert sharding.logical_to_spec((sharding.EMBED, sharding.MLP), rules) == P("fsdp", None)
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64, dtype=jnp.int32)

  cfg = dataclasses.replace(CFG, intermediate_size=96)  # a size no other activation has

  def compiled_text(rules):
    model = sharding.create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    with jax.set_mesh(mesh), sharding.axis_rules(rules or sharding.LOGICAL_RULES):
      return model, nnx.jit(lambda m, t: m(t)).lower(model, tokens).as_text()

  default_model, default_text = compiled_text(None)
  model, text = compiled_text(rules)
  assert default_model.layers.mlp.up_proj.kernel.sharding.spec == P(None, "fsdp", "tensor")
  assert model.layers.mlp.up_proj.kernel.sharding.spec == P(None, "fsdp", None)
  # The [batch, seq, mlp] activation is constrained over "tensor" by default, not with the override.
  mlp_constraints = lambda t: [l for l in t.splitlines() if "sharding_constraint" in l and "x96x" in l]
  assert any('{"tensor"}' in l for l in mlp_constraints(default_text)), mlp_constraints(default_text)
  assert mlp_constraints(text) and not any('"tensor"' in l for l in mlp_constraints(text)), mlp_constraints(text)
