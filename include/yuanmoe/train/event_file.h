// TensorBoard's event file, written without a protobuf runtime: TFRecord framing (a length, its
// masked CRC32C, the payload, its masked CRC32C; tensorflow/core/lib/io/record_writer.cc) around
// `Event` messages (tensorflow/core/util/event.proto, summary.proto) whose few fields are encoded
// by hand: libtorch_cpu.so exports some protobuf runtime symbols of its own that a second runtime
// would define again (docs/training.md, "TensorBoard"), and generated code for a few fields is
// more than the fields.
#pragma once

#include <cstdint>
#include <fstream>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace yuanmoe::train {

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as in RFC 3720 App. B.4.
uint32_t crc32c(std::string_view bytes);

/// TFRecord's masked CRC: rotated right by 15 bits plus a constant, so that a CRC of data that
/// holds CRCs is not degenerate (tensorflow/core/lib/hash/crc32c.h).
uint32_t masked_crc32c(std::string_view bytes);

/// One TFRecord: little-endian u64 length, masked CRC of those 8 bytes, payload, masked CRC of it.
std::string tf_record(std::string_view payload);

/// A histogram as TensorBoard's HistogramProto: bucket i counts values in (limit[i-1], limit[i]].
struct Histogram {
  double min = 0.0, max = 0.0, count = 0.0, sum = 0.0, sum_squares = 0.0;
  std::vector<double> bucket_limits;
  std::vector<double> buckets;
};

/// Serialised `Event` messages (field numbers from event.proto / summary.proto).
std::string file_version_event(double wall_time);  ///< the first record: file_version "brain.Event:2"
std::string scalar_event(double wall_time, int64_t step, std::string_view tag, float value);
std::string histogram_event(double wall_time, int64_t step, std::string_view tag, const Histogram& histogram);
/// SessionLog{status: START} at `step`: TensorBoard's reader then drops the events of earlier
/// files at `step` and after (its purge of orphaned data), what SummaryWriter(purge_step=...)
/// writes when a run resumes, so a resumed run shows each step once.
std::string session_start_event(double wall_time, int64_t step);
/// Summary.Image of an encoded PNG; width and height read from its IHDR chunk (throws when
/// `png` is not a PNG).
std::string png_image_event(double wall_time, int64_t step, std::string_view tag, std::string_view png);

/// Appends events to one file, `events.out.tfevents.<unix seconds>.<host>.<pid>.<n>` in a
/// directory, as TensorBoard's own EventFileWriter (which SummaryWriter uses) names it; one file
/// per process start.
class EventFileWriter {
 public:
  /// Creates the directory and the file and writes the file-version record, then, with a
  /// `purge_step`, a session start at that step (a run's steps from there on are written again
  /// by this file); throws with the path when it cannot.
  explicit EventFileWriter(const std::string& directory, std::optional<int64_t> purge_step = std::nullopt);
  const std::string& path() const { return path_; }
  void add_scalar(int64_t step, std::string_view tag, double value);
  void add_histogram(int64_t step, std::string_view tag, const Histogram& histogram);
  /// A PNG as an image summary (Summary.Image); `png` holds the whole file.
  void add_png(int64_t step, std::string_view tag, std::string_view png);
  /// Flushes to the file; throws with the path when the write failed (disk full, for example).
  void flush();

 private:
  void write(const std::string& event);
  std::string path_;
  std::ofstream out_;
};

}  // namespace yuanmoe::train
