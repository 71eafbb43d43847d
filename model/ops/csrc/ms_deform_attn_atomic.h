// Atomic adds of a pack of V consecutive grad_value elements, for the CUDA kernels (device code only).
//
// On sm_90 a pack of 4 floats is added with one vector atomic (atomicAdd(float4*, float4): atom/red .v4.f32).
// That overload, and the PTX instruction behind it (PTX ISA 8.1), came with CUDA 12.1: a toolkit before it
// (CUDA 11.8, which torch still ships builds for, or 12.0) compiles the scalar loop instead, as for every other
// architecture. DEFORMABLE_DETR_CUDA_VERSION (1000 * major + 10 * minor, default CUDART_VERSION) can be set on the
// command line to see what an older toolkit compiles (tests/test_ops_cuda_build.py).
#pragma once

#ifndef DEFORMABLE_DETR_CUDA_VERSION
#if defined(CUDART_VERSION)
#define DEFORMABLE_DETR_CUDA_VERSION CUDART_VERSION
#elif defined(__CUDACC_VER_MAJOR__)
#define DEFORMABLE_DETR_CUDA_VERSION (__CUDACC_VER_MAJOR__ * 1000 + __CUDACC_VER_MINOR__ * 10)
#else
#define DEFORMABLE_DETR_CUDA_VERSION 0
#endif
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && DEFORMABLE_DETR_CUDA_VERSION >= 12010
#define DEFORMABLE_DETR_VECTOR_ATOMIC_ADD 1
#else
#define DEFORMABLE_DETR_VECTOR_ATOMIC_ADD 0
#endif

namespace deformable_detr {

// dst[0:V] += val[0:V] atomically (dst aligned to V elements)
template <int V>
__device__ __forceinline__ void atomic_add_pack(float* dst, const float (&val)[V]) {
#if DEFORMABLE_DETR_VECTOR_ATOMIC_ADD
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + i), make_float4(val[i], val[i + 1], val[i + 2], val[i + 3]));
    }
  } else
#endif
  {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      atomicAdd(dst + i, val[i]);
    }
  }
}

template <int V>
__device__ __forceinline__ void atomic_add_pack(double* dst, const double (&val)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) {
    atomicAdd(dst + i, val[i]);
  }
}

}  // namespace deformable_detr
