// Host side of the CUDA implementations of torch.ops.itm_engine.* (kernels in kernels.cu):
// argument checks, allocation, the cuBLAS product and at::topk, and the CUDA registrations.
// Compiled by the host compiler, and only into builds with CUDA (setup.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/topk.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"
#include "kernels.h"

namespace itm {
namespace {

cuda::DType dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return cuda::kF16;
    case at::kBFloat16: return cuda::kBF16;
    case at::kDouble: return cuda::kF64;
    default: return cuda::kF32;  // the checks in common.h admit only these four
  }
}

cuda::Items items(const at::Tensor& t) { return {t.const_data_ptr(), dtype_code(t), t.size(0)}; }

at::Tensor& noisy_latents_cuda(const at::Tensor& latents_, const at::Tensor& noise_, const at::Tensor& img_idx_,
                               const at::Tensor& sample_idx_, const at::Tensor& coefficients_, at::Tensor& out) {
  check_noisy_latents_args(latents_, noise_, img_idx_, sample_idx_, coefficients_, out);
  const c10::cuda::CUDAGuard guard(latents_.device());
  const at::Tensor latents = latents_.contiguous(), noise = noise_.contiguous();
  const at::Tensor img_idx = img_idx_.contiguous(), sample_idx = sample_idx_.contiguous();
  const at::Tensor coefficients = coefficients_.contiguous();
  // A non-contiguous `out` is filled through a contiguous buffer and copied back.
  at::Tensor dst = out.is_contiguous() ? out : at::empty(out.sizes(), out.options());
  C10_CUDA_CHECK(cuda::launch_noisy_latents(
      items(latents), items(noise), dst.mutable_data_ptr(), dtype_code(dst), img_idx.const_data_ptr<int64_t>(),
      sample_idx.const_data_ptr<int64_t>(), coefficients.const_data_ptr<float>(), coefficients.size(1), dst.size(0),
      latents[0].numel(), c10::cuda::getCurrentCUDAStream()));
  if (!dst.is_same(out)) out.copy_(dst);
  return out;
}

at::Tensor item_error_cuda(const at::Tensor& pred_, const at::Tensor& noise_, const at::Tensor& sample_idx_,
                           const at::Tensor& coefficients_, const std::optional<at::Tensor>& latents_,
                           const std::optional<at::Tensor>& img_idx_) {
  check_item_error_args(pred_, noise_, sample_idx_, coefficients_, latents_, img_idx_);
  const c10::cuda::CUDAGuard guard(pred_.device());
  const at::Tensor pred = pred_.contiguous(), noise = noise_.contiguous(), sample_idx = sample_idx_.contiguous();
  const at::Tensor coefficients = coefficients_.contiguous();
  // Without latents the kernel's target is d eps (latents and img_idx not read).
  const bool with_latents = latents_.has_value();
  at::Tensor latents, img_idx;
  cuda::Items latent_items{nullptr, cuda::kF32, 0};
  if (with_latents) {
    latents = latents_->contiguous();
    img_idx = img_idx_->contiguous();
    latent_items = items(latents);
  }
  const int64_t B = pred.size(0);
  at::Tensor err = at::empty({B}, pred.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::launch_item_error(
      items(pred), items(noise), sample_idx.const_data_ptr<int64_t>(), coefficients.const_data_ptr<float>(),
      coefficients.size(1), with_latents, latent_items, with_latents ? img_idx.const_data_ptr<int64_t>() : nullptr, B,
      pred[0].numel(), err.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return err;
}

// Each chunk's [Q, n] product by cuBLAS (float32), packed into int64 keys ordered by (value desc,
// index asc) beside the running best keys, and at::topk of those unique keys: deterministic, the
// lower index winning ties, and only [Q, k + chunk] held at a time.
std::tuple<at::Tensor, at::Tensor> topk_similarity_cuda(const at::Tensor& queries, const at::Tensor& gallery,
                                                        int64_t k, int64_t chunk_size) {
  const auto [Q, G, D] = check_topk_args(queries, gallery, k, chunk_size);
  const c10::cuda::CUDAGuard guard(queries.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor q = queries.contiguous().to(at::kFloat);
  at::Tensor best = at::empty({Q, 0}, queries.options().dtype(at::kLong));  // running top keys, best first
  for (int64_t start = 0; start < G; start += chunk_size) {
    const int64_t n = std::min(chunk_size, G - start), m = best.size(1);
    const at::Tensor sims = at::matmul(q, gallery.narrow(0, start, n).to(at::kFloat).t()).contiguous();  // [Q, n]
    at::Tensor keys = at::empty({Q, m + n}, best.options());
    keys.narrow(1, 0, m).copy_(best);
    C10_CUDA_CHECK(cuda::launch_pack_keys(sims.const_data_ptr<float>(), Q, n, start, keys.mutable_data_ptr<int64_t>(),
                                          m + n, m, stream));
    best = std::get<0>(at::topk(keys, std::min(k, m + n), /*dim=*/1, /*largest=*/true, /*sorted=*/true)).contiguous();
  }
  at::Tensor values = at::empty({Q, k}, queries.options().dtype(at::kFloat));
  at::Tensor indices = at::empty({Q, k}, queries.options().dtype(at::kLong));
  C10_CUDA_CHECK(cuda::launch_unpack_keys(best.const_data_ptr<int64_t>(), Q * k, values.mutable_data_ptr<float>(),
                                          indices.mutable_data_ptr<int64_t>(), stream));
  return {values, indices};
}

}  // namespace
}  // namespace itm

TORCH_LIBRARY_IMPL(itm_engine, CUDA, m) {
  m.impl("noisy_latents", &itm::noisy_latents_cuda);
  m.impl("item_error", &itm::item_error_cuda);
  m.impl("topk_similarity", &itm::topk_similarity_cuda);
}
