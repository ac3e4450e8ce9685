"""Medusa-1 heads: K extra next-next-token predictors on a frozen base model's last hidden state.

Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding
Heads" (FasterDecoding/Medusa). From the base's final-norm hidden state h at position t, head k
(k = 0..K-1) predicts the token at t + k + 2 (the base's own head predicts t + 1):

  h_k^0 = h,    h_k^(l+1) = h_k^l + SiLU(W_k^l h_k^l + b_k^l)    (l = 0..L-1)
  logits_k = base.logits(h_k^L)

Each head is L residual blocks with their own weights (distinct per block and per head: the
reference's `[ResBlock] * L` accidentally shares one block's weights), W and b zero-initialized,
so an untrained head is the identity and predicts what the base predicts for t + 1. The weights
are stacked, w [K, L, H, H] and b [K, L, H], and each block is one einsum over all heads.

The logits come from the BASE model's LM head, frozen and shared by all heads (`base.logits`).
The reference gives each head its own Linear(H, vocab); for SmolLM2-135M that would be a tied
49152 x 576 matrix, 28M parameters per head, more than a fifth of the model per head, for a
module whose job is a small correction of the hidden state.

Training (Medusa-1: heads only, the base frozen) is self-distillation on greedy outputs: the base
continues prompts cut from a corpus greedily (`medusa_training.distillation_set`), and head
k at position t learns the hard label x[t + k + 2] by cross-entropy. A position counts for head k
when the label and every token between t and it are the base's own continuation (t >= prompt_len - 1 and
t + k + 2 < prompt_len + new_tokens): what a head sees at inference, where the tokens before its
guess were all accepted, i.e. the base's greedy choices. `measure_acceptance` gives, per head and
rank, how often the head's rank-r candidate is that label on held-out sequences (the table token
trees such as Sequoia's are built from). The heads train on the training engine,
`jaxeff.training.Trainer(model_factory=model_factory(base, K, L), loss_fn=distillation_loss(),
trainable=TRAINABLE)`; `medusa_training` drives it (`python -m jaxeff.train medusa.base=...`).

>>> import tempfile
>>> import jax.numpy as jnp, numpy as np
>>> from flax import nnx
>>> from jaxeff import ModelConfig
>>> from jaxeff.models import Llama
>>> from jaxeff.generate.speculative import medusa_heads as medusa
>>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
>>> base = Llama(cfg, rngs=nnx.Rngs(0))
>>> heads = medusa.MedusaHeads(32, num_heads=3, num_layers=1, rngs=nnx.Rngs(0))
>>> hidden = base.hidden_states(jnp.arange(8, dtype=jnp.int32)[None])   # [B, S, H]
>>> logits = base.logits(heads(hidden))                                  # [B, S, K, vocab]
>>> logits.shape, bool(jnp.all(logits == base.logits(hidden)[:, :, None]))   # zero init: the base's own
((1, 8, 3, 64), True)
>>> prompts = np.arange(4 * 6).reshape(4, 6) % 64
>>> data = medusa.DistillationSet(np.concatenate([prompts, prompts + 1], axis=1) % 64, prompt_len=6)
>>> data.tokens.shape, data.prompt_len          # prompt + continuation (training: the base's greedy one)
((4, 12), 6)
>>> medusa.measure_acceptance(base, heads, data, max_rank=5).shape       # [K, max_rank]
(3, 5)
>>> info = medusa.MedusaInfo.for_heads(heads, base, base_path="tiny")
>>> path = medusa.save_heads(tempfile.mkdtemp() + "/heads", heads, info=info)
>>> loaded, loaded_info = medusa.load_heads(path)
>>> medusa.check_base(loaded_info, base)                                 # raises for another base
>>> loaded_info.num_heads, loaded.w.shape
(3, (3, 1, 32, 32))

Defaults: K = 4 heads of L = 1 block each (one block, as the paper's Medusa-1 heads); prompts of
32 tokens and 96-token greedy continuations in the training command; the heads' loss weights
0.8^k (the paper's lambda_k). The heads' parameters carry logical axes (the hidden dimensions as
`EMBED`), so `load_heads(path, mesh=...)` places them like the base's weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxeff import sharding
from jaxeff.checkpoint import Checkpointer
from jaxeff.errors import CheckpointError, ConfigError, DataError
from jaxeff.models.layers import param
from jaxeff.sharding import EMBED

logger = logging.getLogger(__name__)

FORMAT = "jaxeff-medusa/1"
HEAD_WEIGHT = 0.8  # the paper's lambda_k = 0.8^k: later heads are harder, they count less
LOGITS_BUDGET_BYTES = 256 * 2**20  # f32 logits of one chunk of positions; a step holds ~3x that
FINGERPRINT_ROWS = 8
_FINGERPRINT_FIELDS = (
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_layers",
  "num_heads",
  "num_kv_heads",
  "tie_embeddings",
)


# ---------------------------------------------------------------------------- the heads


class MedusaHeads(nnx.Module):
  """K Medusa heads of L residual SiLU blocks each, zero-initialized, sharing the base's LM head.

  Args:
    hidden_size: the base model's hidden size H.
    num_heads: K; head k predicts the token k + 2 positions ahead.
    num_layers: L residual blocks per head, each with its own weights.
    param_dtype: dtype of w [K, L, H, H] and b [K, L, H].
    rngs: unused (every weight starts at zero); taken so heads build like other jaxeff modules.

  `heads(hidden [..., H]) -> [..., K, H]`, in the hidden states' dtype (the math runs in the wider
  of it and `param_dtype`); `base.logits` of that gives [..., K, vocab].
  """

  def __init__(
    self,
    hidden_size: int,
    num_heads: int = 4,
    num_layers: int = 1,
    *,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if hidden_size < 1 or num_heads < 1 or num_layers < 1:
      raise ConfigError(
        f"Medusa heads need hidden_size, num_heads and num_layers >= 1, got {hidden_size}, {num_heads}, {num_layers}"
      )
    del rngs
    self.hidden_size, self.num_heads, self.num_layers = hidden_size, num_heads, num_layers
    k, n, h = num_heads, num_layers, hidden_size
    self.w = param(jnp.zeros((k, n, h, h), param_dtype), (None, None, EMBED, EMBED))
    self.b = param(jnp.zeros((k, n, h), param_dtype), (None, None, EMBED))

  def __call__(self, hidden: jax.Array) -> jax.Array:
    dtype = jnp.promote_types(hidden.dtype, self.w.dtype)
    x = hidden.astype(dtype)
    h = jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], self.num_heads, self.hidden_size))
    w, b = self.w[...].astype(dtype), self.b[...].astype(dtype)
    for layer in range(self.num_layers):
      h = h + jax.nn.silu(jnp.einsum("...ki,kio->...ko", h, w[:, layer]) + b[:, layer])
    return h.astype(hidden.dtype)


def head_logits(base, heads: MedusaHeads, hidden: jax.Array) -> jax.Array:
  """f32 logits [..., K, vocab] of every head from the base's hidden states [..., H]."""
  return base.logits(heads(hidden))


# ---------------------------------------------------------------------------- self-distillation data


@dataclasses.dataclass(frozen=True)
class DistillationSet:
  """Prompts and the base's greedy continuations: `tokens` int32 [N, prompt_len + new_tokens]."""

  tokens: np.ndarray
  prompt_len: int

  @property
  def new_tokens(self) -> int:
    return self.tokens.shape[1] - self.prompt_len

  def __len__(self) -> int:
    return self.tokens.shape[0]

  def rows(self, index) -> DistillationSet:
    """The sequences `index` (a slice or index array) as a set of their own."""
    return DistillationSet(self.tokens[index], self.prompt_len)

  def targets(self, num_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels int32 [N, S, K], mask bool [N, S, K]): head k at position t has label
    tokens[t + k + 2], counted when t >= prompt_len - 1 and t + k + 2 < S (labels 0 elsewhere)."""
    n, s = self.tokens.shape
    t = np.arange(s)[:, None]
    target = t + np.arange(num_heads)[None, :] + 2  # [S, K]
    mask = (t >= self.prompt_len - 1) & (target < s)
    labels = np.where(mask[None], self.tokens[:, np.minimum(target, s - 1)], 0).astype(np.int32)
    return labels, np.broadcast_to(mask, (n, s, num_heads)).copy()

  def counted_positions(self) -> slice:
    """The positions where some head has a label: prompt_len - 1 .. S - 3."""
    return slice(self.prompt_len - 1, self.tokens.shape[1] - 2)


def corpus_prompts(tokens: np.ndarray, count: int, length: int) -> np.ndarray:
  """`count` windows of `length` tokens spread evenly over a token stream: int32 [count, length]."""
  tokens = np.asarray(tokens)
  if count < 1 or length < 1:
    raise ConfigError(f"need count and length >= 1, got {count}, {length}")
  if len(tokens) < length:
    raise DataError(f"the corpus has {len(tokens)} tokens; prompts of {length} tokens need at least that many")
  starts = np.linspace(0, len(tokens) - length, count).round().astype(np.int64)
  return np.stack([tokens[s : s + length] for s in starts]).astype(np.int32)


def base_hidden_states(base, data: DistillationSet, *, batch: int = 16) -> jax.Array:
  """The base's final hidden states at `data.counted_positions()`: [N, new_tokens - 1, H], computed
  `batch` sequences at a time by one compiled forward (no gradient: the base is frozen)."""
  graphdef, state = nnx.split(base)
  span = data.counted_positions()

  @jax.jit
  def forward(state, tokens):
    return jax.lax.stop_gradient(nnx.merge(graphdef, state).hidden_states(tokens)[:, span])

  n = len(data)
  batch = min(batch, n)
  parts = []
  for start in range(0, n, batch):
    rows = data.tokens[start : start + batch]
    padded = np.zeros((batch, rows.shape[1]), np.int32)
    padded[: len(rows)] = rows  # one shape: the last batch does not compile again
    parts.append(forward(state, padded)[: len(rows)])
  return jnp.concatenate(parts)


def training_arrays(base, data: DistillationSet, num_heads: int, *, batch: int = 16):
  """(hidden [M, H], labels int32 [M, K], mask f32 [M, K]) over the M = N * (new_tokens - 1)
  counted positions: what a training step or `measure_acceptance` reads."""
  if data.new_tokens < num_heads + 1:
    raise ConfigError(
      f"with {data.new_tokens} new tokens per sequence head {num_heads - 1} would have no label; "
      f"generate at least num_heads + 1 = {num_heads + 1}"
    )
  hidden = base_hidden_states(base, data, batch=batch)
  labels, mask = data.targets(num_heads)
  span = data.counted_positions()
  k = num_heads
  return (
    hidden.reshape(-1, hidden.shape[-1]),
    jnp.asarray(labels[:, span].reshape(-1, k)),
    jnp.asarray(mask[:, span].reshape(-1, k), jnp.float32),
  )


# ---------------------------------------------------------------------------- loss and acceptance


def chunk_positions(num_heads: int, vocab_size: int) -> int:
  """Positions per chunk so one chunk's f32 logits [chunk, K, vocab] stay within LOGITS_BUDGET_BYTES."""
  return max(1, LOGITS_BUDGET_BYTES // (4 * num_heads * vocab_size))


def _chunked(arrays, chunk: int):
  """Pads the leading axis (zeros: masked out) to a multiple of `chunk` and splits it: [n, chunk, ...]."""
  m = arrays[0].shape[0]
  n = -(-m // chunk)
  return [jnp.pad(a, [(0, n * chunk - m)] + [(0, 0)] * (a.ndim - 1)).reshape(n, chunk, *a.shape[1:]) for a in arrays]


def per_head_loss(base, heads: MedusaHeads, hidden, labels, mask, *, chunk: int | None = None) -> jax.Array:
  """Mean cross-entropy per head [K] over the masked positions (hidden [M, H], labels/mask [M, K]).

  Positions go through in chunks under `lax.scan` with the chunk rematerialized, so the logits of
  at most `chunk` positions (default `chunk_positions`) exist at once, in the backward pass too."""
  k = heads.num_heads
  chunk = chunk or chunk_positions(k, base.cfg.vocab_size)
  chunk = min(chunk, hidden.shape[0])

  @jax.checkpoint
  def body(totals, xs):
    h, y, m = xs
    ce = optax.softmax_cross_entropy_with_integer_labels(head_logits(base, heads, h), y)
    return totals + jnp.stack([jnp.sum(ce * m, axis=0), jnp.sum(m, axis=0)]), None

  totals, _ = jax.lax.scan(body, jnp.zeros((2, k), jnp.float32), _chunked((hidden, labels, mask), chunk))
  return totals[0] / jnp.maximum(totals[1], 1.0)


def heads_loss(
  base, heads: MedusaHeads, hidden, labels, mask, *, head_weight: float = HEAD_WEIGHT, chunk: int | None = None
) -> jax.Array:
  """sum_k lambda_k CE_k / sum_k lambda_k with lambda_k = head_weight^k: the Medusa-1 loss, on
  the scale of one cross-entropy."""
  weights = head_weight ** jnp.arange(heads.num_heads, dtype=jnp.float32)
  per_head = per_head_loss(base, heads, hidden, labels, mask, chunk=chunk)
  return jnp.sum(weights * per_head) / jnp.sum(weights)


# ---------------------------------------------------------------------------- on the training engine


class HeadsOnBase(nnx.Module):
  """The module Medusa-1 trains on `jaxeff.training.Trainer`: the heads and the base they read.
  `TRAINABLE` selects the heads' parameters; the base's stay frozen (constants of the step)."""

  def __init__(self, heads: MedusaHeads, base):
    self.heads, self.base = heads, base


TRAINABLE = nnx.All(nnx.Param, nnx.PathContains("heads"))


def model_factory(base, num_heads: int, num_layers: int, *, param_dtype=jnp.float32):
  """`Trainer`'s model factory for fresh (zero-initialized) heads on `base` (the model config it
  is given is ignored: the heads' size is the base's)."""

  def make(_cfg, rngs: nnx.Rngs) -> HeadsOnBase:
    return HeadsOnBase(
      MedusaHeads(base.cfg.hidden_size, num_heads, num_layers, param_dtype=param_dtype, rngs=rngs), base
    )

  return make


def distillation_loss(head_weight: float = HEAD_WEIGHT):
  """`Trainer`'s loss: `heads_loss` of a batch of counted positions, `{"hidden" [P, H] (the base's
  hidden states), "labels" int32 [P, K], "mask" f32 [P, K]}` (rows of `training_arrays`)."""

  def loss(model: HeadsOnBase, batch: dict) -> jax.Array:
    return heads_loss(model.base, model.heads, batch["hidden"], batch["labels"], batch["mask"], head_weight=head_weight)

  return loss


def measure_acceptance(
  base, heads: MedusaHeads, data: DistillationSet, max_rank: int = 10, *, batch: int = 16
) -> np.ndarray:
  """acc [K, max_rank]: acc[k, r] is the fraction of head k's counted positions in `data` where
  its rank-r candidate (the r-th largest logit) is the label, the base's greedy token.
  `acc[:, 0]` is each head's top-1 accuracy, `acc.sum(1)` its top-`max_rank` accuracy."""
  k = heads.num_heads
  max_rank = min(max_rank, base.cfg.vocab_size)
  hidden, labels, mask = training_arrays(base, data, k, batch=batch)
  chunk = min(chunk_positions(k, base.cfg.vocab_size), hidden.shape[0])
  (base_def, base_state), (heads_def, heads_state) = nnx.split(base), nnx.split(heads)

  @jax.jit
  def hits(base_state, heads_state, h, y, m):
    logits = head_logits(nnx.merge(base_def, base_state), nnx.merge(heads_def, heads_state), h)
    _, top = jax.lax.top_k(logits, max_rank)  # [c, K, R]
    return jnp.sum((top == y[..., None]) * m[..., None], axis=0)  # [K, R]

  total = np.zeros((k, max_rank))
  for h, y, m in zip(*_chunked((hidden, labels, mask), chunk)):
    total += np.asarray(hits(base_state, heads_state, h, y, m))
  counts = np.asarray(mask).sum(axis=0)
  return total / np.maximum(counts, 1)[:, None]


def format_acceptance(acc: np.ndarray) -> list[str]:
  """The acceptance table as lines of text: one per head, each rank's rate and the cumulative top-r."""
  lines = ["acceptance on held-out sequences (head k guesses the token k + 2 ahead; rank r: its r-th candidate)"]
  for k, row in enumerate(np.asarray(acc)):
    ranks = " ".join(f"{x:.3f}" for x in row)
    lines.append(f"  head {k}: top-1 {row[0]:6.1%}, top-{len(row)} {row.sum():6.1%} | by rank: {ranks}")
  return lines


# ---------------------------------------------------------------------------- checkpoints


def base_fingerprint(model) -> dict:
  """The base's identity: its architecture fields and a checksum of its first embedding rows
  (rounded to bfloat16, so a float32 and a bfloat16 load of the same weights agree)."""
  cfg = model.cfg
  rows = model.embed_tokens(jnp.arange(min(FINGERPRINT_ROWS, cfg.vocab_size), dtype=jnp.int32))
  digest = hashlib.sha256(np.asarray(rows.astype(jnp.bfloat16)).tobytes()).hexdigest()[:16]
  return {**{name: getattr(cfg, name) for name in _FINGERPRINT_FIELDS}, "embedding_sha256": digest}


@dataclasses.dataclass
class MedusaInfo:
  """What a heads checkpoint says about itself (JSON item `meta` of `save_heads`).

  Attributes:
    num_heads, num_layers, hidden_size, vocab_size: the heads' shape and the base's vocabulary.
    param_dtype: the heads' parameter dtype.
    acceptance: [K][max_rank] rates from `measure_acceptance`, or None (not measured).
    base_path: where the base was loaded from (informative; the fingerprint decides).
    base_fingerprint: `base_fingerprint(base)`, checked by `check_base`.
    training: steps, seconds, final_loss, tokens (positions trained on), sequences, ...
  """

  num_heads: int
  num_layers: int
  hidden_size: int
  vocab_size: int
  param_dtype: str = "float32"
  acceptance: list[list[float]] | None = None
  base_path: str = ""
  base_fingerprint: dict = dataclasses.field(default_factory=dict)
  training: dict = dataclasses.field(default_factory=dict)

  @classmethod
  def for_heads(cls, heads: MedusaHeads, base, *, base_path: str = "", **fields) -> MedusaInfo:
    """The info of `heads` trained for `base` (its fingerprint taken now); `fields` set the rest."""
    return cls(
      num_heads=heads.num_heads,
      num_layers=heads.num_layers,
      hidden_size=heads.hidden_size,
      vocab_size=base.cfg.vocab_size,
      param_dtype=jnp.dtype(heads.w.dtype).name,
      base_path=str(base_path),
      base_fingerprint=base_fingerprint(base),
      **fields,
    )


def check_base(info: MedusaInfo, model) -> None:
  """Raises `CheckpointError` unless `model` is the base the heads were trained for."""
  actual = base_fingerprint(model)
  expected = dict(info.base_fingerprint) or {"hidden_size": info.hidden_size, "vocab_size": info.vocab_size}
  diff = [f"{k} {expected[k]!r} vs {actual.get(k)!r}" for k in expected if expected[k] != actual.get(k)]
  if diff:
    where = f" ({info.base_path})" if info.base_path else ""
    raise CheckpointError(
      f"these Medusa heads were trained for another base model{where}: {'; '.join(diff)} (heads' base vs this "
      f"model); train heads for this model with python -m jaxeff.train medusa.base=..."
    )


def _is_heads_checkpoint(path: pathlib.Path) -> bool:
  if not (path / "0" / "meta").is_dir():
    return False
  try:
    with Checkpointer(path, read_only=True) as ckpt:
      return ckpt.document(0, "meta").get("format") == FORMAT
  except CheckpointError:
    return False


def check_can_save(path: str | os.PathLike, *, overwrite: bool = False) -> None:
  """Raises `CheckpointError` if `save_heads(path, overwrite=overwrite)` would refuse: `path` is a
  file, or a non-empty directory (with `overwrite`: one that is not a heads checkpoint)."""
  path = pathlib.Path(path)
  if path.exists() and not path.is_dir():
    raise CheckpointError(f"{path} is a file; Medusa heads are saved into a directory")
  if not path.is_dir() or not any(path.iterdir()):
    return
  if not overwrite:
    raise CheckpointError(
      f"{path} already exists and is not empty; nothing is overwritten (choose another path, or allow "
      f"replacing saved heads: overwrite=True, medusa.overwrite=true on the command line)"
    )
  if not _is_heads_checkpoint(path):
    raise CheckpointError(f"{path} is not a Medusa heads checkpoint; it is never replaced (choose another path)")


def save_heads(
  path: str | os.PathLike, heads: MedusaHeads, *, info: MedusaInfo, overwrite: bool = False
) -> pathlib.Path:
  """Writes `heads` and `info` to the directory `path` (a `Checkpointer` step 0: item `params`
  and the JSON item `meta`). An existing non-empty `path` is an error; with `overwrite=True` a
  heads checkpoint there is replaced (anything else still is an error)."""
  path = pathlib.Path(path)
  shape = (heads.num_heads, heads.num_layers, heads.hidden_size)
  if (info.num_heads, info.num_layers, info.hidden_size) != shape:
    raise ValueError(f"info describes heads {info.num_heads, info.num_layers, info.hidden_size}, not {shape}")
  check_can_save(path, overwrite=overwrite)
  if path.is_dir() and any(path.iterdir()):
    shutil.rmtree(path)  # check_can_save: a heads checkpoint, replacing it was asked for
  meta = {"format": FORMAT, "info": dataclasses.asdict(info)}
  with Checkpointer(path) as ckpt:
    ckpt.save(0, arrays={"params": nnx.state(heads)}, documents={"meta": meta})
  return path


def load_heads(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None) -> tuple[MedusaHeads, MedusaInfo]:
  """The heads `save_heads` wrote and their `MedusaInfo`; with `mesh` placed by their logical axes
  (None: on the first device). Check them against the base with `check_base(info, model)`."""
  path = pathlib.Path(path)
  if not (path / "0" / "meta").is_dir():
    raise CheckpointError(f"no Medusa heads checkpoint (written by save_heads) at {path}")
  with Checkpointer(path, read_only=True) as ckpt:
    meta = ckpt.document(0, "meta")
    if meta.get("format") != FORMAT:
      raise CheckpointError(f"{path} holds format {meta.get('format')!r}, expected {FORMAT!r}")
    info = MedusaInfo(**meta["info"])
    graphdef, abstract = nnx.split(
      nnx.eval_shape(
        lambda: MedusaHeads(
          info.hidden_size,
          info.num_heads,
          info.num_layers,
          param_dtype=jnp.dtype(info.param_dtype),
          rngs=nnx.Rngs(0),
        )
      )
    )
    target = sharding.with_shardings(abstract, sharding.model_shardings(abstract, mesh))
    state = ckpt.restore(0, {"params": target})["params"]
  return nnx.merge(graphdef, state), info
