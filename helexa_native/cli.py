"""The `helexa-native` command: generate, chat, info, bench, serve."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from . import defaults
from .request_params import PASSTHROUGH_FIELDS, resolve_params

PROG = "helexa-native"


# ---------------------------------------------------------------------------
# arguments


def _add_model_args(p: argparse.ArgumentParser, model: bool = True) -> None:
    g = p.add_argument_group("model")
    if model:
        g.add_argument(
            "--model",
            "-m",
            default=None,
            help="GGUF file or Hugging Face folder (default: the bundled SmolLM2-135M-Instruct)",
        )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument(
        "--n-ctx",
        type=int,
        default=None,
        help=f"context size in tokens (default: the model's, capped at {defaults.DEFAULT_MAX_CONTEXT})",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help=f"sequences decoded together at most (default {defaults.DEFAULT_MAX_NUM_SEQS})",
    )
    g.add_argument(
        "--kv-cache-memory",
        default=None,
        metavar="BYTES",
        help="bytes of the shared paged KV cache, e.g. 8G or 512M (default: CUDA, 80%% of "
        "the memory left after the weights; CPU, four full contexts)",
    )
    g.add_argument(
        "--decode-steps",
        type=int,
        default=None,
        metavar="N",
        help="decode steps one device job may run when no running request needs the host between "
        "tokens (default: HELEXA_DECODE_STEPS, else 8 on one GPU and 1 elsewhere)",
    )
    g.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        metavar="N",
        help="tokens one step runs at most, decode tokens and prompt chunks together (default: "
        "HELEXA_MAX_BATCH_TOKENS, else 2048 on one GPU and 512 elsewhere); on one GPU a step runs as one "
        "pass of up to that many rows",
    )
    g.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        default=True,
        help="do not reuse the cached KV blocks of earlier prompts",
    )
    g.add_argument(
        "--tensor-parallel",
        type=int,
        default=None,
        metavar="N",
        help="split the model over N ranks: on GPUs one rank per GPU (cuda:I .. cuda:I+N-1 for "
        "--device cuda:I), on the CPU N threads of this process; under torchrun one rank per "
        "process (rank 0 runs the command; on GPUs each process drives cuda:LOCAL_RANK)",
    )
    g.add_argument(
        "--step-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --tensor-parallel: a step whose ranks have not all finished within SECONDS "
        f"fails the model, naming the late rank (default {defaults.DEFAULT_STEP_TIMEOUT:g})",
    )
    bar = g.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show progress bars (default: only on a terminal)",
    )
    bar.add_argument("--no-progress", dest="progress", action="store_false")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the model's generation_config, then built-ins)")
    g.add_argument(
        "--max-tokens",
        "-n",
        type=int,
        default=None,
        help=f"most tokens to generate (default {defaults.DEFAULT_MAX_TOKENS})",
    )
    g.add_argument("--temperature", "-t", type=float, default=None, help="0 means greedy")
    g.add_argument("--top-k", type=int, default=None, help="0 disables")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    g.add_argument(
        "--stop-token-id",
        dest="stop_token_ids",
        type=int,
        action="append",
        default=None,
        metavar="ID",
        help="stop token id (repeatable)",
    )
    g.add_argument("--ignore-eos", action="store_true", default=None, help="keep going past end-of-sequence tokens")


def _sampling(args) -> dict:
    return {k: getattr(args, k) for k in PASSTHROUGH_FIELDS if getattr(args, k, None) is not None}


def _progress(args) -> bool:
    if args.progress is not None:
        return args.progress
    return sys.stderr.isatty()


def _check_sampling(sampling: dict) -> None:
    # Bad flags fail before a model spends seconds loading.
    resolve_params(sampling, {})


def _byte_size(text: str) -> int:
    """'8G', '512M', '1.5GiB' or a plain number of bytes."""
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    num = t[:-1] if scale != 1 else t
    try:
        v = int(float(num) * scale)
    except ValueError:
        raise ValueError(f"--kv-cache-memory: not a byte size: {text!r} (e.g. 8G, 512M, 1000000)") from None
    if v < 1:
        raise ValueError(f"--kv-cache-memory must be positive, got {text!r}")
    return v


def _int_list(text: str) -> list:
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--concurrency: expected comma-separated integers, got {text!r}") from None
    if not out or any(x < 1 for x in out):
        raise ValueError(f"--concurrency: expected positive integers, got {text!r}")
    return out


def engine_options_from_args(args) -> dict:
    """The model options shared by every command (batching, KV cache, tensor parallelism) as Engine keywords."""
    return {
        "max_num_seqs": getattr(args, "max_num_seqs", None),
        "kv_cache_memory": (
            _byte_size(args.kv_cache_memory) if getattr(args, "kv_cache_memory", None) is not None else None
        ),
        "prefix_cache": getattr(args, "prefix_cache", True),
        "decode_steps": getattr(args, "decode_steps", None),
        "max_batch_tokens": getattr(args, "max_batch_tokens", None),
        "tensor_parallel": getattr(args, "tensor_parallel", None),
        "step_timeout": getattr(args, "step_timeout", None),
    }


def _engine(args):
    from .engine import Engine

    return Engine(
        args.model, device=args.device, n_ctx=args.n_ctx, progress=_progress(args), **engine_options_from_args(args)
    )


def build_parser(with_server: bool = True) -> argparse.ArgumentParser:
    """The argument parser of the `helexa-native` command.

    with_server=False leaves out the server's own options, which saves
    importing Flask when another command runs.
    """
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="Run llama-family models from GGUF or safetensors on NVIDIA GPUs or the CPU."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("generate", help="complete a prompt")
    p.add_argument("prompt", help="prompt text ('-' reads stdin)")
    p.add_argument(
        "--chat", action="store_true", help="send the prompt as a user message through the model's chat template"
    )
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.add_argument(
        "--logprobs",
        type=int,
        default=None,
        metavar="N",
        help="with --json: log-probabilities with N alternatives per token",
    )
    p.add_argument("--stats", action="store_true", help="print timings to stderr")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (/reset clears the history, EOF exits)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--stats", action="store_true", help="print timings after each answer")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="describe a model file or folder")
    p.add_argument(
        "model_path",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="GGUF file or Hugging Face folder (default: --model, else the bundled model)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--load", action="store_true", help="also load the model on --device and report the engine's view")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="measure prefill and decode speed at batch 1")
    p.add_argument("--prompt-tokens", "-p", type=int, default=512, help="prefill length (default 512)")
    p.add_argument("--decode-tokens", "-d", type=int, default=128, help="decode length (default 128)")
    p.add_argument(
        "--depth", type=int, default=0, help="tokens already in the KV cache before the timed run (default 0)"
    )
    p.add_argument("--repeats", "-r", type=int, default=3, help="timed runs; medians reported (default 3)")
    p.add_argument(
        "--concurrency",
        default=None,
        metavar="N,N,...",
        help="instead of batch 1: N concurrent streams for each N (e.g. 1,8,16,32,64): "
        "aggregate decode tok/s, inter-token latency and time to first token",
    )
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up run")
    p.add_argument(
        "--synthetic",
        default=None,
        metavar="PRESET:QUANT",
        help="benchmark a synthetic model written to a temp dir (e.g. llama3-8b:Q4_K_M, "
        "smollm2-135m:Q4_0, llama3-8b:bf16)",
    )
    p.add_argument(
        "--synthetic-layers",
        type=int,
        default=None,
        metavar="N",
        help="with --synthetic: only N decoder layers (quick runs)",
    )
    p.add_argument(
        "--json",
        dest="json_file",
        default=None,
        metavar="FILE",
        help="also write the numbers as JSON to FILE ('-' for stdout only)",
    )
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server", conflict_handler="resolve")
    _add_model_args(p)
    _add_sampling_args(p)
    server = _server_module() if with_server else None
    if server is not None and hasattr(server, "add_serve_arguments"):
        server.add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    return parser


def _server_module():
    try:
        from . import server
    except ImportError:
        return None
    return server


# ---------------------------------------------------------------------------
# commands


def _read_prompt(text: str) -> str:
    if text == "-":
        return sys.stdin.read()
    return text


def cmd_generate(args) -> int:
    prompt = _read_prompt(args.prompt)
    sampling = _sampling(args)
    if args.logprobs is not None:
        sampling["logprobs"] = True
        sampling["top_logprobs"] = args.logprobs
    if args.system and not args.chat:
        raise ValueError("--system needs --chat")
    _check_sampling(sampling)
    with _engine(args) as eng:
        if args.chat:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            messages.append({"role": "user", "content": prompt})
            stream = eng.chat_stream(messages, **sampling)
        else:
            stream = eng.generate_stream(prompt, **sampling)
        if args.json:
            from .engine import collect_stream

            r = collect_stream(stream, [])
            out = {
                "text": r.text,
                "token_ids": r.token_ids,
                "finish_reason": r.finish_reason,
                "stop_reason": r.stop_reason,
                "usage": r.usage,
                "timings": r.timings,
                "seed": r.seed,
            }
            if r.logprobs is not None:
                out["logprobs"] = r.logprobs
            print(json.dumps(out, ensure_ascii=False, indent=2))
            last = r
        else:
            last = _print_stream(stream)
            sys.stdout.write("\n")
            sys.stdout.flush()
    if args.stats:
        _print_stats(last)
    return 0


def _print_stream(stream):
    last = None
    try:
        for ch in stream:
            if ch.text:
                sys.stdout.write(ch.text)
                sys.stdout.flush()
            last = ch
    finally:
        stream.close()
    return last


def _print_stats(r) -> None:
    if r is None or r.timings is None:
        return
    t, u = r.timings, r.usage
    ttft = t.get("time_to_first_token_ms")
    print(
        f"[{u['prompt_tokens']} prompt tokens ({t.get('cached_prompt_tokens', 0)} cached), "
        f"{u['completion_tokens']} generated, finish: {r.finish_reason}; "
        f"prefill {t['prefill_tokens_per_s']:.1f} tok/s, decode {t['decode_tokens_per_s']:.1f} tok/s"
        + (f", first token {ttft:.0f} ms" if ttft is not None else "")
        + f", seed {r.seed}]",
        file=sys.stderr,
    )


def cmd_chat(args) -> int:
    sampling = _sampling(args)
    _check_sampling(sampling)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    # A conversation re-sends its history each turn: reuse its KV cache.
    with _engine(args) as eng:
        system = [{"role": "system", "content": args.system}] if args.system else []
        history: List[dict] = []
        if interactive:
            print(
                f"{eng.model_path.name} on {eng.device}. /reset clears the conversation, Ctrl-D exits.", file=sys.stderr
            )
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                if interactive:
                    print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:
                print(file=sys.stderr)
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/reset", "/clear"):
                history = []
                print("(conversation cleared)", file=sys.stderr)
                continue
            if text in ("/exit", "/quit"):
                return 0
            history.append({"role": "user", "content": line})
            stream = eng.chat_stream(system + history, **sampling)
            parts = []
            last = None
            try:
                for ch in stream:
                    if ch.text:
                        sys.stdout.write(ch.text)
                        sys.stdout.flush()
                        parts.append(ch.text)
                    last = ch
            except KeyboardInterrupt:
                # Ctrl-C stops this answer, not the session.
                pass
            finally:
                stream.close()
            sys.stdout.write("\n")
            sys.stdout.flush()
            history.append({"role": "assistant", "content": "".join(parts)})
            if args.stats:
                _print_stats(last)


def cmd_info(args) -> int:
    path = args.model_path or args.model
    if args.load:
        args.model = path
        with _engine(args) as eng:
            info = eng.info()
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            _print_info(info.get("source", {}), engine=info)
        return 0
    from .engine import default_model_path
    from .loaders import describe, load_source

    src = load_source(path if path is not None else default_model_path(), progress=_progress(args))
    try:
        d = describe(src)
    finally:
        src.close()
    if args.json:
        print(json.dumps(d, indent=2, default=str))
    else:
        _print_info(d)
    return 0


def _print_info(d: dict, engine: Optional[dict] = None) -> None:
    def row(k, v):
        print(f"{k:<20} {v}")

    for k in (
        "path",
        "format",
        "name",
        "arch",
        "params",
        "active_params",
        "context_length",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
        "mlp_only_layers",
        "rope_theta",
        "rope_style",
        "rope_scaling",
        "rms_norm_eps",
        "tie_word_embeddings",
        "attention_bias",
        "qk_norm",
        "tensor_bytes",
        "bits_per_weight",
        "file_size",
        "files",
        "tokenizer",
        "bos_token_id",
        "eos_token_ids",
        "chat_template",
    ):
        if k in d and d[k] is not None:
            v = d[k]
            if k == "bits_per_weight":
                v = f"{v:.2f}"
            elif (
                isinstance(v, int)
                and not isinstance(v, bool)
                and k in ("params", "active_params", "tensor_bytes", "file_size")
            ):
                v = f"{v:,}"
            row(k, v)
    types = d.get("tensor_types") or {}
    if types:
        row("tensor types", ", ".join(f"{t} x{e['count']} ({e['bytes'] / 2**20:.1f} MiB)" for t, e in types.items()))
    if engine:
        row("device", engine.get("device"))
        row("n_ctx", engine.get("n_ctx"))
        row("load_seconds", engine.get("load_seconds"))
        for k, v in (engine.get("memory") or {}).items():
            row(k, v)


def cmd_bench(args) -> int:
    from .bench import format_report, run_bench

    if args.synthetic_layers is not None and not args.synthetic:
        raise ValueError("--synthetic-layers needs --synthetic")
    r = run_bench(
        args.model,
        device=args.device,
        n_ctx=args.n_ctx,
        prompt_tokens=args.prompt_tokens,
        decode_tokens=args.decode_tokens,
        depth=args.depth,
        repeats=args.repeats,
        warmup=args.warmup,
        synthetic=args.synthetic,
        progress=_progress(args),
        concurrency=_int_list(args.concurrency) if args.concurrency is not None else None,
        engine_options={k: v for k, v in engine_options_from_args(args).items() if v is not None},
        synthetic_overrides=({"n_layers": args.synthetic_layers} if args.synthetic_layers is not None else None),
    )
    if args.json_file == "-":
        print(json.dumps(r, indent=2, default=str))
        return 0
    print(format_report(r))
    if args.json_file:
        with open(args.json_file, "w") as f:
            json.dump(r, f, indent=2, default=str)
    return 0


def cmd_serve(args) -> int:
    server = _server_module()
    if server is None or not hasattr(server, "run_from_args"):
        raise RuntimeError("the HTTP server is not available in this installation")
    rc = server.run_from_args(args)
    return int(rc or 0)


# ---------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of `helexa-native`; returns the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(with_server="serve" in argv or "-h" in argv or "--help" in argv)
    args = parser.parse_args(argv)
    try:
        if _is_follower(args):
            return _run_follower(args)
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into a reader that went away (e.g. `| head`): stop
        # quietly, and keep the interpreter's final flush from failing again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except Exception as e:  # every failure becomes one line, not a traceback
        print(f"{PROG}: error: {_describe_error(e)}", file=sys.stderr)
        return 1


def _is_follower(args) -> bool:
    """Whether this process is a follower rank of a torchrun tensor-parallel launch."""
    tp = getattr(args, "tensor_parallel", None)
    if tp is None or tp <= 1:
        return False
    from .parallel.distributed import is_follower

    return is_follower(tp)


def _run_follower(args) -> int:
    # Whatever the command, a follower only serves rank 0's steps: it never
    # reads stdin, prints results or listens on a port.
    from .parallel.distributed import launch_from_env
    from .parallel.launch import run_follower

    rank = launch_from_env().rank
    try:
        return run_follower(
            getattr(args, "model_path", None) or args.model, args.device, args.tensor_parallel, progress=_progress(args)
        )
    except Exception as e:
        print(f"{PROG}: error: rank {rank}: {_describe_error(e)}", file=sys.stderr)
        return 1


def _describe_error(e: BaseException) -> str:
    from .errors import HelexaError

    msg = str(e).strip() or type(e).__name__
    if isinstance(e, (HelexaError, ValueError, OSError)):
        return msg
    return f"{type(e).__name__}: {msg}"


if __name__ == "__main__":
    sys.exit(main())
