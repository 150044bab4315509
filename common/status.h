// Status and Expected<T>: the one error type of every non-actor layer.
//
// A Status is cheap when OK (no allocation) and carries a code plus a message
// that names the problem ("config: model.n_group=3 does not divide
// n_routed_experts=8"). Functions that produce a value return Expected<T>.
// Nothing below main() calls exit() or throws across a module boundary.
#pragma once

#include <string>
#include <utility>
#include <variant>

namespace troupe {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,  // a caller or an input (config, flag, file) is wrong
  kNotFound,         // a named file, key or tensor does not exist
  kCorruption,       // bytes on disk or the wire fail validation
  kIOError,          // the OS refused a read or write
  kOutOfMemory,      // an allocation failed (names tensor and size)
  kUnimplemented,    // the backend lacks this operation
  kInternal,         // a broken invariant: a bug in Troupe
};

class [[nodiscard]] Status {
 public:
  Status() = default;
  static Status Ok() { return Status(); }
  static Status InvalidArgument(std::string msg) { return {StatusCode::kInvalidArgument, std::move(msg)}; }
  static Status NotFound(std::string msg) { return {StatusCode::kNotFound, std::move(msg)}; }
  static Status Corruption(std::string msg) { return {StatusCode::kCorruption, std::move(msg)}; }
  static Status IOError(std::string msg) { return {StatusCode::kIOError, std::move(msg)}; }
  static Status OutOfMemory(std::string msg) { return {StatusCode::kOutOfMemory, std::move(msg)}; }
  static Status Unimplemented(std::string msg) { return {StatusCode::kUnimplemented, std::move(msg)}; }
  static Status Internal(std::string msg) { return {StatusCode::kInternal, std::move(msg)}; }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  bool IsInvalidArgument() const { return code_ == StatusCode::kInvalidArgument; }
  bool IsNotFound() const { return code_ == StatusCode::kNotFound; }
  bool IsCorruption() const { return code_ == StatusCode::kCorruption; }
  bool IsIOError() const { return code_ == StatusCode::kIOError; }

  // "what failed: message" -- for adding context while propagating.
  Status WithContext(const std::string& context) const {
    if (ok()) return *this;
    return Status(code_, context + ": " + message_);
  }
  std::string ToString() const { return ok() ? std::string("OK") : message_; }

 private:
  Status(StatusCode code, std::string msg) : code_(code), message_(std::move(msg)) {}
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// A value or a non-OK Status. Access value() only when ok().
template <typename T>
class [[nodiscard]] Expected {
 public:
  Expected(T value) : v_(std::move(value)) {}            // NOLINT(google-explicit-constructor)
  Expected(Status status) : v_(std::move(status)) {}     // NOLINT(google-explicit-constructor)
  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace troupe

// Propagate a non-OK Status from an expression returning Status.
#define TROUPE_RETURN_IF_ERROR(expr)            \
  do {                                          \
    ::troupe::Status _troupe_st = (expr);       \
    if (!_troupe_st.ok()) return _troupe_st;    \
  } while (0)

#define TROUPE_CONCAT_INNER(a, b) a##b
#define TROUPE_CONCAT(a, b) TROUPE_CONCAT_INNER(a, b)
// Assign the value of an Expected<T> expression or return its Status.
#define TROUPE_ASSIGN_OR_RETURN(lhs, expr)                                  \
  auto TROUPE_CONCAT(_troupe_ex_, __LINE__) = (expr);                       \
  if (!TROUPE_CONCAT(_troupe_ex_, __LINE__).ok())                           \
    return TROUPE_CONCAT(_troupe_ex_, __LINE__).status();                   \
  lhs = std::move(TROUPE_CONCAT(_troupe_ex_, __LINE__)).value()
