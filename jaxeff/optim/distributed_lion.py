"""Distributed Lion: `distributed_lion(...)` and `local_grads(...)`.

Liu, Wu, Chen, Liu, "Communication Efficient Distributed Training with Distributed Lion", 2024
(arXiv 2404.00438). N data-parallel workers, worker i with its OWN momentum m_i and only its
local gradient g_i (there is no gradient all-reduce):

    d_i = sign(b1 * m_i + (1 - b1) * g_i)              (in {-1, 0, +1}: an exact zero abstains)
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

Communication (one shard_map over `axis_name`, all leaves concatenated into one vote vector):
every worker packs its three-valued votes 20 per uint32 word (3^20 < 2^32: 1.6 bits per
parameter, so an exact zero can abstain as the paper's sign(0) = 0 does) and sends slice j of the
vector to worker j (all-to-all); worker j counts the +1 and -1 votes for its slice and
all-gathers the result as bit-planes (majority: 2 bits/param for +1/0/-1; average: the vote sum
+ N, bit_length(2N) bits). This is the paper's worker->server->worker exchange with the server
role split over the N workers. Exact zeros are common: embedding rows absent from a worker's
batches keep m_i = 0 and g_i = 0.

Other mesh axes (e.g. "fsdp") stay automatic inside the shard_map: each worker's gradient is
gathered over them for the vote, every device of a worker computes the same vote (the exchange
crosses `axis_name` only), and the momentum is sharded over `axis_name`, replicated over the rest.

`mesh=None` takes the mesh set with `jax.set_mesh` when it has `axis_name`, else all devices on
one `axis_name` axis. `optax.inject_hyperparams(distributed_lion, static_args=("mesh",))`: a
`Mesh` is callable, so inject_hyperparams would otherwise take it for a schedule.

Not composable with `optax.MultiSteps` (its accumulator has the parameter's shape, not [N, ...]):
accumulate local micro-batch gradients in the train step instead. `chain`, `inject_hyperparams`
and `jit` work. NaN gradients: a NaN local update counts as an abstention (no NaN crosses the
vote); the worker's momentum does become NaN. Zero gradients everywhere give D = 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

VOTES = ("majority", "average")
TRITS_PER_WORD = 20  # 3**20 < 2**32


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


_POW3 = 3 ** np.arange(TRITS_PER_WORD, dtype=np.uint64)


def _pack_trits(trits: jax.Array) -> jax.Array:
  """uint32 values in {0, 1, 2} [..., 20k] -> uint32 [..., k], word w = sum_j trits[20 w + j] 3^j."""
  t = trits.reshape(*trits.shape[:-1], -1, TRITS_PER_WORD).astype(jnp.uint32)
  return jnp.sum(t * jnp.asarray(_POW3, jnp.uint32), axis=-1, dtype=jnp.uint32)


def _unpack_trits(words: jax.Array) -> jax.Array:
  """uint32 [..., k] -> uint32 trits [..., 20k]."""
  t = (words[..., None] // jnp.asarray(_POW3, jnp.uint32)) % jnp.uint32(3)
  return t.reshape(*words.shape[:-1], -1)


def default_mesh(axis_name: str = "data") -> Mesh:
  """The `jax.set_mesh` mesh if it has `axis_name`, else every device on one `axis_name` axis."""
  current = jax.sharding.get_mesh()
  if not current.empty and axis_name in current.axis_names:
    return current
  return jax.make_mesh((jax.device_count(),), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,))


def scale_by_distributed_lion(
  mesh: Mesh,
  axis_name: str = "data",
  b1: float = 0.9,
  b2: float = 0.99,
  vote: str = "majority",
  mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  """The voted direction D (gradient space, no lr, no decay); see the module docstring."""
  if vote not in VOTES:
    raise ValueError(f"vote must be one of {VOTES}, got {vote!r}")
  if axis_name not in mesh.axis_names:
    raise ValueError(f"distributed_lion: the mesh has no axis {axis_name!r} (axes: {mesh.axis_names})")
  n = mesh.shape[axis_name]
  sum_bits = (2 * n).bit_length()  # the vote sum + n is in [0, 2n]

  def init_fn(params):
    def one(p):
      m = jnp.zeros((n,) + p.shape, mu_dtype or p.dtype)
      return jax.lax.with_sharding_constraint(m, NamedSharding(mesh, P(axis_name)))

    # The counter too lives on the mesh, so the state an update returns has init's placement.
    count = jax.lax.with_sharding_constraint(jnp.zeros([], jnp.int32), NamedSharding(mesh, P()))
    return DistributedLionState(count=count, mu=jax.tree.map(one, params))

  def body(grads, mus):
    # One worker: grads / mus leaves are [1, ...] (this worker's slice).
    gs, treedef = jax.tree.flatten(grads)
    ms = jax.tree.leaves(mus)
    trits, new_ms, sizes = [], [], []
    for g, m in zip(gs, ms):
      g32, m32 = g[0].astype(jnp.float32), m[0].astype(jnp.float32)
      c = b1 * m32 + (1 - b1) * g32
      # sign(c) + 1 in {0, 1, 2}: 1 (abstain) for exact zeros and NaN.
      trits.append(jnp.where(c > 0, 2, jnp.where(c < 0, 0, 1)).astype(jnp.uint32).reshape(-1))
      new_ms.append((b2 * m32 + (1 - b2) * g32).astype(m.dtype)[None])
      sizes.append(c.size)
    total = sum(sizes)
    chunk = -(-total // (TRITS_PER_WORD * n)) * TRITS_PER_WORD  # votes per destination worker
    flat = jnp.pad(jnp.concatenate(trits), (0, chunk * n - total), constant_values=1)
    packed = _pack_trits(flat.reshape(n, chunk))  # [n, chunk/20] uint32: row j goes to worker j
    recv = _unpack_trits(jax.lax.all_to_all(packed, axis_name, 0, 0, tiled=False))  # row i: worker i's
    total_vote = jnp.sum(recv == 2, axis=0, dtype=jnp.int32) - jnp.sum(recv == 0, axis=0, dtype=jnp.int32)
    if vote == "majority":
      planes = jnp.stack([total_vote > 0, total_vote < 0])  # 2 bits/param: +1, -1 (tie -> 0)
    else:
      shifted = total_vote + n  # in [0, 2n], bit_length(2n) bit-planes
      planes = jnp.stack([(shifted >> j) & 1 for j in range(sum_bits)]).astype(bool)
    planes = jnp.pad(planes, ((0, 0), (0, -chunk % 32)))  # whole 32-bit words
    allp = _unpack(jax.lax.all_gather(_pack(planes), axis_name, tiled=False))[..., :chunk]  # [n, planes, chunk]
    if vote == "majority":
      d = allp[:, 0].astype(jnp.float32) - allp[:, 1].astype(jnp.float32)
    else:
      s = sum(allp[:, j].astype(jnp.int32) << j for j in range(sum_bits))
      d = (s - n).astype(jnp.float32) / n  # mean of the votes, abstentions counted as 0
    d = d.reshape(-1)
    out, off = [], 0
    for g, size in zip(gs, sizes):
      out.append(d[off : off + size].reshape(g.shape[1:]).astype(g.dtype))
      off += size
    return jax.tree.unflatten(treedef, out), jax.tree.unflatten(treedef, new_ms)

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    for u, m in zip(jax.tree.leaves(updates), jax.tree.leaves(state.mu)):
      if u.shape != m.shape:
        raise ValueError(
          f"distributed_lion expects local gradients stacked as [{n}, *param.shape] "
          f"(see local_grads); got {u.shape}, momentum {m.shape}"
        )
    f = jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(P(axis_name), P(axis_name)),
      out_specs=(P(), P(axis_name)),
      axis_names={axis_name},
      check_vma=False,
    )
    d, mu = f(updates, state.mu)
    return d, DistributedLionState(count=optax.safe_increment(state.count), mu=mu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def distributed_lion(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.9,
  b2: float = 0.99,
  weight_decay: float = 1e-3,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  mu_dtype: Any | None = None,
  *,
  mesh: Mesh | None = None,
  axis_name: str = "data",
  vote: str = "majority",
) -> optax.GradientTransformationExtraArgs:
  r"""Distributed Lion (Liu et al. 2024): Lion with per-worker momenta and a sign vote.

  .. math::

    d_{i,t} = \mathrm{sign}(\beta_1 m_{i,t-1} + (1 - \beta_1) g_{i,t}), \quad
    m_{i,t} = \beta_2 m_{i,t-1} + (1 - \beta_2) g_{i,t} \\
    D_t = \mathrm{sign}\left(\textstyle\sum_i d_{i,t}\right) \ (\text{majority}) \ \text{or} \
    \tfrac{1}{N} \textstyle\sum_i d_{i,t} \ (\text{average}), \quad
    p_t = p_{t-1} - \eta_t (D_t + \lambda p_{t-1})

  Worker i sees only its local gradient g_i; votes travel bit-packed (see the module docstring).
  `update` takes the local gradients stacked [N, ...] (`local_grads`) and returns the same update
  on every device.

  Args:
    learning_rate: the step size eta (Lion's: 3-10x below AdamW's), a float or an optax schedule.
    b1: interpolation between momentum and gradient inside the sign.
    b2: decay of each worker's momentum.
    weight_decay: decoupled weight decay lambda.
    mask: pytree of bools (or callable of the params) choosing the decayed leaves.
    mu_dtype: dtype of the momenta; None keeps the parameters' dtype.
    mesh: the device mesh; its `axis_name` axis holds the N workers. None: the `jax.set_mesh`
      mesh if it has `axis_name`, else every device on one `axis_name` axis.
    axis_name: the mesh axis of the data-parallel workers.
    vote: "majority" (D = sign of the vote sum, 2 bits back per parameter) or "average" (the
      mean vote, bit_length(2N) bits back).

  Example (N workers on the mesh's "data" axis; here every device)::

    >>> import jax, jax.numpy as jnp
    >>> import jaxeff.optim
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    >>> params = {"w": jnp.zeros((4, 2))}
    >>> batch = {"x": jnp.ones((jax.device_count(), 4))}
    >>> loss = lambda p, b: jnp.sum((b["x"] @ p["w"] - 1.0) ** 2)
    >>> tx = jaxeff.optim.distributed_lion(3e-4, weight_decay=0.1, mesh=mesh)
    >>> grads = jaxeff.optim.local_grads(jax.grad(loss), params, batch, mesh=mesh)  # [N, ...]: no all-reduce
    >>> updates, state = tx.update(grads, tx.init(params), params)
    >>> updates["w"].shape
    (4, 2)

  Reference: arXiv 2404.00438 (Algorithm 1).
  """
  mesh = default_mesh(axis_name) if mesh is None else mesh
  return optax.chain(
    scale_by_distributed_lion(mesh, axis_name, b1, b2, vote, mu_dtype),
    optax.add_decayed_weights(weight_decay, mask),
    optax.scale_by_learning_rate(learning_rate),
  )


def local_grads(grad_fn: Callable, params, batch, *, mesh: Mesh | None = None, axis_name: str = "data"):
  """Per-device gradients, stacked [N, ...] and sharded over `axis_name`, with no all-reduce.

  Args:
    grad_fn: `grad_fn(params, local_batch)` -> a gradient pytree (or any pytree, e.g.
      `jax.value_and_grad`'s (loss, grads)); runs once per worker on its shard of `batch`.
    params: replicated over `axis_name` (other mesh axes stay automatic).
    batch: pytree whose leading axis is split over `axis_name`.
    mesh: the mesh; None as in `distributed_lion` (the `jax.set_mesh` mesh or all devices).
    axis_name: the workers' mesh axis.

  Returns:
    `grad_fn`'s output with every leaf stacked [N, ...] over the workers.
  """
  mesh = default_mesh(axis_name) if mesh is None else mesh

  def per_device(p, b):
    return jax.tree.map(lambda g: g[None], grad_fn(p, b))

  return jax.shard_map(
    per_device, mesh=mesh, in_specs=(P(), P(axis_name)), out_specs=P(axis_name), axis_names={axis_name}, check_vma=False
  )(params, batch)
