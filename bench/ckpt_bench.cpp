// ckpt_bench: checkpoint save throughput against the raw sequential write
// bandwidth of the same disk, measured in the same run.
//
//   build/bench/ckpt_bench [--dir DIR] [--mib N] [--rounds R] [--threads T]
//
// raw:  N MiB written with 4 MiB write() calls into one file, then fsync.
// save: a snapshot of N MiB (64 tensors of random fp32) through
//       SaveCheckpoint: CRC32C, chunk files, shard headers in RocksDB, Sync,
//       manifest commit. r=1 into one store; r=2 into two stores on the same
//       disk (MiB/s counts every replica's bytes). T = SaveOptions::threads
//       (default: SaveOptions' default).
// Each figure is the median of R rounds (default 3), raw and save alternating
// so that drifting disk speed hurts both alike. Prints ratio = save / raw,
// and every round's figures (the spread says how loaded the machine was).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "storage/checkpoint/checkpoint_io.h"

namespace {

using Clock = std::chrono::steady_clock;
using troupe::ckpt::Snapshot;

double Seconds(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double RawWrite(const std::string& path, const std::vector<uint8_t>& block, size_t total) {
  const auto t0 = Clock::now();
  int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
  if (fd < 0) {
    std::perror(path.c_str());
    std::exit(1);
  }
  for (size_t done = 0; done < total;) {
    const ssize_t n = ::write(fd, block.data(), std::min(block.size(), total - done));
    if (n <= 0) {
      std::perror("write");
      std::exit(1);
    }
    done += static_cast<size_t>(n);
  }
  ::fsync(fd);
  ::close(fd);
  const double s = Seconds(t0);
  std::filesystem::remove(path);
  return s;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = "/tmp/troupe_ckpt_bench";
  size_t mib = 512;
  int rounds = 3;
  int threads = troupe::ckpt::SaveOptions{}.threads;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--dir" && i + 1 < argc)
      dir = argv[++i];
    else if (a == "--mib" && i + 1 < argc)
      mib = std::stoul(argv[++i]);
    else if (a == "--rounds" && i + 1 < argc)
      rounds = std::stoi(argv[++i]);
    else if (a == "--threads" && i + 1 < argc)
      threads = std::stoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: ckpt_bench [--dir DIR] [--mib N] [--rounds R] [--threads T]\n");
      return 2;
    }
  }
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const size_t total = mib << 20;
  std::mt19937_64 rng(1);
  Snapshot snap;
  snap.step = 1;
  snap.config_text = "bench";
  const int tensors = 64;
  for (int t = 0; t < tensors; ++t) {
    troupe::ckpt::HostTensor h;
    h.name = "tensor." + std::to_string(t);
    h.dtype = "F32";
    const int64_t floats = static_cast<int64_t>(total / tensors / 4);
    h.shape = {floats / 1024, 1024};
    h.bytes.resize(static_cast<size_t>(h.shape[0]) * 1024 * 4);
    for (size_t i = 0; i + 8 <= h.bytes.size(); i += 8) {
      const uint64_t r = rng();
      std::memcpy(h.bytes.data() + i, &r, 8);
    }
    snap.tensors.push_back(std::move(h));
  }
  const double bytes = static_cast<double>(snap.TotalBytes());
  std::vector<uint8_t> block(4u << 20, 0x5a);
  std::vector<double> raw, save1, save2;
  for (int r = 0; r < rounds; ++r) {
    raw.push_back(bytes / RawWrite(dir + "/raw.bin", block, static_cast<size_t>(bytes)));
    for (int replicas : {1, 2}) {
      const std::string d = dir + "/r" + std::to_string(replicas) + "_" + std::to_string(r);
      auto catalog = troupe::ckpt::Catalog::Open(d);
      auto s0 = troupe::ckpt::ShardStore::Open(d + "/store-0", "local-0");
      auto s1 = troupe::ckpt::ShardStore::Open(d + "/store-1", "local-1");
      if (!catalog.ok() || !s0.ok() || !s1.ok()) {
        std::fprintf(stderr, "cannot open stores under %s\n", d.c_str());
        return 1;
      }
      troupe::ckpt::StoreSet stores = {{"local-0", s0->get()}, {"local-1", s1->get()}};
      const auto t0 = Clock::now();
      troupe::ckpt::SaveOptions opts;
      opts.replication = replicas;
      opts.threads = threads;
      auto m = troupe::ckpt::SaveCheckpoint(snap, stores, **catalog, opts);
      const double s = Seconds(t0);
      if (!m.ok()) {
        std::fprintf(stderr, "save failed: %s\n", m.status().message().c_str());
        return 1;
      }
      (replicas == 1 ? save1 : save2).push_back(bytes * replicas / s);
      catalog->reset();
      s0->reset();
      s1->reset();
      std::filesystem::remove_all(d);
    }
  }
  const double mr = Median(raw), m1 = Median(save1), m2 = Median(save2);
  auto rounds_of = [](const std::vector<double>& v) {
    std::string s;
    for (double x : v) s += (s.empty() ? "" : " ") + std::to_string(static_cast<int>(x / 1048576 + 0.5));
    return s;
  };
  std::printf("checkpoint save vs raw sequential write, %zu MiB, %d rounds (median), %d writer thread(s), dir %s\n",
              mib, rounds, threads, dir.c_str());
  std::printf("| path | MiB/s | ratio to raw | rounds (MiB/s) |\n|---|---:|---:|---|\n");
  std::printf("| raw write + fsync | %.0f | 1.00 | %s |\n", mr / 1048576, rounds_of(raw).c_str());
  std::printf("| save r=1 | %.0f | %.2f | %s |\n", m1 / 1048576, m1 / mr, rounds_of(save1).c_str());
  std::printf("| save r=2 (bytes x2) | %.0f | %.2f | %s |\n", m2 / 1048576, m2 / mr, rounds_of(save2).c_str());
  std::filesystem::remove_all(dir);
  return 0;
}
