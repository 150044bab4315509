// Expert parallelism inside a MoE layer (BRIEF §2): the routed experts of a
// layer are split evenly over the ranks of an expert-parallel group, rank r
// holding experts [r E/ep, (r+1) E/ep). Each rank routes its own tokens; a
// token copy travels to the rank of its expert (dispatch) and its output
// travels back (combine), and the same on the way back in backward. The
// counts go first in each message, so a receiver knows every row's expert.
//
// The layer code is synchronous and cannot return a Status, so an exchange
// records its first failure: the layer then runs on zeros and the caller
// checks status() after each chunk and aborts the step.
//
// Two chunks of one rank may use an exchange at once (a DualPipe F&B pair:
// the forward's phases 0-1 beside the backward's 2-3), so AllToAll, Fail and
// status are thread-safe; stats() is written by forward chunks only, which
// never run two at a time.
#pragma once

#include <array>
#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

#include "common/status.h"
#include "gpu/device_comm.h"

namespace troupe {

struct ExpertRouteStats {
  int64_t tokens = 0;           // tokens routed
  int64_t copies = 0;           // token copies (tokens x K)
  int64_t remote_copies = 0;    // copies whose expert lives on another rank
  int max_ranks_per_token = 0;  // most ranks one token's experts span (device-limited routing bounds it by M)
};

class ExpertExchange {
 public:
  virtual ~ExpertExchange() = default;
  virtual int size() const = 0;
  virtual int rank() const = 0;
  // send[j] goes to rank j; the result's [j] is what rank j sent here. The
  // four transfers of a layer pass (dispatch and combine, forward and
  // backward) use their own `phase` 0..3.
  virtual Expected<std::vector<std::vector<uint8_t>>> AllToAll(std::vector<std::vector<uint8_t>> send, int phase) = 0;

  // The same in two halves, so a layer computes (its shared experts) while
  // the rows travel: Start queues the sends and returns, Finish waits for
  // what the other ranks sent. A phase has at most one transfer between
  // Start and Finish; a Start drops a transfer of its phase that was never
  // finished (its step failed). This base version sends in Finish.
  virtual Status Start(std::vector<std::vector<uint8_t>> send, int phase);
  virtual Expected<std::vector<std::vector<uint8_t>>> Finish(int phase);

  // Whether rows can travel device to device (NCCL). Then a layer sends
  // only its counts through AllToAll/Start/Finish and the rows through
  // ExchangeRows, which returns once they arrived (or failed within the
  // exchange's timeout). `phase` as above: a pair's forward (0-1) and
  // backward (2-3) may exchange rows at once, from two threads.
  virtual bool moves_rows_on_device() const { return false; }
  virtual Status ExchangeRows(const Tensor& src, const std::vector<RowBlock>& sends, Tensor& dst,
                              const std::vector<RowBlock>& recvs, int phase) {
    return Status::Unimplemented("this expert exchange moves rows through host memory");
  }

  Status status() const {
    std::lock_guard<std::mutex> lock(status_mu_);
    return status_;
  }
  void Fail(const Status& s) {
    std::lock_guard<std::mutex> lock(status_mu_);
    if (status_.ok()) status_ = s;
  }
  ExpertRouteStats& stats() { return stats_; }

  static constexpr int kPhases = 4;

 protected:
  // The checks every Start/Finish makes: a phase out of range, a Finish
  // with no Start before it.
  static Status CheckPhase(int phase);
  static Status NotStarted(int phase);

 private:
  // Base Start/Finish: the sends held until Finish (one slot per phase, each
  // used by one thread only: forward chunks 0-1, backward chunks 2-3).
  std::array<std::optional<std::vector<std::vector<uint8_t>>>, kPhases> held_;
  mutable std::mutex status_mu_;
  Status status_;
  ExpertRouteStats stats_;
};

}  // namespace troupe
