// What both runners (trainer runner, rank runner) make of a training step
// for the coordinator. Internal to actors/node.
#pragma once

#include <map>
#include <string>

#include "actors/protocol/messages.h"
#include "train/trainer.h"

namespace troupe::node {

// A step's report for the coordinator (attempt, worker and rank are the caller's to fill).
protocol::StepReport ReportOfStep(const troupe::StepReport& step, int total_steps);

// The metrics a checkpoint's manifest keeps, from a step's report.
std::map<std::string, double> CheckpointMetrics(const protocol::StepReport& r);

}  // namespace troupe::node
