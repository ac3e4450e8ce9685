"""What the GPU bench runs at each size: `FULL` (the plan), `QUICK` (`--quick`), `DRY` (`--dry-run`)."""

from __future__ import annotations

import dataclasses

L2_BYTES = 60 << 20  # H100/H200 L2 is 50-60 MB: rotating inputs together exceed 4x this
OPTIMIZERS = ("adamw", "c_adamw", "lion", "muon", "galore", "osd")


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What each section runs; `FULL` is the plan, `QUICK` a subset of it, `DRY` toy sizes."""

  copy_bytes: int = 2 << 30
  matmul_n: int = 8192
  # correctness
  quant_kn: tuple = (1024, 768)
  quant_ms: tuple = (1, 512)
  quant_groups: tuple = (32, 128)
  quant_ragged: tuple = (576, 1000, (16, 17))  # K, N, Ms
  attn_shape: tuple = (1, 8, 2, 1024)  # batch, heads, kv heads, seq
  attn_dims: tuple = (64, 128)
  attn_ragged: tuple = (77, 250)  # queries at the end of a longer key sequence
  model: dict = dataclasses.field(
    default_factory=lambda: dict(
      vocab_size=4096,
      hidden_size=512,
      intermediate_size=1408,
      num_layers=4,
      num_heads=8,
      num_kv_heads=2,
      max_seq_len=1024,
    )
  )
  model_tokens: tuple = (2, 512)
  # quant perf
  quant_shapes: tuple = ((4096, 4096), (4096, 14336), (14336, 4096), (11008, 4096))
  quant_perf_ms: tuple = (1, 16, 128)
  prefill_m: int | None = 2048  # extra M for the first shape (the prefill tiles)
  # attention perf
  attn_lengths: tuple = (8192, 32768)
  attn_heads: tuple = (32, 8, 128)  # heads, kv heads, head dim
  attn_skip: float = 0.9
  attn_checks: bool = True
  attn_check_len: int = 4096
  decode_contexts: tuple = (4096, 32768)
  # paged attention: the decode model's heads (query, kv), head dims, tokens per page, decode
  # batches of (sequences, cached tokens each); the mixed step adds a prompt chunk to the last batch
  paged_heads: tuple = (32, 8)
  paged_dims: tuple = (64, 128)
  paged_page: int = 16
  paged_batches: tuple = ((8, 4096), (32, 1024))
  paged_chunk: int | None = 512
  # decode
  decode_model: dict = dataclasses.field(
    default_factory=lambda: dict(
      vocab_size=128256,
      hidden_size=2048,
      intermediate_size=8192,
      num_layers=16,
      num_heads=32,
      num_kv_heads=8,
      head_dim=64,
      tie_embeddings=True,
      rope_theta=500000.0,
      max_seq_len=131072,
      rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
      },
    )
  )
  decode_batches: tuple = (1, 16, 64)
  decode_formats: tuple = ("bf16", "int8", "int4")
  decode_prompt: int = 128
  decode_new: int = 128
  # long context: one decode step of the decode model over a cache holding this many tokens
  long_contexts: tuple = (32768,)
  long_batches: tuple = (1, 8)
  # serve: the decode model under continuous batching, this many concurrent requests
  serve_clients: int = 64
  # train
  train_config: str = "125m"
  train_model: dict = dataclasses.field(default_factory=dict)  # overrides of the config's model
  train_batch: tuple = (64, 1024)  # batch, seq
  train_steps: int = 5
  optimizers: tuple = OPTIMIZERS
  repeats: int = 7


FULL = Sizes()
QUICK = dataclasses.replace(
  FULL,
  quant_shapes=((4096, 4096),),
  quant_perf_ms=(1,),
  prefill_m=None,
  attn_lengths=(8192,),
  attn_checks=False,
  paged_dims=(64,),
  paged_batches=((32, 1024),),
  decode_batches=(1,),
  decode_formats=("bf16",),
  optimizers=(),
  repeats=5,
)
DRY = Sizes(
  copy_bytes=16 << 20,
  matmul_n=256,
  quant_kn=(512, 192),
  quant_ms=(1,),  # M > 1: the ragged shapes below
  quant_groups=(32,),  # the dry run proves the plan; tests/test_quant_matmul.py covers the kernel's grid
  quant_ragged=(96, 100, (16, 17)),
  attn_shape=(1, 4, 2, 192),
  attn_dims=(64,),
  attn_ragged=(9, 50),
  model=dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=256
  ),
  model_tokens=(2, 64),
  quant_shapes=((256, 256),),  # with the prefill M: every code path of the section
  quant_perf_ms=(1, 16),
  prefill_m=64,
  attn_lengths=(256,),
  attn_heads=(4, 2, 32),
  attn_check_len=256,
  decode_contexts=(256,),
  # partial last pages, a prompt chunk of two items (block_q 32 at GQA 2) and a ragged last one
  paged_heads=(4, 2),
  paged_dims=(32,),
  paged_batches=((2, 40), (3, 24)),
  paged_chunk=36,
  decode_model=dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    tie_embeddings=True,
    max_seq_len=256,
  ),
  decode_batches=(1, 2),
  decode_prompt=8,
  decode_new=8,
  long_contexts=(160,),
  long_batches=(2,),
  serve_clients=4,
  train_config="125m",
  train_model=dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128
  ),
  train_batch=(2, 64),
  train_steps=1,
  # The section's two code paths (the baseline; a low-rank optimizer's rank setting): every
  # optimizer trains through the same engine in tests/test_train.py.
  optimizers=("adamw", "osd"),
  repeats=1,
)
