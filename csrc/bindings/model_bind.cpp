// Python side of the GPU model: `_C.GpuModelHandle`, a handle to the GpuModel
// (llama_model.h) living in a device worker's slab, plus the small value types
// its calls take (ModelSpec, StepSampling, PenaltyUpdate, SeqInput, HiddenPooling) and
// `_C.PendingStep`, a step submitted without waiting (the tensor-parallel
// backends submit every rank's step before waiting on any).
//
// Every method submits one job and waits for it with the GIL released; the
// worker thread does all CUDA work. The one exception is abort(), which only
// writes the model's host-mapped abort word and aborts the worker's NCCL
// communicator (the watchdog's call, made while the worker is stuck). Without
// CUDA this file binds nothing, and `_C.cuda` tells Python so.
#include "bindings/bind.h"

#ifdef HX_WITH_CUDA
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "model/model_api.h"
#include "runtime/registry.h"
#include "runtime/worker.h"

namespace py = pybind11;

namespace hx {
namespace {

// A 1-D buffer (numpy array, anything with the buffer protocol; None: empty)
// as a vector of T, converted when its dtype differs.
template <class T>
std::vector<T> vector_of(const py::object& obj, const char* name) {
  if (obj.is_none()) return {};
  auto arr = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(obj);
  if (!arr) throw py::type_error(std::string(name) + " must be a 1-D array of numbers or None");
  if (arr.ndim() != 1) throw py::value_error(std::string(name) + " must be 1-D");
  return std::vector<T>(arr.data(), arr.data() + arr.size());
}

// (token or -1, logprob | None, [(id, logprob)] | None, logits | None)
py::tuple step_result_to_py(const StepResult& r, bool want_logits) {
  py::object lp = py::none();
  py::object top = py::none();
  if (r.has_logprob) {
    lp = py::float_(r.logprob);
    py::list l;
    for (const auto& p : r.top) l.append(py::make_tuple(p.first, p.second));
    top = l;
  }
  py::object logits = py::none();
  if (want_logits && !r.logits.empty()) {
    py::array_t<float> arr(static_cast<py::ssize_t>(r.logits.size()));
    std::copy(r.logits.begin(), r.logits.end(), arr.mutable_data());
    logits = arr;
  }
  return py::make_tuple(r.token, lp, top, logits);
}

// A step (or forward) job submitted without waiting. wait() releases the GIL
// and may learn the job's duration like a JobWaiter; result() returns what
// the waiting call would have (or raises its error).
class PendingStep {
 public:
  PendingStep(std::shared_future<std::vector<StepResult>> f, std::vector<char> want_logits,
              std::shared_ptr<std::atomic<bool>> started, std::shared_ptr<JobWaiter> waiter)
      : step_(std::move(f)), want_(std::move(want_logits)), started_(std::move(started)), waiter_(std::move(waiter)) {}
  // shape: of the float array result() returns.
  PendingStep(std::shared_future<std::vector<float>> f, std::vector<py::ssize_t> shape,
              std::shared_ptr<std::atomic<bool>> started, std::shared_ptr<JobWaiter> waiter)
      : logits_(std::move(f)), shape_(std::move(shape)), started_(std::move(started)), waiter_(std::move(waiter)) {}

  bool wait(double timeout_s, bool learn) {
    const auto limit = std::chrono::nanoseconds(static_cast<int64_t>(std::max(0.0, timeout_s) * 1e9));
    py::gil_scoped_release nogil;
    if (learn && waiter_) return step_.valid() ? waiter_->wait_for(step_, limit) : waiter_->wait_for(logits_, limit);
    const auto st = step_.valid() ? step_.wait_for(limit) : logits_.wait_for(limit);
    return st == std::future_status::ready;
  }
  bool done() const {
    const auto zero = std::chrono::seconds(0);
    return (step_.valid() ? step_.wait_for(zero) : logits_.wait_for(zero)) == std::future_status::ready;
  }
  bool started() const { return started_ && started_->load(); }

  py::object result() {
    if (step_.valid()) {
      const std::vector<StepResult>* rs = nullptr;
      {
        py::gil_scoped_release nogil;
        rs = &step_.get();
      }
      py::list out;
      for (size_t i = 0; i < rs->size(); ++i) out.append(step_result_to_py((*rs)[i], i < want_.size() && want_[i]));
      return out;
    }
    const std::vector<float>* v = nullptr;
    {
      py::gil_scoped_release nogil;
      v = &logits_.get();
    }
    py::ssize_t n = 1;
    for (py::ssize_t d : shape_) n *= d;
    if (v->empty() && n != 0) return py::none();  // a rank without the LM head
    if (static_cast<py::ssize_t>(v->size()) != n) throw std::runtime_error("a job returned an unexpected size");
    py::array_t<float> arr(shape_);
    std::copy(v->begin(), v->end(), arr.mutable_data());
    return arr;
  }

 private:
  std::shared_future<std::vector<StepResult>> step_;
  std::vector<char> want_;
  std::shared_future<std::vector<float>> logits_;
  std::vector<py::ssize_t> shape_;
  std::shared_ptr<std::atomic<bool>> started_;
  std::shared_ptr<JobWaiter> waiter_;
};

class GpuModelHandle {
 public:
  GpuModelHandle(int device_index, const ModelSpec& spec, const py::list& tensors) {
    if (device_index < 0) throw std::invalid_argument("device_index must be >= 0");
    // Buffer views stay alive (and their memory pinned in place) until the
    // load job has copied everything; they are released with the GIL held.
    std::vector<py::buffer_info> views;
    std::vector<HostTensor> host;
    views.reserve(tensors.size());
    host.reserve(tensors.size());
    for (const py::handle& item : tensors) {
      auto tup = item.cast<py::tuple>();
      if (tup.size() != 4) throw std::invalid_argument("each tensor must be (name, ggml_type, shape, buffer)");
      HostTensor t;
      t.name = tup[0].cast<std::string>();
      t.type = tup[1].cast<int>();
      t.shape = tup[2].cast<std::vector<int64_t>>();
      views.push_back(tup[3].cast<py::buffer>().request());
      const py::buffer_info& b = views.back();
      int64_t expect = b.itemsize;
      for (int i = b.ndim - 1; i >= 0; --i) {
        if (b.shape[i] > 1 && b.strides[i] != expect)
          throw std::invalid_argument("tensor " + t.name + " is not C-contiguous");
        expect *= b.shape[i];
      }
      t.data = b.ptr;
      t.bytes = static_cast<size_t>(b.size) * static_cast<size_t>(b.itemsize);
      host.push_back(std::move(t));
    }
    LoadResult r;
    {
      // Starting a worker sets its device up: slow, and no Python involved.
      py::gil_scoped_release nogil;
      worker_ = acquire_worker(device_index);
      r = model_load(*worker_, spec, host);
    }
    handle_ = r.handle;
    bytes_ = r.bytes;
    load_seconds_ = r.seconds;
    vocab_ = spec.vocab;
    hidden_ = spec.hidden;
    tp_status_ = r.tp_status;
  }

  ~GpuModelHandle() {
    forget_status();
    if (handle_ != 0 && worker_) {
      // Fire and forget: the slab frees it on the worker thread; waiting here
      // could block a garbage collection pass.
      try {
        const int64_t h = handle_;
        worker_->submit_cleanup([h](WorkerContext& ctx) { ctx.drop(h); });
      } catch (...) {
      }
    }
  }

  size_t allocate_kv(int num_blocks) {
    const int64_t h = live();
    py::gil_scoped_release nogil;
    return model_alloc_kv(*worker_, h, num_blocks);
  }

  py::list step_batch(const std::vector<SeqInput>& seqs) {
    const int64_t h = live();
    bool decode = !seqs.empty();
    for (const SeqInput& s : seqs) decode = decode && s.tokens.size() == 1 && s.sample;
    std::vector<StepResult> rs;
    {
      py::gil_scoped_release nogil;
      rs = model_step_batch(*worker_, h, seqs, decode ? decode_waiter_.get() : step_waiter_.get());
    }
    py::list out;
    for (size_t i = 0; i < rs.size(); ++i) out.append(step_result_to_py(rs[i], seqs[i].want_logits));
    return out;
  }

  // Tokens of n_steps decode steps run in one job, per sequence.
  std::vector<std::vector<int32_t>> decode_steps(const std::vector<SeqInput>& seqs, int n_steps) {
    const int64_t h = live();
    std::shared_ptr<JobWaiter> waiter;
    {
      // One waiter per step count: each learns its own job time.
      std::lock_guard<std::mutex> lock(waiters_mu_);
      auto& slot = decode_steps_waiters_[n_steps];
      if (!slot) slot = std::make_shared<JobWaiter>();
      waiter = slot;
    }
    py::gil_scoped_release nogil;
    return model_decode_steps(*worker_, h, seqs, n_steps, waiter.get());
  }

  PendingStep step_batch_async(const std::vector<SeqInput>& seqs) {
    return submit_step(std::make_shared<const std::vector<SeqInput>>(seqs));
  }

  // The job of step_batch_async over inputs already converted (shared by every rank of a group).
  PendingStep submit_step(std::shared_ptr<const std::vector<SeqInput>> in) {
    const int64_t h = live();
    bool decode = !in->empty();
    std::vector<char> want;
    for (const SeqInput& s : *in) {
      decode = decode && s.tokens.size() == 1 && s.sample;
      want.push_back(s.want_logits ? 1 : 0);
    }
    auto started = std::make_shared<std::atomic<bool>>(false);
    std::shared_future<std::vector<StepResult>> f;
    {
      py::gil_scoped_release nogil;
      f = model_step_batch_submit(*worker_, h, std::move(in), started).share();
    }
    return PendingStep(std::move(f), std::move(want), std::move(started), decode ? decode_waiter_ : step_waiter_);
  }

  PendingStep forward_logits_async(const std::vector<int32_t>& tokens, int start_pos,
                                   const std::vector<int32_t>& block_table, bool all_logits) {
    auto seq = std::make_shared<SeqInput>();
    seq->tokens = tokens;
    seq->start_pos = start_pos;
    seq->block_table = block_table;
    return submit_forward(std::move(seq), all_logits);
  }

  PendingStep submit_forward(std::shared_ptr<const SeqInput> seq, bool all_logits) {
    const int64_t h = live();
    const auto rows = static_cast<py::ssize_t>(seq->tokens.size());
    auto started = std::make_shared<std::atomic<bool>>(false);
    std::shared_future<std::vector<float>> f;
    {
      py::gil_scoped_release nogil;
      f = model_forward_logits_submit(*worker_, h, std::move(seq), all_logits, started).share();
    }
    std::vector<py::ssize_t> shape{vocab_};
    if (all_logits) shape.insert(shape.begin(), rows);
    return PendingStep(std::move(f), std::move(shape), std::move(started), step_waiter_);
  }

  PendingStep all_reduce_test_async(const std::vector<float>& data, bool peer) {
    const int64_t h = live();
    auto in = std::make_shared<const std::vector<float>>(data);
    std::shared_future<std::vector<float>> f;
    {
      py::gil_scoped_release nogil;
      f = model_all_reduce_test_submit(*worker_, h, std::move(in), peer).share();
    }
    return PendingStep(std::move(f), {static_cast<py::ssize_t>(data.size())}, nullptr, nullptr);
  }

  py::tuple peer_endpoint() {
    const int64_t h = live();
    PeerEndpoint e;
    {
      py::gil_scoped_release nogil;
      e = model_peer_endpoint(*worker_, h);
    }
    return py::make_tuple(e.device, e.staging, e.flags, e.capacity);
  }

  void link_peers(const std::vector<std::tuple<int, uint64_t, uint64_t, uint64_t>>& group) {
    const int64_t h = live();
    std::vector<PeerEndpoint> eps;
    for (const auto& g : group) {
      PeerEndpoint e;
      e.device = std::get<0>(g);
      e.staging = std::get<1>(g);
      e.flags = std::get<2>(g);
      e.capacity = std::get<3>(g);
      eps.push_back(e);
    }
    py::gil_scoped_release nogil;
    model_link_peers(*worker_, h, eps);
  }

  bool peer_access(const std::vector<int>& devices) {
    live();
    py::gil_scoped_release nogil;
    return model_peer_access(*worker_, devices);
  }

  void hang_next_step() {
    const int64_t h = live();
    py::gil_scoped_release nogil;
    model_hang_next_step(*worker_, h);
  }

  // Any thread, no job: spinning kernels of this model give up, and (nccl)
  // NCCL collectives of its worker's communicator return.
  void abort(bool nccl) {
    {
      std::lock_guard<std::mutex> lk(status_mu_);
      if (tp_status_ != nullptr) tp_status_->abort = 1;
    }
    if (!nccl || !worker_) return;
    py::gil_scoped_release nogil;
    worker_->abort_nccl();
  }

  int64_t arrived() {
    std::lock_guard<std::mutex> lk(status_mu_);
    return tp_status_ != nullptr ? static_cast<int64_t>(tp_status_->arrived) : -1;
  }

  py::array_t<float> forward_logits(const std::vector<int32_t>& tokens, int start_pos,
                                    const std::vector<int32_t>& block_table, bool all_logits) {
    const int64_t h = live();
    std::vector<float> out;
    {
      py::gil_scoped_release nogil;
      out = model_forward_logits(*worker_, h, tokens, start_pos, block_table, all_logits);
    }
    py::array_t<float> arr(all_logits ? std::vector<py::ssize_t>{static_cast<py::ssize_t>(tokens.size()), vocab_}
                                      : std::vector<py::ssize_t>{vocab_});
    std::copy(out.begin(), out.end(), arr.mutable_data());
    return arr;
  }

  // [rows, hidden] float32 per sequence (rows: its length for All, else 1).
  py::list hidden_states(const std::vector<std::vector<int32_t>>& tokens,
                         const std::vector<std::vector<int32_t>>& block_tables, HiddenPooling pooling) {
    const int64_t h = live();
    std::vector<std::vector<float>> rows;
    {
      py::gil_scoped_release nogil;
      rows = model_hidden_states(*worker_, h, tokens, block_tables, pooling);
    }
    py::list out;
    for (const auto& r : rows) {
      py::array_t<float> arr(
          std::vector<py::ssize_t>{static_cast<py::ssize_t>(r.size()) / std::max<py::ssize_t>(hidden_, 1), hidden_});
      std::copy(r.begin(), r.end(), arr.mutable_data());
      out.append(arr);
    }
    return out;
  }

  void set_graphs(bool enabled) {
    const int64_t h = live();
    py::gil_scoped_release nogil;
    model_set_graphs(*worker_, h, enabled);
  }

  std::map<std::string, int64_t> memory() {
    const int64_t h = live();
    py::gil_scoped_release nogil;
    return model_memory(*worker_, h);
  }

  void close() {
    if (handle_ == 0) return;
    forget_status();
    const int64_t h = handle_;
    handle_ = 0;
    py::gil_scoped_release nogil;
    model_drop(*worker_, h);
  }

  bool closed() const { return handle_ == 0; }
  bool poisoned() const { return worker_ && worker_->is_poisoned(); }
  bool shut_down() const { return !worker_ || worker_->is_shut_down(); }
  std::string poison_reason() const { return worker_ ? worker_->poison_reason() : std::string(); }
  size_t bytes() const { return bytes_; }
  double load_seconds() const { return load_seconds_; }
  std::string device() const { return worker_ ? worker_->name() : std::string(); }

 private:
  int64_t live() const {
    if (handle_ == 0) throw std::runtime_error("the GPU model was closed");
    return handle_;
  }

  // The status words die with the model: abort() must not write them after.
  void forget_status() {
    std::lock_guard<std::mutex> lk(status_mu_);
    tp_status_ = nullptr;
  }

  std::shared_ptr<DeviceWorker> worker_;
  int64_t handle_ = 0;
  // Learn the pure-decode step's duration and every other step's (see JobWaiter).
  std::shared_ptr<JobWaiter> decode_waiter_ = std::make_shared<JobWaiter>();
  std::shared_ptr<JobWaiter> step_waiter_ = std::make_shared<JobWaiter>();
  std::mutex waiters_mu_;
  std::map<int, std::shared_ptr<JobWaiter>> decode_steps_waiters_;
  std::mutex status_mu_;
  TpStatus* tp_status_ = nullptr;  // host-mapped (tensor-parallel models only)
  size_t bytes_ = 0;
  double load_seconds_ = 0.0;
  py::ssize_t vocab_ = 0;
  py::ssize_t hidden_ = 0;
};

}  // namespace

void bind_model(py::module_& m) {
  py::enum_<Int8Mode>(m, "Int8Mode", "Where decode matvecs quantize their input to int8 terms")
      .value("Never", Int8Mode::Never, "float math everywhere")
      .value("Auto", Int8Mode::Auto, "where measured faster (large Q4_0 and Q8_0 matrices)")
      .value("Always", Int8Mode::Always, "every type that has the integer kernel");

  py::class_<ModelSpec>(m, "ModelSpec", "Architecture and sizing of a GPU model")
      .def(py::init<>())
      .def_readwrite("arch", &ModelSpec::arch)
      .def_readwrite("vocab", &ModelSpec::vocab)
      .def_readwrite("int8_activations", &ModelSpec::int8_activations)
      .def_readwrite("hidden", &ModelSpec::hidden)
      .def_readwrite("intermediate", &ModelSpec::intermediate)
      .def_readwrite("layers", &ModelSpec::layers)
      .def_readwrite("heads", &ModelSpec::heads)
      .def_readwrite("kv_heads", &ModelSpec::kv_heads)
      .def_readwrite("head_dim", &ModelSpec::head_dim)
      .def_readwrite("eps", &ModelSpec::eps)
      .def_property(
          "rope_style", [](const ModelSpec& s) { return std::string(rope_style_name(s.rope_style)); },
          [](ModelSpec& s, const std::string& name) {
            if (!rope_style_from_name(name, &s.rope_style))
              throw py::value_error("rope_style must be 'half' or 'pairs', got '" + name + "'");
          },
          "The config's rope_style: 'half' (rotate_half) or 'pairs' (GGML adjacent pairs)")
      .def_readwrite("qk_norm", &ModelSpec::qk_norm)
      .def_readwrite("inv_freq", &ModelSpec::inv_freq)
      .def_readwrite("n_ctx", &ModelSpec::n_ctx)
      .def_readwrite("prefill_chunk", &ModelSpec::prefill_chunk)
      .def_readwrite("use_graphs", &ModelSpec::use_graphs)
      .def_readwrite("block_size", &ModelSpec::block_size)
      .def_readwrite("num_blocks", &ModelSpec::num_blocks)
      .def_readwrite("max_num_seqs", &ModelSpec::max_num_seqs)
      .def_readwrite("num_experts", &ModelSpec::num_experts)
      .def_readwrite("experts_per_tok", &ModelSpec::experts_per_tok)
      .def_readwrite("expert_ffn", &ModelSpec::expert_ffn)
      .def_readwrite("norm_topk_prob", &ModelSpec::norm_topk_prob)
      .def_readwrite("mlp_only_layers", &ModelSpec::mlp_only_layers)
      .def_readwrite("tp_rank", &ModelSpec::tp_rank)
      .def_readwrite("tp_size", &ModelSpec::tp_size, "0: the whole model; >= 1: a rank of that many")
      .def_readwrite("tp_peer_max_bytes", &ModelSpec::tp_peer_max_bytes,
                     "largest all-reduce the peer kernel takes once linked (larger ones use NCCL)")
      .def_readwrite("lm_head", &ModelSpec::lm_head, "false: no LM head or sampler (a tensor-parallel follower)");

  py::class_<PendingStep>(m, "PendingStep", "A step or forward job submitted without waiting")
      .def("wait", &PendingStep::wait, py::arg("timeout"), py::arg("learn") = false,
           "Wait up to timeout seconds (GIL released); True once the job ended. learn: wait like the "
           "model's JobWaiter (sleep most of the learned duration, then poll)")
      .def("done", &PendingStep::done, "True once the job ended")
      .def("started", &PendingStep::started, "True once the job began on the worker")
      .def("result", &PendingStep::result,
           "What step_batch / forward_logits would have returned (None: a rank without the LM head); raises "
           "the job's error");

  py::class_<StepSampling>(m, "StepSampling",
                           "A request's SamplingParams for one step, with the step counter and the logprobs asked")
      .def(py::init<>())
      .def_readwrite("temperature", &StepSampling::temperature)
      .def_readwrite("top_k", &StepSampling::top_k)
      .def_readwrite("top_p", &StepSampling::top_p)
      .def_readwrite("min_p", &StepSampling::min_p)
      .def_readwrite("repetition_penalty", &StepSampling::repetition_penalty)
      .def_readwrite("presence_penalty", &StepSampling::presence_penalty)
      .def_readwrite("frequency_penalty", &StepSampling::frequency_penalty)
      .def_readwrite("seed", &StepSampling::seed)
      .def_readwrite("step", &StepSampling::step)
      .def_readwrite("logprobs", &StepSampling::logprobs)
      .def_readwrite("top_logprobs", &StepSampling::top_logprobs);

  py::class_<PenaltyUpdate>(m, "PenaltyUpdate", "Tokens to add to the device penalty state")
      .def(py::init<>())
      .def_readwrite("active", &PenaltyUpdate::active)
      .def_readwrite("reset", &PenaltyUpdate::reset)
      .def_readwrite("context", &PenaltyUpdate::context)
      .def_readwrite("generated", &PenaltyUpdate::generated);

  py::class_<LateMasks, std::shared_ptr<LateMasks>>(
      m, "LateMasks",
      "Token masks a step waits for only when it samples: another thread fills `table` while the forward runs, "
      "then calls ready() (or fail(reason), which fails the step)")
      .def(py::init<int, int>(), py::arg("rows"), py::arg("words"))
      .def_property_readonly("rows", &LateMasks::rows)
      .def_property_readonly("words", &LateMasks::words)
      .def_property_readonly(
          "table",
          [](py::object self) {
            LateMasks& t = self.cast<LateMasks&>();
            // A view of the C++ rows; the array keeps the object alive.
            return py::array_t<int32_t>({t.rows(), t.words()}, {t.words() * 4, 4}, t.data(), self);
          },
          "int32 [rows, words] numpy view of the masks (bit t % 32 of word t / 32: token t allowed)")
      .def("ready", &LateMasks::ready, "every row is written")
      .def("fail", &LateMasks::fail, py::arg("why"), "the masks will not come: the waiting step fails with `why`")
      .def("reset", &LateMasks::reset, "pending again, for another step (only while no step holds it)");

  py::class_<SeqInput>(m, "SeqInput", "One sequence's share of a batched step")
      .def(py::init([](std::vector<int32_t> tokens, int start_pos, std::vector<int32_t> block_table, int slot,
                       bool sample, const StepSampling& sampling, const PenaltyUpdate& penalties, bool want_logits,
                       const py::object& allowed, const py::object& bias_ids, const py::object& bias_values) {
             SeqInput s;
             s.tokens = std::move(tokens);
             s.start_pos = start_pos;
             s.block_table = std::move(block_table);
             s.slot = slot;
             s.sample = sample;
             s.sampling = sampling;
             s.penalties = penalties;
             s.want_logits = want_logits;
             s.allowed = vector_of<int32_t>(allowed, "allowed");
             s.bias_ids = vector_of<int32_t>(bias_ids, "bias_ids");
             s.bias_values = vector_of<float>(bias_values, "bias_values");
             return s;
           }),
           py::arg("tokens"), py::arg("start_pos"), py::arg("block_table"), py::arg("slot"), py::arg("sample"),
           py::arg("sampling"), py::arg("penalties"), py::arg("want_logits") = false, py::arg("allowed") = py::none(),
           py::arg("bias_ids") = py::none(), py::arg("bias_values") = py::none(),
           "allowed: an int32 token bitmask of ceil(vocab / 32) words (None: every token); bias_ids / "
           "bias_values: logit_bias as distinct token ids and their values (None: none)")
      .def_readwrite("tokens", &SeqInput::tokens)
      .def_readwrite("start_pos", &SeqInput::start_pos)
      .def_readwrite("block_table", &SeqInput::block_table)
      .def_readwrite("slot", &SeqInput::slot)
      .def_readwrite("sample", &SeqInput::sample)
      .def_readwrite("sampling", &SeqInput::sampling)
      .def_readwrite("penalties", &SeqInput::penalties)
      .def_readwrite("want_logits", &SeqInput::want_logits)
      .def_readwrite("allowed", &SeqInput::allowed)
      .def_readwrite("late", &SeqInput::late, "LateMasks holding this row's mask (None: `allowed` or no mask)")
      .def_readwrite("late_row", &SeqInput::late_row)
      .def_readwrite("bias_ids", &SeqInput::bias_ids)
      .def_readwrite("bias_values", &SeqInput::bias_values);

  py::enum_<HiddenPooling>(m, "HiddenPooling", "Which final hidden rows GpuModelHandle.hidden_states returns")
      .value("All", HiddenPooling::All, "every row")
      .value("Last", HiddenPooling::Last, "the last row")
      .value("First", HiddenPooling::First, "the first row")
      .value("Mean", HiddenPooling::Mean, "the mean of the rows");

  py::class_<GpuModelHandle>(m, "GpuModelHandle", "A llama-family model resident on one device worker (hx::GpuModel)")
      .def(py::init<int, const ModelSpec&, const py::list&>(), py::arg("device_index"), py::arg("spec"),
           py::arg("tensors"),
           "Upload weights (list of (name, ggml_type, shape, buffer)) and allocate scratch (and the KV pool "
           "when spec.num_blocks > 0)")
      .def("allocate_kv", &GpuModelHandle::allocate_kv, py::arg("num_blocks"),
           "Allocate the KV pool of a model loaded with num_blocks 0; returns its bytes")
      .def("step_batch", &GpuModelHandle::step_batch, py::arg("seqs"),
           "One batched step over SeqInputs: [(token|-1, logprob|None, top|None, logits|None)] in input order")
      .def("forward_logits", &GpuModelHandle::forward_logits, py::arg("tokens"), py::arg("start_pos"),
           py::arg("block_table"), py::arg("all_logits") = false,
           "One sequence through its block table: float32 logits [vocab] or [n, vocab]")
      .def("hidden_states", &GpuModelHandle::hidden_states, py::arg("tokens"), py::arg("block_tables"),
           py::arg("pooling"),
           "Final hidden states (after the output norm) of token sequences run from position 0 through their "
           "block tables: float32 [rows, hidden] per sequence")
      .def("decode_steps", &GpuModelHandle::decode_steps, py::arg("seqs"), py::arg("n_steps"),
           "n_steps decode steps in one job, each sampled token fed to the next step on the device: "
           "[[token] * n_steps] per sequence")
      .def("step_batch_async", &GpuModelHandle::step_batch_async, py::arg("seqs"),
           "step_batch submitted without waiting: a PendingStep")
      .def("forward_logits_async", &GpuModelHandle::forward_logits_async, py::arg("tokens"), py::arg("start_pos"),
           py::arg("block_table"), py::arg("all_logits") = false,
           "forward_logits submitted without waiting: a PendingStep")
      .def("peer_access", &GpuModelHandle::peer_access, py::arg("devices"),
           "Whether this model's device can map the memory of every one of `devices`")
      .def("peer_endpoint", &GpuModelHandle::peer_endpoint,
           "(device, staging, flags, capacity) of a tensor-parallel rank's peer all-reduce memory")
      .def("link_peers", &GpuModelHandle::link_peers, py::arg("group"),
           "Send small all-reduces through peer memory; group[r] is rank r's peer_endpoint()")
      .def("all_reduce_test_async", &GpuModelHandle::all_reduce_test_async, py::arg("data"), py::arg("peer"),
           "Test hook: float32 `data` summed over the group by the peer kernel or NCCL (every rank submits): "
           "a PendingStep whose result() is the sum")
      .def("hang_next_step", &GpuModelHandle::hang_next_step,
           "Test hook: the next step spins on the device until abort()")
      .def("abort", &GpuModelHandle::abort, py::arg("nccl") = true,
           "From any thread, without a job: set the abort word and (nccl) abort the worker's NCCL communicator")
      .def_property_readonly("arrived", &GpuModelHandle::arrived,
                             "Peer all-reduces this rank entered (-1: not a tensor-parallel model)")
      .def("set_graphs", &GpuModelHandle::set_graphs, py::arg("enabled"))
      .def("memory", &GpuModelHandle::memory)
      .def("close", &GpuModelHandle::close)
      .def_property_readonly("closed", &GpuModelHandle::closed)
      .def_property_readonly("poisoned", &GpuModelHandle::poisoned)
      .def_property_readonly("shut_down", &GpuModelHandle::shut_down)
      .def_property_readonly("poison_reason", &GpuModelHandle::poison_reason)
      .def_property_readonly("bytes", &GpuModelHandle::bytes)
      .def_property_readonly("load_seconds", &GpuModelHandle::load_seconds)
      .def_property_readonly("device", &GpuModelHandle::device);
  // One conversion of the step for every rank of a tensor-parallel group.
  m.def(
      "step_batch_async_all",
      [](const std::vector<GpuModelHandle*>& ranks, const std::vector<SeqInput>& seqs) {
        auto in = std::make_shared<const std::vector<SeqInput>>(seqs);
        std::vector<PendingStep> out;
        for (GpuModelHandle* r : ranks) out.push_back(r->submit_step(in));
        return out;
      },
      py::arg("ranks"), py::arg("seqs"), "step_batch_async of one step on every handle of `ranks`, in order");
  m.def(
      "forward_logits_async_all",
      [](const std::vector<GpuModelHandle*>& ranks, const std::vector<int32_t>& tokens, int start_pos,
         const std::vector<int32_t>& block_table, bool all_logits) {
        auto seq = std::make_shared<SeqInput>();
        seq->tokens = tokens;
        seq->start_pos = start_pos;
        seq->block_table = block_table;
        std::vector<PendingStep> out;
        for (GpuModelHandle* r : ranks) out.push_back(r->submit_forward(seq, all_logits));
        return out;
      },
      py::arg("ranks"), py::arg("tokens"), py::arg("start_pos"), py::arg("block_table"), py::arg("all_logits") = false,
      "forward_logits_async of one sequence on every handle of `ranks`, in order");
  m.attr("has_gpu_model") = true;
}

}  // namespace hx

#else  // !HX_WITH_CUDA

namespace hx {
void bind_model(pybind11::module_& m) { m.attr("has_gpu_model") = false; }
}  // namespace hx

#endif
