// The process's resident memory, read from the kernel (Linux): what `train` logs and `bench`
// reports as peak memory on the CPU.
#pragma once

#include <cstdint>

namespace yuanmoe {

/// The peak resident set of this process so far, in bytes (getrusage's ru_maxrss).
int64_t peak_rss_bytes();

/// The resident set now, in bytes (/proc/self/statm).
int64_t current_rss_bytes();

}  // namespace yuanmoe
