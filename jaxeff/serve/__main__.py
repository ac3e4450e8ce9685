"""Serve a model over OpenAI's HTTP API: `python -m jaxeff.serve (--hf DIR_OR_GGUF | --checkpoint DIR) [options]`.

  python -m jaxeff.serve --hf SmolLM2-135M-Instruct.Q8_0.gguf               # http://127.0.0.1:8000/v1
  python -m jaxeff.serve --hf model.gguf --quant gguf --max-batch 16 --api-key "$KEY"
  python -m jaxeff.serve --checkpoint runs/default --port 0                 # any free port (printed)
  python -m jaxeff.serve --hf model.gguf --speculate lookup --kv-cache streaming:4,1020 --mesh tensor=2

Loads the model (the same flags as `python -m jaxeff.generate`), compiles the programs traffic uses
(its steps), prints `serving MODEL on http://HOST:PORT/v1` and serves `jaxeff.serve.app`
(continuous batching of up to `--max-batch` requests of `--max-seq-len` positions, with the cache
policy of `--kv-cache`: by default the paged cache with prefix caching, in a block pool of
`--kv-cache-memory`, steps of up to `--token-budget` tokens (dense when `--mesh` splits data or
fsdp); the speculator of `--speculate` and the device mesh of `--mesh`: the flags of
`python -m jaxeff.generate`, exact per request under any mix of requests) until SIGTERM or
Ctrl-C: then it stops taking connections, gives running requests `--shutdown-timeout` seconds,
cancels the rest and exits 0. The API key may also come from $JAXEFF_API_KEY. Bad usage or a model
that cannot be loaded prints one `error:` line and exits 2. If the engine fails (its scheduler
thread dies), its requests fail with 503, the engine logs one line naming the cause, and the server
shuts down and exits 1.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import socket
import sys
import threading
import time

from jaxeff import cli, host_malloc
from jaxeff.errors import JaxeffError


def parse_args(argv):
  """Flags in any order. Raises `jaxeff.cli.UsageError` on bad usage."""
  p = cli.ArgumentParser(
    prog="python -m jaxeff.serve",
    description=__doc__.split("\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  cli.add_model_args(p)
  # Paged steps are one row of tokens (tensor-parallel only): a mesh that splits the batch gets dense.
  cli.add_inference_args(p, kv_cache="paged", batch_mesh_kv_cache="dense")
  p.add_argument("--max-batch", type=int, default=8, metavar="B", help="requests running at once (default 8)")
  p.add_argument(
    "--max-seq-len", type=int, default=2048, metavar="L", help="positions per request: prompt + output (default 2048)"
  )
  p.add_argument(
    "--prefill-chunk",
    type=int,
    default=128,
    metavar="C",
    help="prompt tokens of one request per step, for caches other than paged (whose steps take up to "
    "--token-budget) (default 128)",
  )
  p.add_argument(
    "--kv-cache-memory",
    metavar="SIZE",
    default=None,
    help="paged cache: the block pool's size, e.g. 2GiB, 512MiB, or 0.5 (of device memory) (default: what the "
    "dense cache takes for --max-batch x --max-seq-len)",
  )
  p.add_argument(
    "--no-prefix-caching", action="store_true", help="paged cache: prefill every prompt in full (no block reuse)"
  )
  p.add_argument(
    "--token-budget",
    type=int,
    default=256,
    metavar="N",
    help="paged cache: tokens per step, decoding requests first, then prompt chunks (default 256)",
  )
  p.add_argument("--max-waiting", type=int, default=64, metavar="N", help="queued requests before 429 (default 64)")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
  p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
  p.add_argument("--model-name", default=None, help="the model id clients send (default: the file or directory name)")
  p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (default: $JAXEFF_API_KEY)")
  p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="cap on a request's max_tokens")
  p.add_argument("--max-n", type=int, default=4, metavar="N", help="cap on choices per request (default 4)")
  p.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N", help="larger bodies get 413 (1 MiB)")
  p.add_argument(
    "--shutdown-timeout", type=float, default=10.0, metavar="S", help="seconds running requests get at shutdown"
  )
  p.add_argument("--no-warmup", action="store_true", help="compile on the first requests instead of at start")
  p.add_argument(
    "--full-warmup",
    action="store_true",
    help="paged cache with attention the ragged op does not compute (e.g. sinks): also compile every mixed "
    "step (decode rows + prompt chunks) at start, so traffic compiles nothing (more programs: a slower start)",
  )
  args = p.parse(argv)
  cli.check_model_args(p, args)
  cli.check_inference_args(p, args)
  args.kv_memory = None
  if args.kv_cache_memory is not None:
    if args.kv_policy.name != "paged":
      p.error(f"--kv-cache-memory sizes the paged cache, not --kv-cache {args.kv_cache}")
    args.kv_memory = cli.parse_memory(args.kv_cache_memory)
  if args.full_warmup and args.no_warmup:
    p.error("--full-warmup and --no-warmup contradict each other")
  if args.no_prefix_caching and args.kv_policy.name != "paged":
    p.error(f"--no-prefix-caching is for the paged cache, not --kv-cache {args.kv_cache}")
  for name in ("max_batch", "max_seq_len", "prefill_chunk", "max_n", "max_body_bytes", "token_budget"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.max_waiting < 0 or not 0 <= args.port < 65536:
    p.error("--max-waiting must be >= 0 and --port in [0, 65535]")
  if args.max_tokens is not None and args.max_tokens < 1:
    p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
  args.api_key = args.api_key or os.environ.get("JAXEFF_API_KEY") or None
  return args


def run(args, out, err) -> int:
  import uvicorn

  from jaxeff.generate.speculative import spec as speculate_spec
  from jaxeff.serve import Engine
  from jaxeff.serve.app import ServerSettings, create_app

  t0 = time.perf_counter()
  model, tok = cli.load_model(args)
  name = args.model_name or pathlib.Path(args.hf or args.checkpoint).name
  print(f"loaded {args.hf or args.checkpoint} in {time.perf_counter() - t0:.1f} s", file=err)
  speculator = None
  if args.speculate is not None:
    speculator = speculate_spec.from_spec(args.speculate, model, num_draft=args.draft_tokens, tree_size=args.tree_size)
  engine = Engine(
    model,
    tok,
    max_batch=args.max_batch,
    max_seq_len=args.max_seq_len,
    prefill_chunk=args.prefill_chunk,
    max_waiting=args.max_waiting,
    kv_cache=args.kv_policy,
    speculator=speculator,
    mesh=cli.make_mesh(args),
    kv_cache_memory=cli.device_memory(memory) if isinstance(memory := args.kv_memory, float) else memory,
    prefix_caching=not args.no_prefix_caching,
    token_budget=args.token_budget,
  )
  if not args.no_warmup:
    t0 = time.perf_counter()

    def progress(done, total):
      if done == total or done % 4 == 0:
        print(f"compiling: {done}/{total} programs ({time.perf_counter() - t0:.0f} s)", file=err, flush=True)

    engine.warm_up(progress, full=args.full_warmup)
  settings = ServerSettings(
    model_name=name,
    api_key=args.api_key,
    max_tokens=args.max_tokens,
    max_n=args.max_n,
    max_body_bytes=args.max_body_bytes,
  )
  app = create_app(engine, tok, settings)
  sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((args.host, args.port))
  # Listening before the "serving" line: a client that connects as soon as it reads it waits in the
  # backlog until uvicorn accepts, instead of being refused while uvicorn starts up.
  sock.listen(2048)
  host, port = sock.getsockname()[:2]
  config = uvicorn.Config(
    app, log_level="warning", timeout_graceful_shutdown=args.shutdown_timeout, access_log=False, lifespan="on"
  )
  server = uvicorn.Server(config)
  prefix_caching = engine.blocks is not None and engine.blocks.prefix_caching
  print(
    f"serving {name} on http://{host}:{port}/v1 ({engine.kv_cache.describe(args.max_batch, args.max_seq_len)}, "
    f"KV cache {engine.cache_bytes / 2**20:.1f} MiB{', prefix caching' if prefix_caching else ''}"
    f"{f', speculating with {speculator!r}' if speculator is not None else ''}"
    f"{f', mesh {args.mesh}' if args.mesh else ''}{', API key required' if args.api_key else ''})",
    file=out,
    flush=True,
  )
  # uvicorn re-raises the signal that stopped it once it has shut down gracefully; a no-op handler
  # makes that a clean exit (status 0) instead of death by SIGTERM.
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: None)
  served = threading.Event()

  def exit_if_the_engine_fails():
    while not served.wait(0.1):
      if engine.failure is not None:
        server.should_exit = True  # a graceful shutdown: the failed requests' answers go out first
        return

  threading.Thread(target=exit_if_the_engine_fails, name="jaxeff-serve-watch", daemon=True).start()
  try:
    server.run(sockets=[sock])
  finally:
    served.set()
  if engine.failure is not None:
    return 1  # the engine logged why
  print("stopped", file=err)
  return 0


def main(argv=None, out=None, err=None) -> int:
  out, err = out or sys.stdout, err or sys.stderr

  try:
    args = parse_args(sys.argv[1:] if argv is None else argv)
  except cli.UsageError as e:
    print(f"error: {e}", file=err)
    return 2
  try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
  except ImportError as e:
    print(f"error: the server needs the serve extra (pip install 'jaxeff[serve]'): {e}", file=err)
    return 2
  host_malloc.prepare_cpu_host()
  cli.use_compile_cache()
  cli.log_to_stderr()
  try:
    return run(args, out, err)
  except JaxeffError as e:
    print(f"error: {e}", file=err)
    return 2
  except OSError as e:  # e.g. the port is taken
    print(f"error: {e}", file=err)
    return 2
  except KeyboardInterrupt:
    return 0


if __name__ == "__main__":
  sys.exit(main())
