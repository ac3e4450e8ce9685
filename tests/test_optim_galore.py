"""GaLore and Online Subspace Descent vs NumPy implementations of the reference update rules.

The references are written in PyTorch's layout: a Linear weight is [out, in], jaxeff's [in, out].
Each NumPy reference transposes the jaxeff gradient to [out, in], applies the reference code's
rule there ("m >= n: right projector" on the torch shape) and transposes the update back, so the
projected side is derived from the torch layout, never from jaxeff's. Square matrices are where a
wrong translation hides: they are in every test here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import run_optimizer

from jaxeff import optim

LR, WD, RANK, GAP, SCALE, STEPS = 1e-2, 0.1, 4, 2, 0.25, 5
SHAPES = {
  "wq": (32, 48),
  "wo": (48, 32),
  "wsq": (32, 32),
  "stack": (2, 32, 48),
  "sqstack": (2, 32, 32),
  "embed": (64, 32),
  "norm": (32,),
}
AXES = {
  "wq": ("embed", "heads"),
  "wo": ("mlp", "embed"),
  "wsq": ("embed", "heads"),
  "stack": ("layers", "embed", "mlp"),
  "sqstack": ("layers", "heads", "embed"),
  "embed": ("vocab", "embed"),
  "norm": ("norm",),
}
PROJECTED = {"wq", "wo", "wsq", "stack", "sqstack"}


def _tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


class NpAdam:
  """Adam of the GaLore paper's Algorithm 1 (bias-corrected, eps outside the sqrt)."""

  def __init__(self, b1=0.9, b2=0.999, eps=1e-8):
    self.b1, self.b2, self.eps, self.m, self.v, self.t = b1, b2, eps, None, None, 0

  def __call__(self, g):
    if self.m is None:
      self.m, self.v = np.zeros_like(g), np.zeros_like(g)
    self.t += 1
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g * g
    return (self.m / (1 - self.b1**self.t)) / (np.sqrt(self.v / (1 - self.b2**self.t)) + self.eps)


def _fix_sign(p, axis):
  # Same deterministic sign as the implementation (largest |entry| positive); subspace unchanged.
  idx = np.argmax(np.abs(p), axis=axis)
  vals = np.take_along_axis(p, np.expand_dims(idx, axis), axis)
  return p * np.where(vals < 0, -1.0, 1.0)


class NpGaLore:
  """Reference projector ('std') on the torch-layout gradient G [out, in]:
  m >= n -> P = Vh[:r], R = G P^T; else P = U[:, :r], R = P^T G."""

  def __init__(self):
    self.p, self.adam = None, NpAdam()

  def __call__(self, g_jax, t):
    return self.torch_update(g_jax.T, t).T

  def torch_update(self, g, t):
    m, n = g.shape
    if t % GAP == 0:
      u, _, vh = np.linalg.svd(g, full_matrices=False)
      self.p = _fix_sign(vh[:RANK], 1) if m >= n else _fix_sign(u[:, :RANK], 0)
    if m >= n:
      return SCALE * (self.adam(g @ self.p.T) @ self.p)
    return SCALE * (self.p @ self.adam(self.p.T @ g))


class NpOSD:
  """Reference 'continuous' projector on the torch-layout gradient G [out, in]: SVD once, then one
  torch-AdamW step per step on ||G_n P^T P - G_n||^2 (or ||P P^T G_n - G_n||^2 for m < n), after
  projecting back."""

  def __init__(self, lr_scale=0.5, wd_p=0.01):
    self.p, self.adam, self.lr_scale, self.wd_p = None, NpAdam(), lr_scale, wd_p
    self.pm = self.pv = None
    self.pt = 0

  def __call__(self, g_jax, t, lr):
    return self.torch_update(g_jax.T, t, lr).T

  def torch_update(self, g, t, lr):
    m, n = g.shape
    if self.p is None:
      u, _, vh = np.linalg.svd(g, full_matrices=False)
      self.p = vh[:RANK] if m >= n else u[:, :RANK]
      first = True
    else:
      first = False
    p = self.p
    out = SCALE * ((self.adam(g @ p.T) @ p) if m >= n else (p @ self.adam(p.T @ g)))
    if not first:
      gn = g / np.linalg.norm(g)
      if m >= n:
        e = gn @ p.T @ p - gn
        dp = 2 * p @ (e.T @ gn + gn.T @ e)
      else:
        e = p @ p.T @ gn - gn
        dp = 2 * (e @ gn.T + gn @ e.T) @ p
      if self.pm is None:
        self.pm, self.pv = np.zeros_like(p), np.zeros_like(p)
      self.pt += 1
      self.pm = 0.9 * self.pm + 0.1 * dp
      self.pv = 0.999 * self.pv + 0.001 * dp * dp
      step = (self.pm / (1 - 0.9**self.pt)) / (np.sqrt(self.pv / (1 - 0.999**self.pt)) + 1e-8)
      lr_p = self.lr_scale * lr
      self.p = p * (1 - lr_p * self.wd_p) - lr_p * step
    return out


def np_run(params, grads, kind):
  p = {k: v.astype(np.float64) for k, v in params.items()}
  lowrank = {}
  full = {k: NpAdam() for k in SHAPES}
  for t, g in enumerate(grads):
    for k in p:
      if k in PROJECTED:
        mats = g[k] if g[k].ndim == 3 else g[k][None]
        outs = []
        for i, x in enumerate(mats):
          proj = lowrank.setdefault((k, i), NpGaLore() if kind == "galore" else NpOSD())
          outs.append(proj(x.astype(np.float64), t) if kind == "galore" else proj(x.astype(np.float64), t, LR))
        u = np.stack(outs).reshape(g[k].shape)
      else:
        u = full[k](g[k].astype(np.float64))
      p[k] = p[k] * (1 - LR * WD) - LR * u
  return p


def _make(kind, **kw):
  if kind == "galore":
    return optim.galore(LR, rank=RANK, update_proj_gap=GAP, weight_decay=WD, logical_axes=AXES, **kw)
  return optim.osd(LR, rank=RANK, weight_decay=WD, logical_axes=AXES, **kw)


@pytest.mark.parametrize("kind", ["galore", "osd"])
def test_matches_numpy(kind):
  params, grads = _tree(0, 0.1), [_tree(s) for s in range(1, STEPS + 1)]
  got, _ = run_optimizer(_make(kind), params, grads)
  want = np_run(params, grads, kind)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], atol=2e-5, err_msg=k)


def _state_bytes(state):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


@pytest.mark.parametrize("kind", ["galore", "osd"])
def test_square_matrix_projects_the_torch_input_side(kind):
  """The reference's rule on torch's [out, in] G: out >= in -> right projector Vh[:r], so a
  square matrix is projected on its INPUT side. Adam's first step is a sign, so at rank 1 the
  update is sign(G_t v1) v1^T in torch layout, which differs from the output-side u1 sign(u1^T G_t)."""
  g = np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32)  # jaxeff [in, out]
  kw = dict(rank=1, scale=1.0, weight_decay=0.0, eps=1e-12, dimension_numbers=optim.MatrixDims(0, 1))
  tx = optim.galore(1.0, **kw) if kind == "galore" else optim.osd(1.0, **kw)
  u, _ = tx.update(g, tx.init(g), g)
  g_t = g.T.astype(np.float64)  # torch layout [out, in]
  v1 = np.linalg.svd(g_t)[2][:1]  # right projector (1 x in)
  want = -(np.sign(g_t @ v1.T) @ v1).T  # back to [in, out]
  np.testing.assert_allclose(np.asarray(u), want, atol=1e-5)
  wrong_side = -(np.linalg.svd(g_t)[0][:, :1] @ np.sign(np.linalg.svd(g_t)[0][:, :1].T @ g_t)).T
  assert np.abs(want - wrong_side).max() > 0.1  # the two sides really differ here


# (shape, rank): GaLore's state is moments r x big + P r x small; OSD adds P's two AdamW moments.
# Square at rank d/4: GaLore 3r/(2d) = 37.5%, OSD 5r/(2d) = 62.5%; 128x64 at rank 32: 62.5%, 87.5%.
STATE_CASES = [
  ((32, 48), 8, 1 / 3, 0.5),
  ((128, 128), 32, 0.375, 0.625),
  ((128, 64), 32, 0.625, 0.875),
  ((64, 128), 32, 0.625, 0.875),
]


@pytest.mark.parametrize("kind", ["galore", "osd"])
@pytest.mark.parametrize("shape,r,galore_ratio,osd_ratio", STATE_CASES)
def test_state_bytes(kind, shape, r, galore_ratio, osd_ratio):
  params = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
  tx = optim.galore(LR, rank=r) if kind == "galore" else optim.osd(LR, rank=r)
  state = jax.eval_shape(tx.init, params)
  adamw = _state_bytes(jax.eval_shape(optax.adamw(LR).init, params))
  counters = 4 * (2 if kind == "galore" else 3)  # int32 step counts
  big, small = max(shape), min(shape)
  expected = 4 * (2 * r * big + r * small * (1 if kind == "galore" else 3)) + counters
  assert _state_bytes(state) == expected
  ratio = (_state_bytes(state) - counters) / (adamw - 4)
  assert ratio == pytest.approx(galore_ratio if kind == "galore" else osd_ratio, abs=1e-4)


@pytest.mark.parametrize("kind", ["galore", "osd"])
def test_zero_tiny_nan_grads(kind):
  params = _tree(0, 0.1)
  tx = _make(kind)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for fill in (0.0, 1e-30, 0.0):
    g = jax.tree.map(lambda p: jnp.full_like(p, fill), params)
    u, state = update(g, state, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((u, state))), fill
  # NaN: documented to propagate (the SVD / projection returns NaN; nothing crashes).
  g = dict(jax.tree.map(jnp.zeros_like, params), wq=jnp.full(SHAPES["wq"], jnp.nan))
  u, _ = update(g, tx.init(params), params)
  assert bool(jnp.any(jnp.isnan(u["wq"]))) and bool(jnp.all(jnp.isfinite(u["wo"])))


def test_galore_refreshes_only_every_gap_and_osd_moves_p():
  params, grads = _tree(0, 0.1), [_tree(s) for s in range(1, 4)]
  tx = _make("galore")
  state = tx.init(params)
  update = jax.jit(tx.update)
  ps = []
  for g in grads:
    _, state = update(g, state, params)
    ps.append(np.asarray(state[0].projector["wq"]))
  np.testing.assert_array_equal(ps[0], ps[1])  # steps 0, 1 share the step-0 SVD (gap 2)
  assert not np.allclose(ps[1], ps[2])
  # Projected side is the smaller one: wq [32, 48] -> P is r x 32, moments 48 x r.
  assert ps[0].shape == (1, RANK, 32) and state[0].adam.mu["wq"].shape == (1, 48, RANK)
  tx = _make("osd")
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update(grads[0], state, params)
  p0 = np.asarray(state[0].projector["wq"])
  np.testing.assert_allclose(p0[0] @ p0[0].T, np.eye(RANK), atol=1e-5)  # step 0: SVD
  _, state = update(grads[1], state, params)
  assert not np.allclose(p0, state[0].projector["wq"])  # then online updates, no SVD
