// CUDA device memory for the adapter slot buffers (runtime/cuda/device_memory.cu).
// Plain C++ interface so adapter_pool.cpp needs no CUDA headers; only built with EDGELORA_CUDA=ON.
// Every failure throws edgelora::DeviceError naming the CUDA call and its error string.
#pragma once

#include <cstddef>
#include <stdexcept>

namespace edgelora {

// A CUDA runtime failure (out of memory, no device, ...): a RuntimeError in Python, not bad input.
class DeviceError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace cuda {

// Allocates `size_bytes` on the current device (zero bytes gives nullptr).
void* device_allocate(std::size_t size_bytes);
// Frees memory from device_allocate; never throws (used by destructors).
void device_free(void* pointer) noexcept;
// Sets [pointer, pointer + size_bytes) to zero.
void device_zero(void* pointer, std::size_t size_bytes);
// Copies `height` rows of `width_bytes` from host memory (row pitch `source_pitch`) into device
// memory (row pitch `destination_pitch`): a contiguous block into a strided region.
void copy_host_to_device_2d(void* destination, std::size_t destination_pitch, const void* source,
                            std::size_t source_pitch, std::size_t width_bytes, std::size_t height);
// The same between two device regions (re-laying out slot buffers when the rank capacity grows).
void copy_device_to_device_2d(void* destination, std::size_t destination_pitch, const void* source,
                              std::size_t source_pitch, std::size_t width_bytes, std::size_t height);

}  // namespace cuda
}  // namespace edgelora
