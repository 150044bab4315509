// The training job as the coordinator tracks it: one record (durable) and
// the rules that move it (assign, report, node lost, stop). A plain class;
// the job actor owns one.
//
//              assign                 last step reported
//   pending ───────────▶ running ───────────────────────▶ completed
//      ▲                  │  │ │
//      │ (none free)      │  │ └── worker reports an error ──▶ failed
//      └── interrupted ◀──┘  └── Stop ──▶ stopped
//         (a node of the attempt died, drained or restarted; the next
//          assign starts a new attempt from the newest checkpoint)
//
// A distributed job (parallel world > 1) runs each attempt on several
// workers, one per rank: progress comes from rank 0, an error from any rank
// fails the job, and losing any of the attempt's nodes interrupts it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace troupe::cluster {

enum class JobState : uint8_t { kPending, kRunning, kInterrupted, kCompleted, kStopped, kFailed };
const char* JobStateName(JobState s);
Expected<JobState> ParseJobState(std::string_view name);

// One point of the loss curve.
struct LossPoint {
  int step = 0;
  double loss = 0;       // total training loss of the step
  double main_loss = 0;  // main-head cross-entropy
  double val_loss = -1;  // < 0: not evaluated at this step
  double tokens_per_s = 0;
};

// A worker: the node's id and the worker's index on it.
struct WorkerSlot {
  std::string node_id;
  int worker = 0;
};

struct JobRecord {
  std::string config_path;  // as given to the coordinator
  std::string config_name;  // file stem ("tiny")
  std::string toml_text;    // what workers parse
  JobState state = JobState::kPending;
  uint64_t attempt = 0;  // incremented at every assignment
  std::string node_id;   // where the current attempt runs ("" when none)
  int worker = -1;       // worker index on that node
  int step = 0;          // last reported step of the current attempt
  int total_steps = 0;
  double loss = 0, main_loss = 0, lr = 0, grad_norm = 0, tokens_per_s = 0;
  double val_loss = -1;   // latest validation loss (< 0: none yet)
  int interruptions = 0;  // attempts lost to dead / drained nodes
  std::string message;    // why it failed / was interrupted
  // The current attempt's workers by rank (one for a single-worker job;
  // node_id/worker above are rank 0's), and its data-parallel replicas.
  std::vector<WorkerSlot> ranks;
  int dp = 1;
  // Distributed: the newest checkpoint rank 0 committed in the job's shared
  // folder (single-worker jobs use the coordinator's catalog instead).
  std::string checkpoint_id;
  int checkpoint_step = 0;
  std::vector<LossPoint> history;  // current attempt, capped at kMaxHistory
  static constexpr size_t kMaxHistory = 5000;
};

// A step report as the tracker needs it.
struct StepUpdate {
  uint64_t attempt = 0;
  int step = 0;
  int total_steps = 0;
  double loss = 0, main_loss = 0, lr = 0, grad_norm = 0, tokens_per_s = 0;
  double val_loss = -1;
  bool done = false;          // the last step: the job is complete
  std::string error;          // non-empty: the worker failed
  int rank = 0;               // the reporting rank (distributed jobs)
  std::string checkpoint_id;  // rank 0: committed since its last report
  int checkpoint_step = 0;
};

class JobTracker {
 public:
  explicit JobTracker(JobRecord record) : rec_(std::move(record)) {}

  // True while the job wants a worker (pending or interrupted).
  bool NeedsWorker() const;
  // Starts a new attempt on the first slot; nullopt when not needed or
  // no slot is given. `resume_step`: the step of the checkpoint the attempt
  // resumes from (0: from scratch); the loss history up to it is kept.
  std::optional<WorkerSlot> Assign(const std::vector<WorkerSlot>& free_slots, int resume_step = 0);
  // Starts a new attempt of a distributed job: ranks[r] runs rank r, in a
  // layout of `dp` replicas. False when the job needs no workers or `ranks`
  // is empty.
  bool AssignRanks(std::vector<WorkerSlot> ranks, int dp, int resume_step);
  // Applies a report. False (ignored) when it belongs to another attempt
  // or the job is not running: the sender should be told to stop.
  bool OnReport(const std::string& node_id, const StepUpdate& u);
  // A node is gone (dead, drained, restarted): true if it ran a rank of the
  // current attempt, which that interrupted.
  bool OnNodeLost(const std::string& node_id, const std::string& why);
  // Ends the running attempt so that the next one can be planned afresh
  // (a distributed job growing onto nodes that joined): interrupted, with
  // `why`, not counted as an interruption. False when nothing runs.
  bool Requeue(const std::string& why);
  // The job cannot run (e.g. its layout is impossible): failed, with `why`.
  void Fail(const std::string& why);
  // Stops the job (from the API). InvalidArgument when already finished.
  Status Stop();
  bool Finished() const;

  const JobRecord& record() const { return rec_; }

 private:
  JobRecord rec_;
};

}  // namespace troupe::cluster
