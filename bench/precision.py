"""How precise is the Mean Flow target when the JVP runs in bf16? (the --precision bf16 choice)

    python bench/precision.py --ckpt runs/digits-stmd      # a trained STMD checkpoint
    python bench/precision.py --smoke                      # untrained tiny network (CI)

For one training batch, computes u and du/dt (torch.func.jvp, tangents (v, 1, 1) on (z, t, h))
and the target u_tgt = v - h du/dt in float64 (the reference), fp32, and under bf16 autocast
(what --precision bf16 trains with: matmuls/convolutions and their tangents in bf16; norms,
softmax, time features and the loss in fp32). Reports relative errors against float64, and
the target's error as a share of the regression residual ||u - u_tgt|| that training reduces:
a target noisier than the residual would stall training.
"""
from __future__ import annotations

if __name__ == "__main__":  # a stop signal while torch and the rest import (seconds): one line, not a traceback
    from stmd_fast.startup import stop_quietly_while_importing

    stop_quietly_while_importing()

import copy
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import apply_smoke, at_least, environment, finish, parser, print_table, trained_on  # noqa: E402

from stmd_fast.cli import one_line_errors  # noqa: E402
from stmd_fast.config import PRESET_DATA_SHAPES, PRESETS  # noqa: E402
from stmd_fast.objectives import METHODS, ObjectiveConfig, _diffuse, draw_noise, meanflow_jvp  # noqa: E402
from stmd_fast.schedule import per_sample  # noqa: E402


def jvp_outputs(net, x0, noise, method: str, dtype: torch.dtype, autocast: bool):
    """u, du/dt and u_tgt of the STMD / Mean Flow objective, in float64."""
    net = copy.deepcopy(net).to(dtype)
    x0 = x0.to(dtype)
    noise = type(noise)(*(n.to(dtype) for n in noise))
    cond, s = (_diffuse(x0, noise), noise.s) if METHODS[method].conditional else (None, None)
    context = torch.autocast(x0.device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    with context, torch.no_grad():
        u, dudt, v, h = meanflow_jvp(net, x0, noise, cond, s)  # the trainer's own JVP
    u, dudt = u.double(), dudt.double()
    return u, dudt, v.double() - per_sample(h, x0).double() * dudt


@one_line_errors(ValueError, FileNotFoundError)  # e.g. a missing --ckpt: one line, exit code 2
def main(argv=None) -> int:
    p = parser("precision.py", __doc__)
    p.add_argument("--ckpt", help="trained checkpoint (run dir or checkpoint dir) of stmd or meanflow")
    p.add_argument("--batch", type=at_least(1), default=256, help="samples in the measured batch")
    p.add_argument("--seed", type=int, default=0, help="seeds the batch, its noise and the untrained network")
    p.add_argument("--smoke", action="store_true", help="untrained digits network, batch 32, not saved (it sets "
                   "--batch and --no-save itself, and takes no --ckpt)")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/<device>-<date>.json")
    args = p.parse_args(argv)
    apply_smoke(p, argv, args, {"ckpt": None, "batch": 32, "no_save": True})
    if args.ckpt:
        from stmd_fast.checkpoint import load_checkpoint
        from stmd_fast.data.datasets import load_preset
        model = load_checkpoint(args.ckpt, "cpu")
        net, method = model.net, model.method
        preset = model.meta["config"]["preset"]
        if model.meta["config"]["data"] is not None or model.data_kind != "image":
            raise ValueError(f"{args.ckpt} was trained on {trained_on(model)}: this measurement draws a batch of "
                             f"its preset's images; use a checkpoint of an image preset (digits, mnist, cifar10)")
        x0 = load_preset(preset).batch(args.batch, torch.Generator().manual_seed(args.seed))
    else:
        method, preset = "stmd", "digits"
        torch.manual_seed(args.seed)
        net = METHODS[method].build_net(PRESETS[preset]().net, PRESET_DATA_SHAPES[preset])
        x0 = torch.randn(args.batch, *PRESET_DATA_SHAPES[preset])
    if not METHODS[method].flow:
        raise ValueError(f"{args.ckpt} is a {method} checkpoint: the JVP belongs to stmd and meanflow")
    net = net.float().eval()
    # r < t on every sample (r = t has no du/dt term to measure)
    noise = draw_noise(x0, ObjectiveConfig(flow_matching_fraction=0.0), torch.Generator().manual_seed(args.seed))

    u64, dudt64, tgt64 = jvp_outputs(net, x0, noise, method, torch.float64, autocast=False)
    residual = (u64 - tgt64).flatten(1).norm(dim=1)  # ||u - u_tgt|| per sample, what training reduces

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    rows = []
    for name, dtype, autocast in [("fp32", torch.float32, False), ("bf16 autocast", torch.float32, True)]:
        u, dudt, tgt = jvp_outputs(net, x0, noise, method, dtype, autocast)
        target_err = (tgt - tgt64).flatten(1).norm(dim=1)
        rows.append({"precision": name, "rel_err_u": rel(u, u64), "rel_err_dudt": rel(dudt, dudt64),
                     "rel_err_target": rel(tgt, tgt64),
                     "target_err_over_residual": float((target_err / residual).median())})
    print(f"{method} on {preset}, batch {len(x0)}, {'checkpoint ' + args.ckpt if args.ckpt else 'untrained network'}")
    print_table(rows, ["precision", "rel_err_u", "rel_err_dudt", "rel_err_target", "target_err_over_residual"])
    finish("jvp_precision", {"environment": environment(torch.device("cpu")), "checkpoint": args.ckpt,
                             "method": method, "preset": preset, "batch": len(x0), "rows": rows},
           save=not args.no_save)
    return 0


if __name__ == "__main__":
    from stmd_fast.startup import imports_done, run_and_exit

    imports_done()
    run_and_exit(main)
