"""GaLore: `galore(...)`, reference-faithful (jiaweizzhao/GaLore, "std" projection).

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024
(arXiv 2403.03507). For an attention/MLP matrix G [m, n]:

    every T steps (t % T == 0): U, S, Vh = svd(f32(G))
        m >= n: P = Vh[:r]        (r x n),  R = G P^T  (m x r),  back: N P
        m <  n: P = U[:, :r]      (m x r),  R = P^T G  (r x n),  back: P N
    N = Adam(R)        moments kept across projector refreshes (as the reference does)
    p = p * (1 - lr * wd) - lr * scale * back(N)

Defaults (the paper's 60M-1B settings): rank 128, update_proj_gap 200, scale 0.25, Adam
b1 0.9, b2 0.999, eps 1e-8, weight_decay 0.0. The projected side is the SMALLER one, so the state
is r x max(m, n) (`optax.contrib.galore` projects the larger side and cannot be configured to
match, so this is written here; the projector code is shared with `osd`). Only attention and MLP
matrices are projected: logical axes containing "heads", "kv_heads" or "mlp" (never "vocab");
everything else (embeddings, LM head, norms) gets full-rank AdamW with the same lr and wd.
Without `logical_axes`/`projection_mask`/`dimension_numbers` the shape rule (ndim == 2) is used,
which also projects embeddings. Stacked "layers" weights are projected per layer. The SVD runs
under `lax.cond` outside any vmap, so it really runs only every T steps.

Deviations from the reference code: Adam is optax's (eps added to sqrt(v_hat), as in the paper's
Algorithm 1; the reference's HF AdamW adds eps to sqrt(v) with eps 1e-6); decoupled weight decay
uses the pre-step parameter (optax convention; the reference decays after the step: O(lr^2 wd)).
NaN gradients propagate (the SVD returns NaN, it does not crash); zero gradients give zero updates.
`rank` sets state shapes: with `optax.inject_hyperparams` pass `static_args=("rank",)`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxeff.optim import _projection as proj
from jaxeff.optim import _util


class GaLoreState(NamedTuple):
  count: jax.Array  # int32 step counter, decides the refreshes
  projector: Any  # per matrix P [batch, r, small] f32; MaskedNode for full-rank leaves
  adam: Any  # optax ScaleByAdamState over the proxies (low-rank R for matrices)


def scale_by_galore(
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    mu_dtype: Optional[Any] = None,
    *,
    logical_axes: Any = None,
    projection_mask: Any = None,
    dimension_numbers: Any = None,
) -> optax.GradientTransformation:
  """GaLore direction in gradient space (no lr, no decay); see module docstring."""
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)

  def _views(tree):
    dims = _util.matrix_dims(tree, logical_axes=logical_axes, dimension_numbers=dimension_numbers,
                             matrix_mask=projection_mask, rule="project")
    return proj.views(tree, dims)

  def init_fn(params):
    vws = _views(params)
    treedef = jax.tree.structure(params)
    projectors, proxies = proj.init_leaves(params, vws, _util.static_int(rank, "rank", "galore"))
    return GaLoreState(count=jnp.zeros([], jnp.int32),
                       projector=jax.tree.unflatten(treedef, projectors),
                       adam=adam.init(jax.tree.unflatten(treedef, proxies)))

  def update_fn(updates, state, params=None):
    del params
    vws = _views(updates)
    grads, treedef = jax.tree.flatten(updates)
    refresh = state.count % update_proj_gap == 0
    leaves = list(zip(grads, vws, proj.projector_leaves(state.projector)))
    canon = [None if v is None else v.to_canonical(g).astype(jnp.float32) for g, v, _ in leaves]
    old_p = [p for _, _, p in leaves]

    def refreshed():
      # rank from the state's shapes, so a traced `rank` hyperparameter is never needed here.
      return [p if gc is None else proj.svd_projector(gc, p.shape[-2]) for gc, p in zip(canon, old_p)]

    # One scalar-predicate cond for all matrices, outside any vmap: the SVDs really run only on
    # refresh steps.
    new_p = jax.lax.cond(refresh, refreshed, lambda: old_p)
    low = [g if gc is None else proj.project(gc, p) for (g, _, _), gc, p in zip(leaves, canon, new_p)]
    n, adam_state = adam.update(jax.tree.unflatten(treedef, low), state.adam)
    out = []
    for g, v, p, nn in zip(grads, vws, new_p, jax.tree.leaves(n)):
      if v is None:
        out.append(nn.astype(g.dtype))
      else:
        out.append((scale * v.from_canonical(proj.project_back(nn, p))).astype(g.dtype))
    return jax.tree.unflatten(treedef, out), GaLoreState(
        count=optax.safe_increment(state.count),
        projector=jax.tree.unflatten(treedef, new_p), adam=adam_state)

  return optax.GradientTransformation(init_fn, update_fn)


def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Optional[Any | Callable[[optax.Params], Any]] = None,
    mu_dtype: Optional[Any] = None,
    *,
    logical_axes: Any = None,
    projection_mask: Any = None,
    dimension_numbers: Any = None,
) -> optax.GradientTransformation:
  """GaLore-AdamW. `mask` is the weight-decay mask; `projection_mask` (bool pytree) or
  `logical_axes` choose which matrices are projected."""
  return optax.chain(
      scale_by_galore(rank, update_proj_gap, scale, b1, b2, eps, mu_dtype, logical_axes=logical_axes,
                      projection_mask=projection_mask, dimension_numbers=dimension_numbers),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
