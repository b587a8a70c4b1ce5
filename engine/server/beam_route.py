"""vLLM's ``use_beam_search`` on /v1/completions and /v1/chat/completions: the request's ``n`` best beams
(engine/beam_search.py) as its choices, each with its ``cumulative_logprob``-ranked text.

The search runs on the event loop, one engine submission per step (every live beam of every prompt, one
token each with logprobs), so other requests keep being served between and beside its steps; the client
leaving aborts the step in flight and ends the search. Its choices are whole (no stream); with logprobs,
each token's entry is the one its step ranked the candidates by (vLLM's).
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rast_engine.beam_search import BeamSearch, BeamSearchParams
from rast_engine.errors import RastError
from rast_engine.outputs import CompletionOutput, RequestOutput
from rast_engine.server.api_error import APIError
from rast_engine.server.http_io import unless_client_leaves
from rast_engine.server.protocol import ChatCompletionRequest, CompletionRequest
from rast_engine.server.responses import Formatter

if TYPE_CHECKING:
    from rast_engine.server.app import OpenAIServer


# what a beam search request may set (engine/beam_search.py reads nothing else)
BEAM_FIELDS = frozenset({
    "model", "prompt", "messages", "n", "best_of", "max_tokens", "max_completion_tokens", "stream", "temperature",
    "ignore_eos", "lam", "seed", "priority", "cache_salt", "user", "use_beam_search", "length_penalty",
    "add_generation_prompt", "continue_final_message", "chat_template_kwargs", "include_reasoning", "tool_choice",
    "return_token_ids", "logprobs", "top_logprobs", "return_tokens_as_token_ids"})


def beam_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None) -> BeamSearchParams | None:
    """use_beam_search's parameters (None: sampling). A field beam search would not honour is a 400, not
    ignored: a search ranks beams by the combined distribution's log-probabilities and nothing else."""
    if not req.use_beam_search:
        if "length_penalty" in req.model_fields_set:
            raise APIError(400, "length_penalty needs use_beam_search: true", param="length_penalty")
        return None
    fields = type(req).model_fields
    extra = sorted(f for f in req.model_fields_set - BEAM_FIELDS if getattr(req, f) != fields[f].default)
    if extra or req.stream:
        raise APIError(400, f"use_beam_search takes only {', '.join(sorted(BEAM_FIELDS - {'stream'}))} "
                            f"(and no stream); got {', '.join(extra) or 'stream: true'}",
                       param=extra[0] if extra else "stream")
    if max_tokens is None:
        raise APIError(400, "use_beam_search needs max_tokens", param="max_tokens")
    logprobs = req.logprobs_count() if isinstance(req, ChatCompletionRequest) else req.logprobs
    try:
        return BeamSearchParams(beam_width=req.n, max_tokens=max_tokens, ignore_eos=req.ignore_eos,
                                temperature=0.0 if req.temperature is None else req.temperature,
                                length_penalty=req.length_penalty, lam=req.lam, logprobs=logprobs)
    except RastError as exc:
        raise APIError(400, str(exc), param=exc.param) from None


async def beam_search_response(server: OpenAIServer, request: Request, fmt: Formatter, prompts: list,
                               params: BeamSearchParams, *, add_special_tokens: bool, param: str, priority: int,
                               lora: str | None, cache_salt: str | None) -> Response:
    """``fmt``: the route's Formatter, over one request id per prompt and ``n`` = beam_width."""
    arrival = time.perf_counter()
    engine = server.engine.engine
    search = BeamSearch(prompts, params, engine.scheduler.stops.eos_token_ids, server.engine.max_model_len)
    step = dataclasses.replace(params.step_params(), output_kind="final_only")

    async def run() -> None:
        while batch := search.prompts():
            first = search.steps == 0  # the prompts as sent, then the beams' ids
            handle = server.engine.submit(batch, step, request_id=f"{fmt.id}-step{search.steps}", max_tokens=1,
                                          add_special_tokens=add_special_tokens if first else False,
                                          param=param if first else "n", priority=priority, lora=lora,
                                          cache_salt=cache_salt)
            async with handle:
                outs = {out.request_id: out async for out in handle if out.finished}
            search.take([outs[rid] for rid in handle.request_ids])

    stayed, _ = await unless_client_leaves(request, run())
    if not stayed:
        return Response(status_code=499)
    tokenizer = server.tokenizer

    def decode(ids: list[int]) -> str:  # as the engine's outputs: no text without a tokenizer
        return "" if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=True)

    for rid, search_of, result in zip(fmt.request_ids, search.searches, search.results()):
        start = len(search_of.prompt)
        fmt.add(RequestOutput(rid, None, search_of.prompt, [
            CompletionOutput(i, decode(beam.tokens[start:]), beam.tokens[start:], beam.finish_reason,
                             cumulative_logprob=beam.cum_logprob,
                             logprobs=None if params.logprobs is None else beam.logprobs)
            for i, beam in enumerate(result.sequences)],
            finished=True))
    server.metrics.finished(time.perf_counter() - arrival, fmt.finish_reasons())
    return JSONResponse(fmt.body())
