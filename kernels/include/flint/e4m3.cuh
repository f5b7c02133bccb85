// E4M3 codes: conversion both ways and the scale convention shared by the FP8 weights,
// activations and KV cache. value = code * scale, scale = amax / 448 (1 for an all-zero row);
// codes are round-to-nearest-even of value / scale, saturated at +-448.
#pragma once

#include <cuda_fp8.h>

#include "common.cuh"

namespace flint {

constexpr float kE4M3Max = 448.f;

__device__ __forceinline__ float fp8_scale(float amax) {
    return amax > 0.f && isfinite(amax) ? amax / kE4M3Max : 1.f;
}

// Two values to two E4M3 codes (low byte first).
__device__ __forceinline__ uint16_t to_e4m3x2(float a, float b) {
    return static_cast<uint16_t>(__nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3));
}

// Two E4M3 codes (low byte first) to their values; exact (every code is a half).
__device__ __forceinline__ float2 from_e4m3x2(uint16_t codes) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(codes), __NV_E4M3);
    return __half22float2(__half2(h));
}

// Eight codes (one 8-byte load) to eight values.
__device__ __forceinline__ void unpack(const uint2& codes, float (&out)[8]) {
    const uint32_t w[2] = {codes.x, codes.y};
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const float2 f = from_e4m3x2(static_cast<uint16_t>(w[i] >> (16 * j)));
            out[4 * i + 2 * j] = f.x;
            out[4 * i + 2 * j + 1] = f.y;
        }
}

// Eight values / scale as eight codes, one 8-byte store.
__device__ __forceinline__ void store_e4m3x8(uint8_t* dst, const float (&v)[8], float scale) {
    uint32_t lo = to_e4m3x2(v[0] / scale, v[1] / scale) | (uint32_t)to_e4m3x2(v[2] / scale, v[3] / scale) << 16;
    uint32_t hi = to_e4m3x2(v[4] / scale, v[5] / scale) | (uint32_t)to_e4m3x2(v[6] / scale, v[7] / scale) << 16;
    *reinterpret_cast<uint2*>(dst) = make_uint2(lo, hi);
}

// value / scale rounded as IEEE division rounds it, from rcp = 1 / scale (IEEE): the quotient's
// residual is exact in an FMA, and one correction step rounds it right (the step division's own
// fast path takes). For per-row activation scales |value| <= 448 scale, so nothing overflows, and
// quotients small enough to lose bits to underflow are far below the smallest E4M3 code; an
// all-zero row has scale 1 and every quotient exact. (An infinite amax, scale 1, makes an
// infinite value NaN here where division saturates it: the row is lost either way.)
__device__ __forceinline__ float div_by_scale(float value, float scale, float rcp) {
    const float q = value * rcp;
    return fmaf(fmaf(-q, scale, value), rcp, q);
}

// ---- Per-token amax published by the producer of an activation --------------------------
//
// A kernel that writes an activation row which the next kernel quantizes maxes |value| of what
// it wrote into one of kAmaxSlots floats of the row's token (a non-negative float's bits order
// like an unsigned integer, so atomicMax on them is a float max); the consumer's scale is
// fp8_scale(max over the slots), the amax quantize_row would find. Spreading the atomics over
// slots keeps a few thousand producing warps off a single address.
constexpr int kAmaxSlots = 32;

// fmaxf drops NaN, as quantize_row's amax does; v >= 0.
__device__ __forceinline__ void amax_publish(float* slots, int token, int slot, float v) {
    atomicMax(reinterpret_cast<unsigned*>(slots) + token * kAmaxSlots + slot % kAmaxSlots, __float_as_uint(v));
}

}  // namespace flint
