// TensorBoard event files (train/event_file.h) against the published CRC-32C check values and an
// independent decoder: the records are split by their framing and the protobuf fields read back
// by wire type, as any protobuf parser reads them.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "support/temp_dir.h"
#include "yuanmoe/train/event_file.h"

namespace yuanmoe::train {
namespace {

// RFC 3720, Appendix B.4, and the "123456789" check value of the CRC catalogue's CRC-32/ISCSI.
TEST(Crc32cTest, MatchesThePublishedCheckValues) {
  EXPECT_EQ(crc32c(std::string(32, '\x00')), 0x8A9136AAu);
  EXPECT_EQ(crc32c(std::string(32, '\xFF')), 0x62A8AB43u);
  std::string ascending;
  for (int i = 0; i < 32; ++i) ascending.push_back(static_cast<char>(i));
  EXPECT_EQ(crc32c(ascending), 0x46DD794Eu);
  EXPECT_EQ(crc32c("123456789"), 0xE3069283u);
  const uint32_t crc = crc32c("123456789");
  EXPECT_EQ(masked_crc32c("123456789"), ((crc >> 15) | (crc << 17)) + 0xA282EAD8u);
}

template <typename T>
T read_le(const std::string& bytes, size_t at) {
  T value;
  std::memcpy(&value, bytes.data() + at, sizeof(T));
  return value;
}

/// The payloads of a TFRecord stream; fails the test on a bad length or CRC.
std::vector<std::string> split_records(const std::string& bytes) {
  std::vector<std::string> payloads;
  size_t at = 0;
  while (at < bytes.size()) {
    EXPECT_LE(at + 12, bytes.size());
    const auto length = read_le<uint64_t>(bytes, at);
    EXPECT_EQ(read_le<uint32_t>(bytes, at + 8), masked_crc32c(bytes.substr(at, 8)));
    EXPECT_LE(at + 16 + length, bytes.size());
    std::string payload = bytes.substr(at + 12, length);
    EXPECT_EQ(read_le<uint32_t>(bytes, at + 12 + length), masked_crc32c(payload));
    payloads.push_back(std::move(payload));
    at += 16 + length;
  }
  return payloads;
}

/// One protobuf message's fields by number: varints as integers, fixed64/fixed32 and
/// length-delimited fields as their raw bytes (the last occurrence of a field wins).
struct Fields {
  std::map<int, uint64_t> varints;
  std::map<int, std::string> bytes;
};
Fields parse(const std::string& message) {
  Fields fields;
  size_t at = 0;
  const auto varint = [&] {
    uint64_t value = 0;
    for (int shift = 0;; shift += 7) {
      const auto byte = static_cast<uint8_t>(message.at(at++));
      value |= static_cast<uint64_t>(byte & 0x7F) << shift;
      if (!(byte & 0x80)) return value;
    }
  };
  while (at < message.size()) {
    const uint64_t key = varint();
    const int field = static_cast<int>(key >> 3);
    switch (key & 7) {
      case 0: fields.varints[field] = varint(); break;
      case 1: fields.bytes[field] = message.substr(at, 8); at += 8; break;
      case 5: fields.bytes[field] = message.substr(at, 4); at += 4; break;
      case 2: {
        const uint64_t length = varint();
        fields.bytes[field] = message.substr(at, length);
        at += length;
        break;
      }
      default: ADD_FAILURE() << "wire type " << (key & 7); return fields;
    }
  }
  return fields;
}

TEST(EventFileTest, WritesTheVersionRecordThenScalarsAndHistogramsThatDecode) {
  testing::TempDir dir;
  std::string path;
  {
    EventFileWriter writer((dir.path() / "tensorboard").string());
    path = writer.path();
    writer.add_scalar(7, "train/loss", 4.25);
    Histogram histogram{0.01, 0.2, 32, 1.0, 0.05, {0.05, 0.1, 0.25}, {10, 12, 10}};
    writer.add_histogram(10, "moe/layer_00/expert_share", histogram);
    writer.flush();
  }
  EXPECT_EQ(std::filesystem::path(path).filename().string().rfind("events.out.tfevents.", 0), 0u);
  std::ifstream in(path, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::vector<std::string> records = split_records(bytes);
  ASSERT_EQ(records.size(), 3u);

  const Fields version = parse(records[0]);
  EXPECT_EQ(version.bytes.at(3), "brain.Event:2");
  EXPECT_GT(read_le<double>(version.bytes.at(1), 0), 1.7e9);  // wall time in seconds since 1970

  const Fields scalar = parse(records[1]);
  EXPECT_EQ(scalar.varints.at(2), 7u);
  const Fields scalar_value = parse(parse(scalar.bytes.at(5)).bytes.at(1));
  EXPECT_EQ(scalar_value.bytes.at(1), "train/loss");
  EXPECT_EQ(read_le<float>(scalar_value.bytes.at(2), 0), 4.25f);

  const Fields histogram = parse(records[2]);
  EXPECT_EQ(histogram.varints.at(2), 10u);
  const Fields histogram_value = parse(parse(histogram.bytes.at(5)).bytes.at(1));
  EXPECT_EQ(histogram_value.bytes.at(1), "moe/layer_00/expert_share");
  const Fields histo = parse(histogram_value.bytes.at(5));
  EXPECT_EQ(read_le<double>(histo.bytes.at(1), 0), 0.01);
  EXPECT_EQ(read_le<double>(histo.bytes.at(2), 0), 0.2);
  EXPECT_EQ(read_le<double>(histo.bytes.at(3), 0), 32.0);
  EXPECT_EQ(histo.bytes.at(6).size(), 3 * sizeof(double));
  EXPECT_EQ(read_le<double>(histo.bytes.at(6), 16), 0.25);
  EXPECT_EQ(read_le<double>(histo.bytes.at(7), 8), 12.0);
}

// A resumed run's file starts with a session start at the step it resumes from, which TensorBoard's
// reader takes as the point from which earlier files' events are dropped.
TEST(EventFileTest, AResumedRunsFileStartsASessionAtItsPurgeStep) {
  testing::TempDir dir;
  std::string path;
  {
    EventFileWriter writer(dir.path().string(), /*purge_step=*/5);
    path = writer.path();
  }
  std::ifstream in(path, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::vector<std::string> records = split_records(bytes);
  ASSERT_EQ(records.size(), 2u);
  const Fields start = parse(records[1]);
  EXPECT_EQ(start.varints.at(2), 5u);
  EXPECT_EQ(parse(start.bytes.at(7)).varints.at(1), 1u);  // SessionLog.status START
}

// A corrupted payload byte no longer matches its record's CRC: what a reader checks.
TEST(EventFileTest, ACorruptedByteBreaksItsRecordsCrc) {
  std::string record = tf_record(scalar_event(1.7e9, 3, "train/lr", 0.001f));
  const auto length = read_le<uint64_t>(record, 0);
  const std::string payload = record.substr(12, length);
  EXPECT_EQ(read_le<uint32_t>(record, 12 + length), masked_crc32c(payload));
  std::string corrupted = payload;
  corrupted[corrupted.size() / 2] ^= 0x01;
  EXPECT_NE(read_le<uint32_t>(record, 12 + length), masked_crc32c(corrupted));
}

TEST(EventFileTest, AnUnwritableDirectoryIsOneErrorNamingIt) {
  testing::TempDir dir;
  const std::filesystem::path file = dir.path() / "a-file";
  std::ofstream(file) << "x";
  try {
    EventFileWriter writer((file / "tensorboard").string());
    FAIL() << "expected an error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find((file / "tensorboard").string()), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace yuanmoe::train
