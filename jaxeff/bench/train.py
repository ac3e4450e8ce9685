"""Train-step throughput: jaxeff vs Hugging Face transformers (PyTorch), same architecture, same run.

  python -m jaxeff.bench train [--config configs/small.yaml] [--steps 5] [--rounds 3] [--json out.json]

Both sides run one full training step per call (forward, cross-entropy, backward, global-norm
clipping, AdamW update) on identical batch shapes; jaxeff's step is the one `jaxeff.train` runs.
Rounds alternate between the two so machine noise hits both alike; medians are reported.
MFU is measured against this machine's f32 matmul peak on CPU (see jaxeff.train.peak_flops_per_device).
"""

from __future__ import annotations

import platform
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxeff import cli, sharding, training
from jaxeff import train as train_lib
from jaxeff.bench import common
from jaxeff.errors import JaxeffError
from jaxeff.hf import config_to_hf
from jaxeff.models import Llama


def _jax_step(cfg: train_lib.TrainConfig):
  """`jaxeff.train`'s own step (TrainState, spec-driven gradients, clipping) on one device."""
  make_model = lambda: Llama(cfg.model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(nnx.eval_shape(make_model))
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  tx, _ = training.make_optimizer(cfg.optimizer, cfg.steps, params, mesh)
  spec = training.optimizer_spec(cfg.optimizer)
  shardings = training.state_shardings(training.abstract_state(params, tx), mesh, spec.gradients == "per_device")
  state = [training.init_state(make_model, tx, shardings, seed=0)]
  with jax.set_mesh(mesh):
    step = jax.jit(training.make_train_step(graphdef, tx, spec, mesh, shardings), donate_argnums=0)
  rng = np.random.default_rng(0)
  batch = {
    k: jnp.asarray(rng.integers(0, cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len)), jnp.int32)
    for k in ("inputs", "targets")
  }

  def run():
    with jax.set_mesh(mesh):
      state[0], m = step(state[0], batch)
    m["loss"].block_until_ready()

  return run


def _torch_step(cfg: train_lib.TrainConfig):
  import torch
  import transformers

  hf_cfg = transformers.AutoConfig.for_model(
    **{k: v for k, v in config_to_hf(cfg.model).items() if k not in ("architectures",)}
  )
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
  model.train()
  opt = cfg.optimizer
  optim = torch.optim.AdamW(model.parameters(), lr=opt.learning_rate, weight_decay=opt.weight_decay)
  gen = torch.Generator().manual_seed(0)
  inputs = torch.randint(0, cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len), generator=gen)
  targets = torch.randint(0, cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len), generator=gen)

  def run():
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
    loss.backward()
    if opt.clip_norm:
      torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_norm)
    optim.step()
    optim.zero_grad(set_to_none=True)
    loss.item()

  return run, torch.__version__, transformers.__version__, torch.get_num_threads()


def main(argv=None) -> int:
  p = cli.ArgumentParser(prog="python -m jaxeff.bench train", description=__doc__.split("\n")[0])
  p.add_argument("--config", help="training config (default: the built-in small CPU config)")
  p.add_argument("--steps", type=int, default=5, help="timed steps per round and side")
  p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
  p.add_argument("--json", help="write the results here")
  p.add_argument("overrides", nargs="*", metavar="key=value")
  try:
    args = p.parse(argv)  # flags and key=value overrides in any order
    cfg = train_lib.load_config(args.config, args.overrides)
  except JaxeffError as e:  # a usage or config error
    return common.error(str(e))
  jax_run = _jax_step(cfg)
  torch_run, torch_v, tf_v, threads = _torch_step(cfg)
  # Two warm-up steps each: compiles, then caches warm.
  times = common.alternating_times(
    {"jaxeff": jax_run, "transformers": torch_run}, args.rounds, calls=args.steps, warmup=2
  )

  tokens = cfg.batch_size * cfg.seq_len
  flops = cfg.model.flops_per_token(cfg.seq_len) * tokens
  peak = train_lib.peak_flops_per_device(cfg) * (len(jax.devices()) if jax.default_backend() != "cpu" else 1)
  rows = {}
  for name, ts in times.items():
    med = statistics.median(ts)
    rows[name] = {"step_ms": med * 1e3, "tokens_per_s": tokens / med, "mfu": flops / med / peak}
  ratio = rows["jaxeff"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"]

  print(
    f"model: {cfg.model.num_params / 1e6:.2f}M params, batch {cfg.batch_size} x seq {cfg.seq_len}, "
    f"optimizer {cfg.optimizer.name}; device {jax.devices()[0].device_kind} ({jax.default_backend()}), "
    f"{platform.machine()}, torch threads {threads}"
  )
  print(f"peak for MFU: {peak / 1e9:.0f} GFLOP/s; {args.rounds} rounds x {args.steps} steps, medians\n")
  labels = {
    "jaxeff": f"jaxeff (jax {jax.__version__})",
    "transformers": f"transformers {tf_v} (torch {torch_v}, AdamW)",
  }
  cells = [
    (labels[name], f"{r['step_ms']:.0f}", f"{r['tokens_per_s']:,.0f}", f"{r['mfu']:.1%}") for name, r in rows.items()
  ]
  print("\n".join(common.markdown_table(("implementation", "step (ms)", "tokens/s", "MFU"), cells, "lrrr")))
  print(f"\njaxeff / transformers tokens/s ratio: {ratio:.2f} (goal on CPU: >= 1.0)")
  if args.json:
    common.write_json(args.json, {"rows": rows, "ratio": ratio, "times": times, "peak_flops": peak})
  return 0
