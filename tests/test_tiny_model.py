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


def test_heads_splits_the_same_hidden_size_into_smaller_heads(tmp_path):
    """`rlhf init-model --heads 4`: 4 heads of 32 in a hidden size of 128, the same parameter count as 2 heads of 64."""
    import pytest

    from orchestrator.entrypoints.cli import main
    from orchestrator.entrypoints.tiny_model import init_model

    assert main(["init-model", str(tmp_path / "four"), "--hidden-size", "128", "--heads", "4"]) == 0
    cfg = AutoConfig.from_pretrained(tmp_path / "four")
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 4, 32)
    from transformers import AutoModelForCausalLM

    count = lambda path: sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())  # noqa: E731
    assert count(tmp_path / "four") == count(init_model(tmp_path / "two"))
    for bad in (3, 0):
        with pytest.raises(ValueError, match=f"heads {bad} must be a positive divisor of hidden_size 128"):
            init_model(tmp_path / "bad", heads=bad)
        with pytest.raises(SystemExit, match=f"--heads {bad} must be a positive divisor of --hidden-size 128"):
            main(["init-model", str(tmp_path / "bad"), "--heads", str(bad)])
    assert not (tmp_path / "bad").exists()
