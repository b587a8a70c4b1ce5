#include "row.h"

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "convert.h"

namespace rast {
namespace {

constexpr int64_t kChunk = 2048;       // delta columns widened per step; stays in L1
constexpr int kBins = 512;             // histogram bins of d; the last one is open-ended
constexpr float kBinsPerNat = 16.0f;   // so bins 0..510 cover d in [0, 32) nats
constexpr float kInf = INFINITY;

// Bin of a distance d >= 0 (+inf allowed): monotone, so every token of an earlier bin is strictly more
// probable than every token of a later one, and a tie group never spans two bins.
inline int bin_of(float d) {
  const float t = d * kBinsPerNat;
  return t < static_cast<float>(kBins - 1) ? static_cast<int>(t) : kBins - 1;
}

// The k-th smallest d over the whole row (1-based, duplicates counted, excluded tokens at +inf sorting
// last), exactly the reference's sorted-d[k-1]. Requires 0 < k < vocab.
float kth_smallest(const float* d, int64_t vocab, int64_t k, Scratch& sc) {
  int64_t counts[kBins] = {};
  for (int64_t i = 0; i < vocab; ++i) ++counts[bin_of(d[i])];
  int b = 0;
  int64_t before = 0;
  while (before + counts[b] < k) before += counts[b++];
  sc.values.clear();
  for (int64_t i = 0; i < vocab; ++i)
    if (bin_of(d[i]) == b) sc.values.push_back(d[i]);
  const int64_t rank = k - before - 1;  // 0-based rank inside the bin
  std::nth_element(sc.values.begin(), sc.values.begin() + rank, sc.values.end());
  return sc.values[rank];
}

// Quickselect by mass. c[0:n) are the tokens of one bin; `before` is the mass of every kept token closer
// to the mode than all of them. Returns the largest d = v in c with before + mass{c : d < v} < limit:
// top-p keeps exactly the tokens with d <= v. Precondition: before < limit, n > 0.
float top_p_cut(Candidate* c, size_t n, double before, double limit) {
  for (;;) {
    const float a = c[0].d, b = c[n / 2].d, e = c[n - 1].d;
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), e));
    size_t lt = 0, i = 0, gt = n;  // [0,lt) < pivot, [lt,i) == pivot, [gt,n) > pivot
    while (i < gt) {
      if (c[i].d < pivot) std::swap(c[i++], c[lt++]);
      else if (c[i].d > pivot) std::swap(c[i], c[--gt]);
      else ++i;
    }
    double mass_lt = 0.0, mass_eq = 0.0;
    for (size_t j = 0; j < lt; ++j) mass_lt += c[j].w;
    for (size_t j = lt; j < gt; ++j) mass_eq += c[j].w;
    if (before + mass_lt >= limit) {  // the pivot's group is cut; mass_lt > 0 so lt > 0
      n = lt;
      continue;
    }
    before += mass_lt + mass_eq;  // the pivot's tie group is kept: the mass before it is < limit
    if (gt == n || before >= limit) return pivot;
    c += gt;
    n -= gt;
  }
}

// Top-p over the top-k survivors (d <= thr, w set): the new threshold, or thr when nothing is cut.
float top_p_threshold(int64_t vocab, float thr, double total, float top_p, Scratch& sc) {
  const float* d = sc.d.data();
  const float* w = sc.w.data();
  double mass[kBins] = {};
  for (int64_t i = 0; i < vocab; ++i)
    if (d[i] <= thr) mass[bin_of(d[i])] += w[i];
  const double limit = static_cast<double>(top_p) * total;
  double before = 0.0;
  int b = 0;
  while (b < kBins && before + mass[b] < limit) before += mass[b++];
  if (b == kBins) return thr;  // rounding left the whole kept mass below the limit: nothing is cut
  sc.cands.clear();
  for (int64_t i = 0; i < vocab; ++i)
    if (d[i] <= thr && bin_of(d[i]) == b) sc.cands.push_back({d[i], w[i]});
  return top_p_cut(sc.cands.data(), sc.cands.size(), before, limit);
}

}  // namespace

void combine_row(const RowView& row, Scratch& sc) {
  const int64_t vocab = row.vocab;
  sc.d.resize(static_cast<size_t>(vocab));
  float* __restrict z = sc.d.data();
  widen(row.rows[0], row.dtypes[0], vocab, z);
  if (row.pairs == 0) return;
  sc.tmp_a.resize(kChunk);
  sc.tmp_b.resize(kChunk);
  float* __restrict a = sc.tmp_a.data();
  float* __restrict b = sc.tmp_b.data();
  for (int32_t k = 0; k < row.pairs; ++k) {
    const float wk = row.weights[k];
    const char* rl = static_cast<const char*>(row.rows[1 + 2 * k]);
    const char* base = static_cast<const char*>(row.rows[2 + 2 * k]);
    const int32_t dt_rl = row.dtypes[1 + 2 * k], dt_base = row.dtypes[2 + 2 * k];
    for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
      const int64_t n = std::min(kChunk, vocab - c0);
      widen(rl + c0 * dtype_size(dt_rl), dt_rl, n, a);
      widen(base + c0 * dtype_size(dt_base), dt_base, n, b);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) z[c0 + j] = z[c0 + j] + wk * (a[j] - b[j]);
    }
  }
}

Admissible filter_row(const RowParams& p, int64_t vocab, bool need_w, Scratch& sc) {
  Admissible out;
  float* __restrict d = sc.d.data();  // holds z on entry
  float zmax = -kInf;
#pragma omp simd reduction(max : zmax)
  for (int64_t i = 0; i < vocab; ++i) zmax = std::max(zmax, std::fabs(d[i]) <= FLT_MAX ? d[i] : -kInf);
  // no finite token, or a NaN parameter (the spec: such a row admits nothing, rather than some guess)
  if (zmax == -kInf || std::isnan(p.temperature) || std::isnan(p.top_p) || std::isnan(p.min_p)) return out;
  out.empty = false;
  if (!(p.temperature > 0.0f)) {  // greedy: the first finite z equal to the max
    int64_t i = 0;
    while (!(d[i] == zmax)) ++i;
    out.greedy = true;
    out.argmax = i;
    return out;
  }
  const float t = p.temperature;
#pragma omp simd
  for (int64_t i = 0; i < vocab; ++i) d[i] = std::fabs(d[i]) <= FLT_MAX ? (zmax - d[i]) / t : kInf;
  // d may overflow to +inf for a finite z at tiny T; such a token has w = 0, so leaving it out of A
  // (thr is finite) changes neither probs nor draws.
  float thr = FLT_MAX;
  if (p.top_k > 0 && p.top_k < vocab) thr = std::min(thr, kth_smallest(d, vocab, p.top_k, sc));
  const bool top_p_on = p.top_p < 1.0f, min_p_on = p.min_p > 0.0f;
  out.has_w = need_w || top_p_on || min_p_on;
  if (out.has_w) {
    sc.w.resize(static_cast<size_t>(vocab));
    float* __restrict w = sc.w.data();
    double total = 0.0;
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < vocab; ++i) {
      w[i] = d[i] <= thr ? std::exp(-d[i]) : 0.0f;
      total += w[i];
    }
    if (top_p_on) thr = top_p_threshold(vocab, thr, total, p.top_p, sc);
    // min-p: p_i >= min_p * p_max with p_max = w_mode / sum = 1 / sum, i.e. w_i >= min_p.
    out.w_min = min_p_on ? p.min_p : 0.0f;
    const float w_min = out.w_min;
    double kept = 0.0;
#pragma omp simd reduction(+ : kept)
    for (int64_t i = 0; i < vocab; ++i) kept += (d[i] <= thr && w[i] >= w_min) ? w[i] : 0.0f;
    out.mass = kept;
  }
  out.thr = thr;
  return out;
}

}  // namespace rast
