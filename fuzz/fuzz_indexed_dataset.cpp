// libFuzzer target: arbitrary bytes as a Megatron indexed dataset. The first two bytes (little
// endian) give the .idx size, the rest after it is .bin. Construction must validate everything
// and fail with one error naming the file; a dataset it accepts must read back every sequence
// and document boundary without leaving the mapping.
#include <algorithm>

#include "fuzz_input.h"
#include "yuanmoe/data/indexed_dataset.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const size_t idx_size = std::min<size_t>(size - 2, data[0] | (static_cast<size_t>(data[1]) << 8));
  const auto prefix = yuanmoe::fuzz::scratch_dir() / "data";
  yuanmoe::fuzz::write_file(prefix.string() + ".idx", data + 2, idx_size);
  yuanmoe::fuzz::write_file(prefix.string() + ".bin", data + 2 + idx_size, size - 2 - idx_size);
  try {
    yuanmoe::data::IndexedDataset dataset(prefix.string());
    int64_t checksum = 0;
    for (int64_t i = 0; i < dataset.num_sequences(); ++i) {
      for (const int64_t token : dataset.sequence(i)) checksum += token;
    }
    for (int64_t i = 0; i <= dataset.num_documents(); ++i) checksum += dataset.document_index(i);
    (void)checksum;
  } catch (const std::exception& e) {
    yuanmoe::fuzz::expect_names_file(e, prefix.string());
  }
  return 0;
}
