"""What jaxeff's command lines share: argument parsing (flags and `key=value` overrides in any
order, bad usage as one `error:` line instead of argparse's usage block) and the library's log
messages on stderr.

>>> from jaxeff import cli
>>> parser = cli.ArgumentParser(prog="python -m jaxeff.train")
>>> _ = parser.add_argument("--resume", action="store_true")
>>> _ = parser.add_argument("overrides", nargs="*", metavar="key=value")
>>> args = parser.parse(["steps=8", "--resume", "output_dir=r1"])     # flags and overrides intermixed
>>> args.resume, args.overrides
(True, ['steps=8', 'output_dir=r1'])
>>> try:
...   parser.parse(["--bogus"])
... except cli.UsageError as e:                                      # a command line prints it as one line
...   print(f"error: {e}")
error: unrecognized arguments: --bogus (see python -m jaxeff.train --help)

Plain `parse_args` stops collecting a `nargs="*"` positional at the first flag, so an override
after a flag is "unrecognized"; `parse_intermixed_args` (used by `parse`) collects positionals
from anywhere on the line.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pathlib
import re
import sys
from collections.abc import Sequence

from jaxeff.errors import CheckpointError, GenerationError, MeshError, UsageError


class ArgumentParser(argparse.ArgumentParser):
  """`argparse.ArgumentParser` whose errors raise `UsageError` and whose `parse` takes flags and
  positionals in any order. `--help` still prints and exits 0."""

  def error(self, message: str):
    raise UsageError(f"{message} (see {self.prog} --help)")

  def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses `argv` (default: `sys.argv[1:]`), positionals and flags intermixed."""
    return self.parse_intermixed_args(argv)


class _Stderr(logging.StreamHandler):
  """Writes to whatever `sys.stderr` is at the moment (a test may have replaced it)."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    pass


def log_to_stderr(level: int = logging.INFO) -> None:
  """Shows the library's log messages (logger "jaxeff") on stderr, one plain line each. For command
  lines, which call it at start; `import jaxeff` configures no logging. Idempotent."""
  logger = logging.getLogger("jaxeff")
  logger.setLevel(level)
  if not any(isinstance(h, _Stderr) for h in logger.handlers):
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)


def use_compile_cache() -> None:
  """Compiled programs persist across runs (a process-wide option: command lines only), so the
  second `python -m jaxeff.generate` or `jaxeff.serve` on a model starts in a fraction of the time.
  JAX_COMPILATION_CACHE_DIR wins; else $JAXEFF_CACHE_DIR/xla or ~/.cache/jaxeff/xla."""
  import jax

  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    base = os.environ.get("JAXEFF_CACHE_DIR") or pathlib.Path.home() / ".cache" / "jaxeff"
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(base) / "xla"))


def add_model_args(p: argparse.ArgumentParser) -> None:
  """The model-loading flags `python -m jaxeff.generate` and `python -m jaxeff.serve` share:
  --checkpoint | --hf (one required), --quant, --zero-point, --group-size, --dtype, --scan-layers."""
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", metavar="DIR", help="a jaxeff.train output directory")
  src.add_argument("--hf", metavar="DIR_OR_GGUF", help="a Hugging Face checkpoint directory or a .gguf file")
  p.add_argument(
    "--quant",
    choices=("int8", "int4", "gguf"),
    help="weight-only quantization of every Linear; gguf: serve a --hf .gguf file's Q8_0/Q4_0/Q4_1 "
    "blocks as stored (no float round trip)",
  )
  p.add_argument(
    "--zero-point",
    action="store_true",
    help="with --quant int8/int4: asymmetric (scale and minimum per group; the 4-bit choice)",
  )
  p.add_argument(
    "--group-size",
    type=int,
    default=None,
    metavar="G",
    help="quantization group size (default: per channel for int8, 32 for int4)",
  )
  p.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="compute and weight dtype (default float32: XLA:CPU runs bf16 matmuls slowly)",
  )
  p.add_argument(
    "--scan-layers",
    action="store_true",
    help="run the layers as one scanned block (compiles several times faster, decodes slower)",
  )


def check_model_args(p: ArgumentParser, args: argparse.Namespace) -> None:
  """Usage errors among the model flags (raises `UsageError`)."""
  if args.zero_point and args.quant not in ("int8", "int4"):
    p.error("--zero-point needs --quant int8 or int4 (a GGUF's blocks keep their own format)")
  if args.quant == "gguf" and not (args.hf or "").endswith(".gguf"):
    p.error("--quant gguf serves a .gguf file's blocks as stored: give --hf FILE.gguf")
  if args.quant == "gguf" and (args.scan_layers or args.dtype != "float32"):
    p.error("--quant gguf builds float32, per-layer modules: drop --scan-layers / --dtype")


def load_model(args: argparse.Namespace):
  """(model, tokenizer) from `add_model_args` flags: `jaxeff.load` of --hf or --checkpoint with
  --dtype, --scan-layers and --quant. Raises `JaxeffError`s (a missing path, an unsupported file)."""
  # Here: jax, flax and the models are heavy, and `python -m jaxeff.data` needs none of them.
  from jaxeff import loader

  path = pathlib.Path(args.hf or args.checkpoint)
  if args.hf and not path.exists():
    raise CheckpointError(f"--hf {path}: no such file or directory")
  if args.checkpoint and not path.is_dir():
    raise CheckpointError(f"--checkpoint {path}: no such directory")
  overrides = dict(dtype=args.dtype, param_dtype=args.dtype)
  if args.scan_layers:
    overrides["scan_layers"] = True
  return loader.load(path, quant=args.quant, zero_point=args.zero_point, group_size=args.group_size, **overrides)


def add_inference_args(p: argparse.ArgumentParser, *, kv_cache: str = "dense", batch_mesh_kv_cache=None) -> None:
  """The inference flags `python -m jaxeff.generate` and `python -m jaxeff.serve` share:
  --speculate (with --draft-tokens, --tree-size), --kv-cache (default `kv_cache`; with a --mesh
  that splits the batch over data or fsdp, `batch_mesh_kv_cache` if given), --mesh."""
  p.set_defaults(kv_cache_default=kv_cache, kv_cache_batch_mesh=batch_mesh_kv_cache)
  default = kv_cache + (f"; {batch_mesh_kv_cache} on a --mesh splitting data or fsdp" if batch_mesh_kv_cache else "")
  p.add_argument(
    "--speculate",
    metavar="SPEC",
    help="speculative decoding: lookup | self:LAYERS | draft:PATH | medusa:DIR (same output, fewer forwards)",
  )
  p.add_argument(
    "--draft-tokens", type=int, default=None, metavar="K", help="--speculate: draft tokens per step (a chain)"
  )
  p.add_argument(
    "--tree-size",
    type=int,
    default=None,
    metavar="N",
    help="--speculate medusa: a Sequoia token tree of N nodes from the heads' measured acceptance",
  )
  p.add_argument(
    "--kv-cache",
    metavar="POLICY",
    default=None,
    help=f"(default {default}) dense (a row of --max-seq-len positions per request) | paged | paged:BLOCK_SIZE "
    "(a pool of blocks of 16 or BLOCK_SIZE tokens shared by the requests) | streaming:SINKS,WINDOW "
    "(StreamingLLM: flat memory, text may run past --max-seq-len) "
    "| h2o:HEAVY,RECENT (heavy hitters + recent tokens) | snapkv:BUDGET (prompt entries kept per head, SnapKV) "
    "| kivi:BITS,RESIDUAL (2/4-bit cache, RESIDUAL newest tokens in full precision, KIVI)",
  )
  p.add_argument(
    "--mesh",
    metavar="AXES",
    default=None,
    help="shard over the devices: e.g. tensor=2 or data=2,tensor=4 (axes data, fsdp, tensor; the product is the "
    "device count used; default one device)",
  )


def check_inference_args(p: ArgumentParser, args: argparse.Namespace) -> None:
  """Usage errors among the inference flags (raises `UsageError`); sets `args.kv_policy` (the cache
  policy) and `args.mesh_shape` (a dict, or None)."""
  from jaxeff.generate.speculative import spec as speculate_spec
  from jaxeff.inference import cache as cache_lib

  if args.speculate is not None:
    try:
      speculate_spec.check(args.speculate, num_draft=args.draft_tokens, tree_size=args.tree_size)
    except GenerationError as e:
      p.error(str(e))
  elif args.draft_tokens is not None or args.tree_size is not None:
    p.error("--draft-tokens and --tree-size need --speculate")
  args.mesh_shape = None
  if args.mesh is not None:
    from jaxeff.sharding import MESH_AXES  # imports jax: only when the flag is given

    shape = {}
    for part in args.mesh.split(","):
      name, _, size = part.partition("=")
      if name not in MESH_AXES or not size.isdigit() or int(size) < 1 or name in shape:
        p.error(f"--mesh takes AXIS=N,... with axes {', '.join(MESH_AXES)} (each once, N >= 1), got {args.mesh!r}")
      shape[name] = int(size)
    args.mesh_shape = shape
  if args.kv_cache is None:
    shape = args.mesh_shape or {}
    splits = shape.get("data", 1) * shape.get("fsdp", 1) > 1
    args.kv_cache = args.kv_cache_batch_mesh if splits and args.kv_cache_batch_mesh else args.kv_cache_default
  try:
    args.kv_policy = cache_lib.parse(args.kv_cache)
  except GenerationError as e:
    p.error(str(e))
  if not args.kv_policy.exact_rollback and args.speculate is not None:
    p.error("--speculate runs on the dense cache: drop --kv-cache or --speculate")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_memory(text: str) -> int | float:
  """A memory size: bytes with an optional unit (`2GiB`, `512MiB`, `1.5GB`, `100000000`) -> int, or
  a fraction of the device's memory (`0.5`: in (0, 1]) -> float. Raises UsageError otherwise."""
  match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
  unit = match and match.group(2).lower()
  if not match or unit not in _UNITS:
    raise UsageError(f"a memory size is bytes with a unit (e.g. 2GiB, 512MiB) or a fraction like 0.5, got {text!r}")
  value = float(match.group(1))
  if not unit and "." in match.group(1):
    if not 0 < value <= 1:
      raise UsageError(f"a fraction of the device's memory must be in (0, 1], got {text}")
    return value
  if value * _UNITS[unit] < 1:
    raise UsageError(f"a memory size must be at least one byte, got {text!r}")
  return int(value * _UNITS[unit])


def device_memory(fraction: float) -> int:
  """`fraction` of the first device's memory in bytes (what it reports); raises MeshError where a
  device reports none (CPU)."""
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    raise MeshError(
      f"a fraction of device memory ({fraction}) needs a device that reports its memory (GPU, TPU); "
      f"{jax.devices()[0].platform} does not: give bytes, e.g. 2GiB"
    )
  return int(stats["bytes_limit"] * fraction)


def make_mesh(args):
  """The device mesh `--mesh` asks for (None without the flag). Raises JaxeffError when the devices
  do not match."""
  if args.mesh_shape is None:
    return None
  import jax  # the command lines import jax after they set its flags

  from jaxeff import sharding

  count = math.prod(args.mesh_shape.values())
  devices = jax.devices()
  if count > len(devices):
    raise MeshError(f"--mesh {args.mesh} needs {count} devices; this machine has {len(devices)}")
  return sharding.make_mesh(args.mesh_shape, devices=devices[:count])
