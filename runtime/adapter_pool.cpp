#include "adapter_pool.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <unordered_map>

#include "device_memory.h"
#include "half.h"
#include "safetensors.h"

namespace edgelora {

ElementType parse_element_type(const std::string& name) {
  if (name == "float32") return ElementType::Float32;
  if (name == "float16") return ElementType::Float16;
  throw AdapterError("unsupported adapter pool dtype '" + name + "' (float32 or float16)");
}

MemoryKind parse_memory_kind(const std::string& name) {
  if (name == "cpu") return MemoryKind::Host;
  if (name == "cuda") {
#ifdef EDGELORA_WITH_CUDA
    return MemoryKind::Cuda;
#else
    throw AdapterError("this edgelora runtime was built without CUDA; reinstall with EDGELORA_CUDA=ON to use --device cuda");
#endif
  }
  throw AdapterError("unsupported adapter pool device '" + name + "' (cpu or cuda)");
}

// -- SlotBuffer ---------------------------------------------------------------------------------

namespace {
constexpr std::size_t kHostAlignment = 64;
}

SlotBuffer::SlotBuffer(MemoryKind kind, std::size_t size_bytes) : kind_(kind), size_bytes_(size_bytes) {
  if (size_bytes == 0) return;
  if (kind == MemoryKind::Host) {
    const std::size_t rounded = (size_bytes + kHostAlignment - 1) / kHostAlignment * kHostAlignment;
    data_ = static_cast<std::uint8_t*>(std::aligned_alloc(kHostAlignment, rounded));
    if (data_ == nullptr) throw std::bad_alloc();
    std::memset(data_, 0, size_bytes);
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
    std::free(data_);
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

void SlotBuffer::copy_rows_from(const SlotBuffer& source, std::size_t source_pitch, std::size_t offset,
                                std::size_t pitch, std::size_t width, std::size_t height) {
  if (width == 0 || height == 0) return;
  if (kind_ == MemoryKind::Host) {
    for (std::size_t row = 0; row < height; ++row) {
      std::memcpy(data_ + offset + row * pitch, source.data_ + row * source_pitch, width);
    }
  } else {
#ifdef EDGELORA_WITH_CUDA
    cuda::copy_device_to_device_2d(data_ + offset, pitch, source.data_, source_pitch, width, height);
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

// -- conversion ---------------------------------------------------------------------------------

namespace {

float load_element(const std::uint8_t* data, std::size_t index, TensorDType dtype) {
  switch (dtype) {
    case TensorDType::F32: {
      float value;
      std::memcpy(&value, data + index * 4, 4);
      return value;
    }
    case TensorDType::F16: {
      std::uint16_t bits;
      std::memcpy(&bits, data + index * 2, 2);
      return half_to_float(bits);
    }
    case TensorDType::BF16: {
      std::uint16_t bits;
      std::memcpy(&bits, data + index * 2, 2);
      return bfloat16_to_float(bits);
    }
  }
  return 0.0f;
}

// Converts `count` elements of a (possibly unaligned) source into the pool's element type.
void convert(const std::uint8_t* source, TensorDType source_dtype, std::size_t source_index, std::uint8_t* destination,
             ElementType destination_dtype, std::size_t count) {
  if (destination_dtype == ElementType::Float16 && source_dtype == TensorDType::F16) {
    std::memcpy(destination, source + source_index * 2, count * 2);
    return;
  }
  if (destination_dtype == ElementType::Float32 && source_dtype == TensorDType::F32) {
    std::memcpy(destination, source + source_index * 4, count * 4);
    return;
  }
  for (std::size_t i = 0; i < count; ++i) {
    const float value = load_element(source, source_index + i, source_dtype);
    if (destination_dtype == ElementType::Float32) {
      std::memcpy(destination + i * 4, &value, 4);
    } else {
      const std::uint16_t bits = float_to_half(value);
      std::memcpy(destination + i * 2, &bits, 2);
    }
  }
}

// Writes A^T: element (i, j) of a row-major [rows, cols] source goes to destination row j, column i.
void transpose_convert(const TensorView& source, std::size_t rows, std::size_t cols, std::uint8_t* destination,
                       ElementType destination_dtype) {
  const std::size_t es = destination_dtype == ElementType::Float32 ? 4 : 2;
  for (std::size_t j = 0; j < cols; ++j) {
    for (std::size_t i = 0; i < rows; ++i) {
      convert(source.data, source.dtype, i * cols + j, destination + (j * rows + i) * es, destination_dtype, 1);
    }
  }
}

struct SiteTensors {
  const TensorView* a = nullptr;
  const TensorView* b = nullptr;
};

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

}  // namespace

// -- AdapterPool --------------------------------------------------------------------------------

AdapterPool::AdapterPool(std::vector<LoraSite> sites, int num_slots, int max_rank, ElementType dtype, MemoryKind memory)
    : sites_(std::move(sites)), num_slots_(num_slots), max_rank_(max_rank), dtype_(dtype), memory_(memory) {
  if (sites_.empty()) throw AdapterError("an adapter pool needs at least one LoRA site");
  if (num_slots < 1) throw AdapterError("an adapter pool needs at least one slot");
  if (max_rank < 1) throw AdapterError("max_rank must be at least 1");
  for (const auto& site : sites_) {
    if (site.in_features < 1 || site.out_features < 1) {
      throw AdapterError("LoRA site " + site.a_name + " has an empty projection");
    }
  }
  slot_ranks_.assign(num_slots, 0);
  for (std::size_t i = 0; i < sites_.size(); ++i) {
    a_.push_back(std::make_unique<SlotBuffer>(memory_, 0));
    b_.push_back(std::make_unique<SlotBuffer>(memory_, 0));
  }
}

std::size_t AdapterPool::element_size() const { return dtype_ == ElementType::Float32 ? 4 : 2; }

void AdapterPool::check_slot(int slot) const {
  if (slot < 1 || slot > num_slots_) {
    throw AdapterError("slot " + std::to_string(slot) + " is outside 1.." + std::to_string(num_slots_));
  }
}

void AdapterPool::check_range(std::size_t site, int first, int last) const {
  if (site >= sites_.size()) throw AdapterError("site index " + std::to_string(site) + " out of range");
  check_slot(first);
  check_slot(last);
  if (first > last) throw AdapterError("slot range is empty");
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

std::uintptr_t AdapterPool::a_pointer(std::size_t site, int first, int last) const {
  check_range(site, first, last);
  const std::size_t stride = static_cast<std::size_t>(capacity_) * sites_[site].in_features * element_size();
  return reinterpret_cast<std::uintptr_t>(a_[site]->data() + (first - 1) * stride);
}

std::uintptr_t AdapterPool::b_pointer(std::size_t site, int first, int last) const {
  check_range(site, first, last);
  const std::size_t stride = static_cast<std::size_t>(sites_[site].out_features) * capacity_ * element_size();
  return reinterpret_cast<std::uintptr_t>(b_[site]->data() + (first - 1) * stride);
}

void AdapterPool::grow(int capacity) {
  // Allocate everything first so a failed allocation leaves the pool as it was.
  const std::size_t es = element_size();
  std::vector<std::unique_ptr<SlotBuffer>> new_a, new_b;
  for (const auto& site : sites_) {
    new_a.push_back(std::make_unique<SlotBuffer>(memory_, num_slots_ * site.in_features * capacity * es));
    new_b.push_back(std::make_unique<SlotBuffer>(memory_, num_slots_ * site.out_features * capacity * es));
  }
  if (capacity_ > 0) {
    for (std::size_t i = 0; i < sites_.size(); ++i) {
      const std::size_t in = sites_[i].in_features, out = sites_[i].out_features;
      // Each slot keeps its first `capacity_` rows of A^T and B, which are contiguous.
      new_a[i]->copy_rows_from(*a_[i], capacity_ * in * es, 0, capacity * in * es, capacity_ * in * es, num_slots_);
      new_b[i]->copy_rows_from(*b_[i], capacity_ * out * es, 0, capacity * out * es, capacity_ * out * es, num_slots_);
    }
  }
  a_.swap(new_a);
  b_.swap(new_b);
  capacity_ = capacity;
  ++generation_;
}

int AdapterPool::load(int slot, const std::string& path) {
  check_slot(slot);
  std::unique_ptr<SafetensorsFile> file;
  try {
    file = std::make_unique<SafetensorsFile>(path);
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const std::exception& error) {
    throw AdapterError(error.what());
  }

  // Validate every tensor before touching the slot.
  std::unordered_map<std::string, std::pair<std::size_t, bool>> by_name;  // name -> (site, is_a)
  for (std::size_t i = 0; i < sites_.size(); ++i) {
    by_name[sites_[i].a_name] = {i, true};
    by_name[sites_[i].b_name] = {i, false};
  }
  std::vector<SiteTensors> found(sites_.size());
  long rank = -1;
  for (const auto& tensor : file->tensors()) {
    auto it = by_name.find(tensor.name);
    if (it == by_name.end()) throw AdapterError(path + ": tensor " + tensor.name + " has no LoRA input in lora_model.onnx");
    const LoraSite& site = sites_[it->second.first];
    const bool is_a = it->second.second;
    const std::int64_t fixed = is_a ? site.in_features : site.out_features;
    const bool shape_ok = tensor.shape.size() == 2 && (is_a ? tensor.shape[0] == fixed : tensor.shape[1] == fixed);
    if (!shape_ok) {
      const std::string expected = is_a ? "[" + std::to_string(fixed) + ", rank]" : "[rank, " + std::to_string(fixed) + "]";
      throw AdapterError(path + ": tensor " + tensor.name + " is " + shape_text(tensor.shape) + ", expected " + expected);
    }
    const long tensor_rank = static_cast<long>(is_a ? tensor.shape[1] : tensor.shape[0]);
    if (rank >= 0 && tensor_rank != rank) {
      throw AdapterError(path + ": tensor " + tensor.name + " has rank " + std::to_string(tensor_rank) + ", others " +
                         std::to_string(rank));
    }
    rank = tensor_rank;
    (is_a ? found[it->second.first].a : found[it->second.first].b) = &tensor;
  }
  if (rank < 0) throw AdapterError(path + ": holds no LoRA tensors");
  if (rank < 1 || rank > max_rank_) {
    throw AdapterError(path + ": rank " + std::to_string(rank) + " is outside 1.." + std::to_string(max_rank_));
  }
  for (std::size_t i = 0; i < sites_.size(); ++i) {
    if ((found[i].a == nullptr) != (found[i].b == nullptr)) {
      throw AdapterError(path + ": " + (found[i].a ? sites_[i].a_name : sites_[i].b_name) + " has no matching " +
                         (found[i].a ? sites_[i].b_name : sites_[i].a_name));
    }
  }

  if (rank > capacity_) grow(static_cast<int>(rank));
  const std::size_t es = element_size(), cap = capacity_, r = rank;
  std::vector<std::uint8_t> staging;
  for (std::size_t i = 0; i < sites_.size(); ++i) {
    const std::size_t in = sites_[i].in_features, out = sites_[i].out_features;
    const std::size_t a_bytes = in * cap * es, b_bytes = cap * out * es;
    const std::size_t a_offset = (slot - 1) * a_bytes, b_offset = (slot - 1) * b_bytes;
    if (found[i].a == nullptr) {  // not targeted by this adapter: contributes nothing
      a_[i]->zero(a_offset, a_bytes);
      b_[i]->zero(b_offset, b_bytes);
      continue;
    }
    staging.assign(std::max(a_bytes, b_bytes), 0);
    transpose_convert(*found[i].a, in, r, staging.data(), dtype_);  // [in, r] -> rows 0..r of [cap, in]
    a_[i]->write(a_offset, staging.data(), a_bytes);
    std::fill(staging.begin(), staging.end(), 0);
    convert(found[i].b->data, found[i].b->dtype, 0, staging.data(), dtype_, r * out);  // rows r..cap stay zero
    b_[i]->write(b_offset, staging.data(), b_bytes);
  }
  slot_ranks_[slot - 1] = static_cast<int>(rank);
  return static_cast<int>(rank);
}

void AdapterPool::clear(int slot) {
  check_slot(slot);
  const std::size_t es = element_size(), cap = capacity_;
  for (std::size_t i = 0; i < sites_.size(); ++i) {
    const std::size_t a_bytes = sites_[i].in_features * cap * es, b_bytes = cap * sites_[i].out_features * es;
    a_[i]->zero((slot - 1) * a_bytes, a_bytes);
    b_[i]->zero((slot - 1) * b_bytes, b_bytes);
  }
  slot_ranks_[slot - 1] = 0;
}

}  // namespace edgelora
