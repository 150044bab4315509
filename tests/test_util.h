// Shared by the tests: tensors from/to host vectors, random fills, and the
// double-precision finite-difference gradient check.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "configs/config.h"
#include "gpu/backend.h"

namespace troupe::testing {

// Small but complete: a dense layer, MoE layers with group-limited routing
// (G=2, M=1), two MTP depths (the second fed by the first).
inline ModelConfig TinyMoeModel() {
  ModelConfig c;
  c.vocab_size = 13;
  c.hidden_size = 8;
  c.num_hidden_layers = 3;
  c.first_k_dense_replace = 1;
  c.num_attention_heads = 2;
  c.q_lora_rank = 6;
  c.kv_lora_rank = 5;
  c.qk_nope_head_dim = 4;
  c.qk_rope_head_dim = 2;
  c.v_head_dim = 3;
  c.intermediate_size = 10;
  c.moe_intermediate_size = 4;
  c.n_routed_experts = 4;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.n_group = 2;
  c.topk_group = 1;
  c.routed_scaling_factor = 2.5;
  c.num_nextn_predict_layers = 2;
  c.init_std = 0.4;  // large weights: every path carries a visible gradient
  return c;
}

// Big enough for the GPU to matter (64 wide, 8 experts in 4 groups, M=2),
// small enough for a unit test: the CUDA tests' model.
inline ModelConfig SmallMoeModel() {
  ModelConfig c;
  c.vocab_size = 512;
  c.hidden_size = 64;
  c.num_hidden_layers = 3;
  c.first_k_dense_replace = 1;
  c.num_attention_heads = 4;
  c.q_lora_rank = 48;
  c.kv_lora_rank = 32;
  c.qk_nope_head_dim = 16;
  c.qk_rope_head_dim = 8;
  c.v_head_dim = 16;
  c.intermediate_size = 160;
  c.moe_intermediate_size = 32;
  c.n_routed_experts = 8;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.n_group = 4;
  c.topk_group = 2;
  c.routed_scaling_factor = 2.5;
  c.num_nextn_predict_layers = 1;
  return c;
}

// A fresh directory under the system temp dir, named after the running test
// (parameterised ones included), removed when it goes out of scope.
class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = std::string("troupe_") + info->test_suite_name() + "_" + info->name();
    for (char& c : name)
      if (c == '/') c = '_';
    path_ = std::filesystem::temp_directory_path() / name;
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// A tensor of `dtype` (F32 or F64) holding `values` (converted).
inline Tensor MakeTensor(Backend& be, std::vector<int64_t> shape, DType dtype, const std::vector<double>& values,
                         const std::string& name = "test") {
  auto t = be.Alloc(std::move(shape), dtype, name);
  EXPECT_TRUE(t.ok()) << t.status().message();
  Tensor out = t.value();
  EXPECT_EQ(static_cast<size_t>(out.numel()), values.size());
  if (dtype == DType::kF64) {
    be.CopyFromHost(out, values.data());
  } else if (dtype == DType::kF32) {
    std::vector<float> f(values.begin(), values.end());
    be.CopyFromHost(out, f.data());
  } else if (dtype == DType::kI32) {
    std::vector<int32_t> i(values.begin(), values.end());
    be.CopyFromHost(out, i.data());
  }
  return out;
}

inline Tensor MakeIndex(Backend& be, std::vector<int64_t> shape, const std::vector<int32_t>& values) {
  auto t = be.Alloc(std::move(shape), DType::kI32, "index");
  EXPECT_TRUE(t.ok());
  Tensor out = t.value();
  be.CopyFromHost(out, values.data());
  return out;
}

// Any float or I32 tensor, as doubles.
inline std::vector<double> ToVector(Backend& be, const Tensor& t) {
  std::vector<double> out(static_cast<size_t>(t.numel()));
  if (t.dtype() == DType::kF64) {
    be.CopyToHost(out.data(), t);
  } else if (t.dtype() == DType::kF32) {
    std::vector<float> f(out.size());
    be.CopyToHost(f.data(), t);
    out.assign(f.begin(), f.end());
  } else if (t.dtype() == DType::kI32) {
    std::vector<int32_t> i(out.size());
    be.CopyToHost(i.data(), t);
    out.assign(i.begin(), i.end());
  }
  return out;
}

inline std::vector<double> RandomValues(size_t n, uint64_t seed, double stddev = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> dist(0.0, stddev);
  std::vector<double> v(n);
  for (double& x : v) x = dist(rng);
  return v;
}

inline Tensor RandomTensor(Backend& be, std::vector<int64_t> shape, DType dtype, uint64_t seed, double stddev = 1.0) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return MakeTensor(be, std::move(shape), dtype, RandomValues(static_cast<size_t>(n), seed, stddev));
}

// Central differences on an F64 CPU tensor. `loss` recomputes the scalar from
// scratch each call; `analytic` holds d loss / d param. Checks up to
// `max_elements` entries (spread evenly). Returns the worst error
// |a - n| / max(|a|, |n|, abs_floor); gradient checks in double precision
// typically reach 1e-8 and a wrong formula gives > 1e-2.
inline double GradCheckError(Tensor& param, const Tensor& analytic, const std::function<double()>& loss,
                             int max_elements = 64, double eps = 1e-6, double abs_floor = 1e-7) {
  EXPECT_EQ(param.dtype(), DType::kF64);
  EXPECT_EQ(analytic.dtype(), DType::kF64);
  EXPECT_EQ(param.numel(), analytic.numel());
  double* p = param.data<double>();
  const double* g = analytic.data<double>();
  const int64_t n = param.numel();
  const int64_t stride = std::max<int64_t>(1, n / max_elements);
  double worst = 0.0;
  for (int64_t i = 0; i < n; i += stride) {
    const double saved = p[i];
    p[i] = saved + eps;
    const double up = loss();
    p[i] = saved - eps;
    const double down = loss();
    p[i] = saved;
    const double numeric = (up - down) / (2 * eps);
    const double err = std::abs(g[i] - numeric) / std::max({std::abs(g[i]), std::abs(numeric), abs_floor});
    worst = std::max(worst, err);
  }
  return worst;
}

}  // namespace troupe::testing
