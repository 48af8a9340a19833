// The float32 fast path of class_center_stats on x86: one block of 16 channels
// (see class_stats_kernel.cpp for the plan it walks). Included by that file in
// its x86 builds (isa/default.cpp: SSE2, isa/avx2.cpp, isa/avx512.cpp), which
// define kRegisterSets first; the CPU picks a build at run time (dispatch.cpp).
// Only the transposes and the 8-lane float64 type differ between them.
//
// Per chunk of pixels, the block's 16 channel planes are transposed into a
// pixel-major tile (16 floats a pixel, cache-resident), then the chunk's pixels
// are walked class by class with the sums in registers: per (chunk, class)
// the registers go once into the block's float64 accumulators, instead of a
// load and a store per pixel. Tiles are double-buffered: the next chunk is
// transposed one 8x8 block at a time from inside the class walk, so that its
// loads and shuffles interleave with the walk's float64 arithmetic at the
// instruction level (they use different ports; done a slice at a time between
// classes, the two phases hardly overlapped).

#ifndef FADA_CPU_ISA_SSE2
// In each 128-bit lane, 4 rows of 4 floats in, 4 columns out.
inline void transpose4x4_lanes(const __m256 r[4], __m256 col[4]) {
  const __m256 u0 = _mm256_unpacklo_ps(r[0], r[1]), u1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 u2 = _mm256_unpacklo_ps(r[2], r[3]), u3 = _mm256_unpackhi_ps(r[2], r[3]);
  col[0] = _mm256_shuffle_ps(u0, u2, 0x44);
  col[1] = _mm256_shuffle_ps(u0, u2, 0xEE);
  col[2] = _mm256_shuffle_ps(u1, u3, 0x44);
  col[3] = _mm256_shuffle_ps(u1, u3, 0xEE);
}
#endif

// Returns p and steps it to the same pixel of the next channel. The empty asm
// hides the stride pattern from GCC, which would otherwise keep one pointer
// per plane (16, spilled to the stack) instead of stepping one.
inline const float* next_plane(const float*& p, int64_t hw) {
  const float* current = p;
  p += hw;
  asm("" : "+r"(p));
  return current;
}

#ifdef FADA_CPU_ISA_SSE2
// 8 channels x 8 pixels: rows of 8 floats, `hw` apart from `src`, in; pixel
// t's 8 channels out at dst + t * kBlock: four 4x4 transposes.
inline void transpose_rows(const float* src, int64_t hw, float* dst) {
  const float* row[8];
  for (int64_t j = 0; j < 8; ++j) row[j] = next_plane(src, hw);
  for (int64_t cq = 0; cq < 2; ++cq) {
    for (int64_t pq = 0; pq < 2; ++pq) {
      __m128 r0 = _mm_loadu_ps(row[4 * cq + 0] + 4 * pq), r1 = _mm_loadu_ps(row[4 * cq + 1] + 4 * pq);
      __m128 r2 = _mm_loadu_ps(row[4 * cq + 2] + 4 * pq), r3 = _mm_loadu_ps(row[4 * cq + 3] + 4 * pq);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      float* d = dst + 4 * pq * kBlock + 4 * cq;
      _mm_store_ps(d, r0);
      _mm_store_ps(d + kBlock, r1);
      _mm_store_ps(d + 2 * kBlock, r2);
      _mm_store_ps(d + 3 * kBlock, r3);
    }
  }
}
#else
// 8 channels x 8 pixels: rows of 8 floats, `hw` apart from `src`, in; pixel
// t's 8 channels out at dst + t * kBlock. The lane-crossing step of the
// transpose is done by the loads (128-bit broadcasts, blended), leaving 16
// in-lane shuffles instead of 24 on the two shuffle ports.
inline void transpose_rows(const float* src, int64_t hw, float* dst) {
  const float* row[8];
  for (int64_t j = 0; j < 8; ++j) row[j] = next_plane(src, hw);
  __m256 first4[4], last4[4], px[8];  // lanes: channels j and j + 4
  for (int64_t j = 0; j < 4; ++j) {
    first4[j] = _mm256_blend_ps(_mm256_broadcast_ps(reinterpret_cast<const __m128*>(row[j])),
                                _mm256_broadcast_ps(reinterpret_cast<const __m128*>(row[j + 4])), 0xF0);
    last4[j] = _mm256_blend_ps(_mm256_broadcast_ps(reinterpret_cast<const __m128*>(row[j] + 4)),
                               _mm256_broadcast_ps(reinterpret_cast<const __m128*>(row[j + 4] + 4)), 0xF0);
  }
  transpose4x4_lanes(first4, px);
  transpose4x4_lanes(last4, px + 4);
  for (int64_t t = 0; t < 8; ++t) _mm256_store_ps(dst + t * kBlock, px[t]);
}

#endif

// One line of each of the 16 planes of a later chunk, 16 pixels from `ahead`
// (its first pixel) + i, into L2, so that its fill finds them in cache.
inline void prefetch_lines(const float* ahead, int64_t hw, int64_t i) {
  const float* src = ahead + i;
  for (int64_t j = 0; j < kBlock; ++j) _mm_prefetch(reinterpret_cast<const char*>(next_plane(src, hw)), _MM_HINT_T1);
}

// One quarter of tile rows [i, i + 16) (`quarter` 0-3: channels 0-7 then
// 8-15, each for pixels i..i+7 then i+8..i+15). Both 8-pixel halves of a
// plane's cache line are used back to back, 8 planes at a time: when the plane
// stride is a multiple of 4 KB (h*w a multiple of 1024, e.g. 64x128) all 16
// planes fall into one 8-way L1 set, and a line must be used up before the
// other planes evict it. `src`: channel c0 at the chunk's first pixel.
inline void fill_quarter(const float* src, int64_t hw, int64_t i, int64_t quarter, float* tile) {
  const int64_t half = quarter >> 1, second = quarter & 1;
  transpose_rows(src + half * 8 * hw + i + 8 * second, hw, tile + (i + 8 * second) * kBlock + 8 * half);
}

// Tile rows [8 * g0, 8 * g1) of a chunk in one go (n pixels; `src` as above),
// prefetching the same rows of a later chunk (`ahead`, `ahead_n` pixels).
inline void fill_tile(const float* src, int64_t hw, int64_t n, int64_t g0, int64_t g1, float* tile,
                      const float* ahead, int64_t ahead_n) {
  for (int64_t g = g0; g < g1;) {
    const int64_t i = 8 * g;
    if (i >= n) return;
    if ((g & 1) == 0 && i < ahead_n) prefetch_lines(ahead, hw, i);
    if ((g & 1) == 0 && g + 1 < g1 && i + 16 <= n) {
      for (int64_t quarter = 0; quarter < 4; ++quarter) fill_quarter(src, hw, i, quarter, tile);
      g += 2;
      continue;
    }
    if (i + 8 <= n) {
      for (int64_t half = 0; half < 2; ++half) transpose_rows(src + half * 8 * hw + i, hw, tile + i * kBlock + 8 * half);
    } else {
      for (int64_t t = i; t < n; ++t)
        for (int64_t j = 0; j < kBlock; ++j) tile[t * kBlock + j] = src[j * hw + t];
    }
    ++g;
  }
}

// The next chunk's tile, filled a quarter of 16 rows per step (with the
// prefetch of a later chunk's matching lines) from inside the class walk.
// Steps past the last full 16 rows do nothing; fill_tile does the rest.
struct TileFiller {
  const float* src = nullptr;
  const float* ahead = nullptr;
  float* tile = nullptr;
  int64_t hw = 0, ahead_n = 0;
  int64_t step_index = 0, steps = 0;  // 4 per full 16 rows

  inline void step() {
    if (step_index >= steps) return;
    const int64_t i = 16 * (step_index >> 2), quarter = step_index & 3;
    if (quarter == 0 && i < ahead_n) prefetch_lines(ahead, hw, i);
    fill_quarter(src, hw, i, quarter, tile);
    ++step_index;
  }
};

// d8: 8 float64 lanes, and the few operations the walk needs.
// The build is told by FADA_CPU_ISA_AVX512 (isa/avx512.cpp), not by __AVX512F__: GCC does not
// define that macro inside a `#pragma GCC target` region.
#ifdef FADA_CPU_ISA_AVX512
// One zmm register.
typedef double d8 __attribute__((vector_size(64), aligned(8)));

inline d8 splat_d8(double v) { return d8{} + v; }
inline d8 load_d8(const double* p) {
  d8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store_d8(double* p, d8 v) { __builtin_memcpy(p, &v, sizeof v); }
// (GCC splits __builtin_convertvector to 8 lanes in two, so the intrinsic.)
inline d8 widen(const float* p) { return reinterpret_cast<d8>(_mm512_cvtps_pd(_mm256_load_ps(p))); }
// a * b + c in one rounding.
inline d8 fma_d8(d8 a, d8 b, d8 c) {
  return reinterpret_cast<d8>(_mm512_fmadd_pd(reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b),
                                              reinterpret_cast<__m512d>(c)));
}
#elif defined(FADA_CPU_ISA_SSE2)
// Four xmm registers (no FMA: fma_d8 rounds twice).
struct d8 {
  __m128d q[4];
};
inline d8 operator+(d8 a, d8 b) { for (int k = 0; k < 4; ++k) a.q[k] = _mm_add_pd(a.q[k], b.q[k]); return a; }
inline d8 operator-(d8 a, d8 b) { for (int k = 0; k < 4; ++k) a.q[k] = _mm_sub_pd(a.q[k], b.q[k]); return a; }
inline d8& operator+=(d8& a, d8 b) { return a = a + b; }
inline d8 splat_d8(double v) { d8 r; for (int k = 0; k < 4; ++k) r.q[k] = _mm_set1_pd(v); return r; }
inline d8 load_d8(const double* p) { d8 r; for (int k = 0; k < 4; ++k) r.q[k] = _mm_loadu_pd(p + 2 * k); return r; }
inline void store_d8(double* p, d8 v) { for (int k = 0; k < 4; ++k) _mm_storeu_pd(p + 2 * k, v.q[k]); }
inline d8 widen(const float* p) {
  const __m128 a = _mm_load_ps(p), b = _mm_load_ps(p + 4);
  return {{_mm_cvtps_pd(a), _mm_cvtps_pd(_mm_movehl_ps(a, a)), _mm_cvtps_pd(b), _mm_cvtps_pd(_mm_movehl_ps(b, b))}};
}
// a * b + c
inline d8 fma_d8(d8 a, d8 b, d8 c) { for (int k = 0; k < 4; ++k) c.q[k] = _mm_add_pd(_mm_mul_pd(a.q[k], b.q[k]), c.q[k]); return c; }
#else
// A pair of ymm registers, spelled out: as a 64-byte vector-extension type
// (what the AVX-512 build uses) GCC passes the halves through the stack and
// general registers without AVX-512, which made this path 3-4x slower.
struct d8 {
  __m256d lo, hi;
};
inline d8 operator+(d8 a, d8 b) { return {_mm256_add_pd(a.lo, b.lo), _mm256_add_pd(a.hi, b.hi)}; }
inline d8 operator-(d8 a, d8 b) { return {_mm256_sub_pd(a.lo, b.lo), _mm256_sub_pd(a.hi, b.hi)}; }
inline d8& operator+=(d8& a, d8 b) { return a = a + b; }
inline d8 splat_d8(double v) { return {_mm256_set1_pd(v), _mm256_set1_pd(v)}; }
inline d8 load_d8(const double* p) { return {_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4)}; }
inline void store_d8(double* p, d8 v) {
  _mm256_storeu_pd(p, v.lo);
  _mm256_storeu_pd(p + 4, v.hi);
}
inline d8 widen(const float* p) { return {_mm256_cvtps_pd(_mm_load_ps(p)), _mm256_cvtps_pd(_mm_load_ps(p + 4))}; }
// a * b + c in one rounding.
inline d8 fma_d8(d8 a, d8 b, d8 c) { return {_mm256_fmadd_pd(a.lo, b.lo, c.lo), _mm256_fmadd_pd(a.hi, b.hi, c.hi)}; }
#endif

// stats::accumulate, with the sum's add done as x * 1 + sum on the FMA units:
// conversions, subtractions and adds otherwise all queue for the same two FP
// ports (AMD Zen) while the FMA ports idle. Same bits: x * 1 is exact. `one`
// must be opaque to the compiler, or it folds the product back into an add.
inline void accumulate_on_fma(d8 x, d8 shift, d8 one, d8& sum, d8& sq) {
  const d8 d = x - shift;
  sum = fma_d8(x, one, sum);
  sq = fma_d8(d, d, sq);
}

// Sums pixels order[a, e) of one class from a tile into sum[16] (Σx) and
// sq[8] (Σ (x − s)², channel j in lane j % 8), stepping `filler` every
// other pixel. kSets independent register sets hide the add latency; AVX2
// has the registers for one only.
template <int kSets>
inline void walk_class(const float* tile, const uint16_t* order, int64_t a, int64_t e,
                       const double* shift, double* sum, double* sq, TileFiller& filler) {
  const d8 s_lo = load_d8(shift), s_hi = load_d8(shift + 8);
  const volatile double unit = 1.0;
  const d8 one = splat_d8(unit);
  d8 sum_lo[kSets], sum_hi[kSets], sq_lo[kSets], sq_hi[kSets];
  for (int r = 0; r < kSets; ++r) sum_lo[r] = sum_hi[r] = sq_lo[r] = sq_hi[r] = splat_d8(0.0);
  for (; a + kSets <= e; a += kSets) {
    // 4 * 32 steps fill a 512-pixel tile: with ~460 labelled pixels a chunk
    // (K = 19, 10% ignored) the fill ends a little past the middle of the walk.
    if (kSets > 1 || (a & 1)) filler.step();
    for (int r = 0; r < kSets; ++r) {
      const float* row = tile + static_cast<int64_t>(order[a + r]) * kBlock;
      accumulate_on_fma(widen(row), s_lo, one, sum_lo[r], sq_lo[r]);
      accumulate_on_fma(widen(row + 8), s_hi, one, sum_hi[r], sq_hi[r]);
    }
  }
  for (int r = 0; a < e; ++a, ++r) {
    const float* row = tile + static_cast<int64_t>(order[a]) * kBlock;
    accumulate_on_fma(widen(row), s_lo, one, sum_lo[r], sq_lo[r]);
    accumulate_on_fma(widen(row + 8), s_hi, one, sum_hi[r], sq_hi[r]);
  }
  for (int r = 1; r < kSets; ++r) {
    sum_lo[0] += sum_lo[r];
    sum_hi[0] += sum_hi[r];
    sq_lo[0] += sq_lo[r];
    sq_hi[0] += sq_hi[r];
  }
  store_d8(sum, load_d8(sum) + sum_lo[0]);
  store_d8(sum + 8, load_d8(sum + 8) + sum_hi[0]);
  store_d8(sq, load_d8(sq) + (sq_lo[0] + sq_hi[0]));
}

// Channels [c0, c0 + 16) of float32 NCHW features: sum[k * 16 + j] += Σ x and
// sq[k * 8 + lane] += Σ (x − s)² over the plan's pixels of class k. next_c0:
// the first channel of the block this thread does next (its first chunks are
// prefetched at the end of this one), or -1.
template <int kSets>
void block16(const float* x, int64_t channels, int64_t hw, int64_t c0, int64_t next_c0, const Plan& plan,
             const double* shift, double* sum, double* sq) {
  alignas(64) float tiles[2][kChunk * kBlock];
  const int64_t chunks = static_cast<int64_t>(plan.chunks.size());
  auto plane_of = [&](int64_t chunk, int64_t first_channel) {
    return x + (plan.chunks[chunk].image * channels + first_channel) * hw;
  };
  // The fill of chunk c prefetches chunk c + 2 (two chunks of lead time),
  // running into the first chunks of the thread's next block.
  auto filler_for = [&](int64_t chunk) {
    TileFiller f;
    const Chunk& ch = plan.chunks[chunk];
    int64_t ahead = chunk + 2, ahead_c0 = c0;
    if (ahead >= chunks) {
      ahead -= chunks;
      ahead_c0 = next_c0;
    }
    if (ahead_c0 >= 0 && ahead < chunks) {
      f.ahead = plane_of(ahead, ahead_c0) + plan.chunks[ahead].p0;
      f.ahead_n = plan.chunks[ahead].n;
    }
    f.src = plane_of(chunk, c0) + ch.p0;
    f.tile = tiles[chunk & 1];
    f.hw = hw;
    f.steps = 4 * (ch.n / 16);
    return f;
  };
  // What the steps left: the rest of the full rows, then the partial ones.
  auto finish = [&](int64_t chunk, TileFiller& f) {
    while (f.step_index < f.steps) f.step();
    fill_tile(f.src, hw, plan.chunks[chunk].n, 2 * (f.steps / 4), kChunk / 8, f.tile, f.ahead, f.ahead_n);
  };
  if (chunks > 0) {
    TileFiller first = filler_for(0);
    finish(0, first);
  }
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const Chunk& ch = plan.chunks[chunk];
    const float* tile = tiles[chunk & 1];
    const uint16_t* order = plan.order.data() + ch.order_begin;
    const bool next = chunk + 1 < chunks;
    TileFiller filler = next ? filler_for(chunk + 1) : TileFiller{};
    for (int64_t r = ch.run_begin; r < ch.run_end; ++r) {
      const Run& run = plan.runs[r];
      walk_class<kSets>(tile, order, run.begin, run.end, shift + run.label * kBlock, sum + run.label * kBlock,
                        sq + run.label * 8, filler);
    }
    if (next) finish(chunk + 1, filler);
  }
}

// This instruction set's entry point (kRegisterSets: set by the includer).
void run(const float* x, int64_t channels, int64_t hw, int64_t c0, int64_t next_c0, const Plan& plan,
         const double* shift, double* sum, double* sq) {
  block16<kRegisterSets>(x, channels, hw, c0, next_c0, plan, shift, sum, sq);
}
