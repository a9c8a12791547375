"""The training engine: the JVP on the r < t rows only (same loss and gradients as the full-batch
JVP, MLP / U-Net / DiT, fp32 / bf16, eager / compiled), the fixed-count (r, t) layout and what it
keeps of the sampler, and make_train_step's parts: the foreach EMA (equal to AveragedModel's), the
fused AdamW, and the CUDA-graph code path run on a CPU."""
import math
from functools import partial

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from stmd_fast.models import NetConfig, build_net
from stmd_fast.objectives import METHODS, ObjectiveConfig, compute_loss, draw_noise, jvp_rows
from stmd_fast.engine import make_ema_update, make_optimizer, make_train_step
from stmd_fast.train import main

NETS = {  # (config, data shape): tiny versions of the three networks
    "mlp": (NetConfig(kind="mlp", width=32, depth=2, time_freqs=16), (3,)),
    "unet": (NetConfig(channels=(8, 16), norm_groups=4, head_dim=4, time_freqs=16), (1, 8, 8)),
    "dit": (NetConfig(kind="dit", width=32, depth=2, heads=4, patch_size=2, time_freqs=16), (4, 8, 8)),
}


def tiny_net(kind: str, method: str = "stmd", seed: int = 0):
    """The network with every weight perturbed: the DiT's adaLN-zero (and any zero-initialised
    output layer) would otherwise make u identically 0, and the comparison empty."""
    torch.manual_seed(seed)
    cfg, shape = NETS[kind]
    m = METHODS[method]
    net = build_net(cfg, shape, m.conditional, len(m.times))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3 / math.sqrt(p.shape[-1]))
    return net, shape


def loss_and_grads(loss_fn, net, x0, noise):
    loss, err = loss_fn(x0, noise)
    return loss.detach(), err.detach(), torch.autograd.grad(loss, list(net.parameters()))


def flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


# ----------------------------------------------------------------------------- the (r, t) layout

@pytest.mark.parametrize("fraction, block", [(0.75, (1, 4)), (0.25, (3, 4)), (0.5, (1, 2)), (0.7, (3, 10)),
                                             (0.0, (1, 1)), (1.0, (0, 1))])
def test_jvp_block_is_the_fraction_in_lowest_terms(fraction, block):
    assert ObjectiveConfig(flow_matching_fraction=fraction).jvp_block == block


def test_fixed_count_layout_holds_in_every_slice():
    """The first k rows of every block of P have r < t and the rest r = t exactly, so each of K equal
    slices of a global batch (torchrun's ranks) has the layout a batch of its size has."""
    cfg = ObjectiveConfig()  # 75% r = t: 1 JVP row in every 4
    x0 = torch.zeros(32, 3)
    noise = draw_noise(x0, cfg, torch.Generator().manual_seed(0))
    rows = jvp_rows(32, cfg)
    assert rows.tolist() == [i % 4 == 0 for i in range(32)]
    assert (noise.r[rows] < noise.t[rows]).all() and torch.equal(noise.r[~rows], noise.t[~rows])
    for k in (2, 4, 8):
        for part in rows.chunk(k):
            assert torch.equal(part, jvp_rows(32 // k, cfg))


def test_fixed_count_keeps_the_per_row_law():
    """Over many batches the rows with r < t make up exactly 1 - f of the rows, and their (r, t)
    follow the law unchanged: the max and min of two logit-normal draws."""
    n = 200_000
    nz = draw_noise(torch.zeros(n, 1), ObjectiveConfig(), torch.Generator().manual_seed(1))
    jvp = nz.r < nz.t
    assert int(jvp.sum()) == n // 4  # exactly, not about
    logit = lambda p: torch.log(p.double()) - torch.log1p(-p.double())  # noqa: E731
    tol = 6 / math.sqrt(n / 4)
    assert abs(float(logit(nz.t[jvp]).mean()) - (-0.4 + 1 / math.sqrt(math.pi))) < tol
    assert abs(float(logit(nz.r[jvp]).mean()) - (-0.4 - 1 / math.sqrt(math.pi))) < tol
    # the r = t rows' t is either of the two draws' max: the same law as t on the JVP rows
    assert abs(float(logit(nz.t[~jvp]).mean()) - (-0.4 + 1 / math.sqrt(math.pi))) < tol


def test_fractions_and_batches_that_cannot_be_laid_out_are_one_line_errors():
    with pytest.raises(ValueError, match="no fraction with a denominator"):
        ObjectiveConfig(flow_matching_fraction=0.123456789)
    with pytest.raises(ValueError, match=r"batch per process \(6\) must be a multiple of 4.*e\.g\. 0\.6666666667$"):
        ObjectiveConfig().check_batch(6)
    # a batch of 1 has no fraction strictly between 0 and 1 to suggest (1 would switch the objective off)
    with pytest.raises(ValueError, match=r"batch per process \(1\) must be a multiple of 4: change the batch$"):
        ObjectiveConfig().check_batch(1)
    # 2062 = 2 x 1031: its fractions within a block of at most 1024 rows are 0, 1/2 and 1, and 0.75 rounds to 1
    with pytest.raises(ValueError, match=r"batch per process \(2062\) must be a multiple of 4: change the batch$"):
        ObjectiveConfig().check_batch(2062)


def test_train_step_refuses_a_precision_it_does_not_run():
    net, _ = tiny_net("mlp")
    with pytest.raises(ValueError, match="precision 'fp16': use 'fp32' or 'bf16'"):
        make_train_step(None, net, None, None, None, 0.999, False, "fp16", torch.device("cpu"))


@pytest.mark.parametrize("fraction, batch", [(0.75, 6), (0.3, 256), (0.123456789, 64), (0.1, 3), (0.9, 1000),
                                             (0.75, 2050), (0.3, 3000)])  # batches whose 1/batch is no block
def test_the_fraction_an_error_suggests_is_accepted(fraction, batch):
    """Whatever a refusal suggests is taken as typed (printed, then parsed back as the CLI would), and
    fits the batch it was suggested for; simple fractions typed to 4 decimals are taken as themselves."""
    try:
        ObjectiveConfig(flow_matching_fraction=fraction).check_batch(batch)
        return  # nothing to suggest
    except ValueError as refused:
        suggested = float(str(refused).rsplit("e.g. ", 1)[1])
    ObjectiveConfig(flow_matching_fraction=suggested).check_batch(batch)  # taken at once, not refused in turn
    assert abs(suggested - fraction) <= 0.5 / 4  # as near as a block of 4 rows gets, or nearer
    assert ObjectiveConfig(flow_matching_fraction=0.6667).jvp_block == (1, 3)
    assert ObjectiveConfig(flow_matching_fraction=0.1667).jvp_block == (5, 6)
    assert ObjectiveConfig(flow_matching_fraction=0.667).jvp_block == (333, 1000)  # exact: not taken as 2/3
    net, shape = tiny_net("mlp")
    x0 = torch.randn(6, *shape)
    noise = draw_noise(x0, ObjectiveConfig(), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="multiple of 4"):
        compute_loss("stmd", net, x0, noise, ObjectiveConfig())


def test_trainer_refuses_such_a_batch_before_any_work(capsys, tmp_path):
    # 75% r = t: one r < t row in every block of 4
    assert main(["--preset", "gmm", "--flow-matching-fraction", "0.75", "--batch-size", "6", "--steps", "1",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "multiple of 4" in err[0]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    # the DDPM baseline draws no (r, t) pair for its loss: any batch goes
    assert main(["--preset", "gmm", "--method", "ddpm", "--batch-size", "6", "--steps", "1", "--sample-every", "0",
                 "--out", str(tmp_path / "ddpm")]) == 0


# ----------------------------------------------------------------------------- split == full-batch JVP

def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def assert_split_equals_full(method, kind, bf16, compiled):
    """The split loss (JVP on the r < t rows, a plain forward on the others) against the full-batch
    JVP for the same draws: loss, raw ||delta||^2 and every gradient. fp32: equal to 1e-5. bf16: the
    split differs from the full-batch bf16 step by less than twice what bf16 rounding itself costs
    (the full-batch bf16 step against fp32); compiled, Inductor's own bf16 fusions add to that."""
    net, shape = tiny_net(kind, method)
    cfg = ObjectiveConfig(flow_matching_fraction=0.75, adaptive_p=0.5)  # p < 1: the loss value is informative
    x0 = torch.randn(16, *shape, generator=torch.Generator().manual_seed(2))
    noise = draw_noise(x0, cfg, torch.Generator().manual_seed(3))
    split_fn = partial(compute_loss, method, net, cfg=cfg)
    if compiled:
        from torch._dynamo.testing import CompileCounterWithBackend

        torch._dynamo.reset()
        counter = CompileCounterWithBackend("inductor")
        split_fn = torch.compile(split_fn, backend=counter)
    full_fn = partial(compute_loss, method, net, cfg=cfg, full_batch_jvp=True)
    full32 = loss_and_grads(full_fn, net, x0, noise)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        full = loss_and_grads(full_fn, net, x0, noise)
        split = loss_and_grads(split_fn, net, x0, noise)
    if compiled:  # one graph: a silent fall-back to eager (seen with the plain forward first) is caught here
        assert counter.frame_count == 1
    # teeth: du/dt matters on this batch (flow matching on every row, no du/dt, moves the gradient)
    fm = loss_and_grads(partial(compute_loss, method, net, cfg=ObjectiveConfig(flow_matching_fraction=1.0,
                                                                                adaptive_p=0.5)),
                        net, x0, noise._replace(r=noise.t))
    assert rel(flat(fm[2]), flat(full32[2])) > 1e-2
    for i, (a, b) in enumerate(zip((split[0], split[1], flat(split[2])), (full[0], full[1], flat(full[2])))):
        if not bf16:
            assert rel(a, b) < 1e-5, i
        else:
            bf16_cost = rel(b, (full32[0], full32[1], flat(full32[2]))[i])
            assert rel(a, b) <= (3 if compiled else 2) * bf16_cost + 1e-6, i


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method, kind", [("stmd", "mlp"), ("stmd", "unet"), ("stmd", "dit"), ("meanflow", "unet")])
def test_jvp_on_the_r_less_than_t_rows_equals_the_full_batch_jvp(method, kind, bf16):
    assert_split_equals_full(method, kind, bf16, compiled=False)


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["mlp", "unet", "dit"])
def test_compiled_split_jvp_equals_the_full_batch_jvp(kind, bf16):
    assert_split_equals_full("stmd", kind, bf16, compiled=True)


# ----------------------------------------------------------------------------- EMA, AdamW, the step

class WithBuffers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.register_buffer("scale", torch.ones(3))


@pytest.mark.parametrize("use_buffers", [True, False])
@pytest.mark.parametrize("resumed", [False, True])
def test_foreach_ema_equals_averaged_model(use_buffers, resumed):
    net = WithBuffers()
    reference = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=use_buffers)
    ours = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=use_buffers)
    if resumed:  # a resumed run: the EMA has averaged before, the first update is a lerp, not a copy
        for ema in (reference, ours):
            ema.n_averaged.fill_(5)
    update = make_ema_update(ours, net, 0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        with torch.no_grad():
            for x in (*net.parameters(), net.scale):
                x.add_(torch.randn(x.shape, generator=g))
        reference.update_parameters(net)
        update()
        for a, b in zip((*reference.module.parameters(), *reference.module.buffers()),
                        (*ours.module.parameters(), *ours.module.buffers())):
            assert torch.equal(a, b)
        assert int(ours.n_averaged) == int(reference.n_averaged)
    assert not torch.equal(ours.module.lin.weight, net.lin.weight)  # it averaged, not copied


def test_fused_adamw_matches_the_default_implementation():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    fused = make_optimizer(a, 1e-2, 0.1)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True
    assert make_optimizer(b, 1e-2, 0.1, sharded=True).defaults["fused"] is None  # FSDP: the default path
    x = torch.randn(16, 8)
    for _ in range(5):
        for net, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a.weight, torch.nn.Linear(8, 8).weight)


def run_steps(compile: bool, cuda_graphs: bool, steps: int = 3):
    net, shape = tiny_net("unet")
    cfg = ObjectiveConfig()
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = make_optimizer(net, 1e-3, 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    step = make_train_step(partial(compute_loss, "stmd", net, cfg=cfg), net, optimizer, scheduler, ema, 0.9,
                           compile, "fp32", torch.device("cpu"), cuda_graphs=cuda_graphs)
    g = torch.Generator().manual_seed(4)
    losses = []
    for _ in range(steps):
        x0 = torch.randn(8, *shape, generator=g)
        losses.append(step(x0, draw_noise(x0, cfg, g))[0])
    return torch.stack(losses), flat(net.parameters()).detach(), flat(ema.module.parameters()).detach()


@pytest.mark.slow
def test_train_step_down_the_cuda_graph_path_equals_the_eager_step():
    """cuda_graphs=True on a CPU: the compiled loss under mode="reduce-overhead" (which has no graphs to
    record here), the step-begin marks and the copied outputs give the eager step's losses, weights
    and EMA."""
    eager = run_steps(compile=False, cuda_graphs=False)
    graphed = run_steps(compile=True, cuda_graphs=True)
    torch.testing.assert_close(graphed[0], eager[0], rtol=1e-4, atol=1e-6)
    # Adam divides each gradient by its own RMS: where a gradient is at rounding-noise level
    # (compiled and eager sum in different orders, and CPUs differ) the weight moves by up to lr
    # either way. So the weights are compared on the scale of lr (1e-3), a tenth of it per element...
    for a, b in zip(graphed[1:], eager[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
        # ...and 99% of them must agree to 1e-6, far below what a real difference would give
        assert ((a - b).abs() > 1e-6).float().mean() < 1e-2
    initial = flat(tiny_net("unet")[0].parameters()).detach()
    # three Adam steps move a typical weight by about lr each: the comparison has teeth
    assert (eager[1] - initial).abs().median() > 1e-3


def test_steps_and_the_sampler_make_no_tensor_from_host_values(monkeypatch):
    """On CUDA, torch.tensor(values, device=cuda) copies from the host and waits for the GPU: once per step
    in the noise draws (the grid s sampler, the flow grid) and once per network call in the sampler, so the
    CPU could not queue ahead. After the first step, neither may build a tensor from Python values."""
    import dataclasses

    from stmd_fast.config import MIXTURE_GRID
    from stmd_fast.sampling import sample

    cfg = dataclasses.replace(MIXTURE_GRID, flow_grid_fraction=0.3)
    cfg.s_grid = "quadratic"
    x0, g = torch.randn(8, 3), torch.Generator().manual_seed(0)
    first = draw_noise(x0, cfg, g)
    made, real = [], torch.tensor  # tensors made from Python values onto a device (CPU constants are free)
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: (made.append(a) if k.get("device") is not None else None)
                        or real(*a, **k))
    again = draw_noise(x0, cfg, torch.Generator().manual_seed(0))
    assert made == [] and torch.equal(again.s, first.s) and torch.equal(again.t, first.t)
    net, shape = tiny_net("mlp")
    with torch.no_grad():
        sample(net, "stmd", 4, shape, 2, 2, torch.Generator().manual_seed(1), "quadratic")
    assert made == [], made
