"""GET /health (no API key needed; 503 while loading or unhealthy) and GET /metrics (Prometheus text)."""

from __future__ import annotations

from flask import Flask, Response

from ..errors import RETRY_DEVICE, RETRY_LOADING
from ..json_io import json_response
from ..state import AppState


def register(app: Flask, state: AppState) -> None:
    registry = state.registry

    @app.get("/health")
    def health():
        slots = registry.slots()
        models = {s.name: ("ok" if s.healthy() else "unhealthy") for s in slots}
        for name in registry.loading():
            models.setdefault(name, "loading")
        if not slots:
            if registry.load_error:
                return json_response({"status": "error", "error": registry.load_error, "models": models}, 503)
            status = "loading" if models else "no_model"
            return json_response({"status": status, "models": models}, 503, {"Retry-After": str(RETRY_LOADING)})
        if any(v == "unhealthy" for v in models.values()):
            return json_response({"status": "unhealthy", "models": models}, 503, {"Retry-After": str(RETRY_DEVICE)})
        return json_response({"status": "ok", "models": models})

    @app.get("/metrics")
    def metrics():
        data, ctype = state.metrics.render()
        return Response(data, status=200, headers={"Content-Type": ctype})
