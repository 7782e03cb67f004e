// Python bindings of the native runtime: edgelora._runtime (private; wrapped by edgelora.runtime).
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_runtime, m) {
  m.doc() = "edgelora native runtime: adapter pool and sampler";
#ifdef EDGELORA_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
