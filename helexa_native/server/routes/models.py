"""The served models: GET /v1/models, GET /v1/models/<id>; admin POST /v1/models/load and /v1/models/unload.

Loading under a name already served replaces that model once the new one is
ready; /v1/models/load opens only what paths.resolve_model_path allows.
"""

from __future__ import annotations

import logging
import time

from flask import Flask

from ...errors import DeviceError, ModelLoadError
from ...openai_protocol import ApiError, bad_request, opt_int, opt_str
from ..json_io import json_body, json_response, reject_unknown_fields
from ..paths import resolve_model_path
from ..slots import model_name_for
from ..state import AppState

log = logging.getLogger(__name__)


def register(app: Flask, state: AppState) -> None:
    registry = state.registry

    @app.get("/v1/models")
    def list_models():
        return json_response({"object": "list", "data": [s.card() for s in registry.slots()]})

    @app.get("/v1/models/<path:model_id>")
    def get_model(model_id: str):
        return json_response(registry.get(model_id).card())

    @app.post("/v1/models/load")
    def load_model():
        body = json_body()
        reject_unknown_fields(body, ("model", "name", "device", "n_ctx"))
        path = opt_str(body, "model")
        if not path:
            raise bad_request("model (a GGUF file or Hugging Face folder path) is required", "model")
        name = opt_str(body, "name")
        if name is not None and not name.strip():
            raise bad_request("name must not be empty", "name")
        device = opt_str(body, "device")
        n_ctx = opt_int(body, "n_ctx", minimum=1)
        name = name or model_name_for(path)  # named after the path asked for, not its link target
        path = resolve_model_path(path, state.model_roots)
        t0 = time.perf_counter()
        try:
            slot, replaced = registry.load(path, name=name, device=device, n_ctx=n_ctx)
        except ApiError:
            raise
        except (DeviceError, ValueError) as e:
            raise ApiError(
                400,
                str(e),
                "invalid_request_error",
                "device" if isinstance(e, DeviceError) or "device" in str(e) else "model",
                "model_load_failed",
            ) from e
        except (ModelLoadError, OSError) as e:
            raise ApiError(400, str(e), "invalid_request_error", "model", "model_load_failed") from e
        out = slot.card()
        out.update(
            replaced=replaced,
            load_seconds=round(time.perf_counter() - t0, 3),
            device=str(getattr(slot.engine, "device", "")),
        )
        log.info("loaded model %s from %s (%s)", slot.name, path, "replaced" if replaced else "new")
        return json_response(out)

    @app.post("/v1/models/unload")
    def unload_model():
        body = json_body()
        reject_unknown_fields(body, ("model",))
        name = opt_str(body, "model")
        if not name:
            raise bad_request("model (the served name) is required", "model")
        registry.unload(name)
        log.info("unloaded model %s", name)
        return json_response({"id": name, "object": "model", "deleted": True})
