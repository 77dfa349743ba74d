// How fast could a hand-written kernel run Crystalformer's basis aggregation? An experiment, not part of jaxcrystal:
// `fused_basis_probe.py` writes the inputs, compiles this file with g++ and compares it with XLA.
//
// One attention block (Q query atoms, N key atoms, W window translations, H heads, K Gaussians), forward only:
//   out[q,h,k] = sum_{n,w} inside[q,h,n,w] coef[q,h,n] exp(gamma[q,h] (d2[q,n,w] - d2min[q,n])) phi_k(sqrt(d2[q,n,w]))
//   phi_k(d) = exp(-(d - mu_k)^2 / (2 s^2))
// in one loop nest: per (query, key) the exponentials of the W x K Gaussians and W x H weights in two vector loops,
// then the accumulation into out[q] (H x K). Variant "near": only the kNearCount (32) Gaussians nearest each distance (the others
// are below e^-40 for the default basis). Variant "grouped": the Gaussians of each group of kGroup consecutive centres
// from products (the formula in `fused_basis_probe.py`'s docstring) of one exponential per group and two per triple,
// for the translations of one atom pair at a time (up to kTile), accumulated by a register-blocked update (two heads'
// K sums stay in registers over the tile). One thread.
// Usage: fused_basis_probe IN OUT REPEATS; prints "variant best-seconds" per variant.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
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

constexpr int kGroup = 8;
constexpr int kGroups = kBasis / kGroup;
constexpr int kTile = 32;
constexpr int kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float GroupVec __attribute__((vector_size(kGroups * sizeof(float))));  // one value per group
constexpr int kVecs = kBasis / kLanes;
static_assert(kBasis % kGroup == 0 && kBasis % kLanes == 0, "K must be a multiple of 8 and 16");

// max(x, -87): glibc's vector exp leaves its fast path below -87.
GroupVec Clamp(GroupVec x) {
  const GroupVec floor = GroupVec{} - 87.0f;
  return x < floor ? floor : x;
}

// The group constants, in units of the width s: δ (spacing), δh (h = (kGroup - 1) / 2), the groups' middles c_g,
// exp(±δ c_g), C_j = exp((δh)^2 / 2 - δ^2 (j - h)^2 / 2) and δ c_max, beyond which exp(δ d/s) is never used.
struct Grouping {
  float inv_width, spacing, half_span;
  float middle[kGroups], above_scale[kGroups], below_scale[kGroups], constant[kGroup];
  float cap;
};

Grouping MakeGrouping(const float* mu, float inv_width, float spacing) {
  Grouping g{inv_width, spacing * inv_width, 0.5f * (kGroup - 1) * spacing * inv_width, {}, {}, {}, {}, 0.0f};
  for (int group = 0; group < kGroups; ++group) {
    double sum = 0;
    for (int j = 0; j < kGroup; ++j) sum += mu[group * kGroup + j];
    g.middle[group] = static_cast<float>(sum / kGroup * inv_width);
    g.above_scale[group] = static_cast<float>(std::exp(double(g.spacing) * g.middle[group]));
    g.below_scale[group] = static_cast<float>(std::exp(-double(g.spacing) * g.middle[group]));
  }
  for (int j = 0; j < kGroup; ++j) {
    const double offset = g.spacing * (j - 0.5 * (kGroup - 1));
    g.constant[j] = static_cast<float>(std::exp(0.5 * double(g.half_span) * g.half_span - 0.5 * offset * offset));
  }
  g.cap = g.spacing * g.middle[kGroups - 1];
  if (g.cap > 80.0f)
    throw std::runtime_error("the grouped variant needs (spacing / width) * (last group's middle / width) <= 80");
  return g;
}

void AggregateGrouped(const Shape& s, const Grouping& gp, const float* coef, const float* gamma, const float* d2,
                      const float* d2min, const float* inside, float* out) {
  static_assert(kHeads % 2 == 0, "heads are accumulated in pairs");
  // Per triple: E of each group, then exp(-δ d/s) and exp(δ d/s), from which Q_g = exp(-δ |d/s - c_g|).
  constexpr int kArgs = kGroups + 2;
  alignas(64) float arg[kTile][kArgs], ex[kTile][kArgs];
  alignas(64) float arg_weight[kHeads][kTile], weight[kHeads][kTile];
  alignas(64) float phi[kTile][kBasis];  // column j * kGroups + g: Gaussian g * kGroup + j
  alignas(64) GroupVec offset[kTile];   // y = d / s - c_g: which end of its group a distance lies nearer
  alignas(64) Vec acc[kHeads][kVecs];
  GroupVec middle, above_scale, below_scale;
  std::memcpy(&middle, gp.middle, sizeof(GroupVec));
  std::memcpy(&above_scale, gp.above_scale, sizeof(GroupVec));
  std::memcpy(&below_scale, gp.below_scale, sizeof(GroupVec));
  for (int q = 0; q < s.q; ++q) {
    for (auto& row : acc)
      for (Vec& v : row) v = Vec{};
    for (int n = 0; n < s.n; ++n) {
      const float* d2_pair = d2 + (q * s.n + n) * s.w;
      const float base = d2min[q * s.n + n];
      for (int first = 0; first < s.w; first += kTile) {  // a tile: up to kTile translations of one pair
        const int count = std::min(kTile, s.w - first);
        for (int t = 0; t < count; ++t) {
          const float x = std::sqrt(d2_pair[first + t]) * gp.inv_width;
          const GroupVec y = x - middle, a = y < 0 ? -y : y, e = a - gp.half_span, edge = Clamp(-0.5f * e * e);
          std::memcpy(&arg[t][0], &edge, sizeof(GroupVec));
          // exp(δ x) serves only groups with c_g > x, so capping δ x at δ c_max changes no Q_g in use
          arg[t][kGroups] = std::max(-gp.spacing * x, -87.0f);
          arg[t][kGroups + 1] = std::min(gp.spacing * x, gp.cap);
          offset[t] = y;
        }
        for (int h = 0; h < kHeads; ++h) {
          const float g = gamma[q * kHeads + h];
#pragma omp simd
          for (int t = 0; t < count; ++t) arg_weight[h][t] = std::max(g * (d2_pair[first + t] - base), -87.0f);
        }
#pragma omp simd
        for (int i = 0; i < count * kArgs; ++i) (&ex[0][0])[i] = std::exp((&arg[0][0])[i]);
        for (int h = 0; h < kHeads; ++h) {
          const int qhn = (q * kHeads + h) * s.n + n;
          const float* inside_pair = inside + qhn * s.w + first;
          const float c = coef[qhn];
#pragma omp simd
          for (int t = 0; t < count; ++t) weight[h][t] = inside_pair[t] * c * std::exp(arg_weight[h][t]);
        }
        for (int t = 0; t < count; ++t) {
          GroupVec edge;
          std::memcpy(&edge, &ex[t][0], sizeof(GroupVec));
          const GroupVec r1 = offset[t] > 0 ? ex[t][kGroups] * above_scale : ex[t][kGroups + 1] * below_scale;
          GroupVec power[kGroup] = {GroupVec{} + 1.0f, r1};
          for (int m = 2; m < kGroup; ++m) power[m] = power[m / 2] * power[m - m / 2];  // a product tree
          for (int j = 0; j < kGroup; ++j) {
            const GroupVec value = edge * gp.constant[j] * (offset[t] > 0 ? power[kGroup - 1 - j] : power[j]);
            std::memcpy(&phi[t][j * kGroups], &value, sizeof(GroupVec));
          }
        }
        for (int h = 0; h < kHeads; h += 2) {  // two heads: 2 x kVecs independent sums hide the FMA latency
          Vec a[2][kVecs];
          std::memcpy(a, acc[h], sizeof(a));
          for (int t = 0; t < count; ++t) {
            const float w0 = weight[h][t], w1 = weight[h + 1][t];
            for (int v = 0; v < kVecs; ++v) {
              Vec p;
              std::memcpy(&p, &phi[t][v * kLanes], sizeof(Vec));
              a[0][v] += w0 * p;
              a[1][v] += w1 * p;
            }
          }
          std::memcpy(acc[h], a, sizeof(a));
        }
      }
    }
    for (int h = 0; h < kHeads; ++h) {
      const float* sums = reinterpret_cast<const float*>(acc[h]);
      for (int j = 0; j < kGroup; ++j)
        for (int g = 0; g < kGroups; ++g) out[(q * kHeads + h) * kBasis + g * kGroup + j] = sums[j * kGroups + g];
    }
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
  const Grouping grouping = MakeGrouping(mu.data(), header[3], header[4]);
  for (const char* variant : {"all", "near", "grouped"}) {
    const std::string name = variant;
    auto run = [&] {
      if (name == "grouped")
        AggregateGrouped(s, grouping, coef.data(), gamma.data(), d2.data(), d2min.data(), inside.data(), out.data());
      else
        (name == "near" ? Aggregate<true> : Aggregate<false>)(s, mu.data(), header[3], header[4], coef.data(),
                                                              gamma.data(), d2.data(), d2min.data(), inside.data(),
                                                              out.data());
    };
    run();
    std::fwrite(out.data(), sizeof(float), out.size(), out_file);
    double best = 1e30;
    for (int r = 0; r < std::atoi(argv[3]); ++r) {
      const auto start = std::chrono::steady_clock::now();
      run();
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    std::printf("%s %.9f\n", variant, best);
  }
  std::fclose(out_file);
  return 0;
}
