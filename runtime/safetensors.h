// Read-only, memory-mapped safetensors reader: the header is parsed and validated once, tensor
// data is read in place from the mapping (no copy).
//
// File layout: [u64 little-endian header length N][N bytes JSON header][data region]
// Header: {"name": {"dtype": "F16", "shape": [..], "data_offsets": [begin, end]}, ...,
//          "__metadata__": {"key": "value", ...}}  (offsets are relative to the data region)
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace edgelora {

// Element types a safetensors file may hold that edgelora reads.
enum class TensorDType { F16, BF16, F32 };

std::size_t dtype_size_bytes(TensorDType dtype);
const char* dtype_name(TensorDType dtype);

// One tensor of a mapped file; `data` points into the mapping (may be unaligned).
struct TensorView {
  std::string name;
  TensorDType dtype = TensorDType::F32;
  std::vector<std::int64_t> shape;
  const std::uint8_t* data = nullptr;
  std::size_t size_bytes = 0;

  std::int64_t num_elements() const;
};

// A read-only memory mapping of a whole file; unmapped on destruction.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::uint8_t* data() const { return data_; }
  std::size_t size_bytes() const { return size_bytes_; }

 private:
  const std::uint8_t* data_ = nullptr;
  std::size_t size_bytes_ = 0;
};

// A validated safetensors file. Every problem throws std::runtime_error("<path>: <problem>").
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const { return path_; }
  // Tensors in header order.
  const std::vector<TensorView>& tensors() const { return tensors_; }
  // nullptr when the file has no tensor of that name.
  const TensorView* find(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  std::string path_;
  MappedFile file_;
  std::vector<TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace edgelora
