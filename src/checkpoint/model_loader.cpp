#include "yuanmoe/checkpoint/model_loader.h"

#include "yuanmoe/config/config_io.h"
#include "yuanmoe/config/validate.h"

namespace yuanmoe::checkpoint {

LoadedModel load_model(const std::filesystem::path& path) {
  LoadedModel loaded;
  loaded.dir = resolve_checkpoint_dir(path);
  const Checkpoint saved = load_checkpoint(loaded.dir, LoadParts::kModelOnly);
  config::ParseResult parsed = config::parse_config(nlohmann::json::parse(saved.config.dump()));
  if (!parsed.issues.empty()) {
    throw config::ConfigError((loaded.dir / "manifest.json").string() + " (config)", parsed.issues);
  }
  loaded.config = parsed.config;
  loaded.progress = saved.progress;
  loaded.tokenizer = saved.tokenizer;
  loaded.model = model::Transformer(loaded.config.model, loaded.config.moe);
  load_model_state(*loaded.model, saved.model, (loaded.dir / "model.safetensors").string());
  loaded.model->eval();
  return loaded;
}

}  // namespace yuanmoe::checkpoint
