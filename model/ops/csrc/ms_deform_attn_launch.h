// Host side of the CUDA kernels, shared with the host emulator: input checks, the pack/lane layout and its
// alignment fallback, the launch geometry, dtype dispatch and conversions, the float32 gradient buffer.
//
// forward_op<Launcher> / backward_op<Launcher> do everything but run the groups; the Launcher does that:
// on the GPU by launching the kernels (ms_deform_attn_cuda.cu), on the host by running every group of every
// block with its lanes in lockstep (ms_deform_attn_emulator.cpp). A Launcher provides
//   kDeviceType, kName                 the device of the tensors it takes, its name in error messages
//   kCheckLevelsOnHost                 check the levels against S here when the shapes are on the CPU
//   forward<scalar_t, coord_t, V>(ForwardArgs, Dims, blocks)
//   backward<scalar_t, coord_t, grad_t, V>(BackwardArgs, Dims, blocks)
#pragma once

#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>

#include "ms_deform_attn_group.h"

namespace deformable_detr {

// float32 coordinates and weights for float16 / bfloat16 / float32 values, float64 for float64 values
inline at::ScalarType coord_type(at::ScalarType value_type) {
  return value_type == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Packs of 16 bytes when D is a multiple of them and every tensor read or written in packs is 16-byte aligned
// (a view that starts mid-pack falls back to one element per pack); then the smallest power-of-two group
// that gives every lane a pack, at most a warp.
inline void choose_layout(Dims& d, int& vec, int64_t element_size, bool aligned) {
  const int vmax = static_cast<int>(16 / element_size);
  vec = (d.D % vmax == 0 && aligned) ? vmax : 1;
  const int packs = d.D / vec;
  d.group_size = 1;
  while (d.group_size < packs && d.group_size < kMaxGroupSize) {
    d.group_size *= 2;
  }
}

// Blocks of kThreadsPerBlock threads covering every group; a grid holds at most 2^31 - 1 blocks.
inline unsigned num_blocks(const Dims& d) {
  const int64_t threads = d.num_groups * d.group_size;
  const int64_t blocks = (threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "ms_deform_attn: N x Lq x M = ", d.num_groups,
              " groups of ", d.group_size, " threads need ", blocks, " blocks, more than a CUDA grid holds (2^31 - 1)");
  return static_cast<unsigned>(blocks);
}

struct Inputs {
  at::Tensor value, spatial_shapes, level_start_index, sampling_locations, attention_weights;
  Dims dims;
  int vec;  // elements per pack
};

template <typename Launcher>
Inputs prepare(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
               const at::Tensor& sampling_locations, const at::Tensor& attention_weights, bool softmax) {
  const char* name = Launcher::kName;
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
  TORCH_CHECK(value.device().type() == Launcher::kDeviceType, "ms_deform_attn (", name, "): value must be a ",
              c10::DeviceTypeName(Launcher::kDeviceType), " tensor, got ", value.device());
  for (const at::Tensor* t : {&sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(), "ms_deform_attn (", name, "): inputs on ", t->device(), " and ",
                value.device());
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), "ms_deform_attn: sampling_locations and attention_weights "
                "must be floating point, got ", t->scalar_type());
  }
  const auto dtype = value.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "ms_deform_attn (", name, "): value must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(N * Lq * M < (int64_t(1) << 40) && Lq < INT32_MAX && M < INT32_MAX && D < INT32_MAX &&
                  L < INT32_MAX && P < INT32_MAX,
              "ms_deform_attn: problem too large");
  if (Launcher::kCheckLevelsOnHost && spatial_shapes.is_cpu() && level_start_index.is_cpu()) {
    // Shapes on the device are checked by the kernel (reading them here would wait for the GPU).
    const auto shapes = spatial_shapes.contiguous();
    const auto starts = level_start_index.contiguous();
    const int64_t* hw = shapes.const_data_ptr<int64_t>();
    const int64_t* start = starts.const_data_ptr<int64_t>();
    for (int64_t l = 0; l < L; ++l) {
      TORCH_CHECK(level_fits(hw[2 * l], hw[2 * l + 1], start[l], S), "ms_deform_attn: level ", l, " (", hw[2 * l],
                  " x ", hw[2 * l + 1], " at ", start[l], ") does not fit in value with S = ", S);
    }
  }

  Inputs in;
  const auto device = value.device();
  in.value = value.contiguous();
  in.dims = Dims{N * Lq * M, S, static_cast<int>(Lq), static_cast<int>(M), static_cast<int>(D),
                 static_cast<int>(L), static_cast<int>(P), 1, softmax};
  choose_layout(in.dims, in.vec, c10::elementSize(dtype), aligned16(in.value));
  num_blocks(in.dims);  // before the copies below: an impossible launch fails without allocating anything
  // tiny; copied to the device when given on the CPU (the official op expects them on the device)
  in.spatial_shapes = spatial_shapes.to(device).contiguous();
  in.level_start_index = level_start_index.to(device).contiguous();
  in.sampling_locations = sampling_locations.to(coord_type(dtype)).contiguous();
  in.attention_weights = attention_weights.to(coord_type(dtype)).contiguous();
  return in;
}

template <typename T>
Buffer<const T> read_buffer(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.numel()};
}

template <typename T>
Buffer<T> write_buffer(at::Tensor& t) {
  return {t.mutable_data_ptr<T>(), t.numel()};
}

template <typename Launcher>
at::Tensor forward_op(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                      const at::Tensor& sampling_locations, const at::Tensor& attention_weights, bool softmax) {
  const Inputs in = prepare<Launcher>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                      softmax);
  const Dims& d = in.dims;
  auto output = at::empty({value.size(0), d.Lq, static_cast<int64_t>(d.M) * d.D}, in.value.options());
  if (output.numel() == 0) {
    return output;
  }
  if (d.L == 0 || d.P == 0) {
    return output.zero_();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.value.scalar_type(), "ms_deform_attn_forward", [&] {
    using coord_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const ForwardArgs<scalar_t, coord_t> args{read_buffer<scalar_t>(in.value), read_buffer<int64_t>(in.spatial_shapes),
                                              read_buffer<int64_t>(in.level_start_index),
                                              read_buffer<coord_t>(in.sampling_locations),
                                              read_buffer<coord_t>(in.attention_weights), write_buffer<scalar_t>(output)};
    if (in.vec == kVec) {
      Launcher::template forward<scalar_t, coord_t, kVec>(args, d, num_blocks(d));
    } else {
      Launcher::template forward<scalar_t, coord_t, 1>(args, d, num_blocks(d));
    }
  });
  return output;
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(const at::Tensor& grad_output, const at::Tensor& value,
                                                           const at::Tensor& spatial_shapes,
                                                           const at::Tensor& level_start_index,
                                                           const at::Tensor& sampling_locations,
                                                           const at::Tensor& attention_weights, bool softmax) {
  // grad_value rows are summed with atomics in whatever order the groups run: the last bits vary between runs
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward (CUDA kernel: grad_value uses atomicAdd)");
  Inputs in = prepare<Launcher>(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                softmax);
  const int64_t expected = in.dims.num_groups * in.dims.D;
  TORCH_CHECK(grad_output.numel() == expected, "ms_deform_attn_backward: grad_output has ", grad_output.numel(),
              " elements, expected N x Lq x M*D = ", expected);
  TORCH_CHECK(grad_output.device() == value.device(), "ms_deform_attn_backward: grad_output on ",
              grad_output.device(), ", value on ", value.device());
  const auto dtype = in.value.scalar_type();
  const auto grad_out = grad_output.to(dtype).contiguous();
  if (in.vec > 1 && !aligned16(grad_out)) {
    choose_layout(in.dims, in.vec, c10::elementSize(dtype), false);  // a view of grad_output that starts mid-pack
  }
  const Dims& d = in.dims;
  // float32 accumulation for float16 / bfloat16 (float64 for float64)
  auto grad_value = at::zeros(in.value.sizes(), in.value.options().dtype(coord_type(dtype)));
  auto grad_loc = at::empty(in.sampling_locations.sizes(), in.sampling_locations.options());
  auto grad_attn = at::empty(in.attention_weights.sizes(), in.attention_weights.options());
  if (grad_loc.numel() > 0 && d.D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ms_deform_attn_backward", [&] {
      using coord_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
      using grad_t = coord_t;
      constexpr int kVec = 16 / sizeof(scalar_t);
      const BackwardArgs<scalar_t, coord_t, grad_t> args{
          read_buffer<scalar_t>(grad_out),           read_buffer<scalar_t>(in.value),
          read_buffer<int64_t>(in.spatial_shapes),   read_buffer<int64_t>(in.level_start_index),
          read_buffer<coord_t>(in.sampling_locations), read_buffer<coord_t>(in.attention_weights),
          write_buffer<grad_t>(grad_value),          write_buffer<coord_t>(grad_loc),
          write_buffer<coord_t>(grad_attn)};
      if (in.vec == kVec) {
        Launcher::template backward<scalar_t, coord_t, grad_t, kVec>(args, d, num_blocks(d));
      } else {
        Launcher::template backward<scalar_t, coord_t, grad_t, 1>(args, d, num_blocks(d));
      }
    });
  } else {
    grad_loc.zero_();
    grad_attn.zero_();
  }
  return {grad_value.to(dtype), grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace deformable_detr
