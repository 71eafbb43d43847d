// Multi-scale deformable attention: what the CPU and CUDA kernels share.
//
// Shapes (the official op's):
//   value               N x S x M x D          S = sum_l H_l * W_l, M heads, D channels per head
//   spatial_shapes      L x 2 (int64)          (H_l, W_l)
//   level_start_index   L (int64)              offset of level l in S
//   sampling_locations  N x Lq x M x L x P x 2 normalised (x, y), [0, 1] inside the map
//   attention_weights   N x Lq x M x L x P
//   output              N x Lq x (M * D)
//
// output[n, q, m, :] = sum_{l, p} attention_weights[n, q, m, l, p]
//                      * bilinear(value[n, level l, m, :], sampling_locations[n, q, m, l, p])
//
// With softmax = true (the fused softmax, as DCNv4's FlashDeformAttn), attention_weights are logits and the
// weights are their softmax over the L * P points of each (n, q, m), computed inside the kernels, forward and
// backward (grad of a logit = p * (grad of its weight - sum_j p_j * grad of weight j)).
#pragma once

#include <cmath>
#include <cstdint>

#include <c10/macros/Macros.h>

namespace deformable_detr {

// One bilinear sampling point on a H x W map, in the convention of
// grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False): the normalised location
// (x, y) is the pixel coordinate (x * W - 0.5, y * H - 0.5), pixel centres at integers, and corners
// outside the map read zeros.
//
// Corners are ordered (y0, x0), (y0, x1), (y1, x0), (y1, x1) with x1 = x0 + 1, y1 = y0 + 1.
template <typename acc_t>
struct BilinearPoint {
  int offset[4];    // y * W + x of each corner inside its level
  acc_t weight[4];  // bilinear weight of each corner, 0 for a corner outside the map
  bool valid[4];    // corner inside the map
  acc_t lx, ly;     // fractional parts of the pixel coordinate

  // Returns false when every corner is outside the map (nothing to read, all gradients zero).
  C10_HOST_DEVICE inline bool init(acc_t loc_x, acc_t loc_y, int H, int W) {
    const acc_t x = loc_x * W - acc_t(0.5);
    const acc_t y = loc_y * H - acc_t(0.5);
    // At x == -1 the right corners still carry a location gradient (as in grid_sample); this test is
    // also false for NaN.
    if (!(x >= acc_t(-1) && y >= acc_t(-1) && x < acc_t(W) && y < acc_t(H))) {
      return false;
    }
    const acc_t fx = std::floor(x);
    const acc_t fy = std::floor(y);
    const int x0 = static_cast<int>(fx);
    const int y0 = static_cast<int>(fy);
    lx = x - fx;
    ly = y - fy;
    const acc_t hx = acc_t(1) - lx;
    const acc_t hy = acc_t(1) - ly;
    const bool x0_in = x0 >= 0;
    const bool x1_in = x0 + 1 < W;
    const bool y0_in = y0 >= 0;
    const bool y1_in = y0 + 1 < H;
    valid[0] = y0_in && x0_in;
    valid[1] = y0_in && x1_in;
    valid[2] = y1_in && x0_in;
    valid[3] = y1_in && x1_in;
    weight[0] = valid[0] ? hy * hx : acc_t(0);
    weight[1] = valid[1] ? hy * lx : acc_t(0);
    weight[2] = valid[2] ? ly * hx : acc_t(0);
    weight[3] = valid[3] ? ly * lx : acc_t(0);
    offset[0] = y0 * W + x0;
    offset[1] = offset[0] + 1;
    offset[2] = offset[0] + W;
    offset[3] = offset[2] + 1;
    return true;
  }

  // Gradient of the sampled value with respect to the pixel coordinate (x, y), given
  // dots[c] = <grad of the sampled vector, value at corner c> (0 for a corner outside the map).
  C10_HOST_DEVICE inline void pixel_grad(const acc_t (&dots)[4], acc_t& grad_x, acc_t& grad_y) const {
    grad_x = (acc_t(1) - ly) * (dots[1] - dots[0]) + ly * (dots[3] - dots[2]);
    grad_y = (acc_t(1) - lx) * (dots[2] - dots[0]) + lx * (dots[3] - dots[1]);
  }
};

// The softmax over the n >= 1 logits of one (n, q, m), as torch.softmax computes it: p_k = exp(x_k - max) / sum_j
// exp(x_j - max). `logits(k)` returns logit k in acc_t.
template <typename acc_t>
struct SoftmaxStats {
  acc_t max;
  acc_t inv_sum;

  template <typename Logits>
  C10_HOST_DEVICE inline void init(const Logits& logits, int n) {
    max = logits(0);
    for (int k = 1; k < n; ++k) {
      const acc_t x = logits(k);
      max = x > max ? x : max;
    }
    acc_t sum = 0;
    for (int k = 0; k < n; ++k) {
      sum += std::exp(logits(k) - max);
    }
    inv_sum = acc_t(1) / sum;
  }

  C10_HOST_DEVICE inline acc_t prob(acc_t logit) const {
    return std::exp(logit - max) * inv_sum;
  }
};

}  // namespace deformable_detr
