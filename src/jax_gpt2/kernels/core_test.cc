// Standalone test of the compute core (core.h) against float64 math, with no XLA and no Python, so
// every build of the core can be checked where it runs: the host's (-march=native), an AVX2 build on
// an AVX-512 host, and an aarch64 (NEON) cross build under qemu. tests/test_kernel_core.py compiles
// and runs it: `c++ -O3 -std=c++17 -ffp-contract=fast -march=... core.cc core_test.cc -pthread`.
// Prints one line per failure and a summary naming the ISA; exits 1 on any failure.
//
// Tolerances (as tests/test_native.py argues them):
// - matmul: |y - exact| <= 1e-5 * sum_i |x_i w_io|, exact in float64 over the rounded weights, so only
//   float32 accumulation is measured (sequential sums of I products err by ~sqrt(I) 2^-24 typically);
//   one dropped input row moves a result by ~1/I of that sum, far more.
// - attention: |out - exact| <= 1e-5 * max |v|; both are convex mixtures of the visible v rows.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core.h"

namespace {

using jax_gpt2::CacheShape;
using jax_gpt2::kTileColumns;
using jax_gpt2::TilePool;

int failures = 0;
int checks = 0;

void Expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    if (failures <= 30) std::printf("FAIL %s\n", what.c_str());
  }
}

uint16_t ToBfloat16(float x) {  // round to nearest, ties to even (finite inputs)
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

float FromBfloat16(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

std::vector<float> Normal(size_t count, uint32_t seed, float spread = 0.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> values(count);
  for (auto& value : values) value = normal(rng) * std::exp(spread * normal(rng));
  return values;
}

// A weight in the three packed forms, and the float32 values each stands for, w_IO row-major.
struct Packed {
  int64_t I, O, G;
  std::vector<float> f32_GIC, scale_Q;
  std::vector<uint16_t> bf16_GIC;
  std::vector<int8_t> i8_GIC;
  std::vector<float> rounded_f32, rounded_bf16, rounded_i8;  // (I, O) each
};

Packed Pack(int64_t I, int64_t O, uint32_t seed) {
  Packed p;
  p.I = I, p.O = O, p.G = (O + kTileColumns - 1) / kTileColumns;
  std::vector<float> w_IO = Normal(I * O, seed, 1.0f);  // columns of very different sizes
  if (O > 1)
    for (int64_t i = 0; i < I; ++i) w_IO[i * O] = 0.0f;  // an all-zero column stays exactly zero
  int64_t Q = p.G * kTileColumns;
  p.f32_GIC.assign(p.G * I * kTileColumns, 0.0f);
  p.bf16_GIC.assign(p.G * I * kTileColumns, 0);
  p.i8_GIC.assign(p.G * I * kTileColumns, 0);
  p.scale_Q.assign(Q, 1.0f);
  for (int64_t o = 0; o < O; ++o) {
    float high = 0.0f;
    for (int64_t i = 0; i < I; ++i) high = std::max(high, std::fabs(w_IO[i * O + o]));
    if (high > 0.0f) p.scale_Q[o] = high / 127.0f;
  }
  p.rounded_f32 = w_IO;
  p.rounded_bf16.resize(I * O);
  p.rounded_i8.resize(I * O);
  for (int64_t i = 0; i < I; ++i)
    for (int64_t o = 0; o < O; ++o) {
      float w = w_IO[i * O + o];
      int64_t at = (o / kTileColumns * I + i) * kTileColumns + o % kTileColumns;
      p.f32_GIC[at] = w;
      p.bf16_GIC[at] = ToBfloat16(w);
      p.rounded_bf16[i * O + o] = FromBfloat16(p.bf16_GIC[at]);
      float q = std::nearbyint(w / p.scale_Q[o]);
      p.i8_GIC[at] = static_cast<int8_t>(std::max(-127.0f, std::min(127.0f, q)));
      p.rounded_i8[i * O + o] = p.i8_GIC[at] * p.scale_Q[o];
    }
  return p;
}

void CheckProduct(const std::vector<float>& x_MI, const std::vector<float>& w_IO, const std::vector<float>& y_MO,
                  int64_t M, int64_t I, int64_t O, const std::string& what) {
  double worst = 0.0;
  bool finite = true, zero_column = true;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < O; ++o) {
      double exact = 0.0, magnitude = 0.0;
      for (int64_t i = 0; i < I; ++i) {
        exact += static_cast<double>(x_MI[m * I + i]) * w_IO[i * O + o];
        magnitude += std::fabs(static_cast<double>(x_MI[m * I + i]) * w_IO[i * O + o]);
      }
      float y = y_MO[m * O + o];
      finite = finite && std::isfinite(y);
      if (O > 1 && o == 0) zero_column = zero_column && y == 0.0f;
      double error = std::fabs(y - exact);
      if (error > 1e-5 * magnitude) worst = std::max(worst, error / std::max(magnitude, 1e-300));
    }
  Expect(finite, what + ": not finite");
  Expect(zero_column, what + ": the all-zero column is not exactly zero");
  Expect(worst == 0.0, what + ": error " + std::to_string(worst) + " x sum|x w| > 1e-5");
}

// Runs the kernel for one dtype ("f32", "bf16", "i8", or the dot options "bf16dot" and "i8dot") on packed p.
std::vector<float> RunMatmul(const Packed& p, const std::string& dtype, const std::vector<float>& x_MI, int64_t M,
                             TilePool& pool, jax_gpt2::Epilogue e = {}) {
  int64_t I = p.I, O = p.O;
  std::vector<float> y_MO(M * O, -1.0f);
  if (dtype == "f32") jax_gpt2::PackedMatmul(x_MI.data(), M, I, p.f32_GIC.data(), O, y_MO.data(), pool, e);
  if (dtype == "bf16") jax_gpt2::PackedMatmul(x_MI.data(), M, I, p.bf16_GIC.data(), O, y_MO.data(), pool, e);
  if (dtype == "bf16dot") jax_gpt2::PackedMatmulBf16Dot(x_MI.data(), M, I, p.bf16_GIC.data(), O, y_MO.data(), pool, e);
  if (dtype == "i8")
    jax_gpt2::PackedMatmul(x_MI.data(), M, I, p.i8_GIC.data(), p.scale_Q.data(), O, y_MO.data(), pool, e);
  if (dtype == "i8dot")
    jax_gpt2::PackedMatmulInt8Dot(x_MI.data(), M, I, p.i8_GIC.data(), p.scale_Q.data(), O, y_MO.data(), pool, e);
  return y_MO;
}

// The same on a copy of p whose padding columns of the last tile (and their int8 scales) hold large
// values: none may reach the output.
std::vector<float> RunMatmulOverGarbage(Packed p, const std::string& dtype, const std::vector<float>& x_MI,
                                        int64_t M, TilePool& pool) {
  int64_t I = p.I, O = p.O;
  for (int64_t i = 0; i < I; ++i)
    for (int64_t c = O % kTileColumns ? O % kTileColumns : kTileColumns; c < kTileColumns; ++c) {
      int64_t at = ((p.G - 1) * I + i) * kTileColumns + c;
      p.f32_GIC[at] = 99.0f, p.bf16_GIC[at] = ToBfloat16(99.0f), p.i8_GIC[at] = 99;
      p.scale_Q[(p.G - 1) * kTileColumns + c] = 1e6f;
    }
  return RunMatmul(p, dtype, x_MI, M, pool);
}

// Each row of a batch's product equals that row's product alone, bit for bit: however the rows are
// blocked (register blocks, tiles in pieces), every column sums over i in the same order.
void ExpectRowsAlone(const Packed& p, const std::string& dtype, const std::vector<float>& x_MI, int64_t M,
                     int64_t I, int64_t O, const std::vector<float>& y_MO, TilePool& pool, const std::string& what) {
  for (int64_t m = 0; m < M; ++m) {
    std::vector<float> x_1I(x_MI.begin() + m * I, x_MI.begin() + (m + 1) * I);
    std::vector<float> y_1O = RunMatmul(p, dtype, x_1I, 1, pool);
    Expect(std::equal(y_1O.begin(), y_1O.end(), y_MO.begin() + m * O),
           what + ": row " + std::to_string(m) + " differs from the same row alone");
  }
}

// One matmul case, every check: against float64 math on the rounded weights, garbage in the
// padding columns kept out, the same result from every pool, and each row equal to itself alone.
void CheckMatmulCase(const Packed& p, const char* dtype, const std::vector<float>& x_MI, int64_t M, int64_t I,
                     int64_t O, TilePool& pool, const std::vector<TilePool*>& other_pools, const std::string& what) {
  const auto& rounded = dtype[0] == 'f' ? p.rounded_f32 : dtype[0] == 'b' ? p.rounded_bf16 : p.rounded_i8;
  std::vector<float> y_MO = RunMatmul(p, dtype, x_MI, M, pool);
  CheckProduct(x_MI, rounded, y_MO, M, I, O, what);
  Expect(RunMatmulOverGarbage(p, dtype, x_MI, M, pool) == y_MO, what + ": padding columns reached the output");
  for (TilePool* other : other_pools)
    Expect(RunMatmul(p, dtype, x_MI, M, *other) == y_MO, what + ": result depends on the pool");
  if (M > 1) ExpectRowsAlone(p, dtype, x_MI, M, I, O, y_MO, pool, what);
}

void TestMatmul(TilePool& pool, std::vector<TilePool*> other_pools) {
  const char* dtypes[] = {"f32", "bf16", "i8"};
  for (int64_t I : {1, 37, 768})
    for (int64_t O : {1, 63, 64, 65, 200}) {
      Packed p = Pack(I, O, static_cast<uint32_t>(I * 1000 + O));
      for (int64_t M : {1, 2, 3, 5, 6, 7, 13, 32, 33}) {  // 32: the most rows taken in pieces; 33: whole tiles
        std::vector<float> x_MI = Normal(M * I, static_cast<uint32_t>(M));
        for (const char* dtype : dtypes) {
          std::string what = std::string(dtype) + " I=" + std::to_string(I) + " O=" + std::to_string(O) +
                             " M=" + std::to_string(M);
          CheckMatmulCase(p, dtype, x_MI, M, I, O, pool, other_pools, what);
        }
      }
    }
}

// The GEMM path (many rows): shapes that end a panel (64 or 256 input rows) or a block of rows
// (48 on the 6-row builds, 32 on the 4-row one) part-way, with the checks TestMatmul makes.
void TestGemm(TilePool& pool, std::vector<TilePool*> other_pools) {
  const char* dtypes[] = {"f32", "bf16", "i8"};
  const int64_t cases[][3] = {{300, 130, 16}, {300, 200, 49}, {769, 65, 100}, {37, 64, 17}, {64, 257, 40}};
  for (const auto& c : cases) {
    const int64_t I = c[0], O = c[1], M = c[2];
    Packed p = Pack(I, O, static_cast<uint32_t>(I * 7 + O));
    std::vector<float> x_MI = Normal(M * I, static_cast<uint32_t>(M + 100));
    for (const char* dtype : dtypes) {
      std::string what = std::string("gemm ") + dtype + " I=" + std::to_string(I) + " O=" + std::to_string(O) +
                         " M=" + std::to_string(M);
      CheckMatmulCase(p, dtype, x_MI, M, I, O, pool, other_pools, what);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The epilogue: + bias, then GELU (tanh form), inside the matmul.

// GELU's tanh form in float64, as x / (1 + e^(-2u)): the textbook 0.5 x (1 + tanh u) cancels for
// negative x even in float64 (at x = -8 it gives 0 for -3.1e-21), so it cannot judge the kernel's.
double GeluTanh64(double x) {
  const double u = std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x);
  return x / (1.0 + std::exp(-2.0 * u));
}

// With a bias and GELU, on both paths (1 to 50 rows) and every dtype: each result is the float64
// gelu(x . w + b) within the matmul's bound (GELU's slope is at most 1.13) plus GELU's own few ulps;
// a bias alone gives exactly the plain product plus the bias in float32, a residual exactly the
// residual plus the finished value; every pool agrees.
void TestEpilogue(TilePool& pool, const std::vector<TilePool*>& other_pools) {
  const char* dtypes[] = {"f32", "bf16", "i8", "bf16dot", "i8dot"};
  for (int64_t O : {1, 70, 200}) {
    const int64_t I = 96;
    Packed p = Pack(I, O, static_cast<uint32_t>(O + 5));
    std::vector<float> bias_O = Normal(O, static_cast<uint32_t>(O + 6));
    for (int64_t M : {1, 7, 50}) {
      std::vector<float> x_MI = Normal(M * I, static_cast<uint32_t>(M + 7), 0.5f);
      for (const char* dtype : dtypes) {
        const std::string what = std::string("epilogue ") + dtype + " O=" + std::to_string(O) + " M=" + std::to_string(M);
        const bool dot = std::string(dtype).find("dot") != std::string::npos;
        const auto& rounded = dtype[0] == 'f' ? p.rounded_f32 : dtype[0] == 'b' ? p.rounded_bf16 : p.rounded_i8;
        std::vector<float> plain = RunMatmul(p, dtype, x_MI, M, pool);
        std::vector<float> biased = RunMatmul(p, dtype, x_MI, M, pool, {bias_O.data(), false});
        std::vector<float> gelu = RunMatmul(p, dtype, x_MI, M, pool, {bias_O.data(), true});
        bool exact_bias = true;
        double worst = 0.0;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t o = 0; o < O; ++o) {
            exact_bias = exact_bias && biased[m * O + o] == plain[m * O + o] + bias_O[o];
            if (dot) continue;  // its products are of rounded activations: the bias check covers it
            double sum = bias_O[o], magnitude = std::fabs(bias_O[o]);
            for (int64_t i = 0; i < I; ++i) {
              sum += static_cast<double>(x_MI[m * I + i]) * rounded[i * O + o];
              magnitude += std::fabs(static_cast<double>(x_MI[m * I + i]) * rounded[i * O + o]);
            }
            const double exact = GeluTanh64(sum);
            const double error = std::fabs(gelu[m * O + o] - exact);
            worst = std::max(worst, error / (1.2e-5 * magnitude + 5e-7 * std::fabs(exact) + 1e-30));
          }
        // The residual add last, one float32 add of the finished value (as the model's x + linear(...)).
        std::vector<float> residual_MO = Normal(M * O, static_cast<uint32_t>(M * O + 8));
        std::vector<float> added = RunMatmul(p, dtype, x_MI, M, pool, {bias_O.data(), true, residual_MO.data()});
        std::vector<float> residual_only = RunMatmul(p, dtype, x_MI, M, pool, {nullptr, false, residual_MO.data()});
        bool exact_residual = true;
        for (int64_t k = 0; k < M * O; ++k) {
          exact_residual = exact_residual && added[k] == residual_MO[k] + gelu[k];
          exact_residual = exact_residual && residual_only[k] == residual_MO[k] + plain[k];
        }
        Expect(exact_residual, what + ": the residual is not exactly residual + the finished value");
        Expect(exact_bias, what + ": bias is not exactly the plain product + bias");
        Expect(worst <= 1.0, what + ": GELU result off by " + std::to_string(worst) + " of its bound");
        for (TilePool* other : other_pools)
          Expect(RunMatmul(p, dtype, x_MI, M, *other, {bias_O.data(), true}) == gelu, what + ": depends on the pool");
      }
    }
  }
}

// GELU alone, through an identity weight (exact in float32), at inputs from -30 to 30: within 4 float32
// ulps (relative 5e-7) of the float64 formula, times max(1, |2u|) where the float32 rounding of the
// exponent 2u dominates (1e-30 absolute counts as 0); exactly x far above zero.
void TestGeluPrecision(TilePool& pool) {
  const int64_t I = 64, O = 64, M = 64;
  Packed p = Pack(I, O, 1);
  for (int64_t i = 0; i < I; ++i)
    for (int64_t o = 0; o < O; ++o) p.f32_GIC[i * kTileColumns + o] = i == o ? 1.0f : 0.0f;
  std::vector<float> x_MI(M * I);
  for (int64_t k = 0; k < M * I; ++k) x_MI[k] = -30.0f + 60.0f * static_cast<float>(k) / (M * I - 1);
  std::vector<float> y_MO = RunMatmul(p, "f32", x_MI, M, pool, {nullptr, true});
  double worst = 0.0;
  bool identity_far_out = true;
  for (int64_t k = 0; k < M * I; ++k) {
    const double exact = GeluTanh64(x_MI[k]);
    // e^(2u) with 2u rounded to float32 is off by |2u| of its ulps: the condition number, not the kernel
    const double two_u = std::fabs(std::sqrt(8.0 / M_PI) * (x_MI[k] + 0.044715 * std::pow(x_MI[k], 3)));
    const double scaled = std::fabs(y_MO[k] - exact) / (std::fabs(exact) + 2e-24) / std::max(1.0, two_u);
    worst = std::max(worst, scaled);
    if (x_MI[k] > 10.0f) identity_far_out = identity_far_out && y_MO[k] == x_MI[k];
  }
  Expect(worst <= 5e-7, "GELU relative error " + std::to_string(worst) + " > 5e-7");
  Expect(identity_far_out, "GELU is not exactly x above 10");
}

// Batch invariance: one row's product alone, and the same row at a random place among random
// neighbours in batches of 2 to 33 rows and a few larger ones (crossing from the matvec path to the
// GEMM and the GEMM's blocks of rows), must agree bit for bit, for every weight dtype.
void TestBatchInvariance(TilePool& pool) {
  const char* dtypes[] = {"f32", "bf16", "i8"};
  const int64_t I = 300, O = 130;
  Packed p = Pack(I, O, 11);
  std::vector<float> row_I = Normal(I, 12);
  std::mt19937 rng(13);
  std::vector<int64_t> batches;
  for (int64_t M = 2; M <= 33; ++M) batches.push_back(M);
  for (int64_t M : {47, 48, 49, 64, 97}) batches.push_back(M);
  for (const char* dtype : dtypes) {
    std::vector<float> alone_O = RunMatmul(p, dtype, row_I, 1, pool);
    for (int64_t M : batches) {
      std::vector<float> x_MI = Normal(M * I, static_cast<uint32_t>(rng()), 1.0f);
      int64_t at = static_cast<int64_t>(rng() % M);
      std::copy(row_I.begin(), row_I.end(), x_MI.begin() + at * I);
      std::vector<float> y_MO = RunMatmul(p, dtype, x_MI, M, pool);
      Expect(std::equal(alone_O.begin(), alone_O.end(), y_MO.begin() + at * O),
             std::string("batch invariance ") + dtype + ": the row at " + std::to_string(at) + " of " +
                 std::to_string(M) + " differs from the row alone");
    }
  }
}

// The bf16 dot option: where the build has AVX512_BF16 and M >= DotMinRows(), float64 math on x
// rounded to bfloat16 (nearest, ties to even: the first two values of every row are ties, 1 + 2^-8
// rounds down to 1, -(1 + 3 2^-8) up to -(1 + 2^-6)) times the rounded weights, within the same 1e-5
// (the sum of two exact bf16 products per step adds no error of its own); below that M, or without the
// instructions, the exact bf16 path bit for bit. The vector path, or AMX's tiles where the build and
// the host have them. Odd I (a last pair padded with zero), M past the 6-row register block, the
// 48-row unit and AMX's 256-row unit, O short of whole tiles; padding columns kept out; the same
// result from every pool.
void TestBf16Dot(TilePool& pool, const std::vector<TilePool*>& other_pools) {
  const int64_t cases[][3] = {{1, 1, 16},  {37, 65, 17},  {300, 130, 16}, {769, 200, 49}, {768, 64, 100},
                              {65, 70, 300}, {257, 63, 23}, {300, 130, 15}, {37, 65, 1}};
  for (const auto& c : cases) {
    const int64_t I = c[0], O = c[1], M = c[2];
    Packed p = Pack(I, O, static_cast<uint32_t>(I * 3 + O));
    std::vector<float> x_MI = Normal(M * I, static_cast<uint32_t>(M + 200));
    for (int64_t m = 0; m < M; ++m) {
      x_MI[m * I] = 1.0f + 0x1p-8f;
      if (I > 1) x_MI[m * I + 1] = -(1.0f + 3 * 0x1p-8f);
    }
    std::string what = "bf16dot I=" + std::to_string(I) + " O=" + std::to_string(O) + " M=" + std::to_string(M);
    std::vector<float> y_MO = RunMatmul(p, "bf16dot", x_MI, M, pool);
    if (jax_gpt2::HasBf16Dot() && M >= jax_gpt2::DotMinRows()) {
      std::vector<float> rounded_MI(x_MI.size());
      for (size_t k = 0; k < x_MI.size(); ++k) rounded_MI[k] = FromBfloat16(ToBfloat16(x_MI[k]));
      CheckProduct(rounded_MI, p.rounded_bf16, y_MO, M, I, O, what);
    } else {
      Expect(RunMatmul(p, "bf16", x_MI, M, pool) == y_MO, what + ": not the exact bf16 path");
    }
    Expect(RunMatmulOverGarbage(p, "bf16dot", x_MI, M, pool) == y_MO, what + ": padding columns reached the output");
    for (TilePool* other : other_pools)
      Expect(RunMatmul(p, "bf16dot", x_MI, M, *other) == y_MO, what + ": result depends on the pool");
  }
}

// The int8 dot option's product as core.h defines it, in float64 from the same quantized x: per row
// and block of 256 inputs, scale = max|x| / 127 and q = nearest-even(x * (127 / max|x|)) in float32,
// then sum over blocks of scale * sum(q * w_int8), times the column scale. Also the bound the
// quantization itself keeps to against the float32 x: half a step of each block times sum |w|.
struct QuantizedProduct {
  std::vector<double> y_MO, magnitude_MO, bound_MO;
};

QuantizedProduct Int8DotReference(const Packed& p, const std::vector<float>& x_MI, int64_t M) {
  const int64_t I = p.I, O = p.O, kBlock = 256;
  QuantizedProduct r{std::vector<double>(M * O), std::vector<double>(M * O), std::vector<double>(M * O)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b * kBlock < I; ++b) {
      const int64_t first = b * kBlock, end = std::min(I, first + kBlock);
      float max = 0.0f;
      for (int64_t i = first; i < end; ++i) max = std::max(max, std::fabs(x_MI[m * I + i]));
      const float inverse = max > 0.0f ? 127.0f / max : 0.0f, scale = max / 127.0f;
      for (int64_t o = 0; o < O; ++o) {
        int64_t sum = 0, magnitude = 0;
        double weights = 0.0;
        for (int64_t i = first; i < end; ++i) {
          const int64_t q = static_cast<int64_t>(std::nearbyint(x_MI[m * I + i] * inverse));
          const int64_t w = p.i8_GIC[((o / kTileColumns) * I + i) * kTileColumns + o % kTileColumns];
          sum += q * w, magnitude += std::abs(q * w);
          weights += std::fabs(p.rounded_i8[i * O + o]);
        }
        r.y_MO[m * O + o] += static_cast<double>(scale) * sum * p.scale_Q[o];
        r.magnitude_MO[m * O + o] += static_cast<double>(scale) * magnitude * p.scale_Q[o];
        r.bound_MO[m * O + o] += 0.5 * scale * weights;
      }
    }
  return r;
}

// The int8 dot option: where the build has AVX512_VNNI and M >= DotMinRows(), the reference above
// within 1e-5 of its magnitude, and the float32 product of the rounded weights within the quantization
// bound (plus float32's own); below that M, or without the instructions, the exact int8 path bit for
// bit. I across block edges and not a multiple of 4, M past the register block and the 48-row unit, O
// short of whole tiles, an outlier that only its own block pays for; padding columns kept out; the
// same result from every pool; and from DotMinRows() rows on, each row equal to the row among others.
void TestInt8Dot(TilePool& pool, const std::vector<TilePool*>& other_pools) {
  const int64_t cases[][3] = {{1, 1, 16},   {37, 65, 17},  {255, 130, 16}, {256, 64, 49}, {257, 200, 23},
                              {769, 63, 100}, {768, 130, 48}, {300, 130, 15}, {37, 65, 1}};
  for (const auto& c : cases) {
    const int64_t I = c[0], O = c[1], M = c[2];
    Packed p = Pack(I, O, static_cast<uint32_t>(I * 5 + O));
    std::vector<float> x_MI = Normal(M * I, static_cast<uint32_t>(M + 300));
    x_MI[0] = 40.0f;  // an outlier in row 0's first block
    std::string what = "i8dot I=" + std::to_string(I) + " O=" + std::to_string(O) + " M=" + std::to_string(M);
    std::vector<float> y_MO = RunMatmul(p, "i8dot", x_MI, M, pool);
    if (jax_gpt2::HasInt8Dot() && M >= jax_gpt2::DotMinRows()) {
      QuantizedProduct reference = Int8DotReference(p, x_MI, M);
      double worst = 0.0, worst_bound = 0.0;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t o = 0; o < O; ++o) {
          const int64_t at = m * O + o;
          worst = std::max(worst, std::fabs(y_MO[at] - reference.y_MO[at]) / (1e-5 * reference.magnitude_MO[at] + 1e-30));
          double product = 0.0, magnitude = 0.0;
          for (int64_t i = 0; i < I; ++i) {
            product += static_cast<double>(x_MI[m * I + i]) * p.rounded_i8[i * O + o];
            magnitude += std::fabs(static_cast<double>(x_MI[m * I + i]) * p.rounded_i8[i * O + o]);
          }
          const double allowed = reference.bound_MO[at] + 1e-5 * magnitude + 1e-30;
          worst_bound = std::max(worst_bound, std::fabs(y_MO[at] - product) / allowed);
        }
      Expect(worst <= 1.0, what + ": off the quantized product by " + std::to_string(worst) + " of 1e-5 x its size");
      Expect(worst_bound <= 1.0, what + ": past the quantization bound by " + std::to_string(worst_bound));
      std::vector<float> rows_2MI(x_MI);
      rows_2MI.insert(rows_2MI.end(), x_MI.begin(), x_MI.end());
      std::vector<float> doubled = RunMatmul(p, "i8dot", rows_2MI, 2 * M, pool);
      Expect(std::equal(y_MO.begin(), y_MO.end(), doubled.begin() + M * O),
             what + ": a row's result depends on the rows beside it");
    } else {
      Expect(RunMatmul(p, "i8", x_MI, M, pool) == y_MO, what + ": not the exact int8 path");
    }
    Expect(RunMatmulOverGarbage(p, "i8dot", x_MI, M, pool) == y_MO, what + ": padding columns reached the output");
    for (TilePool* other : other_pools)
      Expect(RunMatmul(p, "i8dot", x_MI, M, *other) == y_MO, what + ": result depends on the pool");
  }
}

// ---------------------------------------------------------------------------------------------

struct Cache {
  CacheShape shape;
  std::vector<float> q_BNH, k_f32, v_f32;
  std::vector<uint16_t> k_bf16, v_bf16;
  std::vector<float> k_seen, v_seen;  // what each kernel reads: float32, or the bf16 values widened
};

Cache RandomCache(CacheShape shape, uint32_t seed) {
  Cache c;
  c.shape = shape;
  int64_t size = shape.L * shape.B * shape.N * shape.S * shape.H;
  c.q_BNH = Normal(shape.B * shape.N * shape.H, seed);
  c.k_f32 = Normal(size, seed + 1);
  c.v_f32 = Normal(size, seed + 2);
  for (float k : c.k_f32) c.k_bf16.push_back(ToBfloat16(k));
  for (float v : c.v_f32) c.v_bf16.push_back(ToBfloat16(v));
  return c;
}

// The float64 attention of one query q_H over slots [start, end] of the (S, H) block of k and v at
// `offset` (uniform when it sees none).
std::vector<double> ExactQuery(const float* q_H, const std::vector<float>& k, const std::vector<float>& v,
                               int64_t offset, int64_t S, int64_t H, int64_t start, int64_t end, double scale) {
  int64_t first = std::max<int64_t>(start, 0), last = std::min<int64_t>(end, S - 1);
  if (first > last) first = 0, last = S - 1, scale = 0.0;
  std::vector<double> score(last - first + 1), out(H, 0.0);
  double high = -1e300, total = 0.0;
  for (int64_t t = first; t <= last; ++t) {
    double dot = 0.0;
    for (int64_t h = 0; h < H; ++h) dot += static_cast<double>(q_H[h]) * k[offset + t * H + h];
    score[t - first] = dot * scale;
    high = std::max(high, score[t - first]);
  }
  for (auto& x : score) total += x = std::exp(x - high);
  for (int64_t t = first; t <= last; ++t)
    for (int64_t h = 0; h < H; ++h) out[h] += score[t - first] / total * v[offset + t * H + h];
  return out;
}

// The float64 attention of row b's query over slots [start, end] of layer `layer`.
std::vector<double> ExactAttention(const Cache& c, const std::vector<float>& k, const std::vector<float>& v,
                                   int64_t bn, int64_t layer, int64_t start, int64_t end, double scale) {
  const CacheShape& s = c.shape;
  return ExactQuery(c.q_BNH.data() + bn * s.H, k, v, (layer * s.B * s.N + bn) * s.S * s.H, s.S, s.H, start, end,
                    scale);
}

std::vector<float> RunAttention(const Cache& c, bool bf16, const std::vector<int32_t>& start_B,
                                const std::vector<int32_t>& end_B, int64_t layer, float scale, TilePool& pool) {
  std::vector<float> out(c.shape.B * c.shape.N * c.shape.H, -1.0f);
  if (bf16)
    jax_gpt2::DecodeAttention(c.q_BNH.data(), c.k_bf16.data(), c.v_bf16.data(), start_B.data(), end_B.data(),
                              c.shape, c.shape.B, layer, scale, out.data(), pool);
  else
    jax_gpt2::DecodeAttention(c.q_BNH.data(), c.k_f32.data(), c.v_f32.data(), start_B.data(), end_B.data(),
                              c.shape, c.shape.B, layer, scale, out.data(), pool);
  return out;
}

// The first `rows` rows of the cache as the batch, every other row's keys and values NaN: the output
// must equal the whole-batch run's first rows bit for bit, and nothing past them may be written.
void CheckRowPrefix(Cache c, bool bf16, const std::vector<int32_t>& start_B, const std::vector<int32_t>& end_B,
                    int64_t layer, float scale, const std::vector<float>& whole, TilePool& pool,
                    const std::string& what) {
  const CacheShape& s = c.shape;
  const int64_t rows = s.B / 2;
  for (int64_t l = 0; l < s.L; ++l)
    for (int64_t b = rows; b < s.B; ++b)
      for (int64_t i = 0; i < s.N * s.S * s.H; ++i) {
        int64_t at = (l * s.B + b) * s.N * s.S * s.H + i;
        c.k_f32[at] = c.v_f32[at] = NAN;
        c.k_bf16[at] = c.v_bf16[at] = 0x7FC0;
      }
  std::vector<float> out(s.B * s.N * s.H, -1.0f);
  if (bf16)
    jax_gpt2::DecodeAttention(c.q_BNH.data(), c.k_bf16.data(), c.v_bf16.data(), start_B.data(), end_B.data(), s,
                              rows, layer, scale, out.data(), pool);
  else
    jax_gpt2::DecodeAttention(c.q_BNH.data(), c.k_f32.data(), c.v_f32.data(), start_B.data(), end_B.data(), s, rows,
                              layer, scale, out.data(), pool);
  const int64_t used = rows * s.N * s.H;
  Expect(std::memcmp(out.data(), whole.data(), used * sizeof(float)) == 0, what + ": a row prefix differs");
  bool untouched = true;
  for (int64_t i = used; i < static_cast<int64_t>(out.size()); ++i) untouched = untouched && out[i] == -1.0f;
  Expect(untouched, what + ": wrote past the rows in use");
}

// Every case the kernel treats apart, one row each: the whole cache, left padding, one slot, end past
// the cache, start before slot 0, nothing visible (start > end), starting past the cache.
void DecodeRows(int64_t S, std::vector<int32_t>* start_B, std::vector<int32_t>* end_B) {
  int32_t s = static_cast<int32_t>(S);
  *start_B = {0, std::min(3, s - 1), s / 2, std::min(2, s - 1), -3, s / 2 + 1, s};
  *end_B = {s - 1, s - 1, s / 2, s + 4, s / 3, s / 2, s + 2};
}

// What a kernel reads of the cache (the bf16 values widened, or float32), and the tally of its outputs
// against float64 ones: within 1e-5 of the largest |v| (both are convex mixtures of the visible v
// rows), and finite.
struct AttentionTally {
  const std::vector<float>& k;
  const std::vector<float>& v;
  double v_max = 0.0, worst = 0.0;
  bool finite = true;

  AttentionTally(const Cache& c, bool bf16) : k(bf16 ? c.k_seen : c.k_f32), v(bf16 ? c.v_seen : c.v_f32) {
    for (float x : v) v_max = std::max(v_max, static_cast<double>(std::fabs(x)));
  }
  void Add(const float* out_H, const std::vector<double>& exact_H) {
    for (size_t h = 0; h < exact_H.size(); ++h) {
      finite = finite && std::isfinite(out_H[h]);
      worst = std::max(worst, std::fabs(out_H[h] - exact_H[h]));
    }
  }
  void Expect(const std::string& what) const {
    ::Expect(finite, what + ": not finite");
    ::Expect(worst <= 1e-5 * v_max, what + ": max abs diff " + std::to_string(worst) + " > 1e-5 max|v|");
  }
};

void CheckAttention(const Cache& c, bool bf16, const std::vector<int32_t>& start_B,
                    const std::vector<int32_t>& end_B, int64_t layer, float scale, const std::vector<float>& out,
                    const std::string& what) {
  const CacheShape& s = c.shape;
  AttentionTally tally(c, bf16);
  for (int64_t bn = 0; bn < s.B * s.N; ++bn)
    tally.Add(out.data() + bn * s.H,
              ExactAttention(c, tally.k, tally.v, bn, layer, start_B[bn / s.N], end_B[bn / s.N], scale));
  tally.Expect(what);
}

// NaN in every layer but `layer` and in the slots each row may not see: the output must not change.
void CheckReadsOnlyVisibleSlots(Cache c, bool bf16, const std::vector<int32_t>& start_B,
                                const std::vector<int32_t>& end_B, int64_t layer, float scale,
                                const std::vector<float>& clean, TilePool& pool, const std::string& what) {
  const CacheShape& s = c.shape;
  for (int64_t l = 0; l < s.L; ++l)
    for (int64_t bn = 0; bn < s.B * s.N; ++bn) {
      int32_t start = start_B[bn / s.N], end = end_B[bn / s.N];
      if (l == layer && (start > end || start >= s.S || end < 0)) continue;  // uniform rows read every slot
      for (int64_t t = 0; t < s.S; ++t) {
        if (l == layer && t >= start && t <= end) continue;
        for (int64_t h = 0; h < s.H; ++h) {
          int64_t at = ((l * s.B * s.N + bn) * s.S + t) * s.H + h;
          c.k_f32[at] = c.v_f32[at] = NAN;
          c.k_bf16[at] = c.v_bf16[at] = 0x7FC0;  // a bfloat16 NaN
        }
      }
    }
  std::vector<float> poisoned = RunAttention(c, bf16, start_B, end_B, layer, scale, pool);
  Expect(std::memcmp(poisoned.data(), clean.data(), clean.size() * sizeof(float)) == 0,
         what + ": read a slot or layer it may not see");
}

void TestAttention(TilePool& pool, std::vector<TilePool*> other_pools) {
  for (int64_t H : {7, 16, 24, 64})
    for (int64_t S : {1, 37, 1030}) {
      std::vector<int32_t> start_B, end_B;
      DecodeRows(S, &start_B, &end_B);
      Cache c = RandomCache({3, static_cast<int64_t>(start_B.size()), 2, S, H}, static_cast<uint32_t>(H * S));
      for (uint16_t b : c.k_bf16) c.k_seen.push_back(FromBfloat16(b));
      for (uint16_t b : c.v_bf16) c.v_seen.push_back(FromBfloat16(b));
      for (bool bf16 : {false, true})
        for (float scale : {1.0f / std::sqrt(static_cast<float>(H)), 2.0f})
          for (int64_t layer = 0; layer < 3; ++layer) {
            std::string what = std::string(bf16 ? "bf16" : "f32") + " attention H=" + std::to_string(H) +
                               " S=" + std::to_string(S) + " layer=" + std::to_string(layer) +
                               " scale=" + std::to_string(scale);
            std::vector<float> out = RunAttention(c, bf16, start_B, end_B, layer, scale, pool);
            CheckAttention(c, bf16, start_B, end_B, layer, scale, out, what);
            for (TilePool* other : other_pools)
              Expect(RunAttention(c, bf16, start_B, end_B, layer, scale, *other) == out,
                     what + ": result depends on the pool");
            if (S < 100) CheckReadsOnlyVisibleSlots(c, bf16, start_B, end_B, layer, scale, out, pool, what);
            if (S < 100) CheckRowPrefix(c, bf16, start_B, end_B, layer, scale, out, pool, what);
          }
    }
}

// With v the identity (S = H), the output is the attention weights themselves: each must be the
// float64 softmax within 1e-5 of its own size (scores up to ~45: a few float32 ulps), down to
// weights of ~1e-19. A crude exp (a degree-4 series, 5e-5) fails here.
void TestSoftmaxWeights(TilePool& pool) {
  for (float scale : {0.1f, 0.3f, 1.0f}) {
    const int64_t S = 64, H = 64;
    Cache c = RandomCache({1, 2, 3, S, H}, 7);
    for (int64_t bn = 0; bn < 6; ++bn)
      for (int64_t t = 0; t < S; ++t)
        for (int64_t h = 0; h < H; ++h) c.v_f32[(bn * S + t) * H + h] = t == h ? 1.0f : 0.0f;
    std::vector<int32_t> start_B = {0, 0}, end_B = {S - 1, S - 1};
    std::vector<float> out = RunAttention(c, false, start_B, end_B, 0, scale, pool);
    double worst = 0.0;
    for (int64_t bn = 0; bn < 6; ++bn) {
      std::vector<double> exact = ExactAttention(c, c.k_f32, c.v_f32, bn, 0, 0, S - 1, scale);
      for (int64_t h = 0; h < H; ++h) worst = std::max(worst, std::fabs(out[bn * H + h] - exact[h]) / exact[h]);
    }
    Expect(worst <= 1e-5, "softmax weights at scale " + std::to_string(scale) + ": relative error " +
                              std::to_string(worst) + " > 1e-5");
  }
}

// ---------------------------------------------------------------------------------------------
// Attention of T new queries per row (PrefillAttention).

// q_BTNH's queries given to the kernel as the first N * H of every `E` values (E > N * H: as in the fused
// qkv projection, the rest NaN, never to be read).
std::vector<float> RunPrefill(const Cache& c, bool bf16, const std::vector<float>& q_BTNH, int64_t rows, int64_t T,
                              const std::vector<int32_t>& start_B, const std::vector<int32_t>& end_B, int64_t layer,
                              float scale, TilePool& pool, int64_t E = 0) {
  const int64_t D = c.shape.N * c.shape.H;
  E = E ? E : D;
  std::vector<float> q_BTE(rows * T * E, NAN);
  for (int64_t bt = 0; bt < rows * T; ++bt) std::copy_n(q_BTNH.begin() + bt * D, D, q_BTE.begin() + bt * E);
  std::vector<float> out(rows * T * D, -1.0f);
  if (bf16)
    jax_gpt2::PrefillAttention(q_BTE.data(), E, c.k_bf16.data(), c.v_bf16.data(), start_B.data(), end_B.data(),
                               c.shape, rows, T, layer, scale, out.data(), pool);
  else
    jax_gpt2::PrefillAttention(q_BTE.data(), E, c.k_f32.data(), c.v_f32.data(), start_B.data(), end_B.data(), c.shape,
                               rows, T, layer, scale, out.data(), pool);
  return out;
}

// Every query of every row against float64 math: within 1e-5 max|v|, and finite.
void CheckPrefill(const Cache& c, bool bf16, const std::vector<float>& q_BTNH, int64_t T,
                  const std::vector<int32_t>& start_B, const std::vector<int32_t>& end_B, int64_t layer, float scale,
                  const std::vector<float>& out, const std::string& what) {
  const CacheShape& s = c.shape;
  AttentionTally tally(c, bf16);
  for (int64_t b = 0; b < static_cast<int64_t>(start_B.size()); ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < s.N; ++n) {
        const int64_t at = ((b * T + t) * s.N + n) * s.H;
        tally.Add(out.data() + at, ExactQuery(q_BTNH.data() + at, tally.k, tally.v,
                                              ((layer * s.B + b) * s.N + n) * s.S * s.H, s.S, s.H, start_B[b],
                                              end_B[b] + t, scale));
      }
  tally.Expect(what);
}

// The last T - shift queries alone (their rows' end moved on by `shift`) must give the same bits: a
// query's result never depends on which block or unit holds it.
void CheckQueriesAlone(const Cache& c, bool bf16, const std::vector<float>& q_BTNH, int64_t T, int64_t shift,
                       const std::vector<int32_t>& start_B, const std::vector<int32_t>& end_B, int64_t layer,
                       float scale, const std::vector<float>& out, TilePool& pool, const std::string& what) {
  const CacheShape& s = c.shape;
  const int64_t rows = static_cast<int64_t>(start_B.size()), row = s.N * s.H, later = T - shift;
  std::vector<float> q_later(rows * later * row);
  std::vector<int32_t> end_later(end_B);
  for (int64_t b = 0; b < rows; ++b) {
    end_later[b] += static_cast<int32_t>(shift);
    std::copy_n(q_BTNH.begin() + (b * T + shift) * row, later * row, q_later.begin() + b * later * row);
  }
  std::vector<float> alone = RunPrefill(c, bf16, q_later, rows, later, start_B, end_later, layer, scale, pool);
  bool same = true;
  for (int64_t b = 0; b < rows; ++b)
    same = same && std::equal(alone.begin() + b * later * row, alone.begin() + (b + 1) * later * row,
                              out.begin() + (b * T + shift) * row);
  Expect(same, what + ": the last " + std::to_string(later) + " queries alone differ");
}

// NaN in every layer but `layer`, in rows past `rows`, and in the slots no query of a row may see:
// the output must not change.
void CheckPrefillReads(Cache c, bool bf16, const std::vector<float>& q_BTNH, int64_t rows, int64_t T,
                       const std::vector<int32_t>& start_B, const std::vector<int32_t>& end_B, int64_t layer,
                       float scale, const std::vector<float>& clean, TilePool& pool, const std::string& what) {
  const CacheShape& s = c.shape;
  for (int64_t l = 0; l < s.L; ++l)
    for (int64_t bn = 0; bn < s.B * s.N; ++bn) {
      const int64_t b = bn / s.N;
      const bool sees_none_sometimes = b < rows && std::max(start_B[b], 0) > std::min<int64_t>(end_B[b], s.S - 1);
      if (l == layer && sees_none_sometimes) continue;  // a query that sees nothing reads every slot
      for (int64_t t = 0; t < s.S; ++t) {
        if (l == layer && b < rows && t >= start_B[b] && t <= end_B[b] + T - 1) continue;
        for (int64_t h = 0; h < s.H; ++h) {
          const int64_t at = ((l * s.B * s.N + bn) * s.S + t) * s.H + h;
          c.k_f32[at] = c.v_f32[at] = NAN;
          c.k_bf16[at] = c.v_bf16[at] = 0x7FC0;
        }
      }
    }
  std::vector<float> poisoned = RunPrefill(c, bf16, q_BTNH, rows, T, start_B, end_B, layer, scale, pool);
  Expect(std::memcmp(poisoned.data(), clean.data(), clean.size() * sizeof(float)) == 0,
         what + ": read a slot, row or layer it may not see");
}

// Rows that prefill a whole prompt, a left-padded one (its first queries see nothing), a chunk after
// earlier ones, a chunk running past the cache's end, a start before slot 0, and a start past the cache.
void PrefillRows(int64_t S, int64_t T, std::vector<int32_t>* start_B, std::vector<int32_t>* end_B) {
  const int32_t s = static_cast<int32_t>(S), t = static_cast<int32_t>(T);
  *start_B = {0, std::min(3, t - 1), 2, 0, -3, s};
  *end_B = {0, 0, std::max(0, std::min(s - t, 9)), std::max(0, s - t + 4), 0, 0};
}

void TestPrefillAttention(TilePool& pool, std::vector<TilePool*> other_pools) {
  for (int64_t H : {7, 64, 72})
    for (int64_t S : {37, 300})
      for (int64_t T : {int64_t{1}, int64_t{5}, int64_t{16}, int64_t{50}, S}) {
        if (T > S) continue;
        std::vector<int32_t> start_B, end_B;
        PrefillRows(S, T, &start_B, &end_B);
        const int64_t B = static_cast<int64_t>(start_B.size());
        Cache c = RandomCache({2, B + 1, 3, S, H}, static_cast<uint32_t>(H * S + T));  // one cache row unused
        for (uint16_t b : c.k_bf16) c.k_seen.push_back(FromBfloat16(b));
        for (uint16_t b : c.v_bf16) c.v_seen.push_back(FromBfloat16(b));
        std::vector<float> q_BTNH = Normal(B * T * 3 * H, static_cast<uint32_t>(T + 11), 0.5f);
        for (bool bf16 : {false, true})
          for (int64_t layer = 0; layer < 2; ++layer) {
            const float scale = layer == 0 ? 1.0f / std::sqrt(static_cast<float>(H)) : 1.5f;
            std::string what = std::string(bf16 ? "bf16" : "f32") + " prefill attention H=" + std::to_string(H) +
                               " S=" + std::to_string(S) + " T=" + std::to_string(T) + " layer=" +
                               std::to_string(layer);
            std::vector<float> out = RunPrefill(c, bf16, q_BTNH, B, T, start_B, end_B, layer, scale, pool);
            CheckPrefill(c, bf16, q_BTNH, T, start_B, end_B, layer, scale, out, what);
            for (TilePool* other : other_pools)
              Expect(RunPrefill(c, bf16, q_BTNH, B, T, start_B, end_B, layer, scale, *other) == out,
                     what + ": result depends on the pool");
            Expect(RunPrefill(c, bf16, q_BTNH, B, T, start_B, end_B, layer, scale, pool, 3 * 3 * H) == out,
                   what + ": queries read out of a wider (qkv) row differ");
            if (T >= 40) CheckQueriesAlone(c, bf16, q_BTNH, T, 7, start_B, end_B, layer, scale, out, pool, what);
            if (S < 100) CheckPrefillReads(c, bf16, q_BTNH, B, T, start_B, end_B, layer, scale, out, pool, what);
          }
      }
}

// Log-sum-exp of rows against float64 math: lengths around the vector width and the summing block
// (values 30 wide, so most terms underflow float32's e^x while the largest dominate), each row's
// largest value placed first or last too (a dropped first or last vector would move the result by
// whole units). Tolerance: the float32 rounding of the result, 2^-22 |lse|, plus 2e-6 for the sums
// of e^x (each lane's partial sum adds tens of terms). NaN, +inf and -inf rows as XLA gives them; a
// row's result the same alone, among other rows, and from every pool.
void TestLogSumExpRows(TilePool& pool, const std::vector<TilePool*>& other_pools) {
  for (int64_t V : {1, 3, 16, 17, 63, 65, 257, 2047, 2048, 2049, 4099, 50257}) {
    const int64_t M = 3;
    std::vector<float> x_MV = Normal(M * V, static_cast<uint32_t>(V));
    for (float& value : x_MV) value *= 10.0f;
    x_MV[0] = 60.0f;               // row 0: its first value the largest
    x_MV[2 * V - 1] = 60.0f;       // row 1: its last
    std::vector<float> lse_M(M);
    jax_gpt2::LogSumExpRows(x_MV.data(), M, V, lse_M.data(), pool);
    for (int64_t m = 0; m < M; ++m) {
      const float* x = x_MV.data() + m * V;
      double high = *std::max_element(x, x + V), sum = 0.0;
      for (int64_t v = 0; v < V; ++v) sum += std::exp(static_cast<double>(x[v]) - high);
      const double exact = high + std::log(sum);
      Expect(std::fabs(lse_M[m] - exact) <= 2e-6 + std::ldexp(std::fabs(exact), -22),
             "logsumexp V=" + std::to_string(V) + " row " + std::to_string(m) + ": " + std::to_string(lse_M[m]) +
                 " vs " + std::to_string(exact));
      float alone = 0.0f;
      jax_gpt2::LogSumExpRows(x, 1, V, &alone, pool);
      Expect(alone == lse_M[m], "logsumexp V=" + std::to_string(V) + ": a row alone differs from it among others");
    }
    for (TilePool* other : other_pools) {
      std::vector<float> again_M(M);
      jax_gpt2::LogSumExpRows(x_MV.data(), M, V, again_M.data(), *other);
      Expect(again_M == lse_M, "logsumexp V=" + std::to_string(V) + ": another pool gives another result");
    }
  }
  const int64_t V = 37;
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> x_MV(4 * V, -1.0f);
  x_MV[V - 1] = std::numeric_limits<float>::quiet_NaN();  // row 0: a NaN (last) -> NaN
  x_MV[V + 5] = inf;                                      // row 1: +inf -> +inf
  std::fill(x_MV.begin() + 2 * V, x_MV.begin() + 3 * V, -inf);  // row 2: all -inf -> -inf
  std::fill(x_MV.begin() + 3 * V, x_MV.begin() + 3 * V + 30, -inf);  // row 3: 7 values of -1 left
  std::vector<float> lse_M(4);
  jax_gpt2::LogSumExpRows(x_MV.data(), 4, V, lse_M.data(), pool);
  Expect(std::isnan(lse_M[0]), "logsumexp: a row holding NaN gives NaN");
  Expect(lse_M[1] == inf, "logsumexp: a row holding +inf gives +inf");
  Expect(lse_M[2] == -inf, "logsumexp: a row of -inf gives -inf");
  Expect(std::fabs(lse_M[3] - (-1.0 + std::log(7.0))) <= 1e-6, "logsumexp: -inf values add nothing");
}

// The k largest values of each row beside its log-sum-exp: the values and indices a stable sort
// (largest first, lower index first among equals) gives, for k from 1 to V, with ties (values
// rounded to steps of 0.5), a row of -inf (its first k), and a row that is -inf but for two values
// (sampling's filtered tokens); the log-sum-exp the same as without the top.
void TestTopOfRows(TilePool& pool) {
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t V : {1, 7, 64, 65, 1000, 50257}) {
    std::vector<float> x_MV = Normal(4 * V, static_cast<uint32_t>(V) + 100);
    for (float& value : x_MV) value = std::round(value * 8.0f) / 2.0f;  // many ties
    std::fill(x_MV.begin() + 2 * V, x_MV.begin() + 3 * V, -inf);
    std::fill(x_MV.begin() + 3 * V, x_MV.end(), -inf);
    x_MV[4 * V - 1] = 1.0f;
    x_MV[3 * V + V / 2] = 1.0f;
    for (int64_t k : {int64_t{1}, std::min<int64_t>(5, V), V}) {
      std::vector<float> lse_M(4), plain_M(4), values_MK(4 * k);
      std::vector<int32_t> ids_MK(4 * k);
      jax_gpt2::LogSumExpRows(x_MV.data(), 4, V, lse_M.data(), pool, k, ids_MK.data(), values_MK.data());
      jax_gpt2::LogSumExpRows(x_MV.data(), 4, V, plain_M.data(), pool);
      const std::string where = "top V=" + std::to_string(V) + " k=" + std::to_string(k);
      Expect(std::equal(lse_M.begin(), lse_M.end(), plain_M.begin(),
                        [](float a, float b) { return a == b || (std::isnan(a) && std::isnan(b)); }),
             where + ": the log-sum-exp changed");
      for (int64_t m = 0; m < 4; ++m) {
        std::vector<int32_t> order(V);
        for (int64_t v = 0; v < V; ++v) order[v] = static_cast<int32_t>(v);
        const float* x = x_MV.data() + m * V;
        std::stable_sort(order.begin(), order.end(), [x](int32_t a, int32_t b) { return x[a] > x[b]; });
        bool same = true;
        for (int64_t j = 0; j < k; ++j)
          same = same && ids_MK[m * k + j] == order[j] && values_MK[m * k + j] == x[order[j]];
        Expect(same, where + " row " + std::to_string(m) + ": not the stable order's first k");
      }
    }
  }
}

// Layer norm of rows against float64 math (biased variance, torch.nn.LayerNorm's), rows off-centre
// (mean 30, spread 3) as a residual stream's are; each row alone the same as among others, and the
// same over every pool.
void TestLayerNormRows(TilePool& pool, const std::vector<TilePool*>& other_pools) {
  for (int64_t D : {1, 3, 16, 17, 37, 768, 1600}) {
    const int64_t M = 11;
    std::vector<float> x_MD = Normal(M * D, static_cast<uint32_t>(D) + 7);
    std::vector<float> scale_D = Normal(D, 1), bias_D = Normal(D, 2);
    for (float& value : x_MD) value = 30.0f + 3.0f * value;
    std::vector<float> out_MD(M * D);
    jax_gpt2::LayerNormRows(x_MD.data(), M, D, scale_D.data(), bias_D.data(), 1e-5f, out_MD.data(), pool);
    for (int64_t m = 0; m < M; ++m) {
      const float* x = x_MD.data() + m * D;
      double mean = 0.0, variance = 0.0;
      for (int64_t d = 0; d < D; ++d) mean += x[d] / static_cast<double>(D);
      for (int64_t d = 0; d < D; ++d) variance += (x[d] - mean) * (x[d] - mean) / static_cast<double>(D);
      double worst = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const double exact = (x[d] - mean) / std::sqrt(variance + 1e-5) * scale_D[d] + bias_D[d];
        worst = std::max(worst, std::fabs(out_MD[m * D + d] - exact) - std::ldexp(std::fabs(exact), -20));
      }
      Expect(worst <= 2e-6, "layer norm D=" + std::to_string(D) + " row " + std::to_string(m) + ": error past " +
                                "the bound by " + std::to_string(worst - 2e-6));
      std::vector<float> alone_D(D);
      jax_gpt2::LayerNormRows(x, 1, D, scale_D.data(), bias_D.data(), 1e-5f, alone_D.data(), pool);
      Expect(std::equal(alone_D.begin(), alone_D.end(), out_MD.begin() + m * D),
             "layer norm D=" + std::to_string(D) + ": a row alone differs from it among others");
    }
    for (TilePool* other : other_pools) {
      std::vector<float> again_MD(M * D);
      jax_gpt2::LayerNormRows(x_MD.data(), M, D, scale_D.data(), bias_D.data(), 1e-5f, again_MD.data(), *other);
      Expect(again_MD == out_MD, "layer norm D=" + std::to_string(D) + ": another pool gives another result");
    }
  }
}

}  // namespace

int main() {
  if (!jax_gpt2::CpuRunsThisBuild()) {
    std::printf("core_test %s: this CPU lacks an extension the build uses\n", jax_gpt2::TargetIsa());
    return 2;
  }
  TilePool two(2, 4), one(1, 4), three_long_runs(3, 1), three_single_tiles(3, 100000);
  std::vector<TilePool*> others = {&one, &three_long_runs, &three_single_tiles};
  TestMatmul(two, others);
  TestGemm(two, others);
  TestBatchInvariance(two);
  TestBf16Dot(two, others);
  TestInt8Dot(two, others);
  TestEpilogue(two, others);
  TestGeluPrecision(two);
  TestAttention(two, others);
  TestSoftmaxWeights(two);
  TestPrefillAttention(two, others);
  TestLogSumExpRows(two, others);
  TestTopOfRows(two);
  TestLayerNormRows(two, others);
  std::printf("core_test %s: %d of %d checks passed\n", jax_gpt2::TargetIsa(), checks - failures, checks);
  return failures == 0 ? 0 : 1;
}
