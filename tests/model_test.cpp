// Whole-model correctness: finite-difference gradients in double for every
// parameter (main layers, dense and MoE, MTP depths, balance loss), the MLA
// KV cache against the full forward, and export/import bit-exactness.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "gpu/cpu/cpu_backend.h"
#include "gpu/host_io.h"
#include "gpu/model/decode.h"
#include "gpu/model/model.h"
#include "storage/model_weights.h"
#include "test_util.h"

namespace troupe {
namespace {

ModelConfig TinyModel() { return testing::TinyMoeModel(); }

std::vector<int32_t> RandomTokens(size_t n, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = static_cast<int32_t>(rng() % vocab);
  return t;
}

// Norm weights away from 1 and non-zero routing biases, so those paths are tested too.
void PerturbParams(Backend& be, ModelParams& p, uint64_t seed) {
  uint64_t s = seed;
  for (ParamRef& r : ListParams(p)) {
    const bool norm = r.name.find("norm") != std::string::npos;
    const bool bias = r.name.find("e_score_correction_bias") != std::string::npos;
    if (!norm && !bias) continue;
    std::vector<double> v = ToHostDoubles(be, *r.tensor);
    std::vector<double> noise = testing::RandomValues(v.size(), ++s, bias ? 0.3 : 0.2);
    for (size_t i = 0; i < v.size(); ++i) v[i] += noise[i];
    FromHostDoubles(be, *r.tensor, v);
  }
}

TEST(ModelGradient, EveryParameterMatchesFiniteDifferences) {
  CpuBackend be(2);
  const ModelConfig cfg = TinyModel();
  auto model = Model::Create(be, cfg, DType::kF64, /*batch=*/2, /*seq_len=*/5);
  ASSERT_TRUE(model.ok()) << model.status().message();
  Model& m = **model;
  ASSERT_TRUE(InitParams(be, cfg, 7, m.params()).ok());
  PerturbParams(be, m.params(), 100);
  const std::vector<int32_t> tokens = RandomTokens(2 * m.window(), cfg.vocab_size, 3);
  // A large balance weight, so its gradient is far above the check's noise floor.
  const LossWeights w{0.3, 0.05};
  m.ZeroGrads();
  auto loss = m.Forward(tokens.data(), w);
  ASSERT_TRUE(loss.ok());
  EXPECT_GT(loss->balance, 0.0);
  EXPECT_EQ(loss->mtp.size(), 2u);
  m.Backward();
  auto f = [&] { return m.Forward(tokens.data(), w).value().total; };
  std::vector<ParamRef> params = ListParams(m.params());
  std::vector<ParamRef> grads = ListParams(m.grads());
  int checked = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].trainable) continue;
    const double err = testing::GradCheckError(*params[i].tensor, *grads[i].tensor, f, /*max_elements=*/24, /*eps=*/1e-4,
                                                 /*abs_floor=*/1e-6);
    EXPECT_LT(err, 1e-5) << params[i].name;
    ++checked;
  }
  EXPECT_GT(checked, 40);
}

TEST(ModelGradient, RoutingBiasGetsNoGradient) {
  CpuBackend be(1);
  const ModelConfig cfg = TinyModel();
  auto model = Model::Create(be, cfg, DType::kF64, 2, 5);
  ASSERT_TRUE(model.ok());
  Model& m = **model;
  ASSERT_TRUE(InitParams(be, cfg, 7, m.params()).ok());
  const std::vector<int32_t> tokens = RandomTokens(2 * m.window(), cfg.vocab_size, 3);
  m.ZeroGrads();
  ASSERT_TRUE(m.Forward(tokens.data(), LossWeights{}).ok());
  m.Backward();
  for (ParamRef& g : ListParams(m.grads())) {
    if (g.trainable) continue;
    EXPECT_EQ(be.SumSquares(*g.tensor), 0.0) << g.name;
  }
}

TEST(ModelForward, InitialLossIsNearLogVocab) {
  CpuBackend be(2);
  ModelConfig cfg = TinyModel();
  cfg.init_std = 0.02;
  auto model = Model::Create(be, cfg, DType::kF32, 4, 8);
  ASSERT_TRUE(model.ok());
  ASSERT_TRUE(InitParams(be, cfg, 1, (*model)->params()).ok());
  const std::vector<int32_t> tokens = RandomTokens(4 * (*model)->window(), cfg.vocab_size, 9);
  auto loss = (*model)->Forward(tokens.data(), LossWeights{});
  ASSERT_TRUE(loss.ok());
  EXPECT_NEAR(loss->main, std::log(13.0), 0.05);
}

TEST(ModelForward, RejectsTokensOutsideTheVocabulary) {
  CpuBackend be(1);
  const ModelConfig cfg = TinyModel();
  auto model = Model::Create(be, cfg, DType::kF32, 1, 5);
  ASSERT_TRUE(model.ok());
  std::vector<int32_t> tokens(static_cast<size_t>((*model)->window()), 1);
  tokens[3] = cfg.vocab_size;
  auto loss = (*model)->Forward(tokens.data(), LossWeights{});
  ASSERT_FALSE(loss.ok());
  EXPECT_NE(loss.status().message().find("outside the vocabulary"), std::string::npos);
}

TEST(MlaCache, HoldsLatentPlusRopeAndMatchesFullForward) {
  CpuBackend be(2);
  ModelConfig cfg = TinyModel();
  const int t = 9;
  auto model = Model::Create(be, cfg, DType::kF64, 1, t);
  ASSERT_TRUE(model.ok());
  Model& m = **model;
  ASSERT_TRUE(InitParams(be, cfg, 11, m.params()).ok());
  PerturbParams(be, m.params(), 200);
  const std::vector<int32_t> tokens = RandomTokens(m.window(), cfg.vocab_size, 5);
  ASSERT_TRUE(m.Forward(tokens.data(), LossWeights{}, /*with_mtp=*/false).ok());
  const std::vector<double> full = ToHostDoubles(be, m.logits());  // [t, V]
  auto decoder = MlaDecoder::Create(m, t);
  ASSERT_TRUE(decoder.ok()) << decoder.status().message();
  EXPECT_EQ((*decoder)->cache_numbers_per_token(), cfg.kv_lora_rank + cfg.qk_rope_head_dim);
  double worst = 0.0;
  for (int i = 0; i < t; ++i) {
    auto logits = (*decoder)->Step(tokens[i]);
    ASSERT_TRUE(logits.ok());
    for (int v = 0; v < cfg.vocab_size; ++v) worst = std::max(worst, std::abs((*logits)[v] - full[i * cfg.vocab_size + v]));
    // Exactly d_c + d_r numbers per token and main layer, nothing else.
    EXPECT_EQ((*decoder)->cache_numbers(),
              int64_t{i + 1} * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim));
  }
  // Same maths in a different order (absorbed projections), all in double.
  EXPECT_LT(worst, 1e-10);
  EXPECT_FALSE((*decoder)->Step(tokens[0]).ok());  // the cache is full
}

TEST(Weights, ExportImportGivesTheSameBits) {
  CpuBackend be(1);
  const ModelConfig cfg = TinyModel();
  auto a = AllocateParams(be, cfg, DType::kF32);
  auto b = AllocateParams(be, cfg, DType::kF32);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(InitParams(be, cfg, 5, *a).ok());
  PerturbParams(be, *a, 300);
  const auto dir = std::filesystem::temp_directory_path() / "troupe_weights_test";
  std::filesystem::create_directories(dir);
  const std::string p1 = (dir / "a.safetensors").string(), p2 = (dir / "b.safetensors").string();
  ASSERT_TRUE(ExportWeights(be, cfg, *a, p1).ok());
  Status st = ImportWeights(be, cfg, p1, *b);
  ASSERT_TRUE(st.ok()) << st.message();
  std::vector<ParamRef> ra = ListParams(*a), rb = ListParams(*b);
  for (size_t i = 0; i < ra.size(); ++i) {
    ASSERT_EQ(0, std::memcmp(ra[i].tensor->raw(), rb[i].tensor->raw(), ra[i].tensor->bytes())) << ra[i].name;
  }
  ASSERT_TRUE(ExportWeights(be, cfg, *b, p2).ok());
  auto bytes = [](const std::string& p) {
    std::ifstream f(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), {});
  };
  EXPECT_EQ(bytes(p1), bytes(p2));
  std::filesystem::remove_all(dir);
}

TEST(Weights, ImportRejectsAnotherConfigsFile) {
  CpuBackend be(1);
  ModelConfig cfg = TinyModel();
  auto a = AllocateParams(be, cfg, DType::kF32);
  ASSERT_TRUE(a.ok());
  const auto path = (std::filesystem::temp_directory_path() / "troupe_weights_other.safetensors").string();
  ASSERT_TRUE(ExportWeights(be, cfg, *a, path).ok());
  ModelConfig other = cfg;
  other.hidden_size = 16;
  auto b = AllocateParams(be, other, DType::kF32);
  ASSERT_TRUE(b.ok());
  Status st = ImportWeights(be, other, path, *b);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("model.embed_tokens.weight"), std::string::npos) << st.message();
  other = cfg;
  other.n_routed_experts = 8;
  auto c = AllocateParams(be, other, DType::kF32);
  ASSERT_TRUE(c.ok());
  st = ImportWeights(be, other, path, *c);
  EXPECT_FALSE(st.ok());
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace troupe
