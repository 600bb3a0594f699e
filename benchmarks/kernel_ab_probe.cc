// A measurement, not part of the library (issue 15): two builds of the compute core (core.cc) in one
// process, A and B, timed in turns, so a shared host's slow spells hit both alike. Each build is
// core.cc compiled with -Djax_gpt2=A or -Djax_gpt2=B (its namespace renamed) and any flags: an older
// core.cc against the current one, or -march=x86-64-v3 against -march=native. Times one decode
// step's 49 gpt2 matmuls (weights cold: each matrix in its own memory) or 12 layers of decode
// attention over 990 cached slots (the cache evicted between runs). Build and run:
//   D=/tmp/ab; mkdir -p $D; cp src/jax_gpt2/kernels/core.h $D/core_b.h   (a second copy: core.h is #pragma once)
//   F="-O3 -std=c++17 -ffp-contract=fast -pthread -march=native -Isrc/jax_gpt2/kernels"
//   g++ $F -Djax_gpt2=A -c OLD_core.cc -o $D/a.o && g++ $F -Djax_gpt2=B -c src/jax_gpt2/kernels/core.cc -o $D/b.o
//   g++ $F -I$D benchmarks/kernel_ab_probe.cc $D/a.o $D/b.o -o $D/ab
//   flock /tmp/jax-gpt2-bench.lock $D/ab f32|bf16|i8|attn_f32|attn_bf16 [rows] [repeats] [threads]
// Prints best, first quartile and median of each build.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <random>
#include <algorithm>
#include "probe_weights.h"
#define jax_gpt2 A
#include "core.h"
#undef jax_gpt2
#define jax_gpt2 B

#include "core_b.h"
#undef jax_gpt2
int main(int argc, char** argv) {
  const char* which = argc > 1 ? argv[1] : "i8";
  int M = argc > 2 ? atoi(argv[2]) : 1;
  int reps = argc > 3 ? atoi(argv[3]) : 60;
  int th = argc > 4 ? atoi(argv[4]) : 2; A::TilePool pa(th, 4); B::TilePool pb(th, 4);
  const auto& shapes = kGpt2Shapes;
  std::vector<Mat> layer; for (int l=0;l<12;++l) for (int k=0;k<4;++k) layer.push_back(Make(shapes[k][0], shapes[k][1]));
  layer.push_back(Make(768, 50257));
  std::vector<float> x(M*3072); for (auto& v: x) v = (rand()%2001-1000)*1e-3f;
  std::vector<float> y(M*50304);
  auto runA = [&](Mat& m){
    if (!strcmp(which,"i8")) A::PackedMatmul(x.data(), M, m.I, m.i8.data(), m.scale.data(), m.O, y.data(), pa);
    else if (!strcmp(which,"bf16")) A::PackedMatmul(x.data(), M, m.I, m.bf.data(), m.O, y.data(), pa);
    else A::PackedMatmul(x.data(), M, m.I, m.f32.data(), m.O, y.data(), pa); };
  auto runB = [&](Mat& m){
    if (!strcmp(which,"i8")) B::PackedMatmul(x.data(), M, m.I, m.i8.data(), m.scale.data(), m.O, y.data(), pb);
    else if (!strcmp(which,"bf16")) B::PackedMatmul(x.data(), M, m.I, m.bf.data(), m.O, y.data(), pb);
    else B::PackedMatmul(x.data(), M, m.I, m.f32.data(), m.O, y.data(), pb); };
  if (!strcmp(which, "attn_bf16") || !strcmp(which, "attn_f32")) {
    bool bf = !strcmp(which, "attn_bf16");
    int64_t L = 12, N = 12, S = 1024, H = 64;
    int64_t size = L * M * N * S * H;
    std::vector<uint16_t> kb(size, 0x3c00), vb(size, 0x3c00);
    std::vector<float> kf(size, 0.01f), vf(size, 0.5f), q(M * N * H, 0.1f), out(M * N * H);
    std::vector<int32_t> start(M, 0), end(M, 989);
    std::vector<double> ta, tb;
    auto attend = [&](bool first) {
      for (int l = 0; l < L; ++l) {
        A::CacheShape sa{L, M, N, S, H}; B::CacheShape sb{L, M, N, S, H};
        if (first) bf ? A::DecodeAttention(q.data(), kb.data(), vb.data(), start.data(), end.data(), sa, M, l, 0.125f, out.data(), pa)
                      : A::DecodeAttention(q.data(), kf.data(), vf.data(), start.data(), end.data(), sa, M, l, 0.125f, out.data(), pa);
        else bf ? B::DecodeAttention(q.data(), kb.data(), vb.data(), start.data(), end.data(), sb, M, l, 0.125f, out.data(), pb)
                : B::DecodeAttention(q.data(), kf.data(), vf.data(), start.data(), end.data(), sb, M, l, 0.125f, out.data(), pb);
      }
    };
    for (int rep = 0; rep < reps; ++rep) {
      for (auto& m : layer) runA(m);  // evict the cache, as a decode step's weights do
      double t0 = Now(); attend(true); double t1 = Now();
      for (auto& m : layer) runA(m);
      double t2 = Now(); attend(false); double t3 = Now();
      ta.push_back(t1 - t0); tb.push_back(t3 - t2);
    }
    std::sort(ta.begin(), ta.end()); std::sort(tb.begin(), tb.end());
    printf("%s B=%d  A: best %.3f median %.3f ms   B: best %.3f median %.3f ms\n", which, M, ta[0]*1e3, ta[reps/2]*1e3, tb[0]*1e3, tb[reps/2]*1e3);
    return 0;
  }
  std::vector<double> ta, tb;
  for (int rep=0; rep<reps; ++rep) {
    double a=Now(); for (auto& m: layer) runA(m); double b=Now(); for (auto& m: layer) runB(m); double c=Now();
    ta.push_back(b-a); tb.push_back(c-b);
  }
  std::sort(ta.begin(), ta.end()); std::sort(tb.begin(), tb.end());
  printf("%s M=%d  A: best %.2f q25 %.2f median %.2f ms   B: best %.2f q25 %.2f median %.2f ms\n", which, M,
    ta[0]*1e3, ta[reps/4]*1e3, ta[reps/2]*1e3, tb[0]*1e3, tb[reps/4]*1e3, tb[reps/2]*1e3);
}
