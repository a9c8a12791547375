"""Every Triton kernel compiled ahead of time for sm_80, 86, 89, 90 and 120 with the launch
settings the host wrappers use (kernels/compile_matrix.py): it compiles, fits the target's
shared memory and spills within budget. No GPU needed: Triton targets a GPUTarget, ptxas reports.
Also the per-target table's coverage and the reference fallback's one-time warning."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from stmd_fast.kernels import dispatch, launch
from stmd_fast.kernels.attention import attention, attention_reference

triton = pytest.importorskip("triton")


@pytest.mark.slow
def test_every_kernel_compiles_fits_and_spills_within_budget_on_every_target():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real compiles, not the interpreter
    proc = subprocess.run([sys.executable, "-m", "stmd_fast.kernels.compile_matrix"], capture_output=True,
                          text=True, env=env, timeout=3600)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [f"{r['kernel']} {r['precision']} {r['shape']} {r['target']}: {r['error']}" for r in rows if r["error"]]
    assert proc.returncode == 0 and not failed, "\n".join(failed) + proc.stderr[-3000:]
    # the whole matrix, not a subset: every kernel x dtype x shape x target
    from stmd_fast.kernels.compile_matrix import entries
    assert len(rows) == len(entries())
    assert {r["target"] for r in rows} == {"sm_80", "sm_86", "sm_89", "sm_90", "sm_120"}
    for r in rows:
        assert 0 <= r["smem"] <= r["smem_limit"] and 0 < r["regs"] <= 255 and r["spill_stores"] <= r["budget"]
    attention_rows = {(r["kernel"], r["precision"], r["shape"]) for r in rows if r["kernel"].startswith("attention")}
    for kernel in launch.ATTENTION_KERNELS:  # the presets' head dims 8 (U-Nets) and 64 (DiT), in every precision,
        for precision in launch.PRECISIONS:  # at a sequence length of each divisibility class
            for head_dim in (8, 64):
                for tokens in (196, 256 if head_dim == 64 else 64):
                    assert (f"attention {kernel}", precision, f"head dim {head_dim}, {tokens} tokens") in attention_rows


def test_the_matrix_specialises_integer_arguments_as_tritons_launcher_does():
    """The matrix marked pointers divisible by 16 and no integer, while the launcher also marks every integer
    that is a multiple of 16 and makes a 1 a constant: it compiled, and reported registers and spills of,
    variants that never launch (the bf16 attention forward at head dim 64: 44 bytes of spills on sm_80 as
    compiled, none as launched). Each entry's integers are specialised by Triton's own rule here, and every
    class (a multiple of 16, not, a 1) is compiled for each kernel that takes an integer."""
    from stmd_fast.kernels.compile_matrix import _source, entries

    def tritons(value):  # Triton's own specialisation where this version has it in this form (3.9 does)
        try:
            from triton.backends.compiler import BaseBackend
            from triton.runtime.jit import native_specialize_impl
            return tuple(native_specialize_impl(BaseBackend, value, False, True, True))
        except (ImportError, TypeError):
            return None

    assert tritons(1) in (("constexpr", 1), None) and tritons(48) in (("i32", "D"), None)
    classes = {}
    for entry in entries():
        fn, signature, constexprs, attrs, _ = _source(entry)
        for name, value in entry["ints"].items():
            index = (fn.arg_names.index(name),)
            ours = ("constexpr", value) if signature[name] == "constexpr" else \
                ("i32", "D" if attrs.get(index) == [["tt.divisibility", 16]] else "")
            assert ours == (("constexpr", 1) if value == 1 else ("i32", "D" if value % 16 == 0 else "")), (entry, name)
            assert tritons(value) in (ours, None), (entry, name)
            assert signature[name] != "constexpr" or constexprs[name] == 1
            classes.setdefault((entry["kernel"], name), set()).add(ours)
    assert classes[("attention fwd", "L")] == {("i32", "D"), ("i32", "")}
    assert classes[("meanflow_loss delta", "N_CHUNKS")] == {("constexpr", 1), ("i32", "D"), ("i32", "")}
    assert classes[("meanflow_loss delta", "D")] == {("i32", "D"), ("i32", "")}
    # the loss's two integers jointly: an unaligned D over several chunks is a variant of its own
    pairs = {(e["ints"]["D"] % 16 == 0, min(e["ints"]["N_CHUNKS"], 2), e["ints"]["N_CHUNKS"] % 16 == 0)
             for e in entries() if e["kernel"] == "meanflow_loss delta"}
    assert pairs == {(d, n, n == 2 and m) for d in (True, False) for n in (1, 2) for m in (True, False)}
    assert classes[("time_features fwd", "n_rows")] == {("i32", "D"), ("i32", "")}


def test_every_preset_head_dim_has_a_launch_setting_on_every_target():
    for cap in launch.TARGETS:
        for kernel in launch.ATTENTION_KERNELS:
            for precision in launch.PRECISIONS:
                for head_dim in (8, 16, 40, 64):
                    cfg = launch.attention_config(kernel, head_dim, precision, cap)
                    assert cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.num_warps in (4, 8)


def test_fp32_follows_torchs_matmul_precision():
    assert torch.get_float32_matmul_precision() == "highest"
    assert launch.dot_precision(torch.float32) == "tf32x3"  # fp32-accurate
    assert launch.dot_precision(torch.bfloat16) == "bf16"
    try:
        torch.set_float32_matmul_precision("high")  # the user allows TF32 (so does allow_tf32 = True)
        assert launch.dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision("highest")


def test_fp32_follows_the_trainers_tf32_switch():
    """--tf32 (use_tf32) must leave every reader of torch's fp32 setting working: setting the per-backend
    torch.backends.cuda.matmul.fp32_precision alone makes torch refuse to read the process-wide one, which
    the attention's launcher (and Inductor's autotuning) did, so the first attention call raised. Either
    way a user sets it, the attention follows."""
    from stmd_fast.devices import use_tf32

    try:
        use_tf32(True)
        assert torch.get_float32_matmul_precision() == "high"
        assert launch.dot_precision(torch.float32) == "tf32"
        use_tf32(False)
        assert torch.get_float32_matmul_precision() == "highest"
        assert launch.dot_precision(torch.float32) == "tf32x3"
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9: the per-backend setting
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            assert launch.dot_precision(torch.float32) == "tf32"
            torch.backends.cuda.matmul.fp32_precision = "ieee"
            assert launch.dot_precision(torch.float32) == "tf32x3"
    finally:
        torch.set_float32_matmul_precision("highest")  # torch's defaults
        torch.backends.cudnn.allow_tf32 = True


def test_unsupported_inputs_say_why():
    def unsupported(d, dtype, device="cpu", **shapes):
        q = torch.zeros(1, 1, 4, d, dtype=dtype, device=device)
        k, v = (torch.zeros(shapes.get(name, q.shape), dtype=dtype, device=device) for name in "kv")
        return launch.attention_unsupported(q, k, v)

    assert unsupported(64, torch.float32) is None
    assert "interpreter" in unsupported(64, torch.bfloat16)  # on the CPU: Triton's interpreter, fp32 only
    if torch.cuda.is_available():
        assert unsupported(64, torch.bfloat16, "cuda") is None
    assert "float64" in unsupported(64, torch.float64)
    assert "float16" in unsupported(64, torch.float16)
    assert "head dim 72" in unsupported(72, torch.float32)  # DiT-XL
    assert "head dim 128" in unsupported(128, torch.float32)
    assert "k (1, 1, 9, 8)" in unsupported(8, torch.float32, k=(1, 1, 9, 8), v=(1, 1, 9, 8))


@pytest.mark.skipif(not (torch.cuda.is_available() or dispatch.interpret_mode()), reason="needs CUDA or the interpreter")
def test_float64_falls_back_to_the_reference_with_one_warning_also_compiled():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64).to(device) for _ in range(3))
    launch._warned.clear()
    with dispatch.backend("triton"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = attention(q, k, v, 0.3)
        out2 = attention(q, k, v, 0.3)
        torch._dynamo.reset()
        out3 = torch.compile(lambda a, b, c: attention(a, b, c, 0.3), fullgraph=True)(q, k, v)  # no graph break
    messages = [str(w.message) for w in caught if "runs the PyTorch reference" in str(w.message)]
    assert messages == ["stmd_fast.kernels: attention runs the PyTorch reference for dtype torch.float64 "
                        "(the kernel takes float32 and bfloat16)"]
    ref = attention_reference(q, k, v, 0.3)
    for o in (out, out2, out3):
        torch.testing.assert_close(o, ref)


@pytest.mark.parametrize("argv, words", [
    (["--kernel", "nonexistent"], ["--kernel 'nonexistent' matches no kernel", "attention fwd", "meanflow_loss grad",
                                   "time_features bwd"]),
    (["--jobs", "0"], ["--jobs 0: must be at least 1"]),
    (["--jobs", "-5"], ["--jobs -5: must be at least 1"]),
], ids=["kernel-typo", "jobs-0", "jobs-negative"])
def test_compile_matrix_refuses_a_filter_of_nothing_and_jobs_below_1(capsys, argv, words):
    """A --kernel typo once compiled nothing and passed ("0 kernels compiled, 0 failed", exit 0); --jobs 0
    silently meant all cores and --jobs -5 was a traceback: each is one line, exit code 2, before any compile."""
    from stmd_fast.kernels.compile_matrix import main

    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and all(word in lines[0] for word in words), lines


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_loss_kernels_matrix_entry_has_the_dtypes_the_trainer_launches_it_with(monkeypatch, precision):
    """The compile matrix compiles the fused loss for the dtypes of its real launch: u and du/dt from the
    network (bf16 under autocast), v and h in fp32 (the bf16 entry once had v in bf16, a launch that never runs)."""
    import stmd_fast.objectives as objectives
    from stmd_fast.kernels.compile_matrix import _source, entries
    from stmd_fast.kernels.meanflow_loss import meanflow_loss_reference
    from stmd_fast.models import NetConfig, build_net

    seen = {}

    def spy(u, dudt, v, h, c, p):
        seen.update(u=u.dtype, dudt=dudt.dtype, v=v.dtype, h=h.dtype)
        return meanflow_loss_reference(u, dudt, v, h, c, p)

    monkeypatch.setattr(objectives, "meanflow_loss", spy)
    torch.manual_seed(0)
    net = build_net(NetConfig(kind="mlp", width=32, depth=2, time_freqs=16), (3,), True, 3)
    x0 = torch.randn(8, 3)
    noise = objectives.draw_noise(x0, objectives.ObjectiveConfig(), torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):  # as engine.make_train_step
        objectives.compute_loss("stmd", net, x0, noise, objectives.ObjectiveConfig())
    entry = next(e for e in entries() if e["kernel"] == "meanflow_loss delta" and e["precision"] == precision)
    signature = _source(entry)[1]
    names = {torch.float32: "*fp32", torch.bfloat16: "*bf16"}
    assert {arg: signature[f"{arg}_ptr"] for arg in seen} == {arg: names[dtype] for arg, dtype in seen.items()}
