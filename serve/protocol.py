"""OpenAI-compatible request parsing and validation, response bodies, and incremental detokenization.

Every rejection is an `APIError` whose message names the field (OpenAI's `param`) and says what to send instead.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from dataclasses import dataclass, field

from codegen_jax.sampling import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    model_id: str
    max_seq_len: int
    vocab_size: int
    stop_token_ids: tuple[int, ...]


@dataclass
class Job:
    """A validated request: what to generate and how to answer."""

    kind: str  # "completion" | "chat" | "apply"
    prompt_ids: list[int]
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


_ROLES = ("system", "developer", "user", "assistant", "tool")
_UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
                "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
                "frequency_penalty": (None, 0, 0.0)}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _check_model(body: dict, limits: Limits, *, required: bool = True) -> None:
    model = body.get("model")
    if model is None:
        if required:
            raise APIError(400, f"model is required (this server serves {limits.model_id!r})", "model")
        return
    if not isinstance(model, str):
        raise APIError(400, "model must be a string", "model")
    if model != limits.model_id:
        raise APIError(404, f"model {model!r} does not exist; this server serves {limits.model_id!r}", "model",
                       "model_not_found")


def _sampling(body: dict, limits: Limits, prompt_len: int, *, default_max: int | None, prompt_field: str,
              temperature: float = 1.0) -> SamplingParams:
    for name, allowed in _UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise APIError(400, f"{name} is not supported by this server; leave it out", name)
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise APIError(400, f"n must be 1 (one choice per request), got {n!r}", "n")
    room = limits.max_seq_len - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context length is "
                       f"{limits.max_seq_len}: shorten it", prompt_field, "context_length_exceeded")
    field_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(field_name)
    if max_tokens is None:
        max_tokens = min(default_max, room) if default_max is not None else room
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise APIError(400, f"{field_name} must be an integer >= 1, got {max_tokens!r}", field_name)
    elif prompt_len + max_tokens > limits.max_seq_len:
        raise APIError(400, f"the prompt has {prompt_len} tokens and {field_name} is {max_tokens}: together "
                       f"{prompt_len + max_tokens}, more than this model's context length {limits.max_seq_len}; "
                       f"lower {field_name} to at most {room} or shorten the prompt", field_name,
                       "context_length_exceeded")
    t = body.get("temperature", temperature)
    t = temperature if t is None else t
    if not _is_num(t) or not 0 <= t <= 2:
        raise APIError(400, f"temperature must be a number in [0, 2], got {t!r}", "temperature")
    top_p = body.get("top_p", 1.0)
    top_p = 1.0 if top_p is None else top_p
    if not _is_num(top_p) or not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
    top_k = body.get("top_k", 0)
    top_k = 0 if top_k is None or top_k == -1 else top_k
    if not _is_int(top_k) or top_k < 0:
        raise APIError(400, f"top_k must be an integer >= 0 (0: off), got {top_k!r}", "top_k")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**32)
    elif not _is_int(seed):
        raise APIError(400, f"seed must be an integer, got {seed!r}", "seed")
    return SamplingParams(temperature=float(t), top_p=float(top_p), top_k=top_k, seed=seed % 2**32,
                          max_new_tokens=max_tokens, stop_token_ids=limits.stop_token_ids)


def _stream_fields(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise APIError(400, "stream_options must be an object", "stream_options")
        include_usage = opts.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise APIError(400, "stream_options.include_usage must be true or false", "stream_options.include_usage")
    return stream, include_usage


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop must be a non-empty string or a list of at most 4 of them", "stop")
    return stop


def _check_ids(ids: list[int], limits: Limits, name: str) -> None:
    if not ids:
        raise APIError(400, f"{name} must not be empty", name)
    bad = [t for t in ids if not _is_int(t) or not 0 <= t < limits.vocab_size]
    if bad:
        raise APIError(400, f"{name} holds token ids outside [0, {limits.vocab_size}): {bad[:3]}", name)


def parse_completion(body, tokenizer, limits: Limits) -> Job:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _check_model(body, limits)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt) if prompt else []
    elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
        ids = list(prompt)
    elif prompt is None:
        raise APIError(400, "prompt is required", "prompt")
    else:
        raise APIError(400, "prompt must be a string, a list of token ids, or a list holding one of those "
                       "(batches are not supported: send one request per prompt)", "prompt")
    _check_ids(ids, limits, "prompt")
    stream, include_usage = _stream_fields(body)
    sampling = _sampling(body, limits, len(ids), default_max=16, prompt_field="prompt")
    return Job("completion", ids, sampling, stream, include_usage, _stop(body))


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = m.get("role")
        if role not in _ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(_ROLES)}; got {role!r}",
                           f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content[{j}] must be a text part ({{type: text, text}}); "
                                   "this model reads text only", f"messages[{i}].content[{j}]")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                           f"messages[{i}].content")
        msg = {**m, "role": "system" if role == "developer" else role, "content": content}
        out.append(msg)
    return out


def _encode_chat(tokenizer, messages: list[dict], tools) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             **({"tools": tools} if tools else {}))
    except ValueError as e:
        raise APIError(400, f"messages cannot be rendered: {e}", "messages") from None
    except Exception as e:  # jinja errors from the checkpoint's own template (raise_exception etc.)
        raise APIError(400, f"the model's chat template rejected these messages: {e}", "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def parse_chat(body, tokenizer, limits: Limits) -> Job:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _check_model(body, limits)
    messages = _messages(body)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise APIError(400, "tools must be a list of tool definitions", "tools")
    ids = _encode_chat(tokenizer, messages, tools)
    _check_ids(ids, limits, "messages")
    stream, include_usage = _stream_fields(body)
    sampling = _sampling(body, limits, len(ids), default_max=None, prompt_field="messages")
    return Job("chat", ids, sampling, stream, include_usage, _stop(body))


APPLY_SYSTEM = ("You merge code edits. Apply the update to the original code and output the complete updated file "
                "and nothing else. Lines like `// ... existing code ...` in the update stand for unchanged code.")
_TAG = {t: re.compile(rf"<{t}>(.*?)</{t}>", re.S) for t in ("instruction", "code", "update")}


def parse_apply_tags(content: str) -> dict[str, str]:
    """Morph's apply format: <instruction>...</instruction> (optional), <code>...</code>, <update>...</update>."""
    out = {}
    for tag, pattern in _TAG.items():
        m = pattern.search(content)
        if m is None and tag != "instruction":
            raise APIError(400, f"messages[-1].content has no <{tag}>...</{tag}> block; send <instruction>, "
                           "<code> and <update> tags", "messages")
        out[tag] = m.group(1).strip("\n") if m else ""
    return out


def parse_apply(body, tokenizer, limits: Limits) -> tuple[Job, dict[str, str]]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if body.get("model") is not None and not isinstance(body["model"], str):  # any name: clients send their own
        raise APIError(400, "model must be a string", "model")
    messages = _messages(body)
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user message holding <code> and <update>", "messages")
    parts = parse_apply_tags(messages[-1]["content"])
    user = (f"Instruction: {parts['instruction'] or 'apply the update'}\n\nOriginal code:\n```\n{parts['code']}\n"
            f"```\n\nUpdate:\n```\n{parts['update']}\n```\n\nOutput the complete merged file.")
    ids = _encode_chat(tokenizer, [{"role": "system", "content": APPLY_SYSTEM}, {"role": "user", "content": user}],
                       None)
    _check_ids(ids, limits, "messages")
    stream, include_usage = _stream_fields(body)
    # the merged file is about as long as the original plus the update
    budget = 2 * len(tokenizer.encode(parts["code"] + parts["update"], add_special_tokens=False)) + 64
    sampling = _sampling(body, limits, len(ids), default_max=budget, prompt_field="messages", temperature=0.0)
    return Job("apply", ids, sampling, stream, include_usage, _stop(body)), parts


def strip_fences(text: str) -> str:
    """The merged file without a surrounding ``` fence, if the model added one."""
    m = re.fullmatch(r"\s*```[^\n]*\n(.*?)\n?```\s*", text, re.S)
    return m.group(1) if m else text


class TextStream:
    """Token ids in, text deltas out: holds back an unfinished UTF-8 character and any tail that could start
    a stop string; `stopped` once a stop string appears (the text ends before it)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already returned
        self.text = ""
        self.stopped = False

    def push(self, ids: list[int], final: bool = False) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        self.text = self.tokenizer.decode(self.ids)
        end = len(self.text)
        for s in self.stop:
            i = self.text.find(s, max(0, self.sent - len(s) + 1))
            if i >= 0 and i < end:
                end, self.stopped = i, True
        if not self.stopped and not final:
            if self.text.endswith("\ufffd"):
                end -= 1
            for s in self.stop:  # a tail that may still become a stop string
                for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if self.text[:end].endswith(s[:k]):
                        end -= k
                        break
        end = max(end, self.sent)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
