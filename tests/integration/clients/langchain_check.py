"""LangChain against a live server: ChatOpenAI and OpenAI on /v1, HuggingFaceEndpoint and
ChatHuggingFace on the TGI routes, each with the library's own defaults. Prints one JSON
object (what each call returned); any exception fails the calling test.

Usage: python langchain_check.py BASE_URL
"""

from __future__ import annotations

import json
import sys

from langchain_huggingface import ChatHuggingFace, HuggingFaceEndpoint
from langchain_openai import ChatOpenAI, OpenAI


def main(base_url: str) -> None:
    results: dict[str, object] = {}
    # The model name is whatever the user typed: the server serves its one model for any.
    chat = ChatOpenAI(
        base_url=f"{base_url}/v1", api_key="unused", model="gpt-4o-mini", max_tokens=8
    )
    message = chat.invoke("대한민국의 수도는")
    results["chat_openai"] = message.content
    results["chat_openai_model"] = message.response_metadata.get("model_name")
    results["chat_openai_stream"] = "".join(
        str(chunk.content) for chunk in chat.stream("대한민국의 수도는")
    )
    # LangChain's OpenAI LLM sends presence/frequency penalties, top_p, n and logit_bias.
    llm = OpenAI(
        base_url=f"{base_url}/v1",
        api_key="unused",
        model="text-davinci-003",
        max_tokens=8,
        temperature=0,
        frequency_penalty=0.5,
        presence_penalty=0.3,
    )
    results["openai_llm"] = llm.invoke("대한민국은")
    # HuggingFaceEndpoint's defaults: do_sample False with temperature 0.8, top_p 0.95,
    # typical_p 0.95, top_k None, repetition_penalty None: TGI samples under them.
    endpoint = HuggingFaceEndpoint(endpoint_url=base_url, max_new_tokens=8, seed=7)
    results["hf_endpoint"] = endpoint.invoke("대한민국은")
    results["hf_endpoint_again"] = endpoint.invoke("대한민국은")
    results["hf_endpoint_stream"] = "".join(
        HuggingFaceEndpoint(endpoint_url=base_url, max_new_tokens=8, seed=7, streaming=True).stream(
            "대한민국은"
        )
    )
    chat_hf = ChatHuggingFace(llm=HuggingFaceEndpoint(endpoint_url=base_url, max_new_tokens=8))
    results["chat_huggingface"] = chat_hf.invoke("안녕하세요").content
    print(json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1])
