// safetensors files and checkpoints (round trip by name, pruning, atomicity, corruption named
// by file).
#include <fstream>

#include "support/fixtures.h"
#include "support/temp_dir.h"
#include "yuanmoe/checkpoint/checkpoint.h"
#include "yuanmoe/checkpoint/safetensors.h"
#include "yuanmoe/config/config_io.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/transformer.h"

namespace yuanmoe::checkpoint {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;
using CheckpointTest = testing::SeededTest;

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

/// The message of the std::runtime_error `f` throws ("" when it does not throw).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

TEST_F(CheckpointTest, SafetensorsRoundTripsEveryDtypeAligned) {
  TempDir dir;
  const NamedTensors tensors{{"f64", torch::randn({3}, torch::kDouble)},
                             {"f32", torch::randn({2, 3})},
                             {"bf16", torch::randn({5}).to(torch::kBFloat16)},
                             {"i64", torch::arange(4)},
                             {"u8", torch::tensor({1, 2, 3}, torch::kUInt8)},
                             {"scalar", torch::tensor(7.5)},
                             {"empty", torch::zeros({0, 4})}};
  write_safetensors(dir / "t.safetensors", tensors, {{"note", "x"}});
  const SafetensorsFile file = read_safetensors(dir / "t.safetensors");
  EXPECT_EQ(file.metadata.at("format"), "pt");
  EXPECT_EQ(file.metadata.at("note"), "x");
  ASSERT_EQ(file.tensors.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    const auto it = std::find_if(file.tensors.begin(), file.tensors.end(), [&](const auto& p) { return p.first == name; });
    ASSERT_NE(it, file.tensors.end()) << name;
    EXPECT_EQ(it->second.scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(torch::equal(it->second, t)) << name;
  }
  // Layout by the format's rules: u64 header size, header padded to 8 bytes, wider types first.
  const std::string bytes = read_bytes(dir / "t.safetensors");
  uint64_t header_size = 0;
  std::memcpy(&header_size, bytes.data(), 8);
  EXPECT_EQ(header_size % 8, 0u);
  const auto header = nlohmann::ordered_json::parse(bytes.substr(8, header_size));
  EXPECT_EQ(header.at("f64").at("data_offsets")[0], 0);
  EXPECT_EQ(header.at("bf16").at("dtype"), "BF16");
}

TEST_F(CheckpointTest, SafetensorsRejectsTruncatedAndForeignFiles) {
  TempDir dir;
  write_safetensors(dir / "t.safetensors", {{"w", torch::randn({64})}});
  const std::string bytes = read_bytes(dir / "t.safetensors");
  write_bytes(dir / "cut.safetensors", bytes.substr(0, bytes.size() - 4));
  EXPECT_NE(error_of([&] { read_safetensors(dir / "cut.safetensors"); }).find("cut.safetensors: truncated"), std::string::npos);
  write_bytes(dir / "text.safetensors", "hello, this is not a tensor file");
  EXPECT_NE(error_of([&] { read_safetensors(dir / "text.safetensors"); }).find("text.safetensors: header size"), std::string::npos);
  EXPECT_NE(error_of([&] { read_safetensors(dir / "none.safetensors"); }).find("cannot open"), std::string::npos);
}

TEST_F(CheckpointTest, Crc32MatchesZlib) {
  const std::string text = "123456789";
  EXPECT_EQ(crc32(text.data(), text.size()), 0xCBF43926u);  // the CRC-32 check value
  EXPECT_EQ(crc32(text.data() + 4, 5, crc32(text.data(), 4)), 0xCBF43926u);  // chainable
}

Checkpoint sample_checkpoint(int64_t step) {
  Checkpoint ck;
  ck.progress = {step, step * 100, {7, 1, step * 4}};
  ck.config.model.hidden_size = 8;
  ck.model = {{"layers.0.w", torch::randn({4, 8})}, {"norm.weight", torch::ones({8})}};
  ck.optimizer = {{"layers.0.w/exp_avg", torch::randn({4, 8})}};
  ck.rng = {{"rank0/cpu", at::detail::getDefaultCPUGenerator().get_state()}};
  return ck;
}

TEST_F(CheckpointTest, SaveLoadRoundTripPrunesAndPointsLatest) {
  TempDir dir;
  const fs::path root = dir.path() / "checkpoints";
  Checkpoint last;
  for (int64_t step : {10, 20, 30}) {
    last = sample_checkpoint(step);
    save_checkpoint(root, last, /*keep_last=*/2);
  }
  EXPECT_FALSE(fs::exists(root / "step_00000010"));  // pruned
  EXPECT_TRUE(fs::exists(root / "step_00000020"));
  EXPECT_EQ(read_bytes(root / "latest"), "step_00000030\n");
  ASSERT_EQ(find_latest_checkpoint(root), root / "step_00000030");
  EXPECT_EQ(resolve_checkpoint_dir(dir.path()), root / "step_00000030");  // a run dir works too

  const Checkpoint loaded = load_checkpoint(root / "step_00000030");
  EXPECT_EQ(loaded.progress.step, 30);
  EXPECT_EQ(loaded.progress.tokens_seen, 3000);
  EXPECT_TRUE(loaded.progress.sampler == last.progress.sampler);
  EXPECT_EQ(config::to_json(loaded.config), config::to_json(last.config));
  EXPECT_EQ(loaded.config.model.hidden_size, 8);
  ASSERT_EQ(loaded.model.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const auto& [name, t] = loaded.model[i];
    const auto it = std::find_if(last.model.begin(), last.model.end(), [&](const auto& p) { return p.first == name; });
    ASSERT_NE(it, last.model.end());
    EXPECT_TRUE(torch::equal(t, it->second)) << name;
  }
  EXPECT_TRUE(torch::equal(loaded.rng[0].second, last.rng[0].second));
}

TEST_F(CheckpointTest, IncompleteWritesAreInvisible) {
  TempDir dir;
  const fs::path root = dir.path() / "checkpoints";
  save_checkpoint(root, sample_checkpoint(10), 3);
  // A run killed while writing step 20 leaves a temporary directory (and maybe no manifest);
  // one killed between the rename and the pointer update leaves `latest` stale.
  fs::create_directories(root / ".tmp-step_00000020");
  write_bytes(root / ".tmp-step_00000020" / model_file(0), "partial");
  fs::create_directories(root / "step_00000030");  // not ours: no manifest
  EXPECT_EQ(find_latest_checkpoint(root), root / "step_00000010");
  save_checkpoint(root, sample_checkpoint(40), 3);
  EXPECT_FALSE(fs::exists(root / ".tmp-step_00000020"));  // cleaned by the next save
  EXPECT_EQ(find_latest_checkpoint(root), root / "step_00000040");
}

class CorruptCheckpointTest : public CheckpointTest {
 protected:
  void SetUp() override {
    CheckpointTest::SetUp();
    step_dir_ = save_checkpoint(dir_.path() / "checkpoints", sample_checkpoint(5), 3);
  }
  std::string load_error() { return error_of([&] { load_checkpoint(step_dir_); }); }
  TempDir dir_;
  fs::path step_dir_;
};

TEST_F(CorruptCheckpointTest, FlippedByteNamesTheFile) {
  std::string bytes = read_bytes(step_dir_ / model_file(0));
  bytes[bytes.size() - 3] ^= 0x01;
  write_bytes(step_dir_ / model_file(0), bytes);
  const std::string error = load_error();
  EXPECT_NE(error.find(model_file(0) + ": checksum mismatch"), std::string::npos) << error;
}

TEST_F(CorruptCheckpointTest, TruncatedFileNamesTheFile) {
  const std::string bytes = read_bytes(step_dir_ / optimizer_file(0));
  write_bytes(step_dir_ / optimizer_file(0), bytes.substr(0, bytes.size() / 2));
  const std::string error = load_error();
  EXPECT_NE(error.find(optimizer_file(0) + ": size"), std::string::npos) << error;
  EXPECT_NE(error.find("truncated"), std::string::npos) << error;
}

TEST_F(CorruptCheckpointTest, MissingFileNamesTheFile) {
  fs::remove(step_dir_ / rng_file(0));
  const std::string error = load_error();
  EXPECT_NE(error.find(rng_file(0) + ": missing file"), std::string::npos) << error;
}

TEST_F(CorruptCheckpointTest, EditedManifestIsDetected) {
  std::string text = read_bytes(step_dir_ / "manifest.json");
  const auto at = text.find("\"step\": 5");
  ASSERT_NE(at, std::string::npos);
  text.replace(at, 9, "\"step\": 6");
  write_bytes(step_dir_ / "manifest.json", text);
  EXPECT_NE(load_error().find("manifest.json: checksum mismatch"), std::string::npos);
  write_bytes(step_dir_ / "manifest.json", text.substr(0, text.size() / 2));
  EXPECT_NE(load_error().find("manifest.json: invalid JSON"), std::string::npos);
}

// A crafted manifest (its checksum recomputed, as anyone can) must not make the loader read
// outside the step directory.
TEST_F(CorruptCheckpointTest, ManifestFileNamesCannotLeaveTheDirectory) {
  const auto pristine = nlohmann::ordered_json::parse(read_bytes(step_dir_ / "manifest.json"));
  for (const std::string name : {"../rng.safetensors", "/etc/passwd", "model/../../x.safetensors", ".."}) {
    auto manifest = pristine;
    manifest["files"][name] = manifest["files"][rng_file(0)];
    manifest["files"].erase(rng_file(0));
    manifest.erase("checksum");
    const std::string text = manifest.dump();
    manifest["checksum"] = crc32(text.data(), text.size());
    write_bytes(step_dir_ / "manifest.json", manifest.dump(2));
    const std::string error = load_error();
    EXPECT_NE(error.find("file name '" + name + "' is not a plain name"), std::string::npos) << error;
  }
}

TEST_F(CheckpointTest, ModelStateLoadsByNameAndRejectsMismatches) {
  const auto model_config = testing::small_model_config();
  const auto moe_config = testing::small_moe_config();
  model::Transformer a(model_config, moe_config), b(model_config, moe_config);
  model::init_weights(*a, model_config);
  NamedTensors state = model_state(*a);
  std::reverse(state.begin(), state.end());  // order does not matter, names do
  load_model_state(*b, state, "a");
  for (const auto& item : a->named_parameters()) {
    EXPECT_TRUE(torch::equal(item.value(), b->named_parameters()[item.key()])) << item.key();
  }
  NamedTensors missing(state.begin() + 1, state.end());
  EXPECT_NE(error_of([&] { load_model_state(*b, missing, "src"); }).find("src: lacks"), std::string::npos);
  NamedTensors reshaped = state;
  reshaped.back().second = reshaped.back().second.reshape({-1});  // embed_tokens.weight
  EXPECT_NE(error_of([&] { load_model_state(*b, reshaped, "src"); }).find("has shape"), std::string::npos);
}

}  // namespace
}  // namespace yuanmoe::checkpoint
