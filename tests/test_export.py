"""Tests of the exported few-step sampler (python -m stmd_fast.export, sample --exported) and of the
noise-as-data refactor of the sampler it rests on.

Tiny checkpoints are trained with the train CLI (the gmm MLP for stmd / meanflow / ddpm, the digits
U-Net with attention on a (32, 1, 8, 8) uint8 .npy); a tiny DiT stands in for a latent model. Exported
programs must give the eager sampler's samples for the same noise / seed, after a reload in a fresh
process and (where this machine builds one) as an AOTInductor package. Every user error is one line
"error: ..." on stderr with exit code 2, before any export work.
"""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import stmd_fast
from stmd_fast import export, sampling
from stmd_fast.checkpoint import find_checkpoint
from stmd_fast.export import EXPORT_FORMAT, META_FILE
from stmd_fast.export import main as export_main
from stmd_fast.models import NetConfig, build_net
from stmd_fast.objectives import METHODS
from stmd_fast.sample import main as sample_main
from stmd_fast.schedule import alpha_sigma, bridge_sample, time_grid
from stmd_fast.train import main as train_main
from conftest import assert_one_line_error

TIGHT = dict(rtol=1e-5, atol=1e-5)  # fp32: a different batch size or kernel fusion moves the last bits


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def read_png(path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        a = np.asarray(image)
    return torch.from_numpy(a.copy()).reshape(a.shape[0], a.shape[1], -1).permute(2, 0, 1)


def run_cli(*argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=cwd, timeout=300)


# ----------------------------------------------------------------------------- 1. the refactor: seeded sampling unchanged

def old_flow_map(net, z, cond, s, flow_steps):
    b = z.shape[0]
    for j in range(flow_steps):
        t, t_next = 1 - j / flow_steps, 1 - (j + 1) / flow_steps
        times = [t, t - t_next] if s is None else [t, t - t_next, s]
        times = torch.tensor(times, device=z.device, dtype=torch.float32).expand(b, -1)
        z = z - (t - t_next) * net(z, cond, times).to(z.dtype)
    return z


def old_transition(net, method, x, s_from, s_to, flow_steps, generator, project=None):
    """sampling.transition / denoise before the noise-as-data refactor (commit 3aff20a), verbatim."""
    def randn(shape, dtype=torch.float32):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)

    if method == "stmd":
        x0_hat = old_flow_map(net, randn(x.shape, x.dtype), x, s_from, flow_steps)
    elif method == "meanflow":
        x0_hat = old_flow_map(net, randn(x.shape, x.dtype), None, None, flow_steps)
    else:
        alpha, sigma = alpha_sigma(torch.tensor(s_from, dtype=torch.float64), x.dtype)
        eps = net(x, None, torch.full((x.shape[0], 1), s_from, device=x.device)).to(x.dtype)
        x0_hat = (x - sigma.item() * eps) / alpha.item()
    if project is not None:
        x0_hat = project(x0_hat)
    return bridge_sample(x, x0_hat, s_from, s_to, generator)


@torch.no_grad()
def old_sample(net, method, num, data_shape, steps, flow_steps, generator, grid="uniform", project=None):
    """sampling.sample before the refactor, verbatim: draws interleaved with the network calls."""
    x = torch.randn((num, *data_shape), generator=generator, device=generator.device, dtype=torch.float32)
    if method == "meanflow":
        x0 = old_flow_map(net, x, None, None, flow_steps)
        return project(x0) if project is not None else x0
    s_grid = time_grid(steps, grid).tolist()
    for s_from, s_to in zip(s_grid[:-1], s_grid[1:]):
        x = old_transition(net, method, x, s_from, s_to, flow_steps, generator, project)
    return x


def tiny_net(method: str, kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = NetConfig(kind="unet", channels=(8, 16), norm_groups=4, head_dim=4, time_freqs=16) if kind == "unet" \
        else NetConfig(kind="mlp", width=32, depth=2, time_freqs=16)
    m = METHODS[method]
    return build_net(cfg, (1, 8, 8) if kind == "unet" else (2,), m.conditional, len(m.times)).eval()


SETTINGS = [("stmd", "unet", 2, 2), ("stmd", "mlp", 3, 2), ("stmd", "mlp", 1, 3), ("ddpm", "mlp", 4, 1),
            ("ddpm", "unet", 2, 1), ("meanflow", "mlp", 1, 3)]


@pytest.mark.parametrize("grid", ["uniform", "quadratic"])
@pytest.mark.parametrize("method, kind, steps, flow_steps", SETTINGS)
def test_seeded_sampling_is_bit_identical_to_the_old_loop(method, kind, steps, flow_steps, grid):
    net = tiny_net(method, kind)
    shape = (1, 8, 8) if kind == "unet" else (2,)
    g_new, g_old = gen(3), gen(3)
    new = sampling.sample(net, method, 5, shape, steps, flow_steps, g_new, grid)
    old = old_sample(net, method, 5, shape, steps, flow_steps, g_old, grid)
    assert torch.equal(new, old)
    assert torch.equal(g_new.get_state(), g_old.get_state())  # no extra draw: the next batch is unchanged too
    noise = sampling.draw_sampler_noise(method, 5, shape, steps, flow_steps, gen(3))
    assert torch.equal(sampling.sample_from_noise(net, method, noise, steps, flow_steps, grid), old)
    assert torch.equal(sampling.sample_from_noise(net, method, torch.stack(noise), steps, flow_steps, grid), old)


def test_inpainting_and_transition_are_bit_identical_to_the_old_loop():
    net = tiny_net("stmd", "unet")
    y = torch.randn(1, 8, 8, generator=gen(1))
    project = sampling.inpainting_projection(y, (torch.rand(1, 8, 8, generator=gen(2)) > 0.5).float())
    assert torch.equal(sampling.sample(net, "stmd", 3, (1, 8, 8), 2, 2, gen(5), project=project),
                       old_sample(net, "stmd", 3, (1, 8, 8), 2, 2, gen(5), project=project))
    x = torch.randn(4, 1, 8, 8, generator=gen(9))
    for s_to in (0.2, 0.0):  # a bridge draw, and the point mass at s = 0 (no draw)
        g_new, g_old = gen(9), gen(9)
        assert torch.equal(sampling.transition(net, "stmd", x, 0.7, s_to, 2, g_new),
                           old_transition(net, "stmd", x, 0.7, s_to, 2, g_old))
        assert torch.equal(g_new.get_state(), g_old.get_state())  # the same number of draws
    ddpm = tiny_net("ddpm", "mlp")
    v = torch.randn(6, 2, generator=gen(4))
    assert torch.equal(sampling.transition(ddpm, "ddpm", v, 0.5, 0.25, 1, gen(8)),
                       old_transition(ddpm, "ddpm", v, 0.5, 0.25, 1, gen(8)))


class Oracle(nn.Module):
    """A fixed network (no weights), so the stored values below depend only on the sampler."""

    def forward(self, z, cond, times):
        out = 0.5 * z + 0.1 * times.sum(1).reshape(-1, *[1] * (z.ndim - 1))
        return out if cond is None else out + 0.25 * cond


# sampling.sample(Oracle(), method, 3, (2,), N, M, torch.Generator().manual_seed(7), grid), computed with
# the sampler BEFORE the noise-as-data refactor (commit 3aff20a), as float.hex of the flattened output.
STORED = {
    ("stmd", 3, 2, "uniform"): ["-0x1.7eebd8p-1", "-0x1.f97694p-4", "-0x1.1d98bap+0", "-0x1.4d1766p-1",
                                "-0x1.edf7f4p-2", "-0x1.018464p-2"],
    ("stmd", 2, 1, "quadratic"): ["0x1.0e792ep+0", "0x1.729608p-1", "0x1.03c7b4p-1", "-0x1.84ad7ap-1",
                                  "-0x1.8c7fb4p-1", "-0x1.3d2a44p-1"],
    ("ddpm", 3, 1, "uniform"): ["-0x1.28e3cap+3", "0x1.0de5e4p+4", "0x1.2756a2p+4", "-0x1.12fb0cp+5",
                                "0x1.28566cp+5", "-0x1.9200cep+4"],
    ("meanflow", 1, 2, "uniform"): ["-0x1.82b53cp-3", "0x1.580472p-2", "0x1.b491bcp-2", "-0x1.7754c2p-1",
                                    "0x1.b08c2cp-1", "-0x1.381c46p-1"],
}


@pytest.mark.parametrize("key", list(STORED), ids=lambda k: "-".join(map(str, k)))
def test_seeded_sampling_gives_the_values_stored_before_the_refactor(key):
    method, steps, flow_steps, grid = key
    x = sampling.sample(Oracle(), method, 3, (2,), steps, flow_steps, gen(7), grid)
    expected = torch.tensor([float.fromhex(h) for h in STORED[key]], dtype=torch.float32).reshape(3, 2)
    assert torch.equal(x, expected)


@pytest.mark.parametrize("method, steps, flow_steps, names", [
    ("stmd", 3, 2, ["x_1", "z_0", "eps_0", "z_1", "eps_1", "z_2"]),
    ("ddpm", 3, 1, ["x_1", "eps_0", "eps_1"]),
    ("meanflow", 1, 4, ["x_1"]),
])
def test_noise_layout(method, steps, flow_steps, names):
    assert list(sampling.sampler_plan(method, steps, flow_steps).noise_names) == names
    noise = sampling.draw_sampler_noise(method, 4, (2,), steps, flow_steps, gen(0))
    assert [tuple(n.shape) for n in noise] == [(4, 2)] * len(names)
    net = tiny_net(method, "mlp")
    with pytest.raises(ValueError, match="ran out of noise"):
        sampling.sample_from_noise(net, method, noise[:-1], steps, flow_steps)
    with pytest.raises(ValueError, match="too much noise"):
        sampling.sample_from_noise(net, method, noise + noise[:1], steps, flow_steps)


# ----------------------------------------------------------------------------- tiny checkpoints and programs

@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    data = root / "tiny.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (32, 1, 8, 8), dtype=np.uint8))
    out = {}
    argv = {"image": ["--data", data, "--batch-size", 8]}
    for method in ("stmd", "meanflow", "ddpm"):
        argv[f"gmm-{method}"] = ["--preset", "gmm", "--method", method, "--batch-size", 16]
    for name, args in argv.items():
        out[name] = root / name
        assert train_main([str(a) for a in [*args, "--steps", 2, "--device", "cpu", "--out", out[name]]]) == 0
    return out


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """exported(run, N, M, batch) -> path of the program (each exported once per module)."""
    root = tmp_path_factory.mktemp("programs")
    cache: dict[tuple, Path] = {}

    def get(run: str, steps: int, flow_steps: int, batch: int = 4) -> Path:
        key = (run, steps, flow_steps, batch)
        if key not in cache:
            path = root / f"{run}-N{steps}-M{flow_steps}-B{batch}.pt2"
            argv = [runs[run], "--steps", steps, "--flow-steps", flow_steps, "--batch", batch, "--device", "cpu",
                    "--out", path]
            assert export_main([str(a) for a in argv]) == 0
            cache[key] = path
        return cache[key]

    return get


def load_program(path: Path):
    extra = {META_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program, json.loads(extra[META_FILE])


# ----------------------------------------------------------------------------- 2. exported == eager

CASES = [("image", "stmd", 2, 2), ("gmm-stmd", "stmd", 2, 2), ("gmm-meanflow", "meanflow", 1, 2),
         ("gmm-ddpm", "ddpm", 3, 1)]


@pytest.mark.parametrize("run, method, steps, flow_steps", CASES, ids=[c[0] for c in CASES])
def test_exported_program_equals_the_eager_sampler(capsys, runs, exported, run, method, steps, flow_steps):
    path = exported(run, steps, flow_steps)
    program, meta = load_program(path)
    model = stmd_fast.load_checkpoint(runs[run])  # EMA weights
    assert meta["format"] == EXPORT_FORMAT and meta["stmd_fast_version"] == stmd_fast.__version__
    assert (meta["method"], meta["steps"], meta["flow_steps"], meta["grid"], meta["batch"]) == \
        (method, steps, flow_steps, None if method == "meanflow" else model.grid, 4)  # by default the run's grid
    assert Path(meta["checkpoint"]).is_absolute() and Path(meta["checkpoint"]).samefile(find_checkpoint(runs[run]))
    assert tuple(meta["data_shape"]) == model.data_shape and meta["data_kind"] == model.data_kind
    names = list(sampling.sampler_plan(method, steps, flow_steps).noise_names)
    assert meta["noise"] == names
    assert meta["inputs"] == [{"name": "noise", "shape": [len(names), 4, *model.data_shape], "dtype": "float32"}]
    # only aten ops: the graph needs no stmd_fast code (Triton custom ops would live in another namespace)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert all(t.startswith("aten.") or t == "<built-in function getitem>" for t in targets), targets

    noise = torch.stack(sampling.draw_sampler_noise(method, 4, model.data_shape, steps, flow_steps, gen(11)))
    out = program.module()(noise)
    assert out.shape == (4, *model.data_shape)
    torch.testing.assert_close(out, sampling.sample_from_noise(model.net, method, noise, steps, flow_steps, model.grid),
                               **TIGHT)
    torch.testing.assert_close(out, model.sample(4, steps, flow_steps, gen(11)), **TIGHT)
    assert not torch.allclose(program.module()(torch.randn_like(noise)), out)  # not folded on the example input


def test_sample_exported_pads_the_last_batch_and_matches_eager(runs, exported, tmp_path):
    """7 samples, noise drawn 5 at a time (as eager --batch-size 5), program batch 4: pieces 4 + 1 and 2."""
    path = exported("gmm-stmd", 2, 2)
    out = tmp_path / "x.npy"
    assert sample_main(["--exported", str(path), "--num", "7", "--seed", "3", "--batch-size", "5", "--out", str(out)]) == 0
    model = stmd_fast.load_checkpoint(runs["gmm-stmd"])
    eager = model.sample(7, 2, 2, gen(3), batch_size=5)
    torch.testing.assert_close(torch.from_numpy(np.load(out)), eager, **TIGHT)


def test_sample_exported_png_grid(runs, exported, tmp_path):
    out = tmp_path / "grid.png"
    assert sample_main(["--exported", str(exported("image", 2, 2)), "--num", "6", "--out", str(out)]) == 0
    assert tuple(read_png(out).shape[-2:]) == (19, 28)  # 2 x 3 tiles of 8 x 8, 1-pixel padding


# ----------------------------------------------------------------------------- 3. a fresh process

def test_saved_program_reloads_in_a_fresh_process_via_the_sample_cli(runs, exported, tmp_path):
    path = exported("image", 2, 2)
    out = tmp_path / "fresh.npy"
    result = run_cli("-m", "stmd_fast.sample", "--exported", path, "--num", 6, "--seed", 5, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "6 samples (exported stmd, N=2, M=2" in result.stdout
    eager = stmd_fast.load_checkpoint(runs["image"]).sample(6, 2, 2, gen(5), batch_size=256)
    torch.testing.assert_close(torch.from_numpy(np.load(out)), eager, **TIGHT)


def test_saved_program_runs_with_torch_alone(exported, tmp_path):
    """torch.export.load + .module() in a process that never imports stmd_fast."""
    path = exported("image", 2, 2)
    program, meta = load_program(path)
    noise = torch.randn(*meta["inputs"][0]["shape"], generator=gen(0))
    torch.save({"noise": noise, "out": program.module()(noise)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        io = torch.load({str(tmp_path / "io.pt")!r})
        out = torch.export.load({str(path)!r}).module()(io["noise"])
        torch.testing.assert_close(out, io["out"], rtol=0, atol=0)
        assert not any(name.startswith("stmd_fast") for name in sys.modules), "stmd_fast was imported"
        print("ok")
    """)
    result = run_cli("-c", script, cwd=tmp_path)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_sample_exported_does_not_import_the_training_code(exported, tmp_path):
    """The --exported path of sample.py imports neither models, checkpoint, config, objectives nor train
    (nor diffusers / timm): the script fails any import of those modules, the package's own
    __init__ included (it loads Model and load_checkpoint lazily)."""
    path = exported("gmm-stmd", 2, 2)
    out = tmp_path / "x.npy"
    script = textwrap.dedent(f"""
        import sys
        BLOCKED = ("stmd_fast.models", "stmd_fast.checkpoint", "stmd_fast.config", "stmd_fast.objectives",
                   "stmd_fast.train", "stmd_fast.dit", "diffusers", "timm")

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name in BLOCKED or name.startswith(tuple(b + "." for b in BLOCKED)):
                    raise ImportError(f"the exported path imported {{name}}")

        sys.meta_path.insert(0, Block())
        from stmd_fast.sample import main
        assert main(["--exported", {str(path)!r}, "--num", "3", "--out", {str(out)!r}]) == 0
        print("ok")
    """)
    result = run_cli("-c", script, cwd=tmp_path)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
    assert np.load(out).shape == (3, 2)


# ----------------------------------------------------------------------------- 4. AOTInductor

@pytest.fixture(scope="module")
def aoti_package(runs, tmp_path_factory):
    """aoti_package(run) -> (OUT.aoti.pt2 of N=2, M=2, batch 4, what the export printed), built once per
    module (a minute on 2 cores). Skipped only on a machine with no C++ compiler (AOTInductor's
    requirement); where there is one, a failed build fails the test."""
    root = tmp_path_factory.mktemp("aoti")
    cache: dict[str, tuple] = {}

    def get(run: str):
        out = root / f"{run}.pt2"
        if run not in cache:
            printed, errors = io.StringIO(), io.StringIO()
            with redirect_stdout(printed), redirect_stderr(errors):
                rc = export_main([str(a) for a in [runs[run], "--steps", 2, "--flow-steps", 2, "--batch", 4, "--device",
                                                   "cpu", "--aoti", "--out", out]])
            cache[run] = rc, printed.getvalue(), errors.getvalue()
        rc, printed, errors = cache[run]
        if rc != 0:
            assert rc == 1 and out.is_file(), errors  # the program itself is still written
            if not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
                pytest.skip(f"no C++ compiler here, which AOTInductor needs: {errors.strip()}")
            pytest.fail(f"AOTInductor did not build although a C++ compiler is here: {errors.strip()}")
        return export.aoti_path(out), printed

    return get


@pytest.mark.slow
@pytest.mark.parametrize("run", ["gmm-stmd", "image"])
def test_aoti_package_matches_eager(runs, aoti_package, tmp_path, run):
    package, printed = aoti_package(run)
    assert package.is_file() and "AOTInductor package built" in printed
    x = tmp_path / "aoti.npy"
    assert sample_main(["--exported", str(package), "--num", "6", "--seed", "2", "--out", str(x)]) == 0
    eager = stmd_fast.load_checkpoint(runs[run]).sample(6, 2, 2, gen(2))
    torch.testing.assert_close(torch.from_numpy(np.load(x)), eager, **TIGHT)


@pytest.mark.slow
def test_aoti_package_refuses_a_wrong_input(aoti_package, monkeypatch):
    """The package reads its input unchecked unless AOTI_RUNTIME_CHECK_INPUTS=1 (a batch of 2 for its 4: NaNs
    read past the end): the export says so, the loader checks shape and dtype itself and turns the
    package's own checks on for this process."""
    monkeypatch.delenv("AOTI_RUNTIME_CHECK_INPUTS", raising=False)  # restored after the test
    package, printed = aoti_package("gmm-stmd")
    assert "does not check its input" in printed and "AOTI_RUNTIME_CHECK_INPUTS=1" in printed
    run, meta = export.open_exported(package)
    noise = torch.randn(meta["inputs"][0]["shape"], generator=gen(0))
    assert torch.isfinite(run(noise)).all()
    for wrong in (noise[:, :2].contiguous(), noise.double()):
        with pytest.raises(export.ExportError, match=r"takes noise of shape \(4, 4, 2\), float32"):
            run(wrong)
    from torch._inductor import aoti_load_package

    direct = aoti_load_package(str(package))  # as a user would load it, in the same process
    with pytest.raises(RuntimeError):
        direct(noise[:, :2].contiguous())


def test_aoti_build_failure_is_one_line_and_keeps_the_program(capsys, runs, tmp_path, monkeypatch):
    import torch._inductor

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    out = tmp_path / "s.pt2"
    rc = export_main([str(runs["gmm-stmd"]), "--steps", "1", "--batch", "2", "--device", "cpu", "--aoti",
                      "--out", str(out)])
    assert rc == 1
    assert_one_line_error(capsys, "--aoti", "no C++ compiler found", str(out))
    assert out.is_file() and not (tmp_path / "s.aoti.pt2").exists()


# ----------------------------------------------------------------------------- 5. latent models

@pytest.fixture(scope="module")
def latent_program(tmp_path_factory):
    """A tiny DiT latent 'checkpoint' (built, not trained) exported through the API, and a tiny VAE."""
    from diffusers import AutoencoderKL

    from stmd_fast.checkpoint import Model

    root = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(root / "vae")
    net = build_net(NetConfig(kind="dit", width=32, depth=1, heads=2, patch_size=4, time_freqs=16), (4, 8, 8),
                    True, 3).eval().requires_grad_(False)
    latent = {"vae": str(root / "vae"), "scaling_factor": 0.7, "shift_factor": 0.1, "resolution": 16}
    model = Model(net, "stmd", (4, 8, 8), "latent", {"latent": latent, "step": 1})
    program, meta = export.export_sampler(model, 2, 1, 3)
    export.save(program, meta, root / "latent.pt2")
    return model, root / "latent.pt2", root / "vae"


def test_latent_program_returns_latents_and_sample_decodes_with_vae(capsys, latent_program, tmp_path):
    from stmd_fast.data.encode import load_vae
    from stmd_fast.data.latents import decode_latents

    model, path, vae_dir = latent_program
    _, meta = load_program(path)
    assert meta["data_kind"] == "latent" and meta["output"]["is"] == "latents (not decoded)"
    assert meta["latent"] == {"vae": str(vae_dir), "scaling_factor": 0.7, "shift_factor": 0.1, "resolution": 16,
                              "vae_sha256": None}  # the model's metadata records none
    eager = model.sample(4, 2, 1, gen(0), batch_size=256)
    assert sample_main(["--exported", str(path), "--num", "4", "--out", str(tmp_path / "z.npy")]) == 0
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "z.npy")), eager, **TIGHT)

    assert sample_main(["--exported", str(path), "--num", "4", "--out", str(tmp_path / "x.png")]) == 2
    assert_one_line_error(capsys, "latents", "--vae", str(vae_dir))
    assert sample_main(["--exported", str(path), "--num", "4", "--vae", str(vae_dir), "--out", str(tmp_path / "x.png")]) == 0
    images = decode_latents(load_vae(str(vae_dir), torch.device("cpu")), eager, 0.7, 0.1)
    expected = tmp_path / "expected.png"
    from stmd_fast.sample import write_samples

    write_samples(images, expected)
    diff = (read_png(tmp_path / "x.png").int() - read_png(expected).int()).abs()
    assert diff.max() <= 1  # 8-bit rounding of values equal to fp32 precision


# ----------------------------------------------------------------------------- 6. bad input

def export_args(run: Path, out: Path, *extra) -> list[str]:
    return [str(a) for a in [run, "--device", "cpu", "--out", out, *extra]]


@pytest.mark.parametrize("run, extra, words", [
    ("gmm-meanflow", ["--steps", 2], ["Mean Flow", "(--steps) = 1"]),
    ("gmm-ddpm", ["--steps", 2, "--flow-steps", 3], ["DDPM", "--flow-steps"]),
    ("gmm-stmd", ["--steps", 0], ["(--steps) >= 1"]),
    ("gmm-stmd", ["--flow-steps", -1], ["(--flow-steps) >= 1"]),
    ("gmm-stmd", ["--batch", 0], ["--batch", "at least 1"]),
], ids=["meanflow-N2", "ddpm-M3", "N0", "M-1", "batch0"])
def test_export_refuses_bad_settings(capsys, runs, tmp_path, run, extra, words):
    out = tmp_path / "s.pt2"
    assert export_main(export_args(runs[run], out, *extra)) == 2
    assert_one_line_error(capsys, *words)
    assert not out.exists()


def test_export_refuses_a_checkpoint_without_ema_weights(capsys, runs, tmp_path):
    src = sorted((runs["gmm-stmd"] / "checkpoints").glob("step_*"))[-1]
    ckpt = tmp_path / src.name
    shutil.copytree(src, ckpt)
    (ckpt / "ema.safetensors").unlink()
    out = tmp_path / "s.pt2"
    assert export_main(export_args(ckpt, out)) == 2
    assert_one_line_error(capsys, "ema.safetensors", str(ckpt))
    assert not out.exists()


def test_export_bakes_in_the_ema_it_is_asked_for(capsys, tmp_path):
    run = tmp_path / "run"
    assert train_main([str(a) for a in ["--preset", "gmm", "--batch-size", 16, "--steps", 3, "--ema-decays", 0.5,
                                        "--device", "cpu", "--out", run]]) == 0
    noise = torch.stack(sampling.draw_sampler_noise("stmd", 4, (2,), 1, 1, gen(3)))
    outputs = {}
    for ema in (None, 0.5):
        path = tmp_path / f"{ema}.pt2"
        assert export_main(export_args(run, path, "--batch", 4, *(["--ema", ema] if ema else []))) == 0
        program, meta = load_program(path)
        model = stmd_fast.load_checkpoint(run, ema=ema)
        assert meta["ema_decay"] == (ema or model.meta["config"]["ema_decay"])
        outputs[ema] = program.module()(noise)
        torch.testing.assert_close(outputs[ema], sampling.sample_from_noise(model.net, "stmd", noise, 1, 1, model.grid),
                                   **TIGHT)
    assert not torch.allclose(outputs[None], outputs[0.5])  # two averages, two programs
    capsys.readouterr()
    assert export_main(export_args(run, tmp_path / "new" / "deeper" / "x.pt2", "--ema", 0.3)) == 2
    assert_one_line_error(capsys, "--ema 0.3", "0.5")
    assert not (tmp_path / "new").exists()  # the folders --out's check made are gone with the refusal

    # the Python API's metadata says what the network holds: raw weights were labelled "ema", and the checkpoint
    # and decay were filled in by the command alone
    for weights, ema, decay in (("model", None, None), ("ema", 0.5, 0.5), ("ema", None, 0.999)):
        model = stmd_fast.load_checkpoint(run, weights=weights, ema=ema)
        meta = export.export_sampler(model, 1, 1, 2)[1]
        assert (meta["weights"], meta["ema_decay"]) == (weights, decay)
        assert Path(meta["checkpoint"]).samefile(find_checkpoint(run))
    with pytest.raises(TypeError, match="ema must be a number .* got '0.5'"):
        stmd_fast.load_checkpoint(run, ema="0.5")  # was: "--ema 0.5: ... keeps the EMA decays 0.999, 0.5"
    for batch in (2.0, "4", True):
        with pytest.raises(TypeError, match="batch must be a whole number"):
            export.export_sampler(model, 1, 1, batch)
    with pytest.raises(ValueError, match="unknown time grid ''"):
        export.export_sampler(model, 1, 1, 2, grid="")  # "" was the run's grid, where Model.sample refuses it
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        export.sample_exported(lambda x: x, meta, 2, None)


def test_a_pt2_with_damaged_bytes_is_refused_not_sampled(capsys, exported, tmp_path):
    """torch.export.load reads members without their CRC: flipped bits in a weight loaded and gave wrong
    samples without a word."""
    import zipfile

    good = exported("gmm-stmd", 2, 2)
    with zipfile.ZipFile(good) as archive:
        info = next(i for i in archive.infolist() if "/data/weights/" in i.filename and i.file_size >= 16)
    data = bytearray(good.read_bytes())
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len  # the member's bytes, after its local header
    data[start:start + 16] = bytes(b ^ 0x40 for b in data[start:start + 16])
    damaged = tmp_path / "damaged.pt2"
    damaged.write_bytes(bytes(data))
    out = tmp_path / "x.npy"
    assert sample_main(["--exported", str(damaged), "--out", str(out)]) == 2
    assert_one_line_error(capsys, "damaged.pt2 is damaged", info.filename, "CRC", "export it again")
    assert not out.exists()


@pytest.mark.parametrize("case", ["under-a-file", "a-directory", "not-pt2", "no-name"])
def test_export_refuses_an_unwritable_out(capsys, runs, tmp_path, case):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    (tmp_path / "d.pt2").mkdir()
    out = {"under-a-file": blocker / "s.pt2", "a-directory": tmp_path / "d.pt2", "not-pt2": tmp_path / "s.pt",
           "no-name": tmp_path / ".pt2"}[case]
    assert export_main(export_args(runs["gmm-stmd"], out)) == 2
    assert_one_line_error(capsys, "--out", {"under-a-file": "file.txt is a file, not a directory",
                                            "a-directory": "directory", "not-pt2": ".pt2",
                                            "no-name": "a file name ending in .pt2 (e.g. sampler.pt2), got .pt2"}[case])
    assert blocker.read_text() == "x" and not (tmp_path / "s.pt").exists()


def test_export_refuses_a_missing_checkpoint(capsys, tmp_path, exported):
    assert export_main(export_args(tmp_path / "nothing", tmp_path / "s.pt2")) == 2
    assert_one_line_error(capsys, "nothing does not exist")
    program = exported("gmm-stmd", 2, 2)  # a sampler given where a run goes
    for command in (export_main, sample_main):
        assert command(export_args(program, tmp_path / "x.pt2")[:3]) == 2
        assert_one_line_error(capsys, "is an exported sampler", f"--exported {program}")


def test_a_num_beyond_memory_is_refused_before_sampling(capsys, runs, exported, tmp_path):
    """--num 1e12 sampled for as long as memory lasted, exported or not: the output alone is 8 TB here."""
    for source in ([str(runs["gmm-stmd"])], ["--exported", str(exported("gmm-stmd", 2, 2))]):
        assert sample_main([*source, "--num", str(10**12), "--out", str(tmp_path / "x.npy")]) == 2
        assert_one_line_error(capsys, f"--num {10**12}", "GB as float32", "lower --num")
    # a .png grid is kept zoom^2 times larger: 10^6 digits (0.26 GB) at --zoom 64 are over 1 TB
    assert sample_main([str(runs["image"]), "--num", str(10**6), "--zoom", "64", "--out", str(tmp_path / "x.png")]) == 2
    assert_one_line_error(capsys, f"--num {10**6}", "GB as float32")


def test_sample_refuses_another_export_format(capsys, exported, tmp_path):
    program, meta = load_program(exported("gmm-stmd", 2, 2))
    tampered = tmp_path / "old.pt2"
    torch.export.save(program, str(tampered), extra_files={META_FILE: json.dumps({**meta, "format": EXPORT_FORMAT + 1})})
    out = tmp_path / "x.npy"
    assert sample_main(["--exported", str(tampered), "--out", str(out)]) == 2
    assert_one_line_error(capsys, f"format {EXPORT_FORMAT + 1}", "re-export")
    assert not out.exists()


def test_a_pt2_whose_metadata_disagrees_with_its_program_is_refused_in_one_line(capsys, exported, tmp_path):
    """The program's batch is static; metadata saying another batch (from another export) fed it noise of that
    size and its own shape guard failed with an AssertionError traceback at the first call."""
    program, meta = load_program(exported("gmm-stmd", 2, 2))
    shape = meta["inputs"][0]["shape"]
    wrong = {**meta, "batch": 8, "inputs": [{**meta["inputs"][0], "shape": [shape[0], 8, *shape[2:]]}]}
    tampered, out = tmp_path / "mixed.pt2", tmp_path / "x.npy"
    torch.export.save(program, str(tampered), extra_files={META_FILE: json.dumps(wrong)})
    assert sample_main(["--exported", str(tampered), "--num", "8", "--out", str(out)]) == 2
    assert_one_line_error(capsys, str(tuple(shape)), "re-export")
    assert not out.exists()


def test_sample_refuses_a_pt2_without_metadata(capsys, tmp_path):
    plain = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(nn.Linear(2, 2), (torch.zeros(1, 2),)), str(plain))
    out = tmp_path / "x.npy"
    assert sample_main(["--exported", str(plain), "--out", str(out)]) == 2
    assert_one_line_error(capsys, META_FILE, "re-export")
    assert not out.exists()


@pytest.mark.parametrize("argv, words", [
    (["--steps", "3"], ["--steps", "baked"]),
    (["--grid", "quadratic", "--flow-steps", "1"], ["--flow-steps", "--grid", "re-export"]),
    (["--num", "0"], ["--num"]),
    (["--vae", "somewhere"], ["--vae", "vectors"]),
    (["--out", "x.png"], ["vectors", ".npy"]),
    # without CUDA, "re-export with --device cuda" was advice that cannot work
    (["--device", "cuda"], ["exported for cpu", "re-export" if torch.cuda.is_available() else "CUDA is not available"]),
    (["--device", "cpu:1"], ["the CPU is one device", "--device cpu"]),  # was taken, as a checkpoint's is not
], ids=["steps", "grid", "num0", "vae-for-vectors", "png-for-vectors", "device", "cpu-index"])
def test_sample_exported_refuses_bad_flags(capsys, exported, tmp_path, argv, words):
    assert sample_main(["--exported", str(exported("gmm-stmd", 2, 2)), *argv]) == 2
    assert_one_line_error(capsys, *words)


@pytest.mark.parametrize("name, words", [("missing.pt2", ["does not exist"]), ("junk.pt2", ["not a .pt2 archive"]),
                                         ("tiny.npy", ["not a .pt2 archive"])])
def test_sample_exported_refuses_a_non_program(capsys, tmp_path, name, words):
    if name != "missing.pt2":
        (tmp_path / name).write_bytes(b"not a program")
    assert sample_main(["--exported", str(tmp_path / name)]) == 2
    assert_one_line_error(capsys, *words)


@pytest.mark.parametrize("source", ["checkpoint", "exported"])
def test_sample_refuses_an_out_under_a_file(capsys, runs, exported, tmp_path, source):
    blocker = tmp_path / "digit.png"
    blocker.write_text("x")
    argv = [str(runs["gmm-stmd"])] if source == "checkpoint" else ["--exported", str(exported("gmm-stmd", 2, 2))]
    assert sample_main([*argv, "--out", str(blocker / "x.npy")]) == 2
    assert_one_line_error(capsys, "--out", "digit.png is a file, not a directory")  # not mkdir's "File exists"
    assert blocker.read_text() == "x"


def test_sample_says_a_directory_is_not_a_file(capsys, runs, tmp_path):
    """A run given to --exported, a folder given to --mask / --inpaint: named as a directory, with what
    to pass instead (not "does not exist")."""
    assert sample_main(["--exported", str(runs["image"])]) == 2
    assert_one_line_error(capsys, "--exported", "is a directory", "CKPT")
    folder = tmp_path / "images"
    folder.mkdir()
    mask = tmp_path / "mask.npy"
    np.save(mask, np.ones((1, 8, 8)))
    out = str(tmp_path / "x.png")
    assert sample_main([str(runs["image"]), "--inpaint", str(mask), "--mask", str(folder), "--out", out]) == 2
    assert_one_line_error(capsys, "--mask", "is a directory", ".png")
    assert sample_main([str(runs["image"]), "--inpaint", str(folder), "--mask", str(mask), "--out", out]) == 2
    assert_one_line_error(capsys, "--inpaint", "is a directory", ".png")


class Terminal(io.StringIO):
    """stderr as a terminal: where tqdm draws its bar (disable=None hides it elsewhere)."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("source", ["checkpoint", "exported"])
def test_sample_shows_progress_per_batch_on_a_terminal_only(capsys, runs, exported, tmp_path, monkeypatch, source):
    argv = [str(runs["gmm-stmd"]), "--steps", "2", "--flow-steps", "2"] if source == "checkpoint" else \
        ["--exported", str(exported("gmm-stmd", 2, 2))]
    argv += ["--num", "5", "--batch-size", "2", "--seed", "3", "--out", str(tmp_path / "x.npy")]
    import tqdm

    class EveryUpdate(tqdm.tqdm):  # draws every update, not one per 0.1 s
        def __init__(self, *args, **kwargs):
            super().__init__(*args, mininterval=0, **kwargs)

    terminal = Terminal()
    with monkeypatch.context() as patch:
        patch.setattr(tqdm, "tqdm", EveryUpdate)
        patch.setattr(sys, "stderr", terminal)
        assert sample_main(argv) == 0
    assert sorted(set(re.findall(r"(\d+)/5 ", terminal.getvalue())), key=int) == ["0", "2", "4", "5"]  # 3 batches
    # the batches are those of the sampler's own batching: the same samples
    eager = stmd_fast.load_checkpoint(runs["gmm-stmd"]).sample(5, 2, 2, gen(3), batch_size=2)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "x.npy")), eager, **TIGHT)
    capsys.readouterr()
    assert sample_main(argv) == 0
    assert capsys.readouterr().err == ""  # not a terminal (a log, a pipe): no bar


def test_sample_needs_a_checkpoint_or_exported(capsys, runs, exported):
    assert sample_main([]) == 2
    assert_one_line_error(capsys, "--exported")
    assert sample_main([str(runs["gmm-stmd"]), "--exported", str(exported("gmm-stmd", 2, 2))]) == 2
    assert_one_line_error(capsys, "not both")


def test_export_says_before_tracing_when_it_unrolls_many_network_calls(capsys, runs, tmp_path, monkeypatch):
    """DDPM's default N = 100 traced for minutes without a word (a few-step sampler is what export is for)."""
    from stmd_fast.export import FEW_STEPS, unrolled_note

    assert unrolled_note("stmd", 4, 4) is None and unrolled_note("meanflow", 1, FEW_STEPS) is None
    assert "unrolls 100 network calls" in unrolled_note("ddpm", 100, 1)
    assert "unrolls 18 network calls" in unrolled_note("stmd", 9, 2)

    def stops_before_tracing(*a, **k):  # the note comes first
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export_sampler", stops_before_tracing)
    assert export.main(export_args(runs["gmm-ddpm"], tmp_path / "d.pt2")) == 130
    assert "note: ddpm N=100 M=1 unrolls 100 network calls" in capsys.readouterr().err


def test_a_batch_that_cannot_fit_in_memory_is_refused_before_tracing(capsys, runs, tmp_path, monkeypatch):
    """--batch 100000000 traced for a while, then ran out of memory; now one line before the network is built."""
    import stmd_fast.devices as devices
    import stmd_fast.export as export_module

    monkeypatch.setattr(devices, "physical_memory", lambda: 16 * 2**30)
    monkeypatch.setattr(export_module, "export_sampler", lambda *a, **k: pytest.fail("traced before the check"))
    out = tmp_path / "x.pt2"
    assert export_main([str(runs["image"]), "--steps", "2", "--batch", "100000000", "--out", str(out)]) == 2
    assert_one_line_error(capsys, "--batch 100000000: the program's noise and samples alone take 154 GB",
                          "lower --batch")
    assert not out.exists()


def test_export_help_states_the_static_batch(capsys):
    assert export_main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "exactly this many samples per call" in text and "pad" in text and "latents" in text


def test_a_vae_of_another_latent_shape_is_refused_before_sampling(capsys, latent_program, tmp_path, monkeypatch):
    """A VAE whose latents have 8 channels cannot decode this program's 4: one line, before any sampling."""
    from diffusers import AutoencoderKL

    _, path, _ = latent_program
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=8, norm_num_groups=4).save_pretrained(tmp_path / "wide")
    monkeypatch.setattr(export, "sample_exported", lambda *a: pytest.fail("sampled before checking the VAE"))
    assert sample_main(["--exported", str(path), "--num", "4", "--vae", str(tmp_path / "wide"),
                        "--out", str(tmp_path / "x.png")]) == 2
    assert_one_line_error(capsys, "makes 8x8x8 latents from 16-pixel images, and this model's are 4x8x8")


def test_library_calls_leave_the_callers_state_alone(runs, exported):
    """load_checkpoint does not draw from the global RNG (its initial weights are overwritten);
    export_sampler gives the network back in the mode it had; a CUDA device on a machine without
    one is refused before any file is read; sample_exported refuses empty counts in one line."""
    torch.manual_seed(5)
    state = torch.get_rng_state()
    model = stmd_fast.load_checkpoint(runs["gmm-stmd"])
    assert torch.equal(torch.get_rng_state(), state)
    model.net.train()
    export.export_sampler(model, 1, 1, 2)
    assert model.net.training
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device cuda: CUDA is not available on this machine: use device cpu"):
            stmd_fast.load_checkpoint(runs["gmm-stmd"] / "no-such-folder", device="cuda")
    run, meta = export.open_exported(exported("gmm-stmd", 1, 1))
    for num, batch_size in ((0, 4), (-3, 4), (4, 0)):
        with pytest.raises(ValueError, match="need num >= 1 and batch_size >= 1"):
            export.sample_exported(run, meta, num, gen(0), batch_size)
