"""Few-shot prompting: POST /few-shot request and response models."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.api.protocol.tgi import Details, FinishReasonName, GenerateParameters, StreamResponse

FEW_SHOT_EXAMPLE = {
    "task": "다음 문장의 감정을 긍정 또는 부정으로 분류하세요.",
    "examples": [
        {"input": "이 영화 정말 재미있었어요.", "output": "긍정"},
        {"input": "서비스가 너무 불친절했다.", "output": "부정"},
    ],
    "query": "음식이 맛있고 분위기도 좋았다.",
    "parameters": {"max_new_tokens": 8},
}


class FewShotExample(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    input: str = Field(description="Example input.")
    output: str = Field(description="The answer the model should imitate.")


class FewShotTemplate(BaseModel):
    """How the prompt is rendered (Korean defaults):

        {task}{example_separator}
        {input_prefix}{input}{input_output_separator}{output_prefix}{output}{example_separator}
        ... one block per example ...
        {input_prefix}{query}{input_output_separator}{output_prefix}

    Trailing whitespace of the rendered prompt is removed (byte-level BPE attaches a space
    to the next word, so the model writes " 긍정" after "출력:"); the answer is stripped.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    input_prefix: str = Field(default="입력: ", description="Before each input.")
    output_prefix: str = Field(default="출력: ", description="Before each output.")
    input_output_separator: str = Field(default="\n", description="Between input and output.")
    example_separator: str = Field(default="\n\n", description="Between task and examples.")
    stop_at_separator: bool = Field(
        default=True,
        description="Add example_separator and the stripped input_prefix to the stop strings.",
    )


class FewShotRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [FEW_SHOT_EXAMPLE]}
    )

    task: str = Field(default="", description="Instruction put before the examples (optional).")
    examples: list[FewShotExample] = Field(
        default_factory=list, description="Input/output pairs (none: zero-shot)."
    )
    query: str = Field(min_length=1, description="The input to answer.")
    template: FewShotTemplate = Field(default_factory=FewShotTemplate)
    parameters: GenerateParameters = Field(
        default_factory=GenerateParameters,
        description="Generate options; max_new_tokens defaults to 64 here.",
    )
    stream: bool = Field(default=False, description="Stream tokens as server-sent events.")


class FewShotResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "answer": "긍정",
                    "prompt": "다음 문장의 감정을 긍정 또는 부정으로 분류하세요.\n\n입력: ...",
                    "prompt_tokens": 57,
                    "generated_tokens": 3,
                    "finish_reason": "stop_sequence",
                    "num_examples": 2,
                    "details": None,
                }
            ]
        }
    )

    answer: str = Field(description="The generated answer, stripped.")
    prompt: str = Field(description="The rendered prompt.")
    prompt_tokens: int
    generated_tokens: int
    finish_reason: FinishReasonName
    num_examples: int
    details: Details | None = None


class FewShotStreamEvent(StreamResponse):
    """TGI stream event; the last one also carries the rendered prompt and its token count,
    and its `generated_text` is the stripped answer."""

    prompt: str | None = None
    prompt_tokens: int | None = None


class FewShotRenderResponse(BaseModel):
    """What POST /few-shot/render returns: exactly what POST /few-shot would build."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "prompt": "다음 문장의 감정을 긍정 또는 부정으로 분류하세요.\n\n입력: ...",
                    "prompt_tokens": 57,
                    "stop_strings": ["\n\n", "입력:"],
                }
            ]
        }
    )

    prompt: str = Field(description="The rendered prompt.")
    prompt_tokens: int = Field(description="Its token count.")
    stop_strings: list[str] = Field(description="The stop strings the generation would use.")
