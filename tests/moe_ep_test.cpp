// Expert parallelism against a hostile or broken peer: row counts that do
// not fit the receive buffers, or a message whose size disagrees with its
// counts, are refused as Corruption before any row is placed; after a failed
// transfer the layer never touches the network again. And the device path
// (rows moved by RowBlock lists, as NCCL moves them on GPUs) gives the same
// bits as the host path.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <thread>

#include "gpu/cpu/cpu_backend.h"
#include "gpu/model/model.h"
#include "test_util.h"
#include "thread_comm.h"
#include "train/parallel/ep_exchange.h"

namespace troupe {
namespace {

// Rank 0 of 2; rank 1's messages are whatever the test scripts. With
// `device_rows`, it claims the device path (counts only in the messages);
// moving rows then counts as a use of the network.
class ScriptedPeer final : public ExpertExchange {
 public:
  ScriptedPeer(std::vector<uint8_t> from_peer, bool device_rows)
      : from_peer_(std::move(from_peer)), device_rows_(device_rows) {}
  bool moves_rows_on_device() const override { return device_rows_; }
  Status ExchangeRows(const Tensor&, const std::vector<RowBlock>&, Tensor&, const std::vector<RowBlock>&,
                      int) override {
    ++calls;
    return Status::Ok();
  }
  int size() const override { return 2; }
  int rank() const override { return 0; }
  Expected<std::vector<std::vector<uint8_t>>> AllToAll(std::vector<std::vector<uint8_t>> send, int) override {
    ++calls;
    return std::vector<std::vector<uint8_t>>{std::move(send[0]), from_peer_};
  }
  int calls = 0;

 private:
  std::vector<uint8_t> from_peer_;
  bool device_rows_;
};

std::vector<uint8_t> Counts(std::vector<int64_t> counts, size_t payload_bytes) {
  std::vector<uint8_t> m(counts.size() * sizeof(int64_t) + payload_bytes, 0);
  std::memcpy(m.data(), counts.data(), counts.size() * sizeof(int64_t));
  return m;
}

class MoeEpHostile : public ::testing::Test {
 protected:
  // Layer 0 dense, layers 1.. MoE; this rank holds experts 0 and 1 of 4.
  void Run(std::vector<uint8_t> from_peer, const std::string& needle, bool device_rows = false) {
    CpuBackend be(1);
    ModelConfig cfg = testing::TinyMoeModel();
    cfg.num_nextn_predict_layers = 0;
    StageSpan span;
    span.ep = 2;
    auto model = Model::Create(be, cfg, DType::kF32, 2, 4, span);
    ASSERT_TRUE(model.ok()) << model.status().message();
    ASSERT_TRUE(InitParams(be, cfg, 3, (*model)->params()).ok());
    ScriptedPeer peer(std::move(from_peer), device_rows);
    (*model)->SetExpertExchange(&peer);
    std::mt19937 rng(1);
    std::vector<int32_t> tokens(2 * (*model)->window());
    for (int32_t& t : tokens) t = static_cast<int32_t>(rng() % cfg.vocab_size);
    auto loss = (*model)->ForwardStage(0, tokens.data(), LossWeights{});
    ASSERT_TRUE(loss.ok());
    ASSERT_FALSE(peer.status().ok()) << "accepted a hostile dispatch";
    EXPECT_TRUE(peer.status().IsCorruption()) << peer.status().message();
    EXPECT_NE(peer.status().message().find(needle), std::string::npos) << peer.status().message();
    EXPECT_EQ(peer.calls, 1) << "kept using the network after the failure";
  }
};

constexpr int64_t kRowBytes = 8 * sizeof(float);  // hidden_size 8
constexpr int64_t kCopies = 2 * 4 * 2;            // batch x seq x K

// The device path reads the same counts, checked the same way, before any
// row moves; its messages carry counts only.
TEST_F(MoeEpHostile, DevicePathRefusesACountOutOfRange) {
  Run(Counts({kCopies + 1, 0}, 0), "out of range", /*device_rows=*/true);
}

TEST_F(MoeEpHostile, DevicePathRefusesRowsInACountsMessage) {
  Run(Counts({2, 1}, 3 * kRowBytes), "bytes for 3 rows", /*device_rows=*/true);
}

TEST_F(MoeEpHostile, MoreRowsThanThePeerHasTokenCopies) {
  Run(Counts({kCopies + 1, 0}, (kCopies + 1) * kRowBytes), "out of range");
}

TEST_F(MoeEpHostile, AHugeCountThatWouldWrapTheSizeCheck) { Run(Counts({int64_t{1} << 62, 0}, 0), "out of range"); }

TEST_F(MoeEpHostile, NegativeCount) { Run(Counts({-1, 0}, 0), "out of range"); }

TEST_F(MoeEpHostile, PayloadDisagreesWithTheCounts) { Run(Counts({2, 1}, 2 * kRowBytes), "bytes for 3 rows"); }

TEST_F(MoeEpHostile, ShorterThanItsCounts) { Run(std::vector<uint8_t>(5, 0), "shorter than its counts"); }

struct RankResult {
  double loss = 0;
  std::vector<std::vector<double>> grads;
  int row_exchanges = 0;
  int forward_row_exchanges = 0;
};

// Two EP ranks as threads, each with its own tokens: forward and backward of
// every layer, through the host path or the board.
std::vector<RankResult> RunTwoRanks(bool device_path) {
  auto groups = parallel::CreateLocalGroup(2);
  // One communicator per direction, as DistributedTrainer gives the exchange.
  auto board = std::make_shared<testing::ThreadCommBoard>(2),
       board_back = std::make_shared<testing::ThreadCommBoard>(2);
  std::vector<RankResult> out(2);
  auto rank_main = [&](int r) {
    CpuBackend be(1);
    ModelConfig cfg = testing::TinyMoeModel();
    cfg.num_nextn_predict_layers = 0;
    // 8 experts, 4 per rank, a token picks 2 of them: blocks differ in size and content.
    cfg.n_routed_experts = 8;
    cfg.n_group = 1;
    cfg.topk_group = 1;
    StageSpan span;
    span.ep = 2;
    span.ep_rank = r;
    auto model = Model::Create(be, cfg, DType::kF32, 2, 4, span);
    ASSERT_TRUE(model.ok()) << model.status().message();
    ASSERT_TRUE(InitParams(be, cfg, 3, (*model)->params()).ok());
    // The device path: counts over the group, rows through the stand-in (as through NCCL on GPUs).
    testing::ThreadComm comm(board, r, 2), comm_back(board_back, r, 2);
    parallel::GroupExpertExchange ex(*groups[r], {0, 1}, 10000);
    if (device_path) ex.SetDevice(&comm, &comm_back);
    (*model)->SetExpertExchange(&ex);
    std::mt19937 rng(11 + r);
    std::vector<int32_t> tokens(2 * (*model)->window());
    for (int32_t& t : tokens) t = static_cast<int32_t>(rng() % cfg.vocab_size);
    auto loss = (*model)->ForwardStage(0, tokens.data(), LossWeights{});
    ASSERT_TRUE(loss.ok()) << loss.status().message();
    LossScale scale;
    scale.main = 1.0 / 8;
    scale.balance = 1.0;
    (*model)->BackwardStage(0, scale);
    ASSERT_TRUE(ex.status().ok()) << ex.status().message();
    out[r].loss = loss->main_sum;
    for (ParamRef& p : ListParams((*model)->grads())) out[r].grads.push_back(testing::ToVector(be, *p.tensor));
  };
  std::thread t1(rank_main, 1);
  rank_main(0);
  t1.join();
  out[0].forward_row_exchanges = out[1].forward_row_exchanges = board->row_exchanges / 2;
  out[0].row_exchanges = out[1].row_exchanges = (board->row_exchanges + board_back->row_exchanges) / 2;
  return out;
}

TEST(MoeEpDeviceRows, RowBlocksGiveTheHostPathsBits) {
  const std::vector<RankResult> host = RunTwoRanks(false), device = RunTwoRanks(true);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(host[r].row_exchanges, 0);
    // Two MoE layers, four row transfers each: dispatch and combine, forward and backward.
    EXPECT_EQ(device[r].row_exchanges, 8) << "rank " << r;
    EXPECT_EQ(device[r].forward_row_exchanges, 4)
        << "rank " << r << ": the backward's rows took the forward's communicator";
    EXPECT_EQ(device[r].loss, host[r].loss) << "rank " << r;
    ASSERT_EQ(device[r].grads.size(), host[r].grads.size());
    for (size_t i = 0; i < host[r].grads.size(); ++i)
      EXPECT_EQ(device[r].grads[i], host[r].grads[i]) << "rank " << r << " gradient " << i;
  }
}

}  // namespace
}  // namespace troupe
