/* C ABI of the native CPU sampler (librast_native). No torch headers: callers pass raw pointers.
 *
 * Semantics are those of rast_kernels.reference (the executable spec): z = logits + sum_k w_k*(rl_k - base_k)
 * in float32 over the first `vocab` columns, non-finite tokens excluded, temperature (<= 0 greedy), then
 * top-k, top-p, min-p in HF order, and the counter-based Gumbel noise of rast_kernels/rng.py. */
#ifndef RAST_NATIVE_H
#define RAST_NATIVE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define RAST_API __declspec(dllexport)
#else
#define RAST_API __attribute__((visibility("default")))
#endif

enum { RAST_F32 = 0, RAST_BF16 = 1, RAST_F16 = 2 };
enum { RAST_OK = 0, RAST_EBAD_DTYPE = 1, RAST_EBAD_SHAPE = 2, RAST_ENULL = 3, RAST_ENOMEM = 4 };
#define RAST_ABI_VERSION 1

typedef struct {
  int64_t batch;                /* B */
  int64_t vocab;                /* V: columns read from every matrix, ids returned are < V */
  int32_t pairs;                /* K */
  const void* const* rows;      /* 1 + 2K matrices: logits, rl_0, base_0, rl_1, base_1, ... */
  const int64_t* row_strides;   /* elements between consecutive rows, per matrix; columns are contiguous */
  const int32_t* dtypes;        /* RAST_F32 / RAST_BF16 / RAST_F16, per matrix */
  const float* weights;         /* [B, K] row-major (may be NULL when K == 0) */
  const float* temperature;     /* [B]; <= 0 means greedy */
  const int32_t* top_k;         /* [B]; <= 0 or >= V means off */
  const float* top_p;           /* [B]; 1 means off */
  const float* min_p;           /* [B]; 0 means off */
  const int64_t* seed;          /* [B]; read by rast_sample only */
  const int64_t* offset;        /* [B]; read by rast_sample only */
} rast_batch;

/* One token per row into out[B]; -1 for a row without admissible token. Returns RAST_OK or an error. */
RAST_API int rast_sample(const rast_batch* batch, int64_t* out, int32_t num_threads);
/* The distribution rast_sample draws from, into out[b * out_row_stride + i] for i < V. */
RAST_API int rast_probs(const rast_batch* batch, float* out, int64_t out_row_stride, int32_t num_threads);
RAST_API const char* rast_error_string(int code);
RAST_API int rast_abi_version(void);

#ifdef __cplusplus
}
#endif
#endif
