"""Where a trained STMD model's error lies, by diffusion time s, and how hard the adaptive weight makes each s pull.

    python bench/loss_per_s.py runs/samplers/F-stmd-seed0

For --num training digits and each s of the list, draws (r, t) from the run's own time sampler and reports the
per-row error l = ||u - u_tgt||^2 (summed over the image; the quantity the adaptive weight w = 1 / (l + c)^p sees)
on the rows with r < t and on those with r = t. A row's gradient has norm proportional to w sqrt(l), about
l^(1/2 - p): the last columns give that pull relative to the largest s of --s (s = 1 by default), for p = 0.75
and 0.5 (the README's setting P). A "-" marks a kind of row the sampler drew none of at that s.
"""
from __future__ import annotations

if __name__ == "__main__":  # a stop signal while torch and the rest import (seconds): one line, not a traceback
    from stmd_fast.startup import stop_quietly_while_importing

    stop_quietly_while_importing()

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import at_least, diffusion_time, parser, trained_on  # noqa: E402

from stmd_fast.checkpoint import load_checkpoint  # noqa: E402
from stmd_fast.cli import one_line_errors  # noqa: E402
from stmd_fast.data.datasets import load_digits  # noqa: E402
from stmd_fast.objectives import Noise, ObjectiveConfig, _diffuse, draw_noise, meanflow_jvp  # noqa: E402
from stmd_fast.schedule import per_sample  # noqa: E402


@one_line_errors(ValueError, FileNotFoundError)  # a missing run, a run of other data: one line, exit code 2
def main(argv: list[str] | None = None) -> int:
    p = parser("loss_per_s.py", __doc__)
    p.add_argument("run", help="an STMD run on digits (its newest checkpoint, EMA weights)")
    p.add_argument("--s", type=diffusion_time, nargs="+", default=[0.01, 0.0625, 0.25, 0.5625, 1.0],
                   help="diffusion times in (0, 1] at which the error is measured")
    p.add_argument("--num", type=at_least(1), default=2048, help="training digits measured")
    p.add_argument("--seed", type=int, default=0, help="seeds the digits drawn and their noise")
    args = p.parse_args(argv)
    model = load_checkpoint(args.run, device="cpu")
    if model.method != "stmd":
        raise ValueError(f"{args.run} is a {model.method} run; this measures STMD's error per s")
    config = model.meta["config"]
    if config["preset"] != "digits" or config["data"] is not None:  # x0 below are the digits
        raise ValueError(f"{args.run} was trained on {trained_on(model)}: this measures on the digits training "
                         f"set; give an STMD run of --preset digits")
    cfg = ObjectiveConfig(**model.meta["config"]["objective"])  # the run's own samplers
    generator = torch.Generator().manual_seed(args.seed)
    train = load_digits("train").all().float()
    x0 = train[torch.randint(0, len(train), (args.num,), generator=generator)]
    rows = []
    for s_value in args.s:
        noise = draw_noise(x0, cfg, generator)
        s = torch.full_like(noise.s, s_value)
        noise = Noise(s, noise.xi, noise.r, noise.t, noise.e)
        with torch.no_grad():
            u, dudt, v, h = meanflow_jvp(model.net, x0, noise, _diffuse(x0, noise), s)
        l = (u - (v - per_sample(h, x0) * dudt)).square().flatten(1).sum(1)  # noqa: E741
        rows.append((s_value, *(l[rows_of_kind].mean().item() if rows_of_kind.any() else None
                                for rows_of_kind in (h > 0, h == 0))))
    top = max(rows, key=lambda row: row[0])[1]  # at the largest s: the reference of the pull

    def cell(value, width):
        return f"{value:{width}.2f}" if value is not None else f"{'-':>{width}}"

    print(f"{'s':>7} {'l, r < t':>10} {'l, r = t':>10} {'pull p=0.75':>12} {'pull p=0.5':>11}")
    for s_value, l_jvp, l_fm in sorted(rows, key=lambda row: row[0]):
        pulls = [(l_jvp / top) ** (0.5 - p) if l_jvp is not None and top else None for p in (0.75, 0.5)]
        print(f"{s_value:7.4f} {cell(l_jvp, 10)} {cell(l_fm, 10)} {cell(pulls[0], 12)} {cell(pulls[1], 11)}")
    return 0


if __name__ == "__main__":
    from stmd_fast.startup import imports_done, run_and_exit

    imports_done()
    run_and_exit(main)
