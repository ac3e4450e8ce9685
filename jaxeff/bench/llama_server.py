"""llama.cpp's own server (`llama-server`), the serving benchmark's anchor: built once, CPU only,
from the llama.cpp source that llama-cpp-python's source distribution vendors, into a cache
directory that later runs reuse.

  ensure_built()  -> the binary, or None after one line saying why not (the bench goes on without it)
  command(binary, gguf, port)  -> its command line: `--parallel 8 --cont-batching`, slot prompt cache on

Not a benchmark itself (`python -m jaxeff.bench serve` uses it). The cache directory is
`$JAXEFF_LLAMA_SERVER_DIR`, else `~/.cache/jaxeff/llama-server/<llama-cpp-python version>/`; it
holds `llama.cpp/` (the vendored source), `build/` (cmake's) and `build.log`. Building takes many
minutes on 2 cores; a second process that asks meanwhile waits for the first one's build.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

DEFAULT_VERSION = "0.3.36"  # the llama-cpp-python the test extras install
ENV_DIR = "JAXEFF_LLAMA_SERVER_DIR"
ENV_SDIST = "JAXEFF_LLAMA_CPP_SDIST"  # a llama_cpp_python-*.tar.gz already on disk (no pip download)
# CPU only, no network features (no curl, no TLS, no web UI download): what the benchmark needs.
CMAKE_FLAGS = (
  "-DCMAKE_BUILD_TYPE=Release",
  "-DLLAMA_CURL=OFF",
  "-DLLAMA_OPENSSL=OFF",
  "-DLLAMA_BUILD_TESTS=OFF",
  "-DLLAMA_BUILD_EXAMPLES=OFF",
  "-DLLAMA_BUILD_SERVER=ON",
  "-DLLAMA_BUILD_TOOLS=ON",
  "-DLLAMA_BUILD_APP=OFF",
  "-DLLAMA_BUILD_UI=OFF",
  "-DLLAMA_USE_PREBUILT_UI=OFF",
  "-DBUILD_SHARED_LIBS=OFF",
  "-DGGML_CUDA=OFF",
  "-DGGML_METAL=OFF",
  "-DGGML_VULKAN=OFF",
)


def version() -> str:
  """The installed llama-cpp-python's version (the server then matches the in-process rows), else
  `DEFAULT_VERSION`."""
  try:
    return importlib.metadata.version("llama_cpp_python")
  except importlib.metadata.PackageNotFoundError:
    return DEFAULT_VERSION


def cache_dir(ver: str | None = None) -> pathlib.Path:
  """Where the build lives: `$JAXEFF_LLAMA_SERVER_DIR`, else ~/.cache/jaxeff/llama-server/VERSION."""
  if os.environ.get(ENV_DIR):
    return pathlib.Path(os.environ[ENV_DIR]).expanduser()
  return pathlib.Path.home() / ".cache" / "jaxeff" / "llama-server" / (ver or version())


def binary_path(directory: pathlib.Path) -> pathlib.Path:
  return directory / "build" / "bin" / "llama-server"


def ensure_built(directory=None, *, ver: str | None = None, sdist=None, jobs: int = 2, log=print):
  """The `llama-server` binary in `directory` (default `cache_dir()`), built there first when absent:
  the source from `sdist` (a llama_cpp_python-VERSION.tar.gz; default `$JAXEFF_LLAMA_CPP_SDIST`, else
  `pip download`ed), then cmake (Release, CPU, `-j jobs`, only the server target). Returns None when
  it cannot, after one line through `log` naming what is missing or the build log."""
  ver = ver or version()
  directory = pathlib.Path(directory) if directory else cache_dir(ver)
  binary = binary_path(directory)
  if _runnable(binary):
    return binary
  missing = [] if shutil.which("cmake") else ["cmake"]
  if not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
    missing.append("a C++ compiler")
  if missing:
    log(f"llama-server: not built ({' and '.join(missing)} not found); its rows are left out")
    return None
  directory.mkdir(parents=True, exist_ok=True)
  with open(directory / ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process building the same directory: wait for it
    if _runnable(binary):
      return binary
    source = directory / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
      problem = _unpack_source(source, ver, sdist or os.environ.get(ENV_SDIST))
      if problem:
        log(f"llama-server: not built ({problem}); its rows are left out")
        return None
    build_log = directory / "build.log"
    log(f"llama-server: building llama.cpp {ver}'s server once into {directory} (minutes; log: {build_log})")
    t0 = time.perf_counter()
    configure = ["cmake", "-S", str(source), "-B", str(directory / "build"), *CMAKE_FLAGS]
    build = ["cmake", "--build", str(directory / "build"), "--config", "Release", "--target", "llama-server"]
    build += ["-j", str(jobs)]
    with open(build_log, "w") as out:
      for cmd in (configure, build):
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
          log(f"llama-server: the build failed (`{cmd[1]}`; log: {build_log}); its rows are left out")
          return None
    if not _runnable(binary):
      log(f"llama-server: the build made no runnable {binary} (log: {build_log}); its rows are left out")
      return None
    log(f"llama-server: built in {time.perf_counter() - t0:.0f} s: {binary}")
    return binary


def _runnable(binary: pathlib.Path) -> bool:
  return binary.is_file() and os.access(binary, os.X_OK)


def _unpack_source(dest: pathlib.Path, ver: str, sdist) -> str | None:
  """Extracts the sdist's vendor/llama.cpp into `dest`; returns what went wrong, or None."""
  with tempfile.TemporaryDirectory(prefix="jaxeff-llama-cpp-") as tmp:
    if sdist is None:
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
      cmd += [f"llama-cpp-python=={ver}", "-d", tmp, "-q"]
      got = subprocess.run(cmd, capture_output=True, text=True)
      found = sorted(pathlib.Path(tmp).glob("llama_cpp_python-*.tar.gz"))
      if got.returncode != 0 or not found:
        last = (got.stderr.strip().splitlines() or ["no sdist"])[-1]
        return f"no llama-cpp-python {ver} source distribution: {last}"
      sdist = found[0]
    sdist = pathlib.Path(sdist)
    if not sdist.is_file():
      return f"no file {sdist}"
    staging = dest.with_name(dest.name + ".partial")  # a killed extraction leaves no half source
    shutil.rmtree(staging, ignore_errors=True)
    try:
      with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
          top, _, rest = m.name.partition("/")
          if rest.startswith("vendor/llama.cpp/") and (m.isfile() or m.isdir()):
            m.name = rest.removeprefix("vendor/llama.cpp/")
            members.append(m)
        if not members:
          return f"{sdist.name} has no vendor/llama.cpp"
        tar.extractall(staging, members=members, filter="data")
    except (tarfile.TarError, OSError) as e:
      return f"cannot unpack {sdist.name}: {e}"
    staging.rename(dest)
  return None


def command(binary, gguf, port: int, *, parallel: int = 8, ctx_per_slot: int = 2048, threads: int | None = None):
  """`llama-server` on 127.0.0.1:`port` serving `gguf` as model "m": `parallel` slots of
  `ctx_per_slot` positions, continuous batching, the slot prompt cache (on by default; requests may
  turn it off with `cache_prompt: false`), /metrics and /slots on."""
  threads = threads or os.cpu_count() or 1
  cmd = [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--alias", "m"]
  cmd += ["--parallel", str(parallel), "--cont-batching", "--ctx-size", str(parallel * ctx_per_slot)]
  cmd += ["--threads", str(threads), "--threads-batch", str(threads), "--metrics", "--slots"]
  # llama.cpp's AMX matmul segfaults on this machine's CPU for multi-token batches (see
  # common.llama_cpp_without_extra_buffers): no repacked / extra buffer types.
  cmd += ["--no-repack"]
  return cmd
