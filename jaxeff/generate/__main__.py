"""Generate text: `python -m jaxeff.generate (--checkpoint DIR | --hf DIR_OR_GGUF) [options]`.

  python -m jaxeff.generate --hf SmolLM2-135M-Instruct.Q4_1.gguf --prompt "The capital of France is"
  python -m jaxeff.generate --hf model.gguf --chat                      # interactive, the model's chat template
  python -m jaxeff.generate --checkpoint runs/default --prompt "def "   # a jaxeff.train run (its tokenizer)
  python -m jaxeff.generate --hf model.gguf --prompt "..." --speculate lookup     # speculative decoding

--speculate lookup | self:L | draft:PATH | medusa:DIR drafts tokens with prompt lookup, the model's
first L layers, a draft model (a GGUF file or HF directory with the same vocabulary) or trained
Medusa heads (`python -m jaxeff.train medusa.base=...`), and verifies them in one forward: the same
text, fewer forwards; the stats line then adds tokens per forward and the draft's share of time.

Streams the new text to stdout as it is generated; then one line on stderr with prefill and decode
tokens/s and the KV cache's memory. With --chat, each line read from stdin is a user turn (the
conversation is re-rendered with the chat template every turn); an empty line or end of input ends
it. Bad input (a missing path, an unsupported GGUF, a prompt longer than the cache, an unknown option)
prints one `error:` line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from jaxeff import cli, host_malloc
from jaxeff.errors import GenerationError, JaxeffError


def parse_args(argv):
  """Flags in any order (jaxeff's shared parser: bad usage is one `error:` line).

  Raises:
    jaxeff.cli.UsageError: an unknown flag, a missing value or a bad combination.
  """
  p = cli.ArgumentParser(
    prog="python -m jaxeff.generate",
    description=__doc__.split("\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--prompt", help="the prompt text (with --chat: the first user turn)")
  p.add_argument("--chat", action="store_true", help="apply the model's chat template; read turns from stdin")
  p.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
  p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default): greedy")
  p.add_argument("--top-k", type=int, default=None, metavar="K")
  p.add_argument("--top-p", type=float, default=None, metavar="P")
  p.add_argument("--min-p", type=float, default=None, metavar="P")
  p.add_argument("--seed", type=int, default=0, metavar="S")
  cli.add_model_args(p)
  cli.add_inference_args(p)
  p.add_argument(
    "--max-seq-len",
    type=int,
    default=None,
    metavar="L",
    help="KV cache length (default: prompt + max-new-tokens; 1024 with --chat)",
  )
  args = p.parse(argv)
  if not args.chat and args.prompt is None:
    p.error("give --prompt TEXT (or --chat for an interactive session)")
  if args.max_new_tokens < 1:
    p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  cli.check_model_args(p, args)
  cli.check_inference_args(p, args)
  return args


def make_speculator(args, model):
  """The `--speculate` speculator (None without the flag). Raises JaxeffError for bad values."""
  from jaxeff.generate.speculative import spec as speculate_spec

  if args.speculate is None:
    return None
  return speculate_spec.from_spec(args.speculate, model, num_draft=args.draft_tokens, tree_size=args.tree_size)


def _sampling(args, tok) -> dict:
  return dict(
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    min_p=args.min_p,
    seed=args.seed,
    stop_tokens=tok.stop_tokens,
  )


def _warm_up(gen, tok, ids, args, err):
  """Compiles prefill (this prompt's bucket) and the decode step, so the reported speeds are the model's."""
  t0 = time.perf_counter()
  for _ in gen.stream([ids], **{**_sampling(args, tok), "max_new_tokens": min(2, args.max_new_tokens)}):
    pass
  print(f"compiled in {time.perf_counter() - t0:.1f} s", file=err)


def _generate_one(gen, tok, ids, args, out):
  from jaxeff.generate.tokenizer import StreamDecoder

  decoder = StreamDecoder(tok)
  for step in gen.stream([ids], max_new_tokens=args.max_new_tokens, **_sampling(args, tok)):
    if step[0] is not None:
      out.write(decoder.push(step[0]))
      out.flush()
  out.write(decoder.finish())  # text still held back (an incomplete character at the very end)
  return decoder.ids


def _stats_line(gen) -> str:
  s, weight_bytes = gen.stats, gen.weight_bytes
  line = (
    f"prefill: {s.prompt_tokens} tokens, {s.prefill_tokens_per_s:.1f} tok/s | decode: {s.new_tokens} new tokens, "
    f"{s.decode_tokens_per_s:.1f} tok/s | weights: {weight_bytes / 2**20:.1f} MiB read per decode "
    f"step | KV cache: {s.cache_bytes / 2**20:.1f} MiB ({gen.kv_cache.describe(gen.max_batch, gen.max_seq_len)})"
  )
  if gen.speculator is not None:
    line += (
      f" | speculative ({gen.speculator.name}): {s.target_forwards} forwards, "
      f"{s.tokens_per_forward:.2f} tokens/forward, draft {100 * s.draft_share:.0f}% of decode time"
    )
  return line


def run(args, stdin=sys.stdin, out=sys.stdout, err=sys.stderr) -> int:
  from jaxeff.generate import Generator

  t0 = time.perf_counter()
  model, tok = cli.load_model(args)
  print(
    f"loaded {args.hf or args.checkpoint} in {time.perf_counter() - t0:.1f} s "
    f"({args.dtype}{', ' + args.quant if args.quant else ''})",
    file=err,
  )
  if not args.chat:
    ids = tok.encode(args.prompt)
    if not ids:
      raise GenerationError("the prompt encodes to no tokens")
    speculator = make_speculator(args, model)
    lookahead = 0 if speculator is None else speculator.num_draft
    max_len = args.max_seq_len or args.kv_policy.length_for(len(ids), args.max_new_tokens + lookahead)
    gen = Generator(
      model,
      max_batch=1,
      max_seq_len=max_len,
      speculator=speculator,
      kv_cache=args.kv_policy,
      mesh=cli.make_mesh(args),
    )
    _warm_up(gen, tok, ids, args, err)
    _generate_one(gen, tok, ids, args, out)
    out.write("\n")
    print(_stats_line(gen), file=err)
    return 0
  if not tok.chat_template:
    raise GenerationError("--chat needs a model with a chat template (this one has none); use --prompt")
  # Decode reads the whole static cache every step, so the chat default stays moderate.
  gen = Generator(
    model,
    max_batch=1,
    max_seq_len=args.max_seq_len or 1024,
    speculator=make_speculator(args, model),
    kv_cache=args.kv_policy,
    mesh=cli.make_mesh(args),
  )
  messages = []
  first = args.prompt
  while True:
    if first is not None:
      user, first = first, None
    else:
      err.write("> ")
      err.flush()
      user = stdin.readline()
      if not user or not user.strip():
        break
      user = user.rstrip("\n")
    messages.append({"role": "user", "content": user})
    # The template writes the special tokens itself (BOS included), so none are added.
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
    if len(messages) == 1:
      _warm_up(gen, tok, ids, args, err)
    new = _generate_one(gen, tok, ids, args, out)
    out.write("\n")
    out.flush()
    print(_stats_line(gen), file=err)
    messages.append({"role": "assistant", "content": tok.decode(new)})
  return 0


def main(argv=None, stdin=sys.stdin, out=sys.stdout, err=sys.stderr) -> int:
  try:
    args = parse_args(sys.argv[1:] if argv is None else argv)
  except cli.UsageError as e:
    print(f"error: {e}", file=err)
    return 2
  host_malloc.prepare_cpu_host()  # before jax starts (see jaxeff/host_malloc.py)
  cli.use_compile_cache()
  from jaxeff.checkpoint import quiet_abandoned_reads

  quiet_abandoned_reads()  # a damaged checkpoint stays one error line
  cli.log_to_stderr()
  try:
    return run(args, stdin, out, err)
  except JaxeffError as e:
    print(f"error: {e}", file=err)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=err)
    return 130


if __name__ == "__main__":
  sys.exit(main())
