// A DeviceComm stand-in for CPU tests: the members are threads of one
// process that meet on a shared board, so the device paths (gradient buckets,
// expert rows) run without a GPU. Like NCCL, every member must make the same
// calls in the same order; unlike NCCL, the sums run in member order, so two
// members give the host path's bits. Calls block until every member came
// (a barrier), which a test run in the wrong order shows as a hang. Send and
// Receive do not meet: a send is queued (as NCCL's runs on its own stream)
// and a receive waits for the next one, at most a minute.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "gpu/device_comm.h"
#include "train/parallel/device_comms.h"

namespace troupe::testing {

struct ThreadCommBoard {
  explicit ThreadCommBoard(int members) : sync(members), posted(members), blocks(members) {}
  std::barrier<> sync;
  std::vector<const Tensor*> posted;                 // each member's tensor of the current call
  std::vector<std::vector<RowBlock>> blocks;         // ExchangeRows: each member's send blocks
  std::atomic<int> reductions{0}, row_exchanges{0};  // calls, summed over members
  std::atomic<int> sends{0};
  std::mutex mail_mu;
  std::condition_variable mail_cv;
  std::map<std::pair<int, int>, std::deque<std::vector<uint8_t>>> mail;  // (from, to) -> queued sends
};

class ThreadComm final : public DeviceComm {
 public:
  ThreadComm(std::shared_ptr<ThreadCommBoard> board, int rank, int size)
      : board_(std::move(board)), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Status AllReduceSum(Tensor& data) override { return Reduce(data, 0, data.numel()); }
  Status ReduceScatterSum(Tensor& data, const std::vector<int64_t>& bounds) override {
    return Reduce(data, bounds[rank_], bounds[rank_ + 1]);
  }
  Status AllGather(Tensor& data, const std::vector<int64_t>& bounds) override {
    Post(&data);
    for (int m = 0; m < size_; ++m) {
      if (m == rank_) continue;
      const float* from = board_->posted[m]->data<float>();
      std::memcpy(data.data<float>() + bounds[m], from + bounds[m], (bounds[m + 1] - bounds[m]) * sizeof(float));
    }
    board_->sync.arrive_and_wait();
    return Status::Ok();
  }
  Status ExchangeRows(const Tensor& src, const std::vector<RowBlock>& sends, Tensor& dst,
                      const std::vector<RowBlock>& recvs) override {
    ++board_->row_exchanges;
    board_->blocks[rank_] = sends;
    Post(&src);
    const int64_t cols = dst.cols();
    std::vector<size_t> next(size_, 0);  // per source: its next block to this member
    for (const RowBlock& r : recvs) {
      const std::vector<RowBlock>& theirs = board_->blocks[r.peer];
      while (next[r.peer] < theirs.size() && theirs[next[r.peer]].peer != rank_) ++next[r.peer];
      if (next[r.peer] == theirs.size() || theirs[next[r.peer]].rows != r.rows) {
        board_->sync.arrive_and_wait();
        return Status::Internal("member " + std::to_string(rank_) + " expects a block of " + std::to_string(r.rows) +
                                " rows that member " + std::to_string(r.peer) + " did not send");
      }
      const RowBlock& s = theirs[next[r.peer]++];
      std::memcpy(dst.data<float>() + r.row * cols, board_->posted[r.peer]->data<float>() + s.row * cols,
                  static_cast<size_t>(r.rows * cols) * sizeof(float));
    }
    board_->sync.arrive_and_wait();  // the senders' rows stay put until everyone has copied
    return Status::Ok();
  }
  Status Send(const Tensor& data, int peer) override {
    ++board_->sends;
    const uint8_t* from = static_cast<const uint8_t*>(data.raw());
    {
      std::lock_guard<std::mutex> lock(board_->mail_mu);
      board_->mail[{rank_, peer}].emplace_back(from, from + data.bytes());
    }
    board_->mail_cv.notify_all();
    return Status::Ok();
  }
  Status Receive(Tensor& into, int peer) override {
    std::unique_lock<std::mutex> lock(board_->mail_mu);
    auto& queue = board_->mail[{peer, rank_}];
    if (!board_->mail_cv.wait_for(lock, std::chrono::minutes(1), [&] { return !queue.empty(); }))
      return Status::IOError("member " + std::to_string(rank_) + ": nothing from member " + std::to_string(peer));
    std::vector<uint8_t> bytes = std::move(queue.front());
    queue.pop_front();
    if (bytes.size() != into.bytes())
      return Status::Internal("member " + std::to_string(rank_) + " expects " + std::to_string(into.bytes()) +
                              " bytes; member " + std::to_string(peer) + " sent " + std::to_string(bytes.size()));
    std::memcpy(into.raw(), bytes.data(), bytes.size());
    return Status::Ok();
  }
  Status Wait(int) override { return Status::Ok(); }
  void Abort(const std::string&) override {}
  std::string Describe() const override { return "thread stand-in, member " + std::to_string(rank_); }

 private:
  void Post(const Tensor* t) {
    board_->posted[rank_] = t;
    board_->sync.arrive_and_wait();
  }
  // Elements [lo, hi) := the sum over members, added in member order.
  Status Reduce(Tensor& data, int64_t lo, int64_t hi) {
    ++board_->reductions;
    Post(&data);
    std::vector<float> sum(static_cast<size_t>(hi - lo), 0.0f);
    for (int m = 0; m < size_; ++m) {
      const float* from = board_->posted[m]->data<float>();
      for (int64_t i = lo; i < hi; ++i) sum[i - lo] = m == 0 ? from[i] : sum[i - lo] + from[i];
    }
    board_->sync.arrive_and_wait();  // everyone has read before anyone writes
    std::memcpy(data.data<float>() + lo, sum.data(), sum.size() * sizeof(float));
    return Status::Ok();
  }

  std::shared_ptr<ThreadCommBoard> board_;
  int rank_, size_;
};

// Hands each rank of a threaded job its stand-ins: one board per group,
// shared by the group's members (DistributedTrainer::Create's maker).
class ThreadCommFactory {
 public:
  parallel::DeviceCommsMaker MakerFor(int rank) {
    return [this, rank](std::vector<parallel::DeviceGroup> groups,
                        std::vector<parallel::DeviceLink> links) -> Expected<std::unique_ptr<parallel::DeviceComms>> {
      std::map<parallel::DeviceGroup, std::unique_ptr<DeviceComm>> comms;
      for (parallel::DeviceGroup& g : parallel::GroupsOfRank(std::move(groups), rank)) {
        const std::vector<int>& m = g.members;
        const int index = static_cast<int>(std::find(m.begin(), m.end(), rank) - m.begin());
        // Copies get boards of their own, keyed apart: (members..., -100 - copy).
        std::vector<int> key = m;
        if (g.copy != 0) key.push_back(-100 - g.copy);
        comms.emplace(g, std::make_unique<ThreadComm>(BoardOf(key, static_cast<int>(m.size())), index,
                                                      static_cast<int>(m.size())));
      }
      std::map<parallel::DeviceLink, std::unique_ptr<DeviceComm>> link_comms;
      for (const parallel::DeviceLink& l : parallel::LinksOfRank(std::move(links), rank)) {
        // A board of its own per link, keyed apart from any group: (from, to, -kind).
        const std::vector<int> key{l.from, l.to, -static_cast<int>(l.kind)};
        link_comms.emplace(l, std::make_unique<ThreadComm>(BoardOf(key, 2), l.from == rank ? 0 : 1, 2));
      }
      return parallel::DeviceComms::Of(std::move(comms), std::move(link_comms));
    };
  }

  // Calls made so far over every stand-in handed out, summed over members.
  int reductions() { return Sum(&ThreadCommBoard::reductions); }
  int row_exchanges() { return Sum(&ThreadCommBoard::row_exchanges); }
  int sends() { return Sum(&ThreadCommBoard::sends); }

 private:
  int Sum(std::atomic<int> ThreadCommBoard::*counter) {
    std::lock_guard<std::mutex> lock(mu_);
    int n = 0;
    for (auto& [group, board] : boards_) n += (*board.*counter).load();
    return n;
  }
  std::shared_ptr<ThreadCommBoard> BoardOf(const std::vector<int>& key, int members) {
    std::lock_guard<std::mutex> lock(mu_);
    auto& board = boards_[key];
    if (!board) board = std::make_shared<ThreadCommBoard>(members);
    return board;
  }
  std::mutex mu_;
  std::map<std::vector<int>, std::shared_ptr<ThreadCommBoard>> boards_;
};

}  // namespace troupe::testing
