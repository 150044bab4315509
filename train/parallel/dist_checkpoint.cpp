#include "train/parallel/dist_checkpoint.h"

#include <algorithm>
#include <cereal/types/string.hpp>
#include <cereal/types/vector.hpp>
#include <chrono>
#include <filesystem>
#include <set>
#include <thread>

#include "actors/transport/codec.h"
#include "train/parallel/tags.h"

namespace troupe::ckpt {

template <class Archive>
void serialize(Archive& ar, ShardRef& r) {
  ar(r.row_begin, r.row_end, r.crc32c, r.stores);
}

template <class Archive>
void serialize(Archive& ar, PieceRecord& p) {
  ar(p.name, p.dtype, p.shape, p.row_bytes, p.shard);
}

template <class Archive>
void serialize(Archive& ar, HostPiece& p) {
  ar(p.name, p.dtype, p.shape, p.row_begin, p.row_end, p.bytes);
}

}  // namespace troupe::ckpt

namespace troupe::parallel {
namespace {

// A folder's RocksDB admits one writer. When a cluster job is replanned, a
// stopped attempt's rank may still be closing the catalog or a store that
// the next attempt's rank opens: wait for it, longer than a rank waits for
// a peer (a partitioned node's rank holds on until then).
template <class OpenFn>
auto OpenWhenFree(OpenFn&& open) -> decltype(open()) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(180);
  for (;;) {
    auto r = open();
    if (r.ok() || r.status().message().find("lock") == std::string::npos ||
        std::chrono::steady_clock::now() >= deadline)
      return r;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

// Messages between the ranks: tag kind kCheckpoint, index CheckpointMessage (tags.h).
constexpr uint64_t kOrderTag = kCkptOrder, kReportTag = kCkptReport, kResumeTag = kCkptResume,
                   kReplicaTag = kCkptReplica;

constexpr int kWriteWaitMs = 30 * 60 * 1000;

// Rank 0 -> every rank: save under `id`; `keep` are the committed ids. An
// `error` (no id could be reserved) makes every rank skip this save.
struct SaveOrder {
  std::string id, error;
  std::vector<std::string> keep;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(id, error, keep);
  }
};

// Every rank -> rank 0: what it wrote for `id` (its own pieces and the
// replicas it keeps for other ranks), or why it could not.
struct PieceReport {
  std::string id, error;
  std::vector<ckpt::PieceRecord> pieces;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(id, error, pieces);
  }
};

// Rank 0 -> every rank: the manifest to resume from (JSON), or the error.
struct ResumeOrder {
  std::string manifest, error;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(manifest, error);
  }
};

// Rank r -> its successors: how many replica pieces follow for `id`, then
// each piece (a ckpt::HostPiece).
struct ReplicaHeader {
  std::string id;
  uint64_t pieces = 0;
  template <class Archive>
  void serialize(Archive& ar) {
    ar(id, pieces);
  }
};
template <typename T>
Expected<T> RecvMessage(ProcessGroup& g, int peer, uint64_t index, int timeout_ms, const std::string& what) {
  TROUPE_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, g.Recv(peer, Tag(TagKind::kCheckpoint, index), timeout_ms));
  auto v = transport::Deserialize<T>(bytes);
  if (!v.ok()) return v.status().WithContext(what + " from rank " + std::to_string(peer));
  return v;
}

template <typename T>
Status SendMessage(ProcessGroup& g, int peer, uint64_t index, const T& value) {
  return g.Send(peer, Tag(TagKind::kCheckpoint, index), transport::Serialize(value));
}

}  // namespace

DistCheckpointer::DistCheckpointer(const std::string& dir, const CheckpointConfig& config, ProcessGroup& group,
                                   int timeout_ms)
    : dir_(dir),
      config_(config),
      group_(group),
      timeout_ms_(timeout_ms),
      // Saves wait on other ranks' disks, not only their messages: a save of
      // many GiB takes minutes. A rank that dies is the launcher's to notice
      // (it stops the job), so these waits may be long.
      write_wait_ms_(timeout_ms < 0 ? timeout_ms : std::max(timeout_ms, kWriteWaitMs)) {}

Expected<std::unique_ptr<DistCheckpointer>> DistCheckpointer::Open(const std::string& dir,
                                                                   const CheckpointConfig& config, ProcessGroup& group,
                                                                   int timeout_ms) {
  TROUPE_RETURN_IF_ERROR(ValidateCheckpointConfig(config));
  std::unique_ptr<DistCheckpointer> c(new DistCheckpointer(dir, config, group, timeout_ms));
  if (group.rank() == 0) {
    TROUPE_ASSIGN_OR_RETURN(c->catalog_, OpenWhenFree([&] { return ckpt::Catalog::Open(dir); }));
  }
  c->worker_ = std::make_unique<SaveWorker<Job>>([p = c.get()](Job& job) { return p->Run(job); });
  return c;
}

DistCheckpointer::~DistCheckpointer() {
  worker_.reset();  // the save in flight ends first
  ckpt::StagingPool::Shared().Clear();
}

Expected<ckpt::Manifest> DistCheckpointer::Resume(const std::string& which, DistributedTrainer& trainer,
                                                  ckpt::ReadStats* stats) {
  ResumeOrder order;
  if (group_.rank() == 0) {
    auto m = which == "latest" ? catalog_->Latest() : catalog_->Get(which);
    if (m.ok()) {
      order.manifest = ckpt::EncodeManifest(*m);
    } else {
      order.error = m.status().message();
    }
    for (int r = 1; r < group_.size(); ++r)
      TROUPE_RETURN_IF_ERROR(SendMessage(group_, r, kResumeTag, order).WithContext("resume"));
  } else {
    TROUPE_ASSIGN_OR_RETURN(order, RecvMessage<ResumeOrder>(group_, 0, kResumeTag, timeout_ms_, "resume order"));
  }
  if (!order.error.empty()) return Status::NotFound(order.error);
  TROUPE_ASSIGN_OR_RETURN(ckpt::Manifest m, ckpt::DecodeManifest(order.manifest));
  // Every store the manifest names, for reading only: other ranks read them too.
  ReadableStores readable = OpenStoresFor(dir_, m, {}, stats);
  const ckpt::StoreSet& stores = readable.stores;
  Status s = trainer.Restore(m, [&](const ckpt::TensorRecord& t, int64_t begin, int64_t end) {
    return ckpt::ReadRows(t, m.id, begin, end, stores, stats);
  });
  if (!s.ok()) return s.WithContext("rank " + std::to_string(group_.rank()) + " resuming " + m.id);
  return m;
}

Status DistCheckpointer::Save(DistributedTrainer& trainer, const std::map<std::string, double>& metrics,
                              std::string* skipped) {
  skipped->clear();
  // One save in flight per rank: its pieces are the only staging copy.
  worker_->WaitUntilIdle();
  SaveOrder order;
  if (group_.rank() == 0) {
    auto id = catalog_->ReserveId();
    auto committed = catalog_->List();
    if (!id.ok()) {
      order.error = id.status().message();
    } else if (!committed.ok()) {
      order.error = committed.status().message();
    } else {
      order.id = *id;
      for (const ckpt::Manifest& m : *committed) order.keep.push_back(m.id);
    }
    for (int r = 1; r < group_.size(); ++r)
      TROUPE_RETURN_IF_ERROR(SendMessage(group_, r, kOrderTag, order).WithContext("checkpoint order"));
  } else {
    TROUPE_ASSIGN_OR_RETURN(order, RecvMessage<SaveOrder>(group_, 0, kOrderTag, write_wait_ms_, "checkpoint order"));
  }
  if (!order.error.empty()) {
    *skipped = order.error;
    return Status::Ok();
  }
  Job job;
  job.id = order.id;
  job.keep = std::move(order.keep);
  TROUPE_ASSIGN_OR_RETURN(job.pieces, trainer.CapturePieces());
  if (group_.rank() == 0) {
    job.state = trainer.CaptureRunState(metrics);
    if (model_tensors_.empty()) model_tensors_ = DistributedTrainer::CheckpointTensorNames(trainer.job().model);
  }
  worker_->Submit(std::move(job));
  return Status::Ok();
}

std::optional<SaveResult> DistCheckpointer::Run(Job& job) {
  SaveResult result = Write(job);
  std::vector<std::vector<uint8_t>> buffers;
  for (ckpt::HostPiece& p : job.pieces) buffers.push_back(std::move(p.bytes));
  ckpt::StagingPool::Shared().Recycle(std::move(buffers));  // the next capture copies into these
  if (group_.rank() != 0 && result.status.ok()) return std::nullopt;
  return result;
}

SaveResult DistCheckpointer::Write(Job& job) {
  SaveResult result;
  const auto start = std::chrono::steady_clock::now();
  const int rank = group_.rank(), world = group_.size();
  const int copies = EffectiveReplication(config_, world);
  PieceReport report;
  report.id = job.id;
  Status s;
  if (!store_) {
    auto store = OpenWhenFree([&] { return ckpt::ShardStore::Open(LocalStoreDir(dir_, rank), LocalStoreId(rank)); });
    if (store.ok()) {
      store_ = std::move(store).value();
    } else {
      s = store.status();
    }
  }
  // The replicas go out first (sends do not block), so no rank waits on
  // another's disk before its own pieces are on their way.
  for (int k = 1; k < copies; ++k) {
    const int to = (rank + k) % world;
    Status sent = SendMessage(group_, to, kReplicaTag, ReplicaHeader{job.id, s.ok() ? job.pieces.size() : 0});
    for (const ckpt::HostPiece& p : job.pieces) {
      if (!s.ok() || !sent.ok()) break;
      sent = SendMessage(group_, to, kReplicaTag, p);
    }
    if (s.ok()) s = sent;
  }
  // Whatever no committed checkpoint owns is garbage: crashed or abandoned
  // saves, and the ones retention expired since this rank's last save.
  if (s.ok()) {
    const std::set<std::string> keep(job.keep.begin(), job.keep.end());
    for (const std::string& id : store_->Checkpoints())
      if (!keep.count(id) && id != job.id && s.ok()) s = store_->Drop(id);
  }
  if (s.ok()) {
    auto written = ckpt::WritePieces(job.pieces, job.id, *store_);
    if (written.ok()) {
      report.pieces = std::move(written).value();
    } else {
      s = written.status();
    }
  }
  // The copies this rank keeps for its predecessors.
  for (int k = 1; k < copies; ++k) {
    const int from = (rank - k + world) % world;
    auto header = RecvMessage<ReplicaHeader>(group_, from, kReplicaTag, write_wait_ms_, "replica header");
    if (!header.ok()) {
      if (s.ok()) s = header.status();
      continue;
    }
    std::vector<ckpt::HostPiece> replicas;
    for (uint64_t i = 0; i < header->pieces; ++i) {
      auto piece = RecvMessage<ckpt::HostPiece>(group_, from, kReplicaTag, write_wait_ms_, "replica piece");
      if (!piece.ok()) {
        if (s.ok()) s = piece.status();
        break;
      }
      replicas.push_back(std::move(piece).value());
    }
    if (s.ok() && header->id != job.id)
      s = Status::Corruption("rank " + std::to_string(from) + " sent replicas of " + header->id + " during save " +
                             job.id);
    if (!s.ok() || header->pieces == 0) continue;
    auto written = ckpt::WritePieces(replicas, job.id, *store_);
    if (!written.ok()) {
      s = written.status();
      continue;
    }
    for (ckpt::PieceRecord& r : *written) report.pieces.push_back(std::move(r));
  }
  if (!s.ok()) report.error = "rank " + std::to_string(rank) + ": " + s.message();
  if (rank == 0) {
    result.status = Commit(job, std::move(report.pieces), report.error, &result);
  } else {
    Status sent = SendMessage(group_, 0, kReportTag, report);
    result.status = s.ok() ? sent : s;
  }
  result.write_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

Status DistCheckpointer::Commit(const Job& job, std::vector<ckpt::PieceRecord> own, const std::string& own_error,
                                SaveResult* result) {
  // Every rank's report, even after a failure, so no report of this save is
  // left to be taken for the next one's.
  std::vector<ckpt::PieceRecord> all = std::move(own);
  std::string failed = own_error;
  for (int r = 1; r < group_.size(); ++r) {
    Expected<PieceReport> report = Status::Ok();
    do {  // a report of an earlier save whose commit gave up waiting is stale
      report = RecvMessage<PieceReport>(group_, r, kReportTag, write_wait_ms_, "checkpoint report");
    } while (report.ok() && report->id < job.id);
    if (!report.ok()) return report.status().WithContext("checkpoint save " + job.id + " not committed");
    if (report->id != job.id)
      return Status::Corruption("checkpoint save " + job.id + " not committed: rank " + std::to_string(r) +
                                " reported on " + report->id);
    if (!report->error.empty() && failed.empty()) failed = report->error;
    for (ckpt::PieceRecord& p : report->pieces) all.push_back(std::move(p));
  }
  if (!failed.empty()) return Status::IOError("checkpoint save " + job.id + " not committed: " + failed);
  TROUPE_ASSIGN_OR_RETURN(std::vector<ckpt::TensorRecord> tensors,
                          ckpt::AssembleTensors(std::move(all), model_tensors_));
  ckpt::Manifest m = ckpt::NewManifest(job.state, job.id, EffectiveReplication(config_, group_.size()));
  m.tensors = std::move(tensors);
  TROUPE_RETURN_IF_ERROR(catalog_->Commit(m).WithContext("checkpoint save " + job.id));
  result->manifest = m;
  // Retention: rank 0 removes expired manifests now and drops their shards
  // from its own store; the other ranks drop theirs at their next save.
  ckpt::StoreSet mine;
  if (store_) mine[store_->id()] = store_.get();
  auto dropped = ckpt::CollectGarbage(*catalog_, mine, {config_.keep_last, config_.keep_every}, m.id);
  if (!dropped.ok()) return dropped.status().WithContext("checkpoint retention (the save itself is committed)");
  result->dropped = std::move(dropped).value();
  return Status::Ok();
}

}  // namespace troupe::parallel
