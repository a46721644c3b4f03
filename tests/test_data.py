import json

import pytest

from orchestrator.core.data import DataError, PromptSampler, load_prompts
from orchestrator.core.rows import check_upload
from workers.common import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(str(tiny_model))


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_jsonl_with_extra_columns(tmp_path, tok):
    p = write(tmp_path, [json.dumps({"prompt": "1+1=", "answer": 2}), "", json.dumps({"prompt": "2+2=", "answer": 4})])
    ds = load_prompts(p, tok)
    assert len(ds) == 2
    assert ds.extras[1]["answer"] == 4 and ds.extras[1]["prompt_text"] == "2+2="
    assert tok.decode(ds.prompt_ids[0]) == "1+1="


def test_malformed_line_is_named(tmp_path, tok):
    p = write(tmp_path, [json.dumps({"prompt": "a"}), json.dumps({"prompt": "b"}), '{"prompt": "c",'])
    with pytest.raises(DataError, match=r"d.jsonl:3: malformed JSON"):
        load_prompts(p, tok)


def test_missing_prompt_column_is_named(tmp_path, tok):
    p = write(tmp_path, [json.dumps({"prompt": "a"}), json.dumps({"question": "b"})])
    with pytest.raises(DataError, match=r"d.jsonl:2: missing column 'prompt'"):
        load_prompts(p, tok)


@pytest.mark.parametrize("bad, problem", [
    ('{"prompt": "b", "n": ' + "9" * 5000 + "}", "Exceeds the limit"),  # past Python's int digit limit
    ('{"prompt": "b", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
])
def test_rows_the_json_parser_cannot_take_are_named(tmp_path, tok, bad, problem):
    p = write(tmp_path, [json.dumps({"prompt": "a"}), bad])
    with pytest.raises(DataError, match=rf"d.jsonl:2: unreadable JSON: .*{problem}"):
        load_prompts(p, tok)
    with pytest.raises(DataError, match=rf"^upload.jsonl:2: unreadable JSON: .*{problem}"):
        check_upload(p, "train", "upload.jsonl")


def test_missing_file(tmp_path, tok):
    with pytest.raises(DataError, match="data file not found"):
        load_prompts(tmp_path / "nope.jsonl", tok)


def test_chat_messages_use_template(tmp_path, tok):
    p = write(tmp_path, [json.dumps({"prompt": [{"role": "user", "content": "hi"}]})])
    ds = load_prompts(p, tok)
    assert ds.extras[0]["prompt_text"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_overlong_policies(tmp_path, tok):
    p = write(tmp_path, [json.dumps({"prompt": "x" * 20}), json.dumps({"prompt": "short"})])
    assert [len(x) for x in load_prompts(p, tok, max_len=8, overlong="truncate_left").prompt_ids] == [8, 5]
    dropped = load_prompts(p, tok, max_len=8, overlong="drop")
    assert len(dropped) == 1 and dropped.dropped == 1
    with pytest.raises(DataError, match=r"d.jsonl:1: prompt has 20 tokens"):
        load_prompts(p, tok, max_len=8, overlong="error")


def test_parquet_and_saved_dataset(tmp_path, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"prompt": ["1+2=", "3+4="], "answer": [3, 7]}
    pq.write_table(pa.table(rows), tmp_path / "d.parquet")
    assert load_prompts(tmp_path / "d.parquet", tok).extras[1]["answer"] == 7
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(tmp_path / "ds", tok).extras[0]["answer"] == 3


def test_sampler_is_a_function_of_seed_and_step():
    a, b = PromptSampler(10, 3, seed=1), PromptSampler(10, 3, seed=1)
    assert [a.indices(s) for s in range(6)] == [b.indices(s) for s in range(6)]
    epoch0 = sum((a.indices(s) for s in range(3)), [])
    assert len(set(epoch0)) == 9  # no repeats within an epoch
    assert a.indices(3) != a.indices(0)  # a new shuffle each epoch
    with pytest.raises(DataError, match="prompts_per_step"):
        PromptSampler(2, 3, seed=0)
