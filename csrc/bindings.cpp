// ensel._C: a torch-agnostic module. The Python layer validates tensors and passes raw pointers
// (as integers), shapes, strides in elements and dtype codes; nothing here links libtorch.
#include <pybind11/pybind11.h>

#include <string>
#include <tuple>

#include "cpu/score_cpu.h"
#ifdef ENSEL_WITH_CUDA
#include "cuda/runtime.h"
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

ensel::ScoreOutputs outputs(uintptr_t floats, uintptr_t ints, int64_t n) {
  return ensel::ScoreOutputs{ptr<float>(floats), ptr<int64_t>(ints), n};
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
#else
  m.attr("cuda_compiled") = false;
#endif

  m.def(
      "fused_cpu",
      [](uintptr_t logits, int dtype, int64_t E, int64_t N, int64_t K, int64_t member_stride,
         int64_t sample_stride, uintptr_t labels, uintptr_t out_floats, uintptr_t out_ints, int threads) {
        const ensel::LogitsView view{ptr<const void>(logits), static_cast<ensel::DType>(dtype), member_stride,
                                     sample_stride};
        py::gil_scoped_release release;
        return as_tuple(ensel::fused_cpu(view, E, N, K, ptr<const int64_t>(labels),
                                         outputs(out_floats, out_ints, N), threads));
      },
      "Fused [E, N, K] scores. Returns (status, member, sample) of the first invalid row, or (0, -1, -1).");

  m.def(
      "update_cpu",
      [](const py::tuple& state, int64_t N, int64_t K, int64_t capacity, uintptr_t labels, uintptr_t logits,
         int dtype, int64_t sample_stride, int64_t start, int64_t rows, int threads) {
        const ensel::StreamState s = stream_state(state, N, K, capacity, labels);
        const ensel::LogitsView view{ptr<const void>(logits), static_cast<ensel::DType>(dtype), 0, sample_stride};
        py::gil_scoped_release release;
        return as_tuple(ensel::update_cpu(s, view, start, rows, threads));
      },
      "Adds one member's rows [start, start + rows) to the state, or nothing if any row is invalid.");

  m.def(
      "finalize_cpu",
      [](const py::tuple& state, int64_t N, int64_t K, int64_t capacity, uintptr_t labels, int E,
         uintptr_t out_floats, uintptr_t out_ints, int threads) {
        const ensel::StreamState s = stream_state(state, N, K, capacity, labels);
        py::gil_scoped_release release;
        ensel::finalize_cpu(s, E, outputs(out_floats, out_ints, N), threads);
      },
      "Scores from a state in which every sample has seen E members.");
}
