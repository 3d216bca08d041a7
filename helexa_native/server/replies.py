"""A RequestRun as its OpenAI reply: one JSON completion, or a stream of server-sent events.

A streamed reply that fails after its first event ends with an error event
and then [DONE]; one whose client left ends without either. Closing the SSE
generator (waitress does when a write fails) closes the run.
"""
from __future__ import annotations

import time
import uuid

from flask import Response

from ..openai_protocol import (SSE_DONE, ApiError, chat_chunk, chat_completion, chat_usage_chunk,
                               completion, completion_chunk, completion_logprobs,
                               completion_usage_chunk, sse)
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
        result = run.collect()
    except ClientGone:
        raise ApiError(499, "the client closed the request", "invalid_request_error", None,
                       "client_closed")
    except Exception as e:
        raise to_api_error(e, run.param) from e
    fp = fingerprint(run)
    created = int(time.time())
    if req.kind == "chat":
        return json_response(chat_completion(f"chatcmpl-{uuid.uuid4().hex}", created, run.model, fp,
                                             result.text, result.finish_reason, result.usage,
                                             result.logprobs))
    lp = None
    offset = 0
    prefix = ""
    if req.echo:
        prefix = echo_text(run)
        offset = len(prefix)
    if req.logprobs:
        lp, _ = completion_logprobs(result.logprobs or [], offset)
    return json_response(completion(f"cmpl-{uuid.uuid4().hex}", created, run.model, fp,
                                    prefix + result.text, result.finish_reason, result.usage, lp))


def sse_reply(run: RequestRun) -> Response:
    """Answer with server-sent chunks as the engine yields them, then [DONE]."""
    pieces = chat_events(run) if run.req.kind == "chat" else completion_events(run)

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
            yield sse(to_api_error(err, run.param).body())
        yield SSE_DONE

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    resp = Response(gen(), status=200, mimetype="text/event-stream", headers=headers)
    # A generator closed before its first step never runs its finally: the
    # WSGI server's close() must still give the queue ticket back.
    resp.call_on_close(run.close)
    return resp


def chat_events(run: RequestRun):
    """The chat.completion.chunk events of a run."""
    req = run.req
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    model, fp = run.model, fingerprint(run)
    iu = req.include_usage
    yield sse(chat_chunk(cid, created, model, fp, {"role": "assistant", "content": ""}, include_usage=iu))
    final = None
    for ch in run.events():
        if ch.text or (req.logprobs and ch.logprobs):
            yield sse(chat_chunk(cid, created, model, fp, {"content": ch.text},
                                 logprobs=ch.logprobs if req.logprobs else None, include_usage=iu))
        if ch.finish_reason is not None:
            final = ch
    usage = final.usage if final is not None else None
    yield sse(chat_chunk(cid, created, model, fp, {}, final.finish_reason if final else "stop",
                         include_usage=iu, usage=usage))
    if iu:
        yield sse(chat_usage_chunk(cid, created, model, fp, usage))


def completion_events(run: RequestRun):
    """The text_completion events of a run (the prompt first when echo is set)."""
    req = run.req
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    model, fp = run.model, fingerprint(run)
    iu = req.include_usage
    offset = 0
    if req.echo:
        text = echo_text(run)
        offset = len(text)
        yield sse(completion_chunk(cid, created, model, fp, text, include_usage=iu))
    final = None
    for ch in run.events():
        if ch.text or (req.logprobs and ch.logprobs):
            lp, offset = completion_logprobs(ch.logprobs if req.logprobs else None, offset)
            yield sse(completion_chunk(cid, created, model, fp, ch.text, logprobs=lp, include_usage=iu))
        if ch.finish_reason is not None:
            final = ch
    usage = final.usage if final is not None else None
    yield sse(completion_chunk(cid, created, model, fp, "", final.finish_reason if final else "stop",
                               include_usage=iu, usage=usage))
    if iu:
        yield sse(completion_usage_chunk(cid, created, model, fp, usage))


def echo_text(run: RequestRun) -> str:
    """The prompt as text, for echo."""
    p = run.req.prompt
    return p if isinstance(p, str) else run.engine.detokenize(run.prompt_ids)
