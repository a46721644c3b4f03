"""An OpenAI-compatible chat endpoint over the policy, on the rollout side (issue 30): an agent written
against an OpenAI client (`openai.OpenAI(base_url=endpoint.base_url)`) talks to the policy being
trained, unchanged, and every call is recorded with the token ids it was given and generated and the
sampling log-probs of the generated ones, so its calls can be trained on (`calls_to_batch`).

Per job and not public: it listens on 127.0.0.1 of the process that holds the policy (the trainer
that samples, or a rollout actor), on a port the OS picks, with no key. One generation at a time.

Served: `POST /v1/chat/completions` with `messages` (system, user, assistant with `content` or
`tool_calls`, tool), `tools`, `max_tokens` / `max_completion_tokens`, `logprobs`, `stream`; one
choice. The prompt is the chat template's rendering of the messages with `tools` and the generation
prompt; assistant tool calls in the history are rendered in the Hermes format the model writes them
in. A `stream: true` call is generated whole, then sent as server-sent events (one content chunk, the
finish, usage when `stream_options.include_usage`), which is what streaming agents read.

Calls that carry an `X-Session-ID` header (verifiers sends the rollout's trace id) are recorded
with it, and a call whose rendered prompt extends the session's previous prompt and completion reuses
their ids as they were (only the text after them is tokenized), so an episode's calls stitch into
one token sequence without re-tokenizing anything the model generated.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from orchestrator.core.batch import Batch, build_batch, right_pad
from orchestrator.core.environments import format_tool_call, parse_tool_calls
from workers.turn_sampler import HFTurnSampler


@dataclass
class ChatCall:
    """One call as the policy saw it: `prompt_ids` (the rendered messages), `completion_ids` (what it
    generated, the stop token included) and their sampling `logprobs`."""

    messages: list[dict[str, Any]]
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    session: str | None = None  # the caller's X-Session-ID (one episode's calls share it)
    prompt_text: str = ""  # the rendered prompt, which a later call of the session may extend


def _template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as a Hermes-style chat template takes them: an assistant's `tool_calls` become
    `<tool_call>` blocks in its content; content given as parts becomes its text."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        content = content or ""
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = [format_tool_call(c["function"]["name"], json.loads(c["function"].get("arguments") or "{}")) for c in m["tool_calls"]]
            content = "\n".join([content, *calls]) if content else "\n".join(calls)
        out.append({**{k: v for k, v in m.items() if k not in ("content", "tool_calls", "tool_call_id")}, "content": content})
    return out


class ChatEndpoint:
    """The endpoint over `model` (shared with whoever trains it: generation runs under `torch.no_grad`
    with the model in eval mode for the call). `calls` holds every call since the last `take_calls`."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 64, temperature: float = 1.0, port: int = 0):
        import uvicorn

        self.model, self.tok, self.max_new_tokens, self.temperature = model, tokenizer, max_new_tokens, temperature
        self.calls: list[ChatCall] = []
        self._last: dict[str, ChatCall] = {}  # each session's latest call, until `take_calls`
        self._lock = threading.Lock()
        app = FastAPI(title="rollout chat endpoint")
        app.post("/v1/chat/completions")(self._complete)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self.server.run, name="chat-endpoint", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the chat endpoint did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def take_calls(self) -> list[ChatCall]:
        """The calls recorded so far, and forget them."""
        with self._lock:
            calls, self.calls, self._last = self.calls, [], {}
        return calls

    def close(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)

    def _prompt_ids(self, session: str | None, text: str) -> list[int]:
        """The prompt's ids: the session's previous prompt and completion as they were, then the new
        text after them tokenized alone; the whole text tokenized when it does not extend them."""
        prev = self._last.get(session) if session else None
        if prev is not None:
            done = prev.prompt_text + self.tok.decode(prev.completion_ids, skip_special_tokens=False)
            if text.startswith(done):
                return prev.prompt_ids + prev.completion_ids + self.tok.encode(text[len(done):], add_special_tokens=False)
        return self.tok.encode(text, add_special_tokens=False)

    def _complete(self, body: dict[str, Any], request: Request):
        # A plain `def` route: FastAPI runs it on its thread pool, so a generation never blocks the event loop.
        messages, tools = body.get("messages") or [], body.get("tools") or None
        limit = int(body.get("max_completion_tokens") or body.get("max_tokens") or self.max_new_tokens)
        temperature = float(body.get("temperature") if body.get("temperature") is not None else self.temperature)
        session = request.headers.get("x-session-id")
        text_in = self.tok.apply_chat_template(_template_messages(messages), tools=tools, add_generation_prompt=True, tokenize=False)
        with self._lock:
            prompt_ids = self._prompt_ids(session, text_in)
            was_training = self.model.training
            self.model.eval()
            try:
                sampler = HFTurnSampler(self.model, self.tok, temperature if temperature > 0 else 1.0, greedy=temperature == 0)
                [(ids, logprobs)] = sampler([prompt_ids], [limit])
            finally:
                self.model.train(was_training)
            stopped = bool(ids) and ids[-1] in sampler.stop_ids
            text = self.tok.decode(ids[:-1] if stopped else ids, skip_special_tokens=False)
            call = ChatCall(messages, prompt_ids, ids, logprobs, text, session, text_in)
            self.calls.append(call)
            if session:
                self._last[session] = call
        calls, _ = parse_tool_calls(text)
        tool_calls = [{"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                       "function": {"name": c.name, "arguments": json.dumps(c.arguments)}} for c in calls]
        content = text.split("<tool_call>")[0].strip() if tool_calls else text
        message: dict[str, Any] = {"role": "assistant", "content": content or None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        choice: dict[str, Any] = {"index": 0, "message": message,
                                  "finish_reason": "tool_calls" if tool_calls else "stop" if stopped else "length"}
        if body.get("logprobs"):
            choice["logprobs"] = {"content": [{"token": self.tok.decode([i]), "logprob": lp, "bytes": None, "top_logprobs": []}
                                              for i, lp in zip(ids, logprobs)]}
        out = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
               "model": body.get("model", "policy"), "choices": [choice],
               "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(ids), "total_tokens": len(prompt_ids) + len(ids)}}
        if body.get("stream"):
            return StreamingResponse(_sse(out, bool((body.get("stream_options") or {}).get("include_usage"))),
                                     media_type="text/event-stream")
        return out


def _sse(completion: dict[str, Any], include_usage: bool):
    """A whole completion as the chunks of an OpenAI stream: the message as one delta (tool calls
    indexed), then the finish reason, then usage if asked for, then `[DONE]`."""
    choice = completion["choices"][0]
    head = {k: completion[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    delta = {"role": "assistant", "content": choice["message"]["content"] or ""}
    if choice["message"].get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(choice["message"]["tool_calls"])]
    chunks = [{**head, "choices": [{"index": 0, "delta": delta, "logprobs": choice.get("logprobs"), "finish_reason": None}]},
              {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]}]
    if include_usage:
        chunks.append({**head, "choices": [], "usage": completion["usage"]})
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


def calls_to_batch(calls: list[ChatCall], rewards: list[float], pad_id: int) -> Batch:
    """Recorded calls as the one batch contract, one row per call (its prompt, its completion, loss on
    every generated token, the sampling log-probs), each scored with its episode's reward."""
    responses, valid = right_pad([c.completion_ids for c in calls], pad_id)
    logprobs, _ = right_pad([c.logprobs for c in calls], 0, dtype=torch.float)
    batch = build_batch([c.prompt_ids for c in calls], responses, valid, pad_id, logprobs=logprobs)
    return batch.replace(scores=torch.tensor(rewards, dtype=torch.float))
