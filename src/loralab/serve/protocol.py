"""The OpenAI API's request and response shapes, for `loralab serve`.

Parses `/v1/completions` and `/v1/chat/completions` bodies into a `GenerationRequest` (prompt
token ids, sampling settings) and builds the response, streaming-chunk and error objects the
official `openai` client reads. Errors are `APIError`s in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with the HTTP status to send.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from loralab.serve.sampling import SamplingParams

ROLES = ("system", "user", "assistant", "tool", "developer")
# OpenAI fields we accept only at their default value (anything else is refused by name)
NEUTRAL = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": None, "echo": False,
           "suffix": None, "logit_bias": None, "tools": None, "tool_choice": None, "response_format": None}
# fields we read, plus bookkeeping ones that do not change the output
KNOWN = {"model", "prompt", "messages", "stream", "stream_options", "user", "max_tokens", "max_completion_tokens",
         "temperature", "top_p", "seed", "stop", "top_k", "ignore_eos", "metadata", "store", "parallel_tool_calls"}


class APIError(Exception):
    """An error answered as `{"error": {...}}` with HTTP `status`."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 409: "conflict_error",
             422: "unprocessable_entity_error", 429: "rate_limit_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    model: str  # as the client named it (echoed back)
    adapter: str | None  # None: the base model
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    chat: bool


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _field(body: dict[str, Any], name: str, types: type | tuple, default: Any = ..., what: str = "") -> Any:
    if name not in body or body[name] is None:
        if default is ...:
            raise APIError(400, f"missing required field '{name}'", param=name, code="missing_field")
        return default
    value, wanted = body[name], types if isinstance(types, tuple) else (types,)
    if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
        raise APIError(400, f"field '{name}' must be {what or types}, got {json.dumps(value)[:80]}", param=name)
    return value


def _check_fields(body: dict[str, Any]) -> None:
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] is not None and body[name] != neutral:
            raise APIError(400, f"'{name}'={json.dumps(body[name])[:40]} is not supported by this server "
                                f"(only {json.dumps(neutral)})", param=name)
    unknown = sorted(set(body) - KNOWN - set(NEUTRAL))
    if unknown:
        raise APIError(400, f"unknown field(s): {', '.join(unknown)}", param=unknown[0])


def sampling_params(body: dict[str, Any], prompt_len: int, max_len: int) -> SamplingParams:
    """SamplingParams from OpenAI fields; max_tokens defaults to what the context leaves (at most 256)."""
    room = max_len - prompt_len
    if room <= 0:
        raise APIError(400, f"the prompt has {prompt_len} tokens but the context holds {max_len}; shorten it",
                       param="prompt", code="context_length_exceeded")
    max_tokens = _field(body, "max_completion_tokens", int, None, "an integer")
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", int, min(room, 256), "an integer")
    if max_tokens < 1 or max_tokens > room:
        raise APIError(400, f"max_tokens={max_tokens} is outside 1..{room}: the prompt has {prompt_len} tokens and "
                            f"the context holds {max_len}", param="max_tokens", code="context_length_exceeded")
    stop = _field(body, "stop", (str, list), [], "a string or a list of strings")
    try:
        return SamplingParams(max_tokens=max_tokens,
                              temperature=float(_field(body, "temperature", (int, float), 1.0, "a number")),
                              top_p=float(_field(body, "top_p", (int, float), 1.0, "a number")),
                              top_k=_field(body, "top_k", int, 0, "an integer"),
                              seed=_field(body, "seed", int, None, "an integer"),
                              stop=stop, ignore_eos=_field(body, "ignore_eos", bool, False, "a boolean"))
    except ValueError as err:
        raise APIError(400, str(err)) from None


def completion_prompt(body: dict[str, Any], tokenizer) -> list[int]:
    """The prompt of /v1/completions: a string, a list of token ids, or a one-element list of either."""
    prompt = _field(body, "prompt", (str, list), what="a string or a list of token ids")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise APIError(400, "field 'prompt' must be one string or one list of token ids (several prompts per request "
                        "are not supported: send one request each)", param="prompt")


def chat_prompt(body: dict[str, Any], tokenizer) -> list[int]:
    """The chat template applied to `messages`, ending with the assistant's turn."""
    messages = _field(body, "messages", list, what="a list of {role, content} objects")
    if not messages:
        raise APIError(400, "field 'messages' is empty", param="messages")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] must be an object with a role in {', '.join(ROLES)}", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param="messages")
        plain.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions", param="messages")
    text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def parse_generation(body: dict[str, Any], chat: bool, tokenizer, max_len: int, resolve_model) -> GenerationRequest:
    """Check the body and turn it into a GenerationRequest; `resolve_model(name)` gives the adapter (or None)."""
    _check_fields(body)
    model = _field(body, "model", str, what="a string")
    adapter = resolve_model(model)
    prompt_ids = chat_prompt(body, tokenizer) if chat else completion_prompt(body, tokenizer)
    params = sampling_params(body, len(prompt_ids), max_len)
    return GenerationRequest(model, adapter, prompt_ids, params, bool(_field(body, "stream", bool, False, "a boolean")),
                             chat)


# ---- responses -------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def _envelope(request_id: str, req: GenerationRequest, chunk: bool) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if req.chat else "text_completion"
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": req.model}


def response(request_id: str, req: GenerationRequest, text: str, finish_reason: str, completion_tokens: int
             ) -> dict[str, Any]:
    choice = {"index": 0, "finish_reason": finish_reason}
    if req.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice |= {"text": text, "logprobs": None}
    usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": completion_tokens,
             "total_tokens": len(req.prompt_ids) + completion_tokens}
    return _envelope(request_id, req, False) | {"choices": [choice], "usage": usage}


def chunk(request_id: str, req: GenerationRequest, text: str, finish_reason: str | None = None,
          first: bool = False) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
    if req.chat:
        choice["delta"] = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
    else:
        choice |= {"text": text, "logprobs": None}
    return _envelope(request_id, req, True) | {"choices": [choice]}


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
