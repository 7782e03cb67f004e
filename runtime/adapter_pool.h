// Adapter slot buffers that ONNX Runtime reads in place through IOBinding.
//
// For every LoRA site (one projection of one layer) the pool owns two buffers laid out slot-major:
//   A^T: [num_slots, rank_capacity, in_features]    B: [num_slots, rank_capacity, out_features]
// so the adapters of slots first..last are one contiguous [n*r, in] / [n*r, out] block that is
// bound as the graph's LoRA input without a copy (see edgelora/contract.py). Loading an adapter writes its slot (rank padded
// with zeros up to the capacity, converted to the graph's dtype); switching adapters between
// batches only changes which slot range is bound.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace edgelora {

// Bad adapter input (unknown tensor, wrong shape, unreadable file): a ValueError in Python.
class AdapterError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

enum class ElementType { Float32, Float16 };
enum class MemoryKind { Host, Cuda };

ElementType parse_element_type(const std::string& name);
MemoryKind parse_memory_kind(const std::string& name);

// One LoRA site of the graph: the names of its A/B inputs and the projection's sizes.
struct LoraSite {
  std::string a_name;
  std::string b_name;
  std::int64_t in_features = 0;
  std::int64_t out_features = 0;
};

// A zero-initialised buffer in host or CUDA device memory.
class SlotBuffer {
 public:
  SlotBuffer(MemoryKind kind, std::size_t size_bytes);
  ~SlotBuffer();
  SlotBuffer(const SlotBuffer&) = delete;
  SlotBuffer& operator=(const SlotBuffer&) = delete;

  std::uint8_t* data() const { return data_; }
  std::size_t size_bytes() const { return size_bytes_; }
  // Copies `size` bytes of host memory to `offset` (host memcpy or a host-to-device copy).
  void write(std::size_t offset, const void* source, std::size_t size);
  // Copies `height` rows of `width` bytes from `source` (pitch source_pitch, same memory kind)
  // to `offset` with pitch `pitch`: re-lays out slots when the rank capacity grows.
  void copy_rows_from(const SlotBuffer& source, std::size_t source_pitch, std::size_t offset,
                      std::size_t pitch, std::size_t width, std::size_t height);
  void zero(std::size_t offset, std::size_t size);

 private:
  MemoryKind kind_;
  std::uint8_t* data_ = nullptr;
  std::size_t size_bytes_ = 0;
};

class AdapterPool {
 public:
  AdapterPool(std::vector<LoraSite> sites, int num_slots, int max_rank, ElementType dtype, MemoryKind memory);

  // Validates every tensor of a processed adapter file, then writes it into `slot` (1..num_slots)
  // and returns its rank. Throws AdapterError and leaves the slot as it was on any problem.
  int load(int slot, const std::string& path);
  // Zeroes a slot (an empty slot contributes nothing).
  void clear(int slot);

  // Address of the [(last-first+1) * capacity, in] block of A^T for a site (B: [.., out]).
  std::uintptr_t a_pointer(std::size_t site, int first, int last) const;
  std::uintptr_t b_pointer(std::size_t site, int first, int last) const;

  int rank_capacity() const { return capacity_; }
  int num_slots() const { return num_slots_; }
  int max_rank() const { return max_rank_; }
  int slot_rank(int slot) const;
  // Bumps whenever buffers move (capacity growth): pointers taken before are stale.
  std::uint64_t generation() const { return generation_; }
  std::size_t num_sites() const { return sites_.size(); }
  ElementType dtype() const { return dtype_; }
  MemoryKind memory() const { return memory_; }
  std::size_t size_bytes() const;

 private:
  std::size_t element_size() const;
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
  std::vector<std::unique_ptr<SlotBuffer>> a_;
  std::vector<std::unique_ptr<SlotBuffer>> b_;
};

}  // namespace edgelora
