"""Multi-process training: 2 processes x 4 CPU devices (jax.distributed, gloo collectives) match 1 x 8,
with the default (blocked) attention at a length where it splits the sequence into blocks."""

import json
import socket
import subprocess
import sys

import helpers
import pytest
from test_train import BLOCKING, BLOCKING_SEQ_LEN, TINY

pytestmark = pytest.mark.slow


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(out_dir):
  lines = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
  return [l["loss"] for l in lines if "loss" in l]


def test_two_processes_match_one(tmp_path):
  args = [*TINY, *BLOCKING, "steps=4", "mesh={data: -1}"]
  cmd = [sys.executable, "-m", "jaxeff.train", *args]
  single = subprocess.run(
    cmd + [f"output_dir={tmp_path / 'single'}"], env=helpers.cpu_env(8), capture_output=True, text=True, timeout=300
  )
  assert single.returncode == 0, single.stderr[-2000:]

  port = _free_port()
  procs = [
    subprocess.Popen(
      cmd
      + [
        f"output_dir={tmp_path / 'multi'}",
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
        "--process-id",
        str(i),
      ],
      env=helpers.cpu_env(4),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]

  one, two = _losses(tmp_path / "single"), _losses(tmp_path / "multi")
  assert len(one) == len(two) == 4
  for a, b in zip(one, two):
    assert abs(a - b) <= 1e-5 * abs(a), (one, two)
  assert (tmp_path / "multi" / "checkpoints" / "4").exists()
  config = (tmp_path / "multi" / "config.yaml").read_text()
  assert "attention: blocked" in config and f"seq_len: {BLOCKING_SEQ_LEN}" in config
