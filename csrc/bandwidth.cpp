#include "bandwidth.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <thread>
#include <vector>

namespace edgelora {
namespace {

// Integer sums vectorize without -ffast-math; four accumulators keep several loads in flight.
std::uint64_t sum_words(const std::uint64_t* data, std::size_t count) {
  std::uint64_t a = 0, b = 0, c = 0, d = 0;
  std::size_t i = 0;
  for (; i + 4 <= count; i += 4) {
    a += data[i];
    b += data[i + 1];
    c += data[i + 2];
    d += data[i + 3];
  }
  for (; i < count; ++i) a += data[i];
  return a + b + c + d;
}

}  // namespace

double read_bandwidth(std::size_t size_bytes, unsigned threads, int repeats) {
  if (size_bytes < (1u << 20)) throw std::invalid_argument("read_bandwidth: size_bytes must be >= 1 MiB");
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  const std::size_t words = size_bytes / sizeof(std::uint64_t);
  std::vector<std::uint64_t> buffer(words);
  for (std::size_t i = 0; i < words; ++i) buffer[i] = i;  // touch every page once, untimed

  const std::size_t chunk = (words + threads - 1) / threads;
  std::vector<std::uint64_t> sinks(threads * 8, 0);  // one cache line apart: no false sharing
  double best_s = 1e30;
  for (int pass = 0; pass < std::max(1, repeats); ++pass) {
    auto started = std::chrono::steady_clock::now();
    std::vector<std::thread> workers;
    for (unsigned t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] {
        const std::size_t begin = std::min(words, t * chunk);
        const std::size_t end = std::min(words, begin + chunk);
        sinks[t * 8] += sum_words(buffer.data() + begin, end - begin);
      });
    }
    for (auto& worker : workers) worker.join();
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    best_s = std::min(best_s, elapsed);
  }
  volatile std::uint64_t keep = 0;
  for (auto sink : sinks) keep = keep + sink;
  return static_cast<double>(words * sizeof(std::uint64_t)) / best_s;
}

}  // namespace edgelora
