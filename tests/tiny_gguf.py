"""A tiny Llama written as a GGUF file with the ``gguf`` package, the way llama.cpp's converter writes one.

What transformers needs to load it back (checked by tests/test_gguf.py):

- metadata ``general.architecture = llama`` and the ``llama.*`` hyper-parameters (context length,
  embedding length, block count, feed-forward length, head counts, RMS epsilon, rope dimension
  and base, vocab size);
- tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q``, ..., ``output_norm``,
  ``output``), float32 here; ``attn_q``/``attn_k`` rows permuted the way llama.cpp permutes them
  for its rotary embedding (transformers undoes it); no ``output`` tensor means tied embeddings;
- a tokenizer: ``tokenizer.ggml.model = gpt2`` (byte-level BPE) with the token list (the 256
  byte symbols first), token types (1 normal, 3 control), merges, BOS/EOS/padding ids and
  optionally ``tokenizer.chat_template``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tokens() -> tuple[list[str], list[int]]:
    """The token list (bytes, merged tokens, specials) and their GGUF token types."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    toks = [spelling[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES] + SPECIAL
    return toks, [1] * (len(toks) - len(SPECIAL)) + [3] * len(SPECIAL)


def tiny_llama(tie: bool = False, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    vocab = len(tokens()[0])
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 3,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def _permute(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """llama.cpp's rotary permutation of the Q/K rows (transformers reverses it on load)."""
    heads = n_kv if n_kv != n_head else n_head
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """``model`` (a Llama built by :func:`tiny_llama`) and the tiny tokenizer as one GGUF file."""
    import gguf

    cfg = model.config
    toks, types = tokens()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(toks)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.pad_token_id)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    for key, tensor in state.items():
        base, suffix = key.rsplit(".", 1)
        name = names.get_name(base)
        array = tensor.detach().numpy()
        if ".attn_q" in name:
            array = _permute(array, cfg.num_attention_heads, cfg.num_attention_heads)
        elif ".attn_k" in name:
            array = _permute(array, cfg.num_attention_heads, cfg.num_key_value_heads)
        writer.add_tensor(f"{name}.{suffix}", np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
