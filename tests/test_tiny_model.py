from transformers import AutoConfig, AutoTokenizer

from orchestrator.entrypoints.tiny_model import build_tokenizer


def test_ids_survive_save_load_round_trip(tiny_model):
    # transformers 5 may rebuild a loaded tokenizer's pre-tokenizer; the ids must not change.
    fresh, loaded = build_tokenizer(), AutoTokenizer.from_pretrained(tiny_model)
    text = "What is 12+7?  Answer:\n 19<|im_end|> ünïcode\t end"
    assert loaded(text)["input_ids"] == fresh(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.eos_token_id == fresh.eos_token_id and loaded.pad_token_id == fresh.pad_token_id


def test_head_dim_64_for_vllm(tiny_model):
    cfg = AutoConfig.from_pretrained(tiny_model)
    assert cfg.head_dim == 64 and cfg.hidden_size // cfg.num_attention_heads == 64
