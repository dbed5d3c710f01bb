// Launchers of the CUDA kernels in kernels.cu, on plain pointers: the .cu file includes no
// ATen/c10 headers, which keeps nvcc's work (one front-end pass per GPU architecture) to seconds.
// The ATen-facing host code (checks, allocation, cuBLAS matmul, topk, registration) is in
// ops_cuda.cpp, compiled by the host compiler.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace itm::cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };  // all computed in float32

// An [n, row] array of fp32/fp16/bf16/fp64 items.
struct Items {
  const void* data;
  DType dtype;
  int64_t n;
};

// coef: float32 [B, ld] rows (a, b, c, d, ...) of the items' forward-process coefficients.

// out[b] = a_b * latents[img_idx[b]] + b_b * noise[sample_idx[b]].
cudaError_t launch_noisy_latents(Items latents, Items noise, void* out, DType out_dtype, const int64_t* img_idx,
                                 const int64_t* sample_idx, const float* coef, int64_t ld, int64_t B, int64_t row,
                                 cudaStream_t stream);

// err[b] = mean_j (pred[b, j] - target[b, j])^2, target = c_b z0 + d_b eps, or d_b eps without latents
// (!with_latents: latents and img_idx are not read, and c_b must be 0: a device-side assert).
cudaError_t launch_item_error(Items pred, Items noise, const int64_t* sample_idx, const float* coef, int64_t ld,
                              bool with_latents, Items latents, const int64_t* img_idx, int64_t B, int64_t row,
                              float* err, cudaStream_t stream);

// keys[q, col0 + j] = the top-k key of (sims[q, j], gallery index start + j), for q < Q, j < n;
// keys has leading dimension ld. Keys order as (similarity desc, index asc).
cudaError_t launch_pack_keys(const float* sims, int64_t Q, int64_t n, int64_t start, int64_t* keys, int64_t ld,
                             int64_t col0, cudaStream_t stream);

// values[i], indices[i] decoded from keys[i], i < count.
cudaError_t launch_unpack_keys(const int64_t* keys, int64_t count, float* values, int64_t* indices,
                               cudaStream_t stream);

}  // namespace itm::cuda
