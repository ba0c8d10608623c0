"""Request bodies of the HTTP API, validated by pydantic in strict mode with unknown fields forbidden,
so a wrong type or a misspelt field is a 400 that names the field.

``request_models(limits)`` builds the bodies of one server: every limit a JSON schema can state
(largest ``max_tokens``, prompt length in characters, token ids below the vocabulary, number of
prompts, choices and stop strings, the length of every string) is a constraint of the model, so
``/openapi.json`` states exactly what the server accepts. Limits a schema cannot state (a prompt's
length in tokens, prompt + ``max_tokens`` within the context) are checked in ``moekit.serve.app``.

``CompletionRequest`` follows OpenAI's completions API, ``ChatRequest`` its chat completions API;
``routing_trace`` is moekit's extension. ``null`` means "the default" for every optional field.
"""

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

# Longest model name and ``user`` string, and most logit_bias entries (OpenAI's limit is 300).
MAX_NAME_CHARS = 256
MAX_LOGIT_BIAS = 300
# OpenAI's bounds: completions logprobs 0..5, chat top_logprobs 0..20.
MAX_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20

# Known OpenAI fields this server does not implement: a 400 names them as unsupported.
UNSUPPORTED = frozenset({"best_of", "suffix", "tools", "tool_choice", "functions", "function_call",
                         "response_format", "parallel_tool_calls", "audio", "modalities", "prediction",
                         "reasoning_effort", "service_tier", "store", "metadata", "web_search_options"})


def _whole(value: object) -> object:
    """JSON Schema counts 83.0 as an integer; strict pydantic would not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def whole(**bounds: int) -> Any:
    """A strict int within ``bounds`` (Field's ge/gt/le/lt) that also takes a whole float, as the schema's
    "integer" does; the bounds sit inside the validator so the schema shows them."""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = None


@dataclass(frozen=True)
class FieldLimits:
    """The per-server bounds stated in the schema (see ``request_models``)."""

    vocab_size: int
    max_tokens: int
    prompt_tokens: int
    prompt_chars: int
    max_prompts: int
    max_choices: int
    max_stop: int
    max_stop_chars: int
    max_messages: int
    num_experts: int


def id_pattern(n: int) -> str:
    """A regular expression matching the decimal integers 0..n-1 (no leading zeros), for logit_bias keys."""
    top = str(n - 1)
    L = len(top)
    if L == 1:
        return f"^[0-{top}]$"
    parts = ["[0-9]"] + ([f"[1-9][0-9]{{1,{L - 2}}}"] if L > 2 else [])  # every shorter number
    for i, d in enumerate(top):  # L digits: top's first i digits, then a smaller digit, then any
        low, high = ("1" if i == 0 else "0"), int(d) - (i < L - 1)
        if high >= int(low):
            parts.append(f"{top[:i]}[{low}-{high}]" + "[0-9]" * (L - i - 1))
    return "^(?:" + "|".join(parts) + ")$"


def request_models(lim: FieldLimits) -> tuple[type[BaseModel], type[BaseModel]]:
    """(CompletionRequest, ChatRequest) bounded by ``lim``."""
    Text = Annotated[str, Field(min_length=1, max_length=lim.prompt_chars)]
    TokenId = whole(ge=0, lt=lim.vocab_size)
    Tokens = Annotated[list[TokenId], Field(min_length=1, max_length=lim.prompt_tokens)]
    StopText = Annotated[str, Field(min_length=1, max_length=lim.max_stop_chars)]
    BiasKey = Annotated[str, StringConstraints(pattern=id_pattern(lim.vocab_size))]
    Bias = Annotated[float, Field(ge=-100.0, le=100.0)]

    class _Sampling(_Strict):
        model: str | None = Field(None, max_length=MAX_NAME_CHARS)
        max_tokens: whole(ge=1, le=lim.max_tokens) | None = None
        temperature: float | None = Field(None, ge=0.0, le=2.0)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        n: whole(ge=1, le=lim.max_choices) | None = None
        # Any integer (OpenAI's API takes any); the engine seeds with it modulo 2**63.
        seed: whole() | None = None
        stop: StopText | Annotated[list[StopText], Field(max_length=lim.max_stop)] | None = None
        stream: bool | None = None
        stream_options: StreamOptions | None = None
        presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
        frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
        logit_bias: Annotated[dict[BiasKey, Bias], Field(max_length=MAX_LOGIT_BIAS)] | None = None
        user: str | None = Field(None, max_length=MAX_NAME_CHARS)
        # moekit: return, for each generated token, the experts each MoE layer routed it to.
        routing_trace: bool | None = None
        # moekit: return the experts of every token fed to the model (the prompt, then each generated
        # token but the last) as "routing_record", a base64 moekit.replay.RoutingRecord file.
        routing_record: bool | None = None

        def stop_list(self) -> list[str]:
            if self.stop is None:
                return []
            return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    class CompletionRequest(_Sampling):
        prompt: (Text | Annotated[list[Text], Field(min_length=1, max_length=lim.max_prompts)] | Tokens
                 | Annotated[list[Tokens], Field(min_length=1, max_length=lim.max_prompts)])
        logprobs: whole(ge=0, le=MAX_LOGPROBS) | None = None
        echo: bool | None = None

    class TextPart(_Strict):
        type: Literal["text"]
        text: Text

    class ChatMessage(_Strict):
        role: Literal["system", "developer", "user", "assistant"]
        content: Text | Annotated[list[TextPart], Field(min_length=1, max_length=lim.max_messages)]
        name: str | None = Field(None, max_length=64)

        def text(self) -> str:
            return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    class ChatRequest(_Sampling):
        messages: list[ChatMessage] = Field(min_length=1, max_length=lim.max_messages)
        max_completion_tokens: whole(ge=1, le=lim.max_tokens) | None = None
        logprobs: bool | None = None
        top_logprobs: whole(ge=0, le=MAX_TOP_LOGPROBS) | None = None

    return CompletionRequest, ChatRequest


def admin_models(lim: FieldLimits) -> tuple[type[BaseModel], type[BaseModel]]:
    """(MaskRequest, UnmaskRequest): expert ids below the largest layer's expert count."""
    Expert = whole(ge=0, lt=lim.num_experts)
    # An MoE layer's qualified name ("layers.1.mlp") or its block index (1).
    Layer = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)] | whole(ge=0)

    class MaskRequest(_Strict):
        layer: Layer
        experts: list[Expert] = Field(min_length=1, max_length=lim.num_experts)

    class UnmaskRequest(_Strict):
        layer: Layer
        # None: every expert of the layer.
        experts: Annotated[list[Expert], Field(max_length=lim.num_experts)] | None = None

    return MaskRequest, UnmaskRequest
