"""OpenAI chat completions: POST /v1/chat/completions request, response and stream chunk.

As on /v1/completions, a field not listed here is collected (extra="allow") and validated as
a generate option, so `extra_body={"top_k": 20, "repetition_penalty": 1.2}` works and a typo
is a 400 that names it; the vLLM / sglang extensions and the ignored OpenAI fields are
OpenAIRequestFields'.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.api.protocol.openai import OpenAIRequestFields, PromptLogprobs, Usage
from app.options.registry import option_range

_NEW_TOKENS = option_range("max_new_tokens").bounds()
_N = option_range("num_return_sequences").bounds()
_TOP = option_range("top_n_tokens")

CHAT_EXAMPLE = {
    "model": "kogpt2-mini",
    "messages": [
        {"role": "system", "content": "친절하게 답하세요."},
        {"role": "user", "content": "안녕하세요"},
        {"role": "assistant", "content": "안녕하세요, 무엇을 도와드릴까요?"},
        {"role": "user", "content": "대한민국의 수도는?"},
    ],
    "max_tokens": 32,
    "temperature": 0.8,
    "seed": 42,
}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"] = Field(description="Only text parts (no images or audio).")
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="`developer` is OpenAI's newer name for `system` and renders as one."
    )
    content: str | list[TextPart] = Field(description="Text, or text parts (joined by newlines).")
    name: str | None = Field(default=None, description="Accepted; not rendered.")

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(OpenAIRequestFields):
    model_config = ConfigDict(
        extra="allow", strict=True, json_schema_extra={"examples": [CHAT_EXAMPLE]}
    )

    messages: list[ChatMessage] = Field(
        min_length=1, description="The conversation, rendered by the chat template."
    )
    max_completion_tokens: int | None = Field(
        default=None,
        description="New tokens per choice (default: the rest of the context).",
        **_NEW_TOKENS,
    )
    max_tokens: int | None = Field(
        default=None, description="Older name of max_completion_tokens.", **_NEW_TOKENS
    )
    n: int | None = Field(default=1, description="Choices (num_return_sequences).", **_N)
    stop: str | list[str] | None = Field(default=None, description="Stop strings.")
    logprobs: bool | None = Field(default=False, description="Return the tokens' logprobs.")
    top_logprobs: int | None = Field(
        default=None,
        description=f"Alternatives per token (0..{_TOP.upper}); needs logprobs: true.",
        **_TOP.bounds(),
    )
    continue_final_message: bool | None = Field(
        default=None,
        description="vLLM: the prompt ends inside the last message (no generation prompt) and "
        "the model continues it.",
    )
    echo: bool | None = Field(
        default=None,
        description="vLLM: a last assistant message is repeated before the answer (with "
        "continue_final_message: the whole message).",
    )


class TopLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


FinishReason = Literal["stop", "length"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason
    token_ids: list[int] | None = Field(
        default=None, description="With return_token_ids (vLLM): the generated ids."
    )


class ChatCompletionResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "chatcmpl-3f9a",
                    "object": "chat.completion",
                    "created": 1767225600,
                    "model": "kogpt2-mini",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "서울입니다."},
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 40, "completion_tokens": 4, "total_tokens": 44},
                }
            ]
        }
    )

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = Field(
        default=None, description="With return_token_ids (vLLM): the rendered prompt's ids."
    )
    prompt_logprobs: PromptLogprobs | None = Field(
        default=None,
        description="With prompt_logprobs (vLLM; not streamed): the rendered prompt's log-probs.",
    )


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE `data:` chunk: per choice first `delta.role`, then `delta.content` pieces, then
    an empty delta with `finish_reason`; with stream_options.include_usage a last chunk with
    no choices and the usage; then `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
