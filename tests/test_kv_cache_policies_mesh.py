"""Every cache policy on a mesh (batch over data, kv heads over tensor) generates what one device
does, with its buffers created in their sharding."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxeff import sharding
from jaxeff.config import ModelConfig
from jaxeff.generate import Generator
from jaxeff.inference import H2O, KIVI, SnapKV, StreamingLLM
from jaxeff.models import Llama

CFG = ModelConfig(
  vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=8, num_kv_heads=4, initializer_range=0.3
)
PROMPTS = [list(np.random.default_rng(0).integers(0, 64, 40)), list(np.random.default_rng(1).integers(0, 64, 23))]


@pytest.mark.parametrize(
  "policy",
  [
    StreamingLLM(sinks=2, window=14),
    H2O(heavy=8, recent=8),
    SnapKV(budget=24, window=8),
    KIVI(bits=4, group=8, residual=16),
  ],
  ids=lambda p: type(p).__name__,
)
def test_policy_on_a_mesh_equals_one_device(policy):
  cfg = dataclasses.replace(CFG)
  want = Generator(Llama(cfg, rngs=nnx.Rngs(1)), max_batch=2, max_seq_len=64, kv_cache=policy).generate(
    PROMPTS, max_new_tokens=10
  )
  mesh = sharding.make_mesh({"data": 2, "tensor": 4})
  sharded = sharding.create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(1)), mesh)
  gen = Generator(sharded, max_batch=2, max_seq_len=64, mesh=mesh, kv_cache=policy)
  per_head = [x for x in jax.tree.leaves(gen.runner.cache.layers) if x.ndim >= 3]  # [B, KVH, ...] per layer
  assert per_head and all(
    x.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), "tensor")), x.ndim) for x in per_head
  )
  assert gen.generate(PROMPTS, max_new_tokens=10) == want


def test_a_sharded_model_brings_its_mesh():
  """A model placed on a mesh, given without `mesh=`: the runner and `perplexity` run on its mesh
  (the cache created in its sharding; KIVI's per-row counters included) and equal one device."""
  from jaxeff.inference import perplexity

  mesh = sharding.make_mesh({"data": 2, "tensor": 4})
  sharded = sharding.create_sharded(lambda: Llama(CFG, rngs=nnx.Rngs(1)), mesh)
  plain = Llama(CFG, rngs=nnx.Rngs(1))
  policy = KIVI(bits=4, group=8, residual=16)
  tokens = np.concatenate(PROMPTS)
  assert perplexity(sharded, tokens, kv_cache=policy, chunk=16) == pytest.approx(
    perplexity(plain, tokens, kv_cache=policy, chunk=16), rel=1e-5
  )
  gen = Generator(sharded, max_batch=2, max_seq_len=64, kv_cache=policy)
  assert gen.runner.mesh is not None
  assert gen.generate(PROMPTS, max_new_tokens=6) == Generator(
    plain, max_batch=2, max_seq_len=64, kv_cache=policy
  ).generate(PROMPTS, max_new_tokens=6)
