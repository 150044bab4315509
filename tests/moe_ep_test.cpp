// Expert parallelism against a hostile or broken peer: row counts that do
// not fit the receive buffers, or a message whose size disagrees with its
// counts, are refused as Corruption before any row is placed; after a failed
// transfer the layer never touches the network again.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "gpu/cpu/cpu_backend.h"
#include "gpu/model/model.h"
#include "test_util.h"

namespace troupe {
namespace {

// Rank 0 of 2; rank 1's messages are whatever the test scripts.
class ScriptedPeer final : public ExpertExchange {
 public:
  explicit ScriptedPeer(std::vector<uint8_t> from_peer) : from_peer_(std::move(from_peer)) {}
  int size() const override { return 2; }
  int rank() const override { return 0; }
  Expected<std::vector<std::vector<uint8_t>>> AllToAll(std::vector<std::vector<uint8_t>> send, int) override {
    ++calls;
    return std::vector<std::vector<uint8_t>>{std::move(send[0]), from_peer_};
  }
  int calls = 0;

 private:
  std::vector<uint8_t> from_peer_;
};

std::vector<uint8_t> Counts(std::vector<int64_t> counts, size_t payload_bytes) {
  std::vector<uint8_t> m(counts.size() * sizeof(int64_t) + payload_bytes, 0);
  std::memcpy(m.data(), counts.data(), counts.size() * sizeof(int64_t));
  return m;
}

class MoeEpHostile : public ::testing::Test {
 protected:
  // Layer 0 dense, layers 1.. MoE; this rank holds experts 0 and 1 of 4.
  void Run(std::vector<uint8_t> from_peer, const std::string& needle) {
    CpuBackend be(1);
    ModelConfig cfg = testing::TinyMoeModel();
    cfg.num_nextn_predict_layers = 0;
    StageSpan span;
    span.ep = 2;
    auto model = Model::Create(be, cfg, DType::kF32, 2, 4, span);
    ASSERT_TRUE(model.ok()) << model.status().message();
    ASSERT_TRUE(InitParams(be, cfg, 3, (*model)->params()).ok());
    ScriptedPeer peer(std::move(from_peer));
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

TEST_F(MoeEpHostile, MoreRowsThanThePeerHasTokenCopies) {
  Run(Counts({kCopies + 1, 0}, (kCopies + 1) * kRowBytes), "out of range");
}

TEST_F(MoeEpHostile, AHugeCountThatWouldWrapTheSizeCheck) { Run(Counts({int64_t{1} << 62, 0}, 0), "out of range"); }

TEST_F(MoeEpHostile, NegativeCount) { Run(Counts({-1, 0}, 0), "out of range"); }

TEST_F(MoeEpHostile, PayloadDisagreesWithTheCounts) { Run(Counts({2, 1}, 2 * kRowBytes), "bytes for 3 rows"); }

TEST_F(MoeEpHostile, ShorterThanItsCounts) { Run(std::vector<uint8_t>(5, 0), "shorter than its counts"); }

}  // namespace
}  // namespace troupe
