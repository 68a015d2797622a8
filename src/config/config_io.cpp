// JSON <-> RunConfig through the schema visitor (schema.h). Three visitors: Reader collects
// every problem with its path, Writer emits the resolved tree, Describer lists the keys.
#include "yuanmoe/config/config_io.h"

#include <algorithm>
#include <cctype>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <type_traits>

#include "schema.h"
#include "yuanmoe/config/validate.h"

namespace yuanmoe::config {
namespace {

using nlohmann::json;
using schema::Presence;

std::string describe_json(const json& j) {
  std::string text = j.dump();
  if (text.size() > 40) text = text.substr(0, 37) + "...";
  return std::string(j.type_name()) + " " + text;
}

template <class Enum>
std::string enum_choices() {
  std::string out;
  for (const auto& [value, name] : enum_names<Enum>()) {
    out += (out.empty() ? "\"" : ", \"") + std::string(name) + "\"";
  }
  return out;
}

/// Reads one section (a JSON object) into a struct, collecting issues instead of throwing.
class Reader {
 public:
  Reader(const json* object, std::string prefix, std::vector<ConfigIssue>* issues)
      : object_(object), prefix_(std::move(prefix)), issues_(issues) {}

  template <class T>
  void field(const char* key, T& value, Presence presence, const char* /*doc*/, std::optional<KeyRole> = {}) {
    seen_.insert(key);
    const std::string path = prefix_ + key;
    if (object_ == nullptr || !object_->contains(key)) {
      if (presence == schema::kRequired) issues_->push_back({path, "required key is missing"});
      return;
    }
    read(object_->at(key), value, path);
  }

  template <class Section>
  void section(const char* key, Section& value, Presence presence, KeyRole) {
    seen_.insert(key);
    const std::string path = prefix_ + key;
    const json* child = nullptr;
    if (object_ != nullptr && object_->contains(key)) {
      child = &object_->at(key);
      if (!child->is_object()) {
        issues_->push_back({path, "expected an object, got " + describe_json(*child)});
        return;
      }
    } else if (presence == schema::kRequired) {
      issues_->push_back({path, "required section is missing"});
      return;
    }
    Reader inner(child, path + ".", issues_);
    schema::visit(inner, value);
    inner.report_unknown_keys();
  }

  void report_unknown_keys() const {
    if (object_ == nullptr) return;
    for (const auto& item : object_->items()) {
      if (seen_.count(item.key()) == 0 && !schema::is_retired_key(prefix_ + item.key())) {
        issues_->push_back({prefix_ + item.key(), "unknown key"});
      }
    }
  }

 private:
  void read(const json& j, int64_t& out, const std::string& path) {
    if (j.is_number_integer()) {
      out = j.get<int64_t>();
    } else {
      issues_->push_back({path, "expected an integer, got " + describe_json(j)});
    }
  }
  void read(const json& j, double& out, const std::string& path) {
    if (j.is_number()) {
      out = j.get<double>();
    } else {
      issues_->push_back({path, "expected a number, got " + describe_json(j)});
    }
  }
  void read(const json& j, bool& out, const std::string& path) {
    if (j.is_boolean()) {
      out = j.get<bool>();
    } else {
      issues_->push_back({path, "expected true or false, got " + describe_json(j)});
    }
  }
  void read(const json& j, std::string& out, const std::string& path) {
    if (j.is_string()) {
      out = j.get<std::string>();
    } else {
      issues_->push_back({path, "expected a string, got " + describe_json(j)});
    }
  }
  void read(const json& j, std::optional<int64_t>& out, const std::string& path) {
    if (j.is_null()) {
      out.reset();
    } else if (j.is_number_integer()) {
      out = j.get<int64_t>();
    } else {
      issues_->push_back({path, "expected an integer or null, got " + describe_json(j)});
    }
  }
  // data.blend: null, a list of {prefix, weight[, valid_prefix, name]} objects, or Megatron's flat
  // [w1, p1, w2, p2, ...]. Ranges (weights > 0, not empty, names unique) are validate()'s.
  void read(const json& j, std::optional<std::vector<BlendEntry>>& out, const std::string& path) {
    out.reset();
    if (j.is_null()) return;
    const size_t issues_before = issues_->size();
    if (!j.is_array()) {
      issues_->push_back({path, "expected a list of {\"prefix\", \"weight\"} objects or Megatron's flat "
                                "[weight, prefix, ...], got " + describe_json(j)});
      return;
    }
    std::vector<BlendEntry> entries;
    const bool objects = !j.empty() && j.front().is_object();
    if (objects) {
      for (size_t i = 0; i < j.size(); ++i) {
        const std::string at = path + "[" + std::to_string(i) + "]";
        const json& item = j[i];
        if (!item.is_object()) {
          issues_->push_back({at, "expected a {\"prefix\", \"weight\"} object like the entries before it, got " +
                                      describe_json(item)});
          continue;
        }
        BlendEntry entry;
        const size_t before = issues_->size();
        for (const auto& member : item.items()) {
          const std::string& key = member.key();
          const json& value = member.value();
          if (key == "prefix") {
            read(value, entry.prefix, at + ".prefix");
          } else if (key == "weight") {
            read(value, entry.weight, at + ".weight");
          } else if (key == "valid_prefix") {
            read(value, entry.valid_prefix, at + ".valid_prefix");
          } else if (key == "name") {
            read(value, entry.name, at + ".name");
          } else if (key == "loss_mask") {
            LossMask mask = LossMask::kNone;
            read(value, mask, at + ".loss_mask");
            entry.loss_mask = mask;
          } else {
            issues_->push_back(
                {at + "." + key, "unknown key (expected prefix, weight, valid_prefix, name, loss_mask)"});
          }
        }
        for (const char* key : {"prefix", "weight"}) {
          if (!item.contains(key)) issues_->push_back({at + "." + key, "required key is missing"});
        }
        if (issues_->size() == before) entries.push_back(std::move(entry));
      }
    } else {
      if (j.size() % 2 != 0) {
        issues_->push_back({path, "Megatron's flat form [weight, prefix, weight, prefix, ...] needs an even number "
                                  "of items, got " + std::to_string(j.size())});
        return;
      }
      for (size_t i = 0; i < j.size(); i += 2) {
        const std::string at = path + "[" + std::to_string(i) + "]";
        const std::string next = path + "[" + std::to_string(i + 1) + "]";
        if (!j[i].is_number()) {
          issues_->push_back({at, "expected a weight (number) before its prefix, got " + describe_json(j[i])});
        } else if (!j[i + 1].is_string()) {
          issues_->push_back({next, "expected a prefix (string) after weight " + j[i].dump() + ", got " +
                                        describe_json(j[i + 1])});
        } else {
          entries.push_back({j[i + 1].get<std::string>(), j[i].get<double>(), "", "", std::nullopt});
        }
      }
    }
    // A blend with a bad entry is left out (as a key that failed to parse), so validate() does not
    // add "is empty" or weight rules to the one line naming the entry.
    if (issues_->size() == issues_before) out = std::move(entries);
  }
  template <class Enum, class = std::enable_if_t<std::is_enum_v<Enum>>>
  void read(const json& j, Enum& out, const std::string& path) {
    if (j.is_string()) {
      for (const auto& [value, name] : enum_names<Enum>()) {
        if (j.get<std::string>() == name) {
          out = value;
          return;
        }
      }
    }
    issues_->push_back(
        {path, "expected one of " + enum_choices<Enum>() + ", got " + describe_json(j)});
  }

  const json* object_;
  std::string prefix_;
  std::vector<ConfigIssue>* issues_;
  std::set<std::string> seen_;
};

/// Emits every key of the schema, defaults included.
class Writer {
 public:
  explicit Writer(json* out) : out_(out) {}

  template <class T>
  void field(const char* key, T& value, Presence, const char*, std::optional<KeyRole> = {}) {
    if constexpr (std::is_enum_v<T>) {
      (*out_)[key] = to_string(value);
    } else if constexpr (std::is_same_v<T, std::optional<int64_t>>) {
      (*out_)[key] = value ? json(*value) : json(nullptr);
    } else if constexpr (std::is_same_v<T, std::optional<std::vector<BlendEntry>>>) {
      json entries = nullptr;
      if (value) {
        entries = json::array();
        for (const BlendEntry& e : *value) {
          json entry{{"prefix", e.prefix}, {"weight", e.weight}, {"valid_prefix", e.valid_prefix}, {"name", e.name}};
          if (e.loss_mask) entry["loss_mask"] = to_string(*e.loss_mask);
          entries.push_back(std::move(entry));
        }
      }
      (*out_)[key] = std::move(entries);
    } else {
      (*out_)[key] = value;
    }
  }

  template <class Section>
  void section(const char* key, Section& value, Presence, KeyRole) {
    json child = json::object();
    Writer inner(&child);
    schema::visit(inner, value);
    (*out_)[key] = std::move(child);
  }

 private:
  json* out_;
};

/// Lists the keys with type, default and description (for docs/config.md and its test).
class Describer {
 public:
  Describer(std::string prefix, KeyRole section_role, std::vector<KeyDoc>* docs)
      : prefix_(std::move(prefix)), section_role_(section_role), docs_(docs) {}

  template <class T>
  void field(const char* key, T& value, Presence presence, const char* doc, std::optional<KeyRole> role = {}) {
    json default_json = json::object();
    Writer(&default_json).field(key, value, presence, doc);
    std::string default_value =
        presence == schema::kRequired ? "required" : default_json[key].dump();
    docs_->push_back({prefix_ + key, type_name(value), default_value, doc, role.value_or(section_role_)});
  }

  template <class Section>
  void section(const char* key, Section& value, Presence, KeyRole role) {
    Describer inner(prefix_ + key + ".", role, docs_);
    schema::visit(inner, value);
  }

 private:
  static std::string type_name(const int64_t&) { return "integer"; }
  static std::string type_name(const double&) { return "number"; }
  static std::string type_name(const bool&) { return "boolean"; }
  static std::string type_name(const std::string&) { return "string"; }
  static std::string type_name(const std::optional<int64_t>&) { return "integer or null"; }
  static std::string type_name(const std::optional<std::vector<BlendEntry>>&) { return "list or null"; }
  template <class Enum, class = std::enable_if_t<std::is_enum_v<Enum>>>
  static std::string type_name(const Enum&) {
    return "one of " + enum_choices<Enum>();
  }

  std::string prefix_;
  KeyRole section_role_;
  std::vector<KeyDoc>* docs_;
};

std::string join_issues(const std::string& source, const std::vector<ConfigIssue>& issues) {
  std::string out;
  for (const auto& issue : issues) {
    if (!out.empty()) out += "\n";
    out += source.empty() ? issue.to_string() : source + ": " + issue.to_string();
  }
  return out;
}

}  // namespace

ConfigError::ConfigError(std::string source, std::vector<ConfigIssue> issues)
    : std::runtime_error(join_issues(source, issues)), issues_(std::move(issues)) {}

json read_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw ConfigError(path, {{"", "cannot open file"}});
  try {
    return json::parse(in, /*cb=*/nullptr, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const json::exception& e) {
    // parse_error, and out_of_range for numbers beyond double (found by fuzz/fuzz_config.cpp).
    // e.what() names the byte offset; keep it to one line.
    std::string what = e.what();
    std::replace(what.begin(), what.end(), '\n', ' ');
    throw ConfigError(path, {{"", "invalid JSON: " + what}});
  }
}

void apply_override(json& root, const std::string& assignment) {
  const auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) {
    throw ConfigError("--set", {{assignment, "expected KEY=VALUE, e.g. moe.router=linear"}});
  }
  const std::string key = assignment.substr(0, eq);
  const std::string text = assignment.substr(eq + 1);
  json value = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded()) value = text;  // bare words are strings: moe.router=linear

  json* node = &root;
  std::stringstream parts(key);
  std::string part;
  std::vector<std::string> path;
  while (std::getline(parts, part, '.')) path.push_back(part);
  for (size_t i = 0; i < path.size(); ++i) {
    if (path[i].empty()) throw ConfigError("--set", {{key, "empty path component"}});
    if (node->is_null()) *node = json::object();  // a new section
    if (!node->is_object()) {
      throw ConfigError("--set", {{key, "'" + path[i - 1] + "' is not an object"}});
    }
    node = &(*node)[path[i]];
  }
  *node = std::move(value);
}

ParseResult parse_config(const json& root) {
  ParseResult result;
  if (!root.is_object()) {
    result.issues.push_back({"", "expected a JSON object at the top level"});
    return result;
  }
  Reader reader(&root, "", &result.issues);
  schema::visit(reader, result.config);
  reader.report_unknown_keys();
  return result;
}

std::vector<std::string> join_override_pieces(const std::vector<std::string>& pieces) {
  // KEY= at the start: a dotted path of letters, digits and underscores, then '='.
  const auto starts_assignment = [](const std::string& piece) {
    const size_t eq = piece.find('=');
    if (eq == std::string::npos || eq == 0) return false;
    return std::all_of(piece.begin(), piece.begin() + static_cast<std::ptrdiff_t>(eq),
                       [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.'; });
  };
  std::vector<std::string> out;
  for (const std::string& piece : pieces) {
    if (!out.empty() && !starts_assignment(piece)) {
      out.back() += "," + piece;
    } else {
      out.push_back(piece);
    }
  }
  return out;
}

ParseResult check_config(const std::string& path, const std::vector<std::string>& overrides) {
  json root = read_json_file(path);
  for (const auto& assignment : join_override_pieces(overrides)) apply_override(root, assignment);
  ParseResult parsed = parse_config(root);
  // Report everything at once: rule violations too, except on keys that failed to parse (their
  // placeholder value would only repeat the problem).
  const std::vector<ConfigIssue> parse_issues = parsed.issues;
  for (auto& issue : validate(parsed.config)) {
    const bool already_reported =
        std::any_of(parse_issues.begin(), parse_issues.end(),
                    [&](const ConfigIssue& parse_issue) { return parse_issue.path == issue.path; });
    if (!already_reported) parsed.issues.push_back(std::move(issue));
  }
  return parsed;
}

RunConfig load_config(const std::string& path, const std::vector<std::string>& overrides) {
  ParseResult checked = check_config(path, overrides);
  if (!checked.issues.empty()) throw ConfigError(path, checked.issues);
  return checked.config;
}

json to_json(const RunConfig& config) {
  json out = json::object();
  Writer writer(&out);
  schema::visit(writer, const_cast<RunConfig&>(config));  // Writer only reads
  return out;
}

std::vector<KeyDoc> describe_config_keys() {
  std::vector<KeyDoc> docs;
  RunConfig defaults;
  Describer describer("", KeyRole::kKnob, &docs);
  schema::visit(describer, defaults);
  return docs;
}

std::vector<ConfigDifference> config_differences(const RunConfig& before, const RunConfig& after) {
  const json a = to_json(before), b = to_json(after);
  std::vector<ConfigDifference> out;
  for (const KeyDoc& key : describe_config_keys()) {
    const json::json_pointer pointer("/" + key.path.substr(0, key.path.find('.')) + "/" +
                                     key.path.substr(key.path.find('.') + 1));
    if (a.at(pointer) != b.at(pointer)) out.push_back({key.path, key.role, a.at(pointer).dump(), b.at(pointer).dump()});
  }
  return out;
}

}  // namespace yuanmoe::config
