"""STMD's exactness on a Gaussian mixture (math.md section 8): the learned transition p(x_{s'} | x_s)
measured against the exact one, which the mixture's closed-form posterior samples (the data law
itself, GaussianMixture and the gmm preset's default_mixture, is in data/gmm.py beside the other
data sources). Also here: the two sample-based distances used for that comparison, and
`python -m stmd_fast.gmm`.
"""
from __future__ import annotations

if __name__ == "__main__":  # a stop signal while torch and the rest import (seconds): one line, not a traceback
    from stmd_fast.startup import stop_quietly_while_importing

    stop_quietly_while_importing()

import math

import torch

from .cli import Parser, one_line_errors
from .methods import METHODS
from .sampling import check_steps
from .data.gmm import GaussianMixture, _device_of, default_mixture  # noqa: F401 (GaussianMixture: importable from here too)
from .schedule import alpha_sigma


def _flat64(x) -> torch.Tensor:
    x = torch.as_tensor(x).double()
    return x.reshape(x.shape[0], -1) if x.ndim != 1 else x.reshape(-1, 1)


def _mean_distance(x: torch.Tensor, y: torch.Tensor, within: bool, chunk_elems: int = 1 << 24) -> float:
    """Mean Euclidean |x_i - y_j| over all pairs, or over i != j when x is y (within=True).
    Row-chunked so that n x m never has to fit in memory at once."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    rows = max(1, chunk_elems // max(1, y.shape[0]))
    for start in range(0, x.shape[0], rows):
        # The direct (non-matmul) path: exact zeros on the diagonal, no cancellation.
        d = torch.cdist(x[start:start + rows], y, compute_mode="donot_use_mm_for_euclid_dist")
        total += d.sum()
    n, m = x.shape[0], y.shape[0]
    pairs = n * (n - 1) if within else n * m  # the diagonal is exactly 0, so drop it from the count
    return float(total) / pairs


def energy_distance(x, y) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Euclidean), in float64.

    The U-statistic: the within-set terms average over i != j only, which makes it unbiased,
    so it fluctuates around 0 (and can be slightly negative) when the two laws are equal.
    x: (n, ...), y: (m, ...); trailing dimensions are flattened; n, m >= 2.
    """
    x, y = _flat64(x), _flat64(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("energy distance (U-statistic) needs at least 2 samples in each set")
    y = y.to(x.device)
    return 2 * _mean_distance(x, y, False) - _mean_distance(x, x, True) - _mean_distance(y, y, True)


def sliced_w2(x, y, projections: int = 256, generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-2 between two equal-size sample sets, in float64:
    sqrt(mean over random unit directions theta of W2^2(theta.x, theta.y)), where each 1-D W2^2
    is the mean squared difference of the sorted projections. Directions are drawn with
    `generator` (on its device) and moved to x's device."""
    x, y = _flat64(x), _flat64(y)
    if x.shape != y.shape:
        raise ValueError(f"sliced_w2 needs equal-size sets of equal dimension, got {tuple(x.shape)} and {tuple(y.shape)}")
    theta = torch.randn(projections, x.shape[1], generator=generator, device=_device_of(generator), dtype=torch.float64)
    theta = (theta / theta.norm(dim=1, keepdim=True)).to(x.device)
    # (P, n): sorting along the contiguous last dim is several times faster than along dim 0.
    px = torch.sort(theta @ x.T, dim=1).values
    py = torch.sort(theta @ y.to(x.device).T, dim=1).values
    return float(((px - py) ** 2).mean().sqrt())


def default_kernel_pairs() -> list[tuple[float, float]]:
    """The default (s_from, s_to) grid of kernel_grid: s_from in (0.2, 0.5, 0.8, 1.0),
    s_to in (0.0, 0.1, 0.3, 0.6), keeping s_to < s_from (13 pairs)."""
    return [(s_from, s_to) for s_from in (0.2, 0.5, 0.8, 1.0) for s_to in (0.0, 0.1, 0.3, 0.6) if s_to < s_from]


def _check_pairs(pairs) -> list[tuple[float, float]]:
    """(s_from, s_to) pairs as floats with 0 <= s_to < s_from <= 1, no repeats; ValueError naming a bad one."""
    checked = []
    for pair in pairs:
        try:
            s_from, s_to = (float(s) for s in pair)
        except (TypeError, ValueError):
            raise ValueError(f"a pair must be two numbers (s_from, s_to), got {pair!r}") from None
        if not 0.0 <= s_to < s_from <= 1.0:  # also refuses NaN
            raise ValueError(f"bad pair (s_from, s_to) = {pair!r}: need 0 <= s_to < s_from <= 1")
        if (s_from, s_to) in checked:
            raise ValueError(f"pair (s_from, s_to) = {pair!r} is given twice")
        checked.append((s_from, s_to))
    if not checked:
        raise ValueError("need at least one (s_from, s_to) pair")
    return checked


def _check_flow_steps(model, flow_steps) -> list[int]:
    """M values as a list of distinct ints >= 1 that the model's method takes (a bare int is one M)."""
    if isinstance(flow_steps, int):
        flow_steps = [flow_steps]
    try:
        steps = [int(m) for m in flow_steps]
    except (TypeError, ValueError):
        steps = None
    if not steps or any(isinstance(f, bool) or m != f for m, f in zip(steps, flow_steps)):
        raise ValueError(f"flow_steps must be a non-empty list of integers, got {flow_steps!r}")
    if len(set(steps)) != len(steps):
        raise ValueError(f"flow_steps has repeats: {flow_steps!r}")
    for m in steps:
        check_steps(model.method, 1, m)  # M >= 1, and DDPM takes only M = 1: refuse before any work
    return steps


def _kernel_distances(model, mixture: GaussianMixture, s_from: float, s_to: float, flow_steps: list[int],
                      points: int, num: int, seed: int, on_state=None, sliced: bool = True) -> list[dict]:
    """kernel_grid's rows for one (s_from, s_to) pair, one per M in flow_steps (checked by the caller).

    Random streams, all seeded from `seed` alone, so a pair's numbers do not depend on which
    other pairs or M share the grid: one CPU generator draws the `points` states x_{s_from} (the
    same states for every pair with this s_from), then per state the exact reference draw, the
    model's seed, the mean-bridge draw and the independent exact draw (the floor). The model
    gets a fresh generator on its device from that seed for every M (common random numbers
    across M). Sliced W2 uses the same directions (from `seed`) for every comparison;
    sliced=False skips it (the sw2_* entries are then NaN).
    """
    g = torch.Generator().manual_seed(seed)
    alpha, sigma = (float(c) for c in alpha_sigma(torch.tensor(s_from)))
    states = alpha * mixture.sample(points, g) + sigma * torch.randn(points, *mixture.shape, generator=g)

    def distances(x, y) -> tuple[float, float]:
        sw = sliced_w2(x, y, generator=torch.Generator().manual_seed(seed)) if sliced else math.nan
        return energy_distance(x, y), sw

    base = {"energy_mean_bridge": 0.0, "energy_floor": 0.0, "sw2_mean_bridge": 0.0, "sw2_floor": 0.0}
    learned = {m: [0.0, 0.0] for m in flow_steps}
    for x in states:
        xs = x.expand(num, -1).contiguous()
        exact = mixture.exact_transition(xs, s_from, s_to, g)
        model_seed = int(torch.randint(2**31, (1,), generator=g))
        mean = mixture.mean_transition(xs, s_from, s_to, g)
        floor = mixture.exact_transition(xs, s_from, s_to, g)
        for m in flow_steps:
            out = model.transition(xs.to(model.device), s_from, s_to, flow_steps=m,
                                   generator=torch.Generator(model.device).manual_seed(model_seed))
            ed, sw = distances(out.detach().cpu(), exact)
            learned[m][0] += ed
            learned[m][1] += sw
        for name, y in (("mean_bridge", mean), ("floor", floor)):
            ed, sw = distances(y, exact)
            base[f"energy_{name}"] += ed
            base[f"sw2_{name}"] += sw
        if on_state is not None:
            on_state()
    base = {k: v / points for k, v in base.items()}
    return [{"s_from": s_from, "s_to": s_to, "flow_steps": m,
             "energy_model": learned[m][0] / points, "energy_mean_bridge": base["energy_mean_bridge"],
             "energy_floor": base["energy_floor"], "sw2_model": learned[m][1] / points,
             "sw2_mean_bridge": base["sw2_mean_bridge"], "sw2_floor": base["sw2_floor"]}
            for m in flow_steps]


def _check_sizes(points: int, num: int) -> None:
    if points < 1 or num < 2:
        raise ValueError(f"need points >= 1 and num >= 2 (energy distance is a U-statistic), got {points}, {num}")


def kernel_grid(model, mixture: GaussianMixture, pairs: list[tuple[float, float]], flow_steps: list[int],
                points: int = 8, num: int = 2000, seed: int = 0, progress: bool = True) -> list[dict]:
    """For each (s_from, s_to) with 0 <= s_to < s_from <= 1 and each M in flow_steps: energy distance
    and sliced W2 between the model's transition and the exact kernel p(x_{s_to} | x_{s_from}),
    averaged over `points` conditioning states drawn from the forward marginal at s_from (`num`
    draws each); plus the same for the exact-posterior-mean bridge (the best DDPM step; independent
    of M) and the exact-vs-exact noise floor. s_to = 0 compares posterior samples x0_hat.

    Returns one row per (pair, M), pairs outer, in the order given:
    {"s_from", "s_to", "flow_steps", "energy_model", "energy_mean_bridge", "energy_floor",
     "sw2_model", "sw2_mean_bridge", "sw2_floor"}.
    Deterministic in `seed`; a pair's numbers are the same whatever else is in the grid (and
    match transition_distances for that pair, M and seed). progress: a tqdm bar over
    pairs x states (shown on a terminal only, like the trainer's).
    """
    from tqdm import tqdm

    pairs = _check_pairs(pairs)
    flow_steps = _check_flow_steps(model, flow_steps)
    _check_sizes(points, num)
    rows = []
    with tqdm(total=len(pairs) * points, unit="state", desc="kernel grid", dynamic_ncols=True,
              disable=None if progress else True) as bar:
        for s_from, s_to in pairs:
            bar.set_postfix_str(f"s {s_from:g} -> {s_to:g}")
            rows += _kernel_distances(model, mixture, s_from, s_to, flow_steps, points, num, seed,
                                      on_state=lambda: bar.update(1))
    return rows


def transition_distances(model, mixture: GaussianMixture, s_from: float = 0.5, s_to: float = 0.1,
                         flow_steps: int = 1, points: int = 8, num: int = 2000, seed: int = 0) -> dict:
    """Energy distances to the exact kernel p(x_{s_to} | x_{s_from}), averaged over `points`
    conditioning states x_{s_from} drawn from the forward marginal, `num` draws each:
      learned       the model's transition (stmd_fast.Model.transition) vs exact;
      mean_bridge   the best possible DDPM step (bridge with the exact posterior mean) vs exact;
      exact_floor   exact vs an independent exact draw (the sampling-noise floor).
    One cell of kernel_grid (same seed, same numbers).
    """
    (s_from, s_to), = _check_pairs([(s_from, s_to)])
    _check_sizes(points, num)
    row, = _kernel_distances(model, mixture, s_from, s_to, _check_flow_steps(model, [flow_steps]), points, num, seed,
                              sliced=False)
    return {"learned": row["energy_model"], "mean_bridge": row["energy_mean_bridge"], "exact_floor": row["energy_floor"]}


def posterior_grid(models: dict, mixture: GaussianMixture, matrix, sigma_y: float, steps: list[int],
                   particles: list[int], observations: int = 4, runs: int = 1000, flow_steps: int = 1, seed: int = 0,
                   progress: bool = True, grid: str = "uniform") -> list[dict]:
    """Energy distance between posterior samplers and the exact p(x_0 | y) (GaussianMixture.observe)
    for y = A x_0 + sigma_y n, averaged over `observations` y's (x_0 drawn from the mixture, seeded).

    models: label -> stmd_fast.Model (DDPM runs with M = 1, the others with flow_steps). For each model, N in `steps` and K in `particles`: SMC
    (stmd_fast.smc) with K particles, `runs` independent runs per y, one weighted draw per run;
    and DDNM+ (operators.DDNM in the sampler loop, `runs` chains) where it corrects any step (N >= 2, not Mean
    Flow: operators.conditions). Each distance compares `runs`
    draws with `runs` exact draws; the floor row compares two exact sets, and the 'exact kernel' rows run
    SMC over the true transitions (what a perfect STMD would give at that K). Every chain steps on the
    diffusion time grid `grid` (the runs' --sample-grid, where their STMD is trained to step). Returns rows
    {"model", "method", "sampler" ('smc', 'ddnm+' or 'exact'), "N", "K", "energy"}.
    """
    from tqdm import tqdm

    from .operators import DDNM, Matrix, conditions
    from .sampling import sample
    from .smc import network_denoiser, smc_sample

    op = Matrix(matrix)
    g = torch.Generator().manual_seed(seed)
    x0 = mixture.sample(observations, g, torch.float64)
    ys = op.measure(x0, sigma_y, g).float()
    exact = [mixture.observe(matrix, y, sigma_y)[0] for y in ys]
    truth = [post.sample(runs, torch.Generator().manual_seed(seed + 1 + i)) for i, post in enumerate(exact)]
    floor = sum(energy_distance(post.sample(runs, torch.Generator().manual_seed(seed + 10_001 + i)), t)
                for i, (post, t) in enumerate(zip(exact, truth))) / observations
    rows = [{"model": "exact", "method": "exact", "sampler": "exact", "N": None, "K": None, "energy": floor}]
    chains = len(steps) + sum(len(steps) if METHODS[model.method].diffusion else 1 for model in models.values())
    total = chains * (len(particles) + 1) * observations
    with tqdm(total=total, unit="cell", desc="posterior grid", disable=None if progress else True) as bar:
        # SMC over the exact transitions (x0_hat ~ the true p(x_0 | x_s)): what a perfect STMD would give at each K
        for n in steps:
            for k in particles:
                energy = 0.0
                for i, y in enumerate(ys):
                    gen = torch.Generator().manual_seed(seed + 100 * i + k)
                    r = smc_sample(lambda x, step, g: mixture.posterior_sample(x, step.s_from, g), "stmd", op,
                                   y.expand(runs, -1), sigma_y, k, mixture.shape, n, 1, gen, grid)
                    energy += energy_distance(r.draw(gen), truth[i]) / observations
                    bar.update(1)
                rows.append({"model": "exact kernel", "method": "exact", "sampler": "smc", "N": n, "K": k,
                             "energy": energy})
            bar.update(observations)
        for label, model in models.items():
            m = 1 if model.method == "ddpm" else flow_steps  # DDPM makes x0_hat in one call
            denoise = network_denoiser(model.net, model.method, m)
            for n in steps:
                if not METHODS[model.method].diffusion and n != 1:  # Mean Flow: one flow map from s = 1, no N
                    continue
                check_steps(model.method, n, m)
                corrects = conditions(model.method, n)  # not at N = 1, nor for Mean Flow
                cells = {k: 0.0 for k in particles}
                ddnm = 0.0
                for i, y in enumerate(ys):
                    y = y.to(model.device)
                    for k in particles:
                        gen = torch.Generator(model.device).manual_seed(seed + 100 * i + k)
                        r = smc_sample(denoise, model.method, op, y.expand(runs, -1), sigma_y, k, mixture.shape, n,
                                       m, gen, grid)
                        cells[k] += energy_distance(r.draw(gen).cpu(), truth[i]) / observations
                        bar.update(1)
                    bar.update(1)
                    if not corrects:
                        continue
                    gen = torch.Generator(model.device).manual_seed(seed + 100 * i)
                    x = sample(model.net, model.method, runs, mixture.shape, n, m, gen, grid,
                               project=DDNM(op, y, sigma_y))
                    ddnm += energy_distance(x.cpu(), truth[i]) / observations
                rows += [{"model": label, "method": model.method, "sampler": "smc", "N": n, "K": k, "energy": e}
                         for k, e in cells.items()]
                if corrects:  # else its chain ignores y: no row (the table's "-"), not a number for the prior
                    rows.append({"model": label, "method": model.method, "sampler": "ddnm+", "N": n, "K": None,
                                 "energy": ddnm})
    return rows


def check_gmm_model(model, run, exact: str = "transition kernel") -> None:
    """The exact `exact` (transition kernel, posterior) is known only for the built-in mixture: refuse any other
    model."""
    if model.meta["config"]["preset"] != "gmm" or model.meta["config"]["data"] is not None:
        raise ValueError(f"{run} was not trained on the built-in gmm preset: the exact {exact} is known only for it "
                         f"(train one with python -m stmd_fast.train --preset gmm)")


@one_line_errors(ValueError, FileNotFoundError)
def main(argv: list[str] | None = None) -> int:
    """python -m stmd_fast.gmm RUN: how close a gmm-preset model's one-step transition is to the exact one."""
    from .checkpoint import load_checkpoint

    p = Parser(prog="python -m stmd_fast.gmm", description=main.__doc__)
    p.add_argument("run", help="run or checkpoint directory of a model trained with --preset gmm")
    p.add_argument("--s-from", type=float, default=0.5, help="the diffusion time the step starts from, in (0, 1] "
                   "[default: 0.5]")
    p.add_argument("--s-to", type=float, default=0.1, help="the time it ends at, in [0, --s-from) [default: 0.1]")
    p.add_argument("--flow-steps", type=int, default=1, help="M of the learned transition [default: 1]")
    p.add_argument("--points", type=int, default=8, help="conditioning states x_s [default: 8]")
    p.add_argument("--num", type=int, default=2000, help="draws per state [default: 2000]")
    p.add_argument("--seed", type=int, default=0, help="seeds the states and the draws [default: 0]")
    args = p.parse_args(argv)
    for flag, value, least in (("--flow-steps", args.flow_steps, 1), ("--points", args.points, 1), ("--num", args.num, 2)):
        if value < least:  # named by this command's flags (the library's checks speak of N, M and num)
            p.error(f"{flag} must be at least {least}, got {value}")
    model = load_checkpoint(args.run)
    check_gmm_model(model, args.run)
    d = transition_distances(model, default_mixture(), args.s_from, args.s_to, args.flow_steps,
                             args.points, args.num, args.seed)
    print(f"energy distance to the exact transition s={args.s_from} -> {args.s_to} "
          f"({args.points} states x {args.num} draws):")
    print(f"  {model.method} (M={args.flow_steps}): {d['learned']:.4f}")
    print(f"  exact-posterior-mean bridge (best DDPM step): {d['mean_bridge']:.4f}")
    print(f"  exact vs exact (noise floor): {d['exact_floor']:.1e}")
    return 0


if __name__ == "__main__":
    from stmd_fast.startup import imports_done, run_and_exit

    imports_done()
    run_and_exit(main)
