// libFuzzer target: arbitrary bytes as a .safetensors file. The reader must refuse bad headers,
// offsets, dtypes and sizes with one error naming the file, never read out of bounds.

#include "fuzz_input.h"
#include "yuanmoe/checkpoint/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = yuanmoe::fuzz::scratch_dir() / "input.safetensors";
  yuanmoe::fuzz::write_file(path, data, size);
  try {
    const auto file = yuanmoe::checkpoint::read_safetensors(path);
    for (const auto& [name, tensor] : file.tensors) (void)yuanmoe::checkpoint::tensor_crc32(tensor);
  } catch (const std::exception& e) {
    yuanmoe::fuzz::expect_names_file(e, path.string());
  }
  return 0;
}
