// Token sampling over one row of logits: greedy, temperature, top-k, top-p, a seed per request.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace edgelora {

// One request's random stream: the same seed gives the same tokens on every platform
// (mt19937_64 is fully specified; the uniform draw is built from its bits, not the library's
// distribution, which may differ between standard libraries).
class Sampler {
 public:
  explicit Sampler(std::uint64_t seed) : engine_(seed) {}
  // A double in [0, 1) with 53 random bits.
  double next_uniform() { return static_cast<double>(engine_() >> 11) * (1.0 / 9007199254740992.0); }

 private:
  std::mt19937_64 engine_;
};

struct SamplingSettings {
  float temperature = 0.0f;  // <= 0: greedy
  int top_k = 0;             // <= 0: no limit; 1: greedy
  float top_p = 1.0f;        // (0, 1]; 1: no nucleus cut
};

// Index of the largest finite logit (the lowest index among ties); NaN is never chosen.
std::int64_t argmax(const float* logits, std::int64_t vocab);

// Greedy when temperature <= 0 or top_k == 1; otherwise logits / temperature, keep the top_k
// largest, softmax, keep the smallest prefix (by probability, descending) whose mass reaches
// top_p, and draw from what is left with one uniform number (inverse CDF).
std::int64_t sample_row(const float* logits, std::int64_t vocab, const SamplingSettings& settings, Sampler& sampler,
                        std::vector<std::int64_t>& scratch_index, std::vector<double>& scratch_weight);

}  // namespace edgelora
