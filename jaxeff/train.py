"""Train a sharded Llama-family model: `python -m jaxeff.train [--config FILE] [--resume] [key=value ...]`.

  python -m jaxeff.train                                   # small model, embedded corpus, CPU-friendly
  python -m jaxeff.train --config configs/125m.yaml data.dataset=corpus/prepared
  python -m jaxeff.train steps=600 --resume                # continue the run in output_dir exactly
  python -m jaxeff.train medusa.base=model.gguf steps=300  # Medusa-1 heads for a frozen base instead
  python -m jaxeff.train init_from=model.gguf data.format=chat data.paths=[chats.jsonl]   # fine-tune

Fine-tuning: `init_from=PATH` (a Hugging Face directory, a GGUF file or a jaxeff.train output_dir:
anything `jaxeff.load` reads) starts from that model's weights, with its architecture and tokenizer
(`model.*` keys may change compute settings only); `data.format=chat` trains on the assistant
tokens of JSONL conversations (`jaxeff.data.chat`); `python -m jaxeff.export` turns the run back
into a transformers directory or a GGUF.

One jitted step: cross-entropy, gradients, an optax chain (clip -> optimizer with warmup + cosine).
Parameters and optimizer state are sharded by the logical-axis rules (jaxeff.sharding) over the
mesh in `mesh:`; each process feeds its slice of the global batch. Checkpoints (orbax, async) hold
the training state and the data iterator's position, so `--resume` continues bit for bit, from the
newest checkpoint that reads back completely (a killed run or a damaged file costs steps, not the run).
Flags and key=value overrides may come in any order.
Metrics go to `output_dir/metrics.jsonl` and TensorBoard (`output_dir/tb`).

Medusa mode: with `medusa.base=PATH` (a .gguf file, a Hugging Face directory or a jaxeff.train
output_dir) the run trains Medusa-1 heads for that frozen model by self-distillation on its greedy
continuations of prompts from the `data.*` corpus (tokenized with the base's tokenizer) and saves
them to `output_dir/medusa`, with the acceptance table measured on held-out prompts. Keys
`medusa.num_heads=4 medusa.num_layers=1 medusa.sequences=64 medusa.eval_sequences=16
medusa.prompt_len=32 medusa.new_tokens=96 medusa.generate_batch=16 medusa.max_rank=10
medusa.overwrite=false`, with `steps`, `batch_size`, `seed`, `log_every`, `mesh`, `optimizer.*`;
jaxeff.generate.speculative.medusa_training describes them. The heads train on the same engine
(`jaxeff.training.Trainer`) as any model.

This module is the command line; the engine is `jaxeff.training`, whose public API it re-exports
(`load_config`, `train`, `load_checkpoint`, `TrainConfig`, ...).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from jaxeff import cli, host_malloc
from jaxeff.checkpoint import quiet_abandoned_reads
from jaxeff.errors import ConfigError, JaxeffError
from jaxeff.generate.speculative import medusa_heads, medusa_training
from jaxeff.training import (
  Checkpointer,
  CheckpointError,
  OptimizerConfig,
  StepInfo,
  TrainConfig,
  Trainer,
  TrainError,
  TrainResult,
  TrainState,
  config_from_dict,
  config_to_dict,
  load_checkpoint,
  load_config,
  make_optimizer,
  peak_flops_per_device,
  train,
)
from jaxeff.training.config import CPU_ATTENTION

__all__ = [
  "CheckpointError",
  "Checkpointer",
  "OptimizerConfig",
  "StepInfo",
  "Trainer",
  "TrainConfig",
  "TrainError",
  "TrainResult",
  "TrainState",
  "config_from_dict",
  "config_to_dict",
  "load_checkpoint",
  "load_config",
  "make_optimizer",
  "peak_flops_per_device",
  "train",
  "CPU_ATTENTION",
  "main",
]


def parse_args(argv):
  """Flags and key=value overrides, in any order (`steps=8 --resume output_dir=r1`).

  Raises:
    jaxeff.cli.UsageError: an unknown flag or a flag without its value.
  """
  p = cli.ArgumentParser(
    prog="python -m jaxeff.train",
    description=__doc__.split("\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--config", help="YAML config (see configs/); defaults to the small CPU model")
  p.add_argument(
    "--resume",
    action="store_true",
    help="continue from the newest checkpoint in output_dir that reads back completely; "
    "start fresh when there is none yet (a preempted job's restart)",
  )
  p.add_argument("--coordinator", help="multi-process: coordinator address host:port (jax.distributed)")
  p.add_argument("--num-processes", type=int, help="multi-process: number of processes")
  p.add_argument("--process-id", type=int, help="multi-process: this process's index")
  p.add_argument(
    "--distributed",
    action="store_true",
    help="call jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM)",
  )
  p.add_argument(
    "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. steps=100 model.num_layers=2"
  )
  return p.parse(argv)


def _init_distributed(args):
  if args.coordinator or args.num_processes:
    if not (args.coordinator and args.num_processes and args.process_id is not None):
      raise ConfigError("--coordinator, --num-processes and --process-id go together")
    # Cross-process collectives on CPU need gloo; the flag only affects the CPU client.
    # (No jax.devices()/default_backend() before initialize: they would start the backend.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  elif args.distributed:
    jax.distributed.initialize()


def main(argv=None) -> int:
  """The command line; returns the exit status (2 with one `error:` line for bad input)."""
  try:
    args = parse_args(sys.argv[1:] if argv is None else argv)
  except cli.UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  host_malloc.prepare_cpu_host()  # before the backend starts; see jaxeff/host_malloc.py
  quiet_abandoned_reads()  # a damaged checkpoint stays one error line
  cli.log_to_stderr()
  try:
    cfg = load_config(args.config, args.overrides)
    _init_distributed(args)
    if cfg.medusa.base is not None:
      return _train_medusa(cfg, args)
    result = train(cfg, resume=args.resume)
  except JaxeffError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  if jax.process_index() == 0:
    last_val = result.val_losses[max(result.val_losses)] if result.val_losses else float("nan")
    print(
      f"done: step {result.step}, train loss {result.losses[-1] if result.losses else float('nan'):.4f}, "
      f"val loss {last_val:.4f}; checkpoints and metrics in {result.output_dir}"
    )
  return 0


def _train_medusa(cfg: TrainConfig, args) -> int:
  """Medusa mode (`medusa.base` set): trains and saves the heads, prints the `done:` line."""
  if args.resume:
    raise ConfigError("medusa mode does not resume; run it again (medusa.overwrite=true replaces saved heads)")
  result = medusa_training.train_medusa(cfg, report=lambda line: print(line, file=sys.stderr, flush=True))
  info = result.info
  if info.acceptance is not None:
    print("\n".join(medusa_heads.format_acceptance(info.acceptance)))
  top1 = "" if info.acceptance is None else f", top-1 acceptance per head {[round(r[0], 3) for r in info.acceptance]}"
  print(
    f"done: {info.num_heads} Medusa heads x {info.num_layers} layer(s) for {cfg.medusa.base}, "
    f"final loss {result.losses[-1]:.4f}{top1}; saved in {result.path}"
  )
  return 0


if __name__ == "__main__":
  code = main()
  if code:
    # Nothing is left to write after a failure; skip interpreter shutdown, where orbax's abandoned
    # reads (after a damaged checkpoint) would print tracebacks below the one `error:` line.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)
