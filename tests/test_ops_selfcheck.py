"""The self-check and impl="auto"'s chain, on the CPU: test implementations (model/ops/testing.py) that ask for
the self-check as the GPU kernels do — the host-emulated CUDA kernel, a kernel made wrong on purpose, one that
kills its process and one that cannot launch — are put at the head of the CPU chain.

Each self-check runs a child process (a few seconds: it imports torch).
"""

import json
import warnings

import pytest
import torch

import model.ops as ops
from model.ops import build, implementations, ms_deform_attn, ms_deform_attn_pytorch, selfcheck, testing
from model.ops.environment import runs_on
from model.ops.testing import CASES, make_inputs

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch, tmp_path):
    """impl="auto" as in a new process, with verdicts stored under tmp_path."""
    build.load("cpu")
    for name in ("_chosen", "_unavailable", "_failed"):
        monkeypatch.setattr(ops, name, {})
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.setattr(selfcheck, "_verdicts", {})
    monkeypatch.delenv("DEFORMABLE_DETR_OPS_SELF_CHECK", raising=False)
    for impl in testing.TEST_KERNELS:
        monkeypatch.setattr(impl, "verdict_dir", lambda impl=impl: tmp_path / impl.name)
        monkeypatch.setitem(implementations.REGISTRY, impl.name, impl)


def use_chain(monkeypatch, *names):
    monkeypatch.setitem(implementations.CHAINS, "cpu", names)


def test_wrong_kernel_is_caught_and_auto_falls_back_with_one_warning(monkeypatch, tmp_path):
    use_chain(monkeypatch, "wrong", "cpu", "pytorch")
    inputs = make_inputs(CASES[0][1], M=2, D=8, P=1)
    with pytest.warns(RuntimeWarning) as record:
        out = ms_deform_attn(*inputs)
    message = str(record[0].message)
    assert len(record) == 1
    # names the device, the case and the error
    assert "deliberately wrong kernel" in message and "FAILED its self-check" in message
    assert "CPU (" in message and "in case odd_levels_d12" in message
    assert "output differs from the reference by" in message and "uses the compiled cpu kernel instead" in message
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs))
    assert ops.implementation_info(CPU, torch.float64)["impl"] == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        ms_deform_attn(*inputs)
    # the verdict is on disk, keyed by build, device, driver and torch version
    (path,) = (tmp_path / "wrong").glob("*_float64_M2_D8_L1_P1.json")  # keyed by the call's shape too
    verdict = json.loads(path.read_text())
    assert verdict["ok"] is False and verdict["case"].startswith("odd_levels_d12")
    assert {"build", "device", "driver", "torch"} <= set(verdict) and verdict["dtypes"] == ["float64"]
    # a named implementation raises instead of falling back
    with pytest.raises(ops.SelfCheckError, match="FAILED its self-check"):
        ms_deform_attn(*inputs, impl="wrong")


def test_cached_verdict_is_read_not_recomputed(monkeypatch):
    inputs = make_inputs(CASES[0][1], M=2, D=8, P=1, dtype=torch.float32)
    shape = selfcheck.Shape.of(inputs[0], inputs[3])  # what the op's first call checks
    first = selfcheck.self_check(testing.WRONG, CPU, torch.float32, shape)
    assert first["ok"] is False and first["status"] == "FAILED" and first["dtypes"] == ["float64", "float32"]
    monkeypatch.setattr(selfcheck, "_verdicts", {})  # a new process on the same node
    monkeypatch.setattr(selfcheck, "_run_child", lambda *a: pytest.fail("the self-check ran again"))
    again = selfcheck.self_check(testing.WRONG, CPU, torch.float32, shape)
    assert again["status"].startswith("FAILED (cached: ") and again["case"] == first["case"]
    use_chain(monkeypatch, "wrong", "pytorch")
    with pytest.warns(RuntimeWarning, match="FAILED its self-check"):
        ms_deform_attn(*inputs)


def test_emulated_cuda_kernel_passes_its_self_check(monkeypatch):
    use_chain(monkeypatch, "emulated", "cpu", "pytorch")
    inputs = make_inputs(CASES[3][1], M=2, D=32, P=4, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ms_deform_attn(*inputs)
    assert torch.allclose(out, ms_deform_attn_pytorch(*inputs), atol=1e-5)
    info = ops.implementation_info(CPU, torch.float32)
    assert (info["impl"], info["self_check"], info["fallbacks"]) == ("emulated", "passed", [])
    verdict = selfcheck.self_check(testing.EMULATED, CPU, torch.float32)
    assert set(verdict["max_errors"]) == {"float64", "float32"} and verdict["max_errors"]["float64"] < 1e-12


def test_a_crashing_kernel_does_not_kill_the_caller(monkeypatch, tmp_path):
    use_chain(monkeypatch, "crashing", "pytorch")
    inputs = make_inputs(CASES[0][1], M=2, D=8, P=1)
    with pytest.warns(RuntimeWarning, match=r"crashing kernel .* in case odd_levels_d12 .*killed by signal 6"):
        out = ms_deform_attn(*inputs)
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs))
    assert ops.implementation_info(CPU, torch.float64)["impl"] == "pytorch"
    # a crash is no comparison: nothing is cached, the next process checks again
    assert not list((tmp_path / "crashing").glob("*.json"))


def test_auto_falls_back_when_a_launch_fails(monkeypatch):
    use_chain(monkeypatch, "unlaunchable", "cpu", "pytorch")
    inputs = make_inputs(CASES[0][1], M=2, D=8, P=1)
    with pytest.warns(RuntimeWarning, match="unlaunchable kernel .* failed to launch: .*no kernel image"):
        out = ms_deform_attn(*inputs)
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs))
    assert ops.implementation_info(CPU, torch.float64)["impl"] == "cpu"
    with pytest.raises(RuntimeError, match="no kernel image"):
        ms_deform_attn(*inputs, impl="unlaunchable")  # a named implementation raises


def test_self_check_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("DEFORMABLE_DETR_OPS_SELF_CHECK", "0")
    use_chain(monkeypatch, "wrong", "pytorch")
    inputs = make_inputs(CASES[0][1], M=2, D=8, P=1)
    ms_deform_attn(*inputs)  # trusted unchecked: it is the wrong one that runs
    info = ops.implementation_info(CPU, torch.float64)
    assert info["impl"] == "wrong" and info["self_check"].startswith("skipped")


def test_compute_capability_against_the_build():
    assert runs_on(["7.5", "8.0", "9.0+PTX"], (8, 6)) == (True, "machine code for sm_80")
    assert runs_on(["7.5", "8.0", "9.0+PTX"], (9, 0))[0]
    assert runs_on(["7.5", "8.0", "9.0+PTX"], (10, 0)) == (True, "PTX of compute_90, compiled by the driver at load")
    ok, reason = runs_on(["7.5", "8.0", "9.0"], (10, 0))
    assert not ok and "sm_100" in reason and '--arch "7.5;8.0;9.0;10.0"' in reason
    assert not runs_on(["7.5", "8.0", "9.0+PTX"], (7, 0))[0]  # a V100 with a CUDA 13 build
    assert not runs_on(["9.0a"], (10, 0))[0] and runs_on(["9.0a"], (9, 0))[0]


def marks(folder, name):
    return len(list(folder.glob(f"{name}.*")))


def test_a_killed_check_is_reported_and_retried_not_cached(monkeypatch, tmp_path):
    """The check process killed mid-check (SIGKILL: the OOM killer, a pre-emption): this process falls back with
    the cause; nothing is cached, so the next process checks again, and caches the verdict once it passes."""
    folder = tmp_path / "marks"
    folder.mkdir()
    monkeypatch.setenv("DEFORMABLE_DETR_OPS_TEST_MARKS", str(folder))
    use_chain(monkeypatch, "killed", "cpu", "pytorch")
    inputs = make_inputs(CASES[0][1], M=2, D=8, P=1)
    with pytest.warns(
        RuntimeWarning,
        match=r"killed test kernel .* could not run .* killed by signal 9 \(SIGKILL: "
        r"the out-of-memory killer, or the job was pre-empted",
    ):
        ms_deform_attn(*inputs)
    assert ops.implementation_info(CPU, torch.float64)["impl"] == "cpu"
    assert not list((tmp_path / "killed").glob("*.json")) and marks(folder, "killed") == 1
    shape = selfcheck.Shape.of(inputs[0], inputs[3])
    verdict = selfcheck.self_check(testing.KILLED, CPU, torch.float64, shape)  # this process's verdict
    assert verdict["compared"] is False and verdict["status"].startswith("could not run: the check process was killed")
    assert "not cached" in verdict["status"]
    # the next process: checked again; this time it is not killed, passes, and the verdict is cached
    monkeypatch.setattr(selfcheck, "_verdicts", {})
    monkeypatch.setenv("DEFORMABLE_DETR_OPS_TEST_KILL", "0")
    verdict = selfcheck.self_check(testing.KILLED, CPU, torch.float64, shape)
    assert verdict["ok"] and verdict["status"] == "passed" and marks(folder, "killed") == 2
    assert len(list((tmp_path / "killed").glob("*.json"))) == 1


@pytest.mark.parametrize(
    "error,cause",
    [
        ("CUDA error: all CUDA-capable devices are busy or unavailable", "busy or unavailable"),
        ("CUDA error: CUDA-capable device(s) is/are busy or unavailable\nCompile with TORCH_USE_CUDA_DSA", "busy"),
        ("the GPU is in exclusive process mode", "exclusive-process"),
        ("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.1 GiB total capacity)", "out of memory"),
    ],
    ids=["busy", "busy_dsa", "exclusive", "oom"],
)
def test_an_environment_error_is_not_cached(monkeypatch, tmp_path, error, cause):
    """A GPU in exclusive-process mode held by another process, or out of memory: the verdict says so, it is not
    cached, and a named implementation raises with the cause instead of a FAILED."""
    monkeypatch.setenv("DEFORMABLE_DETR_OPS_TEST_ERROR", error)
    use_chain(monkeypatch, "busy", "cpu", "pytorch")
    inputs = make_inputs(CASES[0][1], M=2, D=8, P=1)
    with pytest.warns(RuntimeWarning, match=f"could not run .*{cause}") as record:
        ms_deform_attn(*inputs)
    assert "FAILED" not in str(record[0].message) and "checked again in the next one" in str(record[0].message)
    verdict = selfcheck.self_check(testing.BUSY, CPU, torch.float64)
    assert verdict["compared"] is False and cause in verdict["environment"]
    assert not list((tmp_path / "busy").glob("*.json"))
    with pytest.raises(ops.SelfCheckError, match=f"could not run .*{cause}"):
        ms_deform_attn(*inputs, impl="busy")


def test_a_timed_out_check_is_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFORMABLE_DETR_OPS_SELF_CHECK_TIMEOUT", "8")
    monkeypatch.setenv("DEFORMABLE_DETR_OPS_TEST_SLEEP", "60")
    verdict = selfcheck.self_check(testing.SLOW, CPU, torch.float64)
    assert (
        verdict["compared"] is False and verdict["environment"] == "time-out: the check process did not finish in 8 s"
    )
    assert verdict["case"] in (
        None,
        selfcheck.CASES[0][0] + " (N=2, Lq=9, M=2, D=12, P=3, levels [(5, 7), (3, 1), (1, 4)]), float64",
    )
    assert not list((tmp_path / "slow").glob("*.json"))


def test_an_unwritable_cache_checks_in_memory(monkeypatch, tmp_path):
    """A read-only cache (here: its folder cannot be created, as under a read-only home in a container): the check
    runs unlocked, its verdict is kept in memory, and impl="auto" neither raises nor warns."""
    blocker = tmp_path / "read-only"
    blocker.write_text("a file where the cache folder would be")
    for impl in (testing.EMULATED, testing.WRONG):
        monkeypatch.setattr(impl, "verdict_dir", lambda impl=impl: blocker / impl.name)
    use_chain(monkeypatch, "emulated", "cpu", "pytorch")
    inputs = make_inputs(CASES[3][1], M=2, D=32, P=4, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ms_deform_attn(*inputs)
    assert torch.allclose(out, ms_deform_attn_pytorch(*inputs), atol=1e-5)
    verdict = selfcheck.self_check(testing.EMULATED, CPU, torch.float32)
    assert (
        verdict["status"].startswith("passed (not cached: cannot write") and "cannot create the lock" in verdict["lock"]
    )
    # a wrong kernel is still caught, in memory
    use_chain(monkeypatch, "wrong", "cpu", "pytorch")
    monkeypatch.setattr(ops, "_chosen", {})
    with pytest.warns(RuntimeWarning, match="FAILED its self-check"):
        ms_deform_attn(*make_inputs(CASES[0][1], M=2, D=8, P=1, dtype=torch.float32))


def test_a_cached_verdict_is_read_from_a_read_only_cache(monkeypatch, tmp_path):
    first = selfcheck.self_check(testing.RIGHT, CPU, torch.float64)
    assert first["status"] == "passed"
    monkeypatch.setattr(selfcheck, "_verdicts", {})
    monkeypatch.setattr(selfcheck, "_run_child", lambda *a: pytest.fail("the self-check ran again"))
    monkeypatch.setattr(build, "_open_lock_file", lambda path: (_ for _ in ()).throw(PermissionError(13, "denied")))
    assert selfcheck.self_check(testing.RIGHT, CPU, torch.float64)["status"].startswith("passed (cached: ")


def test_no_flock_and_unwritable_lock_files(monkeypatch, tmp_path, capfd):
    """A filesystem without flock (ENOLCK), or a lock file that cannot be opened: the check and the build run
    unlocked, the verdict is still cached where the folder is writable."""
    import errno
    import fcntl

    def no_flock(f, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    verdict = selfcheck.self_check(testing.RIGHT, CPU, torch.float64)
    assert verdict["status"] == "passed" and "No locks available" in verdict["lock"]
    assert len(list((tmp_path / "right").glob("*.json"))) == 1
    with build.try_file_lock(tmp_path / "x.lock", "waiting") as no_lock:
        assert "may not support flock" in no_lock
    with pytest.raises(OSError):
        with build._file_lock(tmp_path / "x.lock", "waiting"):
            pass
    # an existing lock file that cannot be opened for writing is locked read-only
    monkeypatch.undo()
    lock = tmp_path / "ro.lock"
    lock.touch()
    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda path, mode="r", *a, **k: (
            (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
            if str(path) == str(lock) and mode != "r"
            else real_open(path, mode, *a, **k)
        ),
    )
    with build.try_file_lock(lock, "waiting") as no_lock:
        assert no_lock is None


def test_a_build_made_ahead_of_time_for_the_gpu_is_found(monkeypatch, tmp_path):
    """`python -m model.ops.build --cuda --arch 9.0` on a login node, then a job on an H100 with the default
    architecture list in force: the job loads the 9.0 build, not a new one; a GPU it has no code for does not."""
    monkeypatch.setenv("DEFORMABLE_DETR_OPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DEFORMABLE_DETR_OPS_NO_BUILD", "1")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(build, "_LOADED", {})
    monkeypatch.setattr(build, "_ACTIVE", {})
    loaded = []
    monkeypatch.setattr(build, "_load_library", lambda path: loaded.append(path))
    for archs in (["9.0"], ["8.0", "8.6"]):
        spec = build.extension_spec("cuda", archs)
        spec.directory.mkdir(parents=True)
        (spec.directory / "BUILT").write_text(
            json.dumps({"library": f"{spec.name}.so", "arch_list": build.spec_arch_list(spec)})
        )
    stale = tmp_path / "cache" / "deformable_detr_cuda_0123456789ab"  # other sources: never loaded
    stale.mkdir()
    (stale / "BUILT").write_text(json.dumps({"library": "x.so", "arch_list": ["9.0"]}))
    assert build.spec_arch_list(build.extension_spec("cuda", ["8.0", "9.0+PTX"])) == ["8.0", "9.0+PTX"]
    assert build.find_prebuilt("cuda", (9, 0)).name == build.extension_spec("cuda", ["9.0"]).name
    assert build.find_prebuilt("cuda", (8, 9)).name == build.extension_spec("cuda", ["8.0", "8.6"]).name
    assert build.find_prebuilt("cuda", (7, 5)) is None
    path = build.load("cuda", capability=(9, 0))
    assert loaded == [path] and path.parent.name == build.extension_spec("cuda", ["9.0"]).name
    assert build.loaded_spec("cuda").name == build.extension_spec("cuda", ["9.0"]).name
    assert build.load("cuda") == path  # one CUDA library per process
    monkeypatch.setattr(build, "_LOADED", {})
    monkeypatch.setattr(build, "_ACTIVE", {})
    with pytest.raises(build.BuildError, match="DEFORMABLE_DETR_OPS_NO_BUILD"):
        build.load("cuda", capability=(7, 5))  # no build has code for it: the default one, which is not built


MODEL = selfcheck.Shape(M=8, D=32, L=4, P=4, softmax=True)  # the model's: 8 heads of 32 channels, 4 levels and
# points, the fused softmax


def test_the_check_runs_the_model_shape_with_every_launch_configuration(monkeypatch):
    """A kernel wrong only in a tile configuration that small inputs never pick, or only at the model's shape:
    the fixed cases pass it, the check at the model's shape (every launch configuration forced) does not; the
    op's first call passes its shape, so auto falls back."""
    assert selfcheck.self_check(testing.TILED, CPU, torch.float32)["ok"]  # the fixed cases only
    verdict = selfcheck.self_check(testing.TILED, CPU, torch.float32, MODEL)
    assert not verdict["ok"] and "model shape M8_D32_L4_P4_softmax" in verdict["case"] and "'large'" in verdict["case"]
    assert verdict["shape"] == MODEL._asdict() and verdict["file"].endswith("_float32_M8_D32_L4_P4_softmax.json")
    use_chain(monkeypatch, "wrong_at_shape", "cpu", "pytorch")
    small = make_inputs(CASES[3][1], M=2, D=32, P=4, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms_deform_attn(*small)  # 2 heads: checked at (2, 32, 4, 4), passes
    assert ops.implementation_info(CPU, torch.float32, shape=(2, 32, 4, 4, False))["impl"] == "wrong_at_shape"
    model = make_inputs(CASES[3][1], M=8, D=32, P=4, N=1, Lq=3, dtype=torch.float32, logits=True)
    with pytest.warns(RuntimeWarning, match=r"FAILED its self-check .* in case model shape M8_D32_L4_P4_softmax"):
        out = ms_deform_attn(*model, softmax=True)
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*model, softmax=True))
    assert ops.implementation_info(CPU, torch.float32, shape=MODEL)["impl"] == "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_model_shape_cases_in_the_dtype_in_use(dtype):
    """The emulated CUDA kernel at the model's shape, in float32 and in bfloat16 with float32 locations (autocast),
    forward and backward, run here in this process."""
    verdict = selfcheck.run_cases(testing.EMULATED, CPU, dtype, MODEL)
    assert verdict["ok"], verdict
    fixed = len(selfcheck.CASES) + len(selfcheck.SOFTMAX_CASES)  # in float64 and the dtype
    assert verdict["cases"] == 2 * fixed + 1 and set(verdict["max_errors"]) == {"float64", str(dtype)[6:]}


def test_triton_check_forces_the_tiles_a_training_launches(monkeypatch):
    """Triton, in its interpreter: the check at the model's shape launches every (BLOCK_G, num_warps) that
    block_config picks for the encoder and decoder presets on a GPU, forward and backward."""
    pytest.importorskip("triton")
    from model.ops import triton_kernel

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    launched = set()
    real = triton_kernel._launch_args

    def recording(value, num_groups, backward, softmax=False):
        grid, meta = real(value, num_groups, backward, softmax)
        launched.add((backward, meta["BLOCK_G"]))
        return grid, meta

    monkeypatch.setattr(triton_kernel, "_launch_args", recording)
    monkeypatch.setattr(selfcheck, "CASES", selfcheck.CASES[:1])  # the fixed cases are tested elsewhere
    configs = triton_kernel.launch_configs(32, torch.float32)
    assert [c["forward"][0] for c in configs] == [16, 32, 64] and [c["backward"][0] for c in configs] == [16, 32, 32]
    verdict = selfcheck.run_cases(implementations.REGISTRY["triton"], CPU, torch.float32, MODEL)
    assert verdict["ok"], verdict
    assert {(False, 16), (False, 32), (False, 64), (True, 16), (True, 32)} <= launched
