"""Every accelerator path, proved and measured in one command: `python -m jaxeff.bench gpu`.

  python -m jaxeff.bench gpu --out DIR             # the whole plan; nothing new starts after --budget (450 s)
  python -m jaxeff.bench gpu --quick --out DIR     # sections 1, 2 and one row of 3-5; --budget 150 s
  python -m jaxeff.bench gpu --dry-run --out DIR   # the whole plan at toy sizes on CPU, kernels interpreted
  python -m jaxeff.bench gpu --sections ceilings,paged_attention,serve --out DIR   # issue 40's part

No GPU run has been timed yet (BENCHMARKS.md): the budget bounds when a section or row may start,
not when the run ends (the one under way finishes, compiles included). Give the command a device
lease with room beyond the budget.

Sections, in order, one module each (a section that raises is recorded and the next one runs):
1. `ceilings`     device copy bandwidth and a large bf16 `jnp.dot`.
2. `correctness`  every Pallas GPU kernel against an independent reference, NaN-poisoned memory;
                  the quantized and the sparse model against their references.
3. `quant`        quantized matmul at LLM weight shapes and M = 1-2048 vs bf16 `jnp.dot`.
4. `attention`    block-sparse attention at 8k and 32k, 90% skipped, vs dense (cuDNN or XLA).
   `paged_attention` the ragged paged-attention kernel over 32k cached tokens in 16-token pages
                  (decode 8 x 4k, 32 x 1k; a mixed step) vs the dense decode attention it replaces.
5. `decode`       a Llama-3.2-1B-shaped model through `Generator`, bf16/int8/int4, batch 1-64.
   `serve`        the same model behind `jaxeff.serve.Engine`, 64 concurrent requests, paged
                  (the default) and dense cache side by side; on a GPU the paged steps must run
                  the Pallas kernel.
   `speculative`  the same model: a forward over 1-16 tokens vs one; prompt lookup vs plain.
   `long_context` the same model, one decode step over 32k cached tokens per cache policy.
6. `train`        configs/125m.yaml's model, the engine's train step per optimizer.
What each runs at each size: `plan.py`; what they share: `harness.py` and `jaxeff/bench/common.py`.

Timing: warm-up (compile) first, then the median of repeats, each repeat blocking once on
device results. Small kernels run several to a program over rotating inputs (distinct weights
whose bytes together exceed the GPU's L2), so neither the L2 nor Python's dispatch shows in the
time. Results go to `--out/gpu_bench.json` after every section (a run killed by its time limit
keeps what it finished); a compact table is printed last. `--budget SECONDS` (default 450 full,
150 quick) skips what would start after it, and the table says so.

Exit status: 0 when every correctness check passed and no section failed, 1 otherwise.
"""

from jaxeff.bench.gpu.runner import SECTIONS, main

__all__ = ["SECTIONS", "main"]
