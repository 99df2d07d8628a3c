"""POST /watermark/detect: request and response models.

The watermarking fields and their defaults are transformers' `WatermarkingConfig` (5.23); the
ranges are the ones `WatermarkLogitsProcessor` can run with, so a value that generation
accepts is a value detection accepts. Each bad value is a 422 naming
`watermarking_config.<field>` and the allowed range.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

# torch.Generator.manual_seed's inclusive range (WatermarkLogitsProcessor seeds with the key).
HASHING_KEY_MIN, HASHING_KEY_MAX = -(2**63), 2**64 - 1
MAX_SEQUENCES = 64  # sequences scored in one request

DETECT_EXAMPLE = {
    "inputs": "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있다.",
    "watermarking_config": {"greenlist_ratio": 0.25, "bias": 4.0},
    "z_threshold": 4.0,
}


class WatermarkingConfigModel(BaseModel):
    """transformers.WatermarkingConfig: the exact values used when generating."""

    model_config = ConfigDict(extra="forbid")

    greenlist_ratio: float = Field(default=0.25, description="Share of green tokens, in (0, 1).")
    bias: float = Field(
        default=2.0, description="Logit bias of green tokens (finite; detection does not use it)."
    )
    hashing_key: int = Field(
        default=15485863, description=f"Seed key, in [{HASHING_KEY_MIN}, {HASHING_KEY_MAX}]."
    )
    seeding_scheme: Literal["lefthash", "selfhash"] = Field(
        default="lefthash", description="'lefthash' or 'selfhash'."
    )
    context_width: int = Field(default=1, description="Previous tokens that seed, >= 1.")

    @field_validator("greenlist_ratio")
    @classmethod
    def _ratio(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError(f"greenlist_ratio must be in (0, 1), got {value}")
        return value

    @field_validator("bias")
    @classmethod
    def _bias(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"bias must be a finite number, got {value}")
        return value

    @field_validator("hashing_key")
    @classmethod
    def _key(cls, value: int) -> int:
        if not HASHING_KEY_MIN <= value <= HASHING_KEY_MAX:
            raise ValueError(
                f"hashing_key must be in [{HASHING_KEY_MIN}, {HASHING_KEY_MAX}], got {value}"
            )
        return value

    @field_validator("context_width")
    @classmethod
    def _width(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"context_width must be >= 1, got {value}")
        return value


class WatermarkDetectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [DETECT_EXAMPLE]})

    inputs: str | list[str] | None = Field(
        default=None,
        description="Text (or texts) to score, tokenized as prompts are (no special tokens). "
        "Give the generated part only: a prompt dilutes the score.",
    )
    input_ids: list[StrictInt] | list[list[StrictInt]] | None = Field(
        default=None,
        description="Token ids (or a list of id sequences) instead of `inputs`: exact, "
        "where re-tokenizing text may not give back the generated ids.",
    )
    watermarking_config: WatermarkingConfigModel = Field(
        default_factory=WatermarkingConfigModel,
        description="The watermarking_config the text was generated with (defaults as "
        "transformers' WatermarkingConfig).",
    )
    z_threshold: float = Field(
        default=3.0, allow_inf_nan=False, description="prediction = z_score > z_threshold."
    )
    ignore_repeated_ngrams: bool = Field(
        default=False, description="Score every distinct n-gram once (WatermarkDetector's flag)."
    )


class WatermarkDetectResponse(BaseModel):
    """transformers' WatermarkDetectorOutput, one list entry per sequence."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "num_tokens_scored": [77],
                    "num_green_tokens": [55],
                    "green_fraction": [0.714],
                    "z_score": [9.41],
                    "p_value": [2.5e-21],
                    "prediction": [True],
                    "confidence": [1.0],
                    "z_threshold": 4.0,
                }
            ]
        }
    )

    num_tokens_scored: list[int] = Field(description="Tokens scored (after the seeding context).")
    num_green_tokens: list[int] = Field(description="Scored tokens found in their greenlist.")
    green_fraction: list[float] = Field(description="num_green_tokens / num_tokens_scored.")
    z_score: list[float] = Field(description="One-proportion z-test against greenlist_ratio.")
    p_value: list[float] = Field(description="One-sided p-value of the z-score.")
    prediction: list[bool] = Field(description="z_score > z_threshold: watermarked.")
    confidence: list[float] = Field(description="1 - p_value.")
    z_threshold: float
