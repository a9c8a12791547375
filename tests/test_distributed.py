"""Multi-process training: torchrun with 2 processes on CPU (gloo), the gmm MLP and a tiny U-Net.

What is checked, against a one-process run with the same global batch and seed:
1. --parallel ddp (explicit gradient all-reduce): the final weights and EMA equal one process's
   to float rounding (assert_same_run; the reduction order differs), and the logged losses too;
2. ...and a run with the all-reduce switched off (STMD_FAST_SKIP_GRAD_SYNC=1, a test-only hook)
   stops after its first step: the trainer compares the ranks' weights after steps 1 and 2;
3. elastic restart: rank 1 dies at step 5 (STMD_FAST_FAIL_AT_STEP, test-only), torchrun
   --max-restarts=1 restarts both with the same command, training resumes from step 4 and ends
   bit-identical to an uninterrupted 2-process run; every checkpoint loads, each step logged once;
4. checkpoints move between 1 and 2 processes (and FSDP) and continue;
5. bad input is one line before any work;
6. --parallel fsdp (FSDP2 fully_shard on gloo, JVP through the sharded module) equals one process.

Each torchrun launch takes 5-10 s on 2 cores (two Python + torch start-ups); the file about 1 min.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import stmd_fast
from stmd_fast.train import main

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

REPO = Path(__file__).resolve().parents[1]
LR = 1e-3
STEPS = 6
GMM = ["--preset", "gmm", "--batch-size", "16", "--lr", LR, "--steps", STEPS, "--log-every", "1",
       "--ckpt-every", "2", "--sample-every", "0", "--keep-checkpoints", "10", "--device", "cpu"]


def torchrun(*args, nproc: int = 2, env: dict | None = None, restarts: int = 0) -> subprocess.CompletedProcess:
    """python -m torch.distributed.run --standalone ... -m stmd_fast.train ARGS (one thread per process)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           f"--max-restarts={restarts}", "-m", "stmd_fast.train", *map(str, args)]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("STMD_FAST_", "TORCHELASTIC_"))}
    full_env.update(OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=240)


def launched(*args, **kwargs) -> subprocess.CompletedProcess:
    result = torchrun(*args, **kwargs)
    assert result.returncode == 0, f"torchrun failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}"
    return result


def weights(run: Path, step: int, which: str = "model") -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:08d}" / f"{which}.safetensors")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def flat(w: dict) -> torch.Tensor:
    return torch.cat([w[k].flatten() for k in sorted(w)])


def assert_same_run(run: Path, reference: Path, step: int = STEPS) -> None:
    """Weights and EMA at `step` equal the reference run's to float rounding, though training moved them.
    Not max |diff| <= some tiny atol: where a gradient is 0 in exact arithmetic or at rounding level (an
    attention key bias gets a constant added to every logit of a query; hidden units the time law leaves
    idle), AdamW divides the rounding noise by its own size, so such entries move by up to about lr, and
    differently for any reduction order (measured between 1 and 2 processes: 4e-5 on the tiny U-Net,
    1.6e-4 on 0.1% of the gmm MLP's weights under its default sampler). So: the runs' distance is tiny
    next to the distance training moved the weights (measured on the gmm MLP: 6e-4 of it), and no
    entry is off by more than lr per step taken (each step moves an entry by about lr at most: on the tiny
    U-Net, one entry was off by 1.2 lr after 4 steps on an AVX2 AMD EPYC, within one lr elsewhere)."""
    first = flat(weights(reference, 2))
    for which in ("model", "ema"):
        one, two = flat(weights(reference, step, which)), flat(weights(run, step, which))
        moved = (flat(weights(reference, step)) - first).norm()
        assert moved > 10 * LR, f"the weights barely moved ({moved:.3g}): the comparison would prove nothing"
        assert (two - one).norm() <= 1e-2 * moved and (two - one).abs().max() <= step * LR, \
            f"{which}: {run.name} differs from {reference.name} by {(two - one).norm():.3g} (moved {moved:.3g})"


def in_process(*args) -> None:
    assert main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def one_proc(runs) -> Path:
    """The reference: one process, no torchrun."""
    in_process(*GMM, "--out", runs / "one")
    return runs / "one"


@pytest.fixture(scope="module")
def two_proc(runs) -> Path:
    result = launched(*GMM, "--out", runs / "two")
    assert "2 processes (ddp), 8 of the batch 16 each" in result.stdout
    assert "hold different" not in result.stdout  # the trainer compared the ranks' weights and EMA at each checkpoint
    return runs / "two"


# ----------------------------------------------------------------------------- 1, 2. gradient sync

@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(one_proc, two_proc):
    assert_same_run(two_proc, one_proc)
    one, two = metrics(one_proc), metrics(two_proc)
    assert [m["step"] for m in two] == list(range(1, STEPS + 1))  # rank 0 logs, once per step
    # the logged loss is the mean over the ranks' halves = the global batch's: equal to rounding while the
    # weights are (steps 1-2), then within what AdamW's amplified rounding (assert_same_run) gives
    for a, b in zip(one, two):
        rel = 1e-6 if a["step"] <= 2 else 1e-4
        assert b["loss"] == pytest.approx(a["loss"], rel=rel) and b["lr"] == a["lr"]


@pytest.mark.slow
def test_a_run_without_the_gradient_all_reduce_stops_within_two_steps(runs):
    """A silent no-sync (the all-reduce switched off by the test-only hook) is caught after step 1, not at
    the first checkpoint: one line, a failed exit, no checkpoint of diverged replicas, nothing logged; the
    --out it made holds nothing of use, so it is removed again."""
    run = runs / "nosync"
    result = torchrun(*GMM, "--out", run, env={"STMD_FAST_SKIP_GRAD_SYNC": "1"})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "hold different weights after step 1" in errors[0], result.stderr[-3000:]
    assert "not all-reduced" in errors[0]
    assert not run.exists(), sorted(str(p.relative_to(run)) for p in run.rglob("*"))


def test_replicas_that_differ_at_a_checkpoint_stop_as_a_failed_gradient_sync(monkeypatch):
    """The check before a checkpoint raises the error the trainer says in one line on every rank (a plain
    RuntimeError there was a traceback per rank, where the same problem after step 1 was one line)."""
    from stmd_fast import distributed as dist_mod
    from stmd_fast.parallel import Replicas
    from stmd_fast.train import GradientSyncFailed

    monkeypatch.setattr(dist_mod, "replicas_agree", lambda *modules: False)
    monkeypatch.delenv("STMD_FAST_SKIP_GRAD_SYNC", raising=False)
    ctx = dist_mod.Dist(rank=0, world_size=2, launched=True)
    with pytest.raises(GradientSyncFailed, match="hold different weights or EMA at step 7"):
        Replicas(ctx, batch_size=4, per_rank_data=False).full_states(None, type("E", (), {"module": None})(), None, 7)


def test_only_rank_0_makes_the_run_folder(tmp_path):
    """The other ranks leave --out to rank 0: one that made it first hid from rank 0 that this run made it,
    so a failed fresh run kept an empty folder, now and then (the no-sync run above, under load)."""
    from contextlib import ExitStack

    from stmd_fast.files import LOCK_FILE
    from stmd_fast.train import prepare_run_dir

    out = tmp_path / "made" / "run"
    with ExitStack() as held:
        prepare_run_dir(out, False, held, main=False)
    assert not (tmp_path / "made").exists()
    with ExitStack() as held:
        prepare_run_dir(out, False, held, main=True)
        assert (out / LOCK_FILE).exists()
    assert not (tmp_path / "made").exists()  # nothing of use was written: rank 0 removes what it made


@pytest.mark.slow
def test_tiny_unet_two_processes_equal_one(tmp_path):
    images = tmp_path / "tiny.npy"
    np.save(images, np.random.default_rng(0).integers(0, 256, (32, 1, 8, 8), dtype=np.uint8))
    args = ["--data", images, "--batch-size", "8", "--lr", "1e-3", "--steps", 4, "--log-every", "2",
            "--ckpt-every", "2", "--sample-every", "0", "--keep-checkpoints", "5", "--device", "cpu"]
    in_process(*args, "--out", tmp_path / "one")
    launched(*args, "--out", tmp_path / "two")
    assert_same_run(tmp_path / "two", tmp_path / "one", step=4)


@pytest.mark.slow
def test_two_processes_with_dropout_resume_exactly(tmp_path):
    """Each rank draws its own dropout masks from torch's global generator: a resume of K processes reseeded
    them from (seed, step, rank), a state the uninterrupted run never had (losses off by 0.6% a few steps on).
    Every rank's state is in the checkpoint now and comes back when the process count is the same."""
    images = tmp_path / "tiny.npy"
    np.save(images, np.random.default_rng(0).integers(0, 256, (32, 1, 8, 8), dtype=np.uint8))
    args = ["--data", images, "--batch-size", "8", "--lr", "1e-3", "--log-every", "1", "--dropout", "0.2",
            "--ckpt-every", "2", "--sample-every", "0", "--keep-checkpoints", "5", "--device", "cpu"]
    launched(*args, "--steps", 4, "--out", tmp_path / "straight")
    launched(*args, "--steps", 2, "--out", tmp_path / "resumed")
    launched(*args, "--steps", 4, "--out", tmp_path / "resumed", "--resume")
    assert [m["loss"] for m in metrics(tmp_path / "resumed")] == [m["loss"] for m in metrics(tmp_path / "straight")]
    for which in ("model", "ema"):
        straight, resumed = weights(tmp_path / "straight", 4, which), weights(tmp_path / "resumed", 4, which)
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), which


def test_dropout_states_of_another_device_are_reseeded_per_rank_not_left_alike():
    """Each rank's saved mask generator is of the device it trained on: resumed on another, none was restored and
    none reseeded, so every rank drew the same masks (torch's default seed)."""
    from types import SimpleNamespace

    from stmd_fast.training_state import TrainingState, dropout_rng_state

    saved = {"step": 4, "dropout_rng": None,
             "dropout_rngs": [{**dropout_rng_state(torch.device("cpu")), "device": "cuda"} for _ in range(2)]}
    draws = []
    for rank in range(2):
        torch.manual_seed(0)  # each rank a process of its own, started alike
        TrainingState._restore_dropout_rng(saved, 0, torch.device("cpu"), SimpleNamespace(world=2, rank=rank))
        draws.append(torch.rand(3))
    assert not torch.equal(*draws)


# ----------------------------------------------------------------------------- 3. elastic restart

@pytest.mark.slow
def test_elastic_restart_resumes_from_the_last_checkpoint(two_proc, runs):
    run = runs / "elastic"
    result = launched(*GMM, "--out", run, restarts=1, env={"STMD_FAST_FAIL_AT_STEP": "5"})
    assert "resumed from" in result.stdout and "step_00000004" in result.stdout
    assert "torchrun restart 1" in result.stdout
    assert [m["step"] for m in metrics(run)] == list(range(1, STEPS + 1))  # each step once
    assert [m["loss"] for m in metrics(run)] == [m["loss"] for m in metrics(two_proc)]
    ckpts = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == [f"step_{s:08d}" for s in (2, 4, 6)]  # no .tmp-* left over
    for ckpt in ckpts:
        for which in ("ema", "model"):
            stmd_fast.load_checkpoint(ckpt, weights=which)  # none is corrupt
    for which in ("model", "ema"):  # resume restores weights, optimizer, RNG: bit-exact on CPU
        a, b = weights(run, STEPS, which), weights(two_proc, STEPS, which)
        assert all(torch.equal(a[k], b[k]) for k in a), which


def test_a_restart_resumes_only_checkpoints_of_its_own_job(one_proc, tmp_path, monkeypatch):
    """Without --resume, a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) continues the run only
    from a checkpoint its own job wrote (TORCHELASTIC_RUN_ID); a first attempt never does."""
    from stmd_fast.train import resolve_config

    run = shutil.copytree(one_proc, tmp_path / "run")
    for ckpt in (run / "checkpoints").iterdir():  # as if job-a had written them
        meta = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**meta, "torchelastic_run_id": "job-a"}))
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0").items():
        monkeypatch.setenv(name, value)

    def resumes(restart_count: int, run_id: str) -> bool:
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart_count))
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
        return resolve_config({"out": str(run), "preset": "gmm", "steps": 8})[1]

    assert resumes(1, "job-a")
    assert not resumes(1, "job-b")  # another job's checkpoints: refused later as without torchrun
    assert not resumes(0, "job-a")  # the first attempt: a fresh run, refused into a dir with checkpoints


def test_without_a_rendezvous_id_a_restart_resumes_only_its_own_agents_checkpoints(one_proc, tmp_path, monkeypatch):
    """torchrun --max-restarts without --rdzv-id or --standalone gives every job the run id "none": a job whose
    first attempt was refused (the run dir held another job's checkpoints, no --resume) was restarted into
    that other run and trained it on. Such a job is now told by its agent, the workers' parent process."""
    import socket

    from stmd_fast import distributed
    from stmd_fast.train import resolve_config

    run = shutil.copytree(one_proc, tmp_path / "run")
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2",
                            TORCHELASTIC_RUN_ID="none").items():
        monkeypatch.setenv(name, value)

    def written_by(job_id):
        for ckpt in (run / "checkpoints").iterdir():
            meta = json.loads((ckpt / "config.json").read_text())
            (ckpt / "config.json").write_text(json.dumps({**meta, "torchelastic_run_id": job_id}))

    def restart_resumes() -> bool:
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        return resolve_config({"out": str(run), "preset": "gmm", "steps": 8})[1]

    assert distributed.from_env().job_id == f"none@{socket.gethostname()}:{os.getppid()}"
    written_by("none")  # another job without a rendezvous id (or this code before)
    assert not restart_resumes()
    written_by(f"none@{socket.gethostname()}:{os.getppid() + 1}")  # another agent's job
    assert not restart_resumes()
    written_by(distributed.from_env().job_id)  # this agent's first attempt
    assert restart_resumes()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # two nodes: no agent is shared, nothing tells the jobs apart
    assert distributed.from_env().job_id is None
    from stmd_fast.cli import UserError

    with pytest.raises(UserError, match="without --rdzv-id.*torchrun --rdzv-id=JOB_ID"):  # not "pass --resume",
        restart_resumes()                                                           # which no restart can


def test_torchruns_parser_leaves_every_trainer_flag_to_the_trainer():
    """argparse prefix-matches the script's flags too: torchrun took --log as an ambiguous abbreviation of its
    own --log-dir and --logs-specs and stopped (now --loggers); a flag that abbreviated one of its options
    alone would be taken silently. The trainer's flags reach the trainer as given."""
    from torch.distributed.run import get_args_parser

    from stmd_fast.train import build_parser

    flags = [s for a in build_parser()._actions for s in a.option_strings if s not in ("-h", "--help", "--log")]
    assert "--loggers" in flags and len(flags) > 50
    for flag in flags:
        args = get_args_parser().parse_args(["--nproc_per_node=2", "-m", "stmd_fast.train", flag, "1"])
        assert args.training_script_args == [flag, "1"], flag


def test_the_old_log_flag_names_its_new_name(capsys):
    assert main(["--log", "tensorboard", "--steps", "1"]) == 2
    assert "--log is now --loggers" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 4. checkpoints across process counts

def truncated_copy(run: Path, to: Path, last_step: int) -> Path:
    """The run as it was when checkpoint `last_step` had just been written."""
    shutil.copytree(run, to)
    for ckpt in (to / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > last_step:
            shutil.rmtree(ckpt)
    return to


@pytest.mark.slow
def test_two_process_checkpoint_continues_in_one_process(one_proc, two_proc, runs, capsys):
    run = truncated_copy(two_proc, runs / "two-then-one", 4)
    in_process("--out", run, "--resume", "--device", "cpu")
    assert "resumed from" in capsys.readouterr().out
    assert [m["step"] for m in metrics(run)] == list(range(1, STEPS + 1))
    assert_same_run(run, one_proc)


@pytest.mark.slow
def test_one_process_checkpoint_continues_in_two(one_proc, runs):
    run = truncated_copy(one_proc, runs / "one-then-two", 4)
    result = launched("--out", run, "--resume")
    assert "resumed from" in result.stdout and "2 processes" in result.stdout
    assert [m["step"] for m in metrics(run)] == list(range(1, STEPS + 1))
    assert_same_run(run, one_proc)


# ----------------------------------------------------------------------------- 5. bad input

@pytest.mark.slow
def test_batch_not_divisible_by_the_processes_is_one_line(tmp_path):
    run = tmp_path / "run"
    result = torchrun("--preset", "gmm", "--batch-size", "15", "--device", "cpu", "--out", run)
    assert result.returncode != 0  # torchrun itself exits 1 for any failed worker
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr  # said once, by rank 0
    assert "--batch-size 15" in errors[0] and "2 processes" in errors[0] and "16" in errors[0]
    assert "exitcode  : 2" in result.stderr  # the trainer's user-error code (torchrun then stops the other rank)
    assert "stmd_fast/train.py" not in result.stderr  # no traceback from the trainer
    assert "during start-up" not in result.stderr  # rank 1, stopped by torchrun while it waits: not a false line
    assert not run.exists()  # refused before any work


@pytest.mark.parametrize("given", [{}, {"MASTER_ADDR": "127.0.0.1"}])
def test_torchrun_variables_without_the_rendezvous_address_are_one_line(tmp_path, capsys, monkeypatch, given):
    """RANK, WORLD_SIZE, LOCAL_RANK left set (another launcher, a copied environment) without MASTER_ADDR and
    MASTER_PORT gave a KeyError traceback from the process group's set-up."""
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    for key, value in given.items():
        monkeypatch.setenv(key, value)
    assert main(["--preset", "gmm", "--device", "cpu", "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    missing = "MASTER_PORT not" if given else "MASTER_ADDR and MASTER_PORT not"
    assert len(err) == 1 and missing in err[0] and "unset RANK, WORLD_SIZE and LOCAL_RANK" in err[0], err
    assert not (tmp_path / "run").exists()


def test_fsdp_without_torchrun_is_one_line(tmp_path, capsys):
    assert main(["--preset", "gmm", "--parallel", "fsdp", "--device", "cpu", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --parallel fsdp") and "torchrun" in err[0]
    assert not (tmp_path / "run").exists()


def test_fsdp_refused_on_torch_2_11(monkeypatch):
    # torch 2.11's FSDP2 all-gather fails inside torch.func.jvp: refused before any work, naming the fix
    from stmd_fast import distributed

    launched = distributed.Dist(rank=0, world_size=2, local_rank=0, launched=True)
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    with pytest.raises(ValueError, match=r"--parallel fsdp needs torch >= 2.12.*--parallel ddp"):
        distributed.check_parallel(launched, "fsdp", 64)
    distributed.check_parallel(launched, "ddp", 64)  # ddp is fine there
    monkeypatch.setattr(torch, "__version__", "2.14.1")
    distributed.check_parallel(launched, "fsdp", 64)


# ----------------------------------------------------------------------------- 6. FSDP2

@pytest.mark.slow
def test_fsdp_two_processes_equal_one(one_proc, runs):
    run = runs / "fsdp"
    result = launched(*GMM, "--out", run, "--parallel", "fsdp")
    assert "2 processes (fsdp)" in result.stdout
    assert (run / "samples" / f"step_{STEPS:08d}.npy").exists()  # the sharded EMA gathered for rank 0's samples
    assert_same_run(run, one_proc)
    # its unsharded checkpoint continues in one process (a saved --parallel fsdp is dropped there)
    cont = truncated_copy(run, runs / "fsdp-then-one", 4)
    in_process("--out", cont, "--resume", "--device", "cpu")
    assert_same_run(cont, one_proc)


def test_uneven_batch_error_suggests_batches_that_pass_the_jvp_block_check():
    # gmm's --flow-matching-fraction 0.5 runs the JVP on blocks of 2 rows: --batch-size 14 splits over 2
    # processes, but its 7 rows per process are no whole block, so the suggestions must be multiples of 4
    import re

    from stmd_fast import distributed
    from stmd_fast.config import PRESETS

    objective = PRESETS["gmm"]().objective
    block = objective.jvp_block[1]
    assert block == 2
    launched = distributed.Dist(rank=0, world_size=2, local_rank=0, launched=True)
    for batch in (15, 14):
        with pytest.raises(ValueError) as err:
            distributed.check_parallel(launched, "ddp", batch, block)
        message = str(err.value)
        assert "\n" not in message and f"--batch-size {batch}" in message and "2 processes" in message
        suggested = [int(n) for n in re.search(r"\(e\.g\. (\d+) or (\d+)\)", message).groups()]
        assert suggested == [12, 16]
        for good in suggested:  # each one runs: both checks of the trainer pass
            distributed.check_parallel(launched, "ddp", good, block)
            objective.check_batch(good // launched.world_size)
    # ddpm has no JVP block: the plain split over the processes is all that is asked
    with pytest.raises(ValueError, match=r"multiple of 2 \(e\.g\. 14 or 16\)"):
        distributed.check_parallel(launched, "ddp", 15)


def endless_torchrun(run: Path) -> subprocess.Popen:
    """A 2-process gmm run of 10^6 steps whose log and checkpoint intervals never come, in a session of its own,
    stdout and stderr in one pipe: only a stop saves it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m",
           "stmd_fast.train", *map(str, [*GMM, "--steps", 10**6, "--log-every", 10**6, "--ckpt-every", 10**6]),
           "--out", str(run)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STMD_FAST_", "TORCHELASTIC_"))}
    return subprocess.Popen(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_within_a_step_with_a_checkpoint(runs):
    """torchrun passes a SIGTERM on to its workers and SIGKILLs them 30 s later. The ranks once agreed on a
    stop only at the next --log-every interval, so a long interval lost everything since the last checkpoint
    (only a .tmp- checkpoint was left, mid-save). Now they agree one step after the signal."""
    import signal
    import time

    run = runs / "sigterm"
    proc = endless_torchrun(run)
    try:
        for line in proc.stdout:  # training has begun once the progress bar (or its first line) shows
            if "2 processes (ddp)" in line:
                break
        time.sleep(5)
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - began < 25, "the stop waited for torchrun's SIGKILL"
    ckpts = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(ckpts) == 1 and ckpts[0].startswith("step_"), (ckpts, rest[-3000:])  # no .tmp- left mid-save
    assert "stopped by SIGTERM" in rest and "--resume" in rest
    stmd_fast.load_checkpoint(run / "checkpoints" / ckpts[0])


@pytest.mark.slow
def test_a_run_folder_deleted_under_torchrun_stops_every_rank_with_one_line(runs):
    """Rank 0 alone holds the lock and saw the folder go; the other rank then said "another process is gone" and
    named a checkpoint of the folder's new contents. The check is in the interval's collective: all stop on it."""
    import shutil
    import signal
    import time

    run = runs / "deleted"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m",
           "stmd_fast.train", *map(str, [*GMM, "--steps", 10**6, "--log-every", 2, "--ckpt-every", 10**6]),
           "--out", str(run)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STMD_FAST_", "TORCHELASTIC_"))}
    proc = subprocess.Popen(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if "2 processes (ddp)" in line:
                break
        time.sleep(3)
        shutil.rmtree(run)
        rest = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rest.count(f"the run folder {run} was deleted, moved or replaced") == 1, rest[-3000:]
    assert "another process of this torchrun job is gone" not in rest, rest[-3000:]
    assert "[rank0]: Traceback" not in rest and "[rank1]: Traceback" not in rest, rest[-3000:]  # (torchrun's own stays)
    assert not run.exists()  # nothing made again there


def processes(ppid: int | None = None, among=None) -> list[int]:
    """Running processes (an orphan's zombie, which a container's init may never reap, is not running): the
    children of `ppid`, or those of `among` still running."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(command name)": state, ppid, ...
        except OSError:
            continue
        pid = int(stat.parent.name)
        if fields[0] != "Z" and (int(fields[1]) == ppid if ppid is not None else pid in among):
            found.append(pid)
    return found


@pytest.mark.slow
def test_workers_whose_torchrun_is_killed_stop_with_a_checkpoint(runs):
    """SIGKILL to torchrun itself (a scheduler's hard kill) forwards nothing: its workers trained on, orphans
    holding the run's lock. Each now gets a SIGTERM when its agent dies and stops as on torchrun's own."""
    import signal
    import time

    run = runs / "agent-killed"
    proc = endless_torchrun(run)
    workers = []
    try:
        for line in proc.stdout:
            if "2 processes (ddp)" in line:
                break
        time.sleep(5)
        workers = processes(ppid=proc.pid)  # each in a session of its own: no signal to torchrun's group reaches it
        assert len(workers) == 2, workers
        proc.kill()  # torchrun alone: its workers are left (they print a line or two: the pipe holds them)
        deadline = time.monotonic() + 60
        while processes(among=workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        orphans = processes(among=workers)
    finally:
        for pid in processes(among=workers):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
    rest = proc.stdout.read()
    assert not orphans, f"the workers ran on without their torchrun: {rest[-3000:]}"
    ckpts = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(ckpts) == 1 and ckpts[0].startswith("step_"), (ckpts, rest[-3000:])
    assert "stopped by SIGTERM" in rest and "--resume" in rest, rest[-3000:]
    stmd_fast.load_checkpoint(run / "checkpoints" / ckpts[0])


@pytest.mark.slow
def test_timed_checkpoints_under_torchrun_are_agreed_a_step_later(runs):
    """--ckpt-minutes is checked every step, each rank by its own clock, and agreed in the per-step vote (it was
    checked only at --log-every records, so a slow step stretched the gap). Due at every step here: the vote
    answers a step late and the one in flight at a save is stale, so saves land every other step, on every rank
    alike (a disagreement would hang the next collective)."""
    run = runs / "timed"
    launched(*GMM, "--log-every", 1000, "--ckpt-every", 1000, "--ckpt-minutes", 1e-9, "--out", run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004",
                                                                         "step_00000006"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]


@pytest.mark.slow
@pytest.mark.parametrize("dies", [1, 0])
def test_a_lost_peer_is_one_line_naming_the_checkpoint(runs, dies):
    """Rank 1 (or 0) dies at step 5 (no restart): the other's all-reduce fails. One line saying so, the last
    checkpoint and how to resume, not the gloo traceback. When rank 0 died, rank 1 used to wait 5 s before
    its line (as for errors every rank meets), torchrun's SIGTERM came first, and the start-up handler said
    "interrupted during start-up ... no checkpoint was written"."""
    run = runs / f"lost-peer-{dies}"
    result = torchrun(*GMM, "--out", run, env={"STMD_FAST_FAIL_AT_STEP": "5", "STMD_FAST_FAIL_RANK": str(dies)})
    assert result.returncode != 0
    err = result.stderr
    assert "another process of this torchrun job is gone" in err and "step_00000004" in err and "--resume" in err, \
        err[-3000:]
    assert f"[rank{1 - dies}]: Traceback" not in err and "during start-up" not in err, err[-3000:]


@pytest.mark.parametrize("message, lost", [
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500", True),
    ("NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error", True),
    ("CUDA error: an illegal memory access was encountered (the NCCL watchdog saw it first)", False),
    ("gloo all_reduce: tensors of different shapes on this rank", False),
])
def test_only_a_peer_gone_is_blamed_on_the_other_processes(message, lost):
    """lost_peer decides whether an error becomes "another process of this torchrun job is gone" (one line, the
    traceback dropped): a fault of this rank that merely mentions NCCL or gloo must keep its traceback."""
    from stmd_fast.distributed import lost_peer

    assert lost_peer(RuntimeError(message)) is lost


@pytest.mark.parametrize("rank", [0, 1])
def test_one_process_commands_refuse_several_under_torchrun(monkeypatch, capsys, tmp_path, rank):
    """evaluate under torchrun found its twin rank holding its --out's lock ("in use by another evaluate
    command"); sample did the whole work twice over into the same file. Each says it takes one process."""
    from stmd_fast import evaluate, export, sample
    from stmd_fast.data import encode

    for key, value in {"RANK": rank, "WORLD_SIZE": 2, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": 29500}.items():
        monkeypatch.setenv(key, str(value))
    for command in (evaluate.main, sample.main, export.main, encode.cli):
        assert command(["--help"]) == 2  # before anything else, --help included
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ([] if rank else [err[0]]), err  # said once, by rank 0
        if not rank:
            assert "runs in one process, and torchrun started 2" in err[0] and "stmd_fast.train" in err[0]


@pytest.mark.parametrize("env, says", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, "RANK=0 WORLD_SIZE=2 is set but LOCAL_RANK not"),
    ({"RANK": "1"}, "RANK=1 is set but WORLD_SIZE and LOCAL_RANK not"),
    ({"WORLD_SIZE": "0", "RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE=0: not a process of a job"),
    ({"WORLD_SIZE": "abc", "RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE=abc: not a process of a job"),
    ({"WORLD_SIZE": "1", "RANK": "1", "LOCAL_RANK": "0"}, "RANK=1 (of WORLD_SIZE=1): not a process of a job"),
    ({"WORLD_SIZE": "2", "RANK": "5", "LOCAL_RANK": "0"}, "RANK=5 (of WORLD_SIZE=2)"),
])
def test_a_launch_environment_torchrun_would_not_make_is_one_line(tmp_path, capsys, monkeypatch, env, says):
    """Some of the variables alone trained one process without a word; WORLD_SIZE=0 divided by zero, a word
    failed int() (tracebacks); a rank outside the job waited 30 minutes, deaf to Ctrl-C and SIGTERM."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["--preset", "gmm", "--device", "cpu", "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "unset RANK, WORLD_SIZE and LOCAL_RANK" in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_rank_that_never_starts_is_named_when_the_wait_ends(monkeypatch, capsys):
    from stmd_fast import distributed

    monkeypatch.setattr(distributed, "JOIN_SAY_AFTER_S", 0.0)
    store = dist.HashStore()
    ctx = distributed.Dist(rank=0, world_size=3, launched=True)
    store.set("joined/2", "1")  # rank 2 came, rank 1 never does
    with pytest.raises(distributed.RendezvousFailed, match=r"rank\(s\) 1 of WORLD_SIZE=3 did not start within"):
        distributed._wait_for_every_rank(store, ctx, __import__("datetime").timedelta(seconds=0.5))
    assert "waiting for rank(s) 1 of WORLD_SIZE=3 to start" in capsys.readouterr().err
    store.set("joined/1", "1")
    distributed._wait_for_every_rank(store, ctx, __import__("datetime").timedelta(seconds=0.5))  # all there: returns


@pytest.mark.slow
def test_ctrl_c_stops_a_rank_waiting_for_peers_that_never_start(tmp_path):
    """WORLD_SIZE=2 set by hand with one process started: it waited inside C++ for 30 minutes and neither
    Ctrl-C nor SIGTERM stopped it (only kill -9)."""
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STMD_FAST_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    proc = subprocess.Popen([sys.executable, "-m", "stmd_fast.train", *map(str, GMM), "--out", str(tmp_path / "run")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # the start-up line: the process group's set-up comes next
            if "2 processes (ddp)" in line:
                break
        time.sleep(3)
        began = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - began < 10 and proc.returncode == 130, (proc.returncode, err[-2000:])
    assert "interrupted during start-up" in err


@pytest.mark.slow
def test_fd_every_under_torchrun_is_measured_once_without_hanging(runs):
    """Rank 0 measures the FD while rank 1 trains on; torchmetrics' own gather over the process group made
    the job hang (gloo's 30-minute timeout) at the first measurement."""
    run = runs / "fd"
    launched("--steps", 4, "--batch-size", 16, "--fd-every", 2, "--fd-num", 64, "--log-every", 2, "--ckpt-every", 2,
             "--sample-every", 0, "--device", "cpu", "--out", run)
    records = metrics(run)
    assert [r["step"] for r in records] == [2, 4]
    assert all(np.isfinite(r["FD/ema0.999"]) and r["FD/ema0.999"] > 0 for r in records)


def test_a_rank_waiting_for_the_server_waits_quietly_and_says_for_what(monkeypatch, capsys):
    """A rank > 0 started before rank 0 (another launcher) retried torch's TCPStore connect every 2 s, each try
    logging a C++ stack trace (25k lines in 30 minutes), and never said what it waited for."""
    import socket
    from datetime import timedelta

    from stmd_fast import distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    monkeypatch.setattr(distributed, "JOIN_SAY_AFTER_S", 0.0)
    with pytest.raises(distributed.RendezvousFailed, match=f"no rendezvous server at MASTER_ADDR=127.0.0.1 "
                                                           f"MASTER_PORT={port} within"):
        distributed._wait_for_server("127.0.0.1", port, timedelta(seconds=1))
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"waiting for the rendezvous server at MASTER_ADDR=127.0.0.1 MASTER_PORT={port} (rank 0 serves it; "
                   f"up to 0:00:01; Ctrl-C stops)"]


def test_a_sigterm_outside_torchrun_is_not_blamed_on_torchrun(monkeypatch, capsys, tmp_path):
    import signal

    from stmd_fast.train import interrupted_outside_the_loop

    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert interrupted_outside_the_loop(None, signal.SIGTERM) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.startswith("interrupted during start-up")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    interrupted_outside_the_loop(None, signal.SIGTERM)
    assert capsys.readouterr().err.startswith("stopped by torchrun")


# ----------------------------------------------------------------------------- fourteenth round of probes

def test_a_resume_over_a_process_count_that_does_not_split_its_batch_names_counts_that_do():
    """The advice was another --batch-size, which --resume then refused (a run keeps its batch)."""
    from stmd_fast.distributed import Dist, check_parallel

    three = Dist(world_size=3, launched=True)
    with pytest.raises(ValueError, match=r"--batch-size 16, the resumed run's global batch .*launch 1, 2, 4, 8 or 16 "
                                         r"of them \(torchrun --nproc_per_node=K\), not 3"):
        check_parallel(three, "ddp", 16, 1, resume=True)
    with pytest.raises(ValueError, match=r"JVP blocks \(4 rows.*launch 1, 2 or 4 of them"):
        check_parallel(three, "ddp", 16, 4, resume=True)
    with pytest.raises(ValueError, match=r"use a multiple of 3 \(e.g. 15 or 18\)"):  # a new run: another batch
        check_parallel(three, "ddp", 16, 1)


def test_a_mistake_in_the_input_under_torchrun_restarts_says_each_attempt_repeats_it(monkeypatch, capsys, tmp_path):
    """torchrun --max-restarts N restarts the workers after any failure, a bad flag value too: the same error came
    N + 1 times with no word of why. Each says so while restarts are left (the last attempt does not)."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("TORCHELASTIC_MAX_RESTARTS", "3")):
        monkeypatch.setenv(name, value)
    for attempt, left in ((0, 3), (2, 1), (3, 0)):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(attempt))
        assert main(["--steps", "abc"]) == 2
        err = capsys.readouterr().err
        assert "invalid int value: 'abc'" in err
        assert (f"its {left} restart(s) left will say the same" in err) is (left > 0), err
        assert main(["--preset", "gmm", "--batch-size", "0", "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and (f"its {left} restart(s) left" in err) is (left > 0), err


def test_a_bad_command_line_and_a_stop_are_said_by_rank_0_alone(monkeypatch, capsys):
    """Every rank parses the same command line and gets torchrun's forwarded signal: each said it (8 times with
    8 processes)."""
    import signal

    from stmd_fast.train import StopRequest

    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert main(["--steps", "abc"]) == 2
        assert ("invalid int value: 'abc'" in capsys.readouterr().err) is said
        with StopRequest() as stop:
            stop.step_done()
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested
        assert ("SIGTERM: stopping after this step" in capsys.readouterr().err) is said
    for name in ("WORLD_SIZE", "LOCAL_RANK"):  # a stray RANK alone (a pod's node rank) is no torchrun rank
        monkeypatch.delenv(name)
    monkeypatch.setenv("RANK", "1")
    assert main(["--steps", "abc"]) == 2
    assert "invalid int value: 'abc'" in capsys.readouterr().err
