#include "runtime/registry.h"

#include <map>
#include <mutex>
#include <vector>

namespace hx {

namespace {

struct Registry {
  std::mutex mu;
  std::map<int, std::shared_ptr<DeviceWorker>> workers;
};

// Never destroyed: joining worker threads from a static destructor would run
// CUDA teardown after the CUDA runtime itself may be gone. Orderly shutdown is
// shutdown_all_workers() (Python calls it at exit).
Registry& registry() {
  static Registry* r = new Registry();
  return *r;
}

}  // namespace

std::shared_ptr<DeviceWorker> acquire_worker(int device_index) {
  if (device_index < 0) return std::make_shared<DeviceWorker>(-1);
  Registry& r = registry();
  // Held while a new worker starts, so two callers cannot both create one.
  std::lock_guard<std::mutex> lk(r.mu);
  auto it = r.workers.find(device_index);
  if (it != r.workers.end()) {
    if (!it->second->is_shut_down()) return it->second;
    // Its thread may still be tearing down: never two threads on one device.
    it->second->shutdown();
  }
  auto w = std::make_shared<DeviceWorker>(device_index);
  r.workers[device_index] = w;
  return w;
}

void shutdown_all_workers() {
  std::vector<std::shared_ptr<DeviceWorker>> all;
  {
    Registry& r = registry();
    std::lock_guard<std::mutex> lk(r.mu);
    for (auto& kv : r.workers) all.push_back(kv.second);
    r.workers.clear();
  }
  for (auto& w : all) w->begin_shutdown();
  for (auto& w : all) w->shutdown();
}

}  // namespace hx
