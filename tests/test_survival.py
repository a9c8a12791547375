"""What survives what: kills during checkpoint writes and rotation, damaged checkpoints and shards, a
second run in one folder, full disks and read-only outputs (README, "What survives what").

A kill is simulated faithfully: the save runs in a forked child that calls os._exit (no cleanup, no
finally) at the k-th file-system operation, for every k, including half-written files and half-
deleted folders. A full disk is a real tiny tmpfs where the tests run as root and may mount one, and
otherwise a write that raises OSError(ENOSPC) where the bytes would hit the disk.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import stmd_fast.checkpoint as ckpt_module
import stmd_fast.files as files
from stmd_fast.checkpoint import (CheckpointError, NonFiniteState, list_checkpoints, load_weights, newest_intact,
                                  recover_leftovers, save_checkpoint, verify_checkpoint)
from stmd_fast.files import RunLocked, run_lock
from conftest import assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- file-system fixtures

@pytest.fixture
def disk_full_after(monkeypatch):
    """Make every durable write of stmd_fast fail with ENOSPC after `n` bytes have reached the file, as a
    full disk does (the partial file is left to the code under test to remove)."""
    real_open = open

    def install(n: int = 100):
        class FullFile(io.FileIO):
            written = 0

            def write(self, data):
                room = n - FullFile.written
                if len(data) > room:
                    super().write(bytes(data)[:max(room, 0)])
                    FullFile.written = n
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                FullFile.written += len(data)
                return super().write(data)

        def full_open(path, mode="r", *args, **kwargs):
            if "w" in mode and "b" in mode:
                return FullFile(path, "w")
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(files, "open", full_open, raising=False)
        import stmd_fast.data.encode as encode
        monkeypatch.setattr(encode, "open", full_open, raising=False)

    return install


def hidden_or_partial(folder: Path) -> list[str]:
    """Files a failed write must not leave: temporaries and anything empty."""
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".tmp")
                  or (p.is_file() and p.stat().st_size == 0))


# ----------------------------------------------------------------------------- checkpoints

META = {"config": {}, "data_shape": [2], "data_kind": "vector"}


def _save(run: Path, step: int, keep: int = 2, value: float | None = None) -> Path:
    net = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(net.weight, float(step if value is None else value))
    state = {"step": step, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}}}
    return save_checkpoint(run, step, net, net, state, META, keep=keep)


def _weight(ckpt: Path) -> float:
    return float(load_file(ckpt / "model.safetensors")["weight"][0, 0])


def _flip_a_bit(path: Path, where: float = 0.9) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated model": lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:50]),
    "bit flip in ema": lambda c: _flip_a_bit(c / "ema.safetensors"),
    "bit flip in train state": lambda c: _flip_a_bit(c / "train_state.pt", 0.5),
    "missing train state": lambda c: (c / "train_state.pt").unlink(),
    "missing weights": lambda c: (c / "model.safetensors").unlink(),
    "garbled config": lambda c: (c / "config.json").write_text("{\"config\": {"),
    "empty config": lambda c: (c / "config.json").write_text(""),
    "config of another format": lambda c: (c / "config.json").write_text(
        json.dumps({**json.loads((c / "config.json").read_text()), "format": 99})),
}
NAMED = {"truncated model": "model.safetensors", "bit flip in ema": "ema.safetensors",
         "bit flip in train state": "train_state.pt", "missing train state": "train_state.pt",
         "missing weights": "model.safetensors", "garbled config": "config.json", "empty config": "config.json",
         "config of another format": "format 99"}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_the_newest_intact_one_found(tmp_path, damage):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep=3)
    newest = tmp_path / "checkpoints" / "step_00000003"
    DAMAGE[damage](newest)
    with pytest.raises(CheckpointError, match=NAMED[damage]) as info:
        verify_checkpoint(newest)
    assert len(str(info.value).splitlines()) == 1
    ckpt, meta, passed_over = newest_intact(tmp_path)
    assert ckpt.name == "step_00000002" and meta["step"] == 2
    assert len(passed_over) == 1 and NAMED[damage] in passed_over[0]
    with pytest.raises(CheckpointError, match=NAMED[damage]):  # named by the user: no fallback
        newest_intact(newest)


def test_non_finite_weights_are_refused_naming_the_file(tmp_path):
    """A weights file whose bytes pass the checksum but hold NaN (written by another tool, or a
    checkpoint from before checksums) is refused on load, naming the file and the tensor."""
    ckpt = _save(tmp_path, 1)
    weights = load_file(ckpt / "ema.safetensors")
    weights["bias"][1] = float("nan")
    save_file(weights, ckpt / "ema.safetensors")
    meta = json.loads((ckpt / "config.json").read_text())
    del meta["files"]  # as a checkpoint written before checksums
    (ckpt / "config.json").write_text(json.dumps(meta))
    verify_checkpoint(ckpt)  # present and parsable: only the values are wrong
    load_weights(ckpt, "model.safetensors")
    with pytest.raises(CheckpointError, match=r"ema.safetensors: \['bias'\] holds NaN or inf"):
        load_weights(ckpt, "ema.safetensors")


def test_non_finite_state_is_never_saved(tmp_path):
    _save(tmp_path, 1)
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight[0, 1] = float("inf")
    with pytest.raises(NonFiniteState, match=r"model.safetensors\['weight'\]"):
        save_checkpoint(tmp_path, 2, net, torch.nn.Linear(2, 2), {"step": 2}, META, keep=1)
    with pytest.raises(NonFiniteState, match=r"train_state.pt\['optimizer'\]\['state'\]\[0\]\['exp_avg'\]"):
        save_checkpoint(tmp_path, 2, torch.nn.Linear(2, 2), torch.nn.Linear(2, 2),
                        {"optimizer": {"state": {0: {"exp_avg": torch.tensor([float("nan")])}}}}, META, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]


def test_rotation_never_deletes_the_newest_intact_checkpoint(tmp_path):
    """keep=1 with a newer damaged folder (left by a run that fell back): the one just written and the
    damaged newer one survive; the older intact one goes."""
    for step in (1, 2, 5):
        _save(tmp_path, step, keep=3)
    DAMAGE["bit flip in ema"](tmp_path / "checkpoints" / "step_00000005")
    _save(tmp_path, 3, keep=1)
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step_00000005", "step_00000003"]
    assert newest_intact(tmp_path)[0].name == "step_00000003"
    # a newer INTACT folder than the one written is spared too, as the newest intact one
    _save(tmp_path, 7, keep=3)
    _save(tmp_path, 4, keep=1)
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step_00000007", "step_00000004"]


def _kill_at(k: int, action) -> int | None:
    """Run action() in a forked child that dies (os._exit, no cleanup, no finally) at its k-th file-system
    operation: a write (after half its bytes), a rename, or a folder deletion (after one file). Returns
    None if it died, else the number of operations it made."""
    pid = os.fork()
    if pid == 0:  # the child
        count = [0]

        def due() -> bool:
            count[0] += 1
            return count[0] == k

        real_write, real_replace, real_rmtree = files.write_bytes_durably, os.replace, shutil.rmtree

        def write(path, data):
            if due():
                Path(path).write_bytes(data[:len(data) // 2])
                os._exit(9)
            real_write(path, data)

        def replace(a, b):
            if due():
                os._exit(9)
            real_replace(a, b)

        def rmtree(path, *args, **kwargs):
            if due():
                victim = next((p for p in Path(path).rglob("*") if p.is_file()), None)
                if victim is not None:
                    victim.unlink()
                os._exit(9)
            real_rmtree(path, *args, **kwargs)

        ckpt_module.write_bytes_durably = files.write_bytes_durably = write
        os.replace, shutil.rmtree = replace, rmtree
        try:
            action()
        except BaseException:
            os._exit(8)
        os._exit(100 + count[0])
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code != 8, "the action failed in the child"
    return None if code == 9 else code - 100


@pytest.mark.parametrize("scenario", ["new step with rotation", "same step saved again"])
def test_a_kill_at_any_point_of_a_save_leaves_every_visible_checkpoint_intact(tmp_path, scenario):
    """Steps 1, 2 exist (keep 2); then step 3 is saved (rotation deletes step 1), or step 2 again. Killed at
    each file-system operation in turn: the loaders see only intact checkpoints, the newest of them is the
    old newest or the new one, and the next save tidies up and rotates as usual."""
    base = tmp_path / "base"
    _save(base, 1)
    _save(base, 2)
    step, value = (3, 3.0) if scenario == "new step with rotation" else (2, 20.0)
    run = tmp_path / "counting"
    shutil.copytree(base, run)
    operations = _kill_at(10_000, lambda: _save(run, step, value=value))
    assert operations is not None and operations >= 6
    for k in range(1, operations + 1):
        run = tmp_path / f"kill{k}"
        shutil.copytree(base, run)
        assert _kill_at(k, lambda: _save(run, step, value=value)) is None
        for folder in list_checkpoints(run):
            verify_checkpoint(folder)  # CheckpointError here would be a half checkpoint in sight
        newest, meta, passed_over = newest_intact(run)
        assert not passed_over
        seen_before = (meta["step"], _weight(newest))
        assert seen_before in {(2, 2.0), (step, value)}, f"killed at operation {k}"
        # tidying up keeps what the loaders saw (a .replaced-step_X goes back to its name); the next save
        # (a later step) leaves only step_* folders, `keep` of them
        recover_leftovers(run)
        seen = newest_intact(run)
        assert (seen[1]["step"], _weight(seen[0])) == seen_before
        assert seen[0].name == f"step_{meta['step']:08d}"
        _save(run, 9)
        assert [c.name for c in (run / "checkpoints").iterdir() if not c.name.startswith("step_")] == []
        assert [c.name for c in list_checkpoints(run)] == ["step_00000009", seen[0].name]


# ----------------------------------------------------------------------------- run lock

def test_a_start_racing_the_lock_holder_reads_its_name_not_a_process(tmp_path):
    """The holder writes "pid N on HOST" just after it locks: a start in between read an empty file and said
    "in use by another training run (a process)". It now reads the name once the holder has written it."""
    import fcntl
    import threading

    lock = tmp_path / ".lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # locked, not yet named
        threading.Timer(0.2, os.pwrite, (fd, b"pid 4242 on elsewhere", 0)).start()
        with pytest.raises(RunLocked, match=r"in use by another training run \(pid 4242 on elsewhere\)"):
            with run_lock(tmp_path):
                pass
    finally:
        os.close(fd)


def test_a_reader_that_goes_away_does_not_stop_the_work(tmp_path):
    """`encode ... | head -1` stopped the encoding with a BrokenPipeError traceback at its second line; a training
    run piped into head stopped the same way. The rest of the output now goes nowhere and the run finishes."""
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "stmd_fast.train", *GMM, "--steps", "40", "--log-every", "1",
                                "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("stmd on gmm")
    process.stdout.close()  # as head -1 does
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["step_00000040"]


def test_the_run_lock_admits_one_holder_and_is_released_by_any_exit(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunLocked, match=f"in use by another training run .pid {os.getpid()}.*another --out"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released on exit
        pass
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from stmd_fast.files import run_lock
        with run_lock({str(tmp_path)!r}):
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    with run_lock(tmp_path):  # the kernel released it
        pass



# ----------------------------------------------------------------------------- sample and export CLIs

GMM = ["--preset", "gmm", "--batch-size", "16", "--log-every", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def gmm_run(tmp_path_factory) -> Path:
    from stmd_fast.train import main as train_main

    run = tmp_path_factory.mktemp("gmm") / "run"
    assert train_main([*GMM, "--steps", "2", "--out", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    from stmd_fast.train import main as train_main

    data = tmp_path_factory.mktemp("data") / "tiny.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (16, 1, 8, 8), dtype=np.uint8))
    run = data.parent / "run"
    assert train_main(["--data", str(data), "--steps", "1", "--batch-size", "4", "--device", "cpu",
                       "--out", str(run)]) == 0
    return run


def sample(*args) -> int:
    from stmd_fast.sample import main as sample_main

    return sample_main([str(a) for a in args] + ["--device", "cpu"])


@pytest.fixture
def no_sampling(monkeypatch):
    """Fails the test if sampling starts: checks must come before the work."""
    from stmd_fast.checkpoint import Model

    monkeypatch.setattr(Model, "sample", lambda *a, **k: pytest.fail("sampled before refusing"))
    monkeypatch.setattr(Model, "inpaint", lambda *a, **k: pytest.fail("sampled before refusing"))


NOT_IMAGES = {
    "text.png": lambda p: p.write_text("not a picture"),
    "truncated.png": lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20),
    "garbage.npy": lambda p: p.write_bytes(b"\x93NUMPY garbage"),
    "pickled.npy": lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
    "strings.npy": lambda p: np.save(p, np.array([["a", "b"]])),
    "folder.png": lambda p: p.mkdir(),
}


@pytest.mark.parametrize("flag", ["--inpaint", "--mask"])
@pytest.mark.parametrize("name", list(NOT_IMAGES))
def test_inpaint_or_mask_that_is_not_an_image_is_one_line(capsys, image_run, tmp_path, no_sampling, flag, name):
    good = tmp_path / "good.npy"
    np.save(good, np.ones((1, 8, 8), dtype=np.float32))  # a valid image, and a mask that observes every pixel
    bad = tmp_path / name
    NOT_IMAGES[name](bad)
    files_ = {"--inpaint": good, "--mask": good, flag: bad}
    out = tmp_path / "x.png"
    assert sample(image_run, "--inpaint", files_["--inpaint"], "--mask", files_["--mask"], "--out", out) == 2
    assert_one_line_error(capsys, flag, name)
    assert not out.exists()


@pytest.mark.parametrize("make, said", [
    (lambda p: torch.save(torch.ones(1, 8, 8), p), "is a torch.save file, not an .npy: save the tensor with np.save"),
    (lambda p: p.write_text("1,2\n3,4\n"), "is not an .npy file (it lacks the header np.save writes): give a .png"),
])
def test_an_npy_that_is_another_kind_of_file_is_named_for_what_it_is(capsys, image_run, tmp_path, no_sampling,
                                                                    make, said):
    """numpy's message for these said the file "contains pickled (object) data" and how to load it unsafely."""
    good, bad = tmp_path / "good.npy", tmp_path / "mask.npy"
    np.save(good, np.ones((1, 8, 8), dtype=np.float32))
    make(bad)
    assert sample(image_run, "--inpaint", good, "--mask", bad, "--out", tmp_path / "x.png") == 2
    err = assert_one_line_error(capsys, f"--mask {bad}", said)
    assert "pickled" not in err and "unsafe" not in err


def test_sample_into_a_read_only_folder_fails_before_sampling(capsys, gmm_run, readonly_dir, no_sampling):
    out = readonly_dir / "x.npy"
    assert sample(gmm_run, "--num", 2, "--out", out) == 2
    assert_one_line_error(capsys, "cannot write --out", str(out))


def test_sample_on_a_full_disk_is_one_line_and_leaves_no_file(capsys, gmm_run, tmp_path, disk_full_after):
    out = tmp_path / "x.npy"
    disk_full_after(100)
    assert sample(gmm_run, "--num", 64, "--out", out) == 1
    assert_one_line_error(capsys, "could not write --out", "No space left on device", "nothing was written",
                          "free space")
    assert list(tmp_path.iterdir()) == []


def test_sample_past_a_file_size_limit_names_the_limit_not_the_disk(capsys, gmm_run, tmp_path, monkeypatch):
    """EFBIG (ulimit -f): "free space" was the advice for every failed write of sample and export."""
    def too_large(path, data):
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    import stmd_fast.sample as sample_module
    monkeypatch.setattr(sample_module, "write_atomic", too_large)
    assert sample(gmm_run, "--num", 8, "--out", tmp_path / "x.npy") == 1
    assert_one_line_error(capsys, "File too large", "ulimit -f")


def test_sample_on_a_real_full_disk(capsys, image_run, tiny_disk):
    (tiny_disk / "filler").write_bytes(b"\0" * (60 << 10))
    out = tiny_disk / "x.png"
    assert sample(image_run, "--num", 256, "--zoom", 8, "--out", out) == 1  # a ~300 KB grid
    assert_one_line_error(capsys, "could not write --out", "No space left on device")
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler"]


def test_sample_falls_back_past_a_damaged_newest_checkpoint_and_says_so(capsys, gmm_run, tmp_path):
    from stmd_fast.train import main as train_main

    run = tmp_path / "run"
    shutil.copytree(gmm_run, run)
    assert train_main(["--out", str(run), "--resume", "--steps", "3", "--keep-checkpoints", "3"]) == 0
    DAMAGE["truncated model"](run / "checkpoints" / "step_00000003")
    capsys.readouterr()
    assert sample(run, "--num", 2, "--out", tmp_path / "x.npy") == 0
    err = capsys.readouterr().err
    assert "note: using" in err and "step_00000002" in err and "step_00000003/model.safetensors" in err
    assert sample(run / "checkpoints" / "step_00000003", "--num", 2, "--out", tmp_path / "y.npy") == 2
    assert_one_line_error(capsys, "step_00000003/model.safetensors", "truncated")
    assert not (tmp_path / "y.npy").exists()


def test_sample_refuses_nan_weights_naming_the_file(capsys, gmm_run, tmp_path):
    """NaN written into a weights file with its checksum recomputed (the worst case: only the values are
    wrong) is refused with exit 2 instead of all-NaN samples with exit 0."""
    ckpt = tmp_path / "step_00000002"
    shutil.copytree(sorted((gmm_run / "checkpoints").glob("step_*"))[-1], ckpt)
    weights = load_file(ckpt / "ema.safetensors")
    first = next(iter(weights))
    weights[first].view(-1)[0] = float("nan")
    save_file(weights, ckpt / "ema.safetensors")
    meta = json.loads((ckpt / "config.json").read_text())
    data = (ckpt / "ema.safetensors").read_bytes()
    import hashlib
    meta["files"]["ema.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "config.json").write_text(json.dumps(meta))
    out = tmp_path / "x.npy"
    assert sample(ckpt, "--num", 2, "--out", out) == 2
    assert_one_line_error(capsys, "ema.safetensors", first, "NaN or inf")
    assert not out.exists()


def export(*args) -> int:
    from stmd_fast.export import main as export_main

    return export_main([str(a) for a in args] + ["--device", "cpu"])


def test_export_on_a_full_disk_is_one_line_and_leaves_no_file(capsys, gmm_run, tmp_path, disk_full_after):
    out = tmp_path / "s.pt2"
    disk_full_after(1000)
    assert export(gmm_run, "--out", out) == 1
    assert_one_line_error(capsys, "could not write --out", "No space left on device", "nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_export_on_a_real_full_disk_does_not_abort(gmm_run, tiny_disk):
    """In a child process: torch.export.save straight to a full disk could abort the process (C++)."""
    out = tiny_disk / "s.pt2"
    result = subprocess.run([sys.executable, "-m", "stmd_fast.export", str(gmm_run), "--out", str(out),
                             "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not write --out"), result.stderr
    assert list(tiny_disk.iterdir()) == []


def test_export_into_a_read_only_folder_is_refused_before_work(capsys, gmm_run, readonly_dir):
    assert export(gmm_run, "--out", readonly_dir / "s.pt2") == 2
    assert_one_line_error(capsys, "cannot write --out")


def test_a_pt2_without_a_program_is_one_line(capsys, tmp_path):
    """A zip holding our metadata file but no program (an interrupted copy, a hand-made archive)."""
    from stmd_fast.export import EXPORT_FORMAT, META_FILE

    fake = tmp_path / "s.pt2"
    meta = {"format": EXPORT_FORMAT, "data_kind": "vector", "device": "cpu"}
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr(f"s/extra/{META_FILE}", json.dumps(meta))
    out = tmp_path / "x.npy"
    assert sample("--exported", fake, "--out", out) == 2
    assert_one_line_error(capsys, "no loadable program", "re-export")
    assert not out.exists()


# ----------------------------------------------------------------------------- train: every option checked first

@pytest.mark.parametrize("flag, value", [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "2"), ("--weight-decay", "-1"),
    ("--weight-decay", "nan"), ("--ema-decay", "1"), ("--ema-decay", "nan"), ("--time-mean", "nan"),
    ("--time-mean", "inf"), ("--time-std", "0"), ("--time-std", "nan"), ("--adaptive-p", "nan"),
    ("--adaptive-p", "-1"), ("--adaptive-c", "0"), ("--adaptive-c", "inf"), ("--flow-matching-fraction", "nan"),
    ("--flow-matching-fraction", "1.5"), ("--warmup-steps", "-1"), ("--data-workers", "-1"), ("--ckpt-minutes", "-1"), ("--ckpt-minutes", "nan"),
    ("--steps", "0"), ("--batch-size", "0"), ("--keep-checkpoints", "0"), ("--r-mean", "nan"), ("--r-std", "0"),
    ("--mixture-weight", "nan"), ("--s-grid-fraction", "2"), ("--dropout", "1.5"), ("--dropout", "nan"),
    ("--dropout", "0.1"), ("--fd-num", "1"), ("--fd-every", "-1"), ("--resolution", "0"), ("--s-grid-steps", "0"),
    ("--flow-grid-fraction", "-0.5"), ("--flow-grid-steps", "0"),
])
def test_every_numeric_option_is_checked_before_work(capsys, tmp_path, flag, value):
    from stmd_fast.train import main as train_main

    run = tmp_path / "run"
    assert train_main([*GMM, "--steps", "1", "--out", str(run), flag, value]) == 2
    assert_one_line_error(capsys, flag, value)
    assert not run.exists()


# ----------------------------------------------------------------------------- train: resume, NaN, lock, signals, disk

def train(*args) -> int:
    from stmd_fast.train import main as train_main

    return train_main([str(a) for a in args])


def metrics_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("three") / "run"
    assert train(*GMM, "--steps", 6, "--ckpt-every", 2, "--keep-checkpoints", 3, "--out", run) == 0
    return run


@pytest.mark.parametrize("damage", ["truncated model", "bit flip in train state", "missing train state",
                                    "garbled config", "missing weights"])
def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_which(capsys, three_checkpoints, tmp_path, damage):
    """The newest checkpoint damaged: --resume continues from the one before, says which and why, sets the
    damaged one aside (kept, renamed damaged-step_*), and ends where an undamaged resume ends."""
    run = tmp_path / "run"
    shutil.copytree(three_checkpoints, run)
    DAMAGE[damage](run / "checkpoints" / "step_00000006")
    capsys.readouterr()
    assert train("--out", run, "--resume", "--steps", 8, "--device", "cpu") == 0
    captured = capsys.readouterr()
    assert "resumed from" in captured.out and "step_00000004 at step 4" in captured.out
    note = captured.err  # passed over: a note, on stderr
    assert "step_00000006" in note and NAMED[damage] in note and "damaged-step_00000006" in note
    assert (run / "checkpoints" / "damaged-step_00000006").is_dir()
    assert metrics_steps(run) == list(range(1, 9))
    reference = tmp_path / "reference"
    shutil.copytree(three_checkpoints, reference)
    assert train("--out", reference, "--resume", "--steps", 8, "--device", "cpu") == 0
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(run / "checkpoints" / "step_00000008" / name)
        b = load_file(reference / "checkpoints" / "step_00000008" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)  # steps 5-6 redone exactly


def _fail_on_newest(real, err):
    """`real` (a function of a path or of bytes), failing with `err` on the files of step_00000006."""
    def wrapped(arg):
        if isinstance(arg, Path) and "step_00000006" in str(arg) or isinstance(arg, bytes):
            raise err
        return real(arg)
    return wrapped


READ_FAILURES = {  # a cause outside the checkpoint's bytes, as a network file system or a full machine gives
    "I/O error while hashing": ("file_sha256", OSError(errno.EIO, "Input/output error"), "Input/output error"),
    "permission denied": ("file_sha256", PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
    "out of memory while parsing": ("load_safetensors", MemoryError(), "MemoryError"),
}


@pytest.mark.parametrize("failure", list(READ_FAILURES))
def test_a_checkpoint_that_cannot_be_read_now_is_not_set_aside_as_damaged(monkeypatch, capsys, three_checkpoints,
                                                                          tmp_path, failure):
    """An I/O error, a permission or memory shortage while --resume reads the newest checkpoint says so in one
    line: resuming from an older one would drop intact steps, and renaming it damaged-step_* would hide it."""
    run = tmp_path / "run"
    shutil.copytree(three_checkpoints, run)
    name, err, said = READ_FAILURES[failure]
    monkeypatch.setattr(ckpt_module, name, _fail_on_newest(getattr(ckpt_module, name), err))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    capsys.readouterr()
    assert train("--out", run, "--resume", "--steps", 8, "--device", "cpu") == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: --resume: cannot read") and len(message.splitlines()) == 1, message
    assert "step_00000006" in message and said in message and "nothing was set aside" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert metrics_steps(run) == list(range(1, 7))


def test_a_run_that_fails_before_writing_anything_leaves_no_folder(capsys, tmp_path):
    """A start-up error after --out was created (here: the images preset without --data) removes the folders
    it created, lock file included; a folder that existed before stays."""
    out = tmp_path / "new" / "run"
    assert train("--preset", "images", "--out", out, "--device", "cpu") == 2
    assert_one_line_error(capsys, "--data DIR")
    assert list(tmp_path.iterdir()) == []
    out.mkdir(parents=True)
    assert train("--preset", "images", "--out", out, "--device", "cpu") == 2
    assert out.is_dir()


def test_a_resumed_run_goes_on_counting_its_training_time(capsys, three_checkpoints, tmp_path):
    """elapsed_s in metrics.jsonl is the run's training time: a resume adds on to the checkpoint's record
    instead of starting again at 0, and the last line says how many steps this process ran."""
    run = tmp_path / "run"
    shutil.copytree(three_checkpoints, run)
    capsys.readouterr()
    assert train("--out", run, "--resume", "--steps", 8, "--device", "cpu") == 0
    assert "done: step 8, 2 of them in this process" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in records]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert elapsed[6] > elapsed[5] and elapsed == sorted(elapsed)
    # step 7, this process's first, has no rates (its time is start-up's); step 8's interval is one step
    assert "ms_per_step" not in records[6] and elapsed[7] >= elapsed[6] + records[7]["ms_per_step"] / 1e3 * 0.999


def test_a_resume_with_nothing_to_do_leaves_the_run_as_it_was(capsys, three_checkpoints, tmp_path):
    """--resume with --steps at or below the run's step trains nothing and changes nothing: its config.json
    still says how the checkpoints were trained (not the new --steps or --compile)."""
    run = tmp_path / "run"
    shutil.copytree(three_checkpoints, run)
    before = {name: (run / name).read_bytes() for name in ("config.json", "metrics.jsonl")}
    capsys.readouterr()
    assert train("--out", run, "--resume", "--steps", 4, "--compile", "--device", "cpu") == 0
    assert "nothing to do: the run is at step 6 of --steps 4" in capsys.readouterr().out
    assert {name: (run / name).read_bytes() for name in before} == before
    assert sorted(c.name for c in list_checkpoints(run)) == ["step_00000002", "step_00000004", "step_00000006"]


def test_a_run_whose_config_saved_its_data_relative_resumes_without_a_note_that_it_moved(capsys, tmp_path, monkeypatch):
    """A run saved with a relative --data (a shard pattern, by an older version) resumed with a note that its data
    had moved to the same place made absolute."""
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "a.npy", np.random.default_rng(0).standard_normal((64, 2)).astype(np.float32))
    run = tmp_path / "run"
    assert train("--data", "a.npy", "--steps", 1, "--batch-size", 16, "--out", run, "--device", "cpu") == 0
    config = json.loads((run / "config.json").read_text())
    config["config"]["data"] = "a.npy"  # as an older version saved a pattern
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert train("--out", run, "--resume", "--steps", 2, "--data", "a.npy", "--device", "cpu") == 0
    assert "note: the run was trained on" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["a.npy", "points [v1]*.npy"])
def test_a_run_whose_data_moved_resumes_from_the_new_place(capsys, tmp_path, name):
    """The run's --data moved: --resume says it is gone and how to go on; --resume --data NEW continues (and
    says so, recording the new place), while data of another shape is still refused. A name with glob characters
    (a folder "photos [2023]") is a path like any other: it got the loader's plain "no such file" instead."""
    points = np.random.default_rng(0).standard_normal((64, 2)).astype(np.float32)
    first, moved, run = tmp_path / name, tmp_path / "elsewhere" / name, tmp_path / "run"
    np.save(first, points)
    assert train("--data", first, "--steps", 2, "--batch-size", 16, "--out", run, "--device", "cpu") == 0
    moved.parent.mkdir()
    first.rename(moved)
    capsys.readouterr()
    assert train("--out", run, "--resume", "--steps", 3, "--device", "cpu") == 2
    assert_one_line_error(capsys, str(first), "is gone", "--data NEW_PLACE")
    assert train("--out", run, "--resume", "--steps", 3, "--data", moved, "--device", "cpu") == 0
    assert f"trained on {first}; it continues on {moved}" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["config"]["data"] == str(moved)
    np.save(tmp_path / "wide.npy", np.random.default_rng(1).standard_normal((64, 3)).astype(np.float32))
    assert train("--out", run, "--resume", "--steps", 4, "--data", tmp_path / "wide.npy", "--device", "cpu") == 2
    assert_one_line_error(capsys, "shape (2,)", "(3,)")


def test_resume_with_every_checkpoint_damaged_is_one_line(capsys, three_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(three_checkpoints, run)
    for ckpt in list_checkpoints(run):
        DAMAGE["bit flip in ema"](ckpt)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert train("--out", run, "--resume", "--steps", 8, "--device", "cpu") == 2
    assert_one_line_error(capsys, "none of the 3 checkpoints", "intact", "aside", "new --out")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing deleted or moved
    assert train("--out", run, "--steps", 8, "--device", "cpu") == 2  # a fresh start: what to do instead
    assert_one_line_error(capsys, "only damaged checkpoints", "aside", "new --out")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


class NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: the loss stays finite while the update makes the weights NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_weights_that_turn_nan_under_a_finite_loss_stop_at_a_finite_checkpoint(capsys, tmp_path, monkeypatch):
    """Step 4's loss is finite but its gradient NaN: the weights after step 4 are NaN. The checkpoint at
    step 4 is refused, the run stops naming step 2 (finite), and nothing older was rotated away."""
    import stmd_fast.train as train_module

    real, calls = train_module.compute_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss, error = real(*args, **kwargs)
        return (NaNGradient.apply(loss) if len(calls) == 4 else loss), error

    monkeypatch.setattr(train_module, "compute_loss", poisoned)
    run = tmp_path / "run"
    assert train(*GMM, "--steps", 8, "--ckpt-every", 2, "--log-every", 100, "--keep-checkpoints", 1,
                 "--out", run) == 1
    line = assert_one_line_error(capsys, "step_00000002")
    assert "NaN" in line or "non-finite" in line
    assert [c.name for c in list_checkpoints(run)] == ["step_00000002"]
    for name in ("model.safetensors", "ema.safetensors"):
        load_weights(run / "checkpoints" / "step_00000002", name)  # finite
    assert hidden_or_partial(run / "checkpoints") == []


def _wait_for_lock(run: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    import time

    deadline = time.time() + timeout
    while not ((run / ".lock").exists() and f"pid {process.pid} " in (run / ".lock").read_text() + " "):
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, "the run never took its lock"
        time.sleep(0.05)


def test_a_second_run_or_a_resume_into_a_live_run_is_one_line(capsys, tmp_path):
    import time

    run = tmp_path / "run"
    live = subprocess.Popen([sys.executable, "-m", "stmd_fast.train", *GMM, "--steps", "1000000", "--ckpt-every",
                             "5", "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        _wait_for_lock(run, live)
        metrics_before = (run / "metrics.jsonl").read_bytes() if (run / "metrics.jsonl").exists() else b""
        assert train(*GMM, "--steps", 3, "--out", run) == 2
        assert_one_line_error(capsys, "in use by another training run", f"pid {live.pid}")
        while not list_checkpoints(run):  # a resume needs a checkpoint to get as far as the lock
            assert live.poll() is None
            time.sleep(0.05)
        assert train("--out", run, "--resume", "--steps", 3, "--device", "cpu") == 2
        assert_one_line_error(capsys, "in use by another training run", f"pid {live.pid}")
        assert (run / "metrics.jsonl").read_bytes()[:len(metrics_before)] == metrics_before  # untouched
    finally:
        live.kill()
        live.wait()
    assert train("--out", run, "--resume", "--steps", 3, "--device", "cpu") in (0, 2)  # the lock died with it


def test_a_fresh_start_after_a_kill_before_the_first_checkpoint_logs_each_step_once(tmp_path):
    run = tmp_path / "run"
    assert train(*GMM, "--steps", 3, "--ckpt-every", 100, "--out", run) == 0
    shutil.rmtree(run / "checkpoints")  # as if killed before its first checkpoint (steps 1-3 logged)
    assert train(*GMM, "--steps", 4, "--ckpt-every", 100, "--out", run) == 0
    assert metrics_steps(run) == [1, 2, 3, 4]


@pytest.mark.parametrize("moment,signum", [("importing torch", signal.SIGINT), ("network built", signal.SIGINT),
                                           ("training", signal.SIGINT), ("training", signal.SIGTERM),
                                           ("network built", signal.SIGTERM), ("network built", signal.SIGHUP),
                                           ("training", signal.SIGHUP)],
                         ids=lambda value: value.name if isinstance(value, signal.Signals) else value)
def test_ctrl_c_at_any_moment_of_start_up_is_one_line_and_exit_130(tmp_path, moment, signum):
    """SIGINT while torch imports, right after the network is built, or once training runs: no
    traceback, exit 130, at most one line on stderr; in training a checkpoint is saved first and the
    resume command printed. SIGTERM (a job scheduler's stop) and SIGHUP (the terminal closed): the same,
    exit 143 and 129 (they used to kill the process at once, without a checkpoint or a word)."""
    import time

    if moment == "importing torch" and not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc to see torch being imported")
    run = tmp_path / "run"
    # the child takes SIGHUP's default even when these tests run under nohup, which it would inherit (and
    # rightly obey: a hang-up is then ignored, and the SIGHUP cases waited for an exit that never came)
    process = subprocess.Popen([sys.executable, "-m", "stmd_fast.train", *GMM, "--steps", "1000000",
                                "--ckpt-every", "1000000", "--out", str(run)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    if moment == "importing torch":  # torch's shared library is mapped: its import is under way
        maps = Path(f"/proc/{process.pid}/maps")
        while "libtorch" not in maps.read_text():
            time.sleep(0.002)
    else:
        wanted = "parameters" if moment == "network built" else "step 3/"
        lines = []
        while not lines or wanted not in lines[-1]:
            lines.append(process.stdout.readline())
            assert lines[-1], f"the run ended early: {process.stderr.read()}"
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, (out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
    if moment == "training":
        assert f"stopped by {signal.Signals(signum).name}" in out and "--resume" in out
        assert ("Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name) in err
        assert len(list_checkpoints(run)) == 1
    else:
        assert not list_checkpoints(run) and "interrupted during start-up" in err


def test_a_stop_during_the_final_sample_grid_quits_at_once(tmp_path):
    """The last checkpoint is written; a signal in the grid after it said "stopping after this step, with a
    checkpoint" and the grid ran on (a large one for hours); one signal could not stop it."""
    import time

    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "stmd_fast.train", *GMM, "--steps", "2", "--sample-steps", "1000",
                                "--sample-flow-steps", "100", "--out", str(run)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT)  # a grid of 10^5 calls: tens of seconds
    try:
        while not list_checkpoints(run):
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        time.sleep(1)  # past the checkpoint's rotation and fsync, into the grid (tens of seconds)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0 and "Traceback" not in err, err
    assert f"interrupted after the run finished: step 2 is saved in {run}" in err and "stopping after" not in err
    assert not list((run / "samples").glob("step_00000002.*")) and "done:" not in out
    assert f"its final sample grid was not written: python -m stmd_fast.train --out {run} --resume makes it" in err


@pytest.mark.slow
def test_a_fresh_run_stopped_during_its_first_compile_leaves_no_folder(tmp_path):
    """By the first compiled step the run has written config.json and an empty metrics.jsonl: its new --out
    was left holding them, though nothing of use was in it (README: such a folder is removed)."""
    run = tmp_path / "run"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}  # cold: the compile takes seconds
    process = subprocess.Popen([sys.executable, "-m", "stmd_fast.train", *GMM, "--steps", "2", "--compile",
                                "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT, env=env)
    while "compiling the loss" not in (line := process.stdout.readline()):
        assert line, f"the run ended early: {process.stderr.read()}"
    assert (run / "config.json").exists()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130 and "interrupted during start-up" in err, (out, err)
    assert not run.exists()


@pytest.mark.parametrize("resume", [True, False])
def test_what_a_kill_left_while_config_or_metrics_was_replaced_is_removed(tmp_path, resume):
    """A SIGKILL between write_atomic's write and its rename leaves .tmp-PID-config.json (or -metrics.jsonl) in
    the run folder, and no later run, resumed or fresh, removed it."""
    run = tmp_path / "run"
    if resume:
        assert train(*GMM, "--steps", 2, "--ckpt-every", 2, "--out", run) == 0
    run.mkdir(exist_ok=True)
    leftovers = [run / ".tmp-99999999-config.json", run / ".tmp-99999999-metrics.jsonl"]  # no such process
    live = run / ".tmp-1-results.json"  # a live process's (PID 1): an evaluate writing into this folder now
    for leftover in [*leftovers, live]:
        leftover.write_text('{"step": 1')  # cut short by the kill
    assert train(*GMM, "--steps", 4, "--ckpt-every", 2, "--out", run, *["--resume"] * resume) == 0
    assert not any(leftover.exists() for leftover in leftovers) and live.exists()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_a_batch_that_does_not_fit_in_memory_is_one_line_naming_batch_size(capsys, tmp_path):
    run = tmp_path / "run"
    assert train(*GMM, "--batch-size", 10 ** 12, "--steps", 1, "--out", run) == 2
    assert_one_line_error(capsys, "--batch-size 1000000000000", "memory")
    assert not list_checkpoints(run)


def test_train_on_a_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(capsys, tmp_path, monkeypatch):
    """The disk fills while the step-4 checkpoint is written: exit 1, one line naming the intact step-2
    checkpoint, no partial file or temporary folder left."""
    real = files.write_bytes_durably
    run = tmp_path / "run"

    def full_at_step_4(path, data):
        if "step_00000004" in str(path) and "model" in Path(path).name:
            Path(path).write_bytes(data[:10])
            Path(path).unlink()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(ckpt_module, "write_bytes_durably", full_at_step_4)
    assert train(*GMM, "--steps", 8, "--ckpt-every", 2, "--keep-checkpoints", 1, "--out", run) == 1
    assert_one_line_error(capsys, "No space left on device", "step_00000002")
    assert [c.name for c in list_checkpoints(run)] == ["step_00000002"]
    verify_checkpoint(run / "checkpoints" / "step_00000002")
    assert hidden_or_partial(run) == []


def test_train_on_a_real_full_disk_is_one_line(tiny_disk):
    """A real 64 KiB file system (root only): whatever write fails first, one line and exit 1, in a child
    process (a C++ writer that aborts would show here)."""
    run = tiny_disk / "run"
    result = subprocess.run([sys.executable, "-m", "stmd_fast.train", *GMM, "--steps", "4", "--out", str(run)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode in (1, 2), result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "No space left on device" in lines[0], result.stderr
    for ckpt in list_checkpoints(run):
        verify_checkpoint(ckpt)


@pytest.mark.slow
def test_the_crash_test_passes(tmp_path, capsys):
    """python -m stmd_fast.crashtest end to end, small: random SIGKILLs, a second run refused, and the
    finished run equal to an uninterrupted one (its own checks; exit 0 only if all held)."""
    from stmd_fast.crashtest import main as crashtest_main

    # 40 steps: a start that runs faster than the reference (a machine under load) still outlives its kill time
    assert crashtest_main(["--kills", "2", "--steps", "40", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "refused in one line" in out and json.loads(out.strip().splitlines()[-1])["ok"] is True


def test_a_hang_up_is_left_to_nohup_and_a_stop_before_the_first_step_quits_at_once():
    """Under nohup (SIGHUP ignored) a hang-up must not stop the run. Before this process has finished a
    step (the first --compile can take minutes) there is nothing new to save: the first signal quits at
    once; after it, the signal asks for a stop after the step."""
    from stmd_fast.train import Interrupted, StopRequest, stop_signals

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert signal.SIGHUP not in stop_signals()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert signal.SIGHUP in stop_signals()
    finally:
        signal.signal(signal.SIGHUP, before)
    with StopRequest(quit_before_first_step=True) as stop:
        with pytest.raises(Interrupted) as quit_now:
            os.kill(os.getpid(), signal.SIGTERM)
        assert quit_now.value.signum == signal.SIGTERM and not stop.requested
        stop.step_done()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal == signal.SIGTERM


def test_a_signal_ignored_from_the_start_stays_ignored_by_every_command():
    """A shell script's `python -m stmd_fast.train ... &` starts with SIGINT ignored, so that a Ctrl-C meant for
    the script leaves the job running; nohup does the same for SIGHUP. No command may take that signal over."""
    from stmd_fast.cli import one_line_errors, stop_signals

    @one_line_errors(ValueError)
    def command(argv):
        os.kill(os.getpid(), signal.SIGINT)
        return 0

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert signal.SIGINT not in stop_signals() and signal.SIGTERM in stop_signals()
        assert command([]) == 0 and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_hang_up_while_the_trainer_imports_is_one_line_and_exit_129(tmp_path):
    """SIGINT and SIGTERM had a handler while torch and the rest import (seconds), SIGHUP not: a closed terminal
    then killed the process by the signal, without a line (the README promises "as Ctrl-C, with exit 129")."""
    import time

    process = subprocess.Popen([sys.executable, "-m", "stmd_fast.train", *GMM, "--out", str(tmp_path / "run")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(1.0)  # importing torch (seconds): or, on a fast machine, after it, where main's handlers say the same
    process.send_signal(signal.SIGHUP)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGHUP, (out, err)
    assert "interrupted during start-up" in err and "Traceback" not in err


def test_a_run_started_with_sigint_ignored_trains_on_through_it_and_stops_on_sigterm(tmp_path):
    """The trainer's own handlers (at import, around main, in the loop) leave an inherited SIG_IGN alone."""
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "stmd_fast.train", *GMM, "--steps", "1000000",
                                "--ckpt-every", "1000000", "--out", str(run)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        for wanted in ("step 3/", "step 9/"):  # SIGINT at import time, then in the loop: neither stops it
            process.send_signal(signal.SIGINT)
            while wanted not in (line := process.stdout.readline()):
                assert line, f"the run ended early: {process.stderr.read()}"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, (out, err)
    assert "stopped by SIGTERM" in out and len(list_checkpoints(run)) == 1


@pytest.mark.parametrize("as_command", [True, False])
def test_every_command_takes_sigterm_as_ctrl_c_and_the_same_signal_again_quits_at_once(monkeypatch, as_command):
    """one_line_errors (sample, export, encode, the bench scripts) turns a stop signal into a KeyboardInterrupt that
    knows its signal, for the command's cleanup and exit code 143; a second one is not caught again (it could
    land in that cleanup and stop it): a command quits at once, a Python host calling main() gets a
    KeyboardInterrupt (a notebook kernel once died of it); the caller's handlers come back afterwards."""
    from stmd_fast import startup
    from stmd_fast.cli import one_line_errors

    monkeypatch.setattr(startup, "AS_COMMAND", as_command)

    seen = {}

    @one_line_errors(ValueError)
    def command(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        return 0

    @one_line_errors(ValueError)
    def second_signal(argv):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            seen["after"] = signal.getsignal(signal.SIGTERM)
            raise

    mine_now = lambda signum, frame: seen.setdefault("fell through", signum)  # noqa: E731
    mine = signal.signal(signal.SIGTERM, mine_now)
    try:
        assert command([]) == 128 + signal.SIGTERM and "fell through" not in seen
        assert second_signal([]) == 128 + signal.SIGTERM
        assert seen["after"] is (signal.SIG_DFL if as_command else startup._interrupt_at_once)  # this raises
        assert signal.getsignal(signal.SIGTERM) is mine_now  # the caller's handler is back
    finally:
        signal.signal(signal.SIGTERM, mine)


def test_a_file_size_limit_is_one_line_naming_the_limit_and_how_to_go_on(tmp_path):
    """EFBIG (ulimit -f) was a traceback; with no checkpoint yet the advice is to run again, not --resume."""
    import resource

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "stmd_fast.train", *GMM, "--steps", "2", "--out", str(run)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT, preexec_fn=limited)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "File too large" in lines[0] and "ulimit -f" in lines[0] and "run the same command again" in lines[0]
    assert "--resume" not in lines[0] and ".tmp-" not in lines[0]
    assert not list_checkpoints(run)


def test_a_sample_grid_that_cannot_be_written_costs_no_checkpoint(capsys, tmp_path, monkeypatch):
    """The grid is drawn after the checkpoint of its step, and a failed grid is a warning: training goes on."""
    from stmd_fast import run_log

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "run" / "samples" / "x.npy"))

    monkeypatch.setattr(run_log, "write_sample_grid", read_only)
    run = tmp_path / "run"
    assert train(*GMM, "--steps", 4, "--ckpt-every", 2, "--sample-every", 2, "--keep-checkpoints", 5, "--out", run) == 0
    err = capsys.readouterr().err  # a warning: on stderr, where a log keeps warnings
    assert "warning: step 2: could not write the sample grid" in err and "training goes on" in err
    assert [c.name for c in list_checkpoints(run)] == ["step_00000004", "step_00000002"]


def test_checkpoints_by_the_clock_and_log_lines_with_an_eta(capsys, tmp_path):
    """--ckpt-minutes saves once that much time has passed, checked at every step (here: due at every one), not
    only at the --log-every records, which a slow step would stretch; each save is a line, and the lines
    written to a log file say when, and how long is left."""
    run = tmp_path / "run"
    assert train(*GMM, "--steps", 6, "--log-every", 2, "--ckpt-every", 1000, "--ckpt-minutes", 1e-9,
                 "--keep-checkpoints", 10, "--out", run) == 0
    assert [c.name for c in list_checkpoints(run)] == [f"step_0000000{k}" for k in range(6, 0, -1)]
    out = capsys.readouterr().out.splitlines()
    assert f"step 3: checkpoint -> {run / 'checkpoints' / 'step_00000003'}" in out
    lines = [x for x in out if x.startswith("step 4/6")]
    assert re.search(r"\| elapsed \d+:\d\d:\d\d \| eta \d+:\d\d:\d\d \| \d\d:\d\d:\d\d$", lines[0]), lines
    by_steps = tmp_path / "steps"
    assert train(*GMM, "--steps", 6, "--log-every", 2, "--ckpt-every", 1000, "--ckpt-minutes", 0,
                 "--out", by_steps) == 0
    assert [c.name for c in list_checkpoints(by_steps)] == ["step_00000006"]


def test_a_failed_metrics_write_names_metrics_jsonl(tmp_path, monkeypatch, capsys):
    """A write (not an open) that fails carries no file name of its own: the error must still name the file."""
    from stmd_fast import run_log

    real_record = run_log.RunLog.record

    def full_at_the_first_record(self, record):
        class Full(io.StringIO):
            name = self.metrics.name

            def write(self, text):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.metrics = Full()
        return real_record(self, record)

    monkeypatch.setattr(run_log.RunLog, "record", full_at_the_first_record)
    run = tmp_path / "run"
    assert train(*GMM, "--steps", 2, "--out", run) == 1
    assert_one_line_error(capsys, "No space left on device", str(run / "metrics.jsonl"))


@pytest.fixture
def rotated_while_read(monkeypatch):
    """The first weights read finds its checkpoint rotated away by the run still training, which has saved a newer one
    (copied here from the one read)."""
    real = ckpt_module.load_weights
    seen = []

    def load_weights(ckpt, name, device="cpu"):
        if not seen:
            seen.append(ckpt)
            newer = ckpt.with_name(f"step_{int(ckpt.name.removeprefix('step_')) + 1:08d}")
            shutil.copytree(ckpt, newer)
            shutil.rmtree(ckpt)
        return real(ckpt, name, device)

    monkeypatch.setattr(ckpt_module, "load_weights", load_weights)
    return seen


def test_sample_and_export_take_the_newest_checkpoint_when_theirs_is_rotated_away(gmm_run, tmp_path, capsys,
                                                                                rotated_while_read):
    run = tmp_path / "run"
    shutil.copytree(gmm_run, run)
    model = ckpt_module.load_checkpoint(run)
    assert rotated_while_read == [run / "checkpoints" / "step_00000002"]
    assert model.checkpoint == run / "checkpoints" / "step_00000003"
    rotated_while_read.clear()
    assert export(run, "--out", tmp_path / "s.pt2") == 0
    from stmd_fast.export import open_exported

    assert open_exported(tmp_path / "s.pt2")[1]["checkpoint"] == str((run / "checkpoints" / "step_00000004").resolve())
    # named explicitly, it cannot be replaced: said as what happened, not as damage
    rotated_while_read.clear()
    assert sample(run / "checkpoints" / "step_00000004", "--num", 2, "--out", tmp_path / "x.npy") == 2
    assert_one_line_error(capsys, "step_00000004 was deleted while it was read", "still training")


CPU_ALLOCATOR = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                             "you tried to allocate 512000000000 bytes. Error code 12 (Cannot allocate memory)")


def test_sample_and_export_out_of_memory_is_one_line_naming_the_batch(gmm_run, tmp_path, capsys, monkeypatch):
    from stmd_fast import export as export_module
    from stmd_fast.checkpoint import Model

    def no_memory(*args, **kwargs):
        raise CPU_ALLOCATOR

    monkeypatch.setattr(Model, "sample", no_memory)
    assert sample(gmm_run, "--num", 1000, "--batch-size", 1000, "--out", tmp_path / "x.npy") == 1
    assert_one_line_error(capsys, "out of memory on cpu", "can't allocate memory", "lower --batch-size 1000")
    assert not (tmp_path / "x.npy").exists()
    monkeypatch.setattr(export_module, "export_sampler", no_memory)
    assert export(gmm_run, "--batch", 10**5, "--out", tmp_path / "s.pt2") == 1  # (one that cannot fit: refused before)
    assert_one_line_error(capsys, "out of memory on cpu", "lower --batch 100000")


@pytest.mark.parametrize("flags", [["--steps", "10000000000"], ["--steps", str(10**20)],
                                   ["--flow-steps", "10000000000"]])
def test_a_huge_number_of_steps_is_refused_before_sampling(gmm_run, tmp_path, capsys, no_sampling, flags):
    assert sample(gmm_run, *flags, "--num", 2, "--out", tmp_path / "x.npy") == 2
    assert_one_line_error(capsys, "at most 100000 steps each")
    assert export(gmm_run, *flags, "--out", tmp_path / "s.pt2") == 2
    assert_one_line_error(capsys, "at most 100000 steps each")


def test_export_says_an_aoti_package_beside_it_is_stale(gmm_run, tmp_path, capsys):
    out = tmp_path / "s.pt2"
    (tmp_path / "s.aoti.pt2").write_bytes(b"an earlier export's package")
    assert export(gmm_run, "--out", out) == 0
    assert "note: " + str(tmp_path / "s.aoti.pt2") + " beside it is from an earlier export" in capsys.readouterr().err


def test_a_resume_with_another_log_every_does_not_average_the_old_interval_into_its_record(tmp_path):
    """Stopped inside a long --log-every interval and resumed with --log-every 1: the first record averaged
    the old interval's steps (step 1 on) into step 7's loss. Now it is step 7's own, as an uninterrupted
    --log-every 1 run logs it; with --log-every unchanged the interval still goes on across the resume."""
    flags = [a for a in GMM if a not in ("--log-every", "1")]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert train(*flags, "--log-every", 1, "--steps", 8, "--out", whole) == 0
    assert train(*flags, "--log-every", 100, "--ckpt-every", 6, "--steps", 6, "--out", stopped) == 0
    (stopped / "metrics.jsonl").unlink()  # its one record (step 6, the 6 steps' mean) is not compared
    assert train("--out", stopped, "--resume", "--steps", 8, "--log-every", 1) == 0
    loss = {json.loads(line)["step"]: json.loads(line)["loss"] for line in (whole / "metrics.jsonl").read_text().splitlines()}
    resumed = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in resumed] == [(7, loss[7]), (8, loss[8])]
    again = tmp_path / "again"  # --log-every 4 throughout, stopped at step 6: the record at 8 is the mean of 5..8
    assert train(*flags, "--log-every", 4, "--ckpt-every", 6, "--steps", 6, "--out", again) == 0
    assert train("--out", again, "--resume", "--steps", 8) == 0
    last = json.loads((again / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 8 and last["loss"] == pytest.approx(sum(loss[s] for s in range(5, 9)) / 4, rel=1e-6)


def test_config_json_records_how_each_start_was_made(three_checkpoints, tmp_path):
    """The run folder held the config alone: no command, versions, device or time, and a resume rewrote it."""
    import stmd_fast

    run = tmp_path / "run"
    shutil.copytree(three_checkpoints, run)
    assert train("--out", run, "--resume", "--steps", 8, "--device", "cpu") == 0
    starts = json.loads((run / "config.json").read_text())["starts"]
    assert [s["step"] for s in starts] == [0, 6] and all(s["processes"] == 1 and not s["torchrun"] for s in starts)
    assert starts[0]["command"].startswith("python -m stmd_fast.train --preset gmm") and "--ckpt-every 2" in starts[0]["command"]
    assert starts[1]["command"] == f"python -m stmd_fast.train --out {run} --resume --steps 8 --device cpu"
    assert all(s["stmd_fast"] == stmd_fast.__version__ and s["torch"] == torch.__version__ and s["device"] == "cpu"
               and s["utc"][:4].isdigit() for s in starts)


def test_a_grid_its_process_was_killed_before_is_drawn_on_resume(tmp_path, capsys):
    """The grid of a checkpoint's step is drawn after the save: a process killed in between (or while writing
    it, leaving samples/.tmp-PID-step_*) lost that grid for good. The resume draws it, from the same noise."""
    run = tmp_path / "run"
    flags = [*GMM, "--ckpt-every", 2, "--sample-every", 2, "--out", run]
    assert train(*flags, "--steps", 4) == 0
    grid = run / "samples" / "step_00000004.npy"
    drawn = np.load(grid)
    grid.rename(run / "samples" / ".tmp-123-step_00000004.npy")  # killed mid-write
    capsys.readouterr()
    assert train(*flags, "--steps", 6, "--resume") == 0
    assert f"step 4: samples -> {grid}" in capsys.readouterr().out
    assert np.array_equal(np.load(grid), drawn) and not list((run / "samples").glob(".tmp-*"))
    assert sorted(p.name for p in (run / "samples").iterdir()) == [f"step_0000000{s}.npy" for s in (2, 4, 6)]


def test_a_resume_on_data_rewritten_in_place_says_so(tmp_path, capsys):
    """A changed place or count was said on --resume; the same file rewritten with other samples was not."""
    data = tmp_path / "data.npy"
    rng = np.random.default_rng(0)
    np.save(data, rng.normal(size=(64, 2)).astype(np.float32))
    run = tmp_path / "run"
    flags = ["--data", data, "--batch-size", 16, "--ckpt-every", 2, "--device", "cpu", "--out", run]
    assert train(*flags, "--steps", 2) == 0
    assert len(json.loads((run / "config.json").read_text())["data_sha256"]) == 64
    capsys.readouterr()
    assert train("--out", run, "--resume", "--steps", 4) == 0
    assert "other samples" not in capsys.readouterr().err  # the same data: nothing to say
    np.save(data, rng.normal(3, 0.5, size=(64, 2)).astype(np.float32))
    assert train("--out", run, "--resume", "--steps", 6) == 0
    assert f"note: {data} holds other samples than the run was trained on (the same count, another SHA-256)" \
        in capsys.readouterr().err


def test_empty_and_broken_compiled_libraries_in_inductors_cache(tmp_path, monkeypatch):
    """A compile stopped while the C++ compiler wrote a library leaves it empty (or short) in Inductor's
    cache, and Inductor loads what it finds there: every later --compile failed with "file too short"."""
    from stmd_fast.engine import broken_compiled_library, remove_interrupted_compiles

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    old, fresh, whole = (tmp_path / "cache" / "ab" / name for name in ("c1.main.so", "c2.main.so", "c3.so"))
    old.parent.mkdir(parents=True)
    old.touch(), fresh.touch(), whole.write_bytes(b"\x7fELF" + bytes(60))
    os.utime(old, (0, 0))  # long ago; `fresh` may be a compile running now
    assert remove_interrupted_compiles() == [old]
    assert not old.exists() and fresh.exists() and whole.exists()

    inside, outside = whole, tmp_path / "elsewhere.so"
    def failed(path):
        try:  # as Inductor raises it: an ImportError inside its own exception
            raise ImportError(f"{path}: file too short")
        except ImportError as err:
            return RuntimeError(f"backend='inductor' raised:\n{err}")
    assert broken_compiled_library(failed(inside)) == str(inside)
    assert broken_compiled_library(failed(outside)) is None  # not Inductor's: not ours to name or remove
    assert broken_compiled_library(RuntimeError("some other failure")) is None


@pytest.mark.slow
def test_a_compile_stopped_while_writing_a_library_does_not_break_later_compiles(tmp_path):
    """End to end, with a real first --compile: its libraries emptied (as a kill leaves them) are removed
    and built again, with a note; one cut short fails the next run in one line naming it, removes it, and
    the run after that compiles."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}

    def compiled_run(name):
        return subprocess.run([sys.executable, "-m", "stmd_fast.train", *GMM, "--steps", "1", "--compile",
                               "--out", str(tmp_path / name)], capture_output=True, text=True, timeout=600,
                              cwd=ROOT, env=env)

    assert compiled_run("first").returncode == 0
    libraries = sorted((tmp_path / "cache").rglob("*.main.so"))
    assert libraries
    for library in libraries:
        library.write_bytes(b"")
        os.utime(library, (0, 0))
    second = compiled_run("second")
    assert second.returncode == 0, second.stderr
    assert f"removed {len(libraries)} empty compiled librar" in second.stderr
    cut_short = libraries[0]
    assert cut_short.stat().st_size > 0  # built again
    cut_short.write_bytes(cut_short.read_bytes()[:200])
    third = compiled_run("third")
    lines = third.stderr.strip().splitlines()
    assert third.returncode == 2 and lines[-1].startswith("error: --compile:"), third.stderr
    assert str(cut_short) in lines[-1] and "run the same command again" in lines[-1] and not cut_short.exists()
    assert compiled_run("fourth").returncode == 0


# --- a stop signal once main() is over (the interpreter's shutdown) -------------------------------------------------

EXITING = textwrap.dedent("""
    import atexit, os, runpy, signal, sys, time

    def stop_signals_in_the_shutdown():  # as a Ctrl-C, a scheduler's SIGTERM or a hang-up just after the work
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            os.kill(os.getpid(), signum)
        time.sleep(0.2)

    atexit.register(stop_signals_in_the_shutdown)
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["stmd_fast.train", "--data", "/nonexistent", "--out", "{tmp}/run"], ["stmd_fast.sample", "/nonexistent"],
    ["stmd_fast.export", "/nonexistent", "--out", "{tmp}/x.pt2"], ["stmd_fast.evaluate", "sweep", "/nonexistent",
    "--out", "{tmp}/ev"], ["stmd_fast.gmm", "/nonexistent"], ["stmd_fast.crashtest", "--kills", "0"],
    ["stmd_fast.data.encode", "--images", "/nonexistent", "--vae", "v", "--out", "{tmp}/enc"],
    ["stmd_fast.data.example", "--out", "{tmp}/file"]], ids=lambda command: command[0])
def test_a_stop_signal_after_a_command_is_over_changes_neither_its_exit_nor_its_output(tmp_path, command):
    """SIGTERM, SIGHUP or Ctrl-C in the second or so of the interpreter's shutdown, after main() returned (here
    with a usage error, exit 2; argparse's too): the process died by the signal without a word (a scheduler saw
    a stopped job), or printed a traceback from an atexit callback."""
    (tmp_path / "file").write_text("a file")
    argv = [part.format(tmp=tmp_path) for part in command]
    done = subprocess.run([sys.executable, "-c", EXITING, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and "error: " in done.stderr


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_a_sigterm_in_the_teardown_after_a_finished_run_leaves_exit_0(tmp_path, delay):
    """After "done:" the trainer took ~2 s more to end (torch's teardown), and a SIGTERM there killed it (143,
    no word): Python had put the default handlers back before freeing its modules. A scheduler read a killed job."""
    process = subprocess.Popen([sys.executable, "-m", "stmd_fast.train", *GMM, "--steps", "10", "--out",
                                str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("done:"):
            break
    time.sleep(delay)
    process.send_signal(signal.SIGTERM)  # a process that has already ended takes no signal
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0 and "Traceback" not in err, (process.returncode, err[-3000:])


def test_a_command_run_by_a_host_ends_by_systemexit_and_the_host_goes_on(tmp_path):
    """A command that is not the whole process (cProfile -m, runpy from a notebook or a script) must hand its
    exit back as SystemExit: ending the process from under the host lost cProfile's output, or the kernel."""
    host = textwrap.dedent("""
        import runpy, sys
        for argv in (["stmd_fast.train", "--help"], ["stmd_fast.train", *sys.argv[1:]]):
            sys.argv = argv
            try:
                runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
            except SystemExit as done:
                print("host caught", done.code)
        print("host goes on")
    """)
    done = subprocess.run([sys.executable, "-c", host, *GMM, "--steps", "1", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stdout.splitlines() if line.startswith("host")]
    assert said == ["host caught 0", "host caught 0", "host goes on"], done.stdout[-3000:]


def test_every_command_exits_through_run_and_exit():
    """Each command's __main__ (python -m stmd_fast.X, the bench scripts) ends in startup.run_and_exit, which the
    test above checks on the package's commands."""
    commands = 0
    for path in [*ROOT.glob("stmd_fast/*.py"), *ROOT.glob("data/*.py"), *ROOT.glob("bench/*.py")]:
        last = re.split(r'^if __name__ == "__main__":', path.read_text(), flags=re.M)[1:][-1:]
        if last and "imports_done()" in last[0]:
            commands += 1
            assert "run_and_exit(" in last[0], path
    assert commands >= 13  # the package's 8 commands and the bench scripts of its code
