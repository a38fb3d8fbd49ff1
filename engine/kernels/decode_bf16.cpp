// bfloat16 CPU kernels for decoding, built and loaded by engine/kernels/__init__.py.
//
// linear_bf16, a single-row matmul: y (1, out) = x (1, in) @ W (out, in)ᵀ + bias.
// A decode step multiplies one activation row by every weight matrix, so its speed is the speed at
// which the weights stream from memory. PyTorch's bfloat16 kernels reach about half of this
// machine's read bandwidth on that shape; this one reads four weight rows at a time with AVX512-BF16
// dot products (float32 sums, one rounding to bfloat16 at the end, like oneDNN's addmm) and splits
// the rows over PyTorch's own thread pool.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

namespace {

constexpr int64_t kRowsPerBlock = 4;  // weight rows sharing each load of x
constexpr int64_t kLanes = 32;        // bfloat16 values per 512-bit register

inline __m512bh load(const c10::BFloat16* p) {
  return (__m512bh)_mm512_loadu_si512(p);
}

inline __m512bh load_tail(const c10::BFloat16* p, __mmask32 mask) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

// y[o] for o in [begin, end): dot(W[o, :], x) + bias[o], float32 sums rounded once.
void gemv_rows(const c10::BFloat16* w, const c10::BFloat16* x, const c10::BFloat16* bias,
               c10::BFloat16* y, int64_t in, int64_t begin, int64_t end) {
  const int64_t full = in - in % kLanes;
  const __mmask32 tail = (__mmask32)((1ull << (in - full)) - 1);
  int64_t o = begin;
  for (; o + kRowsPerBlock <= end; o += kRowsPerBlock) {
    const c10::BFloat16* r = w + o * in;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t i = 0; i < full; i += kLanes) {
      const __m512bh xv = load(x + i);
      a0 = _mm512_dpbf16_ps(a0, load(r + i), xv);
      a1 = _mm512_dpbf16_ps(a1, load(r + in + i), xv);
      a2 = _mm512_dpbf16_ps(a2, load(r + 2 * in + i), xv);
      a3 = _mm512_dpbf16_ps(a3, load(r + 3 * in + i), xv);
    }
    if (tail) {
      const __m512bh xv = load_tail(x + full, tail);
      a0 = _mm512_dpbf16_ps(a0, load_tail(r + full, tail), xv);
      a1 = _mm512_dpbf16_ps(a1, load_tail(r + in + full, tail), xv);
      a2 = _mm512_dpbf16_ps(a2, load_tail(r + 2 * in + full, tail), xv);
      a3 = _mm512_dpbf16_ps(a3, load_tail(r + 3 * in + full, tail), xv);
    }
    const float sums[kRowsPerBlock] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1),
                                       _mm512_reduce_add_ps(a2), _mm512_reduce_add_ps(a3)};
    for (int64_t j = 0; j < kRowsPerBlock; ++j) {
      y[o + j] = c10::BFloat16(sums[j] + (bias ? static_cast<float>(bias[o + j]) : 0.0f));
    }
  }
  for (; o < end; ++o) {  // the last out % 4 rows
    const c10::BFloat16* r = w + o * in;
    __m512 a = _mm512_setzero_ps();
    for (int64_t i = 0; i < full; i += kLanes) a = _mm512_dpbf16_ps(a, load(r + i), load(x + i));
    if (tail) a = _mm512_dpbf16_ps(a, load_tail(r + full, tail), load_tail(x + full, tail));
    y[o] = c10::BFloat16(_mm512_reduce_add_ps(a) + (bias ? static_cast<float>(bias[o]) : 0.0f));
  }
}

// x (..., in) holding one row, weight (out, in) contiguous, bias (out) or none -> (..., out).
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "linear_bf16: bfloat16 tensors expected");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "linear_bf16: weight must be (out, in) contiguous");
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(x.numel() == in && x.size(-1) == in, "linear_bf16: x must be one row of ", in, " values");
  const at::Tensor row = x.contiguous();
  const c10::BFloat16* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->numel() == out,
                "linear_bf16: bias must be (out,) contiguous bfloat16");
    bias_ptr = bias->const_data_ptr<c10::BFloat16>();
  }
  auto shape = x.sizes().vec();
  shape.back() = out;
  at::Tensor y = at::empty(shape, x.options());
  const c10::BFloat16* w = weight.const_data_ptr<c10::BFloat16>();
  const c10::BFloat16* xp = row.const_data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.mutable_data_ptr<c10::BFloat16>();
  // Grain of 16 blocks (64 rows, >= 64 KB of weights for in >= 512): enough work to wake a thread for.
  const int64_t blocks = (out + kRowsPerBlock - 1) / kRowsPerBlock;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    gemv_rows(w, xp, bias_ptr, yp, in, b0 * kRowsPerBlock, std::min(out, b1 * kRowsPerBlock));
  });
  return y;
}

// Llama's RMSNorm in one call, rounding where Hugging Face's module does: statistics in float32,
// the normalised row rounded to bfloat16, then multiplied by the weight (another rounding). A decode
// step has two per layer; as one op instead of eight they cost a fraction of the dispatch time.
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "rms_norm_bf16: bfloat16 tensors expected");
  const int64_t dim = x.size(-1);
  TORCH_CHECK(dim > 0 && weight.dim() == 1 && weight.size(0) == dim && weight.is_contiguous(),
              "rms_norm_bf16: weight must be (", dim, ") contiguous");
  const at::Tensor rows = x.contiguous();
  at::Tensor y = at::empty(rows.sizes(), rows.options());
  const c10::BFloat16* xp = rows.const_data_ptr<c10::BFloat16>();
  const c10::BFloat16* wp = weight.const_data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.mutable_data_ptr<c10::BFloat16>();
  const int64_t full = dim - dim % 16;
  for (int64_t r = 0; r < rows.numel() / dim; ++r) {
    const c10::BFloat16* row = xp + r * dim;
    __m512 squares = _mm512_setzero_ps();
    for (int64_t i = 0; i < full; i += 16) {  // bfloat16 -> float32 is a 16-bit shift
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i));
      const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      squares = _mm512_add_ps(squares, _mm512_mul_ps(v, v));
    }
    float sum = _mm512_reduce_add_ps(squares);
    for (int64_t i = full; i < dim; ++i) sum += static_cast<float>(row[i]) * static_cast<float>(row[i]);
    const float scale = 1.0f / std::sqrt(sum / static_cast<float>(dim) + static_cast<float>(eps));
    for (int64_t i = 0; i < dim; ++i) {
      const c10::BFloat16 normed(static_cast<float>(row[i]) * scale);
      yp[r * dim + i] = c10::BFloat16(static_cast<float>(wp[i]) * static_cast<float>(normed));
    }
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(chattui, m) {
  m.def("linear_bf16(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("rms_norm_bf16(Tensor x, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(chattui, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("rms_norm_bf16", &rms_norm_bf16);
}
