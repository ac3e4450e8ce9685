"""Training Medusa-1 heads on a frozen base model by self-distillation (`python -m jaxeff.train medusa.base=...`).

The heads are `medusa_heads.MedusaHeads` (Cai et al. 2024, "Medusa: Simple LLM Inference
Acceleration Framework with Multiple Decoding Heads"): head k maps the base's final hidden state h
at position t to h_k = h + SiLU(W_k h + b_k) (L such blocks), and the base's own LM head turns h_k
into logits for the token at t + k + 2. Medusa-1 trains only the heads; the base stays frozen and
gets no gradient.

Self-distillation on greedy outputs: prompts of `prompt_len` tokens, cut from the corpus at evenly
spread places, are continued greedily by the base for `new_tokens` tokens (`distillation_set`, one
`Generator`, built once per run); head k learns the hard label x[t + k + 2] of every position whose
label and the tokens before it are the base's continuation, by cross-entropy, the loss
sum_k 0.8^k CE_k / sum_k 0.8^k. The base's hidden states of the set are computed once, so a step
runs only the heads and the shared LM head (over chunks of positions, to keep the logits of a
49152-token vocabulary within a few hundred MB). The steps are the training engine's:
`jaxeff.training.Trainer` with the heads' model factory and distillation loss
(`medusa_heads.model_factory`, `distillation_loss`; the base frozen by `TRAINABLE`), data-parallel
over the run's mesh.

>>> import numpy as np
>>> from flax import nnx
>>> from jaxeff import ModelConfig
>>> from jaxeff.models import Llama
>>> from jaxeff.generate.speculative.medusa_training import distillation_set, train_heads
>>> cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
>>> base = Llama(cfg, rngs=nnx.Rngs(0))
>>> data = distillation_set(base, np.arange(4 * 6).reshape(4, 6) % 64, new_tokens=8, batch=4)
>>> heads, losses = train_heads(base, data, num_heads=2, num_layers=1, steps=4, batch_size=2, learning_rate=1e-2)
>>> len(losses), heads.w.shape                              # one loss per step; w [K, L, H, H]
(4, (2, 1, 32, 32))

The command line (`jaxeff.train` with `medusa.base` set; the `medusa:` section of `TrainConfig`):

  python -m jaxeff.train medusa.base=SmolLM2-135M-Instruct.Q4_1.gguf steps=300 batch_size=8 \\
      optimizer.learning_rate=1e-3 output_dir=runs/medusa

  medusa.base              the base: anything `jaxeff.load` reads (a .gguf file, a Hugging Face
                           directory, a jaxeff.train output_dir)
  medusa.num_heads=4       K heads (head k guesses the token k + 2 ahead)
  medusa.num_layers=1      residual SiLU blocks per head
  medusa.sequences=64      training prompts (the head of the corpus's token stream)
  medusa.eval_sequences=16 held-out prompts (its tail, the last data.val_fraction) for the acceptance table; 0: none
  medusa.prompt_len=32     tokens per prompt
  medusa.new_tokens=96     greedy tokens the base adds to each prompt
  medusa.generate_batch=16 rows generated (and hidden states computed) together
  medusa.max_rank=10       ranks in the acceptance table
  medusa.overwrite=false   replace heads already saved in output_dir/medusa
  medusa.chat=false        wrap each prompt in the base's chat template as a user turn ("Continue this
                           text:" + the window), so the heads learn the base's replies to chat requests

Also used: `steps`, `batch_size` (a step trains on batch_size sequences' worth of positions,
batch_size * (new_tokens - 1), rounded up to a multiple of the mesh's data-parallel size, drawn from
a shuffle of all the set's positions, epoch after epoch), `seed` (the shuffle), `log_every`, `mesh`,
`optimizer.*` (`make_optimizer`: warmup + cosine; weight decay on the heads' matrices only),
`data.paths` / `data.max_corpus_bytes` / `data.val_fraction` (the corpus, tokenized with the BASE's
tokenizer; `data.tokenizer` and `data.dataset` are refused), `output_dir`. `model.*` comes from the
base: an override that differs from it is refused. The heads go to `output_dir/medusa`
(`load_heads` reads them), the metrics to `output_dir/medusa_metrics.jsonl`; progress lines go to
stderr, the acceptance table and the `done:` line to stdout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from flax import nnx

from jaxeff import data as data_lib
from jaxeff import loader, sharding
from jaxeff.data.tokenizer import Tokenizer
from jaxeff.errors import ConfigError, DataError, JaxeffError
from jaxeff.generate.generator import Generator
from jaxeff.generate.speculative import medusa_heads as heads_lib
from jaxeff.generate.speculative.medusa_heads import DistillationSet, MedusaHeads, MedusaInfo
from jaxeff.training import OptimizerConfig, TrainConfig, Trainer, check_writable

logger = logging.getLogger(__name__)
HEADS_DIR = "medusa"  # under output_dir
METRICS_FILE = "medusa_metrics.jsonl"


# ---------------------------------------------------------------------------- the distillation set


def distillation_set(
  base, prompts, new_tokens: int, *, batch: int = 16, log: Callable[[str], None] | None = None
) -> DistillationSet:
  """The base's greedy continuations of `prompts` (int [N, P], all P tokens long), `new_tokens`
  each, generated by one `jaxeff.generate.Generator` (compiled once, `batch` rows at a time,
  no stop tokens: every row has exactly `new_tokens`)."""
  prompts = np.asarray(prompts, np.int32)
  if prompts.ndim != 2 or prompts.shape[0] < 1 or prompts.shape[1] < 1:
    raise ConfigError(f"prompts must be a non-empty [N, P] array of token ids, got shape {prompts.shape}")
  if new_tokens < 2:
    raise ConfigError(f"new_tokens must be >= 2 (head 0 predicts the second new token), got {new_tokens}")
  n, p = prompts.shape
  gen = Generator(base, max_batch=min(batch, n), max_seq_len=p + new_tokens)
  t0 = time.perf_counter()
  rows = gen.generate(list(prompts), max_new_tokens=new_tokens)
  seconds = time.perf_counter() - t0
  short = [i for i, r in enumerate(rows) if len(r) != new_tokens]
  if short:
    raise RuntimeError(f"the generator returned {len(rows[short[0]])} tokens for row {short[0]}, not {new_tokens}")
  (log or logger.info)(
    f"distillation set: {n} prompts x {new_tokens} greedy tokens in {seconds:.1f} s "
    f"({n * new_tokens / seconds:,.0f} tok/s, compilation included)"
  )
  return DistillationSet(np.concatenate([prompts, np.asarray(rows, np.int32)], axis=1), p)


CHAT_INSTRUCTION = "Continue this text:\n\n"


def chat_prompts(windows: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
  """Corpus windows [N, P] as user turns in the base's chat template (the tokenizer's), ending in
  the assistant's generation prompt: [N, prefix + P + suffix]. The template is rendered once around
  a marker and its two sides tokenized, so every prompt has the same length (the window's tokens
  are kept as they are, not re-tokenized inside the text)."""
  if not tokenizer.chat_template:
    raise ConfigError("medusa.chat needs a base with a chat template; this one has none")
  marker = "\x00WINDOW\x00"
  messages = [{"role": "user", "content": CHAT_INSTRUCTION + marker}]
  before, after = tokenizer.apply_chat_template(messages, add_generation_prompt=True).split(marker)
  prefix = np.asarray(tokenizer.encode(before, add_special_tokens=False), np.int32)
  suffix = np.asarray(tokenizer.encode(after, add_special_tokens=False), np.int32)
  n = len(windows)
  return np.concatenate([np.tile(prefix, (n, 1)), np.asarray(windows, np.int32), np.tile(suffix, (n, 1))], axis=1)


# ---------------------------------------------------------------------------- training the heads


def _position_batches(num_positions: int, batch: int, seed: int) -> Iterator[np.ndarray]:
  """Index batches over shuffled positions, epoch after epoch (a batch may straddle two epochs)."""
  rng = np.random.default_rng(seed)
  order = np.zeros(0, np.int64)
  while True:
    while len(order) < batch:
      order = np.concatenate([order, rng.permutation(num_positions)])
    yield order[:batch].astype(np.int32)
    order = order[batch:]


def format_record(step: int, record: dict) -> str:
  """One progress line of `train_heads`' log record."""
  rate = f", {record['positions_per_s']:,.0f} positions/s" if "positions_per_s" in record else ""
  return f"step {step}: loss {record['loss']:.4f}, grad_norm {record['grad_norm']:.3f}, lr {record['lr']:.2e}{rate}"


def _default_log(step: int, record: dict) -> None:
  logger.info(format_record(step, record))


def positions_per_step(batch_size: int, new_tokens: int, mesh: dict | None = None) -> int:
  """Positions a step trains on: `batch_size` sequences' worth, batch_size * (new_tokens - 1),
  rounded up to a multiple of the data-parallel devices of `mesh` (`TrainConfig.mesh`; None: all)."""
  shape = sharding.make_mesh(mesh).shape
  parallel = shape["data"] * shape["fsdp"]
  return -(-batch_size * (new_tokens - 1) // parallel) * parallel


def _beside(tree, base):
  """`tree` on the device(s) of the base's first parameter (replicated over a mesh it spans)."""
  where = jax.tree.leaves(nnx.state(base))[0].sharding
  if not isinstance(where, jax.sharding.SingleDeviceSharding):
    where = jax.sharding.NamedSharding(where.mesh, jax.sharding.PartitionSpec())
  return jax.device_put(tree, where)


def train_heads(
  base,
  sequences: DistillationSet,
  *,
  num_heads: int = 4,
  num_layers: int = 1,
  steps: int = 200,
  batch_size: int = 16,
  learning_rate: float | None = None,
  optimizer: OptimizerConfig | None = None,
  seed: int = 0,
  head_weight: float = heads_lib.HEAD_WEIGHT,
  log_every: int = 10,
  log: Callable[[int, dict], None] | None = None,
  hidden_batch: int = 16,
  mesh: dict | None = None,
) -> tuple[MedusaHeads, list[float]]:
  """Trains fresh (zero-initialized) Medusa heads for the frozen `base` on `sequences`, with the
  training engine (`jaxeff.training.Trainer`).

  Args:
    base: the base model (`jaxeff.models.Llama`); read, never changed.
    sequences: the self-distillation set (`distillation_set`).
    num_heads, num_layers: K and L of the heads.
    steps: optimizer steps.
    batch_size: sequences' worth of positions per step: batch_size * (new_tokens - 1) positions
      (rounded up to a multiple of the data-parallel devices) drawn from a shuffle of all counted
      positions, epoch after epoch.
    learning_rate: the peak learning rate; replaces `optimizer.learning_rate` when given.
    optimizer: the optax chain's settings (`make_optimizer`: clipping, warmup + cosine); None:
      AdamW with warmup over a tenth of the steps. Weight decay applies to w, never to b.
    seed: the shuffle.
    head_weight: head k's loss weight is head_weight^k.
    log_every: `log(step, record)` every this many steps and at the last; record: loss, grad_norm,
      lr, positions_per_s (not for the compiling first step). None logs a line to `jaxeff`'s logger.
    hidden_batch: sequences per forward when the base's hidden states are computed (once).
    mesh: the devices the steps run on, as `TrainConfig.mesh` (default: all, data-parallel).

  Returns:
    (heads, the loss of every step), the heads on the base's device(s).
  """
  if steps < 1 or batch_size < 1 or log_every < 1:
    raise ConfigError(f"steps, batch_size and log_every must be >= 1, got {steps}, {batch_size}, {log_every}")
  log = log or _default_log
  opt = optimizer or OptimizerConfig(learning_rate=1e-3, warmup_steps=max(1, steps // 10))
  if learning_rate is not None:
    opt = dataclasses.replace(opt, learning_rate=learning_rate)
  factory = heads_lib.model_factory(base, num_heads, num_layers)
  # Weight decay pulls w towards 0 (the base's own prediction), never b: w is the 4-D leaf.
  _, params, _ = nnx.split(nnx.eval_shape(lambda: factory(None, nnx.Rngs(0))), heads_lib.TRAINABLE, ...)
  decay = jax.tree.map(lambda p: p.ndim == 4, params)
  opt = dataclasses.replace(opt, hyperparams={"mask": decay, **opt.hyperparams})
  mesh = dict(mesh or {"data": -1})
  per_step = positions_per_step(batch_size, sequences.new_tokens, mesh)
  trainer = Trainer(
    TrainConfig(model=base.cfg, optimizer=opt, mesh=mesh, steps=steps, batch_size=per_step, seed=seed),
    model_factory=factory,
    loss_fn=heads_lib.distillation_loss(head_weight),
    trainable=heads_lib.TRAINABLE,
  )
  hidden, labels, mask = (
    np.asarray(a) for a in heads_lib.training_arrays(base, sequences, num_heads, batch=hidden_batch)
  )
  batches = (
    {"hidden": hidden[i], "labels": labels[i], "mask": mask[i]}
    for i in _position_batches(hidden.shape[0], per_step, seed)
  )
  losses: list[float] = []
  pending: list[dict] = []
  clock, clock_steps = None, 0
  state = trainer.init_state()
  for info in trainer.steps(state, batches):
    state, i = info.state, info.step
    pending.append(info.metrics)
    clock_steps += 1
    if i == 1 or i % log_every == 0 or i == steps:
      fetched = jax.device_get(pending)
      losses += [float(m["loss"]) for m in fetched]
      pending = []
      record = {"loss": losses[-1], "grad_norm": float(fetched[-1]["grad_norm"]), "lr": float(trainer.schedule(i - 1))}
      if clock is not None:  # the first step compiles: it is kept out of the rate
        record["positions_per_s"] = clock_steps * per_step / (time.perf_counter() - clock)
      if i % log_every == 0 or i == steps:
        log(i, record)
      clock, clock_steps = time.perf_counter(), 0
  heads = trainer.model(state).heads
  heads_def, heads_state = nnx.split(heads)
  return nnx.merge(heads_def, _beside(heads_state, base)), losses


# ---------------------------------------------------------------------------- the command-line mode


@dataclasses.dataclass
class MedusaResult:
  """What `train_medusa` returns."""

  heads: MedusaHeads
  info: MedusaInfo
  losses: list[float]
  path: pathlib.Path  # where the heads were saved


def _check_settings(cfg: TrainConfig) -> None:
  """What medusa mode refuses before loading anything."""
  if jax.process_count() > 1:
    raise ConfigError("medusa mode trains on one process; run it without --coordinator / --distributed")
  if cfg.data.dataset is not None or cfg.data.tokenizer is not None:
    raise ConfigError(
      "medusa mode tokenizes data.paths (or the default corpus) with the base's own tokenizer; "
      "drop data.dataset / data.tokenizer"
    )


def _check_model_overrides(cfg: TrainConfig, base_cfg) -> None:
  """A `model.*` value that differs from the default config was set by the user: it must be the base's."""
  default = TrainConfig().model
  conflicts = [
    f"model.{f.name}={getattr(cfg.model, f.name)!r} vs the base's {getattr(base_cfg, f.name)!r}"
    for f in dataclasses.fields(default)
    if getattr(cfg.model, f.name) != getattr(default, f.name)
    and getattr(cfg.model, f.name) != getattr(base_cfg, f.name)
  ]
  if conflicts:
    raise ConfigError(f"medusa.base defines the model; drop the conflicting overrides ({'; '.join(conflicts)})")


def train_medusa(cfg: TrainConfig, *, report: Callable[[str], None] | None = None) -> MedusaResult:
  """Medusa mode of `python -m jaxeff.train`: loads `cfg.medusa.base` (`jaxeff.load`), builds the
  distillation sets from the corpus of `cfg.data`, trains the heads, measures their acceptance on
  the held-out set (`result.info.acceptance`; `format_acceptance` prints it) and saves everything
  to `output_dir/medusa`. Progress lines go to `report` (default: the `jaxeff` logger), metrics to
  `output_dir/medusa_metrics.jsonl`.

  Raises:
    ConfigError, DataError, HFError, CheckpointError, TrainError: bad input, before training.
  """
  report = report or logger.info
  m = cfg.medusa
  out_dir = pathlib.Path(cfg.output_dir)
  heads_dir = out_dir / HEADS_DIR
  _check_settings(cfg)
  try:
    loader.path_kind(m.base)  # a wrong path fails before output_dir is created
  except JaxeffError as e:
    raise ConfigError(f"medusa.base {e}") from None
  check_writable(out_dir, out_dir)
  heads_lib.check_can_save(heads_dir, overwrite=m.overwrite)  # before anything is computed

  t0 = time.perf_counter()
  base, tokenizer = loader.load(m.base)
  _check_model_overrides(cfg, base.cfg)
  report(f"base {m.base}: {base.cfg.num_layers} layers, hidden {base.cfg.hidden_size}, vocab {base.cfg.vocab_size}")
  tokens = data_lib.load_tokens(cfg.data, tokenizer)
  if tokens.size and int(tokens.max()) >= base.cfg.vocab_size:
    raise DataError(
      f"the tokenizer gives ids up to {int(tokens.max())}; the base's vocabulary has {base.cfg.vocab_size}"
    )
  num_val = round(len(tokens) * cfg.data.val_fraction) if m.eval_sequences else 0
  train_tokens, val_tokens = tokens[: len(tokens) - num_val], tokens[len(tokens) - num_val :]
  if m.eval_sequences and len(val_tokens) < m.prompt_len:
    raise DataError(
      f"the held-out tail (data.val_fraction={cfg.data.val_fraction}) has {len(val_tokens)} tokens, fewer than "
      f"medusa.prompt_len={m.prompt_len}; raise data.val_fraction or set medusa.eval_sequences=0"
    )
  report(f"corpus: {len(tokens):,} tokens ({len(train_tokens):,} for training prompts, {num_val:,} held out)")
  prompts = heads_lib.corpus_prompts(train_tokens, m.sequences, m.prompt_len)
  if m.eval_sequences:
    prompts = np.concatenate([prompts, heads_lib.corpus_prompts(val_tokens, m.eval_sequences, m.prompt_len)])
  if m.chat:
    prompts = chat_prompts(prompts, tokenizer)
    report(f"chat prompts: {prompts.shape[1]} tokens each (template around the corpus window)")
  both = distillation_set(base, prompts, m.new_tokens, batch=m.generate_batch, log=report)
  train_set, eval_set = both.rows(slice(0, m.sequences)), both.rows(slice(m.sequences, None))

  metrics = open(out_dir / METRICS_FILE, "w")

  def log(step: int, record: dict):
    metrics.write(json.dumps({"step": step, **record}) + "\n")
    metrics.flush()
    report(format_record(step, record))

  t_train = time.perf_counter()
  try:
    heads, losses = train_heads(
      base,
      train_set,
      num_heads=m.num_heads,
      num_layers=m.num_layers,
      steps=cfg.steps,
      batch_size=cfg.batch_size,
      optimizer=cfg.optimizer,
      seed=cfg.seed,
      log_every=cfg.log_every,
      log=log,
      hidden_batch=m.generate_batch,
      mesh=cfg.mesh,
    )
    train_seconds = time.perf_counter() - t_train
    acceptance = None
    if len(eval_set):
      acc = heads_lib.measure_acceptance(base, heads, eval_set, m.max_rank, batch=m.generate_batch)
      acceptance = acc.tolist()
      metrics.write(json.dumps({"step": cfg.steps, "acceptance": acceptance}) + "\n")
  finally:
    metrics.close()
  info = MedusaInfo.for_heads(
    heads,
    base,
    base_path=str(pathlib.Path(m.base).absolute()),
    acceptance=acceptance,
    training={
      "steps": cfg.steps,
      "seconds": round(train_seconds, 3),
      "total_seconds": round(time.perf_counter() - t0, 3),
      "final_loss": losses[-1],
      # positions trained on, repeats included
      "tokens": cfg.steps * positions_per_step(cfg.batch_size, m.new_tokens, cfg.mesh),
      "distillation_tokens": m.sequences * m.new_tokens,  # greedy tokens of the training set
      "sequences": m.sequences,
      "eval_sequences": len(eval_set),
      "prompt_len": m.prompt_len,
      "new_tokens": m.new_tokens,
      "batch_size": cfg.batch_size,
      "learning_rate": cfg.optimizer.learning_rate,
      "optimizer": cfg.optimizer.name,
      "seed": cfg.seed,
      "chat": m.chat,
    },
  )
  path = heads_lib.save_heads(heads_dir, heads, info=info, overwrite=m.overwrite)
  return MedusaResult(heads=heads, info=info, losses=losses, path=path)
