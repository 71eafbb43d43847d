"""Triton kernels of multi-scale deformable attention (forward and backward); launched by
:mod:`model.ops.triton_kernel`, which loads this file once per mode (compiled, or interpreted under
``TRITON_INTERPRET=1``), because ``triton.jit`` decides between the two when a kernel is defined.

Shapes (the official op's; all contiguous):
    value               N x S x M x D        S = sum_l H_l * W_l
    spatial_shapes      L x 2 (int64)        (H_l, W_l)
    level_start_index   L (int64)
    sampling_locations  N x Lq x M x L x P x 2   normalised (x, y)
    attention_weights   N x Lq x M x L x P
    output              N x Lq x M x D

With SOFTMAX the attention weights are logits: a program first reads each group's L * P logits for their max
and sum (two passes over 64 bytes per group, in L1) and weighs point k by exp(logit_k - max) / sum; the backward
writes the weights' gradients (in ACC), then turns them into the logits' gradients, p * (g - sum_j p_j g_j), from
what it wrote (two more passes over the group's L * P entries, with CTA barriers between a store and the loads of
other threads holding the same [BLOCK_G] element).

A program owns BLOCK_G "groups" g = (n, q, m) and all their D channels (BLOCK_D = D rounded up to a
power of two): the locations and weights of a group are read once and used for every channel, a
bilinear corner is one [BLOCK_G, BLOCK_D] gather of rows of D contiguous channels (vector loads when D
is a multiple of the vector width), and in the backward the sums over channels that give the location
and weight gradients stay inside the program (no atomics for them). Arithmetic is in ACC (float32, or
float64 for float64 inputs).
"""

import triton
import triton.language as tl

# Runtime sizes that change with the image size: not specialised on, so a new image size does not
# compile new kernels.
_NOT_SPECIALISED = ["num_groups", "Lq", "S", "L"]


# Only builtins of triton.language and functions of this file in the kernels: the functions that
# triton.language itself defines with triton.jit (tl.zeros, tl.sum, ...) do not run in the interpreter when
# Triton was imported before TRITON_INTERPRET=1 was set. Sums are tl.reduce with tl.sum's own combine
# function, which the interpreter recognises and runs as one numpy sum (any other runs element by element).
@triton.jit
def _add(a, b):
    return a + b


_sum_combine = getattr(tl.standard, "_sum_combine", _add)


@triton.jit
def _bilinear(loc_ptr, k, g_mask, H, W, ACC: tl.constexpr):
    """One sampling point per group, in grid_sample's convention (align_corners=False, zero padding).

    k: [BLOCK_G] index of the point in attention_weights (its location is at 2k, 2k + 1).
    Returns the top-left corner (x0, y0), the fractions (lx, ly), the four corner weights (0 for a corner
    outside the map) and whether any corner is inside.
    """
    loc_x = tl.load(loc_ptr + 2 * k, mask=g_mask, other=0.0).to(ACC)
    loc_y = tl.load(loc_ptr + 2 * k + 1, mask=g_mask, other=0.0).to(ACC)
    # pixel coordinates, pixel centres at integers
    x = loc_x * W - 0.5
    y = loc_y * H - 0.5
    # At x == -1 the right corners still get a location gradient (as in grid_sample); false for NaN.
    inside = (x >= -1.0) & (y >= -1.0) & (x < W) & (y < H) & g_mask
    # Points wholly outside: zero fractions (no NaN or infinity reaches the arithmetic below) and every
    # corner marked outside (the tests below assume x, y >= -1).
    x = tl.where(inside, x, 0.0)
    y = tl.where(inside, y, 0.0)
    fx = tl.floor(x)
    fy = tl.floor(y)
    lx = x - fx
    ly = y - fy
    hx = 1.0 - lx
    hy = 1.0 - ly
    x0 = fx.to(tl.int32)
    y0 = fy.to(tl.int32)
    x0_in = x0 >= 0
    x1_in = x0 + 1 < W
    y0_in = (y0 >= 0) & inside
    y1_in = (y0 + 1 < H) & inside
    w00 = tl.where(y0_in & x0_in, hy * hx, 0.0)
    w01 = tl.where(y0_in & x1_in, hy * lx, 0.0)
    w10 = tl.where(y1_in & x0_in, ly * hx, 0.0)
    w11 = tl.where(y1_in & x1_in, ly * lx, 0.0)
    return x0, y0, lx, ly, w00, w01, w10, w11, y0_in & x0_in, y0_in & x1_in, y1_in & x0_in, y1_in & x1_in, inside


@triton.jit
def _softmax_stats(attn_ptr, g64, g_mask, L, P: tl.constexpr, ACC: tl.constexpr):
    """[BLOCK_G] max and 1 / sum(exp(logit - max)) of each group's L * P logits."""
    mx = tl.load(attn_ptr + g64 * L * P, mask=g_mask, other=0.0).to(ACC)
    for lvl in range(L):
        for p in tl.static_range(P):
            mx = tl.maximum(mx, tl.load(attn_ptr + (g64 * L + lvl) * P + p, mask=g_mask, other=0.0).to(ACC))
    total = mx * 0.0
    for lvl in range(L):
        for p in tl.static_range(P):
            total += tl.exp(tl.load(attn_ptr + (g64 * L + lvl) * P + p, mask=g_mask, other=0.0).to(ACC) - mx)
    return mx, 1.0 / total


@triton.jit
def _weight(attn_ptr, k, g_mask, mx, inv, SOFTMAX: tl.constexpr, ACC: tl.constexpr):
    """[BLOCK_G] weight of point k: the given weight, or the softmax of its logit."""
    a = tl.load(attn_ptr + k, mask=g_mask, other=0.0).to(ACC)
    if SOFTMAX:
        a = tl.exp(a - mx) * inv
    return a


@triton.jit
def _corner_offsets(x0, y0, W, MD: tl.constexpr, INDEX_64: tl.constexpr):
    """Element offsets, inside one level of one batch element, of the four corner rows: [BLOCK_G] each."""
    row = y0 * W + x0
    if INDEX_64:
        row = row.to(tl.int64)
    o00 = row * MD
    return o00, o00 + MD, o00 + W * MD, o00 + (W + 1) * MD


@triton.jit
def _gather(value_l, offset, valid, d, d_mask, ACC: tl.constexpr):
    """[BLOCK_G, BLOCK_D] corner rows (D contiguous channels each); a corner outside the map is not read."""
    rows = tl.load(value_l[:, None] + offset[:, None] + d[None, :], mask=valid[:, None] & d_mask[None, :], other=0.0)
    return rows.to(ACC)


@triton.jit
def _corner_backward(value_l, grad_value_l, offset, valid, d, d_mask, go, coeff, ACC: tl.constexpr):
    """Adds coeff * grad_output to the corner's grad_value rows; returns <grad_output, value row> per group."""
    tl.atomic_add(
        grad_value_l[:, None] + offset[:, None] + d[None, :],
        coeff[:, None] * go,
        mask=valid[:, None] & d_mask[None, :],
        sem="relaxed",
    )
    return tl.reduce(go * _gather(value_l, offset, valid, d, d_mask, ACC), 1, _sum_combine)


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def ms_deform_attn_forward_kernel(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    out_ptr,
    num_groups,
    Lq,
    S,
    L,
    M: tl.constexpr,
    D: tl.constexpr,
    P: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    INDEX_64: tl.constexpr,
    SOFTMAX: tl.constexpr,
):
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)  # [BLOCK_G] groups (n, q, m)
    g_mask = g < num_groups
    n = (g // (Lq * M)).to(tl.int64)
    m = g % M
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D  # all true (and folded away) when D is a power of two
    # [BLOCK_G] pointers to value[n, 0, m, 0]
    value_n = value_ptr + n * S * (M * D) + m * D
    g64 = g.to(tl.int64)
    mx = tl.full([BLOCK_G], 0.0, ACC)  # the softmax's max and 1 / sum (unused without SOFTMAX)
    inv = tl.full([BLOCK_G], 1.0, ACC)
    if SOFTMAX:
        mx, inv = _softmax_stats(attn_ptr, g64, g_mask, L, P, ACC)
    acc = tl.full([BLOCK_G, BLOCK_D], 0.0, ACC)
    for lvl in range(L):
        H = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
        W = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
        value_l = value_n + tl.load(starts_ptr + lvl) * (M * D)  # [BLOCK_G]
        for p in tl.static_range(P):
            k = (g64 * L + lvl) * P + p  # [BLOCK_G] (n, q, m, l, p)
            a = _weight(attn_ptr, k, g_mask, mx, inv, SOFTMAX, ACC)
            x0, y0, lx, ly, w00, w01, w10, w11, v00, v01, v10, v11, inside = _bilinear(loc_ptr, k, g_mask, H, W, ACC)
            o00, o01, o10, o11 = _corner_offsets(x0, y0, W, M * D, INDEX_64)
            acc += (
                (a * w00)[:, None] * _gather(value_l, o00, v00, d, d_mask, ACC)
                + (a * w01)[:, None] * _gather(value_l, o01, v01, d, d_mask, ACC)
                + (a * w10)[:, None] * _gather(value_l, o10, v10, d, d_mask, ACC)
                + (a * w11)[:, None] * _gather(value_l, o11, v11, d, d_mask, ACC)
            )
    out = out_ptr + g64[:, None] * D + d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=_NOT_SPECIALISED)
def ms_deform_attn_backward_kernel(
    grad_out_ptr,
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    grad_value_ptr,
    grad_loc_ptr,
    grad_attn_ptr,
    num_groups,
    Lq,
    S,
    L,
    M: tl.constexpr,
    D: tl.constexpr,
    P: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
    INDEX_64: tl.constexpr,
    SOFTMAX: tl.constexpr,
):
    """grad_value (ACC dtype, zero on entry) accumulates with atomics: a value row is read by many
    queries. The gradients of a point's location and weight are sums over its group's D channels, all
    in this program: plain stores (with SOFTMAX, in ACC: rewritten as the logits' gradients at the end)."""
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_mask = g < num_groups
    n = (g // (Lq * M)).to(tl.int64)
    m = g % M
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    row_offset = n * S * (M * D) + m * D  # [BLOCK_G] element offset of value[n, 0, m, 0]
    g64 = g.to(tl.int64)
    mx = tl.full([BLOCK_G], 0.0, ACC)  # the softmax's max and 1 / sum (unused without SOFTMAX)
    inv = tl.full([BLOCK_G], 1.0, ACC)
    if SOFTMAX:
        mx, inv = _softmax_stats(attn_ptr, g64, g_mask, L, P, ACC)
    # [BLOCK_G, BLOCK_D] gradient of the output, read once for all points
    go = tl.load(grad_out_ptr + g64[:, None] * D + d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(
        ACC
    )
    for lvl in range(L):
        H = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
        W = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
        level_offset = row_offset + tl.load(starts_ptr + lvl) * (M * D)  # [BLOCK_G]
        value_l = value_ptr + level_offset
        grad_value_l = grad_value_ptr + level_offset
        for p in tl.static_range(P):
            k = (g64 * L + lvl) * P + p
            a = _weight(attn_ptr, k, g_mask, mx, inv, SOFTMAX, ACC)
            x0, y0, lx, ly, w00, w01, w10, w11, v00, v01, v10, v11, inside = _bilinear(loc_ptr, k, g_mask, H, W, ACC)
            o00, o01, o10, o11 = _corner_offsets(x0, y0, W, M * D, INDEX_64)
            # per corner: the share a * w * grad_output of its value rows, and <grad_output, value row>
            # for the location and weight gradients (0 for a corner outside the map)
            dot00 = _corner_backward(value_l, grad_value_l, o00, v00, d, d_mask, go, a * w00, ACC)
            dot01 = _corner_backward(value_l, grad_value_l, o01, v01, d, d_mask, go, a * w01, ACC)
            dot10 = _corner_backward(value_l, grad_value_l, o10, v10, d, d_mask, go, a * w10, ACC)
            dot11 = _corner_backward(value_l, grad_value_l, o11, v11, d, d_mask, go, a * w11, ACC)
            # d(sample)/d(pixel x, y)
            grad_x = (1.0 - ly) * (dot01 - dot00) + ly * (dot11 - dot10)
            grad_y = (1.0 - lx) * (dot10 - dot00) + lx * (dot11 - dot01)
            grad_a = w00 * dot00 + w01 * dot01 + w10 * dot10 + w11 * dot11
            # pixel -> normalised coordinates: x = loc_x * W - 0.5
            grad_loc_x = tl.where(inside, a * grad_x * W, 0.0)
            grad_loc_y = tl.where(inside, a * grad_y * H, 0.0)
            grad_a = tl.where(inside, grad_a, 0.0)
            tl.store(grad_attn_ptr + k, grad_a.to(grad_attn_ptr.dtype.element_ty), mask=g_mask)
            tl.store(grad_loc_ptr + 2 * k, grad_loc_x.to(grad_loc_ptr.dtype.element_ty), mask=g_mask)
            tl.store(grad_loc_ptr + 2 * k + 1, grad_loc_y.to(grad_loc_ptr.dtype.element_ty), mask=g_mask)
    if SOFTMAX:
        # the weights' gradients g -> the logits': p * (g - sum_j p_j g_j); the barrier makes this program's
        # stores above visible to all its threads (a [BLOCK_G] value is held by several)
        tl.debug_barrier()
        dot = tl.full([BLOCK_G], 0.0, ACC)
        for lvl in range(L):
            for p in tl.static_range(P):
                k = (g64 * L + lvl) * P + p
                grad_p = tl.load(grad_attn_ptr + k, mask=g_mask, other=0.0).to(ACC)
                dot += _weight(attn_ptr, k, g_mask, mx, inv, SOFTMAX, ACC) * grad_p
        for lvl in range(L):
            for p in tl.static_range(P):
                k = (g64 * L + lvl) * P + p
                grad_p = tl.load(grad_attn_ptr + k, mask=g_mask, other=0.0).to(ACC)
                p_k = _weight(attn_ptr, k, g_mask, mx, inv, SOFTMAX, ACC)
                tl.debug_barrier()  # every thread holding point k has read it before it is rewritten
                tl.store(grad_attn_ptr + k, (p_k * (grad_p - dot)).to(grad_attn_ptr.dtype.element_ty), mask=g_mask)
