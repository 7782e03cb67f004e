#include "adapter_pool.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <new>

#include "device_memory.h"

namespace edgelora {

ElementType parse_element_type(const std::string& name) {
  if (name == "float32") return ElementType::Float32;
  if (name == "float16") return ElementType::Float16;
  throw PoolError("unsupported adapter pool dtype '" + name + "' (float32 or float16)");
}

MemoryKind parse_memory_kind(const std::string& name) {
  if (name == "cpu") return MemoryKind::Host;
  if (name == "cuda") {
#ifdef EDGELORA_WITH_CUDA
    return MemoryKind::Cuda;
#else
    throw PoolError("this edgelora runtime was built without CUDA; reinstall with EDGELORA_CUDA=ON to use --device cuda");
#endif
  }
  throw PoolError("unsupported adapter pool device '" + name + "' (cpu or cuda)");
}

std::size_t element_size(ElementType type) { return type == ElementType::Float32 ? 4 : 2; }

// -- SlotBuffer ---------------------------------------------------------------------------------

namespace {
std::size_t page_size() {
  static const std::size_t size = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  return size;
}
}  // namespace

SlotBuffer::SlotBuffer(MemoryKind kind, std::size_t size_bytes) : kind_(kind), size_bytes_(size_bytes) {
  if (size_bytes == 0) return;
  if (kind == MemoryKind::Host) {
    // Anonymous pages are zero and unbacked until first written: no memset, no page faults for
    // slots that stay empty.
    void* mapped = mmap(nullptr, size_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapped == MAP_FAILED) throw std::bad_alloc();
    data_ = static_cast<std::uint8_t*>(mapped);
  } else {
#ifdef EDGELORA_WITH_CUDA
    data_ = static_cast<std::uint8_t*>(cuda::device_allocate(size_bytes));
    cuda::device_zero(data_, size_bytes);
#endif
  }
}

SlotBuffer::~SlotBuffer() {
  if (data_ == nullptr) return;
  if (kind_ == MemoryKind::Host) {
    munmap(data_, size_bytes_);
  } else {
#ifdef EDGELORA_WITH_CUDA
    cuda::device_free(data_);
#endif
  }
}

void SlotBuffer::write(std::size_t offset, const void* source, std::size_t size) {
  if (size == 0) return;
  if (kind_ == MemoryKind::Host) {
    std::memcpy(data_ + offset, source, size);
  } else {
#ifdef EDGELORA_WITH_CUDA
    cuda::copy_host_to_device_2d(data_ + offset, size, source, size, size, 1);
#endif
  }
}

void SlotBuffer::copy_rows_from(const SlotBuffer& source, std::size_t source_offset, std::size_t source_pitch,
                                std::size_t offset, std::size_t pitch, std::size_t width, std::size_t height) {
  if (width == 0 || height == 0) return;
  if (kind_ == MemoryKind::Host) {
    for (std::size_t row = 0; row < height; ++row) {
      std::memcpy(data_ + offset + row * pitch, source.data_ + source_offset + row * source_pitch, width);
    }
  } else {
#ifdef EDGELORA_WITH_CUDA
    cuda::copy_device_to_device_2d(data_ + offset, pitch, source.data_ + source_offset, source_pitch, width, height);
#endif
  }
}

void SlotBuffer::zero(std::size_t offset, std::size_t size) {
  if (size == 0) return;
  if (kind_ == MemoryKind::Host) {
    std::memset(data_ + offset, 0, size);
  } else {
#ifdef EDGELORA_WITH_CUDA
    cuda::device_zero(data_ + offset, size);
#endif
  }
}

// -- AdapterPool --------------------------------------------------------------------------------

AdapterPool::AdapterPool(std::vector<LoraSite> sites, int num_slots, int max_rank, ElementType dtype, MemoryKind memory)
    : sites_(std::move(sites)), num_slots_(num_slots), max_rank_(max_rank), dtype_(dtype), memory_(memory) {
  if (sites_.empty()) throw PoolError("an adapter pool needs at least one LoRA site");
  if (num_slots < 1) throw PoolError("an adapter pool needs at least one slot");
  if (max_rank < 1) throw PoolError("max_rank must be at least 1");
  for (std::size_t i = 0; i < sites_.size(); ++i) {
    if (sites_[i].in_features < 1 || sites_[i].out_features < 1) {
      throw PoolError("LoRA site " + std::to_string(i) + " has an empty projection");
    }
  }
  slot_ranks_.assign(num_slots, 0);
  for (std::size_t i = 0; i < sites_.size(); ++i) {
    a_.push_back(std::make_shared<SlotBuffer>(memory_, 0));
    b_.push_back(std::make_shared<SlotBuffer>(memory_, 0));
  }
}

void AdapterPool::check_slot(int slot) const {
  if (slot < 1 || slot > num_slots_) {
    throw PoolError("slot " + std::to_string(slot) + " is outside 1.." + std::to_string(num_slots_));
  }
}

void AdapterPool::check_range(std::size_t site, int first, int last) const {
  if (site >= sites_.size()) throw PoolError("site index " + std::to_string(site) + " out of range");
  check_slot(first);
  check_slot(last);
  if (first > last) throw PoolError("slot range is empty");
}

int AdapterPool::slot_rank(int slot) const {
  check_slot(slot);
  return slot_ranks_[slot - 1];
}

std::size_t AdapterPool::size_bytes() const {
  std::size_t total = 0;
  for (std::size_t i = 0; i < sites_.size(); ++i) total += a_[i]->size_bytes() + b_[i]->size_bytes();
  return total;
}

const std::shared_ptr<SlotBuffer>& AdapterPool::a_buffer(std::size_t site) const {
  check_range(site, 1, 1);
  return a_[site];
}

const std::shared_ptr<SlotBuffer>& AdapterPool::b_buffer(std::size_t site) const {
  check_range(site, 1, 1);
  return b_[site];
}

std::size_t AdapterPool::a_offset(std::size_t site, int first, int last) const {
  check_range(site, first, last);
  return (first - 1) * static_cast<std::size_t>(capacity_) * sites_[site].in_features * element_size(dtype_);
}

std::size_t AdapterPool::b_offset(std::size_t site, int first, int last) const {
  check_range(site, first, last);
  return (first - 1) * static_cast<std::size_t>(capacity_) * sites_[site].out_features * element_size(dtype_);
}

void AdapterPool::grow(int capacity) {
  // Allocate everything first so a failed allocation leaves the pool as it was.
  const std::size_t es = element_size(dtype_);
  std::vector<std::shared_ptr<SlotBuffer>> new_a, new_b;
  for (const auto& site : sites_) {
    new_a.push_back(std::make_shared<SlotBuffer>(memory_, num_slots_ * site.in_features * capacity * es));
    new_b.push_back(std::make_shared<SlotBuffer>(memory_, num_slots_ * site.out_features * capacity * es));
  }
  if (capacity_ > 0) {
    for (std::size_t i = 0; i < sites_.size(); ++i) {
      const std::size_t in = sites_[i].in_features, out = sites_[i].out_features;
      // Each slot keeps its first `capacity_` rows of A^T and B, which are contiguous.
      for (int slot = 0; slot < num_slots_; ++slot) {
        if (slot_ranks_[slot] == 0) continue;  // empty slots stay untouched (zero pages)
        const std::size_t a_old = capacity_ * in * es, b_old = capacity_ * out * es;
        new_a[i]->copy_rows_from(*a_[i], slot * a_old, a_old, slot * capacity * in * es, a_old, a_old, 1);
        new_b[i]->copy_rows_from(*b_[i], slot * b_old, b_old, slot * capacity * out * es, b_old, b_old, 1);
      }
    }
  }
  a_.swap(new_a);
  b_.swap(new_b);
  capacity_ = capacity;
  ++generation_;
}

void AdapterPool::write(int slot, const ReadyAdapter& adapter) {
  check_slot(slot);
  if (adapter.rank < 1 || adapter.rank > max_rank_) {
    throw PoolError("rank " + std::to_string(adapter.rank) + " is outside 1.." + std::to_string(max_rank_));
  }
  if (adapter.a.size() != sites_.size() || adapter.b.size() != sites_.size()) {
    throw PoolError("an adapter needs one A and one B entry per LoRA site (" + std::to_string(sites_.size()) + ")");
  }
  for (std::size_t i = 0; i < sites_.size(); ++i) {
    if ((adapter.a[i] == nullptr) != (adapter.b[i] == nullptr)) {
      throw PoolError("LoRA site " + std::to_string(i) + " has A without B or B without A");
    }
  }
  if (adapter.rank > capacity_) grow(adapter.rank);
  // Rows at or past a slot's rank are zero (a fresh mapping, or zeroed when the rank shrank), so a
  // write touches only the rows it fills plus the old adapter's rows it must clear: a first write
  // into a slot never faults in pages it does not need.
  const std::size_t es = element_size(dtype_), cap = capacity_, r = adapter.rank;
  const std::size_t old_rank = static_cast<std::size_t>(slot_ranks_[slot - 1]);
  for (std::size_t i = 0; i < sites_.size(); ++i) {
    const std::size_t in = sites_[i].in_features, out = sites_[i].out_features;
    const std::size_t a_offset = (slot - 1) * cap * in * es, b_offset = (slot - 1) * cap * out * es;
    if (adapter.a[i] == nullptr) {  // not targeted by this adapter: contributes nothing
      a_[i]->zero(a_offset, old_rank * in * es);
      b_[i]->zero(b_offset, old_rank * out * es);
      continue;
    }
    a_[i]->write(a_offset, adapter.a[i], r * in * es);
    b_[i]->write(b_offset, adapter.b[i], r * out * es);
    if (old_rank > r) {
      a_[i]->zero(a_offset + r * in * es, (old_rank - r) * in * es);
      b_[i]->zero(b_offset + r * out * es, (old_rank - r) * out * es);
    }
  }
  slot_ranks_[slot - 1] = adapter.rank;
}

void AdapterPool::clear(int slot) {
  check_slot(slot);
  const std::size_t es = element_size(dtype_), cap = capacity_;
  const std::size_t rank = static_cast<std::size_t>(slot_ranks_[slot - 1]);  // rows past it are zero already
  for (std::size_t i = 0; i < sites_.size(); ++i) {
    const std::size_t in = sites_[i].in_features, out = sites_[i].out_features;
    a_[i]->zero((slot - 1) * cap * in * es, rank * in * es);
    b_[i]->zero((slot - 1) * cap * out * es, rank * out * es);
  }
  slot_ranks_[slot - 1] = 0;
}

void AdapterPool::move(int from, int to) {
  check_slot(from);
  check_slot(to);
  if (from == to) return;
  const std::size_t es = element_size(dtype_), cap = capacity_;
  const std::size_t rank = static_cast<std::size_t>(slot_ranks_[from - 1]);
  const std::size_t old_rank = static_cast<std::size_t>(slot_ranks_[to - 1]);
  for (std::size_t i = 0; i < sites_.size(); ++i) {
    const std::size_t in = sites_[i].in_features, out = sites_[i].out_features;
    const std::size_t a_width = rank * in * es, b_width = rank * out * es;
    a_[i]->copy_rows_from(*a_[i], (from - 1) * cap * in * es, a_width, (to - 1) * cap * in * es, a_width, a_width, 1);
    b_[i]->copy_rows_from(*b_[i], (from - 1) * cap * out * es, b_width, (to - 1) * cap * out * es, b_width, b_width, 1);
    if (old_rank > rank) {  // rows past the moved adapter's rank must read as zero
      a_[i]->zero((to - 1) * cap * in * es + a_width, (old_rank - rank) * in * es);
      b_[i]->zero((to - 1) * cap * out * es + b_width, (old_rank - rank) * out * es);
    }
  }
  slot_ranks_[to - 1] = slot_ranks_[from - 1];
  clear(from);
}

}  // namespace edgelora
