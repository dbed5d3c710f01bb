// CUDA kernels of torch.ops.itm_engine.* (host side in ops_cuda.cpp; CPU code in ops.cpp).
//
// Kept cheap to compile: no ATen/c10 headers, one untemplated kernel per op; the input and output
// dtypes (fp32/fp16/bf16/fp64, all computed in float32) are told apart at run time by a dtype code
// (a warp-uniform branch, negligible next to the memory traffic). The per-item coefficients
// (a, b, c, d) come computed (noise.ForwardProcess); products are rounded as the PyTorch reference
// rounds them (__fmul_rn/__fadd_rn: no fused multiply-add), so float32 results match it to the
// last bit on noisy_latents.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cassert>
#include <cstdint>

#include "kernels.h"

namespace itm::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float load(const void* p, int64_t i, int dt) {
  if (dt == kF16) return __half2float(static_cast<const __half*>(p)[i]);
  if (dt == kBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  if (dt == kF64) return __double2float_rn(static_cast<const double*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

__device__ __forceinline__ void store(void* p, int64_t i, int dt, float v) {
  if (dt == kF16) {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  } else if (dt == kBF16) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  } else if (dt == kF64) {
    static_cast<double*>(p)[i] = v;
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

// grid (x: blocks striding over an item's elements, y: items striding over B).
__global__ void noisy_latents_kernel(Items latents, Items noise, void* out, int out_dt, const int64_t* img_idx,
                                     const int64_t* sample_idx, const float* coef, int64_t ld, int64_t B,
                                     int64_t row) {
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t zi = img_idx[b], ei = sample_idx[b];
    assert(zi >= 0 && zi < latents.n && "itm_engine.noisy_latents: img_idx out of range");
    assert(ei >= 0 && ei < noise.n && "itm_engine.noisy_latents: sample_idx out of range");
    const float a = coef[b * ld], s = coef[b * ld + 1];  // x_t = a z0 + s eps
    const int64_t z0 = zi * row, e0 = ei * row, x0 = b * row;
    for (int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; j < row; j += int64_t{gridDim.x} * blockDim.x) {
      const float z = load(latents.data, z0 + j, latents.dtype), e = load(noise.data, e0 + j, noise.dtype);
      store(out, x0 + j, out_dt, __fadd_rn(__fmul_rn(a, z), __fmul_rn(s, e)));
    }
  }
}

// One block per item (striding over B): each thread sums its strided elements in float32, then
// a fixed shuffle/shared-memory tree adds the threads up. Deterministic; no atomics.
__global__ void item_error_kernel(Items pred, Items noise, const int64_t* sample_idx, const float* coef, int64_t ld,
                                  bool with_latents, Items latents, const int64_t* img_idx, int64_t B, int64_t row,
                                  float* err) {
  __shared__ float warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const int64_t ei = sample_idx[b];
    assert(ei >= 0 && ei < noise.n && "itm_engine.item_error: sample_idx out of range");
    const float c = coef[b * ld + 2], d = coef[b * ld + 3];
    int64_t zi = 0;
    if (with_latents) {
      zi = img_idx[b];
      assert(zi >= 0 && zi < latents.n && "itm_engine.item_error: img_idx out of range");
    } else {
      assert(c == 0.f && "itm_engine.item_error: a target with a latent term (c != 0) needs latents");
    }
    const int64_t p0 = b * row, e0 = ei * row, z0 = zi * row;
    float acc = 0.f;
    for (int64_t j = threadIdx.x; j < row; j += blockDim.x) {
      float target = __fmul_rn(d, load(noise.data, e0 + j, noise.dtype));
      if (with_latents) {  // target = c z0 + d eps
        target = __fadd_rn(__fmul_rn(c, load(latents.data, z0 + j, latents.dtype)), target);
      }
      const float diff = load(pred.data, p0 + j, pred.dtype) - target;
      acc += diff * diff;
    }
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (warp == 0) {
      acc = lane < kThreads / 32 ? warp_sums[lane] : 0.f;
      for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
      if (lane == 0) err[b] = acc / static_cast<float>(row);
    }
    __syncthreads();  // warp_sums is reused by the next item
  }
}

// Top-k keys: int64 whose order is (similarity desc, gallery index asc), so at::topk on these
// unique keys gives the tie rule and a deterministic result. High 32 bits: the float's bits made
// monotonic; low 32 bits: the inverted gallery index (the host checks G < 2^32).
__global__ void pack_keys_kernel(const float* sims, int64_t Q, int64_t n, int64_t start, int64_t* keys, int64_t ld,
                                 int64_t col0) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < Q * n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t q = i / n, j = i % n;
    const float v = sims[i];
    const uint32_t bits = __float_as_uint(v);
    // NaN ranks above +inf (as torch ranks it); -0.0 ties with +0.0, as they compare equal.
    const uint32_t u = isnan(v)                 ? 0xffffffffu
                       : v == 0.f                ? 0x80000000u
                       : (bits & 0x80000000u) != 0 ? ~bits
                                                   : (bits | 0x80000000u);
    const uint64_t key = (uint64_t{u} << 32) | uint32_t(~uint32_t(start + j));
    keys[q * ld + col0 + j] = static_cast<int64_t>(key ^ 0x8000000000000000ull);  // unsigned order -> signed
  }
}

__global__ void unpack_keys_kernel(const int64_t* keys, int64_t count, float* values, int64_t* indices) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count; i += int64_t{gridDim.x} * blockDim.x) {
    const uint64_t key = static_cast<uint64_t>(keys[i]) ^ 0x8000000000000000ull;
    const uint32_t u = uint32_t(key >> 32);
    values[i] = __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
    indices[i] = int64_t(~uint32_t(key));
  }
}

unsigned blocks_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return unsigned(blocks < 1 ? 1 : blocks > 65535 ? 65535 : blocks);
}

unsigned capped(int64_t n) { return unsigned(n > 65535 ? 65535 : n); }

}  // namespace

cudaError_t launch_noisy_latents(Items latents, Items noise, void* out, DType out_dtype, const int64_t* img_idx,
                                 const int64_t* sample_idx, const float* coef, int64_t ld, int64_t B, int64_t row,
                                 cudaStream_t stream) {
  if (B == 0 || row == 0) return cudaSuccess;
  noisy_latents_kernel<<<dim3(blocks_for(row), capped(B)), kThreads, 0, stream>>>(
      latents, noise, out, out_dtype, img_idx, sample_idx, coef, ld, B, row);
  return cudaGetLastError();
}

cudaError_t launch_item_error(Items pred, Items noise, const int64_t* sample_idx, const float* coef, int64_t ld,
                              bool with_latents, Items latents, const int64_t* img_idx, int64_t B, int64_t row,
                              float* err, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  item_error_kernel<<<capped(B), kThreads, 0, stream>>>(pred, noise, sample_idx, coef, ld, with_latents, latents,
                                                        img_idx, B, row, err);
  return cudaGetLastError();
}

cudaError_t launch_pack_keys(const float* sims, int64_t Q, int64_t n, int64_t start, int64_t* keys, int64_t ld,
                             int64_t col0, cudaStream_t stream) {
  if (Q * n == 0) return cudaSuccess;
  pack_keys_kernel<<<blocks_for(Q * n), kThreads, 0, stream>>>(sims, Q, n, start, keys, ld, col0);
  return cudaGetLastError();
}

cudaError_t launch_unpack_keys(const int64_t* keys, int64_t count, float* values, int64_t* indices,
                               cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  unpack_keys_kernel<<<blocks_for(count), kThreads, 0, stream>>>(keys, count, values, indices);
  return cudaGetLastError();
}

}  // namespace itm::cuda
