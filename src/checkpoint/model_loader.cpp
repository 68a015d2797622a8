#include "yuanmoe/checkpoint/model_loader.h"

namespace yuanmoe::checkpoint {

LoadedModel load_model(const std::filesystem::path& path) {
  LoadedModel loaded;
  loaded.dir = resolve_checkpoint_dir(path);
  const Checkpoint saved = load_checkpoint(loaded.dir, LoadParts::kModelOnly);
  loaded.config = saved.config;
  loaded.progress = saved.progress;
  loaded.tokenizer = saved.tokenizer;
  loaded.model = model::Transformer(loaded.config.model, loaded.config.moe);
  load_model_state(*loaded.model, saved.model, loaded.dir.string());
  loaded.model->eval();
  return loaded;
}

}  // namespace yuanmoe::checkpoint
