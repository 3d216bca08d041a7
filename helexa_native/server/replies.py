"""A RequestRun as its OpenAI reply: one JSON completion, or a stream of server-sent events.

A streamed reply that fails after its first event ends with an error event
and then [DONE]; one whose client left ends without either. Closing the SSE
generator (waitress does when a write fails) closes the run.
"""

from __future__ import annotations

import time
import uuid
from typing import Callable, Iterable, Optional

from flask import Response

from ..openai_protocol import (
    SSE_DONE,
    ApiError,
    chat_choice,
    chat_chunk,
    chat_completion,
    chat_message,
    chat_usage_chunk,
    completion,
    completion_choice,
    completion_chunk,
    completion_logprobs,
    completion_usage_chunk,
    sse,
    total_usage,
)
from .errors import to_api_error
from .json_io import json_response
from .run import ClientGone, RequestRun


def fingerprint(run: RequestRun) -> str:
    """The system_fingerprint: this version and the run's device."""
    from .. import __version__

    return f"helexa-native-{__version__}-{getattr(run.engine, 'device', 'cpu')}"


def json_reply(run: RequestRun) -> Response:
    """Generate to the end and answer with one chat.completion or text_completion object."""
    req = run.req
    try:
        results = run.collect()
    except ClientGone:
        raise ApiError(499, "the client closed the request", "invalid_request_error", None, "client_closed") from None
    except Exception as e:
        raise to_api_error(e, run.param) from e
    fp = fingerprint(run)
    created = int(time.time())
    usage = total_usage([r.usage for r in results])
    if req.kind == "chat":
        choices = [chat_choice(i, result_message(r), r.finish_reason, r.logprobs) for i, r in enumerate(results)]
        return json_response(chat_completion(f"chatcmpl-{uuid.uuid4().hex}", created, run.model, fp, choices, usage))
    prefix = echo_text(run) if req.echo else ""
    choices = []
    for i, r in enumerate(results):
        lp = completion_logprobs(r.logprobs or [], len(prefix))[0] if req.logprobs else None
        choices.append(completion_choice(i, prefix + r.text, r.finish_reason, lp))
    return json_response(completion(f"cmpl-{uuid.uuid4().hex}", created, run.model, fp, choices, usage))


def result_message(r) -> dict:
    """A chat result as its assistant message (an engine without output parsers gives plain text)."""
    if r.content is None and not r.tool_calls and r.reasoning_content is None:
        return chat_message(r.text)
    return chat_message(r.content, r.reasoning_content, r.tool_calls)


def sse_reply(run: RequestRun) -> Response:
    """Answer with server-sent chunks as the engine yields them, then [DONE]."""
    pieces = chat_events(run) if run.req.kind == "chat" else completion_events(run)
    return event_stream(run, pieces, lambda err: [sse(err.body())], SSE_DONE)


def event_stream(
    run: RequestRun, pieces, on_error: Callable[[ApiError], Iterable[bytes]], done: Optional[bytes] = None
) -> Response:
    """A text/event-stream response of `pieces` (encoded events) that closes the run however it ends.

    An error after the first event becomes the events `on_error` makes of it
    (then `done`); a client that left gets neither.
    """

    def gen():
        err = None
        try:
            for piece in pieces:
                yield piece
        except ClientGone:
            return
        except Exception as e:
            err = e
        finally:
            pieces.close()
            run.close()
        if err is not None:
            yield from on_error(to_api_error(err, run.param))
        if done is not None:
            yield done

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    resp = Response(gen(), status=200, mimetype="text/event-stream", headers=headers)
    # A generator closed before its first step never runs its finally: the
    # WSGI server's close() must still give the queue ticket back.
    resp.call_on_close(run.close)
    return resp


def chat_deltas(ch) -> list:
    """A chunk's message deltas (an engine without output parsers gives its text as content)."""
    deltas = getattr(ch, "deltas", None)
    if deltas is not None:
        return list(deltas)
    return [{"content": ch.text}] if ch.text else []


def chat_events(run: RequestRun):
    """The chat.completion.chunk events of a run (each choice's chunks tagged with its index)."""
    req = run.req
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    model, fp = run.model, fingerprint(run)
    iu = req.include_usage
    for i in range(req.n):
        yield sse(chat_chunk(cid, created, model, fp, {"role": "assistant", "content": ""}, include_usage=iu, index=i))
    usages = {}
    for ch in run.events():
        i = getattr(ch, "index", 0)
        lps = ch.logprobs if req.logprobs and ch.logprobs else None
        deltas = chat_deltas(ch)
        if not deltas and lps:
            deltas = [{}]
        for d in deltas:
            yield sse(chat_chunk(cid, created, model, fp, d, logprobs=lps, include_usage=iu, index=i))
            lps = None
        if ch.finish_reason is not None:
            usages[i] = ch.usage
            usage = total_usage(list(usages.values())) if len(usages) == req.n else None
            yield sse(chat_chunk(cid, created, model, fp, {}, ch.finish_reason, include_usage=iu, usage=usage, index=i))
    if iu:
        yield sse(chat_usage_chunk(cid, created, model, fp, total_usage(list(usages.values()))))


def completion_events(run: RequestRun):
    """The text_completion events of a run (the prompt first when echo is set)."""
    req = run.req
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    model, fp = run.model, fingerprint(run)
    iu = req.include_usage
    offsets = [0] * req.n
    if req.echo:
        text = echo_text(run)
        for i in range(req.n):
            offsets[i] = len(text)
            yield sse(completion_chunk(cid, created, model, fp, text, include_usage=iu, index=i))
    usages = {}
    for ch in run.events():
        i = getattr(ch, "index", 0)
        if ch.text or (req.logprobs and ch.logprobs):
            lp, offsets[i] = completion_logprobs(ch.logprobs if req.logprobs else None, offsets[i])
            yield sse(completion_chunk(cid, created, model, fp, ch.text, logprobs=lp, include_usage=iu, index=i))
        if ch.finish_reason is not None:
            usages[i] = ch.usage
            usage = total_usage(list(usages.values())) if len(usages) == req.n else None
            yield sse(
                completion_chunk(cid, created, model, fp, "", ch.finish_reason, include_usage=iu, usage=usage, index=i)
            )
    if iu:
        yield sse(completion_usage_chunk(cid, created, model, fp, total_usage(list(usages.values()))))


def echo_text(run: RequestRun) -> str:
    """The prompt as text, for echo."""
    p = run.req.prompt
    return p if isinstance(p, str) else run.engine.detokenize(run.prompt_ids)
