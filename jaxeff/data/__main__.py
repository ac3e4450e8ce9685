"""`python -m jaxeff.data prepare --input PATTERN [--input ...] [--tokenizer FILE] --output DIR [--format chat]`

Tokenizes text, JSON-lines (`text` field) and parquet (`text` column) files once, in parallel, into
a directory that `data.dataset=DIR` trains from (format: jaxeff/data/prepared.py); `--workers N`
tokenizer processes (default: the CPU count). With `--format chat`: JSON-lines conversations
(`messages`, or `prompt`/`completion`) rendered with the chat template beside `--tokenizer`, with
their loss masks, for `data.format=chat data.dataset=DIR`.
"""

from __future__ import annotations

import argparse
import sys

from jaxeff import cli
from jaxeff.data.prepared import prepare
from jaxeff.errors import JaxeffError


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jaxeff.data", description=__doc__.split("\n")[2])
  sub = p.add_subparsers(dest="command", required=True)
  prep = sub.add_parser("prepare", help="tokenize files once into a dataset directory")
  prep.add_argument(
    "--input",
    action="append",
    required=True,
    metavar="PATTERN",
    help="a file or glob (quote it; ** recurses); repeatable",
  )
  prep.add_argument("--tokenizer", help="a Hugging Face tokenizer.json (default: UTF-8 bytes, vocab 256)")
  prep.add_argument("--output", required=True, help="the directory to create (never overwritten)")
  prep.add_argument("--workers", type=int, help="tokenizer processes (default: the CPU count)")
  prep.add_argument("--quiet", action="store_true", help="no progress lines")
  prep.add_argument(
    "--format", choices=("text", "chat"), default="text", help="text documents, or chat conversations (JSONL)"
  )
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  if args.workers is not None and args.workers < 1:
    print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
    return 2
  cli.log_to_stderr()
  try:
    index = prepare(
      args.input,
      args.output,
      tokenizer=args.tokenizer,
      workers=args.workers,
      progress=not args.quiet,
      format=args.format,
    )
  except JaxeffError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  what = "conversations" if args.format == "chat" else "documents"
  print(
    f"prepared {index['num_tokens']:,} tokens in {index['num_documents']:,} {what} "
    f"(vocab {index['vocab_size']}, {index['dtype']}) -> {args.output}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
