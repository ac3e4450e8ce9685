"""Test setup: 8 fake CPU devices so sharding and multi-device tests run anywhere."""

import os

# Must happen before jax is imported anywhere in the test session.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture
def shakespeare_path():
  """The shared tiny-shakespeare text when present (never copied into the repo)."""
  if not SHAKESPEARE.exists():
    pytest.skip("../shared/data/tinyshakespeare.txt not present")
  return SHAKESPEARE
