// MAD objective math shared by the CPU and CUDA kernels (host + device).
//
// The proxy's per-class NLL Jacobian G [K, D] enters every MAD quantity only
// through its Gram matrix M = G Gᵀ [K, K]:
//   Gᵀa · Gᵀb = aᵀ M b.
// Two representations of M are supported:
//   FC:    the last Linear layer, M = ‖h‖² (I − 1pᵀ − p1ᵀ + ‖p‖² 11ᵀ), so
//          aᵀMb = ‖h‖² (a − p·s_a)·(b − p·s_b) with s_a = Σa. p = nullptr, ‖h‖² = 1
//          gives M = I (the `disable_jacobian` / random / argmin case).
//   Dense: an explicit M [K, K] (from explicit Jacobians).
// For a candidate ỹ the oracle needs A = ỹᵀMỹ, C = ỹᵀMy and Y = yᵀMy:
//   angular   obj = ‖Gᵀỹ/‖Gᵀỹ‖ − Gᵀy/‖Gᵀy‖‖² = 2 − 2C/√(AY)
//   surrogate     = ‖Gᵀ(ỹ − y)‖² = A − 2C + Y
// A zero vector normalizes to zero (the reference divides by zero and gets NaN).
// Argmax-preserving vertices are ỹ = (1_S + w e_k*) / (|S| + w), w = 1e-5, k* ∈ S.
#pragma once

#include <cmath>
#include <cstdint>

#include "options.h"

#if defined(__CUDACC__)
#define PP_HD __host__ __device__ __forceinline__
#else
#define PP_HD inline
#endif

namespace ppoison {

constexpr double kVertexWeight = 1e-5;    // reference: up-weight of the top class in argmax vertices
constexpr double kGreedySmooth = 1e-8;    // reference: y smoothing in the greedy argmax oracle
constexpr double kAlphaEps = 1e-7;        // reference: denominator guard of the closed-form step
constexpr double kZeroRel = 1e-12;        // ‖Gᵀa‖² below this (relative) counts as a zero vector
constexpr double kTieRel = 1e-10;         // objective values this close (relative) are ties
constexpr int kLowBits = 6;               // exact argmax search: low rank bits tabulated per row
constexpr int kLowCount = 1 << kLowBits;

struct Quad {
  double A, C, Y;
  double zero_a;  // A at or below this is a zero vector: kZeroRel·scale·‖ỹ‖²
};

// True when v ties or beats best: ties go to the earlier candidate.
// The scale of the tie tolerance: relative to |best|, floored at 1 for the angular objective
// (its values lie in [0, 4]); the surrogate ‖Gᵀ(ỹ − y)‖² scales with the proxy's features, so
// its ties are purely relative (an absolute floor would make every small-feature row a tie).
PP_HD double tie_scale(double best, bool angular) {
  const double a = fabs(best);
  return angular && a < 1.0 ? 1.0 : a;
}

PP_HD bool tie_or_better(double v, double best, bool angular) {
  return v >= best - kTieRel * tie_scale(best, angular);
}

// Strictly better than best by more than the tie tolerance.
PP_HD bool strictly_better(double v, double best, bool angular) {
  return v > best + kTieRel * tie_scale(best, angular);
}

PP_HD double angular(const Quad& q, double zero_y) {
  bool u = q.A > q.zero_a, v = q.Y > zero_y;
  double r = (u ? 1.0 : 0.0) + (v ? 1.0 : 0.0);
  if (u && v) r -= 2.0 * q.C / (sqrt(q.A) * sqrt(q.Y));
  if (!(r == r)) return 0.0;  // overflow in huge inputs: no direction information
  return r < 0.0 ? 0.0 : (r > 4.0 ? 4.0 : r);
}

PP_HD double surrogate(const Quad& q) {
  double r = q.A - 2.0 * q.C + q.Y;
  if (!(r == r)) return 0.0;
  return r < 0.0 ? 0.0 : r;
}

// Free bit j (0 = most significant) of the lexicographic rank maps to class index.
PP_HD int free_index(int j, int kstar) { return j < kstar ? j : j + 1; }

// The exact argmax search splits a rank r into its low L = min(K − 1, kLowBits) bits (the
// last L free classes) and the rest ("high"). Per row it tabulates the 2^L subsets of the low
// classes; per block of 2^L ranks it sums the high part from scratch. Every vertex is then
// high part + table entry: a few roundings whatever K, the same bits on every visit.
PP_HD int low_index(int b, int nfree, int kstar) { return free_index(nfree - 1 - b, kstar); }

PP_HD int lowest_bit(int lo) {  // lo > 0
  int b = 0;
  while (!((lo >> b) & 1)) ++b;
  return b;
}

// Whether class i is in the high part {k*} ∪ {free_index(j) : j < nh, bit (nh − 1 − j) of hi}.
PP_HD bool in_high(int i, int kstar, int nh, int64_t hi) {
  if (i == kstar) return true;
  const int j = i < kstar ? i : i - 1;
  return j < nh && ((hi >> (nh - 1 - j)) & 1);
}

// Exact-search tables of the FC form: high part |S_h|, Σ p, Σ w_y; low subsets the same.
struct FcExact {
  int L, nh;
  int n_hi;
  double sp_hi, sw_hi;
  int cnt[kLowCount];
  double sp[kLowCount], sw[kLowCount];
};

// Running sums over a vertex set S for the FC form: |S|, Σ_S p, Σ_S w_y.
struct FcSet {
  int n;
  double sp, sw;
};

// FC (or identity) Gram of one sample. Works with the centred vectors
// w_a = a − p·s_a, so that Y = ‖w_y‖² keeps full precision when y ≈ p.
template <typename scalar_t>
struct FcGram {
  const scalar_t* y;
  const scalar_t* p;  // nullptr: identity Gram
  int K;
  double hsq, sy, p2, pw, wy2, zero_y;

  PP_HD double pk(int k) const { return p ? (double)p[k] : 0.0; }
  PP_HD double wy(int k) const { return (double)y[k] - pk(k) * sy; }

  PP_HD void init(const scalar_t* y_, const scalar_t* p_, double hsq_, int K_) {
    y = y_;
    p = p_;
    K = K_;
    hsq = hsq_;
    sy = 0.0;
    p2 = 0.0;
    double yy = 0.0;
    for (int k = 0; k < K; ++k) {
      double yk = (double)y[k], pv = pk(k);
      sy += yk;
      p2 += pv * pv;
      yy += yk * yk;
    }
    pw = 0.0;
    wy2 = 0.0;
    for (int k = 0; k < K; ++k) {
      double w = wy(k);
      pw += pk(k) * w;
      wy2 += w * w;
    }
    zero_y = kZeroRel * yy;
  }

  // Quadratic forms normalised by ‖h‖² (so the angular value is independent of h).
  PP_HD Quad single(int k) const {
    Quad q;
    q.A = 1.0 - 2.0 * pk(k) + p2;
    q.C = wy(k) - pw;
    q.Y = wy2;
    q.zero_a = kZeroRel;
    return q;
  }

  PP_HD Quad general(int n, double sp, double sw, int kstar, double w) const {
    double s = (double)n + w;
    double aa = (double)n + 2.0 * w + w * w;  // k* ∈ S
    double ap = sp + w * pk(kstar);
    Quad q;
    q.A = (aa - 2.0 * s * ap + s * s * p2) / (s * s);
    q.C = (sw + w * wy(kstar) - s * pw) / s;
    q.Y = wy2;
    q.zero_a = kZeroRel * aa / (s * s);
    return q;
  }

  using Exact = FcExact;

  PP_HD void exact_begin(FcExact& e, int kstar) const {
    const int nfree = K - 1;
    e.L = nfree < kLowBits ? nfree : kLowBits;
    e.nh = nfree - e.L;
    e.cnt[0] = 0;
    e.sp[0] = 0.0;
    e.sw[0] = 0.0;
    for (int lo = 1; lo < (1 << e.L); ++lo) {
      const int prev = lo & (lo - 1), k = low_index(lowest_bit(lo), nfree, kstar);
      e.cnt[lo] = e.cnt[prev] + 1;
      e.sp[lo] = e.sp[prev] + pk(k);
      e.sw[lo] = e.sw[prev] + wy(k);
    }
  }
  PP_HD void exact_block(FcExact& e, int kstar, int64_t hi) const {
    e.n_hi = 0;
    e.sp_hi = 0.0;
    e.sw_hi = 0.0;
    for (int i = 0; i < K; ++i) {
      if (!in_high(i, kstar, e.nh, hi)) continue;
      e.n_hi += 1;
      e.sp_hi += pk(i);
      e.sw_hi += wy(i);
    }
  }
  PP_HD Quad exact_vertex(const FcExact& e, int lo, int kstar, double w) const {
    return general(e.n_hi + e.cnt[lo], e.sp_hi + e.sp[lo], e.sw_hi + e.sw[lo], kstar, w);
  }

  PP_HD FcSet empty_set() const { return FcSet{0, 0.0, 0.0}; }
  PP_HD void add(FcSet& s, int k) const {
    s.n += 1;
    s.sp += pk(k);
    s.sw += wy(k);
  }
  PP_HD void remove(FcSet& s, int k) const {
    s.n -= 1;
    s.sp -= pk(k);
    s.sw -= wy(k);
  }
  PP_HD Quad vertex(const FcSet& s, int kstar, double w) const { return general(s.n, s.sp, s.sw, kstar, w); }
  PP_HD Quad vertex_plus(const FcSet& s, int c, int kstar, double w) const {
    return general(s.n + 1, s.sp + pk(c), s.sw + wy(c), kstar, w);
  }

  PP_HD double value(const Quad& q, bool objmax) const {
    if (!(hsq > 0.0)) return 0.0;  // G = 0: every direction is the zero vector
    return objmax ? angular(q, zero_y) : hsq * surrogate(q);
  }
};

// Exact-search tables of a dense Gram, S = S_h ∪ S_l: |S|, 1_SᵀM1_S = t_h + 2·1_lᵀ(M1_h) + t_l,
// (M1_S)_k* and 1_SᵀMy, each split into the high part and a low-subset table; c = M1_h on the
// low classes, cross = its low-subset sums.
struct DenseExact {
  int L, nh;
  int n_hi;
  double t_hi, rk_hi, q_hi;
  double c[kLowBits];
  int cnt[kLowCount];
  double t[kLowCount], rk[kLowCount], q[kLowCount], cross[kLowCount];
};

// Running state over a vertex set S for a dense Gram: |S|, 1_SᵀM1_S, 1_SᵀMy and r = M1_S.
struct DenseSet {
  int n;
  double t, q;
  double* r;  // K entries of scratch
};

template <typename scalar_t>
struct DenseGram {
  const scalar_t* y;
  const scalar_t* M;  // [K, K], symmetric
  int K;
  double* my;  // K entries of scratch: M y
  double yy, scale, zero_y;  // scale = trace(M)/K

  PP_HD double m(int i, int j) const { return (double)M[(int64_t)i * K + j]; }

  PP_HD void init(const scalar_t* y_, const scalar_t* M_, int K_, double* my_scratch) {
    y = y_;
    M = M_;
    K = K_;
    my = my_scratch;
    double trace = 0.0, ny = 0.0;
    yy = 0.0;
    for (int i = 0; i < K; ++i) {
      double acc = 0.0;
      for (int j = 0; j < K; ++j) acc += m(i, j) * (double)y[j];
      my[i] = acc;
      yy += (double)y[i] * acc;
      trace += m(i, i);
      ny += (double)y[i] * (double)y[i];
    }
    scale = (trace > 0.0 ? trace : 0.0) / K;
    zero_y = kZeroRel * scale * ny;
  }

  PP_HD Quad single(int k) const {
    Quad q;
    q.A = m(k, k);
    q.C = my[k];
    q.Y = yy;
    q.zero_a = kZeroRel * scale;
    return q;
  }

  using Exact = DenseExact;

  PP_HD void exact_begin(DenseExact& e, int kstar) const {
    const int nfree = K - 1;
    e.L = nfree < kLowBits ? nfree : kLowBits;
    e.nh = nfree - e.L;
    e.cnt[0] = 0;
    e.t[0] = 0.0;
    e.rk[0] = 0.0;
    e.q[0] = 0.0;
    for (int lo = 1; lo < (1 << e.L); ++lo) {
      const int b = lowest_bit(lo), prev = lo & (lo - 1), k = low_index(b, nfree, kstar);
      double rl = 0.0;  // (M 1_prev)_k
      for (int bb = b + 1; bb < e.L; ++bb)
        if ((prev >> bb) & 1) rl += m(k, low_index(bb, nfree, kstar));
      e.cnt[lo] = e.cnt[prev] + 1;
      e.t[lo] = e.t[prev] + 2.0 * rl + m(k, k);
      e.rk[lo] = e.rk[prev] + m(kstar, k);
      e.q[lo] = e.q[prev] + my[k];
    }
  }
  PP_HD void exact_block(DenseExact& e, int kstar, int64_t hi) const {
    const int nfree = K - 1;
    e.n_hi = 0;
    e.t_hi = 0.0;
    e.rk_hi = 0.0;
    e.q_hi = 0.0;
    for (int b = 0; b < e.L; ++b) e.c[b] = 0.0;
    for (int i = 0; i < K; ++i) {
      if (!in_high(i, kstar, e.nh, hi)) continue;
      double ri = 0.0;  // (M 1_h)_i
      for (int j = 0; j < K; ++j)
        if (in_high(j, kstar, e.nh, hi)) ri += m(i, j);
      e.n_hi += 1;
      e.t_hi += ri;
      e.rk_hi += m(kstar, i);
      e.q_hi += my[i];
      for (int b = 0; b < e.L; ++b) e.c[b] += m(low_index(b, nfree, kstar), i);
    }
    e.cross[0] = 0.0;
    for (int lo = 1; lo < (1 << e.L); ++lo) e.cross[lo] = e.cross[lo & (lo - 1)] + e.c[lowest_bit(lo)];
  }
  PP_HD Quad exact_vertex(const DenseExact& e, int lo, int kstar, double w) const {
    return general(e.n_hi + e.cnt[lo], e.t_hi + 2.0 * e.cross[lo] + e.t[lo], e.rk_hi + e.rk[lo], e.q_hi + e.q[lo],
                   kstar, w);
  }

  PP_HD DenseSet empty_set(double* r) const {
    for (int i = 0; i < K; ++i) r[i] = 0.0;
    return DenseSet{0, 0.0, 0.0, r};
  }
  PP_HD void add(DenseSet& s, int k) const {
    s.t += 2.0 * s.r[k] + m(k, k);
    for (int i = 0; i < K; ++i) s.r[i] += m(i, k);
    s.q += my[k];
    s.n += 1;
  }
  PP_HD void remove(DenseSet& s, int k) const {
    for (int i = 0; i < K; ++i) s.r[i] -= m(i, k);
    s.t -= 2.0 * s.r[k] + m(k, k);
    s.q -= my[k];
    s.n -= 1;
  }
  PP_HD Quad general(int n, double t, double rk, double q, int kstar, double w) const {
    double s = (double)n + w;
    Quad out;
    out.A = (t + 2.0 * w * rk + w * w * m(kstar, kstar)) / (s * s);
    out.C = (q + w * my[kstar]) / s;
    out.Y = yy;
    out.zero_a = kZeroRel * scale * ((double)n + 2.0 * w + w * w) / (s * s);
    return out;
  }
  PP_HD Quad vertex(const DenseSet& s, int kstar, double w) const {
    return general(s.n, s.t, s.r[kstar], s.q, kstar, w);
  }
  PP_HD Quad vertex_plus(const DenseSet& s, int c, int kstar, double w) const {
    return general(s.n + 1, s.t + 2.0 * s.r[c] + m(c, c), s.r[kstar] + m(kstar, c), s.q + my[c], kstar, w);
  }

  PP_HD double value(const Quad& q, bool objmax) const {
    return objmax ? angular(q, zero_y) : surrogate(q);
  }
};

template <typename scalar_t>
PP_HD int argmax_first(const scalar_t* v, int K) {
  int best = 0;
  for (int k = 1; k < K; ++k)
    if (v[k] > v[best]) best = k;
  return best;
}

template <typename scalar_t>
PP_HD int argmin_first(const scalar_t* v, int K) {
  int best = 0;
  for (int k = 1; k < K; ++k)
    if (v[k] < v[best]) best = k;
  return best;
}

// `extreme`: best one-hot vertex e_k; first index wins ties. The first pass finds the first
// maximum kmax; the second returns the first k ≤ kmax that ties it (kmax itself at the latest).
template <typename Gram>
PP_HD int oracle_extreme(const Gram& g, bool objmax, double* value) {
  int kmax = 0;
  double best = g.value(g.single(0), objmax);
  for (int k = 1; k < g.K; ++k) {
    double v = g.value(g.single(k), objmax);
    if (v > best) {
      best = v;
      kmax = k;
    }
  }
  for (int k = 0; k < kmax; ++k) {
    double v = g.value(g.single(k), objmax);
    if (tie_or_better(v, best, objmax)) {
      *value = v;
      return k;
    }
  }
  *value = best;
  return kmax;
}

// Scores the vertices of ranks 0 .. limit−1 (limit ≥ 1); the value of a rank depends on the
// rank alone (tables in e, from exact_begin). first_tie = false: returns the first maximum
// (rank and value). first_tie = true: stops at the first rank whose value ties `best` and
// returns it; when none does, returns `limit` with *value = best.
template <typename Gram>
PP_HD int64_t scan_vertices(const Gram& g, typename Gram::Exact& e, int kstar, bool objmax, int64_t limit,
                            bool first_tie, double best, double* value) {
  const int64_t low_mask = ((int64_t)1 << e.L) - 1;
  int64_t found = limit;
  double found_v = best;
  for (int64_t r = 0; r < limit; ++r) {
    const int lo = (int)(r & low_mask);
    if (lo == 0) g.exact_block(e, kstar, r >> e.L);
    const double v = g.value(g.exact_vertex(e, lo, kstar, kVertexWeight), objmax);
    if (first_tie ? tie_or_better(v, best, objmax) : (r == 0 || v > found_v)) {
      found = r;
      found_v = v;
      if (first_tie) break;
    }
  }
  *value = found_v;
  return found;
}

// Exact argmax-preserving oracle: every vertex containing k*, in the order of
// itertools.product([0, 1], repeat=K) (the reference's), first maximum wins: the first rank
// whose value ties the maximum. Pass 1 finds the first maximum rmax; pass 2 rescores ranks
// 0 .. rmax−1, to the same values, and takes the first tie, else rmax. Returns the winning
// rank; bit (K-2-j) of the rank says whether free_index(j) ∈ S.
template <typename Gram>
PP_HD int64_t oracle_argmax_exact(const Gram& g, int kstar, bool objmax, double* value) {
  typename Gram::Exact e;
  g.exact_begin(e, kstar);
  const int64_t count = (int64_t)1 << (g.K - 1);
  double best = 0.0;
  const int64_t rmax = scan_vertices(g, e, kstar, objmax, count, false, 0.0, &best);
  if (rmax == 0) {
    *value = best;
    return 0;
  }
  return scan_vertices(g, e, kstar, objmax, rmax, true, best, value);
}

// Greedy argmax-preserving oracle (the reference's search for large K): grow S from
// {k*} one class at a time, scoring every S ∪ {c}; keep the global best vertex.
// Stops once `max_candidates` vertices were scored or S holds every class (the
// reference crashes there for 11 ≤ K ≤ 45). `in_set` and `order` are K-entry scratch.
// Returns the number of added classes t and the last class c of the best vertex:
// best = {k*} ∪ order[0..t) ∪ {c}.
template <typename Gram, typename Set>
PP_HD void oracle_argmax_greedy(const Gram& g, Set cur, int kstar, bool objmax, int64_t max_candidates,
                                unsigned char* in_set, int* order, int* best_t, int* best_c, double* value) {
  const int K = g.K;
  for (int k = 0; k < K; ++k) in_set[k] = 0;
  g.add(cur, kstar);
  in_set[kstar] = 1;
  double best = -1.0;
  *best_t = 0;
  *best_c = kstar;
  int64_t scored = 0;
  int t = 0;
  while (scored < max_candidates && cur.n < K) {
    // First maximum it_c of this step (cur.n < K: some class is left), then the first
    // class before it that ties it.
    int it_c = -1;
    double it_v = 0.0;
    for (int c = 0; c < K; ++c) {
      if (in_set[c]) continue;
      double v = g.value(g.vertex_plus(cur, c, kstar, kVertexWeight), objmax);
      if (it_c < 0 || v > it_v) {
        it_c = c;
        it_v = v;
      }
      ++scored;
    }
    for (int c = 0; c < it_c; ++c) {
      if (in_set[c]) continue;
      double v = g.value(g.vertex_plus(cur, c, kstar, kVertexWeight), objmax);
      if (tie_or_better(v, it_v, objmax)) {
        it_c = c;
        it_v = v;
        break;
      }
    }
    if (strictly_better(it_v, best, objmax)) {
      best = it_v;
      *best_t = t;
      *best_c = it_c;
    }
    g.add(cur, it_c);
    in_set[it_c] = 1;
    order[t++] = it_c;
  }
  *value = best;
}

// Marks S for the exact oracle's rank r: k* plus free_index(j) for each set bit (K−2−j).
PP_HD void mask_from_rank(int64_t r, int K, int kstar, unsigned char* mask) {
  const int nfree = K - 1;
  for (int k = 0; k < K; ++k) mask[k] = 0;
  mask[kstar] = 1;
  for (int j = 0; j < nfree; ++j)
    if ((r >> (nfree - 1 - j)) & 1) mask[free_index(j, kstar)] = 1;
}

// y* = (1_S + w e_k*) / (|S| + w), the reference's argmax-preserving vertex.
template <typename scalar_t>
PP_HD void write_vertex(const unsigned char* mask, int K, int kstar, scalar_t* out) {
  int n = 0;
  for (int k = 0; k < K; ++k) n += mask[k] ? 1 : 0;
  double s = (double)n + kVertexWeight;
  for (int k = 0; k < K; ++k)
    out[k] = (scalar_t)(mask[k] ? ((k == kstar ? 1.0 + kVertexWeight : 1.0) / s) : 0.0);
}

// Angular objective and surrogate of an arbitrary ỹ against y, FC/identity Gram.
template <typename scalar_t>
PP_HD void objective_fc(const scalar_t* yt, const scalar_t* y, const scalar_t* p, double hsq, int K, double* obj,
                        double* sur) {
  double st = 0.0, sy = 0.0, tt = 0.0, yy = 0.0;
  for (int k = 0; k < K; ++k) {
    double a = (double)yt[k], b = (double)y[k];
    st += a;
    sy += b;
    tt += a * a;
    yy += b * b;
  }
  double A = 0.0, C = 0.0, Y = 0.0, D = 0.0;
  for (int k = 0; k < K; ++k) {
    double pk = p ? (double)p[k] : 0.0;
    double wt = (double)yt[k] - pk * st, wy = (double)y[k] - pk * sy, d = wt - wy;
    A += wt * wt;
    C += wt * wy;
    Y += wy * wy;
    D += d * d;
  }
  if (!(hsq > 0.0)) {
    *obj = 0.0;
    *sur = 0.0;
    return;
  }
  *obj = angular(Quad{A, C, Y, kZeroRel * tt}, kZeroRel * yy);
  *sur = hsq * D;
}

// Angular objective and surrogate of an arbitrary ỹ against y, dense Gram M [K, K].
template <typename scalar_t>
PP_HD void objective_dense(const scalar_t* yt, const scalar_t* y, const scalar_t* M, int K, double* obj,
                           double* sur) {
  double A = 0.0, C = 0.0, Y = 0.0, D = 0.0, tr = 0.0, tt = 0.0, yy = 0.0;
  for (int i = 0; i < K; ++i) {
    double mt = 0.0, my = 0.0;
    for (int j = 0; j < K; ++j) {
      double m = (double)M[(int64_t)i * K + j];
      mt += m * (double)yt[j];
      my += m * (double)y[j];
    }
    double a = (double)yt[i], b = (double)y[i];
    A += a * mt;
    C += a * my;
    Y += b * my;
    D += (a - b) * (mt - my);
    tr += (double)M[(int64_t)i * K + i];
    tt += a * a;
    yy += b * b;
  }
  double scale = (tr > 0.0 ? tr : 0.0) / K;
  *obj = angular(Quad{A, C, Y, kZeroRel * scale * tt}, kZeroRel * scale * yy);
  *sur = D > 0.0 ? D : 0.0;
}

// KL(y ‖ (1−α) y + α y*), with 0·log 0 = 0 and +inf where y_k > 0 = h_k.
template <typename scalar_t>
PP_HD double kl_to_mix(const scalar_t* y, const scalar_t* ys, int K, double alpha) {
  double acc = 0.0;
  for (int k = 0; k < K; ++k) {
    double yk = (double)y[k];
    if (yk <= 0.0) continue;
    double h = (1.0 - alpha) * yk + alpha * (double)ys[k];
    if (!(h > 0.0)) return INFINITY;
    acc += yk * (log(yk) - log(h));
  }
  return acc;
}

// One entry of ỹ = (1 − α) y + α y* in the output dtype, kept > 0 where y_k > 0: a positive
// entry that underflows to zero would make KL(y‖ỹ) infinite.
template <typename scalar_t>
PP_HD scalar_t mix_entry(scalar_t yk, scalar_t sk, double alpha) {
  scalar_t v = (scalar_t)((1.0 - alpha) * (double)yk + alpha * (double)sk);
  if (v == (scalar_t)0 && yk > (scalar_t)0) v = (scalar_t)(sizeof(scalar_t) == 4 ? 1.401298464324817e-45 : 4.9406564584124654e-324);
  return v;
}

// Step size of the reference's line search toward y*.
template <typename scalar_t>
PP_HD double step_alpha(const scalar_t* y, const scalar_t* ys, int K, double eps, YDist dist, int kl_steps) {
  if (dist == YDist::KL) {
    // ε = 0 stays at y: with rounded (not exactly normalised) inputs a tiny step can
    // have a KL that rounds below zero.
    if (eps <= 0.0) return 0.0;
    if (kl_to_mix(y, ys, K, 1.0) <= eps) return 1.0;
    double lo = 0.0, hi = 1.0, alpha = 0.0;
    for (int i = 0; i < kl_steps; ++i) {
      double mid = 0.5 * (lo + hi);
      if (kl_to_mix(y, ys, K, mid) <= eps) {
        lo = mid;
        alpha = mid;
      } else {
        hi = mid;
      }
    }
    return alpha;
  }
  double norm = 0.0;
  for (int k = 0; k < K; ++k) {
    double d = (double)y[k] - (double)ys[k];
    norm += dist == YDist::L1 ? fabs(d) : d * d;
  }
  if (dist == YDist::L2) norm = sqrt(norm);
  double alpha = eps / (norm + kAlphaEps);
  return alpha < 0.0 ? 0.0 : (alpha > 1.0 ? 1.0 : alpha);
}

// One row of mad_step: ỹ = (1 − α) y + α y* with α = step_alpha.
template <typename scalar_t>
PP_HD void step_row(const scalar_t* y, const scalar_t* ys, int K, double eps, YDist dist, int kl_steps,
                    scalar_t* out) {
  const double alpha = step_alpha(y, ys, K, eps, dist, kl_steps);
  for (int k = 0; k < K; ++k) out[k] = mix_entry(y[k], ys[k], alpha);
}

}  // namespace ppoison
