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

from jaxeff import cli


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
    default="dense",
    help="dense (default) | streaming:SINKS,WINDOW (StreamingLLM: flat memory, text may run past --max-seq-len) "
    "| h2o:HEAVY,RECENT (heavy hitters + recent tokens) | snapkv:BUDGET (prompt entries kept per head, SnapKV) "
    "| kivi:BITS,RESIDUAL (2/4-bit cache, RESIDUAL newest tokens in full precision, KIVI)",
  )
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
  if args.speculate is not None:
    kind = args.speculate.split(":", 1)[0]
    if kind not in SPECULATE_KINDS or (kind == "lookup") != (":" not in args.speculate):
      p.error(f"--speculate takes lookup, self:LAYERS, draft:PATH or medusa:DIR, got {args.speculate!r}")
    if args.tree_size is not None and kind != "medusa":
      p.error("--tree-size goes with --speculate medusa:DIR")
    if args.draft_tokens is not None and (args.draft_tokens < 1 or kind == "medusa"):
      p.error("--draft-tokens takes a positive count, for lookup/self/draft (Medusa drafts one token per head)")
  elif args.draft_tokens is not None or args.tree_size is not None:
    p.error("--draft-tokens and --tree-size need --speculate")
  try:
    args.kv_policy = parse_kv_cache(args.kv_cache)
  except ValueError as e:
    p.error(str(e))
  if args.kv_policy is not None and args.speculate is not None:
    p.error("--speculate runs on the dense cache: drop --kv-cache or --speculate")
  return args


def parse_kv_cache(text: str):
  """`--kv-cache` -> a policy (None for dense); ValueError with the accepted forms otherwise."""
  from jaxeff.errors import GenerationError
  from jaxeff.generate.kv_cache import H2O, KIVI, SnapKV, StreamingLLM

  kind, _, value = text.partition(":")
  if kind == "dense" and not value:
    return None
  parts = value.split(",")
  numbers = [int(x) for x in parts] if all(x.strip().isdigit() for x in parts) else []
  make = {
    ("streaming", 2): lambda a, b: StreamingLLM(sinks=a, window=b),
    ("h2o", 2): lambda a, b: H2O(heavy=a, recent=b),
    ("snapkv", 1): lambda c: SnapKV(budget=c),
    ("kivi", 2): lambda bits, r: KIVI(bits=bits, residual=r),
  }.get((kind, len(numbers)))
  if make is not None:
    try:
      return make(*numbers)
    except GenerationError as e:
      raise ValueError(f"--kv-cache {text}: {e}") from None
  raise ValueError(
    "--kv-cache takes dense, streaming:SINKS,WINDOW (e.g. streaming:4,1020), h2o:HEAVY,RECENT, snapkv:BUDGET "
    f"or kivi:BITS,RESIDUAL (e.g. kivi:2,128), got {text!r}"
  )


SPECULATE_KINDS = ("lookup", "self", "draft", "medusa")


def make_speculator(args, model):
  """The `--speculate` speculator (None without the flag). Raises JaxeffError for bad values."""
  from jaxeff.errors import GenerationError, HFError
  from jaxeff.generate import speculative

  if args.speculate is None:
    return None
  kind, _, value = args.speculate.partition(":")
  count = {} if args.draft_tokens is None else {"num_draft": args.draft_tokens}
  if kind == "lookup":
    return speculative.PromptLookup(**count)
  if kind == "self":
    if not value.isdigit():
      raise GenerationError(f"--speculate self:LAYERS needs a layer count, got {value!r}")
    return speculative.SelfDraft(layers=int(value), **count)
  if kind == "draft":
    import pathlib

    from jaxeff import loader

    if not pathlib.Path(value).exists():
      raise HFError(f"--speculate draft:{value}: no such file or directory")
    draft, _ = loader.load(value, dtype=model.cfg.dtype, param_dtype=model.cfg.dtype)
    return speculative.DraftModel(draft, **count)
  return speculative.Medusa(value, tree_size=args.tree_size)


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
  return decoder.ids


def _default_cache_len(policy, prompt: int, new_tokens: int) -> int:
  """Cache positions a one-prompt run needs under `policy` (None: dense; bounded ones ignore it)."""
  from jaxeff.generate.kv_cache import Dense

  return (policy or Dense()).slots_needed(prompt, new_tokens) or prompt + new_tokens


def _cache_shape(gen) -> str:
  from jaxeff.generate.kv_cache import H2O, KIVI, SnapKV, StreamingLLM

  policy = gen.kv_cache
  if isinstance(policy, StreamingLLM):
    return f"{gen.max_batch} x {policy.sinks} sinks + {policy.window} recent tokens, StreamingLLM"
  if isinstance(policy, H2O):
    return f"{gen.max_batch} x {policy.heavy} heavy hitters + {policy.recent} recent tokens, H2O"
  if isinstance(policy, SnapKV):
    return f"{gen.max_batch} x {gen.max_seq_len} positions, prompt kept to {policy.budget}, SnapKV"
  if isinstance(policy, KIVI):
    return (
      f"{gen.max_batch} x {gen.max_seq_len} positions at {policy.bits} bits, {policy.residual} newest in "
      f"full precision, KIVI"
    )
  return f"{gen.max_batch} x {gen.max_seq_len} positions"


def _stats_line(gen) -> str:
  s, weight_bytes = gen.stats, gen.weight_bytes
  line = (
    f"prefill: {s.prompt_tokens} tokens, {s.prefill_tokens_per_s:.1f} tok/s | decode: {s.new_tokens} new tokens, "
    f"{s.decode_tokens_per_s:.1f} tok/s | weights: {weight_bytes / 2**20:.1f} MiB read per decode "
    f"step | KV cache: {s.cache_bytes / 2**20:.1f} MiB ({_cache_shape(gen)})"
  )
  if gen.speculator is not None:
    line += (
      f" | speculative ({gen.speculator.name}): {s.target_forwards} forwards, "
      f"{s.tokens_per_forward:.2f} tokens/forward, draft {100 * s.draft_share:.0f}% of decode time"
    )
  return line


def run(args, stdin=sys.stdin, out=sys.stdout, err=sys.stderr) -> int:
  from jaxeff.errors import GenerationError
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
    max_len = args.max_seq_len or _default_cache_len(args.kv_policy, len(ids), args.max_new_tokens + lookahead)
    gen = Generator(model, max_batch=1, max_seq_len=max_len, speculator=speculator, kv_cache=args.kv_policy)
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
  from jaxeff import host_malloc

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
  from jaxeff.errors import JaxeffError

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
