// The compute core of the CPU kernels: plain C++ on raw pointers, no XLA header, so it compiles
// and is tested alone (core_test.cc) on every CPU it targets. ffi.cc binds it to XLA.
//
// Packed matmul, y_MO = x_MI @ W, reads W re-laid at load time as column tiles: tiles_GIC with
// C = 64 output columns per tile, G = ceil(O / 64) tiles, I input rows; tile g holds columns
// [64g, 64g + 64), zero past O, so the inner loop reads one contiguous stream. Weights are float32,
// bfloat16 (the top 16 bits of a float32) or int8 with one float32 scale per padded column
// (scale_Q, Q = 64 G). Activations, accumulators and results are float32, except in the opt-in bf16
// dot path (PackedMatmulBf16Dot), which rounds activations to bfloat16, and the opt-in int8 dot path
// (PackedMatmulInt8Dot), which quantizes them to int8.
//
// Decode attention: one new query per (row, head) over the visible slots of one layer of a
// float32 or bfloat16 cache k_LBNSH / v_LBNSH, read in place. Math in float32.
//
// Work is split over a TilePool the caller owns (ffi.cc keeps one per process).

#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace jax_gpt2 {

constexpr int64_t kTileColumns = 64;

// A persistent pool. Run publishes a job as one atomic word (generation, tile count, next tile), and
// every thread, the caller included, claims runs of consecutive tiles from it by compare-and-swap;
// the caller returns once every tile is done. The caller never waits for a worker that has claimed
// nothing: on a machine shared with other processes a worker may be asleep or descheduled for
// milliseconds, while a whole batch-1 int8 matmul takes ~0.1 ms, so waiting for every worker to
// check in (as this pool once did) cost more than the matmul. A thread slowed by another process
// simply takes fewer tiles. Workers spin briefly between calls (the next matmul of a decode step
// follows within microseconds), then sleep. Each tile is computed by one thread in one order, so
// results never depend on how the work was split.
class TilePool {
 public:
  TilePool(int threads, int64_t chunks_per_thread);
  ~TilePool();
  TilePool(const TilePool&) = delete;
  TilePool& operator=(const TilePool&) = delete;

  // Runs work(tile) for every tile in [0, count) across the calling thread and the workers;
  // count < 2^24 (the job word's field).
  void Run(int64_t count, const std::function<void(int64_t)>& work);

 private:
  void TakeTiles();
  int64_t Chunk(int64_t count) const;
  template <typename Ready>
  void WaitFor(Ready ready, std::condition_variable& cv);
  void WorkerLoop();

  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable start_cv_, done_cv_;
  // The published job: generation (bits 48-63) | tile count (24-47) | next unclaimed tile (0-23).
  // A claim is valid only against the word it read, so a worker that wakes late can never claim a
  // tile of a job that has ended: that job's word is gone.
  std::atomic<uint64_t> job_{0};
  std::atomic<int64_t> done_{0};  // tiles finished in the current job
  const std::function<void(int64_t)>* work_ = nullptr;
  const int64_t chunks_per_thread_;
  std::atomic<bool> stop_{false};
};

// The vector unit this build was compiled for: "avx512", "avx2", "neon" or "generic".
const char* TargetIsa();

// Whether the running CPU has every instruction-set extension the compiler was allowed to use.
bool CpuRunsThisBuild();

// What a matmul does to each result before it stores it: y = x @ W, + bias_O (O floats) unless null,
// then GELU's tanh form (GPT-2's "gelu_new") where gelu, then residual_MO + y (an (M, O) matrix laid
// out as y) unless null: a block's two residual adds, in the order the model writes them. Applied to
// each tile's results as they are finished, while still in cache, so the (M, O) result is never
// read again for them.
struct Epilogue {
  const float* bias_O = nullptr;
  bool gelu = false;
  const float* residual_MO = nullptr;

  // The same, for the rows of y from row m on (O columns a row).
  Epilogue FromRow(int64_t m, int64_t O) const { return {bias_O, gelu, residual_MO ? residual_MO + m * O : nullptr}; }
};

// y_MO = x_MI @ W (then the epilogue) for W packed as tiles_GIC (G = ceil(O / 64)); bfloat16 tiles
// are passed as their raw uint16_t bits. scale_Q (int8 only) holds 64 G scales.
void PackedMatmul(const float* x_MI, int64_t M, int64_t I, const float* tiles_GIC, int64_t O, float* y_MO,
                  TilePool& pool, Epilogue epilogue = {});
void PackedMatmul(const float* x_MI, int64_t M, int64_t I, const uint16_t* tiles_GIC, int64_t O, float* y_MO,
                  TilePool& pool, Epilogue epilogue = {});
void PackedMatmul(const float* x_MI, int64_t M, int64_t I, const int8_t* tiles_GIC, const float* scale_Q,
                  int64_t O, float* y_MO, TilePool& pool, Epilogue epilogue = {});

// The bf16 dot option (opt-in; core.cc's "bf16 dot path"): y_MO ~ x_MI @ W for bfloat16 tiles with x
// rounded to bfloat16 (nearest even) and the products summed in pairs by AVX512_BF16's vdpbf16ps,
// where M >= DotMinRows() and this build has the instructions (HasBf16Dot()); otherwise exactly
// PackedMatmul's bfloat16 path. A row's result then depends on M.
void PackedMatmulBf16Dot(const float* x_MI, int64_t M, int64_t I, const uint16_t* tiles_GIC, int64_t O, float* y_MO,
                         TilePool& pool, Epilogue epilogue = {});

// Whether this build was compiled with AVX512_BF16 (so PackedMatmulBf16Dot can take its dot path).
bool HasBf16Dot();

// The int8 dot option (opt-in; core.cc's "int8 dot path"): y_MO ~ x_MI @ W for int8 tiles with x
// quantized to int8 per row and per block of 256 inputs (scale max|x| / 127, nearest even) and the
// products summed exactly in integers by AVX512_VNNI's vpdpbusd, where M >= DotMinRows() and this
// build has the instructions (HasInt8Dot()); otherwise exactly PackedMatmul's int8 path.
void PackedMatmulInt8Dot(const float* x_MI, int64_t M, int64_t I, const int8_t* tiles_GIC, const float* scale_Q,
                         int64_t O, float* y_MO, TilePool& pool, Epilogue epilogue = {});

// Whether this build was compiled with AVX512_VNNI (so PackedMatmulInt8Dot can take its dot path).
bool HasInt8Dot();

// From how many rows of x the dot options (PackedMatmulBf16Dot, PackedMatmulInt8Dot) take their dot
// paths; fewer rows (decode) take the exact paths.
int64_t DotMinRows();

// The host's arithmetic ceiling as this build sees it: floating-point operations per second (2 per
// fused multiply-add lane) of 12 independent chains of vector FMAs per thread, over every thread of
// `pool`, best of the runs that fit in about `seconds`. What the matmuls are judged against.
double MeasureFmaPeak(TilePool& pool, double seconds);

// lse_M[m] = log(sum_v e^(x_MV[m, v])), log-softmax's normalizer, each row by one thread in one
// order (a row's result never depends on M or on the other rows). A row holding a NaN gives NaN,
// one holding +inf gives +inf, a row of -inf gives -inf. With k > 0 (k <= V), also each row's k
// largest values and their indices, largest first, the lower index first among equal values (as
// XLA's top_k orders them; a row holding a NaN: unspecified), into top_ids_MK / top_values_MK.
void LogSumExpRows(const float* x_MV, int64_t M, int64_t V, float* lse_M, TilePool& pool, int64_t k = 0,
                   int32_t* top_ids_MK = nullptr, float* top_values_MK = nullptr);
// out_MD = (x - mean) / sqrt(var + eps) * scale_D + bias_D for each row of D values, var the mean
// square of the centered values (biased, as torch.nn.LayerNorm), in float32; each row by one thread
// in one order, so a row's result never depends on M or on the other rows.
void LayerNormRows(const float* x_MD, int64_t M, int64_t D, const float* scale_D, const float* bias_D, float eps,
                   float* out_MD, TilePool& pool);

struct CacheShape {
  int64_t L, B, N, S, H;
};

// out_BNH = softmax(scale * q . k_s) . v_s over the slots s with start_B[b] <= s <= end_B[b] (clamped
// to [0, S)) of layer `layer`. A row with no visible slot gets what XLA's masked attention gives
// it: every score masked alike, so the plain mean of all S values. bfloat16 caches as raw bits.
// q, start, end and out have `rows` rows (1 <= rows <= shape.B): the first `rows` rows of the cache
// are the batch, the rest are not read (a server runs each step over the prefix of rows in use).
void DecodeAttention(const float* q_BNH, const float* k_LBNSH, const float* v_LBNSH, const int32_t* start_B,
                     const int32_t* end_B, CacheShape shape, int64_t rows, int64_t layer, float scale,
                     float* out_BNH, TilePool& pool);
void DecodeAttention(const float* q_BNH, const uint16_t* k_LBNSH, const uint16_t* v_LBNSH,
                     const int32_t* start_B, const int32_t* end_B, CacheShape shape, int64_t rows, int64_t layer,
                     float scale, float* out_BNH, TilePool& pool);

// out_BTNH = attention of T new queries per row over layer `layer` of the cache, which already holds
// their keys and values: query t of row b at slot end_B[b] + t sees slots [start_B[b], end_B[b] + t]
// (clamped to [0, S)); one that sees none gets the plain mean of all S values, as DecodeAttention.
// The queries are the first N * H values of each of the rows x T rows of q_BTE, E >= N * H values
// apart (E = N * H for queries alone, 3 N H when they are read straight out of the fused qkv
// projection); out (rows, T, N, H). The first `rows` rows of the cache are the batch. Math in float32.
void PrefillAttention(const float* q_BTE, int64_t E, const float* k_LBNSH, const float* v_LBNSH,
                      const int32_t* start_B, const int32_t* end_B, CacheShape shape, int64_t rows, int64_t T,
                      int64_t layer, float scale, float* out_BTNH, TilePool& pool);
void PrefillAttention(const float* q_BTE, int64_t E, const uint16_t* k_LBNSH, const uint16_t* v_LBNSH,
                      const int32_t* start_B, const int32_t* end_B, CacheShape shape, int64_t rows, int64_t T,
                      int64_t layer, float scale, float* out_BTNH, TilePool& pool);

}  // namespace jax_gpt2
