"""Distributed Lion: `distributed_lion(...)`, `local_grads(...)`, `hlo_collective_bytes(...)`.

Liu, Wu, Chen, Liu, "Communication Efficient Distributed Training with Distributed Lion", 2024
(arXiv 2404.00438). N data-parallel workers, worker i with its OWN momentum m_i and only its
local gradient g_i (there is no gradient all-reduce):

    d_i = sign(b1 * m_i + (1 - b1) * g_i)              (1 bit per parameter on the wire)
    m_i = b2 * m_i + (1 - b2) * g_i
    D   = sign(sum_i d_i)  ("majority", ties -> 0)  or  D = mean_i d_i  ("average")
    p   = p - lr * (D + wd * p)                        (every worker applies the same D)

Defaults as `optax.lion`: b1 0.9, b2 0.99, weight_decay 1e-3, vote "majority".

Calling convention. `update` takes per-device LOCAL gradients stacked on a leading axis of size
N = mesh.shape[axis_name], sharded over `axis_name` (leaf shape [N, *param.shape]); it returns
updates of the parameter's shape, identical on every device. The momentum lives in the state
with the same leading axis, sharded over `axis_name` (never averaged). A train step:

    grads = local_grads(jax.grad(loss_fn), params, batch, mesh=mesh)   # [N, ...], no all-reduce
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

Communication (one shard_map over `axis_name`, all leaves concatenated into one bit vector):
every worker packs its N slices of sign bits 32 per uint32 and sends slice j to worker j
(all-to-all, 1 bit/param); worker j counts the votes for its slice and all-gathers the result
as bit-planes (majority: 2 bits/param for +1/0/-1; average: the +1 count, bit_length(N) bits). This is the paper's
worker->server->worker exchange with the server role split over the N workers.

Exact zeros: Lion's sign(0) = 0 cannot travel in 1 bit. A worker whose b1*m + (1-b1)*g is exactly
0 (e.g. embedding rows absent from its batch, at the start) votes +1 on even and -1 on odd worker
indices, so when all workers of an even-sized group have 0 the votes cancel and the parameter only
decays, as the paper's rule would; with an odd count, or mixed zeros, it differs by one vote.

`optax.inject_hyperparams(distributed_lion, static_args=("mesh",))`: a `Mesh` is callable, so
inject_hyperparams would otherwise take it for a schedule.

Not composable with `optax.MultiSteps` (its accumulator has the parameter's shape, not [N, ...]):
accumulate local micro-batch gradients in the train step instead. `chain`, `inject_hyperparams`
and `jit` work. NaN gradients: the sign bits of NaN are "not > 0", so a NaN does not propagate
through the vote; the worker's momentum does become NaN. Zero gradients give D = 0 (see above).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

VOTES = ("majority", "average")


class DistributedLionState(NamedTuple):
  count: jax.Array
  mu: Any  # per-device momentum, leaves [N, *param.shape], leading axis sharded over the data axis


def _pack(bits: jax.Array) -> jax.Array:
  """bool [..., 32k] -> uint32 [..., k], bit j of word w = bits[32 w + j]."""
  b = bits.reshape(*bits.shape[:-1], -1, 32).astype(jnp.uint32)
  return jnp.sum(b << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _unpack(words: jax.Array) -> jax.Array:
  """uint32 [..., k] -> bool [..., 32k]."""
  b = (words[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
  return b.reshape(*words.shape[:-1], -1).astype(bool)


def scale_by_distributed_lion(
    mesh: Mesh,
    axis_name: str = "data",
    b1: float = 0.9,
    b2: float = 0.99,
    vote: str = "majority",
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  """The voted direction D (gradient space, no lr, no decay); see module docstring."""
  if vote not in VOTES:
    raise ValueError(f"vote must be one of {VOTES}, got {vote!r}")
  n = mesh.shape[axis_name]

  def init_fn(params):
    def one(p):
      m = jnp.zeros((n,) + p.shape, mu_dtype or p.dtype)
      return jax.lax.with_sharding_constraint(m, NamedSharding(mesh, P(axis_name)))
    return DistributedLionState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(one, params))

  def body(grads, mus):
    # One device: grads / mus leaves are [1, ...] (this worker's slice).
    idx = jax.lax.axis_index(axis_name)
    gs, treedef = jax.tree.flatten(grads)
    ms = jax.tree.leaves(mus)
    bits, new_ms, sizes = [], [], []
    for g, m in zip(gs, ms):
      g32, m32 = g[0].astype(jnp.float32), m[0].astype(jnp.float32)
      c = b1 * m32 + (1 - b1) * g32
      # sign(c) as one bit; exact zeros split by worker parity (see module docstring).
      bits.append(jnp.where(c == 0, idx % 2 == 0, c > 0).reshape(-1))
      new_ms.append((b2 * m32 + (1 - b2) * g32).astype(m.dtype)[None])
      sizes.append(c.size)
    total = sum(sizes)
    chunk = -(-total // (32 * n)) * 32  # bits per destination, a multiple of 32
    flat = jnp.pad(jnp.concatenate(bits), (0, chunk * n - total))
    packed = _pack(flat.reshape(n, chunk))  # [n, chunk/32] uint32: row j goes to worker j
    recv = jax.lax.all_to_all(packed, axis_name, 0, 0, tiled=False)  # row i: worker i's bits
    ups = jnp.sum(_unpack(recv), axis=0, dtype=jnp.int32)  # [chunk]: +1 votes for my slice
    if vote == "majority":
      planes = jnp.stack([2 * ups > n, 2 * ups < n])  # 2 bits/param: +1, -1 (tie -> 0)
    else:
      # The +1 count k in [0, n] as bit-planes: bit_length(n) bits/param (4 for n = 8).
      planes = jnp.stack([(ups >> j) & 1 for j in range(n.bit_length())]).astype(bool)
    allp = _unpack(jax.lax.all_gather(_pack(planes), axis_name, tiled=False))  # [n, planes, chunk]
    if vote == "majority":
      d = allp[:, 0].astype(jnp.float32) - allp[:, 1].astype(jnp.float32)
    else:
      k = sum(allp[:, j].astype(jnp.int32) << j for j in range(n.bit_length()))
      d = (2 * k - n).astype(jnp.float32) / n  # mean of the +-1 votes
    d = d.reshape(-1)
    out, off = [], 0
    for g, size in zip(gs, sizes):
      out.append(d[off:off + size].reshape(g.shape[1:]).astype(g.dtype))
      off += size
    return jax.tree.unflatten(treedef, out), jax.tree.unflatten(treedef, new_ms)

  def update_fn(updates, state, params=None):
    del params
    for u, m in zip(jax.tree.leaves(updates), jax.tree.leaves(state.mu)):
      if u.shape != m.shape:
        raise ValueError(f"distributed_lion expects local gradients stacked as [{n}, *param.shape] "
                         f"(see local_grads); got {u.shape}, momentum {m.shape}")
    f = jax.shard_map(body, mesh=mesh, in_specs=(P(axis_name), P(axis_name)),
                      out_specs=(P(), P(axis_name)), axis_names={axis_name}, check_vma=False)
    d, mu = f(updates, state.mu)
    return d, DistributedLionState(count=optax.safe_increment(state.count), mu=mu)

  return optax.GradientTransformation(init_fn, update_fn)


def distributed_lion(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 1e-3,
    mask: Optional[Any | Callable[[optax.Params], Any]] = None,
    mu_dtype: Optional[Any] = None,
    *,
    mesh: Mesh,
    axis_name: str = "data",
    vote: str = "majority",
) -> optax.GradientTransformation:
  """Distributed Lion (see module docstring): updates = -lr * (D + wd * p)."""
  return optax.chain(
      scale_by_distributed_lion(mesh, axis_name, b1, b2, vote, mu_dtype),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


def local_grads(grad_fn: Callable, params, batch, *, mesh: Mesh, axis_name: str = "data"):
  """Per-device gradients, stacked [N, ...] and sharded over `axis_name`, with no all-reduce.

  `grad_fn(params, local_batch)` runs once per device on its shard of `batch` (leading batch axis
  split over `axis_name`); `params` are replicated over `axis_name` (other mesh axes stay auto).
  """
  def per_device(p, b):
    return jax.tree.map(lambda g: g[None], grad_fn(p, b))

  return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axis_name)), out_specs=P(axis_name),
                       axis_names={axis_name}, check_vma=False)(params, batch)


_DTYPE_BITS = {"pred": 8, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "bf16": 16, "f16": 16,
               "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64}
_KINDS = ("all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-permute")
_OP = re.compile(r"^\s*%?[\w.\-]+\s*=\s*(.*?)\s(" + "|".join(_KINDS) + r")(-start)?\(")


def _shape_bytes(text: str) -> int:
  text = re.sub(r"/\*.*?\*/", "", text)
  total = 0
  for dt, dims in re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", text):
    if dt in _DTYPE_BITS:
      total += _DTYPE_BITS[dt] * math.prod(int(x) for x in dims.split(",") if x) // 8
  return total


def _group_size(line: str) -> int | None:
  m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[\d+,(\d+)\]", line)  # iota form [groups, size]<=[n]
  return int(m.group(1)) if m else None


def hlo_collective_bytes(hlo_text: str) -> list[dict]:
  """Collectives in a compiled HLO module, with per-device operand bytes.

  Reads `jax.jit(f).lower(...).compile().as_text()`. Compiled HLO prints result types only, so
  the operand size is derived: all-gather operand = result / group size, reduce-scatter operand =
  result * group size, otherwise operand = result (tuple results are summed). Written for the
  synchronous forms XLA:CPU emits; async `-start` ops are reported with kind + "-start".
  """
  out = []
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    kind, result = m.group(2), _shape_bytes(m.group(1))
    group = _group_size(line) or 1
    operand = result // group if kind == "all-gather" else result * group if kind == "reduce-scatter" else result
    out.append({"kind": kind + (m.group(3) or ""), "result_bytes": result, "operand_bytes": operand,
                "group_size": group, "line": line.strip()})
  return out


def wire_bytes(kind: str, operand_bytes: int, n: int) -> float:
  """Bytes one device receives for a collective under the usual ring/direct algorithms."""
  if kind == "all-reduce":
    return 2 * (n - 1) / n * operand_bytes
  if kind == "all-gather":
    return (n - 1) * operand_bytes
  if kind in ("all-to-all", "reduce-scatter"):
    return (n - 1) / n * operand_bytes
  return operand_bytes
