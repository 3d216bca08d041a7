"""POST /v1/responses (plain or streamed typed events), GET and DELETE /v1/responses/<id>.

A Responses request runs as a chat request (same queue, engine stream,
parsers and metrics, endpoint label "responses"); responses_protocol.py
shapes it. Stored responses (`store`, on by default) live in the app's
bounded in-memory ResponseStore, which `previous_response_id` reads.
"""

from __future__ import annotations

from flask import Flask

from ...openai_protocol import ApiError, GenerationRequest, bad_request, parse_sampling
from ...responses_protocol import (
    ResponseBuilder,
    ResponsesRequest,
    new_id,
    output_messages,
    parse_responses_request,
    response_usage,
    sse_event,
)
from ..errors import to_api_error
from ..json_io import json_body, json_response
from ..replies import chat_deltas, event_stream
from ..run import ClientGone, RequestRun
from ..state import AppState
from .generation import disconnect_probe


def register(app: Flask, state: AppState) -> None:
    @app.post("/v1/responses")
    def create_response():
        req = parse_responses_request(json_body())
        history = []
        if req.previous_response_id is not None:
            prev = state.responses.get(req.previous_response_id)
            if prev is None:
                raise bad_request(
                    f"previous response '{req.previous_response_id}' was not found (responses "
                    f"are kept in memory, at most {state.responses.capacity}, and only with "
                    "store: true)",
                    "previous_response_id",
                    "previous_response_not_found",
                )
            history = prev.messages
        conversation = history + req.input_messages
        if not conversation:
            raise bad_request("input must hold at least one message", "input")
        run = RequestRun(state, _chat_request(req, conversation), "responses", disconnect_probe())
        builder = ResponseBuilder(new_id("resp"), run.model, req.echo)
        if req.stream:
            return event_stream(
                run,
                _events(state, req, run, builder, conversation),
                lambda err: [sse_event(e) for e in builder.fail(err.body()["error"])],
            )
        return json_response(_complete(state, req, run, builder, conversation))

    @app.get("/v1/responses/<rid>")
    def get_response(rid: str):
        item = state.responses.get(rid)
        if item is None:
            raise ApiError(
                404, f"response '{rid}' was not found", "invalid_request_error", "response_id", "response_not_found"
            )
        return json_response(item.response)

    @app.delete("/v1/responses/<rid>")
    def delete_response(rid: str):
        if not state.responses.delete(rid):
            raise ApiError(
                404, f"response '{rid}' was not found", "invalid_request_error", "response_id", "response_not_found"
            )
        return json_response({"id": rid, "object": "response", "deleted": True})


def _chat_request(req: ResponsesRequest, conversation: list) -> GenerationRequest:
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
    return GenerationRequest(
        "chat",
        req.model,
        parse_sampling(req.sampling),
        req.stream,
        False,
        messages=messages,
        tools=req.tools,
        chat_template_kwargs=dict(req.chat_template_kwargs),
        response_format=req.response_format,
        tool_choice=req.tool_choice,
        parallel_tool_calls=req.parallel_tool_calls,
    )


def _deltas_of(result) -> list:
    """A finished chat result as message deltas (what its stream would have carried)."""
    out = []
    if result.reasoning_content:
        out.append({"reasoning_content": result.reasoning_content})
    if result.content:
        out.append({"content": result.content})
    elif result.content is None and not result.tool_calls and not result.reasoning_content and result.text:
        out.append({"content": result.text})
    for i, tc in enumerate(result.tool_calls):
        out.append({"tool_calls": [dict(tc, index=i)]})
    return out


def _store(state: AppState, req: ResponsesRequest, builder: ResponseBuilder, conversation: list) -> None:
    if req.store:
        state.responses.put(builder.id, builder.response(), conversation + output_messages(builder.output))


def _complete(
    state: AppState, req: ResponsesRequest, run: RequestRun, builder: ResponseBuilder, conversation: list
) -> dict:
    try:
        result = run.collect()[0]
    except ClientGone:
        raise ApiError(499, "the client closed the request", "invalid_request_error", None, "client_closed") from None
    except Exception as e:
        raise to_api_error(e, run.param) from e
    builder.feed(_deltas_of(result))
    cached = (result.timings or {}).get("cached_prompt_tokens", 0)
    builder.finish(result.finish_reason, response_usage(result.usage, cached))
    _store(state, req, builder, conversation)
    return builder.response()


def _events(state: AppState, req: ResponsesRequest, run: RequestRun, builder: ResponseBuilder, conversation: list):
    for ev in builder.start():
        yield sse_event(ev)
    final = None
    for ch in run.events():
        for ev in builder.feed(chat_deltas(ch)):
            yield sse_event(ev)
        if ch.finish_reason is not None:
            final = ch
    cached = (final.timings or {}).get("cached_prompt_tokens", 0) if final is not None else 0
    for ev in builder.finish(
        final.finish_reason if final else "stop", response_usage(final.usage if final else None, cached)
    ):
        yield sse_event(ev)
    _store(state, req, builder, conversation)
