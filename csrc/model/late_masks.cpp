#include "model/late_masks.h"

#include <stdexcept>

namespace hx {

LateMasks::LateMasks(int rows, int words) : rows_(rows), words_(words) {
  if (rows < 1 || words < 1) throw std::invalid_argument("late masks need at least one row and one word");
  table_.assign(static_cast<size_t>(rows) * static_cast<size_t>(words), 0);
}

void LateMasks::ready() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (state_ != State::kPending) throw std::logic_error("late masks were already delivered or failed");
    state_ = State::kReady;
  }
  cv_.notify_all();
}

void LateMasks::fail(const std::string& why) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (state_ != State::kPending) throw std::logic_error("late masks were already delivered or failed");
    state_ = State::kFailed;
    why_ = why.empty() ? "unknown error" : why;
  }
  cv_.notify_all();
}

void LateMasks::reset() {
  std::lock_guard<std::mutex> lk(mu_);
  state_ = State::kPending;
  why_.clear();
}

void LateMasks::wait(std::chrono::milliseconds limit) const {
  std::unique_lock<std::mutex> lk(mu_);
  if (!cv_.wait_for(lk, limit, [this] { return state_ != State::kPending; }))
    throw std::runtime_error("the step's token masks did not arrive within " + std::to_string(limit.count() / 1000) +
                             " s");
  // Not a device fault: the step's input never came.
  if (state_ == State::kFailed) throw std::invalid_argument("the step's token masks could not be computed: " + why_);
}

}  // namespace hx
