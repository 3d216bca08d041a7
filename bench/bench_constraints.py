"""Time structured-output masks on the default model's vocabulary.

Walks a JSON document, token by token, through a compiled JSON schema and
times every mask (the numbers quoted in helexa_native/constraints.py). With
`--xgrammar` it times xgrammar on the same walk when that package is
importable (it is not a dependency).

    python bench/bench_constraints.py [--any] [--passes 3] [--xgrammar]
"""

import argparse
import json
import statistics
import time

from helexa_native.engine import default_model_path
from helexa_native.loaders import load_source
from helexa_native.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "status": {"enum": ["active", "inactive", "pending"]},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "email", "tags", "address", "status", "score"],
    "additionalProperties": False,
}
DOC = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "tags": ["math", "engines", "poetry"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"},
    "status": "active",
    "score": 97.25,
}


def summary(name, times):
    t = sorted(times)
    print(
        f"{name}: {len(t)} masks, median {statistics.median(t) * 1e6:.0f} us, "
        f"mean {statistics.mean(t) * 1e6:.0f} us, max {t[-1] * 1e6:.0f} us"
    )


def bench_llguidance(tok, schema, ids, passes):
    from helexa_native.constraints import GrammarCompiler, json_schema_spec

    t0 = time.perf_counter()
    comp = GrammarCompiler(tok)
    print(f"llguidance: tokenizer setup {time.perf_counter() - t0:.3f} s")
    spec = json_schema_spec(schema)
    t0 = time.perf_counter()
    compiled = comp.compile(spec)
    print(f"  schema compile {(time.perf_counter() - t0) * 1e3:.2f} ms")
    t0 = time.perf_counter()
    for _ in range(20):
        compiled.matcher()
    print(f"  matcher from compiled {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms")
    times = []
    for _ in range(passes):
        m = compiled.matcher()
        mask = None
        for t in ids + [None]:
            a = time.perf_counter()
            mask = m.fill_mask(mask)
            times.append(time.perf_counter() - a)
            if t is not None and not m.accept(t):
                raise SystemExit(f"token {t} rejected: {m.error}")
    summary("  fill_mask", times)


def bench_xgrammar(tok, schema, ids, passes):
    try:
        import xgrammar as xgr
    except ImportError:
        print("xgrammar: not installed")
        return
    vocab = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(
        vocab, vocab_type=xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=tok.eos_token_ids
    )
    comp = xgr.GrammarCompiler(info, max_threads=1)
    print(f"xgrammar: tokenizer setup {time.perf_counter() - t0:.3f} s")
    t0 = time.perf_counter()
    cg = comp.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))
    print(f"  schema compile {(time.perf_counter() - t0) * 1e3:.2f} ms")
    mask = xgr.allocate_token_bitmask(1, len(vocab))
    times = []
    for _ in range(passes):
        m = xgr.GrammarMatcher(cg)
        for t in ids + [None]:
            a = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - a)
            if t is not None and not m.accept_token(t):
                raise SystemExit(f"token {t} rejected")
    summary("  fill_next_token_bitmask", times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--any", action="store_true", help="schema {'type': 'object'} instead of the fixed one")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--xgrammar", action="store_true")
    args = ap.parse_args()
    source = load_source(default_model_path())
    tok = Tokenizer.from_source(source.tokenizer)
    schema = {"type": "object"} if args.any else SCHEMA
    ids = tok.encode(json.dumps(DOC), add_special_tokens=False)
    print(f"vocabulary {tok.vocab_size}, document {len(ids)} tokens")
    bench_llguidance(tok, schema, ids, args.passes)
    if args.xgrammar:
        bench_xgrammar(tok, schema, ids, args.passes)


if __name__ == "__main__":
    main()
