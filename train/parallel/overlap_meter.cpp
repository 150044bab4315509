#include "train/parallel/overlap_meter.h"

#include <chrono>

namespace troupe::parallel {

class OverlapMeter::LaneObserver final : public CommWaitObserver {
 public:
  LaneObserver(OverlapMeter* meter, int lane) : meter_(meter), lane_(lane) {}
  void OnCommWait(bool waiting) override { meter_->Set(lane_, waiting ? State::kWaiting : State::kComputing); }

 private:
  OverlapMeter* meter_;
  int lane_;
};

OverlapMeter::OverlapMeter(int lanes, Clock now) : now_(std::move(now)), state_(lanes, State::kDone) {
  if (!now_) {
    now_ = [] { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); };
  }
  for (int i = 0; i < lanes; ++i) lanes_.push_back(std::make_unique<LaneObserver>(this, i));
}

OverlapMeter::~OverlapMeter() = default;

CommWaitObserver* OverlapMeter::lane(int i) { return lanes_[i].get(); }

void OverlapMeter::Start(int active) {
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < state_.size(); ++i)
    state_[i] = static_cast<int>(i) < active ? State::kComputing : State::kDone;
  start_ = last_ = now_();
  totals_ = Totals{};
}

void OverlapMeter::AdvanceLocked() {
  const double t = now_();
  const double dt = t - last_;
  last_ = t;
  int waiting = 0, computing = 0;
  for (State s : state_) {
    waiting += s == State::kWaiting;
    computing += s == State::kComputing;
  }
  totals_.waited_s += waiting * dt;
  if (computing > 0) {
    totals_.hidden_s += waiting * dt;  // a waiting lane is not computing, so "another lane" is any computing one
  } else if (waiting > 0) {
    totals_.exposed_s += dt;
  }
}

void OverlapMeter::Set(int lane, State s) {
  std::lock_guard<std::mutex> lock(mu_);
  AdvanceLocked();
  // A receive reporting after its lane finished (it cannot, but a stray
  // observer must not resurrect a lane) changes nothing.
  if (state_[lane] != State::kDone) state_[lane] = s;
}

void OverlapMeter::SetDone(int lane) {
  std::lock_guard<std::mutex> lock(mu_);
  AdvanceLocked();
  state_[lane] = State::kDone;
}

OverlapMeter::Totals OverlapMeter::Finish() {
  std::lock_guard<std::mutex> lock(mu_);
  AdvanceLocked();
  for (State& s : state_) s = State::kDone;
  totals_.wall_s = last_ - start_;
  return totals_;
}

}  // namespace troupe::parallel
