"""`rlhf init-model DIR`: a tiny random-weight causal LM and its tokenizer, built locally.

For tests, demos and users without hub access. The model is a Qwen2 with head_dim 64 by default (vLLM's
CPU attention kernels need it). The tokenizer is byte-level with no merges: every byte is one
token, so digits are single tokens and any text round-trips. It is saved as a plain
`PreTrainedTokenizerFast`: transformers 5 rebuilds a `Qwen2Tokenizer`'s pre-tokenizer on load,
which would change the ids.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# A ChatML template, so chat-format prompts (`[{"role": ..., "content": ...}]`) work.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(vocab_size: int, hidden_size: int = 128, layers: int = 2, seed: int = 0, eos_token_id: int = 0, pad_token_id: int = 0,
                heads: int | None = None):
    """`heads`: attention heads, default hidden_size // 64 (head_dim 64, the only one vLLM's CPU build serves);
    more heads of a smaller head_dim give the same parameters and compute more ways to attend."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads = max(1, hidden_size // 64) if heads is None else heads
    if heads < 1 or hidden_size % heads:
        raise ValueError(f"heads {heads} must be a positive divisor of hidden_size {hidden_size}")
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden_size // heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def init_model(out_dir: str | Path, hidden_size: int = 128, layers: int = 2, seed: int = 0, heads: int | None = None) -> Path:
    """Write a tiny Qwen2 and its tokenizer to out_dir; return the directory."""
    out = Path(out_dir)
    tok = build_tokenizer()
    model = build_model(len(tok), hidden_size, layers, seed, tok.eos_token_id, tok.pad_token_id, heads)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
