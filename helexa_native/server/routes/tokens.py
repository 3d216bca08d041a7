"""POST /tokenize (a prompt, or messages through the model's chat template) and POST /detokenize."""

from __future__ import annotations

from flask import Flask

from ...openai_protocol import (
    ApiError,
    bad_request,
    opt_bool,
    opt_str,
    parse_messages,
    parse_tools,
    template_kwargs,
    token_id_list,
)
from ..errors import to_api_error
from ..json_io import json_body, json_response, reject_unknown_fields
from ..state import AppState


def register(app: Flask, state: AppState) -> None:
    registry = state.registry

    @app.post("/tokenize")
    def tokenize():
        body = json_body()
        reject_unknown_fields(
            body,
            (
                "model",
                "prompt",
                "messages",
                "add_special_tokens",
                "add_generation_prompt",
                "tools",
                "chat_template_kwargs",
                "return_token_strs",
            ),
        )
        slot = registry.get(opt_str(body, "model"))
        engine = slot.engine
        strs = opt_bool(body, "return_token_strs")
        try:
            if body.get("messages") is not None:
                if body.get("prompt") is not None:
                    raise bad_request("send either prompt or messages, not both", "prompt")
                messages = parse_messages(body["messages"])
                kwargs = template_kwargs(body)
                kwargs.pop("add_generation_prompt", None)
                ids = engine.apply_chat_template(
                    messages,
                    add_generation_prompt=opt_bool(body, "add_generation_prompt", True),
                    tools=parse_tools(body.get("tools")),
                    tokenize=True,
                    **kwargs,
                )
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise bad_request("prompt must be a string (or send messages)", "prompt")
                ids = engine.tokenize(prompt, add_special_tokens=opt_bool(body, "add_special_tokens", True))
        except ApiError:
            raise
        except Exception as e:
            raise to_api_error(e, "messages" if "messages" in body else "prompt") from e
        out = {
            "model": slot.name,
            "tokens": list(ids),
            "count": len(ids),
            "max_model_len": getattr(engine, "n_ctx", None),
        }
        if strs:
            out["token_strs"] = [bytes(engine.tokenizer.token_bytes(t)).decode("utf-8", errors="replace") for t in ids]
        return json_response(out)

    @app.post("/detokenize")
    def detokenize():
        body = json_body()
        reject_unknown_fields(body, ("model", "tokens"))
        slot = registry.get(opt_str(body, "model"))
        ids = body.get("tokens")
        if ids == []:
            return json_response({"model": slot.name, "prompt": ""})
        ids = token_id_list(ids, "tokens")
        try:
            text = slot.engine.detokenize(ids)
        except Exception as e:
            raise to_api_error(e, "tokens") from e
        return json_response({"model": slot.name, "prompt": text})
