"""A request's sampling fields resolved into `SamplingParams` and the request's limits.

`resolve_params` turns a request (a dict of OpenAI-style fields) plus the
model's generation_config into validated `SamplingParams`, max_tokens, stop
strings and stop token ids. Precedence: request > generation_config >
defaults.py. A bad value raises `InvalidParameterError`, whose `field` names
the request field that holds it.

`SAMPLING_FIELDS` is the one list of those fields: the Engine takes them as
keyword arguments, and the CLI flags, the server's defaults and the OpenAI
request bodies derive their lists from it.
"""

from __future__ import annotations

import math
import secrets
from typing import Optional

from . import defaults
from .errors import InvalidParameterError
from .params import UINT64_MASK, SamplingParams

# Every field resolve_params reads: the Engine's sampling keyword arguments.
SAMPLING_FIELDS = (
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "logprobs",
    "top_logprobs",
    "ignore_eos",
)

# The fields that ask for log-probabilities. Each front end spells them its
# own way (chat: a boolean plus top_logprobs; completions: an integer; the
# CLI: generate --logprobs N), so none passes them through by name.
LOGPROB_FIELDS = ("logprobs", "top_logprobs")

# The fields every front end passes to the Engine under the same name and
# shape: a CLI flag, a server default and an OpenAI body field each.
PASSTHROUGH_FIELDS = tuple(f for f in SAMPLING_FIELDS if f not in LOGPROB_FIELDS)

# The OpenAI chat API's newer name for max_tokens; max_tokens wins when both are set.
MAX_TOKENS_ALIAS = "max_completion_tokens"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(name: str, v) -> float:
    if not _is_number(v):
        raise InvalidParameterError(name, f"{name} must be a number, got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f):
        raise InvalidParameterError(name, f"{name} must be finite, got {v!r}")
    return f


def _integer(name: str, v) -> int:
    if not _is_int(v):
        raise InvalidParameterError(name, f"{name} must be an integer, got {type(v).__name__}")
    return int(v)


def _check_temperature(v, name="temperature") -> float:
    f = _number(name, v)
    if f < 0:
        raise InvalidParameterError(name, f"{name} must be >= 0, got {v!r}")
    return f


def _check_top_p(v, name="top_p") -> float:
    f = _number(name, v)
    if not 0.0 < f <= 1.0:
        raise InvalidParameterError(name, f"{name} must be in (0, 1], got {v!r}")
    return f


def _check_top_k(v, name="top_k") -> int:
    i = _integer(name, v)
    if i < 0:
        raise InvalidParameterError(name, f"{name} must be >= 0 (0 disables it), got {v!r}")
    return i


def _check_min_p(v, name="min_p") -> float:
    f = _number(name, v)
    if not 0.0 <= f <= 1.0:
        raise InvalidParameterError(name, f"{name} must be in [0, 1], got {v!r}")
    return f


def _check_repetition(v, name="repetition_penalty") -> float:
    f = _number(name, v)
    if f <= 0:
        raise InvalidParameterError(name, f"{name} must be > 0, got {v!r}")
    return f


def _check_penalty(v, name) -> float:
    f = _number(name, v)
    if not -2.0 <= f <= 2.0:
        raise InvalidParameterError(name, f"{name} must be in [-2, 2], got {v!r}")
    return f


def _check_max_tokens(v, name="max_tokens") -> int:
    i = _integer(name, v)
    if i < 0:
        raise InvalidParameterError(name, f"{name} must be >= 0, got {v!r}")
    return i


def _check_top_logprobs(v, name) -> int:
    n = _integer(name, v)
    if not 0 <= n <= defaults.MAX_TOP_LOGPROBS:
        raise InvalidParameterError(name, f"{name} must be in [0, {defaults.MAX_TOP_LOGPROBS}], got {n!r}")
    return n


def _token_id_list(name: str, v) -> list:
    if _is_int(v):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise InvalidParameterError(name, f"{name} must be a list of token ids, got {type(v).__name__}")
    out = []
    for t in v:
        if not _is_int(t) or t < 0:
            raise InvalidParameterError(name, f"{name} must hold non-negative integers, got {t!r}")
        out.append(int(t))
    return out


def _stop_strings(v) -> list:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise InvalidParameterError("stop", f"stop must be a string or a list of strings, got {type(v).__name__}")
    out = []
    for s in v:
        if not isinstance(s, str):
            raise InvalidParameterError("stop", f"stop must hold strings, got {type(s).__name__}")
        # An empty stop string would end every generation before it starts.
        if s and s not in out:
            out.append(s)
    return out


def _logprobs(v) -> tuple:
    """(logprobs, top_logprobs) from a boolean (chat API) or an int n, "with n alternatives" (completions)."""
    if isinstance(v, bool):
        return v, 0
    if _is_int(v):
        return True, _check_top_logprobs(v, "logprobs")
    raise InvalidParameterError("logprobs", f"logprobs must be a boolean or an integer, got {type(v).__name__}")


_GENCONFIG_CHECKS = {
    "temperature": _check_temperature,
    "top_k": _check_top_k,
    "top_p": _check_top_p,
    "min_p": _check_min_p,
    "repetition_penalty": _check_repetition,
}


def _from_generation_config(gc: dict) -> dict:
    """The model's own defaults; a value the model ships malformed is skipped, not fatal."""
    out = {}
    for key, check in _GENCONFIG_CHECKS.items():
        if gc.get(key) is None:
            continue
        try:
            out[key] = check(gc[key])
        except InvalidParameterError:
            pass
    mnt = gc.get("max_new_tokens")
    if _is_int(mnt) and mnt > 0:
        out["max_tokens"] = int(mnt)
    eos = gc.get("eos_token_id", gc.get("eos"))
    if eos is not None:
        try:
            out["eos"] = _token_id_list("eos_token_id", eos)
        except InvalidParameterError:
            pass
    return out


def new_seed() -> int:
    """A fresh random seed for a request that named none."""
    return secrets.randbits(63)


def resolve_params(request: dict, generation_config: Optional[dict] = None):
    """Validate a request: returns (SamplingParams, max_tokens, stop_strings, stop_token_ids).

    Precedence: request > the model's generation_config > defaults.py. A key
    whose value is None counts as absent. stop_token_ids holds the request's
    ids plus the model's EOS ids (unless ignore_eos). Raises
    InvalidParameterError naming the first bad field.
    """
    req = {k: v for k, v in (request or {}).items() if v is not None}
    gc = _from_generation_config(generation_config or {})

    def pick(key, check, default):
        if key in req:
            return check(req[key])
        return gc.get(key, default)

    temperature = pick("temperature", _check_temperature, defaults.DEFAULT_TEMPERATURE)
    top_k = pick("top_k", _check_top_k, defaults.DEFAULT_TOP_K)
    top_p = pick("top_p", _check_top_p, defaults.DEFAULT_TOP_P)
    min_p = pick("min_p", _check_min_p, defaults.DEFAULT_MIN_P)
    rep = pick("repetition_penalty", _check_repetition, defaults.DEFAULT_REPETITION_PENALTY)
    presence = (
        _check_penalty(req["presence_penalty"], "presence_penalty")
        if "presence_penalty" in req
        else defaults.DEFAULT_PRESENCE_PENALTY
    )
    frequency = (
        _check_penalty(req["frequency_penalty"], "frequency_penalty")
        if "frequency_penalty" in req
        else defaults.DEFAULT_FREQUENCY_PENALTY
    )

    if "max_tokens" in req:
        max_tokens = _check_max_tokens(req["max_tokens"])
    elif MAX_TOKENS_ALIAS in req:
        max_tokens = _check_max_tokens(req[MAX_TOKENS_ALIAS], MAX_TOKENS_ALIAS)
    else:
        max_tokens = gc.get("max_tokens", defaults.DEFAULT_MAX_TOKENS)

    if "seed" in req:
        seed = _integer("seed", req["seed"]) & UINT64_MASK
    else:
        seed = new_seed()

    logprobs, top_logprobs = _logprobs(req["logprobs"]) if "logprobs" in req else (False, 0)
    if "top_logprobs" in req:
        top_logprobs = _check_top_logprobs(req["top_logprobs"], "top_logprobs")
        if top_logprobs > 0:
            logprobs = True

    stop = _stop_strings(req["stop"]) if "stop" in req else []
    stop_ids = _token_id_list("stop_token_ids", req["stop_token_ids"]) if "stop_token_ids" in req else []
    ignore_eos = req.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise InvalidParameterError("ignore_eos", f"ignore_eos must be a boolean, got {type(ignore_eos).__name__}")
    if not ignore_eos:
        for t in gc.get("eos", []):
            if t not in stop_ids:
                stop_ids.append(t)

    params = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=rep,
        presence_penalty=presence,
        frequency_penalty=frequency,
        seed=seed,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    return params, max_tokens, stop, stop_ids
