// A measurement, not part of the library (issue 24): the packed matmuls of a gpt2 forward over M
// rows (12 layers x qkv 768x2304, attn_out 768x768, fc 768x3072, proj 3072x768; with `logits`, the
// 768x50257 lm_head too) through the compute core, as GFLOP/s, beside this host's FMA peak measured
// by the core's own probe (MeasureFmaPeak) on the same threads. Build and run:
//   g++ -O3 -std=c++17 -ffp-contract=fast -pthread -march=native -Isrc/jax_gpt2/kernels
//       src/jax_gpt2/kernels/core.cc benchmarks/gemm_probe.cc -o /tmp/gemm_probe
//   flock /tmp/jax-gpt2-bench.lock /tmp/gemm_probe THREADS f32|bf16|bf16dot|i8|i8dot M [repeats] [1|cold]
// (1: the lm_head too; cold: then a forward with 12 layers of matrices of their own, in order, so each
// comes from DRAM as in the model, where the shapes above repeat one matrix that stays in cache)
// bf16dot is the opt-in bf16 dot path (PackedMatmulBf16Dot: x rounded to bf16, AVX512_BF16's
// vdpbf16ps; the exact bf16 path on builds without it), i8dot the opt-in int8 dot path
// (PackedMatmulInt8Dot: x quantized to int8, AVX512_VNNI's vpdpbusd). Prints each shape's best and median time,
// GFLOP/s and best as a share of the peak, the whole forward's, and the peak. With one
// thread it also prints GFLOP per second of this thread's CPU time (the time the scheduler gave it),
// which a busy host disturbs far less than the wall clock.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <ctime>

#include "core.h"
#include "probe_weights.h"
using namespace jax_gpt2;

int main(int argc, char** argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 2;
  const char* which = argc > 2 ? argv[2] : "f32";
  int64_t M = argc > 3 ? atoi(argv[3]) : 128;
  int reps = argc > 4 ? atoi(argv[4]) : 5;
  bool logits = argc > 5 && !strcmp(argv[5], "1");
  bool cold = argc > 5 && !strcmp(argv[5], "cold");
  TilePool pool(threads, getenv("CHUNKS") ? atoi(getenv("CHUNKS")) : 4);
  int shapes = logits ? 5 : 4;
  std::vector<Mat> mats;
  for (int k = 0; k < shapes; ++k) mats.push_back(Make(kGpt2Shapes[k][0], kGpt2Shapes[k][1]));
  AlignedVector<float> x(M * 3072), y(M * 50304);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7919) % 2001) * 1e-3f - 1.0f;
  auto run = [&](Mat& m) {
    if (!strcmp(which, "i8dot")) PackedMatmulInt8Dot(x.data(), M, m.I, m.i8.data(), m.scale.data(), m.O, y.data(), pool);
    else if (!strcmp(which, "i8")) PackedMatmul(x.data(), M, m.I, m.i8.data(), m.scale.data(), m.O, y.data(), pool);
    else if (!strcmp(which, "bf16dot")) PackedMatmulBf16Dot(x.data(), M, m.I, m.bf.data(), m.O, y.data(), pool);
    else if (!strcmp(which, "bf16")) PackedMatmul(x.data(), M, m.I, m.bf.data(), m.O, y.data(), pool);
    else PackedMatmul(x.data(), M, m.I, m.f32.data(), m.O, y.data(), pool);
  };
  auto cpu_now = [] {
    timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
  };
  double cpu_start = 0, cpu_total = 0;
  double peak = MeasureFmaPeak(pool, 0.2) / 1e9;
  double total_flop = 0, total_best = 0, total_median = 0;
  for (int k = 0; k < shapes; ++k) {
    Mat& m = mats[k];
    int layers = k < 4 ? 12 : 1;
    std::vector<double> t;
    run(m);
    cpu_start = cpu_now();
    for (int r = 0; r < reps; ++r) {
      double a = Now();
      run(m);
      t.push_back(Now() - a);
    }
    cpu_total += layers * (cpu_now() - cpu_start) / reps;
    std::sort(t.begin(), t.end());
    double flop = 2.0 * M * m.I * m.O;
    printf("%s M=%lld %4lldx%-5lld best %8.3f ms %6.1f GFLOP/s (%3.0f%% of peak)  median %8.3f ms %6.1f GFLOP/s\n",
           which, (long long)M, (long long)m.I, (long long)m.O, t[0] * 1e3, flop / t[0] / 1e9,
           100 * flop / t[0] / 1e9 / peak, t[reps / 2] * 1e3, flop / t[reps / 2] / 1e9);
    total_flop += layers * flop, total_best += layers * t[0], total_median += layers * t[reps / 2];
  }
  if (cold) {  // the forward as the model runs it: 12 layers of their own matrices, read from DRAM
    std::vector<Mat> layers_K;
    for (int l = 0; l < 12; ++l)
      for (int k = 0; k < 4; ++k) layers_K.push_back(Make(kGpt2Shapes[k][0], kGpt2Shapes[k][1]));
    std::vector<double> t, shape_K(4);
    for (int r = 0; r < reps + 1; ++r) {
      double a = Now();
      for (size_t k = 0; k < layers_K.size(); ++k) {
        double b = Now();
        run(layers_K[k]);
        if (r > 0) shape_K[k % 4] += Now() - b;
      }
      if (r > 0) t.push_back(Now() - a);
    }
    for (int k = 0; k < 4; ++k)
      printf("%s M=%lld %4lldx%-5lld cold: mean %.3f ms\n", which, (long long)M, (long long)kGpt2Shapes[k][0],
             (long long)kGpt2Shapes[k][1], shape_K[k] / (12 * reps) * 1e3);
    std::sort(t.begin(), t.end());
    double flop = 0;
    for (int k = 0; k < 4; ++k) flop += 12 * 2.0 * M * kGpt2Shapes[k][0] * kGpt2Shapes[k][1];
    printf("%s M=%lld forward, cold weights (12 layers of their own): best %.1f ms %.1f GFLOP/s (%.0f%% of peak), "
           "median %.1f ms\n", which, (long long)M, t[0] * 1e3, flop / t[0] / 1e9, 100 * flop / t[0] / 1e9 / peak,
           t[reps / 2] * 1e3);
  }
  double after = MeasureFmaPeak(pool, 0.2) / 1e9;
  printf("%s M=%lld forward%s: best %.1f ms %.1f GFLOP/s (%.0f%% of peak), median %.1f ms %.1f GFLOP/s; "
         "FMA peak %.1f / %.1f GFLOP/s (%d threads, before / after)\n",
         which, (long long)M, logits ? " with logits" : "", total_best * 1e3, total_flop / total_best / 1e9,
         100 * total_flop / total_best / 1e9 / std::max(peak, after), total_median * 1e3,
         total_flop / total_median / 1e9, peak, after, threads);
  if (threads == 1) printf("  per CPU second of this thread: %.1f GFLOP/s\n", total_flop / cpu_total / 1e9);
}
