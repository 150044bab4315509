// troupe ckpt: browse and manage a checkpoint folder (the catalog plus its
// shard stores, as `troupe train --checkpoint-every` writes them).
//
//   troupe ckpt --dir D ls | show ID | tensors ID | stats ID TENSOR | diff A B |
//                       verify ID | export ID --out F.safetensors | pin ID | unpin ID | rm ID
//   [--store ID=DIR ...]   more stores to read (a cluster: --dir is the
//                          coordinator's data folder, DIR each node's)
// Reading actions open everything read-only (no lock: they work while the
// run or the cluster that writes the folder is up).
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "gpu/cpu/cpu_backend.h"
#include "storage/model_weights.h"
#include "train/checkpointer.h"

namespace troupe::cli {
namespace {

struct CkptFlags {
  std::string dir;
  std::string action;
  std::vector<std::string> args;
  std::string format = "safetensors";
  std::string out;
  std::vector<std::string> stores;  // ID=DIR: more shard stores (a cluster node's)
};

// --store ID=DIR: DIR is a shard store (holding shards/) or a node's data
// folder (holding store/shards/), opened for reading only.
Status AddStores(const std::vector<std::string>& specs, CheckpointFolder& f) {
  namespace fs = std::filesystem;
  for (const std::string& spec : specs) {
    const size_t eq = spec.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == spec.size())
      return Status::InvalidArgument("--store " + spec + ": expected ID=DIR (the store id manifests name, e.g. n1)");
    const std::string id = spec.substr(0, eq);
    std::string dir = spec.substr(eq + 1);
    std::error_code ec;
    if (!fs::is_directory(dir + "/shards", ec) && fs::is_directory(dir + "/store/shards", ec)) dir += "/store";
    if (f.store_set.count(id)) return Status::InvalidArgument("--store " + spec + ": store " + id + " is open already");
    auto store = ckpt::ShardStore::OpenReadOnly(dir, id);
    if (!store.ok()) return store.status().WithContext("--store " + spec);
    f.store_set[id] = store->get();
    f.stores.push_back(std::move(store).value());
  }
  return Status::Ok();
}

std::string Shape(const std::vector<int64_t>& s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

std::string Time(int64_t unix_ms) {
  const std::time_t t = static_cast<std::time_t>(unix_ms / 1000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%SZ", &tm);
  return buf;
}

// The tensor's values as doubles (F32, F64 and BF16 checkpoints).
Expected<std::vector<double>> Values(const ckpt::TensorRecord& t, const std::vector<uint8_t>& bytes) {
  std::vector<double> v;
  if (t.dtype == "F32") {
    v.resize(bytes.size() / 4);
    for (size_t i = 0; i < v.size(); ++i) {
      float f;
      std::memcpy(&f, bytes.data() + 4 * i, 4);
      v[i] = f;
    }
  } else if (t.dtype == "F64") {
    v.resize(bytes.size() / 8);
    std::memcpy(v.data(), bytes.data(), v.size() * 8);
  } else if (t.dtype == "BF16") {
    v.resize(bytes.size() / 2);
    for (size_t i = 0; i < v.size(); ++i) {
      BF16 b;
      std::memcpy(&b.bits, bytes.data() + 2 * i, 2);
      v[i] = b.ToFloat();
    }
  } else {
    return Status::InvalidArgument("tensor " + t.name + " has dtype " + t.dtype + " (stats read F32, F64, BF16)");
  }
  return v;
}

Expected<std::vector<double>> ReadValues(const ckpt::Manifest& m, const std::string& name,
                                         const ckpt::StoreSet& stores) {
  const ckpt::TensorRecord* t = m.Find(name);
  if (!t)
    return Status::NotFound("checkpoint " + m.id + " has no tensor '" + name + "' (see: troupe ckpt tensors " + m.id +
                            ")");
  TROUPE_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, ckpt::ReadRows(*t, m.id, 0, t->rows(), stores));
  return Values(*t, bytes);
}

int Ls(CheckpointFolder& f) {
  auto all = f.catalog->List();
  if (!all.ok()) return Fail(all.status());
  std::printf("%-12s %8s %-9s %-21s %10s %4s %6s %10s %10s\n", "id", "step", "phase", "created (UTC)", "MiB", "r",
              "pinned", "loss", "val_loss");
  for (const ckpt::Manifest& m : *all) {
    auto metric = [&](const char* k) {
      auto it = m.metrics.find(k);
      return it == m.metrics.end() ? std::nan("") : it->second;
    };
    std::printf("%-12s %8" PRId64 " %-9s %-21s %10.1f %4d %6s %10.4f %10.4f\n", m.id.c_str(), m.step, m.phase.c_str(),
                Time(m.created_unix_ms).c_str(), m.TotalBytes() / 1048576.0, m.replication, m.pinned ? "yes" : "",
                metric("loss"), metric("val_loss"));
  }
  if (all->empty()) std::printf("(no committed checkpoints)\n");
  return 0;
}

int Show(const ckpt::Manifest& m) {
  nlohmann::json j = nlohmann::json::parse(ckpt::EncodeManifest(m));
  const size_t n = j["tensors"].size();
  j.erase("tensors");
  j.erase("config_text");
  j["tensor_count"] = n;
  j["total_bytes"] = m.TotalBytes();
  j["created_utc"] = Time(m.created_unix_ms);
  std::printf("%s\nconfig:\n%s\n", j.dump(2).c_str(), m.config_text.c_str());
  return 0;
}

int Tensors(const ckpt::Manifest& m) {
  std::printf("%-64s %-5s %-20s %12s %-8s %s\n", "name", "dtype", "shape", "bytes", "crc32c", "shards (rows: stores)");
  for (const ckpt::TensorRecord& t : m.tensors) {
    std::printf("%-64s %-5s %-20s %12" PRIu64 " %08x", t.name.c_str(), t.dtype.c_str(), Shape(t.shape).c_str(), t.bytes,
                t.crc32c);
    for (const ckpt::ShardRef& s : t.shards) {
      std::printf(" [%" PRId64 ",%" PRId64 "):", s.row_begin, s.row_end);
      for (size_t i = 0; i < s.stores.size(); ++i) std::printf("%s%s", i ? "," : "", s.stores[i].c_str());
    }
    std::printf("\n");
  }
  return 0;
}

int Stats(const ckpt::Manifest& m, const std::string& name, const ckpt::StoreSet& stores) {
  auto v = ReadValues(m, name, stores);
  if (!v.ok()) return Fail(v.status());
  double sum = 0, sq = 0, lo = std::numeric_limits<double>::infinity(), hi = -lo, amax = 0;
  int64_t nonfinite = 0, zeros = 0;
  for (double x : *v) {
    if (!std::isfinite(x)) {
      ++nonfinite;
      continue;
    }
    sum += x;
    sq += x * x;
    lo = std::min(lo, x);
    hi = std::max(hi, x);
    amax = std::max(amax, std::fabs(x));
    zeros += x == 0;
  }
  const double n = static_cast<double>(v->size() - nonfinite);
  const double mean = n ? sum / n : 0, var = n ? std::max(0.0, sq / n - mean * mean) : 0;
  std::printf(
      "%s %s: %zu values\n  mean %.6g  std %.6g  rms %.6g\n  min %.6g  max %.6g  absmax %.6g\n"
      "  zeros %" PRId64 "  nan/inf %" PRId64 "\n",
      m.id.c_str(), name.c_str(), v->size(), mean, std::sqrt(var), n ? std::sqrt(sq / n) : 0, lo, hi, amax, zeros,
      nonfinite);
  return 0;
}

int Diff(const ckpt::Manifest& a, const ckpt::Manifest& b, const ckpt::StoreSet& stores) {
  std::printf("%s (step %" PRId64 ") vs %s (step %" PRId64 ")%s\n", a.id.c_str(), a.step, b.id.c_str(), b.step,
              a.config_hash == b.config_hash ? "; same config" : "; configs differ");
  int differing = 0;
  for (const ckpt::TensorRecord& ta : a.tensors) {
    const ckpt::TensorRecord* tb = b.Find(ta.name);
    if (!tb) {
      std::printf("  only in %s: %s\n", a.id.c_str(), ta.name.c_str());
      ++differing;
      continue;
    }
    if (ta.shape != tb->shape || ta.dtype != tb->dtype) {
      std::printf("  %s: %s %s vs %s %s\n", ta.name.c_str(), ta.dtype.c_str(), Shape(ta.shape).c_str(),
                  tb->dtype.c_str(), Shape(tb->shape).c_str());
      ++differing;
      continue;
    }
    if (ta.crc32c == tb->crc32c && ta.bytes == tb->bytes) continue;  // same bytes (up to CRC collisions)
    auto va = ReadValues(a, ta.name, stores);
    if (!va.ok()) return Fail(va.status());
    auto vb = ReadValues(b, ta.name, stores);
    if (!vb.ok()) return Fail(vb.status());
    double maxabs = 0, d2 = 0, n2 = 0;
    for (size_t i = 0; i < va->size(); ++i) {
      const double d = (*va)[i] - (*vb)[i];
      maxabs = std::max(maxabs, std::fabs(d));
      d2 += d * d;
      n2 += (*va)[i] * (*va)[i];
    }
    std::printf("  %-64s max|a-b| %.3e  rel L2 %.3e\n", ta.name.c_str(), maxabs, n2 > 0 ? std::sqrt(d2 / n2) : 0.0);
    ++differing;
  }
  for (const ckpt::TensorRecord& tb : b.tensors)
    if (!a.Find(tb.name)) {
      std::printf("  only in %s: %s\n", b.id.c_str(), tb.name.c_str());
      ++differing;
    }
  std::printf("%d of %zu tensors differ\n", differing, a.tensors.size());
  return 0;
}

int Verify(const ckpt::Manifest& m, const ckpt::StoreSet& stores) {
  std::vector<std::string> problems;
  Status s = ckpt::VerifyCheckpoint(m, stores, &problems);
  // Stores this folder does not have (a cluster node's) are one line each, not one per shard.
  std::set<std::string> absent;
  for (const auto& t : m.tensors)
    for (const auto& ref : t.shards)
      for (const std::string& id : ref.stores)
        if (!stores.count(id)) absent.insert(id);
  size_t shown = 0;
  for (const std::string& p : problems) {
    if (p.find("is not available") != std::string::npos) continue;
    if (++shown <= 20) std::printf("  bad copy: %s\n", p.c_str());
  }
  if (shown > 20) std::printf("  ... and %zu more bad copies\n", shown - 20);
  for (const std::string& id : absent)
    std::printf("  store %s is not open here: its copies were not checked (--store %s=DIR reads it)\n", id.c_str(),
                id.c_str());
  if (!s.ok()) return Fail(s);
  size_t shards = 0;
  for (const auto& t : m.tensors) shards += t.shards.size();
  std::printf("%s: every one of %zu shards has a good copy (%zu bad copies found)\n", m.id.c_str(), shards,
              problems.size());
  return 0;
}

int Export(const ckpt::Manifest& m, const ckpt::StoreSet& stores, const CkptFlags& f) {
  if (f.format != "safetensors") return Fail(Status::InvalidArgument("--format " + f.format + ": only safetensors"));
  if (f.out.empty()) return Fail(Status::InvalidArgument("export needs --out FILE.safetensors"));
  auto job = ParseConfigText(m.config_text, m.id + " config");
  if (!job.ok()) return Fail(job.status());
  CpuBackend be(1);
  auto params = AllocateParams(be, job->model, DType::kF32);
  if (!params.ok()) return Fail(params.status());
  for (const ParamRef& p : ListParams(*params)) {
    const ckpt::TensorRecord* t = m.Find(p.name);
    if (!t) return Fail(Status::Corruption(m.id + " lacks parameter " + p.name));
    if (t->dtype != "F32" || t->shape != p.tensor->shape())
      return Fail(Status::Corruption(m.id + " parameter " + p.name + " is " + t->dtype + " " + Shape(t->shape) +
                                     ", its config wants F32 " + p.tensor->ShapeString()));
    auto bytes = ckpt::ReadRows(*t, m.id, 0, t->rows(), stores);
    if (!bytes.ok()) return Fail(bytes.status());
    be.CopyFromHost(*p.tensor, bytes->data());
  }
  Status st = ExportWeights(be, job->model, *params, f.out,
                            {{"config", m.config_text}, {"step", std::to_string(m.step)}, {"checkpoint", m.id}});
  if (!st.ok()) return Fail(st);
  std::printf("wrote %s: %s at step %" PRId64 " in the DeepSeek-V3 layout\n", f.out.c_str(), m.id.c_str(), m.step);
  return 0;
}

int RunCkpt(const CkptFlags& f) {
  // Browsing takes no lock: it works beside the run or cluster that writes the folder.
  const bool changes = f.action == "pin" || f.action == "unpin" || f.action == "rm";
  if (changes && !f.stores.empty())
    return Fail(
        Status::InvalidArgument("--store is for reading; " + f.action + " changes only the folder's own stores"));
  auto folder = OpenCheckpointFolder(f.dir, !changes);
  if (!folder.ok() && changes)
    return Fail(folder.status().WithContext(f.action + " needs the folder to itself (is the run or coordinator "
                                                       "that writes it still up?)"));
  if (!folder.ok()) return Fail(folder.status());
  CheckpointFolder& cf = *folder;
  Status added = AddStores(f.stores, cf);
  if (!added.ok()) return Fail(added);
  const size_t want = f.action == "ls" ? 0 : (f.action == "stats" || f.action == "diff") ? 2 : 1;
  if (f.args.size() != want)
    return Fail(Status::InvalidArgument("ckpt " + f.action + " takes " + std::to_string(want) + " argument(s), got " +
                                        std::to_string(f.args.size())));
  if (f.action == "ls") return Ls(cf);
  auto m = cf.catalog->Get(f.args[0]);
  if (!m.ok()) return Fail(m.status());
  if (f.action == "show") return Show(*m);
  if (f.action == "tensors") return Tensors(*m);
  if (f.action == "stats") return Stats(*m, f.args[1], cf.store_set);
  if (f.action == "verify") return Verify(*m, cf.store_set);
  if (f.action == "export") return Export(*m, cf.store_set, f);
  if (f.action == "diff") {
    auto b = cf.catalog->Get(f.args[1]);
    if (!b.ok()) return Fail(b.status());
    return Diff(*m, *b, cf.store_set);
  }
  if (f.action == "pin" || f.action == "unpin") {
    Status s = cf.catalog->SetPinned(m->id, f.action == "pin");
    if (!s.ok()) return Fail(s);
    std::printf("%s %s\n", m->id.c_str(), f.action == "pin" ? "pinned: retention keeps it" : "unpinned");
    return 0;
  }
  if (f.action == "rm") {
    if (m->pinned) return Fail(Status::InvalidArgument(m->id + " is pinned; `troupe ckpt unpin " + m->id + "` first"));
    Status s = cf.catalog->Remove(m->id);  // the manifest first: shards without one are garbage
    if (!s.ok()) return Fail(s);
    for (auto& [id, store] : cf.store_set) {
      s = store->Drop(m->id);
      if (!s.ok()) return Fail(s.WithContext(m->id + " is no longer listed, but its shards remain"));
    }
    std::printf("removed %s\n", m->id.c_str());
    return 0;
  }
  return Fail(Status::InvalidArgument("unknown ckpt action '" + f.action + "'"));
}

}  // namespace

void AddCkptCommand(CLI::App& app, RunFn& run) {
  auto flags = std::make_shared<CkptFlags>();
  CLI::App* cmd = app.add_subcommand("ckpt", "browse and manage checkpoints");
  cmd->add_option("--dir", flags->dir, "checkpoint folder (e.g. runs/tiny/checkpoints)")->required();
  cmd->add_option("action", flags->action, "ls | show | tensors | stats | diff | verify | export | pin | unpin | rm")
      ->required()
      ->check(CLI::IsMember({"ls", "show", "tensors", "stats", "diff", "verify", "export", "pin", "unpin", "rm"}));
  cmd->add_option("args", flags->args, "checkpoint id(s), tensor name");
  cmd->add_option("--format", flags->format, "export format (safetensors)");
  cmd->add_option("--out", flags->out, "export: the file to write");
  cmd->add_option("--store", flags->stores,
                  "ID=DIR: also read shard store ID from DIR (a cluster node's --data folder, or a store folder)");
  cmd->callback([flags, &run] { run = [flags] { return RunCkpt(*flags); }; });
}

}  // namespace troupe::cli
