#include "gpu/model/expert_exchange.h"

#include <string>

namespace troupe {

Status ExpertExchange::CheckPhase(int phase) {
  if (phase < 0 || phase >= kPhases) return Status::InvalidArgument("expert exchange: no phase " + std::to_string(phase));
  return Status::Ok();
}

Status ExpertExchange::NotStarted(int phase) {
  return Status::Internal("expert exchange: phase " + std::to_string(phase) + " finished without a start");
}

Status ExpertExchange::Start(std::vector<std::vector<uint8_t>> send, int phase) {
  TROUPE_RETURN_IF_ERROR(CheckPhase(phase));
  held_[phase] = std::move(send);
  return Status::Ok();
}

Expected<std::vector<std::vector<uint8_t>>> ExpertExchange::Finish(int phase) {
  if (!CheckPhase(phase).ok() || !held_[phase]) return NotStarted(phase);
  std::vector<std::vector<uint8_t>> send = std::move(*held_[phase]);
  held_[phase].reset();
  return AllToAll(std::move(send), phase);
}

}  // namespace troupe
