"""Reading compiled HLO text: the collectives a program runs and the bytes they move.

  text = jax.jit(f).lower(*args).compile().as_text()
  for c in collectives(text):
    print(c.kind, c.result_bytes, c.operand_bytes, c.group_size)

Compiled HLO prints result types only, so an operand's size is derived: all-gather operand =
result / group size, reduce-scatter operand = result * group size, otherwise operand = result
(tuple results are summed). An async collective is reported once, by its `-start` op (kind plus
"-start"). Replica groups are read in every form the supported jax versions print (0.11 names the
mesh axes). Used by Distributed Lion's communication test and the quantization benchmark.
"""

from __future__ import annotations

import dataclasses
import math
import re

_DTYPE_BITS = {
  "pred": 8,
  "s4": 4,
  "u4": 4,
  "s8": 8,
  "u8": 8,
  "s16": 16,
  "u16": 16,
  "bf16": 16,
  "f16": 16,
  "s32": 32,
  "u32": 32,
  "f32": 32,
  "s64": 64,
  "u64": 64,
  "f64": 64,
}
KINDS = ("all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-permute")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(" + "|".join(KINDS) + r")(-start)?\(")


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str  # e.g. "all-reduce", or "all-gather-start" for an async one
  result_bytes: int  # per device
  operand_bytes: int  # per device
  group_size: int  # devices in each replica group (1 when not printed)
  line: str


def shape_bytes(text: str) -> int:
  """Bytes of every array type in `text` (`f32[4,8]`, tuples of them)."""
  text = re.sub(r"/\*.*?\*/", "", text)
  total = 0
  for dt, dims in re.findall(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]", text):
    if dt in _DTYPE_BITS:
      total += _DTYPE_BITS[dt] * math.prod(int(x) for x in dims.split(",") if x) // 8
  return total


def _group_size(line: str) -> int | None:
  """Devices per replica group, in each form XLA prints: explicit `{{0,1},{2,3}}`, iota
  `[groups,size]<=[n]`, or by mesh axes `mesh['data'=4,'fsdp'=2] {'data'}` (jax 0.11 prints this
  everywhere, 0.10 for some ops, with an optional `, device_ids=(...)` before the braces)."""
  m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[\d+,(\d+)\]", line)
  if m:
    return int(m.group(1))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)  # maybe ", device_ids=(...)" first
  if m:
    sizes = {name: int(n) for name, n in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
    return math.prod(sizes[name] for name in re.findall(r"'([^']+)'", m.group(2)))
  return None


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective op of a compiled HLO module, in program order."""
  out = []
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    kind, result = m.group(2), shape_bytes(m.group(1))
    group = _group_size(line) or 1
    operand = result // group if kind == "all-gather" else result * group if kind == "reduce-scatter" else result
    out.append(Collective(kind + (m.group(3) or ""), result, operand, group, line.strip()))
  return out


def wire_bytes(kind: str, operand_bytes: int, n: int) -> float:
  """Bytes one device receives for a collective under the usual ring/direct algorithms."""
  kind = kind.removesuffix("-start")
  if kind == "all-reduce":
    return 2 * (n - 1) / n * operand_bytes
  if kind == "all-gather":
    return (n - 1) * operand_bytes
  if kind in ("all-to-all", "reduce-scatter"):
    return (n - 1) / n * operand_bytes
  return operand_bytes
