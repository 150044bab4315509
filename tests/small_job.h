// The small CPU training job that trainer and checkpoint tests share: a
// 2-layer MoE model (one dense, one MoE layer, MTP depth 1) small enough to
// train in milliseconds, on synthetic token shards written into `dir`.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "configs/config.h"
#include "data/shards.h"

namespace troupe::testing {

// A shard of `n` tokens: a repeating pattern plus noise, so there is something to learn.
inline std::string WriteTokens(const std::filesystem::path& dir, const std::string& name, int n, int vocab,
                               uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int> t(n);
  for (int i = 0; i < n; ++i) t[i] = (rng() % 4 == 0) ? static_cast<int>(rng() % vocab) : (i * 7) % vocab;
  const std::string path = (dir / name).string();
  EXPECT_TRUE(data::WriteShard(path, t).ok());
  return path;
}

inline JobConfig SmallJob(const std::filesystem::path& dir, int train_tokens = 4000) {
  JobConfig j;
  ModelConfig& m = j.model;
  m.vocab_size = 32;
  m.hidden_size = 16;
  m.num_hidden_layers = 2;
  m.first_k_dense_replace = 1;
  m.num_attention_heads = 2;
  m.q_lora_rank = 8;
  m.kv_lora_rank = 8;
  m.qk_nope_head_dim = 4;
  m.qk_rope_head_dim = 4;
  m.v_head_dim = 4;
  m.intermediate_size = 24;
  m.moe_intermediate_size = 8;
  m.n_routed_experts = 4;
  m.num_experts_per_tok = 2;
  m.n_group = 2;
  m.topk_group = 1;
  m.num_nextn_predict_layers = 1;
  TrainConfig& t = j.train;
  t.seq_len = 16;
  t.batch_size = 4;
  t.steps = 40;
  t.lr = 1e-2;
  t.warmup_steps = 5;
  t.eval_batches = 2;
  j.data.train_shards = {WriteTokens(dir, "train.bin", train_tokens, m.vocab_size, 1)};
  j.data.val_shards = {WriteTokens(dir, "val.bin", 600, m.vocab_size, 2)};
  return j;
}

// SmallJob with 4 layers and 16 sequences per step: enough layers for 4
// pipeline stages and a batch that splits over pp x ep x dp layouts.
inline JobConfig SmallPipelineJob(const std::filesystem::path& dir) {
  JobConfig j = SmallJob(dir, 20000);
  j.model.num_hidden_layers = 4;
  j.train.batch_size = 16;
  j.train.steps = 3;
  j.train.warmup_steps = 1;
  return j;
}

}  // namespace troupe::testing
