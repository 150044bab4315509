#include "gpu/model/expert_exchange.h"

#include <string>

namespace troupe {

Status ExpertExchange::Start(std::vector<std::vector<uint8_t>> send, int phase) {
  if (phase < 0 || phase >= kPhases) return Status::InvalidArgument("expert exchange: no phase " + std::to_string(phase));
  held_[phase] = std::move(send);
  return Status::Ok();
}

Expected<std::vector<std::vector<uint8_t>>> ExpertExchange::Finish(int phase) {
  if (phase < 0 || phase >= kPhases || !held_[phase])
    return Status::Internal("expert exchange: phase " + std::to_string(phase) + " finished without a start");
  std::vector<std::vector<uint8_t>> send = std::move(*held_[phase]);
  held_[phase].reset();
  return AllToAll(std::move(send), phase);
}

}  // namespace troupe
