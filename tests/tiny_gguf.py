"""Tiny GGUF files written the way llama.cpp's converter writes them, from tiny transformers models."""

import gguf
import numpy as np
import torch
import transformers

import jaxeff.gguf

CHAT_TEMPLATE = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY = dict(
  vocab_size=300,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=128,
  rms_norm_eps=1e-5,
  rope_theta=10000.0,
)


# ---------------------------------------------------------------- writing tiny GGUFs (as llama.cpp does)


def _permute_rotary_rows(w, heads):
  """llama.cpp's converter order for q/k rows (the inverse of what the loader undoes)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _sentencepiece_vocab():
  """A small SentencePiece-style vocabulary: specials, 256 byte tokens, pieces with falling scores."""
  pieces = [
    "▁",
    *"abcdefghijklmnopqrstuvwxyzHW",
    "▁t",
    "he",
    "▁the",
    "in",
    "▁a",
    "er",
    "▁c",
    "at",
    "▁cat",
    "▁h",
    "▁hat",
    "▁in",
    "ll",
    "llo",
    "▁He",
    "▁Hello",
    "▁W",
    "or",
    "ld",
    "▁World",
    "on",
    "▁on",
    "▁s",
    "it",
    "▁sit",
    "▁sat",
  ]
  tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
  types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
  scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
  return tokens, types, scores


def _byte_level_vocab(n):
  alphabet = jaxeff.gguf._byte_alphabet()
  letters = [alphabet[b] for b in range(256)]
  tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + letters
  merges = []
  for a, b in [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("Ġ", "c"),
    ("a", "t"),
    ("Ġc", "at"),
    ("1", "2"),
  ]:
    merges.append(f"{a} {b}")
    tokens.append(a + b)
  tokens += [f"<extra_{i}>" for i in range(n - len(tokens))]
  types = [3, 3, 3] + [1] * (n - 3)
  return tokens[:n], types[:n], merges


def write_gguf(path, hf_model, arch, *, quant=gguf.GGMLQuantizationType.F32, tokenizer="gpt2", chat_template=None):
  cfg = hf_model.config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  if tokenizer == "gpt2":
    tokens, types, merges = _byte_level_vocab(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_merges(merges)
    w.add_add_bos_token(False)
  else:
    tokens, types, scores = _sentencepiece_vocab()
    tokens += [f"<pad_{i}>" for i in range(cfg.vocab_size - len(tokens))]
    types += [5] * (cfg.vocab_size - len(types))
    scores += [-1e4] * (cfg.vocab_size - len(scores))
    w.add_tokenizer_model("llama")
    w.add_token_scores(scores)
    w.add_unk_token_id(0)
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  if chat_template:
    w.add_chat_template(chat_template)
  names = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
  }
  layer = {v: k for k, v in jaxeff.gguf._LAYER_NAMES.items()}
  for name, t in hf_model.state_dict().items():
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    t = t.detach().numpy().astype(np.float32)
    if name.startswith("model.layers."):
      i, rest = name[len("model.layers.") :].split(".", 1)
      gname = f"blk.{i}.{layer[rest]}"
      if arch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
        heads = cfg.num_attention_heads if "q_proj" in rest else cfg.num_key_value_heads
        t = _permute_rotary_rows(t, heads)
    else:
      gname = names[name]
    kind = quant if isinstance(quant, gguf.GGMLQuantizationType) else quant(gname)  # one type, or per name
    if t.ndim == 2 and kind != gguf.GGMLQuantizationType.F32:
      w.add_tensor(gname, gguf.quants.quantize(t, kind), raw_dtype=kind)
    else:
      w.add_tensor(gname, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def hf_tiny(kind, seed=0, **extra):
  torch.manual_seed(seed)
  cls_cfg, cls = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
  }[kind]
  model = cls(cls_cfg(**TINY, **extra)).eval()
  with torch.no_grad():  # non-trivial norms and biases, so their mapping is exercised
    for name, p in model.named_parameters():
      if name.endswith(".bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model
