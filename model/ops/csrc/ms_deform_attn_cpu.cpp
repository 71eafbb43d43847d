// CPU kernels of deformable_detr::ms_deform_attn (float32, float64), forward and backward.
//
// Forward:  parallel over (batch, head, block of queries); each task writes its own output rows.
// Backward: parallel over (batch, head, level); a task owns the rows of grad_value of its head and level
//           and the gradients of the sampling locations / attention weights of its level, so no two
//           tasks write the same memory: no atomics, no per-thread buffers, deterministic results.
// softmax:  attention_weights are logits, normalised over the L * P points of each (n, q, m) inside: a forward
//           task normalises the logits of its block of queries into a buffer of its own (one exp per point;
//           nothing of size N x Lq x M x L x P is written); the backward, whose tasks are per level while the
//           softmax spans the levels, first computes each group's max and 1 / sum (2 numbers per group, an
//           eighth of the weights at L * P = 16), then turns the weights' gradients into the logits' in a last
//           pass per group.
#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

namespace deformable_detr {
namespace {

// Calls f(std::integral_constant<int64_t, D>) for the usual channel counts, so that the channel loops have a
// compile-time length (unrolled, vectorised, accumulators in registers); f(integral_constant<0>) otherwise.
template <typename F>
void dispatch_channels(int64_t D, F&& f) {
  switch (D) {
    case 8: return f(std::integral_constant<int64_t, 8>());
    case 16: return f(std::integral_constant<int64_t, 16>());
    case 32: return f(std::integral_constant<int64_t, 32>());
    case 64: return f(std::integral_constant<int64_t, 64>());
    case 128: return f(std::integral_constant<int64_t, 128>());
    case 256: return f(std::integral_constant<int64_t, 256>());
    default: return f(std::integral_constant<int64_t, 0>());
  }
}

// Channels per head: the compile-time kD, or the runtime D when kD == 0.
template <int64_t kD>
struct Channels {
  int64_t runtime;
  constexpr int64_t operator()() const { return kD > 0 ? kD : runtime; }
};

// Queries per forward task.
constexpr int64_t kQueryBlock = 64;

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

// p[0, n) = softmax(x[0, n)), as torch.softmax computes it (exp(x - max) / sum)
template <typename scalar_t>
inline void softmax_row(const scalar_t* x, scalar_t* p, int64_t n) {
  scalar_t max = x[0];
  for (int64_t k = 1; k < n; ++k) {
    max = x[k] > max ? x[k] : max;
  }
  scalar_t sum = 0;
  for (int64_t k = 0; k < n; ++k) {
    p[k] = std::exp(x[k] - max);
    sum += p[k];
  }
  const scalar_t inv = scalar_t(1) / sum;
  for (int64_t k = 0; k < n; ++k) {
    p[k] *= inv;
  }
}

template <typename scalar_t, int64_t kD>
void forward_kernel(const scalar_t* value, const int64_t* spatial_shapes, const int64_t* level_start_index,
                    const scalar_t* sampling_locations, const scalar_t* attention_weights, bool softmax,
                    scalar_t* output, const Sizes& s) {
  const int64_t D = Channels<kD>{s.D}();
  const int64_t row = s.M * D;  // stride of one spatial position in value
  // One task per (n, m, block of queries), levels in the outer loop: the value rows a task reads are those of
  // one head and, at a time, one level, around the (usually neighbouring) locations of a few queries.
  const int64_t num_blocks = (s.Lq + kQueryBlock - 1) / kQueryBlock;
  const int64_t points = s.L * s.P;
  at::parallel_for(0, s.N * s.M * num_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> probs(softmax ? kQueryBlock * points : 0);  // this task's weights, with softmax
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % num_blocks;
      const int64_t m = (task / num_blocks) % s.M;
      const int64_t n = task / (num_blocks * s.M);
      const int64_t q_begin = block * kQueryBlock;
      const int64_t q_end = std::min(s.Lq, q_begin + kQueryBlock);
      if (softmax) {
        for (int64_t q = q_begin; q < q_end; ++q) {
          const int64_t group = (n * s.Lq + q) * s.M + m;
          softmax_row(attention_weights + group * points, probs.data() + (q - q_begin) * points, points);
        }
      }
      for (int64_t q = q_begin; q < q_end; ++q) {
        scalar_t* out = output + ((n * s.Lq + q) * s.M + m) * D;
        std::fill(out, out + D, scalar_t(0));
      }
      for (int64_t l = 0; l < s.L; ++l) {
        const int H = static_cast<int>(spatial_shapes[2 * l]);
        const int W = static_cast<int>(spatial_shapes[2 * l + 1]);
        const scalar_t* value_l = value + (n * s.S + level_start_index[l]) * row + m * D;
        for (int64_t q = q_begin; q < q_end; ++q) {
          const int64_t group = (n * s.Lq + q) * s.M + m;  // (n, q, m)
          // the sum over this level's points: in registers when D is a compile-time constant
          scalar_t local[kD > 0 ? kD : 1];
          scalar_t* __restrict__ out = output + group * D;  // D
          scalar_t* __restrict__ acc = kD > 0 ? local : out;
          if (kD > 0) {
            std::fill(acc, acc + D, scalar_t(0));
          }
          for (int64_t p = 0; p < s.P; ++p) {
            const int64_t k = group * s.L * s.P + l * s.P + p;  // (n, q, m, l, p)
            BilinearPoint<scalar_t> pt;
            if (!pt.init(sampling_locations[2 * k], sampling_locations[2 * k + 1], H, W)) {
              continue;
            }
            const scalar_t weight =
                softmax ? probs[(q - q_begin) * points + l * s.P + p] : attention_weights[k];
            for (int c = 0; c < 4; ++c) {
              if (pt.valid[c]) {
                const scalar_t coeff = weight * pt.weight[c];
                const scalar_t* __restrict__ v = value_l + pt.offset[c] * row;
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) {
                  acc[d] += coeff * v[d];
                }
              }
            }
          }
          if (kD > 0) {
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) {
              out[d] += acc[d];
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t, int64_t kD>
void backward_kernel(const scalar_t* grad_output, const scalar_t* value, const int64_t* spatial_shapes,
                     const int64_t* level_start_index, const scalar_t* sampling_locations,
                     const scalar_t* attention_weights, const scalar_t* stats, scalar_t* grad_value,
                     scalar_t* grad_sampling_locations, scalar_t* grad_attention_weights, const Sizes& s) {
  // stats: with the fused softmax, each group's max and 1 / sum of exp(logit - max) (stats[2 * group], + 1), else
  // nullptr
  const int64_t D = Channels<kD>{s.D}();
  const int64_t row = s.M * D;
  // One task per (n, m, l): grad_value rows of level l, head m are written by this task only.
  at::parallel_for(0, s.N * s.M * s.L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task % s.L;
      const int64_t m = (task / s.L) % s.M;
      const int64_t n = task / (s.L * s.M);
      const int H = static_cast<int>(spatial_shapes[2 * l]);
      const int W = static_cast<int>(spatial_shapes[2 * l + 1]);
      const int64_t value_offset = (n * s.S + level_start_index[l]) * row + m * D;
      const scalar_t* value_l = value + value_offset;
      scalar_t* grad_value_l = grad_value + value_offset;
      for (int64_t q = 0; q < s.Lq; ++q) {
        const int64_t group = (n * s.Lq + q) * s.M + m;  // (n, q, m)
        const scalar_t* __restrict__ g = grad_output + group * D;  // D
        for (int64_t p = 0; p < s.P; ++p) {
          const int64_t k = group * s.L * s.P + l * s.P + p;  // (n, q, m, l, p)
          scalar_t* grad_loc = grad_sampling_locations + 2 * k;
          BilinearPoint<scalar_t> pt;
          if (!pt.init(sampling_locations[2 * k], sampling_locations[2 * k + 1], H, W)) {
            grad_loc[0] = grad_loc[1] = grad_attention_weights[k] = scalar_t(0);
            continue;
          }
          const scalar_t a = stats != nullptr
                                 ? std::exp(attention_weights[k] - stats[2 * group]) * stats[2 * group + 1]
                                 : attention_weights[k];
          scalar_t dots[4] = {0, 0, 0, 0};
          scalar_t grad_attn = 0;
          for (int c = 0; c < 4; ++c) {
            if (pt.valid[c]) {
              const scalar_t coeff = a * pt.weight[c];
              const scalar_t* __restrict__ v = value_l + pt.offset[c] * row;
              scalar_t* __restrict__ gv = grad_value_l + pt.offset[c] * row;
              scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
              for (int64_t d = 0; d < D; ++d) {
                dot += g[d] * v[d];
                gv[d] += coeff * g[d];
              }
              dots[c] = dot;
              grad_attn += pt.weight[c] * dot;
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
  if (stats == nullptr) {
    return;
  }
  // The weights' gradients g -> the logits': p * (g - sum_j p_j g_j), per (n, q, m).
  const int64_t n = s.L * s.P;
  at::parallel_for(0, s.N * s.Lq * s.M, 256, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> probs(n);
    scalar_t* p = probs.data();
    for (int64_t group = begin; group < end; ++group) {
      scalar_t* g = grad_attention_weights + group * n;
      const scalar_t* x = attention_weights + group * n;
      for (int64_t k = 0; k < n; ++k) {
        p[k] = std::exp(x[k] - stats[2 * group]) * stats[2 * group + 1];
      }
      scalar_t dot = 0;
      for (int64_t k = 0; k < n; ++k) {
        dot += p[k] * g[k];
      }
      for (int64_t k = 0; k < n; ++k) {
        g[k] = p[k] * (g[k] - dot);
      }
    }
  });
}

// Each (n, q, m)'s max and 1 / sum of exp(logit - max) over its L * P logits, for the backward; undefined without
// softmax
at::Tensor stats_of(const at::Tensor& attn, bool softmax, const Sizes& s) {
  if (!softmax || s.L * s.P == 0 || attn.numel() == 0) {
    return at::Tensor();
  }
  auto stats = at::empty({s.N * s.Lq * s.M, 2}, attn.options());
  const int n = static_cast<int>(s.L * s.P);
  AT_DISPATCH_FLOATING_TYPES(attn.scalar_type(), "ms_deform_attn_softmax_cpu", [&] {
    const scalar_t* x = attn.data_ptr<scalar_t>();
    scalar_t* out = stats.data_ptr<scalar_t>();
    at::parallel_for(0, s.N * s.Lq * s.M, 256, [&](int64_t begin, int64_t end) {
      for (int64_t group = begin; group < end; ++group) {
        const scalar_t* row = x + group * n;
        SoftmaxStats<scalar_t> st;
        st.init([row](int k) { return row[k]; }, n);
        out[2 * group] = st.max;
        out[2 * group + 1] = st.inv_sum;
      }
    });
  });
  return stats;
}

template <typename scalar_t>
const scalar_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights, bool softmax) {
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
    dispatch_channels(s.D, [&](auto kD) {
      forward_kernel<scalar_t, decltype(kD)::value>(value_c.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
                                                    starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(),
                                                    attn.data_ptr<scalar_t>(), softmax && s.L * s.P > 0,
                                                    output.data_ptr<scalar_t>(), s);
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    bool softmax) {
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
    const auto stats = stats_of(attn, softmax, s);
    AT_DISPATCH_FLOATING_TYPES(dtype, "ms_deform_attn_backward_cpu", [&] {
      dispatch_channels(s.D, [&](auto kD) {
        backward_kernel<scalar_t, decltype(kD)::value>(
            grad_out.data_ptr<scalar_t>(), value_c.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
            starts.data_ptr<int64_t>(), loc.data_ptr<scalar_t>(), attn.data_ptr<scalar_t>(),
            data_or_null<scalar_t>(stats), grad_value.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(),
            grad_attn.data_ptr<scalar_t>(), s);
      });
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
