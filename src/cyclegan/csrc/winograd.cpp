// Winograd F(4x4, 3x3) transforms (Lavin & Gray 2016) for a stride-1, unpadded 3x3 convolution
// of an already padded input. The convolution becomes 36 independent matrix products
// M[p] = U[p] @ V[p] (torch.bmm); these kernels move data into and out of that domain, and back
// for autograd. Every transform is written as loops over contiguous vectors (whole image rows,
// or all tiles of a tile row) so that the compiler vectorises them.
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

// Tile geometry of an output of h x w: th x tw tiles of 4x4; the padded input it reads spans
// (4 th + 2) x (4 tw + 2), held in buffers (4 th + 2) x (4 tw + 4) wide, zeros past the image.
struct Tiles {
  int64_t th, tw, rows, width;
  Tiles(int64_t h, int64_t w) : th(ceil4(h)), tw(ceil4(w)), rows(4 * th + 2), width(4 * (tw + 1)) {}
  int64_t count() const { return th * tw; }
};

}  // namespace

// xp [N, C, Hp, Wp] -> V [36, C, N * T]: the tiles of each (n, c) plane, position by position.
torch::Tensor input_transform(const torch::Tensor& xp_in) {
  check(xp_in, 4, "input_transform");
  auto xp = xp_in.contiguous();
  const int64_t N = xp.size(0), C = xp.size(1), Hp = xp.size(2), Wp = xp.size(3);
  const Tiles t(Hp - 2, Wp - 2);
  const int64_t T = t.count(), stride = C * N * T, tw = t.tw, W = t.width;
  auto V = torch::empty({36, C, N * T}, xp.options());
  const f32* x = xp.data_ptr<f32>();
  f32* v = V.data_ptr<f32>();
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<f32> buf(t.rows * W), r(6 * W), ph(6 * 4 * (tw + 1));
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / C, c = nc % C;
      std::fill(buf.begin(), buf.end(), 0.f);
      for (int64_t y = 0; y < std::min(Hp, t.rows); ++y)
        std::copy(x + (nc * Hp + y) * Wp, x + (nc * Hp + y) * Wp + std::min(Wp, W), buf.data() + y * W);
      f32* out = v + c * N * T + n * T;
      for (int64_t ty = 0; ty < t.th; ++ty) {
        const f32* b = buf.data() + 4 * ty * W;
        f32* rr = r.data();
        bt6(b, b + W, b + 2 * W, b + 3 * W, b + 4 * W, b + 5 * W, rr, rr + W, rr + 2 * W, rr + 3 * W,
            rr + 4 * W, rr + 5 * W, W);
        // Column j of tile tx is x = 4 tx + j: split each row into its 4 phases x mod 4.
        for (int a = 0; a < 6; ++a)
          for (int64_t tx = 0; tx <= tw; ++tx)
            for (int q = 0; q < 4; ++q) ph[(a * 4 + q) * (tw + 1) + tx] = r[a * W + 4 * tx + q];
        for (int a = 0; a < 6; ++a) {
          const f32* p = ph.data() + a * 4 * (tw + 1);
          const int64_t s = tw + 1;
          f32* o = out + a * 6 * stride + ty * tw;
          bt6(p, p + s, p + 2 * s, p + 3 * s, p + 1, p + s + 1, o, o + stride, o + 2 * stride,
              o + 3 * stride, o + 4 * stride, o + 5 * stride, tw);
        }
      }
    }
  });
  return V;
}

// The adjoint of input_transform: gV [36, C, N * T] -> gxp [N, C, Hp, Wp] (overlaps summed).
torch::Tensor input_transform_backward(const torch::Tensor& gV_in, int64_t N, int64_t Hp, int64_t Wp) {
  check(gV_in, 3, "input_transform_backward");
  auto gV = gV_in.contiguous();
  const int64_t C = gV.size(1);
  const Tiles t(Hp - 2, Wp - 2);
  const int64_t T = t.count(), stride = C * N * T, tw = t.tw, W = t.width;
  TORCH_CHECK(gV.size(0) == 36 && gV.size(2) == N * T, "input_transform_backward: shape mismatch");
  auto gx = torch::empty({N, C, Hp, Wp}, gV.options());
  const f32* g = gV.data_ptr<f32>();
  f32* x = gx.data_ptr<f32>();
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<f32> buf(t.rows * W), r(6 * W), d(6 * tw), rows(6 * W);
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / C, c = nc % C;
      std::fill(buf.begin(), buf.end(), 0.f);
      const f32* in = g + c * N * T + n * T;
      for (int64_t ty = 0; ty < t.th; ++ty) {
        std::fill(r.begin(), r.end(), 0.f);
        for (int a = 0; a < 6; ++a) {
          const f32* gi = in + a * 6 * stride + ty * tw;
          f32* dd = d.data();
          b6(gi, gi + stride, gi + 2 * stride, gi + 3 * stride, gi + 4 * stride, gi + 5 * stride, dd,
             dd + tw, dd + 2 * tw, dd + 3 * tw, dd + 4 * tw, dd + 5 * tw, tw);
          f32* ra = r.data() + a * W;
          for (int64_t tx = 0; tx < tw; ++tx)
            for (int j = 0; j < 6; ++j) ra[4 * tx + j] += d[j * tw + tx];
        }
        f32* rr = r.data();
        f32* o = rows.data();
        b6(rr, rr + W, rr + 2 * W, rr + 3 * W, rr + 4 * W, rr + 5 * W, o, o + W, o + 2 * W, o + 3 * W,
           o + 4 * W, o + 5 * W, W);
        f32* b = buf.data() + 4 * ty * W;
        for (int64_t q = 0; q < 6 * W; ++q) b[q] += o[q];
      }
      for (int64_t y = 0; y < Hp; ++y) {
        f32* dst = x + (nc * Hp + y) * Wp;
        const int64_t w = std::min(Wp, W);
        if (y < t.rows) std::copy(buf.data() + y * W, buf.data() + y * W + w, dst);
        else std::fill(dst, dst + w, 0.f);
        std::fill(dst + w, dst + Wp, 0.f);
      }
    }
  });
  return gx;
}

// M [36, K, N * T] -> Y [N, K, H, W]: each tile's 4x4 outputs A^T m A.
torch::Tensor output_transform(const torch::Tensor& M_in, int64_t N, int64_t H, int64_t Wd) {
  check(M_in, 3, "output_transform");
  auto M = M_in.contiguous();
  const int64_t K = M.size(1);
  const Tiles t(H, Wd);
  const int64_t T = t.count(), stride = K * N * T, tw = t.tw;
  TORCH_CHECK(M.size(0) == 36 && M.size(2) == N * T, "output_transform: shape mismatch");
  auto Y = torch::empty({N, K, H, Wd}, M.options());
  const f32* m = M.data_ptr<f32>();
  f32* y = Y.data_ptr<f32>();
  at::parallel_for(0, N * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<f32> cols(6 * 4 * tw), rows(4 * 4 * tw), line(4 * tw);
    for (int64_t nk = begin; nk < end; ++nk) {
      const int64_t n = nk / K, k = nk % K;
      const f32* in = m + k * N * T + n * T;
      f32* plane = y + nk * H * Wd;
      for (int64_t ty = 0; ty < t.th; ++ty) {
        for (int a = 0; a < 6; ++a) {  // cols[a][q] = sum_b A^T[q][b] m[a][b], over the tiles
          const f32* mi = in + a * 6 * stride + ty * tw;
          f32* cq = cols.data() + a * 4 * tw;
          at4(mi, mi + stride, mi + 2 * stride, mi + 3 * stride, mi + 4 * stride, mi + 5 * stride, cq,
              cq + tw, cq + 2 * tw, cq + 3 * tw, tw);
        }
        for (int q = 0; q < 4; ++q) {  // rows[p][q] = sum_a A^T[p][a] cols[a][q]
          const f32* c0 = cols.data() + q * tw;
          const int64_t s = 4 * tw;
          f32* o = rows.data() + q * tw;
          at4(c0, c0 + s, c0 + 2 * s, c0 + 3 * s, c0 + 4 * s, c0 + 5 * s, o, o + s, o + 2 * s, o + 3 * s, tw);
        }
        for (int p = 0; p < 4; ++p) {
          const int64_t row = 4 * ty + p;
          if (row >= H) break;
          for (int64_t tx = 0; tx < tw; ++tx)
            for (int q = 0; q < 4; ++q) line[4 * tx + q] = rows[p * 4 * tw + q * tw + tx];
          std::copy(line.data(), line.data() + Wd, plane + row * Wd);
        }
      }
    }
  });
  return Y;
}

// The adjoint of output_transform: gY [N, K, H, W] -> gM [36, K, N * T].
torch::Tensor output_transform_backward(const torch::Tensor& gY_in) {
  check(gY_in, 4, "output_transform_backward");
  auto gY = gY_in.contiguous();
  const int64_t N = gY.size(0), K = gY.size(1), H = gY.size(2), Wd = gY.size(3);
  const Tiles t(H, Wd);
  const int64_t T = t.count(), stride = K * N * T, tw = t.tw;
  auto gM = torch::empty({36, K, N * T}, gY.options());
  const f32* g = gY.data_ptr<f32>();
  f32* m = gM.data_ptr<f32>();
  at::parallel_for(0, N * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<f32> ph(4 * 4 * tw), cols(6 * 4 * tw);
    for (int64_t nk = begin; nk < end; ++nk) {
      const int64_t n = nk / K, k = nk % K;
      const f32* plane = g + nk * H * Wd;
      f32* out = m + k * N * T + n * T;
      for (int64_t ty = 0; ty < t.th; ++ty) {
        std::fill(ph.begin(), ph.end(), 0.f);  // ph[p][q][tx] = gY[4 ty + p][4 tx + q]
        for (int p = 0; p < 4; ++p) {
          const int64_t row = 4 * ty + p;
          if (row >= H) break;
          const f32* src = plane + row * Wd;
          for (int64_t col = 0; col < Wd; ++col) ph[(p * 4 + col % 4) * tw + col / 4] = src[col];
        }
        for (int q = 0; q < 4; ++q) {  // cols[a][q] = sum_p A^T[p][a] ph[p][q]
          const int64_t s = 4 * tw;
          const f32* p0 = ph.data() + q * tw;
          f32* c = cols.data() + q * tw;
          a6(p0, p0 + s, p0 + 2 * s, p0 + 3 * s, c, c + s, c + 2 * s, c + 3 * s, c + 4 * s, c + 5 * s, tw);
        }
        for (int a = 0; a < 6; ++a) {  // gM[a][b] = sum_q A^T[q][b] cols[a][q]
          const f32* c = cols.data() + a * 4 * tw;
          f32* o = out + a * 6 * stride + ty * tw;
          a6(c, c + tw, c + 2 * tw, c + 3 * tw, o, o + stride, o + 2 * stride, o + 3 * stride,
             o + 4 * stride, o + 5 * stride, tw);
        }
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
  m.def("input_transform", &input_transform);
  m.def("input_transform_backward", &input_transform_backward);
  m.def("output_transform", &output_transform);
  m.def("output_transform_backward", &output_transform_backward);
  m.def("weight_transform", &weight_transform);
  m.def("weight_transform_backward", &weight_transform_backward);
}
