#include "sampler.h"

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>

namespace edgelora {

namespace {

// Largest logit first; equal logits keep the lower index first. A strict total order on finite
// logits, so sorting any prefix gives the same tokens as sorting everything.
struct Larger {
  const float* logits;
  bool operator()(std::int64_t a, std::int64_t b) const {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  }
};

// Unnormalised softmax weight: the one formula every path uses.
double softmax_weight(float logit, double top, double inverse_temperature) {
  return std::exp((static_cast<double>(logit) - top) * inverse_temperature);
}

// Inverse CDF over index[0, kept), in that order, with one uniform number; weight_of(j) is the
// weight of index[j]. The total is summed first, in the same order, as every path always has.
template <typename WeightOf>
std::int64_t draw(const std::vector<std::int64_t>& index, std::size_t kept, WeightOf weight_of, double uniform) {
  double total = 0.0;
  for (std::size_t j = 0; j < kept; ++j) total += weight_of(j);
  const double point = uniform * total;
  double mass = 0.0;
  for (std::size_t j = 0; j < kept; ++j) {
    mass += weight_of(j);
    if (point < mass) return index[j];
  }
  return index[kept - 1];  // rounding left `point` at the very top of the range
}

// The nucleus over every finite candidate (top_p < 1, no top_k), without sorting the vocabulary.
//
// The rule, as a full sort applies it: sort largest first, total = sum of all weights in that
// order, keep the first prefix whose running mass reaches top_p * total. Only that total needs
// every weight, and summed in vocabulary order it can differ from the sorted-order sum in the last
// bits. So the vocabulary-order sum only brackets the target: both sums of n non-negative terms lie
// within (n - 1) * 2^-53 (relative) of the exact sum, hence of each other within `slack`. Only the
// largest candidates are then sorted, their running masses (the same additions in the same order as
// the full sort) compared to both ends of the bracket. When the first prefix reaching the low end
// is also the first reaching the high end, it is the nucleus the full sort keeps, whatever the
// exact total. Otherwise (a running mass within ~1e-10 of the target, as with ties at a round
// top_p) the rest is sorted and the exact sorted-order total decides, as the full sort did.
//
// index: the finite candidates in vocabulary order; weight: scratch, becomes weight[token].
std::int64_t sample_nucleus(const float* logits, std::int64_t vocab, float top_p, double top,
                            double inverse_temperature, double uniform, std::vector<std::int64_t>& index,
                            std::vector<double>& weight) {
  // How many candidates to sort comes from a histogram of the weights by depth below the top,
  // (top - logit) / temperature, in quarter units down to 64 (weights under e^-64 share the last
  // bin): the top bins whose mass reaches the target hold every candidate the nucleus can need.
  // The depth never decreases as the logit does, so those bins hold exactly the largest candidates.
  constexpr int kBinsPerUnit = 4;
  constexpr int kBins = 64 * kBinsPerUnit + 1;
  auto bin_of = [top, inverse_temperature](float logit) {
    const double depth = (top - static_cast<double>(logit)) * inverse_temperature * kBinsPerUnit;
    return depth < kBins - 1 ? static_cast<int>(depth) : kBins - 1;
  };
  std::array<double, kBins> bin_mass{};
  std::array<std::size_t, kBins> bin_count{};
  weight.resize(static_cast<std::size_t>(vocab));  // by token; only the finite candidates' entries are read
  double total_by_index = 0.0;
  for (auto i : index) {
    weight[i] = softmax_weight(logits[i], top, inverse_temperature);
    total_by_index += weight[i];
    const int bin = bin_of(logits[i]);
    bin_mass[bin] += weight[i];
    ++bin_count[bin];
  }
  const std::size_t count = index.size();
  // 4 (n + 1) * 2^-53: twice the bound on |sorted sum - vocabulary-order sum|, plus the rounding
  // of the bracket arithmetic itself.
  const double slack = 2.0 * (static_cast<double>(count) + 1.0) * DBL_EPSILON;
  const double probability = static_cast<double>(top_p);
  const double target_low = probability * (total_by_index * (1.0 - slack));
  const double target_high = probability * (total_by_index * (1.0 + slack));

  // The bins' sums differ from the sorted prefix's like the totals do: `slack` covers that too.
  int top_bins = 0;
  std::size_t wanted = 0;
  for (double mass = 0.0; top_bins < kBins && mass < target_high * (1.0 + slack); ++top_bins) {
    mass += bin_mass[top_bins];
    wanted += bin_count[top_bins];
  }

  const Larger larger{logits};
  auto weight_of = [&index, &weight](std::size_t j) { return weight[index[j]]; };
  auto unsorted = index.begin();  // index[begin, unsorted) holds the largest candidates, in order
  if (2 * wanted < count) {       // sorting more than half costs about what sorting everything does
    unsorted = std::partition(index.begin(), index.end(),
                              [&](std::int64_t i) { return bin_of(logits[i]) < top_bins; });
    std::sort(index.begin(), unsorted, larger);
    const auto sorted = static_cast<std::size_t>(unsorted - index.begin());
    double mass = 0.0;
    std::size_t first_low = 0;  // how many candidates the mass first reached target_low with; 0: not yet
    for (std::size_t j = 0; j < sorted; ++j) {
      mass += weight_of(j);
      if (first_low == 0 && mass >= target_low) first_low = j + 1;
      if (mass >= target_high) {
        if (first_low == j + 1) return draw(index, first_low, weight_of, uniform);
        break;  // undecided: the exact total decides below
      }
    }
  }

  // Everything in order: the full sort's arithmetic, exactly.
  std::sort(unsorted, index.end(), larger);
  double total = 0.0;
  for (std::size_t j = 0; j < count; ++j) total += weight_of(j);
  const double target = probability * total;
  std::size_t kept = count;
  double mass = 0.0;
  for (std::size_t j = 0; j < count; ++j) {
    mass += weight_of(j);
    if (mass >= target) {
      kept = j + 1;
      break;
    }
  }
  return draw(index, kept, weight_of, uniform);
}

}  // namespace

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

  // Candidates: every token with a finite logit. Their maximum is also the maximum of any top-k.
  index.clear();
  double top = -INFINITY;
  for (std::int64_t i = 0; i < vocab; ++i) {
    if (std::isfinite(logits[i])) {
      index.push_back(i);
      top = std::max(top, static_cast<double>(logits[i]));
    }
  }
  if (index.empty()) return argmax(logits, vocab);
  const double inverse_temperature = 1.0 / settings.temperature;
  const bool cut_k = settings.top_k > 0 && static_cast<std::size_t>(settings.top_k) < index.size();
  const bool cut_p = settings.top_p < 1.0f;
  if (cut_p && !cut_k) {
    return sample_nucleus(logits, vocab, settings.top_p, top, inverse_temperature, uniform, index, weight);
  }
  if (cut_k) {  // largest first
    std::partial_sort(index.begin(), index.begin() + settings.top_k, index.end(), Larger{logits});
    index.resize(settings.top_k);
  }

  weight.resize(index.size());  // weight[j] belongs to index[j]
  double total = 0.0;
  for (std::size_t j = 0; j < index.size(); ++j) {
    weight[j] = softmax_weight(logits[index[j]], top, inverse_temperature);
    total += weight[j];
  }
  std::size_t kept = index.size();
  if (cut_p) {  // the top_k candidates, largest first: the smallest prefix whose mass reaches top_p
    const double target = static_cast<double>(settings.top_p) * total;
    double mass = 0.0;
    for (std::size_t j = 0; j < index.size(); ++j) {
      mass += weight[j];
      if (mass >= target) {
        kept = j + 1;
        break;
      }
    }
  }
  return draw(index, kept, [&weight](std::size_t j) { return weight[j]; }, uniform);
}

}  // namespace edgelora
