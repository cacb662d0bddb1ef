// The torch-facing functions of the compiled core: one per op, registered for CPU and
// (in CUDA builds) CUDA in bindings.cpp against the schemas declared in cgidm/ops.py.
// Each checks shapes, picks the compute dtype, makes inputs contiguous and calls the CPU
// or CUDA kernel of launch.h for the tensors' device.
// B images, K timesteps per image, N = B*K samples, latents [C, H, W].
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace cgidm {

// -> (z [B, C, H, W], x_t [2, N, C, H, W]); dtypes follow torch's promotion.
std::tuple<at::Tensor, at::Tensor> pair_noise(
    const at::Tensor& x0,                        // [B, C, H, W]
    const at::Tensor& x,                         // [B, C, H, W] x_init + delta
    const at::Tensor& mask,                      // [C, H, W] or [B, C, H, W], 1 = kept
    const at::Tensor& noise_ft,                  // [N, C, H, W]
    const std::optional<at::Tensor>& noise_pre,  // [N, C, H, W] or None (shared noise)
    const at::Tensor& sqrt_abar,                 // [N]
    const at::Tensor& sqrt_one_minus_abar);      // [N]

// -> (loss [N] fp32, seed_ft [N, C, H, W] fp32, seed_pre [N, C, H, W] fp32)
std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_contrast_loss(
    const at::Tensor& eps_ft,                    // [N, C, H, W]
    const at::Tensor& eps_pre,                   // [N, C, H, W]
    const at::Tensor& noise_ft,                  // [N, C, H, W]
    const std::optional<at::Tensor>& noise_pre); // [N, C, H, W] or None (shared noise)

// -> (delta [B, C, H, W] fp32, z [B, C, H, W] fp32)
std::tuple<at::Tensor, at::Tensor> pgd_update(
    const at::Tensor& delta,                     // [B, C, H, W]
    const at::Tensor& grad,                      // [B, C, H, W] d loss / d delta
    const at::Tensor& x0,                        // [B, C, H, W]
    const at::Tensor& x_init,                    // [B, C, H, W]
    const at::Tensor& mask,                      // [C, H, W] or [B, C, H, W], 1 = kept
    double alpha, double eps, double clamp_min, double clamp_max, bool per_sample);

// -> (t [N] int64, noise [S, N, C, H, W] fp32), S = 2 if independent else 1 (spec:
// cgidm/rng.py); sample n = b*K + k.
std::tuple<at::Tensor, at::Tensor> draw_noise(
    const at::Tensor& keys,                      // [B] int64 image keys
    const at::Tensor& step,                      // [] int64 PGD step (on keys' device for capture)
    int64_t k,                                   // K timestep slots per image
    at::IntArrayRef latent_shape,                // [C, H, W]
    int64_t t_min, int64_t t_max, bool independent);

// -> (delta [B, ...] fp32, skipped [B] bool); spec: cgidm.reference.linf_pgd_update_ref.
std::tuple<at::Tensor, at::Tensor> linf_update(
    const at::Tensor& delta,                     // [B, ...] perturbation of the image
    const at::Tensor& grad,                      // [B, ...] d objective / d image
    const at::Tensor& x,                         // [B, ...] the clean image, in [lo, hi]
    double alpha, double eps, double lo, double hi);

}  // namespace cgidm
