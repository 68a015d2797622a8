#include "yuanmoe/checkpoint/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace yuanmoe::checkpoint {

namespace {

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the format's own limit

const std::vector<std::pair<c10::ScalarType, const char*>>& dtype_table() {
  static const std::vector<std::pair<c10::ScalarType, const char*>> table{
      {torch::kFloat64, "F64"}, {torch::kFloat32, "F32"}, {torch::kBFloat16, "BF16"},
      {torch::kFloat16, "F16"}, {torch::kInt64, "I64"},   {torch::kInt32, "I32"},
      {torch::kInt16, "I16"},   {torch::kInt8, "I8"},     {torch::kUInt8, "U8"},
      {torch::kBool, "BOOL"}};
  return table;
}

[[noreturn]] void fail(const std::filesystem::path& path, const std::string& message) {
  throw std::runtime_error(path.string() + ": " + message);
}

void write_all(int fd, const void* data, size_t bytes, const std::filesystem::path& path) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::write(fd, p, bytes);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail(path, std::string("write failed: ") + std::strerror(errno));
    }
    p += n;
    bytes -= static_cast<size_t>(n);
  }
}

std::array<uint32_t, 256> make_crc_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    table[i] = c;
  }
  return table;
}

}  // namespace

std::string safetensors_dtype(c10::ScalarType type) {
  for (const auto& [t, name] : dtype_table()) {
    if (t == type) return name;
  }
  throw std::runtime_error(std::string("safetensors: unsupported dtype ") + c10::toString(type));
}

uint32_t crc32(const void* data, size_t bytes, uint32_t crc) {
  static const std::array<uint32_t, 256> table = make_crc_table();
  const auto* p = static_cast<const uint8_t*>(data);
  crc = ~crc;
  for (size_t i = 0; i < bytes; ++i) crc = table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

uint32_t tensor_crc32(const Tensor& t) {
  const Tensor c = t.to(torch::kCPU).contiguous();
  return crc32(c.data_ptr(), c.numel() * c.element_size());
}

void write_safetensors(const std::filesystem::path& path,
                       const NamedTensors& tensors,
                       std::map<std::string, std::string> metadata) {
  NamedTensors sorted;
  sorted.reserve(tensors.size());
  for (const auto& [name, t] : tensors) sorted.emplace_back(name, t.detach().to(torch::kCPU).contiguous());
  std::stable_sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) {
    if (a.second.element_size() != b.second.element_size()) {
      return a.second.element_size() > b.second.element_size();
    }
    return a.first < b.first;
  });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  metadata.emplace("format", "pt");
  header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, t] : sorted) {
    if (header.contains(name)) fail(path, "duplicate tensor name '" + name + "'");
    const uint64_t bytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    header[name] = {{"dtype", safetensors_dtype(t.scalar_type())},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the buffer starts 8-byte aligned
  const uint64_t header_size = text.size();

  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(path, std::string("cannot create file: ") + std::strerror(errno));
  try {
    uint8_t size_le[8];
    for (int i = 0; i < 8; ++i) size_le[i] = static_cast<uint8_t>(header_size >> (8 * i));
    write_all(fd, size_le, 8, path);
    write_all(fd, text.data(), text.size(), path);
    for (const auto& [name, t] : sorted) write_all(fd, t.data_ptr(), t.numel() * t.element_size(), path);
    if (::fsync(fd) != 0) fail(path, std::string("fsync failed: ") + std::strerror(errno));
  } catch (...) {
    ::close(fd);
    throw;
  }
  if (::close(fd) != 0) fail(path, std::string("close failed: ") + std::strerror(errno));
}

namespace {

/// One tensor of a safetensors header: its bytes are [begin, end) of the data buffer.
struct HeaderEntry {
  std::string name;
  c10::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin, end;
};

/// The 8-byte little-endian size and the JSON header after it, checked against the file size.
nlohmann::ordered_json read_header(std::ifstream& in, const std::filesystem::path& path, uint64_t file_size,
                                   uint64_t& header_size) {
  if (file_size < 8) fail(path, "truncated: " + std::to_string(file_size) + " bytes, no header");
  uint8_t size_le[8];
  in.read(reinterpret_cast<char*>(size_le), 8);
  header_size = 0;
  for (int i = 0; i < 8; ++i) header_size |= static_cast<uint64_t>(size_le[i]) << (8 * i);
  if (header_size > kMaxHeaderBytes || header_size > file_size - 8) {
    fail(path, "header size " + std::to_string(header_size) + " does not fit a " + std::to_string(file_size) +
                   "-byte file (truncated or not safetensors)");
  }
  std::string text(header_size, '\0');
  in.read(text.data(), static_cast<std::streamsize>(header_size));
  if (text.empty() || text[0] != '{') fail(path, "header is not a JSON object");
  nlohmann::ordered_json header;
  try {
    header = nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::json::exception&) {
    fail(path, "invalid JSON header");
  }
  if (!header.is_object()) fail(path, "header is not a JSON object");
  return header;
}

/// The header's tensors, sorted by offset; __metadata__ goes to `metadata`.
std::vector<HeaderEntry> header_entries(const nlohmann::ordered_json& header, const std::filesystem::path& path,
                                        std::map<std::string, std::string>& metadata) {
  std::vector<HeaderEntry> entries;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) fail(path, "__metadata__ is not an object");
      for (const auto& [k, v] : value.items()) {
        if (!v.is_string()) fail(path, "__metadata__." + k + " is not a string");
        metadata[k] = v.get<std::string>();
      }
      continue;
    }
    try {
      HeaderEntry e{name, torch::kFloat, {}, 0, 0};
      const std::string dtype = value.at("dtype").get<std::string>();
      const auto& table = dtype_table();
      const auto it = std::find_if(table.begin(), table.end(), [&](const auto& p) { return dtype == p.second; });
      if (it == table.end()) fail(path, "tensor '" + name + "': unsupported dtype " + dtype);
      e.dtype = it->first;
      e.shape = value.at("shape").get<std::vector<int64_t>>();
      const auto offsets = value.at("data_offsets").get<std::vector<uint64_t>>();
      if (offsets.size() != 2 || offsets[0] > offsets[1]) fail(path, "tensor '" + name + "': bad data_offsets");
      e.begin = offsets[0];
      e.end = offsets[1];
      entries.push_back(std::move(e));
    } catch (const nlohmann::json::exception&) {
      fail(path, "tensor '" + name + "': header entry needs dtype, shape and data_offsets");
    }
  }
  std::sort(entries.begin(), entries.end(), [](const HeaderEntry& a, const HeaderEntry& b) { return a.begin < b.begin; });
  return entries;
}

/// Every tensor's bytes exactly where its shape and dtype put it, back to back, filling the buffer.
void check_offsets(const std::vector<HeaderEntry>& entries, const std::filesystem::path& path, uint64_t buffer_size) {
  uint64_t expected_begin = 0;
  for (const auto& e : entries) {
    int64_t numel = 1;
    for (const int64_t d : e.shape) {
      if (d < 0) fail(path, "tensor '" + e.name + "': negative dimension");
      numel *= d;
    }
    const uint64_t bytes = static_cast<uint64_t>(numel) * c10::elementSize(e.dtype);
    if (e.begin != expected_begin || e.end - e.begin != bytes) {
      fail(path, "tensor '" + e.name + "': data_offsets do not match its shape and position");
    }
    expected_begin = e.end;
  }
  if (expected_begin != buffer_size) {
    fail(path, "truncated or padded: tensors need " + std::to_string(expected_begin) +
                   " bytes after the header, the file has " + std::to_string(buffer_size));
  }
}

}  // namespace

SafetensorsFile read_safetensors(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot open file");
  in.seekg(0, std::ios::end);
  const auto file_size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  uint64_t header_size = 0;
  const nlohmann::ordered_json header = read_header(in, path, file_size, header_size);
  SafetensorsFile file;
  const std::vector<HeaderEntry> entries = header_entries(header, path, file.metadata);
  check_offsets(entries, path, file_size - 8 - header_size);
  for (const auto& e : entries) {
    Tensor t = torch::empty(e.shape, torch::dtype(e.dtype));
    in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(e.end - e.begin));
    if (!in) fail(path, "read failed for tensor '" + e.name + "'");
    file.tensors.emplace_back(e.name, t);
  }
  return file;
}

}  // namespace yuanmoe::checkpoint
