"""The training loop driven directly, without the CLI: its parts (run, training state, step, log)
put together by hand, checked bit for bit against the same run written out as a plain sequence of
seeded steps, the way the trainer computed it before it was split into parts."""
import json
import signal
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from stmd_fast import distributed
from stmd_fast.config import TrainConfig
from stmd_fast.engine import make_train_step
from stmd_fast.gmm import default_mixture
from stmd_fast.models import NetConfig, build_net
from stmd_fast.objectives import compute_loss, draw_noise
from stmd_fast.run_log import RunLog
from stmd_fast.train import StopRequest, Stopped, loop, prepare_run, start_state

STEPS = 5


def config(out) -> TrainConfig:
    return TrainConfig(preset="gmm", steps=STEPS, batch_size=16, lr=1e-2, warmup_steps=2, ema_decay=0.9, log_every=1,
                       ckpt_every=STEPS, sample_every=0, device="cpu", out=str(out),
                       net=NetConfig(kind="mlp", width=32, depth=2, time_freqs=8))


def drive(cfg: TrainConfig, stop_at_once: bool = False):
    """prepare_run -> start_state -> make_train_step -> loop, as train() does, without the CLI."""
    with ExitStack() as held:  # the run directory's lock, as train() holds it
        run = prepare_run(cfg, resume=False, ctx=distributed.Dist(), held=held)
        return drive_prepared(cfg, run, stop_at_once)


def drive_prepared(cfg: TrainConfig, run, stop_at_once: bool):
    state = start_state(cfg, run, resume=False)
    step = make_train_step(partial(compute_loss, cfg.method, run.net, cfg=cfg.objective), run.net, state.optimizer,
                           state.scheduler, state.ema, cfg.ema_decay, cfg.compile, cfg.precision, run.device)
    with StopRequest() as stop, RunLog(run.out, cfg.steps, state.step, is_main=True) as log:
        if stop_at_once:
            stop.signal = signal.SIGTERM  # as if Ctrl-C came during the first step
        return loop(cfg, run, state, step, log, stop), state


def plain_run(cfg: TrainConfig):
    """The same seeded run as straight-line code: init, AdamW, warm-up, EMA, one generator for data and noise."""
    torch.manual_seed(cfg.seed)
    net = build_net(cfg.net, (2,), True, 3)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
    # fused, as the trainer's (engine.make_optimizer): fused and multi-tensor AdamW round differently
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / cfg.warmup_steps))
    generator = torch.Generator().manual_seed(cfg.seed)
    data, losses, rates = default_mixture(), [], []
    for _ in range(cfg.steps):
        rates.append(optimizer.param_groups[0]["lr"])  # the rate this step applies
        x0 = data.batch(cfg.batch_size, generator)
        loss, _ = compute_loss("stmd", net, x0, draw_noise(x0, cfg.objective, generator), cfg.objective)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        ema.update_parameters(net)
        losses.append(loss.item())
    return losses, rates, net, ema, optimizer


def test_loop_equals_the_plain_sequence_of_steps(tmp_path):
    cfg = config(tmp_path / "run")
    last, state = drive(cfg)
    losses, rates, net, ema, optimizer = plain_run(config(tmp_path / "unused"))

    assert state.step == STEPS and last == tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}"
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in logged] == losses  # bit-identical
    assert [m["lr"] for m in logged] == rates == [5e-3, 1e-2, 1e-2, 1e-2, 1e-2]  # the warm-up's rate at its step
    for name, module in (("model", net), ("ema", ema.module)):
        saved = load_file(last / f"{name}.safetensors")
        assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items())
    saved_state = torch.load(last / "train_state.pt", weights_only=True)
    assert saved_state["step"] == STEPS and int(saved_state["ema_n_averaged"]) == STEPS
    for i, moments in optimizer.state_dict()["state"].items():
        assert all(torch.equal(saved_state["optimizer"]["state"][i][k], v) for k, v in moments.items())


def test_a_stop_request_checkpoints_the_step_and_stops(tmp_path, capsys):
    cfg = config(tmp_path / "run")
    with pytest.raises(Stopped):
        drive(cfg, stop_at_once=True)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000001"]
    said = capsys.readouterr()
    assert "stopped by SIGTERM at step 1" in said.out + said.err
    assert f"--out {tmp_path / 'run'} --resume" in said.out + said.err


def test_a_stop_in_the_last_step_finishes_the_run(tmp_path, capsys):
    """The final checkpoint was written, yet the run exited 143 with "continue with ... --resume": a scheduler
    requeued a finished job."""
    cfg = config(tmp_path / "run")
    cfg.steps = cfg.ckpt_every = 1
    last, state = drive(cfg, stop_at_once=True)  # no Stopped
    assert state.step == 1 and last.name == "step_00000001"
    said = capsys.readouterr()
    assert "--resume" not in said.out + said.err


@pytest.mark.parametrize("then", ["deleted", "replaced by another run", "replaced by a file"])
def test_a_run_whose_folder_goes_stops_without_writing_there(tmp_path, then):
    """rm -rf RUN mid-run: the run trained on, made RUN/checkpoints again (no config.json, its metrics lost, no
    lock), and a new run started there had its checkpoints rotated away by this one."""
    import shutil

    from stmd_fast.cli import UserError
    from stmd_fast.files import run_lock

    cfg = config(tmp_path / "run")
    with ExitStack() as held:
        run = prepare_run(cfg, resume=False, ctx=distributed.Dist(), held=held)
        state = start_state(cfg, run, resume=False)
        inner = make_train_step(partial(compute_loss, cfg.method, run.net, cfg=cfg.objective), run.net,
                                state.optimizer, state.scheduler, state.ema, cfg.ema_decay, False, "fp32", run.device)

        def step(x0, noise):
            if state.step == 2:
                shutil.rmtree(run.out)
                if then == "replaced by another run":
                    run.out.mkdir()
                    held.enter_context(run_lock(run.out))  # the other run's lock: a new file at the path
                elif then == "replaced by a file":
                    run.out.write_text("not a folder")
            return inner(x0, noise)

        with StopRequest() as stop, RunLog(run.out, cfg.steps, state.step, is_main=True) as log, \
                pytest.raises(UserError, match="was deleted, moved or replaced while this run trained.*step 3"):
            loop(cfg, run, state, step, log, stop)
        after = tmp_path / "run"  # nothing written there after the change
        if then == "deleted":
            assert not after.exists()
        elif then == "replaced by a file":
            assert after.read_text() == "not a folder"
        else:
            assert sorted(p.name for p in after.iterdir()) == [".lock"]


def test_the_records_are_on_disk_before_each_checkpoint(tmp_path, monkeypatch):
    """Checkpoints were fsynced, metrics.jsonl only flushed: after a power cut a checkpoint could outlive the records
    before it, and a resume (which keeps the records up to its step) left a gap for good."""
    import os

    from stmd_fast import checkpoint

    events, fsync, save = [], os.fsync, checkpoint.save_checkpoint

    def recorded_fsync(fd):
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    def recorded_save(run_dir, step, *args, **kwargs):
        events.append(f"save {step}")
        return save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr("stmd_fast.training_state.save_checkpoint", recorded_save)
    cfg = config(tmp_path / "run")
    cfg.ckpt_every = 2
    drive(cfg)
    metrics = str(tmp_path / "run" / "metrics.jsonl")
    saves = [i for i, event in enumerate(events) if event.startswith("save")]
    assert [events[i] for i in saves] == ["save 2", "save 4", "save 5"]
    for i in saves:
        assert events[i - 1] == metrics


def test_a_nan_in_a_record_is_json_null_and_a_first_step_record_has_no_rates(tmp_path, capsys):
    """An FD of diverged weights is logged as NaN: json.dumps wrote a bare NaN, which strict readers refuse."""
    record = {"step": 3, "loss": 1.5, "delta_sq": 2.0, "lr": 1e-3, "elapsed_s": 4.0, "FD/ema0.999": float("nan")}
    with RunLog(tmp_path, 10, 2, is_main=True) as log:
        log.record(record)
    written = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(written, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))["FD/ema0.999"] is None
    out = capsys.readouterr().out  # pytest's stdout is not a terminal: a progress line, with no rate to show
    assert "step 3/10 | loss 1.5000 | delta_sq 2 | first step of this process: rates from the next record" in out
    assert "eta ?" in out


def test_a_terminal_of_no_width_gets_progress_lines(tmp_path, monkeypatch):
    """script(1) or docker run -t without a sized terminal: tqdm drew nothing at 0 columns and, stdout being a
    terminal, no progress line was written either: no loss was ever shown."""
    import os
    import pty
    import sys

    main_fd, child_fd = pty.openpty()  # a new pseudo-terminal: 0 x 0 until someone sizes it
    try:
        with os.fdopen(os.dup(child_fd), "w") as terminal:
            monkeypatch.setattr(sys, "stdout", terminal)
            monkeypatch.setattr(sys, "stderr", terminal)
            with RunLog(tmp_path, 10, 0, is_main=True) as log:
                assert log.lines and log.bar.disable
    finally:
        os.close(main_fd)
        os.close(child_fd)


def test_a_full_disk_under_metrics_jsonl_is_named_not_hidden_by_the_close(tmp_path):
    """The append failed naming metrics.jsonl; the close on the way out failed again (the buffer's flush), with
    no file name, and replaced it: "could not write to --out RUN"."""
    import errno

    class FullDisk:
        name = str(tmp_path / "metrics.jsonl")

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device", self.name)

        def flush(self):
            pass

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    record = {"step": 1, "loss": 1.0, "delta_sq": 1.0, "lr": 1e-3, "elapsed_s": 1.0}
    with pytest.raises(OSError) as err:
        with RunLog(tmp_path, 10, 0, is_main=True) as log:
            log.metrics.close()
            log.metrics = FullDisk()
            log.record(record)
    assert err.value.filename == str(tmp_path / "metrics.jsonl")
    log.metrics = FullDisk()  # a close that fails alone raises, naming the file
    with pytest.raises(OSError) as err:
        log.__exit__(None, None, None)
    assert err.value.filename == str(tmp_path / "metrics.jsonl")


def test_a_logger_that_fails_to_close_leaves_the_others_and_metrics_jsonl_closed(tmp_path):
    """A logger's close that raised (TensorBoard on a full disk) skipped the loggers after it and metrics.jsonl."""
    closed = []

    class Logger:
        def __init__(self, name, fails):
            self.name, self.fails = name, fails

        def close(self, failed):
            closed.append((self.name, failed))
            if self.fails:
                raise OSError(28, "No space left on device", self.name)

    with pytest.raises(OSError) as err:
        with RunLog(tmp_path, 10, 0, is_main=True, loggers=[Logger("tb", True), Logger("wandb", False)]) as log:
            pass
    assert err.value.filename == "tb" and closed == [("tb", False), ("wandb", False)] and log.metrics.closed
    closed.clear()
    with pytest.raises(ValueError, match="the error under way"):  # it stays the one raised
        with RunLog(tmp_path, 10, 0, is_main=True, loggers=[Logger("tb", True), Logger("wandb", False)]) as log:
            raise ValueError("the error under way")
    assert closed == [("tb", True), ("wandb", True)] and log.metrics.closed


def test_an_interval_resumed_over_two_ranks_records_the_uninterrupted_runs_loss_bit_for_bit(monkeypatch):
    """Two ranks' IntervalSums driven in one process (the gather stacks both ranks' sums): a checkpoint mid-interval,
    restored on each rank, gives the same record at the interval's end as the sums that never stopped. Restoring
    the rank mean instead (the old checkpoint form) rounds differently in float32."""
    from stmd_fast import run_log
    from stmd_fast.run_log import IntervalSums

    def drive(ranks, losses, step, interval_end):
        def gather(mine):  # what all_gather gives: each rank's own (loss, error, bad step), this rank's flags
            return torch.stack([torch.cat([torch.stack([r.loss.double(), r.error.double(), r.first_bad_step.double()]),
                                           mine[3:]]) for r in ranks])
        monkeypatch.setattr(run_log.distributed, "gather", gather)
        for k, loss in enumerate(losses):
            for rank, sums in enumerate(ranks):
                sums.add(loss[rank], loss[rank] / 2, step + k)
        end = step + len(losses)
        return [sums.close(end, False, 2, 8, "error", 0.1, interval_end=interval_end)[0] for sums in ranks]

    gen = torch.Generator().manual_seed(0)
    losses = (torch.rand(8, 2, generator=gen) * torch.tensor([1.0, 1e3])).unbind()  # ranks of unlike scale round apart
    cpu = torch.device("cpu")
    whole = [IntervalSums(cpu, 0), IntervalSums(cpu, 0)]
    drive(whole, losses[:3], 0, interval_end=False)
    expected = drive(whole, losses[3:], 3, interval_end=True)[0]

    first = [IntervalSums(cpu, 0), IntervalSums(cpu, 0)]
    drive(first, losses[:3], 0, interval_end=False)
    window = first[0].open_window()  # rank 0 writes it into the checkpoint
    for rank in range(2):
        monkeypatch.setattr(run_log.distributed, "rank_and_world", lambda rank=rank: (rank, 2))
        first[rank] = IntervalSums(cpu, 3, window=window)
    resumed = drive(first, losses[3:], 3, interval_end=True)[0]
    assert (resumed["loss"], resumed["error"]) == (expected["loss"], expected["error"])

    # over another process count (and from an older checkpoint's rank mean) each rank takes the mean
    assert run_log.own_sum(window["loss"], 0, 1) == pytest.approx(sum(window["loss"]) / 2)
    assert run_log.own_sum(1.5, 1, 2) == 1.5


def test_a_training_call_gives_back_the_callers_tf32_switches(tmp_path, monkeypatch):
    """On CUDA, train() sets TF32 process-wide (--tf32, use_tf32) and left it so: a notebook's later fp32 matmuls
    ran in TF32 (or lost the TF32 it had chosen, with --no-tf32), also when the training failed. Run here with a
    CUDA device pretended (training on it fails without a GPU, after the switch is set)."""
    from stmd_fast import train as train_module

    monkeypatch.setattr(train_module.distributed, "process_device", lambda ctx, device: torch.device("cuda"))
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("medium")
        torch.backends.cudnn.allow_tf32 = False
        cfg = config(tmp_path / "run")
        try:
            train_module.train(cfg)
        except Exception:  # noqa: BLE001 - no GPU here: what matters is the state it leaves
            assert not torch.cuda.is_available()
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("medium", False)
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def test_a_config_saves_its_data_dir_and_a_data_pattern_absolute(tmp_path, monkeypatch):
    """The command line saved --data-dir absolute (a run resumes and is evaluated from any folder); a TrainConfig
    built in Python for train.train kept "datasets", relative to wherever it was later read."""
    monkeypatch.chdir(tmp_path)
    assert TrainConfig().data_dir == str(tmp_path / "datasets")
    assert TrainConfig(data_dir="~/mnist").data_dir == str(Path.home() / "mnist")
    with pytest.raises(ValueError, match="--data-dir is empty"):
        TrainConfig(data_dir="")
    # a latent --data pattern names no file as written: it was saved relative, and a resume from another folder
    # said the data were "gone"; each part is made absolute, its braces and wildcards kept
    pattern = TrainConfig(data="enc/shard-{000000..000003}.tar::~/more/shard-*.tar").data
    assert pattern == f"{tmp_path}/enc/shard-{{000000..000003}}.tar::{Path.home()}/more/shard-*.tar"
    assert TrainConfig(data="missing.npy").data == "missing.npy"  # a plain name that is not there: said as typed
