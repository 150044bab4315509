// Overlap of communication with compute (docs/parallel.md, "Overlap"): the
// OverlapMeter's accounting, the wait observer that feeds it, and the split
// (Start/Finish) expert all-to-all that lets a layer compute while rows travel.
#include "train/parallel/overlap_meter.h"

#include <gtest/gtest.h>

#include <thread>

#include "train/parallel/ep_exchange.h"
#include "train/parallel/process_group.h"

namespace troupe::parallel {
namespace {

// A clock the test moves by hand, so every figure is exact.
struct ManualClock {
  double t = 0;
  OverlapMeter::Clock fn() {
    return [this] { return t; };
  }
};

TEST(OverlapMeter, SplitsWaitsIntoHiddenAndExposed) {
  ManualClock clock;
  OverlapMeter meter(2, clock.fn());
  meter.Start(2);
  clock.t = 1;                            // both compute for 1 s
  meter.lane(0)->OnCommWait(true);        // F waits 2 s while B computes: hidden
  clock.t = 3;
  meter.lane(1)->OnCommWait(true);        // then both wait 1 s: exposed
  clock.t = 4;
  meter.lane(1)->OnCommWait(false);       // B computes again while F still waits 0.5 s: hidden
  clock.t = 4.5;
  meter.lane(0)->OnCommWait(false);
  clock.t = 5;
  meter.SetDone(0);                       // F done; B waits 1 s alone: exposed
  meter.lane(1)->OnCommWait(true);
  clock.t = 6;
  meter.lane(1)->OnCommWait(false);
  clock.t = 6.5;
  meter.SetDone(1);
  const OverlapMeter::Totals t = meter.Finish();
  EXPECT_DOUBLE_EQ(t.wall_s, 6.5);
  EXPECT_DOUBLE_EQ(t.waited_s, 2 + 1 + 1 + 0.5 + 1);  // F: 3.5 s, B: 1 + 1 s
  EXPECT_DOUBLE_EQ(t.hidden_s, 2 + 0.5);
  EXPECT_DOUBLE_EQ(t.exposed_s, 1 + 1);
}

TEST(OverlapMeter, OneLaneWaitsAreAllExposedAndADoneLaneStaysDone) {
  ManualClock clock;
  OverlapMeter meter(2, clock.fn());
  meter.Start(1);  // lane 1 idle: its reports change nothing
  meter.lane(1)->OnCommWait(false);
  meter.lane(0)->OnCommWait(true);
  clock.t = 2;
  meter.lane(0)->OnCommWait(false);
  clock.t = 3;
  OverlapMeter::Totals t = meter.Finish();
  EXPECT_DOUBLE_EQ(t.waited_s, 2);
  EXPECT_DOUBLE_EQ(t.exposed_s, 2);
  EXPECT_DOUBLE_EQ(t.hidden_s, 0);
  // The next op starts from zero.
  meter.Start(1);
  clock.t = 4;
  t = meter.Finish();
  EXPECT_DOUBLE_EQ(t.wall_s, 1);
  EXPECT_DOUBLE_EQ(t.waited_s, 0);
}

// Records what the process group tells this thread.
struct Recorder final : CommWaitObserver {
  std::vector<bool> calls;
  void OnCommWait(bool waiting) override { calls.push_back(waiting); }
};

TEST(CommWaitObserver, ToldOnlyWhenARecvReallyBlocksAndOnlyOnItsThread) {
  auto group = CreateLocalGroup(2);
  Recorder rec;
  {
    ScopedCommWaitObserver observe(&rec);
    ASSERT_TRUE(group[1]->Send(0, 7, {1}).ok());
    ASSERT_TRUE(group[0]->Recv(1, 7, 1000).ok());  // already there: no wait
    EXPECT_TRUE(rec.calls.empty());
    std::thread late([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      ASSERT_TRUE(group[1]->Send(0, 8, {2}).ok());
    });
    ASSERT_TRUE(group[0]->Recv(1, 8, 5000).ok());
    late.join();
    EXPECT_EQ(rec.calls, (std::vector<bool>{true, false}));
    EXPECT_FALSE(group[0]->Recv(1, 9, 10).ok());  // a timeout ends its wait too
    EXPECT_EQ(rec.calls.size(), 4u);
    EXPECT_FALSE(rec.calls.back());
  }
  // Uninstalled: later waits tell nobody.
  EXPECT_FALSE(group[0]->Recv(1, 9, 10).ok());
  EXPECT_EQ(rec.calls.size(), 4u);
}

std::vector<std::vector<uint8_t>> Rows(int from, int ranks) {
  std::vector<std::vector<uint8_t>> out(ranks);
  for (int j = 0; j < ranks; ++j) out[j] = std::vector<uint8_t>(j + 1, static_cast<uint8_t>(10 * from + j));
  return out;
}

// The split all-to-all delivers what the whole one does; between Start and
// Finish this rank computes while the others' rows arrive.
TEST(ExpertExchangeHalves, StartThenFinishDeliversEveryRanksRows) {
  constexpr int kRanks = 3;
  auto group = CreateLocalGroup(kRanks);
  std::vector<std::thread> threads;
  std::vector<std::string> errors(kRanks);
  for (int r = 0; r < kRanks; ++r) {
    threads.emplace_back([&, r] {
      GroupExpertExchange ex(*group[r], {0, 1, 2}, 5000);
      for (int round = 0; round < 3; ++round) {  // phases reused: each Finish frees its phase
        if (Status s = ex.Start(Rows(r, kRanks), 1); !s.ok()) {
          errors[r] = s.message();
          return;
        }
        auto got = ex.Finish(1);
        if (!got.ok()) {
          errors[r] = got.status().message();
          return;
        }
        for (int src = 0; src < kRanks; ++src) {
          const std::vector<uint8_t> want(r + 1, static_cast<uint8_t>(10 * src + r));
          if ((*got)[src] != want) errors[r] = "wrong rows from rank " + std::to_string(src);
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < kRanks; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

TEST(ExpertExchangeHalves, FinishWithoutStartAndBadPhasesAreRefused) {
  auto group = CreateLocalGroup(2);
  GroupExpertExchange ex(*group[0], {0, 1}, 100);
  auto got = ex.Finish(2);
  ASSERT_FALSE(got.ok());
  EXPECT_NE(got.status().message().find("phase 2 finished without a start"), std::string::npos);
  EXPECT_FALSE(ex.Start(Rows(0, 2), 4).ok());
  EXPECT_FALSE(ex.Start(Rows(0, 2), -1).ok());
  // A start whose peer never answers fails in Finish, naming the silence.
  ASSERT_TRUE(ex.Start(Rows(0, 2), 0).ok());
  got = ex.Finish(0);
  ASSERT_FALSE(got.ok());
  EXPECT_NE(got.status().message().find("no message from rank 1"), std::string::npos) << got.status().message();
}

// An exchange with only the whole all-to-all gets working halves from the base class.
class WholeOnly final : public ExpertExchange {
 public:
  int size() const override { return 2; }
  int rank() const override { return 0; }
  Expected<std::vector<std::vector<uint8_t>>> AllToAll(std::vector<std::vector<uint8_t>> send, int phase) override {
    phases.push_back(phase);
    return send;  // the "peer" echoes
  }
  std::vector<int> phases;
};

TEST(ExpertExchangeHalves, TheBaseClassSendsInFinish) {
  WholeOnly ex;
  ASSERT_TRUE(ex.Start(Rows(0, 2), 3).ok());
  EXPECT_TRUE(ex.phases.empty());
  auto got = ex.Finish(3);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(ex.phases, std::vector<int>{3});
  EXPECT_EQ((*got)[1], std::vector<uint8_t>(2, 1));
  EXPECT_FALSE(ex.Finish(3).ok());
}

}  // namespace
}  // namespace troupe::parallel
