"""Facts the extension and the Python package both state agree (every build, CPU ones too)."""

import helexa_native._C as C
from helexa_native import defaults
from helexa_native.ggml_types import GGML_TYPE_IDS


def test_top_logprobs_limit_is_the_samplers():
    assert C.MAX_TOP_LOGPROBS == defaults.MAX_TOP_LOGPROBS


def test_decode_steps_limit_is_the_models():
    assert C.MAX_DECODE_STEPS == defaults.MAX_DECODE_STEPS


def test_ggml_type_ids_are_the_kernels():
    assert dict(C.GGML_TYPE_IDS) == GGML_TYPE_IDS
