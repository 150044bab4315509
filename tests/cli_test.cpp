// cli/: the real `troupe` binary, run as a child process on hostile inputs.
//
// The product's rule for anything from outside (configs, flags, files): one
// line "troupe: error: ..." on stderr that names the problem, a non-zero exit
// (not a signal), and nothing already written lost or half-written. Every
// test writes a tiny model config and random token shards into a fresh
// folder, so each run of the binary takes a few milliseconds.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "data/shards.h"
#include "storage/safetensors.h"
#include "train/checkpointer.h"

namespace troupe {
namespace {

namespace fs = std::filesystem;

constexpr int kVocab = 64;

struct RunResult {
  bool exited = false;  // false: killed by a signal (a crash)
  int code = -1;        // exit status when exited
  int signal = 0;
  std::string out, err;
};

std::string ReadText(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteText(const fs::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << text;
  ASSERT_TRUE(out.good()) << p;
}

// The base config: a ~10k-parameter MoE with MTP; ("section.key", value) in file order.
const std::vector<std::pair<std::string, std::string>> kBaseConfig = {
    {"model.vocab_size", "64"},
    {"model.hidden_size", "16"},
    {"model.num_hidden_layers", "2"},
    {"model.first_k_dense_replace", "1"},
    {"model.num_attention_heads", "2"},
    {"model.q_lora_rank", "8"},
    {"model.kv_lora_rank", "8"},
    {"model.qk_nope_head_dim", "4"},
    {"model.qk_rope_head_dim", "4"},
    {"model.v_head_dim", "4"},
    {"model.intermediate_size", "32"},
    {"model.moe_intermediate_size", "8"},
    {"model.n_routed_experts", "4"},
    {"model.n_shared_experts", "1"},
    {"model.num_experts_per_tok", "2"},
    {"model.n_group", "2"},
    {"model.topk_group", "1"},
    {"model.num_nextn_predict_layers", "1"},
    {"train.seq_len", "8"},
    {"train.batch_size", "2"},
    {"train.steps", "3"},
    {"train.eval_every", "0"},
    {"train.eval_batches", "1"},
    {"train.log_every", "1"},
    {"train.threads", "1"},
    {"data.train_shards", "[\"train.bin\"]"},
    {"data.val_shards", "[\"val.bin\"]"},
};

// TOML for kBaseConfig with `overrides` ("model.key" -> value) applied; an
// override for a key the base lacks is appended to its section.
std::string ConfigText(const std::map<std::string, std::string>& overrides = {}) {
  std::map<std::string, std::string> extra = overrides;
  std::string text, section;
  auto flush_extra = [&](const std::string& sec) {
    for (auto it = extra.begin(); it != extra.end();) {
      if (it->first.rfind(sec + ".", 0) == 0) {
        text += it->first.substr(sec.size() + 1) + " = " + it->second + "\n";
        it = extra.erase(it);
      } else {
        ++it;
      }
    }
  };
  for (const auto& [full, value] : kBaseConfig) {
    const std::string sec = full.substr(0, full.find('.'));
    if (sec != section) {
      if (!section.empty()) flush_extra(section);
      section = sec;
      text += "[" + sec + "]\n";
    }
    auto it = extra.find(full);
    text += full.substr(sec.size() + 1) + " = " + (it == extra.end() ? value : it->second) + "\n";
    if (it != extra.end()) extra.erase(it);
  }
  flush_extra(section);
  return text;
}

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/troupe_cli_test_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    WriteConfig("cfg.toml");
    WriteRandomShard("train.bin", 400, 1);
    WriteRandomShard("val.bin", 100, 2);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  fs::path Path(const std::string& name) const { return dir_ / name; }

  void WriteConfig(const std::string& name, const std::map<std::string, std::string>& overrides = {}) {
    WriteText(Path(name), ConfigText(overrides));
  }

  void WriteRandomShard(const std::string& name, int n, unsigned seed) {
    std::mt19937 rng(seed);
    std::vector<int> tokens(n);
    for (int& t : tokens) t = static_cast<int>(rng() % kVocab);
    ASSERT_TRUE(data::WriteShard(Path(name).string(), tokens).ok());
  }

  // Runs the binary in the temp folder with `args`, capturing stdout, stderr
  // and how it ended.
  RunResult Run(const std::vector<std::string>& args) const {
    const fs::path out = Path(".stdout"), err = Path(".stderr");
    const pid_t pid = fork();
    if (pid == 0) {
      if (chdir(dir_.c_str()) != 0) _exit(127);
      const int o = open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      const int e = open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (o < 0 || e < 0 || dup2(o, 1) < 0 || dup2(e, 2) < 0) _exit(127);
      std::vector<char*> argv;
      std::string bin = TROUPE_BINARY;
      argv.push_back(bin.data());
      std::vector<std::string> copy = args;
      for (std::string& a : copy) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(bin.c_str(), argv.data());
      _exit(127);
    }
    RunResult r;
    int status = 0;
    EXPECT_GT(pid, 0);
    EXPECT_EQ(waitpid(pid, &status, 0), pid);
    r.exited = WIFEXITED(status);
    if (r.exited) r.code = WEXITSTATUS(status);
    if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
    r.out = ReadText(out);
    r.err = ReadText(err);
    fs::remove(out);
    fs::remove(err);
    return r;
  }

  // Exports the seed's weights for `config` to `out`.
  void Export(const std::string& config, const std::string& out) {
    const RunResult r = Run({"export", "--config", config, "--out", out});
    ASSERT_TRUE(r.exited && r.code == 0) << r.err;
  }

  fs::path dir_;
};

std::string Describe(const std::vector<std::string>& args, const RunResult& r) {
  std::string cmd = "troupe";
  for (const auto& a : args) cmd += " " + a;
  return cmd + "\n  exited=" + std::to_string(r.exited) + " code=" + std::to_string(r.code) +
         " signal=" + std::to_string(r.signal) + "\n  stderr: " + r.err + "  stdout: " + r.out;
}

// The rule: a clean non-zero exit and exactly one stderr line, starting
// "troupe: error:", that contains every one of `needles`.
void ExpectOneError(const std::vector<std::string>& args, const RunResult& r, const std::vector<std::string>& needles) {
  SCOPED_TRACE(Describe(args, r));
  ASSERT_TRUE(r.exited) << "killed by signal " << r.signal;
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.code, 127) << "exec failed";
  std::vector<std::string> lines;
  std::istringstream in(r.err);
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) lines.push_back(line);
  ASSERT_EQ(lines.size(), 1u) << "want exactly one error line";
  EXPECT_EQ(lines[0].rfind("troupe: error: ", 0), 0u) << lines[0];
  for (const std::string& n : needles) EXPECT_NE(lines[0].find(n), std::string::npos) << "missing '" << n << "'";
}

#define EXPECT_FAILS(args, ...)                 \
  do {                                          \
    const std::vector<std::string> a_ = args;   \
    ExpectOneError(a_, Run(a_), {__VA_ARGS__}); \
  } while (0)

using Args = std::vector<std::string>;

// ---- configs ----

TEST_F(CliTest, BadConfigsAreOneErrorNamingTheKey) {
  struct Case {
    std::string text;  // whole file, or empty: ConfigText(overrides)
    std::map<std::string, std::string> overrides;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {"[model\nvocab_size = 64\n", {}, {"bad.toml", "TOML"}},
      {"", {{"model.n_groupz", "2"}}, {"n_groupz"}},
      {"", {{"model.hidden_size", "\"16\""}}, {"hidden_size", "string"}},
      {"", {{"model.qk_rope_head_dim", "3"}}, {"qk_rope_head_dim", "3"}},
      {"", {{"model.num_experts_per_tok", "5"}}, {"num_experts_per_tok", "n_routed_experts"}},
      {"", {{"model.topk_group", "3"}}, {"topk_group", "n_group"}},
      {"", {{"model.n_routed_experts", "5"}}, {"n_group", "n_routed_experts = 5"}},
      {"", {{"train.batch_size", "0"}}, {"batch_size"}},
  };
  // Every command loads configs through one function: export sees every
  // case, train (which also must not make its output folder) a few.
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    WriteText(Path("bad.toml"), c.text.empty() ? ConfigText(c.overrides) : c.text);
    EXPECT_FAILS((Args{"export", "--config", "bad.toml", "--out", "w.safetensors"}), c.needles);
    if (i % 3 == 0) EXPECT_FAILS((Args{"train", "--config", "bad.toml", "--out", "run"}), c.needles);
    EXPECT_FALSE(fs::exists(Path("w.safetensors")));
    EXPECT_FALSE(fs::exists(Path("run")));
  }
  EXPECT_FAILS((Args{"export", "--config", "nope.toml", "--out", "w.safetensors"}), "nope.toml");
  EXPECT_FAILS((Args{"train", "--config", ".", "--out", "run"}), ".");
}

// ---- token shards ----

TEST_F(CliTest, BadTrainShardsAreOneErrorNamingTheFile) {
  // Truncated: the header promises 400 tokens, the body holds 38.
  std::string train = ReadText(Path("train.bin"));
  WriteText(Path("trunc.bin"), train.substr(0, 1100));
  // Wrong magic.
  std::string magic = train;
  magic[0] = 1;
  WriteText(Path("magic.bin"), magic);
  // Token 64 (== vocab_size) at position 10.
  std::string big = train;
  big[1024 + 20] = kVocab;
  big[1024 + 21] = 0;
  WriteText(Path("big.bin"), big);
  WriteRandomShard("short.bin", 3, 3);
  Export("cfg.toml", "w.safetensors");

  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"missing.bin", {"missing.bin"}},      {"trunc.bin", {"trunc.bin", "truncated"}},
      {"magic.bin", {"magic.bin", "magic"}}, {"big.bin", {"big.bin", "64", "vocab_size"}},
      {"short.bin", {"3 tokens"}},
  };
  for (const auto& [shard, needles] : cases) {
    WriteConfig("bad.toml", {{"data.train_shards", "[\"" + shard + "\"]"}});
    EXPECT_FAILS((Args{"train", "--config", "bad.toml", "--out", "run"}), needles);
    EXPECT_FALSE(fs::exists(Path("run/model.safetensors")));
    // eval reads the same shards through --tokens.
    if (shard == "missing.bin") continue;
    std::vector<std::string> eval_needles = needles;
    eval_needles.push_back(shard);
    EXPECT_FAILS((Args{"eval", "--config", "cfg.toml", "--weights", "w.safetensors", "--tokens", shard}), eval_needles);
  }
}

// ---- weights ----

TEST_F(CliTest, BadWeightsAreOneErrorNamingTheFile) {
  Export("cfg.toml", "w.safetensors");
  const std::string good = ReadText(Path("w.safetensors"));
  WriteText(Path("trunc.safetensors"), good.substr(0, good.size() / 2));
  WriteText(Path("tiny.safetensors"), good.substr(0, 5));
  // Mislabelled: the first tensor claims F16 but holds F32-sized data.
  std::string f16 = good;
  const size_t at = f16.find("\"F32\"");
  ASSERT_NE(at, std::string::npos);
  f16.replace(at, 5, "\"F16\"");
  WriteText(Path("f16.safetensors"), f16);
  // Same bytes, transposed shape: consistent on disk, wrong for the model.
  std::string shape = good;
  const size_t s = shape.find("[64,16]");
  ASSERT_NE(s, std::string::npos);
  shape.replace(s, 7, "[16,64]");
  WriteText(Path("shape.safetensors"), shape);
  // Weights of a wider model.
  WriteConfig("wide.toml", {{"model.hidden_size", "32"}});
  Export("wide.toml", "wide.safetensors");

  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"none.safetensors", {"none.safetensors"}},
      {"trunc.safetensors", {"trunc.safetensors"}},
      {"tiny.safetensors", {"tiny.safetensors"}},
      {"f16.safetensors", {"f16.safetensors", "F16"}},
      {"shape.safetensors", {"shape.safetensors", "[16, 64]"}},
      {"wide.safetensors", {"wide.safetensors", "[64, 32]", "[64, 16]"}},
      {".", {"."}},
  };
  for (const auto& [w, needles] : cases) {
    EXPECT_FAILS((Args{"eval", "--config", "cfg.toml", "--weights", w, "--tokens", "val.bin"}), needles);
    // train --weights and export --from share eval's import path: two cases each.
    if (w != "f16.safetensors" && w != "wide.safetensors") continue;
    EXPECT_FAILS((Args{"train", "--config", "cfg.toml", "--weights", w, "--out", "run"}), needles);
    EXPECT_FAILS((Args{"export", "--config", "cfg.toml", "--from", w, "--out", "re.safetensors"}), needles);
    EXPECT_FALSE(fs::exists(Path("run")));  // refused before the output folder is made
    EXPECT_FALSE(fs::exists(Path("re.safetensors")));
  }
}

// ---- flags ----

TEST_F(CliTest, BadParallelAndScheduleInputsAreOneError) {
  EXPECT_FAILS((Args{"train", "--config", "cfg.toml", "--pp", "0"}), "--pp");
  EXPECT_FAILS((Args{"train", "--config", "cfg.toml", "--ep", "x"}), "--ep");
  EXPECT_FAILS((Args{"train", "--config", "cfg.toml", "--micro-batches", "-1"}), "--micro-batches");
  EXPECT_FAILS((Args{"train", "--config", "cfg.toml", "--pp", "2", "--schedule", "gpipe"}), "gpipe", "schedule");
  EXPECT_FAILS((Args{"train", "--config", "cfg.toml", "--pp", "2", "--resume", "latest"}), "--resume");
  EXPECT_FAILS((Args{"rank", "--config", "cfg.toml", "--rank", "5", "--world", "2", "--run-dir", "d"}), "--rank 5",
               "--world 2");
  EXPECT_FAILS((Args{"train", "--config", "cfg.toml", "--pp", "2", "--device", "cpu", "--kernel-timeline"}),
               "--kernel-timeline", "cpu");
  EXPECT_FAILS((Args{"train", "--config", "cfg.toml", "--kernel-timeline"}), "--kernel-timeline", "distributed");
  EXPECT_FAILS((Args{"schedule", "--kind", "nope", "--pp", "2", "--micro", "4"}), "--kind", "nope");
  EXPECT_FAILS((Args{"schedule", "--kind", "dualpipe", "--pp", "3", "--micro", "6"}), "even");
  EXPECT_FAILS((Args{"schedule", "--kind", "1f1b", "--pp", "0", "--micro", "4"}), "--pp");
  EXPECT_FAILS((Args{"schedule", "--kind", "1f1b", "--pp", "2", "--micro", "4", "--w", "3", "--b", "2"}), "W (3)",
               "B (2)");
  EXPECT_FAILS((Args{"schedule", "--kind", "1f1b", "--pp", "2", "--micro", "4", "--json", "no/such/dir/s.json"}),
               "s.json");
  EXPECT_FALSE(fs::exists(Path("runs")));
}

TEST_F(CliTest, BadFlagsAreOneError) {
  Export("cfg.toml", "w.safetensors");
  EXPECT_FAILS((Args{"train", "--config", "cfg.toml", "--bogus", "1"}), "--bogus");
  EXPECT_FAILS((Args{"eval", "--config", "cfg.toml", "--weights", "w.safetensors"}), "--tokens");
  EXPECT_FAILS((Args{"export", "--out", "x.safetensors"}), "--config");
  EXPECT_FAILS((Args{"train", "--config", "cfg.toml", "--device", "gpu", "--out", "run"}), "--device", "gpu");
  EXPECT_FAILS((Args{"train", "--config", "cfg.toml", "--steps", "-1"}), "--steps", "-1");
  EXPECT_FAILS((Args{"train", "--config", "cfg.toml", "--steps", "abc"}), "--steps", "abc");
  EXPECT_FAILS((Args{"train", "--config", "cfg.toml", "--threads", "-2"}), "--threads");
  EXPECT_FAILS(
      (Args{"eval", "--config", "cfg.toml", "--weights", "w.safetensors", "--tokens", "val.bin", "--batches", "0"}),
      "--batches");
  EXPECT_FAILS((Args{"frobnicate"}), "frobnicate");
  EXPECT_FAILS((Args{}), "command");
  EXPECT_FALSE(fs::exists(Path("run")));
  // --help is not an error.
  const RunResult help = Run({"train", "--help"});
  EXPECT_TRUE(help.exited && help.code == 0) << help.err;
  EXPECT_NE(help.out.find("--steps"), std::string::npos);
}

// ---- nothing written half ----

TEST_F(CliTest, FailedExportLeavesTheOldFileAlone) {
  Export("cfg.toml", "w.safetensors");
  const std::string before = ReadText(Path("w.safetensors"));
  ASSERT_GT(before.size(), 1000u);
  WriteConfig("bad.toml", {{"model.topk_group", "3"}});
  EXPECT_FAILS((Args{"export", "--config", "bad.toml", "--out", "w.safetensors"}), "topk_group");
  // A wider model's weights cannot be re-exported under this config either.
  WriteConfig("wide.toml", {{"model.hidden_size", "32"}});
  Export("wide.toml", "wide.safetensors");
  EXPECT_FAILS((Args{"export", "--config", "cfg.toml", "--from", "wide.safetensors", "--out", "w.safetensors"}),
               "wide.safetensors");
  EXPECT_EQ(ReadText(Path("w.safetensors")), before);
  EXPECT_FALSE(fs::exists(Path("w.safetensors.tmp")));
  // An unwritable --out: one error, no stray file.
  EXPECT_FAILS((Args{"export", "--config", "cfg.toml", "--out", "nodir/w.safetensors"}), "nodir/w.safetensors");
  EXPECT_FALSE(fs::exists(Path("nodir")));
}

TEST_F(CliTest, TrainWritesWholeWeightsAndNoTempFiles) {
  const RunResult r = Run({"train", "--config", "cfg.toml", "--out", "run"});
  ASSERT_TRUE(r.exited && r.code == 0) << r.err;
  EXPECT_EQ(r.err, "");
  auto st = ReadSafetensors(Path("run/model.safetensors").string());
  ASSERT_TRUE(st.ok()) << st.status().message();
  EXPECT_NE(st->Find("model.embed_tokens.weight"), nullptr);
  EXPECT_EQ(st->metadata().at("step"), "3");
  for (const auto& e : fs::recursive_directory_iterator(dir_)) EXPECT_NE(e.path().extension(), ".tmp") << e.path();
  // The written weights load back: eval accepts them and train resumes from them.
  const RunResult ev =
      Run({"eval", "--config", "cfg.toml", "--weights", "run/model.safetensors", "--tokens", "val.bin"});
  EXPECT_TRUE(ev.exited && ev.code == 0) << ev.err;
}

TEST_F(CliTest, TrainRefusesABadOutFolderBeforeTraining) {
  WriteText(Path("afile"), "keep me");
  const Args args = {"train", "--config", "cfg.toml", "--out", "afile"};
  const RunResult r = Run(args);
  ExpectOneError(args, r, {"afile"});
  EXPECT_EQ(r.out.find("step "), std::string::npos) << "trained before checking --out:\n" << r.out;
  EXPECT_EQ(ReadText(Path("afile")), "keep me");
}

// ---- data ----

TEST_F(CliTest, DataCommandsFailWithOneError) {
  WriteText(Path("text.txt"), "one sentence .\n");
  EXPECT_FAILS((Args{"data", "encode", "--tokenizer", "none.model", "--in", "text.txt", "--out", "e.bin"}),
               "none.model");
  EXPECT_FAILS((Args{"data", "encode", "--tokenizer", "cfg.toml", "--in", "text.txt", "--out", "e.bin"}), "cfg.toml");
  EXPECT_FAILS((Args{"data", "brown", "--out", "brown", "--corpus", "nocorpus"}), "nocorpus");
  EXPECT_FAILS((Args{"data", "brown", "--out", "brown", "--vocab-size", "10"}), "--vocab-size");
  EXPECT_FALSE(fs::exists(Path("e.bin")));
  EXPECT_FALSE(fs::exists(Path("brown")));
}

// ---- happy paths ----

TEST_F(CliTest, ExportThenEvalGivesAboutLnVocab) {
  Export("cfg.toml", "w.safetensors");
  const RunResult r =
      Run({"eval", "--config", "cfg.toml", "--weights", "w.safetensors", "--tokens", "val.bin", "--batches", "2"});
  ASSERT_TRUE(r.exited && r.code == 0) << r.err;
  EXPECT_EQ(r.err, "");
  double loss = NAN;
  ASSERT_EQ(std::sscanf(r.out.c_str(), "loss %lf", &loss), 1) << r.out;
  EXPECT_TRUE(std::isfinite(loss));
  EXPECT_NEAR(loss, std::log(static_cast<double>(kVocab)), 0.3) << r.out;
  // Re-exporting gives the same bits.
  const RunResult re = Run({"export", "--config", "cfg.toml", "--from", "w.safetensors", "--out", "w2.safetensors"});
  ASSERT_TRUE(re.exited && re.code == 0) << re.err;
  EXPECT_EQ(ReadText(Path("w2.safetensors")), ReadText(Path("w.safetensors")));
}

TEST_F(CliTest, TrainThreeStepsPrintsValLoss) {
  const RunResult r = Run({"train", "--config", "cfg.toml", "--steps", "3", "--out", "run"});
  ASSERT_TRUE(r.exited && r.code == 0) << r.err;
  const size_t at = r.out.find("val_loss ");
  ASSERT_NE(at, std::string::npos) << r.out;
  const double v = std::atof(r.out.c_str() + at + 9);
  EXPECT_TRUE(std::isfinite(v) && v > 0) << r.out;
  EXPECT_NE(r.out.find("step     3/3"), std::string::npos) << r.out;
}

// ---- checkpoints ----

TEST_F(CliTest, CheckpointsSaveResumeAndBrowse) {
  RunResult r = Run({"train", "--config", "cfg.toml", "--steps", "4", "--checkpoint-every", "2", "--out", "run"});
  ASSERT_TRUE(r.exited && r.code == 0) << r.err;
  EXPECT_NE(r.out.find("checkpoint ckpt-000001 committed: step 2"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("checkpoint ckpt-000002 committed: step 4"), std::string::npos) << r.out;
  r = Run({"ckpt", "--dir", "run/checkpoints", "ls"});
  ASSERT_TRUE(r.exited && r.code == 0) << r.err;
  EXPECT_NE(r.out.find("ckpt-000002"), std::string::npos) << r.out;
  r = Run({"ckpt", "--dir", "run/checkpoints", "verify", "ckpt-000002"});
  ASSERT_TRUE(r.exited && r.code == 0) << r.err;
  // Resuming from step 2 ends where the uninterrupted run ended: the same weights.
  r = Run({"train", "--config", "cfg.toml", "--steps", "4", "--checkpoint-dir", "run/checkpoints", "--resume",
           "ckpt-000001", "--out", "resumed"});
  ASSERT_TRUE(r.exited && r.code == 0) << r.err;
  EXPECT_NE(r.out.find("resumed from ckpt-000001: step 2"), std::string::npos) << r.out;
  EXPECT_EQ(ReadText(Path("resumed/model.safetensors")), ReadText(Path("run/model.safetensors")));
  r = Run({"ckpt", "--dir", "run/checkpoints", "export", "ckpt-000002", "--out", "c.safetensors"});
  ASSERT_TRUE(r.exited && r.code == 0) << r.err;
  // The checkpoint's export holds the same tensors, bit for bit, as the run's own at that step.
  auto exported = ReadSafetensors(Path("c.safetensors").string());
  auto trained = ReadSafetensors(Path("run/model.safetensors").string());
  ASSERT_TRUE(exported.ok() && trained.ok());
  ASSERT_EQ(exported->tensors().size(), trained->tensors().size());
  for (const SafeTensor& t : trained->tensors()) {
    const SafeTensor* e = exported->Find(t.name);
    ASSERT_NE(e, nullptr) << t.name;
    EXPECT_EQ(e->bytes, t.bytes) << t.name;
  }
  EXPECT_EQ(exported->metadata().at("checkpoint"), "ckpt-000002");
}

// Browsing opens the folder read-only: it works while the run (or the
// coordinator) that writes it holds it; changes do not, and say why. Stores
// kept elsewhere (a cluster node's) are read with --store ID=DIR.
TEST_F(CliTest, CkptBrowsesBesideTheWriterAndReadsStoresKeptElsewhere) {
  RunResult r = Run({"train", "--config", "cfg.toml", "--steps", "2", "--checkpoint-every", "2", "--out", "run"});
  ASSERT_TRUE(r.exited && r.code == 0) << r.err;
  {
    auto held = OpenCheckpointFolder(Path("run/checkpoints").string());  // as a live run holds it
    ASSERT_TRUE(held.ok()) << held.status().message();
    r = Run({"ckpt", "--dir", "run/checkpoints", "ls"});
    ASSERT_TRUE(r.exited && r.code == 0) << r.err;
    EXPECT_NE(r.out.find("ckpt-000001"), std::string::npos) << r.out;
    r = Run({"ckpt", "--dir", "run/checkpoints", "verify", "ckpt-000001"});
    ASSERT_TRUE(r.exited && r.code == 0) << r.err;
    EXPECT_FAILS(Args({"ckpt", "--dir", "run/checkpoints", "pin", "ckpt-000001"}), "needs the folder to itself");
  }
  fs::create_directories(Path("node"));
  fs::rename(Path("run/checkpoints/store-0"), Path("node/store"));
  r = Run({"ckpt", "--dir", "run/checkpoints", "verify", "ckpt-000001"});
  EXPECT_FALSE(r.exited && r.code == 0);
  EXPECT_NE(r.out.find("--store local-0=DIR"), std::string::npos) << r.out;
  r = Run({"ckpt", "--dir", "run/checkpoints", "verify", "ckpt-000001", "--store", "local-0=" + Path("node").string()});
  ASSERT_TRUE(r.exited && r.code == 0) << r.err << r.out;
  r = Run({"ckpt", "--dir", "run/checkpoints", "export", "ckpt-000001", "--out", "e.safetensors", "--store",
           "local-0=" + Path("node/store").string()});
  ASSERT_TRUE(r.exited && r.code == 0) << r.err;
  EXPECT_TRUE(fs::exists(Path("e.safetensors")));
  EXPECT_FAILS(Args({"ckpt", "--dir", "run/checkpoints", "ls", "--store", "local-0"}), "ID=DIR");
  EXPECT_FAILS(Args({"ckpt", "--dir", "run/checkpoints", "ls", "--store", "n1=nowhere"}), "nowhere");
  EXPECT_FAILS(Args({"ckpt", "--dir", "run/checkpoints", "rm", "ckpt-000001", "--store", "local-0=node"}),
               "--store is for reading");
}

TEST_F(CliTest, BadCheckpointInputsAreOneError) {
  RunResult r = Run({"train", "--config", "cfg.toml", "--steps", "2", "--checkpoint-every", "1", "--out", "run"});
  ASSERT_TRUE(r.exited && r.code == 0) << r.err;
  EXPECT_FAILS(Args({"train", "--config", "cfg.toml", "--checkpoint-every", "-1"}), "--checkpoint-every");
  EXPECT_FAILS(
      Args({"train", "--config", "cfg.toml", "--checkpoint-dir", "run/checkpoints", "--resume", "ckpt-000009"}),
      "ckpt-000009");
  EXPECT_FAILS(Args({"train", "--config", "cfg.toml", "--checkpoint-dir", "run/checkpoints", "--resume", "nonsense"}),
               "nonsense");
  EXPECT_FAILS(Args({"ckpt", "--dir", "nowhere", "ls"}), "nowhere");
  EXPECT_FAILS(Args({"ckpt", "--dir", "run/checkpoints", "show", "ckpt-000009"}), "ckpt-000009");
  EXPECT_FAILS(Args({"ckpt", "--dir", "run/checkpoints", "stats", "ckpt-000001", "no.such.tensor"}), "no.such.tensor");
  EXPECT_FAILS(Args({"ckpt", "--dir", "run/checkpoints", "diff", "ckpt-000001"}), "diff");
  EXPECT_FAILS(Args({"ckpt", "--dir", "run/checkpoints", "export", "ckpt-000001"}), "--out");
  EXPECT_FAILS(Args({"ckpt", "--dir", "run/checkpoints", "frobnicate"}), "frobnicate");
  // A model of another shape cannot take this checkpoint; nothing is trained or written.
  WriteConfig("wide.toml", {{"model.hidden_size", "24"}});
  EXPECT_FAILS(Args({"train", "--config", "wide.toml", "--checkpoint-dir", "run/checkpoints", "--resume", "latest",
                     "--out", "wide"}),
               "ckpt-000002");
  EXPECT_FALSE(fs::exists(Path("wide/model.safetensors")));
  // A pinned checkpoint is not removed; unpinned it is, and it is gone from the list.
  r = Run({"ckpt", "--dir", "run/checkpoints", "pin", "ckpt-000001"});
  ASSERT_TRUE(r.exited && r.code == 0) << r.err;
  EXPECT_FAILS(Args({"ckpt", "--dir", "run/checkpoints", "rm", "ckpt-000001"}), "pinned");
  ASSERT_EQ(Run({"ckpt", "--dir", "run/checkpoints", "unpin", "ckpt-000001"}).code, 0);
  ASSERT_EQ(Run({"ckpt", "--dir", "run/checkpoints", "rm", "ckpt-000001"}).code, 0);
  r = Run({"ckpt", "--dir", "run/checkpoints", "ls"});
  EXPECT_EQ(r.out.find("ckpt-000001"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace troupe
