#include "yuanmoe/train/event_file.h"

#include <fmt/format.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <stdexcept>

namespace yuanmoe::train {

uint32_t crc32c(std::string_view bytes) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int bit = 0; bit < 8; ++bit) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  uint32_t crc = 0xFFFFFFFFu;
  for (const char byte : bytes) crc = table[(crc ^ static_cast<uint8_t>(byte)) & 0xFFu] ^ (crc >> 8);
  return crc ^ 0xFFFFFFFFu;
}

uint32_t masked_crc32c(std::string_view bytes) {
  const uint32_t crc = crc32c(bytes);
  return ((crc >> 15) | (crc << 17)) + 0xA282EAD8u;
}

namespace {

// Event files are little-endian, and so are the hosts we build for: a memcpy writes them.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "event_file.cpp writes host byte order");

template <typename T>
void append_little_endian(std::string& out, T value) {
  char bytes[sizeof(T)];
  std::memcpy(bytes, &value, sizeof(T));
  out.append(bytes, sizeof(T));
}

void append_varint(std::string& out, uint64_t value) {
  while (value >= 0x80) {
    out.push_back(static_cast<char>((value & 0x7F) | 0x80));
    value >>= 7;
  }
  out.push_back(static_cast<char>(value));
}

// Protobuf wire types: 0 varint, 1 fixed64, 2 length-delimited, 5 fixed32.
void append_key(std::string& out, int field, int wire_type) {
  append_varint(out, static_cast<uint64_t>(field) << 3 | static_cast<uint64_t>(wire_type));
}
void append_double(std::string& out, int field, double value) {
  append_key(out, field, 1);
  append_little_endian(out, value);
}
void append_float(std::string& out, int field, float value) {
  append_key(out, field, 5);
  append_little_endian(out, value);
}
void append_bytes(std::string& out, int field, std::string_view bytes) {
  append_key(out, field, 2);
  append_varint(out, bytes.size());
  out.append(bytes);
}
void append_packed_doubles(std::string& out, int field, const std::vector<double>& values) {
  std::string packed;
  for (const double v : values) append_little_endian(packed, v);
  append_bytes(out, field, packed);
}

/// Event{wall_time = 1, step = 2, summary = 5 {value = 1 {...}}} around one Summary.Value.
std::string summary_event(double wall_time, int64_t step, const std::string& value) {
  std::string summary;
  append_bytes(summary, 1, value);
  std::string event;
  append_double(event, 1, wall_time);
  append_key(event, 2, 0);
  append_varint(event, static_cast<uint64_t>(step));
  append_bytes(event, 5, summary);
  return event;
}

std::atomic<int64_t> files_opened{0};  // the last part of a file's name, as TensorBoard's writer

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

std::string tf_record(std::string_view payload) {
  std::string length;
  append_little_endian(length, static_cast<uint64_t>(payload.size()));
  std::string record = length;
  append_little_endian(record, masked_crc32c(length));
  record.append(payload);
  append_little_endian(record, masked_crc32c(payload));
  return record;
}

std::string file_version_event(double wall_time) {
  std::string event;
  append_double(event, 1, wall_time);
  append_bytes(event, 3, "brain.Event:2");
  return event;
}

std::string scalar_event(double wall_time, int64_t step, std::string_view tag, float value) {
  std::string summary_value;  // Summary.Value{tag = 1, simple_value = 2}
  append_bytes(summary_value, 1, tag);
  append_float(summary_value, 2, value);
  return summary_event(wall_time, step, summary_value);
}

std::string histogram_event(double wall_time, int64_t step, std::string_view tag, const Histogram& histogram) {
  std::string histo;  // HistogramProto{min 1, max 2, num 3, sum 4, sum_squares 5, bucket_limit 6, bucket 7}
  append_double(histo, 1, histogram.min);
  append_double(histo, 2, histogram.max);
  append_double(histo, 3, histogram.count);
  append_double(histo, 4, histogram.sum);
  append_double(histo, 5, histogram.sum_squares);
  append_packed_doubles(histo, 6, histogram.bucket_limits);
  append_packed_doubles(histo, 7, histogram.buckets);
  std::string summary_value;  // Summary.Value{tag = 1, histo = 5}
  append_bytes(summary_value, 1, tag);
  append_bytes(summary_value, 5, histo);
  return summary_event(wall_time, step, summary_value);
}

std::string session_start_event(double wall_time, int64_t step) {
  std::string session_log;  // SessionLog{status = 1: START}
  append_key(session_log, 1, 0);
  append_varint(session_log, 1);
  std::string event;  // Event{wall_time = 1, step = 2, session_log = 7}
  append_double(event, 1, wall_time);
  append_key(event, 2, 0);
  append_varint(event, static_cast<uint64_t>(step));
  append_bytes(event, 7, session_log);
  return event;
}

std::string png_image_event(double wall_time, int64_t step, std::string_view tag, std::string_view png) {
  // The PNG signature (8 bytes), then the IHDR chunk: length, "IHDR", width, height (big-endian).
  if (png.size() < 24 || png.substr(1, 3) != "PNG" || png.substr(12, 4) != "IHDR") {
    throw std::runtime_error("not a PNG image");
  }
  const auto big_endian = [&](size_t at) {
    uint32_t value = 0;
    for (size_t i = 0; i < 4; ++i) value = value << 8 | static_cast<uint8_t>(png[at + i]);
    return value;
  };
  std::string image;  // Summary.Image{height 1, width 2, colorspace 3, encoded_image_string 4}
  append_key(image, 1, 0);
  append_varint(image, big_endian(20));
  append_key(image, 2, 0);
  append_varint(image, big_endian(16));
  append_key(image, 3, 0);
  append_varint(image, 3);  // RGB
  append_bytes(image, 4, png);
  std::string summary_value;  // Summary.Value{tag = 1, image = 4}
  append_bytes(summary_value, 1, tag);
  append_bytes(summary_value, 4, image);
  return summary_event(wall_time, step, summary_value);
}

EventFileWriter::EventFileWriter(const std::string& directory, std::optional<int64_t> purge_step) {
  std::error_code error;
  std::filesystem::create_directories(directory, error);
  char host[256] = "localhost";
  gethostname(host, sizeof(host) - 1);
  const double wall_time = now_seconds();
  path_ = (std::filesystem::path(directory) /
           fmt::format("events.out.tfevents.{:010d}.{}.{}.{}", static_cast<int64_t>(wall_time), host, getpid(),
                       files_opened.fetch_add(1)))
              .string();
  out_.open(path_, std::ios::binary | std::ios::app);
  if (!out_) throw std::runtime_error("cannot open TensorBoard event file " + path_);
  write(file_version_event(wall_time));
  if (purge_step) write(session_start_event(wall_time, *purge_step));
  flush();
}

void EventFileWriter::add_scalar(int64_t step, std::string_view tag, double value) {
  write(scalar_event(now_seconds(), step, tag, static_cast<float>(value)));
}

void EventFileWriter::add_histogram(int64_t step, std::string_view tag, const Histogram& histogram) {
  write(histogram_event(now_seconds(), step, tag, histogram));
}

void EventFileWriter::add_png(int64_t step, std::string_view tag, std::string_view png) {
  write(png_image_event(now_seconds(), step, tag, png));
}

void EventFileWriter::write(const std::string& event) {
  const std::string record = tf_record(event);
  out_.write(record.data(), static_cast<std::streamsize>(record.size()));
}

void EventFileWriter::flush() {
  out_.flush();
  if (!out_) throw std::runtime_error("cannot write TensorBoard event file " + path_);
}

}  // namespace yuanmoe::train
