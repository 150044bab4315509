// The TOML reader and the validators of the job configuration (config.h).
//
// Reading is table-driven: every section ([model], [train], [data]) has a list
// of fields, each a key name plus a typed reader that writes into the struct.
// A key that is not in the list is an error, so a typo never silently keeps a
// default. toml++ throws toml::parse_error; it is caught here and turned into a
// Status, so no exception leaves this file.
#include "configs/config.h"

#include <toml++/toml.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <utility>

namespace troupe {
namespace {

// ---------------------------------------------------------------------------
// Messages

std::string Num(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

const char* TypeName(toml::node_type t) {
  switch (t) {
    case toml::node_type::table:
      return "table";
    case toml::node_type::array:
      return "array";
    case toml::node_type::string:
      return "string";
    case toml::node_type::integer:
      return "integer";
    case toml::node_type::floating_point:
      return "float";
    case toml::node_type::boolean:
      return "boolean";
    case toml::node_type::date:
      return "date";
    case toml::node_type::time:
      return "time";
    case toml::node_type::date_time:
      return "date-time";
    default:
      return "nothing";
  }
}

// One line describing a node: its value for scalars, its type otherwise.
std::string Show(const toml::node& node) {
  if (node.is_table() || node.is_array()) return std::string("a ") + TypeName(node.type());
  std::ostringstream os;
  node.visit([&os](const auto& v) { os << v; });
  return os.str();
}

// "file:line: " when the node has a source line, else "file: ".
std::string Where(const std::string& file, const toml::node& node) {
  const auto line = node.source().begin.line;
  if (line == 0) return file + ": ";
  return file + ":" + std::to_string(line) + ": ";
}

// ---------------------------------------------------------------------------
// Typed readers. Each checks the TOML type and the C++ range, then stores.
// `key` is the full name ("model.hidden_size") used in messages.

using FieldReader = std::function<Status(const toml::node&, const std::string& key, const std::string& at)>;

Status WrongType(const toml::node& node, const std::string& key, const std::string& at, const char* expected) {
  return Status::InvalidArgument(at + key + " = " + Show(node) + " has type " + TypeName(node.type()) + ", expected " +
                                 expected);
}

FieldReader Int(int* dst) {
  return [dst](const toml::node& node, const std::string& key, const std::string& at) {
    const auto* v = node.as_integer();
    if (v == nullptr) return WrongType(node, key, at, "integer");
    const int64_t x = v->get();
    if (x < INT_MIN || x > INT_MAX) {
      return Status::InvalidArgument(at + key + " = " + std::to_string(x) +
                                     " is out of range (must fit in a 32-bit int)");
    }
    *dst = static_cast<int>(x);
    return Status::Ok();
  };
}

FieldReader UInt64(uint64_t* dst) {
  return [dst](const toml::node& node, const std::string& key, const std::string& at) {
    const auto* v = node.as_integer();
    if (v == nullptr) return WrongType(node, key, at, "integer");
    if (v->get() < 0) return Status::InvalidArgument(at + key + " = " + std::to_string(v->get()) + " must be >= 0");
    *dst = static_cast<uint64_t>(v->get());
    return Status::Ok();
  };
}

// Floats accept integers too ("lr = 1" means 1.0). NaN and inf are refused.
FieldReader Float(double* dst) {
  return [dst](const toml::node& node, const std::string& key, const std::string& at) {
    double x = 0.0;
    if (const auto* i = node.as_integer()) {
      x = static_cast<double>(i->get());
    } else if (const auto* f = node.as_floating_point()) {
      x = f->get();
    } else {
      return WrongType(node, key, at, "float");
    }
    if (!std::isfinite(x)) return Status::InvalidArgument(at + key + " = " + Show(node) + " must be finite");
    *dst = x;
    return Status::Ok();
  };
}

FieldReader Bool(bool* dst) {
  return [dst](const toml::node& node, const std::string& key, const std::string& at) {
    const auto* v = node.as_boolean();
    if (v == nullptr) return WrongType(node, key, at, "boolean");
    *dst = v->get();
    return Status::Ok();
  };
}

FieldReader String(std::string* dst) {
  return [dst](const toml::node& node, const std::string& key, const std::string& at) {
    const auto* v = node.as_string();
    if (v == nullptr) return WrongType(node, key, at, "string");
    *dst = v->get();
    return Status::Ok();
  };
}

FieldReader StringArray(std::vector<std::string>* dst) {
  return [dst](const toml::node& node, const std::string& key, const std::string& at) {
    const auto* arr = node.as_array();
    if (arr == nullptr) return WrongType(node, key, at, "array of strings");
    std::vector<std::string> out;
    for (size_t i = 0; i < arr->size(); ++i) {
      const toml::node& item = *arr->get(i);
      const auto* s = item.as_string();
      if (s == nullptr) return WrongType(item, key + "[" + std::to_string(i) + "]", at, "string");
      if (s->get().empty()) return Status::InvalidArgument(at + key + "[" + std::to_string(i) + "] is an empty path");
      out.push_back(s->get());
    }
    *dst = std::move(out);
    return Status::Ok();
  };
}

FieldReader Schedule(LrSchedule* dst) {
  return [dst](const toml::node& node, const std::string& key, const std::string& at) {
    const auto* v = node.as_string();
    if (v == nullptr) return WrongType(node, key, at, "string");
    if (v->get() == "cosine") {
      *dst = LrSchedule::kCosine;
    } else if (v->get() == "multistep") {
      *dst = LrSchedule::kMultiStep;
    } else {
      return Status::InvalidArgument(at + key + " = " + Show(node) + " is not a schedule (cosine | multistep)");
    }
    return Status::Ok();
  };
}

struct Field {
  const char* name;
  FieldReader read;
};

std::vector<Field> ModelFields(ModelConfig& m) {
  return {
      {"vocab_size", Int(&m.vocab_size)},
      {"hidden_size", Int(&m.hidden_size)},
      {"num_hidden_layers", Int(&m.num_hidden_layers)},
      {"first_k_dense_replace", Int(&m.first_k_dense_replace)},
      {"num_attention_heads", Int(&m.num_attention_heads)},
      {"q_lora_rank", Int(&m.q_lora_rank)},
      {"kv_lora_rank", Int(&m.kv_lora_rank)},
      {"qk_nope_head_dim", Int(&m.qk_nope_head_dim)},
      {"qk_rope_head_dim", Int(&m.qk_rope_head_dim)},
      {"v_head_dim", Int(&m.v_head_dim)},
      {"intermediate_size", Int(&m.intermediate_size)},
      {"moe_intermediate_size", Int(&m.moe_intermediate_size)},
      {"n_routed_experts", Int(&m.n_routed_experts)},
      {"n_shared_experts", Int(&m.n_shared_experts)},
      {"num_experts_per_tok", Int(&m.num_experts_per_tok)},
      {"n_group", Int(&m.n_group)},
      {"topk_group", Int(&m.topk_group)},
      {"routed_scaling_factor", Float(&m.routed_scaling_factor)},
      {"norm_topk_prob", Bool(&m.norm_topk_prob)},
      {"rms_norm_eps", Float(&m.rms_norm_eps)},
      {"rope_theta", Float(&m.rope_theta)},
      {"num_nextn_predict_layers", Int(&m.num_nextn_predict_layers)},
      {"init_std", Float(&m.init_std)},
  };
}

std::vector<Field> TrainFields(TrainConfig& t) {
  return {
      {"seed", UInt64(&t.seed)},
      {"seq_len", Int(&t.seq_len)},
      {"batch_size", Int(&t.batch_size)},
      {"steps", Int(&t.steps)},
      {"lr", Float(&t.lr)},
      {"min_lr_ratio", Float(&t.min_lr_ratio)},
      {"warmup_steps", Int(&t.warmup_steps)},
      {"schedule", Schedule(&t.schedule)},
      {"beta1", Float(&t.beta1)},
      {"beta2", Float(&t.beta2)},
      {"adam_eps", Float(&t.adam_eps)},
      {"weight_decay", Float(&t.weight_decay)},
      {"grad_clip", Float(&t.grad_clip)},
      {"mtp_lambda", Float(&t.mtp_lambda)},
      {"balance_alpha", Float(&t.balance_alpha)},
      {"bias_update_gamma", Float(&t.bias_update_gamma)},
      {"eval_every", Int(&t.eval_every)},
      {"eval_batches", Int(&t.eval_batches)},
      {"log_every", Int(&t.log_every)},
      {"threads", Int(&t.threads)},
      {"device", String(&t.device)},
  };
}

std::vector<Field> DataFields(DataConfig& d) {
  return {
      {"train_shards", StringArray(&d.train_shards)},
      {"val_shards", StringArray(&d.val_shards)},
      {"tokenizer", String(&d.tokenizer)},
  };
}

std::vector<Field> CheckpointFields(CheckpointConfig& c) {
  return {
      {"every", Int(&c.every)},           {"keep_last", Int(&c.keep_last)},
      {"keep_every", Int(&c.keep_every)}, {"replication", Int(&c.replication)},
      {"stores", Int(&c.stores)},         {"shards_per_tensor", Int(&c.shards_per_tensor)},
  };
}

std::vector<Field> ParallelFields(ParallelConfig& p) {
  return {
      {"pp", Int(&p.pp)},
      {"ep", Int(&p.ep)},
      {"dp", Int(&p.dp)},
      {"schedule", String(&p.schedule)},
      {"micro_batches", Int(&p.micro_batches)},
      {"zero1", Bool(&p.zero1)},
      {"split_w", Bool(&p.split_w)},
      {"overlap_pairs", String(&p.overlap_pairs)},
      {"device_comm", String(&p.device_comm)},
  };
}

// Reads every key of one section table, in file order, so the first error
// reported is the first one in the file.
Status ReadSection(const toml::table& table, const std::string& section, const std::vector<Field>& fields,
                   const std::string& file) {
  std::vector<std::pair<std::string, const toml::node*>> keys;
  for (const auto& [k, node] : table) keys.emplace_back(std::string(k.str()), &node);
  std::stable_sort(keys.begin(), keys.end(),
                   [](const auto& a, const auto& b) { return a.second->source().begin < b.second->source().begin; });
  for (const auto& [name, node] : keys) {
    const std::string key = section + "." + name;
    const std::string at = Where(file, *node);
    auto it = std::find_if(fields.begin(), fields.end(), [&name](const Field& f) { return name == f.name; });
    if (it == fields.end()) return Status::InvalidArgument(at + "unknown key " + key + " in [" + section + "]");
    TROUPE_RETURN_IF_ERROR(it->read(*node, key, at));
  }
  return Status::Ok();
}

// Rules on [data] (config.h has no ValidateDataConfig; they are few).
Status ValidateDataConfig(const DataConfig& d) {
  if (d.train_shards.empty()) return Status::InvalidArgument("data.train_shards is empty (need at least one shard)");
  return Status::Ok();
}

Status Positive(const char* key, double v) {
  if (v > 0) return Status::Ok();
  return Status::InvalidArgument(std::string(key) + " = " + Num(v) + " must be > 0");
}

Status AtLeast(const char* key, double v, double lo) {
  if (v >= lo) return Status::Ok();
  return Status::InvalidArgument(std::string(key) + " = " + Num(v) + " must be >= " + Num(lo));
}

// lo <= v < hi (half_open) or lo <= v <= hi.
Status InRange(const char* key, double v, double lo, double hi, bool half_open) {
  const bool ok = v >= lo && (half_open ? v < hi : v <= hi);
  if (ok) return Status::Ok();
  return Status::InvalidArgument(std::string(key) + " = " + Num(v) + " must be in [" + Num(lo) + ", " + Num(hi) +
                                 (half_open ? ")" : "]"));
}

std::string KV(const char* key, int v) { return std::string(key) + " = " + std::to_string(v); }

}  // namespace

// ---------------------------------------------------------------------------
// Validation

Status ValidateModelConfig(const ModelConfig& m) {
  TROUPE_RETURN_IF_ERROR(Positive("model.vocab_size", m.vocab_size));
  if (m.vocab_size > 65536) {
    return Status::InvalidArgument(KV("model.vocab_size", m.vocab_size) +
                                   " exceeds 65536: the llm.c .bin shards store tokens as uint16");
  }
  TROUPE_RETURN_IF_ERROR(Positive("model.hidden_size", m.hidden_size));
  TROUPE_RETURN_IF_ERROR(Positive("model.num_hidden_layers", m.num_hidden_layers));
  TROUPE_RETURN_IF_ERROR(Positive("model.num_attention_heads", m.num_attention_heads));
  TROUPE_RETURN_IF_ERROR(Positive("model.q_lora_rank", m.q_lora_rank));
  TROUPE_RETURN_IF_ERROR(Positive("model.kv_lora_rank", m.kv_lora_rank));
  TROUPE_RETURN_IF_ERROR(Positive("model.qk_nope_head_dim", m.qk_nope_head_dim));
  TROUPE_RETURN_IF_ERROR(Positive("model.qk_rope_head_dim", m.qk_rope_head_dim));
  if (m.qk_rope_head_dim % 2 != 0) {
    return Status::InvalidArgument(KV("model.qk_rope_head_dim", m.qk_rope_head_dim) +
                                   " must be even: RoPE rotates pairs (2j, 2j+1)");
  }
  TROUPE_RETURN_IF_ERROR(Positive("model.v_head_dim", m.v_head_dim));
  TROUPE_RETURN_IF_ERROR(AtLeast("model.first_k_dense_replace", m.first_k_dense_replace, 0));
  if (m.first_k_dense_replace > m.num_hidden_layers) {
    return Status::InvalidArgument(KV("model.first_k_dense_replace", m.first_k_dense_replace) + " exceeds " +
                                   KV("model.num_hidden_layers", m.num_hidden_layers));
  }
  if (m.first_k_dense_replace > 0) TROUPE_RETURN_IF_ERROR(Positive("model.intermediate_size", m.intermediate_size));
  TROUPE_RETURN_IF_ERROR(AtLeast("model.num_nextn_predict_layers", m.num_nextn_predict_layers, 0));
  TROUPE_RETURN_IF_ERROR(Positive("model.rms_norm_eps", m.rms_norm_eps));
  TROUPE_RETURN_IF_ERROR(Positive("model.rope_theta", m.rope_theta));
  TROUPE_RETURN_IF_ERROR(Positive("model.init_std", m.init_std));

  // Expert settings matter only when some layer is MoE: the layers after the
  // dense ones, and every MTP module (an MoE layer, as in DeepSeek-V3).
  const bool has_moe = m.first_k_dense_replace < m.num_hidden_layers || m.num_nextn_predict_layers > 0;
  if (!has_moe) return Status::Ok();
  TROUPE_RETURN_IF_ERROR(Positive("model.moe_intermediate_size", m.moe_intermediate_size));
  TROUPE_RETURN_IF_ERROR(Positive("model.n_routed_experts", m.n_routed_experts));
  TROUPE_RETURN_IF_ERROR(AtLeast("model.n_shared_experts", m.n_shared_experts, 0));
  TROUPE_RETURN_IF_ERROR(Positive("model.num_experts_per_tok", m.num_experts_per_tok));
  TROUPE_RETURN_IF_ERROR(Positive("model.n_group", m.n_group));
  TROUPE_RETURN_IF_ERROR(Positive("model.topk_group", m.topk_group));
  TROUPE_RETURN_IF_ERROR(Positive("model.routed_scaling_factor", m.routed_scaling_factor));
  if (m.num_experts_per_tok > m.n_routed_experts) {
    return Status::InvalidArgument(KV("model.num_experts_per_tok", m.num_experts_per_tok) + " exceeds " +
                                   KV("model.n_routed_experts", m.n_routed_experts));
  }
  if (m.topk_group > m.n_group) {
    return Status::InvalidArgument(KV("model.topk_group", m.topk_group) + " exceeds " + KV("model.n_group", m.n_group) +
                                   " (a token cannot use more groups than exist)");
  }
  if (m.n_routed_experts % m.n_group != 0) {
    return Status::InvalidArgument(KV("model.n_group", m.n_group) + " does not divide " +
                                   KV("model.n_routed_experts", m.n_routed_experts));
  }
  const int per_group = m.n_routed_experts / m.n_group;
  if (m.num_experts_per_tok > m.topk_group * per_group) {
    return Status::InvalidArgument(KV("model.num_experts_per_tok", m.num_experts_per_tok) + " exceeds " +
                                   KV("model.topk_group", m.topk_group) + " groups x " + std::to_string(per_group) +
                                   " experts per group = " + std::to_string(m.topk_group * per_group) +
                                   " reachable experts");
  }
  return Status::Ok();
}

Status ValidateTrainConfig(const TrainConfig& t) {
  TROUPE_RETURN_IF_ERROR(AtLeast("train.seq_len", t.seq_len, 2));
  TROUPE_RETURN_IF_ERROR(AtLeast("train.batch_size", t.batch_size, 1));
  TROUPE_RETURN_IF_ERROR(AtLeast("train.steps", t.steps, 1));
  TROUPE_RETURN_IF_ERROR(Positive("train.lr", t.lr));
  TROUPE_RETURN_IF_ERROR(InRange("train.min_lr_ratio", t.min_lr_ratio, 0.0, 1.0, /*half_open=*/false));
  TROUPE_RETURN_IF_ERROR(AtLeast("train.warmup_steps", t.warmup_steps, 0));
  TROUPE_RETURN_IF_ERROR(InRange("train.beta1", t.beta1, 0.0, 1.0, /*half_open=*/true));
  TROUPE_RETURN_IF_ERROR(InRange("train.beta2", t.beta2, 0.0, 1.0, /*half_open=*/true));
  TROUPE_RETURN_IF_ERROR(Positive("train.adam_eps", t.adam_eps));
  TROUPE_RETURN_IF_ERROR(AtLeast("train.weight_decay", t.weight_decay, 0.0));
  TROUPE_RETURN_IF_ERROR(AtLeast("train.grad_clip", t.grad_clip, 0.0));
  TROUPE_RETURN_IF_ERROR(AtLeast("train.mtp_lambda", t.mtp_lambda, 0.0));
  TROUPE_RETURN_IF_ERROR(AtLeast("train.balance_alpha", t.balance_alpha, 0.0));
  TROUPE_RETURN_IF_ERROR(AtLeast("train.bias_update_gamma", t.bias_update_gamma, 0.0));
  TROUPE_RETURN_IF_ERROR(AtLeast("train.eval_every", t.eval_every, 0));
  TROUPE_RETURN_IF_ERROR(AtLeast("train.eval_batches", t.eval_batches, 1));
  TROUPE_RETURN_IF_ERROR(AtLeast("train.log_every", t.log_every, 1));
  TROUPE_RETURN_IF_ERROR(AtLeast("train.threads", t.threads, 0));
  if (t.device != "auto" && t.device != "cpu" && t.device != "cuda") {
    return Status::InvalidArgument("train.device = \"" + t.device + "\" is not a device (auto | cpu | cuda)");
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Parsing

Expected<JobConfig> ParseConfigText(const std::string& toml_text, const std::string& source_name) {
  toml::table root;
  try {
    root = toml::parse(toml_text, source_name);
  } catch (const toml::parse_error& e) {
    const auto& b = e.source().begin;
    return Status::InvalidArgument(source_name + ":" + std::to_string(b.line) + ":" + std::to_string(b.column) +
                                   ": malformed TOML: " + std::string(e.description()));
  } catch (const std::exception& e) {
    return Status::Internal(source_name + ": TOML parser failed: " + e.what());
  }

  JobConfig job;
  job.source_path = source_name;
  job.toml_text = toml_text;
  const std::vector<std::pair<const char*, std::vector<Field>>> sections = {
      {"model", ModelFields(job.model)},
      {"train", TrainFields(job.train)},
      {"data", DataFields(job.data)},
      {"checkpoint", CheckpointFields(job.checkpoint)},
      {"parallel", ParallelFields(job.parallel)},
  };

  std::vector<std::pair<std::string, const toml::node*>> top;
  for (const auto& [k, node] : root) top.emplace_back(std::string(k.str()), &node);
  std::stable_sort(top.begin(), top.end(),
                   [](const auto& a, const auto& b) { return a.second->source().begin < b.second->source().begin; });
  for (const auto& [name, node] : top) {
    const std::string at = Where(source_name, *node);
    auto it = std::find_if(sections.begin(), sections.end(), [&name](const auto& s) { return name == s.first; });
    if (it == sections.end()) {
      if (node->is_table()) {
        return Status::InvalidArgument(at + "unknown section [" + name +
                                       "] (sections: model, train, data, checkpoint, parallel)");
      }
      return Status::InvalidArgument(at + "unknown top-level key " + name +
                                     " (every key belongs in [model], [train], [data], [checkpoint] or [parallel])");
    }
    const auto* table = node->as_table();
    if (table == nullptr) {
      return Status::InvalidArgument(at + name + " = " + Show(*node) + " has type " + TypeName(node->type()) +
                                     ", expected a table [" + name + "]");
    }
    TROUPE_RETURN_IF_ERROR(ReadSection(*table, name, it->second, source_name));
  }

  TROUPE_RETURN_IF_ERROR(ValidateModelConfig(job.model).WithContext(source_name));
  TROUPE_RETURN_IF_ERROR(ValidateTrainConfig(job.train).WithContext(source_name));
  TROUPE_RETURN_IF_ERROR(ValidateDataConfig(job.data).WithContext(source_name));
  TROUPE_RETURN_IF_ERROR(ValidateCheckpointConfig(job.checkpoint).WithContext(source_name));
  TROUPE_RETURN_IF_ERROR(ValidateParallelConfig(job.parallel).WithContext(source_name));
  return job;
}

Status ValidateParallelConfig(const ParallelConfig& p) {
  TROUPE_RETURN_IF_ERROR(AtLeast("parallel.pp", p.pp, 1));
  TROUPE_RETURN_IF_ERROR(AtLeast("parallel.ep", p.ep, 1));
  TROUPE_RETURN_IF_ERROR(AtLeast("parallel.dp", p.dp, 0));
  TROUPE_RETURN_IF_ERROR(AtLeast("parallel.micro_batches", p.micro_batches, 0));
  if (p.schedule != "1f1b" && p.schedule != "zb1p" && p.schedule != "dualpipe" && p.schedule != "dualpipev")
    return Status::InvalidArgument("parallel.schedule = \"" + p.schedule +
                                   "\" is not a schedule (1f1b | zb1p | dualpipe | dualpipev)");
  if (p.overlap_pairs != "auto" && p.overlap_pairs != "on" && p.overlap_pairs != "off")
    return Status::InvalidArgument("parallel.overlap_pairs = \"" + p.overlap_pairs + "\" is not auto | on | off");
  if (p.device_comm != "auto" && p.device_comm != "nccl" && p.device_comm != "host")
    return Status::InvalidArgument("parallel.device_comm = \"" + p.device_comm + "\" is not auto | nccl | host");
  return Status::Ok();
}

Status ValidateCheckpointConfig(const CheckpointConfig& c) {
  TROUPE_RETURN_IF_ERROR(AtLeast("checkpoint.every", c.every, 0));
  TROUPE_RETURN_IF_ERROR(AtLeast("checkpoint.keep_last", c.keep_last, 1));
  TROUPE_RETURN_IF_ERROR(AtLeast("checkpoint.keep_every", c.keep_every, 0));
  TROUPE_RETURN_IF_ERROR(AtLeast("checkpoint.replication", c.replication, 0));
  TROUPE_RETURN_IF_ERROR(AtLeast("checkpoint.stores", c.stores, 1));
  TROUPE_RETURN_IF_ERROR(AtLeast("checkpoint.shards_per_tensor", c.shards_per_tensor, 1));
  return Status::Ok();
}

int EffectiveReplication(const CheckpointConfig& c, int stores) {
  if (stores < 1) return 0;
  return c.replication > 0 ? std::min(c.replication, stores) : std::min(2, stores);
}

Expected<JobConfig> LoadConfigFile(const std::string& path) {
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(st)) {
    return Status::NotFound(path + ": config file not found");
  }
  if (std::filesystem::is_directory(st)) return Status::IOError(path + ": is a directory, not a config file");
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::IOError(path + ": cannot open config file: " + std::strerror(errno));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return Status::IOError(path + ": read failed: " + std::strerror(errno));
  return ParseConfigText(text.str(), path);
}

}  // namespace troupe
