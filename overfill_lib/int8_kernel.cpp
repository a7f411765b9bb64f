// overfill::int8_linear: y = (x @ w.T) * scale + bias, with w int8 [N, K] (one scale per output channel) and x, y
// fp32 on the CPU. Built and loaded by overfill_lib/int8_kernel.py; the maths is quantize.Int8Linear's.
//
// Why by hand: a decode step at batch 1 is a string of matrix-vector products. On AVX2, inductor's fused int8
// reduction collapses (SmolLM2's int8 step 7x slower than through this kernel on an AMD EPYC) and oneDNN's int8
// GEMMs want int8 activations and reorder the weight per call; eagerly, the alternative converts each whole weight
// per call. Here each output channel is one dot product whose int8 weights are widened 16 (AVX-512) or 8 (AVX2)
// floats at a time and multiplied into fp32 sums, four channels in flight (the next four prefetched), each widened
// weight used for up to 4 rows of x (batches above one); blocks of channels are split over OpenMP threads, the pool
// the inductor kernels around it use (torch's libgomp). One output's sum runs in the same order whatever the thread
// count; it differs from F.linear's only by the order of the fp32 additions.
//
// overfill::w8a8_linear is the same product with the activations quantized too, as llama.cpp's Q8_0 does: each row
// of x is rounded per block of 32 values to int8 with one fp32 step per block (absmax / 127), and each block's 32
// products are summed in int32 by AVX2's byte multiply-adds (vpmaddubsw, vpmaddwd: 32 products in two
// instructions, where the weight-only path widens 8 weights to floats per FMA), then scaled by the block's step.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace overfill_kernel {

enum Isa : int64_t { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };
enum Weights : int { kInt8Weights = 0, kInt4Weights = 1, kFloatWeights = 2, kBf16Weights = 3 };

inline float bf16_to_float(uint16_t bits) {  // bf16 is the top half of an fp32
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

struct Problem {
  const float* x;      // [M, K]
  const int8_t* w;     // [N, K] (int8), or [N, K / 2] packed 4-bit
  const float* scale;  // [N] (int8), or null (4-bit: scaled per group)
  const float* bias;   // [N] or null
  const float* group_scale;  // [N, K / 32] (4-bit) or null
  float* y;            // [M, N]
  int64_t M, N, K;
  const float* wf = nullptr;  // [N, K] fp32 weights (f32_linear), w then null
  const uint16_t* wb = nullptr;  // [N, K] bf16 weights, their bits (bf16_linear), w then null
};

template <typename P>  // Problem or QProblem
inline void store(const P& p, int64_t m, int64_t n, float sum) {
  p.y[m * p.N + n] = sum * (p.scale ? p.scale[n] : 1.f) + (p.bias ? p.bias[n] : 0.f);
}

}  // namespace overfill_kernel

// One copy of the body per instruction set; best_isa() picks one when it runs.
#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace overfill_avx512 {
using overfill_kernel::Problem;
using overfill_kernel::store;
#define OVERFILL_LANES 16
#define OVERFILL_ROWS 4
#include "int8_kernel_body.h"
#undef OVERFILL_LANES
#undef OVERFILL_ROWS
}  // namespace overfill_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace overfill_avx2 {
using overfill_kernel::Problem;
using overfill_kernel::store;
#define OVERFILL_LANES 8
#define OVERFILL_ROWS 2
#include "int8_kernel_body.h"
#undef OVERFILL_LANES
#undef OVERFILL_ROWS
}  // namespace overfill_avx2
#pragma GCC pop_options
#endif

namespace overfill_baseline {  // SSE2 on x86-64, NEON on aarch64
using overfill_kernel::Problem;
using overfill_kernel::store;
#define OVERFILL_LANES 4
#define OVERFILL_ROWS 2
#include "int8_kernel_body.h"
#undef OVERFILL_LANES
#undef OVERFILL_ROWS
}  // namespace overfill_baseline

// ---- int8 x int8 (w8a8_linear): x quantized per block of 32, int32 sums per block.
namespace overfill_kernel {

constexpr int64_t kBlock = 32;

struct QProblem {
  const int8_t* xq;    // [M, Kp]: x rounded per block, zero past K (Kp: K rounded up to a block)
  const float* step;   // [M, Kp / 32]: each block's step
  const int8_t* w;     // [N, K], values in [-127, 127]
  const float* scale;  // [N]
  const float* bias;   // [N] or null
  float* y;            // [M, N]
  int64_t M, N, K, Kp;
};

// The rounding torch does in quantize.round_activations, operation for operation: step = absmax / 127, then
// round-half-even of x / step (zero for an all-zero block), so both paths see the same int8 activations. One block of
// n <= 32 values, zero-padded to 32; returns its step.
inline float quantize_block(const float* xb, int64_t n, int8_t* q) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(xb[i]));
  const float d = amax / 127.f;
  for (int64_t i = 0; i < kBlock; ++i) q[i] = (i < n && d > 0.f) ? static_cast<int8_t>(std::nearbyint(xb[i] / d)) : 0;
  return d;
}

void quantize_rows(const float* x, int64_t M, int64_t K, int64_t Kp, int8_t* xq, float* step) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < Kp / kBlock; ++b)
      step[m * (Kp / kBlock) + b] =
          quantize_block(x + m * K + b * kBlock, std::min(kBlock, K - b * kBlock), xq + m * Kp + b * kBlock);
}

inline int32_t dot_scalar(const int8_t* a, const int8_t* b, int64_t n) {
  int32_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<int32_t>(a[i]) * b[i];
  return s;
}

// The part of a row past its last whole block (K not a multiple of 32), scalar.
inline float tail(const QProblem& p, int64_t m, int64_t n) {
  const int64_t whole = p.K / kBlock;
  if (p.K % kBlock == 0) return 0.f;
  return dot_scalar(p.xq + m * p.Kp + whole * kBlock, p.w + n * p.K + whole * kBlock, p.K % kBlock) *
         p.step[m * (p.Kp / kBlock) + whole];
}

void qchannels_baseline(const QProblem& p, int64_t n0, int64_t n1) {
  const int64_t whole = p.K / kBlock, blocks = p.Kp / kBlock;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) {
      float sum = 0.f;
      for (int64_t b = 0; b < whole; ++b)
        sum += dot_scalar(p.xq + m * p.Kp + b * kBlock, p.w + n * p.K + b * kBlock, kBlock) * p.step[m * blocks + b];
      store(p, m, n, sum + tail(p, m, n));
    }
}

}  // namespace overfill_kernel

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace overfill_avx2 {
using overfill_kernel::QProblem;
using overfill_kernel::kBlock;

inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// Channels [n, n + C) against one row m. Per block: |x| (unsigned) times w with x's sign moved onto it, pairs summed
// to int16 (at most 2 * 127 * 127, no saturation), then fours to int32, to float, times the block's step.
template <int C>
void qblock(const QProblem& p, int64_t n, int64_t m) {
  const int64_t whole = p.K / kBlock, blocks = p.Kp / kBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* x = p.xq + m * p.Kp;
  __m256 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < whole; ++b) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + b * kBlock));
    const __m256i ax = _mm256_sign_epi8(xv, xv);
    const __m256 d = _mm256_set1_ps(p.step[m * blocks + b]);
    for (int c = 0; c < C; ++c) {
      const int8_t* wp = p.w + (n + c) * p.K + b * kBlock;
      _mm_prefetch(reinterpret_cast<const char*>(wp + C * p.K), _MM_HINT_T0);  // the next channels' same block
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
      const __m256i pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, xv));
      acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)), d, acc[c]);
    }
  }
  for (int c = 0; c < C; ++c) overfill_kernel::store(p, m, n + c, hsum8(acc[c]) + overfill_kernel::tail(p, m, n + c));
}

// quantize_rows, 8 values at a time: the same division and the same round-half-even (the scalar loop calls nearbyint
// once per value), so the same int8 values; a last, partial block goes the scalar way.
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t Kp, int8_t* xq, float* step) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' per-lane interleaving
  const int64_t whole = K / kBlock, blocks = Kp / kBlock;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < whole; ++b) {
      const float* xb = x + m * K + b * kBlock;
      int8_t* q = xq + m * Kp + b * kBlock;
      __m256 v[4], amax = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], magnitude));
      }
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      const float d = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h))) / 127.f;
      step[m * blocks + b] = d;
      if (!(d > 0.f)) {
        std::memset(q, 0, kBlock);
        continue;
      }
      const __m256 dv = _mm256_set1_ps(d);
      __m256i r[4];
      for (int i = 0; i < 4; ++i)
        r[i] = _mm256_cvtps_epi32(
            _mm256_round_ps(_mm256_div_ps(v[i], dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(bytes, order));
    }
    for (int64_t b = whole; b < blocks; ++b)
      step[m * blocks + b] =
          overfill_kernel::quantize_block(x + m * K + b * kBlock, K - b * kBlock, xq + m * Kp + b * kBlock);
  }
}

void qchannels(const QProblem& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4)
    for (int64_t m = 0; m < p.M; ++m) qblock<4>(p, n, m);
  for (; n < n1; ++n)
    for (int64_t m = 0; m < p.M; ++m) qblock<1>(p, n, m);
}
}  // namespace overfill_avx2
#pragma GCC pop_options
#endif

namespace overfill_kernel {

int64_t cpu_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kBaseline;
}

// The CPU's best, capped as torch's own kernels are by ATEN_CPU_CAPABILITY (default, avx2): so that one setting
// runs a whole process as on a smaller CPU. Read once.
int64_t best_isa() {
  static const int64_t isa = [] {
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    if (cap != nullptr && std::strcmp(cap, "default") == 0) return int64_t{kBaseline};
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0) return std::min(cpu_isa(), int64_t{kAvx2});
    return cpu_isa();
  }();
  return isa;
}

using Channels = void (*)(const Problem&, int64_t, int64_t);
using QChannels = void (*)(const QProblem&, int64_t, int64_t);

void check_isa(int64_t isa) {
  TORCH_CHECK(isa >= kBaseline && isa <= best_isa(), "overfill: instruction set ", isa,
              " is not available on this CPU (best: ", best_isa(), "; 0 baseline, 1 AVX2, 2 AVX-512)");
}

template <int W>
Channels channels_for(int64_t isa) {
  check_isa(isa);
#if defined(__x86_64__)
  if (isa == kAvx512) return overfill_avx512::channels<W>;
  if (isa == kAvx2) return overfill_avx2::channels<W>;
#endif
  return overfill_baseline::channels<W>;
}

// Blocks of 4 channels, split evenly over the threads; a small product stays on one thread.
template <typename P, typename F>
void run(const P& p, F channels, int64_t weight_bytes) {
  const int64_t blocks = (p.N + 3) / 4;
  const int64_t work = weight_bytes * p.M / (64 * 1024);  // a thread per 64 KB of weight (times rows), at most all
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), work));
  if (threads == 1) {
    channels(p, 0, p.N);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
    channels(p, std::min(p.N, b0 * 4), std::min(p.N, b1 * 4));
  }
}

at::Tensor checked_bias(const c10::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  TORCH_CHECK(bias->numel() == N && bias->scalar_type() == at::kFloat, "overfill: wants ", N, " fp32 biases");
  return bias->contiguous();
}

at::Tensor shaped(const at::Tensor& y, const at::Tensor& x, int64_t N) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  return y.view(sizes);
}

// The arguments of int8_linear and w8a8_linear, checked and made contiguous (x as [M, K]).
struct Int8Args {
  at::Tensor x, weight, scale, bias;
  int64_t M, N, K;
};

Int8Args int8_args(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                   const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "overfill::", op, " wants fp32 CPU input, got ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "overfill::", op,
              " wants an int8 [out, in] weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, "overfill::", op, ": input has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(scale.numel() == N && scale.scalar_type() == at::kFloat, "overfill::", op, " wants ", N,
              " fp32 scales");
  const at::Tensor xc = x.reshape({-1, K}).contiguous();
  return {xc, weight.contiguous(), scale.contiguous(), checked_bias(bias, N), xc.size(0), N, K};
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias, int64_t isa) {
  const Int8Args a = int8_args("int8_linear", x, weight, scale, bias);
  at::Tensor y = at::empty({a.M, a.N}, x.options());
  const Problem p{a.x.data_ptr<float>(), a.weight.data_ptr<int8_t>(), a.scale.data_ptr<float>(),
                  a.bias.defined() ? a.bias.data_ptr<float>() : nullptr, nullptr, y.data_ptr<float>(), a.M, a.N, a.K};
  run(p, channels_for<kInt8Weights>(isa < 0 ? best_isa() : isa), a.N * a.K);
  return shaped(y, x, a.N);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& group_scale,
                       const c10::optional<at::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "overfill::int4_linear wants fp32 CPU input, got ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte,
              "overfill::int4_linear wants a uint8 [out, in / 2] weight of packed 4-bit values");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(K % 32 == 0 && x.size(-1) == K, "overfill::int4_linear: input has ", x.size(-1),
              " features, the weight ", K, " (a multiple of 32)");
  TORCH_CHECK(group_scale.numel() == N * (K / 32) && group_scale.scalar_type() == at::kFloat,
              "overfill::int4_linear wants ", N, " x ", K / 32, " fp32 group scales");
  const at::Tensor xc = x.reshape({-1, K}).contiguous(), wc = packed.contiguous(), gc = group_scale.contiguous();
  const at::Tensor bc = checked_bias(bias, N);
  const int64_t M = xc.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const Problem p{xc.data_ptr<float>(), reinterpret_cast<const int8_t*>(wc.data_ptr<uint8_t>()), nullptr,
                  bc.defined() ? bc.data_ptr<float>() : nullptr, gc.data_ptr<float>(), y.data_ptr<float>(), M, N, K};
  run(p, channels_for<kInt4Weights>(isa < 0 ? best_isa() : isa), N * K / 2);
  return shaped(y, x, N);
}

// fp32 weights (f32_linear) or bf16 ones (bf16_linear: each widened to fp32 in registers, a shift): fp32 x, y and sums.
at::Tensor float_weights_linear(const char* op, at::ScalarType dtype, const at::Tensor& x, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && weight.scalar_type() == dtype &&
              weight.dim() == 2, "overfill::", op, " wants fp32 CPU input and a ", dtype, " [out, in] weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, "overfill::", op, ": input has ", x.size(-1), " features, the weight ", K);
  const at::Tensor xc = x.reshape({-1, K}).contiguous(), wc = weight.contiguous(), bc = checked_bias(bias, N);
  const int64_t M = xc.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  Problem p{xc.data_ptr<float>(), nullptr, nullptr, bc.defined() ? bc.data_ptr<float>() : nullptr, nullptr,
            y.data_ptr<float>(), M, N, K};
  const int64_t chosen = isa < 0 ? best_isa() : isa;
  if (dtype == at::kFloat) {
    p.wf = wc.data_ptr<float>();
    run(p, channels_for<kFloatWeights>(chosen), N * K * 4);
  } else {
    p.wb = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
    run(p, channels_for<kBf16Weights>(chosen), N * K * 2);
  }
  return shaped(y, x, N);
}

at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      int64_t isa) {
  return float_weights_linear("f32_linear", at::kFloat, x, weight, bias, isa);
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t isa) {
  return float_weights_linear("bf16_linear", at::kBFloat16, x, weight, bias, isa);
}

at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias, int64_t isa) {
  const Int8Args a = int8_args("w8a8_linear", x, weight, scale, bias);
  const int64_t Kp = (a.K + kBlock - 1) / kBlock * kBlock;
  at::Tensor xq = at::empty({a.M, Kp}, weight.options()), step = at::empty({a.M, Kp / kBlock}, x.options());
  at::Tensor y = at::empty({a.M, a.N}, x.options());
  const QProblem p{xq.data_ptr<int8_t>(), step.data_ptr<float>(), a.weight.data_ptr<int8_t>(),
                   a.scale.data_ptr<float>(), a.bias.defined() ? a.bias.data_ptr<float>() : nullptr,
                   y.data_ptr<float>(), a.M, a.N, a.K, Kp};
  const int64_t chosen = isa < 0 ? best_isa() : isa;
  check_isa(chosen);
  QChannels channels = qchannels_baseline;
  void (*round_rows)(const float*, int64_t, int64_t, int64_t, int8_t*, float*) = quantize_rows;
#if defined(__x86_64__)
  if (chosen >= kAvx2) {  // the 256-bit path serves AVX-512 machines too
    channels = overfill_avx2::qchannels;
    round_rows = overfill_avx2::quantize_rows;
  }
#endif
  round_rows(a.x.data_ptr<float>(), a.M, a.K, Kp, xq.data_ptr<int8_t>(), step.data_ptr<float>());
  run(p, channels, a.N * a.K);
  return shaped(y, x, a.N);
}

}  // namespace overfill_kernel

TORCH_LIBRARY(overfill, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias=None, int isa=-1) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor packed, Tensor group_scale, Tensor? bias=None, int isa=-1) -> Tensor");
  m.def("w8a8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias=None, int isa=-1) -> Tensor");
  m.def("f32_linear(Tensor x, Tensor weight, Tensor? bias=None, int isa=-1) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias=None, int isa=-1) -> Tensor");
  m.def("int8_kernel_isa() -> int", &overfill_kernel::best_isa);
}

TORCH_LIBRARY_IMPL(overfill, CPU, m) {
  m.impl("int8_linear", &overfill_kernel::int8_linear);
  m.impl("int4_linear", &overfill_kernel::int4_linear);
  m.impl("w8a8_linear", &overfill_kernel::w8a8_linear);
  m.impl("f32_linear", &overfill_kernel::f32_linear);
  m.impl("bf16_linear", &overfill_kernel::bf16_linear);
}
