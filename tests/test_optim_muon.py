"""Muon (Moonlight recipe) and C-Muon vs NumPy; routing by logical axes, masks and shapes.

`np_c_muon` follows C-Optim's c_muon.py (kyleliang919/C-Optim) line by line in torch layout
([out, in]): EMA momentum, mask 1[m * g > 0] from the momentum, Nesterov lerp, Newton-Schulz,
Keller Jordan's sqrt(max(1, out/in)) scale, and the cautious AdamW of its aux Adam.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import run_optimizer

from jaxeff import optim

LR, WD, STEPS, BETA = 1e-2, 0.1, 3, 0.95
SHAPES = {
  "embed": (64, 32),
  "wq": (32, 48),
  "wo": (48, 32),
  "stack": (2, 32, 48),
  "head": (32, 64),
  "norm": (32,),
  "norms": (2, 32),
}
AXES = {
  "embed": ("vocab", "embed"),
  "wq": ("embed", "heads"),
  "wo": ("mlp", "embed"),
  "stack": ("layers", "embed", "mlp"),
  "head": ("embed", "vocab"),
  "norm": ("norm",),
  "norms": ("layers", "norm"),
}
MUON_LEAVES = {"wq", "wo", "stack"}
STACKED = {"stack", "norms"}  # scanned layers: one torch tensor per layer


def _tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def np_newton_schulz(u, a=3.4445, b=-4.7750, c=2.0315):
  x = u / (np.linalg.norm(u) + 1e-7)
  transposed = x.shape[0] > x.shape[1]
  if transposed:
    x = x.T
  for _ in range(5):
    s = x @ x.T
    x = a * x + (b * s + c * s @ s) @ x
  return x.T if transposed else x


def np_muon(params, grads):
  """Moonlight: m = beta m + g; u = g + beta m; W -= lr (0.2 sqrt(max(A,B)) NS(u) + wd W);
  AdamW(0.9, 0.95) with the same lr and wd for embeddings, head and 1-D params."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v_ = {k: np.zeros_like(v) for k, v in p.items()}
  for t, g in enumerate(grads, 1):
    for k in p:
      if k in MUON_LEAVES:
        m[k] = BETA * m[k] + g[k]
        u = g[k] + BETA * m[k]
        mats = u if u.ndim == 3 else u[None]
        o = np.stack([np_newton_schulz(x) * 0.2 * np.sqrt(max(x.shape)) for x in mats])
        p[k] = p[k] * (1 - LR * WD) - LR * o.reshape(u.shape)
      else:
        m[k] = 0.9 * m[k] + 0.1 * g[k]
        v_[k] = 0.95 * v_[k] + 0.05 * g[k] ** 2
        u = (m[k] / (1 - 0.9**t)) / (np.sqrt(v_[k] / (1 - 0.95**t)) + 1e-8)
        p[k] = p[k] * (1 - LR * WD) - LR * u
  return p


def _c_mask(buf, g):
  mask = (buf * g > 0).astype(np.float64)
  return mask / max(mask.mean(), 1e-3)


def np_c_muon(params, grads, eps=1e-10):
  """C-Optim's SingleDeviceMuonWithAuxAdam with its c_muon.py update rules, per torch tensor
  (a stacked [layers, in, out] leaf is `layers` separate [out, in] tensors)."""

  def tensors(k, x):  # jaxeff leaf -> list of torch-layout tensors
    return [y.T for y in (x if k in STACKED else [x])]  # .T: [in, out] -> [out, in]; 1-D unchanged

  def leaf(k, ts):
    return np.stack([t.T for t in ts]) if k in STACKED else ts[0].T

  p = {k: v.astype(np.float64) for k, v in params.items()}
  state = {k: [dict(m=np.zeros_like(t), v=np.zeros_like(t)) for t in tensors(k, p[k])] for k in p}
  for step, g in enumerate(grads, 1):
    for k in p:
      outs = []
      for st, gt in zip(state[k], tensors(k, g[k].astype(np.float64))):
        if k in MUON_LEAVES:  # muon_update
          st["m"] = st["m"] + (gt - st["m"]) * (1 - BETA)  # momentum.lerp_(grad, 1 - beta)
          mask = _c_mask(st["m"], gt)
          u = (gt + (st["m"] - gt) * BETA) * mask  # grad.lerp_(momentum, beta) * mask
          u = np_newton_schulz(u) * max(1, gt.shape[-2] / gt.shape[-1]) ** 0.5
        else:  # adam_update
          st["m"] = st["m"] + (gt - st["m"]) * 0.1
          st["v"] = st["v"] + (gt * gt - st["v"]) * 0.05
          mc, vc = st["m"] / (1 - 0.9**step), st["v"] / (1 - 0.95**step)
          u = (mc * _c_mask(st["m"], gt)) / (np.sqrt(vc) + eps)
        outs.append(u)
      p[k] = p[k] * (1 - LR * WD) - LR * leaf(k, outs)
  return p


def test_muon_matches_numpy():
  params, grads = _tree(0, 0.1), [_tree(s) for s in range(1, STEPS + 1)]
  got, _ = run_optimizer(optim.build("muon", learning_rate=LR, weight_decay=WD, logical_axes=AXES), params, grads)
  want = np_muon(params, grads)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], atol=2e-5, err_msg=k)


def test_c_muon_matches_c_optim():
  params, grads = _tree(0, 0.1), [_tree(s) for s in range(1, STEPS + 1)]
  # The counter-example in one coordinate: g1 = -2 then g2 = 1. Nesterov g + beta m is
  # positive there (kept if masked on it); C-Optim's momentum is negative, so it drops it.
  for k in ("wq", "stack", "embed"):
    grads[0][k].flat[0], grads[1][k].flat[0] = -2.0, 1.0
  # Stacked norms: layer 0's second gradient is small and flipped (nothing agrees), layer 1's
  # repeats (all agree): only a mean per layer gives layer 1 the scale 1.
  grads[1]["norms"] = np.stack([-0.05 * grads[0]["norms"][0], grads[0]["norms"][1]])
  tx = optim.build("c_muon", learning_rate=LR, weight_decay=WD, logical_axes=AXES, consistent_rms=None, eps=1e-10)
  got, _ = run_optimizer(tx, params, grads)
  want = np_c_muon(params, grads)
  for k in params:
    np.testing.assert_allclose(got[k], want[k], atol=2e-5, err_msg=k)


def test_routing_without_axes_is_shape_based():
  params = _tree(0)
  # Shape rule: every 2-D leaf (embedding, head, stacked norms included) -> Muon; 3-D and 1-D -> AdamW.
  state = optim.muon(LR).init(params)
  mu = state.inner_states["muon"].inner_state[0].mu
  muon_leaves = {k for k, v in mu.items() if not isinstance(v, optax.MaskedNode)}
  assert muon_leaves == {"embed", "wq", "wo", "head", "norms"}
  # Logical axes: embeddings/head -> AdamW, the stacked layers -> Muon (vmapped per layer).
  mu = optim.muon(LR, logical_axes=AXES).init(params).inner_states["muon"].inner_state[0].mu
  assert {k for k, v in mu.items() if not isinstance(v, optax.MaskedNode)} == MUON_LEAVES
  # An explicit mask gives the same routing as the logical axes here.
  mask = {k: k in MUON_LEAVES for k in SHAPES}
  grads = [_tree(1)]
  a, _ = run_optimizer(optim.muon(LR, muon_mask=mask), params, grads)
  b, _ = run_optimizer(optim.muon(LR, logical_axes=AXES), params, grads)
  for k in params:
    np.testing.assert_allclose(a[k], b[k], atol=1e-6)


def test_callable_axes_and_update_rms():
  params = _tree(0)
  tx = optim.muon(LR, weight_decay=0.0, logical_axes=lambda p: AXES)
  u, _ = tx.update(_tree(1), tx.init(params), params)
  # Moonlight scaling targets AdamW's update RMS of ~0.2 lr (NS gives ~0.15-0.2 lr in practice).
  for k in MUON_LEAVES:
    rms = float(jnp.sqrt(jnp.mean(u[k] ** 2))) / LR
    assert 0.1 < rms < 0.3, (k, rms)


def test_zero_and_nan_grads():
  params = _tree(0)
  tx = optim.muon(LR, logical_axes=AXES)
  zeros = jax.tree.map(jnp.zeros_like, params)
  u, _ = tx.update(zeros, tx.init(params), params)
  for k in params:  # NS of 0 is 0 (norm + eps): only the decay remains, no NaN.
    np.testing.assert_allclose(u[k], -LR * WD * params[k], rtol=1e-5, atol=1e-12)
  nan = dict(zeros, wq=jnp.full(SHAPES["wq"], jnp.nan))
  u, _ = tx.update(nan, tx.init(params), params)
  assert bool(jnp.all(jnp.isnan(u["wq"]))) and bool(jnp.all(jnp.isfinite(u["wo"])))  # propagates


def test_bad_axes_raise():
  with pytest.raises(ValueError, match="leaves"):
    optim.muon(LR, logical_axes={"wq": ("embed", "heads")}).init(_tree(0))
