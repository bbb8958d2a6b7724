"""The OpenAI wire formats of gpud's sim engine: request parsing and response bodies, pure (no I/O).

Kept apart from gpud.sim.server (the aiohttp shell) so that the formats can be tested without a server
and the server module stays about serving.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
import uuid
from dataclasses import dataclass
from typing import Any

from gpud.sim.prefix import prompt_tokens

MAX_MODEL_LEN = 131072  # like a served model's context: a bigger max_tokens is refused, as vLLM does
MAX_CHOICES = 64  # prompts × n per request; bounds the memory one request can make the sim use
MAX_EMBEDDING_DIMENSIONS = 8192
DEFAULT_MAX_TOKENS = 16
DEFAULT_EMBEDDING_DIMENSIONS = 16

# The generated text: plain ASCII words, so a token drops into a JSON string without escaping.
_WORDS = tuple(
    (" " + w).encode()
    for w in "The quick brown fox jumps over the lazy dog while a simulated engine streams tokens at a "
    "steady pace for tests demos and benchmarks of gpud".split()
)
_MARK = "@@TOKEN@@"  # stands for a token's text in a pre-rendered chunk, split off once per request


class RequestError(ValueError):
    """A request the server answers with 400; the message is shown to the client."""


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def error_body(message: str, kind: str, status: int) -> dict[str, Any]:
    """OpenAI's error shape, as vLLM writes it."""
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def escape_label(value: str) -> str:
    """Escape a Prometheus label value (backslash, double quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _int_field(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"'{key}' must be an integer from {low} to {high}, got {dumps(value)}.")
    return value


def _input_tokens(value: Any) -> list[int]:
    """Token counts of an embeddings input: a string, a list of strings, token ids or lists of ids."""
    if value is None:
        raise RequestError("'input' is required.")
    if isinstance(value, str):
        return [prompt_tokens(value)]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [prompt_tokens(v) for v in value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [len(value)]
        if all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
            return [len(v) for v in value]
    raise RequestError("'input' must be a string, a list of strings, or a list of token ids.")


def _token_text(ids: list[int]) -> str:
    # Four characters per id (its 32 bits as Latin-1), so that tokens = characters / 4 holds exactly
    # and a token-id prompt goes through the same prefix cache as text.
    return struct.pack(f"<{len(ids)}I", *(i & 0xFFFFFFFF for i in ids)).decode("latin-1")


def _prompt_texts(value: Any) -> list[str]:
    """The prompts of a /v1/completions body, as text: each string (or list of ids) its own prompt."""
    if value is None:
        return [""]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [_token_text(value)]
        if all(
            isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
            for v in value
        ):
            return [_token_text(v) for v in value]
    raise RequestError("'prompt' must be a string, a list of strings, or a list of token ids.")


def chat_prompt_text(messages: Any) -> str:
    """The prompt text of a chat: each message's role and text content in order (SPEC §13).

    `role: text` and a newline per message, content parts giving their text parts joined by newlines;
    a conversation's next turn therefore starts with exactly the text of the turn before.
    """
    if messages is None:
        return ""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise RequestError("'messages' must be a list of message objects.")
    parts: list[str] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text parts are prompt text here
            content = "\n".join(
                p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
            )
        parts.append(f"{role if isinstance(role, str) else ''}: {content if isinstance(content, str) else ''}\n")
    return "".join(parts)


@dataclass(frozen=True)
class Generation:
    """One parsed completion or chat request."""

    chat: bool
    id: str
    created: int
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int
    choices: int
    prompts: tuple[str, ...]  # the prompt text of each prompt (chat: one), for the prefix cache
    prompt_tokens: int

    def usage(self) -> dict[str, int]:
        completion = self.max_tokens * self.choices
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


def _model(body: dict[str, Any], default_model: str) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else default_model


def parse_generation(body: dict[str, Any], chat: bool, default_model: str, now: float) -> Generation:
    """Validate a /v1/completions or /v1/chat/completions body; raise RequestError."""
    if chat:
        texts = [chat_prompt_text(body.get("messages"))]
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    else:
        texts, key = _prompt_texts(body.get("prompt")), "max_tokens"
    prompts = len(texts)
    max_tokens = _int_field(body, key, DEFAULT_MAX_TOKENS, 1, MAX_MODEL_LEN)
    n = _int_field(body, "n", 1, 1, MAX_CHOICES)
    if n * prompts > MAX_CHOICES:
        raise RequestError(f"A request may ask for at most {MAX_CHOICES} choices (prompts × n).")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise RequestError("'stream' must be true or false.")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object.")
    prefix = "chatcmpl-" if chat else "cmpl-"
    return Generation(
        chat=chat,
        id=prefix + uuid.uuid4().hex,
        created=int(now),
        model=_model(body, default_model),
        stream=bool(stream),
        include_usage=bool(stream and options and options.get("include_usage")),
        max_tokens=max_tokens,
        choices=n * prompts,
        prompts=tuple(texts),
        prompt_tokens=sum(prompt_tokens(t) for t in texts),
    )


def _text(count: int) -> str:
    return b"".join(_WORDS[i % len(_WORDS)] for i in range(count)).decode()


def full_response(job: Generation) -> bytes:
    """The non-streamed response body."""
    text = _text(job.max_tokens)
    if job.chat:
        choices: list[dict[str, Any]] = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": "length",
            }
            for i in range(job.choices)
        ]
    else:
        choices = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": "length"}
            for i in range(job.choices)
        ]
    obj = "chat.completion" if job.chat else "text_completion"
    return dumps(
        {
            "id": job.id,
            "object": obj,
            "created": job.created,
            "model": job.model,
            "choices": choices,
            "usage": job.usage(),
        }
    ).encode()


class StreamFrames:
    """Pre-rendered SSE frames of one streamed request, so that a token costs two byte concatenations."""

    def __init__(self, job: Generation) -> None:
        self.job = job
        obj = "chat.completion.chunk" if job.chat else "text_completion"
        self._envelope = {"id": job.id, "object": obj, "created": job.created, "model": job.model}
        self._pre: list[bytes] = []
        self._post = b""
        self._last = b""  # completions put finish_reason on the last token's chunk, as OpenAI does
        for i in range(job.choices):
            pre, post = self._split(self._choice(i, _MARK, None))
            self._pre.append(pre)
            self._post = post
            if not job.chat:
                self._last = self._split(self._choice(i, _MARK, "length"))[1]

    def _choice(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        if self.job.chat:
            return {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def _frame(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + dumps({**self._envelope, "choices": choices, **extra}).encode() + b"\n\n"

    def _split(self, choice: dict[str, Any]) -> tuple[bytes, bytes]:
        # The mark is the last user-free field but one; rpartition keeps a model name holding it intact.
        pre, _, post = self._frame([choice]).rpartition(_MARK.encode())
        return pre, post

    def head(self) -> bytes:
        """Chat streams open with the assistant role, one chunk per choice."""
        if not self.job.chat:
            return b""
        return b"".join(
            self._frame(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for i in range(self.job.choices)
        )

    def tokens(self, start: int, stop: int) -> bytes:
        """The frames of tokens start..stop-1 for every choice."""
        parts: list[bytes] = []
        final = self.job.max_tokens - 1
        for t in range(start, stop):
            word = _WORDS[t % len(_WORDS)]
            post = self._last if t == final and not self.job.chat else self._post
            for pre in self._pre:
                parts.append(pre + word + post)
        return b"".join(parts)

    def tail(self) -> bytes:
        """Chat's finish chunks, the usage chunk when asked for, and the [DONE] sentinel."""
        parts: list[bytes] = []
        if self.job.chat:
            parts.extend(
                self._frame([{"index": i, "delta": {}, "logprobs": None, "finish_reason": "length"}])
                for i in range(self.job.choices)
            )
        if self.job.include_usage:
            parts.append(self._frame([], usage=self.job.usage()))
        parts.append(b"data: [DONE]\n\n")
        return b"".join(parts)


@dataclass(frozen=True)
class EmbeddingJob:
    model: str
    texts: tuple[str, ...]
    dimensions: int
    base64: bool
    prompt_tokens: int


def parse_embeddings(body: dict[str, Any], default_model: str) -> EmbeddingJob:
    """Validate a /v1/embeddings body; raise RequestError."""
    value = body.get("input")
    counts = _input_tokens(value)
    if isinstance(value, str):
        texts: tuple[str, ...] = (value,)
    elif value and isinstance(value[0], list):
        texts = tuple(dumps(v) for v in value)
    elif value and isinstance(value[0], int):
        texts = (dumps(value),)
    else:
        texts = tuple(str(v) for v in value or ())
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64", None):
        raise RequestError('\'encoding_format\' must be "float" or "base64".')
    dims = _int_field(body, "dimensions", DEFAULT_EMBEDDING_DIMENSIONS, 1, MAX_EMBEDDING_DIMENSIONS)
    return EmbeddingJob(_model(body, default_model), texts, dims, encoding == "base64", sum(counts))


def embed(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for `text`: equal texts map to equal vectors, on any machine."""
    raw = hashlib.shake_256(text.encode()).digest(2 * dimensions)
    values = [v / 32767.5 - 1.0 for v in struct.unpack(f"<{dimensions}H", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def embeddings_response(job: EmbeddingJob) -> bytes:
    data = []
    for i, text in enumerate(job.texts):
        vector = embed(text, job.dimensions)
        encoded: Any = vector
        if job.base64:
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    usage = {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens}
    return dumps({"object": "list", "data": data, "model": job.model, "usage": usage}).encode()


def models_response(name: str, created: int) -> bytes:
    model = {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "gpud-sim",
        "root": name,
        "parent": None,
        "max_model_len": MAX_MODEL_LEN,
    }
    return dumps({"object": "list", "data": [model]}).encode()
