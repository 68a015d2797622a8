// Data pipeline: tokenizer round trip, MMIDIDX bytes against hand-built fixtures, rejection of
// corrupt files, sampler determinism / sharding / resume, prepare-data splits. Every test makes its
// own small data in a fresh temporary directory.
#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <set>
#include <sstream>

#include "support/temp_dir.h"
#include "yuanmoe/data/indexed_dataset.h"
#include "yuanmoe/data/prepare.h"
#include "yuanmoe/data/sampler.h"
#include "yuanmoe/data/tokenizer.h"

namespace yuanmoe::data {
namespace {

namespace fs = std::filesystem;

using testing::TempDir;

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

/// Little-endian bytes of a value, for building fixtures by hand.
template <class T>
std::string le(T value) {
  std::string out(sizeof(T), '\0');
  for (size_t i = 0; i < sizeof(T); ++i) out[i] = static_cast<char>((static_cast<uint64_t>(value) >> (8 * i)) & 0xFF);
  return out;
}

/// Expects `f` to throw std::exception whose message contains `needle` (e.g. the file name).
void expect_error_naming(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no exception; expected one naming " << needle;
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message \"" << e.what() << "\" does not name " << needle;
  }
}

/// Deterministic English-like text: `documents` paragraphs of a few sentences.
std::vector<std::string> make_documents(int documents, uint32_t seed) {
  static const std::vector<std::string> words{
      "the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "as", "was", "with", "be",
      "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have",
      "an", "they", "you", "were", "her", "she", "there", "one", "all", "we", "their", "jury",
      "election", "county", "said", "Friday", "Atlanta", "café", "naïve", "1961", "42"};
  std::mt19937 rng(seed);
  std::vector<std::string> out;
  for (int d = 0; d < documents; ++d) {
    std::string text;
    const int sentences = 1 + static_cast<int>(rng() % 4);
    for (int s = 0; s < sentences; ++s) {
      if (s) text += "\n";
      const int n = 3 + static_cast<int>(rng() % 12);
      for (int w = 0; w < n; ++w) {
        if (w) text += " ";
        text += words[rng() % words.size()];
      }
      text += ".";
    }
    out.push_back(text);
  }
  return out;
}

/// Writes documents as plain text (blank line between) and trains a small tokenizer on it.
std::string train_small_tokenizer(const TempDir& dir, int64_t vocab = 400,
                                  std::vector<std::string> pieces = TokenizerTrainOptions{}.user_defined_pieces) {
  const auto docs = make_documents(300, 7);
  size_t next = 0;
  std::istringstream lines;
  const SentenceSource source = [&](std::string& sentence) {
    while (!std::getline(lines, sentence)) {
      if (next == docs.size()) return false;
      lines.clear();
      lines.str(docs[next++]);
    }
    return true;
  };
  TokenizerTrainOptions options;
  options.vocab_size = vocab;
  options.user_defined_pieces = std::move(pieces);
  train_tokenizer(source, dir / "spm", options);
  return dir / "spm.model";
}

/// The ids of several parts back to back.
std::vector<int32_t> concat(std::initializer_list<std::vector<int32_t>> parts) {
  std::vector<int32_t> ids;
  for (const auto& part : parts) ids.insert(ids.end(), part.begin(), part.end());
  return ids;
}

// ---------------------------------------------------------------------------------------------
// Tokenizer

TEST(Tokenizer, TrainedModelRoundTripsTextAndHasEod) {
  TempDir dir;
  const Tokenizer tokenizer(train_small_tokenizer(dir));
  EXPECT_EQ(tokenizer.vocab_size(), 400);
  EXPECT_EQ(tokenizer.piece(tokenizer.eod_id()), "<eod>");
  EXPECT_EQ(tokenizer.eod_id(), 4);
  EXPECT_EQ(tokenizer.pad_id(), 3);
  EXPECT_EQ(tokenizer.unk_id(), 0);
  for (const std::string text :
       {"the jury said Friday.", "Atlanta  county\nelection 1961", "naïve café, 漢字 and ünïcödé!",
        "  leading and trailing spaces  ", "tabs\tand\nnew\nlines", "x"}) {
    const auto ids = tokenizer.encode(text);
    EXPECT_FALSE(ids.empty());
    for (const auto id : ids) EXPECT_NE(id, tokenizer.unk_id()) << text;  // byte fallback
    EXPECT_EQ(tokenizer.decode(ids), text);
  }
  EXPECT_TRUE(tokenizer.encode("").empty());
  EXPECT_THROW(tokenizer.decode({400}), std::out_of_range);
}

TEST(Tokenizer, TrainedModelHasSepAndNewlinePieces) {
  TempDir dir;
  const Tokenizer tokenizer(train_small_tokenizer(dir));
  EXPECT_EQ(tokenizer.sep_id(), 5);
  EXPECT_EQ(tokenizer.piece(5), "<sep>");
  EXPECT_EQ(tokenizer.newline_id(), 6);
  EXPECT_EQ(tokenizer.piece(6), "<n>");
  EXPECT_EQ(tokenizer.piece(7), "<0x00>");  // the byte pieces follow
  // User-defined: the literal text is the piece, never split.
  const auto ids = tokenizer.encode("jury<sep>said");
  EXPECT_EQ(std::count(ids.begin(), ids.end(), tokenizer.sep_id()), 1);
}

TEST(Tokenizer, NewlinePieceDecodesToANewline) {
  TempDir dir;
  const Tokenizer tokenizer(train_small_tokenizer(dir));
  const int32_t n = tokenizer.newline_id();
  const std::string text = "the jury said\nFriday.\n\n  county 1961\n";
  const auto ids = tokenizer.encode_lines(text);
  EXPECT_EQ(ids, concat({tokenizer.encode("the jury said"), {n}, tokenizer.encode("Friday."), {n, n},
                         tokenizer.encode("  county 1961"), {n}}));
  EXPECT_EQ(tokenizer.decode(ids), text);
  EXPECT_EQ(tokenizer.decode({n}), "\n");
  EXPECT_EQ(tokenizer.decode({n, n}), "\n\n");
  // encode() leaves "\n" to SentencePiece (a byte piece here): pretraining text is unchanged.
  const auto plain = tokenizer.encode("a\nb");
  EXPECT_EQ(std::count(plain.begin(), plain.end(), n), 0);
  EXPECT_EQ(tokenizer.decode(plain), "a\nb");
  // A literal <n> is the piece, so it reads back as a newline (Yuan's meaning of it).
  EXPECT_EQ(tokenizer.decode(tokenizer.encode("a<n>b")), "a\nb");
}

TEST(Tokenizer, ModelWithoutSepOrNewlinePieces) {
  TempDir dir;
  const Tokenizer tokenizer(train_small_tokenizer(dir, 400, {kEodPiece}));
  EXPECT_EQ(tokenizer.eod_id(), 4);
  EXPECT_EQ(tokenizer.sep_id(), -1);
  EXPECT_EQ(tokenizer.newline_id(), -1);
  const std::string text = "two\nlines";
  EXPECT_EQ(tokenizer.encode_lines(text), tokenizer.encode(text));
  EXPECT_EQ(tokenizer.decode(tokenizer.encode_lines(text)), text);
}

TEST(Tokenizer, UnigramAlsoTrains) {
  TempDir dir;
  const auto docs = make_documents(200, 3);
  size_t next = 0;
  TokenizerTrainOptions options;
  options.vocab_size = 350;
  options.model_type = "unigram";
  train_tokenizer([&](std::string& s) { return next < docs.size() && (s = docs[next++], true); },
                  dir / "uni", options);
  const Tokenizer tokenizer(dir / "uni.model");
  EXPECT_EQ(tokenizer.decode(tokenizer.encode(docs[0])), docs[0]);
}

TEST(Tokenizer, BadModelsAreRejectedNamingTheFile) {
  TempDir dir;
  expect_error_naming([&] { Tokenizer t(dir / "missing.model"); }, "missing.model");
  write_bytes(dir / "garbage.model", "this is not a protobuf \x01\x02\x03");
  expect_error_naming([&] { Tokenizer t(dir / "garbage.model"); }, "garbage.model");
  TokenizerTrainOptions options;
  options.model_type = "wordpiece";
  EXPECT_THROW(train_tokenizer([](std::string&) { return false; }, dir / "x", options), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// Indexed dataset: bytes against fixtures built by hand from the format description

/// .idx of two documents, [5, 6, 7] and [8, 65535 or 70000], one sequence each.
std::string fixture_index(uint8_t code, int64_t item) {
  std::string idx("MMIDIDX\0\0", 9);
  idx += le<uint64_t>(1);             // version
  idx += le<uint8_t>(code);           // dtype code
  idx += le<uint64_t>(2);             // sequences
  idx += le<uint64_t>(3);             // document index entries = documents + 1
  idx += le<int32_t>(3) + le<int32_t>(2);                // sizes
  idx += le<int64_t>(0) + le<int64_t>(3 * item);         // byte pointers
  idx += le<int64_t>(0) + le<int64_t>(1) + le<int64_t>(2);  // document index
  return idx;
}

TEST(IndexedDataset, Uint16MatchesHandBuiltFixture) {
  TempDir dir;
  const std::vector<int32_t> a{5, 6, 7}, b{8, 65535};
  IndexedDatasetWriter writer(dir / "u16", DType::kUInt16);
  writer.add_document(a.data(), a.size());
  writer.add_document(b.data(), b.size());
  writer.finish();
  EXPECT_EQ(read_bytes(dir / "u16.idx"), fixture_index(8, 2));
  EXPECT_EQ(read_bytes(dir / "u16.bin"),
            le<uint16_t>(5) + le<uint16_t>(6) + le<uint16_t>(7) + le<uint16_t>(8) + le<uint16_t>(65535));

  // And the reader takes the hand-built bytes.
  write_bytes(dir / "hand.idx", fixture_index(8, 2));
  write_bytes(dir / "hand.bin", read_bytes(dir / "u16.bin"));
  const IndexedDataset ds(dir / "hand");
  EXPECT_EQ(ds.dtype(), DType::kUInt16);
  EXPECT_EQ(ds.num_sequences(), 2);
  EXPECT_EQ(ds.num_documents(), 2);
  EXPECT_EQ(ds.num_tokens(), 5);
  EXPECT_EQ(ds.sequence(0), (std::vector<int64_t>{5, 6, 7}));
  EXPECT_EQ(ds.sequence(1), (std::vector<int64_t>{8, 65535}));
  EXPECT_EQ(static_cast<const uint16_t*>(ds.sequence_data(1))[1], 65535);  // zero-copy view
}

TEST(IndexedDataset, Int32MatchesHandBuiltFixture) {
  TempDir dir;
  const std::vector<int32_t> a{5, 6, 7}, b{8, 70000};
  IndexedDatasetWriter writer(dir / "i32", DType::kInt32);
  writer.add_document(a.data(), a.size());
  writer.add_document(b.data(), b.size());
  writer.finish();
  EXPECT_EQ(read_bytes(dir / "i32.idx"), fixture_index(4, 4));
  EXPECT_EQ(read_bytes(dir / "i32.bin"),
            le<int32_t>(5) + le<int32_t>(6) + le<int32_t>(7) + le<int32_t>(8) + le<int32_t>(70000));
  const IndexedDataset ds(dir / "i32");
  EXPECT_EQ(ds.dtype(), DType::kInt32);
  EXPECT_EQ(ds.sequence(1), (std::vector<int64_t>{8, 70000}));
  std::vector<int64_t> part(2);
  ds.read(0, 1, 2, part.data());
  EXPECT_EQ(part, (std::vector<int64_t>{6, 7}));
}

TEST(IndexedDataset, DtypeCodesAreMegatrons) {
  EXPECT_EQ(static_cast<int>(DType::kUInt8), 1);
  EXPECT_EQ(static_cast<int>(DType::kInt8), 2);
  EXPECT_EQ(static_cast<int>(DType::kInt16), 3);
  EXPECT_EQ(static_cast<int>(DType::kInt32), 4);
  EXPECT_EQ(static_cast<int>(DType::kInt64), 5);
  EXPECT_EQ(static_cast<int>(DType::kFloat64), 6);
  EXPECT_EQ(static_cast<int>(DType::kFloat32), 7);
  EXPECT_EQ(static_cast<int>(DType::kUInt16), 8);
  EXPECT_EQ(best_fitting_dtype(65499), DType::kUInt16);
  EXPECT_EQ(best_fitting_dtype(65500), DType::kInt32);
  EXPECT_EQ(best_fitting_dtype(135040), DType::kInt32);  // Yuan 2.0's vocabulary
}

TEST(IndexedDataset, ReadsMegatronSentenceSplitAndMultimodalLayouts) {
  // preprocess_data.py --split-sentences: one document of several sequences; multimodal
  // datasets append one int8 mode per sequence after the document index.
  TempDir dir;
  std::string idx("MMIDIDX\0\0", 9);
  idx += le<uint64_t>(1) + le<uint8_t>(8) + le<uint64_t>(3) + le<uint64_t>(3);
  idx += le<int32_t>(2) + le<int32_t>(1) + le<int32_t>(2);
  idx += le<int64_t>(0) + le<int64_t>(4) + le<int64_t>(6);
  idx += le<int64_t>(0) + le<int64_t>(2) + le<int64_t>(3);
  const std::string bin = le<uint16_t>(10) + le<uint16_t>(11) + le<uint16_t>(12) + le<uint16_t>(20) + le<uint16_t>(21);
  write_bytes(dir / "split.idx", idx);
  write_bytes(dir / "split.bin", bin);
  const IndexedDataset ds(dir / "split");
  EXPECT_EQ(ds.num_sequences(), 3);
  EXPECT_EQ(ds.num_documents(), 2);
  EXPECT_EQ(ds.document_index(1), 2);
  EXPECT_EQ(ds.sequence(2), (std::vector<int64_t>{20, 21}));

  write_bytes(dir / "mm.idx", idx + std::string(3, '\1'));
  write_bytes(dir / "mm.bin", bin);
  EXPECT_EQ(IndexedDataset(dir / "mm").num_tokens(), 5);

  // The writer produces the same bytes through add_sequence / end_document.
  IndexedDatasetWriter writer(dir / "w", DType::kUInt16);
  const std::vector<int32_t> s0{10, 11}, s1{12}, s2{20, 21};
  writer.add_sequence(s0.data(), s0.size());
  writer.add_sequence(s1.data(), s1.size());
  writer.end_document();
  writer.add_sequence(s2.data(), s2.size());
  writer.finish();
  EXPECT_EQ(read_bytes(dir / "w.idx"), idx);
  EXPECT_EQ(read_bytes(dir / "w.bin"), bin);
}

TEST(IndexedDataset, WriterRejectsTokensOutsideTheDtypeAndCleansUp) {
  TempDir dir;
  {
    IndexedDatasetWriter writer(dir / "x", DType::kUInt16);
    const std::vector<int32_t> bad{1, 65536};
    expect_error_naming([&] { writer.add_document(bad.data(), bad.size()); }, "65536");
  }
  EXPECT_FALSE(fs::exists(dir / "x.bin.tmp"));
  EXPECT_FALSE(fs::exists(dir / "x.bin"));
}

TEST(IndexedDataset, EmptyDatasetLoads) {
  TempDir dir;
  IndexedDatasetWriter writer(dir / "empty", DType::kUInt16);
  writer.finish();
  const IndexedDataset ds(dir / "empty");
  EXPECT_EQ(ds.num_sequences(), 0);
  EXPECT_EQ(ds.num_documents(), 0);
}

/// A valid two-document uint16 dataset at dir/"good".
void write_good(const TempDir& dir) {
  write_bytes(dir / "good.idx", fixture_index(8, 2));
  write_bytes(dir / "good.bin", le<uint16_t>(5) + le<uint16_t>(6) + le<uint16_t>(7) + le<uint16_t>(8) + le<uint16_t>(9));
}

TEST(IndexedDataset, CorruptIndexIsRejectedNamingTheFile) {
  TempDir dir;
  write_good(dir);
  const std::string idx = fixture_index(8, 2);
  const std::string bin = read_bytes(dir / "good.bin");
  const auto expect_rejected = [&](const std::string& bad_idx, const std::string& what) {
    SCOPED_TRACE(what);
    write_bytes(dir / "bad.idx", bad_idx);
    write_bytes(dir / "bad.bin", bin);
    expect_error_naming([&] { IndexedDataset ds(dir / "bad"); }, dir / "bad.idx");
  };
  std::string magic = idx;
  magic[0] = 'X';
  expect_rejected(magic, "magic");
  std::string version = idx;
  version[9] = 2;
  expect_rejected(version, "version");
  for (const char code : {0, 9, 100}) {
    std::string dtype = idx;
    dtype[17] = code;
    expect_rejected(dtype, "dtype code");
  }
  std::string huge = idx;
  huge.replace(18, 8, le<uint64_t>(0xFFFFFFFFFFFFFFF0ULL));  // sequence count that would overflow
  expect_rejected(huge, "huge count");
  std::string docs = idx;
  docs.replace(idx.size() - 8, 8, le<int64_t>(1));  // document index does not end at S
  expect_rejected(docs, "document index");
  expect_rejected(idx + "x", "trailing bytes");
  // Truncation at every length: always an error, never a crash.
  for (size_t n = 0; n < idx.size(); ++n) expect_rejected(idx.substr(0, n), "truncated at " + std::to_string(n));
  expect_error_naming([&] { IndexedDataset ds(dir / "absent"); }, dir / "absent.idx");
}

TEST(IndexedDataset, CorruptOrTruncatedBinIsRejectedNamingTheFile) {
  TempDir dir;
  write_good(dir);
  const std::string bin = read_bytes(dir / "good.bin");
  for (size_t n = 0; n < bin.size(); ++n) {
    SCOPED_TRACE(n);
    write_bytes(dir / "bad.idx", fixture_index(8, 2));
    write_bytes(dir / "bad.bin", bin.substr(0, n));
    expect_error_naming([&] { IndexedDataset ds(dir / "bad"); }, dir / "bad.bin");
  }
  std::string idx = fixture_index(8, 2);
  idx.replace(9 + 8 + 1 + 8 + 8 + 8 + 8, 8, le<int64_t>(1));  // misaligned second pointer
  write_bytes(dir / "bad.idx", idx);
  write_bytes(dir / "bad.bin", bin);
  expect_error_naming([&] { IndexedDataset ds(dir / "bad"); }, dir / "bad.bin");
  std::remove((dir / "bad.bin").c_str());
  expect_error_naming([&] { IndexedDataset ds(dir / "bad"); }, dir / "bad.bin");
}

TEST(IndexedDataset, RandomCorruptionNeverReadsOutOfBounds) {
  TempDir dir;
  write_good(dir);
  const std::string idx = fixture_index(8, 2);
  const std::string bin = read_bytes(dir / "good.bin");
  std::mt19937 rng(1);
  for (int trial = 0; trial < 500; ++trial) {
    std::string bad = idx;
    for (int flips = 1 + trial % 3; flips > 0; --flips) bad[rng() % bad.size()] = static_cast<char>(rng());
    write_bytes(dir / "fuzz.idx", bad);
    write_bytes(dir / "fuzz.bin", bin);
    try {
      const IndexedDataset ds(dir / "fuzz");
      for (int64_t i = 0; i < ds.num_sequences(); ++i) ds.sequence(i);  // must stay inside .bin
    } catch (const std::runtime_error&) {
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Sampler

constexpr int64_t kEod = 0;

/// Documents of varied lengths whose tokens are unique (1000 * doc + position + 1), ending in EOD.
std::shared_ptr<const IndexedDataset> sampler_dataset(const TempDir& dir, int documents = 40) {
  IndexedDatasetWriter writer(dir / "s", DType::kInt32);
  std::mt19937 rng(5);
  for (int d = 0; d < documents; ++d) {
    std::vector<int32_t> doc;
    const int n = 1 + static_cast<int>(rng() % 30);
    for (int i = 0; i < n; ++i) doc.push_back(1000 * (d + 1) + i + 1);
    doc.push_back(kEod);
    writer.add_document(doc.data(), doc.size());
  }
  writer.finish();
  return std::make_shared<const IndexedDataset>(dir / "s");
}

SamplerOptions sampler_options(int64_t rank = 0, int64_t world = 1, int64_t batch = 2) {
  SamplerOptions o;
  o.seq_length = 16;
  o.micro_batch_size = batch;
  o.rank = rank;
  o.world_size = world;
  o.seed = 1234;
  return o;
}

std::vector<Batch> take(GptSampler& sampler, int n) {
  std::vector<Batch> out;
  for (int i = 0; i < n; ++i) out.push_back(sampler.next_batch());
  return out;
}

void expect_same(const std::vector<Batch>& a, const std::vector<Batch>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(torch::equal(a[i].tokens, b[i].tokens)) << "batch " << i;
    EXPECT_TRUE(torch::equal(a[i].labels, b[i].labels)) << "batch " << i;
    EXPECT_TRUE(torch::equal(a[i].position_ids, b[i].position_ids)) << "batch " << i;
  }
}

TEST(Sampler, BatchesHaveShapesAndShiftedLabels) {
  TempDir dir;
  GptSampler sampler(sampler_dataset(dir), sampler_options());
  const Batch batch = sampler.next_batch();
  for (const auto& t : {batch.tokens, batch.labels, batch.position_ids}) {
    EXPECT_EQ(t.sizes(), (std::vector<int64_t>{2, 16}));
    EXPECT_EQ(t.scalar_type(), torch::kLong);
  }
  EXPECT_TRUE(torch::equal(batch.tokens.slice(1, 1), batch.labels.slice(1, 0, 15)));
  EXPECT_TRUE(torch::equal(batch.position_ids[0], torch::arange(16, torch::kLong)));
}

TEST(Sampler, UnshuffledSamplesTileTheStreamWithOneTokenOverlap) {
  TempDir dir;
  const auto ds = sampler_dataset(dir);
  std::vector<int64_t> stream;
  for (int64_t i = 0; i < ds->num_sequences(); ++i) {
    const auto s = ds->sequence(i);
    stream.insert(stream.end(), s.begin(), s.end());
  }
  SamplerOptions o = sampler_options(0, 1, 1);
  o.shuffle = false;
  GptSampler sampler(ds, o);
  EXPECT_EQ(sampler.samples_per_epoch(), (static_cast<int64_t>(stream.size()) - 1) / 16);
  for (int64_t k = 0; k < sampler.samples_per_epoch(); ++k) {
    const Batch b = sampler.next_batch();
    for (int64_t i = 0; i < 16; ++i) {
      ASSERT_EQ(b.tokens[0][i].item<int64_t>(), stream[k * 16 + i]);
      ASSERT_EQ(b.labels[0][i].item<int64_t>(), stream[k * 16 + i + 1]);
    }
  }
  EXPECT_EQ(sampler.state().epoch, 1);
  EXPECT_EQ(sampler.state().cursor, 0);
}

TEST(Sampler, SameSeedSameBatchesAcrossEpochs) {
  TempDir dir;
  const auto ds = sampler_dataset(dir);
  GptSampler a(ds, sampler_options()), b(ds, sampler_options());
  const int n = static_cast<int>(2 * a.samples_per_epoch() / 2 + 3);  // into the third epoch
  const auto batches = take(a, n);
  expect_same(batches, take(b, n));
  EXPECT_GE(a.state().epoch, 2);

  SamplerOptions other = sampler_options();
  other.seed = 99;
  GptSampler c(ds, other);
  EXPECT_FALSE(torch::equal(c.next_batch().tokens, batches[0].tokens));
  // Epochs are shuffled differently from each other.
  GptSampler d(ds, sampler_options());
  const auto epoch0 = d.next_batch();
  d.set_state({1234, 1, 0});
  EXPECT_FALSE(torch::equal(d.next_batch().tokens, epoch0.tokens));
}

TEST(Sampler, EveryEpochUsesEachSampleOnce) {
  TempDir dir;
  const auto ds = sampler_dataset(dir);
  SamplerOptions o = sampler_options(0, 1, 1);
  GptSampler shuffled(ds, o);
  o.shuffle = false;
  GptSampler ordered(ds, o);
  std::multiset<std::vector<int64_t>> a, b;
  for (int64_t k = 0; k < shuffled.samples_per_epoch(); ++k) {
    const auto t1 = shuffled.next_batch().tokens;
    const auto t2 = ordered.next_batch().tokens;
    a.insert(std::vector<int64_t>(t1.data_ptr<int64_t>(), t1.data_ptr<int64_t>() + 16));
    b.insert(std::vector<int64_t>(t2.data_ptr<int64_t>(), t2.data_ptr<int64_t>() + 16));
  }
  // The same sequences in another order make other samples, but never a repeated one.
  EXPECT_EQ(std::set<std::vector<int64_t>>(a.begin(), a.end()).size(), a.size());
  EXPECT_EQ(a.size(), b.size());
}

TEST(Sampler, RanksSplitTheGlobalBatchWithoutOverlap) {
  TempDir dir;
  const auto ds = sampler_dataset(dir);
  constexpr int world = 4, batch = 2, steps = 9;
  GptSampler single(ds, sampler_options(0, 1, world * batch));
  const auto global = take(single, steps);
  std::set<std::vector<int64_t>> seen;
  for (int r = 0; r < world; ++r) {
    GptSampler rank(ds, sampler_options(r, world, batch));
    const auto mine = take(rank, steps);
    for (int s = 0; s < steps; ++s) {
      EXPECT_TRUE(torch::equal(mine[s].tokens, global[s].tokens.slice(0, r * batch, (r + 1) * batch)))
          << "rank " << r << " step " << s;
      for (int b = 0; b < batch; ++b) {
        const auto row = mine[s].tokens[b].contiguous();
        seen.insert(std::vector<int64_t>(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + 16));
      }
    }
    EXPECT_EQ(rank.state(), single.state());  // consumed samples agree on every rank
  }
  // Within the first epoch all samples are distinct, so no two ranks saw the same one.
  const int64_t first_epoch = std::min<int64_t>(single.samples_per_epoch(), world * batch * steps);
  EXPECT_GE(static_cast<int64_t>(seen.size()), first_epoch);
}

TEST(Sampler, StateRoundTripsThroughJsonAndResumesExactly) {
  TempDir dir;
  const auto ds = sampler_dataset(dir);
  GptSampler run(ds, sampler_options(1, 2, 3));
  take(run, 7);
  const std::string saved = nlohmann::json(run.state()).dump();
  const auto expected = take(run, 12);  // crosses an epoch boundary

  GptSampler resumed(ds, sampler_options(1, 2, 3));
  resumed.set_state(nlohmann::json::parse(saved).get<SamplerState>());
  expect_same(take(resumed, 12), expected);
  EXPECT_EQ(resumed.state(), run.state());

  const auto j = nlohmann::json::parse(saved);
  EXPECT_EQ(j.at("seed").get<uint64_t>(), 1234u);
  EXPECT_TRUE(j.contains("epoch") && j.contains("cursor"));
  expect_error_naming([] { nlohmann::json{{"seed", 1}, {"epoch", 0}}.get<SamplerState>(); }, "cursor");
  expect_error_naming([&] { resumed.set_state({1234, 0, resumed.samples_per_epoch()}); }, dir / "s");
}

TEST(Sampler, PositionIdsResetAfterEod) {
  const auto tokens = torch::tensor({5, 0, 7, 8, 0, 9, 0, 0}, torch::kLong).view({2, 4});
  const auto positions = reset_position_ids(tokens, 0);
  EXPECT_TRUE(torch::equal(positions, torch::tensor({0, 1, 0, 1, 0, 0, 1, 0}, torch::kLong).view({2, 4})));

  TempDir dir;
  SamplerOptions o = sampler_options();
  o.reset_position_ids = true;
  o.eod_id = kEod;
  GptSampler sampler(sampler_dataset(dir), o);
  bool saw_reset = false;
  for (int n = 0; n < 10; ++n) {
    const Batch b = sampler.next_batch();
    for (int64_t r = 0; r < 2; ++r) {
      for (int64_t i = 1; i < 16; ++i) {
        const bool after_eod = b.tokens[r][i - 1].item<int64_t>() == kEod;
        const int64_t expected = after_eod ? 0 : b.position_ids[r][i - 1].item<int64_t>() + 1;
        ASSERT_EQ(b.position_ids[r][i].item<int64_t>(), expected);
        saw_reset |= after_eod;
      }
    }
  }
  EXPECT_TRUE(saw_reset);
}

TEST(Sampler, RejectsTooSmallDataAndBadRanks) {
  TempDir dir;
  const auto ds = sampler_dataset(dir, 1);
  SamplerOptions o = sampler_options();
  o.seq_length = 10000;
  expect_error_naming([&] { GptSampler s(ds, o); }, dir / "s");
  EXPECT_THROW(GptSampler(ds, sampler_options(2, 2)), std::invalid_argument);
  o = sampler_options();
  o.reset_position_ids = true;
  EXPECT_THROW(GptSampler(ds, o), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// prepare-data

TEST(Prepare, ReaderSplitsPlainTextOnBlankLinesAndJsonlOnLines) {
  TempDir dir;
  write_bytes(dir / "a.txt", "\n\nfirst doc\nline two\r\n\n  \n\nsecond\n\nthird, no newline at end");
  write_bytes(dir / "b.jsonl", "{\"text\": \"json one\"}\n\n{\"text\": \"two\\nlines\", \"id\": 7}\n");
  DocumentReader reader({dir / "a.txt", dir / "b.jsonl"}, InputFormat::kAuto);
  std::vector<std::pair<std::string, int64_t>> docs;
  Document d;
  while (reader.next(d)) {
    parse_document(d);
    docs.emplace_back(d.text, d.line);
  }
  const std::vector<std::pair<std::string, int64_t>> expected{
      {"first doc\nline two", 3}, {"second", 8}, {"third, no newline at end", 10}, {"json one", 1}, {"two\nlines", 3}};
  EXPECT_EQ(docs, expected);
}

TEST(Prepare, JsonlErrorsNameFileAndLine) {
  TempDir dir;
  const std::string tokenizer = train_small_tokenizer(dir);
  const auto run = [&](const std::string& content) {
    write_bytes(dir / "in.jsonl", content);
    PrepareOptions o;
    o.inputs = {dir / "in.jsonl"};
    o.output_prefix = dir / "out";
    o.tokenizer = tokenizer;
    prepare_data(o);
  };
  expect_error_naming([&] { run("{\"text\": \"ok\"}\n{\"text\": \"broken\"\n"); }, "in.jsonl:2: invalid JSON");
  expect_error_naming([&] { run("{\"body\": \"no text\"}\n"); }, "in.jsonl:1: no \"text\" field");
  expect_error_naming([&] { run("\n{\"text\": 5}\n"); }, "in.jsonl:2: \"text\" must be a string");
  expect_error_naming([&] { run("[1, 2]\n"); }, "in.jsonl:1: expected a JSON object");
  expect_error_naming([&] { run("\n\n"); }, "in.jsonl: no documents in the input");
  PrepareOptions o;
  o.inputs = {dir / "missing.txt"};
  o.output_prefix = dir / "out";
  o.tokenizer = tokenizer;
  expect_error_naming([&] { prepare_data(o); }, "missing.txt");
  EXPECT_FALSE(fs::exists(dir / "out_train.idx"));
}

TEST(Prepare, WritesDecodableDeterministicSplits) {
  TempDir dir;
  const auto docs = make_documents(120, 11);
  {
    std::ofstream text(dir / "a.txt");
    for (int i = 0; i < 60; ++i) text << docs[i] << "\n\n";
    std::ofstream jsonl(dir / "b.jsonl");
    for (int i = 60; i < 120; ++i) jsonl << nlohmann::json{{"text", docs[i]}}.dump() << "\n";
  }
  PrepareOptions o;
  o.inputs = {dir / "a.txt", dir / "b.jsonl"};
  o.output_prefix = dir / "ds";
  o.train_vocab_size = 400;
  o.valid_fraction = 0.1;
  o.workers = 3;
  const PrepareSummary summary = prepare_data(o);
  EXPECT_EQ(summary.train.documents + summary.valid.documents, 120);
  EXPECT_EQ(summary.valid.documents, 12);  // exactly f * documents
  EXPECT_EQ(summary.dtype, DType::kUInt16);

  const Tokenizer tokenizer(dir / "ds.model");
  const IndexedDataset train(dir / "ds_train"), valid(dir / "ds_valid");
  int64_t next_train = 0, next_valid = 0;
  for (int64_t i = 0; i < 120; ++i) {
    const bool in_valid = std::floor((i + 1) * 0.1 + 0.5) > std::floor(i * 0.1 + 0.5);
    const IndexedDataset& split = in_valid ? valid : train;
    const auto tokens = split.sequence(in_valid ? next_valid++ : next_train++);
    ASSERT_EQ(tokens.back(), tokenizer.eod_id());
    EXPECT_EQ(tokenizer.decode(std::vector<int32_t>(tokens.begin(), tokens.end() - 1)), docs[i]) << i;
  }
  EXPECT_EQ(next_train, train.num_documents());
  const auto meta = load_dataset_meta(dir / "ds_valid");
  ASSERT_TRUE(meta.has_value());
  EXPECT_EQ(meta->eod_id, tokenizer.eod_id());
  EXPECT_EQ(meta->vocab_size, 400);
  EXPECT_EQ(meta->tokens, valid.num_tokens());
  EXPECT_EQ(meta->sep_id, tokenizer.sep_id());
  EXPECT_EQ(meta->newline_id, tokenizer.newline_id());
  EXPECT_FALSE(meta->sft);

  // Same input and tokenizer, other worker count: byte-identical output.
  PrepareOptions again = o;
  again.output_prefix = dir / "again";
  again.train_vocab_size = 0;
  again.tokenizer = dir / "ds.model";
  again.workers = 1;
  prepare_data(again);
  EXPECT_EQ(read_bytes(dir / "again_train.bin"), read_bytes(dir / "ds_train.bin"));
  EXPECT_EQ(read_bytes(dir / "again_train.idx"), read_bytes(dir / "ds_train.idx"));
  EXPECT_EQ(read_bytes(dir / "again_valid.bin"), read_bytes(dir / "ds_valid.bin"));
}

TEST(Prepare, MetaWithoutSftKeysStillLoads) {
  TempDir dir;
  write_bytes(dir / "old.meta.json",
              R"({"format": "yuanmoe.dataset.meta", "version": 1, "split": "train", "documents": 2,
                  "sequences": 2, "tokens": 9, "dtype": "uint16",
                  "tokenizer": {"model": "m.model", "vocab_size": 400, "eod_id": 4, "pad_id": 3,
                                "unk_id": 0, "bos_id": 1, "eos_id": 2}})");
  const auto meta = load_dataset_meta(dir / "old");
  ASSERT_TRUE(meta.has_value());
  EXPECT_EQ(meta->eod_id, 4);
  EXPECT_EQ(meta->sep_id, -1);
  EXPECT_EQ(meta->newline_id, -1);
  EXPECT_FALSE(meta->sft);
}

// ---------------------------------------------------------------------------------------------
// prepare-data: instruction (SFT) samples

/// The documents of a dataset, as token ids.
std::vector<std::vector<int32_t>> documents_of(const std::string& prefix) {
  const IndexedDataset dataset(prefix);
  std::vector<std::vector<int32_t>> documents;
  for (int64_t i = 0; i < dataset.num_sequences(); ++i) {
    const auto tokens = dataset.sequence(i);
    documents.emplace_back(tokens.begin(), tokens.end());
  }
  return documents;
}

/// What spdlog logs while it lives, one "level: message" line each (prepare-data's warnings).
class CapturedLog {
 public:
  CapturedLog() : previous_(spdlog::default_logger()) {
    auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(stream_);
    sink->set_pattern("%l: %v");
    spdlog::set_default_logger(std::make_shared<spdlog::logger>("captured", sink));
  }
  ~CapturedLog() { spdlog::set_default_logger(previous_); }
  /// The messages logged at warning level, in order.
  std::vector<std::string> warnings() const {
    std::vector<std::string> out;
    std::istringstream lines(stream_.str());
    const std::string level = "warning: ";
    for (std::string line; std::getline(lines, line);) {
      if (line.rfind(level, 0) == 0) out.push_back(line.substr(level.size()));
    }
    return out;
  }

 private:
  std::ostringstream stream_;
  std::shared_ptr<spdlog::logger> previous_;
};

PrepareOptions sft_options(const TempDir& dir, const std::string& input, InputFormat format,
                           const std::string& tokenizer) {
  PrepareOptions o;
  o.inputs = {input};
  o.format = format;
  o.output_prefix = dir / "sft";
  o.tokenizer = tokenizer;
  o.valid_fraction = 0;
  return o;
}

TEST(PrepareSft, TextSamplesArePromptSepResponseEod) {
  TempDir dir;
  const Tokenizer tokenizer(train_small_tokenizer(dir));
  write_bytes(dir / "in.txt",
              "What did the jury say?<sep>The jury said Friday.\n"
              "\n"
              "Two lines<n>of instruction<sep>One answer<n><n>with a gap.\r\n"
              "<sep>An instruction may be empty.\n");
  const PrepareSummary summary =
      prepare_data(sft_options(dir, dir / "in.txt", InputFormat::kSftText, tokenizer.path()));
  EXPECT_EQ(summary.bad_samples, 0);
  EXPECT_EQ(summary.sep_id, 5);
  EXPECT_EQ(summary.newline_id, 6);
  const int32_t sep = tokenizer.sep_id(), n = tokenizer.newline_id(), eod = tokenizer.eod_id();
  const std::vector<std::vector<int32_t>> expected{
      concat({tokenizer.encode("What did the jury say?"), {sep}, tokenizer.encode("The jury said Friday."), {eod}}),
      concat({tokenizer.encode("Two lines"), {n}, tokenizer.encode("of instruction"), {sep},
              tokenizer.encode("One answer"), {n, n}, tokenizer.encode("with a gap."), {eod}}),
      concat({{sep}, tokenizer.encode("An instruction may be empty."), {eod}}),
  };
  EXPECT_EQ(documents_of(dir / "sft_train"), expected);

  const auto meta = load_dataset_meta(dir / "sft_train");
  ASSERT_TRUE(meta.has_value());
  EXPECT_TRUE(meta->sft);
  EXPECT_EQ(meta->sep_id, sep);
  EXPECT_EQ(meta->newline_id, n);
  EXPECT_EQ(meta->documents, 3);
}

TEST(PrepareSft, JsonlSamplesArePromptSepResponseEod) {
  TempDir dir;
  const Tokenizer tokenizer(train_small_tokenizer(dir));
  write_bytes(dir / "in.jsonl",
              "{\"prompt\": \"What did\\nthe jury say?\", \"response\": \"The jury said Friday.\", \"id\": 3}\n"
              "\n"
              "{\"response\": \"café\\n\", \"prompt\": \"naïve\"}\n");
  prepare_data(sft_options(dir, dir / "in.jsonl", InputFormat::kSftJsonl, tokenizer.path()));
  const int32_t sep = tokenizer.sep_id(), n = tokenizer.newline_id(), eod = tokenizer.eod_id();
  const std::vector<std::vector<int32_t>> expected{
      concat({tokenizer.encode("What did"), {n}, tokenizer.encode("the jury say?"), {sep},
              tokenizer.encode("The jury said Friday."), {eod}}),
      concat({tokenizer.encode("naïve"), {sep}, tokenizer.encode("café"), {n, eod}}),
  };
  EXPECT_EQ(documents_of(dir / "sft_train"), expected);
  const auto meta = load_dataset_meta(dir / "sft_train");
  ASSERT_TRUE(meta.has_value());
  EXPECT_TRUE(meta->sft);
}

TEST(PrepareSft, WithoutANewlinePieceNewlinesAreLeftToSentencePiece) {
  TempDir dir;
  const std::string model = train_small_tokenizer(dir, 400, {kEodPiece, kSepPiece});
  const Tokenizer tokenizer(model);
  ASSERT_EQ(tokenizer.newline_id(), -1);
  write_bytes(dir / "in.txt", "two<n>lines<sep>an answer\n");
  prepare_data(sft_options(dir, dir / "in.txt", InputFormat::kSftText, model));
  EXPECT_EQ(documents_of(dir / "sft_train"),
            (std::vector<std::vector<int32_t>>{concat({tokenizer.encode("two\nlines"), {tokenizer.sep_id()},
                                                       tokenizer.encode("an answer"), {tokenizer.eod_id()}})}));
  EXPECT_EQ(load_dataset_meta(dir / "sft_train")->newline_id, -1);
}

TEST(PrepareSft, TrainsItsTokenizerOnPromptsAndResponses) {
  TempDir dir;
  const auto docs = make_documents(200, 5);
  const auto with_n = [](std::string text) {  // sft-text's spelling of a newline
    for (size_t at = text.find('\n'); at != std::string::npos; at = text.find('\n', at)) text.replace(at, 1, "<n>");
    return text;
  };
  {
    std::ofstream out(dir / "in.txt");
    for (size_t i = 0; i + 1 < docs.size(); i += 2) {
      out << with_n(docs[i]) << "<sep>" << with_n(docs[i + 1]) << "\n";
    }
  }
  PrepareOptions o = sft_options(dir, dir / "in.txt", InputFormat::kSftText, "");
  o.train_vocab_size = 400;
  o.valid_fraction = 0.1;
  const PrepareSummary summary = prepare_data(o);
  EXPECT_EQ(summary.train.documents + summary.valid.documents, 100);
  const Tokenizer tokenizer(dir / "sft.model");
  EXPECT_EQ(tokenizer.sep_id(), 5);
  EXPECT_EQ(tokenizer.newline_id(), 6);
  const auto train = documents_of(dir / "sft_train");
  EXPECT_EQ(train.front(), concat({tokenizer.encode_lines(docs[0]), {tokenizer.sep_id()},
                                   tokenizer.encode_lines(docs[1]), {tokenizer.eod_id()}}));
}

TEST(PrepareSft, BadSamplesAreWarnedAboutAndLeftOut) {
  TempDir dir;
  const Tokenizer tokenizer(train_small_tokenizer(dir));
  write_bytes(dir / "bad.txt",
              "first<sep>kept.\n"
              "no separator here\n"
              "second<sep>kept too.\n"
              "an empty response<sep>\n"
              "two<sep>separators<sep>here\n"
              "\n"
              "blank response<sep>  \n"
              "last<sep>kept.\n");
  CapturedLog log;
  const PrepareSummary summary =
      prepare_data(sft_options(dir, dir / "bad.txt", InputFormat::kSftText, tokenizer.path()));
  const std::string file = dir / "bad.txt";
  EXPECT_EQ(log.warnings(), (std::vector<std::string>{
                                "prepare-data: " + file + ":2: no <sep> between instruction and response; sample left out",
                                "prepare-data: " + file + ":4: empty response; sample left out",
                                "prepare-data: " + file + ":5: more than one <sep>; sample left out",
                                "prepare-data: " + file + ":7: empty response; sample left out",
                                "prepare-data: sft: 4 of 7 samples left out",
                            }));
  EXPECT_EQ(summary.bad_samples, 4);
  EXPECT_EQ(summary.train.documents, 3);
  const int32_t sep = tokenizer.sep_id(), eod = tokenizer.eod_id();
  EXPECT_EQ(documents_of(dir / "sft_train").back(),
            concat({tokenizer.encode("last"), {sep}, tokenizer.encode("kept."), {eod}}));
}

TEST(PrepareSft, BadJsonlSamplesAreWarnedAboutAndLeftOut) {
  TempDir dir;
  const Tokenizer tokenizer(train_small_tokenizer(dir));
  write_bytes(dir / "bad.jsonl",
              "{\"prompt\": \"a\", \"response\": \"kept\"}\n"
              "{\"prompt\": \"a\", \"response\": \"b\"\n"
              "{\"prompt\": \"a\"}\n"
              "{\"prompt\": 5, \"response\": \"b\"}\n"
              "[\"prompt\", \"response\"]\n"
              "{\"prompt\": \"x\", \"response\": \"\"}\n");
  CapturedLog log;
  const PrepareSummary summary =
      prepare_data(sft_options(dir, dir / "bad.jsonl", InputFormat::kSftJsonl, tokenizer.path()));
  const auto warnings = log.warnings();
  ASSERT_EQ(warnings.size(), 6u);
  const std::string at = "prepare-data: " + dir / "bad.jsonl" + ":";
  EXPECT_EQ(warnings[0].rfind(at + "2: invalid JSON (", 0), 0u) << warnings[0];
  EXPECT_EQ(warnings[1], at + "3: no \"response\" field; sample left out");
  EXPECT_EQ(warnings[2], at + "4: \"prompt\" must be a string, got number; sample left out");
  EXPECT_EQ(warnings[3], at + "5: expected a JSON object with \"prompt\" and \"response\" strings; sample left out");
  EXPECT_EQ(warnings[4], at + "6: empty response; sample left out");
  EXPECT_EQ(warnings[5], "prepare-data: sft: 5 of 6 samples left out");
  EXPECT_EQ(summary.bad_samples, 5);
  EXPECT_EQ(summary.train.documents, 1);
}

TEST(PrepareSft, AllSamplesBadIsAnError) {
  TempDir dir;
  const std::string tokenizer = train_small_tokenizer(dir);
  write_bytes(dir / "bad.txt", "no separator\n\nempty<sep>\n");
  expect_error_naming([&] { prepare_data(sft_options(dir, dir / "bad.txt", InputFormat::kSftText, tokenizer)); },
                      "bad.txt: none of the 2 samples is usable");
  EXPECT_FALSE(fs::exists(dir / "sft_train.idx"));
  // Training a tokenizer on them stops first, naming the first bad line.
  PrepareOptions o = sft_options(dir, dir / "bad.txt", InputFormat::kSftText, "");
  o.train_vocab_size = 400;
  expect_error_naming([&] { prepare_data(o); },
                      "none of the 2 samples is usable (the first: " + dir / "bad.txt" + ":1: no <sep>");
}

TEST(PrepareSft, TokenizerWithoutSepIsRefusedNamingIt) {
  TempDir dir;
  const std::string model = train_small_tokenizer(dir, 400, {kEodPiece});
  write_bytes(dir / "in.txt", "question<sep>answer\n");
  for (const InputFormat format : {InputFormat::kSftText, InputFormat::kSftJsonl}) {
    expect_error_naming([&] { prepare_data(sft_options(dir, dir / "in.txt", format, model)); },
                        model + ": tokenizer has no \"<sep>\" piece");
  }
  EXPECT_FALSE(fs::exists(dir / "sft_train.idx"));
  // A plain-text run with the same tokenizer is fine.
  prepare_data(sft_options(dir, dir / "in.txt", InputFormat::kText, model));
  EXPECT_FALSE(load_dataset_meta(dir / "sft_train")->sft);
}

TEST(PrepareSft, FormatsParse) {
  EXPECT_EQ(parse_input_format("sft-text"), InputFormat::kSftText);
  EXPECT_EQ(parse_input_format("sft-jsonl"), InputFormat::kSftJsonl);
  expect_error_naming([] { parse_input_format("sft"); }, "\"sft-text\", \"sft-jsonl\"");
}

}  // namespace
}  // namespace yuanmoe::data
