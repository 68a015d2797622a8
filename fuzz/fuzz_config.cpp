// libFuzzer target: arbitrary text as a run config. Every input must end as a parsed config, a
// list of ConfigIssues, or a JSON parse error; any other exception or a crash is a finding.
#include <nlohmann/json.hpp>

#include "yuanmoe/config/config_io.h"
#include "yuanmoe/config/validate.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  nlohmann::json root;
  try {
    root = nlohmann::json::parse(data, data + size);
  } catch (const nlohmann::json::parse_error&) {
    return 0;
  }
  const yuanmoe::config::ParseResult parsed = yuanmoe::config::parse_config(root);
  if (parsed.issues.empty()) {
    const auto issues = yuanmoe::config::validate(parsed.config);
    if (issues.empty()) (void)yuanmoe::config::to_json(parsed.config).dump();  // round trip must not throw
  }
  return 0;
}
