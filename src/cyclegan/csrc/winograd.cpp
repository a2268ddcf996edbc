// Winograd F(4x4, 3x3) transforms (Lavin & Gray 2016) for a stride-1, unpadded 3x3 convolution
// of an already padded input. The convolution becomes 36 independent matrix products, one per
// position p of the 6x6 tile: M[p] = V[p] @ U[p]^T (torch.bmm), V the transformed input tiles
// [36, tiles, C], U the transformed filters [36, K, C]. These kernels move data into and out of
// that domain, and back for autograd, as loops over contiguous vectors that the compiler
// vectorises.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

using f32 = float;
#define R __restrict__

// Rows of B^T: v = B^T d for 6 vectors d0..d5 (elementwise over n).
inline void bt6(const f32* R d0, const f32* R d1, const f32* R d2, const f32* R d3, const f32* R d4,
                const f32* R d5, f32* R v0, f32* R v1, f32* R v2, f32* R v3, f32* R v4, f32* R v5,
                int64_t n) {
  for (int64_t q = 0; q < n; ++q) {
    const f32 a = d0[q], b = d1[q], c = d2[q], d = d3[q], e = d4[q], f = d5[q];
    v0[q] = 4 * a - 5 * c + e;
    v1[q] = -4 * b - 4 * c + d + e;
    v2[q] = 4 * b - 4 * c - d + e;
    v3[q] = -2 * b - c + 2 * d + e;
    v4[q] = 2 * b - c - 2 * d + e;
    v5[q] = 4 * b - 5 * d + f;
  }
}

// Its adjoint: d = B v (the rows of B^T, transposed).
inline void b6(const f32* R g0, const f32* R g1, const f32* R g2, const f32* R g3, const f32* R g4,
               const f32* R g5, f32* R d0, f32* R d1, f32* R d2, f32* R d3, f32* R d4, f32* R d5,
               int64_t n) {
  for (int64_t q = 0; q < n; ++q) {
    const f32 a = g0[q], b = g1[q], c = g2[q], d = g3[q], e = g4[q], f = g5[q];
    d0[q] = 4 * a;
    d1[q] = -4 * b + 4 * c - 2 * d + 2 * e + 4 * f;
    d2[q] = -5 * a - 4 * b - 4 * c - d - e;
    d3[q] = b - c + 2 * d - 2 * e - 5 * f;
    d4[q] = a + b + c + d + e;
    d5[q] = f;
  }
}

// y = A^T m: 6 vectors to 4.
inline void at4(const f32* R m0, const f32* R m1, const f32* R m2, const f32* R m3, const f32* R m4,
                const f32* R m5, f32* R y0, f32* R y1, f32* R y2, f32* R y3, int64_t n) {
  for (int64_t q = 0; q < n; ++q) {
    const f32 a = m0[q], b = m1[q], c = m2[q], d = m3[q], e = m4[q], f = m5[q];
    y0[q] = a + b + c + d + e;
    y1[q] = b - c + 2 * d - 2 * e;
    y2[q] = b + c + 4 * d + 4 * e;
    y3[q] = b - c + 8 * d - 8 * e + f;
  }
}

// Its adjoint: m = A g, 4 vectors to 6.
inline void a6(const f32* R g0, const f32* R g1, const f32* R g2, const f32* R g3, f32* R m0, f32* R m1,
               f32* R m2, f32* R m3, f32* R m4, f32* R m5, int64_t n) {
  for (int64_t q = 0; q < n; ++q) {
    const f32 a = g0[q], b = g1[q], c = g2[q], d = g3[q];
    m0[q] = a;
    m1[q] = a + b + c + d;
    m2[q] = a - b + c - d;
    m3[q] = a + 2 * b + 4 * c + 8 * d;
    m4[q] = a - 2 * b + 4 * c - 8 * d;
    m5[q] = d;
  }
}

constexpr f32 G[6][3] = {{1.f / 4, 0, 0}, {-1.f / 6, -1.f / 6, -1.f / 6}, {-1.f / 6, 1.f / 6, -1.f / 6},
                         {1.f / 24, 1.f / 12, 1.f / 6}, {1.f / 24, -1.f / 12, 1.f / 6}, {0, 0, 1}};

inline int64_t ceil4(int64_t v) { return (v + 3) / 4; }

void check(const torch::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.dim() == dim, name,
              ": expected a ", dim, "-d float32 CPU tensor");
}

// Tile geometry of an output of h x w: th x tw tiles of 4x4, reading (4 th + 2) x (4 tw + 2)
// input pixels, those past the image taken as zeros.
struct Tiles {
  int64_t th, tw;
  Tiles(int64_t h, int64_t w) : th(ceil4(h)), tw(ceil4(w)) {}
  int64_t count() const { return th * tw; }
};

}  // namespace

// The data transforms work channels-last: every operation is on a contiguous vector of C (or K)
// floats, one per pixel. Tiles are independent, except that neighbouring input tiles overlap by
// 2 pixels, which the input adjoint sums.

// xT [N, Hp, Wp, C] -> Vt [36, N * T, C].
torch::Tensor input_transform_nhwc(const torch::Tensor& xT_in) {
  check(xT_in, 4, "input_transform_nhwc");
  auto xT = xT_in.contiguous();
  const int64_t N = xT.size(0), Hp = xT.size(1), Wp = xT.size(2), C = xT.size(3);
  const Tiles t(Hp - 2, Wp - 2);
  const int64_t T = t.count(), NT = N * T;
  auto V = torch::empty({36, NT, C}, xT.options());
  const f32* x = xT.data_ptr<f32>();
  f32* v = V.data_ptr<f32>();
  at::parallel_for(0, NT, 1, [&](int64_t begin, int64_t end) {
    std::vector<f32> zero(C, 0.f), tmp(36 * C);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = tile / T, ty = (tile % T) / t.tw, tx = tile % t.tw;
      auto in = [&](int i, int j) -> const f32* {
        const int64_t y = 4 * ty + i, xx = 4 * tx + j;
        return (y < Hp && xx < Wp) ? x + ((n * Hp + y) * Wp + xx) * C : zero.data();
      };
      for (int j = 0; j < 6; ++j) {  // tmp[a][j] = sum_i B^T[a][i] d[i][j]
        f32* o = tmp.data() + j * C;
        bt6(in(0, j), in(1, j), in(2, j), in(3, j), in(4, j), in(5, j), o, o + 6 * C, o + 12 * C,
            o + 18 * C, o + 24 * C, o + 30 * C, C);
      }
      for (int a = 0; a < 6; ++a) {  // V[a][b] = sum_j tmp[a][j] B[j][b]
        const f32* r = tmp.data() + a * 6 * C;
        f32* o = v + ((a * 6) * NT + tile) * C;
        const int64_t s = NT * C;
        bt6(r, r + C, r + 2 * C, r + 3 * C, r + 4 * C, r + 5 * C, o, o + s, o + 2 * s, o + 3 * s, o + 4 * s,
            o + 5 * s, C);
      }
    }
  });
  return V;
}

// The adjoint: gVt [36, N * T, C] -> gxT [N, Hp, Wp, C]. Tile rows ty and ty + 1 overlap, so
// even rows run first (in parallel), then odd ones; a tile row is one thread's, left to right.
torch::Tensor input_transform_nhwc_backward(const torch::Tensor& gV_in, int64_t N, int64_t Hp, int64_t Wp) {
  check(gV_in, 3, "input_transform_nhwc_backward");
  auto gV = gV_in.contiguous();
  const int64_t C = gV.size(2);
  const Tiles t(Hp - 2, Wp - 2);
  const int64_t T = t.count(), NT = N * T;
  TORCH_CHECK(gV.size(0) == 36 && gV.size(1) == NT, "input_transform_nhwc_backward: shape mismatch");
  auto gx = torch::zeros({N, Hp, Wp, C}, gV.options());
  const f32* g = gV.data_ptr<f32>();
  f32* x = gx.data_ptr<f32>();
  const int64_t rows = N * t.th;
  for (int parity = 0; parity < 2; ++parity) {
    at::parallel_for(0, (rows + 1 - parity) / 2, 1, [&](int64_t begin, int64_t end) {
      std::vector<f32> tmp(36 * C), d(6 * C);
      for (int64_t k = begin; k < end; ++k) {
        const int64_t row = 2 * k + parity, n = row / t.th, ty = row % t.th;
        for (int64_t tx = 0; tx < t.tw; ++tx) {
          const int64_t tile = n * T + ty * t.tw + tx;
          const int64_t s = NT * C;
          for (int a = 0; a < 6; ++a) {  // tmp[a][j] = sum_b gV[a][b] B^T[b][j]
            const f32* gi = g + ((a * 6) * NT + tile) * C;
            f32* o = tmp.data() + a * 6 * C;
            b6(gi, gi + s, gi + 2 * s, gi + 3 * s, gi + 4 * s, gi + 5 * s, o, o + C, o + 2 * C, o + 3 * C,
               o + 4 * C, o + 5 * C, C);
          }
          for (int j = 0; j < 6; ++j) {  // gd[i][j] = sum_a B[i][a] tmp[a][j], summed into gx
            const int64_t xx = 4 * tx + j;
            const f32* r = tmp.data() + j * C;
            f32* o = d.data();
            b6(r, r + 6 * C, r + 12 * C, r + 18 * C, r + 24 * C, r + 30 * C, o, o + C, o + 2 * C, o + 3 * C,
               o + 4 * C, o + 5 * C, C);
            if (xx >= Wp) continue;
            for (int i = 0; i < 6; ++i) {
              const int64_t y = 4 * ty + i;
              if (y >= Hp) break;
              f32* dst = x + ((n * Hp + y) * Wp + xx) * C;
              const f32* src = d.data() + i * C;
              for (int64_t c = 0; c < C; ++c) dst[c] += src[c];
            }
          }
        }
      }
    });
  }
  return gx;
}

// Mt [36, N * T, K] -> YT [N, H, W, K].
torch::Tensor output_transform_nhwc(const torch::Tensor& M_in, int64_t N, int64_t H, int64_t Wd) {
  check(M_in, 3, "output_transform_nhwc");
  auto M = M_in.contiguous();
  const int64_t K = M.size(2);
  const Tiles t(H, Wd);
  const int64_t T = t.count(), NT = N * T;
  TORCH_CHECK(M.size(0) == 36 && M.size(1) == NT, "output_transform_nhwc: shape mismatch");
  auto Y = torch::empty({N, H, Wd, K}, M.options());
  const f32* m = M.data_ptr<f32>();
  f32* y = Y.data_ptr<f32>();
  at::parallel_for(0, NT, 1, [&](int64_t begin, int64_t end) {
    std::vector<f32> tmp(24 * K), scratch(K);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = tile / T, ty = (tile % T) / t.tw, tx = tile % t.tw;
      const int64_t s = NT * K;
      for (int a = 0; a < 6; ++a) {  // tmp[a][q] = sum_b m[a][b] A[b][q]
        const f32* mi = m + ((a * 6) * NT + tile) * K;
        f32* o = tmp.data() + a * 4 * K;
        at4(mi, mi + s, mi + 2 * s, mi + 3 * s, mi + 4 * s, mi + 5 * s, o, o + K, o + 2 * K, o + 3 * K, K);
      }
      auto out = [&](int p, int q) -> f32* {
        const int64_t row = 4 * ty + p, col = 4 * tx + q;
        return (row < H && col < Wd) ? y + ((n * H + row) * Wd + col) * K : scratch.data();
      };
      for (int q = 0; q < 4; ++q) {  // y[p][q] = sum_a A^T[p][a] tmp[a][q]
        const f32* r = tmp.data() + q * K;
        at4(r, r + 4 * K, r + 8 * K, r + 12 * K, r + 16 * K, r + 20 * K, out(0, q), out(1, q), out(2, q),
            out(3, q), K);
      }
    }
  });
  return Y;
}

// The adjoint: gYT [N, H, W, K] -> gMt [36, N * T, K].
torch::Tensor output_transform_nhwc_backward(const torch::Tensor& gY_in) {
  check(gY_in, 4, "output_transform_nhwc_backward");
  auto gY = gY_in.contiguous();
  const int64_t N = gY.size(0), H = gY.size(1), Wd = gY.size(2), K = gY.size(3);
  const Tiles t(H, Wd);
  const int64_t T = t.count(), NT = N * T;
  auto gM = torch::empty({36, NT, K}, gY.options());
  const f32* g = gY.data_ptr<f32>();
  f32* m = gM.data_ptr<f32>();
  at::parallel_for(0, NT, 1, [&](int64_t begin, int64_t end) {
    std::vector<f32> tmp(24 * K), zero(K, 0.f);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = tile / T, ty = (tile % T) / t.tw, tx = tile % t.tw;
      auto in = [&](int p, int q) -> const f32* {
        const int64_t row = 4 * ty + p, col = 4 * tx + q;
        return (row < H && col < Wd) ? g + ((n * H + row) * Wd + col) * K : zero.data();
      };
      for (int q = 0; q < 4; ++q) {  // tmp[a][q] = sum_p A[a][p] g[p][q]
        f32* o = tmp.data() + q * K;
        a6(in(0, q), in(1, q), in(2, q), in(3, q), o, o + 4 * K, o + 8 * K, o + 12 * K, o + 16 * K, o + 20 * K, K);
      }
      const int64_t s = NT * K;
      for (int a = 0; a < 6; ++a) {  // gM[a][b] = sum_q tmp[a][q] A^T[q][b]
        const f32* r = tmp.data() + a * 4 * K;
        f32* o = m + ((a * 6) * NT + tile) * K;
        a6(r, r + K, r + 2 * K, r + 3 * K, o, o + s, o + 2 * s, o + 3 * s, o + 4 * s, o + 5 * s, K);
      }
    }
  });
  return gM;
}

// w [K, C, 3, 3] -> U [36, K, C] = G w G^T per filter, in blocks of filters for contiguous stores.
torch::Tensor weight_transform(const torch::Tensor& w_in) {
  check(w_in, 4, "weight_transform");
  auto w = w_in.contiguous();
  const int64_t KC = w.size(0) * w.size(1);
  auto U = torch::empty({36, w.size(0), w.size(1)}, w.options());
  const f32* src = w.data_ptr<f32>();
  f32* u = U.data_ptr<f32>();
  constexpr int64_t B = 64;
  at::parallel_for(0, (KC + B - 1) / B, 1, [&](int64_t begin, int64_t end) {
    f32 f[9][B], tt[6][3][B];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t k0 = blk * B, n = std::min(B, KC - k0);
      for (int64_t i = 0; i < n; ++i)
        for (int e = 0; e < 9; ++e) f[e][i] = src[(k0 + i) * 9 + e];
      for (int a = 0; a < 6; ++a)
        for (int j = 0; j < 3; ++j)
          for (int64_t i = 0; i < n; ++i) tt[a][j][i] = G[a][0] * f[j][i] + G[a][1] * f[3 + j][i] + G[a][2] * f[6 + j][i];
      for (int a = 0; a < 6; ++a)
        for (int b = 0; b < 6; ++b) {
          f32* o = u + (a * 6 + b) * KC + k0;
          for (int64_t i = 0; i < n; ++i) o[i] = tt[a][0][i] * G[b][0] + tt[a][1][i] * G[b][1] + tt[a][2][i] * G[b][2];
        }
    }
  });
  return U;
}

// The adjoint of weight_transform: gU [36, K, C] -> gw [K, C, 3, 3] = G^T gU G.
torch::Tensor weight_transform_backward(const torch::Tensor& gU_in) {
  check(gU_in, 3, "weight_transform_backward");
  auto gU = gU_in.contiguous();
  const int64_t K = gU.size(1), C = gU.size(2), KC = K * C;
  auto gw = torch::empty({K, C, 3, 3}, gU.options());
  const f32* g = gU.data_ptr<f32>();
  f32* out = gw.data_ptr<f32>();
  constexpr int64_t B = 64;
  at::parallel_for(0, (KC + B - 1) / B, 1, [&](int64_t begin, int64_t end) {
    f32 tt[6][3][B], f[9][B];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t k0 = blk * B, n = std::min(B, KC - k0);
      for (int a = 0; a < 6; ++a) {  // tt[a][j] = sum_b gU[a][b] G[b][j]
        for (int j = 0; j < 3; ++j)
          for (int64_t i = 0; i < n; ++i) tt[a][j][i] = 0.f;
        for (int b = 0; b < 6; ++b) {
          const f32* gi = g + (a * 6 + b) * KC + k0;
          for (int j = 0; j < 3; ++j) {
            const f32 c = G[b][j];
            if (c == 0.f) continue;
            for (int64_t i = 0; i < n; ++i) tt[a][j][i] += c * gi[i];
          }
        }
      }
      for (int r = 0; r < 3; ++r)  // f[r][j] = sum_a G[a][r] tt[a][j]
        for (int j = 0; j < 3; ++j)
          for (int64_t i = 0; i < n; ++i) {
            f32 s = 0.f;
            for (int a = 0; a < 6; ++a) s += G[a][r] * tt[a][j][i];
            f[r * 3 + j][i] = s;
          }
      for (int64_t i = 0; i < n; ++i)
        for (int e = 0; e < 9; ++e) out[(k0 + i) * 9 + e] = f[e][i];
    }
  });
  return gw;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("input_transform_nhwc", &input_transform_nhwc);
  m.def("input_transform_nhwc_backward", &input_transform_nhwc_backward);
  m.def("output_transform_nhwc", &output_transform_nhwc);
  m.def("output_transform_nhwc_backward", &output_transform_nhwc_backward);
  m.def("weight_transform", &weight_transform);
  m.def("weight_transform_backward", &weight_transform_backward);
}
