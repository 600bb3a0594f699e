// The XLA FFI glue of the CPU kernels (registered from native.py): checks each call's shapes and
// dtypes, then runs the compute core (core.h) on the buffers' raw pointers over one process-wide
// thread pool. Nothing here computes.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <thread>

#include "core.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jax_gpt2::kTileColumns;

namespace {

int PoolThreads() {
  const char* text = std::getenv("JAX_GPT2_KERNEL_THREADS");
  int threads = text ? std::atoi(text) : static_cast<int>(std::thread::hardware_concurrency());
  return std::max(1, std::min(threads, 64));
}

int64_t PoolChunksPerThread() {
  const char* text = std::getenv("JAX_GPT2_KERNEL_CHUNKS");
  return text ? std::max(1, std::atoi(text)) : 4;
}

// One pool for every kernel call of the process, started on the first call; its size is read once.
jax_gpt2::TilePool& Pool() {
  static jax_gpt2::TilePool pool(PoolThreads(), PoolChunksPerThread());
  return pool;
}

// ---------------------------------------------------------------------------------------------
// Packed matmul: x (M, I) float32, tiles (G, I, 64), [scale (G, 64) float32], bias (O,) or (0,) for
// none, residual (M, O) or (0,) for none, float32; attribute gelu (bool: GELU's tanh form after the
// bias); y (M, O) float32 (= residual + gelu(x @ W + bias)).

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

// The epilogue core.h's matmuls apply: the bias if one came (O floats, else none), GELU if asked, and
// the residual if one came (y's shape, else none).
ffi::Error EpilogueOf(ffi::Buffer<ffi::F32>& bias, bool gelu, ffi::Buffer<ffi::F32>& residual,
                      ffi::ResultBuffer<ffi::F32>& y, jax_gpt2::Epilogue* epilogue) {
  if (bias.element_count() != 0 && bias.element_count() != y->dimensions()[1])
    return ffi::Error::InvalidArgument("packed_matmul: the bias has O values, or none");
  auto r_dims = residual.dimensions(), y_dims = y->dimensions();
  const bool same_shape = r_dims.size() == 2 && r_dims[0] == y_dims[0] && r_dims[1] == y_dims[1];
  if (residual.element_count() != 0 && !same_shape)
    return ffi::Error::InvalidArgument("packed_matmul: the residual has y's shape (M, O), or no values");
  *epilogue = {bias.element_count() ? bias.typed_data() : nullptr, gelu,
               residual.element_count() ? residual.typed_data() : nullptr};
  return ffi::Error::Success();
}

ffi::Error MatmulF32(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer tiles, ffi::Buffer<ffi::F32> bias,
                     ffi::Buffer<ffi::F32> residual, bool gelu, ffi::ResultBuffer<ffi::F32> y) {
  if (tiles.element_type() != ffi::F32) return ffi::Error::InvalidArgument("packed_matmul_f32: tiles must be f32");
  ffi::Error error = CheckShapes(x, tiles, y);
  if (error.failure()) return error;
  jax_gpt2::Epilogue epilogue;
  error = EpilogueOf(bias, gelu, residual, y, &epilogue);
  if (error.failure()) return error;
  jax_gpt2::PackedMatmul(x.typed_data(), x.dimensions()[0], x.dimensions()[1],
                         reinterpret_cast<const float*>(tiles.untyped_data()), y->dimensions()[1], y->typed_data(),
                         Pool(), epilogue);
  return ffi::Error::Success();
}

ffi::Error MatmulBF16(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer tiles, ffi::Buffer<ffi::F32> bias,
                      ffi::Buffer<ffi::F32> residual, bool gelu, ffi::ResultBuffer<ffi::F32> y) {
  if (tiles.element_type() != ffi::BF16) return ffi::Error::InvalidArgument("packed_matmul_bf16: tiles must be bf16");
  ffi::Error error = CheckShapes(x, tiles, y);
  if (error.failure()) return error;
  jax_gpt2::Epilogue epilogue;
  error = EpilogueOf(bias, gelu, residual, y, &epilogue);
  if (error.failure()) return error;
  jax_gpt2::PackedMatmul(x.typed_data(), x.dimensions()[0], x.dimensions()[1],
                         reinterpret_cast<const uint16_t*>(tiles.untyped_data()), y->dimensions()[1],
                         y->typed_data(), Pool(), epilogue);
  return ffi::Error::Success();
}

// The bf16 dot option (core.h: PackedMatmulBf16Dot): bfloat16 tiles, x rounded to bf16 where M is large.
ffi::Error MatmulBF16Dot(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer tiles, ffi::Buffer<ffi::F32> bias,
                         ffi::Buffer<ffi::F32> residual, bool gelu, ffi::ResultBuffer<ffi::F32> y) {
  if (tiles.element_type() != ffi::BF16)
    return ffi::Error::InvalidArgument("packed_matmul_bf16_dot: tiles must be bf16");
  ffi::Error error = CheckShapes(x, tiles, y);
  if (error.failure()) return error;
  jax_gpt2::Epilogue epilogue;
  error = EpilogueOf(bias, gelu, residual, y, &epilogue);
  if (error.failure()) return error;
  jax_gpt2::PackedMatmulBf16Dot(x.typed_data(), x.dimensions()[0], x.dimensions()[1],
                                reinterpret_cast<const uint16_t*>(tiles.untyped_data()), y->dimensions()[1],
                                y->typed_data(), Pool(), epilogue);
  return ffi::Error::Success();
}

// int8 tiles and their column scales, multiplied by `core`: the exact path or the int8 dot option.
using Int8Core = void (*)(const float*, int64_t, int64_t, const int8_t*, const float*, int64_t, float*,
                          jax_gpt2::TilePool&, jax_gpt2::Epilogue);

ffi::Error MatmulInt8By(Int8Core core, const std::string& name, ffi::Buffer<ffi::F32>& x, ffi::AnyBuffer& tiles,
                        ffi::Buffer<ffi::F32>& scale, ffi::Buffer<ffi::F32>& bias, ffi::Buffer<ffi::F32>& residual,
                        bool gelu, ffi::ResultBuffer<ffi::F32>& y) {
  if (tiles.element_type() != ffi::S8) return ffi::Error::InvalidArgument(name + ": tiles must be int8");
  ffi::Error error = CheckShapes(x, tiles, y);
  if (error.failure()) return error;
  jax_gpt2::Epilogue epilogue;
  error = EpilogueOf(bias, gelu, residual, y, &epilogue);
  if (error.failure()) return error;
  if (scale.element_count() != tiles.dimensions()[0] * kTileColumns)
    return ffi::Error::InvalidArgument(name + ": one scale per padded output column");
  core(x.typed_data(), x.dimensions()[0], x.dimensions()[1], reinterpret_cast<const int8_t*>(tiles.untyped_data()),
       scale.typed_data(), y->dimensions()[1], y->typed_data(), Pool(), epilogue);
  return ffi::Error::Success();
}

ffi::Error MatmulI8(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer tiles, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> residual, bool gelu,
                    ffi::ResultBuffer<ffi::F32> y) {
  Int8Core exact = jax_gpt2::PackedMatmul;  // the int8 overload
  return MatmulInt8By(exact, "packed_matmul_i8", x, tiles, scale, bias, residual, gelu, y);
}

// The int8 dot option (core.h: PackedMatmulInt8Dot): int8 tiles, x quantized to int8 where M is large.
ffi::Error MatmulI8Dot(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer tiles, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> residual, bool gelu,
                       ffi::ResultBuffer<ffi::F32> y) {
  const Int8Core dot = jax_gpt2::PackedMatmulInt8Dot;
  return MatmulInt8By(dot, "packed_matmul_i8_dot", x, tiles, scale, bias, residual, gelu, y);
}

// ---------------------------------------------------------------------------------------------
// Decode attention: q (R, N, H) float32, caches (L, B, N, S, H) float32 or bfloat16 with R <= B (the
// first R rows are the batch), start and end (R,) int32, attributes layer and scale; out (R, N, H).

// Whether k and v are alike (L, B, N, S, H) caches; if so, their shape.
template <ffi::DataType Cache>
bool CacheShapeOf(ffi::Buffer<Cache>& k, ffi::Buffer<Cache>& v, jax_gpt2::CacheShape* shape) {
  auto k_dims = k.dimensions(), v_dims = v.dimensions();
  if (k_dims.size() != 5 || v_dims.size() != 5) return false;
  for (size_t i = 0; i < 5; ++i)
    if (v_dims[i] != k_dims[i]) return false;
  *shape = {k_dims[0], k_dims[1], k_dims[2], k_dims[3], k_dims[4]};
  return true;
}

template <ffi::DataType Cache>
ffi::Error CheckAttentionShapes(ffi::Buffer<ffi::F32>& q, ffi::Buffer<Cache>& k, ffi::Buffer<Cache>& v,
                                ffi::Buffer<ffi::S32>& start, ffi::Buffer<ffi::S32>& end, int64_t layer,
                                jax_gpt2::CacheShape* shape) {
  auto q_dims = q.dimensions();
  if (q_dims.size() != 3 || !CacheShapeOf(k, v, shape))
    return ffi::Error::InvalidArgument("decode_attention: expected q (B, N, H) and caches (L, B, N, S, H)");
  if (q_dims[0] < 1 || q_dims[0] > shape->B || q_dims[1] != shape->N || q_dims[2] != shape->H || layer < 0 || layer >= shape->L)
    return ffi::Error::InvalidArgument("decode_attention: q, cache or layer disagree");
  if (start.element_count() != q_dims[0] || end.element_count() != q_dims[0])
    return ffi::Error::InvalidArgument("decode_attention: one start and end slot per row");
  return ffi::Error::Success();
}

// A float32 cache or a bfloat16 one as its bits (U16; kvcache.py says why): DecodeAttention has an
// overload for each.
template <ffi::DataType Cache>
ffi::Error DecodeAttentionOf(ffi::Buffer<ffi::F32> q, ffi::Buffer<Cache> k, ffi::Buffer<Cache> v,
                             ffi::Buffer<ffi::S32> start, ffi::Buffer<ffi::S32> end, int64_t layer, float scale,
                             ffi::ResultBuffer<ffi::F32> out) {
  jax_gpt2::CacheShape shape;
  ffi::Error error = CheckAttentionShapes(q, k, v, start, end, layer, &shape);
  if (error.failure()) return error;
  jax_gpt2::DecodeAttention(q.typed_data(), k.typed_data(), v.typed_data(), start.typed_data(), end.typed_data(),
                            shape, q.dimensions()[0], layer, scale, out->typed_data(), Pool());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Prefill attention: q (R, T, E) float32, the queries its first N * H columns (E = N * H, or 3 N H: the
// fused qkv projection itself), caches (L, B, N, S, H) float32 or bfloat16 with R <= B, start and end
// (R,) int32 (end: the slot of each row's first new query), attributes layer and scale; out (R, T, N, H).

template <ffi::DataType Cache>
ffi::Error CheckPrefillShapes(ffi::Buffer<ffi::F32>& q, ffi::Buffer<Cache>& k, ffi::Buffer<Cache>& v,
                              ffi::Buffer<ffi::S32>& start, ffi::Buffer<ffi::S32>& end, int64_t layer,
                              ffi::ResultBuffer<ffi::F32>& out, jax_gpt2::CacheShape* shape) {
  auto q_dims = q.dimensions(), out_dims = out->dimensions();
  if (q_dims.size() != 3 || out_dims.size() != 4 || !CacheShapeOf(k, v, shape))
    return ffi::Error::InvalidArgument("prefill_attention: expected q (B, T, E), caches (L, B, N, S, H), out (B, T, N, H)");
  if (q_dims[0] < 1 || q_dims[0] > shape->B || q_dims[1] < 1 || q_dims[2] < shape->N * shape->H || layer < 0 ||
      layer >= shape->L)
    return ffi::Error::InvalidArgument("prefill_attention: q, cache or layer disagree");
  if (out_dims[0] != q_dims[0] || out_dims[1] != q_dims[1] || out_dims[2] != shape->N || out_dims[3] != shape->H)
    return ffi::Error::InvalidArgument("prefill_attention: out is not (B, T, N, H)");
  if (start.element_count() != q_dims[0] || end.element_count() != q_dims[0])
    return ffi::Error::InvalidArgument("prefill_attention: one start and end slot per row");
  return ffi::Error::Success();
}

// A float32 cache or a bfloat16 one as its bits (U16): PrefillAttention has an overload for each.
template <ffi::DataType Cache>
ffi::Error PrefillAttentionOf(ffi::Buffer<ffi::F32> q, ffi::Buffer<Cache> k, ffi::Buffer<Cache> v,
                              ffi::Buffer<ffi::S32> start, ffi::Buffer<ffi::S32> end, int64_t layer, float scale,
                              ffi::ResultBuffer<ffi::F32> out) {
  jax_gpt2::CacheShape shape;
  ffi::Error error = CheckPrefillShapes(q, k, v, start, end, layer, out, &shape);
  if (error.failure()) return error;
  jax_gpt2::PrefillAttention(q.typed_data(), q.dimensions()[2], k.typed_data(), v.typed_data(), start.typed_data(),
                             end.typed_data(), shape, q.dimensions()[0], q.dimensions()[1], layer, scale,
                             out->typed_data(), Pool());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Log-sum-exp of rows: x (M, V) float32; lse (M,) float32.

ffi::Error LogSumExpRowsOf(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> lse) {
  auto x_dims = x.dimensions(), lse_dims = lse->dimensions();
  if (x_dims.size() != 2 || lse_dims.size() != 1 || lse_dims[0] != x_dims[0])
    return ffi::Error::InvalidArgument("logsumexp_rows: expected x (M, V) and lse (M,)");
  if (x_dims[0] < 1 || x_dims[1] < 1) return ffi::Error::InvalidArgument("logsumexp_rows: x has no values");
  jax_gpt2::LogSumExpRows(x.typed_data(), x_dims[0], x_dims[1], lse->typed_data(), Pool());
  return ffi::Error::Success();
}

// The same and each row's k largest values: x (M, V) float32; lse (M,) float32, top ids (M, k) int32
// and top values (M, k) float32, 1 <= k <= V.
ffi::Error LogSumExpTopRowsOf(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> lse,
                              ffi::ResultBuffer<ffi::S32> top_ids, ffi::ResultBuffer<ffi::F32> top_values) {
  auto x_dims = x.dimensions(), lse_dims = lse->dimensions(), ids_dims = top_ids->dimensions();
  auto values_dims = top_values->dimensions();
  if (x_dims.size() != 2 || lse_dims.size() != 1 || lse_dims[0] != x_dims[0] || ids_dims.size() != 2 ||
      ids_dims[0] != x_dims[0] || values_dims.size() != 2 || values_dims[0] != ids_dims[0] ||
      values_dims[1] != ids_dims[1])
    return ffi::Error::InvalidArgument("logsumexp_top_rows: expected x (M, V), lse (M,), top ids and values (M, k)");
  if (x_dims[0] < 1 || ids_dims[1] < 1 || ids_dims[1] > x_dims[1])
    return ffi::Error::InvalidArgument("logsumexp_top_rows: need M >= 1 and 1 <= k <= V");
  jax_gpt2::LogSumExpRows(x.typed_data(), x_dims[0], x_dims[1], lse->typed_data(), Pool(), ids_dims[1],
                          top_ids->typed_data(), top_values->typed_data());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Layer norm of rows: x (M, D), scale (D,), bias (D,) float32; attribute eps (float32 > 0); out (M, D).

ffi::Error LayerNormRowsOf(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias, float eps,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto x_dims = x.dimensions(), out_dims = out->dimensions();
  if (x_dims.size() != 2 || out_dims.size() != 2 || out_dims[0] != x_dims[0] || out_dims[1] != x_dims[1])
    return ffi::Error::InvalidArgument("layer_norm_rows: expected x and out (M, D)");
  if (scale.dimensions().size() != 1 || bias.dimensions().size() != 1 || scale.dimensions()[0] != x_dims[1] ||
      bias.dimensions()[0] != x_dims[1])
    return ffi::Error::InvalidArgument("layer_norm_rows: expected scale and bias (D,)");
  if (x_dims[0] < 1 || x_dims[1] < 1) return ffi::Error::InvalidArgument("layer_norm_rows: x has no values");
  if (!(eps > 0)) return ffi::Error::InvalidArgument("layer_norm_rows: eps must be positive");
  jax_gpt2::LayerNormRows(x.typed_data(), x_dims[0], x_dims[1], scale.typed_data(), bias.typed_data(), eps,
                          out->typed_data(), Pool());
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Host masks: structured output's grammar masks, asked of the host between one decode step's pick and
// the next step's logits. table (1,) int32 (which of the host's mask writers), token (W,) int32 (each
// row's last pick), picks (W,) int32 (how many tokens the row has picked: the last is number picks);
// allowed (W, K) int32, every bit set (every token allowed) unless the writer narrows a row. The
// writer is Python (a grammar engine's matchers), reached through a function pointer the host sets
// once per library: a plain C call from XLA's thread, not a JAX host callback, so the program stays
// asynchronous and cacheable. A call is a function of its arguments (the writer feeds a grammar
// token number `picks` once, however often it is asked), so XLA may treat it as pure.

using MaskHook = int (*)(int64_t table, int64_t width, const int32_t* token, const int32_t* picks, int32_t* allowed,
                         int64_t words);
std::atomic<MaskHook> mask_hook{nullptr};

ffi::Error HostMasksOf(ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> token, ffi::Buffer<ffi::S32> picks,
                       ffi::ResultBuffer<ffi::S32> allowed) {
  auto token_dims = token.dimensions(), allowed_dims = allowed->dimensions();
  if (table.element_count() != 1 || token_dims.size() != 1 || picks.element_count() != token.element_count() ||
      allowed_dims.size() != 2 || allowed_dims[0] != token_dims[0] || allowed_dims[1] < 1)
    return ffi::Error::InvalidArgument("host_masks: expected table (1,), token and picks (W,), allowed (W, K)");
  MaskHook hook = mask_hook.load();
  if (hook == nullptr) return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "host_masks: no mask writer was set");
  std::fill_n(allowed->typed_data(), allowed->element_count(), -1);
  if (hook(table.typed_data()[0], token_dims[0], token.typed_data(), picks.typed_data(), allowed->typed_data(),
           allowed_dims[1]) != 0)
    return ffi::Error(ffi::ErrorCode::kInternal, "host_masks: the mask writer failed (its error is in the log)");
  return ffi::Error::Success();
}

}  // namespace

// x, tiles, bias, residual; gelu.
#define JAX_GPT2_MATMUL_BINDING                                                                   \
  ffi::Ffi::Bind()                                                                                \
      .Arg<ffi::Buffer<ffi::F32>>()                                                               \
      .Arg<ffi::AnyBuffer>()                                                                      \
      .Arg<ffi::Buffer<ffi::F32>>()                                                               \
      .Arg<ffi::Buffer<ffi::F32>>()                                                               \
      .Attr<bool>("gelu")                                                                         \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxGpt2PackedMatmulF32, MatmulF32, JAX_GPT2_MATMUL_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxGpt2PackedMatmulBF16, MatmulBF16, JAX_GPT2_MATMUL_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxGpt2PackedMatmulBF16Dot, MatmulBF16Dot, JAX_GPT2_MATMUL_BINDING);

// x, tiles, scale, bias, residual; gelu.
#define JAX_GPT2_SCALED_MATMUL_BINDING                                                            \
  ffi::Ffi::Bind()                                                                                \
      .Arg<ffi::Buffer<ffi::F32>>()                                                               \
      .Arg<ffi::AnyBuffer>()                                                                      \
      .Arg<ffi::Buffer<ffi::F32>>()                                                               \
      .Arg<ffi::Buffer<ffi::F32>>()                                                               \
      .Arg<ffi::Buffer<ffi::F32>>()                                                               \
      .Attr<bool>("gelu")                                                                         \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxGpt2PackedMatmulI8, MatmulI8, JAX_GPT2_SCALED_MATMUL_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxGpt2PackedMatmulI8Dot, MatmulI8Dot, JAX_GPT2_SCALED_MATMUL_BINDING);

// q, k, v, start, end; layer, scale. A bfloat16 cache comes as its bits, U16.
#define JAX_GPT2_ATTENTION_BINDING(Cache)                                                         \
  ffi::Ffi::Bind()                                                                                \
      .Arg<ffi::Buffer<ffi::F32>>()                                                               \
      .Arg<ffi::Buffer<Cache>>()                                                                  \
      .Arg<ffi::Buffer<Cache>>()                                                                  \
      .Arg<ffi::Buffer<ffi::S32>>()                                                               \
      .Arg<ffi::Buffer<ffi::S32>>()                                                               \
      .Attr<int64_t>("layer")                                                                     \
      .Attr<float>("scale")                                                                       \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxGpt2DecodeAttention, DecodeAttentionOf<ffi::F32>,
                              JAX_GPT2_ATTENTION_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxGpt2DecodeAttentionBF16, DecodeAttentionOf<ffi::U16>,
                              JAX_GPT2_ATTENTION_BINDING(ffi::U16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxGpt2PrefillAttention, PrefillAttentionOf<ffi::F32>,
                              JAX_GPT2_ATTENTION_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxGpt2PrefillAttentionBF16, PrefillAttentionOf<ffi::U16>,
                              JAX_GPT2_ATTENTION_BINDING(ffi::U16));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxGpt2LogSumExpRows, LogSumExpRowsOf,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxGpt2LogSumExpTopRows, LogSumExpTopRowsOf,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxGpt2LayerNormRows, LayerNormRowsOf,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxGpt2HostMasks, HostMasksOf,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// The host's mask writer (host_masks.py's hook), set once when the library is registered.
extern "C" void jax_gpt2_set_mask_hook(MaskHook hook) { mask_hook.store(hook); }

// Called from Python before registering: whether this CPU has every extension the library was
// compiled for (a library loaded on the wrong CPU would die of SIGILL at its first call instead).
extern "C" int jax_gpt2_kernels_supported() { return jax_gpt2::CpuRunsThisBuild() ? 1 : 0; }

// The vector unit the library was compiled for, for bench and error messages: "avx512", "avx2",
// "neon" or "generic".
extern "C" const char* jax_gpt2_kernel_isa() { return jax_gpt2::TargetIsa(); }

// Whether this build has the bf16 dot path (AVX512_BF16's vdpbf16ps): without it the bf16 dot target
// runs the exact bf16 path, and the loader refuses the option rather than let it mean nothing.
extern "C" int jax_gpt2_has_bf16_dot() { return jax_gpt2::HasBf16Dot() ? 1 : 0; }

// Whether this build has the int8 dot path (AVX512_VNNI's vpdpbusd); the same rule as above.
extern "C" int jax_gpt2_has_int8_dot() { return jax_gpt2::HasInt8Dot() ? 1 : 0; }

// From how many rows of x the dot options take their dot paths (the exact paths below that).
extern "C" int64_t jax_gpt2_dot_min_rows() { return jax_gpt2::DotMinRows(); }

// The host's FMA peak as this build's kernels see it (core.h: MeasureFmaPeak), in GFLOP/s over the
// kernels' own pool, for the bench to judge compute-bound rows by. About `seconds` long.
extern "C" double jax_gpt2_fma_peak_gflops(double seconds) { return jax_gpt2::MeasureFmaPeak(Pool(), seconds) / 1e9; }
