// libFuzzer target: arbitrary bytes as a run config file, through load_config() as `train` and
// `inspect` read it. Every input must end as a config (which must serialise back) or as one
// ConfigError naming the file; any other exception or a crash is a finding.
#include "fuzz_input.h"
#include "yuanmoe/config/config_io.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = yuanmoe::fuzz::scratch_dir() / "config.json";
  yuanmoe::fuzz::write_file(path, data, size);
  try {
    const yuanmoe::config::RunConfig config = yuanmoe::config::load_config(path.string());
    (void)yuanmoe::config::to_json(config).dump();
  } catch (const yuanmoe::config::ConfigError& e) {
    yuanmoe::fuzz::expect_names_file(e, path.string());
  }
  return 0;
}
