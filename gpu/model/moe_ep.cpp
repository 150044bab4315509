#include "gpu/model/moe_ep.h"

#include <cstring>
#include <string>

#include "gpu/host_io.h"

namespace troupe {
namespace {

enum Phase { kDispatchForward = 0, kCombineForward = 1, kDispatchBackward = 2, kCombineBackward = 3 };
// The transfer a phase is, in errors.
constexpr const char* kPhaseNames[] = {"expert dispatch", "expert combine", "expert gradient dispatch",
                                       "expert gradient combine"};

// Rows of `t` as host bytes.
std::vector<uint8_t> HostRows(Backend& be, const Tensor& t, int64_t rows) {
  std::vector<uint8_t> out(static_cast<size_t>(rows) * t.cols() * DTypeSize(t.dtype()));
  if (rows > 0) be.CopyToHost(out.data(), t.Prefix({rows, t.cols()}));
  return out;
}

void SetRows(Backend& be, Tensor& t, const std::vector<uint8_t>& bytes, int64_t rows) {
  if (rows > 0) {
    Tensor view = t.Prefix({rows, t.cols()});
    be.CopyFromHost(view, bytes.data());
  }
}

// One message: the counts of each of the receiver's experts, then the rows.
std::vector<uint8_t> Pack(const int64_t* counts, int experts, const uint8_t* rows, size_t row_bytes, int64_t n) {
  std::vector<uint8_t> m(experts * sizeof(int64_t) + static_cast<size_t>(n) * row_bytes);
  std::memcpy(m.data(), counts, experts * sizeof(int64_t));
  if (n > 0) std::memcpy(m.data() + experts * sizeof(int64_t), rows, static_cast<size_t>(n) * row_bytes);
  return m;
}

// The (source, expert) blocks of a receiver's expert-major rows, in order:
// expert by expert, each expert's rows by source. ExchangeRows moves rows
// into them on the device path; Rearrange walks them on the host path.
std::vector<RowBlock> ExpertMajorBlocks(const std::vector<int64_t>& counts, int ranks) {
  const int experts = static_cast<int>(counts.size()) / ranks;
  std::vector<RowBlock> out;
  int64_t row = 0;
  for (int e = 0; e < experts; ++e) {
    for (int src = 0; src < ranks; ++src) {
      out.push_back({src, row, counts[src * experts + e]});
      row += counts[src * experts + e];
    }
  }
  return out;
}

// Sources' blocks (each sorted by expert, counts[src][e] rows) -> one
// expert-major buffer, and back. Both directions share the walk.
template <bool kToExpertMajor>
void Rearrange(std::vector<uint8_t>& expert_major, std::vector<std::vector<uint8_t>>& blocks,
               const std::vector<int64_t>& counts, int ranks, size_t row_bytes, size_t header) {
  std::vector<size_t> at(ranks, header);
  for (const RowBlock& b : ExpertMajorBlocks(counts, ranks)) {
    const size_t n = static_cast<size_t>(b.rows) * row_bytes;
    uint8_t* major = expert_major.data() + static_cast<size_t>(b.row) * row_bytes;
    if (n == 0) continue;
    if (kToExpertMajor)
      std::memcpy(major, blocks[b.peer].data() + at[b.peer], n);
    else
      std::memcpy(blocks[b.peer].data() + at[b.peer], major, n);
    at[b.peer] += n;
  }
}

// One message per rank: the counts of its experts, then their rows (from
// rows sorted by global expert). `send_counts` [ranks * experts] says how
// many rows go to each (rank, expert).
std::vector<std::vector<uint8_t>> PackDispatch(int ranks, const std::vector<uint8_t>& sorted, size_t row_bytes,
                                               const std::vector<int64_t>& send_counts) {
  const int experts = static_cast<int>(send_counts.size()) / ranks;
  std::vector<std::vector<uint8_t>> send(ranks);
  size_t offset = 0;
  for (int j = 0; j < ranks; ++j) {
    int64_t n = 0;
    for (int e = 0; e < experts; ++e) n += send_counts[j * experts + e];
    send[j] = Pack(&send_counts[j * experts], experts, sorted.data() + offset, row_bytes, n);
    offset += static_cast<size_t>(n) * row_bytes;
  }
  return send;
}

// The counts heading each source's message (`got`, by source), checked: a
// source can send at most `per_source_max` rows (its own token copies) and
// all together at most `total_max` (the receive buffers' capacity), and a
// message must hold its rows (row_bytes each; 0 when the rows travel apart,
// device to device). False, with the exchange failed, when they are wrong.
bool ParseCounts(ExpertExchange& ex, const Expected<std::vector<std::vector<uint8_t>>>& got, size_t row_bytes,
                 int experts, std::vector<int64_t>* recv_counts, int64_t* recv_rows, int64_t per_source_max,
                 int64_t total_max) {
  const int ranks = ex.size();
  *recv_rows = 0;
  if (!got.ok()) {
    ex.Fail(got.status().WithContext("expert dispatch"));
    return false;
  }
  const size_t header = experts * sizeof(int64_t);
  recv_counts->assign(static_cast<size_t>(ranks) * experts, 0);
  for (int src = 0; src < ranks; ++src) {
    const std::vector<uint8_t>& m = got.value()[src];
    if (m.size() < header) {
      ex.Fail(Status::Corruption("expert dispatch from rank " + std::to_string(src) + ": " + std::to_string(m.size()) +
                                 " bytes, shorter than its counts"));
      return false;
    }
    int64_t rows = 0;
    for (int e = 0; e < experts; ++e) {
      int64_t c = 0;
      std::memcpy(&c, m.data() + e * sizeof(int64_t), sizeof(int64_t));
      if (c < 0 || c > per_source_max - rows) {
        ex.Fail(Status::Corruption("expert dispatch from rank " + std::to_string(src) + ": row count " +
                                   std::to_string(c) + " for expert " + std::to_string(e) +
                                   " is out of range (at most " + std::to_string(per_source_max) + " rows per rank)"));
        return false;
      }
      (*recv_counts)[src * experts + e] = c;
      rows += c;
    }
    if (rows > total_max - *recv_rows) {
      ex.Fail(Status::Corruption("expert dispatch: " + std::to_string(*recv_rows + rows) +
                                 " rows arrived, more than the " + std::to_string(total_max) + " the buffers hold"));
      return false;
    }
    if (m.size() != header + static_cast<size_t>(rows) * row_bytes) {
      ex.Fail(Status::Corruption("expert dispatch from rank " + std::to_string(src) + ": " + std::to_string(m.size()) +
                                 " bytes for " + std::to_string(rows) + " rows"));
      return false;
    }
    *recv_rows += rows;
  }
  return true;
}

// What the ranks dispatched here (`got`, by source, counts and rows) as rows
// expert-major; the received counts are filled in (ParseCounts' checks).
std::vector<uint8_t> ReceiveDispatch(ExpertExchange& ex, Expected<std::vector<std::vector<uint8_t>>> got,
                                     size_t row_bytes, int experts, std::vector<int64_t>* recv_counts,
                                     int64_t* recv_rows, int64_t per_source_max, int64_t total_max) {
  if (!ParseCounts(ex, got, row_bytes, experts, recv_counts, recv_rows, per_source_max, total_max)) return {};
  std::vector<uint8_t> expert_major(static_cast<size_t>(*recv_rows) * row_bytes);
  Rearrange<true>(expert_major, *got, *recv_counts, ex.size(), row_bytes, experts * sizeof(int64_t));
  return expert_major;
}

// Device path: the counts alone, one message per rank.
std::vector<std::vector<uint8_t>> PackCounts(int ranks, const std::vector<int64_t>& send_counts) {
  const int experts = static_cast<int>(send_counts.size()) / ranks;
  std::vector<std::vector<uint8_t>> send(ranks);
  for (int j = 0; j < ranks; ++j) send[j] = Pack(&send_counts[j * experts], experts, nullptr, 0, 0);
  return send;
}

// Where each (rank, expert) block of rows sits in a sender's rows sorted by
// global expert (rank-major, as MoePermute leaves them), for ExchangeRows.
// It and ExpertMajorBlocks list a peer's blocks in expert order, so the i-th
// block one side sends is the i-th the other receives.
std::vector<RowBlock> SortedBlocks(const std::vector<int64_t>& counts, int ranks) {
  const int experts = static_cast<int>(counts.size()) / ranks;
  std::vector<RowBlock> out;
  int64_t row = 0;
  for (int j = 0; j < ranks; ++j) {
    for (int e = 0; e < experts; ++e) {
      out.push_back({j, row, counts[j * experts + e]});
      row += counts[j * experts + e];
    }
  }
  return out;
}

// Device path: rows device to device; false (the exchange failed) on error.
bool MoveRows(ExpertExchange& ex, const Tensor& src, const std::vector<RowBlock>& sends, Tensor& dst,
              const std::vector<RowBlock>& recvs, Phase phase) {
  Status s = ex.ExchangeRows(src, sends, dst, recvs, phase);
  if (!s.ok()) ex.Fail(s.WithContext(kPhaseNames[phase]));
  return s.ok();
}

// Both halves at once (the backward, which has nothing to compute meanwhile).
std::vector<uint8_t> Dispatch(ExpertExchange& ex, const std::vector<uint8_t>& sorted, size_t row_bytes,
                              const std::vector<int64_t>& send_counts, std::vector<int64_t>* recv_counts, int phase,
                              int64_t* recv_rows, int64_t per_source_max, int64_t total_max) {
  const int ranks = ex.size(), experts = static_cast<int>(send_counts.size()) / ranks;
  return ReceiveDispatch(ex, ex.AllToAll(PackDispatch(ranks, sorted, row_bytes, send_counts), phase), row_bytes,
                         experts, recv_counts, recv_rows, per_source_max, total_max);
}

// The way back: expert-major rows (laid out as Dispatch received them) go to
// their sources, which get them in their sorted order.
std::vector<uint8_t> Combine(ExpertExchange& ex, std::vector<uint8_t> expert_major, size_t row_bytes,
                             const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& send_counts,
                             int phase) {
  const int ranks = ex.size(), experts = static_cast<int>(recv_counts.size()) / ranks;
  std::vector<std::vector<uint8_t>> back(ranks);
  for (int src = 0; src < ranks; ++src) {
    int64_t n = 0;
    for (int e = 0; e < experts; ++e) n += recv_counts[src * experts + e];
    back[src].resize(static_cast<size_t>(n) * row_bytes);
  }
  Rearrange<false>(expert_major, back, recv_counts, ranks, row_bytes, 0);
  auto got = ex.AllToAll(std::move(back), phase);
  if (!got.ok()) {
    ex.Fail(got.status().WithContext("expert combine"));
    return {};
  }
  std::vector<uint8_t> sorted;
  for (int j = 0; j < ranks; ++j) {
    int64_t n = 0;
    for (int e = 0; e < experts; ++e) n += send_counts[j * experts + e];
    if ((*got)[j].size() != static_cast<size_t>(n) * row_bytes) {
      ex.Fail(Status::Corruption("expert combine from rank " + std::to_string(j) + ": " +
                                 std::to_string((*got)[j].size()) + " bytes, expected " + std::to_string(n) + " rows"));
      return {};
    }
    sorted.insert(sorted.end(), (*got)[j].begin(), (*got)[j].end());
  }
  return sorted;
}

void RecordRouting(ExpertExchange& ex, const std::vector<double>& topk, int64_t tokens, int k, int per_rank) {
  ExpertRouteStats& st = ex.stats();
  st.tokens += tokens;
  st.copies += tokens * k;
  for (int64_t n = 0; n < tokens; ++n) {
    uint64_t ranks = 0;  // bit set of ranks (ep <= 64)
    for (int j = 0; j < k; ++j) {
      const int r = static_cast<int>(topk[n * k + j]) / per_rank;
      ranks |= uint64_t{1} << (r & 63);
      if (r != ex.rank()) ++st.remote_copies;
    }
    st.max_ranks_per_token = std::max(st.max_ranks_per_token, __builtin_popcountll(ranks));
  }
}

}  // namespace

void StartRoutedExpertsForwardEp(Backend& be, const MoeParams& p, LayerActs& a, ExpertExchange& ex) {
  if (!ex.status().ok()) return;  // an earlier transfer failed: the step is lost, do not use the network again
  const int ranks = ex.size();
  const int local = static_cast<int>(p.experts_gate_up.dim(0));
  const int64_t copies = a.x_sorted.rows();
  const size_t row_bytes = static_cast<size_t>(a.x_sorted.cols()) * DTypeSize(a.x_sorted.dtype());
  const std::vector<double> offsets = ToHostDoubles(be, a.offsets);  // [E + 1]
  RecordRouting(ex, ToHostDoubles(be, a.topk_idx), a.topk_idx.rows(), static_cast<int>(a.topk_idx.cols()), local);
  a.send_counts.assign(static_cast<size_t>(ranks) * local, 0);
  for (int e = 0; e < ranks * local; ++e) a.send_counts[e] = static_cast<int64_t>(offsets[e + 1] - offsets[e]);
  Status sent =
      ex.moves_rows_on_device()
          ? ex.Start(PackCounts(ranks, a.send_counts), kDispatchForward)
          : ex.Start(PackDispatch(ranks, HostRows(be, a.x_sorted, copies), row_bytes, a.send_counts), kDispatchForward);
  if (!sent.ok()) ex.Fail(sent.WithContext("expert dispatch"));
}

void FinishRoutedExpertsForwardEp(Backend& be, const MoeParams& p, LayerActs& a, ExpertExchange& ex) {
  if (!ex.status().ok()) {
    be.Zero(a.e_out);
    return;
  }
  const int ranks = ex.size();
  const int local = static_cast<int>(p.experts_gate_up.dim(0));
  const int64_t copies = a.x_sorted.rows(), d = a.x_sorted.cols();
  const size_t row_bytes = static_cast<size_t>(d) * DTypeSize(a.x_sorted.dtype());
  const bool device = ex.moves_rows_on_device();
  int64_t rows = 0;
  if (device) {
    if (!ParseCounts(ex, ex.Finish(kDispatchForward), 0, local, &a.recv_counts, &rows, copies, a.x_recv.rows()) ||
        !MoveRows(ex, a.x_sorted, SortedBlocks(a.send_counts, ranks), a.x_recv, ExpertMajorBlocks(a.recv_counts, ranks),
                  kDispatchForward)) {
      be.Zero(a.e_out);
      return;
    }
  } else {
    std::vector<uint8_t> mine = ReceiveDispatch(ex, ex.Finish(kDispatchForward), row_bytes, local, &a.recv_counts,
                                                &rows, copies, a.x_recv.rows());
    if (!ex.status().ok()) {
      be.Zero(a.e_out);
      return;
    }
    SetRows(be, a.x_recv, mine, rows);
  }
  std::vector<int32_t> local_offsets(local + 1, 0);
  for (int e = 0; e < local; ++e) {
    int64_t n = 0;
    for (int src = 0; src < ranks; ++src) n += a.recv_counts[src * local + e];
    local_offsets[e + 1] = static_cast<int32_t>(local_offsets[e] + n);
  }
  be.CopyFromHost(a.offsets_local, local_offsets.data());
  const int64_t f = p.experts_down.dim(2);
  Tensor x = a.x_recv.Prefix({rows, d}), gate_up = a.e_gate_up.Prefix({rows, 2 * f}), act = a.e_act.Prefix({rows, f});
  Tensor y = a.y_recv.Prefix({rows, d});
  be.GroupedLinearForward(gate_up, x, p.experts_gate_up, a.offsets_local);
  be.SwiGluForward(act, gate_up);
  be.GroupedLinearForward(y, act, p.experts_down, a.offsets_local);
  if (device) {
    if (!MoveRows(ex, a.y_recv, ExpertMajorBlocks(a.recv_counts, ranks), a.e_out, SortedBlocks(a.send_counts, ranks),
                  kCombineForward))
      be.Zero(a.e_out);
    return;
  }
  std::vector<uint8_t> out =
      Combine(ex, HostRows(be, a.y_recv, rows), row_bytes, a.recv_counts, a.send_counts, kCombineForward);
  if (!ex.status().ok()) {
    be.Zero(a.e_out);
    return;
  }
  SetRows(be, a.e_out, out, copies);
}

void RoutedExpertsBackwardEp(Backend& be, const MoeParams& p, MoeParams& g, LayerActs& a, LayerScratch& s,
                             ExpertExchange& ex, WeightGradQueue* defer) {
  if (!ex.status().ok()) {
    be.Zero(s.d_x_sorted);
    return;
  }
  const int64_t copies = s.d_y_sorted.rows(), d = s.d_y_sorted.cols(), f = p.experts_down.dim(2);
  const size_t row_bytes = static_cast<size_t>(d) * DTypeSize(s.d_y_sorted.dtype());
  const int ranks = ex.size();
  const bool device = ex.moves_rows_on_device();
  int64_t rows = 0;
  if (device) {
    // The forward's counts hold both ways: nothing to exchange but rows.
    for (int64_t c : a.recv_counts) rows += c;
    if (!MoveRows(ex, s.d_y_sorted, SortedBlocks(a.send_counts, ranks), s.d_y_recv,
                  ExpertMajorBlocks(a.recv_counts, ranks), kDispatchBackward)) {
      be.Zero(s.d_x_sorted);
      return;
    }
  } else {
    std::vector<int64_t> counts_check;
    std::vector<uint8_t> dy = Dispatch(ex, HostRows(be, s.d_y_sorted, copies), row_bytes, a.send_counts, &counts_check,
                                       kDispatchBackward, &rows, copies, s.d_y_recv.rows());
    be.Zero(s.d_x_sorted);
    if (!ex.status().ok()) return;
    if (counts_check != a.recv_counts) {
      ex.Fail(Status::Internal("expert gradients arrived with other counts than the forward's"));
      return;
    }
    SetRows(be, s.d_y_recv, dy, rows);
  }
  Tensor d_y = s.d_y_recv.Prefix({rows, d}), d_act = s.d_e_act.Prefix({rows, f});
  Tensor d_gate_up = s.d_e_gate_up.Prefix({rows, 2 * f}), d_x = s.d_x_recv.Prefix({rows, d});
  Tensor act = a.e_act.Prefix({rows, f}), gate_up = a.e_gate_up.Prefix({rows, 2 * f}), x = a.x_recv.Prefix({rows, d});
  be.Zero(d_act);
  be.Zero(d_gate_up);
  be.Zero(d_x);
  Tensor no_weights;
  be.GroupedLinearBackward(d_act, defer ? no_weights : g.experts_down, d_y, act, p.experts_down, a.offsets_local);
  if (defer) defer->DeferGrouped(be, g.experts_down, d_y, act, p.experts_down, a.offsets_local);
  be.SwiGluBackward(d_gate_up, d_act, gate_up);
  be.GroupedLinearBackward(d_x, defer ? no_weights : g.experts_gate_up, d_gate_up, x, p.experts_gate_up,
                           a.offsets_local);
  if (defer) defer->DeferGrouped(be, g.experts_gate_up, d_gate_up, x, p.experts_gate_up, a.offsets_local);
  if (device) {
    if (!MoveRows(ex, s.d_x_recv, ExpertMajorBlocks(a.recv_counts, ranks), s.d_x_sorted,
                  SortedBlocks(a.send_counts, ranks), kCombineBackward))
      be.Zero(s.d_x_sorted);
    return;
  }
  std::vector<uint8_t> back =
      Combine(ex, HostRows(be, s.d_x_recv, rows), row_bytes, a.recv_counts, a.send_counts, kCombineBackward);
  if (!ex.status().ok()) return;
  SetRows(be, s.d_x_sorted, back, copies);
}

}  // namespace troupe
