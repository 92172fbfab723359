// ensel._C: a torch-agnostic module. The Python layer validates tensors and passes raw pointers
// (as integers), shapes, strides in elements and dtype codes; nothing here links libtorch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <vector>

#include "cpu/score_cpu.h"
#include "cuda/row_stats.h"
#ifdef ENSEL_WITH_CUDA
#include "cuda/runtime.h"
#include "cuda/score_cuda.h"
#endif

namespace py = pybind11;
using ensel::Failure;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

std::tuple<int, int64_t, int64_t> as_tuple(const Failure& f) {
  return {static_cast<int>(f.status), f.member, f.sample};
}

// `vote_log`: the int64 [E + 1] table of ensel/_votes.py, on the outputs' device.
ensel::ScoreOutputs outputs(uintptr_t floats, uintptr_t ints, int64_t n, uintptr_t vote_log) {
  return ensel::ScoreOutputs{ptr<float>(floats), ptr<int64_t>(ints), n, ptr<const int64_t>(vote_log)};
}

// The state tensors arrive as a tuple of addresses in the order of ensel/_state.py FIELDS.
ensel::StreamState stream_state(const py::tuple& a, int64_t n, int64_t k, int64_t capacity, uintptr_t labels) {
  if (a.size() != 9) throw py::value_error("state: expected 9 addresses");
  auto at = [&](int i) { return a[i].cast<uintptr_t>(); };
  return ensel::StreamState{n,
                            k,
                            capacity,
                            ptr<float>(at(0)),
                            ptr<float>(at(1)),
                            ptr<int32_t>(at(2)),
                            ptr<int32_t>(at(3)),
                            ptr<const int64_t>(labels),
                            ptr<int32_t>(at(4)),
                            ptr<int32_t>(at(5)),
                            ptr<int32_t>(at(6)),
                            ptr<float>(at(7)),
                            ptr<float>(at(8))};
}

// The row statistics the CUDA kernels combine across threads (cuda/row_stats.h), computed on the
// host by `parts` simulated threads that own chunks of 4 classes round-robin and merge in the
// kernels' butterfly order, next to process_row's values for the same row. Lets the tests check
// the GPU's merge algebra where no GPU exists.
template <typename T>
py::tuple row_stats_by_parts_typed(const T* row, int64_t K, int parts) {
  using C = ensel::compute_t<T>;
  const int32_t k_classes = static_cast<int32_t>(K);
  std::vector<ensel::OnlineRow<C>> online(parts, ensel::OnlineRow<C>::empty(k_classes));
  std::vector<ensel::RowCheck> check(parts, ensel::RowCheck::empty());
  for (int32_t k = 0; k < k_classes; ++k) {
    const int owner = static_cast<int>((k / 4) % parts);
    const C x = ensel::to_compute(row[k]);
    online[owner].push(x, k);
    check[owner].push(x, k);
  }
  // Butterfly: after the round with offset o, every part holds the merge of its 2o-aligned set.
  // Merging a into b and b into a in the same round uses the old values, as shuffles do.
  for (int offset = 1; offset < parts; offset *= 2) {
    auto next_online = online;
    auto next_check = check;
    for (int i = 0; i < parts; ++i) {
      const int j = i ^ offset;
      if (j >= parts) continue;
      next_online[i].merge(online[j]);
      next_check[i].merge(check[j]);
    }
    online.swap(next_online);
    check.swap(next_check);
  }
  const ensel::OnlineRow<C>& r = online[0];
  const float inv_s = 1.0f / r.s, log_s = logf(r.s);
  py::tuple merged = py::make_tuple(static_cast<int>(check[0].status()), r.a, log_s,
                                    ensel::member_entropy(log_s, r.t, inv_s));

  std::vector<float> scratch(K), pbar(K, 0.0f);
  ensel::RowResult direct{};
  const ensel::Status status = ensel::process_row(row, K, -1, scratch.data(), pbar.data(), direct);
  const bool ok = status == ensel::kOk;
  py::tuple expected = py::make_tuple(static_cast<int>(status), ok ? direct.argmax : -1, ok ? direct.log_sum : 0.0f,
                                      ok ? direct.entropy : 0.0f);
  return py::make_tuple(merged, expected);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ensel's compiled kernels (torch-agnostic: raw pointers, shapes and strides).";
  m.attr("num_float_fields") = static_cast<int>(ensel::kNumFloatFields);
  m.attr("num_int_fields") = static_cast<int>(ensel::kNumIntFields);
#ifdef ENSEL_WITH_CUDA
  m.attr("cuda_compiled") = true;
  m.def("cuda_runtime_version", &ensel::cuda_runtime_version, "CUDART_VERSION the module was built with.");
  m.def(
      "cuda_device_count",
      [] {
        const char* error = nullptr;
        const int count = ensel::cuda_device_count(&error);
        return std::make_tuple(count, error == nullptr ? std::string() : std::string(error));
      },
      "(visible CUDA devices, the runtime's error message or '').");

  m.def(
      "fused_cuda_workspace",
      [](int dtype, int64_t E, int64_t N, int64_t K, int device) {
        py::gil_scoped_release release;
        return ensel::fused_cuda_workspace_bytes(static_cast<ensel::DType>(dtype), E, N, K, device);
      },
      "Bytes of device workspace that fused_cuda needs.");
  m.def(
      "fused_cuda",
      [](uintptr_t logits, int dtype, int64_t E, int64_t N, int64_t K, int64_t member_stride, int64_t sample_stride,
         uintptr_t labels, uintptr_t out_floats, uintptr_t out_ints, uintptr_t vote_log, uintptr_t workspace,
         int64_t workspace_bytes, int device, uintptr_t stream) {
        const ensel::LogitsView view{ptr<const void>(logits), static_cast<ensel::DType>(dtype), member_stride,
                                     sample_stride};
        py::gil_scoped_release release;
        return as_tuple(ensel::fused_cuda(view, E, N, K, ptr<const int64_t>(labels),
                                          outputs(out_floats, out_ints, N, vote_log),
                                          ptr<void>(workspace), workspace_bytes, device, stream));
      },
      "Fused [E, N, K] scores on the GPU, on `stream`; waits for them. Returns (status, member, sample).");
  m.def("update_cuda_workspace", &ensel::update_cuda_workspace_bytes, "Bytes of device workspace for update_cuda.");
  m.def(
      "update_cuda",
      [](const py::tuple& state, int64_t N, int64_t K, int64_t capacity, uintptr_t labels, uintptr_t logits,
         int dtype, int64_t sample_stride, int64_t start, int64_t rows, uintptr_t workspace, int64_t workspace_bytes,
         int device, uintptr_t stream) {
        const ensel::StreamState s = stream_state(state, N, K, capacity, labels);
        const ensel::LogitsView view{ptr<const void>(logits), static_cast<ensel::DType>(dtype), 0, sample_stride};
        py::gil_scoped_release release;
        return as_tuple(
            ensel::update_cuda(s, view, start, rows, ptr<void>(workspace), workspace_bytes, device, stream));
      },
      "Adds one member's rows [start, start + rows) on the GPU, or nothing if any row is invalid.");
  m.def(
      "finalize_cuda_workspace",
      [](int64_t N, int64_t K, int device) {
        py::gil_scoped_release release;
        return ensel::finalize_cuda_workspace_bytes(N, K, device);
      },
      "Bytes of device workspace that finalize_cuda needs.");
  m.def(
      "finalize_cuda",
      [](const py::tuple& state, int64_t N, int64_t K, int64_t capacity, uintptr_t labels, int E,
         uintptr_t out_floats, uintptr_t out_ints, uintptr_t vote_log, uintptr_t workspace, int64_t workspace_bytes,
         int device, uintptr_t stream) {
        const ensel::StreamState s = stream_state(state, N, K, capacity, labels);
        py::gil_scoped_release release;
        ensel::finalize_cuda(s, E, outputs(out_floats, out_ints, N, vote_log), ptr<void>(workspace),
                             workspace_bytes, device, stream);
      },
      "Scores on the GPU from a state in which every sample has seen E members.");
#else
  m.attr("cuda_compiled") = false;
#endif

  m.def(
      "_row_stats_by_parts",
      [](uintptr_t row, int dtype, int64_t K, int parts) {
        if (parts < 1 || K < 1) throw py::value_error("_row_stats_by_parts: parts and K must be positive");
        switch (static_cast<ensel::DType>(dtype)) {
          case ensel::kFloat16: return row_stats_by_parts_typed(ptr<const ensel::Half>(row), K, parts);
          case ensel::kBFloat16: return row_stats_by_parts_typed(ptr<const ensel::BFloat16>(row), K, parts);
          case ensel::kFloat64: return row_stats_by_parts_typed(ptr<const double>(row), K, parts);
          default: return row_stats_by_parts_typed(ptr<const float>(row), K, parts);
        }
      },
      "Test hook: ((status, argmax, log s, H) merged as the CUDA kernels do, the same by process_row).");

  m.def(
      "fused_cpu",
      [](uintptr_t logits, int dtype, bool probs, int64_t E, int64_t N, int64_t K, int64_t member_stride,
         int64_t sample_stride, uintptr_t labels, uintptr_t out_floats, uintptr_t out_ints, uintptr_t vote_log,
         int threads) {
        const ensel::LogitsView view{ptr<const void>(logits), static_cast<ensel::DType>(dtype), member_stride,
                                     sample_stride};
        py::gil_scoped_release release;
        return as_tuple(ensel::fused_cpu(view, probs, E, N, K, ptr<const int64_t>(labels),
                                         outputs(out_floats, out_ints, N, vote_log), threads));
      },
      "Fused [E, N, K] scores of logits (probabilities if probs). Returns (status, member, sample) of the "
      "first invalid row, or (0, -1, -1).");

  m.def(
      "update_cpu",
      [](const py::tuple& state, int64_t N, int64_t K, int64_t capacity, uintptr_t labels, uintptr_t logits,
         int dtype, bool probs, int64_t sample_stride, int64_t start, int64_t rows, int threads) {
        const ensel::StreamState s = stream_state(state, N, K, capacity, labels);
        const ensel::LogitsView view{ptr<const void>(logits), static_cast<ensel::DType>(dtype), 0, sample_stride};
        py::gil_scoped_release release;
        return as_tuple(ensel::update_cpu(s, view, probs, start, rows, threads));
      },
      "Adds one member's rows [start, start + rows) to the state, or nothing if any row is invalid.");

  m.def("cpu_isas", &ensel::cpu_isas, "The CPU kernels' instruction-set levels this processor runs, lowest first.");
  m.def("cpu_isa", &ensel::cpu_isa, "The level the CPU kernels use now.");
  m.def("set_cpu_isa", &ensel::set_cpu_isa, "Switches the CPU kernels to a supported level; False if it is not one.");
  m.def(
      "finalize_cpu",
      [](const py::tuple& state, int64_t N, int64_t K, int64_t capacity, uintptr_t labels, int E,
         uintptr_t out_floats, uintptr_t out_ints, uintptr_t vote_log, int threads) {
        const ensel::StreamState s = stream_state(state, N, K, capacity, labels);
        py::gil_scoped_release release;
        ensel::finalize_cpu(s, E, outputs(out_floats, out_ints, N, vote_log), threads);
      },
      "Scores from a state in which every sample has seen E members.");
}
