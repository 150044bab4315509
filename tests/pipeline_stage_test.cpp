// Pipeline stages (Model with a StageSpan and activation slots): a model cut
// into stages and run micro-batch by micro-batch, in an interleaved order,
// gives exactly the whole model's initial weights, losses and gradients.
#include <gtest/gtest.h>

#include <random>

#include "gpu/cpu/cpu_backend.h"
#include "gpu/host_io.h"
#include "gpu/model/model.h"
#include "test_util.h"

namespace troupe {
namespace {

// The tests' tiny MoE (dense and MoE layers, group-limited routing, two
// MTP depths) with a fourth layer, so three stages hold 1, 2 and 1 layers.
ModelConfig StageModelConfig() {
  ModelConfig c = testing::TinyMoeModel();
  c.num_hidden_layers = 4;
  c.init_std = 0.3;
  return c;
}

std::vector<int32_t> Tokens(size_t n, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = static_cast<int32_t>(rng() % vocab);
  return t;
}

std::vector<StageSpan> Spans(std::vector<int> cuts, int layers) {
  std::vector<StageSpan> out;
  cuts.insert(cuts.begin(), 0);
  cuts.push_back(layers);
  for (size_t i = 0; i + 1 < cuts.size(); ++i) out.push_back({cuts[i], cuts[i + 1], i == 0, i + 2 == cuts.size()});
  return out;
}

TEST(PipelineStage, StagesHoldExactlyTheirTensorsWithTheWholeModelsInitialBits) {
  CpuBackend be(1);
  const ModelConfig cfg = StageModelConfig();
  auto whole = Model::Create(be, cfg, DType::kF64, 2, 6);
  ASSERT_TRUE(whole.ok());
  ASSERT_TRUE(InitParams(be, cfg, 7, (*whole)->params()).ok());
  std::map<std::string, std::vector<double>> expected;
  for (ParamRef& r : ListParams((*whole)->params())) expected[r.name] = ToHostDoubles(be, *r.tensor);
  std::map<std::string, int> holders;
  for (const StageSpan& span : Spans({1, 3}, cfg.num_hidden_layers)) {
    auto stage = Model::Create(be, cfg, DType::kF64, 2, 6, span);
    ASSERT_TRUE(stage.ok()) << stage.status().message();
    ASSERT_TRUE(InitParams(be, cfg, 7, (*stage)->params()).ok());
    for (ParamRef& r : ListParams((*stage)->params())) {
      ++holders[r.name];
      EXPECT_EQ(ToHostDoubles(be, *r.tensor), expected.at(r.name)) << r.name;
    }
  }
  // Every tensor lives on one stage, except the embedding: the last stage's
  // MTP modules embed the shifted tokens too.
  EXPECT_EQ(holders.size(), expected.size());
  for (const auto& [name, n] : holders) EXPECT_EQ(n, name == "model.embed_tokens.weight" ? 2 : 1) << name;
}

// With `defer_weights`, each backward queues its matrices' weight gradients
// and they run only after every backward (a zero-bubble pipeline's W).
class MicroBatchedStages : public ::testing::TestWithParam<bool> {};

TEST_P(MicroBatchedStages, GiveTheWholeModelsLossAndGradients) {
  const bool defer_weights = GetParam();
  CpuBackend be(2);
  const ModelConfig cfg = StageModelConfig();
  const int batch = 4, micro = 2, seq = 6, chunks = batch / micro, depth = cfg.num_nextn_predict_layers;
  const LossWeights w{0.3, 0.01};
  auto whole_or = Model::Create(be, cfg, DType::kF64, batch, seq);
  ASSERT_TRUE(whole_or.ok());
  Model& whole = **whole_or;
  ASSERT_TRUE(InitParams(be, cfg, 11, whole.params()).ok());
  const int win = whole.window();
  std::vector<int32_t> tokens = Tokens(static_cast<size_t>(batch) * win, cfg.vocab_size, 5);
  tokens[3] = -1;  // a padded position: its prediction is ignored everywhere
  whole.ZeroGrads();
  auto whole_loss = whole.Forward(tokens.data(), w);
  ASSERT_TRUE(whole_loss.ok());
  whole.Backward();

  // Three stages, each with a slot per micro-batch: every forward first, then
  // the backwards in the opposite micro-batch order (slots must not mix).
  std::vector<std::unique_ptr<Model>> stages;
  for (const StageSpan& span : Spans({1, 3}, cfg.num_hidden_layers)) {
    auto s = Model::Create(be, cfg, DType::kF64, micro, seq, span, chunks);
    ASSERT_TRUE(s.ok());
    ASSERT_TRUE(InitParams(be, cfg, 11, (*s)->params()).ok());
    (*s)->ZeroGrads();
    stages.push_back(std::move(s).value());
  }
  StageLoss sum;
  sum.mtp_sum.assign(depth, 0.0);
  sum.mtp_valid.assign(depth, 0);
  for (int m = 0; m < chunks; ++m) {
    const int32_t* mt = tokens.data() + static_cast<size_t>(m) * micro * win;
    for (size_t s = 0; s < stages.size(); ++s) {
      if (s > 0) {
        std::vector<double> h = ToHostDoubles(be, stages[s - 1]->StageOutput(m));
        FromHostDoubles(be, stages[s]->StageInput(m), h);
      }
      auto l = stages[s]->ForwardStage(m, mt, w);
      ASSERT_TRUE(l.ok()) << l.status().message();
      sum.main_sum += l->main_sum;
      sum.main_valid += l->main_valid;
      sum.balance_sum += l->balance_sum;
      for (size_t k = 0; k < l->mtp_sum.size(); ++k) {
        sum.mtp_sum[k] += l->mtp_sum[k];
        sum.mtp_valid[k] += l->mtp_valid[k];
      }
    }
  }
  LossScale scale;
  scale.main = 1.0 / sum.main_valid;
  for (int k = 0; k < depth; ++k) scale.mtp.push_back(w.mtp_lambda / depth / sum.mtp_valid[k]);
  scale.balance = 1.0 / batch;
  double total = sum.main_sum * scale.main + sum.balance_sum * scale.balance;
  for (int k = 0; k < depth; ++k) total += sum.mtp_sum[k] * scale.mtp[k];
  EXPECT_NEAR(total, whole_loss->total, 1e-12);
  EXPECT_EQ(sum.main_valid, whole_loss->tokens);
  std::vector<WeightGradQueue> deferred(chunks * stages.size());
  for (int m = chunks - 1; m >= 0; --m) {
    for (int s = static_cast<int>(stages.size()) - 1; s >= 0; --s) {
      if (s + 1 < static_cast<int>(stages.size())) {
        std::vector<double> g = ToHostDoubles(be, stages[s + 1]->InputGrad());
        FromHostDoubles(be, stages[s]->OutputGrad(), g);
      }
      stages[s]->BackwardStage(m, scale, defer_weights ? &deferred[m * stages.size() + s] : nullptr);
    }
  }
  if (defer_weights) {
    size_t queued = 0;
    for (WeightGradQueue& q : deferred) {
      queued += q.size();
      q.Run(be);
      EXPECT_TRUE(q.empty());
    }
    EXPECT_GT(queued, 40u);  // every matrix of every layer and head, per micro-batch
  }
  // Gradients: a stage's own tensors match; the embedding's two copies add up.
  std::map<std::string, std::vector<double>> got;
  for (auto& s : stages) {
    for (ParamRef& r : ListParams(s->grads())) {
      std::vector<double> g = ToHostDoubles(be, *r.tensor);
      auto [it, fresh] = got.emplace(r.name, g);
      if (!fresh)
        for (size_t i = 0; i < g.size(); ++i) it->second[i] += g[i];
    }
  }
  int compared = 0;
  for (ParamRef& r : ListParams(whole.grads())) {
    if (!r.trainable) continue;
    std::vector<double> want = ToHostDoubles(be, *r.tensor);
    ASSERT_TRUE(got.count(r.name)) << r.name;
    for (size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(got[r.name][i], want[i], 1e-12) << r.name << "[" << i << "]";
    ++compared;
  }
  EXPECT_GT(compared, 40);
  // Expert loads of the micro-batches add up to the whole batch's.
  std::vector<std::vector<int64_t>> loads = whole.ExpertLoads();
  std::vector<std::vector<int64_t>> staged;
  for (auto& s : stages) {
    std::vector<std::vector<int64_t>> acc;
    for (int m = 0; m < chunks; ++m) {
      auto l = s->ExpertLoads(m);
      if (acc.empty())
        acc = l;
      else
        for (size_t i = 0; i < l.size(); ++i)
          for (size_t e = 0; e < l[i].size(); ++e) acc[i][e] += l[i][e];
    }
    staged.insert(staged.end(), acc.begin(), acc.end());
  }
  EXPECT_EQ(staged, loads);
}

INSTANTIATE_TEST_SUITE_P(PipelineStage, MicroBatchedStages, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "WeightsDeferred" : "WeightsAtOnce"; });

TEST(PipelineStage, RefusesLayersOutsideTheModel) {
  CpuBackend be(1);
  const ModelConfig cfg = StageModelConfig();
  auto bad = Model::Create(be, cfg, DType::kF32, 1, 4, StageSpan{2, 9, false, true});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("not within the 4 layers"), std::string::npos) << bad.status().message();
  EXPECT_FALSE(Model::Create(be, cfg, DType::kF32, 1, 4, StageSpan{}, 0).ok());
}

}  // namespace
}  // namespace troupe
