"""Compile every Triton kernel for real NVIDIA targets without a GPU, with the launch settings
the host wrappers use, and report shared memory, registers and spills.

    python -m stmd_fast.kernels.compile_matrix              # table + JSON lines, exit 1 on a failure
    python -m stmd_fast.kernels.compile_matrix --markdown   # the README's table

Triton compiles ahead of time for a GPUTarget (PTX, then ptxas to a cubin); `ptxas -v` on the
same PTX reports registers and spill bytes per thread. Checks per entry: it compiles, its
shared memory fits the target's limit (launch.SMEM_LIMITS) and its spill stores stay within
launch.spill_budget. Compiles run in parallel and are cached by Triton (and the ptxas report
here, keyed by the PTX), so a second run takes seconds.

Shapes: Triton's launcher compiles one variant per class of its integer arguments (a value of 1
becomes a constant, a multiple of 16 is marked divisible by 16, which changes the code: shared
memory, registers and spills), so each kernel is compiled at a shape of each class:
- attention at head dim 8 (the presets' U-Nets; padded to 16 inside) and 64 (the U-Net of --unet L,
  DiT-S/B/M/L, and the widest the kernel takes), each at a sequence length that is a multiple of
  16 (cifar10's 16 x 16 = 256, DiT/2's 256 on 32 x 32 latents) and one that is not (mnist's
  14 x 14 = 196 and 7 x 7 = 49);
- the loss at the smallest block (digits' 64 values per sample), at the largest in one chunk
  (4096: 4 x 32 x 32 latents), in one chunk of a size that is no multiple of 16 (2700:
  3 x 30 x 30), in four (16384: 4 x 64 x 64 latents), in two of a size that is no multiple of 16
  (7500: 3 x 50 x 50), in 48 (196608: 3 x 256 x 256) and in 16 of a size that is no multiple of
  16 (64827: 3 x 147 x 147);
- the time features at the presets' 32 and 256 frequencies, for a batch x time inputs that is a
  multiple of 16 and one that is not.
Must run without TRITON_INTERPRET (the interpreter replaces @triton.jit functions).
"""
from __future__ import annotations

if __name__ == "__main__":  # a stop signal while torch and triton import (seconds): one line, not a traceback
    from stmd_fast.startup import stop_quietly_while_importing

    stop_quietly_while_importing()

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ..cli import Parser, one_line_errors
from .dispatch import interpret_mode
from .launch import (ATTENTION_KERNELS, KB, PRECISIONS, SMEM_LIMITS, TARGETS, attention_config,
                     padded_head_dim, spill_budget)

ATTENTION_SHAPES = ((8, 64), (8, 196), (64, 256), (64, 196))  # (head dim, sequence length)
LOSS_SIZES = (64, 2700, 4096, 16384, 7500, 196608, 64827)  # values per sample: D and the chunk count each a
# multiple of 16 or not, in every pair that launches (one chunk: D up to 4096; 3x256x256 = 48 chunks; 3x147x147)
TIME_SHAPES = ((32, 192), (32, 300), (256, 384), (256, 300))  # (frequencies, batch x time inputs)


def _sm(capability) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def entries() -> list[dict]:
    """One dict per (kernel variant, dtype, shape, target): what to compile and how."""
    from . import meanflow_loss, time_embedding

    out = []
    for cap in TARGETS:
        for kernel in ATTENTION_KERNELS:
            for precision in PRECISIONS:
                for head_dim, length in ATTENTION_SHAPES:
                    cfg = attention_config(kernel, head_dim, precision, cap)
                    out.append({"kernel": f"attention {kernel}", "dtype": "bf16" if precision == "bf16" else "fp32",
                                "precision": precision, "shape": f"head dim {head_dim}, {length} tokens",
                                "target": cap, "ints": {"L": length, "D": head_dim},
                                "config": {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                                           "BLOCK_D": padded_head_dim(head_dim), "num_warps": cfg.num_warps,
                                           "num_stages": cfg.num_stages},
                                "budget": spill_budget(precision)})
        for dtype in ("fp32", "bf16"):
            for size in LOSS_SIZES:
                block = meanflow_loss.block_size(size)
                chunks = -(-size // block)
                for name in ("delta", "grad"):
                    ints = {"D": size, "N_CHUNKS": chunks} if name == "delta" else {"D": size}
                    out.append({"kernel": f"meanflow_loss {name}", "dtype": dtype, "precision": dtype,
                                "shape": f"{size} values", "target": cap, "ints": ints, "config": {"BLOCK": block},
                                "budget": spill_budget(dtype)})
        for freqs, rows in TIME_SHAPES:
            _, block_r, block_f = time_embedding.launch_settings(rows, freqs)
            for name in ("fwd", "fwd_tangent", "bwd"):
                out.append({"kernel": f"time_features {name}", "dtype": "fp32", "precision": "fp32",
                            "shape": f"{freqs} freqs, {rows} rows", "target": cap,
                            "ints": {"n_rows": rows, "HALF": freqs // 2},
                            "config": {"BLOCK_R": block_r, "BLOCK_F": block_f}, "budget": spill_budget("fp32")})
    return out


def _source(entry: dict):
    """(jit function, signature, constexprs, attributes, options) of an entry, as the host wrapper launches it
    at the entry's shape (its "ints": the integer arguments' values), specialised as Triton's launcher does."""
    from . import attention, meanflow_loss, time_embedding

    kernel, dt, cfg = entry["kernel"], entry["dtype"], dict(entry["config"])
    options = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    if kernel.startswith("attention"):
        variant = kernel.split()[1]
        cfg["PRECISION"] = entry["precision"]
        if variant.startswith("fwd"):
            fn = attention._attn_fwd_kernel
            types = [f"*{dt}"] * 8 + ["*fp32", "i32", "i32", "fp32"]
            cfg["WITH_TANGENT"] = variant == "fwd_tangent"
        elif variant == "bwd_dkdv":
            fn = attention._attn_bwd_dkdv_kernel
            types = [f"*{dt}"] * 4 + ["*fp32"] * 2 + [f"*{dt}"] * 2 + ["i32", "i32", "fp32"]
        else:
            fn = attention._attn_bwd_dq_kernel
            types = [f"*{dt}"] * 4 + ["*fp32"] * 2 + [f"*{dt}", "i32", "i32", "fp32"]
    elif kernel == "meanflow_loss delta":
        fn = meanflow_loss._delta_kernel
        # u and du/dt come from the network (bf16 under autocast); v = e - x0 and h = t - r stay fp32
        types = [f"*{dt}"] * 2 + ["*fp32"] * 4 + ["i32", "i32"]
    elif kernel == "meanflow_loss grad":
        fn = meanflow_loss._grad_kernel
        types = ["*fp32"] * 3 + [f"*{dt}", "i32", "fp32", "fp32", "fp32"]  # delta, ||delta||^2, incoming gradient
    else:
        fn = time_embedding._time_features_bwd_kernel if kernel.endswith("bwd") else time_embedding._time_features_fwd_kernel
        types = ["*fp32"] * (3 if kernel.endswith("bwd") else 4) + ["i32", "fp32", "i32"]
        cfg["LOG_BASE"] = time_embedding.LOG_BASE
        if not kernel.endswith("bwd"):
            cfg["HAS_TANGENT"] = kernel.endswith("tangent")
    names = [n for n in fn.arg_names if n not in cfg]
    assert len(names) == len(types), (kernel, names, types)
    ints = entry["ints"]
    assert set(ints) == {n for n, t in zip(names, types) if t == "i32"}, (kernel, ints)
    cfg |= {n: 1 for n, value in ints.items() if value == 1}  # the launcher makes an argument of 1 a constant
    signature = {n: t for n, t in zip(names, types) if n not in cfg} | {name: "constexpr" for name in cfg}
    # and marks pointers (torch allocations are 16-byte aligned) and multiples of 16 as divisible by 16
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*") or t == "i32" and ints[n] % 16 == 0}
    return fn, signature, cfg, attrs, options


def _ptxas_report(ptx: str, capability, cache: Path) -> dict:
    """Registers and spill bytes per thread from `ptxas -v` on the PTX (cached by its hash)."""
    arch = f"sm_{capability[0]}{capability[1]}" + ("a" if capability[0] >= 9 else "")
    key = hashlib.sha256((arch + ptx).encode()).hexdigest()
    path = cache / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    # the ptxas Triton itself runs for this target: which one changes between releases (Triton 3.9 takes its
    # CUDA 13 "ptxas-blackwell" from sm_90 on, 3.6 from sm_100; the CUDA 12.9 one fails on 3.9's sm_90a PTX)
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(capability[0] * 10 + capability[1]).path
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        log = subprocess.run([str(ptxas), "-v", f"--gpu-name={arch}", "k.ptx", "-o", "k.cubin"], cwd=tmp,
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    report = {"regs": int(regs.group(1)), "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))
    return report


def compile_entry(entry: dict) -> dict:
    """Compile one entry; the result row with smem, regs, spills and what failed (None if nothing)."""
    import triton
    from triton.backends.compiler import GPUTarget

    row = dict(entry, target=_sm(entry["target"]), smem_limit=SMEM_LIMITS[entry["target"]], error=None)
    start = time.perf_counter()
    try:
        fn, signature, constexprs, attrs, options = _source(entry)
        target = GPUTarget("cuda", entry["target"][0] * 10 + entry["target"][1], 32)
        opts = triton.compiler.make_backend(target).parse_options(options)
        compiled = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=opts.__dict__)
        cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache")) / "stmd_fast-ptxas"
        row.update(smem=compiled.metadata.shared, **_ptxas_report(compiled.asm["ptx"], entry["target"], cache))
        if row["smem"] > row["smem_limit"]:
            row["error"] = f"shared memory {row['smem']} B > {row['smem_limit']} B"
        elif row["spill_stores"] > row["budget"]:
            row["error"] = f"spills {row['spill_stores']} B > budget {row['budget']} B"
    except Exception as err:  # a compile failure is a result of the matrix, reported per entry
        cause = err.__cause__ or err  # Triton's CompilationError names the line; its cause says why
        row["error"] = f"{type(cause).__name__}: {' '.join(str(cause).split())[-300:]}"
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def run(jobs: int | None = None, select=None) -> list[dict]:
    if interpret_mode():
        raise SystemExit("compile_matrix needs TRITON_INTERPRET unset (the interpreter replaces the kernels)")
    todo = [e for e in entries() if select is None or select(e)]
    # the slowest (fp32 attention) first, so the pool's tail is short
    todo.sort(key=lambda e: (not e["kernel"].startswith("attention"), e["precision"] != "tf32x3"))
    with ProcessPoolExecutor(max_workers=os.cpu_count() if jobs is None else jobs) as pool:
        return list(pool.map(compile_entry, todo))


def markdown(rows: list[dict]) -> str:
    """One line per (kernel, precision, shape); per target: shared KB / registers / spill bytes."""
    targets = [_sm(t) for t in TARGETS]
    lines = ["| kernel | dtype (tl.dot) | shape | " + " | ".join(targets) + " |",
             "|---|---|---|" + "---|" * len(targets)]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["dtype"], r["precision"], r["shape"]), {})[r["target"]] = r
    for (kernel, dtype, precision, shape), per_target in groups.items():
        cells = []
        for t in targets:
            r = per_target.get(t)
            if r is None or "smem" not in r:
                cells.append("FAILED" if r else "")
            else:
                cells.append(f"{r['smem'] / KB:.0f} / {r['regs']} / {r['spill_stores']}" + (" !" if r["error"] else ""))
        label = dtype if dtype == precision else f"{dtype} ({precision})"
        lines.append(f"| {kernel} | {label} | {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@one_line_errors()  # Ctrl-C, SIGTERM: "interrupted", exit 130 / 143
def main(argv=None) -> int:
    p = Parser(prog="python -m stmd_fast.kernels.compile_matrix", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles, at least 1 (default: all cores)")
    p.add_argument("--markdown", action="store_true", help="print the README table (shared KB / regs / spills)")
    p.add_argument("--kernel", default=None, help="only entries whose kernel name contains this")
    args = p.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:  # 0 meant all cores, silently; leave the flag out for that
        p.error(f"--jobs {args.jobs}: must be at least 1 (leave it out for all cores)")
    kernels = sorted({e["kernel"] for e in entries()})
    if args.kernel is not None and not any(args.kernel in k for k in kernels):  # a typo is no empty success
        p.error(f"--kernel {args.kernel!r} matches no kernel: give part of one of {', '.join(kernels)}")
    start = time.perf_counter()
    rows = run(args.jobs, (lambda e: args.kernel in e["kernel"]) if args.kernel else None)
    for r in rows:
        print(json.dumps(r))
    if args.markdown:
        print(markdown(rows))
    failed = [r for r in rows if r["error"]]
    for r in failed:
        print(f"FAIL {r['kernel']} {r['precision']} {r['shape']} {r['target']} {r['config']}: {r['error']}",
              file=sys.stderr)
    print(f"{len(rows)} kernels compiled for {len(TARGETS)} targets, {len(failed)} failed, "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    from stmd_fast.startup import imports_done

    imports_done()
    sys.exit(main())
