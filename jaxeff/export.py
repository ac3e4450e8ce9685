"""Export a training run's model: `python -m jaxeff.export --checkpoint RUN_DIR (--hf DIR | --gguf FILE)`.

  python -m jaxeff.export --checkpoint runs/ft --hf runs/ft-hf                # a transformers directory
  python -m jaxeff.export --checkpoint runs/ft --gguf ft.gguf --type q8_0     # llama.cpp, 8-bit blocks
  python -m jaxeff.export --checkpoint runs/ft --step 200 --gguf ft-200.gguf  # a chosen step (default: newest)

--hf writes config.json and model.safetensors (`jaxeff.hf.save`) plus the run's tokenizer files
(tokenizer.json, tokenizer_config.json with the chat template) when it has them. --gguf writes a
GGUF llama.cpp loads (`jaxeff.gguf.write`): llama.cpp's tensor names and q/k row order, the
tokenizer and chat template as metadata, matrices as --type f16 (default; the exact one), f32,
q8_0, q4_0 or q4_1. The run's tokenizer is the one it trained with: with `init_from`, the
pretrained model's. Nothing is ever overwritten: an existing output is one `error:` line.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
import time

from jaxeff import cli, gguf, hf
from jaxeff.checkpoint import quiet_abandoned_reads
from jaxeff.errors import GGUFError, HFError, JaxeffError
from jaxeff.training import load_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def parse_args(argv):
  p = cli.ArgumentParser(
    prog="python -m jaxeff.export",
    description=__doc__.split("\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="a jaxeff.train output_dir")
  p.add_argument("--step", type=int, help="the step to export (default: the newest that reads back)")
  out = p.add_mutually_exclusive_group(required=True)
  out.add_argument("--hf", metavar="OUT_DIR", help="write a Hugging Face (transformers) directory")
  out.add_argument("--gguf", metavar="OUT.gguf", help="write a GGUF file (llama.cpp)")
  p.add_argument("--type", default=None, help="GGUF matrix type: f16 (default), f32, q8_0, q4_0, q4_1")
  args = p.parse(argv)
  if args.type is not None and args.gguf is None:
    p.error("--type goes with --gguf")
  return args


def tokenizer_dir(cfg) -> pathlib.Path | None:
  """The directory of the run's tokenizer.json (None: a byte-level run)."""
  return None if cfg.data.tokenizer is None else pathlib.Path(cfg.data.tokenizer).parent


def export_hf(model, cfg, out: str | pathlib.Path) -> pathlib.Path:
  """A transformers directory for the run's model (`cfg`: its TrainConfig) with its tokenizer files."""
  out = pathlib.Path(out)
  if out.exists():
    raise HFError(f"{out} already exists; export never overwrites")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    hf.save(model, cfg.model, tmp / "model")
    source = tokenizer_dir(cfg)
    for name in TOKENIZER_FILES if source is not None else ():
      if (source / name).exists():
        shutil.copy2(source / name, tmp / "model" / name)
    (tmp / "model").rename(out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def export_gguf(model, cfg, out: str | pathlib.Path, file_type: str = "f16") -> pathlib.Path:
  """A GGUF file of the run's model with its tokenizer (a byte-level run has none to write)."""
  source = tokenizer_dir(cfg)
  if source is None or not (source / "tokenizer.json").exists():
    raise GGUFError(
      "this run trained with jaxeff's byte tokenizer, which llama.cpp cannot read; export it with --hf, "
      "or fine-tune a model that has a tokenizer (init_from=...)"
    )
  return gguf.write(
    out, hf.config_to_hf(cfg.model), hf.hf_tensors(model, cfg.model), source, file_type=file_type, name=out.stem
  )


def run(args, out=sys.stdout) -> int:
  t0 = time.perf_counter()
  model, cfg = load_checkpoint(args.checkpoint, args.step)
  if args.hf is not None:
    path, what = export_hf(model, cfg, args.hf), "Hugging Face directory"
  else:
    file_type = args.type or "f16"
    path, what = export_gguf(model, cfg, pathlib.Path(args.gguf), file_type), f"GGUF ({file_type})"
  size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
  print(
    f"exported {args.checkpoint} to {path}: {what}, {size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s", file=out
  )
  return 0


def main(argv=None, out=sys.stdout, err=sys.stderr) -> int:
  try:
    args = parse_args(sys.argv[1:] if argv is None else argv)
  except cli.UsageError as e:
    print(f"error: {e}", file=err)
    return 2
  quiet_abandoned_reads()
  cli.log_to_stderr()
  try:
    return run(args, out)
  except JaxeffError as e:
    print(f"error: {e}", file=err)
    return 2


if __name__ == "__main__":
  sys.exit(main())
