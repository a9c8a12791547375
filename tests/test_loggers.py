"""--loggers tensorboard | wandb: what each logger writes, read back with the tool's own reader
(TensorBoard's EventAccumulator; W&B's offline run file, whose records are W&B's protobufs in a
LevelDB-style log), and the one-line error when the package is missing."""
from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stmd_fast import loggers

RECORDS = [{"step": 2, "loss": 1.25, "delta_sq": 0.5, "lr": 1e-3},
           {"step": 4, "loss": 0.75, "delta_sq": 0.25, "lr": 1e-3}]


def tensorboard_scalars(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[int]]]:
    """{tag: [(step, value)]} and {image tag: [steps]} as TensorBoard itself reads the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    images = {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}
    return scalars, images


def wandb_history(run_root: Path) -> list[dict]:
    """The history rows of the (one) offline W&B run under run_root, decoded from its .wandb file."""
    return [record for kind, record in wandb_records(run_root) if kind == "history"]


def wandb_records(run_root: Path) -> list[tuple[str, object]]:
    """(kind, record) of the (one) offline W&B run under run_root, decoded from its .wandb file: history
    records as {key: value}, the others as W&B's protobuf.

    The file is a 7-byte header (":W&B", magic, version) then LevelDB log blocks of 32 KiB: records of
    (crc32c, length, type) + payload, type 1 = a whole record, 2/3/4 = its first/middle/last piece.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = run_root.glob("wandb/offline-run-*/run-*.wandb")
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    rows, pos, block, pieces = [], 7, 32768, []
    while pos + 7 <= len(raw):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        pieces.append(raw[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            kind = record.WhichOneof("record_type")
            rows.append((kind, {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item} if kind == "history" else record))
    return rows


def log_grid_live_and_replayed(logger_class, tmp_path: Path, grid: torch.Tensor) -> tuple[Path, Path]:
    """Two run folders: one whose logger got `grid` at step 4 live, one resumed at step 4 that replays the grid
    from its samples/step_00000004.png (written by save_image, as train writes it)."""
    from torchvision.utils import save_image

    live, resumed = tmp_path / "live", tmp_path / "resumed"
    logger = logger_class(live, {})
    logger.log_image(4, "samples", grid)
    logger.close()
    (resumed / "samples").mkdir(parents=True)
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    save_image(grid, resumed / "samples" / "step_00000004.png")
    logger_class(resumed, {}, start_step=4).close()
    return live, resumed


def _write(logger) -> None:
    for record in RECORDS:
        logger.log_scalars(record["step"], {k: v for k, v in record.items() if k != "step"})
    logger.log_image(4, "samples", torch.rand(3, 10, 12))
    logger.close()


def test_tensorboard_event_files_hold_the_scalars_and_the_grid(tmp_path):
    _write(loggers.TensorBoardLogger(tmp_path, {"lr": 1e-3, "net": {"kind": "unet"}}))
    scalars, images = tensorboard_scalars(tmp_path / "tensorboard")
    assert set(scalars) == {"loss", "delta_sq", "lr"}
    for key in scalars:
        assert scalars[key] == [(r["step"], pytest.approx(r[key])) for r in RECORDS]
    assert images == {"samples": [4]}


def test_tensorboard_grids_hold_the_pixels_of_the_png_live_and_replayed(tmp_path):
    """A grid logged during training was one level darker than its PNG in ~30% of pixels (add_image truncates
    floats; save_image rounds), while a resume's replay of the PNG matched it."""
    import io

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    grid = torch.rand(3, 10, 12, generator=torch.Generator().manual_seed(0))
    grid[:, 0] = torch.tensor([0.3, 0.7, 0.5 / 255, 1.5 / 255]).repeat(3)[:12]  # halves: save_image rounds them up
    live, resumed = log_grid_live_and_replayed(loggers.TensorBoardLogger, tmp_path, grid)
    png = np.array(Image.open(resumed / "samples" / "step_00000004.png"))
    for run in live, resumed:
        events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
        events.Reload()
        (image,) = events.Images("samples")
        assert np.array_equal(np.array(Image.open(io.BytesIO(image.encoded_image_string))), png), run.name


def test_tensorboard_resume_drops_the_events_after_the_checkpoint(tmp_path):
    _write(loggers.TensorBoardLogger(tmp_path, {}))
    # resumed from a checkpoint at step 2, a logged step: its record stays (metrics.jsonl keeps it too)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    again = loggers.TensorBoardLogger(tmp_path, {}, start_step=2)
    again.log_scalars(4, {"loss": 9.0})
    again.close()
    scalars, _ = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(2, 1.25), (4, 9.0)]  # step 4 of the first attempt is gone


def test_tensorboard_first_named_on_a_resume_shows_the_whole_run(tmp_path):
    """--loggers may change on --resume, as the README's example does: the event files held only the steps
    after the checkpoint, and no config. metrics.jsonl (cut back to the checkpoint) and its grids are
    replayed, as into a new W&B run; a NaN there (null: an FD of diverged weights) as NaN."""
    records = [*RECORDS, {"step": 6, "loss": 0.5, "delta_sq": 0.125, "lr": 1e-3, "FD/ema0.999": None}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "samples").mkdir()
    Image.fromarray(np.full((10, 12), 200, np.uint8)).save(tmp_path / "samples" / "step_00000004.png")
    logger = loggers.TensorBoardLogger(tmp_path, {"lr": 1e-3}, start_step=6)
    logger.log_scalars(8, {"loss": 0.25})
    logger.close()
    scalars, images = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(2, 1.25), (4, 0.75), (6, 0.5), (8, 0.25)] and images == {"samples": [4]}
    assert [(step, math.isnan(value)) for step, value in scalars["FD/ema0.999"]] == [(6, True)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert "config/text_summary" in events.Tags()["tensors"]


def test_wandb_offline_run_holds_the_scalars_and_the_grid(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = loggers.WandbLogger(tmp_path, {"lr": 1e-3})
    assert "offline" in capsys.readouterr().out and logger.mode == "offline"
    run_id = (tmp_path / "wandb" / "run-id").read_text()
    _write(logger)
    rows = wandb_history(tmp_path)
    assert [row["_step"] for row in rows] == [2, 4]
    for row, record in zip(rows, RECORDS):
        assert {k: row[k] for k in ("loss", "delta_sq", "lr")} == {k: record[k] for k in ("loss", "delta_sq", "lr")}
    assert rows[1]["samples/_type"] == "image-file" and (rows[1]["samples/width"], rows[1]["samples/height"]) == (12, 10)
    (png,) = tmp_path.glob("wandb/offline-run-*/files/media/images/samples_*.png")
    assert png.stat().st_size > 0
    assert run_id and len(run_id) == 8  # kept, so that a resumed training run continues this W&B run


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_wandb_takes_the_grid_of_any_channel_count_a_run_draws(tmp_path, monkeypatch, channels):
    """A 2-channel run's grid (gray + alpha) raised "Un-supported shape" from wandb.Image at its first grid,
    mid-run; it goes as RGBA now, gray in R = G = B, and the others as they are. A resumed run replays the
    grids it wrote (samples/*.png) into its new W&B run the same way (alpha was dropped)."""
    from torchvision.utils import make_grid  # as train draws samples/step_*.png

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    grid = make_grid(torch.randint(0, 256, (3, channels, 4, 5)).float() / 255, nrow=8, padding=1)
    expected = (grid * 255).round().byte().permute(1, 2, 0).numpy()
    if channels == 2:
        expected = expected[..., [0, 0, 0, 1]]
    live, resumed = log_grid_live_and_replayed(loggers.WandbLogger, tmp_path, grid)
    for run in live, resumed:
        (png,) = run.glob("wandb/offline-run-*/files/media/images/samples_*.png")
        assert np.array_equal(np.array(Image.open(png)).reshape(expected.shape), expected), run.name


@pytest.mark.parametrize("name", loggers.LOGGERS)
def test_a_missing_package_is_a_one_line_error_naming_the_extra(name, monkeypatch):
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda module: None)
    with pytest.raises(loggers.LoggerUnavailable) as err:
        loggers.check_loggers([name])
    message = str(err.value)
    assert "\n" not in message and f'pip install -e ".[{name}]"' in message


@pytest.mark.parametrize("name", loggers.LOGGERS)
def test_a_package_that_is_installed_but_fails_to_import_is_a_one_line_error(name, monkeypatch):
    """A broken install passed the check (find_spec found it) and failed with a traceback when the logger
    opened, after start-up, leaving the run folder behind."""
    def broken(module):
        raise ImportError(f"simulated broken {module}\nsecond line")

    monkeypatch.setattr(loggers.importlib, "import_module", broken)
    with pytest.raises(loggers.LoggerUnavailable) as err:
        loggers.check_loggers([name])
    message = str(err.value)
    assert "\n" not in message and f"simulated broken {name}" in message and "installed but fails to import" in message


def test_an_unknown_logger_lists_the_choices():
    with pytest.raises(loggers.LoggerUnavailable, match="tensorboard, wandb"):
        loggers.check_loggers(["mlflow"])


def test_loggers_are_not_imported_unless_asked_for():
    import subprocess

    code = ("import sys, stmd_fast.train, stmd_fast.loggers; "
            "print(sorted(m for m in ('tensorboard', 'wandb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tensorboard_fresh_start_drops_the_curve_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    dead = loggers.TensorBoardLogger(tmp_path, {})
    for step in range(5, 30, 5):  # logged (flushed) up to step 25, then killed: no checkpoint, no close
        dead.log_scalars(step, {"loss": float(step)})
    # the fresh start (start_step 0): metrics.jsonl starts over, and so must the curve
    fresh = loggers.TensorBoardLogger(tmp_path, {})
    for step in (5, 10):
        fresh.log_scalars(step, {"loss": -float(step)})
    fresh.close()
    scalars, _ = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(5, -5.0), (10, -10.0)]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_wandb_fresh_start_is_a_new_run_and_a_resume_replays_the_records_up_to_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    id_file = tmp_path / "wandb" / "run-id"
    _write(loggers.WandbLogger(tmp_path, {}))  # a run killed before its first checkpoint (closed here: same files)
    dead_id = id_file.read_text()
    fresh = loggers.WandbLogger(tmp_path, {})  # started again without --resume
    assert fresh.run.id != dead_id and id_file.read_text() == fresh.run.id
    fresh.log_scalars(2, {"loss": 0.5})
    fresh.close()
    rows = wandb_history(tmp_path)  # one offline run: the dead one's is gone, so wandb sync uploads this one alone
    assert [(row["_step"], row["loss"]) for row in rows] == [(2, 0.5)]
    # that run logs step 4 and is killed; it resumes from its checkpoint at step 2, metrics.jsonl cut back to
    # it. Continued, the W&B run kept the killed timeline's step 4 (its steps only increase: the new one was
    # dropped). A new W&B run gets the records (and grids) up to step 2, then the new step 4.
    killed = loggers.WandbLogger(tmp_path, {})
    for step, loss in ((2, 0.5), (4, 9.0)):
        killed.log_scalars(step, {"loss": loss})
    killed.close()
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 0.5}) + "\n")
    (tmp_path / "samples").mkdir()
    Image.fromarray(np.full((10, 12), 200, np.uint8)).save(tmp_path / "samples" / "step_00000002.png")
    resumed = loggers.WandbLogger(tmp_path, {}, start_step=2)
    assert resumed.run.id != killed.run.id and id_file.read_text() == resumed.run.id
    resumed.log_scalars(4, {"loss": 0.25})
    resumed.close()
    rows = wandb_history(tmp_path)  # the one offline run left
    assert [(row["_step"], row["loss"]) for row in rows if "loss" in row] == [(2, 0.5), (4, 0.25)]
    assert [(row["_step"], row["samples/width"]) for row in rows if "samples/_type" in row] == [(2, 12)]

@pytest.mark.parametrize("failed", [False, True])
def test_wandb_marks_a_run_that_ended_with_an_error_failed(tmp_path, monkeypatch, failed):
    """A run stopped by a non-finite loss or a crash read as finished (exit code 0) in W&B."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = loggers.WandbLogger(tmp_path, {})
    logger.log_scalars(2, {"loss": 0.5})
    logger.close(failed=failed)
    (exit_record,) = [record for kind, record in wandb_records(tmp_path) if kind == "exit"]
    assert exit_record.exit.exit_code == (1 if failed else 0)


def test_wandb_that_cannot_start_is_one_line_naming_the_fixes(tmp_path, monkeypatch, capsys):
    """Online without a key (or without a network, after W&B's own timeout) was a 39-line traceback. An online
    start says first that it may wait (90 s of silence without a network looked like a hang)."""
    import wandb

    def no_key(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.\nmore")

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "init", no_key)
    with pytest.raises(loggers.LoggerUnavailable) as err:
        loggers.WandbLogger(tmp_path, {})
    message = str(err.value)
    assert "\n" not in message and "W&B could not start an online run (UsageError: No API key configured" in message
    assert "wandb login" in message and "WANDB_MODE=offline" in message
    said = capsys.readouterr().out
    timeout = f"{wandb.Settings().init_timeout:.0f} s"  # 90 s in wandb 0.31
    assert f"W&B: connecting to start an online run (W&B waits up to {timeout}" in said and "WANDB_MODE=offline" in said
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "7")  # what wandb.init waits then
    with pytest.raises(loggers.LoggerUnavailable):
        loggers.WandbLogger(tmp_path, {})
    assert "W&B waits up to 7 s" in capsys.readouterr().out


def test_a_full_disk_under_tensorboard_is_one_line_naming_its_folder(tmp_path):
    """TensorBoard writes from a thread of its own: a failed write (a full disk) printed that thread's traceback,
    then the trainer's line said "could not write to --out" without naming the file. Now: one line naming
    RUN/tensorboard, no traceback."""
    import subprocess

    script = """if True:
        import errno, sys
        from stmd_fast import loggers, train
        opened = loggers.TensorBoardLogger.__init__
        def full(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        def opened_on_a_full_disk(self, *args, **kwargs):
            opened(self, *args, **kwargs)
            self.writer.file_writer.event_writer._async_writer._worker._record_writer.write = full
        loggers.TensorBoardLogger.__init__ = opened_on_a_full_disk
        sys.exit(train.main(sys.argv[1:]))
    """
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", script, "--preset", "gmm", "--batch-size", "16", "--steps", "30",
                           "--log-every", "5", "--loggers", "tensorboard", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"error: could not write {out / 'tensorboard'}: No space left on device; "
                                                f"stopped, no checkpoint was written: free space, then run the same "
                                                f"command again"]


def test_the_tensorboard_logger_gives_back_the_process_thread_excepthook(tmp_path, monkeypatch):
    """Its hook (dropping TensorBoard writer threads' tracebacks, said once by the trainer) stayed for the life
    of the process: a notebook's own TensorBoard writers later lost their errors without a word."""
    import threading

    pytest.importorskip("tensorboard")
    from stmd_fast.loggers import TensorBoardLogger

    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)  # a test above leaves one unclosed
    before = threading.excepthook
    logger = TensorBoardLogger(tmp_path, {"lr": 1e-3})
    assert threading.excepthook is not before  # quiet while the run logs
    logger.close()
    assert threading.excepthook is before
