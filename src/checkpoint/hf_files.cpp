#include "yuanmoe/checkpoint/hf_files.h"

#include <torch/serialize.h>

#include <cctype>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <stdexcept>

namespace yuanmoe::checkpoint {

namespace fs = std::filesystem;

namespace {

[[noreturn]] void fail(const fs::path& path, const std::string& message) {
  throw std::runtime_error(path.string() + ": " + message);
}

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

/// weight_map of an index file, as shard file -> tensor names (in index order).
std::map<std::string, std::vector<std::string>> read_weight_map(const fs::path& index_path) {
  std::ifstream in(index_path);
  if (!in) fail(index_path, "cannot open file");
  nlohmann::ordered_json index;
  try {
    index = nlohmann::ordered_json::parse(in);
  } catch (const nlohmann::json::exception&) {
    fail(index_path, "invalid JSON");
  }
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
    fail(index_path, "no \"weight_map\" object");
  }
  std::map<std::string, std::vector<std::string>> shards;
  for (const auto& [name, file] : index["weight_map"].items()) {
    if (!file.is_string()) fail(index_path, "weight_map." + name + ": expected a file name");
    const std::string shard = file.get<std::string>();
    // A shard is a plain file beside the index, never a path that climbs out of the model dir.
    if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
      fail(index_path, "weight_map." + name + ": '" + shard + "' is not a file name in this directory");
    }
    shards[shard].push_back(name);
  }
  if (shards.empty()) fail(index_path, "weight_map is empty");
  return shards;
}

/// Reads every shard of an index with `read_file` and checks that each holds exactly the
/// tensors the index assigns to it.
template <class ReadFile>
NamedTensors read_sharded(const fs::path& index_path, ReadFile read_file) {
  NamedTensors all;
  std::set<std::string> seen;
  for (const auto& [shard, names] : read_weight_map(index_path)) {
    const fs::path shard_path = index_path.parent_path() / shard;
    if (!fs::exists(shard_path)) fail(index_path, "shard " + shard + " listed in weight_map does not exist");
    const std::set<std::string> wanted(names.begin(), names.end());
    std::set<std::string> found;
    for (auto& [name, tensor] : read_file(shard_path)) {
      if (wanted.count(name) == 0) {
        fail(shard_path, "holds tensor '" + name + "', which " + index_path.filename().string() +
                             " does not assign to this shard");
      }
      if (!seen.insert(name).second) fail(shard_path, "tensor '" + name + "' appears twice");
      found.insert(name);
      all.emplace_back(name, tensor);
    }
    for (const auto& name : names) {
      if (found.count(name) == 0) {
        fail(shard_path, "lacks tensor '" + name + "', which " + index_path.filename().string() + " places here");
      }
    }
  }
  return all;
}

NamedTensors read_safetensors_tensors(const fs::path& path) { return read_safetensors(path).tensors; }

}  // namespace

NamedTensors read_torch_state_dict(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) fail(file, "cannot open file");
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() < 4 || bytes[0] != 'P' || bytes[1] != 'K') {
    fail(file, "not a torch.save zip archive (legacy pickle files are not supported; re-save with "
               "torch >= 1.6 or as safetensors)");
  }
  c10::IValue value;
  try {
    value = torch::pickle_load(bytes);
  } catch (const c10::Error& e) {
    // LibTorch unpickles collections.OrderedDict as None, so a raw torch.save of
    // model.state_dict() fails here (an internal assert); save_pretrained writes plain dicts.
    const std::string why = first_line(e.what_without_backtrace());
    fail(file, "LibTorch cannot unpickle it" +
                   (why.find("isGenericDict") != std::string::npos ? std::string(" (an OrderedDict?)")
                                                                    : " (" + why.substr(0, 160) + ")") +
                   "; a dict of tensors is expected: re-save an OrderedDict as dict(state_dict), or as safetensors");
  }
  if (!value.isGenericDict()) fail(file, "expected a dict of tensors, found " + value.tagKind());
  NamedTensors tensors;
  for (const auto& item : value.toGenericDict()) {
    if (!item.key().isString()) fail(file, "expected a dict with string keys");
    const std::string name = item.key().toStringRef();
    if (!item.value().isTensor()) fail(file, "'" + name + "' is a " + item.value().tagKind() + ", not a tensor");
    // Tied weights share one storage and views may be strided: give every name its own copy.
    tensors.emplace_back(name, item.value().toTensor().detach().contiguous().clone());
  }
  return tensors;
}

NamedTensors read_hf_weights(const fs::path& dir) {
  if (!fs::is_directory(dir)) fail(dir, "no such directory");
  if (fs::exists(dir / "model.safetensors")) return read_safetensors_tensors(dir / "model.safetensors");
  if (fs::exists(dir / "model.safetensors.index.json")) {
    return read_sharded(dir / "model.safetensors.index.json", read_safetensors_tensors);
  }
  if (fs::exists(dir / "pytorch_model.bin")) return read_torch_state_dict(dir / "pytorch_model.bin");
  if (fs::exists(dir / "pytorch_model.bin.index.json")) {
    return read_sharded(dir / "pytorch_model.bin.index.json", read_torch_state_dict);
  }
  fail(dir, "no weights: expected model.safetensors, model.safetensors.index.json, pytorch_model.bin "
            "or pytorch_model.bin.index.json");
}

std::vector<std::string> write_hf_weights(const fs::path& dir, const NamedTensors& tensors, uint64_t max_shard_bytes) {
  std::vector<NamedTensors> shards(1);
  uint64_t shard_bytes = 0, total_bytes = 0;
  for (const auto& [name, tensor] : tensors) {
    const uint64_t bytes = static_cast<uint64_t>(tensor.numel()) * tensor.element_size();
    if (!shards.back().empty() && shard_bytes + bytes > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().emplace_back(name, tensor);
    shard_bytes += bytes;
    total_bytes += bytes;
  }
  if (shards.size() == 1) {
    write_safetensors(dir / "model.safetensors", tensors);
    return {"model.safetensors"};
  }
  std::vector<std::string> files;
  nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    char file[64];
    std::snprintf(file, sizeof(file), "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    write_safetensors(dir / file, shards[i]);
    for (const auto& [name, tensor] : shards[i]) weight_map[name] = file;
    files.emplace_back(file);
  }
  const nlohmann::ordered_json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
  std::ofstream out(dir / "model.safetensors.index.json");
  out << index.dump(2) << "\n";
  if (!out) fail(dir / "model.safetensors.index.json", "write failed");
  files.emplace_back("model.safetensors.index.json");
  return files;
}

uint64_t parse_byte_size(const std::string& text) {
  size_t digits = 0;
  while (digits < text.size() && std::isdigit(static_cast<unsigned char>(text[digits]))) ++digits;
  std::string unit = text.substr(digits);
  for (char& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  static const std::map<std::string, uint64_t> kUnits{
      {"", 1},           {"B", 1},
      {"KB", 1000},      {"MB", 1000 * 1000},         {"GB", 1000ull * 1000 * 1000},
      {"KIB", 1 << 10},  {"MIB", 1 << 20},            {"GIB", 1ull << 30}};
  const auto it = kUnits.find(unit);
  if (digits == 0 || digits > 12 || it == kUnits.end()) {
    throw std::invalid_argument("'" + text + "' is not a size (e.g. 5GB, 500MB, 2GiB)");
  }
  const uint64_t bytes = std::stoull(text.substr(0, digits)) * it->second;
  if (bytes == 0) throw std::invalid_argument("size must be positive, got '" + text + "'");
  return bytes;
}

}  // namespace yuanmoe::checkpoint
