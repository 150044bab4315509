#include "cli/child_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <thread>

namespace troupe::cli {

Expected<pid_t> Spawn(const std::vector<std::string>& args, const std::string& log, bool inherit_stdout) {
  const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return Status::IOError("cannot open log " + log);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fd);
    return Status::IOError("fork failed");
  }
  if (pid == 0) {
    // The parent blocks SIGINT/SIGTERM for its own waiter; a child must not
    // inherit that (it would ignore StopChildren), and must not outlive a
    // parent that died without stopping it.
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) _exit(127);
    ::dup2(fd, STDERR_FILENO);
    if (!inherit_stdout) ::dup2(fd, STDOUT_FILENO);
    std::vector<char*> argv;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv("/proc/self/exe", argv.data());
    _exit(127);
  }
  ::close(fd);
  return pid;
}

void StopChildren(std::vector<pid_t>& pids, std::chrono::seconds grace) {
  for (pid_t p : pids)
    if (p > 0) ::kill(p, SIGTERM);
  const auto deadline = std::chrono::steady_clock::now() + grace;
  for (pid_t& p : pids) {
    while (p > 0) {
      int status = 0;
      if (::waitpid(p, &status, WNOHANG) == p) {
        p = -1;
      } else if (std::chrono::steady_clock::now() > deadline) {
        std::fprintf(stderr, "troupe: pid %d did not stop in %lld s; killing it\n", p,
                     static_cast<long long>(grace.count()));
        ::kill(p, SIGKILL);
        ::waitpid(p, &status, 0);
        p = -1;
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    }
  }
}

}  // namespace troupe::cli
