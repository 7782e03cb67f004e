#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace edgelora {

std::int64_t argmax(const float* logits, std::int64_t vocab) {
  std::int64_t best = 0;
  float best_value = -INFINITY;
  bool found = false;
  for (std::int64_t i = 0; i < vocab; ++i) {
    const float value = logits[i];
    if (std::isnan(value)) continue;
    if (!found || value > best_value) {
      best = i;
      best_value = value;
      found = true;
    }
  }
  return best;
}

std::int64_t sample_row(const float* logits, std::int64_t vocab, const SamplingSettings& settings, Sampler& sampler,
                        std::vector<std::int64_t>& index, std::vector<double>& weight) {
  if (settings.temperature <= 0.0f || settings.top_k == 1) return argmax(logits, vocab);
  const double uniform = sampler.next_uniform();  // drawn once per step whatever the filters keep

  // Candidates: every token with a finite logit, largest first when a cut needs an order.
  index.clear();
  for (std::int64_t i = 0; i < vocab; ++i) {
    if (std::isfinite(logits[i])) index.push_back(i);
  }
  if (index.empty()) return argmax(logits, vocab);
  auto larger = [logits](std::int64_t a, std::int64_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  const bool cut_k = settings.top_k > 0 && static_cast<std::size_t>(settings.top_k) < index.size();
  const bool cut_p = settings.top_p < 1.0f;
  if (cut_k) {
    std::partial_sort(index.begin(), index.begin() + settings.top_k, index.end(), larger);
    index.resize(settings.top_k);
  } else if (cut_p) {
    std::sort(index.begin(), index.end(), larger);
  }

  const double inverse_temperature = 1.0 / settings.temperature;
  double top = -INFINITY;
  for (auto i : index) top = std::max(top, static_cast<double>(logits[i]));
  weight.resize(index.size());
  double total = 0.0;
  for (std::size_t j = 0; j < index.size(); ++j) {
    weight[j] = std::exp((static_cast<double>(logits[index[j]]) - top) * inverse_temperature);
    total += weight[j];
  }

  std::size_t kept = index.size();
  if (cut_p) {  // index is sorted largest first: the smallest prefix whose mass reaches top_p
    const double target = static_cast<double>(settings.top_p) * total;
    double mass = 0.0;
    for (std::size_t j = 0; j < index.size(); ++j) {
      mass += weight[j];
      if (mass >= target) {
        kept = j + 1;
        break;
      }
    }
    total = std::accumulate(weight.begin(), weight.begin() + kept, 0.0);
  }

  const double point = uniform * total;
  double mass = 0.0;
  for (std::size_t j = 0; j < kept; ++j) {
    mass += weight[j];
    if (point < mass) return index[j];
  }
  return index[kept - 1];  // rounding left `point` at the very top of the range
}

}  // namespace edgelora
