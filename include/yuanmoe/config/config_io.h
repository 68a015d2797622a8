// JSON <-> RunConfig. The only place JSON or enum strings are turned into typed values.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "yuanmoe/config/config.h"

namespace yuanmoe::config {

/// One problem with a config, located by its JSON path ("moe.top_k").
struct ConfigIssue {
  std::string path;
  std::string message;
  std::string to_string() const { return path.empty() ? message : path + ": " + message; }
};

/// Thrown with every problem found at once; what() is one line per issue, prefixed by `source`.
class ConfigError : public std::runtime_error {
 public:
  ConfigError(std::string source, std::vector<ConfigIssue> issues);
  const std::vector<ConfigIssue>& issues() const { return issues_; }

 private:
  std::vector<ConfigIssue> issues_;
};

/// Reads and parses a JSON file; throws ConfigError naming the file on I/O or syntax errors.
nlohmann::json read_json_file(const std::string& path);

/// Applies one `a.b=c` override to the JSON tree. The value is parsed as JSON when it is valid
/// JSON (numbers, true/false, null, quoted strings, arrays) and taken as a plain string otherwise.
/// Missing objects on the path are created; unknown keys are then reported by parse_config.
void apply_override(nlohmann::json& root, const std::string& assignment);

/// cxxopts splits the values of a repeated string option at commas, so `--set
/// 'data.blend=[0.7,"a",0.3,"b"]'` arrives as four pieces: every piece that does not begin with
/// KEY= is joined back onto the one before it (check_config does this to its overrides).
std::vector<std::string> join_override_pieces(const std::vector<std::string>& pieces);

/// Parses the tree into typed structs: unknown keys, missing required keys, wrong types and
/// unknown enum values are collected, not thrown.
struct ParseResult {
  RunConfig config;
  std::vector<ConfigIssue> issues;
};
ParseResult parse_config(const nlohmann::json& root);

/// file -> overrides -> parse -> validate, every issue collected, not thrown (I/O and JSON syntax
/// errors still throw ConfigError), so a caller can add its own rules and report all at once.
/// Rule violations on keys that failed to parse are left out.
ParseResult check_config(const std::string& path, const std::vector<std::string>& overrides = {});

/// check_config, throwing ConfigError listing every issue.
RunConfig load_config(const std::string& path, const std::vector<std::string>& overrides = {});

/// The resolved config as JSON (every key, defaults included); parse_config(to_json(c)) == c.
nlohmann::json to_json(const RunConfig& config);

/// What a key means to a checkpoint loaded under another config (docs/config.md, "Resuming").
enum class KeyRole {
  kArchitecture,  ///< the function the weights compute: must match to resume or fine-tune
  kContext,       ///< the context window (RoPE, max length): a fine-tune may change it, a resume not
  kKnob,          ///< how training runs: may change at any resume (noted in the log)
};

/// One documented key of the schema (docs/config.md is checked against this list).
struct KeyDoc {
  std::string path;
  std::string type;
  std::string default_value;  ///< "required" for required keys
  std::string description;
  KeyRole role = KeyRole::kKnob;
};
std::vector<KeyDoc> describe_config_keys();

/// A key whose resolved value differs between two configs, its values as JSON text.
struct ConfigDifference {
  std::string path;
  KeyRole role;
  std::string before, after;
};
/// Every key of the schema whose value differs, in schema order.
std::vector<ConfigDifference> config_differences(const RunConfig& before, const RunConfig& after);

}  // namespace yuanmoe::config
