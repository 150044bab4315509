#include "coordinator/job_record.h"

namespace troupe::cluster {

const char* JobStateName(JobState s) {
  switch (s) {
    case JobState::kPending: return "pending";
    case JobState::kRunning: return "running";
    case JobState::kInterrupted: return "interrupted";
    case JobState::kCompleted: return "completed";
    case JobState::kStopped: return "stopped";
    case JobState::kFailed: return "failed";
  }
  return "unknown";
}

Expected<JobState> ParseJobState(std::string_view name) {
  for (JobState s : {JobState::kPending, JobState::kRunning, JobState::kInterrupted, JobState::kCompleted,
                     JobState::kStopped, JobState::kFailed})
    if (name == JobStateName(s)) return s;
  return Status::Corruption("unknown job state '" + std::string(name) + "'");
}

bool JobTracker::NeedsWorker() const {
  return rec_.state == JobState::kPending || rec_.state == JobState::kInterrupted;
}

bool JobTracker::Finished() const {
  return rec_.state == JobState::kCompleted || rec_.state == JobState::kStopped || rec_.state == JobState::kFailed;
}

std::optional<WorkerSlot> JobTracker::Assign(const std::vector<WorkerSlot>& free_slots, int resume_step) {
  if (!NeedsWorker() || free_slots.empty()) return std::nullopt;
  const WorkerSlot& s = free_slots.front();
  ++rec_.attempt;
  rec_.state = JobState::kRunning;
  rec_.node_id = s.node_id;
  rec_.worker = s.worker;
  rec_.step = resume_step;
  rec_.val_loss = -1;
  // The resumed run repeats the steps after its checkpoint: their old points go.
  std::erase_if(rec_.history, [&](const LossPoint& p) { return p.step > resume_step; });
  rec_.message.clear();
  return s;
}

bool JobTracker::OnReport(const std::string& node_id, const StepUpdate& u) {
  if (rec_.state != JobState::kRunning || u.attempt != rec_.attempt || node_id != rec_.node_id) return false;
  if (!u.error.empty()) {
    rec_.state = JobState::kFailed;
    rec_.message = u.error;
    return true;
  }
  rec_.step = u.step;
  if (u.total_steps > 0) rec_.total_steps = u.total_steps;
  rec_.loss = u.loss;
  rec_.main_loss = u.main_loss;
  rec_.lr = u.lr;
  rec_.grad_norm = u.grad_norm;
  rec_.tokens_per_s = u.tokens_per_s;
  if (u.val_loss >= 0) rec_.val_loss = u.val_loss;
  if (rec_.history.size() >= JobRecord::kMaxHistory) rec_.history.erase(rec_.history.begin());
  rec_.history.push_back({u.step, u.loss, u.main_loss, u.val_loss, u.tokens_per_s});
  if (u.done) {
    rec_.state = JobState::kCompleted;
    rec_.node_id.clear();
    rec_.worker = -1;
  }
  return true;
}

bool JobTracker::OnNodeLost(const std::string& node_id, const std::string& why) {
  if (rec_.state != JobState::kRunning || rec_.node_id != node_id) return false;
  rec_.state = JobState::kInterrupted;
  rec_.message = "attempt " + std::to_string(rec_.attempt) + " on " + node_id + " lost at step " +
                 std::to_string(rec_.step) + ": " + why + "; the next attempt resumes from the newest committed checkpoint (step 0 if none)";
  rec_.node_id.clear();
  rec_.worker = -1;
  ++rec_.interruptions;
  return true;
}

Status JobTracker::Stop() {
  if (Finished()) return Status::InvalidArgument(std::string("the job is already ") + JobStateName(rec_.state));
  rec_.state = JobState::kStopped;
  rec_.message = "stopped through the API";
  return Status::Ok();
}

}  // namespace troupe::cluster
