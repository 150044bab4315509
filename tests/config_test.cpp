// The job configuration: the shipped configs parse and validate, and every
// kind of bad input is refused with a one-line message naming the file and
// the offending key.
#include "configs/config.h"

#include <gtest/gtest.h>

#include <string>

namespace troupe {
namespace {

const std::string kSource = TROUPE_SOURCE_DIR;

// A config that sets only `model_lines` in [model]; every other key keeps its default.
std::string WithModel(const std::string& model_lines) { return "[model]\n" + model_lines + "\n"; }

// Parses `text` (named "bad.toml") and returns the failure message; fails the
// test if the text parsed.
std::string ErrorOf(const std::string& text) {
  auto job = ParseConfigText(text, "bad.toml");
  EXPECT_FALSE(job.ok()) << "parsed but should not have:\n" << text;
  if (job.ok()) return "";
  EXPECT_TRUE(job.status().IsInvalidArgument()) << job.status().message();
  const std::string& msg = job.status().message();
  EXPECT_EQ(msg.rfind("bad.toml", 0), 0u) << "message should start with the file: " << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << "message should be one line: " << msg;
  return msg;
}

#define EXPECT_CONTAINS(haystack, needle) \
  EXPECT_NE((haystack).find(needle), std::string::npos) << "'" << (needle) << "' not in: " << (haystack)

TEST(ConfigTest, TinyParsesAndValidates) {
  const std::string path = kSource + "/configs/tiny.toml";
  auto job = LoadConfigFile(path);
  ASSERT_TRUE(job.ok()) << job.status().message();
  const ModelConfig& m = job->model;
  EXPECT_EQ(m.vocab_size, 2048);
  EXPECT_EQ(m.hidden_size, 128);
  EXPECT_EQ(m.num_hidden_layers, 4);
  EXPECT_EQ(m.first_k_dense_replace, 1);
  EXPECT_EQ(m.n_routed_experts, 8);
  EXPECT_EQ(m.num_experts_per_tok, 2);
  EXPECT_EQ(m.n_group, 4);
  EXPECT_EQ(m.topk_group, 2);
  EXPECT_EQ(m.num_nextn_predict_layers, 1);
  EXPECT_EQ(job->train.seq_len, 64);
  EXPECT_EQ(job->train.steps, 1200);
  EXPECT_DOUBLE_EQ(job->train.lr, 3e-3);
  EXPECT_EQ(job->train.schedule, LrSchedule::kCosine);
  EXPECT_EQ(job->train.eval_every, 100);
  ASSERT_EQ(job->data.train_shards.size(), 1u);
  EXPECT_EQ(job->data.train_shards[0], "data/brown/train_000.bin");
  EXPECT_EQ(job->data.val_shards[0], "data/brown/val_000.bin");
  EXPECT_EQ(job->data.tokenizer, "data/brown/tokenizer.model");
  EXPECT_EQ(job->source_path, path);
  EXPECT_CONTAINS(job->toml_text, "[model]");
  EXPECT_TRUE(ValidateModelConfig(m).ok());
  EXPECT_TRUE(ValidateTrainConfig(job->train).ok());
}

TEST(ConfigTest, Small10mParsesAndValidates) {
  auto job = LoadConfigFile(kSource + "/configs/small10m.toml");
  ASSERT_TRUE(job.ok()) << job.status().message();
  EXPECT_EQ(job->model.hidden_size, 256);
  EXPECT_EQ(job->model.num_hidden_layers, 6);
  EXPECT_EQ(job->model.n_routed_experts, 16);
  EXPECT_EQ(job->model.num_experts_per_tok, 4);
  EXPECT_EQ(job->train.seq_len, 128);
}

TEST(ConfigTest, DefaultsAreValidAndMissingKeysKeepThem) {
  EXPECT_TRUE(ValidateModelConfig(ModelConfig{}).ok());
  EXPECT_TRUE(ValidateTrainConfig(TrainConfig{}).ok());
  auto job = ParseConfigText("[train]\nsteps = 7\nlr = 1  # an integer for a float key is fine\n", "x.toml");
  ASSERT_TRUE(job.ok()) << job.status().message();
  EXPECT_EQ(job->train.steps, 7);
  EXPECT_DOUBLE_EQ(job->train.lr, 1.0);
  EXPECT_EQ(job->train.seq_len, TrainConfig{}.seq_len);
  EXPECT_EQ(job->model.hidden_size, ModelConfig{}.hidden_size);
  EXPECT_EQ(job->data.train_shards, DataConfig{}.train_shards);
  EXPECT_EQ(job->source_path, "x.toml");
}

TEST(ConfigTest, MultistepScheduleAndShardLists) {
  auto job = ParseConfigText(
      "[train]\nschedule = \"multistep\"\n[data]\ntrain_shards = [\"a.bin\", \"b.bin\"]\nval_shards = []\n", "x.toml");
  ASSERT_TRUE(job.ok()) << job.status().message();
  EXPECT_EQ(job->train.schedule, LrSchedule::kMultiStep);
  EXPECT_EQ(job->data.train_shards, (std::vector<std::string>{"a.bin", "b.bin"}));
  EXPECT_TRUE(job->data.val_shards.empty());
}

TEST(ConfigTest, MalformedToml) {
  const std::string msg = ErrorOf("[model]\nhidden_size = = 3\n");
  EXPECT_CONTAINS(msg, "malformed TOML");
  EXPECT_CONTAINS(msg, "bad.toml:2:");  // toml++'s line (and column)
}

TEST(ConfigTest, UnknownKey) {
  const std::string msg = ErrorOf(WithModel("hidden_sise = 128"));
  EXPECT_CONTAINS(msg, "model.hidden_sise");
  EXPECT_CONTAINS(msg, "unknown key");
}

TEST(ConfigTest, UnknownSection) {
  const std::string msg = ErrorOf("[optimizer]\nlr = 1e-3\n");
  EXPECT_CONTAINS(msg, "[optimizer]");
  EXPECT_CONTAINS(msg, "unknown section");
}

TEST(ConfigTest, WrongType) {
  const std::string msg = ErrorOf(WithModel("hidden_size = \"big\""));
  EXPECT_CONTAINS(msg, "model.hidden_size");
  EXPECT_CONTAINS(msg, "expected integer");
  EXPECT_CONTAINS(ErrorOf("[data]\ntrain_shards = [\"a.bin\", 3]\n"), "data.train_shards[1]");
  EXPECT_CONTAINS(ErrorOf("[train]\nlr = \"fast\"\n"), "train.lr");
}

TEST(ConfigTest, IntOverflow) {
  const std::string msg = ErrorOf(WithModel("hidden_size = 3000000000"));
  EXPECT_CONTAINS(msg, "model.hidden_size");
  EXPECT_CONTAINS(msg, "out of range");
}

TEST(ConfigTest, OddRopeHeadDim) {
  const std::string msg = ErrorOf(WithModel("qk_rope_head_dim = 15"));
  EXPECT_CONTAINS(msg, "model.qk_rope_head_dim");
  EXPECT_CONTAINS(msg, "even");
}

TEST(ConfigTest, MoreExpertsPerTokenThanExperts) {
  const std::string msg = ErrorOf(WithModel("n_routed_experts = 8\nnum_experts_per_tok = 9"));
  EXPECT_CONTAINS(msg, "model.num_experts_per_tok");
  EXPECT_CONTAINS(msg, "model.n_routed_experts");
}

TEST(ConfigTest, MoreGroupsPerTokenThanGroups) {
  const std::string msg = ErrorOf(WithModel("n_group = 4\ntopk_group = 5"));
  EXPECT_CONTAINS(msg, "model.topk_group");
  EXPECT_CONTAINS(msg, "model.n_group");
}

TEST(ConfigTest, ExpertsNotDivisibleByGroups) {
  const std::string msg = ErrorOf(WithModel("n_routed_experts = 8\nn_group = 3\ntopk_group = 2"));
  EXPECT_CONTAINS(msg, "model.n_group = 3 does not divide model.n_routed_experts = 8");
}

TEST(ConfigTest, ExpertsPerTokenNotReachableFromAllowedGroups) {
  // 8 experts in 4 groups of 2; a token may use 2 groups = 4 experts, not 5.
  const std::string msg =
      ErrorOf(WithModel("n_routed_experts = 8\nn_group = 4\ntopk_group = 2\nnum_experts_per_tok = 5"));
  EXPECT_CONTAINS(msg, "model.num_experts_per_tok");
  EXPECT_CONTAINS(msg, "model.topk_group");
}

TEST(ConfigTest, ZeroHiddenSize) {
  const std::string msg = ErrorOf(WithModel("hidden_size = 0"));
  EXPECT_CONTAINS(msg, "model.hidden_size");
  EXPECT_CONTAINS(msg, "> 0");
}

TEST(ConfigTest, BadSchedule) {
  const std::string msg = ErrorOf("[train]\nschedule = \"linear\"\n");
  EXPECT_CONTAINS(msg, "train.schedule");
  EXPECT_CONTAINS(msg, "cosine | multistep");
}

TEST(ConfigTest, VocabTooLargeForUint16Shards) { EXPECT_CONTAINS(ErrorOf(WithModel("vocab_size = 65537")), "uint16"); }

TEST(ConfigTest, TrainRanges) {
  EXPECT_CONTAINS(ErrorOf("[train]\nseq_len = 1\n"), "train.seq_len");
  EXPECT_CONTAINS(ErrorOf("[train]\nbeta2 = 1.0\n"), "train.beta2");
  EXPECT_CONTAINS(ErrorOf("[train]\nmin_lr_ratio = 1.5\n"), "train.min_lr_ratio");
  EXPECT_CONTAINS(ErrorOf("[train]\ndevice = \"tpu\"\n"), "train.device");
}

TEST(ConfigTest, MissingFile) {
  const std::string path = kSource + "/configs/does_not_exist.toml";
  auto job = LoadConfigFile(path);
  ASSERT_FALSE(job.ok());
  EXPECT_TRUE(job.status().IsNotFound()) << job.status().message();
  EXPECT_CONTAINS(job.status().message(), path);
}

TEST(ConfigTest, CheckpointSection) {
  auto job = ParseConfigText("[checkpoint]\nevery = 50\nkeep_last = 2\nreplication = 2\nstores = 3\n", "ok.toml");
  ASSERT_TRUE(job.ok()) << job.status().message();
  EXPECT_EQ(job->checkpoint.every, 50);
  EXPECT_EQ(job->checkpoint.keep_last, 2);
  EXPECT_EQ(job->checkpoint.replication, 2);
  EXPECT_EQ(job->checkpoint.stores, 3);
  // replication counts nodes in a cluster, so the file alone cannot be
  // checked against `stores` (troupe train checks: checkpoint_resume_test).
  auto cluster = ParseConfigText("[checkpoint]\nreplication = 2\n", "cluster.toml");
  ASSERT_TRUE(cluster.ok()) << cluster.status().message();
  EXPECT_EQ(EffectiveReplication(cluster->checkpoint, 3), 2);
  EXPECT_EQ(EffectiveReplication(cluster->checkpoint, 1), 1);
  EXPECT_EQ(EffectiveReplication(CheckpointConfig{}, 1), 1);  // auto
  EXPECT_EQ(EffectiveReplication(CheckpointConfig{}, 4), 2);
  std::string msg = ErrorOf("[checkpoint]\nreplication = -1\n");
  EXPECT_CONTAINS(msg, "checkpoint.replication");
  msg = ErrorOf("[checkpoint]\nkeep_last = 0\n");
  EXPECT_CONTAINS(msg, "checkpoint.keep_last = 0");
  msg = ErrorOf("[checkpoint]\nevery = -1\n");
  EXPECT_CONTAINS(msg, "checkpoint.every");
  msg = ErrorOf("[checkpoint]\nevry = 10\n");
  EXPECT_CONTAINS(msg, "unknown key checkpoint.evry");
}

TEST(ConfigTest, ParallelSection) {
  auto job = ParseConfigText(
      "[parallel]\npp = 4\nep = 2\ndp = 0\nschedule = \"dualpipe\"\nmicro_batches = 16\nzero1 = false\n"
      "split_w = false\noverlap_pairs = \"off\"\ndevice_comm = \"host\"\n",
      "ok.toml");
  ASSERT_TRUE(job.ok()) << job.status().message();
  EXPECT_EQ(job->parallel.pp, 4);
  EXPECT_EQ(job->parallel.ep, 2);
  EXPECT_EQ(job->parallel.dp, 0);
  EXPECT_EQ(job->parallel.schedule, "dualpipe");
  EXPECT_EQ(job->parallel.micro_batches, 16);
  EXPECT_FALSE(job->parallel.zero1);
  EXPECT_FALSE(job->parallel.split_w);
  EXPECT_EQ(job->parallel.overlap_pairs, "off");
  EXPECT_EQ(ParallelConfig{}.overlap_pairs, "auto");
  EXPECT_EQ(job->parallel.device_comm, "host");
  EXPECT_EQ(ParallelConfig{}.device_comm, "auto");
  EXPECT_CONTAINS(ErrorOf("[parallel]\ndevice_comm = \"mpi\"\n"), "parallel.device_comm = \"mpi\" is not auto | nccl | host");
  EXPECT_CONTAINS(ErrorOf("[parallel]\npp = 0\n"), "parallel.pp = 0");
  EXPECT_CONTAINS(ErrorOf("[parallel]\ndp = -1\n"), "parallel.dp");
  EXPECT_CONTAINS(ErrorOf("[parallel]\nschedule = \"gpipe\"\n"), "is not a schedule");
  EXPECT_CONTAINS(ErrorOf("[parallel]\nzero1 = 3\n"), "parallel.zero1");
  EXPECT_CONTAINS(ErrorOf("[parallel]\noverlap_pairs = \"yes\"\n"), "parallel.overlap_pairs = \"yes\" is not auto | on | off");
  EXPECT_CONTAINS(ErrorOf("[parallel]\noverlap_pairs = true\n"), "parallel.overlap_pairs");
  EXPECT_CONTAINS(ErrorOf("[parallel]\ntp = 2\n"), "unknown key parallel.tp");
}

}  // namespace
}  // namespace troupe
