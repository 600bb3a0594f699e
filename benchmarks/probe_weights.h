// Shared by the kernel probes in benchmarks/ (measurements, not part of the library): a clock, and
// one packed gpt2 matrix in all three weight dtypes, in its own memory (so a step of them streams
// from DRAM). Values are arbitrary: the probes time the kernels, they do not check them.
#pragma once
#include <chrono>
#include <cstdint>
#include <random>
#include <new>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

inline double Now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// The four block matrices of a gpt2 layer (qkv, attn_out, fc, proj) and the lm_head, (I, O).
constexpr int64_t kGpt2Shapes[5][2] = {{768, 2304}, {768, 768}, {768, 3072}, {3072, 768}, {768, 50257}};

// 64-byte aligned, as XLA's buffers are: a vector load never splits a cache line. (glibc's large
// allocations start 16 bytes into a page, and on a Sapphire Rapids-class Xeon every split zmm load
// cost the float32 GEMM ~10% of its speed.)
template <typename T>
struct Aligned {
  using value_type = T;
  Aligned() = default;
  template <typename U>
  Aligned(const Aligned<U>&) {}
  T* allocate(size_t n) {
    // From 2 MiB on, 2 MiB aligned and asked for 2 MiB pages before the first write faults them in:
    // the library's weights are on them (loader.collapse_weight_pages), and a collapse after the fact
    // (HugePages below) covers only the whole 2 MiB pages inside a buffer (on the 2-core Xeon, 10 of
    // the 16.5 MiB of one 3072 x 768 matrix's three copies).
    const size_t bytes = n * sizeof(T), huge = size_t(2) << 20;
    if (bytes < huge) return static_cast<T*>(::operator new(bytes, std::align_val_t(64)));
    void* p = ::operator new((bytes + huge - 1) / huge * huge, std::align_val_t(huge));
#if defined(__linux__)
    madvise(p, (bytes + huge - 1) / huge * huge, MADV_HUGEPAGE);
#endif
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t n) {
    ::operator delete(p, std::align_val_t(n * sizeof(T) < (size_t(2) << 20) ? 64 : size_t(2) << 20));
  }
  template <typename U>
  bool operator==(const Aligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned<U>&) const { return false; }
};
template <typename T>
using AlignedVector = std::vector<T, Aligned<T>>;

struct Mat { int64_t I, O, G; AlignedVector<int8_t> i8; AlignedVector<float> f32, scale; AlignedVector<uint16_t> bf; };

// 2 MiB pages for a weight buffer, as the library asks for its own (kernels/native.py): with 4 KiB
// pages the hardware prefetcher stops at every page boundary, and a probe would time a memory
// system the library does not see.
template <typename Vector>
inline void HugePages(Vector& values) {
#if defined(__linux__)
  const uintptr_t huge = 2u << 20;
  uintptr_t first = (reinterpret_cast<uintptr_t>(values.data()) + huge - 1) / huge * huge;
  uintptr_t last = (reinterpret_cast<uintptr_t>(values.data() + values.size())) / huge * huge;
  if (last <= first) return;
  madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  madvise(reinterpret_cast<void*>(first), last - first, 25);  // MADV_COLLAPSE (Linux 6.1): now, not someday
#endif
}

inline Mat Make(int64_t I, int64_t O) {
  Mat m; m.I=I; m.O=O; m.G=(O+63)/64;
  m.i8.resize(m.G*I*64); m.f32.resize(m.G*I*64); m.bf.resize(m.G*I*64); m.scale.assign(m.G*64, 0.01f);
  std::mt19937 r(1); for (size_t k=0;k<m.i8.size();++k){ m.i8[k]=(int8_t)(r()%255-127); m.f32[k]=m.i8[k]*0.01f; m.bf[k]=0x3c00;}
  HugePages(m.i8); HugePages(m.f32); HugePages(m.bf);
  return m;
}
