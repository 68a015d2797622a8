// Document-masked packing (data.reset_attention_mask, docs/data.md): the block-diagonal causal mask
// against its definition, the LFA's filters and the attention core against per-document runs and
// explicit loops, SDPA against the materialised softmax with the mask (fp64, values and
// gradients), and the whole model on a packed sample of three documents against three separate
// forwards, logits and parameter gradients, with and without recompute. Without document ids the
// plain causal path runs unchanged.
#include "support/fixtures.h"
#include "yuanmoe/data/sampler.h"
#include "yuanmoe/model/attention_cpu.h"
#include "yuanmoe/model/decode.h"
#include "yuanmoe/model/init.h"
#include "yuanmoe/model/recompute.h"
#include "yuanmoe/model/transformer.h"

namespace yuanmoe::model {
namespace {

using testing::max_abs_diff;
using DocumentMaskTest = testing::SeededTest;

constexpr int64_t kEod = 0;

/// Document ids of rows made of documents of the given lengths: [B, S] int64.
Tensor documents_of(const std::vector<std::vector<int64_t>>& rows) {
  std::vector<Tensor> out;
  for (const auto& lengths : rows) {
    std::vector<int64_t> ids;
    for (size_t d = 0; d < lengths.size(); ++d) ids.insert(ids.end(), static_cast<size_t>(lengths[d]), static_cast<int64_t>(d));
    out.push_back(torch::tensor(ids, torch::kLong));
  }
  return torch::stack(out);
}

TEST_F(DocumentMaskTest, MaskIsCausalWithinEachDocumentAndNothingAcross) {
  const Tensor documents = documents_of({{3, 1, 4}, {8}});
  const Tensor mask = document_causal_mask(documents);
  ASSERT_EQ(mask.sizes(), torch::IntArrayRef({2, 1, 8, 8}));
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t i = 0; i < 8; ++i) {
      for (int64_t j = 0; j < 8; ++j) {
        const bool expected = j <= i && documents[b][i].item<int64_t>() == documents[b][j].item<int64_t>();
        ASSERT_EQ(mask[b][0][i][j].item<bool>(), expected) << b << " " << i << " " << j;
      }
    }
  }
}

// ---- LFA ------------------------------------------------------------------------------------

LocalizedFiltering make_lfa(int64_t hidden) {
  LocalizedFiltering lfa(hidden, 1e-6);
  torch::NoGradGuard no_grad;
  for (auto& p : lfa->parameters()) p.uniform_(-0.3, 0.3);
  lfa->to(torch::kDouble);
  return lfa;
}

// y[t] = Wc x[t] + Wp x[t-1] + b with x[t-1] = 0 at t = 0 and at every document's first token.
TEST_F(DocumentMaskTest, TwoTapReadsTheZeroFrameAtEachDocumentStart) {
  const auto x = torch::randn({2, 8, 6}, torch::kDouble);
  const auto weight = torch::randn({4, 6, 2, 1}, torch::kDouble), bias = torch::randn({4}, torch::kDouble);
  const Tensor documents = documents_of({{3, 1, 4}, {5, 3}});
  const auto wp = weight.select(3, 0).select(2, 0), wc = weight.select(3, 0).select(2, 1);
  auto expected = torch::zeros({2, 8, 4}, torch::kDouble);
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t t = 0; t < 8; ++t) {
      const bool starts = t == 0 || documents[b][t].item<int64_t>() != documents[b][t - 1].item<int64_t>();
      const auto previous = starts ? torch::zeros({6}, torch::kDouble) : x[b][t - 1];
      expected[b][t] = torch::mv(wc, x[b][t]) + torch::mv(wp, previous) + bias;
    }
  }
  EXPECT_LT(max_abs_diff(causal_two_tap(x, weight, bias, {}, documents), expected), 1e-13);
  // Without document ids the filter runs across the boundaries (the reference's packed behaviour).
  EXPECT_GT(max_abs_diff(causal_two_tap(x, weight, bias), expected), 1e-3);
}

TEST_F(DocumentMaskTest, LfaOfAPackedRowIsTheLfaOfEachDocumentAlone) {
  auto lfa = make_lfa(8);
  const std::vector<int64_t> lengths{5, 9, 7};
  const auto a = torch::randn({1, 21, 8}, torch::kDouble);
  const Tensor packed = lfa(a, nullptr, documents_of({lengths}));
  std::vector<Tensor> alone;
  int64_t start = 0;
  for (const int64_t length : lengths) {
    alone.push_back(lfa(a.narrow(1, start, length)));
    start += length;
  }
  EXPECT_LT(max_abs_diff(packed, torch::cat(alone, 1)), 1e-13);
}

// ---- attention core ----------------------------------------------------------------------------

/// Rows of q/k/v with their documents: row 0 packs documents of 6, 1 and 9 tokens, row 1 is one document.
struct PackedHeads {
  Tensor q, k, v, documents;
  std::vector<std::vector<int64_t>> lengths{{6, 1, 9}, {16}};
};

PackedHeads packed_heads(bool requires_grad) {
  const auto options = torch::dtype(torch::kDouble).requires_grad(requires_grad);
  PackedHeads h;
  h.q = torch::randn({2, 3, 16, 8}, options);
  h.k = torch::randn({2, 3, 16, 8}, options);
  h.v = torch::randn({2, 3, 16, 6}, options);
  h.documents = documents_of(h.lengths);
  return h;
}

// The masked softmax equals plain causal attention run on each document's slice by itself.
TEST_F(DocumentMaskTest, MaterialisedMaskedAttentionIsPerDocumentCausalAttention) {
  const PackedHeads h = packed_heads(false);
  const Tensor masked = causal_attention(h.q, h.k, h.v, 0.0, 0, h.documents);
  for (int64_t b = 0; b < 2; ++b) {
    int64_t start = 0;
    for (const int64_t length : h.lengths[static_cast<size_t>(b)]) {
      const auto slice = [&](const Tensor& t) { return t.narrow(0, b, 1).narrow(2, start, length); };
      EXPECT_LT(max_abs_diff(slice(masked), causal_attention(slice(h.q), slice(h.k), slice(h.v), 0.0)), 1e-14)
          << "row " << b << " document at " << start;
      start += length;
    }
  }
  EXPECT_GT(max_abs_diff(masked, causal_attention(h.q, h.k, h.v, 0.0)), 1e-3);  // the mask matters
}

// SDPA with the explicit block-diagonal causal mask against the materialised reference: fp64
// values and q/k/v gradients, directly and through attention_core.
TEST_F(DocumentMaskTest, SdpaWithTheDocumentMaskEqualsMaterialisedInDouble) {
  const PackedHeads h = packed_heads(true);
  const auto d_out = torch::randn({2, 3, 16, 6}, torch::kDouble);
  const Tensor expected = causal_attention(h.q, h.k, h.v, 0.0, 0, h.documents);
  const auto expected_grads = torch::autograd::grad({expected}, {h.q, h.k, h.v}, {d_out});
  for (const bool through_core : {false, true}) {
    const Tensor actual = through_core
                              ? attention_core(config::AttentionKernel::kSdpa, h.q, h.k, h.v, 0.0, 0, h.documents)
                              : sdpa_causal_attention(h.q, h.k, h.v, h.documents);
    const auto actual_grads = torch::autograd::grad({actual}, {h.q, h.k, h.v}, {d_out});
    EXPECT_LT(max_abs_diff(actual, expected), 1e-12) << through_core;
    double worst_grad = 0;
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_LT(max_abs_diff(actual_grads[i], expected_grads[i]), 1e-11) << "input " << i;
      worst_grad = std::max(worst_grad, max_abs_diff(actual_grads[i], expected_grads[i]));
    }
    std::printf("[ measured ] core sdpa vs materialised, document mask, fp64: max |diff| %.3g, q/k/v grads %.3g\n",
                max_abs_diff(actual, expected), worst_grad);
  }
}

// Off (no document ids): attention_core is exactly the plain causal CPU kernel and the plain
// materialised softmax, bit for bit; one document per row through the mask gives the same values.
TEST_F(DocumentMaskTest, WithoutDocumentIdsThePlainCausalPathRuns) {
  const PackedHeads h = packed_heads(false);
  const auto bshd = [](const Tensor& x) { return x.transpose(1, 2); };
  EXPECT_TRUE(torch::equal(attention_core(config::AttentionKernel::kSdpa, h.q, h.k, h.v),
                           causal_attention_cpu(bshd(h.q), bshd(h.k), bshd(h.v)).transpose(1, 2)));
  EXPECT_TRUE(torch::equal(attention_core(config::AttentionKernel::kMaterialised, h.q, h.k, h.v),
                           causal_attention(h.q, h.k, h.v, 0.0)));
  const Tensor one_document = torch::zeros({2, 16}, torch::kLong);
  EXPECT_LT(max_abs_diff(sdpa_causal_attention(h.q, h.k, h.v, one_document), causal_attention(h.q, h.k, h.v, 0.0)),
            1e-13);
}

// ---- the whole model ---------------------------------------------------------------------------

/// A packed sample of three documents (5, 9, 7 tokens; the first two end in EOD, the last is cut
/// as packing cuts it), its positions and document ids by the sampler's rules, and random labels.
struct PackedSample {
  std::vector<int64_t> lengths{5, 9, 7};
  Tensor tokens_1S, labels_1S, positions_1S, documents_1S;
};

PackedSample packed_sample(int64_t vocab) {
  PackedSample s;
  std::vector<Tensor> parts;
  for (size_t d = 0; d < s.lengths.size(); ++d) {
    Tensor part = torch::randint(1, vocab, {s.lengths[d]}, torch::kLong);
    if (d + 1 < s.lengths.size()) part[s.lengths[d] - 1] = kEod;
    parts.push_back(part);
  }
  s.tokens_1S = torch::cat(parts).unsqueeze(0);  // [1, 21]
  s.labels_1S = torch::randint(vocab, {1, 21}, torch::kLong);
  s.positions_1S = data::reset_position_ids(s.tokens_1S, kEod);
  s.documents_1S = data::document_ids(s.tokens_1S, kEod);
  return s;
}

Transformer make_model(config::AttentionKernel kernel, torch::Dtype dtype) {
  auto model_config = testing::small_model_config();  // LFA on, RoPE on 16 of 32 head dims
  model_config.attention = kernel;
  Transformer model(model_config, testing::small_moe_config());
  init_weights(*model, model_config, 11);
  model->to(dtype);
  model->train();
  return model;
}

/// Logits [1, S, V] and d(sum of the token losses)/d(every parameter) of one forward.
std::pair<Tensor, std::vector<Tensor>> logits_and_gradients(Transformer& model, const Tensor& tokens,
                                                            const Tensor& labels, const TokenLayout& layout) {
  model->zero_grad(/*set_to_none=*/true);
  const Tensor logits = model(tokens, layout).out;
  torch::nn::functional::cross_entropy(
      logits.reshape({-1, logits.size(-1)}), labels.reshape({-1}),
      torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
      .backward();
  std::vector<Tensor> grads;
  for (const auto& p : model->parameters()) grads.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
  return {logits.detach(), grads};
}

/// The packed forward with document ids, and the three documents run alone (positions from 0):
/// logits side by side, and the packed gradients beside the sum of the three documents' gradients.
struct Equivalence {
  Tensor packed_logits, separate_logits;
  std::vector<Tensor> packed_grads, summed_grads;
  double max_logit_diff() const { return max_abs_diff(packed_logits, separate_logits); }
  double max_grad_diff() const {
    double worst = 0;
    for (size_t i = 0; i < packed_grads.size(); ++i) worst = std::max(worst, max_abs_diff(packed_grads[i], summed_grads[i]));
    return worst;
  }
  /// The largest gradient entry of any parameter: the scale fp32 rounding is relative to.
  double max_grad() const {
    double largest = 0;
    for (const Tensor& g : summed_grads) largest = std::max(largest, g.abs().max().item<double>());
    return largest;
  }
};

Equivalence packed_vs_separate(Transformer& model, const PackedSample& s, bool with_documents) {
  Equivalence e;
  const TokenLayout layout{s.positions_1S, with_documents ? s.documents_1S : Tensor()};
  std::tie(e.packed_logits, e.packed_grads) = logits_and_gradients(model, s.tokens_1S, s.labels_1S, layout);
  std::vector<Tensor> logits;
  int64_t start = 0;
  for (const int64_t length : s.lengths) {
    const auto [doc_logits, doc_grads] =
        logits_and_gradients(model, s.tokens_1S.narrow(1, start, length), s.labels_1S.narrow(1, start, length),
                             TokenLayout{default_position_ids(1, length)});
    logits.push_back(doc_logits);
    if (e.summed_grads.empty()) {
      e.summed_grads = doc_grads;
    } else {
      for (size_t i = 0; i < doc_grads.size(); ++i) e.summed_grads[i] += doc_grads[i];
    }
    start += length;
  }
  e.separate_logits = torch::cat(logits, 1);
  return e;
}

TEST_F(DocumentMaskTest, PackedSampleRulesGiveThreeDocumentsWithPositionsFromZero) {
  const PackedSample s = packed_sample(97);
  std::vector<int64_t> positions, documents;
  for (size_t d = 0; d < s.lengths.size(); ++d) {
    for (int64_t i = 0; i < s.lengths[d]; ++i) {
      positions.push_back(i);
      documents.push_back(static_cast<int64_t>(d));
    }
  }
  EXPECT_TRUE(torch::equal(s.positions_1S[0], torch::tensor(positions, torch::kLong))) << s.positions_1S;
  EXPECT_TRUE(torch::equal(s.documents_1S[0], torch::tensor(documents, torch::kLong))) << s.documents_1S;
}

class PackedEquivalenceTest : public testing::SeededTestWithParam<config::AttentionKernel> {};

// The acceptance test of data.reset_attention_mask: with document ids a packed sample is three
// independent documents. fp32: logits to 1e-6, parameter gradients to 1e-6 of the largest
// gradient entry (sums of 21 token losses: entries up to a few units, whose fp32 rounding alone is
// ~1e-7 each); fp64: both to 1e-12.
TEST_P(PackedEquivalenceTest, PackedDocumentsEqualSeparateForwards) {
  for (const torch::Dtype dtype : {torch::kFloat, torch::kDouble}) {
    torch::manual_seed(5);
    const PackedSample s = packed_sample(97);
    Transformer model = make_model(GetParam(), dtype);
    const Equivalence e = packed_vs_separate(model, s, /*with_documents=*/true);
    const bool fp32 = dtype == torch::kFloat;
    EXPECT_LT(e.max_logit_diff(), fp32 ? 1e-6 : 1e-12) << dtype;
    EXPECT_LT(e.max_grad_diff(), fp32 ? 1e-6 * e.max_grad() : 1e-12) << dtype;
    std::printf("[ measured ] %s %s: max |logits diff| %.3g, max |grad diff| %.3g (largest gradient entry %.3g)\n",
                GetParam() == config::AttentionKernel::kSdpa ? "sdpa" : "materialised", fp32 ? "fp32" : "fp64",
                e.max_logit_diff(), e.max_grad_diff(), e.max_grad());
    if (dtype == torch::kDouble) {
      // The control: positions reset but no mask (data.reset_attention_mask off) lets the later
      // documents see the earlier ones.
      const Equivalence unmasked = packed_vs_separate(model, s, /*with_documents=*/false);
      EXPECT_GT(unmasked.max_logit_diff(), 1e-4);
      EXPECT_GT(unmasked.max_grad_diff(), 1e-4);
      EXPECT_LT(max_abs_diff(unmasked.packed_logits.narrow(1, 0, 5), e.separate_logits.narrow(1, 0, 5)), 1e-12);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(BothKernels, PackedEquivalenceTest,
                         ::testing::Values(config::AttentionKernel::kSdpa, config::AttentionKernel::kMaterialised));

// model.attention = sdpa and = materialised on the packed sample with document ids: the same
// logits and parameter gradients in fp64.
TEST_F(DocumentMaskTest, SdpaModelEqualsMaterialisedModelWithDocumentsInDouble) {
  const PackedSample s = packed_sample(97);
  Transformer fused = make_model(config::AttentionKernel::kSdpa, torch::kDouble);
  Transformer reference = make_model(config::AttentionKernel::kMaterialised, torch::kDouble);
  const TokenLayout layout{s.positions_1S, s.documents_1S};
  const auto [x, x_grads] = logits_and_gradients(fused, s.tokens_1S, s.labels_1S, layout);
  const auto [y, y_grads] = logits_and_gradients(reference, s.tokens_1S, s.labels_1S, layout);
  EXPECT_LT(max_abs_diff(x, y), 1e-12);
  ASSERT_EQ(x_grads.size(), y_grads.size());
  double worst_grad = 0;
  for (size_t i = 0; i < x_grads.size(); ++i) {
    EXPECT_LT(max_abs_diff(x_grads[i], y_grads[i]), 1e-11) << i;
    worst_grad = std::max(worst_grad, max_abs_diff(x_grads[i], y_grads[i]));
  }
  std::printf("[ measured ] model sdpa vs materialised, documents, fp64: max |logits diff| %.3g, parameter grads %.3g\n",
              max_abs_diff(x, y), worst_grad);
}

// Recompute carries the document ids into the rerun: gradients equal the plain run's, and
// differ from those without the mask (so a rerun that dropped them would fail).
TEST_F(DocumentMaskTest, RecomputeCarriesTheDocumentIds) {
  const PackedSample s = packed_sample(97);
  Transformer model = make_model(config::AttentionKernel::kSdpa, torch::kDouble);
  const TokenLayout layout{s.positions_1S, s.documents_1S};
  const auto plain = logits_and_gradients(model, s.tokens_1S, s.labels_1S, layout).second;
  apply_recompute(*model, true);
  const auto recomputed = logits_and_gradients(model, s.tokens_1S, s.labels_1S, layout).second;
  const auto unmasked = logits_and_gradients(model, s.tokens_1S, s.labels_1S, TokenLayout{s.positions_1S}).second;
  double worst = 0, unmasked_diff = 0;
  for (size_t i = 0; i < plain.size(); ++i) {
    worst = std::max(worst, max_abs_diff(plain[i], recomputed[i]));
    unmasked_diff = std::max(unmasked_diff, max_abs_diff(plain[i], unmasked[i]));
  }
  EXPECT_LT(worst, 1e-12);
  EXPECT_GT(unmasked_diff, 1e-4);
}

// Pipeline stages get the same layout: two stages with the document ids reproduce the whole
// model's logits.
TEST_F(DocumentMaskTest, PipelineStagesWithDocumentIdsReproduceTheWholeModel) {
  const PackedSample s = packed_sample(97);
  auto model_config = testing::small_model_config();
  model_config.num_layers = 3;
  Transformer whole(model_config, testing::small_moe_config());
  Transformer first(model_config, testing::small_moe_config(), StageSpec{0, 2, true, false});
  Transformer last(model_config, testing::small_moe_config(), StageSpec{2, 3, false, true});
  for (auto* m : {&whole, &first, &last}) init_weights(**m, model_config, 3);
  for (auto* m : {&whole, &first, &last}) (*m)->eval();
  const TokenLayout layout{s.positions_1S, s.documents_1S};
  const Tensor expected = whole(s.tokens_1S, layout).out;
  EXPECT_LT(max_abs_diff(last(first(s.tokens_1S, layout).out, layout).out, expected), 1e-6);
  const Tensor hidden = first(s.tokens_1S, layout).out;
  EXPECT_GT(max_abs_diff(last(hidden, TokenLayout{s.positions_1S}).out, expected), 1e-4);  // the last stage needs them
}

// Decoding keeps plain positions: document ids with a cache are refused.
TEST_F(DocumentMaskTest, DecodingRefusesDocumentIds) {
  Transformer model = make_model(config::AttentionKernel::kSdpa, torch::kFloat);
  model->eval();
  DecodeCache cache(*model);
  const Tensor ids = torch::randint(1, 97, {1, 4}, torch::kLong);
  EXPECT_THROW(model->forward(ids, TokenLayout{default_position_ids(1, 4), torch::zeros({1, 4}, torch::kLong)}, &cache),
               c10::Error);
  EXPECT_THROW(model->forward(ids, TokenLayout{default_position_ids(1, 4), torch::zeros({1, 3}, torch::kLong)}),
               c10::Error);  // and ids of the wrong shape
}

}  // namespace
}  // namespace yuanmoe::model
