"""The benchmarks' smoke runs (what CI can run), and the FLOP count behind their MFU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def run_smoke(script: str, printed: list[str] | None = None) -> dict:
    """The JSON line a --smoke run ends with; printed, if given, receives the lines before it."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke"], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *before, last = proc.stdout.strip().splitlines()
    if printed is not None:
        printed.extend(before)
    return json.loads(last)  # each benchmark ends with one JSON line


class LinearNet(nn.Module):
    """u = W z (bias-free): every FLOP of a step has a closed form."""

    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, dim, bias=False)

    def forward(self, z, cond, times):
        return self.lin(z)


def test_step_flops_count_forward_tangent_and_backward():
    from train_step import count_step_flops

    from stmd_fast.models import use_tangent_layers
    from stmd_fast.objectives import ObjectiveConfig, compute_loss, draw_noise, flow_matching_loss

    batch, dim = 8, 32
    net = LinearNet(dim)
    x0 = torch.randn(batch, dim)
    noise = draw_noise(x0, ObjectiveConfig(), torch.Generator().manual_seed(0))  # 2 of the 8 rows have r < t
    matmul = 2 * batch * dim * dim

    def meanflow(full_batch_jvp):
        return lambda x, n: compute_loss("meanflow", net, x, n, ObjectiveConfig(), full_batch_jvp=full_batch_jvp)

    # plain nn.Linear under a full-batch JVP: forward, tangent W v, and x @ 0 for the weight's
    # materialised zero tangent, then the weight gradient (the input needs none) = 4 matmuls
    assert count_step_flops(meanflow(True), x0, noise) == 4 * matmul
    # the JVP on the 2 rows with r < t only: those three products on a quarter of the batch, a plain
    # forward on the rest, the weight gradient on all
    assert count_step_flops(meanflow(False), x0, noise) == (3 / 4 + 3 / 4 + 1) * matmul
    use_tangent_layers(net)  # what build_net does: the zero-tangent matmul is gone
    assert count_step_flops(meanflow(True), x0, noise) == 3 * matmul
    assert count_step_flops(meanflow(False), x0, noise) == (2 / 4 + 3 / 4 + 1) * matmul
    # flow matching: forward and weight gradient, no tangent
    assert count_step_flops(lambda x, n: flow_matching_loss("meanflow", net, x, n), x0, noise) == 2 * matmul


def test_flow_matching_loss_is_the_objective_at_r_equal_t():
    from stmd_fast.models import NetConfig, build_net
    from stmd_fast.objectives import ObjectiveConfig, compute_loss, draw_noise, flow_matching_loss

    torch.manual_seed(0)
    net = build_net(NetConfig(kind="mlp", width=16, depth=1, time_freqs=8), (3,), True, 3)
    cfg = ObjectiveConfig(flow_matching_fraction=1.0, adaptive_p=0.0)  # r = t, plain squared error
    x0 = torch.randn(10, 3)
    noise = draw_noise(x0, cfg, torch.Generator().manual_seed(1))
    loss, _ = compute_loss("stmd", net, x0, noise, cfg)
    mse, _ = flow_matching_loss("stmd", net, x0, noise)
    torch.testing.assert_close(loss, 3 * mse)  # sum over the 3 dimensions vs mean over them
    with pytest.raises(ValueError, match="r = t step"):
        flow_matching_loss("ddpm", net, x0, noise)


@pytest.mark.slow
def test_train_step_smoke():
    result = run_smoke("train_step.py")
    rows = {(r["variant"], r["objective"]): r for r in result["rows"]}
    assert set(rows) == {(v, o) for v in ("eager fp32", "compiled fp32") for o in ("stmd", "flow matching")} | {
        ("public recipe", "stmd")}
    assert result["environment"]["torch"] == torch.__version__ and result["interleaved"]
    # what the result came from: the command and the commit (saved results had neither), the CPU by its model
    import common

    env = result["environment"]
    assert env["command"].startswith("python ") and "train_step.py --smoke" in env["command"]
    if (ROOT / ".git").exists():  # a checkout (CI's clone): its commit; outside one, None
        assert len(env["commit"]) == 40 and isinstance(env["uncommitted"], list)
    assert env["device"].startswith(f"{common.cpu_model()} CPU, ")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():  # the model, not the architecture
        assert not env["device"].startswith(("x86_64 CPU", "aarch64 CPU"))
    assert result["peak_tflops"] == {}  # a smoke run's tiny matmul would undershoot the peak
    for (variant, objective), row in rows.items():
        assert row["ms_per_step"] > 0 and row["img_per_s"] == pytest.approx(16 / (row["ms_per_step"] * 1e-3))
        assert row["tflops"] > 0 and row["mfu_pct"] is None  # so no MFU (once 500%)
        assert row["compute"] == "fp32" and row["mfu_spec_pct"] is None  # a CPU has no data-sheet peak here
        assert row["peak_mem_mib"] is None  # a CPU's only peak is the process's, never lower for a later variant
    # every variant's steps see the same batch and noise (the FLOP count once drew from one variant's
    # generator): the first step's loss, taken before any update, agrees across engines
    firsts = [rows[(v, "stmd")]["loss_first"] for v in ("eager fp32", "compiled fp32", "public recipe")]
    assert firsts == pytest.approx([firsts[0]] * 3, rel=1e-4)
    assert all(row["error_first"] > 0 for row in rows.values())  # the squared error beside the adaptive loss
    # the public recipe's EMA (every 16 steps) is timed apart and counted per step: none escapes the median
    assert rows[("public recipe", "stmd")]["ema_ms_per_update"] > 0
    # the JVP step does more work than the flow-matching step of the same network, and the public
    # recipe's full-batch JVP more than ours on the r < t rows
    ours, public = rows[("compiled fp32", "stmd")], rows[("public recipe", "stmd")]
    assert ours["gflop_per_step"] > rows[("eager fp32", "flow matching")]["gflop_per_step"]
    assert public["gflop_per_step"] > ours["gflop_per_step"]
    assert rows[("eager fp32", "stmd")]["speedup_vs_eager"] == 1.0
    assert ours["speedup_vs_public"] == pytest.approx(public["ms_per_step"] / ours["ms_per_step"])
    assert public["speedup_vs_public"] is None
    for row in rows.values():  # every step's loss was kept: 2 warm-up + 3 timed, all finite
        assert row["loss_steps"] == 5 and row["loss_finite"] and row["first_step_s"] > 0
    # the first step of a compiled variant compiles: it takes longer than a whole timed step
    assert ours["first_step_s"] * 1e3 > ours["ms_per_step"]


def test_mfu_is_never_reported_above_100_percent(capsys):
    """A step faster than the measured peak means the peak was under-measured (a small matmul, bf16 on a
    CPU): no MFU and a warning, rather than an impossible 500%."""
    from train_step import add_rates, mfu_text

    row = {"variant": "compiled fp32", "objective": "stmd", "compute": "tf32", "gflop_per_step": 2.0}
    add_rates(row, [1.0, 1.0, 1.0], 16, peak=4.0)  # 2 GFLOP in 1 ms: 2 TFLOP/s
    assert row["tflops"] == pytest.approx(2.0) and row["mfu_pct"] == pytest.approx(50.0)
    assert row["mfu_spec_pct"] is None and capsys.readouterr().out == ""
    add_rates(row, [1.0, 1.0, 1.0], 16, peak=4.0, spec=8.0, extra_ms=1.0)  # 1 ms of EMA per step on top
    assert row["ms_per_step"] == 2.0 and row["tflops"] == pytest.approx(1.0)
    assert row["mfu_pct"] == pytest.approx(25.0) and row["mfu_spec_pct"] == pytest.approx(12.5)
    add_rates(row, [1.0, 1.0, 1.0], 16, peak=1.0)
    assert row["tflops"] == pytest.approx(2.0) and row["mfu_pct"] is None and mfu_text(row["mfu_pct"]) == "n/a"
    assert "under-measured" in capsys.readouterr().out
    add_rates(row, [1.0], 16, peak=None)  # --smoke: no peak measured
    assert row["mfu_pct"] is None


@pytest.fixture(scope="module")
def gmm_run(tmp_path_factory) -> Path:
    from stmd_fast.train import main as train_main

    run = tmp_path_factory.mktemp("bench") / "gmm-stmd"
    assert train_main(["--preset", "gmm", "--batch-size", "16", "--steps", "1", "--device", "cpu",
                       "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("script, argv, words", [
    ("loss_per_s.py", ["/nonexistent"], ["/nonexistent does not exist"]),
    ("loss_per_s.py", ["GMM_RUN", "--num", "8"], ["gmm preset", "--preset digits"]),
    ("sample.py", ["--ckpt", "/nonexistent", "--smoke"], ["/nonexistent does not exist"]),
    ("precision.py", ["--ckpt", "/nonexistent"], ["/nonexistent does not exist"]),
    ("precision.py", ["--ckpt", "GMM_RUN"], ["the gmm preset (vectors)", "image preset"]),
], ids=["loss-missing", "loss-gmm", "sample-missing", "precision-missing", "precision-gmm"])
def test_bench_scripts_refuse_bad_input_in_one_line(capsys, gmm_run, script, argv, words):
    """In-process (importing each script's main): one line 'error: ...', exit code 2, no traceback."""
    import importlib

    main = importlib.import_module(script.removesuffix(".py")).main
    assert main([str(gmm_run) if a == "GMM_RUN" else a for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert all(word in lines[0] for word in words), lines[0]
    assert "--data or latents" not in lines[0]  # precision.py once said so of every non-image run


def test_train_step_sequential_keeps_each_row_as_it_is_measured(tmp_path, monkeypatch):
    """--sequential (what gpu_check runs): each row reaches $STMD_BENCH_JSONL right after its own
    steps, before the next variant is built, so a run killed at its time limit keeps them."""
    import train_step

    jsonl = tmp_path / "rows.jsonl"
    monkeypatch.setenv("STMD_BENCH_JSONL", str(jsonl))
    seen_before_build = []
    build = train_step.build_runner

    def spying_build(name, objective, *args):
        seen_before_build.append(jsonl.read_text().count("/measured") if jsonl.exists() else 0)
        return build(name, objective, *args)

    monkeypatch.setattr(train_step, "build_runner", spying_build)
    train_step.main(["--preset", "gmm", "--batch", "8", "--variants", "eager fp32", "--sequential", "--warmup", "1",
                     "--iters", "2", "--device", "cpu", "--no-save"])
    assert seen_before_build == [0, 1]  # the stmd row was kept before the flow-matching runner was built
    measured = [json.loads(x) for x in jsonl.read_text().splitlines() if "/measured" in x]
    assert [m["row"]["objective"] for m in measured] == ["stmd", "flow matching"]
    assert all(m["row"]["ms_per_step"] > 0 and m["row"]["loss_steps"] == 3 for m in measured)


@pytest.mark.slow
def test_sample_smoke():
    result = run_smoke("sample.py")
    nfes = sorted({r["nfe"] for r in result["rows"]})
    assert nfes == [1, 2, 4, 8]  # stmd's (N, M) grid
    assert {r["variant"] for r in result["rows"]} == {"eager fp32", "compiled fp32"}
    assert all(r["peak_mem_mib"] is None for r in result["rows"])  # on a CPU: not measurable per variant


@pytest.mark.slow
def test_kernels_smoke():
    printed = []
    result = run_smoke("kernels.py", printed)
    kernels = {r["kernel"] for r in result["rows"]}
    # the two memory-bound kernels, and attention at three shapes, forward + tangent and with backward
    assert len(kernels) == 2 + 2 * 3 and result["copy_gbps"] > 0
    # the names keep the full shapes ("DiT-M/2 L1024"): each row says the tiny size it timed
    assert result["rows"][-1]["size"] == [2, 2, 16, 16] and "2x2x16x16" in printed[-1] \
        and any(line.startswith("smoke: every case at a tiny size") for line in printed)
    assert all(r["ms"] > 0 for r in result["rows"])
    for row in result["rows"]:  # each kernel's rate against Inductor's fusion of its reference, same run
        inductor = next(r for r in result["rows"] if r["kernel"] == row["kernel"] and r["impl"].startswith("inductor"))
        assert row["speedup_vs_inductor"] == pytest.approx(inductor["ms"] / row["ms"])


def test_precision_smoke_measures_bf16_against_float64():
    result = run_smoke("precision.py")
    rows = {r["precision"]: r for r in result["rows"]}
    assert rows["fp32"]["rel_err_target"] < 1e-5  # fp32 agrees with float64 to rounding
    assert rows["bf16 autocast"]["rel_err_target"] > 10 * rows["fp32"]["rel_err_target"]  # bf16 is measurably coarser


def test_train_step_compile_report_says_where_the_compile_time_went(capsys):
    import train_step

    train_step.main(["--preset", "gmm", "--batch", "8", "--variants", "compiled fp32", "--no-flow-matching",
                     "--warmup", "1", "--iters", "1", "--device", "cpu", "--no-save", "--compile-report"])
    out = capsys.readouterr().out
    assert "TorchDynamo compilation metrics" in out and "bytecode_tracing" in out
    row = json.loads(out.strip().splitlines()[-1])["rows"][0]
    assert row["first_step_s"] * 1e3 > row["ms_per_step"]  # the first step compiled


def test_compile_only_runs_one_step_per_variant_and_times_nothing(capsys, monkeypatch, tmp_path):
    """--compile-only (what gpu_check's warmers run): the first step of each run it is asked for,
    nothing timed or recorded; --flow-matching-only picks the flow-matching runs."""
    import sample
    import train_step

    monkeypatch.setenv("STMD_BENCH_JSONL", str(tmp_path / "rows.jsonl"))
    assert train_step.main(["--preset", "gmm", "--batch", "8", "--variants", "eager fp32", "--flow-matching-only",
                            "--compile-only", "--device", "cpu", "--no-save"]) == 0
    out = capsys.readouterr().out
    assert "eager fp32 | flow matching: first step" in out and "| stmd" not in out and "ms/step" not in out
    assert "(eager: nothing compiled)" in out and "Inductor's cache" not in out  # it said its graphs were cached
    assert "compile only: one step per variant" in out and "interleaved" not in out  # its header said "10 + 30 steps"
    assert sample.main(["--preset", "gmm", "--batch", "8", "--variants", "eager fp32,compiled fp32",
                        "--compile-only", "--device", "cpu", "--no-save"]) == 0
    out = capsys.readouterr().out
    assert "compiled fp32: first call" in out and "eager fp32: eager, nothing to compile" in out and "NFE" not in out
    assert not (tmp_path / "rows.jsonl").exists()  # nothing measured, nothing recorded
    assert run_main("train_step.py", ["--preset", "gmm", "--no-flow-matching", "--flow-matching-only",
                                      "--compile-only"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def run_main(script: str, argv: list[str]) -> int:
    """A bench script's main in-process: its exit code, whether it returned it or argparse exited."""
    import importlib

    try:
        return importlib.import_module(script.removesuffix(".py")).main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize("script, argv, flag", [
    ("sample.py", ["--compile"], "--compile"),                        # once ran as --compile-only
    ("train_step.py", ["--compile", "--preset", "gmm"], "--compile"),
    ("train_step.py", ["--seq"], "--seq"),
    ("precision.py", ["--smok"], "--smok"),
    ("kernels.py", ["--smo"], "--smo"),
    ("data.py", ["/nonexistent", "--smo"], "--smo"),
    ("loss_per_s.py", ["/nonexistent", "--nu", "8"], "--nu"),
], ids=["sample", "train-step-compile", "train-step-seq", "precision", "kernels", "data", "loss-per-s"])
def test_bench_flags_take_no_abbreviations(capsys, script, argv, flag):
    assert run_main(script, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"unrecognized arguments: {flag}" in lines[0], lines


@pytest.mark.parametrize("script, argv, flags", [
    ("sample.py", ["--smoke", "--preset", "digits", "--batch", "4"], "--preset, --batch"),  # once measured gmm at 32
    ("precision.py", ["--smoke", "--batch", "256"], "--batch"),       # its default, given: still not what runs
    ("precision.py", ["--smoke", "--ckpt", "/nonexistent"], "--ckpt"),  # once dropped the checkpoint
    ("train_step.py", ["--smoke", "--variants", "eager fp32", "--warmup", "4"], "--warmup, --variants"),
    ("kernels.py", ["--smoke", "--iters", "50", "--device", "cpu"], "--iters"),  # cpu is what --smoke sets
    ("data.py", ["/nonexistent", "--smoke", "--workers", "2", "--seconds", "3"], "--workers, --seconds"),
], ids=["sample", "precision-default", "precision-ckpt", "train-step", "kernels", "data"])
def test_smoke_refuses_the_flags_it_would_override(capsys, script, argv, flags):
    assert run_main(script, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"--smoke sets {flags} itself" in lines[0], lines


def test_smoke_with_dit_names_smoke_not_a_preset_never_given(capsys):
    """--smoke --dit DiT-S/2 blamed "--preset gmm", which --smoke had set: adding a --preset then hit --smoke."""
    assert run_main("train_step.py", ["--smoke", "--no-save", "--dit", "DiT-S/2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--smoke times the gmm MLP, which --dit would replace" in lines[0], lines


def test_smoke_takes_the_flags_it_does_not_change():
    """--smoke --no-save --device cpu asks for what --smoke does anyway: accepted, and --smoke's values set."""
    from common import apply_smoke, at_least, parser

    p = parser("test.py", "")
    p.add_argument("--batch", type=at_least(1), default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true")
    argv = ["--smoke", "--device", "cpu"]
    args = p.parse_args(argv)
    apply_smoke(p, argv, args, {"batch": 32, "device": "cpu"})
    assert (args.batch, args.device) == (32, "cpu")
    args = p.parse_args(["--batch", "8"])  # no --smoke: nothing changed
    apply_smoke(p, ["--batch", "8"], args, {"batch": 32, "device": "cpu"})
    assert (args.batch, args.device) == (8, "auto")


@pytest.mark.parametrize("script, argv, words", [
    ("train_step.py", ["--batch", "0"], ["--batch: must be at least 1, got 0"]),  # once the preset's batch
    ("train_step.py", ["--iters", "0"], ["--iters: must be at least 1"]),         # once "no median for empty data"
    ("train_step.py", ["--warmup", "0"], ["--warmup: must be at least 1"]),
    ("train_step.py", ["--preset", "gmm", "--batch", "7", "--device", "cpu"], ["--batch 7", "multiple of 2", "6 or 8"]),
    ("train_step.py", ["--preset", "gmm", "--dit", "DiT-S/2", "--device", "cpu"], ["--dit", "gmm", "cifar10"]),
    ("train_step.py", ["--preset", "digits", "--dit", "DiT-Q/2", "--device", "cpu"], ["unknown DiT 'DiT-Q/2'"]),
    ("sample.py", ["--batch", "0"], ["--batch: must be at least 1"]),             # once img_per_s 0.0
    ("sample.py", ["--iters", "0"], ["--iters: must be at least 1"]),
    ("sample.py", ["--warmup", "0"], ["--warmup: must be at least 1"]),          # once timed the compile
    # nothing left to time: refused before the peak is measured (once a ZeroDivisionError after it)
    ("train_step.py", ["--method", "ddpm", "--variants", "public recipe", "--device", "cpu"],
     ["nothing to time", "public recipe is a Mean Flow engine"]),
    ("train_step.py", ["--method", "ddpm", "--flow-matching-only", "--device", "cpu"],
     ["nothing to time", "--method ddpm has none"]),
    ("train_step.py", ["--preset", "gmm", "--variants", "compiled bf16 + triton", "--device", "cpu"],
     ["nothing to time", "triton variant needs CUDA"]),
    ("train_step.py", ["--variants", " , "], ["--variants: none given"]),
    ("sample.py", ["--variants", " "], ["--variants: none given"]),
    ("sample.py", ["--variants", "compiled bf16 + triton", "--device", "cpu"], ["nothing to time", "needs CUDA"]),
    ("data.py", ["/nonexistent", "--seconds", "0"], ["--seconds: must be a finite number above 0"]),
    ("data.py", ["/nonexistent", "--seconds", "nan"], ["--seconds: must be a finite number above 0"]),
    ("data.py", ["/nonexistent", "--workers", "-1"], ["--workers: worker counts are at least 0"]),
    ("data.py", ["/nonexistent", "--workers", "1,x"], ["--workers: comma-separated whole numbers"]),
    ("data.py", ["/nonexistent", "--batch", "0"], ["--batch: must be at least 1"]),
    ("data.py", ["/nonexistent", "--step-ms", "-5"], ["--step-ms: must be a finite number above 0"]),
    ("kernels.py", ["--warmup", "0"], ["--warmup: must be at least 1"]),          # once timed the autotuning
    ("kernels.py", ["--iters", "0"], ["--iters: must be at least 1"]),
    ("precision.py", ["--batch", "0"], ["--batch: must be at least 1"]),
    ("loss_per_s.py", ["/nonexistent", "--num", "0"], ["--num: must be at least 1"]),
    # fourteenth round of probes: a repeat built and compiled a variant twice for one row; a --ckpt run's
    # --method was ignored; diffusion times outside (0, 1] (and nan) were measured
    ("train_step.py", ["--variants", "eager fp32,eager fp32", "--device", "cpu"], ["eager fp32 given twice"]),
    ("sample.py", ["--variants", "eager fp32, eager fp32"], ["eager fp32 given twice"]),
    ("sample.py", ["--ckpt", "/nonexistent", "--method", "ddpm"], ["--ckpt times the checkpoint's own", "drop --method"]),
    ("loss_per_s.py", ["/nonexistent", "--s", "0.5", "2"], ["--s: must be a diffusion time in (0, 1], got 2"]),
    ("loss_per_s.py", ["/nonexistent", "--s", "nan"], ["--s: must be a diffusion time in (0, 1], got nan"]),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bench_scripts_refuse_nonsense_values_in_one_line(capsys, script, argv, words):
    assert run_main(script, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], lines
    assert all(word in lines[0] for word in words), lines[0]
    assert "--flow-matching-fraction" not in lines[0]  # train_step.py has no such flag


def test_kernel_time_is_the_device_events_only():
    """kernel_ms's sum: the CUDA events' own time (kernels, copies); the host events around them, which hold
    Python and launch time, are left out."""
    from types import SimpleNamespace

    from common import kernel_us
    from torch.autograd import DeviceType

    def event(device_type, us):
        return SimpleNamespace(device_type=device_type, time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [event(DeviceType.CPU, 900.0), event(DeviceType.CUDA, 12.5), event(DeviceType.CUDA, 7.5)]
    assert kernel_us(events) == 20.0


def test_mfu_peaks_follow_the_rows_compute():
    """fp32 rows against the fp32 (on CUDA with TF32 on: TF32) peak, bf16 rows against bf16's; the data
    sheet's peak by the GPU's name, the most specific name first."""
    import common

    cpu = torch.device("cpu")
    assert common.matmul_compute(cpu, "bf16") == "bf16" and common.matmul_compute(cpu, "fp32") == "fp32"
    assert common.spec_tflops(None, "bf16") is None  # no GPU
    for name, bf16, tf32 in (("NVIDIA H200", 989.4, 494.7), ("NVIDIA H100 PCIe", 756.0, 378.0),
                             ("NVIDIA H100 80GB HBM3", 989.4, 494.7), ("NVIDIA A100-SXM4-80GB", 312.0, 156.0),
                             ("NVIDIA H100 NVL", 835.5, 417.5), ("NVIDIA H200 NVL", 835.5, 417.5),
                             ("NVIDIA GeForce RTX 4090", 165.2, 82.6), ("NVIDIA GeForce RTX 4090 D", None, None),
                             ("NVIDIA GeForce RTX 4090 Laptop GPU", None, None),
                             ("NVIDIA GeForce RTX 3090", None, None),
                             ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None, None)):  # a slice: not its GPU's peak
        assert (common.spec_tflops(name, "bf16"), common.spec_tflops(name, "tf32")) == (bf16, tf32), name


def test_a_result_saved_again_the_same_day_keeps_the_earlier_one(tmp_path, monkeypatch, capsys):
    """train_step saves under train_step/<preset>/<method> whatever its variants: a second run that day
    (other variants, --flow-matching-only) replaced the first's table without a word."""
    import common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    env = {"device": "Test GPU", "date": "2026-12-02"}
    for rows in (["stmd"], ["flow matching"], ["again"]):
        common.finish("train_step/gmm/stmd", {"environment": env, "rows": rows}, save=True)
    saved = json.loads((tmp_path / "test-gpu-2026-12-02.json").read_text())
    assert saved["train_step/gmm/stmd"]["rows"] == ["again"]
    assert saved["train_step/gmm/stmd#1"]["rows"] == ["stmd"] and saved["train_step/gmm/stmd#2"]["rows"] == ["flow matching"]
    assert "the earlier result under 'train_step/gmm/stmd' kept as 'train_step/gmm/stmd#2'" in capsys.readouterr().out


def test_benchmarks_finishing_together_each_keep_their_results(tmp_path):
    """The day file was read, merged and written back unlocked, through one temporary name for every process:
    two benchmarks saving together lost results, and one ended in a traceback after its whole run."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import common; from pathlib import Path; "
            "common.RESULTS_DIR = Path(sys.argv[2]); env = {'device': 'Race GPU', 'date': '2026-12-03'}; "
            "[common.finish(f'{sys.argv[3]}/{i}', {'environment': env, 'rows': [i]}, save=True) for i in range(25)]")
    writers = [subprocess.Popen([sys.executable, "-c", code, str(ROOT / "bench"), str(tmp_path), who],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for who in "AB"]
    assert all(w.wait(timeout=120) == 0 for w in writers), [w.stderr.read() for w in writers]
    saved = json.loads((tmp_path / "race-gpu-2026-12-03.json").read_text())
    assert sorted(saved) == sorted(f"{who}/{i}" for who in "AB" for i in range(25))


@pytest.mark.parametrize("damage", ["json", "folder"])
def test_a_result_that_cannot_be_saved_is_still_printed_and_the_error_names_the_file(tmp_path, monkeypatch, capsys,
                                                                                     damage):
    """A damaged day file ended the run in a bare JSON parse error, a file where bench/results belongs in a
    traceback: either way after the table, with the result's JSON line never printed."""
    import common

    env = {"device": "Test GPU", "date": "2026-12-03"}
    day = tmp_path / "results" / "test-gpu-2026-12-03.json"
    if damage == "json":
        day.parent.mkdir()
        day.write_text('{"x": {')
    else:
        day.parent.write_text("a file")
    monkeypatch.setattr(common, "RESULTS_DIR", day.parent)
    with pytest.raises(SystemExit) as stop:
        common.finish("train_step/gmm/stmd", {"environment": env, "rows": [1]}, save=True)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == [1]  # printed all the same
    assert "is not saved" in str(stop.value) and str(day if damage == "json" else day.parent) in str(stop.value)
    if damage == "json":
        assert day.read_text() == '{"x": {'  # not rewritten: whatever it held is not lost either


def test_time_samplers_script_has_help_and_checks_its_arguments_before_any_run(tmp_path):
    """--help became the SEED (a run named seed--help) and an unknown setting stopped the script with bash's
    "unbound variable", after the settings before it had trained for hours."""
    script = ROOT / "bench" / "time_samplers.sh"

    def run(*args):
        return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)

    shown = run("--help")
    assert shown.returncode == 0 and shown.stdout.startswith("The time-sampler experiment") and "Usage:" in shown.stdout
    for args, words in [(["--seed", "1"], ["SEED --seed", "a number"]), (["0", "A", "Z"], ["setting Z", "Dq ddpm"]),
                        (["gmm1", "Dq"], ["setting Dq"])]:
        result = run(*args)
        assert result.returncode == 2 and result.stdout == "", (args, result)
        assert len(result.stderr.splitlines()) == 1 and all(word in result.stderr for word in words), result.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


def test_time_samplers_script_reruns_an_interrupted_sweep(tmp_path):
    """The script skipped a sweep whose results.json existed, but a sweep writes it after its first setting
    ("complete": false): an interrupted sweep was never finished, and its tables held partial results."""
    from stmd_fast.evaluate import write_json

    script = (ROOT / "bench" / "time_samplers.sh").read_text()
    swept = script[script.index("swept() {"):script.index("\n}\n", script.index("swept() {")) + 3]
    for complete in (False, True):
        write_json(tmp_path / "results.json", {"complete": complete, "rows": [{"value": 1.0}]})
        result = subprocess.run(["bash", "-c", swept + f"swept {tmp_path} && echo skip || echo run"],
                                capture_output=True, text=True, timeout=60)
        assert result.stdout.strip() == ("skip" if complete else "run"), result
    result = subprocess.run(["bash", "-c", swept + f"swept {tmp_path / 'none'} || echo run"], capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.strip() == "run"


def test_loss_per_s_pulls_relative_to_the_largest_s_in_any_order(tmp_path, capsys):
    """The pull was relative to the last --s given (1 by default), whatever it was; the header said s = 1."""
    from stmd_fast.train import main as train_main

    run = tmp_path / "digits"
    assert train_main(["--preset", "digits", "--steps", "1", "--batch-size", "8", "--sample-every", "0",
                       "--device", "cpu", "--out", str(run)]) == 0
    capsys.readouterr()
    assert run_main("loss_per_s.py", [str(run), "--s", "1.0", "0.25", "--num", "16"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].split() == ["s", "l,", "r", "<", "t", "l,", "r", "=", "t", "pull", "p=0.75", "pull", "p=0.5"]
    rows = {float(line.split()[0]): line.split() for line in table[1:]}
    assert set(rows) == {0.25, 1.0} and rows[1.0][3] == "1.00"  # the reference row pulls 1
    l_small, l_top = float(rows[0.25][1]), float(rows[1.0][1])
    assert float(rows[0.25][3]) == pytest.approx((l_small / l_top) ** -0.25, abs=0.006)


def test_a_large_network_timed_on_a_cpu_is_said_to_take_long_before_it_starts(capsys, monkeypatch):
    """train_step.py with no flags on a CPU started the hours-long cifar10 benchmark without a word."""
    import train_step

    class Started(Exception):
        pass

    def started(device):
        raise Started

    monkeypatch.setattr(train_step, "environment", started)  # the first thing after the checks
    with pytest.raises(Started):
        train_step.main(["--device", "cpu", "--no-save"])
    assert "note: timing the 38M-parameter cifar10 network at batch 64 on a CPU" in capsys.readouterr().err
    with pytest.raises(Started):
        train_step.main(["--preset", "digits", "--device", "cpu", "--no-save"])
    assert "note:" not in capsys.readouterr().err


def test_gpu_telemetry_keeps_the_readings_a_gpu_answers(monkeypatch):
    """A MIG slice answers NOT_SUPPORTED for utilisation: the sampling thread died after one power reading and
    summary() took the median of no utilisation, so the benchmark lost the row it had just measured."""
    import time
    import types

    import common

    class NVMLError(Exception):
        pass

    def not_supported(handle):
        raise NVMLError("Not Supported")

    fake = types.SimpleNamespace(NVMLError=NVMLError, nvmlInit=lambda: None, nvmlDeviceGetUtilizationRates=not_supported,
                                 nvmlDeviceGetPowerUsage=lambda handle: 250_000)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(common, "nvml_handle", lambda pynvml, device: "handle")
    with common.GpuTelemetry(torch.device("cuda"), period_s=0.001, window_s=0.0) as telemetry:
        time.sleep(0.05)
    assert len(telemetry.power_w) > 1 and telemetry.util_pct == []
    assert telemetry.summary() == {"power_w": 250.0}


def test_gpu_telemetry_reports_nothing_for_a_block_shorter_than_nvmls_window(monkeypatch):
    """NVML averages power and utilisation over up to a second: the H200 read 0% busy for 0.3 s of back-to-back
    steps, the period before them. Readings start once the window lies inside the block."""
    import time
    import types

    import common

    readings = []
    fake = types.SimpleNamespace(NVMLError=RuntimeError, nvmlInit=lambda: None,
                                 nvmlDeviceGetUtilizationRates=lambda handle: types.SimpleNamespace(gpu=0),
                                 nvmlDeviceGetPowerUsage=lambda handle: readings.append(time.monotonic()) or 250_000)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(common, "nvml_handle", lambda pynvml, device: "handle")
    with common.GpuTelemetry(torch.device("cuda"), period_s=0.001, window_s=0.5) as telemetry:
        time.sleep(0.1)
    assert telemetry.summary() == {} and readings == []
    start = time.monotonic()
    with common.GpuTelemetry(torch.device("cuda"), period_s=0.001, window_s=0.2) as telemetry:
        time.sleep(0.4)
    assert telemetry.summary() == {"power_w": 250.0, "gpu_util_pct": 0} and min(readings) - start >= 0.2
