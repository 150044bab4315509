#include "coordinator/job_record.h"

namespace troupe::cluster {

const char* JobStateName(JobState s) {
  switch (s) {
    case JobState::kPending:
      return "pending";
    case JobState::kRunning:
      return "running";
    case JobState::kInterrupted:
      return "interrupted";
    case JobState::kCompleted:
      return "completed";
    case JobState::kStopped:
      return "stopped";
    case JobState::kFailed:
      return "failed";
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
  if (free_slots.empty() || !AssignRanks({free_slots.front()}, 1, resume_step)) return std::nullopt;
  return free_slots.front();
}

bool JobTracker::AssignRanks(std::vector<WorkerSlot> ranks, int dp, int resume_step) {
  if (!NeedsWorker() || ranks.empty()) return false;
  ++rec_.attempt;
  rec_.state = JobState::kRunning;
  rec_.node_id = ranks.front().node_id;
  rec_.worker = ranks.front().worker;
  rec_.ranks = std::move(ranks);
  rec_.dp = dp;
  rec_.step = resume_step;
  rec_.val_loss = -1;
  // The resumed run repeats the steps after its checkpoint: their old points go.
  std::erase_if(rec_.history, [&](const LossPoint& p) { return p.step > resume_step; });
  rec_.message.clear();
  return true;
}

namespace {
bool RunsOn(const std::vector<WorkerSlot>& ranks, const std::string& node_id) {
  for (const WorkerSlot& r : ranks)
    if (r.node_id == node_id) return true;
  return false;
}
}  // namespace

bool JobTracker::OnReport(const std::string& node_id, const StepUpdate& u) {
  if (rec_.state != JobState::kRunning || u.attempt != rec_.attempt || u.rank < 0 ||
      u.rank >= static_cast<int>(rec_.ranks.size()) || node_id != rec_.ranks[u.rank].node_id)
    return false;
  if (!u.error.empty()) {
    rec_.state = JobState::kFailed;
    rec_.message = rec_.ranks.size() > 1 ? "rank " + std::to_string(u.rank) + ": " + u.error : u.error;
    return true;
  }
  if (u.rank != 0) return true;  // progress is rank 0's to report
  if (!u.checkpoint_id.empty()) {
    rec_.checkpoint_id = u.checkpoint_id;
    rec_.checkpoint_step = u.checkpoint_step;
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
    rec_.ranks.clear();
  }
  return true;
}

bool JobTracker::OnNodeLost(const std::string& node_id, const std::string& why) {
  if (rec_.state != JobState::kRunning || !RunsOn(rec_.ranks, node_id)) return false;
  rec_.state = JobState::kInterrupted;
  rec_.message = "attempt " + std::to_string(rec_.attempt) + " on " + node_id + " lost at step " +
                 std::to_string(rec_.step) + ": " + why +
                 "; the next attempt resumes from the newest committed checkpoint (step 0 if none)";
  rec_.node_id.clear();
  rec_.worker = -1;
  rec_.ranks.clear();
  ++rec_.interruptions;
  return true;
}

bool JobTracker::Requeue(const std::string& why) {
  if (rec_.state != JobState::kRunning) return false;
  rec_.state = JobState::kInterrupted;
  rec_.message = why;
  rec_.node_id.clear();
  rec_.worker = -1;
  rec_.ranks.clear();
  return true;
}

void JobTracker::Fail(const std::string& why) {
  if (Finished()) return;
  rec_.state = JobState::kFailed;
  rec_.message = why;
  rec_.node_id.clear();
  rec_.worker = -1;
  rec_.ranks.clear();
}

Status JobTracker::Stop() {
  if (Finished()) return Status::InvalidArgument(std::string("the job is already ") + JobStateName(rec_.state));
  rec_.state = JobState::kStopped;
  rec_.message = "stopped through the API";
  return Status::Ok();
}

}  // namespace troupe::cluster
