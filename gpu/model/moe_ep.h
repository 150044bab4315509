// The routed-expert part of a MoE layer under expert parallelism (see
// expert_exchange.h). Internal to gpu/model: layer.cpp calls these in
// place of its local grouped GEMMs when the layer's experts are split.
#pragma once

#include "gpu/model/layer.h"

namespace troupe {

// After MoePermute (a.x_sorted, a.offsets over all E experts): Start sends
// the rows to their experts' ranks and returns, so the layer computes its
// shared experts while they travel; Finish runs this rank's experts on what
// arrived and combines the outputs back into a.e_out (x_sorted's order).
void StartRoutedExpertsForwardEp(Backend& be, const MoeParams& p, LayerActs& a, ExpertExchange& ex);
void FinishRoutedExpertsForwardEp(Backend& be, const MoeParams& p, LayerActs& a, ExpertExchange& ex);

// From s.d_y_sorted (d of a.e_out) to s.d_x_sorted (d of a.x_sorted): the
// gradients travel to the experts' ranks and back the same way.
void RoutedExpertsBackwardEp(Backend& be, const MoeParams& p, MoeParams& g, LayerActs& a, LayerScratch& s,
                             ExpertExchange& ex, WeightGradQueue* defer);

}  // namespace troupe
