// The work of one thread group of the CUDA kernels, written once for the GPU and for the host emulator.
//
// A group of G threads (G a power of two <= 32, inside one warp) handles one (batch, query, head): its D
// channels are split into packs of V consecutive elements (16-byte loads where D and the alignment allow),
// lane `lane` of the group owning packs lane, lane + G, ... Every lane walks the same L x P sampling points,
// so the bilinear corners of a point are read as G contiguous 16-byte pieces of one D-channel row
// (coalesced). Arithmetic is done in at::opmath_type (float32; float64 for float64 inputs).
//
// The bodies below are templates over a `Lanes` policy, the only place where the GPU and the host differ:
//   Lanes::kMax           lanes one object holds: 1 on the GPU (its own thread's), 32 on the host
//   count(), lane(j)      how many of them are live, and the group lane of the j-th
//   sum(x)                x[j] <- sum of x over the group's lanes, for every lane (a xor butterfly:
//                         warp shuffles on the GPU, the same butterfly over an array on the host)
//   atomic_add(dst, v)    dst[0:V] += v[0:V] for values shared between groups (atomics / additions)
//   level_outside()       a level that does not fit in value (device assert / exception)
// Running all lanes of a group in lockstep on the host is what lets the emulator execute the same reduction
// and the same lane/pack split as the GPU, line for line.
//
// With d.softmax the attention weights are logits: every lane computes the softmax's max and sum over its
// group's L * P logits (SoftmaxStats, ms_deform_attn.h) and uses p = exp(logit - max) / sum as the weight; in the
// backward lane 0 turns the weights' gradients into the logits' once the group's rounds are done.
//
// Memory is read and written through Buffer, which checks every access on the host (the emulator reports an
// out-of-bounds or misaligned access as an error instead of reading a neighbour's memory) and is a bare
// pointer on the GPU.
#pragma once

#include <cstdint>

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include "ms_deform_attn.h"

namespace deformable_detr {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
constexpr int kMaxGroupSize = 32;  // a group never spans two warps: the shuffles stay inside one

struct Dims {
  int64_t num_groups;  // N * Lq * M
  int64_t S;
  int Lq, M, D, L, P;
  int group_size;  // threads per (n, q, m)
  bool softmax;    // attention_weights are logits: softmax over the L * P points of each (n, q, m) inside
};


template <typename T>
struct Buffer {
  T* data;
  int64_t size;  // elements

  // &data[offset], with `count` elements read or written from there as one access of `align` bytes
  C10_HOST_DEVICE inline T* at(int64_t offset, int count = 1, int align = 1) const {
#if !defined(__CUDA_ARCH__)
    TORCH_CHECK(offset >= 0 && offset + count <= size, "ms_deform_attn (emulated CUDA kernel): access to elements [",
                offset, ", ", offset + count, ") of a buffer of ", size);
    TORCH_CHECK(reinterpret_cast<uintptr_t>(data + offset) % align == 0,
                "ms_deform_attn (emulated CUDA kernel): ", align, "-byte access at a misaligned address");
#endif
    return data + offset;
  }
};

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Logit k of one (n, q, m) in the math type (for SoftmaxStats).
template <typename acc_t, typename coord_t>
struct GroupLogits {
  const Buffer<const coord_t>* weights;
  int64_t first;
  C10_HOST_DEVICE inline acc_t operator()(int k) const {
    return static_cast<acc_t>(*weights->at(first + k));
  }
};

// out[0:V] = buf[offset : offset + V] converted to the math type: one 16-byte load when V > 1
template <typename acc_t, typename scalar_t, int V>
C10_HOST_DEVICE inline void load_pack(const Buffer<const scalar_t>& buf, int64_t offset, acc_t (&out)[V]) {
  const Pack<scalar_t, V> pack = *reinterpret_cast<const Pack<scalar_t, V>*>(buf.at(offset, V, sizeof(Pack<scalar_t, V>)));
#pragma unroll
  for (int i = 0; i < V; ++i) {
    out[i] = static_cast<acc_t>(pack.v[i]);
  }
}

template <typename acc_t, typename scalar_t, int V>
C10_HOST_DEVICE inline void store_pack(const Buffer<scalar_t>& buf, int64_t offset, const acc_t (&in)[V]) {
  Pack<scalar_t, V> pack;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    pack.v[i] = static_cast<scalar_t>(in[i]);
  }
  *reinterpret_cast<Pack<scalar_t, V>*>(buf.at(offset, V, sizeof(Pack<scalar_t, V>))) = pack;
}

// The group a thread belongs to (one per (n, q, m); >= num_groups for the threads past the end).
C10_HOST_DEVICE inline int64_t group_of_thread(int64_t block, int thread, const Dims& d) {
  return (block * kThreadsPerBlock + thread) / d.group_size;
}

// (n, m) of a group: groups are numbered like the rows of the output, N x Lq x M.
struct GroupIndex {
  int64_t n;
  int m;
};

C10_HOST_DEVICE inline GroupIndex group_index(int64_t group, const Dims& d) {
  return {group / d.M / d.Lq, static_cast<int>(group % d.M)};
}

// A level lies inside value (N x S x ...). The CPU kernel and the host wrapper check this before launching;
// on the GPU the shapes usually live in device memory, so the kernel checks them itself.
C10_HOST_DEVICE inline bool level_fits(int64_t H, int64_t W, int64_t start, int64_t S) {
  return H >= 0 && W >= 0 && H < (int64_t(1) << 31) && W < (int64_t(1) << 31) && start >= 0 && H * W <= S - start;
}

template <typename scalar_t, typename coord_t>
struct ForwardArgs {
  Buffer<const scalar_t> value;                // N x S x M x D
  Buffer<const int64_t> spatial_shapes;        // L x 2
  Buffer<const int64_t> level_start_index;     // L
  Buffer<const coord_t> sampling_locations;    // N x Lq x M x L x P x 2
  Buffer<const coord_t> attention_weights;     // N x Lq x M x L x P
  Buffer<scalar_t> output;                     // N x Lq x M x D
};

template <typename scalar_t, typename coord_t, int V, typename Lanes>
C10_HOST_DEVICE inline void forward_group(const ForwardArgs<scalar_t, coord_t>& a, int64_t group, const Lanes& lanes,
                                          const Dims& d) {
  using acc_t = at::opmath_type<scalar_t>;
  const GroupIndex gi = group_index(group, d);
  const int64_t row = static_cast<int64_t>(d.M) * d.D;  // stride of one spatial position in value
  const int64_t value_nm = gi.n * d.S * row + static_cast<int64_t>(gi.m) * d.D;
  const int64_t points = group * d.L * d.P;  // first (n, q, m, l=0, p=0)
  const int num_packs = d.D / V;
  SoftmaxStats<acc_t> softmax;  // every lane computes the same (the group's L * P logits)
  if (d.softmax) {
    softmax.init(GroupLogits<acc_t, coord_t>{&a.attention_weights, points}, d.L * d.P);
  }

  // The lanes of a group share nothing in the forward: each owns its packs and writes them.
  for (int j = 0; j < lanes.count(); ++j) {
    for (int pack = lanes.lane(j); pack < num_packs; pack += d.group_size) {
      acc_t acc[V];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        acc[i] = acc_t(0);
      }
      for (int l = 0; l < d.L; ++l) {
        const int64_t H = *a.spatial_shapes.at(2 * l), W = *a.spatial_shapes.at(2 * l + 1);
        const int64_t start = *a.level_start_index.at(l);
        if (!level_fits(H, W, start, d.S)) {
          lanes.level_outside();
          continue;
        }
        const int64_t value_l = value_nm + start * row + pack * V;
        for (int p = 0; p < d.P; ++p) {
          const int64_t k = points + l * d.P + p;
          BilinearPoint<acc_t> pt;
          if (!pt.init(static_cast<acc_t>(*a.sampling_locations.at(2 * k)),
                       static_cast<acc_t>(*a.sampling_locations.at(2 * k + 1)), static_cast<int>(H),
                       static_cast<int>(W))) {
            continue;
          }
          const acc_t logit = static_cast<acc_t>(*a.attention_weights.at(k));
          const acc_t weight = d.softmax ? softmax.prob(logit) : logit;
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            if (pt.valid[c]) {
              acc_t v[V];
              load_pack<acc_t, scalar_t, V>(a.value, value_l + pt.offset[c] * row, v);
              const acc_t coeff = weight * pt.weight[c];
#pragma unroll
              for (int i = 0; i < V; ++i) {
                acc[i] += coeff * v[i];
              }
            }
          }
        }
      }
      store_pack<acc_t, scalar_t, V>(a.output, group * d.D + pack * V, acc);
    }
  }
}

template <typename scalar_t, typename coord_t, typename grad_t>
struct BackwardArgs {
  Buffer<const scalar_t> grad_output;           // N x Lq x M x D
  Buffer<const scalar_t> value;                 // N x S x M x D
  Buffer<const int64_t> spatial_shapes;         // L x 2
  Buffer<const int64_t> level_start_index;      // L
  Buffer<const coord_t> sampling_locations;     // N x Lq x M x L x P x 2
  Buffer<const coord_t> attention_weights;      // N x Lq x M x L x P
  Buffer<grad_t> grad_value;                    // N x S x M x D, zero on entry, added to by every group
  Buffer<coord_t> grad_sampling_locations;      // N x Lq x M x L x P x 2, written by lane 0 of its group
  Buffer<coord_t> grad_attention_weights;       // N x Lq x M x L x P, written by lane 0 of its group
};

// The gradients of a point's location and attention weight are sums over the D channels: each lane computes
// its partial sums, the group reduces them, and lane 0 writes them (no atomics). grad_value rows are shared
// between queries and need atomics, in grad_t (float32 for float16 / bfloat16).
template <typename scalar_t, typename coord_t, typename grad_t, int V, typename Lanes>
C10_HOST_DEVICE inline void backward_group(const BackwardArgs<scalar_t, coord_t, grad_t>& a, int64_t group,
                                           const Lanes& lanes, const Dims& d) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kLanes = Lanes::kMax;
  const GroupIndex gi = group_index(group, d);
  const int64_t row = static_cast<int64_t>(d.M) * d.D;
  const int64_t value_nm = gi.n * d.S * row + static_cast<int64_t>(gi.m) * d.D;
  const int64_t points = group * d.L * d.P;
  const int num_packs = d.D / V;
  // grad_value is a fresh buffer and packs start at multiples of V: a pack of atomics is aligned to its size
  constexpr int kGradAlign = V * sizeof(grad_t) < 16 ? V * sizeof(grad_t) : 16;
  SoftmaxStats<acc_t> softmax;  // every lane computes the same (the group's L * P logits)
  if (d.softmax) {
    softmax.init(GroupLogits<acc_t, coord_t>{&a.attention_weights, points}, d.L * d.P);
  }

  // Every lane runs the same number of rounds (the reduction needs the whole group); in the last round lanes
  // past the end of D contribute zeros.
  for (int first_pack = 0; first_pack < num_packs; first_pack += d.group_size) {
    acc_t g[kLanes][V];  // grad_output of each lane's pack
    for (int j = 0; j < lanes.count(); ++j) {
      const int pack = first_pack + lanes.lane(j);
      if (pack < num_packs) {
        load_pack<acc_t, scalar_t, V>(a.grad_output, group * d.D + pack * V, g[j]);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          g[j][i] = acc_t(0);
        }
      }
    }
    for (int l = 0; l < d.L; ++l) {
      const int64_t H = *a.spatial_shapes.at(2 * l), W = *a.spatial_shapes.at(2 * l + 1);
      const int64_t start = *a.level_start_index.at(l);
      const bool fits = level_fits(H, W, start, d.S);
      if (!fits) {
        lanes.level_outside();
      }
      for (int p = 0; p < d.P; ++p) {
        const int64_t k = points + l * d.P + p;
        acc_t grad_a[kLanes], grad_x[kLanes], grad_y[kLanes];
        for (int j = 0; j < kLanes; ++j) {
          grad_a[j] = grad_x[j] = grad_y[j] = acc_t(0);
        }
        BilinearPoint<acc_t> pt;
        // The same for every lane of the group (same location), so the reduction stays uniform.
        if (fits && pt.init(static_cast<acc_t>(*a.sampling_locations.at(2 * k)),
                            static_cast<acc_t>(*a.sampling_locations.at(2 * k + 1)), static_cast<int>(H),
                            static_cast<int>(W))) {
          const acc_t logit = static_cast<acc_t>(*a.attention_weights.at(k));
          const acc_t weight = d.softmax ? softmax.prob(logit) : logit;
          for (int j = 0; j < lanes.count(); ++j) {
            const int pack = first_pack + lanes.lane(j);
            if (pack >= num_packs) {
              continue;
            }
            const int64_t value_l = value_nm + start * row + pack * V;
            acc_t dots[4] = {0, 0, 0, 0};  // <grad_output, value at corner c> over this lane's channels
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              if (pt.valid[c]) {
                acc_t v[V];
                load_pack<acc_t, scalar_t, V>(a.value, value_l + pt.offset[c] * row, v);
                const acc_t coeff = weight * pt.weight[c];
                grad_t contribution[V];
#pragma unroll
                for (int i = 0; i < V; ++i) {
                  dots[c] += g[j][i] * v[i];
                  contribution[i] = static_cast<grad_t>(coeff * g[j][i]);
                }
                lanes.template atomic_add<V>(a.grad_value.at(value_l + pt.offset[c] * row, V, kGradAlign), contribution);
              }
            }
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              grad_a[j] += pt.weight[c] * dots[c];
            }
            pt.pixel_grad(dots, grad_x[j], grad_y[j]);
          }
          lanes.sum(grad_a);
          lanes.sum(grad_x);
          lanes.sum(grad_y);
          for (int j = 0; j < lanes.count(); ++j) {
            grad_x[j] *= weight * static_cast<acc_t>(W);
            grad_y[j] *= weight * static_cast<acc_t>(H);
          }
        }
        for (int j = 0; j < lanes.count(); ++j) {
          if (lanes.lane(j) != 0) {
            continue;
          }
          // one writer per (n, q, m, l, p); later rounds (D > V * group_size) add to the first
          coord_t* ga = a.grad_attention_weights.at(k);
          coord_t* gl = a.grad_sampling_locations.at(2 * k, 2);
          if (first_pack == 0) {
            *ga = static_cast<coord_t>(grad_a[j]);
            gl[0] = static_cast<coord_t>(grad_x[j]);
            gl[1] = static_cast<coord_t>(grad_y[j]);
          } else {
            *ga += static_cast<coord_t>(grad_a[j]);
            gl[0] += static_cast<coord_t>(grad_x[j]);
            gl[1] += static_cast<coord_t>(grad_y[j]);
          }
        }
      }
    }
  }
  if (!d.softmax) {
    return;
  }
  // The weights' gradients g (complete: every round has added to them) -> the logits': p * (g - sum_j p_j g_j).
  // Lane 0 wrote them and rewrites them: no other thread touches them.
  for (int j = 0; j < lanes.count(); ++j) {
    if (lanes.lane(j) != 0) {
      continue;
    }
    acc_t dot = 0;
    for (int k = 0; k < d.L * d.P; ++k) {
      const acc_t p = softmax.prob(static_cast<acc_t>(*a.attention_weights.at(points + k)));
      dot += p * static_cast<acc_t>(*a.grad_attention_weights.at(points + k));
    }
    for (int k = 0; k < d.L * d.P; ++k) {
      const acc_t p = softmax.prob(static_cast<acc_t>(*a.attention_weights.at(points + k)));
      coord_t* ga = a.grad_attention_weights.at(points + k);
      *ga = static_cast<coord_t>(p * (static_cast<acc_t>(*ga) - dot));
    }
  }
}

}  // namespace deformable_detr
