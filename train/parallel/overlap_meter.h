// Where the time of an op's compute threads went while they also waited on
// communication. Each lane (one thread running one chunk: an F, or the F or
// the B of a DualPipe F&B pair) is computing, blocked in a receive, or done.
// A lane's wait is hidden while another lane of the op computes, and exposed
// while none does: the exposed part is what the op lost to communication,
// the hidden part what the pairing won back.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "train/parallel/process_group.h"

namespace troupe::parallel {

class OverlapMeter {
 public:
  using Clock = std::function<double()>;  // seconds, monotonic

  struct Totals {
    double wall_s = 0;     // Start to Finish
    double waited_s = 0;   // summed over lanes: time blocked in receives
    double hidden_s = 0;   // the part of waited_s during which another lane computed
    double exposed_s = 0;  // wall time during which some lane waited and none computed
  };

  // `lanes` observers exist for the meter's life; `now` defaults to the steady clock.
  explicit OverlapMeter(int lanes, Clock now = nullptr);
  ~OverlapMeter();

  // Starts an op whose first `active` lanes (<= lanes) are computing.
  void Start(int active);
  // A lane finished its chunk; it neither computes nor waits from now on.
  void SetDone(int lane);
  // Ends the op (every lane done) and returns its totals.
  Totals Finish();

  // What a lane's thread installs (ScopedCommWaitObserver) so its receives
  // report their waits here.
  CommWaitObserver* lane(int i);

 private:
  enum class State { kComputing, kWaiting, kDone };
  class LaneObserver;
  void Set(int lane, State s);
  void AdvanceLocked();  // accounts the time since the last change

  Clock now_;
  std::vector<std::unique_ptr<LaneObserver>> lanes_;
  std::mutex mu_;
  std::vector<State> state_;
  double start_ = 0, last_ = 0;
  Totals totals_;
};

}  // namespace troupe::parallel
