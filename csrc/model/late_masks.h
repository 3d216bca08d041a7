// Token masks that reach a step after it started.
//
// Structured outputs need one allowed-token bitmask per constrained row, and
// computing them costs host time per row (the grammar engine walks its
// state). A step that carries LateMasks launches its forward at once and
// waits for the masks only when its sampler needs them, so another thread
// fills the table while the device runs the layers. The filler writes rows
// into `data()` and then calls ready() (or fail() with a reason); the worker
// thread calls wait() before reading any row.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace hx {

class LateMasks {
 public:
  // rows x words int32 words, every bit clear (nothing allowed) until filled.
  LateMasks(int rows, int words);

  int rows() const { return rows_; }
  int words() const { return words_; }
  int32_t* data() { return table_.data(); }
  const int32_t* row(int r) const { return table_.data() + static_cast<size_t>(r) * words_; }

  // The filler's side: every row is written / the masks will not come.
  void ready();
  void fail(const std::string& why);
  // Back to pending for another step; only while no step holds the table.
  void reset();

  // Blocks until ready(); throws std::invalid_argument on fail(),
  // std::runtime_error after `limit`.
  void wait(std::chrono::milliseconds limit) const;

 private:
  enum class State { kPending, kReady, kFailed };
  int rows_, words_;
  std::vector<int32_t> table_;
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  State state_ = State::kPending;
  std::string why_;
};

}  // namespace hx
