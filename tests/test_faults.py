"""Training survives faults: SIGKILL at random moments, damaged checkpoint files, nothing readable,
an output_dir that cannot be written, and flags anywhere on the command line.

The kill times are random; the seed is printed (set JAXEFF_FAULT_SEED to replay one) and every
outcome a kill can have is checked.
"""

import io
import logging
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time
import types

import chex
import pytest
from test_train import REPO, TINY, _params

from jaxeff import checkpoint, training
from jaxeff import train as train_lib
from jaxeff.bench import __main__ as bench_main
from jaxeff.bench import train as bench_train
from jaxeff.generate import __main__ as generate_main

STEPS = 6
# The train step of tests/test_train.py's adamw CLI run (one layer, lr 1e-2, an 8-step cosine), so
# the suite compiles it once; a fixed decay length keeps it one program whatever `steps` is.
RUN = [
  *TINY,
  "model.num_layers=1",
  "optimizer.learning_rate=1e-2",
  "optimizer.decay_steps=8",
  "eval_batches=0",
  "checkpoint_every=1",
  "keep_checkpoints=2",
]


def _cfg(out, *extra):
  return train_lib.load_config(None, [*RUN, f"output_dir={out}", *extra])


def _steps(out) -> list[int]:
  with training.Checkpointer(pathlib.Path(out) / "checkpoints", read_only=True) as ckpt:
    return ckpt.steps()


def _overwrite(path: pathlib.Path):
  """Flips 16 bytes in the middle of `path` (a torn write or a bad sector)."""
  data = bytearray(path.read_bytes())
  mid = len(data) // 2
  data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
  path.write_bytes(bytes(data))


def _largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  return max((step_dir / "params" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted run every faulty one must reproduce bit for bit (step 4 kept as well)."""
  return train_lib.train(_cfg(tmp_path_factory.mktemp("straight") / "run", f"steps={STEPS}", "checkpoint_every=4"))


# ---------------------------------------------------------------------------- SIGKILL


def _start(out, *extra):
  log = open(out.parent / f"{out.name}-{time.monotonic_ns()}.log", "w")
  cmd = [sys.executable, "-m", "jaxeff.train", *RUN, f"steps={STEPS}", f"output_dir={out}", *extra]
  return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)), log


def _kill_when(proc, ready, delay: float, timeout: float = 240) -> str:
  """SIGKILLs `proc` `delay` seconds after `ready()` first holds; says what the kill interrupted."""
  deadline = time.monotonic() + timeout
  while not ready():
    if proc.poll() is not None:
      return f"nothing: the run had ended (exit {proc.returncode})"
    assert time.monotonic() < deadline, "the run made no progress"
    time.sleep(0.002)
  time.sleep(delay)
  if proc.poll() is not None:
    return f"nothing: the run had ended (exit {proc.returncode})"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return "a run"


def _check_after_kill(out, keep: int = 2) -> str:
  """The newest `keep` steps are all there and intact (old steps go only after a newer one is
  committed and recorded); returns what the kill left behind."""
  ckpt_dir = out / "checkpoints"
  steps = _steps(out)
  assert steps, "a kill after the first commit left no checkpoint"
  newest = steps[-1]
  want = list(range(max(1, newest - keep + 1), newest + 1))
  assert set(want) <= set(steps), (want, steps)
  with training.Checkpointer(ckpt_dir, read_only=True) as ckpt:
    for s in want:
      ckpt.verify(s)
  partial = sorted(p.name for p in ckpt_dir.iterdir() if ".orbax-checkpoint-tmp" in p.name)
  unrecorded = [s for s in want if not (ckpt_dir / str(s) / checkpoint.CHECKSUMS).exists()]
  return f"steps {steps}, partial saves {partial}, committed but not yet recorded {unrecorded}"


def test_sigkill_at_random_moments_then_resume_is_bit_exact(tmp_path, straight):
  seed = int(os.environ.get("JAXEFF_FAULT_SEED", random.randrange(2**31)))
  rng = random.Random(seed)
  print(f"JAXEFF_FAULT_SEED={seed}")
  out = tmp_path / "run"
  ckpt_dir = out / "checkpoints"

  # 1: some time after step k is committed (between, or during, later saves).
  k = rng.randint(1, 3)
  proc, log = _start(out)
  with log:
    what = _kill_when(proc, lambda: (ckpt_dir / str(k)).is_dir(), delay=rng.uniform(0, 0.3))
  print(f"kill 1 (after step {k} + delay) hit {what}; left {_check_after_kill(out)}")

  # 2: the resumed run, while orbax writes its j-th save into a temporary folder (one that kill 1
  # left behind does not count: the resumed run removes it, then may write one of the same name).
  j = rng.randint(1, 2)
  folder_id = lambda e: (e.name, e.inode(), e.stat().st_ctime_ns)
  stale = {folder_id(e) for e in os.scandir(ckpt_dir) if ".orbax-checkpoint-tmp" in e.name}
  seen: set = set()

  def saving():
    try:
      seen.update(folder_id(e) for e in os.scandir(ckpt_dir) if ".orbax-checkpoint-tmp" in e.name)
    except FileNotFoundError:  # renamed or removed while looking
      pass
    return len(seen - stale) >= j

  proc, log = _start(out, "--resume")
  with log:
    what = _kill_when(proc, saving, delay=rng.uniform(0, 0.02))
  print(f"kill 2 (during save {j}) hit {what}; left {_check_after_kill(out)}")

  # Then resume to the end, in process: the same parameters and losses as never stopping.
  final = train_lib.train(_cfg(out, f"steps={STEPS}"), resume=True)
  assert final.step == STEPS
  chex.assert_trees_all_equal(_params(final.model), _params(straight.model))
  restored_from = STEPS - len(final.losses)
  assert final.losses == straight.losses[restored_from:]  # the data iterator resumed exactly too
  assert not [p for p in ckpt_dir.iterdir() if ".orbax-checkpoint-tmp" in p.name]  # partial saves are cleaned up
  assert _steps(out) == [STEPS - 1, STEPS]


# ---------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Steps 1..3, each committed and recorded (keep 3)."""
  out = tmp_path_factory.mktemp("saved") / "run"
  train_lib.train(_cfg(out, "steps=3", "keep_checkpoints=3"))
  assert _steps(out) == [1, 2, 3]
  return out


@pytest.mark.parametrize("damage", ["data", "metadata", "sharding"])
def test_damaged_newest_checkpoint_resumes_from_the_previous(saved, straight, tmp_path, capsys, damage):
  out = tmp_path / "run"
  shutil.copytree(saved, out)
  step3 = out / "checkpoints" / "3"
  victim = {
    "data": _largest_data_file(step3),
    "metadata": step3 / "params" / "_METADATA",
    "sharding": step3 / "params" / "_sharding",
  }[damage]
  _overwrite(victim)
  code = train_lib.main(["--resume", *RUN, f"output_dir={out}", "keep_checkpoints=3", "steps=4"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 0, err
  assert err == [
    f"resume: checkpoint step 3 is damaged: {victim.relative_to(step3).as_posix()} changed since it "
    f"was saved; moved to {out / 'damaged_checkpoints'}; resuming from step 2"
  ], err
  assert (out / "damaged_checkpoints" / "3" / "params").is_dir()  # set aside, never deleted
  assert _steps(out) == [2, 3, 4]
  model, _ = train_lib.load_checkpoint(out)
  chex.assert_trees_all_equal(_params(model), _params(train_lib.load_checkpoint(straight.output_dir, step=4)[0]))


def test_load_checkpoint_skips_a_damaged_newest_step(saved, tmp_path, caplog):
  out = tmp_path / "run"
  shutil.copytree(saved, out)
  (out / "checkpoints" / "3" / "params" / "manifest.ocdbt").unlink()  # an incomplete copy
  with pytest.raises(training.CheckpointError, match="step 3 .* is damaged: params/manifest.ocdbt is missing"):
    train_lib.load_checkpoint(out, step=3)
  with caplog.at_level(logging.WARNING, logger="jaxeff"):
    model, _ = train_lib.load_checkpoint(out)
  assert ["checkpoint step 3 is damaged" in r.getMessage() for r in caplog.records] == [True]
  chex.assert_trees_all_equal(_params(model), _params(train_lib.load_checkpoint(out, step=2)[0]))
  assert _steps(out) == [1, 2, 3]  # a reader moves nothing


def test_every_checkpoint_damaged_is_one_clear_error(saved, tmp_path):
  """Step 3 recorded but overwritten; steps 1 and 2 without a record (as an older jaxeff wrote
  them) and unreadable, so orbax itself fails reading them: one line, no thread noise at exit."""
  out = tmp_path / "run"
  shutil.copytree(saved, out)
  ckpt_dir = out / "checkpoints"
  _overwrite(_largest_data_file(ckpt_dir / "3"))
  for s in (1, 2):
    (ckpt_dir / str(s) / checkpoint.CHECKSUMS).unlink()
    for f in (ckpt_dir / str(s) / "params" / "ocdbt.process_0" / "d").iterdir():
      data = bytearray(f.read_bytes())
      data[:64] = b"\xff" * 64  # the zstd frame headers
      f.write_bytes(bytes(data))
  before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
  proc = subprocess.run(
    [sys.executable, "-m", "jaxeff.train", "--resume", *RUN, f"output_dir={out}", f"steps={STEPS}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith("error: --resume: no checkpoint in "), proc.stderr[:3000]
  # Exactly one line: the reports of orbax's abandoned sibling reads are dropped (see
  # test_abandoned_read_reports_are_dropped_and_nothing_else), nothing else is printed.
  lines = proc.stderr.strip().splitlines()
  assert lines == errors, proc.stderr[:3000]
  assert "step 3 is damaged: params/ocdbt.process_0/d/" in lines[0]
  assert "step 2 cannot be read (" in lines[0] and "step 1 cannot be read (" in lines[0]
  assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # nothing moved or written


# ---------------------------------------------------------------------------- output_dir, command line


def test_unwritable_output_dir_fails_before_any_step(tmp_path, capsys):
  (tmp_path / "file").write_text("not a directory")
  for out in (tmp_path / "file" / "run", tmp_path / "file"):
    code = train_lib.main([*RUN, f"output_dir={out}", "steps=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: output_dir {out} cannot be written (") and "\n" not in err, err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
  # A checkpoints "directory" that is a file is found before any step too.
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "checkpoints").write_text("")
  with pytest.raises(train_lib.TrainError, match="cannot be written"):
    train_lib.train(_cfg(tmp_path / "run", "steps=2"))
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]


def test_flags_and_overrides_in_any_order(tmp_path, capsys):
  args = train_lib.parse_args(["steps=8", "--resume", "output_dir=r1", "--config", "c.yaml", "model.num_layers=2"])
  assert (
    args.resume and args.config == "c.yaml" and args.overrides == ["steps=8", "output_dir=r1", "model.num_layers=2"]
  )
  assert train_lib.main(["steps=2", "--bogus", f"output_dir={tmp_path}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: unrecognized arguments: --bogus") and "\n" not in err, err
  # The benchmark's name may come anywhere; its flags and overrides reach it intermixed.
  names = bench_main.available()
  assert bench_main.split_name(["--quick", "attention", "--rounds", "1"], names) == (
    "attention",
    ["--quick", "--rounds", "1"],
  )
  assert bench_main.main(["--quick", "atention"]) == 2
  assert capsys.readouterr().err.strip() == f"error: unknown benchmark 'atention'; choose one of: {', '.join(names)}"
  assert bench_train.main(["model.num_layers=1", "--rounds", "1", "model.bogus=1"]) == 2
  assert "unknown config key 'model.bogus'" in capsys.readouterr().err  # both overrides parsed
  assert bench_main.main(["--steps", "1", "train", "--bogus"]) == 2
  assert capsys.readouterr().err.strip().startswith("error: unrecognized arguments: --bogus")
  # The generate CLI parses with the same helper: flags anywhere, bad usage as one line.
  args = generate_main.parse_args(["--max-new-tokens", "3", "--hf", "m.gguf", "--prompt", "hi", "--seed", "2"])
  assert (args.hf, args.prompt, args.max_new_tokens, args.seed) == ("m.gguf", "hi", 3, 2)
  stderr = io.StringIO()
  assert generate_main.main(["--hf", "m.gguf", "--bogus", "--prompt", "hi"], err=stderr) == 2
  err = stderr.getvalue().strip()
  assert err.startswith("error: unrecognized arguments: --bogus") and "\n" not in err, err


def test_abandoned_read_reports_are_dropped_and_nothing_else(capsys):
  """`quiet_abandoned_reads` (called by the train and generate CLIs) drops the reports of a failed
  restore's in-flight reads, through each route they take, and passes every other error through.
  The unraisable "Event loop is closed" (tensorstore's callback thread waking orbax's closed loop)
  was the residual that slipped past the old filters."""
  import asyncio

  import tensorstore as ts

  from jaxeff.checkpoint import quiet_abandoned_reads

  saved = sys.excepthook, sys.unraisablehook
  passed_on = []
  try:
    sys.excepthook = sys.__excepthook__  # not an earlier in-process CLI call's
    sys.unraisablehook = lambda report: passed_on.append(report.exc_value)  # the hook before ours
    quiet_abandoned_reads()
    quiet_abandoned_reads()  # idempotent
    loop = asyncio.new_event_loop()
    loop.close()
    for error in (lambda: loop.call_soon_threadsafe(print), lambda: 1 / 0):
      try:
        error()
      except Exception as e:
        sys.excepthook(type(e), e, e.__traceback__)
    err = capsys.readouterr().err
    assert "Event loop is closed" not in err and "ZeroDivisionError" in err, err
    # The real route: a tensorstore future's done-callback on its own thread, as orbax's reads use.
    for callback in (lambda f: loop.call_soon_threadsafe(print), lambda f: 1 / 0):
      promise, future = ts.Promise.new()
      future.add_done_callback(callback)
      promise.set_result(1)
    deadline = time.monotonic() + 10
    while not passed_on and time.monotonic() < deadline:
      time.sleep(0.01)
    time.sleep(0.2)
    assert [type(e) for e in passed_on] == [ZeroDivisionError], passed_on
    passed_on.clear()
    # Unraisable read errors from orbax's abandoned coroutines are dropped; others are reported.
    scope = {}
    exec(
      compile(
        "def read():\n  raise Exception('Encountered error while reading array index')",
        "/site-packages/orbax/checkpoint/serialization.py",
        "exec",
      ),
      scope,
    )
    for fn in (scope["read"], lambda: 1 / 0):
      try:
        fn()
      except Exception as e:
        report = types.SimpleNamespace(
          exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__, err_msg="Exception ignored in", object=fn
        )
        sys.unraisablehook(report)
    assert [type(e) for e in passed_on] == [ZeroDivisionError], passed_on
    # asyncio's "never retrieved" reports of futures failed in orbax's code are filtered; others not.
    quiet = [f for f in logging.getLogger("asyncio").filters if type(f).__name__ == "_AbandonedReadLogs"]
    assert len(quiet) == 1
    for fn, kept in ((scope["read"], False), (lambda: 1 / 0, True)):
      try:
        fn()
      except Exception as e:
        record = logging.LogRecord(
          "asyncio",
          logging.ERROR,
          __file__,
          1,
          "Future exception was never retrieved",
          None,
          (type(e), e, e.__traceback__),
        )
        assert quiet[0].filter(record) == kept
  finally:
    sys.excepthook, sys.unraisablehook = saved
