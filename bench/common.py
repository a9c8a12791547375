"""Shared by the benchmarks: timing with warm-up and synchronisation, measured peaks, GPU
telemetry, the printed table, the final JSON line and bench/results/<device>-<date>.json."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from stmd_fast.cli import Parser

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class HelpWithDefaults(argparse.RawDescriptionHelpFormatter):
    """--help states each option's default, as the package's commands do, unless its text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if action.option_strings and default is not None and default is not False and default is not argparse.SUPPRESS \
                and "default" not in text:  # by identity: a default of 0 (== False) is said too
            text += " [default: %(default)s]"
        return text


REPO = Path(__file__).resolve().parents[1]


def parser(script: str, doc: str) -> argparse.ArgumentParser:
    """The benchmarks' command line: stmd_fast.cli.Parser, so a bad flag ends in one line and no prefix of a
    flag stands for it (plain argparse took `--compile` for `--compile-only`)."""
    return Parser(prog=f"bench/{script}", description=doc, formatter_class=HelpWithDefaults)


def at_least(low: int):
    """argparse type: a count of at least `low`, refused at parse time (a batch of 0 measured nothing)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return parse


def positive(text: str) -> float:
    """argparse type: a finite time above 0 (0 s divided by zero, nan never ended)."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


positive.__name__ = "float"


def diffusion_time(text: str) -> float:
    """argparse type: a diffusion time s in (0, 1] (2, -1 and nan were measured as if they were)."""
    value = float(text)
    if not 0 < value <= 1:  # false for nan too
        raise argparse.ArgumentTypeError(f"must be a diffusion time in (0, 1], got {text}")
    return value


diffusion_time.__name__ = "float"


def given_flags(p: argparse.ArgumentParser, argv: list[str] | None, names) -> dict:
    """{dest: value} of the flags among `names` given on the command line, even at their default value: a
    second parse with those flags preset to a marker tells them from defaults."""
    unset = object()
    given = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(names, unset)))
    return {name: getattr(given, name) for name in names if getattr(given, name) is not unset}


def apply_smoke(p: argparse.ArgumentParser, argv: list[str] | None, args, smoke: dict) -> None:
    """With --smoke, set the flags of `smoke` (dest -> value) to its values. One the user also gave with
    another value is refused (one line naming them) rather than silently dropped, even a default given
    explicitly (given_flags)."""
    if not args.smoke:
        return
    given = given_flags(p, argv, smoke)
    clash = [name for name, value in smoke.items() if name in given and given[name] != value]
    if clash:
        p.error(f"--smoke sets {', '.join('--' + name.replace('_', '-') for name in clash)} itself: drop "
                f"{'it' if len(clash) == 1 else 'them'}, or drop --smoke")
    for name, value in smoke.items():
        setattr(args, name, value)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Wall time of each of `iters` calls after `warmup` calls, synchronised around every call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)  # note: a sync per call, so each time is the call's own
        times.append(1e3 * (time.perf_counter() - start))
    return times


def kernel_us(events) -> float:
    """Microseconds of device work (kernels, copies, sets) in a profiler's events: the CUDA ones only,
    whose time is the GPU's own (the host events around them hold Python and launch time)."""
    from torch.autograd import DeviceType
    return sum(e.time_range.elapsed_us() for e in events if e.device_type == DeviceType.CUDA)


def kernel_ms(fn, device: torch.device, iters: int) -> float | None:
    """GPU time of the work one call of `fn` launches (the mean over `iters` calls, torch.profiler): a
    short call's wall time is mostly the host's (Python, torch.func.jvp's decompositions, launches), which
    says what a call costs eagerly but not how fast its kernels are. None on a CPU, or when the profiler
    fails (said in a note: the wall times still stand)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    try:
        synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            synchronize(device)
        us = kernel_us(prof.events())
    except Exception as err:  # a profiler that cannot attach (another one running, no CUPTI)
        print(f"note: no kernel time from torch.profiler ({type(err).__name__}: {err})", flush=True)
        return None
    return us / iters / 1e3 if us > 0 else None


def median(values: list[float]) -> float:
    return statistics.median(values)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} CPU, {torch.get_num_threads()} threads"


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else the architecture: x86_64 names no machine."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def code_version() -> dict:
    """The commit measured and the files changed since (a tree can differ from its .git: the commit alone would
    misname the code measured); None for both outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                 capture_output=True, text=True, check=True).stdout.splitlines()
        return {"commit": commit, "uncommitted": [line[3:] for line in changed]}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "uncommitted": None}


def environment(device: torch.device) -> dict:
    """What a result needs beside it to mean anything: hardware, versions, the code and the command, date."""
    info = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat(),
            "command": shlex.join(["python", *sys.argv]), **code_version()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def trained_on(model) -> str:
    """What a checkpoint was trained on, for messages: its --data, or its preset and what that makes."""
    config = model.meta["config"]
    if config["data"] is not None:
        return f"--data {config['data']} ({model.data_kind}s)"
    return f"the {config['preset']} preset ({model.data_kind}s)"


# Dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, TFLOP/s, by a name's substring (the first
# that matches, so each variant precedes its family's name): the usual denominator of MFU. The NVL cards (PCIe,
# lower clocks) peak below the SXM parts; the GeForce figures are with FP32 accumulate, what torch's bf16 matmuls
# use. A variant whose sheet is not here maps to {} (unknown), never to its family's peak: the RTX 4090 D has
# fewer SMs than the 4090, and
# a laptop part ("RTX 4090 Laptop GPU") than its desktop namesake. The measured peak (below) is what this machine reaches.
SPEC_DENSE_TFLOPS = {"Laptop": {}, "H100 PCIe": {"bf16": 756.0, "tf32": 378.0}, "H100 NVL": {"bf16": 835.5, "tf32": 417.5},
                     "H100": {"bf16": 989.4, "tf32": 494.7}, "H200 NVL": {"bf16": 835.5, "tf32": 417.5},
                     "H200": {"bf16": 989.4, "tf32": 494.7}, "A100": {"bf16": 312.0, "tf32": 156.0},
                     "L40S": {"bf16": 362.1, "tf32": 183.0}, "RTX 4090 D": {}, "RTX 4090": {"bf16": 165.2, "tf32": 82.6}}


def spec_tflops(gpu_name: str | None, compute: str) -> float | None:
    """The data sheet's dense peak of the GPU so named for `compute` (bf16, tf32); None if not known here
    (or no GPU: None for the name), and for a MIG slice, whose name holds its whole GPU's."""
    if "MIG" in (gpu_name or ""):
        return None
    return next((peaks.get(compute) for key, peaks in SPEC_DENSE_TFLOPS.items() if key in (gpu_name or "")), None)


def matmul_compute(device: torch.device, precision: str) -> str:
    """What a precision's matmuls run in here: bf16, tf32 (CUDA fp32 with TF32 on) or fp32."""
    if precision == "bf16":
        return "bf16"
    tf32 = device.type == "cuda" and torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "fp32"


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak dense matmul rate measured here (what MFU is taken against). fp32 on CUDA runs in TF32 or full
    fp32 as torch's matmul precision is set (bench/train_step.py sets it as the trainer does)."""
    # A CPU without bf16 units emulates bf16 matmuls: one of 1024^3 took 2.4 s on an AVX2 AMD EPYC (0.05 s in
    # fp32), so 25 of 2048^3 took 8 minutes. On a CPU, a few of 1024^3: MFU there is a rough figure anyway.
    n, warmup, iters = (8192, 5, 20) if device.type == "cuda" else (1024, 1, 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median(time_ms(lambda: a @ b, device, warmup=warmup, iters=iters))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measured_copy_gbps(device: torch.device, quick: bool = False) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), the kernels' roofline."""
    n = (1 << 20 if quick else 1 << 24) if device.type == "cpu" else 1 << 28
    src = torch.empty(n, device=device, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    ms = median(time_ms(lambda: dst.copy_(src), device, warmup=3, iters=5 if quick else 20))
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def peak_memory_mib(device: torch.device, since_mib: float = 0.0) -> float | None:
    """CUDA: the peak allocated since reset_peak_memory, less since_mib (what was allocated before). CPU: None
    (a "-" in the tables): the only peak there is the process's resident set, which never goes down, so a
    variant measured after another would show the larger one's."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20 - since_mib
    return None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def nvml_handle(pynvml, device: torch.device):
    """NVML's handle of torch's `device`, found by PCI bus id: NVML numbers GPUs its own way and ignores
    CUDA_VISIBLE_DEVICES, so torch's index can name another GPU of the machine."""
    props = torch.cuda.get_device_properties(device)
    try:
        bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
    except (AttributeError, pynvml.NVMLError) as err:  # a torch without the PCI fields
        print(f"note: GPU telemetry by index, not by PCI bus id ({err})")
        return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)


NVML_WINDOW_S = 1.0
"""NVML reports utilisation over its last sample period (1/6 s to 1 s, by product) and Hopper's power as a 1 s
average: a reading taken sooner after a block starts describes what ran before it (an H200 read 0% busy for a
0.3 s block of back-to-back steps)."""


class GpuTelemetry:
    """Samples power (W) and utilisation (%) through nvidia-ml-py while a block runs (CUDA only), from
    window_s after it starts: a block shorter than that reports none."""

    def __init__(self, device: torch.device, period_s: float = 0.05, window_s: float = NVML_WINDOW_S):
        self.device, self.period_s, self.window_s = device, period_s, window_s
        self.power_w: list[float] = []
        self.util_pct: list[float] = []

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = None
        if self.device.type != "cuda":
            return self
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = nvml_handle(pynvml, self.device)
        except Exception as err:  # no driver library: report no telemetry rather than fail the benchmark
            print(f"note: no GPU telemetry ({err})")
            return self

        # each reading on its own: a MIG slice or a vGPU answers NOT_SUPPORTED for some (utilisation), and
        # one that fails must neither stop the other nor kill the thread
        readings = ((self.power_w, lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3),
                    (self.util_pct, lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

        def sample():
            if self._stop.wait(self.window_s):  # the block ended before NVML's window lay inside it
                return
            while not self._stop.is_set():
                for values, read in readings:
                    try:
                        values.append(read())
                    except pynvml.NVMLError:
                        pass
                time.sleep(self.period_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict:
        """The median of each reading that was sampled; none for one the GPU never answered."""
        medians = {"power_w": self.power_w, "gpu_util_pct": self.util_pct}
        return {name: round(median(values), 1) for name, values in medians.items() if values}


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, list):  # a tensor size
            return "x".join(map(str, value))
        return "-" if value is None else str(value)

    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def record(benchmark: str, row: dict) -> None:
    """Append one measured row as a JSON line to $STMD_BENCH_JSONL (bench/gpu_check.py sets it),
    so a run cut short by its time budget keeps every row measured before the cut."""
    path = os.environ.get("STMD_BENCH_JSONL")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"benchmark": benchmark, "row": row}) + "\n")


def parse_variants(p: argparse.ArgumentParser, text: str, known) -> list[str]:
    """--variants "a,b": the names, each known and given once (a repeat was built, warmed up and compiled
    again, for one row), else the parser's one-line error."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in known]
    if unknown or not names:
        p.error(f"--variants: {f'unknown {unknown}' if unknown else 'none given'}: choose from {', '.join(known)}")
    repeated = sorted({v for v in names if names.count(v) > 1})
    if repeated:
        p.error(f"--variants: {', '.join(repeated)} given twice: give each variant once")
    return names


def finish(name: str, result: dict, save: bool) -> None:
    """Print the final JSON line; with save, merge it under `name` into the device/date file first. A save
    that fails still prints the line (the result is not lost), then exits 1 naming the file and the cause."""
    failed = None
    if save:
        env = result["environment"]
        slug = "".join(ch if ch.isalnum() else "-" for ch in env["device"].lower()).strip("-")
        path = RESULTS_DIR / f"{slug}-{env['date']}.json"
        try:
            kept = save_result(path, name, result)
            print(f"saved under '{name}' in {path}{kept}")
        except OSError as err:
            from stmd_fast.files import write_fix

            failed = (f"could not save it in {path}: {err.strerror or err} ({err.filename or path}): "
                      f"{write_fix(err, 'make bench/results a writable folder')}")
        except ValueError as err:  # a damaged day file: not rewritten, so its other results stay
            failed = f"could not save it: {path} is not the JSON of a results file ({err}); move it aside"
    print(json.dumps({"benchmark": name, **result}), flush=True)
    if failed is not None:
        raise SystemExit(f"error: the result above (its JSON line) is not saved: {failed}, or pass --no-save")


def save_result(path: Path, name: str, result: dict) -> str:
    """Merge `result` under `name` into the results file `path`, keeping a same-day earlier one as NAME#i
    (returned as a note). Under a lock: two benchmarks finishing together each keep their result."""
    import fcntl

    from stmd_fast.files import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, however the process ends
        merged = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(merged, dict):
            raise ValueError(f"a JSON {type(merged).__name__}, not an object")
        kept = ""
        if name in merged:  # the same benchmark run again that day (other variants, flags): keep both
            earlier = next(f"{name}#{i}" for i in range(1, len(merged) + 2) if f"{name}#{i}" not in merged)
            merged[earlier] = merged[name]
            kept = f"; the earlier result under '{name}' kept as '{earlier}'"
        merged[name] = result
        write_atomic(path, (json.dumps(merged, indent=1) + "\n").encode())
    return kept


def time_ms_interleaved(fns: dict, device: torch.device, iters: int) -> dict:
    """Wall time of `iters` calls of each of `fns` (name -> callable, already warmed up), taken in
    rounds: one call of each per round, the order rotated every round. A shared machine's load,
    which drifts over seconds, then hits every callable alike; each call is synchronised."""
    names = list(fns)
    times = {name: [] for name in names}
    synchronize(device)
    for i in range(iters):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(1e3 * (time.perf_counter() - start))
    return times
