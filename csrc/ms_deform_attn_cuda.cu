// CUDA kernels of deformable_detr::ms_deform_attn (float32, float16, bfloat16, float64), forward and backward.
//
// A group of G threads (G a power of two <= 32, inside one warp) handles one (batch, query, head): its
// D channels are split into packs of V consecutive elements (16-byte loads where D and the alignment
// allow), thread `lane` of the group owning packs lane, lane + G, ... Every thread of the group walks the
// same L x P sampling points, so the bilinear corners of a point are read as G contiguous 16-byte pieces
// of one D-channel row (coalesced), and all arithmetic is done in float32 (float64 for float64 inputs).
//
// Backward: the gradients of a point's location and attention weight are sums over the D channels:
// each thread computes its partial sums and the group reduces them with warp shuffles, then one thread
// writes them (no atomics). grad_value rows are shared between queries and need atomics; for float16 and
// bfloat16 they accumulate in a float32 buffer, converted at the end. On sm_90 a pack of 4 floats is added
// with one vector atomic.
#include <algorithm>
#include <tuple>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // (not ATen/cuda/CUDAContext.h: it needs the cuBLAS / cuSPARSE headers)
#include <torch/library.h>

#include "ms_deform_attn.h"

namespace deformable_detr {
namespace {

constexpr int kThreadsPerBlock = 256;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename acc_t, typename scalar_t, int V>
__device__ __forceinline__ void load_pack(const scalar_t* __restrict__ ptr, acc_t (&out)[V]) {
  const Pack<scalar_t, V> pack = *reinterpret_cast<const Pack<scalar_t, V>*>(ptr);
#pragma unroll
  for (int i = 0; i < V; ++i) {
    out[i] = static_cast<acc_t>(pack.v[i]);
  }
}

template <typename acc_t, typename scalar_t, int V>
__device__ __forceinline__ void store_pack(scalar_t* __restrict__ ptr, const acc_t (&in)[V]) {
  Pack<scalar_t, V> pack;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    pack.v[i] = static_cast<scalar_t>(in[i]);
  }
  *reinterpret_cast<Pack<scalar_t, V>*>(ptr) = pack;
}

// dst[0:V] += val[0:V] atomically (dst aligned to V elements)
template <int V>
__device__ __forceinline__ void atomic_add_pack(float* dst, const float (&val)[V]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
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

// Lanes of the calling thread's group inside its warp.
__device__ __forceinline__ unsigned group_mask(int group_size) {
  if (group_size == 32) {
    return 0xffffffffu;
  }
  const int first = (threadIdx.x % 32) / group_size * group_size;
  return ((1u << group_size) - 1u) << first;
}

template <typename T>
__device__ __forceinline__ T group_sum(T x, unsigned mask, int group_size) {
  for (int offset = group_size / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(mask, x, offset);
  }
  return x;
}

struct Dims {
  int64_t num_groups;  // N * Lq * M
  int64_t S;
  int Lq, M, D, L, P;
  int group_size;  // threads per (n, q, m)
};

// value: N x S x M x D; sampling_locations: N x Lq x M x L x P x 2; attention_weights: N x Lq x M x L x P;
// output: N x Lq x M x D
template <typename scalar_t, typename coord_t, int V>
__global__ void __launch_bounds__(kThreadsPerBlock) ms_deform_attn_forward_kernel(
    const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
    const int64_t* __restrict__ level_start_index, const coord_t* __restrict__ sampling_locations,
    const coord_t* __restrict__ attention_weights, scalar_t* __restrict__ output, const Dims d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / d.group_size;
  if (group >= d.num_groups) {
    return;
  }
  const int lane = threadIdx.x % d.group_size;
  const int m = static_cast<int>(group % d.M);
  const int64_t n = group / d.M / d.Lq;
  const int64_t row = static_cast<int64_t>(d.M) * d.D;  // stride of one spatial position in value
  const scalar_t* value_nm = value + n * d.S * row + static_cast<int64_t>(m) * d.D;
  const coord_t* loc = sampling_locations + group * d.L * d.P * 2;
  const coord_t* attn = attention_weights + group * d.L * d.P;
  const int num_packs = d.D / V;

  for (int pack = lane; pack < num_packs; pack += d.group_size) {
    acc_t acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      acc[i] = acc_t(0);
    }
    for (int l = 0; l < d.L; ++l) {
      const int H = static_cast<int>(spatial_shapes[2 * l]);
      const int W = static_cast<int>(spatial_shapes[2 * l + 1]);
      const scalar_t* value_l = value_nm + level_start_index[l] * row + pack * V;
      for (int p = 0; p < d.P; ++p) {
        const int k = l * d.P + p;
        BilinearPoint<acc_t> pt;
        if (!pt.init(static_cast<acc_t>(loc[2 * k]), static_cast<acc_t>(loc[2 * k + 1]), H, W)) {
          continue;
        }
        const acc_t a = static_cast<acc_t>(attn[k]);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (pt.valid[c]) {
            acc_t v[V];
            load_pack<acc_t, scalar_t, V>(value_l + pt.offset[c] * row, v);
            const acc_t coeff = a * pt.weight[c];
#pragma unroll
            for (int i = 0; i < V; ++i) {
              acc[i] += coeff * v[i];
            }
          }
        }
      }
    }
    store_pack<acc_t, scalar_t, V>(output + group * d.D + pack * V, acc);
  }
}

// grad_value (grad_t: float, or double for float64) must be zero on entry; grad_sampling_locations and
// grad_attention_weights are fully written.
template <typename scalar_t, typename coord_t, typename grad_t, int V>
__global__ void __launch_bounds__(kThreadsPerBlock) ms_deform_attn_backward_kernel(
    const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
    const int64_t* __restrict__ spatial_shapes, const int64_t* __restrict__ level_start_index,
    const coord_t* __restrict__ sampling_locations, const coord_t* __restrict__ attention_weights,
    grad_t* __restrict__ grad_value, coord_t* __restrict__ grad_sampling_locations,
    coord_t* __restrict__ grad_attention_weights, const Dims d) {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(std::is_same<acc_t, grad_t>::value, "grad_value accumulates in the math type");
  const int64_t group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / d.group_size;
  if (group >= d.num_groups) {
    return;  // the whole group leaves together: the shuffles below only involve its own lanes
  }
  const unsigned mask = group_mask(d.group_size);
  const int lane = threadIdx.x % d.group_size;
  const int m = static_cast<int>(group % d.M);
  const int64_t n = group / d.M / d.Lq;
  const int64_t row = static_cast<int64_t>(d.M) * d.D;
  const int64_t value_nm = n * d.S * row + static_cast<int64_t>(m) * d.D;
  const coord_t* loc = sampling_locations + group * d.L * d.P * 2;
  const coord_t* attn = attention_weights + group * d.L * d.P;
  coord_t* grad_loc = grad_sampling_locations + group * d.L * d.P * 2;
  coord_t* grad_attn = grad_attention_weights + group * d.L * d.P;
  const int num_packs = d.D / V;

  // Every lane runs the same number of rounds (the shuffles need the whole group); in the last round
  // lanes past the end of D contribute zeros.
  for (int first_pack = 0; first_pack < num_packs; first_pack += d.group_size) {
    const int pack = first_pack + lane;
    const bool has_pack = pack < num_packs;
    acc_t g[V];
    if (has_pack) {
      load_pack<acc_t, scalar_t, V>(grad_output + group * d.D + pack * V, g);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        g[i] = acc_t(0);
      }
    }
    for (int l = 0; l < d.L; ++l) {
      const int H = static_cast<int>(spatial_shapes[2 * l]);
      const int W = static_cast<int>(spatial_shapes[2 * l + 1]);
      const int64_t offset_l = value_nm + level_start_index[l] * row + pack * V;
      const scalar_t* value_l = value + offset_l;
      grad_t* grad_value_l = grad_value + offset_l;
      for (int p = 0; p < d.P; ++p) {
        const int k = l * d.P + p;
        BilinearPoint<acc_t> pt;
        acc_t grad_a = 0, grad_x = 0, grad_y = 0;
        // The same for every lane of the group (same location), so the shuffles stay uniform.
        if (pt.init(static_cast<acc_t>(loc[2 * k]), static_cast<acc_t>(loc[2 * k + 1]), H, W)) {
          const acc_t a = static_cast<acc_t>(attn[k]);
          acc_t dots[4] = {0, 0, 0, 0};
          if (has_pack) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              if (pt.valid[c]) {
                acc_t v[V];
                load_pack<acc_t, scalar_t, V>(value_l + pt.offset[c] * row, v);
                const acc_t coeff = a * pt.weight[c];
                acc_t contribution[V];
#pragma unroll
                for (int i = 0; i < V; ++i) {
                  dots[c] += g[i] * v[i];
                  contribution[i] = coeff * g[i];
                }
                atomic_add_pack<V>(grad_value_l + pt.offset[c] * row, contribution);
              }
            }
          }
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            grad_a += pt.weight[c] * dots[c];
          }
          pt.pixel_grad(dots, grad_x, grad_y);
          grad_a = group_sum(grad_a, mask, d.group_size);
          grad_x = group_sum(grad_x, mask, d.group_size) * a * W;
          grad_y = group_sum(grad_y, mask, d.group_size) * a * H;
        }
        if (lane == 0) {
          // one writer per (n, q, m, l, p); later rounds (D > V * group_size) add to the first
          if (first_pack == 0) {
            grad_attn[k] = static_cast<coord_t>(grad_a);
            grad_loc[2 * k] = static_cast<coord_t>(grad_x);
            grad_loc[2 * k + 1] = static_cast<coord_t>(grad_y);
          } else {
            grad_attn[k] += static_cast<coord_t>(grad_a);
            grad_loc[2 * k] += static_cast<coord_t>(grad_x);
            grad_loc[2 * k + 1] += static_cast<coord_t>(grad_y);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side

struct Inputs {
  at::Tensor value, spatial_shapes, level_start_index, sampling_locations, attention_weights;
  Dims dims;
  int vec;  // elements per pack
};

// float32 coordinates and weights for float16 / bfloat16 / float32 values, float64 for float64 values
at::ScalarType coord_type(at::ScalarType value_type) {
  return value_type == at::kDouble ? at::kDouble : at::kFloat;
}

int max_vec(at::ScalarType t) {
  return 16 / static_cast<int>(c10::elementSize(t));
}

bool aligned(const at::Tensor& t, int bytes) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

Inputs prepare(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
               const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be N x S x M x D, got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be N x Lq x M x L x P x 2, got ", sampling_locations.sizes());
  const int64_t N = value.size(0), S = value.size(1), M = value.size(2), D = value.size(3);
  const int64_t Lq = sampling_locations.size(1), L = sampling_locations.size(3), P = sampling_locations.size(4);
  TORCH_CHECK(sampling_locations.size(0) == N && sampling_locations.size(2) == M,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(), " do not match value ", value.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights must be N x Lq x M x L x P = ", sampling_locations.sizes().slice(0, 5),
              ", got ", attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == L && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be L x 2 with L = ", L, ", got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L,
              "ms_deform_attn: level_start_index must have L = ", L, " entries, got ", level_start_index.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn (CUDA kernel): value must be a CUDA tensor, got ", value.device());
  for (const at::Tensor* t : {&sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(), "ms_deform_attn (CUDA kernel): inputs on ", t->device(),
                " and ", value.device());
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), "ms_deform_attn: sampling_locations and attention_weights "
                "must be floating point, got ", t->scalar_type());
  }
  const auto dtype = value.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "ms_deform_attn (CUDA kernel): value must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(N * Lq * M < (int64_t(1) << 40) && Lq < INT32_MAX && M < INT32_MAX && D < INT32_MAX,
              "ms_deform_attn: problem too large");

  Inputs in;
  const auto device = value.device();
  in.value = value.contiguous();
  // tiny; copied to the GPU when given on the CPU (as the official op expects them on the GPU)
  in.spatial_shapes = spatial_shapes.to(device).contiguous();
  in.level_start_index = level_start_index.to(device).contiguous();
  in.sampling_locations = sampling_locations.to(coord_type(dtype)).contiguous();
  in.attention_weights = attention_weights.to(coord_type(dtype)).contiguous();
  in.dims = Dims{N * Lq * M, S, static_cast<int>(Lq), static_cast<int>(M), static_cast<int>(D),
                 static_cast<int>(L), static_cast<int>(P), 1};
  const int vmax = max_vec(dtype);
  const int elem = static_cast<int>(c10::elementSize(dtype));
  in.vec = (D % vmax == 0 && aligned(in.value, vmax * elem)) ? vmax : 1;
  int packs = static_cast<int>(D / in.vec), group_size = 1;
  while (group_size < packs && group_size < 32) {
    group_size *= 2;
  }
  in.dims.group_size = group_size;
  return in;
}

unsigned num_blocks(const Dims& d) {
  const int64_t threads = d.num_groups * d.group_size;
  return static_cast<unsigned>((threads + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard guard(value.device());
  Inputs in = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Dims& d = in.dims;
  auto output = at::empty({value.size(0), d.Lq, static_cast<int64_t>(d.M) * d.D}, in.value.options());
  if (output.numel() == 0) {
    return output;
  }
  if (d.L == 0 || d.P == 0) {
    return output.zero_();
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using coord_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto* v = in.value.data_ptr<scalar_t>();
    const auto* shapes = in.spatial_shapes.data_ptr<int64_t>();
    const auto* starts = in.level_start_index.data_ptr<int64_t>();
    const auto* loc = in.sampling_locations.data_ptr<coord_t>();
    const auto* attn = in.attention_weights.data_ptr<coord_t>();
    auto* out = output.data_ptr<scalar_t>();
    if (in.vec == kVec) {
      ms_deform_attn_forward_kernel<scalar_t, coord_t, kVec>
          <<<num_blocks(d), kThreadsPerBlock, 0, stream>>>(v, shapes, starts, loc, attn, out, d);
    } else {
      ms_deform_attn_forward_kernel<scalar_t, coord_t, 1>
          <<<num_blocks(d), kThreadsPerBlock, 0, stream>>>(v, shapes, starts, loc, attn, out, d);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard guard(value.device());
  Inputs in = prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Dims& d = in.dims;
  TORCH_CHECK(grad_output.numel() == d.num_groups * d.D, "ms_deform_attn_backward: grad_output has ",
              grad_output.numel(), " elements, expected N x Lq x M*D = ", d.num_groups * d.D);
  TORCH_CHECK(grad_output.device() == value.device(), "ms_deform_attn_backward: grad_output on ",
              grad_output.device(), ", value on ", value.device());
  const auto dtype = in.value.scalar_type();
  const auto grad_out = grad_output.to(dtype).contiguous();
  if (in.vec > 1 && !aligned(grad_out, in.vec * static_cast<int>(c10::elementSize(dtype)))) {
    in.vec = 1;  // a view of grad_output that starts mid-pack
    int packs = d.D, group_size = 1;
    while (group_size < packs && group_size < 32) {
      group_size *= 2;
    }
    in.dims.group_size = group_size;
  }
  // float32 accumulation for float16 / bfloat16 (float64 for float64)
  auto grad_value_acc = at::zeros(in.value.sizes(), in.value.options().dtype(coord_type(dtype)));
  auto grad_loc = at::empty(in.sampling_locations.sizes(), in.sampling_locations.options());
  auto grad_attn = at::empty(in.attention_weights.sizes(), in.attention_weights.options());
  if (grad_loc.numel() > 0 && d.D > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ms_deform_attn_backward_cuda", [&] {
      using coord_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
      using grad_t = coord_t;
      constexpr int kVec = 16 / sizeof(scalar_t);
      const auto* go = grad_out.data_ptr<scalar_t>();
      const auto* v = in.value.data_ptr<scalar_t>();
      const auto* shapes = in.spatial_shapes.data_ptr<int64_t>();
      const auto* starts = in.level_start_index.data_ptr<int64_t>();
      const auto* loc = in.sampling_locations.data_ptr<coord_t>();
      const auto* attn = in.attention_weights.data_ptr<coord_t>();
      auto* gv = grad_value_acc.data_ptr<grad_t>();
      auto* gl = grad_loc.data_ptr<coord_t>();
      auto* ga = grad_attn.data_ptr<coord_t>();
      if (in.vec == kVec) {
        ms_deform_attn_backward_kernel<scalar_t, coord_t, grad_t, kVec><<<num_blocks(in.dims), kThreadsPerBlock, 0,
                                                                          stream>>>(go, v, shapes, starts, loc, attn,
                                                                                    gv, gl, ga, in.dims);
      } else {
        ms_deform_attn_backward_kernel<scalar_t, coord_t, grad_t, 1><<<num_blocks(in.dims), kThreadsPerBlock, 0,
                                                                       stream>>>(go, v, shapes, starts, loc, attn, gv,
                                                                                 gl, ga, in.dims);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    grad_loc.zero_();
    grad_attn.zero_();
  }
  return {grad_value_acc.to(dtype), grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace

// The schema of both ops is defined in Python (model/ops/library.py), with their fake implementations
// and autograd; this library only adds the CUDA kernels.
TORCH_LIBRARY_IMPL(deformable_detr, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace deformable_detr
