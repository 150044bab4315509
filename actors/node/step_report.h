// What both runners (trainer runner, rank runner) make of a training step
// for the coordinator. Internal to actors/node.
#pragma once

#include <optional>

#include "actors/protocol/messages.h"
#include "train/trainer.h"

namespace troupe::node {

// A step's report for the coordinator (attempt, worker and rank are the caller's to fill).
protocol::StepReport ReportOfStep(const troupe::StepReport& step, int total_steps);

// The report's validation loss, if this step was evaluated.
inline std::optional<double> ValLossOf(const protocol::StepReport& r) {
  return r.val_loss >= 0 ? std::optional<double>(r.val_loss) : std::nullopt;
}

}  // namespace troupe::node
