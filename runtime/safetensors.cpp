// Memory-mapped safetensors reader with a small JSON parser for the header subset it needs.
#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <utility>

namespace edgelora {

namespace {

constexpr std::size_t kHeaderLengthBytes = 8;
constexpr int kMaxJsonDepth = 16;
// The reference implementation refuses headers above 100 MB; so do we.
constexpr std::uint64_t kMaxHeaderBytes = 100u * 1024u * 1024u;

// ---------------------------------------------------------------------------------------------
// JSON: a generic value tree is enough for a header of a few kilobytes.

struct JsonValue {
  enum class Kind { Null, Bool, Number, String, Array, Object };
  Kind kind = Kind::Null;
  std::string text;  // String: decoded contents; Number: the literal as written
  bool boolean = false;
  std::vector<JsonValue> items;                              // Array
  std::vector<std::pair<std::string, JsonValue>> members;    // Object, in file order
};

// Recursive-descent parser over [begin, end). Throws std::runtime_error("<what> at byte N").
class JsonParser {
 public:
  JsonParser(const char* begin, const char* end) : begin_(begin), cursor_(begin), end_(end) {}

  JsonValue parse_document() {
    JsonValue value = parse_value(0);
    skip_whitespace();
    if (cursor_ != end_) fail("trailing characters after the header object");
    return value;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error(what + " at byte " + std::to_string(cursor_ - begin_));
  }

  void skip_whitespace() {
    while (cursor_ != end_ && (*cursor_ == ' ' || *cursor_ == '\t' || *cursor_ == '\n' || *cursor_ == '\r')) ++cursor_;
  }

  char peek() {
    skip_whitespace();
    if (cursor_ == end_) fail("unexpected end of JSON");
    return *cursor_;
  }

  void expect(char wanted) {
    if (peek() != wanted) fail(std::string("expected '") + wanted + "'");
    ++cursor_;
  }

  void expect_word(const char* word) {
    for (const char* c = word; *c; ++c, ++cursor_) {
      if (cursor_ == end_ || *cursor_ != *c) fail(std::string("invalid literal, expected ") + word);
    }
  }

  JsonValue parse_value(int depth) {
    if (depth > kMaxJsonDepth) fail("JSON nested too deeply");
    const char next = peek();
    JsonValue value;
    if (next == '{') return parse_object(depth);
    if (next == '[') return parse_array(depth);
    if (next == '"') {
      value.kind = JsonValue::Kind::String;
      value.text = parse_string();
    } else if (next == 't' || next == 'f') {
      value.kind = JsonValue::Kind::Bool;
      value.boolean = next == 't';
      expect_word(value.boolean ? "true" : "false");
    } else if (next == 'n') {
      expect_word("null");
    } else {
      value.kind = JsonValue::Kind::Number;
      value.text = parse_number();
    }
    return value;
  }

  JsonValue parse_object(int depth) {
    JsonValue value;
    value.kind = JsonValue::Kind::Object;
    expect('{');
    if (peek() == '}') {
      ++cursor_;
      return value;
    }
    while (true) {
      if (peek() != '"') fail("expected a string key");
      std::string key = parse_string();
      for (const auto& member : value.members) {
        if (member.first == key) fail("duplicate key \"" + key + "\"");
      }
      expect(':');
      value.members.emplace_back(std::move(key), parse_value(depth + 1));
      if (peek() == ',') {
        ++cursor_;
        continue;
      }
      expect('}');
      return value;
    }
  }

  JsonValue parse_array(int depth) {
    JsonValue value;
    value.kind = JsonValue::Kind::Array;
    expect('[');
    if (peek() == ']') {
      ++cursor_;
      return value;
    }
    while (true) {
      value.items.push_back(parse_value(depth + 1));
      if (peek() == ',') {
        ++cursor_;
        continue;
      }
      expect(']');
      return value;
    }
  }

  // JSON number grammar: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?; returns the literal.
  std::string parse_number() {
    const char* start = cursor_;
    auto digits = [this]() {
      const char* first = cursor_;
      while (cursor_ != end_ && *cursor_ >= '0' && *cursor_ <= '9') ++cursor_;
      if (cursor_ == first) fail("invalid number");
    };
    if (cursor_ != end_ && *cursor_ == '-') ++cursor_;
    if (cursor_ != end_ && *cursor_ == '0') {
      ++cursor_;
    } else {
      digits();
    }
    if (cursor_ != end_ && *cursor_ == '.') {
      ++cursor_;
      digits();
    }
    if (cursor_ != end_ && (*cursor_ == 'e' || *cursor_ == 'E')) {
      ++cursor_;
      if (cursor_ != end_ && (*cursor_ == '+' || *cursor_ == '-')) ++cursor_;
      digits();
    }
    return std::string(start, cursor_);
  }

  unsigned parse_hex4() {
    unsigned code = 0;
    for (int i = 0; i < 4; ++i, ++cursor_) {
      if (cursor_ == end_) fail("unterminated \\u escape");
      const char c = *cursor_;
      code <<= 4;
      if (c >= '0' && c <= '9') code |= static_cast<unsigned>(c - '0');
      else if (c >= 'a' && c <= 'f') code |= static_cast<unsigned>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') code |= static_cast<unsigned>(c - 'A' + 10);
      else fail("invalid \\u escape");
    }
    return code;
  }

  static void append_utf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  // \uXXXX, with a following \uXXXX low surrogate when XXXX is a high surrogate.
  unsigned parse_unicode_escape() {
    unsigned code = parse_hex4();
    if (code >= 0xDC00 && code <= 0xDFFF) fail("unpaired low surrogate");
    if (code >= 0xD800 && code <= 0xDBFF) {
      if (end_ - cursor_ < 2 || cursor_[0] != '\\' || cursor_[1] != 'u') fail("unpaired high surrogate");
      cursor_ += 2;
      const unsigned low = parse_hex4();
      if (low < 0xDC00 || low > 0xDFFF) fail("invalid low surrogate");
      code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
    }
    return code;
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    while (true) {
      if (cursor_ == end_) fail("unterminated string");
      const char c = *cursor_++;
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (cursor_ == end_) fail("unterminated escape");
      const char escaped = *cursor_++;
      switch (escaped) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': append_utf8(out, parse_unicode_escape()); break;
        default: fail("invalid escape");
      }
    }
  }

  const char* begin_;
  const char* cursor_;
  const char* end_;
};

// ---------------------------------------------------------------------------------------------
// Header interpretation.

[[noreturn]] void fail(const std::string& path, const std::string& problem) {
  throw std::runtime_error(path + ": " + problem);
}

TensorDType parse_dtype(const std::string& path, const std::string& tensor, const std::string& text) {
  if (text == "F16") return TensorDType::F16;
  if (text == "BF16") return TensorDType::BF16;
  if (text == "F32") return TensorDType::F32;
  fail(path, "tensor " + tensor + " has unsupported dtype " + text + " (expected F16, BF16 or F32)");
}

// A non-negative integer literal (no sign, fraction or exponent) that fits in uint64.
bool parse_uint64(const std::string& literal, std::uint64_t& out) {
  if (literal.empty()) return false;
  std::uint64_t value = 0;
  for (const char c : literal) {
    if (c < '0' || c > '9') return false;
    const auto digit = static_cast<std::uint64_t>(c - '0');
    if (value > (std::numeric_limits<std::uint64_t>::max() - digit) / 10) return false;
    value = value * 10 + digit;
  }
  out = value;
  return true;
}

const JsonValue* member(const JsonValue& object, const char* key) {
  for (const auto& entry : object.members) {
    if (entry.first == key) return &entry.second;
  }
  return nullptr;
}

std::vector<std::uint64_t> parse_uint_array(const std::string& path, const std::string& tensor, const char* field,
                                            const JsonValue* value) {
  if (value == nullptr || value->kind != JsonValue::Kind::Array) {
    fail(path, "tensor " + tensor + " has no " + field + " array");
  }
  std::vector<std::uint64_t> numbers;
  for (const auto& item : value->items) {
    std::uint64_t number = 0;
    if (item.kind != JsonValue::Kind::Number || !parse_uint64(item.text, number)) {
      fail(path, "tensor " + tensor + " has a non-integer entry in " + field);
    }
    numbers.push_back(number);
  }
  return numbers;
}

// Validates one header entry against the data region [data, data + data_size).
TensorView parse_tensor(const std::string& path, const std::string& name, const JsonValue& entry,
                        const std::uint8_t* data, std::uint64_t data_size) {
  if (entry.kind != JsonValue::Kind::Object) fail(path, "tensor " + name + " header is not an object");
  const JsonValue* dtype = member(entry, "dtype");
  if (dtype == nullptr || dtype->kind != JsonValue::Kind::String) fail(path, "tensor " + name + " has no dtype");

  TensorView view;
  view.name = name;
  view.dtype = parse_dtype(path, name, dtype->text);
  std::uint64_t expected_bytes = dtype_size_bytes(view.dtype);
  for (const std::uint64_t dim : parse_uint_array(path, name, "shape", member(entry, "shape"))) {
    if (dim > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) ||
        (dim != 0 && expected_bytes > std::numeric_limits<std::uint64_t>::max() / dim)) {
      fail(path, "tensor " + name + " shape is too large");
    }
    expected_bytes *= dim;
    view.shape.push_back(static_cast<std::int64_t>(dim));
  }
  const auto offsets = parse_uint_array(path, name, "data_offsets", member(entry, "data_offsets"));
  if (offsets.size() != 2) fail(path, "tensor " + name + " data_offsets must be [begin, end]");
  const std::uint64_t begin = offsets[0], end = offsets[1];
  if (begin > end || end > data_size) {
    fail(path, "tensor " + name + " data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                   "] fall outside the " + std::to_string(data_size) + "-byte data region (truncated file?)");
  }
  if (end - begin != expected_bytes) {
    fail(path, "tensor " + name + " holds " + std::to_string(end - begin) + " bytes but its dtype and shape need " +
                   std::to_string(expected_bytes));
  }
  view.data = data + begin;
  view.size_bytes = static_cast<std::size_t>(expected_bytes);
  return view;
}

std::map<std::string, std::string> parse_metadata(const std::string& path, const JsonValue& value) {
  if (value.kind != JsonValue::Kind::Object) fail(path, "__metadata__ is not an object");
  std::map<std::string, std::string> metadata;
  for (const auto& entry : value.members) {
    if (entry.second.kind != JsonValue::Kind::String) fail(path, "__metadata__ value of " + entry.first + " is not a string");
    metadata[entry.first] = entry.second.text;
  }
  return metadata;
}

std::uint64_t read_le_u64(const std::uint8_t* bytes) {
  std::uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | bytes[i];
  return value;
}

}  // namespace

// -----------------------------------------------------------------------------------------------

std::size_t dtype_size_bytes(TensorDType dtype) {
  return dtype == TensorDType::F32 ? 4 : 2;
}

const char* dtype_name(TensorDType dtype) {
  switch (dtype) {
    case TensorDType::F16: return "F16";
    case TensorDType::BF16: return "BF16";
    case TensorDType::F32: return "F32";
  }
  return "?";
}

std::int64_t TensorView::num_elements() const {
  std::int64_t count = 1;
  for (const auto dim : shape) count *= dim;
  return count;
}

MappedFile::MappedFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, std::string("cannot open (") + std::strerror(errno) + ")");
  struct stat info {};
  if (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  size_bytes_ = static_cast<std::size_t>(info.st_size);
  if (size_bytes_ > 0) {  // mmap refuses length 0; an empty file is rejected by the reader
    void* mapping = ::mmap(nullptr, size_bytes_, PROT_READ, MAP_PRIVATE, fd, 0);
    const int mmap_errno = errno;
    ::close(fd);
    if (mapping == MAP_FAILED) fail(path, std::string("cannot memory-map (") + std::strerror(mmap_errno) + ")");
    data_ = static_cast<const std::uint8_t*>(mapping);
  } else {
    ::close(fd);
  }
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<std::uint8_t*>(data_), size_bytes_);
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path), file_(path) {
  const std::uint64_t file_size = file_.size_bytes();
  if (file_size < kHeaderLengthBytes) {
    fail(path, "too small for a safetensors file (" + std::to_string(file_size) + " bytes)");
  }
  const std::uint64_t header_size = read_le_u64(file_.data());
  if (header_size > file_size - kHeaderLengthBytes) {
    fail(path, "truncated (header says " + std::to_string(header_size) + " bytes, file has " +
                   std::to_string(file_size) + ")");
  }
  if (header_size > kMaxHeaderBytes) fail(path, "header of " + std::to_string(header_size) + " bytes is too large");

  const char* header = reinterpret_cast<const char*>(file_.data() + kHeaderLengthBytes);
  JsonValue root;
  try {
    root = JsonParser(header, header + header_size).parse_document();
  } catch (const std::runtime_error& error) {
    fail(path, std::string("corrupt header (") + error.what() + ")");
  }
  if (root.kind != JsonValue::Kind::Object) fail(path, "corrupt header (not a JSON object)");

  const std::uint8_t* data = file_.data() + kHeaderLengthBytes + header_size;
  const std::uint64_t data_size = file_size - kHeaderLengthBytes - header_size;
  for (const auto& entry : root.members) {
    if (entry.first == "__metadata__") {
      metadata_ = parse_metadata(path, entry.second);
    } else {
      tensors_.push_back(parse_tensor(path, entry.first, entry.second, data, data_size));
    }
  }
}

const TensorView* SafetensorsFile::find(const std::string& name) const {
  for (const auto& tensor : tensors_) {
    if (tensor.name == name) return &tensor;
  }
  return nullptr;
}

}  // namespace edgelora
