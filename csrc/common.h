// Argument checks shared by the CPU (ops.cpp) and CUDA (ops_cuda.cpp) implementations.
// The contracts are those of itm_engine/kernels/reference.py; the Python wrappers in
// itm_engine/kernels/extension.py convert index tensors to int64.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <tuple>

namespace itm {

// Gallery indices are packed into 32 bits by the CUDA top-k; the CPU path shares the limit so
// both backends accept the same inputs.
constexpr int64_t kMaxGallery = (int64_t{1} << 32) - 1;

inline bool is_float_type(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}

inline void check_float_input(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_float_type(t), "itm_engine.", op, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "itm_engine.", op, ": ", name, " is on ", t.device(),
              " but the other inputs are on ", ref.device());
}

// latents [N, C, H, W] or noise [S, C, H, W] (or pred [B, C, H, W]) with the item shape of `ref`.
inline void check_items(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  check_float_input(t, op, name);
  check_same_device(t, ref, op, name);
  TORCH_CHECK(t.dim() == 4, "itm_engine.", op, ": ", name, " must be [n, C, H, W], got shape ", t.sizes());
  TORCH_CHECK(t.sizes().slice(1) == ref.sizes().slice(1), "itm_engine.", op, ": ", name,
              " has item shape ", t.sizes().slice(1), " but expected ", ref.sizes().slice(1));
}

// Floating inputs of any of the four dtypes are computed in float32, as the reference computes them
// (float64 included: it is rounded to float32 on load and the float32 result widened on store).

// A per-item index vector: int64 [B] on the inputs' device.
inline void check_index(const at::Tensor& t, int64_t B, const at::Tensor& ref, const char* op, const char* name) {
  check_same_device(t, ref, op, name);
  TORCH_CHECK(t.scalar_type() == at::kLong, "itm_engine.", op, ": ", name, " must be int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "itm_engine.", op, ": ", name, " must have shape [", B,
              "], got ", t.sizes());
}

// The items' forward-process coefficients (a, b, c, d): float32 [B, >= 4] on the inputs' device
// (columns past the fourth are ignored); x_t = a z0 + b eps, target = c z0 + d eps.
inline void check_coefficients(const at::Tensor& t, int64_t B, const at::Tensor& ref, const char* op) {
  check_same_device(t, ref, op, "coefficients");
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == B && t.size(1) >= 4, "itm_engine.", op,
              ": coefficients must be float32 [B, 4] with B = ", B, " items, got ", t.scalar_type(), " ", t.sizes());
}

inline void check_noisy_latents_args(const at::Tensor& latents, const at::Tensor& noise, const at::Tensor& img_idx,
                                     const at::Tensor& sample_idx, const at::Tensor& coefficients,
                                     const at::Tensor& out) {
  const char* op = "noisy_latents";
  check_float_input(latents, op, "latents");
  TORCH_CHECK(latents.dim() == 4, "itm_engine.noisy_latents: latents must be [N, C, H, W], got shape ",
              latents.sizes());
  check_items(noise, latents, op, "noise");
  check_items(out, latents, op, "out");
  const int64_t B = out.size(0);
  check_index(img_idx, B, latents, op, "img_idx");
  check_index(sample_idx, B, latents, op, "sample_idx");
  check_coefficients(coefficients, B, latents, op);
}

// Without latents the target is d eps (img_idx, if any, is ignored); with them, img_idx is needed.
inline void check_item_error_args(const at::Tensor& pred, const at::Tensor& noise, const at::Tensor& sample_idx,
                                  const at::Tensor& coefficients, const std::optional<at::Tensor>& latents,
                                  const std::optional<at::Tensor>& img_idx) {
  const char* op = "item_error";
  check_float_input(pred, op, "pred");
  TORCH_CHECK(pred.dim() == 4, "itm_engine.item_error: pred must be [B, C, H, W], got shape ", pred.sizes());
  check_items(noise, pred, op, "noise");
  const int64_t B = pred.size(0);
  check_index(sample_idx, B, pred, op, "sample_idx");
  check_coefficients(coefficients, B, pred, op);
  if (!latents.has_value()) return;
  TORCH_CHECK(img_idx.has_value(), "itm_engine.item_error: latents need img_idx, the latent row of each item");
  check_items(*latents, pred, op, "latents");
  check_index(*img_idx, B, pred, op, "img_idx");
}

// Returns (Q, G, D).
inline std::tuple<int64_t, int64_t, int64_t> check_topk_args(const at::Tensor& queries, const at::Tensor& gallery,
                                                             int64_t k, int64_t chunk_size) {
  const char* op = "topk_similarity";
  check_float_input(queries, op, "queries");
  check_float_input(gallery, op, "gallery");
  check_same_device(gallery, queries, op, "gallery");
  TORCH_CHECK(queries.dim() == 2 && gallery.dim() == 2 && queries.size(1) == gallery.size(1),
              "itm_engine.topk_similarity: needs queries [Q, D] and gallery [G, D], got ", queries.sizes(), " and ",
              gallery.sizes());
  const int64_t G = gallery.size(0);
  TORCH_CHECK(k >= 1 && k <= G, "itm_engine.topk_similarity: k must be between 1 and the gallery size ", G,
              ", got k=", k);
  TORCH_CHECK(G <= kMaxGallery, "itm_engine.topk_similarity: at most ", kMaxGallery, " gallery rows, got ", G);
  TORCH_CHECK(chunk_size >= 1, "itm_engine.topk_similarity: chunk_size must be >= 1, got ", chunk_size);
  return {queries.size(0), G, queries.size(1)};
}

}  // namespace itm
