"""Training pipeline: loss falls, exact resume, mesh change, NaN stop, metrics, bad input."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxeff import train as train_lib

TINY = [
    "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=4",
    "model.num_kv_heads=2", "data.max_corpus_bytes=300000", "seq_len=32", "batch_size=8",
    "log_every=1", "eval_every=1000", "eval_batches=2", "tensorboard=false", "progress=false",
    "optimizer.warmup_steps=2",
]


def _cfg(tmp_path, *extra, name="run"):
  return train_lib.load_config(None, TINY + [f"output_dir={tmp_path / name}", *extra])


def _params(model):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_loss_falls_and_metrics_written(tmp_path):
  cfg = _cfg(tmp_path, "steps=40", "eval_every=20", "tensorboard=true", "optimizer.learning_rate=1e-2")
  result = train_lib.train(cfg)
  assert len(result.losses) == 40
  assert np.mean(result.losses[-5:]) < result.losses[0] - 1.5, result.losses  # from ~5.5 (uniform over bytes)
  assert set(result.val_losses) == {20, 40} and result.val_losses[40] < result.val_losses[20]
  lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  train_lines = [l for l in lines if "loss" in l]
  assert [l["step"] for l in train_lines] == list(range(1, 41))
  assert all(l["tokens_per_s"] > 0 and 0 < l["mfu"] < 1 for l in train_lines)
  assert [l["loss"] for l in train_lines] == result.losses
  assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
  assert (tmp_path / "run" / "checkpoints" / "40").exists()  # the final step is always saved


def test_resume_is_bit_exact(tmp_path):
  common = ["optimizer.decay_steps=8", "checkpoint_every=100"]
  straight = train_lib.train(_cfg(tmp_path, "steps=8", *common, name="straight"))
  first = train_lib.train(_cfg(tmp_path, "steps=4", *common, name="split"))
  second = train_lib.train(_cfg(tmp_path, "steps=8", *common, name="split"), resume=True)
  assert first.losses + second.losses == straight.losses  # bit for bit
  for a, b in zip(_params(second.model), _params(straight.model)):
    np.testing.assert_array_equal(a, b)


def test_restore_onto_a_different_mesh(tmp_path):
  train_lib.train(_cfg(tmp_path, "steps=3", "mesh={data: 8}"))
  result = train_lib.train(_cfg(tmp_path, "steps=5", "mesh={fsdp: 2, tensor: 4}"), resume=True)
  kernel = result.model.layers[0].mlp.gate_proj.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert len(result.losses) == 2 and np.isfinite(result.losses).all()
  model, cfg = train_lib.load_checkpoint(tmp_path / "run")
  assert cfg.model.hidden_size == 32
  for a, b in zip(_params(model), _params(result.model)):
    np.testing.assert_array_equal(a, b)


def _cli(capsys, *argv):
  code = train_lib.main(list(argv))
  err = capsys.readouterr().err.strip()
  return code, err


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, capsys):
  out = f"output_dir={tmp_path / 'run'}"
  assert _cli(capsys, *TINY, out, "steps=4", "checkpoint_every=2")[0] == 0
  code, err = _cli(capsys, "--resume", *TINY, out, "steps=12", "checkpoint_every=2", "optimizer.learning_rate=1e30")
  assert code == 2
  assert err.startswith("error: loss became") and "last good checkpoint (step" in err and "\n" not in err
  last = int(err.split("last good checkpoint (step ")[1].split(")")[0])
  model, _ = train_lib.load_checkpoint(tmp_path / "run", step=last)
  assert all(np.isfinite(p).all() for p in _params(model))


@pytest.mark.parametrize("args, message", [
    (["model.hiden_size=3"], "unknown config key 'model.hiden_size'"),
    (["steps=ten"], "steps must be int, got str 'ten'"),
    (["model.dtype=3"], "model.dtype must be str"),
    (["mesh={data: 3}"], "needs 3 devices, but 8 are available"),
    (["mesh={data: -1, tensor: 3}"], "does not divide the 8 available devices"),
    (["data.paths=[/nonexistent/corpus.txt]"], "/nonexistent/corpus.txt"),
    (["optimizer.name=sgdx"], "sgdx"),
    (["nonsense"], "must look like key=value"),
])
def test_bad_input_one_line(tmp_path, capsys, args, message):
  code, err = _cli(capsys, *TINY, f"output_dir={tmp_path / 'run'}", "steps=2", *args)
  assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_empty_corpus(tmp_path, capsys):
  (tmp_path / "empty.txt").write_text("")
  code, err = _cli(capsys, *TINY, f"output_dir={tmp_path / 'run'}", f"data.paths=[{tmp_path / 'empty.txt'}]")
  assert code == 2 and "empty" in err and "\n" not in err


def test_checkpoint_guards(tmp_path, capsys):
  out = f"output_dir={tmp_path / 'run'}"
  assert _cli(capsys, *TINY, out, "steps=2")[0] == 0
  before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
  code, err = _cli(capsys, *TINY, out, "steps=2")  # no --resume: never overwrite
  assert code == 2 and "already holds checkpoints" in err
  code, err = _cli(capsys, "--resume", *TINY, out, "steps=4", "model.hidden_size=64")
  assert code == 2 and "different architecture" in err and "hidden_size" in err and "\n" not in err
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
  code, err = _cli(capsys, "--resume", *TINY, out, "steps=4", "optimizer.clip_norm=null")
  assert code == 2 and "different optimizer configuration" in err and "\n" not in err
  code, err = _cli(capsys, "--resume", *TINY, f"output_dir={tmp_path / 'fresh'}", "steps=2")
  assert code == 2 and "no checkpoint found" in err


def test_cli_subprocess_bad_key_has_no_traceback(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "jaxeff.train", "bogus_key=1", f"output_dir={tmp_path}"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == ["error: unknown config key 'bogus_key'; valid keys: " +
                                              proc.stderr.split("valid keys: ")[1].strip()]


def test_configs_parse():
  for name in ("small", "125m", "1b"):
    cfg = train_lib.load_config(f"{train_lib.__file__.rsplit('/jaxeff/', 1)[0]}/configs/{name}.yaml")
    assert cfg.model.num_params > 1e6
  small = train_lib.load_config(f"{train_lib.__file__.rsplit('/jaxeff/', 1)[0]}/configs/small.yaml")
  assert small == train_lib.TrainConfig()  # configs/small.yaml documents the defaults exactly


OPTIMIZERS = ["adamw", "c_adamw", "lion", "c_lion", "distributed_lion", "muon", "c_muon", "galore", "osd"]


def test_every_optimizer_trains_from_the_cli(tmp_path, capsys):
  """optimizer.name selects each of jaxeff.optim's transformations; a few steps lower the loss."""
  lrs = {"lion": 1e-3, "c_lion": 1e-3, "distributed_lion": 1e-3}
  for name in OPTIMIZERS:
    out = tmp_path / name
    # One layer: the test is about selection by name; compile time dominates its cost.
    code, err = _cli(capsys, *TINY, "model.num_layers=1", f"output_dir={out}", "steps=8", f"optimizer.name={name}",
                     f"optimizer.learning_rate={lrs.get(name, 1e-2)}", "optimizer.hyperparams={rank: 8}"
                     if name in ("galore", "osd") else "optimizer.hyperparams={}")
    assert code == 0, (name, err)
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(losses) == 8 and np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05, (name, losses)
