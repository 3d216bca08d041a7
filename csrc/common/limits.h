// Limits shared by the kernels, the forward and the bindings. Needs no CUDA
// header: the extension exports them to Python in every build
// (_C.MAX_TOP_LOGPROBS), and tests/test_native_constants.py checks that
// helexa_native/defaults.py holds the same values.
#pragma once

namespace hx {

// Most alternatives a step reports beside the sampled token's logprob
// (OpenAI's top_logprobs bound; the device sampler keeps this many
// candidates per thread).
constexpr int kMaxTopLogprobs = 20;

// Most decode steps one job runs (model_decode_steps).
constexpr int kMaxDecodeSteps = 64;

}  // namespace hx
