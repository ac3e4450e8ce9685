"""Shared by the engine's exactness tests: requests alone, then all at once, must get the same tokens."""

from __future__ import annotations

import threading
import time

import numpy as np

# Lengths around the caches' budgets (a 28-token window, 16-entry H2O and SnapKV budgets), with
# repeats for prompt lookup; a seeded sampled request among greedy ones.
LENGTHS = [3, 40, 17, 33, 9]
MAX_TOKENS = [14, 9, 20, 12, 16]
SETTINGS = [{}, dict(temperature=0.9, seed=5), {}, {}, dict(temperature=0.8, top_p=0.9, seed=2)]


def prompts(seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  out = []
  for n in LENGTHS:
    motif = rng.integers(0, 256, 6).tolist()
    out.append((motif * (n // 6 + 1))[: n - n // 3] + rng.integers(0, 256, n // 3).tolist())
  return out


def alone(engine, prompt_list) -> list[list[int]]:
  """Each request on its own: submitted after the previous one ended."""
  return [
    engine.submit(p, max_tokens=n, stop_tokens=(), **s).result(timeout=120)
    for p, n, s in zip(prompt_list, MAX_TOKENS, SETTINGS)
  ]


def together(engine, prompt_list) -> list[list[int]]:
  """All requests at once from threads, arrivals spread over the first steps."""
  results = [None] * len(prompt_list)

  def client(i):
    time.sleep(0.01 * (i % 3))
    request = engine.submit(prompt_list[i], max_tokens=MAX_TOKENS[i], stop_tokens=(), **SETTINGS[i])
    results[i] = request.result(timeout=120)

  threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompt_list))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return results
