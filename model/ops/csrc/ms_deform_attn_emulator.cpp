// The CUDA kernels run on the host: deformable_detr::ms_deform_attn_emulated (and _backward), a test-only CPU
// op that executes ms_deform_attn_group.h and ms_deform_attn_launch.h, the very code the GPU runs, for every
// dtype the CUDA kernel takes (float32, float16, bfloat16, float64).
//
// Every block of the launch is run, and in it every group of threads, mapped to its (n, q, m) by the same
// function as on the GPU; the lanes of a group run in lockstep over arrays, their shuffle reductions are the
// same xor butterfly over the array, their atomics plain additions. Blocks run last to first, since a GPU
// runs them in no particular order. Every memory access is bounds- and alignment-checked (Buffer).
//
// What this cannot show: races between groups (they run one after another here), the shuffle masks and the
// warp placement of groups (checked only as arithmetic), launch limits (registers, the grid size the device
// accepts, kernel images for its architecture), the sm_90 vector atomics, and device-side asserts (raised
// here as exceptions).
#include <tuple>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "ms_deform_attn_group.h"
#include "ms_deform_attn_launch.h"

namespace deformable_detr {
namespace {

// All lanes of one group, in lockstep (see the Lanes policy in ms_deform_attn_group.h).
struct HostLanes {
  static constexpr int kMax = kMaxGroupSize;
  int first_thread;  // threadIdx.x of lane 0
  int group_size;

  int count() const { return group_size; }
  int lane(int j) const { return (first_thread + j) % group_size; }  // the GPU's threadIdx.x % group_size

  // The butterfly of __shfl_xor_sync: in each step every lane reads its partner's value from before the step.
  template <typename T>
  void sum(T (&x)[kMax]) const {
    for (int offset = group_size / 2; offset > 0; offset /= 2) {
      T partner[kMax];
      for (int j = 0; j < group_size; ++j) {
        partner[j] = x[lane(j) ^ offset];
      }
      for (int j = 0; j < group_size; ++j) {
        x[j] += partner[j];
      }
    }
  }

  template <int V, typename T>
  void atomic_add(T* dst, const T (&val)[V]) const {
    for (int i = 0; i < V; ++i) {
      dst[i] += val[i];
    }
  }

  [[noreturn]] void level_outside() const {
    TORCH_CHECK(false, "ms_deform_attn (emulated CUDA kernel): device-side assert: a level does not fit in value "
                "(level_start_index + H * W > S)");
  }
};

struct EmulatedLauncher {
  static constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
  static constexpr const char* kName = "emulated CUDA kernel";
  static constexpr bool kCheckLevelsOnHost = false;  // as if the shapes were in device memory: the kernel checks

  // Runs body(group, lanes) for every group of the grid, as the threads of `blocks` blocks would.
  template <typename Body>
  static void run_grid(const Dims& d, unsigned blocks, Body&& body) {
    TORCH_CHECK(d.group_size >= 1 && d.group_size <= kMaxGroupSize && kWarpSize % d.group_size == 0,
                "ms_deform_attn (emulated CUDA kernel): group size ", d.group_size, " does not divide a warp");
    int64_t groups_run = 0;
    for (int64_t block = static_cast<int64_t>(blocks) - 1; block >= 0; --block) {
      for (int thread = 0; thread < kThreadsPerBlock; thread += d.group_size) {
        const int64_t group = group_of_thread(block, thread, d);
        // a group's threads are consecutive and inside one warp, as the shuffles need
        TORCH_CHECK(group_of_thread(block, thread + d.group_size - 1, d) == group &&
                        thread / kWarpSize == (thread + d.group_size - 1) / kWarpSize,
                    "ms_deform_attn (emulated CUDA kernel): group ", group, " spans two warps");
        if (group >= d.num_groups) {
          continue;
        }
        body(group, HostLanes{thread, d.group_size});
        ++groups_run;
      }
    }
    TORCH_CHECK(groups_run == d.num_groups, "ms_deform_attn (emulated CUDA kernel): the grid of ", blocks,
                " blocks runs ", groups_run, " of ", d.num_groups, " groups");
  }

  template <typename scalar_t, typename coord_t, int V>
  static void forward(const ForwardArgs<scalar_t, coord_t>& args, const Dims& d, unsigned blocks) {
    run_grid(d, blocks, [&](int64_t group, const HostLanes& lanes) {
      forward_group<scalar_t, coord_t, V>(args, group, lanes, d);
    });
  }

  template <typename scalar_t, typename coord_t, typename grad_t, int V>
  static void backward(const BackwardArgs<scalar_t, coord_t, grad_t>& args, const Dims& d, unsigned blocks) {
    run_grid(d, blocks, [&](int64_t group, const HostLanes& lanes) {
      backward_group<scalar_t, coord_t, grad_t, V>(args, group, lanes, d);
    });
  }
};

at::Tensor ms_deform_attn_forward_emulated(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                           const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                           const at::Tensor& attention_weights,
                                           bool softmax) {
  return forward_op<EmulatedLauncher>(value, spatial_shapes, level_start_index, sampling_locations,
                                      attention_weights, softmax);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_emulated(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    bool softmax) {
  return backward_op<EmulatedLauncher>(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights, softmax);
}

}  // namespace

TORCH_LIBRARY_IMPL(deformable_detr, CPU, m) {
  m.impl("ms_deform_attn_emulated", &ms_deform_attn_forward_emulated);
  m.impl("ms_deform_attn_emulated_backward", &ms_deform_attn_backward_emulated);
}

}  // namespace deformable_detr
