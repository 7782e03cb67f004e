// Adapter slot memory that ONNX Runtime reads in place through IOBinding.
//
// For every LoRA site (one projection of one layer) the pool owns two buffers laid out slot-major:
//   A^T: [num_slots, rank_capacity, in_features]    B: [num_slots, rank_capacity, out_features]
// so the adapters of slots first..last are one contiguous [n*r, in] / [n*r, out] block that is
// bound as the graph's LoRA input without a copy (see edgelora/contract.py).
//
// Python reads, validates, converts and transposes an adapter (safetensors + numpy); the pool only
// owns the memory and copies a ready adapter into a slot (memcpy or cudaMemcpy), zero-padding the
// rows past its rank. Host buffers are anonymous mappings: pages nobody wrote read as zero and cost
// nothing until touched, so a pool sized for many slots does not pay for the slots it never fills.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace edgelora {

// A bad argument (slot out of range, wrong rank, wrong array size): a ValueError in Python.
class PoolError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

enum class ElementType { Float32, Float16 };
enum class MemoryKind { Host, Cuda };

ElementType parse_element_type(const std::string& name);
MemoryKind parse_memory_kind(const std::string& name);
std::size_t element_size(ElementType type);

// One LoRA site of the graph: the projection's sizes.
struct LoraSite {
  std::int64_t in_features = 0;
  std::int64_t out_features = 0;
};

// A zero-initialised buffer in host memory (an anonymous mapping) or CUDA device memory.
class SlotBuffer {
 public:
  SlotBuffer(MemoryKind kind, std::size_t size_bytes);
  ~SlotBuffer();
  SlotBuffer(const SlotBuffer&) = delete;
  SlotBuffer& operator=(const SlotBuffer&) = delete;

  std::uint8_t* data() const { return data_; }
  std::size_t size_bytes() const { return size_bytes_; }
  MemoryKind kind() const { return kind_; }
  // Copies `size` bytes of host memory to `offset` (host memcpy or a host-to-device copy).
  void write(std::size_t offset, const void* source, std::size_t size);
  // Copies `height` rows of `width` bytes from `source_offset` of `source` (pitch source_pitch, same
  // memory kind) to `offset` with pitch `pitch`: re-lays out slots when the rank capacity grows.
  void copy_rows_from(const SlotBuffer& source, std::size_t source_offset, std::size_t source_pitch,
                      std::size_t offset, std::size_t pitch, std::size_t width, std::size_t height);
  // Zeroes a range.
  void zero(std::size_t offset, std::size_t size);

 private:
  MemoryKind kind_;
  std::uint8_t* data_ = nullptr;
  std::size_t size_bytes_ = 0;
};

// One adapter ready to copy into a slot: per site, A^T [rank, in] and B [rank, out] in the pool's
// element type, C-contiguous host memory, or both null for a site the adapter does not target.
struct ReadyAdapter {
  int rank = 0;
  std::vector<const void*> a;
  std::vector<const void*> b;
};

class AdapterPool {
 public:
  AdapterPool(std::vector<LoraSite> sites, int num_slots, int max_rank, ElementType dtype, MemoryKind memory);

  // Copies a ready adapter into `slot` (1..num_slots), growing the rank capacity if needed; rows
  // past its rank read as zero.
  void write(int slot, const ReadyAdapter& adapter);
  // Zeroes a slot (an empty slot contributes nothing).
  void clear(int slot);
  // Moves the adapter in slot `from` to slot `to` (whatever `to` held is overwritten) and clears
  // `from`: the scheduler keeps the slots of running adapters contiguous so a step binds only them.
  void move(int from, int to);

  // The buffers of a site and the byte offset of slot `first`'s block in them.
  const std::shared_ptr<SlotBuffer>& a_buffer(std::size_t site) const;
  const std::shared_ptr<SlotBuffer>& b_buffer(std::size_t site) const;
  std::size_t a_offset(std::size_t site, int first, int last) const;
  std::size_t b_offset(std::size_t site, int first, int last) const;

  int rank_capacity() const { return capacity_; }
  int num_slots() const { return num_slots_; }
  int max_rank() const { return max_rank_; }
  int slot_rank(int slot) const;
  // Bumps whenever buffers move (capacity growth): views taken before show the old buffers.
  std::uint64_t generation() const { return generation_; }
  const std::vector<LoraSite>& sites() const { return sites_; }
  ElementType dtype() const { return dtype_; }
  MemoryKind memory() const { return memory_; }
  std::size_t size_bytes() const;

 private:
  void check_slot(int slot) const;
  void check_range(std::size_t site, int first, int last) const;
  void grow(int capacity);

  std::vector<LoraSite> sites_;
  int num_slots_;
  int max_rank_;
  ElementType dtype_;
  MemoryKind memory_;
  int capacity_ = 0;
  std::uint64_t generation_ = 0;
  std::vector<int> slot_ranks_;
  std::vector<std::shared_ptr<SlotBuffer>> a_;
  std::vector<std::shared_ptr<SlotBuffer>> b_;
};

}  // namespace edgelora
