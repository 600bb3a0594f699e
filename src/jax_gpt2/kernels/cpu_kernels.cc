// CPU kernels registered with XLA through its FFI (see native.py): a matmul over weights
// re-laid at load time as column tiles (float32, bfloat16, int8), and decode attention that reads
// the KV cache in place.
//
// Packed matmul, y_MO = x_MI @ W:
//
// Why this exists: at batch 1 a matmul only streams its weight from memory, and XLA on CPU
// (jax 0.10.2) reads a bf16 or int8 weight by first writing a converted f32 copy of it, ~20x
// slower than reading f32. These kernels read each weight byte once, convert in registers, and
// split the tiles over a small persistent thread pool (XLA runs one dot at small M on one core).
//
// Layout of a packed weight: tiles_GIC with C = 64 output columns per tile, G = ceil(O / 64)
// tiles, I input rows; tile g holds columns [64g, 64g + 64) (zero past O), so the inner loop
// reads one contiguous stream. int8 weights carry a float32 scale per output column.
// Activations and accumulators are float32 throughout.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTileColumns = 64;  // four 16-float zmm registers
constexpr int kMaxRows = 6;
           // 6 rows x 4 registers = 24 accumulators, under the 32 zmm

// ---------------------------------------------------------------------------------------------
// A persistent pool: tiles are handed out by an atomic counter, so a thread slowed by another
// process on the machine simply takes fewer tiles. Workers spin briefly between calls (the next
// matmul of a decode step follows within microseconds), then sleep.
class TilePool {
 public:
  TilePool(int threads, int64_t chunks_per_thread) : chunks_per_thread_(chunks_per_thread) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
  }
  ~TilePool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      generation_.fetch_add(1);
    }
    start_cv_.notify_all();
    for (auto& worker : workers_) worker.join();
  }

  // Runs work(tile) for every tile in [0, count) across the calling thread and the workers.
  void Run(int64_t count, const std::function<void(int64_t)>& work) {
    if (workers_.empty() || count == 1) {
      for (int64_t tile = 0; tile < count; ++tile) work(tile);
      return;
    }
    std::lock_guard<std::mutex> serial(run_mu_);  // one matmul at a time uses the pool
    work_ = &work;
    count_ = count;
    // Hand out runs of consecutive tiles (a few per thread) rather than single tiles: fewer atomic
    // operations. Measured here, 1 to 16 runs per thread made no difference to decode speed.
    chunk_ = std::max<int64_t>(1, count / (chunks_per_thread_ * static_cast<int64_t>(workers_.size() + 1)));
    next_.store(0);
    active_.store(static_cast<int>(workers_.size()));
    {
      std::lock_guard<std::mutex> lock(mu_);
      generation_.fetch_add(1);
    }
    start_cv_.notify_all();
    TakeTiles();
    WaitFor([this] { return active_.load() == 0; }, done_cv_);
  }

 private:
  void TakeTiles() {
    for (int64_t first = next_.fetch_add(chunk_); first < count_; first = next_.fetch_add(chunk_))
      for (int64_t tile = first; tile < std::min(first + chunk_, count_); ++tile) (*work_)(tile);
  }

  template <typename Ready>
  void WaitFor(Ready ready, std::condition_variable& cv) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
    for (int spins = 0; !ready(); ++spins) {
      _mm_pause();
      if ((spins & 255) == 0 && std::chrono::steady_clock::now() > deadline) {
        std::unique_lock<std::mutex> lock(mu_);
        cv.wait(lock, ready);
        return;
      }
    }
  }

  void WorkerLoop() {
    uint64_t seen = 0;  // not generation_.load(): a Run may already have started before this thread did
    while (true) {
      WaitFor([&] { return generation_.load() != seen; }, start_cv_);
      seen = generation_.load();
      if (stop_) return;
      TakeTiles();
      if (active_.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(mu_);
        done_cv_.notify_one();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_, run_mu_;
  std::condition_variable start_cv_, done_cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> next_{0};
  std::atomic<int> active_{0};
  const std::function<void(int64_t)>* work_ = nullptr;
  int64_t count_ = 0;
  int64_t chunk_ = 1;
  const int64_t chunks_per_thread_;
  bool stop_ = false;
};

int PoolThreads() {
  const char* text = std::getenv("JAX_GPT2_KERNEL_THREADS");
  int threads = text ? std::atoi(text) : static_cast<int>(std::thread::hardware_concurrency());
  return std::max(1, std::min(threads, 64));
}

int64_t PoolChunksPerThread() {
  const char* text = std::getenv("JAX_GPT2_KERNEL_CHUNKS");
  return text ? std::max(1, std::atoi(text)) : 4;
}

TilePool& Pool() {
  static TilePool pool(PoolThreads(), PoolChunksPerThread());
  return pool;
}

// ---------------------------------------------------------------------------------------------
// Loading 16 weights of a tile row as float32.
__attribute__((target("avx512f"))) inline __m512 Load16(const float* w) { return _mm512_loadu_ps(w); }

__attribute__((target("avx512f"))) inline __m512 Load16(const uint16_t* w) {
  // bf16 is the top half of a float32: widen to 32 bits and shift left.
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

__attribute__((target("avx512f"))) inline __m512 Load16(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}

// Rows [0, R) of x times one tile: acc[r][j] collects columns 16j..16j+15 of row r.
template <int R, typename W>
__attribute__((target("avx512f"))) void TileRows(const float* x_RI, int64_t I, const W* tile_IC,
                                                  const float* scale_C, float* y_RO, int64_t O,
                                                  int64_t columns) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < I; ++i) {
    const W* row = tile_IC + i * kTileColumns;
    __m512 w0 = Load16(row), w1 = Load16(row + 16), w2 = Load16(row + 32), w3 = Load16(row + 48);
    for (int r = 0; r < R; ++r) {
      __m512 xi = _mm512_set1_ps(x_RI[r * I + i]);
      acc[r][0] = _mm512_fmadd_ps(w0, xi, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(w1, xi, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(w2, xi, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(w3, xi, acc[r][3]);
    }
  }
  for (int j = 0; j < 4; ++j) {
    int64_t valid = std::max<int64_t>(0, std::min<int64_t>(16, columns - 16 * j));
    if (valid == 0) break;
    __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
    __m512 scale = scale_C ? _mm512_maskz_loadu_ps(mask, scale_C + 16 * j) : _mm512_set1_ps(1.0f);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y_RO + r * O + 16 * j, mask, _mm512_mul_ps(acc[r][j], scale));
  }
}

template <typename W>
void OneTile(const float* x_MI, int64_t M, int64_t I, const W* tiles_GIC, const float* scale_O,
             float* y_MO, int64_t O, int64_t g) {
  const W* tile_IC = tiles_GIC + g * I * kTileColumns;
  const float* scale_C = scale_O ? scale_O + g * kTileColumns : nullptr;
  int64_t columns = std::min(kTileColumns, O - g * kTileColumns);
  float* y = y_MO + g * kTileColumns;
  int64_t m = 0;
  for (; m + kMaxRows <= M; m += kMaxRows) TileRows<kMaxRows>(x_MI + m * I, I, tile_IC, scale_C, y + m * O, O, columns);
  switch (M - m) {
    case 5: TileRows<5>(x_MI + m * I, I, tile_IC, scale_C, y + m * O, O, columns); break;
    case 4: TileRows<4>(x_MI + m * I, I, tile_IC, scale_C, y + m * O, O, columns); break;
    case 3: TileRows<3>(x_MI + m * I, I, tile_IC, scale_C, y + m * O, O, columns); break;
    case 2: TileRows<2>(x_MI + m * I, I, tile_IC, scale_C, y + m * O, O, columns); break;
    case 1: TileRows<1>(x_MI + m * I, I, tile_IC, scale_C, y + m * O, O, columns); break;
    default: break;
  }
}

// Shape checks shared by the three handlers; O comes from the result, since padding hides it.
ffi::Error CheckShapes(ffi::Buffer<ffi::F32>& x, ffi::AnyBuffer& tiles, ffi::ResultBuffer<ffi::F32>& y) {
  auto x_dims = x.dimensions(), t_dims = tiles.dimensions(), y_dims = y->dimensions();
  if (x_dims.size() != 2 || t_dims.size() != 3 || y_dims.size() != 2)
    return ffi::Error::InvalidArgument("packed_matmul: expected x (M, I), tiles (G, I, 64), y (M, O)");
  if (t_dims[2] != kTileColumns || t_dims[1] != x_dims[1] || y_dims[0] != x_dims[0])
    return ffi::Error::InvalidArgument("packed_matmul: tile width, I or M disagree");
  if (y_dims[1] > t_dims[0] * kTileColumns || y_dims[1] <= (t_dims[0] - 1) * kTileColumns)
    return ffi::Error::InvalidArgument("packed_matmul: O does not match the number of tiles");
  return ffi::Error::Success();
}

template <typename W>
ffi::Error Matmul(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer tiles, const float* scale_O, ffi::ResultBuffer<ffi::F32> y) {
  ffi::Error error = CheckShapes(x, tiles, y);
  if (error.failure()) return error;
  int64_t M = x.dimensions()[0], I = x.dimensions()[1], G = tiles.dimensions()[0], O = y->dimensions()[1];
  const float* x_MI = x.typed_data();
  const W* tiles_GIC = reinterpret_cast<const W*>(tiles.untyped_data());
  float* y_MO = y->typed_data();
  Pool().Run(G, [&](int64_t g) { OneTile<W>(x_MI, M, I, tiles_GIC, scale_O, y_MO, O, g); });
  return ffi::Error::Success();
}

ffi::Error MatmulF32(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer tiles, ffi::ResultBuffer<ffi::F32> y) {
  if (tiles.element_type() != ffi::F32) return ffi::Error::InvalidArgument("packed_matmul_f32: tiles must be f32");
  return Matmul<float>(x, tiles, nullptr, y);
}

ffi::Error MatmulBF16(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer tiles, ffi::ResultBuffer<ffi::F32> y) {
  if (tiles.element_type() != ffi::BF16) return ffi::Error::InvalidArgument("packed_matmul_bf16: tiles must be bf16");
  return Matmul<uint16_t>(x, tiles, nullptr, y);
}

ffi::Error MatmulI8(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer tiles, ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  if (tiles.element_type() != ffi::S8) return ffi::Error::InvalidArgument("packed_matmul_i8: tiles must be int8");
  if (scale.element_count() != tiles.dimensions()[0] * kTileColumns)
    return ffi::Error::InvalidArgument("packed_matmul_i8: one scale per padded output column");
  return Matmul<int8_t>(x, tiles, scale.typed_data(), y);
}


// ---------------------------------------------------------------------------------------------
// Decode attention: one new query per row over the filled slots of one layer's cache, read in
// place from the whole k_LBNSH / v_LBNSH buffers (slicing a layer out in XLA copies it).

// e^x for x <= 0 to float32 accuracy: 2^n * 2^f with n = round(x / ln 2), |f| <= 1/2, 2^f by its
// degree-7 Taylor series in f ln 2 (relative error < 1e-8, below float32 rounding).
__attribute__((target("avx512f"))) inline __m512 Exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // e^-104 is below the smallest float32: 0 either way
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));
  const float c[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  __m512 p = _mm512_set1_ps(c[0]);
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f"))) inline float Dot(const float* a, const float* b, int64_t H) {
  __m512 acc = _mm512_setzero_ps();
  int64_t h = 0;
  for (; h + 16 <= H; h += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + h), _mm512_loadu_ps(b + h), acc);
  if (h < H) {
    __mmask16 mask = static_cast<__mmask16>((1u << (H - h)) - 1u);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + h), _mm512_maskz_loadu_ps(mask, b + h), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// out_H = softmax(scale * q . k_s over slots s in [first, last]) . v_s, for one (row, head).
__attribute__((target("avx512f"))) void AttendOne(const float* q_H, const float* k_SH, const float* v_SH,
                                                   int64_t first, int64_t last, int64_t H, float scale,
                                                   float* out_H) {
  thread_local std::vector<float> scores;
  int64_t count = last - first + 1;
  scores.resize(std::max<int64_t>(16, count + 16));
  float* score = scores.data();
  float high = -3.4e38f;
  for (int64_t s = 0; s < count; ++s) {
    score[s] = Dot(q_H, k_SH + (first + s) * H, H) * scale;
    high = std::max(high, score[s]);
  }
  __m512 total = _mm512_setzero_ps();
  for (int64_t s = 0; s < count; s += 16) {
    __mmask16 mask = static_cast<__mmask16>(count - s >= 16 ? 0xFFFFu : (1u << (count - s)) - 1u);
    __m512 e = Exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, score + s), _mm512_set1_ps(high)));
    e = _mm512_maskz_mov_ps(mask, e);
    _mm512_mask_storeu_ps(score + s, mask, e);
    total = _mm512_add_ps(total, e);
  }
  float inverse = 1.0f / _mm512_reduce_add_ps(total);
  for (int64_t h = 0; h < H; h += 16) {
    __mmask16 mask = static_cast<__mmask16>(H - h >= 16 ? 0xFFFFu : (1u << (H - h)) - 1u);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t s = 0; s < count; ++s)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(score[s]), _mm512_maskz_loadu_ps(mask, v_SH + (first + s) * H + h), acc);
    _mm512_mask_storeu_ps(out_H + h, mask, _mm512_mul_ps(acc, _mm512_set1_ps(inverse)));
  }
}

// The cache may hold more rows than q: rows [0, R) are read, the rest are not touched.
ffi::Error DecodeAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                           ffi::Buffer<ffi::S32> start, ffi::Buffer<ffi::S32> end, int64_t layer, float scale,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto q_dims = q.dimensions(), k_dims = k.dimensions();
  auto v_dims = v.dimensions();
  bool same = v_dims.size() == k_dims.size();
  for (size_t i = 0; same && i < k_dims.size(); ++i) same = v_dims[i] == k_dims[i];
  if (q_dims.size() != 3 || k_dims.size() != 5 || !same)
    return ffi::Error::InvalidArgument("decode_attention: expected q (B, N, H) and caches (L, B, N, S, H)");
  int64_t L = k_dims[0], B = k_dims[1], N = k_dims[2], S = k_dims[3], H = k_dims[4];
  int64_t R = q_dims[0];  // the rows in use: the first R of the cache's B (the server's active prefix)
  if (R > B || q_dims[1] != N || q_dims[2] != H || layer < 0 || layer >= L)
    return ffi::Error::InvalidArgument("decode_attention: q, cache or layer disagree");
  if (start.element_count() != R || end.element_count() != R)
    return ffi::Error::InvalidArgument("decode_attention: one start and end slot per row");
  const int32_t* start_B = start.typed_data();
  const int32_t* end_B = end.typed_data();
  const float* k_LBNSH = k.typed_data();
  const float* v_LBNSH = v.typed_data();
  const float* q_BNH = q.typed_data();
  float* out_BNH = out->typed_data();
  Pool().Run(R * N, [&](int64_t bn) {
    int64_t b = bn / N;
    int64_t offset = ((layer * B + b) * N + bn % N) * S * H;
    // Visible: slots s < S with start <= s <= end, as XLA's masked path sees them. A row with none
    // (only a parked, finished row) gets XLA's answer too: all scores equal, a uniform average.
    int64_t first = std::max<int64_t>(start_B[b], 0), last = std::min<int64_t>(end_B[b], S - 1);
    float row_scale = scale;
    if (first > last) first = 0, last = S - 1, row_scale = 0.0f;
    AttendOne(q_BNH + bn * H, k_LBNSH + offset, v_LBNSH + offset, first, last, H, row_scale, out_BNH + bn * H);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxGpt2PackedMatmulF32, MatmulF32,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::AnyBuffer>().Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxGpt2PackedMatmulBF16, MatmulBF16,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::AnyBuffer>().Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxGpt2PackedMatmulI8, MatmulI8,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::AnyBuffer>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxGpt2DecodeAttention, DecodeAttention,
    ffi::Ffi::Bind()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::F32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Arg<ffi::Buffer<ffi::S32>>()
        .Attr<int64_t>("layer")
        .Attr<float>("scale")
        .Ret<ffi::Buffer<ffi::F32>>());

// Called from Python before registering: the kernels need AVX-512F; everywhere else the model
// keeps XLA's dot. This function itself uses no AVX-512 instruction.
extern "C" int jax_gpt2_kernels_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") ? 1 : 0;
}
