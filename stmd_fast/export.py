"""python -m stmd_fast.export CKPT: a few-step sampler as a torch.export program (.pt2).

The program is Algorithm 2 for one fixed (method, N, M, grid) with the checkpoint's EMA
weights baked in. It takes ONE input and returns the samples:

  noise    float32 (K, B, *data_shape): the K standard normal tensors the sampler consumes, in
           the order stmd_fast.sampling.sampler_plan(...).noise_names lists (x_1, then per
           diffusion step z_k for STMD and eps_k for every step but the last) and that
           stmd_fast.json stores under "noise": K = 2N for STMD (x_1, N starts z_k, N - 1 bridge
           draws eps_k: the last step lands on s = 0 exactly), N for DDPM, 1 for Mean Flow.
  returns  float32 (B, *data_shape): images in model space (about [-1, 1], not clamped), vectors,
           or, for a latent model, the LATENTS (the VAE decode is not part of the program;
           stmd_fast.json holds the VAE id and its scaling/shift factors, and `sample --exported
           --vae` decodes).

The batch B is STATIC: the program takes exactly --batch samples per call (the design notes: a
dynamic batch through diffusers' U-Net hits a shape guard at batch 64); callers pad a short
batch and drop the padding, as `python -m stmd_fast.sample --exported` does. The noise is an input, not drawn
inside, because Inductor replaces torch.randn with its own generator: with the noise drawn by
sampling.draw_sampler_noise (or iter_sampler_noise) from torch.Generator().manual_seed(S), the program gives the eager
sampler's samples for seed S.

The graph is traced with the kernels' pure-PyTorch references (kernels.dispatch backend
"reference"), so it holds only aten ops and loads with torch.export.load alone, without
stmd_fast. Its metadata is the extra file stmd_fast.json (EXPORT_FORMAT, method, N, M, grid,
batch, data shape and kind, noise names, latent VAE). --aoti also compiles it with
AOTInductor into OUT.aoti.pt2 (torch._inductor.aoti_load_package runs it; needs a C++
compiler, and CUDA for a CUDA export). Unlike the .pt2 program, the package checks its input's
shape, dtype and strides only when AOTI_RUNTIME_CHECK_INPUTS=1 is set before its first call
(as of torch 2.14 no Inductor option compiles the checks in): without it a wrong input
gives wrong, finite samples. open_exported (sample --exported) checks the input itself and sets it.
"""
from __future__ import annotations

if __name__ == "__main__":  # a stop signal while torch and the rest import (seconds): one line, not a traceback
    from stmd_fast.startup import stop_quietly_while_importing

    stop_quietly_while_importing()

import argparse
import io
import json
import logging
import math
import os
import sys
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import torch

from .cli import Parser, one_line_errors
from .devices import OutOfMemory, fits_in_memory
from .files import WriteFailed, check_writable, write_atomic, write_fix
from .methods import METHODS
from .sampling import check_count, check_generator, iter_sampler_noise, nfe, run_plan, sampler_plan
from .schedule import TIME_GRIDS

EXPORT_FORMAT = 1
META_FILE = "stmd_fast.json"


class ExportError(ValueError):
    """Bad input to the export: printed as one line 'error: ...', exit code 2."""


class Sampler(torch.nn.Module):
    """net + Algorithm 2 for a fixed plan: forward(noise (K, B, *data_shape)) -> samples (B, *data_shape)."""

    def __init__(self, net: torch.nn.Module, plan):
        super().__init__()
        self.net, self.plan = net, plan

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return run_plan(self.net, self.plan, noise)


def aoti_path(out: str | Path) -> Path:
    """Where --aoti writes the AOTInductor package: sampler.pt2 -> sampler.aoti.pt2."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".pt2") + ".aoti.pt2")


def export_sampler(model, steps: int, flow_steps: int, batch: int, grid: str | None = None):
    """(ExportedProgram, metadata) of `model`'s sampler with a static batch (the model's net as it is:
    load_checkpoint(..., weights='ema') for the EMA weights) on `grid` (default: the run's, model.grid)."""
    from . import __version__
    from .kernels import dispatch

    check_count("batch", batch)
    if batch < 1:
        raise ExportError(f"--batch must be at least 1, got {batch}")
    grid = model.grid if grid is None else grid  # "" is refused by sampler_plan, as Model.sample refuses it
    plan = sampler_plan(model.method, steps, flow_steps, grid)
    device = model.device
    noise = torch.zeros(len(plan.noise_names), batch, *model.data_shape, device=device)
    was_training = model.net.training
    sampler = Sampler(model.net, plan).eval()
    try:
        with dispatch.backend("reference"), torch.no_grad():
            program = torch.export.export(sampler, (noise,), strict=False)
    finally:
        model.net.train(was_training)  # the caller's network comes back as it was given
    meta = {
        "format": EXPORT_FORMAT,
        "stmd_fast_version": __version__,
        "method": model.method,
        "steps": steps,
        "flow_steps": flow_steps,
        "nfe": nfe(model.method, steps, flow_steps),
        "grid": grid if METHODS[model.method].diffusion else None,  # Mean Flow: s = 1 to the data, no grid
        "batch": batch,
        "data_shape": list(model.data_shape),
        "data_kind": model.data_kind,
        "dtype": "float32",
        "device": str(device),
        "inputs": [{"name": "noise", "shape": list(noise.shape), "dtype": "float32"}],
        "noise": list(plan.noise_names),
        "output": {"shape": [batch, *model.data_shape],
                   "is": "latents (not decoded)" if model.data_kind == "latent" else f"{model.data_kind}s",
                   **({"range": "about [-1, 1], not clamped",
                       "to_uint8": "((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), channels first"}
                      if model.data_kind == "image" else {})},
        # what the network holds, as load_checkpoint loaded it (None for a network given by hand)
        "weights": model.weights,
        "ema_decay": model.ema_decay,
        "checkpoint": str(model.checkpoint.resolve()) if model.checkpoint is not None else None,
        "checkpoint_step": model.meta.get("step"),
    }
    if model.data_kind == "latent":
        latent = model.meta["latent"]
        meta["latent"] = {key: latent.get(key) for key in ("vae", "scaling_factor", "shift_factor", "resolution",
                                                           "vae_sha256")}
    return program, meta


def save(program, meta: dict, path: str | Path) -> None:
    """Serialized in memory, then written atomically (files.py: a full disk is an OSError and leaves no
    partial .pt2, where torch.export.save to a path can abort the process)."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={META_FILE: json.dumps(meta)})
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # check_writable made and removed it: made once there is output
    write_atomic(path, buffer.getvalue())


def check_out_path(out: Path, flag: str) -> None:
    """ValueError when a folder on the way to `out` is a file (digit.png/x.npy): files.check_writable's
    mkdir would only say 'File exists'."""
    for parent in out.parents:
        if parent.exists():  # the nearest existing one: the folders above it exist too
            if not parent.is_dir():
                raise ValueError(f"cannot write {flag} {out}: {parent} is a file, not a directory: choose another "
                                 f"{flag}")
            return


def check_noise(noise: torch.Tensor, meta: dict, path) -> None:
    """ExportError unless `noise` is the program's one input, its static shape in float32: an AOTInductor
    package does not check this itself (module docstring) and would return wrong samples."""
    shape = tuple(meta["inputs"][0]["shape"])
    if tuple(noise.shape) != shape or noise.dtype != torch.float32:
        raise ExportError(f"{path} takes noise of shape {shape}, float32 (static batch {meta['batch']}: pad a short "
                          f"batch), got {tuple(noise.shape)}, {str(noise.dtype).removeprefix('torch.')}")


def read_export_meta(raw: str | None, path) -> dict:
    """The metadata (stmd_fast.json's text) of an exported sampler, or ExportError saying to re-export."""
    if not raw:
        raise ExportError(f"{path} has no {META_FILE}: it was not written by python -m stmd_fast.export; "
                          f"re-export the checkpoint with this version")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise ExportError(f"{path}: its {META_FILE} is not JSON: re-export the checkpoint with this version") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path} has export format {meta.get('format')}, this stmd_fast reads format "
                          f"{EXPORT_FORMAT}: re-export the checkpoint with this version")
    return meta


def open_exported(path: str | Path):
    """(run, meta) of an exported sampler: a .pt2 program (torch.export.load) or an AOTInductor package
    (torch._inductor.aoti_load_package), told apart by their contents. run(noise) -> samples.
    ExportError (one line) for anything else, before any deserialization where possible."""
    file = Path(path)
    if file.is_dir():
        raise ExportError(f"--exported {path} is a directory: pass the .pt2 file written by python -m "
                          f"stmd_fast.export (a run or checkpoint directory goes as CKPT, without --exported)")
    if not file.is_file():
        raise ExportError(f"--exported {path} does not exist")
    if file.suffix != ".pt2" or not zipfile.is_zipfile(file):
        raise ExportError(f"--exported {path} is not a .pt2 archive: pass a file written by python -m stmd_fast.export")
    with zipfile.ZipFile(file) as archive:
        # torch.export.load and aoti_load_package read members without their CRC: damaged weights load and give
        # wrong samples without a word (checkpoints have their SHA-256; an exported file has its zip CRCs)
        try:
            damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
            damaged = f"{type(err).__name__}: {err}"
        if damaged is not None:
            raise ExportError(f"--exported {path} is damaged ({damaged} fails its CRC check): export it again "
                              f"with python -m stmd_fast.export")
        names = archive.namelist()
        aoti = any("/data/aotinductor/" in name for name in names)
        extra = [name for name in names if name.endswith(f"/extra/{META_FILE}")]
        raw = None if aoti or not extra else archive.read(extra[0]).decode()
    if aoti:
        from torch._inductor import aoti_load_package

        # the package's own input checks (strides, device too) run only with this set before its first call
        os.environ.setdefault("AOTI_RUNTIME_CHECK_INPUTS", "1")
        try:
            runner = aoti_load_package(str(file))
        except Exception as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError(f"--exported {path}: the AOTInductor package does not load here ({reason}): it runs "
                              f"only on the platform and device it was built for; re-export with --aoti here") from None
        meta = read_export_meta(runner.get_metadata().get(META_FILE), path)

        def run(noise: torch.Tensor) -> torch.Tensor:
            check_noise(noise, meta, path)
            out = runner(noise)
            return out[0] if isinstance(out, (list, tuple)) else out
    else:
        meta = read_export_meta(raw, path)  # checked before deserializing: another format may not even load
        logger = logging.getLogger("torch.export")  # it logs a traceback before its own generic error
        logger.disabled = True
        try:
            program = torch.export.load(str(file))
            module = program.module()
        except Exception:  # a zip with our metadata but no (or a broken) program
            raise ExportError(f"--exported {path}: holds no loadable program (torch.export.load fails on it): "
                              f"re-export the checkpoint with python -m stmd_fast.export") from None
        finally:
            logger.disabled = False
        takes = [tuple(node.meta["val"].shape) for node in program.graph.nodes
                 if node.op == "placeholder" and node.name in program.graph_signature.user_inputs]
        if takes != [tuple(meta["inputs"][0]["shape"])]:  # else the program's own guard fails at the first call
            raise ExportError(f"--exported {path}: its {META_FILE} says the program takes noise of shape "
                              f"{tuple(meta['inputs'][0]['shape'])}, the program takes {', '.join(map(str, takes))} "
                              f"(the metadata of another export?): re-export the checkpoint with python -m "
                              f"stmd_fast.export")

        def run(noise: torch.Tensor) -> torch.Tensor:
            check_noise(noise, meta, path)
            with torch.no_grad():
                return module(noise)
    return run, meta


@torch.no_grad()
def sample_exported(run, meta: dict, num: int, generator: torch.Generator, batch_size: int = 256) -> torch.Tensor:
    """`num` samples from an exported sampler (open_exported) on the CPU.

    The noise is drawn exactly as the eager sampler draws it, `batch_size` samples at a time
    (Model.sample(num, ..., generator, batch_size=batch_size) with the same generator gives the
    same samples, up to float rounding); each draw is fed to the program meta["batch"] samples at
    a time, the last piece padded with zeros and the padding dropped."""
    for name, value in (("num", num), ("batch_size", batch_size)):
        check_count(name, value)
    if num < 1 or batch_size < 1:
        raise ValueError(f"need num >= 1 and batch_size >= 1, got {num} and {batch_size}")
    check_generator(generator)
    plan = sampler_plan(meta["method"], meta["steps"], meta["flow_steps"], meta["grid"] or "uniform")
    if list(plan.noise_names) != meta["noise"]:
        raise ExportError(f"the program takes the noise {meta['noise']}, this stmd_fast draws {list(plan.noise_names)}: "
                          f"re-export the checkpoint with this version")
    batch, shape, device = meta["batch"], tuple(meta["data_shape"]), torch.device(meta["device"])
    parts = []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        noise = torch.stack(list(iter_sampler_noise(plan, n, shape, generator)))  # (K, n, *shape)
        for i in range(0, n, batch):
            piece = noise[:, i:i + batch]
            m = piece.shape[1]
            if m < batch:  # the program's batch is static
                piece = torch.cat([piece, piece.new_zeros(len(plan.noise_names), batch - m, *shape)], dim=1)
            # contiguous: an AOTInductor package reads its input with the strides it was compiled for
            parts.append(run(piece.to(device).contiguous())[:m].cpu())
    return torch.cat(parts)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m stmd_fast.export", description=__doc__.splitlines()[0],
        epilog="The program takes exactly --batch samples per call (static batch: callers pad the last batch) as "
               "one float32 input, noise (K, B, *data_shape) with K = 2N (stmd), N (ddpm) or 1 (meanflow) standard "
               "normal tensors in the order its stmd_fast.json lists, and returns (B, *data_shape): images in "
               "model space (about [-1, 1], not clamped), vectors, or for a latent model the latents (no VAE "
               "decode inside). It holds only aten ops and loads with torch.export.load alone. Run it with: "
               "python -m stmd_fast.sample --exported OUT "
               "--num K --seed S --out FILE. The --aoti package checks its input only when "
               "AOTI_RUNTIME_CHECK_INPUTS=1 is set (sample --exported checks it). Exit codes: 2 bad input (nothing "
               "exported); 1 out of memory or a failed write (nothing written), or --aoti could not build (OUT "
               "is written, and the line says so); 130 interrupted (nothing written).")
    add = p.add_argument
    add("checkpoint", metavar="CKPT", help="a run directory (its newest checkpoint) or a checkpoints/step_* directory")
    add("--steps", type=int, help="N diffusion steps [default: 1 for stmd/meanflow, 100 for ddpm]")
    add("--flow-steps", type=int, default=1, help="M flow steps per diffusion step (stmd, meanflow) [default: 1]")
    add("--batch", type=int, default=64,
        help="the program's static batch: it takes exactly this many samples per call [default: 64]")
    add("--grid", choices=TIME_GRIDS, help="diffusion time grid [default: the run's --sample-grid]")
    add("--ema", type=float, metavar="DECAY", help="which EMA to bake in, by its decay: a run keeps --ema-decay and "
        "each of --ema-decays [default: --ema-decay's]")
    add("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N: the device the program runs on [default: auto]")
    add("--out", default="sampler.pt2", help="the program, a .pt2 file [default: sampler.pt2]")
    add("--aoti", action="store_true",
        help="also compile an AOTInductor package OUT.aoti.pt2 (needs a C++ compiler) [default: off]")
    return p


FEW_STEPS = 16
"""The NFE up to which an export is a few-step sampler: each network call is unrolled into the program."""


def unrolled_note(method: str, steps: int, flow_steps: int) -> str | None:
    """A note, before tracing, for a sampler of many network calls (DDPM's default N = 100): the program holds
    each call unrolled, so tracing takes minutes and the file grows with them, where a few steps take seconds."""
    cost = nfe(method, steps, flow_steps)
    if cost <= FEW_STEPS:
        return None
    return (f"note: {method} N={steps} M={flow_steps} unrolls {cost} network calls into the program: tracing time and "
            f"the file's size grow with each (minutes on a CPU; NFE {FEW_STEPS} or less exports in seconds: --steps)")


def check_out(out: Path) -> None:
    if not out.name.endswith(".pt2") or out.name == ".pt2":  # Path(".pt2").suffix is "": a hidden name
        raise ExportError(f"--out must be a file name ending in .pt2 (e.g. sampler.pt2), got {out.name or out}")
    try:
        check_out_path(out, "--out")
        check_writable(out, "--out")
    except ValueError as err:
        raise ExportError(str(err)) from None


def check_batch_memory(batch: int, steps: int, shape: tuple[int, ...]) -> None:
    """ExportError before tracing on the CPU if the program's noise input and output alone (at most 2N + 2
    tensors of the batch, float32) would take more than half of this machine's memory: tracing such a --batch ran
    for a while, then ran out of memory. (On a GPU its allocator's out-of-memory error names --batch at once.)"""
    from .devices import physical_memory

    total, need = physical_memory(), (2 * steps + 2) * batch * math.prod(shape) * 4
    if total is not None and need > total / 2:
        raise ExportError(f"--batch {batch}: the program's noise and samples alone take {need / 1e9:.3g} GB as "
                          f"float32, more than half of this machine's {total / 1e9:.3g} GB (the network's activations "
                          f"come on top): lower --batch (sample --exported draws any --num in batches of it)")


@one_line_errors(ValueError, FileNotFoundError, failures=(WriteFailed, OutOfMemory))
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import load_checkpoint, newest_intact
    from .devices import resolve_device
    from .sampling import check_steps

    out = Path(args.out)
    device = resolve_device(args.device)
    meta = newest_intact(args.checkpoint)[1]  # checked before the network is built
    method = meta["config"]["method"]
    steps = args.steps if args.steps is not None else METHODS[method].default_steps
    check_steps(method, steps, args.flow_steps)
    if args.grid is not None and not METHODS[method].diffusion:
        raise ExportError("--grid: Mean Flow samples from s = 1 straight to the data, on no diffusion grid: drop --grid")
    if args.batch < 1:
        raise ExportError(f"--batch must be at least 1, got {args.batch}")
    if device.type == "cpu":
        check_batch_memory(args.batch, steps, tuple(meta["data_shape"]))
    check_out(out)
    with warnings.catch_warnings(record=True) as notes:  # a fallback to an older intact checkpoint, said once
        warnings.simplefilter("always")
        model = load_checkpoint(args.checkpoint, device=device, weights="ema", ema=args.ema)  # its newest, now:
    for note in notes:  # a run still training may have rotated the one checked above away
        print(f"note: {note.message}", file=sys.stderr)
    ckpt = model.checkpoint

    if (note := unrolled_note(method, steps, args.flow_steps)) is not None:
        print(note, file=sys.stderr)
    start = time.perf_counter()
    with fits_in_memory(device, f"lower --batch {args.batch}"):
        program, meta = export_sampler(model, steps, args.flow_steps, args.batch, args.grid)
    try:
        save(program, meta, out)
    except OSError as err:
        raise WriteFailed(f"could not write --out {out}: {err.strerror or err}: nothing was written; "
                          f"{write_fix(err, 'choose another --out')}") from None
    what = "latents (not decoded: sample --exported --vae decodes)" if model.data_kind == "latent" else \
        f"{model.data_kind}s"
    print(f"exported {method} N={steps} M={args.flow_steps} ({meta['grid'] or 'no'} grid, NFE {meta['nfe']}) from {ckpt} "
          f"in {time.perf_counter() - start:.1f} s -> {out}: input noise {tuple(meta['inputs'][0]['shape'])} "
          f"({', '.join(meta['noise'])}), output {what} {tuple(meta['output']['shape'])}; static batch {args.batch} "
          f"on {device}")
    package = aoti_path(out)
    if package.exists() and not args.aoti:  # sample --exported would run it without a word
        print(f"note: {package} beside it is from an earlier export, not this one: delete it, or export again with "
              f"--aoti", file=sys.stderr)
    if args.aoti:
        start = time.perf_counter()
        try:
            from torch._inductor import aoti_compile_and_package

            buffer = io.BytesIO()  # in memory, then written atomically (as save above)
            aoti_compile_and_package(  # the metadata rides along as AOTI's own metadata
                program, package_path=buffer, inductor_configs={"aot_inductor.metadata": {META_FILE: json.dumps(meta)}})
            write_atomic(package, buffer.getvalue())
        except Exception as err:  # no compiler, unsupported platform, Inductor bugs
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            stale = f"; the {package.name} there is from an earlier export: delete it" if package.exists() else ""
            print(f"error: --aoti: AOTInductor could not build {package} on this machine ({type(err).__name__}: "
                  f"{reason}); {out} was written and runs without it{stale}", file=sys.stderr)
            return 1
        print(f"AOTInductor package built in {time.perf_counter() - start:.1f} s -> {package}: it does not check its "
              f"input (a wrong shape, dtype or stride gives wrong, finite samples): run it with python -m "
              f"stmd_fast.sample --exported {package}, or set AOTI_RUNTIME_CHECK_INPUTS=1 before "
              f"torch._inductor.aoti_load_package")
    return 0


if __name__ == "__main__":
    from stmd_fast.startup import imports_done, run_and_exit

    imports_done()
    run_and_exit(main)
