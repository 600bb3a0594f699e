// A measurement and a prototype, not part of the library (issue 15): can int8 x float32 at batch 1
// get cheaper than widening each weight to float32 (vpmovsxbd + vcvtdq2ps + FMA: 3 vector uops per
// 16 weights, ~18-25 GB/s of int8 per core here, about one core's share of DRAM bandwidth)?
// Here x is quantized to 23-bit fixed point as three balanced base-256 digits and each digit is
// multiplied by the weights with AVX-512 VNNI's vpdpbusd (64 u8 x s8 products per instruction;
// the weights enter as u8 = w + 128, and 128 * sum(x_q) is subtracted once per row), four tile rows
// transposed in registers so each 32-bit lane holds four rows of one column. The integer sums are
// exact, so the only error is x's rounding to 2^-22 of max|x| (measured below against float64:
// ~4e-8 of sum|x||w|, smaller than the float32 widening path's own accumulation error).
// AVX-512 VNNI only; g++ -O3 -march=native benchmarks/int8_vnni_probe.cc -o /tmp/vnni
//
// Tried in the library itself (2026-12-01, not kept): this loop in core.cc for M <= 2, with x's
// digits made by vector code once per call, the accumulators kept in place (GCC 12 copies a
// vpdpbusd accumulator twice per instruction unless it is written as inline assembly) and the
// 4 KiB software prefetch the widening loop has. One thread, L2-hot: ~24 GB/s of int8 against
// 13-17 by widening. One decode step's 49 matmuls from DRAM on 2 cores, both builds interleaved in
// one process, best of 40: 7.5-7.9 ms either way at batch 1, and 10.3 against 8.2 ms at batch 2.
// Batch-1 int8 decode here is bound by memory once the weights are prefetched, so the digits
// bought nothing; on a host with more bandwidth per core they may.
#include <immintrin.h>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>
#include <algorithm>
double Now(){ return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

struct Quantized { std::vector<int8_t> d[3]; double step; int64_t sum; };
Quantized Quantize(const float* x, int64_t I) {
  float high = 0; for (int64_t i = 0; i < I; ++i) high = std::max(high, std::fabs(x[i]));
  Quantized q; q.step = high > 0 ? high / double(1 << 22) : 1.0; q.sum = 0;
  for (auto& d : q.d) d.assign(I, 0);
  for (int64_t i = 0; i < I; ++i) {
    int64_t v = std::llround(x[i] / q.step); q.sum += v;
    for (int k = 0; k < 3; ++k) { int64_t digit = ((v + 128) & 255) - 128; q.d[k][i] = (int8_t)digit; v = (v - digit) >> 8; }
  }
  return q;
}

// One tile (I rows x 64 columns), I % 4 == 0. y_C = x . w_IC * scale_C.
void TileVnni(const Quantized& q, int64_t I, const int8_t* tile, const float* scale, float* y) {
  __m512i acc[3][4] = {};
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  for (int64_t i = 0; i < I; i += 4) {
    const int8_t* r = tile + i * 64;
    __m512i r0 = _mm512_xor_si512(_mm512_loadu_si512(r), flip), r1 = _mm512_xor_si512(_mm512_loadu_si512(r + 64), flip);
    __m512i r2 = _mm512_xor_si512(_mm512_loadu_si512(r + 128), flip), r3 = _mm512_xor_si512(_mm512_loadu_si512(r + 192), flip);
    __m512i a = _mm512_unpacklo_epi8(r0, r1), b = _mm512_unpackhi_epi8(r0, r1);
    __m512i c = _mm512_unpacklo_epi8(r2, r3), d = _mm512_unpackhi_epi8(r2, r3);
    __m512i w[4] = {_mm512_unpacklo_epi16(a, c), _mm512_unpackhi_epi16(a, c), _mm512_unpacklo_epi16(b, d), _mm512_unpackhi_epi16(b, d)};
    for (int k = 0; k < 3; ++k) {
      int32_t word; std::memcpy(&word, q.d[k].data() + i, 4);
      __m512i xk = _mm512_set1_epi32(word);
      for (int j = 0; j < 4; ++j) acc[k][j] = _mm512_dpbusd_epi32(acc[k][j], w[j], xk);
    }
  }
  // lane 4L + m of w[j] holds column 16L + 4j + m
  int32_t s[3][4][16];
  for (int k = 0; k < 3; ++k) for (int j = 0; j < 4; ++j) _mm512_storeu_si512(s[k][j], acc[k][j]);
  for (int j = 0; j < 4; ++j) for (int lane = 0; lane < 16; ++lane) {
    int col = 16 * (lane / 4) + 4 * j + lane % 4;
    double total = s[2][j][lane] * 65536.0 + s[1][j][lane] * 256.0 + s[0][j][lane] - 128.0 * q.sum;
    y[col] = (float)(total * q.step * scale[col]);
  }
}

void TileWiden(const float* x, int64_t I, const int8_t* tile, const float* scale, float* y) {
  __m512 acc[4] = {};
  for (int64_t i = 0; i < I; ++i) {
    __m512 xi = _mm512_set1_ps(x[i]);
    for (int j = 0; j < 4; ++j) acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(tile + i * 64 + 16 * j)))), xi, acc[j]);
  }
  for (int j = 0; j < 4; ++j) _mm512_storeu_ps(y + 16 * j, _mm512_mul_ps(acc[j], _mm512_loadu_ps(scale + 16 * j)));
}

int main() {
  for (int64_t I : {768, 3072}) {
    const int64_t G = 12;  // 12 tiles: 768 columns
    std::mt19937 rng(1); std::normal_distribution<float> normal;
    std::vector<int8_t> tiles(G * I * 64); for (auto& t : tiles) t = (int8_t)(int(rng() % 255) - 127);
    std::vector<float> scale(G * 64); for (auto& s : scale) s = 0.01f * (1 + rng() % 7);
    std::vector<float> x(I); for (auto& v : x) v = normal(rng);
    std::vector<float> yv(G * 64), yw(G * 64);
    Quantized q = Quantize(x.data(), I);
    double worst_v = 0, worst_w = 0;
    for (int64_t g = 0; g < G; ++g) { TileVnni(q, I, tiles.data() + g * I * 64, scale.data() + g * 64, yv.data() + g * 64); TileWiden(x.data(), I, tiles.data() + g * I * 64, scale.data() + g * 64, yw.data() + g * 64); }
    for (int64_t o = 0; o < G * 64; ++o) {
      double exact = 0, mag = 0; int64_t g = o / 64, c = o % 64;
      for (int64_t i = 0; i < I; ++i) { double w = tiles[(g * I + i) * 64 + c] * (double)scale[o]; exact += x[i] * w; mag += std::fabs(x[i] * w); }
      worst_v = std::max(worst_v, std::fabs(yv[o] - exact) / mag); worst_w = std::max(worst_w, std::fabs(yw[o] - exact) / mag);
    }
    printf("I=%ld: worst error / sum|x||w|: vnni %.2e  widen %.2e\n", I, worst_v, worst_w);
    for (int kind = 0; kind < 2; ++kind) {
      std::vector<double> ts;
      for (int rep = 0; rep < 300; ++rep) {
        double a = Now();
        if (kind == 0) { Quantized qq = Quantize(x.data(), I); for (int64_t g = 0; g < G; ++g) TileVnni(qq, I, tiles.data() + g * I * 64, scale.data() + g * 64, yv.data() + g * 64); }
        else for (int64_t g = 0; g < G; ++g) TileWiden(x.data(), I, tiles.data() + g * I * 64, scale.data() + g * 64, yw.data() + g * 64);
        ts.push_back(Now() - a);
      }
      std::sort(ts.begin(), ts.end());
      printf("  %s: best %.1f us (%.1f GB/s) median %.1f us (%.1f GB/s)\n", kind ? "widen" : "vnni ", ts[0] * 1e6, tiles.size() / ts[0] / 1e9, ts[150] * 1e6, tiles.size() / ts[150] / 1e9);
    }
  }
}
