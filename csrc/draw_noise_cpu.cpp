// CPU kernel of cgidm::draw_noise (spec: cgidm/rng.py; reference: cgidm.rng.counter_draws).
// Each output entry is a pure function of (key, step, k, stream, j): the split into
// threads cannot change a bit.
#include <ATen/Parallel.h>

#include "launch.h"
#include "philox.h"

namespace cgidm::cpu {

void draw_noise(
    const int64_t* keys, int64_t step, int64_t B, int64_t K, int64_t M, int64_t S,
    int64_t t_min, int64_t span, int64_t* t, float* noise) {
  const int64_t N = B * K, J = (M + 3) / 4;
  const uint32_t step32 = static_cast<uint32_t>(static_cast<uint64_t>(step));
  for (int64_t n = 0; n < N; ++n) {
    t[n] = philox::timestep_of(keys[n / K], step32, n % K, K, t_min, span);
  }
  // ~100 flops per group (10 rounds, 2 logs, 4 trig calls): a few thousand per task.
  at::parallel_for(0, S * N * J, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t row = idx / J, j = idx % J;  // row = s*N + n
      const int64_t s = row / N, n = row % N;
      philox::noise_group(keys[n / K], step32, static_cast<uint32_t>(n % K),
                          static_cast<uint32_t>(s), j, M, noise + row * M);
    }
  });
}

}  // namespace cgidm::cpu
