"""Wire types that option values take in the request schema (pydantic, no torch)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TokenIds = int | list[int]


class Grammar(BaseModel):
    """TGI's grammar object (app/options/constraints.py validates the value)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"type": "json", "value": {"properties": {"이름": {"type": "string"}}}},
                {"type": "regex", "value": "(서울|부산)시 [가-힣]{2,4}구"},
            ]
        },
    )

    type: Literal["json", "json_object", "json_schema", "regex"] = Field(
        description='"json" (alias "json_object"): value is a JSON schema (object or JSON '
        'text); "json_schema": value is {"name", "schema"}; "regex": the output matches it.'
    )
    value: str | dict[str, Any] | None = Field(
        default=None, description='The schema or regex (may be omitted for "json_object").'
    )
