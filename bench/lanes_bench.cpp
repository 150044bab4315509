// lanes_bench: what an F&B pair's second CUDA lane buys on one GPU, compute
// only. Two models of the config (an F&B pair's two stages) each run a
// forward and a backward of one micro-batch, repeated: one after another on
// one lane (the baseline, as a pair ran before lanes), then at once from two
// threads on two lanes (Backend::SetCallerLane, as PipelineRunner runs a
// pair). Prints tokens/s of both and their ratio, measured in the same run.
// Communication is not part of it: hiding a transfer or an expert all-to-all
// behind the other chunk needs ranks on their own GPUs (bench/pipeline_bench.sh).
//
//   build/bench/lanes_bench [--config configs/small10m.toml] [--batch B] [--reps N] [--bf16]
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "configs/config.h"
#include "gpu/cuda/cuda_info.h"
#include "gpu/model/model.h"

namespace troupe {
namespace {

using Clock = std::chrono::steady_clock;

struct Pair {
  std::vector<std::unique_ptr<Model>> models;
  std::vector<std::vector<int32_t>> tokens;
};

Expected<Pair> MakePair(Backend& be, const JobConfig& job, int batch) {
  Pair p;
  for (int i = 0; i < 2; ++i) {
    TROUPE_ASSIGN_OR_RETURN(std::unique_ptr<Model> m,
                            Model::Create(be, job.model, DType::kF32, batch, job.train.seq_len));
    TROUPE_RETURN_IF_ERROR(InitParams(be, job.model, 11 + i, m->params()));
    m->ZeroGrads();
    std::mt19937 rng(5 + i);
    std::vector<int32_t> t(static_cast<size_t>(batch) * m->window());
    for (int32_t& x : t) x = static_cast<int32_t>(rng() % job.model.vocab_size);
    p.models.push_back(std::move(m));
    p.tokens.push_back(std::move(t));
  }
  return p;
}

Status Chunks(Model& m, const std::vector<int32_t>& tokens, int reps) {
  for (int r = 0; r < reps; ++r) {
    TROUPE_RETURN_IF_ERROR(m.Forward(tokens.data(), LossWeights{}).status());
    m.Backward();
  }
  return Status::Ok();
}

// Seconds for `reps` forward+backward of each model, serial or on two lanes.
Expected<double> Time(Backend& be, Pair& p, int reps, bool lanes) {
  TROUPE_RETURN_IF_ERROR(be.Synchronize());
  const auto t0 = Clock::now();
  Status first, second;
  if (lanes) {
    be.OrderLanes();
    std::thread other([&] {
      be.SetCallerLane(1);
      second = Chunks(*p.models[1], p.tokens[1], reps);
      if (second.ok()) second = be.Synchronize();
    });
    first = Chunks(*p.models[0], p.tokens[0], reps);
    other.join();
    be.OrderLanes();
  } else {
    first = Chunks(*p.models[0], p.tokens[0], reps);
    second = Chunks(*p.models[1], p.tokens[1], reps);
  }
  TROUPE_RETURN_IF_ERROR(first);
  TROUPE_RETURN_IF_ERROR(second);
  TROUPE_RETURN_IF_ERROR(be.Synchronize());
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

int Failed(const Status& s) {
  std::fprintf(stderr, "error: %s\n", s.message().c_str());
  return 1;
}

int Main(int argc, char** argv) {
  CLI::App app{"F&B pair compute on one lane vs two lanes (one GPU)"};
  std::string config = "configs/small10m.toml";
  int batch = 0, reps = 10;
  bool bf16 = false;
  app.add_option("--config", config, "job config (model and seq_len)")->check(CLI::ExistingFile);
  app.add_option("--batch", batch, "sequences per micro-batch (default: the config's batch_size)")
      ->check(CLI::Range(1, 4096));
  app.add_option("--reps", reps, "forward+backward passes per model")->check(CLI::Range(1, 100000));
  app.add_flag("--bf16", bf16, "bf16 GEMM inputs");
  CLI11_PARSE(app, argc, argv);
  auto job = LoadConfigFile(config);
  if (!job.ok()) return Failed(job.status());
  if (batch == 0) batch = job->train.batch_size;
  if (CudaDeviceCount() == 0) {
    std::printf("SKIPPED: no CUDA device: %s\n", CudaDeviceSummary().c_str());
    return 0;
  }
  auto be = CreateCudaBackend(0, bf16);
  if (!be.ok()) return Failed(be.status());
  auto pair = MakePair(**be, *job, batch);
  if (!pair.ok()) return Failed(pair.status());
  // One untimed pass each way: cuBLAS heuristics, pool growth, both lanes' workspaces.
  for (bool lanes : {false, true})
    if (auto warm = Time(**be, *pair, 1, lanes); !warm.ok()) return Failed(warm.status());
  const double tokens = 2.0 * reps * batch * job->train.seq_len;
  std::printf("%s, %s, micro-batch %d x %d tokens, %d passes per model\n", (*be)->Describe().c_str(), config.c_str(),
              batch, job->train.seq_len, reps);
  double best[2] = {1e30, 1e30};
  for (int round = 0; round < 3; ++round)  // interleaved, best of three: clocks and other tenants drift
    for (int lanes = 0; lanes < 2; ++lanes) {
      auto s = Time(**be, *pair, reps, lanes == 1);
      if (!s.ok()) return Failed(s.status());
      best[lanes] = std::min(best[lanes], *s);
    }
  std::printf("| pair chunks | tokens/s | vs one lane |\n|---|---|---|\n");
  std::printf("| one lane, F&B one after another | %.0f | 1.00 |\n", tokens / best[0]);
  std::printf("| two lanes, at once | %.0f | %.2f |\n", tokens / best[1], best[0] / best[1]);
  return 0;
}

}  // namespace
}  // namespace troupe

int main(int argc, char** argv) { return troupe::Main(argc, argv); }
