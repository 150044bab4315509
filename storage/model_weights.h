// Model weights <-> safetensors files, in the public DeepSeek-V3 layout
// (BRIEF §5; documented tensor by tensor in docs/weights.md).
//
// Internally some tensors are fused (gate+up of a SwiGLU, all routed experts
// of a layer in one tensor); every exported tensor is a contiguous row range
// of one internal tensor, so export and import are plain copies and a round
// trip gives back the same bits. Files are always fp32, row-major.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "common/status.h"
#include "configs/config.h"
#include "gpu/backend.h"
#include "gpu/model/params.h"

namespace troupe {

// One exported tensor: `shape` elements starting at element `offset` of `source`.
struct ExportEntry {
  std::string name;
  Tensor* source;
  int64_t offset;
  std::vector<int64_t> shape;
};

// The exported tensors of a model, in file order.
std::vector<ExportEntry> ExportLayout(const ModelConfig& cfg, ModelParams& params);

// Writes every parameter (and routing bias) as F32. `metadata` goes into the
// file's __metadata__ (the writer adds "format": "pt" and "producer": "troupe-deepseek-v3").
// Atomic: a failed write leaves no file at `path`.
Status ExportWeights(Backend& be, const ModelConfig& cfg, ModelParams& params, const std::string& path,
                     const std::map<std::string, std::string>& metadata = {});

// Reads `path` into `params`. Every expected tensor must be present, F32 (F64,
// BF16 and F16 files are accepted and converted), with the expected shape; a
// missing, extra or mis-shaped tensor is an error naming it. On error
// `params` is left unchanged.
Status ImportWeights(Backend& be, const ModelConfig& cfg, const std::string& path, ModelParams& params);

}  // namespace troupe
