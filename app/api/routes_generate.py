"""TGI-compatible text generation: POST /generate."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.api.errors import APIError
from app.api.generation import build_params, run_to_completion, tokenize_prompt
from app.api.schemas import Details, ErrorResponse, GenerateRequest, GenerateResponse, Token
from app.engine.request import FinishReason
from app.state import ServerState, get_state

router = APIRouter(tags=["text-generation (TGI)"])

_ERRORS = {code: {"model": ErrorResponse} for code in (422, 429, 500, 503)}


@router.post("/generate", response_model=GenerateResponse, responses=_ERRORS)
async def generate(
    body: GenerateRequest, state: ServerState = Depends(get_state)
) -> GenerateResponse:
    if body.stream:
        raise APIError(422, "streaming is served by POST /generate_stream", field="stream")
    prompt_ids = tokenize_prompt(state, body.inputs)
    params = build_params(state, body.parameters.generate_options(), len(prompt_ids))
    completion = (await run_to_completion(state, prompt_ids, params))[0]
    text = body.inputs + completion.text if body.parameters.return_full_text else completion.text
    details = None
    if body.parameters.details:
        tokenizer = state.tokenizer
        special = set(tokenizer.all_special_ids)
        details = Details(
            finish_reason=(completion.finish_reason or FinishReason.LENGTH).value,
            generated_tokens=len(completion.token_ids),
            seed=params.seed,
            tokens=[
                Token(id=t, text=tokenizer.decode([t]), logprob=lp, special=t in special)
                for t, lp in zip(completion.token_ids, completion.logprobs, strict=True)
            ],
        )
    return GenerateResponse(generated_text=text, details=details)
