// How the row kernels scale and store the logit gradient dz, shared by the C++ and CUDA kernels.
//
// dz = g / T * (onehot - p) is ~1/N per token (N: global action tokens, up to ~1e7), far below
// fp16's normal range (6e-5): stored unscaled, most entries would flush to zero before a loss
// scaler's factor arrives. Both kernels therefore store `sigma * dz`, sigma a power of two
// ~ 1 / max |g / T| computed by the chunk loop (linear_logprob.cpp) and handed back to autograd,
// whose backward multiplies by grad_output / sigma in fp32 (exact: a power of two).
//
// The CPU kernel's bf16/fp16 path stores through these same functions (with the portable
// round-to-nearest-even conversions below in place of the CUDA intrinsics, bit-identical for finite
// values), so the CPU tests prove the CUDA store logic.
#pragma once

#include <cstdint>
#include <cstring>

#include "params.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#if defined(__CUDACC__)
#define OREAL_STORE_HD __host__ __device__ __forceinline__
#else
#define OREAL_STORE_HD inline
#endif

namespace oreal {

// The per-row factor of the stored logit gradient: sigma * g / T.
OREAL_STORE_HD float stored_grad_scale(float dloss_dlogprob, float inv_temperature, float sigma) {
  return dloss_dlogprob * inv_temperature * sigma;
}

OREAL_STORE_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}

// fp32 -> bf16 bits, round to nearest even (NaN stays a quiet NaN).
OREAL_STORE_HD uint16_t bf16_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
#else
  const uint32_t bits = float_bits(x);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
#endif
}

// fp32 -> fp16 bits, round to nearest even, with fp16 subnormals, overflow to inf, NaN kept.
OREAL_STORE_HD uint16_t fp16_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(x));
#else
  const uint32_t bits = float_bits(x);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (magnitude < 0x38800000u) {  // below 2^-14: an fp16 subnormal (or zero)
    if (magnitude < 0x33000000u) return sign;  // below half the smallest subnormal 2^-24 (ties go to 0)
    const uint32_t exponent = magnitude >> 23;
    const uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exponent;  // value = mantissa * 2^(exponent - 150); unit = 2^-24
    const uint32_t half_way = 1u << (shift - 1);
    uint32_t result = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u);
    if (rest > half_way || (rest == half_way && (result & 1u))) result += 1u;
    return static_cast<uint16_t>(sign | result);
  }
  // normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even
  const uint32_t rebased = magnitude - (112u << 23);
  const uint32_t rounded = rebased + 0xfffu + ((rebased >> 13) & 1u);
  return static_cast<uint16_t>(sign | (rounded >> 13));
#endif
}

OREAL_STORE_HD uint16_t lowp_bits(float x, GradDType dtype) {
  return dtype == GradDType::kFloat16 ? fp16_bits(x) : bf16_bits(x);
}

// Stores four consecutive stored-gradient values starting at `out + v` (v a multiple of 4, the row
// 8-byte aligned): one 8-byte store on the GPU instead of four 2-byte ones.
OREAL_STORE_HD void store_lowp4(uint16_t* out, int64_t v, float g0, float g1, float g2, float g3,
                                GradDType dtype) {
  const uint64_t packed = static_cast<uint64_t>(lowp_bits(g0, dtype)) |
                          (static_cast<uint64_t>(lowp_bits(g1, dtype)) << 16) |
                          (static_cast<uint64_t>(lowp_bits(g2, dtype)) << 32) |
                          (static_cast<uint64_t>(lowp_bits(g3, dtype)) << 48);
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint64_t*>(out + v) = packed;
#else
  std::memcpy(out + v, &packed, sizeof(packed));  // little-endian: element v in the low bits
#endif
}

OREAL_STORE_HD void store_lowp(uint16_t* out, int64_t v, float g, GradDType dtype) { out[v] = lowp_bits(g, dtype); }

}  // namespace oreal
