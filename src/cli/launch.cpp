// `yuanmoe launch --nproc N [--master-port P] -- COMMAND [ARGS...]`: N local copies of this
// executable with torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
// MASTER_ADDR, MASTER_PORT), for single-machine runs without Python. Like torchrun, the first
// failing rank ends the job: the others get a grace period to report, then SIGTERM.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <cxxopts.hpp>
#include <iostream>
#include <stdexcept>
#include <thread>
#include <vector>

#include "yuanmoe/cli/commands.h"
#include "yuanmoe/parallel/world.h"

namespace yuanmoe::cli {

namespace {

volatile sig_atomic_t g_forward_signal = 0;
void remember_signal(int signal) { g_forward_signal = signal; }

int exit_code(int status) { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }


/// Forks `nproc` ranks of `command` with torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE,
/// MASTER_ADDR/PORT) and `threads` OpenMP threads each unless the user set them.
std::vector<pid_t> start_ranks(int nproc, int port, const std::string& threads, std::vector<std::string> command) {
  std::vector<pid_t> children;
  for (int rank = 0; rank < nproc; ++rank) {
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("launch: fork failed: " + std::string(std::strerror(errno)));
    if (pid == 0) {
      ::setenv("RANK", std::to_string(rank).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("MASTER_ADDR", "127.0.0.1", 1);
      ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      ::setenv("OMP_NUM_THREADS", threads.c_str(), 0);
      std::vector<char*> child_argv;
      for (auto& arg : command) child_argv.push_back(arg.data());
      child_argv.push_back(nullptr);
      ::execv(child_argv[0], child_argv.data());
      std::cerr << "yuanmoe launch: exec failed: " << std::strerror(errno) << "\n";
      ::_exit(127);
    }
    children.push_back(pid);
  }
  return children;
}

/// Waits for every rank, forwarding SIGINT/SIGTERM; once one fails the others get `grace_s`
/// seconds before SIGTERM. Returns the first non-zero exit code, else 0.
int supervise(const std::vector<pid_t>& children, int grace_s) {
  int result = 0;
  size_t running = children.size();
  std::vector<bool> done(children.size(), false);
  std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::time_point::max();
  while (running > 0) {
    if (g_forward_signal != 0) {
      for (size_t i = 0; i < children.size(); ++i) {
        if (!done[i]) ::kill(children[i], g_forward_signal);
      }
      g_forward_signal = 0;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      std::cerr << "yuanmoe launch: terminating the remaining ranks\n";
      for (size_t i = 0; i < children.size(); ++i) {
        if (!done[i]) ::kill(children[i], SIGTERM);
      }
      deadline = std::chrono::steady_clock::time_point::max();
    }
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid <= 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;
    }
    for (size_t rank = 0; rank < children.size(); ++rank) {
      if (children[rank] != pid) continue;
      done[rank] = true;
      --running;
      const int code = exit_code(status);
      if (code != 0 && result == 0) {
        result = code;
        std::cerr << "yuanmoe launch: rank " << rank << " exited with " << code << "; the others have " << grace_s
                  << " s to exit\n";
        deadline = std::chrono::steady_clock::now() + std::chrono::seconds(grace_s);
      }
    }
  }
  return result;
}

}  // namespace

int run_launch(int argc, const char* const* argv) {
  int split = 1;
  while (split < argc && std::strcmp(argv[split], "--") != 0) ++split;
  cxxopts::Options options("yuanmoe launch", "Run N local ranks of a yuanmoe command (torchrun-style variables).\n"
                                             "  yuanmoe launch --nproc 2 -- train --config configs/tiny-m32.json");
  options.add_options()
      ("nproc", "processes (ranks) to start", cxxopts::value<int>())
      ("master-port", "TCPStore port (default: a free one)", cxxopts::value<int>())
      ("grace", "seconds the other ranks get to exit after one fails", cxxopts::value<int>()->default_value("30"));
  const auto parsed = parse_or_help(options, split, argv);
  if (!parsed) return 0;
  const cxxopts::ParseResult& args = *parsed;
  if (!args.count("nproc") || args["nproc"].as<int>() < 1) throw std::invalid_argument("--nproc N (>= 1) is required");
  if (split + 1 >= argc) throw std::invalid_argument("the command to run follows --, e.g. -- train --config FILE");
  const int nproc = args["nproc"].as<int>();
  const int port =
      args.count("master-port") ? args["master-port"].as<int>() : static_cast<int>(parallel::free_loopback_port());
  const int grace_s = args["grace"].as<int>();

  std::vector<std::string> command{"/proc/self/exe"};
  for (int i = split + 1; i < argc; ++i) command.emplace_back(argv[i]);
  // Threads per rank: the cores shared out, unless the user chose (torchrun sets 1).
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  const std::string threads = std::to_string(std::max(1u, cores / static_cast<unsigned>(nproc)));

  const std::vector<pid_t> children = start_ranks(nproc, port, threads, command);
  std::cerr << "yuanmoe launch: " << nproc << " ranks on 127.0.0.1:" << port << " (" << threads
            << " threads each)\n";
  ::signal(SIGINT, remember_signal);
  ::signal(SIGTERM, remember_signal);

  return supervise(children, grace_s);
}

}  // namespace yuanmoe::cli
