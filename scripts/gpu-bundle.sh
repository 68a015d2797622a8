#!/usr/bin/env bash
# What a GPU machine lacks to build yuanmoe, gathered from this machine's Debian packages into
# .gpu-bundle/ (git-ignored), which travels with scripts/gpu-check.sh (device tool: carry
# .gpu-bundle). The GPU machines carry PyTorch 2.11 + CUDA 13, a compiler, CMake and ninja, but no
# registry: no cxxopts, nlohmann_json, spdlog, fmt, GoogleTest, SentencePiece or Gloo headers.
# One prefix per library, .gpu-bundle/<library>/usr/..., holding its packages' files at their own
# paths (the .so -> .so.N chains included): CMakeLists.txt searches these prefixes after the
# system's, so a machine with its own copy of a library uses it, and a bundled library brings only
# its own headers onto the include path (never a second spdlog or fmt in front of the system's).
# Their CMake config files are relocatable.
# usage: scripts/gpu-bundle.sh   (after scripts/setup.sh; idempotent: rebuilt from scratch)
set -euo pipefail
cd "$(dirname "$0")/.."

# library -> its Debian packages (headers and, for compiled libraries, the runtime they link)
declare -A libraries=(
  [cxxopts]="libcxxopts-dev"
  [nlohmann_json]="nlohmann-json3-dev"
  [spdlog]="libspdlog-dev libspdlog1.10"
  [fmt]="libfmt-dev libfmt9"
  [gtest]="libgtest-dev"
  [sentencepiece]="libsentencepiece-dev libsentencepiece0"
  [gloo]="libgloo-dev"
)
bundle=.gpu-bundle
rm -rf "$bundle"
mkdir -p "$bundle"
for library in "${!libraries[@]}"; do
  for package in ${libraries[$library]}; do
    if ! dpkg -s "$package" > /dev/null 2>&1; then
      echo "gpu-bundle: $package is not installed (run ./scripts/setup.sh)" >&2
      exit 1
    fi
    # Regular files and symbolic links, not directories or docs.
    dpkg -L "$package" | while read -r path; do
      case "$path" in /usr/share/doc/* | /usr/share/lintian/*) continue ;; esac
      if [ -f "$path" ] || [ -L "$path" ]; then
        mkdir -p "$bundle/$library$(dirname "$path")"
        cp -P "$path" "$bundle/$library$path"
      fi
    done
  done
done
echo "gpu-bundle: ${#libraries[@]} libraries ($(cd "$bundle" && echo *)), $(find "$bundle" -type f | wc -l) files," \
     "$(du -sh "$bundle" | cut -f1) in $bundle"
