// The training job as the coordinator tracks it: one record (durable) and
// the rules that move it (assign, report, node lost, stop). A plain class;
// the job actor owns one.
//
//              assign                 last step reported
//   pending ───────────▶ running ───────────────────────▶ completed
//      ▲                  │  │ │
//      │ (none free)      │  │ └── worker reports an error ──▶ failed
//      └── interrupted ◀──┘  └── Stop ──▶ stopped
//         (its node died, drained or restarted; the next assign starts
//          a new attempt from step 0: checkpoints are a later issue)
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
  double loss = 0;          // total training loss of the step
  double main_loss = 0;     // main-head cross-entropy
  double val_loss = -1;     // < 0: not evaluated at this step
  double tokens_per_s = 0;
};

struct JobRecord {
  std::string config_path;   // as given to the coordinator
  std::string config_name;   // file stem ("tiny")
  std::string toml_text;     // what workers parse
  JobState state = JobState::kPending;
  uint64_t attempt = 0;      // incremented at every assignment
  std::string node_id;       // where the current attempt runs ("" when none)
  int worker = -1;           // worker index on that node
  int step = 0;              // last reported step of the current attempt
  int total_steps = 0;
  double loss = 0, main_loss = 0, lr = 0, grad_norm = 0, tokens_per_s = 0;
  double val_loss = -1;      // latest validation loss (< 0: none yet)
  int interruptions = 0;     // attempts lost to dead / drained nodes
  std::string message;       // why it failed / was interrupted
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
};

// A worker that could take the job.
struct WorkerSlot {
  std::string node_id;
  int worker = 0;
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
  // Applies a report. False (ignored) when it belongs to another attempt
  // or the job is not running: the sender should be told to stop.
  bool OnReport(const std::string& node_id, const StepUpdate& u);
  // The node running the job is gone (dead, drained, restarted): true if
  // that interrupted the job.
  bool OnNodeLost(const std::string& node_id, const std::string& why);
  // Stops the job (from the API). InvalidArgument when already finished.
  Status Stop();
  bool Finished() const;

  const JobRecord& record() const { return rec_; }

 private:
  JobRecord rec_;
};

}  // namespace troupe::cluster
