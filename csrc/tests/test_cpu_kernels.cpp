// C++ tests of the CPU kernels against ATen transcriptions of cgidm/reference.py (fp32).
// Exit status 0 = all passed. Built by CMakeLists.txt, run by ctest.
#include <ATen/ATen.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

#include "ops.h"

namespace {

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, double atol, double rtol,
                  const std::string& what) {
  const bool shape_ok = got.sizes() == want.sizes();
  const bool ok = shape_ok && at::allclose(got.to(at::kDouble), want.to(at::kDouble), rtol, atol,
                                           /*equal_nan=*/true);
  if (!ok) {
    ++failures;
    const double err = shape_ok ? (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>()
                                : std::numeric_limits<double>::infinity();
    std::printf("FAIL %s: max abs err %g\n", what.c_str(), err);
  } else {
    std::printf("ok   %s\n", what.c_str());
  }
}

// --- ATen transcriptions of the reference (cgidm/reference.py)

std::tuple<at::Tensor, at::Tensor> pair_noise_ref(const at::Tensor& x0, const at::Tensor& x,
                                                  const at::Tensor& mask, const at::Tensor& n_ft,
                                                  const std::optional<at::Tensor>& n_pre,
                                                  const at::Tensor& sa, const at::Tensor& sb) {
  const int64_t k = n_ft.size(0) / x0.size(0);
  const at::Tensor z = x0 * mask + x * (1 - mask);
  const at::Tensor zk = z.repeat_interleave(k, 0);
  const at::Tensor a = sa.view({-1, 1, 1, 1}), s = sb.view({-1, 1, 1, 1});
  const at::Tensor x_ft = a * zk + s * n_ft;
  const at::Tensor x_pre = n_pre ? a * zk + s * *n_pre : x_ft;
  return {z, at::stack({x_ft, x_pre})};
}

at::Tensor mse(const at::Tensor& e, const at::Tensor& n) {
  return (e.to(at::kFloat) - n.to(at::kFloat)).pow(2).flatten(1).mean(1);
}

at::Tensor norm_of(const at::Tensor& v, bool per_sample) {
  if (per_sample) return v.flatten(1).norm(2, 1).view({-1, 1, 1, 1});
  return v.norm().view({1, 1, 1, 1}).expand({v.size(0), 1, 1, 1});
}

std::tuple<at::Tensor, at::Tensor> pgd_update_ref(const at::Tensor& delta, const at::Tensor& grad,
                                                  const at::Tensor& x0, const at::Tensor& x_init,
                                                  const at::Tensor& mask, double alpha, double eps,
                                                  bool per_sample) {
  const at::Tensor free = 1 - mask;
  at::Tensor g = grad * free;
  const at::Tensor norm = norm_of(g, per_sample);
  const at::Tensor ok = at::isfinite(norm) & (norm > 0);
  g = at::where(ok, g / at::where(ok, norm, at::ones_like(norm)), at::zeros_like(g));
  at::Tensor d = delta - alpha * g;
  d = (x_init + d).clamp(-100.0, 100.0) - x_init;
  const at::Tensor dnorm = norm_of(d, per_sample);
  d = d * at::where(dnorm > eps, eps / dnorm.clamp_min(1e-12), at::ones_like(dnorm));
  return {d, x0 * mask + (x_init + d) * free};
}

// --- tests

void test_pair_noise(int64_t B, int64_t K, int64_t C, int64_t H, int64_t W, bool shared,
                     at::ScalarType dtype) {
  const auto opt = at::TensorOptions().dtype(dtype);
  const at::Tensor x0 = at::randn({B, C, H, W}, opt), x = at::randn({B, C, H, W}, opt);
  const at::Tensor mask = (at::rand({C, H, W}) > 0.5).to(dtype);
  const at::Tensor n_ft = at::randn({B * K, C, H, W}, opt);
  const std::optional<at::Tensor> n_pre =
      shared ? std::nullopt : std::optional<at::Tensor>(at::randn({B * K, C, H, W}, opt));
  const at::Tensor sa = at::rand({B * K}), sb = (1 - sa * sa).sqrt();
  auto [z, x_t] = cgidm::pair_noise(x0, x, mask, n_ft, n_pre, sa, sb);
  const auto up = [](const at::Tensor& t) { return t.to(at::kFloat); };
  std::optional<at::Tensor> n_pre32;
  if (n_pre) n_pre32 = up(*n_pre);
  auto [z_ref, x_t_ref] = pair_noise_ref(up(x0), up(x), up(mask), up(n_ft), n_pre32, sa, sb);
  // fp32: same operations in the same order; half types: one rounding of the output.
  const double tol = dtype == at::kFloat ? 1e-6 : (dtype == at::kHalf ? 2e-3 : 1.6e-2);
  const std::string tag = "pair_noise B=" + std::to_string(B) + " K=" + std::to_string(K) +
                          (shared ? " shared " : " paper ") + c10::toString(dtype);
  expect_close(z, z_ref, tol, tol, tag + " z");
  expect_close(x_t, x_t_ref, tol, tol, tag + " x_t");
}

void test_pair_contrast_loss(int64_t N, bool shared, at::ScalarType eps_dtype) {
  const at::Tensor e_ft = at::randn({N, 3, 17, 23}).to(eps_dtype);
  const at::Tensor e_pre = at::randn({N, 3, 17, 23}).to(eps_dtype);
  const at::Tensor n_ft = at::randn({N, 3, 17, 23});
  const std::optional<at::Tensor> n_pre =
      shared ? std::nullopt : std::optional<at::Tensor>(at::randn({N, 3, 17, 23}));
  auto [loss, seed_ft, seed_pre] = cgidm::pair_contrast_loss(e_ft, e_pre, n_ft, n_pre);
  const at::Tensor np = n_pre ? *n_pre : n_ft;
  const double M = 3 * 17 * 23;
  const std::string tag = "pair_contrast_loss N=" + std::to_string(N) +
                          (shared ? " shared " : " paper ") + c10::toString(eps_dtype);
  expect_close(loss, mse(e_ft, n_ft) - mse(e_pre, np), 1e-5, 1e-5, tag + " loss");
  expect_close(seed_ft, (e_ft.to(at::kFloat) - n_ft) * (2 / M), 1e-7, 1e-6, tag + " seed_ft");
  expect_close(seed_pre, (e_pre.to(at::kFloat) - np) * (-2 / M), 1e-7, 1e-6, tag + " seed_pre");
}

// bad_grad: 0 = none, else the value written into grad[0][0][0][0] (NaN or inf).
void test_pgd_update(int64_t B, int64_t C, int64_t H, int64_t W, bool per_sample,
                     bool mask_batched, float bad_grad) {
  const at::Tensor delta = at::randn({B, C, H, W}) * 40, grad = at::randn({B, C, H, W});
  const at::Tensor x0 = at::randn({B, C, H, W}), x_init = at::randn({B, C, H, W}) * 60;
  at::Tensor mask = (at::rand(mask_batched ? at::IntArrayRef{B, C, H, W}
                                                 : at::IntArrayRef{C, H, W}) > 0.5)
                              .to(at::kFloat);
  if (bad_grad != 0.0f) {
    grad[0][0][0][0] = bad_grad;
    // On a free entry: on a kept one, inf * 0 = NaN would hide an inf-specific bug.
    (mask_batched ? mask[0][0][0][0] : mask[0][0][0]).fill_(0.0f);
  }
  auto [d, z] = cgidm::pgd_update(delta, grad, x0, x_init, mask, 2.0, 70.0, -100.0, 100.0, per_sample);
  auto [d_ref, z_ref] = pgd_update_ref(delta, grad, x0, x_init, mask, 2.0, 70.0, per_sample);
  const std::string tag = "pgd_update B=" + std::to_string(B) + (per_sample ? " per-sample" : " whole") +
                          (mask_batched ? " batched-mask" : "") +
                          (bad_grad != 0.0f ? " grad=" + std::to_string(bad_grad) : "");
  expect_close(d, d_ref, 1e-5, 1e-5, tag + " delta");
  expect_close(z, z_ref, 1e-5, 1e-5, tag + " z");
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    test_pair_noise(1, 1, 4, 64, 64, true, dtype);
    test_pair_noise(2, 3, 3, 17, 23, false, dtype);
  }
  test_pair_noise(3, 2, 4, 40, 56, true, at::kFloat);
  for (auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    test_pair_contrast_loss(1, true, dtype);
    test_pair_contrast_loss(5, false, dtype);
  }
  for (bool per_sample : {true, false}) {
    test_pgd_update(1, 4, 64, 64, per_sample, false, 0.0f);
    test_pgd_update(3, 3, 17, 23, per_sample, true, 0.0f);
    test_pgd_update(2, 4, 40, 56, per_sample, false, std::numeric_limits<float>::quiet_NaN());
    test_pgd_update(2, 3, 17, 23, per_sample, true, std::numeric_limits<float>::infinity());
  }
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
