// Block-diagonal fast Walsh-Hadamard transform (CPU, OpenMP via at::parallel_for).
//
// Each row of a (rows, n) float32 tensor is cut into consecutive blocks; a block of power-of-two
// size b gets the orthonormal Hadamard transform H_b / sqrt(b). The butterflies run in the same
// order and with the same float32 operations as the PyTorch reference in lpq/algorithms/hadamard.py
// (h = 1, 2, 4, ...; pairs (a + c, a - c); one multiply by 1/sqrt(b) at the end), so the two
// agree bit for bit.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

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
  int64_t total = 0;
  for (int64_t s : sizes) {
    TORCH_CHECK(s > 0 && (s & (s - 1)) == 0, "fwht: block size ", s, " is not a power of two");
    total += s;
  }
  TORCH_CHECK(total == x.size(1), "fwht: block sizes sum to ", total, ", row length is ", x.size(1));
  auto out = x.contiguous().clone();
  const int64_t rows = out.size(0), n = out.size(1);
  float* base = out.data_ptr<float>();
  std::vector<float> norms;
  for (int64_t s : sizes) norms.push_back(static_cast<float>(1.0 / std::sqrt(static_cast<double>(s))));
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
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
