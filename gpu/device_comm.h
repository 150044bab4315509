// DeviceComm: collectives on device memory between the ranks of one group,
// without a trip through host memory (NCCL between GPUs).
//
//   backend stream:  ... grads ready ─┐                      ┌─▶ kernels queued after the call
//                                      ▼                      │
//   comm stream:                 ncclAllReduce / Reduce / Broadcast
//
// Each call is queued on the communicator's own stream after everything the
// backend queued so far, and everything the backend queues afterwards waits
// for it; the host does not wait. Wait() does, with a deadline: NCCL kernels
// whose peer died never finish, so a rank that is not told otherwise would
// hang. On timeout or error the communicator is aborted (its kernels return)
// and every later call fails with the same reason.
//
// Created collectively: one member makes an id (NewDeviceCommId), gives it to
// the others by its own means (train/parallel sends it over the process
// group), and every member calls CreateDeviceComm with it. The CUDA module
// implements this; other backends answer Unimplemented. Not thread-safe:
// one thread drives a communicator (the rank's step thread).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "gpu/backend.h"

namespace troupe {

// Rows [row, row + rows) of a matrix, to or from member `peer`.
struct RowBlock {
  int peer = 0;
  int64_t row = 0;
  int64_t rows = 0;
};

class DeviceComm {
 public:
  virtual ~DeviceComm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // In place: data := the element-wise sum over members (F32).
  virtual Status AllReduceSum(Tensor& data) = 0;
  // bounds: size()+1 ascending element offsets, 0 first and numel last.
  // Afterwards elements [bounds[i], bounds[i+1]) of member i's data hold the
  // sum over members (ZeRO-1's reduce-scatter with uneven chunks); the rest
  // of data is unspecified.
  virtual Status ReduceScatterSum(Tensor& data, const std::vector<int64_t>& bounds) = 0;
  // The reverse: member i's chunk [bounds[i], bounds[i+1]) is copied into
  // every member's data.
  virtual Status AllGather(Tensor& data, const std::vector<int64_t>& bounds) = 0;
  // Point to point, all at once: each block of `sends` (rows of src) goes to
  // its peer, each block of `recvs` (rows of dst) comes from its peer. Between
  // two members, the i-th block one sends the other is the i-th block the
  // other receives from it, with the same row count (expert parallelism:
  // both sides know the counts). src and dst are F32 with equal columns;
  // blocks to oneself are allowed.
  virtual Status ExchangeRows(const Tensor& src, const std::vector<RowBlock>& sends, Tensor& dst,
                              const std::vector<RowBlock>& recvs) = 0;
  // Pipeline hand-offs, one way. Send copies `data` aside on the backend's
  // stream and queues it to `peer`; nothing the backend queues afterwards
  // waits for it, so a receiver that comes late holds up no compute (and no
  // host sync behind it), and `data` may be rewritten at once. The peer
  // Receives the sends in the order they were made, with equal byte sizes.
  virtual Status Send(const Tensor& data, int peer) = 0;
  // Fills `into` with `peer`'s next Send; the backend's later kernels wait
  // for it. Wait() then bounds how long the host waits for it to arrive.
  virtual Status Receive(Tensor& into, int peer) = 0;
  // Blocks until every queued call has finished, at most timeout_ms. IOError
  // naming the communicator on timeout (then aborted) or an NCCL error.
  virtual Status Wait(int timeout_ms) = 0;
  // Makes every queued and later call fail fast with `why`.
  virtual void Abort(const std::string& why) = 0;
  // "nccl 2.28.3, rank 1 of 2 (dp bucket 0,2)".
  virtual std::string Describe() const = 0;
};

// The id the members of one communicator share (an ncclUniqueId, 128 bytes).
Expected<std::vector<uint8_t>> NewDeviceCommId(Backend& be);

struct DeviceCommSpec {
  std::vector<uint8_t> id;  // from NewDeviceCommId, the same on every member
  int size = 0;
  int rank = 0;
  std::string name;  // in errors and Describe()
};

// Joins the communicator; returns once every member has joined, or fails
// after timeout_ms naming `spec.name` (a member that never came, two members
// on one GPU, a network error). Later calls also wait up to timeout_ms for
// NCCL to connect to a peer (it connects at a peer's first operation).
Expected<std::unique_ptr<DeviceComm>> CreateDeviceComm(Backend& be, const DeviceCommSpec& spec, int timeout_ms);

}  // namespace troupe
