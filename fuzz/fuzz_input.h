// Shared by the libFuzzer targets: the bytes of one input written to files of this process's
// own scratch directory, because the readers under test take paths (and map files).
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>

namespace yuanmoe::fuzz {

inline const std::filesystem::path& scratch_dir() {
  static const std::filesystem::path dir = [] {
    auto d = std::filesystem::temp_directory_path() / ("yuanmoe-fuzz-" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    return d;
  }();
  return dir;
}

/// The error contract of every reader (docs/reliability.md): one message that names the file. Anything else
/// (a message without the path, or an exception of a foreign type escaping) is a finding.
inline void expect_names_file(const std::exception& e, const std::string& path) {
  if (std::string(e.what()).find(path) == std::string::npos) {
    std::fprintf(stderr, "error does not name %s: %s\n", path.c_str(), e.what());
    std::abort();
  }
}

inline void write_file(const std::filesystem::path& path, const uint8_t* data, size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
}

}  // namespace yuanmoe::fuzz
