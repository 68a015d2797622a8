#include "yuanmoe/checkpoint/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>
#include <vector>

#include "yuanmoe/config/config_io.h"

namespace yuanmoe::checkpoint {

namespace {

using ordered_json = nlohmann::ordered_json;

constexpr const char* kManifest = "manifest.json";
constexpr const char* kStepPrefix = "step_";
constexpr const char* kTmpPrefix = ".tmp-";

[[noreturn]] void fail(const fs::path& path, const std::string& message) {
  throw std::runtime_error(path.string() + ": " + message);
}

void fsync_path(const fs::path& path, bool directory) {
  const int fd = ::open(path.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) fail(path, "cannot open for fsync");
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) fail(path, "fsync failed");
}

void write_text_durably(const fs::path& path, const std::string& text) {
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    if (!out) fail(path, "cannot create file");
    out << text;
    out.flush();
    if (!out) fail(path, "write failed");
  }
  fsync_path(path, false);
}

/// crc32 and size of a whole file, streamed.
std::pair<uint32_t, uint64_t> file_crc32(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "missing or unreadable file");
  std::vector<char> buffer(1 << 20);
  uint32_t crc = 0;
  uint64_t bytes = 0;
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    const auto n = static_cast<size_t>(in.gcount());
    crc = crc32(buffer.data(), n, crc);
    bytes += n;
  }
  return {crc, bytes};
}

/// The manifest's checksum covers its own text without the "checksum" key.
uint32_t manifest_checksum(ordered_json manifest) {
  manifest.erase("checksum");
  const std::string text = manifest.dump();
  return crc32(text.data(), text.size());
}

int64_t step_of(const fs::path& dir) {
  const std::string name = dir.filename().string();
  if (name.rfind(kStepPrefix, 0) != 0) return -1;
  const std::string digits = name.substr(std::string(kStepPrefix).size());
  if (digits.empty() || !std::all_of(digits.begin(), digits.end(), ::isdigit)) return -1;
  return std::stoll(digits);
}

/// Complete step directories, oldest first.
std::vector<fs::path> step_dirs(const fs::path& checkpoints_dir) {
  std::vector<std::pair<int64_t, fs::path>> found;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(checkpoints_dir, ec)) {
    const int64_t step = step_of(entry.path());
    if (step >= 0 && entry.is_directory() && fs::exists(entry.path() / kManifest)) {
      found.emplace_back(step, entry.path());
    }
  }
  std::sort(found.begin(), found.end());
  std::vector<fs::path> dirs;
  for (auto& [step, path] : found) dirs.push_back(path);
  return dirs;
}

ordered_json tensor_entries(const NamedTensors& tensors, const std::string& file) {
  ordered_json entries = ordered_json::array();
  for (const auto& [name, t] : tensors) {
    entries.push_back({{"name", name},
                       {"shape", t.sizes().vec()},
                       {"dtype", safetensors_dtype(t.scalar_type())},
                       {"file", file},
                       {"crc32", tensor_crc32(t)}});
  }
  return entries;
}

}  // namespace

NamedTensors model_state(const torch::nn::Module& model) {
  NamedTensors state;
  for (const auto& item : model.named_parameters()) state.emplace_back(item.key(), item.value().detach());
  for (const auto& item : model.named_buffers()) state.emplace_back(item.key(), item.value().detach());
  return state;
}

void load_model_state(torch::nn::Module& model, const NamedTensors& state, const std::string& source) {
  std::map<std::string, Tensor> by_name(state.begin(), state.end());
  torch::NoGradGuard no_grad;
  const auto copy_into = [&](const std::string& name, Tensor target) {
    const auto it = by_name.find(name);
    if (it == by_name.end()) throw std::runtime_error(source + ": lacks '" + name + "' (different model?)");
    if (it->second.sizes() != target.sizes()) {
      throw std::runtime_error(source + ": '" + name + "' has shape " + c10::str(it->second.sizes()) +
                               ", the model expects " + c10::str(target.sizes()));
    }
    target.copy_(it->second);
    by_name.erase(it);
  };
  for (const auto& item : model.named_parameters()) copy_into(item.key(), item.value());
  for (const auto& item : model.named_buffers()) copy_into(item.key(), item.value());
  if (!by_name.empty()) {
    throw std::runtime_error(source + ": holds '" + by_name.begin()->first + "', which the model does not have");
  }
}

std::string step_dir_name(int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "%s%08lld", kStepPrefix, static_cast<long long>(step));
  return name;
}

std::string model_file(int64_t stage) {
  char name[48];
  std::snprintf(name, sizeof(name), "model-stage-%02lld.safetensors", static_cast<long long>(stage));
  return name;
}

std::string optimizer_file(int64_t stage) {
  char name[48];
  std::snprintf(name, sizeof(name), "optimizer-stage-%02lld.safetensors", static_cast<long long>(stage));
  return name;
}

std::string rng_file(int64_t rank) { return "rng-rank-" + std::to_string(rank) + ".safetensors"; }

fs::path temporary_checkpoint_dir(const fs::path& checkpoints_dir, int64_t step) {
  return checkpoints_dir / (kTmpPrefix + step_dir_name(step));
}

fs::path begin_checkpoint(const fs::path& checkpoints_dir, int64_t step) {
  fs::create_directories(checkpoints_dir);
  // Leftovers of runs killed mid-write are never complete: drop them.
  for (const auto& entry : fs::directory_iterator(checkpoints_dir)) {
    if (entry.path().filename().string().rfind(kTmpPrefix, 0) == 0) fs::remove_all(entry.path());
  }
  const fs::path tmp_dir = temporary_checkpoint_dir(checkpoints_dir, step);
  fs::create_directories(tmp_dir);
  return tmp_dir;
}

void write_checkpoint_file(const fs::path& tmp_dir, const std::string& file, const NamedTensors& tensors) {
  write_safetensors(tmp_dir / file, tensors);
}

fs::path save_checkpoint(const fs::path& checkpoints_dir, const Checkpoint& checkpoint, int64_t keep_last) {
  const fs::path tmp_dir = begin_checkpoint(checkpoints_dir, checkpoint.progress.step);
  write_checkpoint_file(tmp_dir, model_file(0), checkpoint.model);
  write_checkpoint_file(tmp_dir, optimizer_file(0), checkpoint.optimizer);
  write_checkpoint_file(tmp_dir, rng_file(0), checkpoint.rng);
  return finish_checkpoint(checkpoints_dir, tmp_dir, checkpoint, keep_last);
}

fs::path finish_checkpoint(const fs::path& checkpoints_dir, const fs::path& tmp_dir, const Checkpoint& checkpoint,
                           int64_t keep_last) {
  const std::string name = step_dir_name(checkpoint.progress.step);
  const fs::path final_dir = checkpoints_dir / name;
  std::vector<fs::path> tensor_files;
  for (const auto& entry : fs::directory_iterator(tmp_dir)) {
    if (entry.path().extension() == ".safetensors") tensor_files.push_back(entry.path());
  }
  std::sort(tensor_files.begin(), tensor_files.end());
  ordered_json tensors = ordered_json::array();
  for (const fs::path& path : tensor_files) {
    for (auto& entry : tensor_entries(read_safetensors(path).tensors, path.filename().string())) {
      tensors.push_back(std::move(entry));
    }
  }
  if (!checkpoint.tokenizer.empty()) {
    fs::copy_file(checkpoint.tokenizer, tmp_dir / "tokenizer.model", fs::copy_options::overwrite_existing);
    fsync_path(tmp_dir / "tokenizer.model", false);
  }
  ordered_json files = ordered_json::object();
  std::vector<fs::path> all_files;
  for (const auto& entry : fs::directory_iterator(tmp_dir)) all_files.push_back(entry.path());
  std::sort(all_files.begin(), all_files.end());
  for (const fs::path& path : all_files) {
    const auto [crc, bytes] = file_crc32(path);
    files[path.filename().string()] = {{"bytes", bytes}, {"crc32", crc}};
  }

  ordered_json manifest;
  manifest["format"] = "yuanmoe-checkpoint";
  manifest["format_version"] = kFormatVersion;
  manifest["step"] = checkpoint.progress.step;
  manifest["tokens_seen"] = checkpoint.progress.tokens_seen;
  nlohmann::json sampler;
  if (checkpoint.progress.blend) {
    data::to_json(sampler, *checkpoint.progress.blend);
    manifest["blend_sampler"] = ordered_json::parse(sampler.dump());
  } else {
    data::to_json(sampler, checkpoint.progress.sampler);
    manifest["sampler"] = ordered_json::parse(sampler.dump());
  }
  manifest["layout"] = {{"pipeline_parallel_size", checkpoint.layout.pipeline_parallel_size},
                        {"data_parallel_size", checkpoint.layout.data_parallel_size},
                        {"expert_parallel_size", checkpoint.layout.expert_parallel_size},
                        {"sharded_optimizer", checkpoint.layout.sharded_optimizer}};
  manifest["config"] = ordered_json::parse(config::to_json(checkpoint.config).dump());
  manifest["files"] = files;
  manifest["tensors"] = tensors;
  manifest["checksum"] = manifest_checksum(manifest);
  write_text_durably(tmp_dir / kManifest, manifest.dump(1) + "\n");
  fsync_path(tmp_dir, true);

  if (fs::exists(final_dir)) fs::remove_all(final_dir);  // a rerun of the same step replaces it
  fs::rename(tmp_dir, final_dir);
  fsync_path(checkpoints_dir, true);

  const fs::path latest_tmp = checkpoints_dir / (std::string(kTmpPrefix) + "latest");
  write_text_durably(latest_tmp, name + "\n");
  fs::rename(latest_tmp, checkpoints_dir / "latest");
  fsync_path(checkpoints_dir, true);

  std::vector<fs::path> dirs = step_dirs(checkpoints_dir);
  for (size_t i = 0; i + static_cast<size_t>(keep_last) < dirs.size(); ++i) {
    if (dirs[i] != final_dir) fs::remove_all(dirs[i]);
  }
  return final_dir;
}

std::optional<fs::path> find_latest_checkpoint(const fs::path& checkpoints_dir) {
  const std::vector<fs::path> dirs = step_dirs(checkpoints_dir);
  if (dirs.empty()) return std::nullopt;
  return dirs.back();
}

fs::path resolve_checkpoint_dir(const fs::path& path) {
  if (!fs::exists(path)) fail(path, "no such checkpoint directory");
  if (fs::exists(path / kManifest)) return path;
  for (const fs::path& candidate : {path / "checkpoints", path}) {
    if (auto latest = find_latest_checkpoint(candidate)) return *latest;
  }
  fail(path, "no checkpoint here (expected manifest.json, step_* directories or checkpoints/)");
}

ordered_json read_manifest(const fs::path& step_dir) {
  const fs::path path = step_dir / kManifest;
  std::ifstream in(path);
  if (!in) fail(path, "missing or unreadable file");
  ordered_json manifest;
  try {
    manifest = ordered_json::parse(in);
  } catch (const nlohmann::json::exception&) {
    fail(path, "invalid JSON (corrupt or truncated manifest)");
  }
  if (!manifest.is_object() || !manifest.contains("format") || manifest["format"] != "yuanmoe-checkpoint") {
    fail(path, "not a yuanmoe checkpoint manifest");
  }
  if (!manifest.contains("checksum") || manifest["checksum"] != manifest_checksum(manifest)) {
    fail(path, "checksum mismatch (the manifest was modified or corrupted)");
  }
  if (!manifest.contains("format_version") || manifest["format_version"] != kFormatVersion) {
    fail(path, "format_version " + manifest.value("format_version", ordered_json()).dump() +
                   " is not supported (expected " + std::to_string(kFormatVersion) + ")");
  }
  return manifest;
}

namespace {
Checkpoint load_verified(const fs::path& step_dir, const ordered_json& manifest, LoadParts parts);
}  // namespace

Checkpoint load_checkpoint(const fs::path& step_dir, LoadParts parts) {
  const ordered_json manifest = read_manifest(step_dir);
  // A manifest whose checksum holds can still be crafted: a missing key or a value of the wrong
  // type is one error naming it, never an exception from the JSON library.
  try {
    return load_verified(step_dir, manifest, parts);
  } catch (const nlohmann::json::exception& e) {
    fail(step_dir / kManifest, std::string("malformed manifest: ") + e.what());
  }
}

namespace {
Checkpoint load_verified(const fs::path& step_dir, const ordered_json& manifest, LoadParts parts) {
  Checkpoint checkpoint;
  try {
    checkpoint.progress.step = manifest.at("step").get<int64_t>();
    checkpoint.progress.tokens_seen = manifest.at("tokens_seen").get<int64_t>();
    if (manifest.contains("blend_sampler")) {
      data::BlendState blend;
      data::from_json(nlohmann::json::parse(manifest.at("blend_sampler").dump()), blend);
      checkpoint.progress.blend = std::move(blend);
    } else {
      data::from_json(nlohmann::json::parse(manifest.at("sampler").dump()), checkpoint.progress.sampler);
    }
    const ordered_json& layout = manifest.at("layout");
    checkpoint.layout.pipeline_parallel_size = layout.value("pipeline_parallel_size", int64_t{1});
    checkpoint.layout.data_parallel_size = layout.value("data_parallel_size", int64_t{1});
    checkpoint.layout.expert_parallel_size = layout.value("expert_parallel_size", int64_t{1});
    checkpoint.layout.sharded_optimizer = layout.value("sharded_optimizer", false);
  } catch (const std::exception& e) {
    fail(step_dir / kManifest, std::string("malformed manifest: ") + e.what());
  }
  config::ParseResult parsed = config::parse_config(nlohmann::json::parse(manifest.at("config").dump()));
  if (!parsed.issues.empty()) {
    fail(step_dir / kManifest, "config: " + parsed.issues.front().to_string() +
                                   (parsed.issues.size() > 1 ? " (and " + std::to_string(parsed.issues.size() - 1) +
                                                                   " more)" : ""));
  }
  checkpoint.config = std::move(parsed.config);

  // model*.safetensors, optimizer*.safetensors, rng*.safetensors: every shard, merged by name.
  const auto destination = [&](const std::string& file) -> NamedTensors* {
    if (fs::path(file).extension() != ".safetensors") return nullptr;
    if (file.rfind("model", 0) == 0) return &checkpoint.model;
    if (parts == LoadParts::kModelOnly) return nullptr;
    if (file.rfind("optimizer", 0) == 0) return &checkpoint.optimizer;
    if (file.rfind("rng", 0) == 0) return &checkpoint.rng;
    return nullptr;
  };
  bool has_model = false;
  for (const auto& [file, info] : manifest.at("files").items()) {
    // A manifest names files beside itself, never elsewhere (a crafted one must not read /etc).
    if (file.empty() || file == "." || file == ".." || file.find('/') != std::string::npos ||
        file.find('\\') != std::string::npos) {
      fail(step_dir / kManifest, "file name '" + file + "' is not a plain name in this directory");
    }
    const fs::path path = step_dir / file;
    if (!fs::exists(path)) fail(path, "missing file listed in the manifest");
    if (file == "tokenizer.model") checkpoint.tokenizer = path;
    if (destination(file) == nullptr && file != "tokenizer.model") continue;
    has_model = has_model || destination(file) == &checkpoint.model;
    const auto [crc, bytes] = file_crc32(path);
    if (bytes != info.at("bytes").get<uint64_t>()) {
      fail(path, "size " + std::to_string(bytes) + " bytes, the manifest says " + info.at("bytes").dump() +
                     " (truncated or overwritten)");
    }
    if (crc != info.at("crc32").get<uint32_t>()) fail(path, "checksum mismatch (corrupted file)");
  }
  if (!has_model) fail(step_dir / kManifest, "lists no model*.safetensors file");
  std::set<std::string> seen;
  for (const auto& [file, info] : manifest.at("files").items()) {
    NamedTensors* out = destination(file);
    if (out == nullptr) continue;
    SafetensorsFile contents = read_safetensors(step_dir / file);
    std::map<std::string, Tensor> by_name(contents.tensors.begin(), contents.tensors.end());
    size_t listed = 0;
    for (const auto& entry : manifest.at("tensors")) {
      if (entry.at("file") != file) continue;
      ++listed;
      const std::string name = entry.at("name");
      const auto it = by_name.find(name);
      if (it == by_name.end()) fail(step_dir / file, "lacks tensor '" + name + "' listed in the manifest");
      const Tensor& t = it->second;
      if (t.sizes().vec() != entry.at("shape").get<std::vector<int64_t>>() ||
          safetensors_dtype(t.scalar_type()) != entry.at("dtype").get<std::string>() ||
          tensor_crc32(t) != entry.at("crc32").get<uint32_t>()) {
        fail(step_dir / file, "tensor '" + name + "' does not match the manifest (shape, dtype or checksum)");
      }
      const std::string kind = file.substr(0, file.find_first_of("-."));
      if (!seen.insert(kind + "/" + name).second) fail(step_dir / file, "tensor '" + name + "' is in two shards");
      out->emplace_back(name, t);
    }
    if (listed != by_name.size()) fail(step_dir / file, "holds tensors the manifest does not list");
  }
  return checkpoint;
}
}  // namespace

}  // namespace yuanmoe::checkpoint
