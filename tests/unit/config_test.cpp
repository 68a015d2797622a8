// Config parsing and validation: every problem reported with its JSON path, overrides, the
// shipped configs, and the documentation of every key.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "yuanmoe/config/config_io.h"
#include "yuanmoe/config/validate.h"

namespace yuanmoe::config {
namespace {

using nlohmann::json;

json minimal_config() {
  return json::parse(R"({
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "head_dim": 32,
              "rotary_dim": 16, "vocab_size": 256, "max_seq_length": 64},
    "moe": {"num_experts": 8, "top_k": 2, "ffn_hidden_size": 96},
    "train": {"seq_length": 64, "max_steps": 10}
  })");
}

/// Parse + validate, as load_config does, returning every issue.
std::vector<ConfigIssue> issues_of(const json& root) {
  ParseResult parsed = parse_config(root);
  auto issues = parsed.issues;
  if (issues.empty()) issues = validate(parsed.config);
  return issues;
}

::testing::AssertionResult has_issue(const std::vector<ConfigIssue>& issues, const std::string& path,
                                     const std::string& fragment) {
  for (const auto& issue : issues) {
    if (issue.path == path && issue.message.find(fragment) != std::string::npos) {
      return ::testing::AssertionSuccess();
    }
  }
  std::string all;
  for (const auto& issue : issues) all += "\n  " + issue.to_string();
  return ::testing::AssertionFailure() << "no issue '" << fragment << "' at " << path << "; got:" << all;
}

TEST(ConfigTest, MinimalConfigIsValidAndFillsDefaults) {
  const ParseResult parsed = parse_config(minimal_config());
  ASSERT_TRUE(parsed.issues.empty());
  EXPECT_TRUE(validate(parsed.config).empty());
  EXPECT_EQ(parsed.config.model.num_layers, 2);
  EXPECT_EQ(parsed.config.moe.router, RouterKind::kAttention);
  EXPECT_DOUBLE_EQ(parsed.config.model.rms_norm_eps, 1e-6);
  EXPECT_EQ(parsed.config.moe.dense_layer_ffn_size(), 2 * 96);
}

TEST(ConfigTest, UnknownKeysAreErrorsWithTheirPath) {
  auto root = minimal_config();
  root["model"]["hiden_size"] = 3;
  root["optimizer"] = json::object();
  const auto issues = issues_of(root);
  EXPECT_TRUE(has_issue(issues, "model.hiden_size", "unknown key"));
  EXPECT_TRUE(has_issue(issues, "optimizer", "unknown key"));
}

// Configs and checkpoints written before the blockwise kernel was deleted still load.
TEST(ConfigTest, RetiredKeysAreReadAndIgnored) {
  auto root = minimal_config();
  root["model"]["attention_block_size"] = 512;
  const ParseResult parsed = parse_config(root);
  EXPECT_TRUE(parsed.issues.empty());
  EXPECT_EQ(parsed.config.model.attention, AttentionKernel::kSdpa);
  EXPECT_FALSE(to_json(parsed.config)["model"].contains("attention_block_size"));
}

TEST(ConfigTest, RetiredKeysStillLoad) {
  auto root = minimal_config();
  root["moe"]["router_dtype"] = "fp32";
  root["parallel"]["num_microbatches"] = 3;  // whatever it says: the batch sizes decide
  const ParseResult parsed = parse_config(root);
  EXPECT_TRUE(parsed.issues.empty());
  EXPECT_FALSE(to_json(parsed.config)["parallel"].contains("num_microbatches"));
}

// What a checkpoint's config may differ in comes from each key's role in the schema.
TEST(ConfigTest, DifferencesCarryTheKeysRole) {
  const RunConfig base = parse_config(minimal_config()).config;
  RunConfig other = base;
  other.moe.num_experts += 1;          // architecture
  other.model.rope_base = 40890;       // context
  other.model.attention_dropout = 0.1;  // a knob of the model section
  other.train.lr = 1e-4;               // a knob
  std::map<std::string, std::pair<KeyRole, std::string>> found;
  for (const ConfigDifference& d : config_differences(base, other)) found[d.path] = {d.role, d.after};
  ASSERT_EQ(found.size(), 4u);
  EXPECT_EQ(found.at("moe.num_experts").first, KeyRole::kArchitecture);
  EXPECT_EQ(found.at("moe.num_experts").second, std::to_string(other.moe.num_experts));
  EXPECT_EQ(found.at("model.rope_base").first, KeyRole::kContext);
  EXPECT_EQ(found.at("model.attention_dropout").first, KeyRole::kKnob);
  EXPECT_EQ(found.at("train.lr").first, KeyRole::kKnob);
  EXPECT_TRUE(config_differences(base, base).empty());
  // Every model and moe key has a role; only the listed ones are not architecture.
  std::set<std::string> not_architecture;
  for (const KeyDoc& key : describe_config_keys()) {
    const bool model_key = key.path.rfind("model.", 0) == 0 || key.path.rfind("moe.", 0) == 0;
    if (model_key && key.role != KeyRole::kArchitecture) not_architecture.insert(key.path);
    if (!model_key) EXPECT_EQ(key.role, KeyRole::kKnob) << key.path;
  }
  EXPECT_EQ(not_architecture,
            (std::set<std::string>{"model.rope_base", "model.rope_tables", "model.max_seq_length", "model.init_std",
                                   "model.attention_dropout", "model.attention", "moe.aux_loss_coeff",
                                   "moe.z_loss_coeff", "moe.bias_balancing_rate", "moe.relu_l1_init",
                                   "moe.relu_l1_alpha", "moe.capacity_factor", "moe.expert_gemm",
                                   "moe.balance_scope"}));
}

TEST(ConfigTest, TrainingRulesNeedTheDataParallelSize) {
  RunConfig run = parse_config(minimal_config()).config;
  run.train.micro_batch_size = 2;
  run.train.global_batch_size = 6;
  const auto issues = validate_training(run, 2);  // 6 sequences do not split into 2 ranks x 2
  EXPECT_TRUE(has_issue(issues, "train.global_batch_size", "micro_batch_size x data-parallel size (2 x 2)"));
  EXPECT_TRUE(has_issue(issues, "data.train_prefix", "required for training"));
  run.train.global_batch_size = 8;
  run.data.train_prefix = "data/x";
  EXPECT_TRUE(validate_training(run, 2).empty());
}

TEST(ConfigTest, WrongTypesNameExpectedAndFound) {
  auto root = minimal_config();
  root["model"]["hidden_size"] = "64";
  root["model"]["lfa"] = 1;
  root["train"]["lr"] = "fast";
  root["model"]["num_layers"] = 2.5;
  root["moe"] = json::array();
  const auto issues = issues_of(root);
  EXPECT_TRUE(has_issue(issues, "model.hidden_size", "expected an integer, got string \"64\""));
  EXPECT_TRUE(has_issue(issues, "model.lfa", "expected true or false"));
  EXPECT_TRUE(has_issue(issues, "train.lr", "expected a number"));
  EXPECT_TRUE(has_issue(issues, "model.num_layers", "expected an integer, got number 2.5"));
  EXPECT_TRUE(has_issue(issues, "moe", "expected an object"));
}

TEST(ConfigTest, EnumErrorsListTheValidChoices) {
  auto root = minimal_config();
  root["moe"]["router"] = "switch";
  root["train"]["lr_schedule"] = "wsd";
  const auto issues = issues_of(root);
  EXPECT_TRUE(has_issue(issues, "moe.router",
                        "expected one of \"attention\", \"linear\", \"relu\", \"dense\", got string \"switch\""));
  EXPECT_TRUE(has_issue(issues, "train.lr_schedule", "\"cosine\", \"constant\", \"linear\""));
}

TEST(ConfigTest, MissingRequiredKeysAreNamed) {
  auto root = minimal_config();
  root["model"].erase("vocab_size");
  root.erase("train");
  const auto issues = issues_of(root);
  EXPECT_TRUE(has_issue(issues, "model.vocab_size", "required key is missing"));
  EXPECT_TRUE(has_issue(issues, "train", "required section is missing"));
}

TEST(ConfigTest, CrossFieldRules) {
  auto root = minimal_config();
  root["moe"]["top_k"] = 9;
  root["model"]["rotary_dim"] = 40;
  root["model"]["hidden_size"] = -64;
  root["train"]["global_batch_size"] = 10;
  root["train"]["micro_batch_size"] = 4;
  root["train"]["seq_length"] = 128;
  const auto issues = issues_of(root);
  EXPECT_TRUE(has_issue(issues, "moe.top_k", "must be <= moe.num_experts (8), got 9"));
  EXPECT_TRUE(has_issue(issues, "model.rotary_dim", "must be <= model.head_dim (32), got 40"));
  EXPECT_TRUE(has_issue(issues, "model.hidden_size", "must be > 0, got -64"));
  EXPECT_TRUE(has_issue(issues, "train.global_batch_size", "divisible by train.micro_batch_size (4)"));
  EXPECT_TRUE(has_issue(issues, "train.seq_length", "must be <= model.max_seq_length (64)"));

  auto odd = minimal_config();
  odd["model"]["rotary_dim"] = 15;
  EXPECT_TRUE(has_issue(issues_of(odd), "model.rotary_dim", "must be even"));

  auto relu = minimal_config();
  relu["moe"]["router"] = "relu";
  relu["moe"]["capacity_factor"] = 1.25;
  EXPECT_TRUE(has_issue(issues_of(relu), "moe.capacity_factor", "must be 0 (dropless) with the relu router"));
}

TEST(ConfigTest, LoadConfigReportsEveryProblemAtOnce) {
  const auto path = std::filesystem::temp_directory_path() / "yuanmoe_bad_config.json";
  auto root = minimal_config();
  root["model"]["typo"] = 1;
  root["model"]["hidden_size"] = "x";
  root["moe"]["top_k"] = 9;
  std::ofstream(path) << root.dump();
  try {
    load_config(path.string());
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    // Parse errors and rule violations together; no duplicate for the key that failed to parse.
    EXPECT_EQ(e.issues().size(), 3u) << e.what();
    EXPECT_NE(std::string(e.what()).find(path.string() + ": moe.top_k: must be <="), std::string::npos);
  }
}

TEST(ConfigTest, OverridesUseDottedPathsAndJsonValues) {
  auto root = minimal_config();
  apply_override(root, "moe.router=linear");
  apply_override(root, "train.max_steps=50");
  apply_override(root, "train.lr=3e-4");
  apply_override(root, "model.lfa=false");
  apply_override(root, "data.tokenizer=\"a b.model\"");
  const ParseResult parsed = parse_config(root);
  ASSERT_TRUE(parsed.issues.empty());
  EXPECT_EQ(parsed.config.moe.router, RouterKind::kLinear);
  EXPECT_EQ(parsed.config.train.max_steps, 50);
  EXPECT_DOUBLE_EQ(parsed.config.train.lr, 3e-4);
  EXPECT_FALSE(parsed.config.model.lfa);
  EXPECT_EQ(parsed.config.data.tokenizer, "a b.model");
  EXPECT_THROW(apply_override(root, "moe.router"), ConfigError);
  EXPECT_THROW(apply_override(root, "moe.router.x=1"), ConfigError);
  apply_override(root, "moe.new_key=1");
  EXPECT_TRUE(has_issue(issues_of(root), "moe.new_key", "unknown key"));
}

TEST(ConfigTest, ResolvedJsonRoundTrips) {
  auto root = minimal_config();
  root["parallel"] = {{"first_stage_layers", 3}};
  const ParseResult parsed = parse_config(root);
  const json resolved = to_json(parsed.config);
  const ParseResult again = parse_config(resolved);
  ASSERT_TRUE(again.issues.empty());
  EXPECT_EQ(to_json(again.config), resolved);
  EXPECT_EQ(resolved["parallel"]["first_stage_layers"], 3);
  EXPECT_EQ(resolved["moe"]["router"], "attention");
}

TEST(ConfigTest, WarnsWhenAnOptionHasNoEffect) {
  auto root = minimal_config();
  root["moe"]["router"] = "dense";
  root["moe"]["aux_loss_coeff"] = 0.01;
  const auto warnings = config_warnings(parse_config(root).config);
  EXPECT_TRUE(has_issue(warnings, "moe.aux_loss_coeff", "no effect with the dense router"));
  EXPECT_TRUE(has_issue(warnings, "moe.top_k", "no effect with the dense router"));
}

TEST(ConfigTest, BalanceScopeParsesRejectsUnknownValuesAndWarnsWhenIdle) {
  auto root = minimal_config();
  EXPECT_EQ(parse_config(root).config.moe.balance_scope, BalanceScope::kMicroBatch);  // the default
  root["moe"]["balance_scope"] = "global_batch";
  root["moe"]["aux_loss_coeff"] = 0.01;
  const ParseResult parsed = parse_config(root);
  EXPECT_TRUE(parsed.issues.empty());
  EXPECT_EQ(parsed.config.moe.balance_scope, BalanceScope::kGlobalBatch);
  EXPECT_EQ(to_json(parsed.config)["moe"]["balance_scope"], "global_batch");
  EXPECT_TRUE(config_warnings(parsed.config).empty());
  root["moe"]["aux_loss_coeff"] = 0.0;  // nothing to balance
  EXPECT_TRUE(has_issue(config_warnings(parse_config(root).config), "moe.balance_scope", "no effect"));
  root["moe"]["balance_scope"] = "per_token";
  EXPECT_TRUE(has_issue(parse_config(root).issues, "moe.balance_scope", "per_token"));
}

TEST(ConfigTest, LossMaskAndLossAverageParseRoundTripAndRejectUnknownValues) {
  auto root = minimal_config();
  ParseResult parsed = parse_config(root);
  EXPECT_EQ(parsed.config.data.loss_mask, LossMask::kNone);  // the defaults
  EXPECT_EQ(parsed.config.train.loss_average, LossAverage::kToken);
  root["data"] = json::parse(R"({"loss_mask": "sft", "sep_id": 5, "blend": [
    {"prefix": "long", "weight": 1},
    {"prefix": "pairs", "weight": 1, "loss_mask": "none"},
    {"prefix": "more_pairs", "weight": 2, "loss_mask": "sft"}]})");
  root["train"]["loss_average"] = "micro_batch";
  parsed = parse_config(root);
  ASSERT_TRUE(parsed.issues.empty());
  EXPECT_TRUE(validate(parsed.config).empty());
  EXPECT_EQ(parsed.config.data.loss_mask, LossMask::kSft);
  EXPECT_EQ(parsed.config.data.sep_id, 5);
  EXPECT_EQ(parsed.config.train.loss_average, LossAverage::kMicroBatch);
  const auto& blend = *parsed.config.data.blend;
  EXPECT_FALSE(blend[0].loss_mask.has_value());  // absent: data.loss_mask
  EXPECT_EQ(blend[1].loss_mask, LossMask::kNone);
  EXPECT_EQ(blend[2].loss_mask, LossMask::kSft);
  const json resolved = to_json(parsed.config);
  EXPECT_FALSE(resolved["data"]["blend"][0].contains("loss_mask"));
  EXPECT_EQ(resolved["data"]["blend"][2]["loss_mask"], "sft");
  EXPECT_EQ(to_json(parse_config(resolved).config), resolved);

  root["data"]["blend"][1]["loss_mask"] = "prompt";
  root["train"]["loss_average"] = "sequence";
  const auto issues = parse_config(root).issues;
  EXPECT_TRUE(has_issue(issues, "data.blend[1].loss_mask", "prompt"));
  EXPECT_TRUE(has_issue(issues, "train.loss_average", "sequence"));
  root = minimal_config();
  root["data"] = {{"sep_id", 0}, {"eod_id", 0}};
  EXPECT_TRUE(has_issue(issues_of(root), "data.sep_id", "other than data.eod_id"));
}

std::vector<std::filesystem::path> shipped_configs() {
  std::vector<std::filesystem::path> paths;
  for (const auto& entry : std::filesystem::recursive_directory_iterator("configs")) {
    // study-*.json are ablation study definitions (scripts/ablate.py), not run configs.
    const bool study = entry.path().filename().string().rfind("study-", 0) == 0;
    if (entry.path().extension() == ".json" && !study) paths.push_back(entry.path());
  }
  std::sort(paths.begin(), paths.end());
  return paths;
}

TEST(ShippedConfigs, AllParseAndValidate) {
  const auto paths = shipped_configs();
  ASSERT_GE(paths.size(), 6u) << "run the tests from the repository root";
  for (const auto& path : paths) {
    EXPECT_NO_THROW(load_config(path.string())) << path;
  }
}

TEST(ShippedConfigs, AblationConfigsDifferOnlyInTheRouter) {
  const json base = read_json_file("configs/ablation/attention.json");
  for (const char* router : {"linear", "relu", "dense"}) {
    json variant = read_json_file(std::string("configs/ablation/") + router + ".json");
    EXPECT_EQ(variant["moe"]["router"], router);
    variant["moe"]["router"] = "attention";
    EXPECT_EQ(variant, base) << router;
  }
}

TEST(ConfigDocs, EveryKeyIsDocumented) {
  std::ifstream in("docs/config.md");
  ASSERT_TRUE(in) << "docs/config.md missing";
  std::stringstream text;
  text << in.rdbuf();
  // Each key has its table row, `| \`path\` | type | default | meaning |`, with a meaning.
  std::map<std::string, std::vector<std::string>> rows;  // path -> cells
  std::string line;
  std::istringstream lines(text.str());
  while (std::getline(lines, line)) {
    if (line.rfind("| `", 0) != 0) continue;
    std::vector<std::string> cells;
    std::string cell;
    std::istringstream parts(line.substr(1));
    while (std::getline(parts, cell, '|')) {
      const size_t first = cell.find_first_not_of(' '), last = cell.find_last_not_of(' ');
      cells.push_back(first == std::string::npos ? "" : cell.substr(first, last - first + 1));
    }
    rows[cells.front().substr(1, cells.front().find('`', 1) - 1)] = cells;
  }
  for (const auto& key : describe_config_keys()) {
    ASSERT_TRUE(rows.count(key.path)) << key.path << " has no row in docs/config.md";
    const auto& cells = rows[key.path];
    // The meaning is the last cell (a type cell may hold escaped \| of its own).
    EXPECT_TRUE(cells.size() >= 4 && !cells.back().empty()) << key.path << ": docs/config.md gives no meaning";
  }
}

}  // namespace
}  // namespace yuanmoe::config
