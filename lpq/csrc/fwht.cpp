// Block-diagonal fast Walsh-Hadamard transform (CPU, OpenMP via at::parallel_for).
//
// Each row of a (rows, n) float32 tensor is cut into consecutive blocks; a block of power-of-two
// size b gets the orthonormal Hadamard transform H_b / sqrt(b). The butterflies run in the same
// order and with the same float32 operations as the PyTorch reference in lpq/algorithms/hadamard.py
// (h = 1, 2, 4, ...; pairs (a + c, a - c); one multiply by 1/sqrt(b) at the end), so the two
// agree bit for bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kTile = 16;            // rows transformed together: one lane per row
constexpr int64_t kTileMaxBlock = 256;   // 16 KB of tile

// The same butterflies on `kTile` rows at once. The tile is stored element-major (t[j * kTile + r]),
// so every butterfly is a vector operation across rows, whatever h is; the scalar per-row loop
// vectorizes only for h >= the vector width and spent most of its time in h = 1, 2, 4, 8. Each
// element still sees the same float32 operations in the same order: the result is bit-identical.
void fwht_tile(float* const* rows, int64_t off, int64_t b, float norm, float* t) {
  for (int64_t j = 0; j < b; ++j)
    for (int64_t r = 0; r < kTile; ++r) t[j * kTile + r] = rows[r][off + j];
  for (int64_t h = 1; h < b; h <<= 1) {
    for (int64_t i = 0; i < b; i += 2 * h) {
      for (int64_t j = i; j < i + h; ++j) {
        float* x = t + j * kTile;
        float* y = t + (j + h) * kTile;
        for (int64_t r = 0; r < kTile; ++r) {
          const float a = x[r];
          const float c = y[r];
          x[r] = a + c;
          y[r] = a - c;
        }
      }
    }
  }
  for (int64_t j = 0; j < b; ++j)
    for (int64_t r = 0; r < kTile; ++r) rows[r][off + j] = t[j * kTile + r] * norm;
}

void fwht_block(float* x, int64_t b, float norm) {
  for (int64_t h = 1; h < b; h <<= 1) {
    for (int64_t i = 0; i < b; i += 2 * h) {
      for (int64_t j = i; j < i + h; ++j) {
        const float a = x[j];
        const float c = x[j + h];
        x[j] = a + c;
        x[j + h] = a - c;
      }
    }
  }
  for (int64_t j = 0; j < b; ++j) x[j] *= norm;
}

// `sizes`: the block sizes along a row, in order, summing to n (each a power of two).
torch::Tensor fwht(torch::Tensor x, std::vector<int64_t> sizes) {
  TORCH_CHECK(x.dim() == 2, "fwht: expected a (rows, n) tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "fwht: expected float32");
  int64_t total = 0, largest = 1;
  for (int64_t s : sizes) {
    TORCH_CHECK(s > 0 && (s & (s - 1)) == 0, "fwht: block size ", s, " is not a power of two");
    total += s;
    largest = std::max(largest, s);
  }
  TORCH_CHECK(total == x.size(1), "fwht: block sizes sum to ", total, ", row length is ", x.size(1));
  auto out = x.contiguous().clone();
  const int64_t rows = out.size(0), n = out.size(1);
  float* base = out.data_ptr<float>();
  std::vector<float> norms;
  for (int64_t s : sizes) norms.push_back(static_cast<float>(1.0 / std::sqrt(static_cast<double>(s))));
  // Tiles while a tile (16 rows of the largest block) stays in the L1 cache; past that the per-row loop
  // is as fast (its long butterflies vectorize) and reads memory in order.
  const int64_t tiles = largest <= kTileMaxBlock ? rows / kTile : 0;
  at::parallel_for(0, tiles, std::max<int64_t>(1, 256 / std::max<int64_t>(n, 1)), [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(largest * kTile);
    float* ptrs[kTile];
    for (int64_t tile = t0; tile < t1; ++tile) {
      for (int64_t r = 0; r < kTile; ++r) ptrs[r] = base + (tile * kTile + r) * n;
      int64_t off = 0;
      for (size_t k = 0; k < sizes.size(); ++k) {
        fwht_tile(ptrs, off, sizes[k], norms[k], buf.data());
        off += sizes[k];
      }
    }
  });
  at::parallel_for(tiles * kTile, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* row = base + r * n;
      int64_t off = 0;
      for (size_t k = 0; k < sizes.size(); ++k) {
        fwht_block(row + off, sizes[k], norms[k]);
        off += sizes[k];
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwht", &fwht, "block-diagonal orthonormal Walsh-Hadamard transform along rows",
        py::arg("x"), py::arg("sizes"));
}
