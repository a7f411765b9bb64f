// overfill::int8_linear: y = (x @ w.T) * scale + bias, with w int8 [N, K] (one scale per output channel) and x, y
// fp32 on the CPU. Built and loaded by overfill_lib/int8_kernel.py; the maths is quantize.Int8Linear's.
//
// Why by hand: a decode step at batch 1 is a string of matrix-vector products. On AVX2, inductor's fused int8
// reduction collapses (SmolLM2's int8 step 5.8x slower than through this kernel) and oneDNN's int8 GEMMs want int8
// activations and reorder the weight per call; eagerly, the alternative converts each whole weight per call. Here
// each output channel is one dot product whose int8 weights are widened 16 (AVX-512) or 8 (AVX2) floats at a time and
// multiplied into fp32 sums, four channels in flight, each widened weight used for up to 4 rows of x (batches above
// one); blocks of channels are split over OpenMP threads, the pool the inductor kernels around it use (torch's
// libgomp). One output's sum runs in the same order whatever the thread count; it differs from F.linear's only by
// the order of the fp32 additions.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace overfill_kernel {

enum Isa : int64_t { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

struct Problem {
  const float* x;      // [M, K]
  const int8_t* w;     // [N, K] (int8), or [N, K / 2] packed 4-bit
  const float* scale;  // [N] (int8), or null (4-bit: scaled per group)
  const float* bias;   // [N] or null
  const float* group_scale;  // [N, K / 32] (4-bit) or null
  float* y;            // [M, N]
  int64_t M, N, K;
};

inline void store(const Problem& p, int64_t m, int64_t n, float sum) {
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

namespace overfill_kernel {

int64_t best_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kBaseline;
}

using Channels = void (*)(const Problem&, int64_t, int64_t);

void check_isa(int64_t isa) {
  TORCH_CHECK(isa >= kBaseline && isa <= best_isa(), "overfill: instruction set ", isa,
              " is not available on this CPU (best: ", best_isa(), "; 0 baseline, 1 AVX2, 2 AVX-512)");
}

Channels channels_for(int64_t isa, bool q4) {
  check_isa(isa);
#if defined(__x86_64__)
  if (isa == kAvx512) return q4 ? overfill_avx512::channels<true> : overfill_avx512::channels<false>;
  if (isa == kAvx2) return q4 ? overfill_avx2::channels<true> : overfill_avx2::channels<false>;
#endif
  return q4 ? overfill_baseline::channels<true> : overfill_baseline::channels<false>;
}

// Blocks of 4 channels, split evenly over the threads; a small product stays on one thread.
void run(const Problem& p, Channels channels, int64_t weight_bytes) {
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

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias, int64_t isa) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "overfill::int8_linear wants fp32 CPU input, got ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar,
              "overfill::int8_linear wants an int8 [out, in] weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, "overfill::int8_linear: input has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(scale.numel() == N && scale.scalar_type() == at::kFloat, "overfill::int8_linear wants ", N,
              " fp32 scales");
  const at::Tensor xc = x.reshape({-1, K}).contiguous(), wc = weight.contiguous(), sc = scale.contiguous();
  const at::Tensor bc = checked_bias(bias, N);
  const int64_t M = xc.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const Problem p{xc.data_ptr<float>(), wc.data_ptr<int8_t>(), sc.data_ptr<float>(),
                  bc.defined() ? bc.data_ptr<float>() : nullptr, nullptr, y.data_ptr<float>(), M, N, K};
  run(p, channels_for(isa < 0 ? best_isa() : isa, false), N * K);
  return shaped(y, x, N);
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
  run(p, channels_for(isa < 0 ? best_isa() : isa, true), N * K / 2);
  return shaped(y, x, N);
}

}  // namespace overfill_kernel

TORCH_LIBRARY(overfill, m) {
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias=None, int isa=-1) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor packed, Tensor group_scale, Tensor? bias=None, int isa=-1) -> Tensor");
  m.def("int8_kernel_isa() -> int", &overfill_kernel::best_isa);
}

TORCH_LIBRARY_IMPL(overfill, CPU, m) {
  m.impl("int8_linear", &overfill_kernel::int8_linear);
  m.impl("int4_linear", &overfill_kernel::int4_linear);
}
