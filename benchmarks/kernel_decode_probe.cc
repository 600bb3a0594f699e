// A measurement, not part of the library: the batch-1 packed matmuls of one gpt2 decode step (12
// layers x qkv 768x2304, attn_out 768x768, fc 768x3072, proj 3072x768, plus the 768x50257 lm_head),
// each matrix in its own memory so the step streams from DRAM, through the compute core (core.h).
// Build and run (issue 15), under the bench lock on a shared machine:
//   g++ -O3 -std=c++17 -ffp-contract=fast -pthread -march=native -Isrc/jax_gpt2/kernels \
//       src/jax_gpt2/kernels/core.cc benchmarks/kernel_decode_probe.cc -o /tmp/probe
//   flock /tmp/jax-gpt2-bench.lock /tmp/probe THREADS i8|bf16|f32 [M]
// Prints each shape's time (the small ones repeat L2-hot) and the whole step's.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <random>
#include <algorithm>
#include "probe_weights.h"
#include "core.h"
using namespace jax_gpt2;
int main(int argc, char** argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 2;
  const char* which = argc > 2 ? argv[2] : "i8";
  int M = argc > 3 ? atoi(argv[3]) : 1;
  TilePool pool(threads, 4);
  const auto& shapes = kGpt2Shapes;
  std::vector<Mat> mats; for (auto& s: shapes) mats.push_back(Make(s[0], s[1]));
  // a full token's worth: 12 copies of the 4 block matrices + lm_head, distinct memory
  std::vector<Mat> layer; for (int l=0;l<12;++l) for (int k=0;k<4;++k) layer.push_back(Make(shapes[k][0], shapes[k][1]));
  std::vector<float> x(M*3072, 0.5f), y(M*50304);
  auto run = [&](Mat& m){
    if (!strcmp(which,"i8")) PackedMatmul(x.data(), M, m.I, m.i8.data(), m.scale.data(), m.O, y.data(), pool);
    else if (!strcmp(which,"bf16")) PackedMatmul(x.data(), M, m.I, m.bf.data(), m.O, y.data(), pool);
    else PackedMatmul(x.data(), M, m.I, m.f32.data(), m.O, y.data(), pool);
  };
  double bytes_per = !strcmp(which,"i8") ? 1 : !strcmp(which,"bf16") ? 2 : 4;
  for (auto& m : mats) {
    run(m); std::vector<double> t;
    for (int rep=0; rep<200; ++rep){ double a=Now(); run(m); t.push_back(Now()-a);} std::sort(t.begin(), t.end());
    double b = m.G*64*m.I*bytes_per;
    printf("%s M=%d %5ldx%-6ld median %8.1f us  best %8.1f us  %6.1f GB/s (median, L2-hot if small)\n", which, M, m.I, m.O, t[100]*1e6, t[0]*1e6, b/t[100]/1e9);
  }
  // token: cold weights streamed from DRAM
  std::vector<double> t;
  double b=0; for (auto& m: layer) b += m.G*64*m.I*bytes_per; b += mats[4].G*64*768*bytes_per;
  for (int rep=0; rep<40; ++rep){ double a=Now(); for (auto& m: layer) run(m); run(mats[4]); t.push_back(Now()-a);} std::sort(t.begin(), t.end());
  printf("%s token (49 matmuls, %.0f MB): median %.2f ms best %.2f ms -> %.1f GB/s, %.1f tok/s\n", which, b/1e6, t[20]*1e3, t[0]*1e3, b/t[20]/1e9, 1/t[20]);
}
