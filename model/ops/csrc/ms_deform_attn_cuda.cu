// CUDA kernels of deformable_detr::ms_deform_attn (float32, float16, bfloat16, float64), forward and backward.
//
// The work of one thread group (one (batch, query, head)) is in ms_deform_attn_group.h, the host side (checks,
// layout, dtype dispatch, the float32 gradient buffer) in ms_deform_attn_launch.h; both are shared with the
// host emulator (ms_deform_attn_emulator.cpp), which runs them on the CPU. This file adds what only a GPU has:
// the thread -> group mapping, warp shuffles, atomics, device asserts and the launches.
//
// On sm_90 a pack of 4 floats of grad_value is added with one vector atomic, where the toolkit has it (CUDA 12.1
// and newer: ms_deform_attn_atomic.h).
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // (not ATen/cuda/CUDAContext.h: it needs the cuBLAS / cuSPARSE headers)
#include <torch/library.h>

#include "ms_deform_attn_atomic.h"
#include "ms_deform_attn_group.h"
#include "ms_deform_attn_launch.h"

namespace deformable_detr {
namespace {

// The calling thread, one lane of its group (see the Lanes policy in ms_deform_attn_group.h).
struct DeviceLanes {
  static constexpr int kMax = 1;
  int own_lane;
  int group_size;
  unsigned mask;  // the group's lanes inside the warp

  __device__ static DeviceLanes of_thread(int group_size) {
    const int first = (threadIdx.x % kWarpSize) / group_size * group_size;
    const unsigned mask = group_size == kWarpSize ? 0xffffffffu : ((1u << group_size) - 1u) << first;
    return {static_cast<int>(threadIdx.x % group_size), group_size, mask};
  }
  __device__ int count() const { return 1; }
  __device__ int lane(int) const { return own_lane; }

  template <typename T>
  __device__ void sum(T (&x)[1]) const {
    for (int offset = group_size / 2; offset > 0; offset /= 2) {
      x[0] += __shfl_xor_sync(mask, x[0], offset);
    }
  }

  template <int V, typename T>
  __device__ void atomic_add(T* dst, const T (&val)[V]) const {
    atomic_add_pack<V>(dst, val);
  }

  __device__ void level_outside() const {
    CUDA_KERNEL_ASSERT(false && "ms_deform_attn: a level does not fit in value (level_start_index + H * W > S)");
  }
};

template <typename scalar_t, typename coord_t, int V>
__global__ void __launch_bounds__(kThreadsPerBlock)
    ms_deform_attn_forward_kernel(const ForwardArgs<scalar_t, coord_t> args, const Dims d) {
  const int64_t group = group_of_thread(blockIdx.x, threadIdx.x, d);
  if (group >= d.num_groups) {
    return;
  }
  forward_group<scalar_t, coord_t, V>(args, group, DeviceLanes::of_thread(d.group_size), d);
}

template <typename scalar_t, typename coord_t, typename grad_t, int V>
__global__ void __launch_bounds__(kThreadsPerBlock)
    ms_deform_attn_backward_kernel(const BackwardArgs<scalar_t, coord_t, grad_t> args, const Dims d) {
  const int64_t group = group_of_thread(blockIdx.x, threadIdx.x, d);
  if (group >= d.num_groups) {
    return;  // the whole group leaves together: the shuffles only involve its own lanes
  }
  backward_group<scalar_t, coord_t, grad_t, V>(args, group, DeviceLanes::of_thread(d.group_size), d);
}

struct CudaLauncher {
  static constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
  static constexpr const char* kName = "CUDA kernel";
  static constexpr bool kCheckLevelsOnHost = true;

  template <typename scalar_t, typename coord_t, int V>
  static void forward(const ForwardArgs<scalar_t, coord_t>& args, const Dims& d, unsigned blocks) {
    ms_deform_attn_forward_kernel<scalar_t, coord_t, V>
        <<<blocks, kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(args, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t, typename coord_t, typename grad_t, int V>
  static void backward(const BackwardArgs<scalar_t, coord_t, grad_t>& args, const Dims& d, unsigned blocks) {
    ms_deform_attn_backward_kernel<scalar_t, coord_t, grad_t, V>
        <<<blocks, kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(args, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights, bool softmax) {
  const c10::cuda::CUDAGuard guard(value.device());
  return forward_op<CudaLauncher>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                  softmax);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    bool softmax) {
  const c10::cuda::CUDAGuard guard(value.device());
  return backward_op<CudaLauncher>(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                   attention_weights, softmax);
}

}  // namespace

// The schema of both ops is defined in Python (model/ops/library.py), with their fake implementations
// and autograd; this library only adds the CUDA kernels.
TORCH_LIBRARY_IMPL(deformable_detr, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace deformable_detr
