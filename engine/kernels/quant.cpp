// Matmuls on GGUF's quantized weight blocks, built and loaded by engine/kernels/__init__.py.
//
// quant_linear, a single-row matmul: y (1, out) = x (1, in) @ W (out, in)ᵀ + bias, W being GGUF blocks
// (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) read as they are. A decode step streams every
// weight once, so its speed is the speed the blocks are read at.
//
// Design, measured first on a Sapphire Rapids core (Q4_0, 1 thread, 4 rows at a time):
//   x quantized to int8 per 32 values, integer dot products (llama.cpp's way): 16.5 GB/s on 1536x576
//     (in cache), 6.5 GB/s on 49152x576 (from memory);
//   weights dequantized in registers, float FMA (AVX-512):                      7.7 GB/s and 5.1 GB/s.
// So: integer dot products. The extra error of the int8 activation is at most half its step
// (absmax / 254 per 32 values) times the sum of |w| over the row.
//
// Two instruction sets, chosen per call by the caller (engine/kernels/__init__.py reads the CPU's
// flags; CHATTUI_KERNEL_ISA=avx2 forces the second): AVX-512 VNNI (vpdpbusd; two 32-value blocks per
// 512-bit register for the 32-value types, one 256-bit sub-block at a time for K-quants) and AVX2
// (vpmaddubsw + vpmaddwd, one block at a time). Both run the same code (quant_isa.inc, included once
// per target); only the dot products differ. Rows are split over PyTorch's thread pool.
//
// With float_activation, quant_linear keeps x as it is instead (weight rows dequantized in L1, float FMA):
// for the output layer, where int8 rounding of the input flips near-tied tokens. More arithmetic per byte,
// but on a layer that does not fit in cache reading the bytes decides (measured: no slower). On interleaved Q6_K
// groups it takes x as two int8 parts instead (quant_isa.inc's interleaved_q6k_two_part_range).
//
// quant_dequantize: whole rows to float32 or bfloat16, for prefill tiles and embedding lookups.
//
// quant_interleave: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K blocks rearranged in place into 16-row groups (convert_group), which
// every op above reads given the type code plus kInterleaved.
//
// quant_decode_step: a whole decode step of a Llama-family model or of Gemma 3 on such blocks (every layer,
// then the output layer's logits) in one call and one parallel region (decode_isa.inc says why).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

// GGMLQuantizationType values (gguf/constants.py)
constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14;
constexpr int64_t kF32 = 0, kBF16 = 30;  // dense float32 or bfloat16 rows (GGML's codes), in quant_decode_step only
constexpr int64_t kRowsPerStep = 4;  // weight rows whose blocks are read in one pass over x
constexpr int64_t kIsaAvx2 = 0, kIsaAvx512 = 1;
// A type's code plus kInterleaved: its blocks are in the interleaved layout of 16-row groups (below).
constexpr int64_t kInterleaved = 256, kGroupRows = 16;

inline int64_t base_type(int64_t code) { return code & (kInterleaved - 1); }
inline bool is_interleaved(int64_t code) { return (code & kInterleaved) != 0; }
inline bool float_interleavable(int64_t qtype) { return qtype == kQ4_0 || qtype == kQ4_1 || qtype == kQ8_0; }
inline bool interleavable(int64_t qtype) {
  return float_interleavable(qtype) || qtype == kQ5_0 || qtype == kQ5_1 || qtype == kQ4_K || qtype == kQ5_K ||
         qtype == kQ6_K;
}
// Of the interleaved types, Q4_0, Q4_1, Q8_0 and Q6_K (x as two int8 parts) have a float-activation kernel (the
// output layer's path): engine.quant keeps an output layer of the other types in rows.
inline bool has_float_kernel(int64_t code) {
  return !is_interleaved(code) || float_interleavable(base_type(code)) || base_type(code) == kQ6_K;
}

// Where a block's quants lie (the interleaved layout moves them as 4-byte words); its other bytes, the head,
// are float16 scales and such (moved as 2-byte fields): before the quants (d; Q4_1's and Q5_1's m; Q4_K's
// and Q5_K's dmin and 12 bytes of 6-bit scales), or after them (Q6_K's 16 int8 scales and d). Q5_0's and Q5_1's quants
// start with the 32 fifth bits (fifth_bits: reordered in the interleaved layout, interleaved_fifth_bits).
struct QuantBytes {
  int64_t at, bytes;
  bool fifth_bits = false;
};

constexpr QuantBytes quants_of(int64_t qtype) {
  switch (qtype) {
    case kQ4_1: return {4, 16};
    case kQ5_0: return {2, 20, true};
    case kQ5_1: return {4, 20, true};
    case kQ4_K: return {16, 128};
    case kQ5_K: return {16, 160};  // the 32 bytes of fifth bits, then the nibbles (not reordered: they need not be)
    case kQ6_K: return {0, 192};
    case kQ8_0: return {2, 32};
  }
  return {2, 16};  // Q4_0
}

// Q5's fifth bits as the interleaved kernels read them: bit 8k + w holds value 4w + k's and bit 8k + 4 + w value
// 16 + 4w + k's (k, w < 4), where bit i of GGUF's holds value i's. Quant word w of a block holds values 4w + k
// (low nibbles) and 16 + 4w + k (high nibbles) in byte k, so one shift and one mask put its fifth bits at bit 4
// of each byte. Spreading 4 bits to bytes and back: multiplications whose partial products never overlap.
constexpr uint32_t interleaved_fifth_bits(uint32_t bits) {
  uint32_t out = 0;
  for (int half = 0; half < 2; ++half) {
    for (int w = 0; w < 4; ++w) {
      const uint32_t nibble = (bits >> (16 * half + 4 * w)) & 0xF;
      out |= ((nibble * 0x00204081u) & 0x01010101u) << (4 * half + w);
    }
  }
  return out;
}

constexpr uint32_t gguf_fifth_bits(uint32_t interleaved) {
  uint32_t out = 0;
  for (int half = 0; half < 2; ++half) {
    for (int w = 0; w < 4; ++w) {
      const uint32_t spread = (interleaved >> (4 * half + w)) & 0x01010101u;
      out |= (((spread * 0x01020408u) >> 24) & 0xF) << (16 * half + 4 * w);
    }
  }
  return out;
}
static_assert(gguf_fifth_bits(interleaved_fifth_bits(0x9E3779B9u)) == 0x9E3779B9u &&
              interleaved_fifth_bits(1u << 21) == 1u << 13);  // value 21 = 16 + 4 * 1 + 1: bit 8 * 1 + 4 + 1

struct TypeSize {
  int64_t values, bytes;  // per block
};

TypeSize type_size(int64_t code) {
  switch (base_type(code)) {
    case kQ8_0: return {32, 34};
    case kQ4_0: return {32, 18};
    case kQ4_1: return {32, 20};
    case kQ5_0: return {32, 22};
    case kQ5_1: return {32, 24};
    case kQ4_K: return {256, 144};
    case kQ5_K: return {256, 176};
    case kQ6_K: return {256, 210};
  }
  TORCH_CHECK(false, "quantized matmul: GGML type ", code,
              " is not supported (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K are)");
}

int64_t stored_offset(int64_t code) {  // types storing q + offset: Q4_0 stores q + 8
  const int64_t qtype = base_type(code);
  return qtype == kQ4_0 ? 8 : qtype == kQ5_0 ? 16 : qtype == kQ6_K ? 32 : 0;
}

// The interleaved layout of a group of 16 rows (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) holds the same bytes as the
// 16 rows, in another order: block column j of all 16 rows at j * 16 * block_bytes, first each 2-byte field
// of the blocks' heads (quants_of) of the 16 rows side by side (32 bytes a field), then the quants as 4-byte
// words, word w of row r at 64 * w + 4 * r. One 512-bit load is then word w of all 16 rows, which one
// vpdpbusd multiplies by the same 4 activation bytes, and one float16 load is the 16 rows' scales: no
// per-row horizontal sums or scale shuffles (llama.cpp's repacked layouts do the same). In the model (2
// threads, an Intel Xeon with AMX, SmolLM2-135M-Instruct Q4_1): decode 107 -> 237 tok/s against the
// row-by-row kernels.
// convert_group copies one group from rows to the interleaved layout (to_interleaved) or back.
void convert_group(const uint8_t* from, uint8_t* to, int64_t row_bytes, int64_t block_bytes, QuantBytes quants,
                   bool to_interleaved) {
  const int64_t blocks = row_bytes / block_bytes, words = quants.bytes / 4, head_bytes = block_bytes - quants.bytes;
  const int64_t head_at = quants.at == 0 ? quants.bytes : 0;
  for (int64_t j = 0; j < blocks; ++j) {
    for (int64_t r = 0; r < kGroupRows; ++r) {
      const int64_t row_at = r * row_bytes + j * block_bytes, column_at = j * kGroupRows * block_bytes;
      const auto move = [&](int64_t bytes, int64_t in_row, int64_t in_column) {
        if (to_interleaved) std::memcpy(to + column_at + in_column, from + row_at + in_row, bytes);
        else std::memcpy(to + row_at + in_row, from + column_at + in_column, bytes);
      };
      for (int64_t f = 0; f < head_bytes / 2; ++f) move(2, head_at + 2 * f, 2 * kGroupRows * f + 2 * r);
      for (int64_t w = 0; w < words; ++w) move(4, quants.at + 4 * w, kGroupRows * head_bytes + 64 * w + 4 * r);
      if (quants.fifth_bits) {  // word 0, now in place, reordered
        uint8_t* fifth = to + (to_interleaved ? column_at + kGroupRows * head_bytes + 4 * r : row_at + quants.at);
        uint32_t bits;
        std::memcpy(&bits, fifth, 4);
        bits = to_interleaved ? interleaved_fifth_bits(bits) : gguf_fifth_bits(bits);
        std::memcpy(fifth, &bits, 4);
      }
    }
  }
}

// The activation row, quantized per 32 values.
struct Activation {
  std::vector<int8_t> q;              // (in) round(x / scale)
  std::vector<float> scale_sum;       // (in / 32, 2) absmax / 127, and scale * sum(q) for per-block minimums
  std::vector<int32_t> offset_lanes;  // (in / 32, 8) -offset * (sums of 4 consecutive q)
  std::vector<int32_t> q_sum;         // (in / 32) sum(q)
  float scale(int64_t block) const { return scale_sum[2 * block]; }
  float sum(int64_t block) const { return scale_sum[2 * block + 1]; }
};

// quant_decode_step's model, for both instruction sets (decode_isa.inc)
struct Slot {  // one linear layer: y (out) = W x + bias, W (out, row_bytes) GGUF blocks of qtype, or dense
  const uint8_t* w;
  int64_t row_bytes, qtype, out;
  const float* bias;
};

struct StepShape {
  int64_t layers, dim, heads, kv_heads, head_dim, hidden, vocab, capacity, position;
  float eps, scale;
  bool qk_norm, post_norms, gelu;
};

struct LayerAttention {  // a layer's RoPE row at the step's position (head_dim each) and sliding window (0: none)
  const float *cos, *sin;
  int64_t window;
};

}  // namespace

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
namespace {
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
  // pairs of u8 x s8 products as int16 (no saturation: |u| <= 128, |s| <= 127), then pairs of those
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
#define QUANT_PAIRS 0
#include "quant_isa.inc"
#include "decode_isa.inc"
#undef QUANT_PAIRS
}  // namespace
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")
namespace avx512_bf16 {
namespace {
// Rows [begin, end) of y = W x + bias for dense bfloat16 rows W (out, in; in a multiple of 32) with x rounded to
// bfloat16 (to nearest even) first, as llama.cpp does on BF16 weights: vdpbf16ps sums pairs of bfloat16
// products in float32, one instruction per 32 weights where widening them to float32 takes three. On a 2-core
// AMD EPYC (Zen 4) the fused step's BF16 decode went from 67-83 to 100 tok/s (0.9-0.97x to 1.18x llama.cpp).
void dense_rows(const c10::BFloat16* w, int64_t in, const float* x, const float* bias, float* y, int64_t begin,
                int64_t end) {
  thread_local std::vector<c10::BFloat16> rounded;
  rounded.resize(in);
  for (int64_t i = 0; i < in; i += 16) {
    const __m256bh half = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + i));
    std::memcpy(rounded.data() + i, &half, sizeof(half));
  }
  for (int64_t o = begin; o < end; ++o) {
    const c10::BFloat16* row = w + o * in;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    const auto pairs = [](const c10::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); };
    int64_t i = 0;
    for (; i + 64 <= in; i += 64) {
      acc0 = _mm512_dpbf16_ps(acc0, pairs(row + i), pairs(rounded.data() + i));
      acc1 = _mm512_dpbf16_ps(acc1, pairs(row + i + 32), pairs(rounded.data() + i + 32));
    }
    if (i < in) acc0 = _mm512_dpbf16_ps(acc0, pairs(row + i), pairs(rounded.data() + i));
    y[o] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + (bias ? bias[o] : 0.0f);
  }
}
}  // namespace
}  // namespace avx512_bf16
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
namespace avx512 {
namespace {
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
#define QUANT_PAIRS 1  // and 512-bit dot products of two 32-value blocks at once
#include "quant_isa.inc"
#include "decode_isa.inc"
#undef QUANT_PAIRS
}  // namespace
}  // namespace avx512
#pragma GCC pop_options

namespace {

void check_isa(int64_t isa) {
  if (isa == kIsaAvx512) {
    TORCH_CHECK(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"),
                "quantized matmul: this CPU lacks AVX-512 VNNI");
  } else {
    TORCH_CHECK(isa == kIsaAvx2, "quantized matmul: isa must be 0 (AVX2) or 1 (AVX-512 VNNI), got ", isa);
    TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
                "quantized matmul: this CPU lacks AVX2 and FMA");
  }
}

int64_t check_blocks(const at::Tensor& blocks, int64_t qtype) {  // -> values per row
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.is_contiguous(),
              "quantized matmul: blocks must be a contiguous (rows, bytes per row) uint8 tensor");
  const TypeSize size = type_size(qtype);
  TORCH_CHECK(blocks.size(1) > 0 && blocks.size(1) % size.bytes == 0, "quantized matmul: ", blocks.size(1),
              " bytes per row is not a whole number of ", size.bytes, "-byte blocks");
  TORCH_CHECK(!is_interleaved(qtype) || (interleavable(base_type(qtype)) && blocks.size(0) % kGroupRows == 0),
              "quantized matmul: the interleaved layout is for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K in whole groups of ", kGroupRows,
              " rows (type code ", qtype, ", ", blocks.size(0), " rows)");
  return blocks.size(1) / size.bytes * size.values;
}

// x (..., in) holding one row (float32 or bfloat16), blocks (out, bytes per row), bias (out) float32 or
// none -> (..., out) in x's dtype.
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype,
                        const std::optional<at::Tensor>& bias, int64_t isa, bool float_activation) {
  check_isa(isa);
  const int64_t in = check_blocks(blocks, qtype), out = blocks.size(0);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quant_linear: x must be float32 or bfloat16");
  TORCH_CHECK(x.numel() == in && x.size(-1) == in, "quant_linear: x must be one row of ", in, " values");
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out,
                "quant_linear: bias must be (", out, ") contiguous float32");
    bias_ptr = bias->const_data_ptr<float>();
  }
  TORCH_CHECK(!float_activation || has_float_kernel(qtype), "quant_linear: interleaved blocks of this type have no float-activation kernel (Q4_0, Q4_1, Q8_0 and Q6_K do)");
  const at::Tensor row = x.contiguous();
  auto shape = x.sizes().vec();
  shape.back() = out;
  at::Tensor y = at::empty(shape, x.options());
  const uint8_t* w = blocks.const_data_ptr<uint8_t>();
  const int64_t row_bytes = blocks.size(1);
  if (x.scalar_type() == at::kFloat) {
    const float* xp = row.const_data_ptr<float>();
    float* yp = y.mutable_data_ptr<float>();
    if (float_activation) {
      if (isa == kIsaAvx512) avx512::linear_float(qtype, xp, in, w, row_bytes, bias_ptr, yp, out);
      else avx2::linear_float(qtype, xp, in, w, row_bytes, bias_ptr, yp, out);
    } else if (isa == kIsaAvx512) avx512::linear(qtype, xp, in, w, row_bytes, bias_ptr, yp, out);
    else avx2::linear(qtype, xp, in, w, row_bytes, bias_ptr, yp, out);
  } else {
    const c10::BFloat16* xp = row.const_data_ptr<c10::BFloat16>();
    c10::BFloat16* yp = y.mutable_data_ptr<c10::BFloat16>();
    if (float_activation) {
      if (isa == kIsaAvx512) avx512::linear_float(qtype, xp, in, w, row_bytes, bias_ptr, yp, out);
      else avx2::linear_float(qtype, xp, in, w, row_bytes, bias_ptr, yp, out);
    } else if (isa == kIsaAvx512) avx512::linear(qtype, xp, in, w, row_bytes, bias_ptr, yp, out);
    else avx2::linear(qtype, xp, in, w, row_bytes, bias_ptr, yp, out);
  }
  return y;
}

// blocks (rows, bytes per row) -> (rows, in) in dtype (float32 or bfloat16), written to the start of
// `scratch` where given (a buffer reused across calls: no fresh pages to fault in per call).
at::Tensor quant_dequantize(const at::Tensor& blocks, int64_t qtype, at::ScalarType dtype, int64_t isa,
                            const std::optional<at::Tensor>& scratch) {
  check_isa(isa);
  const int64_t in = check_blocks(blocks, qtype), rows = blocks.size(0);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "quant_dequantize: dtype must be float32 or bfloat16");
  at::Tensor y;
  if (scratch.has_value() && scratch->defined()) {
    TORCH_CHECK(scratch->scalar_type() == dtype && scratch->is_contiguous() && scratch->numel() >= rows * in,
                "quant_dequantize: scratch must be contiguous, of the dtype, with at least ", rows * in, " values");
    y = scratch->view({-1}).narrow(0, 0, rows * in).view({rows, in});
  } else {
    y = at::empty({rows, in}, blocks.options().dtype(dtype));
  }
  const uint8_t* w = blocks.const_data_ptr<uint8_t>();
  if (dtype == at::kFloat) {
    float* yp = y.mutable_data_ptr<float>();
    if (isa == kIsaAvx512) avx512::dequantize(qtype, w, rows, blocks.size(1), yp);
    else avx2::dequantize(qtype, w, rows, blocks.size(1), yp);
  } else {
    c10::BFloat16* yp = y.mutable_data_ptr<c10::BFloat16>();
    if (isa == kIsaAvx512) avx512::dequantize(qtype, w, rows, blocks.size(1), yp);
    else avx2::dequantize(qtype, w, rows, blocks.size(1), yp);
  }
  return y;
}

// blocks (rows, bytes per row) of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K, rows a multiple of 16, rearranged in place into the
// interleaved layout (convert_group): from then on their type code is qtype + 256 (kInterleaved).
at::Tensor& quant_interleave(at::Tensor& blocks, int64_t qtype) {
  TORCH_CHECK(interleavable(qtype), "quant_interleave: GGML type ", qtype, " has no interleaved layout (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K do)");
  check_blocks(blocks, qtype | kInterleaved);
  const int64_t row_bytes = blocks.size(1), group_bytes = kGroupRows * row_bytes;
  const TypeSize size = type_size(qtype);
  uint8_t* w = blocks.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, blocks.size(0) / kGroupRows, 1, [&](int64_t g0, int64_t g1) {
    std::vector<uint8_t> plain(group_bytes);
    for (int64_t g = g0; g < g1; ++g) {
      std::memcpy(plain.data(), w + g * group_bytes, group_bytes);
      convert_group(plain.data(), w + g * group_bytes, row_bytes, size.bytes, quants_of(qtype), /*to_interleaved=*/true);
    }
  });
  return blocks;
}

const float* bias_or_null(const at::Tensor& bias, int64_t out, const char* what) {
  if (bias.numel() == 0) return nullptr;
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == out,
              "quant_decode_step: the bias of ", what, " must be (", out, ") contiguous float32");
  return bias.const_data_ptr<float>();
}

// x: the token's embedding (dim) float32; blocks, qtypes, biases: 7 per layer (q, k, v, o, gate, up, down)
// then the output layer, a bias of no elements meaning none; a weight is GGUF blocks of its GGML type, or
// dense (out, in) rows of float32 (type 0, GGML's F32) or bfloat16 (type 30, GGML's BF16); norms: per layer
// the input and pre-MLP RMSNorm weights (then q_norm, k_norm where the model has them, then the attention's
// and the MLP's output norms where post_norms: Gemma 3), then the final norm, all float32 (a norm that
// scales by 1 + w is given 1 + w); cos, sin: per layer its (positions, head_dim) RoPE tables; keys, values:
// the float32 or bfloat16 KV cache (layers, 1, kv_heads, capacity, head_dim), written at `position`;
// windows: per layer its sliding-window length, 0 for none; gelu: the MLP's gate through tanh GELU
// (GeGLU) instead of SiLU.
// Returns the next token's logits (vocab) float32.
at::Tensor quant_decode_step(const at::Tensor& x, at::TensorList blocks, at::IntArrayRef qtypes,
                             at::TensorList biases, at::TensorList norms, double eps, at::TensorList cos,
                             at::TensorList sin, at::Tensor& keys, at::Tensor& values, int64_t position,
                             int64_t heads, double scale, at::IntArrayRef windows, bool post_norms, bool gelu,
                             int64_t isa) {
  check_isa(isa);
  const bool bf16_cache = keys.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bf16_cache || keys.scalar_type() == at::kFloat) && keys.dim() == 5 && keys.size(1) == 1 &&
                  keys.is_contiguous() && values.sizes() == keys.sizes() && values.scalar_type() == keys.scalar_type() &&
                  values.is_contiguous(),
              "quant_decode_step: keys and values must be contiguous float32 or bfloat16, both the same, (layers, 1, "
              "kv_heads, capacity, head_dim)");
  StepShape m{};
  m.layers = keys.size(0), m.kv_heads = keys.size(2), m.capacity = keys.size(3), m.head_dim = keys.size(4);
  m.heads = heads, m.position = position, m.eps = static_cast<float>(eps);
  m.scale = static_cast<float>(scale), m.post_norms = post_norms, m.gelu = gelu;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "quant_decode_step: x must be contiguous float32");
  m.dim = x.numel();
  TORCH_CHECK(heads > 0 && heads % m.kv_heads == 0 && m.head_dim % 8 == 0,
              "quant_decode_step: heads must be a multiple of kv_heads and head_dim of 8");
  TORCH_CHECK(position >= 0 && position < m.capacity, "quant_decode_step: position ", position,
              " is outside the cache's ", m.capacity);
  const int64_t slot_count = 7 * m.layers + 1;
  TORCH_CHECK(static_cast<int64_t>(blocks.size()) == slot_count && static_cast<int64_t>(qtypes.size()) == slot_count &&
                  static_cast<int64_t>(biases.size()) == slot_count,
              "quant_decode_step: expected ", slot_count, " weights, GGUF types and biases");
  m.hidden = blocks[4].size(0);
  m.vocab = blocks.back().size(0);
  TORCH_CHECK(m.hidden % 8 == 0, "quant_decode_step: the MLP width must be a multiple of 8");
  const int64_t q_size = heads * m.head_dim, kv_size = m.kv_heads * m.head_dim;
  // (out, in) of each slot of a layer
  const int64_t shapes[7][2] = {{q_size, m.dim}, {kv_size, m.dim}, {kv_size, m.dim}, {m.dim, q_size},
                                {m.hidden, m.dim}, {m.hidden, m.dim}, {m.dim, m.hidden}};
  std::vector<Slot> slots(slot_count);
  for (int64_t i = 0; i < slot_count; ++i) {
    const bool last = i == slot_count - 1;
    const int64_t out = last ? m.vocab : shapes[i % 7][0], in = last ? m.dim : shapes[i % 7][1];
    const at::Tensor& w = blocks[i];
    if (qtypes[i] == kF32 || qtypes[i] == kBF16) {  // dense rows, in a multiple of 16 (the dense dot's step)
      const auto dtype = qtypes[i] == kF32 ? at::kFloat : at::kBFloat16;
      TORCH_CHECK(w.scalar_type() == dtype && w.dim() == 2 && w.is_contiguous() && w.size(0) == out &&
                      w.size(1) == in && in % 16 == 0,
                  "quant_decode_step: dense weight ", i, " must be (", out, ", ", in, ") contiguous ",
                  qtypes[i] == kF32 ? "float32" : "bfloat16", ", in a multiple of 16");
      slots[i] = {static_cast<const uint8_t*>(w.const_data_ptr()), in * static_cast<int64_t>(w.element_size()),
                  qtypes[i], out, bias_or_null(biases[i], out, "a layer")};
      continue;
    }
    TORCH_CHECK(w.size(0) == out && check_blocks(w, qtypes[i]) == in, "quant_decode_step: weight ", i,
                " must be ", out, " rows of ", in, " values");
    TORCH_CHECK(i + 1 < slot_count || has_float_kernel(qtypes[i]),
                "quant_decode_step: the output layer's interleaved blocks have no float-activation kernel (Q4_0, Q4_1, Q8_0 and Q6_K do)");
    slots[i] = {w.const_data_ptr<uint8_t>(), w.size(1), qtypes[i], out, bias_or_null(biases[i], out, "a layer")};
  }
  const int64_t norms_count = static_cast<int64_t>(norms.size()), plain = post_norms ? 4 : 2;
  m.qk_norm = norms_count == (plain + 2) * m.layers + 1;
  TORCH_CHECK(m.qk_norm || norms_count == plain * m.layers + 1, "quant_decode_step: expected ", plain * m.layers + 1,
              " or ", (plain + 2) * m.layers + 1, " norm weights");
  const int64_t per_layer = m.qk_norm ? plain + 2 : plain;
  std::vector<const float*> norm_weights(norms_count);
  for (int64_t i = 0; i < norms_count; ++i) {
    const bool per_head = m.qk_norm && i < norms_count - 1 && (i % per_layer == 2 || i % per_layer == 3);
    TORCH_CHECK(norms[i].scalar_type() == at::kFloat && norms[i].is_contiguous() &&
                    norms[i].numel() == (per_head ? m.head_dim : m.dim),
                "quant_decode_step: norm weight ", i, " must be contiguous float32 of ", per_head ? m.head_dim : m.dim);
    norm_weights[i] = norms[i].const_data_ptr<float>();
  }
  TORCH_CHECK(static_cast<int64_t>(cos.size()) == m.layers && static_cast<int64_t>(sin.size()) == m.layers &&
                  static_cast<int64_t>(windows.size()) == m.layers,
              "quant_decode_step: expected ", m.layers, " cos and sin tables and windows, one per layer");
  std::vector<LayerAttention> attention(m.layers);
  for (int64_t l = 0; l < m.layers; ++l) {
    for (const at::Tensor* table : {&cos[l], &sin[l]}) {
      TORCH_CHECK(table->scalar_type() == at::kFloat && table->is_contiguous() && table->dim() == 2 &&
                      table->size(0) > position && table->size(1) == m.head_dim,
                  "quant_decode_step: cos and sin must be contiguous float32 (positions > ", position, ", ", m.head_dim, ")");
    }
    TORCH_CHECK(windows[l] >= 0, "quant_decode_step: a sliding window must be 0 (none) or positive, got ", windows[l]);
    attention[l] = {cos[l].const_data_ptr<float>() + position * m.head_dim,
                    sin[l].const_data_ptr<float>() + position * m.head_dim, windows[l]};
  }
  at::Tensor logits = at::empty({m.vocab}, x.options());
  if (bf16_cache) {
    using C = c10::BFloat16;
    const auto step = isa == kIsaAvx512 ? &avx512::decode_step<C> : &avx2::decode_step<C>;
    step(m, slots, norm_weights, attention, keys.mutable_data_ptr<C>(), values.mutable_data_ptr<C>(),
         x.const_data_ptr<float>(), logits.mutable_data_ptr<float>());
  } else {
    const auto step = isa == kIsaAvx512 ? &avx512::decode_step<float> : &avx2::decode_step<float>;
    step(m, slots, norm_weights, attention, keys.mutable_data_ptr<float>(), values.mutable_data_ptr<float>(),
         x.const_data_ptr<float>(), logits.mutable_data_ptr<float>());
  }
  return logits;
}

}  // namespace

// a fragment: decode_bf16.cpp defines the namespace's other ops
TORCH_LIBRARY_FRAGMENT(chattui, m) {
  m.def("quant_linear(Tensor x, Tensor blocks, int qtype, Tensor? bias, int isa, bool float_activation=False) -> Tensor");
  m.def("quant_dequantize(Tensor blocks, int qtype, ScalarType dtype, int isa, Tensor? scratch=None) -> Tensor");
  m.def("quant_interleave(Tensor(a!) blocks, int qtype) -> Tensor(a!)");
  m.def("quant_decode_step(Tensor x, Tensor[] blocks, int[] qtypes, Tensor[] biases, Tensor[] norms, float eps, "
        "Tensor[] cos, Tensor[] sin, Tensor(a!) keys, Tensor(b!) values, int position, int heads, float scale, "
        "int[] windows, bool post_norms, bool gelu, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(chattui, CPU, m) {
  m.impl("quant_linear", &quant_linear);
  m.impl("quant_dequantize", &quant_dequantize);
  m.impl("quant_interleave", &quant_interleave);
  m.impl("quant_decode_step", &quant_decode_step);
}
