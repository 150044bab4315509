// The job configuration: what a TOML file under configs/ may say.
//
// Structs with in-class defaults and one doc line per field. Parsed from TOML
// in one place (ParseConfig*) and validated in one place (Validate*). Model
// keys follow the DeepSeek-V3 config.json names (BRIEF §5).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace troupe {

struct ModelConfig {
  int vocab_size = 2048;               // V; must cover the tokenizer's vocabulary
  int hidden_size = 128;               // d
  int num_hidden_layers = 4;           // L (main model, MTP modules not counted)
  int first_k_dense_replace = 1;       // the first layers use a dense SwiGLU FFN
  int num_attention_heads = 4;         // n_h
  int q_lora_rank = 96;                // d_cq, query latent width
  int kv_lora_rank = 64;               // d_c, KV latent width (cached)
  int qk_nope_head_dim = 32;           // d_h, per-head content width
  int qk_rope_head_dim = 16;           // d_r, rotary width (even)
  int v_head_dim = 32;                 // d_v
  int intermediate_size = 384;         // dense SwiGLU width
  int moe_intermediate_size = 64;      // width of each expert's SwiGLU
  int n_routed_experts = 8;            // routed experts per MoE layer
  int n_shared_experts = 1;            // shared experts, fused into one SwiGLU
  int num_experts_per_tok = 2;         // K
  int n_group = 4;                     // G, groups of routed experts (devices/nodes)
  int topk_group = 2;                  // M, groups a token may use
  double routed_scaling_factor = 1.0;  // gate scale (V3: 2.5)
  bool norm_topk_prob = true;          // normalise gates over the selected experts
  double rms_norm_eps = 1e-6;          // RMSNorm epsilon
  double rope_theta = 10000.0;         // RoPE base
  int num_nextn_predict_layers = 1;    // D, MTP depth (0 = no MTP)
  double init_std = 0.02;              // normal init of every matrix
};

enum class LrSchedule { kCosine, kMultiStep };

struct TrainConfig {
  uint64_t seed = 1234;       // weights, data order: all randomness
  int seq_len = 64;           // T, tokens per sequence
  int batch_size = 8;         // B, sequences per step
  int steps = 400;            // optimizer steps
  double lr = 3e-3;           // peak learning rate
  double min_lr_ratio = 0.1;  // cosine floor, as a share of lr
  int warmup_steps = 30;      // linear warm-up
  LrSchedule schedule = LrSchedule::kCosine;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double adam_eps = 1e-8;
  double weight_decay = 0.1;        // on matrices only
  double grad_clip = 1.0;           // global-norm clip (0 = off)
  double mtp_lambda = 0.3;          // L = L_main + lambda/D * sum L_k
  double balance_alpha = 1e-4;      // sequence-wise balance loss weight
  double bias_update_gamma = 1e-3;  // aux-loss-free bias step
  int eval_every = 50;              // steps between validation runs (0 = only at the end)
  int eval_batches = 8;             // validation batches per run
  int log_every = 10;               // steps between log lines
  int threads = 0;                  // CPU threads (0 = all cores)
  std::string device = "auto";      // auto (the GPU when one is present) | cpu | cuda
};

struct DataConfig {
  std::vector<std::string> train_shards = {"data/brown/train_000.bin"};  // llm.c .bin files
  std::vector<std::string> val_shards = {"data/brown/val_000.bin"};
  std::string tokenizer = "data/brown/tokenizer.model";  // sentencepiece model (for printing text)
};

// [checkpoint]: asynchronous saves (docs/checkpoints.md).
struct CheckpointConfig {
  int every = 0;              // steps between saves (0 = never)
  int keep_last = 3;          // retention: the newest N ...
  int keep_every = 0;         // ... plus every checkpoint whose step is a multiple of this (0 = none) ...
  int replication = 0;        // ... plus pinned ones; copies per shard (0 = 2 where there are 2 stores/nodes, else 1)
  int stores = 1;             // shard stores (troupe train: folders under the checkpoint dir)
  int shards_per_tensor = 1;  // row ranges each tensor is cut into
};

// [parallel]: how a distributed run lays the model over its ranks
// (docs/parallel.md). World = pp * ep * dp ranks; every rank of a stage but
// the pp pipeline ranks runs different sequences of the global batch.
struct ParallelConfig {
  int pp = 1;                     // pipeline ranks
  int ep = 1;                     // expert-parallel ranks per stage: the routed experts are split over them
  int dp = 1;                     // data-parallel copies of a whole (pp x ep) model; 0 = as many as the workers allow
  std::string schedule = "1f1b";  // pipeline schedule: 1f1b | zb1p | dualpipe | dualpipev
  int micro_batches = 0;          // per pipeline per step (0 = the schedule's smallest)
  bool zero1 = true;              // shard AdamW state over each parameter's copies (ZeRO-1)
  bool split_w = true;            // zb1p/dualpipe/dualpipev: weight gradients in separate, deferred W chunks
  // dualpipe/dualpipev on the CPU backend: run an F&B pair's two chunks on two threads at once ("on"), one after
  // the other ("off"), or "auto": at once when the stages exchange tokens between expert-parallel ranks (ep > 1),
  // whose waits the other chunk hides; without them two half-size thread teams measured slower (bench/RESULTS.md).
  std::string overlap_pairs = "auto";
  // How GPU ranks reduce gradient buckets: "nccl" (device to device, never through host memory), "host" (copied
  // to host memory and reduced over our ZeroMQ group, as CPU ranks do) or "auto": nccl when the backend is CUDA and
  // every rank has a GPU of its own.
  std::string device_comm = "auto";
};

struct JobConfig {
  ModelConfig model;
  TrainConfig train;
  DataConfig data;
  CheckpointConfig checkpoint;
  ParallelConfig parallel;
  std::string source_path;  // where it was read from
  std::string toml_text;    // the exact text, kept for checkpoints
};

// Parses TOML text. Unknown sections or keys, wrong types and impossible
// values are errors naming the key. Relative shard paths stay as written.
Expected<JobConfig> ParseConfigText(const std::string& toml_text, const std::string& source_name);
Expected<JobConfig> LoadConfigFile(const std::string& path);

// Every cross-field rule (divisibility, ranges) lives here.
Status ValidateModelConfig(const ModelConfig& m);
Status ValidateTrainConfig(const TrainConfig& t);
Status ValidateCheckpointConfig(const CheckpointConfig& c);
// Copies each shard gets when `stores` stores (troupe train) or live nodes
// (a cluster) can take one: `replication`, at most `stores`; for 0 (auto), 2
// when there are at least 2, else 1.
int EffectiveReplication(const CheckpointConfig& c, int stores);
// Ranges only; whether a layout fits the model and the batch is the
// planner's call (train/parallel/layout.h).
Status ValidateParallelConfig(const ParallelConfig& p);

}  // namespace troupe
