// A measurement, not part of the library (issue 24): the many-query attention of the compute core
// (PrefillAttention: a prompt that fills the cache, B rows x T queries, gpt2's 12 heads of 64) as
// GFLOP/s of the causal arithmetic (2 x 2 x H flops per visible query-key pair), beside the FMA peak
// measured by the core's own probe on the same threads. Build and run:
//   g++ -O3 -std=c++17 -ffp-contract=fast -pthread -march=native -Isrc/jax_gpt2/kernels -Ibenchmarks
//       src/jax_gpt2/kernels/core.cc benchmarks/attention_probe.cc -o /tmp/attention_probe
//   /tmp/attention_probe THREADS B T
// Prints the best and median of 7 calls.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "core.h"
#include "probe_weights.h"
using namespace jax_gpt2;

int main(int argc, char** argv) {
  const int threads = argc > 1 ? atoi(argv[1]) : 2;
  const int64_t B = argc > 2 ? atoi(argv[2]) : 4, T = argc > 3 ? atoi(argv[3]) : 1024;
  const int64_t N = 12, H = 64, S = T, L = 1;
  TilePool pool(threads, 4);
  std::vector<float> q(B * T * N * H), k(L * B * N * S * H), v(k.size()), out(q.size());
  for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>((i * 7919) % 2001) * 1e-3f - 1.0f;
  for (size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<float>((i * 104729) % 2003) * 1e-3f - 1.0f;
    v[i] = static_cast<float>((i * 31) % 1999) * 1e-3f - 1.0f;
  }
  std::vector<int32_t> start(B, 0), end(B, 0);
  const CacheShape shape{L, B, N, S, H};
  std::vector<double> t;
  for (int r = 0; r < 7; ++r) {
    double a = Now();
    PrefillAttention(q.data(), N * H, k.data(), v.data(), start.data(), end.data(), shape, B, T, 0, 0.125f, out.data(), pool);
    t.push_back(Now() - a);
  }
  std::sort(t.begin(), t.end());
  const double flop = 4.0 * B * N * H * T * (T + 1) / 2;
  const double peak = MeasureFmaPeak(pool, 0.2);
  printf("B=%lld T=%lld threads=%d: best %.2f ms, median %.2f ms; %.1f GFLOP/s causal, %.0f%% of the FMA peak %.0f\n",
         static_cast<long long>(B), static_cast<long long>(T), threads, t[0] * 1e3, t[3] * 1e3, flop / t[0] / 1e9,
         100 * flop / t[0] / peak, peak / 1e9);
}
