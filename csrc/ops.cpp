// itm_engine._C: the fused ops' schemas (torch.ops.itm_engine.*) and their CPU implementations.
//
// Semantics are those of itm_engine/kernels/reference.py. The CPU code works on blocks of
// kBlock elements: each block of an item is converted to float32 in a small stack buffer (no
// copy for float32 inputs), combined with loops the compiler vectorises at -O3, and the blocks of
// all items are spread over threads with at::parallel_for (OpenMP). One conversion function per
// dtype, picked once per call, keeps the code to 3 instantiations instead of one per dtype mix.
// The CUDA implementations are in ops_cuda.cpp and kernels.cu (built when setup.py finds a CUDA
// toolkit and torch is a CUDA build).
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "common.h"

namespace itm {
namespace {

constexpr int64_t kBlock = 1024;                // elements per unit of work
constexpr int64_t kGrainElements = 32768;       // less work than this stays on one thread (ATen's grain)
constexpr int64_t kGrain = kGrainElements / kBlock;

// ---- float32 views of fp32/fp16/bf16/fp64 data -----------------------------------------------

// Returns a float32 pointer to base[offset : offset + n]: the data itself for float32, else
// `scratch` filled with the converted values (float64 rounded to nearest, as Tensor.float()).
using LoadFn = const float* (*)(const void* base, int64_t offset, int64_t n, float* scratch);
template <typename T>
const float* load_block(const void* base, int64_t offset, int64_t n, float* scratch) {
  const T* src = static_cast<const T*>(base) + offset;
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) scratch[i] = static_cast<float>(src[i]);
    return scratch;
  }
}

// base[offset : offset + n] = src, rounded to nearest even as Tensor.to() does.
using StoreFn = void (*)(const float* src, void* base, int64_t offset, int64_t n);
template <typename T>
void store_block(const float* src, void* base, int64_t offset, int64_t n) {
  T* dst = static_cast<T*>(base) + offset;
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

#if defined(__x86_64__) && defined(__GNUC__)
// float16 <-> float32 with the F16C instructions (8 at a time), when the CPU has them: the portable
// conversion above is bit manipulation the compiler does not vectorise. Same IEEE results.
bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}

__attribute__((target("avx,f16c"))) const float* load_half_f16c(const void* base, int64_t offset, int64_t n,
                                                                  float* scratch) {
  const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(scratch + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) scratch[i] = _cvtsh_ss(src[i]);
  return scratch;
}

__attribute__((target("avx,f16c"))) void store_half_f16c(const float* src, void* base, int64_t offset, int64_t n) {
  uint16_t* dst = static_cast<uint16_t*>(base) + offset;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
#define ITM_F16C(fast, portable) (cpu_has_f16c() ? (fast) : (portable))
#else
#define ITM_F16C(fast, portable) (portable)
#endif

LoadFn loader(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return load_block<float>;
    case at::kHalf: return ITM_F16C(load_half_f16c, load_block<c10::Half>);
    case at::kBFloat16: return load_block<c10::BFloat16>;
    case at::kDouble: return load_block<double>;
    default: TORCH_CHECK(false, "itm_engine: unsupported dtype ", t.scalar_type());
  }
}

StoreFn storer(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return store_block<float>;
    case at::kHalf: return ITM_F16C(store_half_f16c, store_block<c10::Half>);
    case at::kBFloat16: return store_block<c10::BFloat16>;
    case at::kDouble: return store_block<double>;
    default: TORCH_CHECK(false, "itm_engine: unsupported dtype ", t.scalar_type());
  }
}

// sum_i (p[i] - t[i])^2 over one block: 16 independent float lanes (vectorised without
// -ffast-math), then added in a fixed order, so the result never depends on the thread count.
double sum_sq_diff(const float* p, const float* t, int64_t n) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float d = p[i + l] - t[i + l];
      acc[l] += d * d;
    }
  }
  for (; i < n; ++i) {
    const float d = p[i] - t[i];
    acc[0] += d * d;
  }
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  return sum;
}

// Checks 0 <= idx[b] < bound for every item (the reference would raise an IndexError).
void check_range(const at::Tensor& idx, int64_t bound, const char* op, const char* name) {
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t b = 0; b < idx.numel(); ++b) {
    TORCH_CHECK(p[b] >= 0 && p[b] < bound, "itm_engine.", op, ": ", name, "[", b, "] = ", p[b],
                " is out of range [0, ", bound, ")");
  }
}

// Checks that no item's target has a latent term (c = coef[b, 2] is 0), for item_error without
// latents (the reference would raise a ValueError).
void check_no_latent_term(const float* coef, int64_t ld, int64_t B) {
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(coef[b * ld + 2] == 0.f, "itm_engine.item_error: coefficients[", b, ", 2] = ", coef[b * ld + 2],
                " but no latents were given: a target with a latent term (v, flow) needs latents and img_idx");
  }
}

// ---- noisy_latents -------------------------------------------------------------------------

at::Tensor& noisy_latents_cpu(const at::Tensor& latents_, const at::Tensor& noise_, const at::Tensor& img_idx_,
                              const at::Tensor& sample_idx_, const at::Tensor& coefficients_, at::Tensor& out) {
  check_noisy_latents_args(latents_, noise_, img_idx_, sample_idx_, coefficients_, out);
  const at::Tensor latents = latents_.contiguous(), noise = noise_.contiguous();
  const at::Tensor img_idx = img_idx_.contiguous(), sample_idx = sample_idx_.contiguous();
  const at::Tensor coefficients = coefficients_.contiguous();
  check_range(img_idx, latents.size(0), "noisy_latents", "img_idx");
  check_range(sample_idx, noise.size(0), "noisy_latents", "sample_idx");

  // A non-contiguous `out` is filled through a contiguous buffer and copied back.
  at::Tensor dst = out.is_contiguous() ? out : at::empty(out.sizes(), out.options());
  const int64_t B = dst.size(0), row = latents[0].numel();
  const int64_t blocks_per_row = (row + kBlock - 1) / kBlock;
  const LoadFn load_z = loader(latents), load_e = loader(noise);
  const StoreFn store_x = storer(dst);
  const bool out_float = dst.scalar_type() == at::kFloat;
  const void* zp = latents.const_data_ptr();
  const void* ep = noise.const_data_ptr();
  void* xp = dst.mutable_data_ptr();
  const int64_t* zi = img_idx.data_ptr<int64_t>();
  const int64_t* ei = sample_idx.data_ptr<int64_t>();
  const float* coef = coefficients.const_data_ptr<float>();
  const int64_t ld = coefficients.size(1);

  at::parallel_for(0, B * blocks_per_row, kGrain, [&](int64_t begin, int64_t end) {
    float zbuf[kBlock], ebuf[kBlock], xbuf[kBlock];
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / blocks_per_row, j0 = (unit % blocks_per_row) * kBlock;
      const int64_t n = std::min(kBlock, row - j0);
      const float* z = load_z(zp, zi[b] * row + j0, n, zbuf);
      const float* e = load_e(ep, ei[b] * row + j0, n, ebuf);
      float* x = out_float ? static_cast<float*>(xp) + b * row + j0 : xbuf;
      const float ab = coef[b * ld], sb = coef[b * ld + 1];  // x_t = a z0 + b eps
      for (int64_t i = 0; i < n; ++i) x[i] = ab * z[i] + sb * e[i];
      if (!out_float) store_x(xbuf, xp, b * row + j0, n);
    }
  });
  if (!dst.is_same(out)) out.copy_(dst);
  return out;
}

// ---- item_error ----------------------------------------------------------------------------

at::Tensor item_error_cpu(const at::Tensor& pred_, const at::Tensor& noise_, const at::Tensor& sample_idx_,
                          const at::Tensor& coefficients_, const std::optional<at::Tensor>& latents_,
                          const std::optional<at::Tensor>& img_idx_) {
  check_item_error_args(pred_, noise_, sample_idx_, coefficients_, latents_, img_idx_);
  const at::Tensor pred = pred_.contiguous(), noise = noise_.contiguous();
  const at::Tensor sample_idx = sample_idx_.contiguous(), coefficients = coefficients_.contiguous();
  check_range(sample_idx, noise.size(0), "item_error", "sample_idx");
  const int64_t B = pred.size(0), row = pred[0].numel();
  const float* coef = coefficients.const_data_ptr<float>();
  const int64_t ld = coefficients.size(1);
  const bool with_latents = latents_.has_value();
  at::Tensor latents, img_idx;
  if (with_latents) {
    latents = latents_->contiguous();
    img_idx = img_idx_->contiguous();
    check_range(img_idx, latents.size(0), "item_error", "img_idx");
  } else {
    check_no_latent_term(coef, ld, B);
  }

  const int64_t blocks_per_row = (row + kBlock - 1) / kBlock;
  const LoadFn load_p = loader(pred), load_e = loader(noise);
  const LoadFn load_z = with_latents ? loader(latents) : nullptr;
  const void* pp = pred.const_data_ptr();
  const void* ep = noise.const_data_ptr();
  const void* zp = with_latents ? latents.const_data_ptr() : nullptr;
  const int64_t* ei = sample_idx.data_ptr<int64_t>();
  const int64_t* zi = with_latents ? img_idx.data_ptr<int64_t>() : nullptr;

  // One partial sum per (item, block), added up per item in block order: deterministic.
  std::vector<double> partial(B * blocks_per_row);
  at::parallel_for(0, B * blocks_per_row, kGrain, [&](int64_t begin, int64_t end) {
    float pbuf[kBlock], ebuf[kBlock], zbuf[kBlock], tbuf[kBlock];
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / blocks_per_row, j0 = (unit % blocks_per_row) * kBlock;
      const int64_t n = std::min(kBlock, row - j0);
      const float* p = load_p(pp, b * row + j0, n, pbuf);
      const float* e = load_e(ep, ei[b] * row + j0, n, ebuf);
      const float* target = e;
      const float cb = coef[b * ld + 2], db = coef[b * ld + 3];
      if (with_latents) {  // target = c z0 + d eps
        const float* z = load_z(zp, zi[b] * row + j0, n, zbuf);
        for (int64_t i = 0; i < n; ++i) tbuf[i] = cb * z[i] + db * e[i];
        target = tbuf;
      } else if (db != 1.f) {  // target = d eps (1 * eps is eps itself: no pass)
        for (int64_t i = 0; i < n; ++i) tbuf[i] = db * e[i];
        target = tbuf;
      }
      partial[unit] = sum_sq_diff(p, target, n);
    }
  });

  at::Tensor err = at::empty({B}, pred.options().dtype(at::kFloat));
  float* ep_out = err.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    double sum = 0.0;
    for (int64_t blk = 0; blk < blocks_per_row; ++blk) sum += partial[b * blocks_per_row + blk];
    ep_out[b] = static_cast<float>(sum / static_cast<double>(row));
  }
  return err;
}

// ---- topk_similarity -----------------------------------------------------------------------

struct Candidate {
  float value;
  int64_t index;
};

// The ranking: larger value first (NaN above everything, as torch.sort/topk rank it), then the
// lower gallery index. A strict weak order, so the result is unique and deterministic.
inline bool value_greater(float x, float y) { return (std::isnan(x) && !std::isnan(y)) || x > y; }
inline bool better(const Candidate& x, const Candidate& y) {
  if (value_greater(x.value, y.value)) return true;
  if (value_greater(y.value, x.value)) return false;
  return x.index < y.index;
}

std::tuple<at::Tensor, at::Tensor> topk_similarity_cpu(const at::Tensor& queries, const at::Tensor& gallery,
                                                       int64_t k, int64_t chunk_size) {
  const auto [Q, G, D] = check_topk_args(queries, gallery, k, chunk_size);
  const at::Tensor q = queries.contiguous().to(at::kFloat);
  // Per query a heap of its best candidates so far with the worst on top (size up to k).
  std::vector<Candidate> heaps(Q * k);
  std::vector<int64_t> sizes(Q, 0);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, chunk_size));

  for (int64_t start = 0; start < G; start += chunk_size) {
    const int64_t n = std::min(chunk_size, G - start);
    const at::Tensor sims = at::matmul(q, gallery.narrow(0, start, n).to(at::kFloat).t()).contiguous();  // [Q, n]
    const float* sp = sims.const_data_ptr<float>();
    at::parallel_for(0, Q, grain, [&](int64_t begin, int64_t end) {
      for (int64_t qi = begin; qi < end; ++qi) {
        Candidate* heap = heaps.data() + qi * k;
        int64_t& size = sizes[qi];
        const float* row = sp + qi * n;
        for (int64_t j = 0; j < n; ++j) {
          const Candidate c{row[j], start + j};
          if (size < k) {
            heap[size++] = c;
            std::push_heap(heap, heap + size, better);
          } else if (better(c, heap[0])) {
            std::pop_heap(heap, heap + k, better);
            heap[k - 1] = c;
            std::push_heap(heap, heap + k, better);
          }
        }
      }
    });
  }

  at::Tensor values = at::empty({Q, k}, queries.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({Q, k}, queries.options().dtype(at::kLong));
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  at::parallel_for(0, Q, std::max<int64_t>(1, kGrainElements / k), [&](int64_t begin, int64_t end) {
    for (int64_t qi = begin; qi < end; ++qi) {
      Candidate* heap = heaps.data() + qi * k;
      std::sort_heap(heap, heap + k, better);  // best first
      for (int64_t j = 0; j < k; ++j) {
        vp[qi * k + j] = heap[j].value;
        ip[qi * k + j] = heap[j].index;
      }
    }
  });
  return {values, indices};
}

bool has_cuda() {
#ifdef ITM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace itm

TORCH_LIBRARY(itm_engine, m) {
  m.def(
      "noisy_latents(Tensor latents, Tensor noise, Tensor img_idx, Tensor sample_idx, Tensor coefficients, "
      "Tensor(a!) out) -> Tensor(a!)");
  m.def(
      "item_error(Tensor pred, Tensor noise, Tensor sample_idx, Tensor coefficients, Tensor? latents, "
      "Tensor? img_idx) -> Tensor");
  m.def("topk_similarity(Tensor queries, Tensor gallery, int k, int chunk_size) -> (Tensor, Tensor)");
  m.def("has_cuda() -> bool", &itm::has_cuda);
}

TORCH_LIBRARY_IMPL(itm_engine, CPU, m) {
  m.impl("noisy_latents", &itm::noisy_latents_cpu);
  m.impl("item_error", &itm::item_error_cpu);
  m.impl("topk_similarity", &itm::topk_similarity_cpu);
}

// `import itm_engine._C` runs the registrations above; the module itself has no attributes.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "itm_engine's fused ops; see torch.ops.itm_engine", -1,
                               nullptr};
  return PyModule_Create(&module);
}
