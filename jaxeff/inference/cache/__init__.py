"""KV-cache policies: what a decoder keeps of its past, each one file of one interface (`base`).

- `Dense()`: one slot per position, exact (the default of `Generator`).
- `Paged(block_size=16, num_blocks=N)` (Kwon et al. 2023): a pool of blocks reached through
  block tables, exact; under the serving engine, blocks allocated as sequences grow and prompt
  prefixes shared (`jaxeff.inference.blocks`).
- `StreamingLLM(sinks=4, window=W)` (Xiao et al. 2024): the first `sinks` tokens plus the last
  `window`, positions cache-relative, so text may run on past the trained context in flat memory.
- `H2O(heavy=HH, recent=R)` (Zhang et al. 2023): per layer and kv head, the HH tokens with the
  most accumulated attention plus the R newest.
- `SnapKV(budget=C, window=32, pool=7)` (Li et al. 2024): at prefill, per layer and kv head, what
  the prompt's last `window` tokens attend to; decoding appends.
- `KIVI(bits=2|4, group=32, residual=128)` (Liu et al. 2024): every token, keys quantized per
  channel and values per token, the newest in full precision.

`parse(text)` reads the command lines' `--kv-cache` form (`dense`, `paged`, `paged:BLOCK`,
`streaming:S,W`, `h2o:H,R`, `snapkv:C`, `kivi:B,R`).
"""

from jaxeff.errors import GenerationError
from jaxeff.inference.cache.base import Cache, CachePolicy
from jaxeff.inference.cache.dense import Dense, TreeSlots
from jaxeff.inference.cache.h2o import H2O
from jaxeff.inference.cache.kivi import KIVI
from jaxeff.inference.cache.paged import PackedLayout, Paged, RaggedLayout
from jaxeff.inference.cache.snapkv import SnapKV
from jaxeff.inference.cache.streaming import StreamingLLM

FORMS = (
  "dense, paged, paged:BLOCK_SIZE, streaming:SINKS,WINDOW (e.g. streaming:4,1020), h2o:HEAVY,RECENT, "
  "snapkv:BUDGET or kivi:BITS,RESIDUAL"
)
_MAKERS = {
  ("paged", 1): lambda bs: Paged(block_size=bs),
  ("streaming", 2): lambda a, b: StreamingLLM(sinks=a, window=b),
  ("h2o", 2): lambda a, b: H2O(heavy=a, recent=b),
  ("snapkv", 1): lambda c: SnapKV(budget=c),
  ("kivi", 2): lambda bits, r: KIVI(bits=bits, residual=r),
}


def parse(text: str) -> CachePolicy:
  """A `--kv-cache` value -> its policy. Raises GenerationError naming the accepted forms."""
  kind, _, value = text.partition(":")
  if kind == "dense" and not value:
    return Dense()
  if kind == "paged" and not value:
    return Paged()
  parts = value.split(",")
  numbers = [int(x) for x in parts] if all(x.strip().isdigit() for x in parts) else []
  make = _MAKERS.get((kind, len(numbers)))
  if make is None:
    raise GenerationError(f"--kv-cache takes {FORMS}, got {text!r}")
  try:
    return make(*numbers)
  except GenerationError as e:
    raise GenerationError(f"--kv-cache {text}: {e}") from None


__all__ = [
  "Cache",
  "CachePolicy",
  "Dense",
  "H2O",
  "KIVI",
  "Paged",
  "PackedLayout",
  "RaggedLayout",
  "SnapKV",
  "StreamingLLM",
  "TreeSlots",
  "parse",
]
