#include "storage/model_weights.h"

#include <set>

#include "gpu/host_io.h"
#include "storage/safetensors.h"

namespace troupe {
namespace {

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string Stem(const std::string& name, const std::string& suffix) { return name.substr(0, name.size() - suffix.size()); }

std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace

std::vector<ExportEntry> ExportLayout(const ModelConfig& cfg, ModelParams& params) {
  std::vector<ExportEntry> out;
  const std::string fused_gate_up = ".gate_up_proj.weight";
  const std::string experts_gate_up = ".experts.gate_up_proj.weight";
  const std::string experts_down = ".experts.down_proj.weight";
  for (ParamRef& r : ListParams(params)) {
    Tensor* t = r.tensor;
    if (EndsWith(r.name, experts_gate_up)) {  // [E, 2F, d] -> experts.j.{gate,up}_proj [F, d]
      const int64_t e = t->dim(0), f = t->dim(1) / 2, d = t->dim(2);
      const std::string stem = Stem(r.name, experts_gate_up) + ".experts.";
      for (int64_t j = 0; j < e; ++j) {
        out.push_back({stem + std::to_string(j) + ".gate_proj.weight", t, j * 2 * f * d, {f, d}});
        out.push_back({stem + std::to_string(j) + ".up_proj.weight", t, j * 2 * f * d + f * d, {f, d}});
      }
    } else if (EndsWith(r.name, experts_down)) {  // [E, d, F] -> experts.j.down_proj [d, F]
      const int64_t e = t->dim(0), d = t->dim(1), f = t->dim(2);
      const std::string stem = Stem(r.name, experts_down) + ".experts.";
      for (int64_t j = 0; j < e; ++j) out.push_back({stem + std::to_string(j) + ".down_proj.weight", t, j * d * f, {d, f}});
    } else if (EndsWith(r.name, fused_gate_up)) {  // [2F, d] -> gate_proj, up_proj [F, d]
      const int64_t f = t->dim(0) / 2, d = t->dim(1);
      const std::string stem = Stem(r.name, fused_gate_up);
      out.push_back({stem + ".gate_proj.weight", t, 0, {f, d}});
      out.push_back({stem + ".up_proj.weight", t, f * d, {f, d}});
    } else {
      out.push_back({r.name, t, 0, t->shape()});
    }
  }
  (void)cfg;
  return out;
}

Status ExportWeights(Backend& be, const ModelConfig& cfg, ModelParams& params, const std::string& path,
                     const std::map<std::string, std::string>& metadata) {
  SafetensorsWriter writer;
  // Hugging Face loaders insist on format "pt"; our own tag goes under "producer".
  writer.SetMetadata("format", "pt");
  writer.SetMetadata("producer", "troupe-deepseek-v3");
  for (const auto& [k, v] : metadata) writer.SetMetadata(k, v);
  const Tensor* cached_source = nullptr;
  std::vector<float> host;
  for (const ExportEntry& e : ExportLayout(cfg, params)) {
    if (e.source != cached_source) {  // entries of one source are adjacent
      host = ToHostFloats(be, *e.source);
      cached_source = e.source;
    }
    int64_t n = 1;
    for (int64_t s : e.shape) n *= s;
    TROUPE_RETURN_IF_ERROR(writer.Add(e.name, "F32", e.shape, host.data() + e.offset, n * sizeof(float)));
  }
  return writer.WriteFile(path).WithContext("export weights");
}

Status ImportWeights(Backend& be, const ModelConfig& cfg, const std::string& path, ModelParams& params) {
  TROUPE_ASSIGN_OR_RETURN(SafetensorsFile file, ReadSafetensors(path));
  std::vector<ExportEntry> layout = ExportLayout(cfg, params);
  std::set<std::string> expected;
  for (const ExportEntry& e : layout) expected.insert(e.name);
  for (const std::string& name : file.names()) {
    if (!expected.count(name)) {
      return Status::InvalidArgument(path + ": unexpected tensor " + name +
                                     " (the file was written for a different model config)");
    }
  }
  // Assemble every internal tensor on the host first, so nothing is written on error.
  std::vector<std::pair<Tensor*, std::vector<float>>> staged;
  for (const ExportEntry& e : layout) {
    TROUPE_ASSIGN_OR_RETURN(const SafeTensor* st, file.Get(e.name));
    if (st->shape != e.shape) {
      return Status::InvalidArgument(path + ": tensor " + e.name + " has shape " + ShapeText(st->shape) +
                                     ", the config needs " + ShapeText(e.shape));
    }
    TROUPE_ASSIGN_OR_RETURN(std::vector<float> values, DecodeFloats(*st));
    if (staged.empty() || staged.back().first != e.source) {
      staged.emplace_back(e.source, std::vector<float>(static_cast<size_t>(e.source->numel())));
    }
    std::copy(values.begin(), values.end(), staged.back().second.begin() + e.offset);
  }
  for (auto& [tensor, values] : staged) FromHostFloats(be, *tensor, values);
  return Status::Ok();
}

}  // namespace troupe
