"""/docs is a complete reference: every route has typed request and response bodies with
examples, every $ref resolves, and every transformers generate option is a documented field."""

from __future__ import annotations

from typing import Any

import httpx
from transformers import GenerationConfig

from app.api.options import OPTION_NAMES

NO_BODY = {("/health", "get"), ("/ready", "get"), ("/info", "get"), ("/metrics", "get")}
NO_BODY |= {("/v1/models", "get"), ("/v1/models/{model}", "get")}
INTERNAL_FIELDS = {"transformers_version", "_from_model_config"}


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def test_every_route_is_documented(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for ref in refs(spec):
        assert ref.startswith("#/components/schemas/") and ref.split("/")[-1] in schemas, ref
    expected = {
        "/generate", "/generate_stream", "/", "/v1/completions", "/v1/models", "/few-shot",
        "/tokenize", "/detokenize", "/health", "/ready", "/info", "/metrics",
    }  # fmt: skip
    assert expected <= set(spec["paths"])
    for path, item in spec["paths"].items():
        for method, op in item.items():
            assert op.get("summary") and op.get("description"), (path, method)
            ok = op["responses"]["200"]
            assert ok.get("content"), (path, method)
            if (path, method) in NO_BODY:
                continue
            body = op["requestBody"]["content"]["application/json"]
            name = body["schema"]["$ref"].split("/")[-1]
            has_examples = "examples" in body or "examples" in schemas[name]
            assert has_examples, (path, method)
            if path not in ("/metrics",):
                assert "422" in op["responses"] or path.startswith("/v1/models"), (path, method)
    for streaming in ("/generate_stream", "/v1/completions", "/few-shot", "/"):
        content = spec["paths"][streaming]["post"]["responses"]["200"]["content"]
        assert "text/event-stream" in content
    assert client.get("/docs").status_code == 200


def test_every_generate_option_is_a_field() -> None:
    fields = set(GenerationConfig().to_dict()) - INTERNAL_FIELDS
    assert fields <= OPTION_NAMES, sorted(fields - OPTION_NAMES)
