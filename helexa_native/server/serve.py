"""`helexa-native serve`: the server's options, start-up (listen first, then load the model) and shutdown."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from .. import defaults
from ..errors import ModelLoadError
from ..openai_protocol import ApiError
from ..reasoning import REASONING_PARSERS
from ..request_params import PASSTHROUGH_FIELDS
from ..tool_calls import PARSERS as TOOL_CALL_PARSERS
from .app import create_app
from .slots import ModelRegistry, load_engine, model_name_for
from .state import AppState

log = logging.getLogger(__name__)

PROG = "helexa-native"

# An env var may set the key's default so it stays out of the process list.
API_KEY_ENV = "HELEXA_NATIVE_API_KEY"

REASONING_PARSER_CHOICES = REASONING_PARSERS + ("none",)

# At shutdown running generations are cancelled; this bounds the wait for them.
SHUTDOWN_WAIT_SECONDS = 10.0


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Add the server's options to the `serve` subcommand (model and sampling options come from the CLI)."""
    g = p.add_argument_group("server")
    g.add_argument(
        "--host", default=defaults.DEFAULT_HOST, help=f"address to listen on (default {defaults.DEFAULT_HOST})"
    )
    g.add_argument(
        "--port",
        type=int,
        default=defaults.DEFAULT_PORT,
        help=f"port to listen on; 0 picks a free one (default {defaults.DEFAULT_PORT})",
    )
    g.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV}, else no key)",
    )
    g.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="model name clients send (default: the model file's name without .gguf)",
    )
    g.add_argument(
        "--max-queue",
        type=int,
        default=defaults.DEFAULT_MAX_QUEUE,
        metavar="N",
        help=f"requests that may wait per model behind the --max-num-seqs running ones; more get 503 "
        f"(default {defaults.DEFAULT_MAX_QUEUE})",
    )
    g.add_argument(
        "--model-root",
        action="append",
        default=None,
        metavar="DIR",
        help="let /v1/models/load open models only inside DIR (repeatable; symlinks and '..' "
        "are resolved first). Default: any path the server can read",
    )
    g.add_argument(
        "--no-model-load",
        action="store_true",
        help="turn /v1/models/load off (the model given at start-up is served as usual)",
    )
    g.add_argument(
        "--tool-call-parser",
        default=None,
        choices=TOOL_CALL_PARSERS,
        help="how tool calls are read from chat output (default: picked from the model's chat "
        "template; hermes for templates that do not render tools)",
    )
    g.add_argument(
        "--reasoning-parser",
        default=None,
        choices=REASONING_PARSER_CHOICES,
        help="how reasoning is split from chat output into reasoning_content (default: 'think' "
        "when the chat template writes <think> tags; 'none' turns it off)",
    )
    g.add_argument(
        "--response-store-size",
        type=int,
        default=defaults.DEFAULT_RESPONSE_STORE_SIZE,
        metavar="N",
        help="responses kept in memory for /v1/responses previous_response_id, least recently "
        f"used dropped first; 0 keeps none (default {defaults.DEFAULT_RESPONSE_STORE_SIZE})",
    )
    g.add_argument("--debug", action="store_true", help="run Flask's development server instead of waitress")


def sampling_defaults_from_args(args) -> dict:
    """The sampling options given on the command line, as create_app's default_sampling."""
    return {k: getattr(args, k) for k in PASSTHROUGH_FIELDS if getattr(args, k, None) is not None}


def model_roots_from_args(args) -> Optional[List[Path]]:
    """--no-model-load / --model-root as create_app's model_roots (None: any path)."""
    if getattr(args, "no_model_load", False):
        return []
    roots = getattr(args, "model_root", None)
    if roots is None:
        return None
    out = []
    for r in roots:
        p = Path(r).expanduser()
        if not p.is_dir():
            raise ValueError(f"--model-root must be a directory, got {r!r}")
        out.append(p)
    return out


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_at_startup(registry: ModelRegistry, path, name: str, progress: bool, on_fail: Callable[[], None]) -> None:
    """Load the start-up model into `registry`; on failure record it for /health and call on_fail."""
    t0 = time.perf_counter()
    try:
        slot, _ = registry.load(path, name=name, default=True, progress=progress)
    except BaseException as e:
        if isinstance(e, ApiError) and e.code == "shutting_down":
            log.info("%s: stopped before model '%s' was ready", PROG, name)
            return
        registry.load_error = f"{type(e).__name__}: {e}" if not str(e) else str(e)
        log.error("%s: error: could not load the model: %s", PROG, registry.load_error)
        on_fail()
        return
    log.info(
        "%s: model '%s' ready on %s (%.1f s)",
        PROG,
        slot.name,
        getattr(slot.engine, "device", "?"),
        time.perf_counter() - t0,
    )


def run_from_args(args) -> int:
    """Run `helexa-native serve` until interrupted; returns the exit status."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)

    if getattr(args, "model", None) is None:
        from ..engine import default_model_path

        path = default_model_path()
    else:
        path = Path(args.model).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model not found: {path}")
    name = args.served_model_name or model_name_for(path)
    progress = args.progress if getattr(args, "progress", None) is not None else sys.stderr.isatty()

    from ..cli import engine_options_from_args

    if args.response_store_size < 0:
        raise ValueError(f"--response-store-size must be >= 0, got {args.response_store_size}")
    engine_options = {k: v for k, v in engine_options_from_args(args).items() if v is not None}
    for key in ("tool_call_parser", "reasoning_parser"):
        if getattr(args, key, None) is not None:
            engine_options[key] = getattr(args, key)
    registry = ModelRegistry(
        load_engine,
        max_queue=args.max_queue,
        device=args.device,
        n_ctx=getattr(args, "n_ctx", None),
        engine_options=engine_options,
    )
    registry.mark_loading(name)
    roots = model_roots_from_args(args)
    app = create_app(
        registry,
        api_key=api_key,
        served_model_name=name,
        max_queue=args.max_queue,
        default_sampling=sampling_defaults_from_args(args),
        model_roots=roots,
        response_store_size=args.response_store_size,
    )
    if api_key is None and roots is None and not is_loopback(args.host):
        log.warning(
            "%s: warning: listening on %s without --api-key: anyone who can reach it may load any "
            "file this process can read through /v1/models/load (limit it with --model-root DIR "
            "or --no-model-load)",
            PROG,
            args.host,
        )
    state: AppState = app.extensions["helexa_native"]
    failed = threading.Event()

    def stop_main():
        state.stopping.set()
        import _thread

        _thread.interrupt_main()

    def fail():
        failed.set()
        stop_main()

    loader = threading.Thread(
        target=load_at_startup, args=(registry, path, name, progress, fail), name="model-loader", daemon=True
    )

    if threading.current_thread() is threading.main_thread():

        def on_term(signum, frame):
            if state.stopping.is_set():
                # A second SIGTERM while shutting down: stop waiting.
                exit_now(1)
            state.stopping.set()
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_term)

    server = None
    try:
        if args.debug:
            loader.start()
            app.run(host=args.host, port=args.port, debug=True, use_reloader=False, threaded=True)
        else:
            import waitress

            server = waitress.create_server(
                # One thread per running or waiting request, plus a few for
                # health checks and metrics while every stream is busy.
                app,
                host=args.host,
                port=args.port,
                threads=(getattr(args, "max_num_seqs", None) or defaults.DEFAULT_MAX_NUM_SEQS) + args.max_queue + 4,
                # Keep reading each connection while its request runs, so a
                # client that hangs up is noticed at once (client_disconnected).
                channel_request_lookahead=1,
                ident=PROG,
            )
            for host, port in listening_addresses(server, args):
                log.info("%s: listening on http://%s:%d (model '%s' loading)", PROG, host, port, name)
            loader.start()
            server.run()
    except KeyboardInterrupt:
        pass
    finally:
        # Requests end first (their streams see `stopping`), then the models
        # close, then the request threads finish writing; only then may the
        # server's sockets close under them.
        state.stopping.set()
        idle = registry.close(timeout=SHUTDOWN_WAIT_SECONDS)
        if server is not None:
            server.task_dispatcher.shutdown(timeout=SHUTDOWN_WAIT_SECONDS)
            if server.task_dispatcher.threads:
                idle = False
            else:
                server.close()
    status = 1 if failed.is_set() else 0
    if not idle:
        exit_now(status)
    return status


def exit_now(status: int) -> None:
    """End the process at once, without the interpreter's shutdown.

    Used when a model load or a request is still inside the engine after the
    shutdown wait. A normal exit would finalize the interpreter under that
    thread, and a thread that re-enters Python from native code during
    finalization is unwound in a way C++ cannot survive (std::terminate, exit
    by SIGABRT): a clean stop would end as a crash.
    """
    log.warning("%s: exiting without waiting for the model load or requests still running", PROG)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


def listening_addresses(server, args) -> List[Tuple[str, int]]:
    """The (host, port) pairs a waitress server listens on (port 0 resolved)."""
    port = getattr(server, "effective_port", None)
    if port is not None:
        host = getattr(server, "effective_host", args.host)
        return [(host, int(port))]
    out = []
    for s in getattr(server, "effective_listen", None) or []:
        out.append((s[0], int(s[1])))
    return out or [(args.host, args.port)]
