"""Request bodies of the HTTP API, validated by pydantic in strict mode with unknown fields forbidden,
so a wrong type or a misspelt field is a 400 that names the field.

``CompletionRequest`` follows the OpenAI completions API (prompt, max_tokens, temperature, top_p,
seed, stop, stream); ``routing_trace`` is moekit's extension. Limits that depend on the server
(longest prompt, largest max_tokens) are checked in ``moekit.serve.app``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class CompletionRequest(_Strict):
    prompt: str
    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    # moekit: return, for each generated token, the experts each MoE layer routed it to.
    routing_trace: bool = False
    user: str | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class MaskRequest(_Strict):
    # An MoE layer's qualified name ("layers.1.mlp") or its block index (1).
    layer: str | int
    experts: list[int] = Field(min_length=1)


class UnmaskRequest(_Strict):
    layer: str | int
    # None: every expert of the layer.
    experts: list[int] | None = None
