#!/usr/bin/env bash
# What a GPU machine lacks to build yuanmoe, gathered from this machine's Debian packages into
# .gpu-bundle/ (git-ignored), which travels with scripts/gpu-check.sh (device tool: carry
# .gpu-bundle). The GPU machines carry PyTorch 2.11 + CUDA 13, a compiler and CMake, but no
# registry: no cxxopts, nlohmann_json, spdlog, fmt, GoogleTest, SentencePiece or Gloo headers.
# Every file of those packages is copied under .gpu-bundle/ at its own path (usr/include/...,
# usr/lib/...); their CMake config files are relocatable, and CMakeLists.txt searches
# .gpu-bundle/usr after the system prefixes, so a machine that has the packages uses its own.
# usage: scripts/gpu-bundle.sh   (after scripts/setup.sh; idempotent: rebuilt from scratch)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(libcxxopts-dev nlohmann-json3-dev libspdlog-dev libspdlog1.10 libfmt-dev libfmt9 libgtest-dev
          libsentencepiece-dev libsentencepiece0 libgloo-dev)
bundle=.gpu-bundle
rm -rf "$bundle"
mkdir -p "$bundle"
for package in "${packages[@]}"; do
  dpkg -s "$package" > /dev/null 2>&1 || { echo "gpu-bundle: $package is not installed (run ./scripts/setup.sh)" >&2; exit 1; }
  # Regular files and symbolic links (the .so -> .so.N chains), not directories or docs.
  dpkg -L "$package" | while read -r path; do
    case "$path" in /usr/share/doc/*) continue ;; esac
    if [ -f "$path" ] || [ -L "$path" ]; then
      mkdir -p "$bundle$(dirname "$path")"
      cp -P "$path" "$bundle$path"
    fi
  done
done
echo "gpu-bundle: ${#packages[@]} packages, $(find "$bundle" -type f | wc -l) files, $(du -sh "$bundle" | cut -f1) in $bundle"
