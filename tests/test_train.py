"""The trainer: exact resume, compiled == eager, bf16 vs fp32, and STMD's exactness on a
Gaussian mixture (the paper's central claim, measured against the exact kernel)."""
import json
from functools import partial

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stmd_fast import load_checkpoint
from stmd_fast.gmm import default_mixture, transition_distances
from stmd_fast.models import NetConfig, build_net
from stmd_fast.objectives import ObjectiveConfig, compute_loss, draw_noise
from stmd_fast.train import main

TINY_UNET = NetConfig(channels=(8, 16), norm_groups=4, head_dim=4, time_freqs=16)


def run(args: list[str]) -> None:
    assert main(args) == 0


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def image_npy(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (32, 1, 8, 8), dtype=np.uint8)
    path = tmp_path / "images.npy"
    np.save(path, x)
    return path


@pytest.mark.parametrize("kind", ["gmm-mlp", "image-unet"])
def test_resume_equals_uninterrupted_run(tmp_path, kind, image_npy):
    data = ["--preset", "gmm", "--batch-size", "32"] if kind == "gmm-mlp" else ["--data", str(image_npy), "--batch-size", "8"]
    common = data + ["--log-every", "1", "--ckpt-every", "3", "--sample-every", "0", "--warmup-steps", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    run(common + ["--steps", "6", "--out", str(full)])
    run(common + ["--steps", "3", "--out", str(part)])
    run(common + ["--steps", "6", "--out", str(part), "--resume"])

    full_losses = [(m["step"], m["loss"]) for m in metrics(full)]
    part_losses = [(m["step"], m["loss"]) for m in metrics(part)]
    assert [s for s, _ in part_losses] == [1, 2, 3, 4, 5, 6]
    assert part_losses == full_losses  # bit-identical on CPU, the resumed steps 4-6 included
    for weights in ("model.safetensors", "ema.safetensors"):
        a = load_file(full / "checkpoints" / "step_00000006" / weights)
        b = load_file(part / "checkpoints" / "step_00000006" / weights)
        assert all(torch.equal(a[k], b[k]) for k in a)


def _loss_and_grads(loss_fn, net, x0, noise):
    loss, err = loss_fn(x0, noise)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    return loss.detach(), err, grads


@pytest.mark.slow
@pytest.mark.parametrize("method, precision", [("stmd", "fp32"), ("meanflow", "fp32"), ("stmd", "bf16")])
def test_compiled_loss_equals_eager(method, precision):
    """torch.compile of the JVP loss (GroupNorm, attention, time embedding inside) gives the
    eager loss, raw error and gradients; under bf16 autocast up to bf16 rounding."""
    torch.manual_seed(0)
    conditional, times = (True, 3) if method == "stmd" else (False, 2)
    net = build_net(TINY_UNET, (1, 8, 8), conditional, times)
    cfg = ObjectiveConfig(flow_matching_fraction=0.5, adaptive_p=0.5)  # p < 1 so the loss value is informative
    x0 = torch.randn(16, 1, 8, 8)
    noise = draw_noise(x0, cfg, torch.Generator().manual_seed(0))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        eager = _loss_and_grads(partial(compute_loss, method, net, cfg=cfg), net, x0, noise)

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with autocast:
        compiled = _loss_and_grads(torch.compile(partial(compute_loss, method, net, cfg=cfg)), net, x0, noise)
    assert counters["stats"]["unique_graphs"] >= 1, "torch.compile fell back to eager"
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    if precision == "fp32":
        torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-5)  # raw ||delta||^2: the JVP tangent inside
        for gc, ge in zip(compiled[2], eager[2]):
            torch.testing.assert_close(gc, ge, rtol=1e-3, atol=1e-5)
    else:  # Inductor fuses bf16 ops differently from eager, so compare on the bf16 rounding scale
        assert abs(compiled[1] - eager[1]) / eager[1] < 0.03
        flat_c, flat_e = (torch.cat([g.flatten() for g in grads]) for grads in (compiled[2], eager[2]))
        assert torch.nn.functional.cosine_similarity(flat_c, flat_e, dim=0) > 0.99
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in compiled[2])


def test_bf16_autocast_tracks_fp32():
    """bf16 network math (fp32 weights) changes the loss and gradients only by bf16 rounding."""
    torch.manual_seed(0)
    net = build_net(TINY_UNET, (1, 8, 8), True, 3)
    cfg = ObjectiveConfig(flow_matching_fraction=0.5)
    x0 = torch.randn(32, 1, 8, 8)
    noise = draw_noise(x0, cfg, torch.Generator().manual_seed(1))
    loss_fn = partial(compute_loss, "stmd", net, cfg=cfg)
    _, err32, g32 = _loss_and_grads(loss_fn, net, x0, noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, err16, g16 = _loss_and_grads(loss_fn, net, x0, noise)
    assert err16.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g16)
    assert abs(err16 - err32) / err32 < 0.05
    flat32, flat16 = torch.cat([g.flatten() for g in g32]), torch.cat([g.flatten() for g in g16])
    assert torch.nn.functional.cosine_similarity(flat32, flat16, dim=0) > 0.98


@pytest.mark.slow
def test_stmd_transition_beats_best_ddpm_step_on_gmm(tmp_path, capsys):
    """math.md section 8: after brief training on the 2-D mixture, STMD's one-step transition
    s = 0.5 -> 0.1 is closer (energy distance) to the exact kernel than the bridge with the
    exact posterior mean, the best any DDPM step can do."""
    out = tmp_path / "gmm"
    run(["--preset", "gmm", "--steps", "500", "--out", str(out), "--log-every", "250"])
    d = transition_distances(load_checkpoint(out), default_mixture(), 0.5, 0.1, flow_steps=1, points=6, num=1500)
    with capsys.disabled():
        print(f"\ngmm s=0.5->0.1 energy distance: stmd {d['learned']:.4f}, best DDPM step {d['mean_bridge']:.4f}, "
              f"noise floor {d['exact_floor']:.4f}")
    assert d["learned"] < 0.5 * d["mean_bridge"]
    assert abs(d["exact_floor"]) < 0.02


def test_trainer_with_triton_kernels_matches_reference(tmp_path, image_npy):
    """The CUDA code path of the trainer, as far as a CPU can run it: every kernel (time
    embedding, attention, Mean Flow loss) through Triton's interpreter gives the reference
    run's losses and ||delta||^2, step by step."""
    common = ["--data", str(image_npy), "--batch-size", "8", "--steps", "3", "--log-every", "1",
              "--sample-every", "0", "--device", "cpu"]
    run(common + ["--kernels", "reference", "--out", str(tmp_path / "ref")])
    run(common + ["--kernels", "triton", "--out", str(tmp_path / "triton")])
    ref, tri = metrics(tmp_path / "ref"), metrics(tmp_path / "triton")
    assert [m["step"] for m in tri] == [1, 2, 3]
    for a, b in zip(ref, tri):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["delta_sq"] == pytest.approx(a["delta_sq"], rel=1e-4)


@pytest.mark.slow
def test_a_compiled_bf16_unet_does_not_warn_of_diffusers_cached_version_test():
    """diffusers' Upsample2D calls an lru_cached torch-version test in bf16: Dynamo's warning of it is noise
    in every compiled bf16 run, which stmd_fast.models filters at import. In a fresh process, since pytest
    drops the filters a module sets while it is collected; without the filter the warning is there."""
    import subprocess
    import sys

    script = """
import warnings, torch
import stmd_fast.models
from diffusers.models.upsampling import Upsample2D
ours = list(warnings.filters)
up, x = Upsample2D(4, use_conv=True).to(torch.bfloat16), torch.randn(1, 4, 4, 4, dtype=torch.bfloat16)
def lru_warnings(filters):
    torch._dynamo.reset()
    torch._dynamo.utils.warn_once_cache.clear()  # Dynamo warns once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.filters[:] = filters
        torch.compile(up)(x)
    return sum("lru_cache" in str(w.message) for w in caught)
print(lru_warnings([]), lru_warnings(ours))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    without, with_ours = map(int, done.stdout.split())
    assert without > 0 and with_ours == 0


def test_graph_breaks_of_the_compiled_step_are_a_warning_and_earlier_compiles_do_not_count(capsys):
    # a graph break leaves part of the step (the JVP, say) eager and slower: the user is told, with the reason;
    # the counters are the process's, so a compile before this step (a notebook's, a test's) is not blamed on it
    from stmd_fast.train import assert_compiled, compile_counts

    def broken(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()

    torch._dynamo.reset()
    before = compile_counts()
    torch.compile(broken)(torch.ones(3))
    assert_compiled(before)
    captured = capsys.readouterr()
    assert "2 graph(s), 1 graph break(s)" in captured.out
    assert "warning: --compile: 1 graph break(s) leave parts of the step eager" in captured.err
    assert "graph_break" in captured.err.splitlines()[0]  # the reason, on the one line

    def plain(x):
        return x.exp() * 2

    before = compile_counts()
    torch.compile(plain)(torch.ones(3))
    assert_compiled(before)
    captured = capsys.readouterr()
    assert "1 graph(s), 0 graph break(s)" in captured.out and captured.err == ""
    # a second training in one process (a notebook's): Dynamo reuses its compiled graph and makes none
    before = compile_counts()
    torch.compile(plain)(torch.ones(3))
    assert compile_counts()[0] == before[0]
    assert_compiled(before)  # not "produced no graph"
    assert "the graph compiled earlier in this process, 0 graph break(s)" in capsys.readouterr().out


def test_compiled_run_says_it_compiles_and_how_long_also_when_resumed(tmp_path, capsys):
    # the first compiled step takes minutes on a large network (README, Performance): the user is told
    # before it, and how long it took after; a resumed run compiles again and says so too
    common = ["--preset", "gmm", "--batch-size", "32", "--log-every", "1", "--ckpt-every", "1",
              "--sample-every", "0", "--compile", "--out", str(tmp_path / "run")]
    for args in (["--steps", "1"], ["--steps", "2", "--resume"]):
        torch._dynamo.reset()
        run(common + args)
        out = capsys.readouterr().out
        assert "compiling the loss with its JVP and backward" in out
        first_logged = out.index("step 1/") if args[1] == "1" else out.index("step 2/")
        assert out.index("compiling the loss") < out.index("compiled the loss in ") < first_logged
