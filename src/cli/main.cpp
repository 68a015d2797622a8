// The `yuanmoe` executable: the only place argv is dispatched and exit codes are chosen.
// Library code throws; here every error becomes one line per problem on stderr.
#include <c10/util/Exception.h>
#include <malloc.h>
#include <csignal>
#include <cxxopts.hpp>
#include <cstdlib>
#include <limits>
#include <iostream>
#include <sstream>
#include <thread>

#include "yuanmoe/cli/commands.h"
#include "yuanmoe/config/config_io.h"

namespace {

struct Command {
  const char* name;
  int (*run)(int, const char* const*);
  const char* summary;
};

const Command kCommands[] = {
    {"train", yuanmoe::cli::run_train,
     "pretrain or fine-tune (train.init_from); resumes from the newest checkpoint in the run dir"},
    {"eval", yuanmoe::cli::run_eval, "validation loss / perplexity / expert load of a checkpoint"},
    {"generate", yuanmoe::cli::run_generate, "continue a prompt with a checkpoint (KV cache + LFA state)"},
    {"inspect", yuanmoe::cli::run_inspect,
     "resolved config, total / active parameters, forward FLOPs per token, memory per rank"},
    {"prepare-data", yuanmoe::cli::run_prepare_data,
     "tokenize text / JSONL into Megatron indexed datasets (train + valid)"},
    {"launch", yuanmoe::cli::run_launch, "run N local ranks of a command (torchrun-style), e.g. launch --nproc 2 -- train ..."},
    {"export-hf", yuanmoe::cli::run_export_hf, "write a checkpoint as a Hugging Face Yuan2-M32-hf model"},
    {"import-hf", yuanmoe::cli::run_import_hf,
     "turn a Hugging Face Yuan2-M32 model (safetensors or .bin) into a checkpoint"},
    {"bench", yuanmoe::cli::run_bench,
     "training-step tokens/s, MFU, per-component times and peak memory of a config"},
};

void print_usage(std::ostream& out) {
  out << "usage: yuanmoe <command> [options]   (yuanmoe <command> --help for its options)\n\n"
         "commands:\n";
  for (const auto& command : kCommands) {
    out << "  " << command.name << std::string(14 - std::string(command.name).size(), ' ')
        << command.summary << "\n";
  }
}

/// Each line of a (possibly multi-line) message, prefixed, on stderr.
void print_error(const std::string& prefix, const std::string& message) {
  std::istringstream lines(message);
  std::string line;
  while (std::getline(lines, line)) std::cerr << prefix << line << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    print_usage(std::cerr);
    return 2;
  }
  const std::string name = argv[1];
  if (name == "-h" || name == "--help" || name == "help") {
    print_usage(std::cout);
    return 0;
  }
  for (const auto& command : kCommands) {
    if (name != command.name) continue;
    const std::string prefix = "yuanmoe " + name + ": error: ";
    // glibc hands large freed blocks back to the kernel, so every large temporary of every step
    // page-faults again (docs/benchmarks.md, "What made it fast"). Measured on tiny-m32, 2 cores: 280 -> 2.3k
    // tokens/s, kernel time 55 s -> 3 s over 8 steps. Keep blocks below 1 GiB in the heap unless the
    // user tuned malloc through the environment.
    if (std::getenv("MALLOC_MMAP_THRESHOLD_") == nullptr && std::getenv("MALLOC_TRIM_THRESHOLD_") == nullptr) {
      mallopt(M_MMAP_THRESHOLD, 1 << 30);
      mallopt(M_TRIM_THRESHOLD, std::numeric_limits<int>::max());
    }
    // One intra-op thread per core unless the user chose (docs/benchmarks.md, "What made it fast"); libtorch's
    // own default can be lower than the cores a CPU run has.
    if (std::getenv("OMP_NUM_THREADS") == nullptr) {
      at::set_num_threads(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    }
    // A full disk or a file-size limit (ulimit -f) must surface as a failed write that names the
    // file, not as death by SIGXFSZ halfway through a checkpoint (docs/reliability.md).
    std::signal(SIGXFSZ, SIG_IGN);
    try {
      return command.run(argc - 1, argv + 1);
    } catch (const yuanmoe::config::ConfigError& e) {
      print_error(prefix, e.what());
      return 2;
    } catch (const cxxopts::exceptions::exception& e) {
      print_error(prefix, e.what());
      return 2;
    } catch (const std::invalid_argument& e) {
      print_error(prefix, e.what());
      return 2;
    } catch (const c10::Error& e) {
      print_error(prefix, e.what_without_backtrace());
      return 1;
    } catch (const std::exception& e) {
      print_error(prefix, e.what());
      return 1;
    }
  }
  std::cerr << "yuanmoe: error: unknown command '" << name << "' (see yuanmoe --help)\n";
  return 2;
}
