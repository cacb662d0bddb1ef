// Raw-pointer entry points of the kernels, one CPU and one CUDA function per op.
//
// No torch and no CUDA types here: the .cu files include only this header and the CUDA
// runtime headers, so nvcc compiles them against any torch wheel (the CPU wheel included);
// ops.cpp turns tensors into these arguments. All pointers are contiguous; "B" images,
// "K" timesteps per image, "N = B*K" samples, "M = C*H*W" entries per latent.
#pragma once

#include <cstdint>

namespace cgidm {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// CPU: kFloat32 and kBFloat16 (the glue widens fp16 to fp32 first, see ops.cpp).
namespace cpu {

void pair_noise(
    DType dtype,                      // of every array below except the two scale vectors
    const void* x0,                   // [B, M]
    const void* x,                    // [B, M]
    const void* mask,                 // [M], or [B, M] when mask_batched
    bool mask_batched,
    const void* noise_ft,             // [N, M]
    const void* noise_pre,            // [N, M] or nullptr (shared noise)
    const float* sqrt_abar,           // [N]
    const float* sqrt_one_minus_abar, // [N]
    int64_t B, int64_t K, int64_t M,
    void* z,                          // [B, M] out
    void* x_t);                       // [2, N, M] out

void pair_contrast_loss(
    DType eps_dtype,                  // of eps_ft and eps_pre
    DType noise_dtype,                // of the noises: eps_dtype or kFloat32
    const void* eps_ft,               // [N, M]
    const void* eps_pre,              // [N, M]
    const void* noise_ft,             // [N, M]
    const void* noise_pre,            // [N, M] or nullptr (shared noise)
    int64_t N, int64_t M,
    float* loss,                      // [N] out
    float* seed_ft,                   // [N, M] out: 2(eps_ft - n)/M
    float* seed_pre);                 // [N, M] out: -2(eps_pre - n')/M

void pgd_update(
    const float* delta,               // [B, M]
    const float* grad,                // [B, M]
    const float* x0,                  // [B, M]
    const float* x_init,              // [B, M]
    const float* mask,                // [M], or [B, M] when mask_batched
    bool mask_batched,
    int64_t B, int64_t M,
    float alpha, float eps, float clamp_min, float clamp_max,
    bool per_sample,
    float* delta_out,                 // [B, M] out
    float* z);                        // [B, M] out

// Counter-based draws (spec: cgidm/rng.py); S = 2 noise streams (paper) or 1 (shared).
void draw_noise(
    const int64_t* keys,              // [B] image keys
    int64_t step,                     // PGD step (its low 32 bits count)
    int64_t B, int64_t K, int64_t M, int64_t S,
    int64_t t_min, int64_t span,      // timesteps in [t_min, t_min + span)
    int64_t* t,                       // [N] out
    float* noise);                    // [S, N, M] out

// L-inf PGD ascent step (spec: cgidm.reference.linf_pgd_update_ref); M = entries per image.
void linf_update(
    const float* delta,               // [B, M]
    const float* grad,                // [B, M]
    const float* x,                   // [B, M] the clean image
    int64_t B, int64_t M,
    float alpha, float eps, float lo, float hi,
    float* delta_out,                 // [B, M] out
    bool* skipped);                   // [B] out: the image's gradient had a non-finite entry

}  // namespace cpu

// Same arguments plus the stream (a cudaStream_t); each returns the cudaError_t of its
// launch (0 = success). They never synchronise, so they are safe inside graph capture.
namespace cuda {

int pair_noise(
    DType dtype, const void* x0, const void* x, const void* mask, bool mask_batched,
    const void* noise_ft, const void* noise_pre, const float* sqrt_abar,
    const float* sqrt_one_minus_abar, int64_t B, int64_t K, int64_t M, void* z, void* x_t,
    void* stream);

int pair_contrast_loss(
    DType eps_dtype, DType noise_dtype, const void* eps_ft, const void* eps_pre,
    const void* noise_ft, const void* noise_pre, int64_t N, int64_t M, float* loss,
    float* seed_ft, float* seed_pre, void* stream);

int pgd_update(
    const float* delta, const float* grad, const float* x0, const float* x_init,
    const float* mask, bool mask_batched, int64_t B, int64_t M, float alpha, float eps,
    float clamp_min, float clamp_max, bool per_sample, float* delta_out, float* z,
    void* stream);

// `step` is a device pointer ([] int64): read by the kernel, so graph replays see updates.
int draw_noise(
    const int64_t* keys, const int64_t* step, int64_t B, int64_t K, int64_t M, int64_t S,
    int64_t t_min, int64_t span, int64_t* t, float* noise, void* stream);

int linf_update(
    const float* delta, const float* grad, const float* x, int64_t B, int64_t M, float alpha,
    float eps, float lo, float hi, float* delta_out, bool* skipped, void* stream);

}  // namespace cuda
}  // namespace cgidm
