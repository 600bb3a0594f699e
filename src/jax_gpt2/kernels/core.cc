// The compute core (see core.h): one source for every CPU, written with GCC/Clang vector
// extensions (vector_size types, __builtin_convertvector), which the compiler lowers onto the
// vector unit of the -march it is given: zmm registers on AVX-512, ymm on AVX2+FMA, q registers on
// NEON, xmm on any other x86-64. Why not Google's Highway: it is not on PyPI (the "highway" there is
// a workflow engine), so a `pip install jax-gpt2` user would need a system package first (Debian's
// libhwy-dev, Homebrew's highway); vector extensions need nothing but the compiler the kernels are
// already built with, and these loops need only loads, widening converts, fused multiply-adds and
// a horizontal sum. One per-ISA intrinsic remains, where it measured faster: int8 widening on x86
// (WidenInt8InOrder); and one per-ISA path, the opt-in bf16 dot path (AVX512_BF16 only), whose
// instructions have no vector-extension spelling at all.
//
// Why the kernels exist: at batch 1 a matmul only streams its weight from memory, and XLA on CPU
// (jax 0.10.2) reads a bf16 or int8 weight by first writing a converted f32 copy of it, ~20x slower
// than reading f32. These kernels read each weight byte once, convert in registers, and split the
// tiles over a small persistent thread pool (XLA runs one dot at small M on one core).
//
// Build with -ffp-contract=fast (native.py does): `acc += w * x` must become one fused multiply-add,
// and GCC in ISO C++ mode does not contract by default.

#include "core.h"

#if defined(__AVX512F__) || defined(__AVX2__)
// For WidenInt8InOrder and the dot paths only (with the syscall that asks Linux for the AMX tiles). GCC 12 warns inside its own AVX-512 header (an "undefined" pass-through
// register it leaves uninitialized on purpose); nothing of ours is hidden by this.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
// The dot paths run on AMX's tiles where the build has every tile extension they use (and the host
// lends the tiles: AmxUsable()). Linux only: it lends them through arch_prctl.
#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__) && \
    defined(__linux__)
#define JAX_GPT2_AMX 1
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

#include <algorithm>
#include <cassert>
#include <cmath>
#include <chrono>
#include <cstring>
#include <limits>
#include <type_traits>

namespace jax_gpt2 {
namespace {

// Per target: floats per vector register, and the register blocking of the matmul: kPassVectors
// vectors of one tile row per pass (64 columns = kPassVectors * kLanes * passes), kRowBlock rows of
// x at a time. Accumulators: kRowBlock * kPassVectors, kept under the register count.
#if defined(__AVX512F__)
#define JAX_GPT2_LANES 16
constexpr const char* kIsa = "avx512";
constexpr int kPassVectors = 4;  // the whole tile: 6 rows x 4 zmm = 24 accumulators of 32 registers
constexpr int kRowBlock = 6;
#elif defined(__AVX2__) && defined(__FMA__)
#define JAX_GPT2_LANES 8
constexpr const char* kIsa = "avx2";
constexpr int kPassVectors = 4;  // half a tile: 3 rows x 4 ymm = 12 accumulators of 16 registers
constexpr int kRowBlock = 3;
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define JAX_GPT2_LANES 4
constexpr const char* kIsa = "neon";
constexpr int kPassVectors = 8;  // half a tile: 2 rows x 8 q registers = 16 accumulators of 32
constexpr int kRowBlock = 2;     // (3 rows spill in GCC 12's inner loop)
#else
#define JAX_GPT2_LANES 4  // SSE2 on any x86-64, or whatever 16-byte vectors the target has
constexpr const char* kIsa = "generic";
constexpr int kPassVectors = 4;  // a quarter tile: 2 rows x 4 xmm = 8 accumulators of 16
constexpr int kRowBlock = 2;
#endif

constexpr int kLanes = JAX_GPT2_LANES;
// One row of x needs one accumulator per vector of a tile row, so where the registers allow (16 ymm
// on AVX2, 32 q on NEON) a single row takes the whole tile in one pass: passes over half a tile read
// every tile twice, the second time from L2, at batch 1 where nothing else is to gain from it
// (one pass saves ~10-25% of an AVX2 decode step's matmul time; benchmarks/kernel_ab_probe.cc).
constexpr int kOneRowVectors = kTileColumns / JAX_GPT2_LANES;
#if JAX_GPT2_LANES >= 8 || (defined(__aarch64__) && defined(__ARM_NEON))
constexpr bool kOneRowPass = true;
#else
constexpr bool kOneRowPass = false;  // SSE2's 16 xmm: 16 accumulators would spill
#endif
static_assert(kTileColumns % (kPassVectors * kLanes) == 0, "passes must cover a tile exactly");

typedef float VF __attribute__((vector_size(4 * JAX_GPT2_LANES)));
typedef uint32_t VU32 __attribute__((vector_size(4 * JAX_GPT2_LANES)));
typedef int32_t VI32 __attribute__((vector_size(4 * JAX_GPT2_LANES)));
typedef uint16_t VU16 __attribute__((vector_size(2 * JAX_GPT2_LANES)));
typedef int8_t VI8 __attribute__((vector_size(JAX_GPT2_LANES)));

// Unaligned loads through a may_alias type of alignment 1 (GCC turns a memcpy into an integer-domain
// move, vmovdqu8, even for float data).
template <typename V, typename T>
inline V Load(const T* p) {
  typedef V Unaligned __attribute__((aligned(1), may_alias));
  return *reinterpret_cast<const Unaligned*>(p);
}

inline void Store(float* p, VF v, int64_t count) {
  if (count == kLanes)
    std::memcpy(p, &v, sizeof v);
  else
    std::memcpy(p, &v, count * sizeof(float));
}

// x in every lane. Not `VF{} + x`: 0 + x is no identity in IEEE math (0 + -0 = +0), so GCC keeps that
// add, one extra instruction per row in the matmul's inner loop; x - 0 is one, and folds away.
inline VF Splat(float x) { return x - VF{}; }

// How many weights one 32-bit word holds and WidenWords interleaves: 1 (float32), 2 (bfloat16),
// 4 (int8), or 1 for int8 on AVX2 and AVX-512, which widen it in order (WidenInt8InOrder).
#if defined(__AVX512F__) || defined(__AVX2__)
constexpr bool kInt8InOrder = true;
#else
constexpr bool kInt8InOrder = false;
#endif
template <typename W>
constexpr int kPerWord = std::is_same_v<W, int8_t> && kInt8InOrder ? 1 : static_cast<int>(4 / sizeof(W));

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the widening below reads words little-endian");

// Widening by shifts within each 32-bit lane, never across lanes: kLanes words hold P * kLanes
// weights, and out[k] (k < P) gets weight k of every word, i.e. the columns P * lane + k. Callers
// un-permute once when they store. (A narrow-to-wide __builtin_convertvector is one instruction on
// x86 and under Clang, but GCC 12 for aarch64 turns it into one lane insert per element.)
inline void WidenWords(const float* w, VF* out) { out[0] = Load<VF>(w); }

inline void WidenWords(const uint16_t* w, VF* out) {
  VU32 words = Load<VU32>(w);
  out[0] = (VF)(words << 16);          // bf16 is the top half of a float32: the low (even) one moves up,
  out[1] = (VF)(words & 0xFFFF0000u);  // the high (odd) one is already in place
}

// The one per-ISA intrinsic: int8 -> float32 on x86 is two instructions (vpmovsxbd, vcvtdq2ps) per
// vector, and GCC 12 has no vector-extension spelling that compiles to them (int8 -> float by
// __builtin_convertvector is scalarized, int8 -> int16 -> int32 -> float takes ~9 instructions).
// Measured here (1 thread, x 128 x 768 times 768 x 768 int8, best of 60, three runs on a busy
// 2-core host): AVX-512 76-94 GFLOP/s in order against 68-79 by the shifts; AVX2 37-38 against 29-33.
#if defined(__AVX512F__) || defined(__AVX2__)
inline VF WidenInt8InOrder(const int8_t* w) {
#if defined(__AVX512F__)
  return (VF)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
#else
  return (VF)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
#endif
}
#else
inline VF WidenInt8InOrder(const int8_t*) { return VF{}; }  // never called: kInt8InOrder is false
#endif

inline void WidenWords(const int8_t* w, VF* out) {
  if constexpr (kInt8InOrder) {
    out[0] = WidenInt8InOrder(w);
  } else {
    VU32 words = Load<VU32>(w);
    out[0] = __builtin_convertvector((VI32)(words << 24) >> 24, VF);  // an arithmetic shift sign-extends
    out[1] = __builtin_convertvector((VI32)(words << 16) >> 24, VF);
    out[2] = __builtin_convertvector((VI32)(words << 8) >> 24, VF);
    out[3] = __builtin_convertvector((VI32)words >> 24, VF);
  }
}

// Writes n vectors widened by WidenWords<P> back in column order, times factor_C (or factor).
template <int P>
inline void Unpermute(const VF* acc, int n, float* out, int64_t count, const float* factor_C, float factor) {
  float ordered[kTileColumns];
  for (int u = 0; u < n / P; ++u)
    for (int k = 0; k < P; ++k)
      for (int lane = 0; lane < kLanes; ++lane) ordered[(u * kLanes + lane) * P + k] = acc[u * P + k][lane];
  for (int64_t c = 0; c < count; ++c) out[c] = ordered[c] * (factor_C ? factor_C[c] : factor);
}

inline float WidenOne(float w) { return w; }
inline float WidenOne(uint16_t w) {
  uint32_t bits = static_cast<uint32_t>(w) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// Horizontal sum by halving: log2(kLanes) adds. The halves are taken with memcpy, which needs no
// shuffle builtin (GCC has __builtin_shufflevector only since version 12).
typedef float F4 __attribute__((vector_size(16)));
typedef float F8 __attribute__((vector_size(32)));
typedef float F16 __attribute__((vector_size(64)));

inline float Sum(F4 v) { return (v[0] + v[2]) + (v[1] + v[3]); }

template <typename Half, typename Whole>
inline Half AddHalves(Whole v) {
  Half low, high;
  std::memcpy(&low, &v, sizeof low);
  std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof low, sizeof high);
  return low + high;
}

#if JAX_GPT2_LANES >= 8  // wider types without the registers for them would change the calling convention
inline float Sum(F8 v) { return Sum(AddHalves<F4>(v)); }
#endif
#if JAX_GPT2_LANES >= 16
inline float Sum(F16 v) { return Sum(AddHalves<F8>(v)); }
#endif

// ---------------------------------------------------------------------------------------------
// Elementwise math: e^x (softmax), GELU (the matmul epilogue).

// e^x to float32 accuracy, exactly 0 below -87 (where e^x nears the smallest normal float32; a
// softmax term that small changes no sum that holds the maximum's 1): 2^n * 2^f with
// n = round(x / ln 2), |f| <= 1/2, and 2^f by its degree-7 Taylor series in f ln 2 (relative error
// < 1e-8, below float32 rounding). 2^n is built in the exponent bits, n >= -126 by the clamp.
inline VF Exp(VF x) {
  const VF low = Splat(-87.0f);
  VI32 keep = x >= low;
  x = (VF)((keep & (VI32)x) | (~keep & (VI32)low));
  VF t = x * 1.4426950408889634f;
  const VF round = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds |t| < 2^22 to an integer
  VF n = (t + round) - round;
  VF f = (t - n) * 0.6931471805599453f;
  const float c[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  VF p = Splat(c[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 8; ++i) p = p * f + c[i];
  VI32 two_n = (__builtin_convertvector(n, VI32) + 127) << 23;
  return (VF)(keep & (VI32)(p * (VF)two_n));
}

// GELU's tanh form (GPT-2's "gelu_new"), 0.5 x (1 + tanh u) with u = sqrt(2 / pi) (x + 0.044715 x^3),
// computed as x times the logistic of 2u (the same function) without the cancellation of 1 + tanh u
// for negative x: e = e^(-|2u|) (never overflows), then x / (1 + e) for u >= 0 and x e / (1 + e) below.
// Within a few float32 ulps of the float64 formula down to ~1e-30; exactly x far above zero, a signed
// zero far below.
inline VF GeluTanh(VF x) {
  const VF two_u = (x + x * x * x * 0.044715f) * 1.5957691216057308f;  // 2 sqrt(2 / pi)
  const VI32 positive = two_u >= 0.0f;
  const VF e = Exp((VF)((VI32)two_u | (VI32)Splat(-0.0f)));  // e^(-|2u|): the sign bit set
  const VF numerator = (VF)((positive & (VI32)Splat(1.0f)) | (~positive & (VI32)e));
  return x * numerator / (1.0f + e);
}

// A thread's scratch, grown to the largest call's size and kept, so a call writes no freshly faulted
// pages: at least `count` values.
template <typename T>
T* Reserve(std::vector<T>& scratch, int64_t count) {
  if (static_cast<int64_t>(scratch.size()) < count) scratch.resize(count);
  return scratch.data();
}

// ---------------------------------------------------------------------------------------------
// Packed matmul.

// How far ahead of its reads a matmul asks for its weights. A batch-1 matmul streams each weight
// once, and the hardware prefetcher alone kept only ~13 GB/s of int8 in flight here (2 cores,
// DRAM ~20 GB/s): each call streams just 0.1-0.6 MB per thread, too short for it to ramp up.
// With 4 KiB of prefetch an int8 decode step's matmuls take ~25% less time (kernel_ab_probe.cc);
// 8 and 16 KiB ahead measure the same. Only the first row block's first pass prefetches (later ones
// find the tile in L2). A prefetch past the end of the weights never faults.
constexpr int64_t kPrefetchBytes = 4096;

// Asks for the `count` values at `values`: a tile row or a cache row to be read later.
template <typename T>
inline void Prefetch(const T* values, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(values);
  for (int64_t line = 0; line < count * static_cast<int64_t>(sizeof(T)); line += 64) __builtin_prefetch(bytes + line);
}

// The same, kPrefetchBytes past `values`: the row that far further on.
template <typename T>
inline void PrefetchAhead(const T* values, int64_t count) {
  static_assert(kPrefetchBytes % sizeof(T) == 0, "the distance is whole values");
  Prefetch(values + kPrefetchBytes / static_cast<int64_t>(sizeof(T)), count);
}

// A float32 tile that takes six passes or more (decode at batch 7 and up on AVX2, whose register
// blocks hold 3 rows and take half a tile row per pass) goes in pieces small enough for L1, so the
// later passes read from L1 while memory streams: every pass takes a piece before the next piece
// starts, the accumulators wait in a small buffer between pieces, and every pass (not only a block's
// first) asks for its share of the next piece's rows as it goes. Per column the sum still runs over i
// in order, so results are bit-identical to one pass. With fewer passes, letting each pass stream its
// whole tile (the later ones from L2) measures faster: the 49 matmuls of a decode step, weights cold,
// on the 2-core Zen 4 (kernel_ab_probe.cc, pieces against none): AVX-512 build 7 rows 21.4 -> 17.0 ms,
// 8 rows 22.7 -> 19.0, 12 rows 22.6 -> 20.2, 13 rows 24.4 -> 21.9 (15 rows 25.0 against 25.7); AVX2
// build 3 rows 22.4 -> 17.8, 4 rows 23.6 -> 19.6, 6 rows 23.7 -> 21.7, but 8 rows 22.4 against 25.3 and
// 12 rows 27.0 against 30.0 in pieces' favour (7 rows alike). 8 KiB pieces measure at least as well as
// 16 or 32. Only float32: bfloat16 and int8 at these batches are bound by widening, which each block
// repeats, and pieces measure slower for them. From GemmMinRows<W>() rows the GEMM path below runs
// instead: on x86 every float32 matmul since the GEMM asks for its weights ahead (the figures there).
constexpr int64_t kPiecesMinPasses = 6;
constexpr int64_t kPieceBytes = 8192;
constexpr int64_t kPieceRowsMax = 32;  // the waiting accumulators: 32 rows x 64 columns, 8 KiB of stack
static_assert(kPieceBytes % (kTileColumns * sizeof(float)) == 0, "a piece holds whole float32 tile rows");
static_assert(kPieceRowsMax >= 2 * kRowBlock, "the waiting accumulators hold two blocks and more");
constexpr int64_t kColumnPasses = kTileColumns / (kPassVectors * kLanes);  // per block of more than one row
static_assert(kColumnPasses < kPiecesMinPasses, "one register block's passes never go in pieces");

// The rows [i_begin, i_end) of a tile that one pass reads. Its accumulators start at zero (the first
// piece, i_begin == 0) or from held_MC, and end in y (the last, i_end == I) or back in held_MC
// (kTileColumns floats per row of x). The pass asks for the rows share, share + shares, ... of the
// next piece; shares == 0 asks for the rows 4 KiB ahead instead (a whole tile in one piece, or the
// first block of the first piece).
struct Piece {
  int64_t i_begin;
  int64_t i_end;
  float* held_MC;
  int64_t shares;
  int64_t share;
};

// Rows [0, R) of x times columns [column, column + V * kLanes) of one tile (V vectors per tile row).
template <int R, int V, typename W>
inline void TilePass(const float* x_MI, int64_t I, const W* tile_IC, const float* scale_C, int64_t column,
                     int64_t columns, float* y_MO, int64_t O, bool prefetch, const Piece& piece) {
  constexpr int P = kPerWord<W>;
  static_assert(V % P == 0, "a pass widens whole words");
  VF acc[R][V] = {};
  if (piece.i_begin > 0) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < V; ++j) acc[r][j] = Load<VF>(piece.held_MC + r * kTileColumns + column + j * kLanes);
  }
  const W* row = tile_IC + piece.i_begin * kTileColumns + column;
  const int64_t next_piece = (piece.i_end - piece.i_begin) * kTileColumns;
  int64_t turn = piece.share;  // counts down to this pass's next row to ask for (no division per row)
  for (int64_t i = piece.i_begin; i < piece.i_end; ++i, row += kTileColumns) {
    if (prefetch) {
      if (piece.shares == 0) {
        PrefetchAhead(row, kTileColumns);
      } else if (turn-- == 0) {
        turn = piece.shares - 1;
        Prefetch(row + next_piece, kTileColumns);
      }
    }
    VF w[V];
#pragma GCC unroll 16
    for (int u = 0; u < V / P; ++u) WidenWords(row + u * P * kLanes, w + u * P);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      VF xi = Splat(x_MI[r * I + i]);
#pragma GCC unroll 16
      for (int j = 0; j < V; ++j) acc[r][j] += w[j] * xi;
    }
  }
  if (piece.i_end < I) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < V; ++j) Store(piece.held_MC + r * kTileColumns + column + j * kLanes, acc[r][j], kLanes);
    return;
  }
  int64_t valid = std::min<int64_t>(V * kLanes, columns - column);
  for (int r = 0; r < R; ++r) {
    if constexpr (P == 1) {  // columns in order, stored as vectors (scales are padded to the tile)
      for (int j = 0; j * kLanes < valid; ++j) {
        VF y = scale_C ? acc[r][j] * Load<VF>(scale_C + column + j * kLanes) : acc[r][j];
        Store(y_MO + r * O + column + j * kLanes, y, std::min<int64_t>(kLanes, valid - j * kLanes));
      }
    } else {
      Unpermute<P>(acc[r], V, y_MO + r * O + column, valid, scale_C ? scale_C + column : nullptr, 1.0f);
    }
  }
}

// `rows` (<= R) rows of x times one piece of a tile, in passes; passes wholly in the padding are
// skipped. The block's share of the next piece (every shares-th row from share) is split between its
// passes: pass p takes every (shares * passes)-th row from p * shares + share.
template <int R, typename W>
void RowBlock(int64_t rows, const float* x_MI, int64_t I, const W* tile_IC, const float* scale_C,
              int64_t columns, float* y_MO, int64_t O, bool prefetch, const Piece& piece) {
  if constexpr (R > 1) {
    if (rows < R) return RowBlock<R - 1, W>(rows, x_MI, I, tile_IC, scale_C, columns, y_MO, O, prefetch, piece);
  }
  if constexpr (R == 1 && kOneRowPass && kOneRowVectors % kPerWord<W> == 0) {  // the whole tile at once
    TilePass<1, kOneRowVectors, W>(x_MI, I, tile_IC, scale_C, 0, columns, y_MO, O, prefetch, piece);
    return;
  }
  for (int64_t column = 0, pass = 0; column < columns; column += kPassVectors * kLanes, ++pass) {
    Piece share = piece;
    if (piece.shares > 0) {
      share.shares = piece.shares * kColumnPasses;
      share.share = pass * piece.shares + piece.share;
    }
    bool asks = piece.shares > 0 ? prefetch : prefetch && column == 0;  // 4 KiB ahead: the first pass is ahead
    TilePass<R, kPassVectors, W>(x_MI, I, tile_IC, scale_C, column, columns, y_MO, O, asks, share);
  }
}

template <typename W>
void OneTile(const float* x_MI, int64_t M, int64_t I, const W* tiles_GIC, const float* scale_Q, float* y_MO,
             int64_t O, int64_t g) {
  const W* tile_IC = tiles_GIC + g * I * kTileColumns;
  const float* scale_C = scale_Q ? scale_Q + g * kTileColumns : nullptr;
  int64_t columns = std::min(kTileColumns, O - g * kTileColumns);
  float* y = y_MO + g * kTileColumns;
  alignas(64) float held_MC[kPieceRowsMax * kTileColumns];
  int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  int64_t passes = blocks * kColumnPasses;  // (a single row that takes the whole tile at once: fewer)
  bool in_pieces = std::is_same_v<W, float> && passes >= kPiecesMinPasses && M <= kPieceRowsMax;
  int64_t piece_rows = in_pieces ? kPieceBytes / (kTileColumns * int64_t{sizeof(W)}) : I;
  for (int64_t i = 0; i < I; i += piece_rows) {
    int64_t i_end = std::min(I, i + piece_rows);
    for (int64_t m = 0; m < M; m += kRowBlock) {
      bool spread = in_pieces && !(i == 0 && m == 0);  // the first piece's first block: 4 KiB ahead as ever
      Piece piece{i, i_end, held_MC + m * kTileColumns, spread ? blocks : 0, m / kRowBlock};
      RowBlock<kRowBlock, W>(std::min<int64_t>(kRowBlock, M - m), x_MI + m * I, I, tile_IC, scale_C, columns,
                             y + m * O, O, m == 0 || spread, piece);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The GEMM path: many rows of x (prefill, scoring windows, batched decode), after BLIS's loops. A
// work unit is one tile and a block of up to kGemmBlockRows rows of x. It walks the tile in panels
// of kPanelRows tile rows, and for each panel runs every register block of the unit's rows over
// it: kGemmRows rows x kGemmVectors vectors of columns, the shape each ISA's registers allow (on
// AVX2, BLIS haswell's 6 x 16; the matvec path's 3 x 32 reads twice the weights per FMA). The
// accumulators wait in `held` between panels. A bfloat16 or int8 panel is widened once into
// float32 scratch and then read by every row block, not widened again by each.
//
// Batch invariance: every output column is one chain of fused multiply-adds over i in order from
// zero, the same chain the matvec path runs, the int8 scale applied once at the end as there; so a
// row's result is bit-identical whatever M is, which rows share its block, and which path ran.
//
// Panel rows: 256 on AVX-512 (from L2) and 64 elsewhere (in L1) measure best (benchmarks/gemm_probe.cc,
// 1 thread, M = 128: AVX-512 ~90% of a core's FMA peak, AVX2 ~75%).
#if defined(__AVX512F__)
constexpr int kGemmRows = 6;     // 6 rows x 64 columns: 24 accumulators of 32 zmm; 4 weight loads
constexpr int kGemmVectors = 4;  // and 6 broadcasts per 24 FMAs
constexpr int64_t kPanelRows = 256;       // 64 KiB, from L2
constexpr int64_t kNarrowPanelRows = 64;  // bfloat16 from 8 rows (GemmMinRows), widened into L1
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kGemmRows = 6;     // 6 x 16: 12 accumulators of 16 ymm; 2 weight loads and 6
constexpr int kGemmVectors = 2;  // broadcasts per 12 FMAs
constexpr int64_t kPanelRows = 64;  // 16 KiB, in L1
constexpr int64_t kNarrowPanelRows = 64;
#elif defined(__aarch64__) && defined(__ARM_NEON)
constexpr int kGemmRows = 6;  // 6 x 16: 24 accumulators of 32 q registers
constexpr int kGemmVectors = 4;
constexpr int64_t kPanelRows = 64;
constexpr int64_t kNarrowPanelRows = 64;
#else
constexpr int kGemmRows = 4;  // 4 x 8: 8 accumulators of 16 xmm
constexpr int kGemmVectors = 2;
constexpr int64_t kPanelRows = 64;
constexpr int64_t kNarrowPanelRows = 64;
#endif
constexpr int64_t kGemmColumns = kGemmVectors * kLanes;
constexpr int64_t kGemmBlockRows = 8 * kGemmRows;
static_assert(kTileColumns % kGemmColumns == 0, "passes must cover a tile exactly");

// RunUnits (below) runs a GEMM's units, a tile and a block of rows each, tile-major within bands of
// kBandRows rows of x: a thread's run of consecutive units reads one tile (from L2) for several row
// blocks, and a band's rows of x (384 x 768 floats, 1.1 MiB; 4.5 MiB at 3072 inputs) are read again by
// every tile while still in cache, not fetched from L3 anew for each tile as when a 4096-row scoring
// batch (12 MiB of x) went tile-major over all its rows (gemm_probe, 2 threads, AVX-512, M = 4096:
// 311 -> 336 GFLOP/s fp32, the bf16 dot path 694 -> 956, the int8 dot path 1372 -> 1471).
#ifndef JAX_GPT2_BAND_ROWS  // a probe may build with another to time it
#define JAX_GPT2_BAND_ROWS 384
#endif
constexpr int64_t kBandRows = JAX_GPT2_BAND_ROWS;
constexpr int64_t BandRows(int64_t block_rows) { return std::max(block_rows, kBandRows / block_rows * block_rows); }

// From how many rows of x a matmul of W tiles takes the GEMM path rather than the matvec path
// (OneTile). Since the GEMM asks for its next panel's weights while it works on one
// (NextPanel), it streams a decode step's weights from memory at least as fast as the matvec path.
// One decode step's 49 matmuls, weights cold, both paths in turns (kernel_ab_probe.cc, 2 threads, the
// 2-core Xeon, best ms, matvec -> GEMM): float32 on AVX-512 at 1 row 19.4 -> 17.3, 2 rows 18.2 -> 17.7,
// 4 rows 20.3 -> 18.8, 8 rows 26.3 -> 21.8, 12 rows 28.9 -> 23.4; float32 on the AVX2 build 1: 17.9 ->
// 16.6, 2: 21.5 -> 16.9, 4: 24.0 -> 17.1, 8: 25.3 -> 21.4. Narrow tiles gain once enough rows share
// each panel widened. On AVX2, where widening in registers halves the FMA rate: bfloat16 from 2 rows
// (1: 9.4 -> 10.3, slower; 2: 12.2 -> 11.6; 8: 22.3 -> 16.7), int8 from 4 (3: 8.6 -> 9.7, slower; 4:
// 12.0 -> 10.5; 8: 18.0 -> 14.2). On AVX-512 the matvec path's blocks are already the GEMM's 6 rows x
// 64 columns and widen in registers on ports the FMAs leave idle: bfloat16 from 8 rows (6: 12.1 ->
// 12.9, slower; 8: 14.3 -> 12.7; 16: 20.9 -> 18.2; 32: 34.1 -> 30.4; 128: 113.7 -> 115.6, even), int8
// from 16 (4: 5.4 -> 6.9, 8: 9.6 -> 10.5, 12: 11.8 -> 12.2 and 12.7 -> 12.9, slower; 16: 16.1 -> 15.8 and
// 16.5 -> 16.2; 24: 21.6 -> 19.7; 32: 29.2 -> 26.7; 64: 58.5 -> 57.4; 512: 458.2 -> 432.5), which before
// the GEMM's bands and its one-prefetch asks (2026-12-08) lost at every M (128: 108.4 -> 111.8).
// Before the GEMM asked ahead at all, the matvec path led below 16 rows; NEON and the generic build,
// not measured since, keep 16.
// A probe may build with -DJAX_GPT2_GEMM_MIN_ROWS=N (every dtype) to time both paths at one M; the
// results are bit for bit the same either way (each column sums over i in order on both).
template <typename W>
constexpr int64_t GemmMinRows() {
#if defined(JAX_GPT2_GEMM_MIN_ROWS)
  return JAX_GPT2_GEMM_MIN_ROWS;
#elif defined(__AVX512F__)
  if constexpr (std::is_same_v<W, float>) return 1;
  if constexpr (std::is_same_v<W, uint16_t>) return 8;
  return 16;
#elif defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<W, float>) return 1;
  if constexpr (std::is_same_v<W, uint16_t>) return 2;
  return 4;
#else
  return 16;
#endif
}

// From how many rows the bf16 and int8 dot options take their dot paths (fewer: the exact paths).
constexpr int64_t kDotMinRows = 16;

// `lines` 64-byte lines of memory from `at`: weights to ask for (into L2) before they are read.
struct Ahead {
  const char* at = nullptr;
  int64_t lines = 0;
};

// rows (<= R) rows of x times the columns [column, column + kGemmColumns) of a kc-row panel, x's element
// (r, i) at x[r * row_stride + i * input_stride] (bfloat16 widened as it is read); accumulators from
// held_MC (zero when first) and back to it. The GEMM's register block, which attention reuses with
// strides of its own. It asks for `ahead` (the weights a later pass reads) as it goes, per_row lines
// for each of its first input rows: a prefill's passes need one line a row or less, so the inner
// loop pays a compare and one prefetch, where a counted loop over the lines of each row had cost ~8%
// of the block's FMA rate (6 x 64 over an L1 panel, 1 thread, AVX-512: 172 -> 158 GFLOP/s).
template <int R, bool kAsks = false, typename X>
inline void StridedPass(int64_t rows, const X* x, int64_t row_stride, int64_t input_stride, const float* panel_IC,
                        int64_t kc, int64_t column, float* held_MC, bool first, Ahead ahead = {}) {
  if constexpr (R > 1) {
    if (rows < R)
      return StridedPass<R - 1, kAsks>(rows, x, row_stride, input_stride, panel_IC, kc, column, held_MC, first, ahead);
  }
  const int64_t per_row = (ahead.lines + kc - 1) / kc;
  const int64_t asking_rows = per_row == 0 ? 0 : (ahead.lines + per_row - 1) / per_row;
  VF acc[R][kGemmVectors] = {};
  if (!first) {
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kGemmVectors; ++j) acc[r][j] = Load<VF>(held_MC + r * kTileColumns + column + j * kLanes);
  }
  const float* w_row = panel_IC + column;
#pragma GCC unroll 2
  for (int64_t i = 0; i < kc; ++i, w_row += kTileColumns) {
    if constexpr (kAsks) {  // (attention's passes ask for nothing: no compare in theirs)
      if (i < asking_rows) {
        const char* line = ahead.at + i * per_row * 64;
        __builtin_prefetch(line, 0, 2);
        for (int64_t k = 1; k < per_row; ++k) __builtin_prefetch(line + k * 64, 0, 2);  // decode's few passes
      }
    }
    VF w[kGemmVectors];
#pragma GCC unroll 8
    for (int j = 0; j < kGemmVectors; ++j) w[j] = Load<VF>(w_row + j * kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      VF xi = Splat(WidenOne(x[r * row_stride + i * input_stride]));
#pragma GCC unroll 8
      for (int j = 0; j < kGemmVectors; ++j) acc[r][j] += w[j] * xi;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kGemmVectors; ++j) Store(held_MC + r * kTileColumns + column + j * kLanes, acc[r][j], kLanes);
}

// StridedPass over rows of x_MI (row stride I, from the panel's first input row).
template <int R>
inline void GemmPass(int64_t rows, const float* x_MI, int64_t I, const float* panel_IC, int64_t kc, int64_t column,
                     float* held_MC, bool first, Ahead ahead) {
  StridedPass<R, true>(rows, x_MI, I, 1, panel_IC, kc, column, held_MC, first, ahead);
}

// kc rows of a tile widened to float32, in WidenWords' order (each block of P * kLanes columns
// permuted; GemmFinish puts the columns back).
template <typename W>
void WidenPanel(const W* rows_IC, int64_t kc, float* panel_IC) {
  constexpr int P = kPerWord<W>;
  for (int64_t i = 0; i < kc; ++i) {
#pragma GCC unroll 16
    for (int64_t u = 0; u < kTileColumns / (P * kLanes); ++u) {
      VF w[P];
      WidenWords(rows_IC + i * kTileColumns + u * P * kLanes, w);
      for (int k = 0; k < P; ++k) Store(panel_IC + i * kTileColumns + (u * P + k) * kLanes, w[k], kLanes);
    }
  }
}

// y = held (x the int8 scale), the first `columns` columns of `rows` rows, back in column order.
template <int P>
void GemmFinish(const float* held_MC, int64_t rows, const float* scale_C, int64_t columns, float* y_MO, int64_t O) {
  constexpr int64_t kBlock = P * kLanes;
  if constexpr (P == 1) {  // columns already in order: a copy (or a product) per row, in vectors
    for (int64_t r = 0; r < rows; ++r) {
      const float* held = held_MC + r * kTileColumns;
      float* y = y_MO + r * O;
      if (scale_C == nullptr) {
        std::memcpy(y, held, columns * sizeof(float));
      } else {
        for (int64_t c = 0; c < columns; ++c) y[c] = held[c] * scale_C[c];
      }
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < columns; ++c) {
      int64_t at = c / kBlock * kBlock + c % P * kLanes + c % kBlock / P;
      float value = held_MC[r * kTileColumns + at];
      y_MO[r * O + c] = scale_C ? value * scale_C[c] : value;
    }
}

// The epilogue on `rows` rows of y (stride O) at columns [first, first + columns): + bias, then GELU,
// then the residual (laid out as y) + y. Called on each unit's results as soon as they are stored: a
// GEMM unit's block of up to 48 rows is still in L1; a matvec tile's M rows (decode: a few) in L1 or L2.
void FinishColumns(float* y_MO, int64_t O, int64_t rows, int64_t first, int64_t columns, Epilogue epilogue) {
  if (epilogue.bias_O == nullptr && !epilogue.gelu && epilogue.residual_MO == nullptr) return;
  auto finish = [&](VF y, VF bias, const auto& residual) {
    if (epilogue.bias_O) y += bias;
    if (epilogue.gelu) y = GeluTanh(y);
    return epilogue.residual_MO ? residual() + y : y;
  };
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = first; c < first + columns; c += kLanes) {
      const int64_t count = std::min<int64_t>(kLanes, first + columns - c);
      const float* residual_at = epilogue.residual_MO ? epilogue.residual_MO + r * O + c : nullptr;
      if (count == kLanes) {  // whole vectors straight from memory: no copies through scratch
        const VF bias = epilogue.bias_O ? Load<VF>(epilogue.bias_O + c) : VF{};
        VF y = finish(Load<VF>(y_MO + r * O + c), bias, [&] { return Load<VF>(residual_at); });
        Store(y_MO + r * O + c, y, kLanes);
        continue;
      }
      alignas(64) float value[kLanes] = {}, bias[kLanes] = {}, residual[kLanes] = {};
      std::memcpy(value, y_MO + r * O + c, count * sizeof(float));
      if (epilogue.bias_O) std::memcpy(bias, epilogue.bias_O + c, count * sizeof(float));
      if (epilogue.residual_MO) std::memcpy(residual, residual_at, count * sizeof(float));
      VF y = finish(Load<VF>(value), Load<VF>(bias), [&] { return Load<VF>(residual); });
      Store(y_MO + r * O + c, y, count);
    }
}

// The weights after the panel at (tile g, input row i): tile g's next panel, or after its last panel
// tile g + 1's first (the next unit a thread takes is mostly that one), or none after the last tile.
// A unit asks for them while its passes over the current panel run, a share per pass. Without it a
// prefill (whose weights are in no cache when it starts) waited on memory for every panel of a unit
// that starts a tile: gemm_probe's forward with 12 layers of matrices of their own (`cold`), M = 128,
// AVX-512 on the 2-core Xeon, ran 88-91 ms against 74-77 ms for one matrix repeated; asking ahead,
// 79-84 ms (the model's 128-token prefill, medians in turns, 2-9% sooner). The same asked of the
// matvec path's many-row blocks (bfloat16 and int8 on AVX-512), in a burst before each block, measured
// slower (16 rows: 11.4-11.9 -> 13.3-13.8 ms for int8) and is not done.
template <typename W>
Ahead NextPanel(const W* tiles_GIC, int64_t I, int64_t O, int64_t g, int64_t i, int64_t panel_rows) {
  constexpr int64_t kRowBytes = kTileColumns * sizeof(W);
  assert(g >= 0 && g * kTileColumns < O);
  assert(i > 0 && panel_rows > 0);
  if (i >= I) {
    if ((g + 1) * kTileColumns >= O) return {};
    g += 1, i = 0;
  }
  const W* at = tiles_GIC + (g * I + i) * kTileColumns;
  return {reinterpret_cast<const char*>(at), std::min(panel_rows, I - i) * kRowBytes / 64};
}

// Part `pass` of `passes` equal parts of `next` (the last may be short or empty).
inline Ahead ShareOf(Ahead next, int64_t pass, int64_t passes) {
  assert(passes >= 1);
  assert(pass >= 0 && pass < passes);
  const int64_t share = (next.lines + passes - 1) / passes;
  const int64_t from = std::min(next.lines, pass * share);
  return {next.at + from * 64, std::min(next.lines, from + share) - from};
}

// Rows [m, m + rows) of x times tile g.
template <typename W>
void GemmUnit(const float* x_MI, int64_t m, int64_t rows, int64_t I, const W* tiles_GIC, const float* scale_Q,
              float* y_MO, int64_t O, int64_t g, Epilogue epilogue) {
  constexpr int P = kPerWord<W>;
  constexpr int64_t kBlock = P * kLanes;
  const W* tile_IC = tiles_GIC + g * I * kTileColumns;
  const int64_t columns = std::min(kTileColumns, O - g * kTileColumns);
  alignas(64) float held_MC[kGemmBlockRows * kTileColumns];
  constexpr int64_t kRows = std::is_same_v<W, float> ? kPanelRows : kNarrowPanelRows;
  // Only a band's first row block asks ahead: it reads the tile from memory, and the blocks after it
  // find the tile in L2, where asking again costs ~5% of their FMA rate (prefetches that hit).
  const bool asks = m % BandRows(kGemmBlockRows) == 0;
  alignas(64) float scratch_IC[std::is_same_v<W, float> ? 1 : kRows * kTileColumns];
  for (int64_t i = 0; i < I; i += kRows) {
    const int64_t kc = std::min(kRows, I - i);
    const float* panel_IC;
    if constexpr (std::is_same_v<W, float>) {
      panel_IC = tile_IC + i * kTileColumns;
    } else {
      WidenPanel(tile_IC + i * kTileColumns, kc, scratch_IC);
      panel_IC = scratch_IC;
    }
    const Ahead next = asks ? NextPanel(tiles_GIC, I, O, g, i + kRows, kRows) : Ahead{};
    int64_t column_passes = 0;  // as the loop below counts them (a permuted block may start past `columns`)
    for (int64_t column = 0; column / kBlock * kBlock < columns; column += kGemmColumns) ++column_passes;
    const int64_t passes = (rows + kGemmRows - 1) / kGemmRows * column_passes;
    int64_t pass = 0;
    for (int64_t r = 0; r < rows; r += kGemmRows)
      for (int64_t column = 0; column / kBlock * kBlock < columns; column += kGemmColumns, ++pass)
        GemmPass<kGemmRows>(std::min<int64_t>(kGemmRows, rows - r), x_MI + (m + r) * I + i, I, panel_IC, kc, column,
                            held_MC + r * kTileColumns, i == 0, ShareOf(next, pass, passes));
  }
  GemmFinish<P>(held_MC, rows, scale_Q ? scale_Q + g * kTileColumns : nullptr, columns, y_MO + m * O + g * kTileColumns,
                O);
  FinishColumns(y_MO + m * O, O, rows, g * kTileColumns, columns, epilogue.FromRow(m, O));
}

// unit(g, m, rows) for each tile g of the O columns and each block of up to block_rows rows from m.
template <typename Unit>
void RunUnits(TilePool& pool, int64_t M, int64_t O, int64_t block_rows, const Unit& unit) {
  assert(M > 0);
  assert(O > 0);
  assert(block_rows > 0);
  const int64_t G = (O + kTileColumns - 1) / kTileColumns;
  const int64_t band_rows = BandRows(block_rows);
  const int64_t band_units = G * (band_rows / block_rows);  // in every band but maybe the last
  const int64_t bands = (M + band_rows - 1) / band_rows;
  const int64_t last_rows = M - (bands - 1) * band_rows;
  const int64_t units = (bands - 1) * band_units + G * ((last_rows + block_rows - 1) / block_rows);
  pool.Run(units, [&](int64_t index) {
    const int64_t band = index / band_units, within = index % band_units;
    const int64_t rows = band + 1 < bands ? band_rows : last_rows;
    const int64_t blocks = (rows + block_rows - 1) / block_rows;
    const int64_t g = within / blocks, m = band * band_rows + within % blocks * block_rows;
    unit(g, m, std::min(block_rows, M - m));
  });
}

template <typename W>
void Gemm(const float* x_MI, int64_t M, int64_t I, const W* tiles_GIC, const float* scale_Q, int64_t O, float* y_MO,
          Epilogue epilogue, TilePool& pool) {
  RunUnits(pool, M, O, kGemmBlockRows, [&](int64_t g, int64_t m, int64_t rows) {
    GemmUnit<W>(x_MI, m, rows, I, tiles_GIC, scale_Q, y_MO, O, g, epilogue);
  });
}

// Whether W's matmuls of M rows take the GEMM path (GemmMinRows says from when, and why).
template <typename W>
bool TakesGemm(int64_t M) {
  return M >= GemmMinRows<W>();
}

template <typename W>
void Matmul(const float* x_MI, int64_t M, int64_t I, const W* tiles_GIC, const float* scale_Q, int64_t O,
            float* y_MO, Epilogue epilogue, TilePool& pool) {
  if (TakesGemm<W>(M)) return Gemm<W>(x_MI, M, I, tiles_GIC, scale_Q, O, y_MO, epilogue, pool);
  int64_t G = (O + kTileColumns - 1) / kTileColumns;
  pool.Run(G, [&](int64_t g) {
    OneTile<W>(x_MI, M, I, tiles_GIC, scale_Q, y_MO, O, g);
    FinishColumns(y_MO, O, M, g * kTileColumns, std::min(kTileColumns, O - g * kTileColumns), epilogue);
  });
}

#if defined(__AVX512F__)
// The first `count` lanes of 16 (none for count <= 0).
inline __mmask16 FirstLanes(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}

#endif

// ---------------------------------------------------------------------------------------------
// The bf16 dot path (opt-in, PackedMatmulBf16Dot): bfloat16 tiles times x rounded to bfloat16, by
// AVX512_BF16's vdpbf16ps, which adds two bf16 products into each float32 lane per instruction, so
// twice the flops of a float32 FMA: the paths above widen bf16 weights and multiply in float32, exact
// on the rounded weights but capped at the FMA peak. The price: x loses its low 16 bits (as in
// transformers' bf16 matmuls, oneDNN's vdpbf16ps kernels), and the sums run over pairs of inputs, in
// another order than the exact path's, which still runs below kDotMinRows rows: a row's result
// depends on M, so batch invariance is lost for this option.
//
// vdpbf16ps multiplies the two bf16 halves of each 32-bit lane of one operand by those of the other,
// so inputs go in pairs (2k, 2k + 1), K = ceil(I / 2) of them: x is rounded once per call into
// xpair_MK (low half x[2k], high half x[2k + 1]), and each unit (a tile and up to kDotBlockRows rows,
// as in the GEMM) interleaves its tile a panel at a time into pair_KC (column c of pair row k: w[2k][c]
// low, w[2k + 1][c] high), read by every register block of its rows. An odd I pads its last pair with
// zero on both sides. Columns stay in order: the accumulators need no un-permuting.
#if defined(__AVX512BF16__)
constexpr int kDotRows = 6;     // 6 rows x 64 columns: 24 accumulators of 32 zmm; 4 weight loads
constexpr int kDotVectors = 4;  // and 6 broadcasts per 24 vdpbf16ps
#ifndef JAX_GPT2_DOT_PANEL_PAIRS  // a probe may build with another to time it
#define JAX_GPT2_DOT_PANEL_PAIRS 128
#endif
constexpr int64_t kDotPanelPairs = JAX_GPT2_DOT_PANEL_PAIRS;  // 256 tile rows as 32 KiB of pairs
constexpr int64_t kDotBlockRows = 8 * kDotRows;
constexpr int64_t kRoundRows = 16;  // rows of x per rounding task
static_assert(kDotVectors * 16 == kTileColumns, "a register block spans the whole tile");

inline int64_t Pairs(int64_t I) { return (I + 1) / 2; }

// Rows [first, end) of x_MI as bfloat16 pairs, rounded by vcvtne2ps2bf16 (to nearest even; it also
// reads subnormals as zero), 32 values an instruction: lanes past I load as zero, so an odd I's last
// pair ends in zero, and the store stops at the row's last pair; rows `stride` pairs apart, zero
// from the last pair to the stride.
void RoundRows(const float* x_MI, int64_t first, int64_t end, int64_t I, int64_t stride, uint32_t* xpair_MK) {
  const int64_t K = Pairs(I);
  for (int64_t m = first; m < end; ++m) {
    const float* x = x_MI + m * I;
    std::memset(xpair_MK + m * stride + K, 0, (stride - K) * sizeof(uint32_t));
    uint16_t* halves = reinterpret_cast<uint16_t*>(xpair_MK + m * stride);
    for (int64_t i = 0; i < I; i += 32) {
      __m512 low = _mm512_maskz_loadu_ps(FirstLanes(I - i), x + i);
      __m512 high = _mm512_maskz_loadu_ps(FirstLanes(I - i - 16), x + i + 16);
      __m512bh both = _mm512_cvtne2ps_pbh(high, low);  // the second operand fills the low half
      const int64_t count = std::min<int64_t>(32, 2 * K - i);
      _mm512_mask_storeu_epi16(halves + i, count >= 32 ? ~__mmask32(0) : (__mmask32(1) << count) - 1, (__m512i)both);
    }
  }
}

// Pair rows [k0, k0 + kc) of a tile as pair_KC, in column order: pair_KC[k][c] holds w[2k][c] low and
// w[2k + 1][c] high, 16-bit interleaves of the two rows (vpermt2w, four vectors a pair row); the row
// past an odd I reads as zero.
void PairPanel(const uint16_t* tile_IC, int64_t I, int64_t k0, int64_t kc, uint32_t* pair_KC) {
  static const uint16_t kZeroRow[kTileColumns] = {};
  alignas(64) static const uint16_t kLow[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i low = _mm512_load_si512(kLow);
  const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int64_t k = 0; k < kc; ++k) {
    const uint16_t* even = tile_IC + 2 * (k0 + k) * kTileColumns;
    const uint16_t* odd = 2 * (k0 + k) + 1 < I ? even + kTileColumns : kZeroRow;
    for (int h = 0; h < 2; ++h) {  // columns [32h, 32h + 32)
      const __m512i e = _mm512_loadu_si512(even + 32 * h), o = _mm512_loadu_si512(odd + 32 * h);
      _mm512_storeu_si512(pair_KC + k * kTileColumns + 32 * h, _mm512_permutex2var_epi16(e, low, o));
      _mm512_storeu_si512(pair_KC + k * kTileColumns + 32 * h + 16, _mm512_permutex2var_epi16(e, high, o));
    }
  }
}

// rows (<= R) rows of xpair_MK (row stride K, from the panel's first pair) times a kc-pair panel, all 64
// columns; accumulators from held_MC (zero when first) and back to it.
template <int R>
inline void DotPass(int64_t rows, const uint32_t* xpair_MK, int64_t K, const uint32_t* pair_KC, int64_t kc,
                    float* held_MC, bool first) {
  if constexpr (R > 1) {
    if (rows < R) return DotPass<R - 1>(rows, xpair_MK, K, pair_KC, kc, held_MC, first);
  }
  __m512 acc[R][kDotVectors];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kDotVectors; ++j)
      acc[r][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(held_MC + r * kTileColumns + j * 16);
  const uint32_t* w_row = pair_KC;
  for (int64_t k = 0; k < kc; ++k, w_row += kTileColumns) {
    __m512bh w[kDotVectors];
#pragma GCC unroll 4
    for (int j = 0; j < kDotVectors; ++j) w[j] = (__m512bh)_mm512_loadu_si512(w_row + j * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m512bh xr = (__m512bh)_mm512_set1_epi32(static_cast<int>(xpair_MK[r * K + k]));
#pragma GCC unroll 4
      for (int j = 0; j < kDotVectors; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], w[j], xr);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kDotVectors; ++j) _mm512_storeu_ps(held_MC + r * kTileColumns + j * 16, acc[r][j]);
}

// Rows [m, m + rows) of x (as pairs) times tile g.
void DotUnit(const uint32_t* xpair_MK, int64_t m, int64_t rows, int64_t I, const uint16_t* tiles_GIC, float* y_MO,
             int64_t O, int64_t g, Epilogue epilogue) {
  const int64_t K = Pairs(I);
  const uint16_t* tile_IC = tiles_GIC + g * I * kTileColumns;
  const int64_t columns = std::min(kTileColumns, O - g * kTileColumns);
  alignas(64) float held_MC[kDotBlockRows * kTileColumns];
  alignas(64) uint32_t pair_KC[kDotPanelPairs * kTileColumns];
  for (int64_t k = 0; k < K; k += kDotPanelPairs) {
    const int64_t kc = std::min(kDotPanelPairs, K - k);
    PairPanel(tile_IC, I, k, kc, pair_KC);
    for (int64_t r = 0; r < rows; r += kDotRows)
      DotPass<kDotRows>(std::min<int64_t>(kDotRows, rows - r), xpair_MK + (m + r) * K + k, K, pair_KC, kc,
                        held_MC + r * kTileColumns, k == 0);
  }
  GemmFinish<1>(held_MC, rows, nullptr, columns, y_MO + m * O + g * kTileColumns, O);
  FinishColumns(y_MO + m * O, O, rows, g * kTileColumns, columns, epilogue.FromRow(m, O));
}

// x rounded over the pool, then units tile-major as in Gemm.
void DotGemm(const float* x_MI, int64_t M, int64_t I, const uint16_t* tiles_GIC, int64_t O, float* y_MO,
             Epilogue epilogue, TilePool& pool) {
  const int64_t K = Pairs(I);
  // The calling thread's scratch (Reserve). The workers get the pointer, never the name: in their
  // threads it names their own (empty) buffers.
  thread_local std::vector<uint32_t> xpair;
  uint32_t* xpair_MK = Reserve(xpair, M * K);
  pool.Run((M + kRoundRows - 1) / kRoundRows, [&](int64_t task) {
    RoundRows(x_MI, task * kRoundRows, std::min(M, (task + 1) * kRoundRows), I, K, xpair_MK);
  });
  RunUnits(pool, M, O, kDotBlockRows, [&](int64_t g, int64_t m, int64_t rows) {
    DotUnit(xpair_MK, m, rows, I, tiles_GIC, y_MO, O, g, epilogue);
  });
}

#if JAX_GPT2_AMX
// On CPUs with AMX (Sapphire Rapids and later Xeons) the bf16 dot path runs on the tile unit instead:
// tdpbf16ps multiplies a 16 x 32 bf16 tile of x by a 32 x 16 tile of weights (as 16 pair rows) into a
// 16 x 16 float32 tile, 8192 multiply-adds an instruction, where vdpbf16ps does 32. The same
// rounding of x (RoundRows) and the same pairs (the panel, for the whole tile at once), in the layout
// the tiles read: x as rows of pairs, the panel's pair rows 16 columns at a time. A unit runs blocks
// of 32 rows x 32 columns (four result tiles, two of x, two of weights: the eight tile registers),
// each over every pair, the sums kept in the tiles. Only the order of float32 additions inside the
// tile unit differs from the vector path: both are float64 math on the rounded values to within
// float32 accumulation (core_test.cc).
//
// Linux lends a process the tile registers only when asked (arch_prctl ARCH_REQ_XCOMP_PERM for
// XTILEDATA), and a VM may refuse: AmxUsable() asks once, and where it is refused the vector path runs.
constexpr int64_t kAmxPairs = 16;  // pairs of inputs per tile step (a 64-byte tile row)
constexpr int64_t kAmxRows = 32;   // rows of x per block: two tiles of 16
// Rows of x per unit. Each unit pairs its whole tile first, which costs as much as the tile unit's
// work on ~100 rows: 256 rows a unit ran a gpt2 forward's matmuls at 128 rows 1.5x faster than 48
// (gemm_probe.cc, one thread, 2-core Xeon), and 512 rows ~8% faster than 128 rows a unit.
constexpr int64_t kAmxUnitRows = 256;
static_assert(kAmxUnitRows % kAmxRows == 0, "units end on whole blocks");

bool AmxUsable() {
  static const bool usable = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}

// Every tile 16 rows of 64 bytes (palette 1): results 0-3, x 4-5, weights 6-7.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// Rows [m, m + rows) of x (pairs, row stride K16, readable to a whole block of rows past them) times tile g.
void AmxUnit(const uint32_t* xpair_MK, int64_t K16, int64_t m, int64_t rows, int64_t I, const uint16_t* tiles_GIC,
             float* y_MO, int64_t O, int64_t g, Epilogue epilogue) {
  const uint16_t* tile_IC = tiles_GIC + g * I * kTileColumns;
  const int64_t columns = std::min(kTileColumns, O - g * kTileColumns);
  thread_local std::vector<uint32_t> panel;
  uint32_t* pair_KC = Reserve(panel, K16 * kTileColumns);
  const int64_t K = Pairs(I);
  PairPanel(tile_IC, I, 0, K, pair_KC);
  std::memset(pair_KC + K * kTileColumns, 0, (K16 - K) * kTileColumns * sizeof(uint32_t));  // whole tile steps
  thread_local std::vector<float> held;  // the unit's results: too many rows for a thread's stack
  float* held_MC = Reserve(held, kAmxUnitRows * kTileColumns);
  // Loaded per unit, and released: another library on this thread (oneDNN) may set tiles of its own.
  static const TileConfig config;
  _tile_loadconfig(&config);
  const int64_t x_stride = K16 * sizeof(uint32_t), w_stride = kTileColumns * sizeof(uint32_t);
  for (int64_t r = 0; r < rows; r += kAmxRows) {
    const uint32_t* x0 = xpair_MK + (m + r) * K16;
    const uint32_t* x1 = x0 + 16 * K16;
    for (int64_t c = 0; c < kTileColumns; c += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < K16; k += kAmxPairs) {
        _tile_loadd(4, x0 + k, x_stride);
        _tile_loadd(5, x1 + k, x_stride);
        _tile_loadd(6, pair_KC + k * kTileColumns + c, w_stride);
        _tile_loadd(7, pair_KC + k * kTileColumns + c + 16, w_stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      float* out = held_MC + r * kTileColumns + c;
      _tile_stored(0, out, w_stride);
      _tile_stored(1, out + 16, w_stride);
      _tile_stored(2, out + 16 * kTileColumns, w_stride);
      _tile_stored(3, out + 16 * kTileColumns + 16, w_stride);
    }
  }
  _tile_release();
  GemmFinish<1>(held_MC, rows, nullptr, columns, y_MO + m * O + g * kTileColumns, O);
  FinishColumns(y_MO + m * O, O, rows, g * kTileColumns, columns, epilogue.FromRow(m, O));
}

// x rounded into rows of K16 pairs (zero past K), with a block of zero rows past M for the last
// block's tiles to read, then units tile-major as in Gemm.
void AmxGemm(const float* x_MI, int64_t M, int64_t I, const uint16_t* tiles_GIC, int64_t O, float* y_MO,
             Epilogue epilogue, TilePool& pool) {
  const int64_t K16 = (Pairs(I) + kAmxPairs - 1) / kAmxPairs * kAmxPairs;
  thread_local std::vector<uint32_t> xpair;
  uint32_t* xpair_MK = Reserve(xpair, (M + kAmxRows) * K16);
  std::memset(xpair_MK + M * K16, 0, kAmxRows * K16 * sizeof(uint32_t));
  pool.Run((M + kRoundRows - 1) / kRoundRows, [&](int64_t task) {
    RoundRows(x_MI, task * kRoundRows, std::min(M, (task + 1) * kRoundRows), I, K16, xpair_MK);
  });
  RunUnits(pool, M, O, kAmxUnitRows, [&](int64_t g, int64_t m, int64_t rows) {
    AmxUnit(xpair_MK, K16, m, rows, I, tiles_GIC, y_MO, O, g, epilogue);
  });
}
#endif  // AMX
#endif  // __AVX512BF16__

// ---------------------------------------------------------------------------------------------
// The int8 dot path (opt-in, PackedMatmulInt8Dot): int8 tiles times x quantized to int8, by
// AVX512_VNNI's vpdpbusd, which adds four u8 x s8 products into each int32 lane per instruction: 64
// multiply-adds an instruction against a float32 FMA's 16, at the same rate on the hosts measured
// here. The exact int8 path above widens every weight to float32 and is capped at the FMA peak; this
// is the path llama.cpp's q8_0 takes (int8 activations, integer dot products). The price: x is
// rounded to 8 bits, so it is an option, decided at load, and never the default.
//
// x is quantized symmetrically per row and per block of kQuantInputs inputs (one panel): scale =
// max|x| / 127, q = x * (127 / max|x|) rounded to nearest even, so an outlier costs precision only
// in its own block. vpdpbusd takes one operand unsigned: the weights enter as w + 128 (the sign bit
// flipped while the panel is laid out) and x as signed, so each block's integer sum carries an extra
// 128 * sum(q), subtracted once. A block's sum is exact in int32 and, at most 256 * 127 * 127 < 2^24,
// exact again as a float32; the blocks are then added in order as scale_block * sum, and the weights'
// column scale applied once at the end, as the exact path does.
//
// Inputs go in quads (4k .. 4k + 3): each unit (a tile and up to kQuadBlockRows rows) lays its tile
// out a panel at a time as quad_KC, 64 bytes of four rows per 16 columns, by byte and word unpacks
// within 128-bit lanes, so lane 4L + m of vector j holds column 16L + 4j + m; QuadFinish puts the
// columns back. I pads to whole blocks with zero inputs, whose weights (any) add nothing.
// A row's result depends only on the row itself: batch invariance holds from DotMinRows() rows on,
// and below that the exact path runs, whose results differ from these.
#if defined(__AVX512VNNI__)
constexpr int64_t kQuantInputs = 256;              // inputs per activation scale: one panel
constexpr int64_t kPanelQuads = kQuantInputs / 4;  // 64 quads x 64 columns: a 16 KiB panel in L1
constexpr int kQuadRows = 6;                       // 6 rows x 64 columns: 24 int32 accumulators
constexpr int64_t kQuadBlockRows = 8 * kQuadRows;
constexpr int64_t kQuantRows = 16;  // rows of x per quantizing task
constexpr int64_t kQuantPadRows = 32;  // zero rows past M: a whole block of AMX's tile rows

inline int64_t QuantBlocks(int64_t I) { return (I + kQuantInputs - 1) / kQuantInputs; }

// acc += u8 x s8 in quads. GCC 12 copies the accumulator of the intrinsic twice per instruction
// (int8_vnni_probe.cc), so the instruction is written out.
inline __m512i DotBytes(__m512i acc, __m512i unsigned_bytes, __m512i signed_bytes) {
  asm("vpdpbusd %[s], %[u], %[acc]" : [acc] "+v"(acc) : [u] "v"(unsigned_bytes), [s] "v"(signed_bytes));
  return acc;
}

// Rows [first, end) of x_MI quantized: q_MJ (J = blocks x kQuantInputs bytes a row, zero past I), and
// per (row, block) its scale and 128 x the sum of its q.
void QuantizeRows(const float* x_MI, int64_t first, int64_t end, int64_t I, int8_t* q_MJ, float* scale_MB,
                  int32_t* bias_MB) {
  const int64_t B = QuantBlocks(I), J = B * kQuantInputs;
  for (int64_t m = first; m < end; ++m)
    for (int64_t b = 0; b < B; ++b) {
      const float* x = x_MI + m * I + b * kQuantInputs;
      const int64_t count = std::min(kQuantInputs, I - b * kQuantInputs);
      __m512 high = _mm512_setzero_ps();
      for (int64_t i = 0; i < count; i += 16)
        high = _mm512_max_ps(high, _mm512_abs_ps(_mm512_maskz_loadu_ps(FirstLanes(count - i), x + i)));
      const float max = _mm512_reduce_max_ps(high);
      const __m512 inverse = _mm512_set1_ps(max > 0.0f ? 127.0f / max : 0.0f);
      __m512i sum = _mm512_setzero_si512();
      int8_t* q = q_MJ + m * J + b * kQuantInputs;
      for (int64_t i = 0; i < kQuantInputs; i += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(FirstLanes(count - i), x + i);
        const __m512i rounded = _mm512_cvtps_epi32(_mm512_mul_ps(v, inverse));  // MXCSR: to nearest even
        sum = _mm512_add_epi32(sum, rounded);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtsepi32_epi8(rounded));
      }
      scale_MB[m * B + b] = max / 127.0f;
      bias_MB[m * B + b] = 128 * _mm512_reduce_add_epi32(sum);
    }
}

// Quads [k0, k0 + kc) of a tile as quad_KC (flipped to unsigned); rows past I read as zero.
void QuadPanel(const int8_t* tile_IC, int64_t I, int64_t k0, int64_t kc, __m512i* quad_KC) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < kc; ++k) {
    __m512i rows[4];
    for (int r = 0; r < 4; ++r) {
      const int64_t i = 4 * (k0 + k) + r;
      rows[r] = i < I ? _mm512_loadu_si512(tile_IC + i * kTileColumns) : _mm512_setzero_si512();
      rows[r] = _mm512_xor_si512(rows[r], flip);
    }
    const __m512i a = _mm512_unpacklo_epi8(rows[0], rows[1]), b = _mm512_unpackhi_epi8(rows[0], rows[1]);
    const __m512i c = _mm512_unpacklo_epi8(rows[2], rows[3]), d = _mm512_unpackhi_epi8(rows[2], rows[3]);
    quad_KC[4 * k + 0] = _mm512_unpacklo_epi16(a, c);
    quad_KC[4 * k + 1] = _mm512_unpackhi_epi16(a, c);
    quad_KC[4 * k + 2] = _mm512_unpacklo_epi16(b, d);
    quad_KC[4 * k + 3] = _mm512_unpackhi_epi16(b, d);
  }
}

// A row's exact integer sums over one block (16 columns), less its bias, as float32 times its block
// scale into held: set on the first block, added by one fused multiply-add after (spelled out: left
// to contraction, some instantiations fused and others not). Both int8 dot paths finish every block
// here, so they agree bit for bit.
inline void AddBlock(__m512i sums, int32_t bias, float scale, float* held, bool first) {
  const __m512 sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums, _mm512_set1_epi32(bias)));
  const __m512 scale_16 = _mm512_set1_ps(scale);
  _mm512_storeu_ps(held, first ? _mm512_mul_ps(sum, scale_16) : _mm512_fmadd_ps(sum, scale_16, _mm512_loadu_ps(held)));
}

// rows (<= R) rows of q (row stride J, from the panel's first byte) times a kc-quad panel: each row's
// exact integer sums, less its bias, as float32 times its block scale, added to held_MC (set when first).
template <int R>
inline void QuadPass(int64_t rows, const int8_t* q_MJ, int64_t J, const float* scale_MB, const int32_t* bias_MB,
                     int64_t B, const __m512i* quad_KC, int64_t kc, float* held_MC, bool first) {
  if constexpr (R > 1) {
    if (rows < R) return QuadPass<R - 1>(rows, q_MJ, J, scale_MB, bias_MB, B, quad_KC, kc, held_MC, first);
  }
  __m512i acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512i* w = quad_KC + 4 * k;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t word;
      std::memcpy(&word, q_MJ + r * J + 4 * k, sizeof word);
      const __m512i xr = _mm512_set1_epi32(word);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[r][j] = DotBytes(acc[r][j], w[j], xr);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j)
      AddBlock(acc[r][j], bias_MB[r * B], scale_MB[r * B], held_MC + r * kTileColumns + j * 16, first);
}

// y = held x the int8 column scale, the first `columns` columns of `rows` rows, back in column order.
void QuadFinish(const float* held_MC, int64_t rows, const float* scale_C, int64_t columns, float* y_MO, int64_t O) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < columns; ++c) {
      const int64_t at = c % 16 / 4 * 16 + c / 16 * 4 + c % 4;
      y_MO[r * O + c] = held_MC[r * kTileColumns + at] * scale_C[c];
    }
}

// Rows [m, m + rows) of x (quantized) times tile g.
void QuadUnit(const int8_t* q_MJ, const float* scale_MB, const int32_t* bias_MB, int64_t m, int64_t rows, int64_t I,
              const int8_t* tiles_GIC, const float* scale_Q, float* y_MO, int64_t O, int64_t g, Epilogue epilogue) {
  const int64_t B = QuantBlocks(I), J = B * kQuantInputs;
  const int8_t* tile_IC = tiles_GIC + g * I * kTileColumns;
  const int64_t columns = std::min(kTileColumns, O - g * kTileColumns);
  alignas(64) float held_MC[kQuadBlockRows * kTileColumns];
  alignas(64) __m512i quad_KC[4 * kPanelQuads];
  for (int64_t b = 0; b < B; ++b) {
    const int64_t kc = std::min(kPanelQuads, (I - b * kQuantInputs + 3) / 4);
    QuadPanel(tile_IC, I, b * kPanelQuads, kc, quad_KC);
    for (int64_t r = 0; r < rows; r += kQuadRows)
      QuadPass<kQuadRows>(std::min<int64_t>(kQuadRows, rows - r), q_MJ + (m + r) * J + b * kQuantInputs, J,
                          scale_MB + (m + r) * B + b, bias_MB + (m + r) * B + b, B, quad_KC, kc,
                          held_MC + r * kTileColumns, b == 0);
  }
  QuadFinish(held_MC, rows, scale_Q + g * kTileColumns, columns, y_MO + m * O + g * kTileColumns, O);
  FinishColumns(y_MO + m * O, O, rows, g * kTileColumns, columns, epilogue.FromRow(m, O));
}

#if JAX_GPT2_AMX
// On AMX's tiles (where AmxUsable(), as for bf16): tdpbsud multiplies a 16 x 64 tile of x's signed
// bytes by a 64 x 16 tile of the flipped (unsigned) weights, as 16 rows of quads, into a 16 x 16
// int32 tile: 16384 multiply-adds an instruction. The quantized x and the quad panel are the vector
// path's (the whole tile laid out once per unit of up to kAmxUnitRows rows); a result tile's column
// n of weight vector j is the vector path's lane n of vector j, so the held layout, the integer sums,
// and every float32 operation after them (bias, scale, the block sum, the finish) are the vector
// path's: the results are bit for bit the same.
void AmxQuadUnit(const int8_t* q_MJ, const float* scale_MB, const int32_t* bias_MB, int64_t m, int64_t rows,
                 int64_t I, const int8_t* tiles_GIC, const float* scale_Q, float* y_MO, int64_t O, int64_t g,
                 Epilogue epilogue) {
  const int64_t B = QuantBlocks(I), J = B * kQuantInputs;
  const int8_t* tile_IC = tiles_GIC + g * I * kTileColumns;
  const int64_t columns = std::min(kTileColumns, O - g * kTileColumns);
  thread_local std::vector<char> panel;  // J / 4 quads of four vectors, on a 64-byte boundary
  char* panel_bytes = Reserve(panel, (J + 1) * int64_t(sizeof(__m512i)));
  __m512i* quad_KC = reinterpret_cast<__m512i*>((reinterpret_cast<uintptr_t>(panel_bytes) + 63) / 64 * 64);
  QuadPanel(tile_IC, I, 0, J / 4, quad_KC);
  thread_local std::vector<float> held;
  float* held_MC = Reserve(held, kAmxUnitRows * kTileColumns);
  alignas(64) int32_t sums[4][16 * 16];
  static const TileConfig config;
  _tile_loadconfig(&config);
  for (int64_t r = 0; r < rows; r += kAmxRows) {
    const int8_t* x0 = q_MJ + (m + r) * J;
    const int8_t* x1 = x0 + 16 * J;
    for (int64_t j = 0; j < 4; j += 2) {
      for (int64_t b = 0; b < B; ++b) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t k = b * kPanelQuads; k < (b + 1) * kPanelQuads; k += 16) {
          _tile_loadd(4, x0 + 4 * k, J);
          _tile_loadd(5, x1 + 4 * k, J);
          _tile_loadd(6, quad_KC + 4 * k + j, 4 * sizeof(__m512i));
          _tile_loadd(7, quad_KC + 4 * k + j + 1, 4 * sizeof(__m512i));
          _tile_dpbsud(0, 4, 6);
          _tile_dpbsud(1, 4, 7);
          _tile_dpbsud(2, 5, 6);
          _tile_dpbsud(3, 5, 7);
        }
        _tile_stored(0, sums[0], 64);  // a tile register is named by a constant
        _tile_stored(1, sums[1], 64);
        _tile_stored(2, sums[2], 64);
        _tile_stored(3, sums[3], 64);
        for (int t = 0; t < 4; ++t) {
          const int64_t row0 = r + (t >> 1) * 16, vector = j + (t & 1);
          for (int64_t n = 0; n < 16 && row0 + n < rows; ++n) {
            const int64_t at = (m + row0 + n) * B + b;
            AddBlock(_mm512_load_si512(sums[t] + 16 * n), bias_MB[at], scale_MB[at],
                     held_MC + (row0 + n) * kTileColumns + vector * 16, b == 0);
          }
        }
      }
    }
  }
  _tile_release();
  QuadFinish(held_MC, rows, scale_Q + g * kTileColumns, columns, y_MO + m * O + g * kTileColumns, O);
  FinishColumns(y_MO + m * O, O, rows, g * kTileColumns, columns, epilogue.FromRow(m, O));
}
#endif

// x quantized over the pool, then units tile-major as in Gemm.
void QuadGemm(const float* x_MI, int64_t M, int64_t I, const int8_t* tiles_GIC, const float* scale_Q, int64_t O,
              float* y_MO, Epilogue epilogue, TilePool& pool) {
  const int64_t B = QuantBlocks(I), J = B * kQuantInputs;
  // The calling thread's scratch (Reserve); the workers get the pointers, never the names.
  thread_local std::vector<int8_t> quantized;
  thread_local std::vector<float> scales;
  thread_local std::vector<int32_t> biases;
  int8_t* q_MJ = Reserve(quantized, (M + kQuantPadRows) * J);
  float* scale_MB = Reserve(scales, M * B);
  int32_t* bias_MB = Reserve(biases, M * B);
  pool.Run((M + kQuantRows - 1) / kQuantRows, [&](int64_t task) {
    QuantizeRows(x_MI, task * kQuantRows, std::min(M, (task + 1) * kQuantRows), I, q_MJ, scale_MB, bias_MB);
  });
#if JAX_GPT2_AMX
  if (AmxUsable()) {
    std::memset(q_MJ + M * J, 0, kQuantPadRows * J);  // the last block of tiles reads past M
    return RunUnits(pool, M, O, kAmxUnitRows, [&](int64_t g, int64_t m, int64_t rows) {
      AmxQuadUnit(q_MJ, scale_MB, bias_MB, m, rows, I, tiles_GIC, scale_Q, y_MO, O, g, epilogue);
    });
  }
#endif
  RunUnits(pool, M, O, kQuadBlockRows, [&](int64_t g, int64_t m, int64_t rows) {
    QuadUnit(q_MJ, scale_MB, bias_MB, m, rows, I, tiles_GIC, scale_Q, y_MO, O, g, epilogue);
  });
}
#endif  // __AVX512VNNI__

// ---------------------------------------------------------------------------------------------
// Decode attention.

// Decode attention prefetches its cache rows too: a layer's visible slots are streamed once per
// step, in runs too short for the hardware prefetcher alone (a float32 cache at 990 slots reads
// ~13% faster with it; kernel_ab_probe.cc).
//
// Attention reads a cache row of H values in blocks of kBlock = P * kLanes (one vector of words),
// widened by WidenWords into the permuted column order; the query is permuted to match once per
// (row, head), and the output un-permuted once. The H % kBlock values past the last block go one
// by one, in order.

// q_H in the order WidenWords gives a KV row: block by block, weight k of every word together.
template <typename KV>
inline void PermuteQuery(const float* q_H, int64_t H, float* permuted_H) {
  constexpr int P = kPerWord<KV>;
  int64_t h = 0;
  for (; h + P * kLanes <= H; h += P * kLanes)
    for (int k = 0; k < P; ++k)
      for (int lane = 0; lane < kLanes; ++lane) permuted_H[h + k * kLanes + lane] = q_H[h + lane * P + k];
  for (; h < H; ++h) permuted_H[h] = q_H[h];
}

// acc[j] += q * k over one block of kBlock = P * kLanes values.
template <typename KV>
inline void DotBlock(const float* permuted_q, const KV* k, VF* acc) {
  constexpr int P = kPerWord<KV>;
  VF widened[P];
  WidenWords(k, widened);
  for (int j = 0; j < P; ++j) acc[j] += Load<VF>(permuted_q + j * kLanes) * widened[j];
}

template <typename KV>
inline float Dot(const float* permuted_q_H, const KV* k_H, int64_t H) {
  constexpr int P = kPerWord<KV>;
  constexpr int64_t kBlock = P * kLanes;
  VF even[P] = {}, odd[P] = {};  // two chains, alternate blocks: the adds of one chain wait on each other
  int64_t h = 0;
  for (; h + 2 * kBlock <= H; h += 2 * kBlock) {
    DotBlock(permuted_q_H + h, k_H + h, even);
    DotBlock(permuted_q_H + h + kBlock, k_H + h + kBlock, odd);
  }
  if (h + kBlock <= H) DotBlock(permuted_q_H + h, k_H + h, even), h += kBlock;
  VF total = {};
  for (int j = 0; j < P; ++j) total += even[j] + odd[j];
  float sum = Sum(total);
  for (; h < H; ++h) sum += permuted_q_H[h] * WidenOne(k_H[h]);
  return sum;
}

// out = inverse * sum_s p_s v_s over V vectors' worth of columns of the value rows v_SH (stride H).
template <int V, typename KV>
inline void WeightedSum(const float* p_S, const KV* v_SH, int64_t count, int64_t H, float inverse, float* out) {
  constexpr int P = kPerWord<KV>;
  static_assert(V % P == 0, "whole words");
  VF acc[V] = {};
  for (int64_t s = 0; s < count; ++s) {
    PrefetchAhead(v_SH + s * H, V * kLanes);
    VF p = Splat(p_S[s]), v[V];
#pragma GCC unroll 16
    for (int u = 0; u < V / P; ++u) WidenWords(v_SH + s * H + u * P * kLanes, v + u * P);
#pragma GCC unroll 16
    for (int j = 0; j < V; ++j) acc[j] += p * v[j];
  }
  Unpermute<P>(acc, V, out, V * kLanes, nullptr, inverse);
}

// out_H = softmax(scale * q . k_s over slots s in [first, last]) . v_s, for one (row, head).
template <typename KV>
void AttendOne(const float* q_H, const KV* k_SH, const KV* v_SH, int64_t first, int64_t last, int64_t H,
               float scale, float* out_H) {
  constexpr int P = kPerWord<KV>;
  thread_local std::vector<float> scores, permuted_q;
  int64_t count = last - first + 1;
  int64_t padded = (count + kLanes - 1) / kLanes * kLanes;
  float* score = Reserve(scores, padded);
  PermuteQuery<KV>(q_H, H, Reserve(permuted_q, H));
  float high = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < count; ++s) {
    PrefetchAhead(k_SH + (first + s) * H, H);
    score[s] = Dot(permuted_q.data(), k_SH + (first + s) * H, H) * scale;
    high = std::max(high, score[s]);
  }
  std::fill(score + count, score + padded, -std::numeric_limits<float>::infinity());  // e^-inf = 0
  VF total = {};
  for (int64_t s = 0; s < padded; s += kLanes) {
    VF e = Exp(Load<VF>(score + s) - high);
    Store(score + s, e, kLanes);
    total += e;
  }
  float inverse = 1.0f / Sum(total);
  const KV* v = v_SH + first * H;
  // Vectors of columns of v per sweep over the slots: 64 columns, at most 8 vectors (16 accumulators
  // and 16 values would spill NEON's 32 registers).
  constexpr int kSweep = std::min<int>(kTileColumns / kLanes, 8);
  int64_t h = 0;
  for (; h + kSweep * kLanes <= H; h += kSweep * kLanes) WeightedSum<kSweep>(score, v + h, count, H, inverse, out_H + h);
  for (; h + P * kLanes <= H; h += P * kLanes) WeightedSum<P>(score, v + h, count, H, inverse, out_H + h);
  for (; h < H; ++h) {
    float acc = 0.0f;
    for (int64_t s = 0; s < count; ++s) acc += score[s] * WidenOne(v[s * H + h]);
    out_H[h] = acc * inverse;
  }
}

// AttendOne for a query at `slot` of a row whose first real slot is `start`: it sees slots s < S with
// start <= s <= slot, as XLA's masked path sees them. A query that sees none (a left-pad position,
// a parked row) gets XLA's answer too: all scores equal, the plain mean of all S values.
template <typename KV>
void AttendVisible(const float* q_H, const KV* k_SH, const KV* v_SH, int64_t start, int64_t slot, int64_t S,
                   int64_t H, float scale, float* out_H) {
  const int64_t first = std::max<int64_t>(start, 0), last = std::min<int64_t>(slot, S - 1);
  if (first > last) return AttendOne(q_H, k_SH, v_SH, 0, S - 1, H, 0.0f, out_H);
  AttendOne(q_H, k_SH, v_SH, first, last, H, scale, out_H);
}

template <typename KV>
void Attention(const float* q_BNH, const KV* k_LBNSH, const KV* v_LBNSH, const int32_t* start_B,
               const int32_t* end_B, CacheShape shape, int64_t rows, int64_t layer, float scale, float* out_BNH,
               TilePool& pool) {
  const int64_t B = shape.B, N = shape.N, S = shape.S, H = shape.H;
  assert(rows >= 1 && rows <= B);
  pool.Run(rows * N, [&](int64_t bn) {
    const int64_t b = bn / N;
    const int64_t offset = ((layer * B + b) * N + bn % N) * S * H;
    AttendVisible(q_BNH + bn * H, k_LBNSH + offset, v_LBNSH + offset, start_B[b], end_B[b], S, H, scale,
                  out_BNH + bn * H);
  });
}

// ---------------------------------------------------------------------------------------------
// Attention of many new queries (prefill, scoring and perplexity windows, verify passes).
//
// Query t of row b sits at slot end_B[b] + t and sees slots [start_B[b], end_B[b] + t], clamped to
// [0, S), as the model's mask says; a query that sees none (a left-pad position) gets the plain mean
// of all S values, as in the decode kernel. Fewer than kBlockQueries queries per row go one by one
// through the decode path's AttendOne (a verify pass: the same arithmetic as a decode step). More go
// in units of one (row, head) and up to 64 queries, as two GEMMs on the GEMM path's register block
// (StridedPass), with the softmax between, all in transposed form so that nothing of the cache is
// copied or transposed, only the unit's 64 queries:
//   scores_S64 = k . (scale q)^T: the keys broadcast straight from the cache's rows, q^T (H x 64) the
//            panel (scaled as it is transposed: for a power of two, as gpt2's 1/8, exactly the same);
//   p = e^(score - the query's max) down each column, 0 past the query's own slot (causal);
//   out^T = v^T . p: the values broadcast from the cache's rows (column h of them), p the panel;
// then out = out^T / sum(p), transposed back. The key range of a unit ends at its last query's slot,
// so only the diagonal blocks compute masked scores. No (T, S) array: a unit's scores are its key
// range x 64 floats in thread-local scratch (256 KiB at gpt2's longest window, in L2). Each query's
// numbers depend only on its own range (masked terms add exact zeros, the sums run in slot order),
// never on which unit holds it, so a query's output is the same in a prompt of any length.
constexpr int64_t kBlockQueries = 16;
constexpr int64_t kUnitQueries = kTileColumns;  // a unit's queries: one panel's columns
constexpr int64_t kValuePanelRows = 64;  // 64 x 64 floats of p, 64 rows of v: 32 KiB (32 to 256 timed alike)

// Scratch of one thread, reused by every unit it runs: q^T, scores, out^T.
struct UnitScratch {
  std::vector<float> queries_H64, scores_S64, out_H64;
};

// scores_S64 in place, column by column: e^(score - max) over the first visible_R[r] rows of column r,
// 0 below them; inverse_R[r] = 1 / their sum (a column that sees nothing: all 0, not used).
inline void SoftmaxColumns(float* scores_S64, int64_t reach, const int64_t* visible_R, float* inverse_R) {
  constexpr int kVectors = kTileColumns / kLanes;
  VF visible[kVectors], high[kVectors], total[kVectors];
  for (int j = 0; j < kVectors; ++j) {
    for (int lane = 0; lane < kLanes; ++lane) visible[j][lane] = static_cast<float>(visible_R[j * kLanes + lane]);
    high[j] = Splat(-std::numeric_limits<float>::infinity());
    total[j] = VF{};
  }
  for (int64_t s = 0; s < reach; ++s) {
    const VF slot = Splat(static_cast<float>(s));
    for (int j = 0; j < kVectors; ++j) {
      VF x = Load<VF>(scores_S64 + s * kTileColumns + j * kLanes);
      high[j] = ((slot < visible[j]) & (x > high[j])) ? x : high[j];
    }
  }
  for (int64_t s = 0; s < reach; ++s) {
    const VF slot = Splat(static_cast<float>(s));
    for (int j = 0; j < kVectors; ++j) {
      float* at = scores_S64 + s * kTileColumns + j * kLanes;
      VF e = (VF)((slot < visible[j]) & (VI32)Exp(Load<VF>(at) - high[j]));
      Store(at, e, kLanes);
      total[j] += e;
    }
  }
  for (int j = 0; j < kVectors; ++j) Store(inverse_R + j * kLanes, 1.0f / total[j], kLanes);
}

// The queries [t, t + count) of one (row, head) that see slots [first, first + visible_R[r]):
// out = softmax(scale * q . k) . v, by the two transposed GEMMs above.
template <typename KV>
void AttendQueries(const float* q_TH, int64_t q_stride, float* out_TH, int64_t out_stride, int64_t count,
                   const int64_t* visible_R, const KV* k_SH, const KV* v_SH, int64_t first, int64_t H, float scale,
                   UnitScratch& scratch) {
  const int64_t reach = visible_R[count - 1];  // the last query sees the most
  float* queries_H64 = Reserve(scratch.queries_H64, H * kTileColumns);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t r = 0; r < kTileColumns; ++r)
      queries_H64[h * kTileColumns + r] = r < count ? q_TH[r * q_stride + h] * scale : 0.0f;
  float* scores_S64 = Reserve(scratch.scores_S64, reach * kTileColumns);
  const KV* keys = k_SH + first * H;
  for (int64_t s = 0; s < reach; s += kGemmRows)
    for (int64_t column = 0; column < kTileColumns; column += kGemmColumns)
      StridedPass<kGemmRows>(std::min<int64_t>(kGemmRows, reach - s), keys + s * H, H, 1, queries_H64, H, column,
                             scores_S64 + s * kTileColumns, true);
  alignas(64) float inverse_R[kTileColumns];
  SoftmaxColumns(scores_S64, reach, visible_R, inverse_R);
  float* out_H64 = Reserve(scratch.out_H64, H * kTileColumns);
  const KV* values = v_SH + first * H;
  for (int64_t s = 0; s < reach; s += kValuePanelRows)  // a panel of p and of v read by every h
    for (int64_t h = 0; h < H; h += kGemmRows)
      for (int64_t column = 0; column < kTileColumns; column += kGemmColumns)
        StridedPass<kGemmRows>(std::min<int64_t>(kGemmRows, H - h), values + s * H + h, 1, H,
                               scores_S64 + s * kTileColumns, std::min(kValuePanelRows, reach - s), column,
                               out_H64 + h * kTileColumns, s == 0);
  for (int64_t r = 0; r < count; ++r)
    for (int64_t h = 0; h < H; ++h) out_TH[r * out_stride + h] = out_H64[h * kTileColumns + r] * inverse_R[r];
}

// Queries [t0, t1) (at most kUnitQueries) of row b, head n, over layer `layer` of the cache: those
// that see no slot one by one, the rest together.
template <typename KV>
void AttendUnit(const float* q_BTE, int64_t E, const KV* k_LBNSH, const KV* v_LBNSH, const int32_t* start_B,
                const int32_t* end_B, CacheShape shape, int64_t T, int64_t layer, float scale, int64_t b, int64_t n,
                int64_t t0, int64_t t1, float* out_BTNH) {
  const int64_t N = shape.N, S = shape.S, H = shape.H, out_stride = N * H;
  const int64_t offset = ((layer * shape.B + b) * N + n) * S * H;
  const KV *k_SH = k_LBNSH + offset, *v_SH = v_LBNSH + offset;
  const float* q_TH = q_BTE + b * T * E + n * H;
  float* out_TH = out_BTNH + (b * T * N + n) * H;
  const int64_t first = std::max<int64_t>(start_B[b], 0);
  auto last = [&](int64_t t) { return std::min<int64_t>(end_B[b] + t, S - 1); };
  int64_t t = t0;
  for (; t < t1 && last(t) < first; ++t)  // the prefix that sees nothing (last(t) grows with t)
    AttendVisible(q_TH + t * E, k_SH, v_SH, start_B[b], end_B[b] + t, S, H, scale, out_TH + t * out_stride);
  if (t == t1) return;
  thread_local UnitScratch scratch;
  int64_t visible_R[kUnitQueries] = {};  // 0: a column past the unit's queries sees nothing
  for (int64_t r = 0; r < t1 - t; ++r) visible_R[r] = last(t + r) - first + 1;
  AttendQueries(q_TH + t * E, E, out_TH + t * out_stride, out_stride, t1 - t, visible_R, k_SH, v_SH, first, H, scale,
                scratch);
}

template <typename KV>
void ManyQueryAttention(const float* q_BTE, int64_t E, const KV* k_LBNSH, const KV* v_LBNSH, const int32_t* start_B,
                        const int32_t* end_B, CacheShape shape, int64_t rows, int64_t T, int64_t layer, float scale,
                        float* out_BTNH, TilePool& pool) {
  const int64_t N = shape.N, S = shape.S, H = shape.H;
  assert(rows >= 1 && rows <= shape.B);
  assert(T >= 1);
  if (T < kBlockQueries) {
    pool.Run(rows * N, [&](int64_t bn) {
      const int64_t b = bn / N, n = bn % N;
      const int64_t offset = ((layer * shape.B + b) * N + n) * S * H;
      for (int64_t t = 0; t < T; ++t)
        AttendVisible(q_BTE + (b * T + t) * E + n * H, k_LBNSH + offset, v_LBNSH + offset, start_B[b], end_B[b] + t,
                      S, H, scale, out_BTNH + ((b * T + t) * N + n) * H);
    });
    return;
  }
  // Units head by head (row b, head n), each head's latest block first: a thread's run of units reads
  // one head's keys and values from memory once, with its longest range, and its shorter blocks find
  // them in L2. Every head is the same work, so runs of whole heads balance the threads. (Handing out
  // every head's latest block first, as before, read the keys and values again for each unit: 4 x
  // 1024 tokens, 1 thread, attention_probe: 70-74 -> 63-66 ms.)
  const int64_t blocks = (T + kUnitQueries - 1) / kUnitQueries;
  pool.Run(rows * N * blocks, [&](int64_t unit) {
    const int64_t block = blocks - 1 - unit % blocks, bn = unit / blocks;
    const int64_t t0 = block * kUnitQueries, t1 = std::min(T, t0 + kUnitQueries);
    AttendUnit(q_BTE, E, k_LBNSH, v_LBNSH, start_B, end_B, shape, T, layer, scale, bn / N, bn % N, t0, t1, out_BTNH);
  });
}

// ---------------------------------------------------------------------------------------------
// Log-sum-exp of rows (log-softmax's normalizer: perplexity, prompt logprobs).

constexpr int kLseChains = 4;  // independent accumulators per pass: enough to hide an add's latency
constexpr int64_t kLseBlock = 32 * kLseChains * kLanes;  // values summed apart before joining the total

// The first `count` values at x (count < kLanes) in a vector whose other lanes hold `fill`.
inline VF LoadPart(const float* x, int64_t count, float fill) {
  float lanes[kLanes];
  for (int i = 0; i < kLanes; ++i) lanes[i] = i < count ? x[i] : fill;
  return Load<VF>(lanes);
}

// max over x[0, V); NaN if any value is NaN (the vector max below would drop it).
float RowMax(const float* x, int64_t V) {
  VF high[kLseChains];
  VI32 nan = {};
  for (int c = 0; c < kLseChains; ++c) high[c] = Splat(-INFINITY);
  int64_t v = 0;
  for (; v + kLseChains * kLanes <= V; v += kLseChains * kLanes) {
#pragma GCC unroll 4
    for (int c = 0; c < kLseChains; ++c) {
      const VF x_c = Load<VF>(x + v + c * kLanes);
      nan |= x_c != x_c;
      high[c] = x_c > high[c] ? x_c : high[c];
    }
  }
  for (; v < V; v += kLanes) {
    const VF x_c = v + kLanes <= V ? Load<VF>(x + v) : LoadPart(x + v, V - v, -INFINITY);
    nan |= x_c != x_c;
    high[0] = x_c > high[0] ? x_c : high[0];
  }
  float result = -INFINITY;
  for (int c = 0; c < kLseChains; ++c)
    for (int lane = 0; lane < kLanes; ++lane) result = std::max(result, high[c][lane]);
  for (int lane = 0; lane < kLanes; ++lane)
    if (nan[lane]) return NAN;
  return result;
}

// log(sum_v e^(x[v])) of one row, in one fixed order: max first (from DRAM), then the sum of
// e^(x - max) (the row is then in L2: 200 KB for GPT-2's vocabulary).
float RowLogSumExp(const float* x, int64_t V) {
  const float high = RowMax(x, V);
  if (!std::isfinite(high)) return high;  // NaN, +inf, or a row of -inf (empty: log 0)
  const VF shift = Splat(high);
  // Summed in blocks of kLseBlock values, each block's partial sums added to the total: a lane's
  // float32 sum then grows over tens of terms, not thousands (its rounding error with it).
  VF total = {};
  int64_t v = 0;
  for (; v + kLseBlock <= V; v += kLseBlock) {
    VF sum[kLseChains] = {};
    for (int64_t b = 0; b < kLseBlock; b += kLseChains * kLanes) {
#pragma GCC unroll 4
      for (int c = 0; c < kLseChains; ++c) sum[c] += Exp(Load<VF>(x + v + b + c * kLanes) - shift);
    }
    total += (sum[0] + sum[1]) + (sum[2] + sum[3]);
  }
  VF rest = {};
  for (; v < V; v += kLanes)
    rest += Exp((v + kLanes <= V ? Load<VF>(x + v) : LoadPart(x + v, V - v, -INFINITY)) - shift);
  return high + std::log(Sum(total + rest));
}

inline bool AnyLane(VI32 mask) {
  int32_t lanes[kLanes];
  std::memcpy(lanes, &mask, sizeof lanes);
  int32_t any = 0;
  for (int lane = 0; lane < kLanes; ++lane) any |= lanes[lane];
  return any != 0;
}

// The k largest values of x[0, V) (1 <= k <= V) and their indices, largest first, the lower index
// first among equal values (XLA's top_k order; a row of -inf gives its first k). A group of vectors
// is read value by value only while fewer than k are held or when one of its values beats the k-th
// held: after the first few hundred values of a row of logits, almost never. The row is in L2 (the
// log-sum-exp read it just before), so this third pass costs little.
void RowTop(const float* x, int64_t V, int64_t k, int32_t* ids, float* values) {
  int64_t held = 0;
  auto offer = [&](float value, int64_t id) {
    if (held == k && !(value > values[k - 1])) return;
    int64_t at = held < k ? held++ : k - 1;
    for (; at > 0 && value > values[at - 1]; --at) {
      values[at] = values[at - 1];
      ids[at] = ids[at - 1];
    }
    values[at] = value;
    ids[at] = static_cast<int32_t>(id);
  };
  constexpr int64_t kGroup = kLseChains * kLanes;
  int64_t v = 0;
  for (; v + kGroup <= V; v += kGroup) {
    if (held == k) {
      const VF bar = Splat(values[k - 1]);
      VI32 beats = {};
#pragma GCC unroll 4
      for (int c = 0; c < kLseChains; ++c) beats |= Load<VF>(x + v + c * kLanes) > bar;
      if (!AnyLane(beats)) continue;
    }
    for (int64_t i = v; i < v + kGroup; ++i) offer(x[i], i);
  }
  for (; v < V; ++v) offer(x[v], v);
}

// ---------------------------------------------------------------------------------------------
// The FMA peak probe.

constexpr int kPeakChains = 12;  // independent chains: enough to cover an FMA's latency on two ports

// kPeakChains chains of `steps` dependent FMAs each; the result keeps the compiler from dropping them.
float FmaChains(int64_t steps) {
  VF acc[kPeakChains];
  for (int c = 0; c < kPeakChains; ++c) acc[c] = Splat(0.001f * c);
  const VF scale = Splat(0.999f), add = Splat(0.001f);
  for (int64_t s = 0; s < steps; ++s) {
#pragma GCC unroll 12
    for (int c = 0; c < kPeakChains; ++c) acc[c] = acc[c] * scale + add;
  }
  VF total = {};
  for (int c = 0; c < kPeakChains; ++c) total += acc[c];
  return Sum(total);
}

// How long an idle thread keeps polling before it sleeps (see WaitFor).
constexpr std::chrono::microseconds kSpinWindow{1000};

// The job word's three fields (core.h).
constexpr int kFieldBits = 24;
constexpr uint64_t kFieldMask = (uint64_t{1} << kFieldBits) - 1;
inline uint64_t JobGeneration(uint64_t job) { return job >> (2 * kFieldBits); }
inline int64_t JobCount(uint64_t job) { return static_cast<int64_t>((job >> kFieldBits) & kFieldMask); }
inline int64_t JobNext(uint64_t job) { return static_cast<int64_t>(job & kFieldMask); }
inline uint64_t MakeJob(uint64_t generation, int64_t count, int64_t next) {
  return generation << (2 * kFieldBits) | static_cast<uint64_t>(count) << kFieldBits | static_cast<uint64_t>(next);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// TilePool.

TilePool::TilePool(int threads, int64_t chunks_per_thread) : chunks_per_thread_(chunks_per_thread) {
  assert(threads >= 1);
  assert(chunks_per_thread >= 1);
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

TilePool::~TilePool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
    job_.store(MakeJob(JobGeneration(job_.load()) + 1, 0, 0));
  }
  start_cv_.notify_all();
  for (auto& worker : workers_) worker.join();
}

// Hand out runs of consecutive tiles (a few per thread) rather than single tiles: fewer atomic
// operations. Measured here, 1 to 16 runs per thread made no difference to decode speed.
int64_t TilePool::Chunk(int64_t count) const {
  return std::max<int64_t>(1, count / (chunks_per_thread_ * static_cast<int64_t>(workers_.size() + 1)));
}

void TilePool::Run(int64_t count, const std::function<void(int64_t)>& work) {
  assert(count >= 0);
  assert(static_cast<uint64_t>(count) <= kFieldMask);
  if (workers_.empty() || count <= 1) {
    for (int64_t tile = 0; tile < count; ++tile) work(tile);
    return;
  }
  std::lock_guard<std::mutex> serial(run_mu_);  // one job at a time uses the pool
  // No claim of the previous job is still running (all its tiles are done), so these are free to set;
  // the release store of the job word publishes them to whoever claims from it.
  work_ = &work;
  done_.store(0, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(mu_);  // a worker about to sleep re-checks the word under mu_
    job_.store(MakeJob(JobGeneration(job_.load()) + 1, count, 0), std::memory_order_release);
  }
  start_cv_.notify_all();
  TakeTiles();
  WaitFor([&] { return done_.load(std::memory_order_acquire) == count; }, done_cv_);
}

void TilePool::TakeTiles() {
  uint64_t job = job_.load(std::memory_order_acquire);
  while (true) {
    const int64_t count = JobCount(job), first = JobNext(job);
    if (first >= count) return;
    const int64_t end = std::min(first + Chunk(count), count);
    // On failure `job` is reloaded (another thread claimed, or a new job began) and we try again.
    if (!job_.compare_exchange_weak(job, MakeJob(JobGeneration(job), count, end), std::memory_order_acq_rel,
                                    std::memory_order_acquire))
      continue;
    for (int64_t tile = first; tile < end; ++tile) (*work_)(tile);
    if (done_.fetch_add(end - first, std::memory_order_acq_rel) + (end - first) == count) {
      std::lock_guard<std::mutex> lock(mu_);  // the caller may be asleep on done_cv_
      done_cv_.notify_one();
    }
  }
}

// Waits until ready(): polls it, yielding the core between polls, for up to kSpinWindow, then sleeps
// on cv. Why yield rather than spin on `pause`: when other processes keep every core busy, a woken
// worker is often placed on its caller's core, and a worker spinning there keeps the caller off it
// for the whole spin (measured on this 2-core VM under load: ~57 us lost per call, as long as a
// batch-1 int8 matmul; with yield, ~1 us). On an idle core a yield returns at once. Why so long a
// window: the kernel calls of a decode step come every ~0.1 ms, a new step within a millisecond,
// and a worker asleep costs a futex wake and a VM's wake-up latency every time.
template <typename Ready>
void TilePool::WaitFor(Ready ready, std::condition_variable& cv) {
  auto deadline = std::chrono::steady_clock::now() + kSpinWindow;
  while (!ready()) {
    if (std::chrono::steady_clock::now() > deadline) {
      std::unique_lock<std::mutex> lock(mu_);
      cv.wait(lock, ready);
      return;
    }
    std::this_thread::yield();
  }
}

void TilePool::WorkerLoop() {
  uint64_t seen = 0;  // not the current generation: a Run may already have started before this thread did
  while (true) {
    WaitFor([&] { return JobGeneration(job_.load(std::memory_order_acquire)) != seen; }, start_cv_);
    if (stop_.load()) return;
    seen = JobGeneration(job_.load(std::memory_order_acquire));
    TakeTiles();
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points.

const char* TargetIsa() { return kIsa; }

bool CpuRunsThisBuild() {
#if defined(__x86_64__) || defined(__i386__)
  // Only the extensions that decide which instructions these loops compile to; a library built with
  // -march=native is also keyed by the host's feature macros in its cache name (native.py).
  __builtin_cpu_init();
  bool runs = true;
#if defined(__AVX__)
  runs = runs && __builtin_cpu_supports("avx");
#endif
#if defined(__AVX2__)
  runs = runs && __builtin_cpu_supports("avx2");
#endif
#if defined(__FMA__)
  runs = runs && __builtin_cpu_supports("fma");
#endif
#if defined(__BMI2__)
  runs = runs && __builtin_cpu_supports("bmi2");
#endif
#if defined(__AVX512F__)
  runs = runs && __builtin_cpu_supports("avx512f");
#endif
#if defined(__AVX512BW__)
  runs = runs && __builtin_cpu_supports("avx512bw");
#endif
#if defined(__AVX512VL__)
  runs = runs && __builtin_cpu_supports("avx512vl");
#endif
#if defined(__AVX512DQ__)
  runs = runs && __builtin_cpu_supports("avx512dq");
#endif
#if defined(__AVX512BF16__)
  runs = runs && __builtin_cpu_supports("avx512bf16");
#endif
#if defined(__AVX512VNNI__)
  runs = runs && __builtin_cpu_supports("avx512vnni");
#endif
  return runs;
#else
  return true;  // aarch64: NEON (Advanced SIMD) is part of the base architecture
#endif
}

double MeasureFmaPeak(TilePool& pool, double seconds) {
  assert(seconds > 0);
  assert(seconds < 60);
  constexpr int64_t kTasks = 64, kSteps = 4096;  // ~0.1 ms a task: a slow thread takes fewer
  std::vector<float> sink(kTasks);
  double best = 0.0;
  auto start = std::chrono::steady_clock::now();
  for (int run = 0; run < 3 || std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < seconds;
       ++run) {
    auto begin = std::chrono::steady_clock::now();
    pool.Run(kTasks, [&](int64_t task) { sink[task] = FmaChains(kSteps); });
    double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
    best = std::max(best, 2.0 * kLanes * kPeakChains * kSteps * kTasks / elapsed);
  }
  volatile float keep = sink[0];
  (void)keep;
  assert(best > 0);
  return best;
}

void PackedMatmul(const float* x_MI, int64_t M, int64_t I, const float* tiles_GIC, int64_t O, float* y_MO,
                  TilePool& pool, Epilogue epilogue) {
  Matmul<float>(x_MI, M, I, tiles_GIC, nullptr, O, y_MO, epilogue, pool);
}

void PackedMatmul(const float* x_MI, int64_t M, int64_t I, const uint16_t* tiles_GIC, int64_t O, float* y_MO,
                  TilePool& pool, Epilogue epilogue) {
  Matmul<uint16_t>(x_MI, M, I, tiles_GIC, nullptr, O, y_MO, epilogue, pool);
}

void PackedMatmul(const float* x_MI, int64_t M, int64_t I, const int8_t* tiles_GIC, const float* scale_Q,
                  int64_t O, float* y_MO, TilePool& pool, Epilogue epilogue) {
  Matmul<int8_t>(x_MI, M, I, tiles_GIC, scale_Q, O, y_MO, epilogue, pool);
}

void PackedMatmulBf16Dot(const float* x_MI, int64_t M, int64_t I, const uint16_t* tiles_GIC, int64_t O, float* y_MO,
                         TilePool& pool, Epilogue epilogue) {
#if defined(__AVX512BF16__)
#if JAX_GPT2_AMX
  if (M >= kDotMinRows && AmxUsable()) return AmxGemm(x_MI, M, I, tiles_GIC, O, y_MO, epilogue, pool);
#endif
  if (M >= kDotMinRows) return DotGemm(x_MI, M, I, tiles_GIC, O, y_MO, epilogue, pool);
#endif
  Matmul<uint16_t>(x_MI, M, I, tiles_GIC, nullptr, O, y_MO, epilogue, pool);
}

void PackedMatmulInt8Dot(const float* x_MI, int64_t M, int64_t I, const int8_t* tiles_GIC, const float* scale_Q,
                         int64_t O, float* y_MO, TilePool& pool, Epilogue epilogue) {
#if defined(__AVX512VNNI__)
  if (M >= kDotMinRows) return QuadGemm(x_MI, M, I, tiles_GIC, scale_Q, O, y_MO, epilogue, pool);
#endif
  Matmul<int8_t>(x_MI, M, I, tiles_GIC, scale_Q, O, y_MO, epilogue, pool);
}

bool HasInt8Dot() {
#if defined(__AVX512VNNI__)
  return true;
#else
  return false;
#endif
}

bool HasBf16Dot() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

int64_t DotMinRows() { return kDotMinRows; }

void LogSumExpRows(const float* x_MV, int64_t M, int64_t V, float* lse_M, TilePool& pool, int64_t k,
                   int32_t* top_ids_MK, float* top_values_MK) {
  assert(M >= 1);
  assert(V >= 1);
  assert(0 <= k && k <= V);
  assert(k == 0 || (top_ids_MK != nullptr && top_values_MK != nullptr));
  pool.Run(M, [&](int64_t m) {
    lse_M[m] = RowLogSumExp(x_MV + m * V, V);
    if (k > 0) RowTop(x_MV + m * V, V, k, top_ids_MK + m * k, top_values_MK + m * k);
  });
}

// ---------------------------------------------------------------------------------------------
// Layer norm of rows (before each block's attention and MLP, and before the lm_head). XLA ran it as
// five passes over the whole (M, D) block, one fusion each (the mean, the centering, the sum of
// squares, the rsqrt, the affine map), ~0.6 ms a layer norm for a 512-token gpt2 prompt on the
// 2-core Xeon, 15 ms of a 385 ms prefill; here each row is read three times while it is in L1.
constexpr int64_t kNormRowsPerTask = 8;

// Sum of x[0, D) - shift, in lanes and then across them: one fixed order for a given D.
float RowSumAround(const float* x, int64_t D, float shift, bool squares) {
  VF lanes = {};
  const VF center = Splat(shift);
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    const VF v = Load<VF>(x + d) - center;
    lanes += squares ? v * v : v;
  }
  if (d < D) {
    const VF v = LoadPart(x + d, D - d, shift) - center;  // the fill is exactly zero once centered
    lanes += squares ? v * v : v;
  }
  return Sum(lanes);
}

// The mean is summed around the row's first value: a residual stream's rows sit off zero (mean 30,
// spread 3, say), and summing their raw values in few lanes (SSE2's 4: 192 values ~30 each) lost
// ~5e-6 of the output to rounding; around x[0] the terms are the spread's size.
void LayerNormRow(const float* x, int64_t D, const float* scale, const float* bias, float eps, float* out) {
  const float mean = x[0] + RowSumAround(x, D, x[0], false) / static_cast<float>(D);
  const float variance = RowSumAround(x, D, mean, true) / static_cast<float>(D);  // biased, as torch's
  const VF inverse = Splat(1.0f / std::sqrt(variance + eps)), center = Splat(mean);
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    Store(out + d, (Load<VF>(x + d) - center) * inverse * Load<VF>(scale + d) + Load<VF>(bias + d), kLanes);
  if (d < D) {
    const VF v = (LoadPart(x + d, D - d, 0.0f) - center) * inverse * LoadPart(scale + d, D - d, 0.0f);
    Store(out + d, v + LoadPart(bias + d, D - d, 0.0f), D - d);
  }
}

void LayerNormRows(const float* x_MD, int64_t M, int64_t D, const float* scale_D, const float* bias_D, float eps,
                   float* out_MD, TilePool& pool) {
  assert(M >= 1);
  assert(D >= 1);
  assert(eps > 0);
  pool.Run((M + kNormRowsPerTask - 1) / kNormRowsPerTask, [&](int64_t task) {
    for (int64_t m = task * kNormRowsPerTask; m < std::min(M, (task + 1) * kNormRowsPerTask); ++m)
      LayerNormRow(x_MD + m * D, D, scale_D, bias_D, eps, out_MD + m * D);
  });
}

void DecodeAttention(const float* q_BNH, const float* k_LBNSH, const float* v_LBNSH, const int32_t* start_B,
                     const int32_t* end_B, CacheShape shape, int64_t rows, int64_t layer, float scale,
                     float* out_BNH, TilePool& pool) {
  Attention<float>(q_BNH, k_LBNSH, v_LBNSH, start_B, end_B, shape, rows, layer, scale, out_BNH, pool);
}

void DecodeAttention(const float* q_BNH, const uint16_t* k_LBNSH, const uint16_t* v_LBNSH,
                     const int32_t* start_B, const int32_t* end_B, CacheShape shape, int64_t rows, int64_t layer,
                     float scale, float* out_BNH, TilePool& pool) {
  Attention<uint16_t>(q_BNH, k_LBNSH, v_LBNSH, start_B, end_B, shape, rows, layer, scale, out_BNH, pool);
}

void PrefillAttention(const float* q_BTE, int64_t E, const float* k_LBNSH, const float* v_LBNSH,
                      const int32_t* start_B, const int32_t* end_B, CacheShape shape, int64_t rows, int64_t T,
                      int64_t layer, float scale, float* out_BTNH, TilePool& pool) {
  ManyQueryAttention<float>(q_BTE, E, k_LBNSH, v_LBNSH, start_B, end_B, shape, rows, T, layer, scale, out_BTNH, pool);
}

void PrefillAttention(const float* q_BTE, int64_t E, const uint16_t* k_LBNSH, const uint16_t* v_LBNSH,
                      const int32_t* start_B, const int32_t* end_B, CacheShape shape, int64_t rows, int64_t T,
                      int64_t layer, float scale, float* out_BTNH, TilePool& pool) {
  ManyQueryAttention<uint16_t>(q_BTE, E, k_LBNSH, v_LBNSH, start_B, end_B, shape, rows, T, layer, scale, out_BTNH,
                               pool);
}

}  // namespace jax_gpt2
