// C ABI: validation, the OpenMP loop over rows, and the two outputs (Gumbel-max draw, renormalised probs).
// Rows are independent, so parallelism is over rows; each thread keeps its own scratch buffers.
#include <cmath>
#include <cstring>
#include <new>

#include "rast_native.h"
#include "convert.h"
#include "rng.h"
#include "row.h"

namespace rast {
namespace {

int validate(const rast_batch* b) {
  if (b == nullptr || b->rows == nullptr || b->row_strides == nullptr || b->dtypes == nullptr) return RAST_ENULL;
  if (b->temperature == nullptr || b->top_k == nullptr || b->top_p == nullptr || b->min_p == nullptr)
    return RAST_ENULL;
  if (b->pairs > 0 && b->weights == nullptr) return RAST_ENULL;
  // Token ids feed the 32-bit counter of the noise, so V must fit in 32 bits.
  if (b->batch < 0 || b->vocab <= 0 || b->vocab > 0xFFFFFFFFll || b->pairs < 0) return RAST_EBAD_SHAPE;
  for (int32_t j = 0; j < 1 + 2 * b->pairs; ++j) {
    if (b->rows[j] == nullptr) return RAST_ENULL;
    if (b->dtypes[j] != RAST_F32 && b->dtypes[j] != RAST_BF16 && b->dtypes[j] != RAST_F16) return RAST_EBAD_DTYPE;
  }
  return RAST_OK;
}

// Filters row r into scratch; `pointers` has room for the 1 + 2K row pointers.
Admissible prepare_row(const rast_batch* b, int64_t r, bool need_w, const void** pointers, Scratch& sc) {
  const int32_t matrices = 1 + 2 * b->pairs;
  for (int32_t j = 0; j < matrices; ++j)
    pointers[j] = static_cast<const char*>(b->rows[j]) + r * b->row_strides[j] * dtype_size(b->dtypes[j]);
  const RowView view{pointers, b->dtypes, b->pairs > 0 ? b->weights + r * b->pairs : nullptr, b->pairs, b->vocab};
  combine_row(view, sc);
  const RowParams params{b->temperature[r], b->top_k[r], b->top_p[r], b->min_p[r]};
  return filter_row(params, b->vocab, need_w, sc);
}

// Gumbel-max over A: argmax_i g_i - d_i, lowest index on ties; an exact draw from w / sum(w) over A.
int64_t draw(const Admissible& a, const Scratch& sc, int64_t vocab, uint32_t key) {
  if (a.empty) return -1;
  if (a.greedy) return a.argmax;
  const float* d = sc.d.data();
  const float* w = a.has_w ? sc.w.data() : nullptr;
  // The mode (d = 0) scores at least kGumbelLow. Rounding is monotone, so a token whose best finite score
  // kGumbelHighFinite - d stays below that cannot win or tie, unless its uniform is exactly 1 (noise +inf).
  float best = -INFINITY;
  int64_t best_i = -1;
  for (int64_t i = 0; i < vocab; ++i) {
    const float di = d[i];
    if (!(di <= a.thr) || (w != nullptr && !(w[i] >= a.w_min))) continue;
    const uint32_t id = static_cast<uint32_t>(i);
    float score;
    if (kGumbelHighFinite - di < kGumbelLow) {
      if (token_uniform(key, id) != 1.0f) continue;
      score = INFINITY;
    } else {
      score = token_gumbel(key, id) - di;
    }
    if (best_i < 0 || score > best) {
      best = score;
      best_i = i;
    }
  }
  return best_i;
}

void write_probs(const Admissible& a, const Scratch& sc, int64_t vocab, float* out) {
  std::memset(out, 0, static_cast<size_t>(vocab) * sizeof(float));
  if (a.empty) return;
  if (a.greedy) {
    out[a.argmax] = 1.0f;
    return;
  }
  const float* d = sc.d.data();
  const float* w = sc.w.data();
  const double mass = a.mass;
  const float thr = a.thr, w_min = a.w_min;
#pragma omp simd
  for (int64_t i = 0; i < vocab; ++i)
    out[i] = (d[i] <= thr && w[i] >= w_min) ? static_cast<float>(w[i] / mass) : 0.0f;
}

template <class RowFn>
int for_each_row(const rast_batch* b, int32_t num_threads, RowFn fn) {
  const int status = validate(b);
  if (status != RAST_OK) return status;
  (void)num_threads;  // unused when built without OpenMP
  bool oom = false;
#pragma omp parallel num_threads(num_threads > 0 ? num_threads : 1) if (b->batch > 1)
  {
    static thread_local Scratch scratch;
    const void** pointers = nullptr;
    try {
      pointers = new const void*[1 + 2 * static_cast<size_t>(b->pairs)];
    } catch (const std::bad_alloc&) {
#pragma omp atomic write
      oom = true;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t r = 0; r < b->batch; ++r) {
      if (pointers == nullptr) continue;
      try {
        fn(r, pointers, scratch);
      } catch (const std::bad_alloc&) {
#pragma omp atomic write
        oom = true;
      }
    }
    delete[] pointers;
  }
  return oom ? RAST_ENOMEM : RAST_OK;
}

}  // namespace
}  // namespace rast

extern "C" {

int rast_sample(const rast_batch* b, int64_t* out, int32_t num_threads) {
  if (out == nullptr) return RAST_ENULL;
  if (b != nullptr && (b->seed == nullptr || b->offset == nullptr)) return RAST_ENULL;
  return rast::for_each_row(b, num_threads, [&](int64_t r, const void** pointers, rast::Scratch& sc) {
    const rast::Admissible a = rast::prepare_row(b, r, false, pointers, sc);
    out[r] = rast::draw(a, sc, b->vocab, rast::row_key(b->seed[r], b->offset[r]));
  });
}

int rast_probs(const rast_batch* b, float* out, int64_t out_row_stride, int32_t num_threads) {
  if (out == nullptr) return RAST_ENULL;
  return rast::for_each_row(b, num_threads, [&](int64_t r, const void** pointers, rast::Scratch& sc) {
    const rast::Admissible a = rast::prepare_row(b, r, true, pointers, sc);
    rast::write_probs(a, sc, b->vocab, out + r * out_row_stride);
  });
}

const char* rast_error_string(int code) {
  switch (code) {
    case RAST_OK: return "ok";
    case RAST_EBAD_DTYPE: return "unsupported dtype code (expected float32, bfloat16 or float16)";
    case RAST_EBAD_SHAPE: return "bad shape (batch >= 0, 0 < vocab < 2**32, pairs >= 0)";
    case RAST_ENULL: return "a required pointer is NULL";
    case RAST_ENOMEM: return "out of memory for the per-thread scratch rows";
    default: return "unknown error code";
  }
}

int rast_abi_version(void) { return RAST_ABI_VERSION; }

}  // extern "C"
