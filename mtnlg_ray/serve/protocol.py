"""The OpenAI wire format the server speaks: request schemas, the chat template, error bodies, stop strings.

Only what `/v1/completions` and `/v1/chat/completions` accept for a base GPT: one choice per
prompt, sampling settings, stop strings, a seed and streaming. Fields OpenAI has and we do not use
(logprobs, penalties, user, ...) are accepted and ignored, so existing clients work unchanged.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

# The chat template: each message on its own paragraph as "<Role>: <content>", then "Assistant:"
# for the reply, which ends at <|endoftext|>, max_tokens, or where the model starts a new turn.
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ["\n\nUser:", "\n\nSystem:"]

Number = StrictFloat | StrictInt
_TYPE_TAGS = {"str", "int", "float", "bool", "none"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False  # a last chunk, before [DONE], with token counts and no choices


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Number = 1.0
    top_p: Number = 1.0
    top_k: StrictInt = 0
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported; send the prompt again for more choices")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop):
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and any(s == "" for s in stop):
            raise ValueError("stop strings must not be empty")
        return stop


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictStr]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: StrictStr


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
    """A pydantic ValidationError as one 422 that names the first bad field."""
    first = exc.errors()[0]
    # Unions put the branch tried into the location ("prompt", "list[str]", 0); keep only field names and indexes.
    parts = [p for p in first["loc"] if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS)]
    param = ".".join(str(part) for part in parts) or None
    message = first["msg"].removeprefix("Value error, ")
    return APIError(422, f"{param}: {message}" if param else message, param=param, code="invalid_value")


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
