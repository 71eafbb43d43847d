"""Inference speed (FPS) and training-iteration time, measured like the official benchmark.

The official ``benchmark.py`` of Deformable DETR times ``model(inputs)`` in eval mode without gradients,
``torch.cuda.synchronize()`` before starting and after finishing each iteration, drops the first warm-up
iterations and reports ``batch_size / mean(iteration time)``. :func:`measure_fps` does the same on batches
of real evaluation images (padded like the evaluation loader; the batches cycle over the given images) or on
given tensors, already on the device (data loading is not timed).

Every result records the device's name (a CPU is measured and labelled as such), the precision
(``fp32``: TF32 off; ``tf32``: TF32 matmuls and convolutions on Ampere or newer GPUs; ``bf16``: autocast to
bfloat16), the attention implementation that ran and the torch version.

Training-iteration time: :func:`time_train_step` times the engine's own optimiser step
(:class:`harness.run.step.OptimiserStep`, with the run's optimiser, schedule, clipping and gradient scaler),
so the reported time is the training's; :func:`harness.run.step.measure_run_train_step` builds it for a run
config (the run layer builds optimisers; this module only times).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from harness.config import AMP_MODES, PRECISIONS, amp_dtype
from harness.measure.complexity import build_for_complexity
from harness.measure.inputs import evaluation_images, fixed_size_input, make_batches
from harness.provenance import current_device, device_name
from model import ops
from model.ms_deform_attn import MSDeformAttn

# ------------------------------------------------------------------------------------------ helpers


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def precision_context(precision: str, device):
    """TF32 switches and autocast for ``precision``; the previous TF32 settings are restored after."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        if precision == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def precision_label(precision: str, device) -> str:
    device = torch.device(device)
    if precision == "tf32" and device.type != "cuda":
        return "fp32 (tf32 asked; TF32 exists on CUDA only)"
    return precision


def attention_impl(model: torch.nn.Module, device, precision: str = "fp32") -> str:
    """Which attention implementation runs in ``model``: see :func:`describe_attention`."""
    impls = {m.impl for m in model.modules() if isinstance(m, MSDeformAttn)}
    if not impls:
        if any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules()):
            return "dense (torch.nn.MultiheadAttention)"
        return "none"
    return describe_attention(impls, device, torch.bfloat16 if precision == "bf16" else torch.float32)


def attention_of_config(model_cfg, device, amp: str = "off") -> str:
    """Which attention implementation a run of ``model_cfg`` trains with (``train.amp`` sets the dtype)."""
    if model_cfg.arch == "detr":
        return "dense (torch.nn.MultiheadAttention)"
    if model_cfg.arch != "deformable_detr":
        return "none"
    return describe_attention({model_cfg.attn_impl}, device, amp_dtype(amp) or torch.float32)


def describe_attention(impls, device, dtype: torch.dtype) -> str:
    """``ms_deform_attn <implementation>`` for each requested implementation, as the first call resolves it
    (:func:`model.ops.implementation_info`): what ``auto`` passed over and why, and the self-check verdict.
    A table line built on the slow reference says so here."""
    names = []
    for impl in sorted(impls):
        info = ops.implementation_info(torch.device(device), dtype, impl)
        text = f"ms_deform_attn {info['description']}"
        if impl == "auto":
            text += " (auto" + "".join(f"; {f['impl']} passed over: {f['reason']}" for f in info["fallbacks"]) + ")"
        if info["self_check"] != "not needed":
            text += f", self-check {info['self_check']}"
        names.append(text)
    return ", ".join(names)


def environment(device, precision: str, model: Optional[torch.nn.Module] = None) -> dict:
    device = torch.device(device)
    record = {
        "fps_device": device_name(device),
        "device_type": device.type,
        "precision": precision_label(precision, device),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        record["cuda"] = torch.version.cuda
    if model is not None:
        record["attn_impl"] = attention_impl(model, device, precision)
    return record


def _timings_summary(times: List[float], batch_size: int) -> dict:
    mean = statistics.fmean(times)
    return {
        "fps": batch_size / mean,
        "batch_size": batch_size,
        "iters": len(times),
        "mean_s": mean,
        "median_s": statistics.median(times),
        "std_s": statistics.pstdev(times) if len(times) > 1 else 0.0,
        "min_s": min(times),
    }


# ------------------------------------------------------------------------------------------ inference


@torch.no_grad()
def measure_fps(
    model: torch.nn.Module,
    images,
    batch_size: int = 1,
    iters: int = 100,
    warmup: int = 10,
    device=None,
    precision: str = "fp32",
) -> dict:
    """Frames per second of ``model(images, mask)`` in eval mode.

    ``images``: C x H x W tensors (real evaluation images, batched ``batch_size`` at a time and cycled) or one
    (images, mask) batch. ``warmup`` untimed iterations, then ``iters`` timed ones, each between two device
    synchronisations. Returns ``fps`` (= batch_size / mean iteration time), the timing statistics, the device,
    precision, attention implementation and torch version.
    """
    if iters < 1 or warmup < 0 or batch_size < 1:
        raise ValueError("measure_fps: iters and batch_size must be >= 1 and warmup >= 0")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    batches = make_batches(images, batch_size, device, max_batches=warmup + iters)
    batch_size = batches[0][0].shape[0]
    times = []
    with precision_context(precision, device):
        for it in range(warmup + iters):
            images_b, mask_b = batches[it % len(batches)]
            synchronize(device)
            start = time.perf_counter()
            model(images_b, mask_b)
            synchronize(device)
            if it >= warmup:
                times.append(time.perf_counter() - start)
    return {
        **_timings_summary(times, batch_size),
        "warmup": warmup,
        "num_inputs": len(batches) * batch_size,
        "input_sizes": sorted({"x".join(map(str, b[0].shape[-2:])) for b in batches}),
        **environment(device, precision, model),
    }


def measure_speed(
    model: torch.nn.Module,
    images,
    batch_sizes: Sequence[int] = (1, 4),
    iters: int = 100,
    warmup: int = 10,
    device=None,
    precision: str = "fp32",
) -> dict:
    """:func:`measure_fps` at each batch size: ``fps_bs<B>`` for each and the details under ``fps_details``,
    with the device (``fps_device``), precision, attention implementation and torch version."""
    details = {}
    record: Dict[str, object] = {}
    for bs in batch_sizes:
        result = measure_fps(
            model, images, batch_size=bs, iters=iters, warmup=warmup, device=device, precision=precision
        )
        record[f"fps_bs{bs}"] = result["fps"]
        details[f"bs{bs}"] = {
            k: result[k]
            for k in (
                "fps",
                "batch_size",
                "iters",
                "warmup",
                "mean_s",
                "median_s",
                "std_s",
                "min_s",
                "num_inputs",
                "input_sizes",
            )
        }
        env = {
            k: result[k]
            for k in ("fps_device", "device_type", "precision", "torch", "attn_impl", "cuda")
            if k in result
        }
        record.update(env)
    record["fps_details"] = details
    return record


def measure_run_speed(
    run_cfg,
    device=None,
    root: Optional[str] = None,
    fixed_size: Optional[Tuple[int, int]] = None,
    model: Optional[torch.nn.Module] = None,
    iters: Optional[int] = None,
    output_dir: Optional[str] = None,
) -> dict:
    """FPS of ``run_cfg.model`` as ``run_cfg.benchmark`` asks (batch sizes, warm-up, precision) on its first
    ``fps_images`` evaluation images, or on one 3 x H x W image (``fixed_size``) when no dataset is at hand.
    ``model``: time this one (for example the trained model) instead of a freshly built one."""
    bench = run_cfg.benchmark
    device = torch.device(device) if device else current_device()
    if model is None:
        model = build_for_complexity(run_cfg.model)
    if fixed_size is not None:
        images = [fixed_size_input(*fixed_size)[0][0][0]]
        described = f"3x{fixed_size[0]}x{fixed_size[1]}"
    else:
        images = evaluation_images(run_cfg, bench.fps_images, root=root, output_dir=output_dir)
        described = f"first {len(images)} {run_cfg.data.val_split} images ({run_cfg.data.dataset})"
    record = measure_speed(
        model,
        images,
        batch_sizes=bench.fps_batch_sizes,
        warmup=bench.fps_warmup,
        iters=iters or bench.fps_images,
        device=device,
        precision=bench.precision,
    )
    record["fps_input"] = described
    return record


def time_train_step(
    step,
    images: torch.Tensor,
    mask: torch.Tensor,
    targets: List[dict],
    amp: str = "off",
    iters: int = 10,
    warmup: int = 3,
) -> dict:
    """Seconds per training iteration of ``step`` on one batch: ``step(images, mask, targets)`` is the engine's
    optimiser step (:class:`harness.run.step.OptimiserStep`: forward, loss, backward, gradient clipping,
    optimiser and schedule steps), each iteration between two device synchronisations, after ``warmup``
    untimed ones. ``amp`` (``off`` | ``bf16`` | ``fp16``) is the step's, for the record.

    The model's weights are changed by the steps: time a copy if they matter. Returns ``mean_s``,
    ``median_s``, ``std_s``, ``iters_per_s``, ``images_per_s``, ``batch_size``, ``amp``, ``peak_memory_mb``
    (CUDA) and the device, torch version and attention implementation.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp {amp!r}: expected one of {', '.join(AMP_MODES)}")
    if iters < 1 or warmup < 0:
        raise ValueError("time_train_step: iters must be >= 1 and warmup >= 0")
    device = step.device
    model = step.model.train()
    step.criterion.train()
    images, mask = images.to(device), mask.to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for it in range(warmup + iters):
        synchronize(device)
        start = time.perf_counter()
        values = step(images, mask, targets)
        synchronize(device)
        if it >= warmup:
            times.append(time.perf_counter() - start)
    batch_size = images.shape[0]
    summary = _timings_summary(times, batch_size)
    record = {
        "mean_s": summary["mean_s"],
        "median_s": summary["median_s"],
        "std_s": summary["std_s"],
        "iters": len(times),
        "warmup": warmup,
        "iters_per_s": 1.0 / summary["mean_s"],
        "images_per_s": summary["fps"],
        "batch_size": batch_size,
        "amp": amp,
        "input_size": "x".join(map(str, images.shape[-2:])),
        "loss": values["loss"],
    }
    if device.type == "cuda":
        record["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    env = environment(device, "bf16" if amp == "bf16" else "fp32", getattr(model, "module", model))
    env.pop("precision")
    return {**record, **env}
