// Argument checks for the torch ops: HX_OP_CHECK(cond, parts...) raises the
// same c10::Error as TORCH_CHECK (a RuntimeError in Python), but builds its
// message by plain string concatenation (std::to_string for numbers).
//
// Streaming numbers through c10::str's std::ostringstream from this extension
// crashes the process on some toolchain pairings (libstdc++'s numeric facets
// as inlined here disagree with the runtime library), so the ops never format
// a message through a stream. Strings, numbers, dtypes and devices only.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <string>
#include <type_traits>

namespace hx {
namespace opcheck {

inline void append(std::string& s, const char* v) { s += v ? v : "(null)"; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
inline void append(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void append(std::string& s, const c10::Device& d) { s += d.str(); }
template <class T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
void append(std::string& s, T v) {
  s += std::to_string(v);
}

template <class... A>
std::string message(const A&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

}  // namespace opcheck
}  // namespace hx

// TORCH_CHECK builds its message only when cond fails; a single std::string
// argument goes through without a stream.
#define HX_OP_CHECK(cond, ...) TORCH_CHECK(cond, ::hx::opcheck::message(__VA_ARGS__))
