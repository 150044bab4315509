// DistCheckpointer: checkpoints of a distributed run, written by every rank
// in parallel and committed by rank 0 (docs/checkpoints.md, "Distributed
// runs"). Every rank of the job owns one; all call Resume and Save together.
//
// Save (every checkpoint.every steps):
//
//   rank 0                                        every rank r
//   waits for its last commit, reserves an id ──▶ {id, committed ids}
//                                                 waits for its own last write
//                                                 CapturePieces (collective)   ◀─ the training stall
//                                                 writer thread: drops from store-<r> what no committed
//                                                   checkpoint owns, writes its pieces, fsyncs
//   writer thread: every rank's piece records ◀── {id, piece records} (or its error)
//   AssembleTensors ─▶ Commit(manifest) ─▶ retention
//
// A checkpoint is committed only after every rank's pieces are durable; if a
// rank fails it sends its error instead and nothing is committed (its
// pieces and the others' become garbage the next save drops). The
// checkpoint's tensors are a single-process run's (the same names and
// whole-model shapes), so it resumes into any layout, or into `troupe train`
// on one rank, and `troupe ckpt` reads it.
//
// Resume: rank 0 finds the manifest and sends it to every rank; each rank
// opens the stores it names for reading only (several processes may read
// one store) and reads the rows of the tensors it holds.
//
// Folder: <dir>/catalog (rank 0 only), <dir>/store-<r> (rank r, store id
// "local-<r>"), the layout of `troupe train`'s own checkpoints.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "configs/config.h"
#include "storage/checkpoint/checkpoint_io.h"
#include "train/checkpointer.h"
#include "train/parallel/dist_trainer.h"
#include "train/parallel/process_group.h"

namespace troupe::parallel {

class DistCheckpointer {
 public:
  // Rank 0 opens (creating) <dir>/catalog; no rank opens its store yet (a
  // resume reads other ranks' stores first). Not collective. `timeout_ms`
  // bounds waits for a peer's message; waits that include a peer's disk
  // writes are allowed at least 30 minutes.
  static Expected<std::unique_ptr<DistCheckpointer>> Open(const std::string& dir, const CheckpointConfig& config,
                                                          ProcessGroup& group, int timeout_ms);
  ~DistCheckpointer();  // waits for the save in flight

  // Collective: loads checkpoint `which` ("latest" or an id) into `trainer`
  // on every rank. Every rank returns the same error when rank 0 cannot
  // find it; `stats` counts this rank's reads.
  Expected<ckpt::Manifest> Resume(const std::string& which, DistributedTrainer& trainer, ckpt::ReadStats* stats);

  // Collective: starts a save of the trainer's state after its last step
  // and returns once this rank's pieces are captured (the writes go on in
  // the background). `metrics` matter on rank 0 (the manifest's). When rank
  // 0 cannot start a save (its catalog refuses an id) every rank returns OK
  // with the reason in `*skipped` and training goes on; an error means the
  // capture itself failed and the job cannot go on.
  Status Save(DistributedTrainer& trainer, const std::map<std::string, double>& metrics, std::string* skipped);

  // Rank 0: the result of a save that finished since the last call (on
  // other ranks a result only when this rank's write failed).
  std::optional<SaveResult> Poll() { return worker_->Poll(); }
  // Waits until this rank's save in flight is done, then Poll().
  std::optional<SaveResult> WaitIdle() { return worker_->WaitIdle(); }

 private:
  struct Job {
    std::string id;
    std::vector<std::string> keep;  // committed ids: everything else in the store is garbage
    ckpt::RunState state;           // rank 0
    std::vector<ckpt::HostPiece> pieces;
  };
  DistCheckpointer(const std::string& dir, const CheckpointConfig& config, ProcessGroup& group, int timeout_ms);
  // The writer thread's part of a save; nullopt when there is nothing to
  // report (another rank's successful write: rank 0 reports the commit).
  std::optional<SaveResult> Run(Job& job);
  SaveResult Write(Job& job);
  // Rank 0: every rank's records for `id`, then the commit and retention.
  Status Commit(const Job& job, std::vector<ckpt::PieceRecord> own, const std::string& own_error, SaveResult* result);

  std::string dir_;
  CheckpointConfig config_;
  ProcessGroup& group_;
  int timeout_ms_;                           // messages that need no disk (resume orders)
  int write_wait_ms_;                        // messages that wait for a save's writes: at least 30 min
  std::unique_ptr<ckpt::Catalog> catalog_;   // rank 0
  std::unique_ptr<ckpt::ShardStore> store_;  // this rank's, opened at the first save
  std::vector<std::string> model_tensors_;   // rank 0: the manifest's tensor order
  std::unique_ptr<SaveWorker<Job>> worker_;  // last: stopped first
};

}  // namespace troupe::parallel
