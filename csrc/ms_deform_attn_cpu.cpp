// CPU kernels of deformable_detr::ms_deform_attn (float32, float64), forward and backward.
//
// Forward:  parallel over (batch, query); each task writes its own output rows.
// Backward: parallel over (batch, head, level); a task owns the rows of grad_value of its head and level
//           and the gradients of the sampling locations / attention weights of its level, so no two
//           tasks write the same memory: no atomics, no per-thread buffers, deterministic results.
#include <algorithm>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

namespace deformable_detr {
namespace {

// y[0:n] += a * x[0:n]
template <typename scalar_t>
inline void axpy(scalar_t* __restrict__ y, const scalar_t* __restrict__ x, scalar_t a, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    y[i] += a * x[i];
  }
}

// <x[0:n], y[0:n]>
template <typename scalar_t>
inline scalar_t dot(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t n) {
  scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    sum += x[i] * y[i];
  }
  return sum;
}

struct Sizes {
  int64_t N, S, M, D, Lq, L, P;
};

Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be N x S x M x D, got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be N x Lq x M x L x P x 2, got ", sampling_locations.sizes());
  const Sizes s{value.size(0), value.size(1), value.size(2), value.size(3),
                sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
  TORCH_CHECK(sampling_locations.size(0) == s.N && sampling_locations.size(2) == s.M,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(), " do not match value ", value.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights must be N x Lq x M x L x P = ", sampling_locations.sizes().slice(0, 5),
              ", got ", attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == s.L && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be L x 2 with L = ", s.L, ", got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == s.L,
              "ms_deform_attn: level_start_index must have L = ", s.L, " entries, got ", level_start_index.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device().is_cpu(), "ms_deform_attn (CPU kernel): all inputs must be on the CPU, got ", t->device());
  }
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
              "ms_deform_attn (CPU kernel): value must be float32 or float64, got ", value.scalar_type());
  // The kernels read value rows through these numbers: check that every level lies inside value.
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  for (int64_t l = 0; l < s.L; ++l) {
    TORCH_CHECK(hw[2 * l] >= 0 && hw[2 * l + 1] >= 0 && start[l] >= 0 && start[l] + hw[2 * l] * hw[2 * l + 1] <= s.S,
                "ms_deform_attn: level ", l, " (", hw[2 * l], " x ", hw[2 * l + 1], " at ", start[l],
                ") does not fit in value with S = ", s.S);
  }
  return s;
}

template <typename scalar_t>
void forward_kernel(const scalar_t* value, const int64_t* spatial_shapes, const int64_t* level_start_index,
                    const scalar_t* sampling_locations, const scalar_t* attention_weights, scalar_t* output,
                    const Sizes& s) {
  const int64_t row = s.M * s.D;  // stride of one spatial position in value
  const int64_t work_per_query = std::max<int64_t>(1, s.M * s.L * s.P * 4 * s.D);
  const int64_t grain = std::max<int64_t>(1, 32768 / work_per_query);
  at::parallel_for(0, s.N * s.Lq, grain, [&](int64_t begin, int64_t end) {
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / s.Lq;
      for (int64_t m = 0; m < s.M; ++m) {
        const int64_t group = nq * s.M + m;  // (n, q, m)
        const scalar_t* loc = sampling_locations + group * s.L * s.P * 2;
        const scalar_t* attn = attention_weights + group * s.L * s.P;
        scalar_t* out = output + group * s.D;  // D
        std::fill(out, out + s.D, scalar_t(0));
        for (int64_t l = 0; l < s.L; ++l) {
          const int H = static_cast<int>(spatial_shapes[2 * l]);
          const int W = static_cast<int>(spatial_shapes[2 * l + 1]);
          const scalar_t* value_l = value + (n * s.S + level_start_index[l]) * row + m * s.D;
          for (int64_t p = 0; p < s.P; ++p) {
            const int64_t k = l * s.P + p;
            BilinearPoint<scalar_t> pt;
            if (!pt.init(loc[2 * k], loc[2 * k + 1], H, W)) {
              continue;
            }
            for (int c = 0; c < 4; ++c) {
              if (pt.valid[c]) {
                axpy(out, value_l + pt.offset[c] * row, attn[k] * pt.weight[c], s.D);
              }
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad_output, const scalar_t* value, const int64_t* spatial_shapes,
                     const int64_t* level_start_index, const scalar_t* sampling_locations,
                     const scalar_t* attention_weights, scalar_t* grad_value, scalar_t* grad_sampling_locations,
                     scalar_t* grad_attention_weights, const Sizes& s) {
  const int64_t row = s.M * s.D;
  // One task per (n, m, l): grad_value rows of level l, head m are written by this task only.
  at::parallel_for(0, s.N * s.M * s.L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task % s.L;
      const int64_t m = (task / s.L) % s.M;
      const int64_t n = task / (s.L * s.M);
      const int H = static_cast<int>(spatial_shapes[2 * l]);
      const int W = static_cast<int>(spatial_shapes[2 * l + 1]);
      const int64_t value_offset = (n * s.S + level_start_index[l]) * row + m * s.D;
      const scalar_t* value_l = value + value_offset;
      scalar_t* grad_value_l = grad_value + value_offset;
      for (int64_t q = 0; q < s.Lq; ++q) {
        const int64_t group = (n * s.Lq + q) * s.M + m;  // (n, q, m)
        const scalar_t* g = grad_output + group * s.D;  // D
        for (int64_t p = 0; p < s.P; ++p) {
          const int64_t k = group * s.L * s.P + l * s.P + p;  // (n, q, m, l, p)
          scalar_t* grad_loc = grad_sampling_locations + 2 * k;
          BilinearPoint<scalar_t> pt;
          if (!pt.init(sampling_locations[2 * k], sampling_locations[2 * k + 1], H, W)) {
            grad_loc[0] = grad_loc[1] = grad_attention_weights[k] = scalar_t(0);
            continue;
          }
          const scalar_t a = attention_weights[k];
          scalar_t dots[4] = {0, 0, 0, 0};
          scalar_t grad_attn = 0;
          for (int c = 0; c < 4; ++c) {
            if (pt.valid[c]) {
              dots[c] = dot(g, value_l + pt.offset[c] * row, s.D);
              axpy(grad_value_l + pt.offset[c] * row, g, a * pt.weight[c], s.D);
              grad_attn += pt.weight[c] * dots[c];
            }
          }
          scalar_t grad_x, grad_y;
          pt.pixel_grad(dots, grad_x, grad_y);
          grad_attention_weights[k] = grad_attn;
          grad_loc[0] = a * grad_x * W;
          grad_loc[1] = a * grad_y * H;
        }
      }
    }
  });
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const auto dtype = value.scalar_type();
  const auto value_c = value.contiguous();
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const auto loc = sampling_locations.to(dtype).contiguous();
  const auto attn = attention_weights.to(dtype).contiguous();
  auto output = at::empty({s.N, s.Lq, s.M * s.D}, value.options().memory_format(at::MemoryFormat::Contiguous));
  if (output.numel() == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(value_c.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                             loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), s);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.numel() == s.N * s.Lq * s.M * s.D, "ms_deform_attn_backward: grad_output has ",
              grad_output.numel(), " elements, expected N x Lq x M*D = ", s.N * s.Lq * s.M * s.D);
  TORCH_CHECK(grad_output.device().is_cpu(), "ms_deform_attn (CPU kernel): grad_output must be on the CPU");
  const auto dtype = value.scalar_type();
  const auto grad_out = grad_output.to(dtype).contiguous();
  const auto value_c = value.contiguous();
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const auto loc = sampling_locations.to(dtype).contiguous();
  const auto attn = attention_weights.to(dtype).contiguous();
  auto grad_value = at::zeros({s.N, s.S, s.M, s.D}, value.options());
  auto grad_loc = at::empty(loc.sizes(), loc.options());
  auto grad_attn = at::empty(attn.sizes(), attn.options());
  if (grad_loc.numel() > 0 && s.D > 0) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "ms_deform_attn_backward_cpu", [&] {
      backward_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), value_c.data_ptr<scalar_t>(),
                                shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(),
                                attn.data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(),
                                grad_loc.data_ptr<scalar_t>(), grad_attn.data_ptr<scalar_t>(), s);
    });
  } else {
    grad_loc.zero_();
    grad_attn.zero_();
  }
  return {grad_value, grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace

// The schema of both ops is defined in Python (model/ops/library.py), with their fake implementations
// and autograd; this library only adds the CPU kernels.
TORCH_LIBRARY_IMPL(deformable_detr, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace deformable_detr
