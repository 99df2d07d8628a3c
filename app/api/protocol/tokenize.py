"""POST /tokenize and /detokenize bodies: ours (TGI's `inputs`) and vLLM's.

The body says which API the caller speaks, and the answer comes in that API's shape:
- `{"inputs"}` (TGI's body): TGI's answer, the bare list `[{id, text, start, stop}]`;
- `{"prompt"}` or `{"messages"}` (vLLM): `{"count", "max_model_len", "tokens": [ids],
  "token_strs"}`;
- /detokenize `{"ids"}` (ours): `{"text"}`; `{"tokens"}` (vLLM): `{"prompt"}`.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api.protocol.chat import ChatMessage

TOKENIZE_EXAMPLES = [
    {"inputs": "대한민국은 민주공화국이다."},
    {"prompt": "대한민국은 민주공화국이다.", "add_special_tokens": False},
    {"messages": [{"role": "user", "content": "안녕하세요"}]},
]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": TOKENIZE_EXAMPLES}
    )

    inputs: str | None = Field(
        default=None, description="Text to tokenize (TGI): TGI's answer, a list of tokens."
    )
    prompt: str | None = Field(default=None, description="vLLM: text; vLLM's answer shape.")
    messages: list[ChatMessage] | None = Field(
        default=None,
        description="vLLM: a conversation, rendered by the chat template as "
        "/v1/chat/completions renders it; vLLM's answer shape.",
    )
    add_special_tokens: bool | None = Field(
        default=None,
        description="Add the tokenizer's special tokens (default: false for `inputs`, true for "
        "`prompt`, as vLLM; not with `messages`, whose template places them).",
    )
    add_generation_prompt: bool | None = Field(
        default=None, description="vLLM, with `messages`: end with the assistant's turn marker "
        "(default true; false only with continue_final_message, as /v1/chat/completions "
        "renders).",
    )  # fmt: skip
    continue_final_message: bool | None = Field(
        default=None, description="vLLM, with `messages`: end inside the last message."
    )
    return_token_strs: bool | None = Field(
        default=None, description="vLLM: add `token_strs`, each token's text."
    )
    model: str | None = Field(default=None, description="vLLM: not used (one model).")
    parameters: dict[str, Any] | None = Field(
        default=None, description="Ignored (TGI clients send it)."
    )

    @model_validator(mode="after")
    def _one_input(self) -> Self:
        given = [
            name for name in ("inputs", "prompt", "messages") if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ValueError("give exactly one of `inputs`, `prompt` or `messages`")
        if self.messages is not None and not self.messages:
            raise ValueError("`messages` is empty")
        if self.messages is not None and self.add_special_tokens:
            raise ValueError("`add_special_tokens` with `messages`: the chat template places them")
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("give `add_generation_prompt` or `continue_final_message`, not both")
        if self.add_generation_prompt is False and not self.continue_final_message:
            raise ValueError(
                "`add_generation_prompt: false` is served with `continue_final_message: true` "
                "only (the chat route renders no other prompt)"
            )
        return self

    @property
    def vllm(self) -> bool:
        return self.inputs is None


class VLLMTokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"ids": [9349, 10034, 7235]}, {"tokens": [9349, 10034]}]},
    )

    ids: list[int] | None = Field(default=None, description="Token ids (ours): `{text}`.")
    tokens: list[int] | None = Field(default=None, description="vLLM: token ids: `{prompt}`.")
    skip_special_tokens: bool = True
    model: str | None = Field(default=None, description="vLLM: not used (one model).")

    @model_validator(mode="after")
    def _one_input(self) -> Self:
        if (self.ids is None) == (self.tokens is None):
            raise ValueError("give exactly one of `ids` or `tokens`")
        return self

    @property
    def token_ids(self) -> list[int]:
        return self.ids if self.ids is not None else list(self.tokens or [])


class VLLMDetokenizeResponse(BaseModel):
    prompt: str
