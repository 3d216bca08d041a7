"""JSON in and out: reading a request's body and answering with a JSON response."""

from __future__ import annotations

from typing import Iterable, Optional

from flask import Response, request

from ..openai_protocol import bad_request, dumps, parse_json_body

# Requests are JSON; anything this large is a mistake or an attack.
MAX_BODY_BYTES = 32 * 1024 * 1024


def json_body() -> dict:
    """The current request's body as a JSON object (400 envelope otherwise)."""
    return parse_json_body(request.get_data(cache=False))


def reject_unknown_fields(body: dict, allowed: Iterable[str]) -> None:
    """400 unknown_parameter naming the first field of `body` a route does not take."""
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise bad_request(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0], "unknown_parameter")


def json_response(obj, status: int = 200, headers: Optional[dict] = None) -> Response:
    """`obj` as an application/json response."""
    return Response(dumps(obj), status=status, mimetype="application/json", headers=headers or {})
