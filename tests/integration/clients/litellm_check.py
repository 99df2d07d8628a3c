"""LiteLLM against a live server: its openai provider (completion, streaming), its
huggingface provider on the TGI routes, and its context-window error for an over-long
prompt (what its context-window fallbacks key on). Prints one JSON object.

Usage: python litellm_check.py BASE_URL
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import

import litellm


def main(base_url: str) -> None:
    results: dict[str, object] = {}
    messages = [{"role": "user", "content": "대한민국의 수도는"}]
    response = litellm.completion(
        model="openai/kogpt2",
        api_base=f"{base_url}/v1",
        api_key="unused",
        messages=messages,
        max_tokens=8,
        temperature=0,
    )
    results["openai_chat"] = response.choices[0].message.content
    stream = litellm.completion(
        model="openai/kogpt2",
        api_base=f"{base_url}/v1",
        api_key="unused",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    results["openai_chat_stream"] = "".join(
        chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices
    )
    text = litellm.text_completion(
        model="openai/kogpt2",
        api_base=f"{base_url}/v1",
        api_key="unused",
        prompt="대한민국은",
        max_tokens=8,
        temperature=0,
    )
    results["openai_text"] = text.choices[0].text
    try:
        litellm.completion(
            model="openai/kogpt2",
            api_base=f"{base_url}/v1",
            api_key="unused",
            messages=[{"role": "user", "content": "대한민국 " * 3000}],
            max_tokens=8,
            num_retries=0,
        )
        results["context_window_error"] = None
    except litellm.ContextWindowExceededError as exc:
        results["context_window_error"] = type(exc).__name__
    except Exception as exc:  # the test reports which error it was
        results["context_window_error"] = f"{type(exc).__name__}: {exc}"[:500]
    print(json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1])
