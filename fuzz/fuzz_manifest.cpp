// libFuzzer target: a checkpoint manifest.json beside real tensor files. An input that is a JSON
// object is merged (RFC 7386 merge patch) into the real manifest and the checksum recomputed, as
// a crafted file would, so mutations reach the checks behind the checksum; any other input is
// the manifest's text as it is. Loading must end in a checkpoint or one error naming the
// file; it must never read outside the step directory or crash.

#include "fuzz_input.h"
#include "yuanmoe/checkpoint/checkpoint.h"
#include "yuanmoe/checkpoint/safetensors.h"

namespace {

/// A small real checkpoint, written once per process.
const std::filesystem::path& step_dir() {
  static const std::filesystem::path dir = [] {
    yuanmoe::checkpoint::Checkpoint ck;
    ck.progress = {3, 300, {1, 0, 12}};
    ck.config.model.hidden_size = 8;
    ck.model = {{"layers.0.w", torch::arange(32, torch::kFloat).view({4, 8})}, {"norm.weight", torch::ones({8})}};
    ck.optimizer = {{"layers.0.w/exp_avg", torch::zeros({4, 8})}};
    ck.rng = {{"rank0/cpu", torch::zeros({16}, torch::kUInt8)}};
    return yuanmoe::checkpoint::save_checkpoint(yuanmoe::fuzz::scratch_dir() / "checkpoints", ck, 1);
  }();
  return dir;
}

/// The manifest as save_checkpoint wrote it, read once before any input replaces it.
const nlohmann::ordered_json& pristine_manifest() {
  static const nlohmann::ordered_json manifest = yuanmoe::checkpoint::read_manifest(step_dir());
  return manifest;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::filesystem::path& dir = step_dir();
  const nlohmann::ordered_json& pristine = pristine_manifest();  // before the first input replaces it
  std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const auto patch = nlohmann::ordered_json::parse(text);
    if (patch.is_object()) {
      auto manifest = pristine;
      manifest.merge_patch(patch);
      manifest.erase("checksum");
      const std::string body = manifest.dump();
      manifest["checksum"] = yuanmoe::checkpoint::crc32(body.data(), body.size());
      text = manifest.dump(2);
    }
  } catch (const nlohmann::json::exception&) {
  }
  yuanmoe::fuzz::write_file(dir / "manifest.json", reinterpret_cast<const uint8_t*>(text.data()), text.size());
  try {
    (void)yuanmoe::checkpoint::load_checkpoint(dir);
  } catch (const std::exception& e) {
    yuanmoe::fuzz::expect_names_file(e, dir.string());
  }
  return 0;
}
