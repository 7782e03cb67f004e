// CUDA runtime calls behind runtime/device_memory.h. Copies are synchronous: a slot load finishes
// before the next ORT run reads the buffers.
#include "../device_memory.h"

#include <cuda_runtime.h>

#include <string>

namespace edgelora {
namespace cuda {

namespace {

void check(cudaError_t status, const char* call) {
  if (status != cudaSuccess) {
    throw DeviceError(std::string(call) + " failed: " + cudaGetErrorString(status));
  }
}

void copy_2d(void* destination, std::size_t destination_pitch, const void* source, std::size_t source_pitch,
             std::size_t width_bytes, std::size_t height, cudaMemcpyKind kind, const char* call) {
  if (width_bytes == 0 || height == 0) return;
  check(cudaMemcpy2D(destination, destination_pitch, source, source_pitch, width_bytes, height, kind), call);
}

}  // namespace

void* device_allocate(std::size_t size_bytes) {
  if (size_bytes == 0) return nullptr;
  void* pointer = nullptr;
  check(cudaMalloc(&pointer, size_bytes), "cudaMalloc");
  return pointer;
}

void device_free(void* pointer) noexcept {
  if (pointer != nullptr) cudaFree(pointer);
}

void device_zero(void* pointer, std::size_t size_bytes) {
  if (size_bytes == 0) return;
  check(cudaMemset(pointer, 0, size_bytes), "cudaMemset");
}

void copy_host_to_device_2d(void* destination, std::size_t destination_pitch, const void* source,
                            std::size_t source_pitch, std::size_t width_bytes, std::size_t height) {
  copy_2d(destination, destination_pitch, source, source_pitch, width_bytes, height, cudaMemcpyHostToDevice,
          "cudaMemcpy2D (host to device)");
}

void copy_device_to_device_2d(void* destination, std::size_t destination_pitch, const void* source,
                              std::size_t source_pitch, std::size_t width_bytes, std::size_t height) {
  copy_2d(destination, destination_pitch, source, source_pitch, width_bytes, height, cudaMemcpyDeviceToDevice,
          "cudaMemcpy2D (device to device)");
}

}  // namespace cuda
}  // namespace edgelora
