// Python bindings of the native runtime: edgelora._runtime (private; wrapped by
// edgelora.runtime.native, typed in edgelora/_runtime.pyi). Copies into slots, sampling and the
// bandwidth probe run without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <tuple>

#include "adapter_pool.h"
#include "bandwidth.h"
#include "device_memory.h"
#include "sampler.h"

namespace py = pybind11;
using edgelora::AdapterPool;
using edgelora::Sampler;

namespace {

std::unique_ptr<AdapterPool> make_pool(const std::vector<std::tuple<std::int64_t, std::int64_t>>& sites, int num_slots,
                                       int max_rank, const std::string& dtype, const std::string& device) {
  std::vector<edgelora::LoraSite> converted;
  for (const auto& [in_features, out_features] : sites) converted.push_back({in_features, out_features});
  return std::make_unique<AdapterPool>(std::move(converted), num_slots, max_rank, edgelora::parse_element_type(dtype),
                                       edgelora::parse_memory_kind(device));
}

py::dtype pool_dtype(const AdapterPool& pool) {
  return py::dtype(pool.dtype() == edgelora::ElementType::Float32 ? "float32" : "float16");
}

// Checks one A^T or B array of a ready adapter and returns its data pointer (null for None).
const void* checked_array(const AdapterPool& pool, const py::handle& item, int rank, std::int64_t width,
                          std::size_t site, const char* which, std::vector<py::array>& keep) {
  if (item.is_none()) return nullptr;
  auto array = py::reinterpret_borrow<py::array>(item);
  const bool ok = array.ndim() == 2 && array.shape(0) == rank && array.shape(1) == width &&
                  (array.flags() & py::array::c_style) && array.dtype().is(pool_dtype(pool));
  if (!ok) {
    throw edgelora::PoolError(std::string("site ") + std::to_string(site) + " " + which + ": expected a C-contiguous " +
                              py::str(pool_dtype(pool)).cast<std::string>() + " array [" + std::to_string(rank) + ", " +
                              std::to_string(width) + "]");
  }
  keep.push_back(array);
  return array.data();
}

void write_slot(AdapterPool& pool, int slot, int rank, const py::list& a, const py::list& b) {
  const auto& sites = pool.sites();
  if (a.size() != sites.size() || b.size() != sites.size()) {
    throw edgelora::PoolError("a and b need one entry (array or None) per LoRA site (" + std::to_string(sites.size()) + ")");
  }
  edgelora::ReadyAdapter ready;
  ready.rank = rank;
  std::vector<py::array> keep;  // the arrays stay referenced while the GIL is released
  for (std::size_t i = 0; i < sites.size(); ++i) {
    ready.a.push_back(checked_array(pool, a[i], rank, sites[i].in_features, i, "A^T", keep));
    ready.b.push_back(checked_array(pool, b[i], rank, sites[i].out_features, i, "B", keep));
  }
  py::gil_scoped_release release;
  pool.write(slot, ready);
}

// A numpy array over slots first..last of one site's buffer; it keeps that buffer alive.
py::array slot_view(const AdapterPool& pool, const std::shared_ptr<edgelora::SlotBuffer>& buffer, std::size_t offset,
                    std::int64_t width, int first, int last) {
  if (pool.memory() != edgelora::MemoryKind::Host) throw edgelora::PoolError("views exist only for host memory pools");
  const std::int64_t rows = static_cast<std::int64_t>(last - first + 1) * pool.rank_capacity();
  auto* holder = new std::shared_ptr<edgelora::SlotBuffer>(buffer);
  py::capsule base(holder, [](void* pointer) { delete static_cast<std::shared_ptr<edgelora::SlotBuffer>*>(pointer); });
  return py::array(pool_dtype(pool), {rows, width}, {}, buffer->data() + offset, base);
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
  std::vector<edgelora::SamplingSettings> settings;
  for (std::size_t row = 0; row < batch; ++row) {
    if (samplers[row] == nullptr) throw std::invalid_argument("a sampler is None");
    if (!(top_ps[row] > 0.0f && top_ps[row] <= 1.0f)) throw std::invalid_argument("top_p must be in (0, 1]");
    settings.push_back({temperatures[row], top_ks[row], top_ps[row]});
  }
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
  m.doc() = "edgelora native runtime: adapter slot memory, sampler, bandwidth probe";
#ifdef EDGELORA_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  py::register_exception<edgelora::DeviceError>(m, "DeviceError", PyExc_RuntimeError);

  py::class_<AdapterPool>(m, "AdapterPool")
      .def(py::init(&make_pool), py::arg("sites"), py::arg("num_slots"), py::arg("max_rank"),
           py::arg("dtype") = "float32", py::arg("device") = "cpu",
           "sites: [(in_features, out_features)] in the order the graph lists them")
      .def("write", &write_slot, py::arg("slot"), py::arg("rank"), py::arg("a"), py::arg("b"),
           "Copy a ready adapter into slot (1..num_slots): per site A^T [rank, in] and B [rank, out] in the pool's "
           "dtype, or None for an untargeted site; rows past rank are zeroed")
      .def("clear", &AdapterPool::clear, py::arg("slot"))
      .def("move", &AdapterPool::move, py::arg("source"), py::arg("target"),
           "Move slot source's adapter into slot target (overwriting it) and clear source")
      .def("slot_rank", &AdapterPool::slot_rank, py::arg("slot"))
      .def(
          "a_view",
          [](const AdapterPool& pool, std::size_t site, int first, int last) {
            return slot_view(pool, pool.a_buffer(site), pool.a_offset(site, first, last), pool.sites()[site].in_features,
                             first, last);
          },
          py::arg("site"), py::arg("first"), py::arg("last"), "A^T of slots first..last: [(n * capacity), in]")
      .def(
          "b_view",
          [](const AdapterPool& pool, std::size_t site, int first, int last) {
            return slot_view(pool, pool.b_buffer(site), pool.b_offset(site, first, last),
                             pool.sites()[site].out_features, first, last);
          },
          py::arg("site"), py::arg("first"), py::arg("last"), "B of slots first..last: [(n * capacity), out]")
      .def(
          "a_pointer",
          [](const AdapterPool& pool, std::size_t site, int first, int last) {
            return reinterpret_cast<std::uintptr_t>(pool.a_buffer(site)->data() + pool.a_offset(site, first, last));
          },
          py::arg("site"), py::arg("first"), py::arg("last"), "device address of a_view's block (CUDA binding)")
      .def(
          "b_pointer",
          [](const AdapterPool& pool, std::size_t site, int first, int last) {
            return reinterpret_cast<std::uintptr_t>(pool.b_buffer(site)->data() + pool.b_offset(site, first, last));
          },
          py::arg("site"), py::arg("first"), py::arg("last"), "device address of b_view's block (CUDA binding)")
      .def_property_readonly("rank_capacity", &AdapterPool::rank_capacity)
      .def_property_readonly("num_slots", &AdapterPool::num_slots)
      .def_property_readonly("max_rank", &AdapterPool::max_rank)
      .def_property_readonly("generation", &AdapterPool::generation)
      .def_property_readonly("num_sites", [](const AdapterPool& pool) { return pool.sites().size(); })
      .def_property_readonly("size_bytes", &AdapterPool::size_bytes)
      .def_property_readonly("dtype", [](const AdapterPool& pool) { return py::str(pool_dtype(pool)); })
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
        if (!(top_p > 0.0f && top_p <= 1.0f)) throw std::invalid_argument("top_p must be in (0, 1]");
        edgelora::SamplingSettings settings{temperature, top_k, top_p};
        std::vector<std::int64_t> index;
        std::vector<double> weight;
        return edgelora::sample_row(logits.data(), logits.shape(0), settings, sampler, index, weight);
      },
      py::arg("logits"), py::arg("sampler"), py::arg("temperature"), py::arg("top_k") = 0, py::arg("top_p") = 1.0f);
  m.def(
      "zero_device_memory",
      [](std::uintptr_t address, std::size_t size_bytes) {
#ifdef EDGELORA_WITH_CUDA
        edgelora::cuda::device_zero(reinterpret_cast<void*>(address), size_bytes);
#else
        (void)address;
        (void)size_bytes;
        throw edgelora::PoolError("this edgelora runtime was built without CUDA");
#endif
      },
      py::arg("address"), py::arg("size_bytes"), py::call_guard<py::gil_scoped_release>(),
      "cudaMemset(address, 0, size_bytes): clears device KV cache rows");
  m.def(
      "copy_device_memory",
      [](std::uintptr_t target, std::uintptr_t source, std::size_t size_bytes) {
#ifdef EDGELORA_WITH_CUDA
        edgelora::cuda::copy_device_to_device_2d(reinterpret_cast<void*>(target), size_bytes,
                                                 reinterpret_cast<const void*>(source), size_bytes, size_bytes, 1);
#else
        (void)target;
        (void)source;
        (void)size_bytes;
        throw edgelora::PoolError("this edgelora runtime was built without CUDA");
#endif
      },
      py::arg("target"), py::arg("source"), py::arg("size_bytes"), py::call_guard<py::gil_scoped_release>(),
      "cudaMemcpy device to device: moves a KV cache row when the scheduler packs live rows");
  m.def(
      "read_bandwidth",
      [](unsigned threads, std::size_t size_bytes, int repeats) {
        return edgelora::read_bandwidth(size_bytes, threads, repeats);
      },
      py::arg("threads") = 0, py::arg("size_bytes") = std::size_t(512) << 20, py::arg("repeats") = 5,
      py::call_guard<py::gil_scoped_release>(), "Memory read bandwidth in bytes/s (threads 0: all cores)");
}
