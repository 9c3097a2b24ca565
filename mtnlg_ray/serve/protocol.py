"""The OpenAI wire format the server speaks: request schemas, the chat template, error bodies, stop strings.

Only what `/v1/completions` and `/v1/chat/completions` accept for a base GPT: one choice per
prompt, sampling settings, stop strings, a seed and streaming. Fields OpenAI has that do not change
the text (penalties at 0, user, metadata, ...) are accepted and ignored, so existing clients work
unchanged, and `null` means a field's default, as OpenAI reads it; an unknown field that is a near
miss of one read here (`max_token`) is refused, naming the one meant. Fields that ask for something
this server does not give (logprobs, even 0, echo, best_of > 1, suffix, penalties other than 0, a logit
bias, tools or the older functions, a response format other than text) are refused, not ignored: a
client would otherwise read the wrong text or a missing score as if it were the answer. A refused or
malformed field is a 400 `invalid_request_error` naming it, as OpenAI answers (FastAPI's habit is 422,
which OpenAI's client raises as another exception than a bad request).
"""

from __future__ import annotations

import difflib
import math
from typing import Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator,
                      model_validator)

# The chat template: each message on its own paragraph as "<Role>: <content>", then "Assistant:"
# for the reply, which ends at <|endoftext|>, max_tokens, or where the model starts a new turn.
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ["\n\nUser:", "\n\nSystem:"]

Number = StrictFloat | StrictInt
# OpenAI's request fields that this server neither reads nor refuses: never taken for a misspelling.
OPENAI_OTHERS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "modalities", "audio",
                 "prediction", "reasoning_effort", "web_search_options", "safety_identifier", "prompt_cache_key",
                 "verbosity",
                 # other servers' sampling fields (vLLM's, OpenRouter's through LiteLLM), near a field
                 # read here but not a misspelling of one
                 "min_tokens", "min_p", "top_a", "repetition_penalty", "length_penalty", "ignore_eos",
                 "stop_token_ids", "best_of_n"}
_TYPE_TAGS = {"str", "int", "float", "bool", "none"}
MAX_STOPS = 4  # stop strings per request, as OpenAI allows
MAX_STOP_CHARS = 1000  # each one's length: every streamed chunk is scanned for all of them


def _unicode(text: str) -> str:
    """JSON's \\ud800 escapes decode to lone surrogates, which are not text a tokenizer can read."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"expected valid Unicode text, got a lone surrogate at character {exc.start}") from None
    return text



def openai_top_p(top_p: float) -> float:
    """top_p as OpenAI reads it: 0 is a nucleus of nothing, the likeliest token alone (SamplingParams takes
    no 0, and the sampler always keeps the best token of a tiny nucleus). `generate --top-p` reads it so too."""
    return 1e-9 if top_p == 0 else top_p

class FieldError(ValueError):
    """A model validator's error about one field: it names the field itself (pydantic places it at the
    request, and the error body's `param` was null)."""

    def __init__(self, field: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.field = field
        self.code = code


class Unsupported(FieldError):
    """A field this server does not give."""

    def __init__(self, field: str) -> None:
        super().__init__(field, f"{field} is not supported by this server (a base GPT's completions only); "
                                "leave it unset", code="unsupported_parameter")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False  # a last chunk, before [DONE], with token counts and no choices

    @field_validator("include_usage", mode="before")
    @classmethod
    def _null_is_false(cls, value):
        return False if value is None else value


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None  # the newer name of max_tokens; either may be sent
    temperature: Number = 1.0
    top_p: Number = 1.0
    top_k: StrictInt = 0
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    # Asked for, never given: refused (see the module docstring).
    logprobs: StrictBool | StrictInt | None = None
    top_logprobs: StrictInt | None = None
    echo: StrictBool | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict | None = None
    tools: list | None = None
    tool_choice: StrictStr | dict | None = None
    functions: list | None = None  # the older names of tools and tool_choice
    function_call: StrictStr | dict | None = None
    response_format: dict | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_misspelt_field(cls, data):
        # Unknown fields pass, for clients that send OpenAI's others (user, metadata, store, ...); one
        # that is a near miss of a field this server reads is refused: `max_token` answered with the
        # default 16 tokens, `temprature` sampled at 1.0, each with a 200.
        if isinstance(data, dict):
            known = list(cls.model_fields)
            for key in data:
                if isinstance(key, str) and key not in cls.model_fields and key not in OPENAI_OTHERS:
                    near = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
                    if near:
                        raise FieldError(key, f"{key}: unknown field; did you mean {near[0]!r}?",
                                         code="unknown_parameter")
        return data

    @field_validator("temperature", "top_p", "top_k", "stream", "n", mode="before")
    @classmethod
    def _null_is_the_default(cls, value, info):
        # OpenAI reads null as "unset": `temperature=None` from a client library arrives so.
        return cls.model_fields[info.field_name].default if value is None else value

    @model_validator(mode="after")
    def _nothing_it_cannot_give(self):
        # logprobs 0 asks for the sampled tokens' log-probabilities (0 == False, hence `is`).
        asked = [name for name, value in (("logprobs", self.logprobs is not None and self.logprobs is not False),
                                          ("top_logprobs", bool(self.top_logprobs)),
                                          ("echo", bool(self.echo)),
                                          ("best_of", self.best_of not in (None, 1)),
                                          ("suffix", bool(self.suffix)),
                                          ("presence_penalty", bool(self.presence_penalty)),
                                          ("frequency_penalty", bool(self.frequency_penalty)),
                                          ("logit_bias", bool(self.logit_bias)),
                                          ("tools", bool(self.tools)),
                                          ("tool_choice", self.tool_choice not in (None, "none", "auto")),
                                          ("functions", bool(self.functions)),
                                          ("function_call", self.function_call not in (None, "none", "auto")),
                                          ("response_format", (self.response_format or {}).get("type", "text")
                                           != "text")) if value]
        if asked:
            raise Unsupported(asked[0])
        if not 0 <= self.top_p <= 1:  # checked here: SamplingParams sees 0 as a tiny nucleus, and said (0, 1]
            raise FieldError("top_p", f"top_p: expected a value in [0, 1] (0: the likeliest token alone), "
                                      f"got {self.top_p}")
        self.top_p = openai_top_p(self.top_p)
        if self.stream_options is not None and not self.stream:  # as OpenAI answers it
            raise FieldError("stream_options", "stream_options: only allowed with stream=true")
        return self

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported; send the prompt again for more choices")
        return n

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):  # Python's JSON reads NaN and Infinity
            raise ValueError(f"expected a finite number, got {value}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop):
        if isinstance(stop, str):
            stop = [stop]
        if stop is None:
            return stop
        if len(stop) > MAX_STOPS:
            raise ValueError(f"expected at most {MAX_STOPS} stop strings, got {len(stop)}")
        for s in stop:
            if s == "":
                raise ValueError("stop strings must not be empty")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"expected stop strings of at most {MAX_STOP_CHARS} characters, got {len(s)}")
            _unicode(s)
        return stop

    @model_validator(mode="after")
    def _one_limit(self):
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise FieldError("max_completion_tokens",
                                 f"max_completion_tokens: max_tokens ({self.max_tokens}) and max_completion_tokens "
                                 f"({self.max_completion_tokens}) disagree; send one of them")
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictStr]

    @field_validator("prompt")
    @classmethod
    def _text(cls, prompt):
        if isinstance(prompt, str):
            return _unicode(prompt)
        for i, text in enumerate(prompt):
            try:
                _unicode(text)
            except ValueError as exc:
                raise ValueError(f"prompt {i}: {exc}") from None
        return prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: StrictStr

    @field_validator("role", mode="after")
    @classmethod
    def _system(cls, role: str) -> str:
        return "system" if role == "developer" else role

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, content):
        # Content as a list of parts ([{"type": "text", "text": ...}]): the text parts, joined.
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError("expected text content parts ({\"type\": \"text\", \"text\": ...}) only")
            return "".join(p["text"] for p in content)
        return content

    @field_validator("content")
    @classmethod
    def _text(cls, content: str) -> str:
        return _unicode(content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


def render_chat(messages: list[ChatMessage]) -> str:
    """The prompt a chat becomes: "System: ...\\n\\nUser: ...\\n\\nAssistant:"."""
    turns = [f"{ROLE_NAMES[m.role]}: {m.content}" for m in messages]
    return "\n\n".join(turns + ["Assistant:"])


class APIError(Exception):
    """An error the client caused (or a full server), sent as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def validation_error(exc) -> APIError:
    """A pydantic ValidationError as one 400 that names the first bad field."""
    first = exc.errors()[0]
    # Unions put the branch tried into the location ("prompt", "list[str]", 0); keep only field names and indexes.
    parts = [p for p in first["loc"] if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS)]
    param = ".".join(str(part) for part in parts) or None
    cause = (first.get("ctx") or {}).get("error")
    if param is None and isinstance(cause, FieldError):  # raised for the whole request, about one field
        return APIError(400, str(cause), param=cause.field, code=cause.code)
    message = first["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


class StopScanner:
    """Cuts text at the first stop string; while streaming, holds back what could begin one."""

    def __init__(self, stops: list[str] | None) -> None:
        self.stops = stops or []

    def cut(self, text: str) -> tuple[str, bool]:
        """(text before the earliest stop string, whether one was found)."""
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            return text[: min(found)], True
        return text, False

    def safe_prefix(self, text: str) -> str:
        """The part of `text` that no later text can turn into the start of a stop string."""
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        return text[: len(text) - hold]
