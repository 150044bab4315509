// Parity with the independent PyTorch twin (bench/torch_reference.py): the
// same weights file and the same token windows must give the same losses
// (main, MTP, balance, total), the same float64 gradients tensor by tensor
// (under the exported Hugging Face names), and the same `troupe eval` loss.
//
// Needs Debian's /usr/bin/python3 with torch; skipped where it is missing.
// Fast (a few seconds, mostly the python start-up), so it runs in the
// default ctest run.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "configs/config.h"
#include "data/shards.h"
#include "gpu/cpu/cpu_backend.h"
#include "gpu/host_io.h"
#include "gpu/model/model.h"
#include "storage/model_weights.h"
#include "storage/safetensors.h"
#include "test_util.h"

namespace troupe {
namespace {

namespace fs = std::filesystem;

const char* const kPython = "/usr/bin/python3";

bool TorchAvailable() {
  const std::string cmd = std::string(kPython) + " -c \"import torch\" >/dev/null 2>&1";
  return std::system(cmd.c_str()) == 0;
}

// Small, but every feature on: a dense first layer, two MoE layers with
// group-limited routing (G 2, M 1), gate scale 2.5, one MTP depth; B 2, T 8.
// A large balance weight so the balance loss's gradient is well above noise.
const char* const kConfigToml = R"(
[model]
vocab_size = 64
hidden_size = 32
num_hidden_layers = 3
first_k_dense_replace = 1
num_attention_heads = 2
q_lora_rank = 24
kv_lora_rank = 16
qk_nope_head_dim = 8
qk_rope_head_dim = 4
v_head_dim = 8
intermediate_size = 64
moe_intermediate_size = 16
n_routed_experts = 4
n_shared_experts = 1
num_experts_per_tok = 2
n_group = 2
topk_group = 1
routed_scaling_factor = 2.5
norm_topk_prob = true
rms_norm_eps = 1e-6
rope_theta = 10000.0
num_nextn_predict_layers = 1
init_std = 0.1

[train]
seed = 77
seq_len = 8
batch_size = 2
mtp_lambda = 0.3
balance_alpha = 0.01
threads = 1
device = "cpu"
)";

std::string Slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// Runs `cmd` (stdout to a file, stderr appended); returns stdout, or fails the test.
std::string RunCommand(const std::string& cmd, const fs::path& dir, const std::string& tag) {
  const std::string out = (dir / (tag + ".out")).string(), err = (dir / (tag + ".err")).string();
  const int rc = std::system((cmd + " >" + out + " 2>" + err).c_str());
  EXPECT_EQ(rc, 0) << cmd << "\nstderr:\n" << Slurp(err);
  return Slurp(out);
}

// The number after `"key": ` (or `"key": [` for the first element of a list)
// in a JSON line printed by torch_reference.py (repr of a Python float:
// round-trips exactly).
double JsonNumber(const std::string& json, const std::string& key) {
  const std::string pat = "\"" + key + "\":";
  const size_t at = json.find(pat);
  if (at == std::string::npos) {
    ADD_FAILURE() << "no " << key << " in " << json;
    return NAN;
  }
  size_t p = at + pat.size();
  while (p < json.size() && (json[p] == ' ' || json[p] == '[')) ++p;
  return std::strtod(json.c_str() + p, nullptr);
}

double Rel(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-300); }

// Norm weights away from 1 and non-zero routing biases, so those paths are
// compared too. The biases stay small (std 0.05, affinities spread ~0.1):
// larger ones send every token of this 16-token batch to the same group and
// leave whole groups of experts without a gradient to compare.
void PerturbParams(Backend& be, ModelParams& p, uint64_t seed) {
  uint64_t s = seed;
  for (ParamRef& r : ListParams(p)) {
    const bool norm = r.name.find("norm") != std::string::npos;
    const bool bias = r.name.find("e_score_correction_bias") != std::string::npos;
    if (!norm && !bias) continue;
    std::vector<double> v = ToHostDoubles(be, *r.tensor);
    std::vector<double> noise = testing::RandomValues(v.size(), ++s, bias ? 0.05 : 0.2);
    for (size_t i = 0; i < v.size(); ++i) v[i] += noise[i];
    FromHostDoubles(be, *r.tensor, v);
  }
}

class TorchParity : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!TorchAvailable()) GTEST_SKIP() << kPython << " cannot import torch (Debian python3-torch): parity not checked";
    dir_ = fs::temp_directory_path() / ("troupe_torch_parity_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
    config_ = (dir_ / "parity.toml").string();
    weights_ = (dir_ / "w.safetensors").string();
    shard_ = (dir_ / "tokens.bin").string();
    std::ofstream(config_) << kConfigToml;
    auto job = ParseConfigText(kConfigToml, "parity.toml");
    ASSERT_TRUE(job.ok()) << job.status().message();
    job_ = *job;
    const ModelConfig& mc = job_.model;

    // 7 full windows of T+1+D = 10 tokens, starting every T = 8 tokens.
    std::mt19937_64 rng(5);
    std::vector<int> tokens(64);
    for (int& t : tokens) t = static_cast<int>(rng() % mc.vocab_size);
    ASSERT_TRUE(data::WriteShard(shard_, tokens).ok());

    // Random weights with perturbed norms and routing biases, written as F32:
    // both sides then read the very same numbers.
    auto params = AllocateParams(be_, mc, DType::kF64);
    ASSERT_TRUE(params.ok());
    ASSERT_TRUE(InitParams(be_, mc, job_.train.seed, *params).ok());
    PerturbParams(be_, *params, 1000);
    ASSERT_TRUE(ExportWeights(be_, mc, *params, weights_).ok());

    // The first batch: windows 0..B-1, window n = tokens [n*T, n*T + T+1+D).
    auto shard = data::ReadShard(shard_, mc.vocab_size);
    ASSERT_TRUE(shard.ok());
    const int b = job_.train.batch_size, t = job_.train.seq_len, win = t + 1 + mc.num_nextn_predict_layers;
    for (int n = 0; n < b; ++n) {
      for (int i = 0; i < win; ++i) batch_.push_back((*shard)[static_cast<size_t>(n * t + i)]);
    }
  }

  void TearDown() override {
    if (!dir_.empty() && !HasFailure()) fs::remove_all(dir_);
  }

  std::unique_ptr<Model> MakeModel(DType dtype) {
    auto m = Model::Create(be_, job_.model, dtype, job_.train.batch_size, job_.train.seq_len);
    EXPECT_TRUE(m.ok()) << m.status().message();
    Status st = ImportWeights(be_, job_.model, weights_, (*m)->params());
    EXPECT_TRUE(st.ok()) << st.message();
    return std::move(*m);
  }

  LossWeights Weights() const { return LossWeights{job_.train.mtp_lambda, job_.train.balance_alpha}; }

  std::string Reference(const std::string& args, const std::string& tag) {
    const std::string cmd = std::string(kPython) + " " + TROUPE_SOURCE_DIR + "/bench/torch_reference.py " + args +
                            " --config " + config_ + " --weights " + weights_ + " --tokens " + shard_ + " --threads 1";
    return RunCommand(cmd, dir_, tag);
  }

  CpuBackend be_{1};
  fs::path dir_;
  std::string config_, weights_, shard_;
  JobConfig job_;
  std::vector<int32_t> batch_;
};

// Tolerances really met (measured on this config and seed):
//  - F64 vs torch float64: <= 2e-16 relative on main, mtp, balance and total,
//    i.e. the last bit: the same maths with sums only reassociated. 1e-12 is
//    asserted (tighter than the 1e-10 first asked for, with 4 decades of
//    margin for other BLAS/threading orders).
//  - F32 vs torch float64: main ~1e-9, mtp/balance ~1e-8, total ~1e-9 (fp32
//    rounding, 2^-24 = 6e-8 per op, partly cancelling over d = 32 sums).
//    1e-6 is asserted: 1e-5 would also pass, but 1e-6 still catches anything
//    of the size of a wrong term while sitting two decades above what fp32
//    gives here. (A routing decision flipping on a near-tie in fp32 would
//    show as ~1e-3; this fixed seed has no such tie.)
TEST_F(TorchParity, LossesMatchFloat64Reference) {
  const std::string json = Reference("loss --dtype float64 --batches 1", "loss");
  ASSERT_NE(json.find("\"windows\": 2"), std::string::npos) << json;
  const double ref_main = JsonNumber(json, "main"), ref_mtp = JsonNumber(json, "mtp"),
               ref_balance = JsonNumber(json, "balance"), ref_total = JsonNumber(json, "total");
  ASSERT_GT(ref_balance, 0.0);

  struct Case {
    DType dtype;
    double tol;
    const char* name;
  };
  for (const Case& c : {Case{DType::kF64, 1e-12, "F64"}, Case{DType::kF32, 1e-6, "F32"}}) {
    auto model = MakeModel(c.dtype);
    double max_bias = 0;
    for (const auto& layer : model->RoutingBiases()) {
      for (float v : layer) max_bias = std::max(max_bias, std::abs(static_cast<double>(v)));
    }
    EXPECT_GT(max_bias, 0.01) << "routing biases should be non-zero";
    auto loss = model->Forward(batch_.data(), Weights());
    ASSERT_TRUE(loss.ok()) << loss.status().message();
    ASSERT_EQ(loss->mtp.size(), 1u);
    const double e_main = Rel(loss->main, ref_main), e_mtp = Rel(loss->mtp[0], ref_mtp),
                 e_bal = Rel(loss->balance, ref_balance), e_total = Rel(loss->total, ref_total);
    std::printf("[%s] relative error vs torch float64: main %.3g mtp %.3g balance %.3g total %.3g\n", c.name, e_main,
                e_mtp, e_bal, e_total);
    EXPECT_LT(e_main, c.tol) << c.name << " main " << loss->main << " vs " << ref_main;
    EXPECT_LT(e_mtp, c.tol) << c.name << " mtp " << loss->mtp[0] << " vs " << ref_mtp;
    EXPECT_LT(e_bal, c.tol) << c.name << " balance " << loss->balance << " vs " << ref_balance;
    EXPECT_LT(e_total, c.tol) << c.name << " total " << loss->total << " vs " << ref_total;
  }
}

// Every exported gradient by name, ||ours - torch|| / ||torch|| per tensor.
// Measured: worst 1.4e-15 over 94 tensors (F64 on both sides; reassociated
// sums). 1e-11 is asserted (the brief's bound was 1e-9; 4 decades of margin).
TEST_F(TorchParity, Float64GradientsMatchByName) {
  const std::string grads = (dir_ / "g.safetensors").string();
  Reference("grads --dtype float64 --save-dtype float64 --out " + grads, "grads");
  auto file = ReadSafetensors(grads);
  ASSERT_TRUE(file.ok()) << file.status().message();

  auto model = MakeModel(DType::kF64);
  model->ZeroGrads();
  auto loss = model->Forward(batch_.data(), Weights());
  ASSERT_TRUE(loss.ok());
  EXPECT_LT(Rel(loss->total, std::strtod(file->metadata().at("loss_total").c_str(), nullptr)), 1e-12);
  model->Backward();

  std::set<std::string> seen;
  std::vector<std::string> zero;
  double worst = 0;
  std::string worst_name;
  for (const ExportEntry& e : ExportLayout(job_.model, model->grads())) {
    if (e.name.find("e_score_correction_bias") != std::string::npos) continue;
    seen.insert(e.name);
    const SafeTensor* ref = file->Find(e.name);
    ASSERT_NE(ref, nullptr) << "torch gave no gradient for " << e.name;
    ASSERT_EQ(ref->dtype, "F64") << e.name;
    ASSERT_EQ(ref->shape, e.shape) << e.name;
    const int64_t n = ref->numel();
    std::vector<double> theirs(static_cast<size_t>(n));
    std::memcpy(theirs.data(), ref->bytes.data(), ref->bytes.size());
    const std::vector<double> all = ToHostDoubles(be_, *e.source);
    ASSERT_LE(e.offset + n, static_cast<int64_t>(all.size())) << e.name;
    double diff = 0, norm = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double a = all[static_cast<size_t>(e.offset + i)], b = theirs[static_cast<size_t>(i)];
      diff += (a - b) * (a - b);
      norm += b * b;
    }
    if (norm == 0) {  // an expert no token of the batch chose: both sides must say exactly 0
      EXPECT_EQ(diff, 0.0) << e.name << ": torch's gradient is 0, ours is not";
      zero.push_back(e.name);
      continue;
    }
    const double rel = std::sqrt(diff / norm);
    EXPECT_LT(rel, 1e-11) << e.name << " |ref| " << std::sqrt(norm) << " |diff| " << std::sqrt(diff);
    if (rel > worst) worst = rel, worst_name = e.name;
  }
  std::printf("[F64 grads] %zu tensors, worst relative error %.3g (%s); %zu all-zero (unused experts):", seen.size(),
              worst, worst_name.c_str(), zero.size());
  for (const std::string& z : zero) std::printf(" %s", z.c_str());
  std::printf("\n");
  // Most experts must carry a gradient, or the comparison says little.
  EXPECT_LE(zero.size() * 4, seen.size()) << "too many unused experts: change the seed";
  for (const std::string& name : file->names()) EXPECT_TRUE(seen.count(name)) << "torch has an extra tensor " << name;
  EXPECT_GT(seen.size(), 40u);
}

// `troupe eval` (F32, every window, last batch padded) vs torch's float64 main loss.
// Measured ~1e-7 relative, all of it from eval printing 6 decimals (5e-7 /
// 4.4); the F32 forward itself is ~1e-9 off (see above). 1e-6 asserted (the
// brief asked for 1e-5).
TEST_F(TorchParity, EvalCommandMatchesReferenceMainLoss) {
  const std::string json = Reference("loss --dtype float64", "loss_all");
  ASSERT_NE(json.find("\"windows\": 7"), std::string::npos) << json;
  const double ref = JsonNumber(json, "main");
  const std::string out = RunCommand(std::string(TROUPE_BINARY) + " eval --config " + config_ + " --weights " +
                                         weights_ + " --tokens " + shard_ + " --threads 1 --device cpu",
                                     dir_, "eval");
  ASSERT_EQ(out.rfind("loss ", 0), 0u) << out;
  EXPECT_NE(out.find("(7 windows"), std::string::npos) << out;
  const double ours = std::strtod(out.c_str() + 5, nullptr);
  std::printf("[eval] troupe %.6f torch %.10f relative %.3g\n", ours, ref, Rel(ours, ref));
  EXPECT_LT(Rel(ours, ref), 1e-6) << out;
}

}  // namespace
}  // namespace troupe
