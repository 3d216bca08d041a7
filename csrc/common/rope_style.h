// How rotary position embedding pairs the elements of a head: the loaders'
// ModelConfig.rope_style ("half" | "pairs"), shared by the rope kernels, the
// model spec and the bindings. Needs no CUDA header.
#pragma once

#include <cstdint>
#include <string>

namespace hx {

enum class RopeStyle : int32_t {
  Half = 0,   // "half" (HF rotate_half): pairs (x[i], x[i + d/2])
  Pairs = 1,  // "pairs" (GGML normal mode): pairs (x[2i], x[2i + 1])
};

// The config's name of a style ("half" / "pairs"); "unknown" outside the enum.
inline const char* rope_style_name(RopeStyle s) {
  switch (s) {
    case RopeStyle::Half: return "half";
    case RopeStyle::Pairs: return "pairs";
  }
  return "unknown";
}

// The style the config names; false (and *out untouched) for any other name.
inline bool rope_style_from_name(const std::string& name, RopeStyle* out) {
  if (name == "half") {
    *out = RopeStyle::Half;
    return true;
  }
  if (name == "pairs") {
    *out = RopeStyle::Pairs;
    return true;
  }
  return false;
}

// True for the values the enum names (a cast from an integer may give others).
inline bool is_rope_style(RopeStyle s) { return s == RopeStyle::Half || s == RopeStyle::Pairs; }

}  // namespace hx
