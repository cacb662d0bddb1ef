// Tensor glue of the compiled core: checks, dtype choice, layout, and the call into the
// CPU or CUDA kernel of launch.h. Built with CGIDM_WITH_CUDA only when torch has CUDA.
#include "ops.h"

// Only the headers used: ATen/ATen.h would triple this file's compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>

#include <cmath>

#include "launch.h"

#ifdef CGIDM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace cgidm {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "cgidm: unsupported dtype ", t, " (float32, float16 or bfloat16)");
  }
}

// The dtype the kernels read and write for `t` on `device`. fp16 on CPU goes through fp32:
// a generic x86-64 build converts c10::Half in software, several times slower than
// torch's own vectorised .to() on the way in and out.
at::ScalarType storage_dtype(at::ScalarType t, const at::Device& device) {
  return device.is_cpu() && t == at::kHalf ? at::kFloat : t;
}

// Inputs in the compute dtype, dense: kernels index flat arrays. Upcasts only, so exact.
at::Tensor prepare(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

void check_same_device(const at::Tensor& ref, std::initializer_list<const at::Tensor*> others) {
  for (const at::Tensor* t : others) {
    TORCH_CHECK(t->device() == ref.device(), "cgidm: all tensors must be on ", ref.device(),
                ", got one on ", t->device());
  }
}

// The mask is one image's shape, [C, H, W] or [1, C, H, W] (shared by the batch), or the
// batch's: a mask with the right element count in another shape would be read in the
// wrong order, so it is refused.
bool mask_is_batched(const at::Tensor& mask, at::IntArrayRef shape) {
  const bool shared = mask.sizes() == shape.slice(1) ||
                      (mask.dim() == static_cast<int64_t>(shape.size()) && mask.size(0) == 1 &&
                       mask.sizes().slice(1) == shape.slice(1));
  TORCH_CHECK(shared || mask.sizes() == shape,
              "cgidm: mask must be [C, H, W] or [B, C, H, W] (or [1, C, H, W]; the latent's shape ", shape,
              "), got ", mask.sizes());
  return !shared;
}

// Elements per image of a [B, ...] tensor, also when B is 0.
int64_t per_image(const at::Tensor& t) {
  int64_t m = 1;
  for (int64_t d : t.sizes().slice(1)) m *= d;
  return m;
}

#ifdef CGIDM_WITH_CUDA
void* stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "fp32";
    case DType::kFloat16: return "fp16";
    case DType::kBFloat16: return "bf16";
  }
  return "?";
}

// `err`: what a cuda:: entry point of launch.h returned. `kernel...`: the kernel's name,
// streamed into the message only on failure.
template <typename... Name>
void check_launch(int err, const Name&... kernel) {
  const auto e = static_cast<cudaError_t>(err);
  TORCH_CHECK(e == cudaSuccess, "cgidm: CUDA launch of ", kernel..., " failed: ",
              cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}

// Launches (`launch` calls a cuda:: entry point) and checks that launch alone. The runtime
// keeps the error of any earlier call on this thread (torch's, another library's, an
// earlier kernel's asynchronous fault) until someone reads it; read only after our launch,
// it would be blamed on our kernel. So it is read first and named as what it is.
template <typename Launch, typename... Name>
void launch_checked(Launch&& launch, const Name&... kernel) {
  const cudaError_t pending = cudaGetLastError();
  TORCH_CHECK(pending == cudaSuccess, "cgidm: a CUDA error from earlier work was pending before ",
              kernel..., " was launched: ", cudaGetErrorName(pending), " (",
              cudaGetErrorString(pending), "); CUDA_LAUNCH_BLOCKING=1 finds the call that raised it");
  check_launch(launch(), kernel...);
}
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor> pair_noise(
    const at::Tensor& x0, const at::Tensor& x, const at::Tensor& mask,
    const at::Tensor& noise_ft, const std::optional<at::Tensor>& noise_pre,
    const at::Tensor& sqrt_abar, const at::Tensor& sqrt_one_minus_abar) {
  TORCH_CHECK(x0.dim() == 4, "cgidm: x0 must be [B, C, H, W], got ", x0.sizes());
  TORCH_CHECK(x.sizes() == x0.sizes(), "cgidm: x must have x0's shape");
  TORCH_CHECK(noise_ft.dim() == 4 && noise_ft.sizes().slice(1) == x0.sizes().slice(1),
              "cgidm: noise_ft must be [N, C, H, W] with x0's latent shape");
  const bool shared = !noise_pre.has_value();
  TORCH_CHECK(shared || noise_pre->sizes() == noise_ft.sizes(),
              "cgidm: noise_pre must have noise_ft's shape");
  const int64_t B = x0.size(0), N = noise_ft.size(0);
  // an empty batch (B = 0, N = 0) gives empty outputs, as the other ops do
  TORCH_CHECK(B > 0 ? N % B == 0 : N == 0, "cgidm: noise batch ", N, " is not a multiple of the image batch ", B);
  const int64_t K = B > 0 ? N / B : 1, M = B > 0 ? x0.numel() / B : 0;
  const bool batched = mask_is_batched(mask, x0.sizes());
  TORCH_CHECK(sqrt_abar.numel() == N && sqrt_one_minus_abar.numel() == N,
              "cgidm: sqrt_abar and sqrt_one_minus_abar must have one entry per sample");
  check_same_device(x0, {&x, &mask, &noise_ft, &sqrt_abar, &sqrt_one_minus_abar});
  if (!shared) check_same_device(x0, {&*noise_pre});

  // The reference promotes z over (x0, mask, x) and x_t over (z, noises); the kernel
  // computes both in the wider dtype (fp32 math inside) and narrows z afterwards.
  const auto z_dtype = c10::promoteTypes(c10::promoteTypes(x0.scalar_type(), mask.scalar_type()), x.scalar_type());
  auto xt_dtype = c10::promoteTypes(z_dtype, noise_ft.scalar_type());
  if (!shared) xt_dtype = c10::promoteTypes(xt_dtype, noise_pre->scalar_type());
  const auto st = storage_dtype(xt_dtype, x0.device());
  const DType dt = to_dtype(st);

  const at::Tensor x0c = prepare(x0, st), xc = prepare(x, st), mc = prepare(mask, st),
                   nft = prepare(noise_ft, st);
  const at::Tensor npre = shared ? at::Tensor() : prepare(*noise_pre, st);
  const at::Tensor sa = prepare(sqrt_abar, at::kFloat), sb = prepare(sqrt_one_minus_abar, at::kFloat);
  at::Tensor z = at::empty(x0.sizes(), x0.options().dtype(st));
  std::vector<int64_t> xt_shape{2};
  xt_shape.insert(xt_shape.end(), noise_ft.sizes().begin(), noise_ft.sizes().end());
  at::Tensor x_t = at::empty(xt_shape, x0.options().dtype(st));
  const void* npre_ptr = shared ? nullptr : npre.data_ptr();

  if (N * M > 0) {
    if (x0.is_cuda()) {
#ifdef CGIDM_WITH_CUDA
      const c10::cuda::CUDAGuard guard(x0.device());
      launch_checked(
          [&] {
            return cuda::pair_noise(dt, x0c.data_ptr(), xc.data_ptr(), mc.data_ptr(), batched,
                                    nft.data_ptr(), npre_ptr, sa.data_ptr<float>(),
                                    sb.data_ptr<float>(), B, K, M, z.data_ptr(), x_t.data_ptr(),
                                    stream_of(x0));
          },
          "pair_noise_kernel<", dtype_name(dt), ">");
#else
      TORCH_CHECK(false, "cgidm: built without CUDA");
#endif
    } else {
      cpu::pair_noise(dt, x0c.data_ptr(), xc.data_ptr(), mc.data_ptr(), batched, nft.data_ptr(),
                      npre_ptr, sa.data_ptr<float>(), sb.data_ptr<float>(), B, K, M,
                      z.data_ptr(), x_t.data_ptr());
    }
  }
  return {z.to(z_dtype), x_t.to(xt_dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_contrast_loss(
    const at::Tensor& eps_ft, const at::Tensor& eps_pre, const at::Tensor& noise_ft,
    const std::optional<at::Tensor>& noise_pre) {
  const bool shared = !noise_pre.has_value();
  TORCH_CHECK(eps_ft.dim() >= 2, "cgidm: inputs must be [N, ...]");
  TORCH_CHECK(eps_pre.sizes() == eps_ft.sizes() && noise_ft.sizes() == eps_ft.sizes() &&
                  (shared || noise_pre->sizes() == eps_ft.sizes()),
              "cgidm: eps_ft, eps_pre and the noises must have one shape");
  check_same_device(eps_ft, {&eps_pre, &noise_ft});
  if (!shared) check_same_device(eps_ft, {&*noise_pre});
  const int64_t N = eps_ft.size(0);
  const int64_t M = N > 0 ? eps_ft.numel() / N : 0;

  // UNets hand back eps in their own dtype while the noise stays fp32: that pair has its
  // own instantiation, so neither side is copied. Any other mix is upcast first (exact).
  auto eps_dtype = c10::promoteTypes(eps_ft.scalar_type(), eps_pre.scalar_type());
  auto noise_dtype = shared ? noise_ft.scalar_type()
                            : c10::promoteTypes(noise_ft.scalar_type(), noise_pre->scalar_type());
  if (noise_dtype != eps_dtype) {
    noise_dtype = at::kFloat;
  }
  if (storage_dtype(eps_dtype, eps_ft.device()) != eps_dtype) {
    eps_dtype = noise_dtype = at::kFloat;
  }
  const at::Tensor eft = prepare(eps_ft, eps_dtype), epre = prepare(eps_pre, eps_dtype);
  const at::Tensor nft = prepare(noise_ft, noise_dtype);
  const at::Tensor npre = shared ? at::Tensor() : prepare(*noise_pre, noise_dtype);
  const DType edt = to_dtype(eps_dtype), ndt = to_dtype(noise_dtype);

  const auto f32 = eps_ft.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({N}, f32);
  at::Tensor seed_ft = at::empty(eps_ft.sizes(), f32);
  at::Tensor seed_pre = at::empty(eps_ft.sizes(), f32);
  const void* npre_ptr = shared ? nullptr : npre.data_ptr();
  if (N > 0) {
    TORCH_CHECK(M > 0, "cgidm: the loss of an empty latent is undefined");
    if (eps_ft.is_cuda()) {
#ifdef CGIDM_WITH_CUDA
      const c10::cuda::CUDAGuard guard(eps_ft.device());
      launch_checked(
          [&] {
            return cuda::pair_contrast_loss(edt, ndt, eft.data_ptr(), epre.data_ptr(),
                                            nft.data_ptr(), npre_ptr, N, M,
                                            loss.data_ptr<float>(), seed_ft.data_ptr<float>(),
                                            seed_pre.data_ptr<float>(), stream_of(eps_ft));
          },
          "pair_contrast_loss_kernel<", dtype_name(edt), ", ", dtype_name(ndt), ">");
#else
      TORCH_CHECK(false, "cgidm: built without CUDA");
#endif
    } else {
      cpu::pair_contrast_loss(edt, ndt, eft.data_ptr(), epre.data_ptr(), nft.data_ptr(),
                              npre_ptr, N, M, loss.data_ptr<float>(),
                              seed_ft.data_ptr<float>(), seed_pre.data_ptr<float>());
    }
  }
  return {loss, seed_ft, seed_pre};
}

std::tuple<at::Tensor, at::Tensor> pgd_update(
    const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& x0,
    const at::Tensor& x_init, const at::Tensor& mask, double alpha, double eps,
    double clamp_min, double clamp_max, bool per_sample) {
  TORCH_CHECK(delta.dim() >= 1, "cgidm: delta must be [B, ...]");
  TORCH_CHECK(grad.sizes() == delta.sizes() && x0.sizes() == delta.sizes() &&
                  x_init.sizes() == delta.sizes(),
              "cgidm: delta, grad, x0 and x_init must have one shape");
  check_same_device(delta, {&grad, &x0, &x_init, &mask});
  const int64_t B = delta.size(0), M = per_image(delta);
  const bool batched = mask_is_batched(mask, delta.sizes());

  // The reference upcasts every input to fp32 first; so does this.
  const at::Tensor d = prepare(delta, at::kFloat), g = prepare(grad, at::kFloat),
                   a = prepare(x0, at::kFloat), xi = prepare(x_init, at::kFloat),
                   m = prepare(mask, at::kFloat);
  const auto f32 = delta.options().dtype(at::kFloat);
  at::Tensor delta_out = at::empty(delta.sizes(), f32);
  at::Tensor z = at::empty(delta.sizes(), f32);
  if (B * M > 0) {
    if (delta.is_cuda()) {
#ifdef CGIDM_WITH_CUDA
      const c10::cuda::CUDAGuard guard(delta.device());
      launch_checked(
          [&] {
            return cuda::pgd_update(d.data_ptr<float>(), g.data_ptr<float>(), a.data_ptr<float>(),
                                    xi.data_ptr<float>(), m.data_ptr<float>(), batched, B, M,
                                    static_cast<float>(alpha), static_cast<float>(eps),
                                    static_cast<float>(clamp_min), static_cast<float>(clamp_max),
                                    per_sample, delta_out.data_ptr<float>(), z.data_ptr<float>(),
                                    stream_of(delta));
          },
          "pgd_update_kernel (", per_sample ? "a block per image" : "one block for the batch", ")");
#else
      TORCH_CHECK(false, "cgidm: built without CUDA");
#endif
    } else {
      cpu::pgd_update(d.data_ptr<float>(), g.data_ptr<float>(), a.data_ptr<float>(),
                      xi.data_ptr<float>(), m.data_ptr<float>(), batched, B, M,
                      static_cast<float>(alpha), static_cast<float>(eps),
                      static_cast<float>(clamp_min), static_cast<float>(clamp_max), per_sample,
                      delta_out.data_ptr<float>(), z.data_ptr<float>());
    }
  }
  return {delta_out, z};
}

std::tuple<at::Tensor, at::Tensor> draw_noise(
    const at::Tensor& keys, const at::Tensor& step, int64_t k, at::IntArrayRef latent_shape,
    int64_t t_min, int64_t t_max, bool independent) {
  TORCH_CHECK(keys.dim() == 1 && keys.scalar_type() == at::kLong, "cgidm: keys must be [B] int64");
  TORCH_CHECK(step.numel() == 1 && !at::isFloatingType(step.scalar_type()) &&
                  !at::isComplexType(step.scalar_type()),
              "cgidm: step must be a 0-d integer tensor");
  TORCH_CHECK(k >= 1, "cgidm: k must be >= 1");
  TORCH_CHECK(latent_shape.size() == 3, "cgidm: latent_shape must be [C, H, W]");
  TORCH_CHECK(0 <= t_min && t_min <= t_max, "cgidm: need 0 <= t_min <= t_max");
  const int64_t C = latent_shape[0], H = latent_shape[1], W = latent_shape[2];
  TORCH_CHECK(C >= 0 && H >= 0 && W >= 0, "cgidm: latent_shape must be non-negative");
  const int64_t B = keys.size(0), N = B * k, M = C * H * W, S = independent ? 2 : 1;
  const at::Tensor kc = keys.contiguous();
  at::Tensor t = at::empty({N}, keys.options().dtype(at::kLong));
  at::Tensor noise = at::empty({S, N, C, H, W}, keys.options().dtype(at::kFloat));
  if (N > 0) {
    if (keys.is_cuda()) {
#ifdef CGIDM_WITH_CUDA
      const c10::cuda::CUDAGuard guard(keys.device());
      // A host step is copied (eager only); capture needs it on the device already.
      const at::Tensor sd = step.to(keys.device(), at::kLong).contiguous();
      launch_checked(
          [&] {
            return cuda::draw_noise(kc.data_ptr<int64_t>(), sd.data_ptr<int64_t>(), B, k, M, S,
                                    t_min, t_max - t_min + 1, t.data_ptr<int64_t>(),
                                    noise.data_ptr<float>(), stream_of(keys));
          },
          "draw_noise_kernel");
#else
      TORCH_CHECK(false, "cgidm: built without CUDA");
#endif
    } else {
      TORCH_CHECK(step.device().is_cpu(), "cgidm: step must be on the CPU with CPU keys");
      cpu::draw_noise(kc.data_ptr<int64_t>(), step.to(at::kLong).item<int64_t>(), B, k, M, S,
                      t_min, t_max - t_min + 1, t.data_ptr<int64_t>(), noise.data_ptr<float>());
    }
  }
  return {t, noise};
}

std::tuple<at::Tensor, at::Tensor> linf_update(
    const at::Tensor& delta, const at::Tensor& grad, const at::Tensor& x, double alpha,
    double eps, double lo, double hi) {
  TORCH_CHECK(delta.dim() >= 1, "cgidm: delta must be [B, ...]");
  TORCH_CHECK(grad.sizes() == delta.sizes() && x.sizes() == delta.sizes(),
              "cgidm: delta, grad and x must have one shape");
  // (a NaN step would be a NaN change wherever the gradient is 0: the reference's own check)
  TORCH_CHECK(std::isfinite(alpha) && std::isfinite(eps) && std::isfinite(lo) && std::isfinite(hi),
              "cgidm: alpha, eps, lo and hi must be finite");
  check_same_device(delta, {&grad, &x});
  const int64_t B = delta.size(0);
  const int64_t M = B > 0 ? delta.numel() / B : 0;

  // The reference upcasts every input to fp32 first; so does this (exact).
  const at::Tensor d = prepare(delta, at::kFloat), g = prepare(grad, at::kFloat),
                   xc = prepare(x, at::kFloat);
  at::Tensor delta_out = at::empty(delta.sizes(), delta.options().dtype(at::kFloat));
  at::Tensor skipped = at::empty({B}, delta.options().dtype(at::kBool));
  // Scalars as the reference's fp32 tensor math rounds them.
  const float a = static_cast<float>(alpha), e = static_cast<float>(eps),
              l = static_cast<float>(lo), h = static_cast<float>(hi);
  if (B > 0) {  // M = 0 still writes skipped (false: no entry is non-finite)
    if (delta.is_cuda()) {
#ifdef CGIDM_WITH_CUDA
      const c10::cuda::CUDAGuard guard(delta.device());
      launch_checked(
          [&] {
            return cuda::linf_update(d.data_ptr<float>(), g.data_ptr<float>(), xc.data_ptr<float>(),
                                     B, M, a, e, l, h, delta_out.data_ptr<float>(),
                                     skipped.data_ptr<bool>(), stream_of(delta));
          },
          "linf_update_kernel");
#else
      TORCH_CHECK(false, "cgidm: built without CUDA");
#endif
    } else {
      cpu::linf_update(d.data_ptr<float>(), g.data_ptr<float>(), xc.data_ptr<float>(), B, M, a, e,
                       l, h, delta_out.data_ptr<float>(), skipped.data_ptr<bool>());
    }
  }
  return {delta_out, skipped};
}

}  // namespace cgidm
