"""POST /v1/embeddings: pooled, normalized sentence embeddings (float lists or base64 float32)."""

from __future__ import annotations

from flask import Flask

from ...embeddings import encode_base64
from ...openai_protocol import ApiError, bad_request, opt_int, opt_str
from ..errors import RETRY_DEVICE, to_api_error
from ..json_io import json_body, json_response, reject_unknown_fields
from ..state import AppState

# OpenAI's own limit on inputs per request.
MAX_INPUTS = 2048


def register(app: Flask, state: AppState) -> None:
    @app.post("/v1/embeddings")
    def embeddings():
        body = json_body()
        reject_unknown_fields(body, ("model", "input", "encoding_format", "dimensions", "user", "pooling"))
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise bad_request(f"encoding_format must be 'float' or 'base64', got {fmt!r}", "encoding_format")
        dims = opt_int(body, "dimensions", minimum=1)
        pooling = opt_str(body, "pooling")
        opt_str(body, "user")
        inputs = body.get("input")
        if inputs is None or inputs == "" or inputs == []:
            raise bad_request("input must be a non-empty string, array of strings, or token ids", "input")
        if isinstance(inputs, list) and len(inputs) > MAX_INPUTS and not all(isinstance(t, int) for t in inputs):
            raise bad_request(f"input holds {len(inputs)} items; at most {MAX_INPUTS} per request", "input")
        slot = state.registry.get(opt_str(body, "model"))
        if not slot.healthy():
            raise ApiError(
                503,
                f"the device of model '{slot.name}' is unusable after an earlier error",
                "server_error",
                None,
                "device_unavailable",
                {"Retry-After": str(RETRY_DEVICE)},
            )
        engine = slot.engine
        try:
            ids = engine.embedding_inputs(inputs)
        except Exception as e:
            raise to_api_error(e, "input") from e
        try:
            vectors = engine.embed(ids, pooling=pooling, dimensions=dims)
        except NotImplementedError as e:
            raise ApiError(501, str(e), "invalid_request_error", None, "not_implemented") from e
        except ValueError as e:
            param = getattr(e, "field", None) or ("pooling" if pooling is not None and "pooling" in str(e) else "input")
            raise to_api_error(e, param) from e
        except Exception as e:
            raise to_api_error(e, "input") from e
        data = []
        for i, v in enumerate(vectors):
            emb = encode_base64(v.numpy()) if fmt == "base64" else [float(x) for x in v.tolist()]
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(len(x) for x in ids)
        return json_response(
            {"object": "list", "data": data, "model": slot.name, "usage": {"prompt_tokens": n, "total_tokens": n}}
        )
