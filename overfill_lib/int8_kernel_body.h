// The body of overfill::int8_linear (and int4_linear, f32_linear, bf16_linear) for one instruction set: included by
// int8_kernel.cpp once per set, inside its own namespace and `#pragma GCC target` region, with OVERFILL_LANES (floats
// per vector) and OVERFILL_ROWS (rows of x per block: as many as the registers hold) defined. Written with GCC
// vector types, so the same lines become AVX-512, AVX2 or SSE/NEON code.

typedef float vfloat __attribute__((vector_size(OVERFILL_LANES * 4)));
typedef int8_t vbyte __attribute__((vector_size(OVERFILL_LANES)));
constexpr int64_t kLanes = OVERFILL_LANES;

inline vfloat load_x(const float* x) {
  vfloat v;
  std::memcpy(&v, x, sizeof v);
  return v;
}

inline vfloat widen(const int8_t* w) {  // kLanes int8 weights as floats
  // GCC 12 converts a vector of int8 to float one lane at a time, so x86 gets the instructions by name.
#if defined(__x86_64__) && OVERFILL_LANES == 16
  return (vfloat)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
#elif defined(__x86_64__) && OVERFILL_LANES == 8
  return (vfloat)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
#else
  vbyte b;
  std::memcpy(&b, w, sizeof b);
  return __builtin_convertvector(b, vfloat);
#endif
}

inline vfloat widen(const float* w) { return load_x(w); }  // fp32 weights (f32_linear): a plain load

inline vfloat widen(const uint16_t* w) {  // kLanes bf16 weights (their bits) as floats: each moved to the top half
#if defined(__x86_64__) && OVERFILL_LANES == 16
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  return (vfloat)_mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
#elif defined(__x86_64__) && OVERFILL_LANES == 8
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return (vfloat)_mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
#else
  vfloat f;
  for (int64_t i = 0; i < kLanes; ++i) f[i] = overfill_kernel::bf16_to_float(w[i]);
  return f;
#endif
}

inline float scalar(int8_t w) { return static_cast<float>(w); }
inline float scalar(float w) { return w; }
inline float scalar(uint16_t w) { return overfill_kernel::bf16_to_float(w); }

template <typename T> inline const T* weights(const Problem& p);
template <> inline const int8_t* weights<int8_t>(const Problem& p) { return p.w; }
template <> inline const float* weights<float>(const Problem& p) { return p.wf; }
template <> inline const uint16_t* weights<uint16_t>(const Problem& p) { return p.wb; }

inline float hsum(vfloat v) {
  float s = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// Channels [n, n + C) against rows [m, m + R): each weight vector is widened once and used for R rows. T: int8_t,
// float or bf16 (uint16_t) weights.
template <typename T, int R, int C>
void block(const Problem& p, int64_t n, int64_t m) {
  const int64_t K = p.K, Kv = K - K % kLanes;
  const T* wt = weights<T>(p);
  vfloat acc[R][C] = {};
  for (int64_t k = 0; k < Kv; k += kLanes) {
    vfloat wv[C];
    for (int c = 0; c < C; ++c) {
      __builtin_prefetch(wt + (n + c + C) * K + k);  // the next channels' same columns: more reads in flight
      wv[c] = widen(wt + (n + c) * K + k);
    }
    for (int r = 0; r < R; ++r) {
      const vfloat xv = load_x(p.x + (m + r) * K + k);
      for (int c = 0; c < C; ++c) acc[r][c] += xv * wv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      const float* x = p.x + (m + r) * K;
      const T* w = wt + (n + c) * K;
      float tail = 0.f;
      for (int64_t k = Kv; k < K; ++k) tail += x[k] * scalar(w[k]);
      store(p, m + r, n + c, hsum(acc[r][c]) + tail);
    }
}

// ---- 4-bit weights: 32 per group, one scale each; byte j of a group holds element j (low nibble) and j + 16 (high
// nibble), both stored plus 8.
inline void widen_nibbles(const uint8_t* b, vfloat& lo, vfloat& hi) {  // kLanes bytes -> both nibbles, minus 8
#if defined(__x86_64__) && OVERFILL_LANES == 16
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
  lo = (vfloat)_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, _mm512_set1_epi32(15)), _mm512_set1_epi32(8)));
  hi = (vfloat)_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), _mm512_set1_epi32(8)));
#elif defined(__x86_64__) && OVERFILL_LANES == 8
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)));
  lo = (vfloat)_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v, _mm256_set1_epi32(15)), _mm256_set1_epi32(8)));
  hi = (vfloat)_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v, 4), _mm256_set1_epi32(8)));
#else
  for (int64_t i = 0; i < kLanes; ++i) {
    lo[i] = static_cast<float>((b[i] & 15) - 8);
    hi[i] = static_cast<float>((b[i] >> 4) - 8);
  }
#endif
}

template <int R, int C>
void block_q4(const Problem& p, int64_t n, int64_t m) {
  const int64_t K = p.K, groups = K / 32;
  const uint8_t* packed = reinterpret_cast<const uint8_t*>(p.w);
  vfloat acc[R][C] = {};
  for (int64_t g = 0; g < groups; ++g) {
    vfloat part[R][C] = {};
    for (int64_t j = 0; j < 16; j += kLanes) {
      vfloat lo[C], hi[C];
      for (int c = 0; c < C; ++c) widen_nibbles(packed + (n + c) * (K / 2) + g * 16 + j, lo[c], hi[c]);
      for (int r = 0; r < R; ++r) {
        const float* x = p.x + (m + r) * K + g * 32 + j;
        const vfloat xl = load_x(x), xh = load_x(x + 16);
        for (int c = 0; c < C; ++c) part[r][c] += xl * lo[c] + xh * hi[c];
      }
    }
    for (int c = 0; c < C; ++c) {
      const float s = p.group_scale[(n + c) * groups + g];
      for (int r = 0; r < R; ++r) acc[r][c] += part[r][c] * s;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) store(p, m + r, n + c, hsum(acc[r][c]));
}

template <int W, int R, int C>  // W: overfill_kernel::Weights
inline void any_block(const Problem& p, int64_t n, int64_t m) {
  if constexpr (W == overfill_kernel::kInt4Weights) block_q4<R, C>(p, n, m);
  else if constexpr (W == overfill_kernel::kFloatWeights) block<float, R, C>(p, n, m);
  else if constexpr (W == overfill_kernel::kBf16Weights) block<uint16_t, R, C>(p, n, m);
  else block<int8_t, R, C>(p, n, m);
}

// Every row of x for channels [n, n + C): blocks of OVERFILL_ROWS rows, then the last few.
template <int W, int C>
void rows(const Problem& p, int64_t n) {
  int64_t m = 0;
  for (; m + OVERFILL_ROWS <= p.M; m += OVERFILL_ROWS) any_block<W, OVERFILL_ROWS, C>(p, n, m);
  switch (p.M - m) {
    case 1: any_block<W, 1, C>(p, n, m); break;
#if OVERFILL_ROWS > 2
    case 2: any_block<W, 2, C>(p, n, m); break;
#endif
#if OVERFILL_ROWS > 3
    case 3: any_block<W, 3, C>(p, n, m); break;
#endif
    default: break;
  }
}

// Channels [n0, n1): four at a time, then one at a time, with weights of kind W.
template <int W>
void channels(const Problem& p, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) rows<W, 4>(p, n);
  for (; n < n1; ++n) rows<W, 1>(p, n);
}
