"""The rollout side's OpenAI-compatible chat endpoint, driven by the real `openai` client: what it
records is what the policy saw and generated, token for token, with log-probs that recompute."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.core.environments import CalculatorEnv
from workers.chat_endpoint import ChatEndpoint, calls_to_batch
from workers.common import response_logprobs

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def endpoint(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ep = ChatEndpoint(model, tok, max_new_tokens=12)
    yield ep
    ep.close()


def test_an_openai_client_agent_is_recorded_token_for_token(endpoint):
    client = openai.OpenAI(base_url=endpoint.base_url, api_key="unused")
    torch.manual_seed(0)
    messages = [{"role": "system", "content": "Use the calculator."}, {"role": "user", "content": "12*34"}]
    first = client.chat.completions.create(model="policy", messages=messages, tools=CalculatorEnv.tools, max_tokens=12, logprobs=True)
    assert first.choices[0].finish_reason in ("stop", "length", "tool_calls") and first.usage.completion_tokens <= 12
    # The agent's own loop: an assistant tool call and its result go back in the history, as OpenAI clients send them.
    history = [*messages,
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                                   "function": {"name": "calculator", "arguments": json.dumps({"expression": "12*34"})}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "408"}]
    client.chat.completions.create(model="policy", messages=history, max_tokens=12, temperature=0)
    calls = endpoint.take_calls()
    assert len(calls) == 2 and endpoint.take_calls() == []
    tok, model = endpoint.tok, endpoint.model
    rendered = tok.apply_chat_template(messages, tools=CalculatorEnv.tools, add_generation_prompt=True, tokenize=False)
    assert calls[0].prompt_ids == tok.encode(rendered, add_special_tokens=False)
    assert [round(x.logprob, 5) for x in first.choices[0].logprobs.content] == [round(x, 5) for x in calls[0].logprobs]
    assert tok.decode(calls[0].completion_ids).removesuffix("<|im_end|>") == calls[0].text
    second = tok.decode(calls[1].prompt_ids)
    assert '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*34"}}\n</tool_call>' in second and "408" in second
    # The calls as a batch: the log-probs the policy recomputes are the recorded ones.
    batch = calls_to_batch(calls, [1.0, 1.0], tok.pad_token_id)
    recomputed, _ = response_logprobs(model, batch)
    mask = batch.response_mask.bool()
    assert torch.allclose(recomputed[mask], batch.logprobs[mask], atol=1e-5)
    assert batch.scores.tolist() == [1.0, 1.0]
