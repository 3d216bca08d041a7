"""The helexa-native command, run as a subprocess the way users run it."""

import json
import os
import subprocess
import sys

import pytest


def run(*args, stdin=None, timeout=600):
    env = dict(os.environ, HELEXA_NO_PROGRESS="1")
    return subprocess.run(
        [sys.executable, "-m", "helexa_native", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_one_line_error(p, *words):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("helexa-native: error:"), p.stderr
    for w in words:
        assert w in lines[0]


def test_generate_streams_answer(default_model):
    p = run(
        "generate",
        "What is 2 + 2?",
        "--chat",
        "--model",
        str(default_model),
        "--device",
        "cpu",
        "--temperature",
        "0",
        "--max-tokens",
        "16",
    )
    assert p.returncode == 0, p.stderr
    assert "4" in p.stdout
    assert "Traceback" not in p.stderr


def test_generate_json(default_model):
    p = run(
        "generate",
        "The capital of France is",
        "--json",
        "--temperature",
        "0",
        "--max-tokens",
        "3",
        "--logprobs",
        "2",
        "--device",
        "cpu",
        "--seed",
        "4",
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["usage"]["completion_tokens"] == len(r["token_ids"]) == 3
    assert r["finish_reason"] == "length" and r["seed"] == 4
    assert len(r["logprobs"]) == 3 and len(r["logprobs"][0]["top_logprobs"]) == 2


def test_info_human_and_json(default_model):
    p = run("info", str(default_model))
    assert p.returncode == 0, p.stderr
    assert "llama" in p.stdout and "Q4_1" in p.stdout and "49152" in p.stdout
    p = run("info", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["arch"] == "llama" and d["num_layers"] == 30 and d["path"].endswith(".gguf")


def test_chat_repl_multi_turn_reset_and_eof(default_model):
    p = run(
        "chat",
        "--device",
        "cpu",
        "--temperature",
        "0",
        "--max-tokens",
        "16",
        stdin="What is 2 + 2?\n/reset\nWho wrote Romeo and Juliet?\n",
    )
    assert p.returncode == 0, p.stderr
    answers = [line for line in p.stdout.splitlines() if line.strip()]
    assert "4" in answers[0]
    assert "Shakespeare" in p.stdout
    assert "cleared" in p.stderr


def test_bench_writes_json(tmp_path, default_model):
    out = tmp_path / "bench.json"
    p = run("bench", "--device", "cpu", "-p", "16", "-d", "4", "-r", "1", "--json", str(out))
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["prompt_tokens"] == 16 and r["decode_tokens"] == 4
    assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
    assert r["weight_bytes"] > 50_000_000
    assert r["achieved_gb_per_s"] == pytest.approx(r["weight_bytes"] * r["decode_tokens_per_s"] / 1e9)
    assert "decode" in p.stdout and "tok/s" in p.stdout


def test_bench_concurrency_reports_each_level(tmp_path):
    out = tmp_path / "c.json"
    p = run(
        "bench",
        "--synthetic",
        "smollm2-135m:Q4_0",
        "--synthetic-layers",
        "2",
        "--device",
        "cpu",
        "-p",
        "8",
        "-d",
        "3",
        "--concurrency",
        "1,3",
        "--no-warmup",
        "--json",
        str(out),
    )
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["concurrency"]
    assert [r["concurrency"] for r in rows] == [1, 3]
    for r in rows:
        assert r["generated_tokens"] == 3 * r["concurrency"]
        assert r["tokens_per_s_wall"] > 0 and r["ttft_ms_p50"] > 0 and r["itl_ms_p99"] >= r["itl_ms_p50"]
        # A stream of 3 tokens: TPOT is its mean gap, between its smallest and largest.
        assert 0 < r["tpot_ms_p50"] <= r["tpot_ms_p99"] <= r["itl_ms_p99"] + 1e-9
    assert "agg tok/s" in p.stdout


def test_bench_synthetic(tmp_path):
    out = tmp_path / "b.json"
    p = run(
        "bench",
        "--synthetic",
        "smollm2-135m:Q4_0",
        "--synthetic-layers",
        "2",
        "--device",
        "cpu",
        "-p",
        "8",
        "-d",
        "2",
        "-r",
        "1",
        "--no-warmup",
        "--json",
        str(out),
    )
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["synthetic"] == "smollm2-135m:Q4_0" and r["decode_tokens_per_s"] > 0
    # Two Q4_0 layers plus the Q4_0/Q8_0 embedding: far less than the full model.
    assert 5_000_000 < r["weight_bytes"] < 40_000_000


@pytest.mark.parametrize(
    "args,words",
    [
        (("generate", "hi", "--temperature", "-1"), ("temperature",)),
        (("generate", "hi", "--top-p", "0"), ("top_p",)),
        (("generate", "hi", "--model", "/no/such/model.gguf"), ("/no/such/model.gguf",)),
        (("info", "/no/such/model.gguf"), ("/no/such/model.gguf",)),
        (("generate", "hi", "--device", "tpu"), ("device",)),
        (("bench", "--synthetic", "nonsense"), ("PRESET:QUANT",)),
        (("bench", "--synthetic", "gpt5:Q4_0"), ("gpt5",)),
        (("bench", "--synthetic-layers", "2"), ("--synthetic",)),
        (("bench", "--concurrency", "0,4"), ("positive",)),
        (("generate", "hi", "--kv-cache-memory", "lots"), ("byte size",)),
        (("serve", "--port", "99999"), ("port",)),
        (("generate", "hi", "--decode-steps", "0"), ("decode_steps",)),
    ],
)
def test_errors_are_one_line(args, words, capsys):
    # In-process: the same main() the console script runs, without a fresh interpreter.
    from helexa_native.cli import main

    rc = main(list(args))
    err = capsys.readouterr().err
    assert_one_line_error(subprocess.CompletedProcess(args, rc, "", err), *words)


def test_decode_steps_reaches_the_engine(default_model):
    from helexa_native.cli import _engine, build_parser

    args = build_parser().parse_args(["generate", "hi", "--device", "cpu", "--decode-steps", "3"])
    with _engine(args) as eng:
        assert eng.decode_steps == 3


def test_max_batch_tokens_reaches_the_engine(default_model):
    from helexa_native.cli import _engine, build_parser

    args = build_parser().parse_args(["generate", "hi", "--device", "cpu", "--max-batch-tokens", "96"])
    with _engine(args) as eng:
        assert eng._scheduler.max_batch_tokens == 96


def test_every_passthrough_sampling_field_has_a_flag():
    import argparse

    from helexa_native.cli import _add_sampling_args
    from helexa_native.request_params import PASSTHROUGH_FIELDS

    p = argparse.ArgumentParser()
    _add_sampling_args(p)
    assert set(PASSTHROUGH_FIELDS) <= set(vars(p.parse_args([])))


def test_not_a_model_file_from_the_console(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"hello")
    assert_one_line_error(run("info", str(bad)), "GGUF")


def test_cuda_without_cuda_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert_one_line_error(run("generate", "hi", "--device", "cuda"), "CUDA")


def test_version_and_usage_errors():
    p = run("--version")
    assert p.returncode == 0 and "helexa-native" in p.stdout
    p = run()
    assert p.returncode == 2 and "Traceback" not in p.stderr
