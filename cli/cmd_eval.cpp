// troupe eval: mean next-token loss of the main head over every window of a
// token shard, for given weights.
#include <cstdio>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "data/loader.h"
#include "gpu/model/model.h"
#include "storage/model_weights.h"

namespace troupe::cli {
namespace {

struct EvalFlags {
  std::string config, weights, tokens, device;
  int threads = -1;
  int max_batches = 0;
};

int RunEval(const EvalFlags& f) {
  auto job = LoadJob(f.config);
  if (!job.ok()) return Fail(job.status());
  const ModelConfig& mc = job->model;
  const TrainConfig& tc = job->train;
  auto backend = MakeBackend(f.device.empty() ? tc.device : f.device, f.threads >= 0 ? f.threads : tc.threads);
  if (!backend.ok()) return Fail(backend.status());
  Backend& be = **backend;
  const int extra = 1 + mc.num_nextn_predict_layers;
  auto loader = data::TokenLoader::Open({f.tokens}, mc.vocab_size, {tc.seq_len, extra, data::LoaderMode::kEval, 0});
  if (!loader.ok()) {  // shard errors name the path; loader ones (too short) do not
    const Status& st = loader.status();
    return Fail(st.message().rfind(f.tokens, 0) == 0 ? st : st.WithContext(f.tokens));
  }
  auto model = Model::Create(be, mc, DType::kF32, tc.batch_size, tc.seq_len);
  if (!model.ok()) return Fail(model.status());
  Status st = ImportWeights(be, mc, f.weights, (*model)->params());
  if (!st.ok()) return Fail(st);
  // Every window once, in order; the last batch is padded with ignored rows.
  const int64_t windows = loader->num_windows();
  const int b = tc.batch_size, win = (*model)->window();
  int64_t batches = (windows + b - 1) / b;
  if (f.max_batches > 0) batches = std::min<int64_t>(batches, f.max_batches);
  double sum = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < batches; ++i) {
    const int rows = static_cast<int>(std::min<int64_t>(b, windows - i * b));
    auto batch = loader->NextBatch(rows);
    if (!batch.ok()) return Fail(batch.status());
    std::vector<int32_t> tokens(static_cast<size_t>(b) * win, -1);
    std::copy(batch->begin(), batch->end(), tokens.begin());
    auto loss = (*model)->Forward(tokens.data(), LossWeights{tc.mtp_lambda, tc.balance_alpha}, /*with_mtp=*/false);
    if (!loss.ok()) return Fail(loss.status());
    sum += loss->main * loss->tokens;
    count += loss->tokens;
  }
  std::printf("loss %.6f over %lld tokens (%lld windows of %d)\n", count ? sum / count : 0.0,
              static_cast<long long>(count), static_cast<long long>(std::min<int64_t>(windows, batches * b)),
              tc.seq_len);
  return 0;
}

}  // namespace

void AddEvalCommand(CLI::App& app, RunFn& run) {
  auto flags = std::make_shared<EvalFlags>();
  CLI::App* cmd = app.add_subcommand("eval", "mean next-token loss of the main head on a token shard");
  cmd->add_option("--config", flags->config, "job config (TOML)")->required();
  cmd->add_option("--weights", flags->weights, "model weights (safetensors)")->required();
  cmd->add_option("--tokens", flags->tokens, "token shard (llm.c .bin)")->required();
  cmd->add_option("--device", flags->device, "auto, cpu or cuda (default: the config's train.device)");
  cmd->add_option("--threads", flags->threads, "CPU threads (0 = all cores)")->check(IntAtLeast(0));
  cmd->add_option("--batches", flags->max_batches, "evaluate only the first N batches")->check(IntAtLeast(1));
  cmd->callback([flags, &run] { run = [flags] { return RunEval(*flags); }; });
}

}  // namespace troupe::cli
