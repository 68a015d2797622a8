#include "yuanmoe/parallel/world.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <stdexcept>

namespace yuanmoe::parallel {

namespace {

int64_t parse_int(const EnvLookup& getenv, const std::string& name, int64_t min_value) {
  const std::optional<std::string> text = getenv(name);
  if (!text) throw std::invalid_argument(name + " is not set");
  size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(*text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text->size() || value < min_value) {
    throw std::invalid_argument(name + "=" + *text + ": expected an integer >= " + std::to_string(min_value));
  }
  return value;
}

}  // namespace

std::string first_slurm_host(const std::string& node_list) {
  const size_t comma = node_list.find(',');
  const size_t bracket = node_list.find('[');
  if (bracket == std::string::npos || (comma != std::string::npos && comma < bracket)) {
    return node_list.substr(0, comma);
  }
  // prefix[a-b,c...]: the first range's first number, zero padding kept.
  const size_t end = node_list.find_first_of("-,]", bracket + 1);
  if (end == std::string::npos) throw std::invalid_argument("SLURM_JOB_NODELIST=" + node_list + ": unbalanced [");
  return node_list.substr(0, bracket) + node_list.substr(bracket + 1, end - bracket - 1);
}

WorldInfo detect_world(const EnvLookup& getenv) {
  WorldInfo w;
  if (getenv("RANK") || getenv("WORLD_SIZE")) {
    w.launcher = "torchrun";
    w.rank = parse_int(getenv, "RANK", 0);
    w.world_size = parse_int(getenv, "WORLD_SIZE", 1);
    w.local_rank = getenv("LOCAL_RANK") ? parse_int(getenv, "LOCAL_RANK", 0) : 0;
    const auto agent = getenv("TORCHELASTIC_USE_AGENT_STORE");
    w.agent_store = agent && (*agent == "True" || *agent == "true" || *agent == "1");
    if (getenv("TORCHELASTIC_RESTART_COUNT")) w.restart_count = parse_int(getenv, "TORCHELASTIC_RESTART_COUNT", 0);
  } else if (getenv("SLURM_PROCID") && getenv("SLURM_NTASKS")) {
    w.launcher = "slurm";
    w.rank = parse_int(getenv, "SLURM_PROCID", 0);
    w.world_size = parse_int(getenv, "SLURM_NTASKS", 1);
    w.local_rank = getenv("SLURM_LOCALID") ? parse_int(getenv, "SLURM_LOCALID", 0) : 0;
    if (!getenv("MASTER_ADDR")) {
      if (const auto nodes = getenv("SLURM_JOB_NODELIST")) w.master_addr = first_slurm_host(*nodes);
    }
  } else if (getenv("OMPI_COMM_WORLD_RANK")) {
    w.launcher = "openmpi";
    w.rank = parse_int(getenv, "OMPI_COMM_WORLD_RANK", 0);
    w.world_size = parse_int(getenv, "OMPI_COMM_WORLD_SIZE", 1);
    w.local_rank = getenv("OMPI_COMM_WORLD_LOCAL_RANK") ? parse_int(getenv, "OMPI_COMM_WORLD_LOCAL_RANK", 0) : 0;
  } else {
    return w;
  }
  if (w.rank >= w.world_size) {
    throw std::invalid_argument("rank " + std::to_string(w.rank) + " is not below the world size " +
                                std::to_string(w.world_size) + " (" + w.launcher + " variables)");
  }
  if (const auto addr = getenv("MASTER_ADDR")) w.master_addr = *addr;
  if (getenv("MASTER_PORT")) w.master_port = parse_int(getenv, "MASTER_PORT", 1);
  if (w.master_port > 65535) throw std::invalid_argument("MASTER_PORT=" + std::to_string(w.master_port) + ": not a port");
  return w;
}

WorldInfo detect_world() {
  return detect_world([](const std::string& name) -> std::optional<std::string> {
    const char* value = std::getenv(name.c_str());
    if (value == nullptr || *value == '\0') return std::nullopt;
    return std::string(value);
  });
}

int64_t free_loopback_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error("cannot create a socket to find a free port");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  socklen_t length = sizeof(address);
  const bool found = ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0 &&
                     ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0;
  ::close(fd);
  if (!found) throw std::runtime_error("cannot find a free port on 127.0.0.1");
  return ntohs(address.sin_port);
}

}  // namespace yuanmoe::parallel
