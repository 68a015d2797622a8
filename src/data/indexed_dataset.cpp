// Megatron MMIDIDX writer and memory-mapped reader. The reader trusts nothing in the files: every
// count and pointer is checked against the file sizes before the first token is touched.
#include "yuanmoe/data/indexed_dataset.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace yuanmoe::data {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kUInt8:
    case DType::kInt8:
      return 1;
    case DType::kInt16:
    case DType::kUInt16:
      return 2;
    case DType::kInt32:
    case DType::kFloat32:
      return 4;
    case DType::kInt64:
    case DType::kFloat64:
      return 8;
  }
  throw std::invalid_argument("unknown dtype code " + std::to_string(static_cast<int>(dtype)));
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kUInt8: return "uint8";
    case DType::kInt8: return "int8";
    case DType::kInt16: return "int16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kFloat64: return "float64";
    case DType::kFloat32: return "float32";
    case DType::kUInt16: return "uint16";
  }
  return "unknown";
}

DType best_fitting_dtype(int64_t vocab_size) {
  return vocab_size < 65500 ? DType::kUInt16 : DType::kInt32;
}

namespace {

template <class T>
T load(const unsigned char* p) {
  T value;
  std::memcpy(&value, p, sizeof(T));
  return value;
}

template <class T>
void store(std::vector<char>& out, T value) {
  const char* bytes = reinterpret_cast<const char*>(&value);
  out.insert(out.end(), bytes, bytes + sizeof(T));
}

/// Range of token values each dtype holds exactly.
bool fits(DType dtype, int64_t v) {
  switch (dtype) {
    case DType::kUInt8: return v >= 0 && v <= 0xFF;
    case DType::kInt8: return v >= -128 && v <= 127;
    case DType::kInt16: return v >= -32768 && v <= 32767;
    case DType::kUInt16: return v >= 0 && v <= 0xFFFF;
    case DType::kFloat32: return v >= -(int64_t{1} << 24) && v <= (int64_t{1} << 24);
    default: return true;
  }
}

/// Calls f(T{}) with the C++ type stored for `dtype`: the one place dtype codes meet types.
template <class F>
void visit_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kUInt8: f(uint8_t{}); break;
    case DType::kInt8: f(int8_t{}); break;
    case DType::kInt16: f(int16_t{}); break;
    case DType::kUInt16: f(uint16_t{}); break;
    case DType::kInt32: f(int32_t{}); break;
    case DType::kInt64: f(int64_t{}); break;
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
  }
}

template <class T>
void append_as(std::vector<char>& out, const int32_t* tokens, size_t count) {
  const size_t start = out.size();
  out.resize(start + count * sizeof(T));
  char* dst = out.data() + start;
  for (size_t i = 0; i < count; ++i) {
    const T value = static_cast<T>(tokens[i]);
    std::memcpy(dst + i * sizeof(T), &value, sizeof(T));
  }
}

template <class T>
void widen(const unsigned char* src, int64_t count, int64_t* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = static_cast<int64_t>(load<T>(src + i * sizeof(T)));
}

std::string errno_text() { return std::strerror(errno); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Writer

IndexedDatasetWriter::IndexedDatasetWriter(const std::string& prefix, DType dtype)
    : prefix_(prefix), dtype_(dtype) {
  dtype_size(dtype_);  // rejects codes outside the table
  const std::string path = data_file_path(prefix_) + ".tmp";
  bin_ = std::fopen(path.c_str(), "wb");
  if (!bin_) throw std::runtime_error(path + ": cannot create (" + errno_text() + ")");
}

IndexedDatasetWriter::~IndexedDatasetWriter() {
  if (bin_) std::fclose(bin_);
  if (!finished_) {
    std::remove((data_file_path(prefix_) + ".tmp").c_str());
    std::remove((index_file_path(prefix_) + ".tmp").c_str());
  }
}

void IndexedDatasetWriter::add_sequence(const int32_t* tokens, size_t count) {
  if (finished_) throw std::logic_error(prefix_ + ": add_sequence after finish()");
  if (count > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    throw std::invalid_argument(prefix_ + ": sequence of " + std::to_string(count) +
                                " tokens exceeds the int32 length field of the index");
  }
  for (size_t i = 0; i < count; ++i) {
    if (!fits(dtype_, tokens[i])) {
      throw std::invalid_argument(prefix_ + ": token id " + std::to_string(tokens[i]) +
                                  " does not fit dtype " + dtype_name(dtype_));
    }
  }
  buffer_.clear();
  visit_dtype(dtype_, [&](auto tag) { append_as<decltype(tag)>(buffer_, tokens, count); });
  if (!buffer_.empty() && std::fwrite(buffer_.data(), 1, buffer_.size(), bin_) != buffer_.size()) {
    throw std::runtime_error(data_file_path(prefix_) + ".tmp: write failed (" + errno_text() + ")");
  }
  lengths_.push_back(static_cast<int32_t>(count));
  num_tokens_ += static_cast<int64_t>(count);
}

void IndexedDatasetWriter::end_document() {
  document_index_.push_back(static_cast<int64_t>(lengths_.size()));
}

void IndexedDatasetWriter::finish() {
  if (finished_) return;
  if (document_index_.back() != static_cast<int64_t>(lengths_.size())) end_document();
  const std::string bin_tmp = data_file_path(prefix_) + ".tmp";
  const bool closed = std::fclose(bin_) == 0;
  bin_ = nullptr;
  if (!closed) throw std::runtime_error(bin_tmp + ": write failed (" + errno_text() + ")");

  std::vector<char> idx;
  idx.insert(idx.end(), kIndexMagic, kIndexMagic + sizeof(kIndexMagic));
  store<uint64_t>(idx, 1);
  store<uint8_t>(idx, static_cast<uint8_t>(dtype_));
  store<uint64_t>(idx, lengths_.size());
  store<uint64_t>(idx, document_index_.size());
  for (const int32_t length : lengths_) store<int32_t>(idx, length);
  int64_t pointer = 0;
  for (const int32_t length : lengths_) {
    store<int64_t>(idx, pointer);
    pointer += static_cast<int64_t>(length) * static_cast<int64_t>(dtype_size(dtype_));
  }
  for (const int64_t entry : document_index_) store<int64_t>(idx, entry);

  const std::string idx_tmp = index_file_path(prefix_) + ".tmp";
  std::FILE* f = std::fopen(idx_tmp.c_str(), "wb");
  if (!f) throw std::runtime_error(idx_tmp + ": cannot create (" + errno_text() + ")");
  const bool written = std::fwrite(idx.data(), 1, idx.size(), f) == idx.size();
  if (std::fclose(f) != 0 || !written) {
    throw std::runtime_error(idx_tmp + ": write failed (" + errno_text() + ")");
  }
  if (std::rename(bin_tmp.c_str(), data_file_path(prefix_).c_str()) != 0 ||
      std::rename(idx_tmp.c_str(), index_file_path(prefix_).c_str()) != 0) {
    throw std::runtime_error(prefix_ + ": cannot move dataset into place (" + errno_text() + ")");
  }
  finished_ = true;
}

// ---------------------------------------------------------------------------------------------
// Reader

/// A read-only mmap of a whole file; an empty file maps to nothing (mmap rejects length 0).
struct IndexedDataset::Mapping {
  explicit Mapping(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw std::runtime_error(path + ": cannot open (" + errno_text() + ")");
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw std::runtime_error(path + ": not a regular file");
    }
    size = static_cast<size_t>(st.st_size);
    if (size > 0) {
      void* p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        throw std::runtime_error(path + ": mmap failed (" + errno_text() + ")");
      }
      data = static_cast<const unsigned char*>(p);
    }
    ::close(fd);  // the mapping keeps the file alive
  }
  ~Mapping() {
    if (data) ::munmap(const_cast<unsigned char*>(data), size);
  }
  const unsigned char* data = nullptr;
  size_t size = 0;
};

IndexedDataset::IndexedDataset(const std::string& prefix) : prefix_(prefix) {
  const std::string idx_path = index_file_path(prefix);
  const std::string bin_path = data_file_path(prefix);
  idx_ = std::make_unique<Mapping>(idx_path);
  bin_ = std::make_unique<Mapping>(bin_path);
  const auto fail = [](const std::string& path, const std::string& why) {
    return std::runtime_error(path + ": " + why);
  };

  constexpr size_t kHeader = 9 + 8 + 1 + 8 + 8;
  const unsigned char* p = idx_->data;
  const size_t idx_size = idx_->size;
  if (idx_size < kHeader) {
    throw fail(idx_path, "truncated index (" + std::to_string(idx_size) + " bytes, the header alone is " +
                             std::to_string(kHeader) + ")");
  }
  if (std::memcmp(p, kIndexMagic, sizeof(kIndexMagic)) != 0) {
    throw fail(idx_path, "not a Megatron MMIDIDX index (bad magic)");
  }
  const uint64_t version = load<uint64_t>(p + 9);
  if (version != 1) throw fail(idx_path, "unsupported index version " + std::to_string(version));
  const uint8_t code = load<uint8_t>(p + 17);
  if (code < 1 || code > 8) throw fail(idx_path, "unknown dtype code " + std::to_string(code));
  dtype_ = static_cast<DType>(code);
  const uint64_t seq_count = load<uint64_t>(p + 18);
  const uint64_t doc_count = load<uint64_t>(p + 26);

  // Each sequence takes 12 index bytes and each document entry 8: bound the counts by the file
  // size first so the size arithmetic below cannot overflow.
  const uint64_t body = idx_size - kHeader;
  if (seq_count > body / 12 || doc_count > body / 8) {
    throw fail(idx_path, "truncated index (header promises " + std::to_string(seq_count) +
                             " sequences and " + std::to_string(doc_count) + " document entries, file has " +
                             std::to_string(idx_size) + " bytes)");
  }
  const uint64_t expected = kHeader + 12 * seq_count + 8 * doc_count;
  // Megatron's multimodal datasets append one int8 mode per sequence.
  if (idx_size != expected && idx_size != expected + seq_count) {
    throw fail(idx_path, (idx_size < expected ? "truncated index (" : "index has trailing bytes (") +
                             std::to_string(idx_size) + " bytes, expected " + std::to_string(expected) +
                             " for " + std::to_string(seq_count) + " sequences and " +
                             std::to_string(doc_count) + " document entries)");
  }
  num_sequences_ = static_cast<int64_t>(seq_count);
  document_count_ = static_cast<int64_t>(doc_count);
  lengths_ = p + kHeader;
  pointers_ = lengths_ + 4 * seq_count;
  documents_ = pointers_ + 8 * seq_count;

  if (document_count_ < 1 || document_index(0) != 0 ||
      document_index(document_count_ - 1) != num_sequences_) {
    throw fail(idx_path, "corrupt document index (must run from 0 to the sequence count " +
                             std::to_string(num_sequences_) + ")");
  }
  for (int64_t d = 1; d < document_count_; ++d) {
    if (document_index(d) < document_index(d - 1)) {
      throw fail(idx_path, "corrupt document index (entry " + std::to_string(d) + " decreases)");
    }
  }

  const int64_t item = static_cast<int64_t>(dtype_size(dtype_));
  const int64_t bin_size = static_cast<int64_t>(bin_->size);
  for (int64_t i = 0; i < num_sequences_; ++i) {
    const int64_t length = sequence_length(i);
    const int64_t pointer = sequence_pointer(i);
    if (length < 0 || pointer < 0 || pointer % item != 0 || pointer > bin_size ||
        length > (bin_size - pointer) / item) {
      throw fail(bin_path, "sequence " + std::to_string(i) + " (" + std::to_string(length) +
                               " tokens at byte " + std::to_string(pointer) +
                               ") lies outside the file of " + std::to_string(bin_size) +
                               " bytes: truncated or mismatched with " + idx_path);
    }
    num_tokens_ += length;
  }
}

IndexedDataset::~IndexedDataset() = default;

void IndexedDataset::check_index(int64_t i, int64_t bound, const char* what) const {
  if (i < 0 || i >= bound) {
    throw std::out_of_range(index_file_path(prefix_) + ": " + what + " " + std::to_string(i) +
                            " out of range [0, " + std::to_string(bound) + ")");
  }
}

int64_t IndexedDataset::sequence_length(int64_t i) const {
  check_index(i, num_sequences_, "sequence");
  return load<int32_t>(lengths_ + 4 * i);
}

int64_t IndexedDataset::sequence_pointer(int64_t i) const {
  check_index(i, num_sequences_, "sequence");
  return load<int64_t>(pointers_ + 8 * i);
}

int64_t IndexedDataset::document_index(int64_t i) const {
  check_index(i, document_count_, "document index entry");
  return load<int64_t>(documents_ + 8 * i);
}

const void* IndexedDataset::sequence_data(int64_t i) const {
  return bin_->data + sequence_pointer(i);
}

void IndexedDataset::read(int64_t i, int64_t offset, int64_t count, int64_t* out) const {
  const int64_t length = sequence_length(i);
  if (offset < 0 || count < 0 || offset > length || count > length - offset) {
    throw std::out_of_range(data_file_path(prefix_) + ": tokens [" + std::to_string(offset) + ", " +
                            std::to_string(offset + count) + ") outside sequence " +
                            std::to_string(i) + " of length " + std::to_string(length));
  }
  const unsigned char* src =
      bin_->data + sequence_pointer(i) + offset * static_cast<int64_t>(dtype_size(dtype_));
  visit_dtype(dtype_, [&](auto tag) { widen<decltype(tag)>(src, count, out); });
}

std::vector<int64_t> IndexedDataset::sequence(int64_t i) const {
  std::vector<int64_t> tokens(static_cast<size_t>(sequence_length(i)));
  read(i, 0, static_cast<int64_t>(tokens.size()), tokens.data());
  return tokens;
}

}  // namespace yuanmoe::data
