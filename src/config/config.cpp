// Enum spellings in JSON. The tables are the single source for parsing, errors and docs.
#include "yuanmoe/config/config.h"

#include <filesystem>

namespace yuanmoe::config {

std::string blend_source_name(const BlendEntry& entry) {
  return entry.name.empty() ? std::filesystem::path(entry.prefix).filename().string() : entry.name;
}

template <>
const std::vector<std::pair<RouterKind, const char*>>& enum_names<RouterKind>() {
  static const std::vector<std::pair<RouterKind, const char*>> names{
      {RouterKind::kAttention, "attention"},
      {RouterKind::kLinear, "linear"},
      {RouterKind::kRelu, "relu"},
      {RouterKind::kDense, "dense"}};
  return names;
}

template <>
const std::vector<std::pair<RopeTables, const char*>>& enum_names<RopeTables>() {
  static const std::vector<std::pair<RopeTables, const char*>> names{
      {RopeTables::kExact, "exact"}, {RopeTables::kHfBf16, "hf_bf16"}, {RopeTables::kMegatronBf16, "megatron_bf16"}};
  return names;
}

template <>
const std::vector<std::pair<AttentionKernel, const char*>>& enum_names<AttentionKernel>() {
  static const std::vector<std::pair<AttentionKernel, const char*>> names{
      {AttentionKernel::kSdpa, "sdpa"}, {AttentionKernel::kMaterialised, "materialised"}};
  return names;
}

template <>
const std::vector<std::pair<ExpertGemm, const char*>>& enum_names<ExpertGemm>() {
  static const std::vector<std::pair<ExpertGemm, const char*>> names{
      {ExpertGemm::kAuto, "auto"}, {ExpertGemm::kLoop, "loop"}, {ExpertGemm::kGroupedMm, "grouped_mm"}};
  return names;
}

template <>
const std::vector<std::pair<BalanceScope, const char*>>& enum_names<BalanceScope>() {
  static const std::vector<std::pair<BalanceScope, const char*>> names{{BalanceScope::kMicroBatch, "micro_batch"},
                                                                      {BalanceScope::kSequence, "sequence"},
                                                                      {BalanceScope::kGlobalBatch, "global_batch"}};
  return names;
}

template <>
const std::vector<std::pair<LrSchedule, const char*>>& enum_names<LrSchedule>() {
  static const std::vector<std::pair<LrSchedule, const char*>> names{
      {LrSchedule::kCosine, "cosine"},
      {LrSchedule::kConstant, "constant"},
      {LrSchedule::kLinear, "linear"}};
  return names;
}

template <>
const std::vector<std::pair<Precision, const char*>>& enum_names<Precision>() {
  static const std::vector<std::pair<Precision, const char*>> names{{Precision::kFp32, "fp32"},
                                                                    {Precision::kBf16, "bf16"},
                                                                    {Precision::kFp64, "fp64"}};
  return names;
}

template <>
const std::vector<std::pair<PipelineSchedule, const char*>>& enum_names<PipelineSchedule>() {
  static const std::vector<std::pair<PipelineSchedule, const char*>> names{
      {PipelineSchedule::k1F1B, "1f1b"}, {PipelineSchedule::kGPipe, "gpipe"}};
  return names;
}

template <>
const std::vector<std::pair<Backend, const char*>>& enum_names<Backend>() {
  static const std::vector<std::pair<Backend, const char*>> names{
      {Backend::kAuto, "auto"}, {Backend::kGloo, "gloo"}, {Backend::kNccl, "nccl"}};
  return names;
}

template <>
const std::vector<std::pair<NonfinitePolicy, const char*>>& enum_names<NonfinitePolicy>() {
  static const std::vector<std::pair<NonfinitePolicy, const char*>> names{{NonfinitePolicy::kStop, "stop"},
                                                                         {NonfinitePolicy::kSkip, "skip"}};
  return names;
}

template <>
const std::vector<std::pair<LossMask, const char*>>& enum_names<LossMask>() {
  static const std::vector<std::pair<LossMask, const char*>> names{{LossMask::kNone, "none"}, {LossMask::kSft, "sft"}};
  return names;
}

template <>
const std::vector<std::pair<LossAverage, const char*>>& enum_names<LossAverage>() {
  static const std::vector<std::pair<LossAverage, const char*>> names{{LossAverage::kToken, "token"},
                                                                      {LossAverage::kMicroBatch, "micro_batch"}};
  return names;
}

template <class Enum>
std::string to_string(Enum value) {
  for (const auto& [v, name] : enum_names<Enum>()) {
    if (v == value) return name;
  }
  return "?";
}

template std::string to_string(RouterKind);
template std::string to_string(RopeTables);
template std::string to_string(AttentionKernel);
template std::string to_string(ExpertGemm);
template std::string to_string(BalanceScope);
template std::string to_string(LrSchedule);
template std::string to_string(Precision);
template std::string to_string(PipelineSchedule);
template std::string to_string(Backend);
template std::string to_string(NonfinitePolicy);
template std::string to_string(LossMask);
template std::string to_string(LossAverage);

}  // namespace yuanmoe::config
