"""GGUF files (llama.cpp) of Llama-family models -> float checkpoints and tokenizers, and back.

`jaxeff.load("SmolLM2-135M-Instruct.Q4_1.gguf")` returns the model and its tokenizer (converted
once, cached by hash; `quant="gguf"` keeps the Q8_0/Q4_0/Q4_1 blocks as stored, `quantized_weights`);
`jaxeff.gguf.tokenizer(path)` its `tokenizers.Tokenizer`; `read_file(path)` its metadata and
tensors as stored.

A GGUF holds the weights (often quantized: Q4_1, Q8_0, K-quants, ...) and, as metadata, the model's
shape and its tokenizer (vocabulary, merges, token types, special ids, chat template), all under
llama.cpp's names. `read` turns it into what a Hugging Face checkpoint holds: a config.json dict and
HF-named float32 tensors, dequantized by the `gguf` package (the reference implementation of every
format; the header is parsed here in one pass, the tensors stay in the memory-mapped file). Two
things differ from HF's layout and are undone here:
- llama.cpp stores linear weights as [out, in] like PyTorch, but for the `llama` architecture it
  reorders the rows of q_proj and k_proj within each head (it interleaves the two rotary halves, for
  its own RoPE kernel); the reverse permutation restores HF's "rotate halves" order.
- names (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`).

`converted_checkpoint(path)` writes config.json, model.safetensors (float32), tokenizer.json and
tokenizer_config.json (special tokens, chat template) once into a cache folder named by the file's
SHA-256 (`$JAXEFF_CACHE_DIR/gguf/`, default `~/.cache/jaxeff/gguf/`), so `jaxeff.load` of a
`.gguf` reads a plain HF directory (`jaxeff.hf.load`) from the second time on. Written to a
temporary folder and renamed into place: an interrupted conversion leaves nothing half-written.

`write(path, hf_config, tensors, tokenizer_dir, file_type=...)` goes the other way: a Hugging
Face config and HF-named float tensors (`jaxeff.hf.hf_tensors`) plus a tokenizer directory to a
GGUF llama.cpp loads (its tensor names, q/k rows in its order, tokenizer and chat template
metadata), as f16, q8_0, q4_0 or q4_1.

Supported: general.architecture `llama` (Llama 1-3, and Mistral, which llama.cpp writes as llama)
and `qwen2`; byte-level BPE tokenizers (`gpt2`: SmolLM, Llama 3, Qwen2, ...) and SentencePiece BPE
(`llama`: Llama 2, Mistral). Not supported (a clear `GGUFError`): other architectures, Llama-3.1
style `rope_freqs` scaling, and YaRN rope scaling.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np

from jaxeff.errors import GGUFError

CONVERSION_VERSION = 1  # part of the cache key: bump when the conversion's output changes

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_LAYER_NAMES = {
  "attn_norm.weight": "input_layernorm.weight",
  "ffn_norm.weight": "post_attention_layernorm.weight",
  "attn_q.weight": "self_attn.q_proj.weight",
  "attn_k.weight": "self_attn.k_proj.weight",
  "attn_v.weight": "self_attn.v_proj.weight",
  "attn_q.bias": "self_attn.q_proj.bias",
  "attn_k.bias": "self_attn.k_proj.bias",
  "attn_v.bias": "self_attn.v_proj.bias",
  "attn_output.weight": "self_attn.o_proj.weight",
  "ffn_gate.weight": "mlp.gate_proj.weight",
  "ffn_up.weight": "mlp.up_proj.weight",
  "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}

# llama.cpp's token types (tokenizer.ggml.token_type).
_CONTROL, _USER_DEFINED, _BYTE = 3, 4, 6


# ---------------------------------------------------------------------------- reading


def _gguf():
  try:
    import gguf
  except ImportError:
    raise GGUFError("reading .gguf files needs the gguf package: pip install gguf") from None
  return gguf


# Element types whose tensors are plain arrays; every other ggml type is blocks of bytes.
_PLAIN_TYPES = {
  "F16": np.float16,
  "F32": np.float32,
  "F64": np.float64,
  "I8": np.int8,
  "I16": np.int16,
  "I32": np.int32,
  "I64": np.int64,
}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
  """One tensor of a GGUF file, its data a read-only view of the mapped file: typed for plain
  types (shape = the dims reversed), raw bytes [..., bytes per row] for block types (what
  `gguf.quants.dequantize` takes)."""

  name: str
  tensor_type: Any  # gguf.GGMLQuantizationType
  shape: tuple[int, ...]  # ggml's order: innermost dimension first
  data: np.ndarray


@dataclasses.dataclass(frozen=True)
class GGUFFile:
  metadata: dict  # every key/value as Python values (str, int, float, bool, lists)
  tensors: list[GGUFTensor]


class _Cursor:
  """Reads the header's little-endian values in order from a memoryview of the file. `dtypes`: the
  spec's scalar value types as NumPy dtypes (the gguf package's table); the other two types are a
  string (u64 length + UTF-8 bytes) and an array (u32 element type, u64 count, the elements)."""

  def __init__(self, buf: memoryview, gguf):
    self.buf, self.offset = buf, 0
    self.dtypes = {int(k): np.dtype(v).newbyteorder("<") for k, v in gguf.GGUFReader.gguf_scalar_to_np.items()}
    self.string_type, self.array_type = int(gguf.GGUFValueType.STRING), int(gguf.GGUFValueType.ARRAY)

  def scalar(self, dtype: np.dtype):
    value = np.frombuffer(self.buf, dtype, 1, self.offset)[0].item()
    self.offset += dtype.itemsize
    return value

  def u32(self) -> int:
    return self.scalar(np.dtype("<u4"))

  def u64(self) -> int:
    return self.scalar(np.dtype("<u8"))

  def string(self) -> str:
    n = self.u64()
    text = str(self.buf[self.offset : self.offset + n], "utf-8")
    self.offset += n
    return text

  def value(self, kind: int):
    if kind == self.string_type:
      return self.string()
    if kind == self.array_type:
      item, count = self.u32(), self.u64()
      if item in self.dtypes:  # numbers in one read (a vocabulary's scores and types)
        dtype = self.dtypes[item]
        values = np.frombuffer(self.buf, dtype, count, self.offset).tolist()
        self.offset += dtype.itemsize * count
        return values
      return [self.value(item) for _ in range(count)]
    if kind not in self.dtypes:
      raise ValueError(f"unknown metadata value type {kind} at byte {self.offset}")
    return self.scalar(self.dtypes[kind])


def read_file(path: str | os.PathLike) -> GGUFFile:
  """The file's metadata and tensors (GGUF v2/v3, little-endian), the tensors' data left in the
  memory-mapped file. `gguf.GGUFReader` builds a NumPy view per header value (2-3 s for SmolLM2's
  49k-token vocabulary, each time a GGUF's tokenizer or blocks were read); this parses the header in
  one pass (0.2 s). `tests/test_gguf.py` checks it against that reader."""
  gguf = _gguf()
  path = pathlib.Path(path)
  if not path.is_file():
    raise GGUFError(f"GGUF file not found: {path}")
  try:
    mapped = np.memmap(path, mode="r")
  except ValueError as e:  # an empty file cannot be mapped
    raise GGUFError(f"{path} is not a readable GGUF file: {e}") from None
  try:
    return _parse(mapped, gguf)
  except GGUFError as e:
    raise GGUFError(f"{path} is not a readable GGUF file: {e}") from None
  except (ValueError, KeyError, IndexError, UnicodeDecodeError, OverflowError) as e:  # truncated or damaged
    raise GGUFError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from None


def _parse(mapped: np.memmap, gguf) -> GGUFFile:
  cur = _Cursor(memoryview(mapped), gguf)
  if bytes(cur.buf[:4]) != b"GGUF":
    raise GGUFError("GGUF magic invalid")
  cur.offset = 4
  version = cur.u32()
  if version not in (2, 3):
    swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
    raise GGUFError(
      "big-endian GGUF files are not supported" if swapped in (2, 3) else f"unsupported GGUF version {version}"
    )
  tensor_count, kv_count = cur.u64(), cur.u64()
  meta = {}
  for _ in range(kv_count):
    key = cur.string()
    meta[key] = cur.value(cur.u32())
  infos = []
  for _ in range(tensor_count):
    name = cur.string()
    dims = tuple(cur.u64() for _ in range(cur.u32()))
    infos.append((name, dims, gguf.GGMLQuantizationType(cur.u32()), cur.u64()))
  alignment = meta.get("general.alignment", 32)
  if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
    raise GGUFError(f"general.alignment {alignment!r} is not a power of two")
  start = -(-cur.offset // alignment) * alignment
  tensors, names = [], set()
  for name, dims, kind, offset in infos:
    if name in names:
      raise GGUFError(f"tensor {name!r} appears twice")
    names.add(name)
    block, type_bytes = gguf.GGML_QUANT_SIZES[kind]
    elements = int(np.prod(dims, dtype=np.int64))
    shape = tuple(reversed(dims))
    if kind.name in _PLAIN_TYPES:
      dtype = np.dtype(_PLAIN_TYPES[kind.name]).newbyteorder("<")
    else:
      dtype, shape = np.dtype(np.uint8), (*shape[:-1], shape[-1] // block * type_bytes)
    nbytes = elements * type_bytes // block
    begin = start + offset
    if begin + nbytes > mapped.size:
      raise GGUFError(f"tensor {name!r} ends at byte {begin + nbytes}, past the end of the file ({mapped.size})")
    data = np.frombuffer(mapped, dtype, nbytes // dtype.itemsize, begin).reshape(shape)
    tensors.append(GGUFTensor(name, kind, dims, data))
  return GGUFFile(meta, tensors)


def hf_config(meta: dict, tensor_names) -> dict:
  """The Hugging Face config.json dict that the GGUF metadata describes."""
  arch = meta.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise GGUFError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
  tensor_names = set(tensor_names)
  if "rope_freqs.weight" in tensor_names:
    raise GGUFError("GGUF stores rope_freqs (Llama-3.1 style rope scaling), which is not supported")

  def key(name, default=None, required=True):
    full = f"{arch}.{name}"
    if full not in meta and required and default is None:
      raise GGUFError(f"GGUF metadata lacks {full!r}")
    return meta.get(full, default)

  heads = key("attention.head_count")
  hidden = key("embedding_length")
  vocab = key("vocab_size", required=False)
  if vocab is None:
    vocab = len(meta.get("tokenizer.ggml.tokens") or ())
  if not vocab:
    raise GGUFError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
  scaling = None
  kind = key("rope.scaling.type", required=False)
  if kind not in (None, "none"):
    if kind != "linear":
      raise GGUFError(f"unsupported GGUF rope scaling {kind!r} (supported: none, linear)")
    scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
  cfg = {
    "architectures": [ARCHITECTURES[arch]],
    "model_type": arch,
    "vocab_size": int(vocab),
    "hidden_size": hidden,
    "intermediate_size": key("feed_forward_length"),
    "num_hidden_layers": key("block_count"),
    "num_attention_heads": heads,
    "num_key_value_heads": key("attention.head_count_kv", heads),
    "head_dim": key("attention.key_length", hidden // heads),
    "max_position_embeddings": key("context_length", 2048),
    "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
    "rope_theta": float(key("rope.freq_base", 10000.0)),
    "rope_scaling": scaling,
    # llama.cpp writes the output projection only when it is not the embedding matrix.
    "tie_word_embeddings": "output.weight" not in tensor_names,
    "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
    "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    "torch_dtype": "float32",
  }
  if arch == "qwen2":
    cfg.update(use_sliding_window=False, sliding_window=None)
  return cfg


def _hf_name(name: str) -> str:
  if name in _TOP_NAMES:
    return _TOP_NAMES[name]
  parts = name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
  raise GGUFError(f"GGUF tensor {name!r} has no Hugging Face counterpart for this architecture")


def unpermute_rotary_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row order: per head, rows (i, half) interleaved -> (half, i) blocks.

  llama.cpp's converter maps HF row (half h, index i) of each head to row 2 i + h; this maps it back.
  """
  head_dim = w.shape[0] // num_heads
  return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rotary_heads(cfg: dict, name: str) -> int | None:
  """The head count whose rows llama.cpp reordered in tensor `name` (llama q/k), else None."""
  if cfg["model_type"] != "llama" or not name.endswith(("q_proj.weight", "k_proj.weight")):
    return None
  return cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"]


def read(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  """(HF config.json dict, HF-named float32 tensors) of a GGUF file."""
  return _read(read_file(path))


def _read(gguf_file: GGUFFile) -> tuple[dict, dict[str, np.ndarray]]:
  gguf = _gguf()

  cfg = hf_config(gguf_file.metadata, (t.name for t in gguf_file.tensors))
  tensors = {}
  for t in gguf_file.tensors:
    name = _hf_name(t.name)
    try:
      w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    except NotImplementedError as e:
      raise GGUFError(f"tensor {t.name!r}: the gguf package cannot dequantize {t.tensor_type.name}: {e}") from None
    w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # ggml lists dims innermost first
    heads = _rotary_heads(cfg, name)
    if heads:
      w = unpermute_rotary_rows(w, heads)
    tensors[name] = np.ascontiguousarray(w)
  return cfg, tensors


# ---------------------------------------------------------------------------- quantized as-is

# GGUF block types served without a float round trip: name -> (bits, zero point). Each is one f16
# scale (and for Q4_1 one f16 minimum) per 32 consecutive weights along a row's input dimension,
# exactly jaxeff's grouped format with group_size 32:
#   Q8_0  w = d * q,         q int8            -> bits 8, symmetric
#   Q4_0  w = d * (q - 8),   q in 0..15        -> bits 4, symmetric, stored q - 8 in -8..7
#   Q4_1  w = d * q + m,     q in 0..15        -> bits 4, zero point (minimum m), stored q - 8
# Within a block, byte j holds element j in its low nibble and j + 16 in its high one: the same
# pairing as jaxeff's int4 tiles of 2 x 16 rows; the nibbles are re-packed into the weight's own
# tile size (a relayout of the integers, no arithmetic).
AS_IS = {"Q8_0": (8, False), "Q4_0": (4, False), "Q4_1": (4, True)}
GGUF_BLOCK = 32


def _blocks_to_weight(data: np.ndarray, type_name: str, in_features: int, out_features: int, rotary_heads: int | None):
  """A GGUF tensor's raw blocks (uint8 [out, bytes per row]) -> `pallas_kernels.QuantizedWeight`
  [in, out] with the same integers, scales and minimums."""
  import jax.numpy as jnp

  from pallas_kernels.quant_matmul.weights import QuantizedWeight, pack_int4

  bits, zero_point = AS_IS[type_name]
  groups = in_features // GGUF_BLOCK
  blocks = np.asarray(data, np.uint8).reshape(out_features, groups, -1)
  scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [out, groups]
  minimum = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if zero_point else None
  payload = blocks[..., 4:] if zero_point else blocks[..., 2:]
  if bits == 8:
    q = payload.copy().view(np.int8)  # [out, groups, 32]
  else:
    q = np.concatenate([payload & 0x0F, payload >> 4], axis=-1).astype(np.int8) - 8  # [out, groups, 32]
  q = q.reshape(out_features, in_features)
  if rotary_heads:  # llama.cpp's q/k row order, undone on whole rows of blocks
    q, scale = unpermute_rotary_rows(q, rotary_heads), unpermute_rotary_rows(scale, rotary_heads)
    if minimum is not None:
      minimum = unpermute_rotary_rows(minimum, rotary_heads)
  qvalue = jnp.asarray(np.ascontiguousarray(q.T))
  if bits == 4:
    qvalue = pack_int4(qvalue)
  return QuantizedWeight(
    qvalue,
    jnp.asarray(np.ascontiguousarray(scale.T)),
    bits=bits,
    group_size=GGUF_BLOCK,
    in_features=in_features,
    minimum=None if minimum is None else jnp.asarray(np.ascontiguousarray(minimum.T)),
  )


def quantized_weights(path: str | os.PathLike) -> tuple[dict, dict, dict[str, list[str]]]:
  """The GGUF's Q8_0 / Q4_0 / Q4_1 matrices as they are stored.

  Returns:
    (HF config dict, {HF tensor name: QuantizedWeight [in, out]} for every 2-D tensor of an
    `AS_IS` type, {type name: [HF names]} for 2-D tensors of other quantized types, which a loader
    dequantizes to float instead).
  """
  gguf_file = read_file(path)
  cfg = hf_config(gguf_file.metadata, (t.name for t in gguf_file.tensors))
  weights, others = {}, {}
  for t in gguf_file.tensors:
    name, kind = _hf_name(t.name), t.tensor_type.name
    if len(t.shape) != 2 or kind in ("F32", "F16", "BF16", "F64"):
      continue
    if kind not in AS_IS:
      others.setdefault(kind, []).append(name)
      continue
    in_features, out_features = (int(d) for d in t.shape)  # ggml lists dims innermost first
    weights[name] = _blocks_to_weight(t.data, kind, in_features, out_features, _rotary_heads(cfg, name))
  return cfg, weights, others


# ---------------------------------------------------------------------------- tokenizer


def _byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character map, in which byte-level BPE vocabularies are spelled."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (llama.cpp's names; the patterns are each
# model family's published regex). Byte-level vocabularies not listed here use GPT-2's pattern.
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
  "llama-bpe": _LLAMA3_SPLIT,
  "llama3": _LLAMA3_SPLIT,
  "llama-v3": _LLAMA3_SPLIT,
  "smaug-bpe": _LLAMA3_SPLIT,
  "falcon3": _LLAMA3_SPLIT,
  "qwen2": _QWEN2_SPLIT,
  "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# GPT-2's pattern after splitting every digit on its own.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_GPT2_PATTERN = {None, "default", "gpt2", "gpt-2"}


def _byte_level_tokenizer(meta: dict):
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

  alphabet = _byte_alphabet()
  letters = set(alphabet.values())
  tokens = meta["tokenizer.ggml.tokens"]
  # Tokens are spelled in the byte alphabet; the odd one written in plain text gets re-spelled.
  vocab = {}
  for i, tok in enumerate(tokens):
    if not set(tok) <= letters:
      tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
    vocab.setdefault(tok, i)
  merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or ()]
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  pre = meta.get("tokenizer.ggml.pre")
  if pre in _SPLITS:
    tok.pre_tokenizer = pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
  elif pre in _DIGITS_THEN_GPT2:
    tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
  elif pre in _GPT2_PATTERN:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  else:
    raise GGUFError(
      f"unsupported byte-level pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: "
      f"{', '.join(sorted(str(p) for p in (set(_SPLITS) | _DIGITS_THEN_GPT2 | _GPT2_PATTERN) - {None}))}"
    )
  tok.decoder = decoders.ByteLevel()
  return tok, letters


def _sentencepiece_merges(tokens: list[str], scores, token_types) -> list[tuple[str, str]]:
  """BPE merges implied by a SentencePiece vocabulary: the higher a token's score, the earlier the
  merge that makes it (from any split into two vocabulary pieces)."""
  vocab = {t: i for i, t in enumerate(tokens)}
  skip = {i for i, ty in enumerate(token_types) if ty in (_CONTROL, _USER_DEFINED, _BYTE)} if token_types else set()
  merges = []
  for tok, i in vocab.items():
    if i in skip:
      continue
    for cut in range(1, len(tok)):
      left, right = tok[:cut], tok[cut:]
      if left in vocab and right in vocab and vocab[left] not in skip and vocab[right] not in skip:
        merges.append((-scores[i], vocab[left], vocab[right], left, right))
  merges.sort()
  return [(m[3], m[4]) for m in merges]


def _sentencepiece_tokenizer(meta: dict):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  tokens = meta["tokenizer.ggml.tokens"]
  types = meta.get("tokenizer.ggml.token_type")
  scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
  merges = (
    [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    if meta.get("tokenizer.ggml.merges")
    else _sentencepiece_merges(tokens, scores, types)
  )
  unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
  vocab = {}
  for i, t in enumerate(tokens):
    vocab.setdefault(t, i)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk_id], fuse_unk=True, byte_fallback=True))
  prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
  tok.pre_tokenizer = pre_tokenizers.Metaspace(
    replacement="▁", prepend_scheme="first" if prefix else "never", split=False
  )
  steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  if prefix:
    steps.append(decoders.Strip(content=" ", left=1, right=0))
  tok.decoder = decoders.Sequence(steps)
  return tok, None


def build_tokenizer(meta: dict):
  """A `tokenizers.Tokenizer` from GGUF metadata, plus its tokenizer_config dict (special tokens,
  whether to add BOS, chat template)."""
  from tokenizers import AddedToken, processors

  kind = meta.get("tokenizer.ggml.model")
  if "tokenizer.ggml.tokens" not in meta:
    raise GGUFError("GGUF has no tokenizer (tokenizer.ggml.tokens missing)")
  if kind == "gpt2":
    tok, letters = _byte_level_tokenizer(meta)
    add_bos_default = False
  elif kind == "llama":
    tok, letters = _sentencepiece_tokenizer(meta)
    add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
  else:
    raise GGUFError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
  tokens = meta["tokenizer.ggml.tokens"]
  types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  # Control tokens (<|im_start|>, <s>, ...) are matched whole and never split; a byte-level one
  # spelled outside the byte alphabet is a mislabel in some files (adding it would grow the vocab).
  specials = [
    AddedToken(t, special=True, normalized=False)
    for t, ty in zip(tokens, types)
    if ty == _CONTROL and (letters is None or set(t) <= letters)
  ]
  tok.add_special_tokens(specials)
  tok.add_tokens(
    [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
  )

  def token(key):
    i = meta.get(f"tokenizer.ggml.{key}")
    return tokens[i] if i is not None and 0 <= i < len(tokens) else None

  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
  bos = token("bos_token_id")
  if add_bos and bos is not None:
    tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])]
    )
  config = {
    "bos_token": bos,
    "eos_token": token("eos_token_id"),
    "unk_token": token("unknown_token_id"),
    "pad_token": token("padding_token_id"),
    "add_bos_token": add_bos,
    "chat_template": meta.get("tokenizer.chat_template"),
  }
  return tok, config


def tokenizer(path: str | os.PathLike):
  """The GGUF file's tokenizer as a `tokenizers.Tokenizer` (rebuilt from its metadata)."""
  return build_tokenizer(read_file(path).metadata)[0]


# ---------------------------------------------------------------------------- cached conversion


def file_sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      digest.update(chunk)
  return digest.hexdigest()


def cache_root() -> pathlib.Path:
  """Where converted GGUFs live: $JAXEFF_CACHE_DIR/gguf, default ~/.cache/jaxeff/gguf."""
  base = os.environ.get("JAXEFF_CACHE_DIR") or pathlib.Path.home() / ".cache" / "jaxeff"
  return pathlib.Path(base) / "gguf"


def convert(path: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
  """Writes a Hugging Face directory (config.json, model.safetensors in float32, tokenizer.json,
  tokenizer_config.json) for the GGUF file at `path` into the new directory `out_dir`."""
  from safetensors.numpy import save_file

  out_dir = pathlib.Path(out_dir)
  if out_dir.exists():
    raise GGUFError(f"{out_dir} already exists; convert writes a new directory")
  gguf_file = read_file(path)
  cfg, tensors = _read(gguf_file)
  tok, tok_config = build_tokenizer(gguf_file.metadata)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
  try:
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (tmp / "source.json").write_text(
      json.dumps({"gguf": str(pathlib.Path(path).resolve()), "conversion_version": CONVERSION_VERSION}, indent=2)
    )
    try:
      tmp.rename(out_dir)
    except OSError:
      if not (out_dir / "model.safetensors").exists():  # not a concurrent conversion finishing first
        raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return out_dir


def converted_checkpoint(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The cached HF directory for this GGUF (converting it the first time), keyed by the file's hash."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise GGUFError(f"GGUF file not found: {path}")
  root = pathlib.Path(cache_dir) if cache_dir is not None else cache_root()
  out = root / f"{file_sha256(path)[:24]}-v{CONVERSION_VERSION}"
  if (out / "model.safetensors").exists():
    return out
  return convert(path, out)


# ---------------------------------------------------------------------------- writing

FILE_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
_HF_TO_GGUF = {v: k for k, v in _TOP_NAMES.items()}
_HF_LAYER_TO_GGUF = {v: k for k, v in _LAYER_NAMES.items()}
_NORMAL, _UNUSED = 1, 5


def _gguf_name(name: str) -> str:
  if name in _HF_TO_GGUF:
    return _HF_TO_GGUF[name]
  parts = name.split(".", 3)
  if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _HF_LAYER_TO_GGUF:
    return f"blk.{parts[2]}.{_HF_LAYER_TO_GGUF[parts[3]]}"
  raise GGUFError(f"tensor {name!r} has no GGUF (llama.cpp) name")


def permute_rotary_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's q/k row order (the inverse of `unpermute_rotary_rows`)."""
  head_dim = w.shape[0] // num_heads
  return w.reshape(num_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pre_tokenizer_name(pre: dict | None) -> str:
  """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json pre-tokenizer (the inverse of
  `_byte_level_tokenizer`'s table)."""
  steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
  kinds = [p.get("type") for p in steps]
  if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
    return "smollm"
  if kinds == ["ByteLevel"]:
    return "gpt-2"  # llama.cpp's name for GPT-2's split pattern
  if kinds and kinds[0] == "Split":
    pattern = steps[0].get("pattern", {}).get("Regex")
    for name, split in (("llama-bpe", _LLAMA3_SPLIT), ("qwen2", _QWEN2_SPLIT)):
      if pattern == split:
        return name
  raise GGUFError(f"no llama.cpp pre-tokenizer name for this tokenizer.json pre_tokenizer ({kinds})")


def _tokenizer_metadata(writer, tokenizer_dir: pathlib.Path, vocab_size: int) -> None:
  """Byte-level BPE tokenizer (tokenizer.json, tokenizer_config.json) -> GGUF tokenizer metadata."""
  tok_json = json.loads((tokenizer_dir / "tokenizer.json").read_text())
  config_path = tokenizer_dir / "tokenizer_config.json"
  config = json.loads(config_path.read_text()) if config_path.exists() else {}
  model = tok_json.get("model", {})
  if model.get("type") != "BPE" or not any(
    p.get("type") == "ByteLevel"
    for p in [tok_json.get("decoder") or {}, *(tok_json.get("decoder") or {}).get("decoders", [])]
  ):
    raise GGUFError("GGUF export writes byte-level BPE tokenizers (gpt2 kind: SmolLM, Llama 3, Qwen2) only")
  tokens = [f"[PAD{i}]" for i in range(vocab_size)]
  types = [_UNUSED] * vocab_size
  for text, i in model["vocab"].items():
    if i < vocab_size:
      tokens[i], types[i] = text, _NORMAL
  for added in tok_json.get("added_tokens", []):
    if added["id"] < vocab_size:
      tokens[added["id"]] = added["content"]
      types[added["id"]] = _CONTROL if added.get("special") else _USER_DEFINED
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(_pre_tokenizer_name(tok_json.get("pre_tokenizer")))
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  ids = {t: i for i, t in enumerate(tokens)}

  def special(key):
    value = config.get(key)
    value = value.get("content") if isinstance(value, dict) else value
    return ids.get(value) if value is not None else None

  for key, add in (
    ("bos_token", writer.add_bos_token_id),
    ("eos_token", writer.add_eos_token_id),
    ("pad_token", writer.add_pad_token_id),
    ("unk_token", writer.add_unk_token_id),
  ):
    if special(key) is not None:
      add(special(key))
  writer.add_add_bos_token(bool(config.get("add_bos_token", False)))
  if config.get("chat_template"):
    writer.add_chat_template(config["chat_template"])


def write(
  path: str | os.PathLike,
  hf_cfg: dict,
  tensors: dict[str, np.ndarray],
  tokenizer_dir: str | os.PathLike,
  *,
  file_type: str = "f16",
  name: str | None = None,
) -> pathlib.Path:
  """Writes a GGUF file llama.cpp loads: the model `hf_cfg` describes (config.json's dict, llama or
  qwen2), its HF-named float tensors, and the byte-level BPE tokenizer in `tokenizer_dir`.

  Matrices are stored as `file_type` (f32, f16, or the block formats q8_0, q4_0, q4_1, quantized
  by the `gguf` package: 32 weights per block along each row); norms and biases stay f32. The file
  is written next to `path` and renamed into place; an existing `path` is never overwritten.
  """
  gguf = _gguf()
  path = pathlib.Path(path)
  if file_type not in FILE_TYPES:
    raise GGUFError(f"GGUF type must be one of {', '.join(FILE_TYPES)}, got {file_type!r}")
  if path.exists():
    raise GGUFError(f"{path} already exists; GGUF export never overwrites")
  arch = hf_cfg.get("model_type")
  if arch == "mistral":
    arch = "llama"  # llama.cpp reads Mistral as llama
  if arch not in ARCHITECTURES:
    raise GGUFError(f"GGUF export supports {', '.join(ARCHITECTURES)} models, not {hf_cfg.get('model_type')!r}")
  rope = hf_cfg.get("rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
  if kind not in ("default", "linear"):
    raise GGUFError(f"GGUF export supports no rope scaling or linear scaling, not {kind!r}")
  heads, kv_heads = hf_cfg["num_attention_heads"], hf_cfg["num_key_value_heads"]
  head_dim = hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // heads
  qtype = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
  }[file_type]
  ftype = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
  }[file_type]
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  writer = gguf.GGUFWriter(str(tmp), arch)
  try:
    writer.add_name(name or path.stem)
    writer.add_context_length(int(hf_cfg["max_position_embeddings"]))
    writer.add_embedding_length(int(hf_cfg["hidden_size"]))
    writer.add_block_count(int(hf_cfg["num_hidden_layers"]))
    writer.add_feed_forward_length(int(hf_cfg["intermediate_size"]))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(kv_heads))
    writer.add_key_length(int(head_dim))
    writer.add_value_length(int(head_dim))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_rope_freq_base(float(hf_cfg.get("rope_theta") or 10000.0))
    if kind == "linear":
      writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
      writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(hf_cfg["rms_norm_eps"]))
    writer.add_vocab_size(int(hf_cfg["vocab_size"]))
    writer.add_file_type(ftype)
    _tokenizer_metadata(writer, pathlib.Path(tokenizer_dir), int(hf_cfg["vocab_size"]))
    for hf_name, w in tensors.items():
      if hf_name == "lm_head.weight" and hf_cfg.get("tie_word_embeddings"):
        continue
      gguf_name = _gguf_name(hf_name)
      w = np.asarray(w, np.float32)
      if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        w = permute_rotary_rows(w, heads if "q_proj" in hf_name else kv_heads)
      if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(gguf_name, np.ascontiguousarray(w))
      elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(gguf_name, w.astype(np.float16))
      else:
        if w.shape[-1] % GGUF_BLOCK:
          raise GGUFError(f"{hf_name}: rows of {w.shape[-1]} do not split into {file_type} blocks of {GGUF_BLOCK}")
        writer.add_tensor(gguf_name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if path.exists():
      raise GGUFError(f"{path} appeared while writing; GGUF export never overwrites")
    tmp.rename(path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path
