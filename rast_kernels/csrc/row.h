// One row of the sampler: combine the logits, then find the admissible set A without sorting the vocabulary.
//
// Quantities are those of rast_kernels/reference.py: d_i = (zmax - z_i) / T >= 0 (the distance from the
// mode in nats; +inf for excluded tokens), w_i = exp(-d_i). Top-k, top-p and min-p each keep every token at
// least as likely as one they keep, so
//   A = { i : d_i <= thr, w_i >= min_p }
// for one threshold thr. Filtering is therefore a threshold search: a histogram of d (fixed-width bins from
// the mode) locates the bin that straddles each cut, and a selection inside that one bin finds it exactly,
// in O(V) and without sorting the vocabulary.
#pragma once

#include <cstdint>
#include <vector>

namespace rast {

struct RowView {
  const void* const* rows;  // 1 + 2K pointers to this row of each matrix
  const int32_t* dtypes;
  const float* weights;  // K weights of this row
  int32_t pairs;
  int64_t vocab;
};

struct RowParams {
  float temperature;
  int32_t top_k;
  float top_p;
  float min_p;
};

struct Candidate {
  float d;
  float w;
};

// Per-thread buffers, reused across rows and calls so the hot loop never allocates.
struct Scratch {
  std::vector<float> d;  // z, then d = (zmax - z) / T with excluded tokens at +inf
  std::vector<float> w;  // exp(-d) for tokens that survive top-k, else 0
  std::vector<float> tmp_a, tmp_b;
  std::vector<float> values;
  std::vector<Candidate> cands;
};

struct Admissible {
  bool empty = true;
  bool greedy = false;
  int64_t argmax = -1;  // greedy rows: the single admissible token
  float thr = 0.0f;     // keep d_i <= thr (always finite)
  float w_min = 0.0f;   // and w_i >= w_min (min-p); w is filled only when has_w
  bool has_w = false;
  double mass = 0.0;    // sum of w_i over A when has_w
};

// z_i = logits_i + sum_k w_k * (rl_k,i - base_k,i) in float32, in that association order, into scratch.d.
void combine_row(const RowView& row, Scratch& scratch);

// Runs after combine_row. need_w: fill scratch.w and the mass of A (probs needs it; sampling only when a
// top-p or min-p filter is active).
Admissible filter_row(const RowParams& params, int64_t vocab, bool need_w, Scratch& scratch);

}  // namespace rast
