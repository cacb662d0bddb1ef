// Philox4x32-10 and the draws of cgidm/rng.py (the spec), shared by the CPU kernel
// (draw_noise_cpu.cpp) and the CUDA kernel (draw_noise.cu). No torch, no CUDA types: host
// and device compile the same lines, so the integer draws agree bit for bit and the
// normals differ only by each side's logf/cosf/sinf.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define CGIDM_HD __host__ __device__ __forceinline__
#else
#define CGIDM_HD inline
#endif

namespace cgidm::philox {

constexpr uint32_t kM0 = 0xD2511F53u;  // round multipliers
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // key increments
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr uint32_t kStreamT = 2;       // counter word 3 of the timestep draw
constexpr float kTwoPi = 6.2831855f;   // fp32(2*pi)
constexpr float kTwoPowM24 = 5.9604644775390625e-08f;

struct Words {
  uint32_t x[4];
};

CGIDM_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Counter (c0, c1, c2, c3), key (k0, k1); Random123's philox4x32 with R = 10.
CGIDM_HD Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                             uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, c0, hi0, lo0);
    mulhilo(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Words{{c0, c1, c2, c3}};
}

// u = ((x >> 8) + 0.5) * 2^-24 in fp32: (0, 1], never 0 (see cgidm/rng.py).
CGIDM_HD float uniform_open(uint32_t x) {
  return (static_cast<float>(x >> 8) + 0.5f) * kTwoPowM24;
}

// Box–Muller in fp32 of two words: (r cos(2 pi u1), r sin(2 pi u1)), r = sqrt(-2 ln u0).
CGIDM_HD void normal_pair(uint32_t w0, uint32_t w1, float& n0, float& n1) {
  const float u0 = uniform_open(w0), u1 = uniform_open(w1);
  const float r = sqrtf(logf(u0) * -2.0f);
  const float theta = u1 * kTwoPi;
  n0 = r * cosf(theta);
  n1 = r * sinf(theta);
}

// Stratum k of K over [t_min, t_min + span): t_min + start + floor(u_t * width), the floor
// exact in integers ((x >> 8) < 2^24, so the product fits int64).
CGIDM_HD int64_t timestep(uint32_t x, int64_t k, int64_t K, int64_t t_min, int64_t span) {
  const int64_t start = k * span / K;
  int64_t width = (k + 1) * span / K - start;
  if (width < 1) width = 1;
  int64_t off = (static_cast<int64_t>(x >> 8) * width) >> 24;
  if (off > width - 1) off = width - 1;
  return t_min + start + off;
}

// Key halves of an image key (any int64 bit pattern).
CGIDM_HD uint32_t key_lo(int64_t key) { return static_cast<uint32_t>(static_cast<uint64_t>(key)); }
CGIDM_HD uint32_t key_hi(int64_t key) { return static_cast<uint32_t>(static_cast<uint64_t>(key) >> 32); }

// The 4 latent entries of counter group j of sample row (stream s, sample n = b*K + k):
// out[4j + r] = word r's normal, the entries past M dropped.
CGIDM_HD void noise_group(int64_t key, uint32_t step, uint32_t k, uint32_t stream, int64_t j,
                          int64_t M, float* out) {
  const Words w = philox4x32_10(static_cast<uint32_t>(j), step, k, stream, key_lo(key), key_hi(key));
  float n[4];
  normal_pair(w.x[0], w.x[1], n[0], n[1]);
  normal_pair(w.x[2], w.x[3], n[2], n[3]);
  const int64_t i = 4 * j;
  for (int r = 0; r < 4; ++r) {
    if (i + r < M) out[i + r] = n[r];
  }
}

CGIDM_HD int64_t timestep_of(int64_t key, uint32_t step, int64_t k, int64_t K, int64_t t_min,
                             int64_t span) {
  const Words w = philox4x32_10(0u, step, static_cast<uint32_t>(k), kStreamT, key_lo(key), key_hi(key));
  return timestep(w.x[0], k, K, t_min, span);
}

}  // namespace cgidm::philox
