"""Drive a running helexa-native server with N concurrent streaming OpenAI clients.

    python tools/load_test.py --base-url http://127.0.0.1:8000/v1 --concurrency 1,8,32 \
        --prompt-tokens 512 --max-tokens 128

Each client sends its own prompt (random words, so the prefix cache cannot
serve it) as a streaming completion with the official `openai` client and
records when each streamed token arrives (where the `openai` package is not
installed, a small standard-library client speaks the same streaming protocol). Per N it prints the same figures
as `helexa-native bench --concurrency`: aggregate decode tok/s once all N
streams have started, tokens over the whole wall time, inter-token latency p50/p99
and time to first token p50/p99. Before each timed round a shorter one of
N streams (at most 16 tokens, other prompts) lets the server record its
CUDA graphs for those batch sizes (--no-warmup skips it). Requests are
bounded (at most two rounds of N per N), and only the given base URL is
contacted.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time


def _percentile(xs, q):
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100.0 * (len(xs) - 1)))))]


WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
    "sigma tau upsilon phi chi psi omega river stone cloud field light ember maple orbit"
).split()


def _prompt(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


class _Obj:
    """Attribute access over a decoded JSON object."""

    def __init__(self, d):
        self.__dict__.update({k: _wrap(v) for k, v in d.items()})


def _wrap(v):
    if isinstance(v, dict):
        return _Obj(v)
    if isinstance(v, list):
        return [_wrap(x) for x in v]
    return v


class StdlibClient:
    """The two calls this script makes (models.list, streaming completions.create) over urllib."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 600):
        self.base, self.key, self.timeout = base_url.rstrip("/"), api_key, timeout
        self.models = _Obj({})
        self.models.list = self._models
        self.completions = _Obj({})
        self.completions.create = self._create

    def _request(self, path, body=None):
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method="GET" if body is None else "POST")
        req.add_header("Authorization", f"Bearer {self.key}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        return urllib.request.urlopen(req, timeout=self.timeout)

    def _models(self):
        with self._request("/models") as r:
            return _wrap(json.loads(r.read()))

    def _create(self, extra_body=None, **kw):
        body = dict(kw, **(extra_body or {}))
        with self._request("/completions", body) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                yield _wrap(json.loads(payload))


def run_round(client, model, n, prompt_words, max_tokens, seed):
    rng = random.Random(seed)
    prompts = [_prompt(rng, prompt_words) for _ in range(n)]
    stamps = [[] for _ in range(n)]
    errors = []
    t0 = time.perf_counter()

    def one(i):
        try:
            stream = client.completions.create(
                model=model,
                prompt=prompts[i],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for ev in stream:
                if ev.choices and ev.choices[0].text:
                    stamps[i].append(time.perf_counter())
        except Exception as e:  # reported, never retried
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_end = time.perf_counter()
    firsts = [s[0] for s in stamps if s]
    t_all = max(firsts) if firsts else t_end
    steady = sum(1 for s in stamps for x in s if x > t_all)
    itl = [b - a for s in stamps for a, b in zip(s, s[1:])]
    # Time per output token after the first, per stream: independent of how
    # the server groups tokens into chunks (ITL is not).
    tpot = [(s[-1] - s[0]) / (len(s) - 1) for s in stamps if len(s) > 1]
    total = sum(len(s) for s in stamps)
    return {
        "concurrency": n,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "streamed_chunks": total,
        "aggregate_decode_tokens_per_s": steady / (t_end - t_all) if t_end > t_all else 0.0,
        "tokens_per_s_wall": total / (t_end - t0),
        "wall_seconds": t_end - t0,
        "itl_ms_p50": 1e3 * _percentile(itl, 50),
        "itl_ms_p99": 1e3 * _percentile(itl, 99),
        "tpot_ms_p50": 1e3 * _percentile(tpot, 50),
        "tpot_ms_p99": 1e3 * _percentile(tpot, 99),
        "ttft_ms_p50": 1e3 * _percentile([f - t0 for f in firsts], 50),
        "ttft_ms_p99": 1e3 * _percentile([f - t0 for f in firsts], 99),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model", default=None, help="model id (default: the server's first)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="approximate prompt length")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--json", dest="json_file", default=None)
    ap.add_argument("--no-warmup", action="store_true", help="time each N without a shorter round first")
    args = ap.parse_args(argv)
    try:
        from openai import OpenAI

        client = OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=600, max_retries=0)
    except ImportError:
        client = StdlibClient(args.base_url, args.api_key)
    model = args.model
    if model is None:
        listed = client.models.list().data
        if not listed:
            print("the server lists no model yet (still loading?): wait for it, or pass --model", file=sys.stderr)
            return 2
        model = listed[0].id
    rows = []
    words = max(1, args.prompt_tokens // 2)
    for i, n in enumerate(int(x) for x in args.concurrency.split(",")):
        if not args.no_warmup:
            warm = run_round(client, model, n, words, max(1, min(args.max_tokens, 16)), seed=10_000 + i)
            if warm["errors"]:
                print(f"N={n:>3}  warm-up: {warm['errors']} errors, first: {warm['first_error']}", flush=True)
        rows.append(run_round(client, model, n, words, args.max_tokens, seed=i))
        r = rows[-1]
        print(
            f"N={n:>3}  agg {r['aggregate_decode_tokens_per_s']:8.1f} tok/s  wall {r['tokens_per_s_wall']:8.1f}"
            f"  TPOT p50 {r['tpot_ms_p50']:6.2f} ms p99 {r['tpot_ms_p99']:6.2f} ms"
            f"  ITL p50 {r['itl_ms_p50']:6.2f} ms p99 {r['itl_ms_p99']:6.2f} ms"
            f"  TTFT p50 {r['ttft_ms_p50']:7.1f} ms p99 {r['ttft_ms_p99']:7.1f} ms  errors {r['errors']}",
            flush=True,
        )
    if args.json_file:
        with open(args.json_file, "w") as f:
            json.dump(rows, f, indent=2)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
