// Python bindings of the native runtime: edgelora._runtime (private; wrapped by
// edgelora.runtime.native). Long work (adapter loads, sampling, the bandwidth probe) runs without
// the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <tuple>

#include "adapter_pool.h"
#include "bandwidth.h"
#include "sampler.h"

namespace py = pybind11;
using edgelora::AdapterPool;
using edgelora::Sampler;

namespace {

using SiteTuple = std::tuple<std::string, std::string, std::int64_t, std::int64_t>;

std::unique_ptr<AdapterPool> make_pool(const std::vector<SiteTuple>& sites, int num_slots, int max_rank,
                                       const std::string& dtype, const std::string& device) {
  std::vector<edgelora::LoraSite> converted;
  for (const auto& [a_name, b_name, in_features, out_features] : sites) {
    converted.push_back({a_name, b_name, in_features, out_features});
  }
  return std::make_unique<AdapterPool>(std::move(converted), num_slots, max_rank, edgelora::parse_element_type(dtype),
                                       edgelora::parse_memory_kind(device));
}

edgelora::SamplingSettings settings_at(const std::vector<float>& temperatures, const std::vector<int>& top_ks,
                                       const std::vector<float>& top_ps, std::size_t row) {
  edgelora::SamplingSettings settings;
  settings.temperature = temperatures[row];
  settings.top_k = top_ks[row];
  settings.top_p = top_ps[row];
  if (!(settings.top_p > 0.0f && settings.top_p <= 1.0f)) throw std::invalid_argument("top_p must be in (0, 1]");
  return settings;
}

py::array_t<std::int64_t> sample_batch(py::array_t<float, py::array::c_style | py::array::forcecast> logits,
                                       std::vector<Sampler*> samplers, std::vector<float> temperatures,
                                       std::vector<int> top_ks, std::vector<float> top_ps) {
  if (logits.ndim() != 2) throw std::invalid_argument("logits must be [batch, vocab]");
  const auto batch = static_cast<std::size_t>(logits.shape(0));
  const std::int64_t vocab = logits.shape(1);
  if (vocab < 1) throw std::invalid_argument("logits have an empty vocabulary");
  if (samplers.size() != batch || temperatures.size() != batch || top_ks.size() != batch || top_ps.size() != batch) {
    throw std::invalid_argument("samplers, temperatures, top_ks and top_ps need one entry per logits row");
  }
  for (auto* sampler : samplers) {
    if (sampler == nullptr) throw std::invalid_argument("a sampler is None");
  }
  std::vector<edgelora::SamplingSettings> settings;
  for (std::size_t row = 0; row < batch; ++row) settings.push_back(settings_at(temperatures, top_ks, top_ps, row));
  py::array_t<std::int64_t> tokens(static_cast<py::ssize_t>(batch));
  auto* out = tokens.mutable_data();
  const float* data = logits.data();
  {
    py::gil_scoped_release release;
    std::vector<std::int64_t> index;
    std::vector<double> weight;
    for (std::size_t row = 0; row < batch; ++row) {
      out[row] = edgelora::sample_row(data + row * vocab, vocab, settings[row], *samplers[row], index, weight);
    }
  }
  return tokens;
}

}  // namespace

PYBIND11_MODULE(_runtime, m) {
  m.doc() = "edgelora native runtime: adapter slot pool, sampler, bandwidth probe";
#ifdef EDGELORA_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif

  py::class_<AdapterPool>(m, "AdapterPool")
      .def(py::init(&make_pool), py::arg("sites"), py::arg("num_slots"), py::arg("max_rank"),
           py::arg("dtype") = "float32", py::arg("device") = "cpu",
           "sites: [(a_name, b_name, in_features, out_features)] in the order the graph lists them")
      .def("load", &AdapterPool::load, py::arg("slot"), py::arg("path"), py::call_guard<py::gil_scoped_release>(),
           "Validate a processed adapter file and write it into slot (1..num_slots); returns its rank")
      .def("clear", &AdapterPool::clear, py::arg("slot"))
      .def("slot_rank", &AdapterPool::slot_rank, py::arg("slot"))
      .def("a_pointer", &AdapterPool::a_pointer, py::arg("site"), py::arg("first"), py::arg("last"))
      .def("b_pointer", &AdapterPool::b_pointer, py::arg("site"), py::arg("first"), py::arg("last"))
      .def_property_readonly("rank_capacity", &AdapterPool::rank_capacity)
      .def_property_readonly("num_slots", &AdapterPool::num_slots)
      .def_property_readonly("max_rank", &AdapterPool::max_rank)
      .def_property_readonly("generation", &AdapterPool::generation)
      .def_property_readonly("num_sites", &AdapterPool::num_sites)
      .def_property_readonly("size_bytes", &AdapterPool::size_bytes)
      .def_property_readonly("dtype", [](const AdapterPool& pool) {
        return pool.dtype() == edgelora::ElementType::Float32 ? "float32" : "float16";
      })
      .def_property_readonly("device", [](const AdapterPool& pool) {
        return pool.memory() == edgelora::MemoryKind::Host ? "cpu" : "cuda";
      });

  py::class_<Sampler>(m, "Sampler")
      .def(py::init<std::uint64_t>(), py::arg("seed"))
      .def("next_uniform", &Sampler::next_uniform);

  m.def("sample_batch", &sample_batch, py::arg("logits"), py::arg("samplers"), py::arg("temperatures"),
        py::arg("top_ks"), py::arg("top_ps"),
        "One token per row of float32 logits [batch, vocab]; each row uses its own Sampler and settings");
  m.def(
      "sample_row",
      [](py::array_t<float, py::array::c_style | py::array::forcecast> logits, Sampler& sampler, float temperature,
         int top_k, float top_p) {
        if (logits.ndim() != 1 || logits.shape(0) < 1) throw std::invalid_argument("logits must be a non-empty [vocab]");
        edgelora::SamplingSettings settings{temperature, top_k, top_p};
        if (!(top_p > 0.0f && top_p <= 1.0f)) throw std::invalid_argument("top_p must be in (0, 1]");
        std::vector<std::int64_t> index;
        std::vector<double> weight;
        return edgelora::sample_row(logits.data(), logits.shape(0), settings, sampler, index, weight);
      },
      py::arg("logits"), py::arg("sampler"), py::arg("temperature"), py::arg("top_k") = 0, py::arg("top_p") = 1.0f);
  m.def(
      "read_bandwidth",
      [](unsigned threads, std::size_t size_bytes, int repeats) {
        return edgelora::read_bandwidth(size_bytes, threads, repeats);
      },
      py::arg("threads") = 0, py::arg("size_bytes") = std::size_t(512) << 20, py::arg("repeats") = 5,
      py::call_guard<py::gil_scoped_release>(), "Memory read bandwidth in bytes/s (threads 0: all cores)");
}
