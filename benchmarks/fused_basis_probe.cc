// How fast could a hand-written kernel run Crystalformer's basis aggregation? An experiment, not part of jaxcrystal:
// `fused_basis_probe.py` writes the inputs, compiles this file with g++ and compares it with XLA.
//
// One attention block (Q query atoms, N key atoms, W window translations, H heads, K Gaussians), forward only:
//   out[q,h,k] = sum_{n,w} inside[q,h,n,w] coef[q,h,n] exp(gamma[q,h] (d2[q,n,w] - d2min[q,n])) phi_k(sqrt(d2[q,n,w]))
//   phi_k(d) = exp(-(d - mu_k)^2 / (2 s^2))
// in one loop nest: per (query, key) the exponentials of the W x K Gaussians and W x H weights in two vector loops,
// then the accumulation into out[q] (H x K). Variant "near": only the kNearCount (32) Gaussians nearest each distance (the others
// are below e^-40 for the default basis). One thread.
// Usage: fused_basis_probe IN OUT REPEATS; prints "variant best-seconds" per variant.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <vector>

namespace {

// The per-triple widths are compile-time constants (`fused_basis_probe.py` passes them with -D), as in a kernel
// specialised for a model: the accumulator [H][K] then has a static layout.
constexpr int kHeads = PROBE_HEADS;
constexpr int kBasis = PROBE_BASIS;
constexpr int kNearCount = 32;

struct Shape {
  int q, n, w;
};

template <bool kNear>
void Aggregate(const Shape& s, const float* mu, float inv_width, float spacing, const float* coef, const float* gamma,
               const float* d2, const float* d2min, const float* inside, float* out) {
  constexpr int count = kNear ? std::min(kNearCount, kBasis) : kBasis;
  alignas(64) float acc[kHeads][kBasis + kNearCount];
  std::vector<float> arg_phi(s.w * kBasis), phi(s.w * kBasis), arg_t(s.w * kHeads), t(s.w * kHeads);
  std::vector<int> first(s.w);
  for (int q = 0; q < s.q; ++q) {
    std::fill(&acc[0][0], &acc[0][0] + kHeads * (kBasis + kNearCount), 0.0f);
    for (int n = 0; n < s.n; ++n) {
      const float* d2_pair = d2 + (q * s.n + n) * s.w;
      const float rel_base = d2min[q * s.n + n];
      for (int w = 0; w < s.w; ++w) {
        const float d = std::sqrt(d2_pair[w]);
        first[w] = kNear ? std::clamp(static_cast<int>(std::lround((d - mu[0]) / spacing)) - count / 2, 0, kBasis - count) : 0;
        const float* mu_w = mu + first[w];
        float* arg = arg_phi.data() + w * kBasis;
#pragma omp simd
        for (int k = 0; k < count; ++k) {
          const float z = (d - mu_w[k]) * inv_width;
          arg[k] = std::max(-0.5f * z * z, -87.0f);  // glibc's vector exp leaves its fast path below -87
        }
        for (int h = 0; h < kHeads; ++h) arg_t[w * kHeads + h] = std::max(gamma[q * kHeads + h] * (d2_pair[w] - rel_base), -87.0f);
      }
#pragma omp simd
      for (int i = 0; i < s.w * kBasis; ++i) phi[i] = std::exp(arg_phi[i]);
#pragma omp simd
      for (int i = 0; i < s.w * kHeads; ++i) t[i] = std::exp(arg_t[i]);
      for (int w = 0; w < s.w; ++w) {
        for (int h = 0; h < kHeads; ++h) {
          const int qhn = (q * kHeads + h) * s.n + n;
          const float weight = inside[qhn * s.w + w] * coef[qhn] * t[w * kHeads + h];
          float* a = acc[h] + first[w];
          const float* p = phi.data() + w * kBasis;
#pragma omp simd
          for (int k = 0; k < count; ++k) a[k] += weight * p[k];
        }
      }
    }
    for (int h = 0; h < kHeads; ++h)
      for (int k = 0; k < kBasis; ++k) out[(q * kHeads + h) * kBasis + k] = acc[h][k];
  }
}

std::vector<float> Read(FILE* f, size_t size) {
  std::vector<float> v(size);
  if (std::fread(v.data(), sizeof(float), size, f) != size) throw std::runtime_error("short input");
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s IN OUT REPEATS\n", argv[0]);
    return 2;
  }
  FILE* in = std::fopen(argv[1], "rb");
  const std::vector<float> header = Read(in, 5);  // Q N W 1/s spacing
  const Shape s{int(header[0]), int(header[1]), int(header[2])};
  const std::vector<float> mu = Read(in, kBasis), coef = Read(in, s.q * kHeads * s.n), gamma = Read(in, s.q * kHeads),
                           d2 = Read(in, s.q * s.n * s.w), d2min = Read(in, s.q * s.n),
                           inside = Read(in, s.q * kHeads * s.n * s.w);
  std::fclose(in);
  FILE* out_file = std::fopen(argv[2], "wb");
  std::vector<float> out(s.q * kHeads * kBasis);
  for (const bool near : {false, true}) {
    auto run = [&] {
      (near ? Aggregate<true> : Aggregate<false>)(s, mu.data(), header[3], header[4], coef.data(), gamma.data(),
                                                  d2.data(), d2min.data(), inside.data(), out.data());
    };
    run();
    std::fwrite(out.data(), sizeof(float), out.size(), out_file);
    double best = 1e30;
    for (int r = 0; r < std::atoi(argv[3]); ++r) {
      const auto start = std::chrono::steady_clock::now();
      run();
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    std::printf("%s %.9f\n", near ? "near" : "all", best);
  }
  std::fclose(out_file);
  return 0;
}
