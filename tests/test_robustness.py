"""Crash and resume edge cases, device checks, and input validation of shared helpers."""
import hashlib
import json
import shutil

import pytest
import torch

from stmd_fast.checkpoint import find_checkpoint, save_checkpoint
from stmd_fast.config import resolve_device, same_device
from stmd_fast.sampling import inpainting_projection
from stmd_fast.train import main, resolve_config

GMM = ["--preset", "gmm", "--batch-size", "16", "--log-every", "1", "--sample-every", "0"]


def steps_logged(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_a_crash_logs_each_step_once(tmp_path):
    """A crash after step 5 loses steps 4-5 (checkpoint at 3): the resumed run logs them again,
    and metrics.jsonl ends with each step once, in order, with the uninterrupted run's losses and
    learning rates. The warmup spans the crash, so a scheduler not restored would restart it."""
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    flags = GMM + ["--steps", "5", "--ckpt-every", "3", "--warmup-steps", "5"]
    assert main(flags + ["--out", str(full)]) == 0
    assert main(flags + ["--out", str(crashed)]) == 0
    shutil.rmtree(crashed / "checkpoints" / "step_00000005")  # as if the process died before saving it
    assert main(flags + ["--out", str(crashed), "--resume"]) == 0
    assert steps_logged(crashed) == [1, 2, 3, 4, 5]
    records = {run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (full, crashed)}
    assert [r["loss"] for r in records[crashed]] == [r["loss"] for r in records[full]]
    lrs = [r["lr"] for r in records[crashed]]
    assert lrs == [r["lr"] for r in records[full]]
    assert lrs == pytest.approx([lrs[-1] * k / 5 for k in range(1, 6)], rel=1e-12)  # warmup (k + 1) / 5


@pytest.mark.parametrize("how", ["crash", "longer"])
def test_records_at_log_steps_survive_a_resume_inside_an_interval(tmp_path, how):
    """Checkpoints (and the last step) inside a --log-every interval: the resumed run's records at the
    --log-every steps average over the same steps as the uninterrupted run's, so they are equal."""
    flags = GMM + ["--log-every", "4", "--ckpt-every", "3"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(flags + ["--steps", "12", "--out", str(full)]) == 0
    if how == "crash":  # killed after step 8: the resume starts from step 6, two steps into the interval 5-8
        assert main(flags + ["--steps", "8", "--out", str(resumed)]) == 0
        shutil.rmtree(resumed / "checkpoints" / "step_00000008")
    else:  # a run of 7 steps, then --steps raised: its last step falls inside the interval 5-8
        assert main(flags + ["--steps", "7", "--out", str(resumed)]) == 0
    assert main(flags + ["--steps", "12", "--out", str(resumed), "--resume"]) == 0
    records = {run: {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
               for run in (full, resumed)}
    assert [4, 8, 12] == [s for s in records[resumed] if s % 4 == 0]
    for step in (4, 8, 12):
        assert records[resumed][step]["loss"] == records[full][step]["loss"], step
        assert records[resumed][step]["delta_sq"] == records[full][step]["delta_sq"], step
    # a record off the interval reports the interval so far: against each step's own loss (--log-every 1)
    each = tmp_path / "each"
    assert main(GMM + ["--steps", "12", "--out", str(each)]) == 0
    losses = [json.loads(line)["loss"] for line in (each / "metrics.jsonl").read_text().splitlines()]
    for step, first in [(3, 1), (4, 1), (6, 5), (8, 5), (9, 9), (12, 9)]:
        assert records[full][step]["loss"] == pytest.approx(sum(losses[first - 1: step]) / (step - first + 1),
                                                            rel=1e-5), step


def test_resume_notes_a_flag_the_run_does_not_read_as_a_fresh_start_does(tmp_path, capsys):
    # --data-workers is for latent shards: a gmm run notes it, fresh or resumed (given only then), and trains on
    assert main(GMM + ["--steps", "1", "--out", str(tmp_path / "fresh"), "--data-workers", "3"]) == 0
    assert "note: --data-workers has no effect on this run" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main(GMM + ["--steps", "2", "--out", str(run)]) == 0
    assert main(GMM + ["--steps", "3", "--out", str(run), "--resume", "--data-workers", "3"]) == 0
    assert "note: --data-workers has no effect on this run" in capsys.readouterr().err
    assert steps_logged(run) == [1, 2, 3]


def reseal(path) -> None:
    """Record an edited checkpoint file's new size and SHA-256 in its config.json (as if written so)."""
    meta_path = path.parent / "config.json"
    meta = json.loads(meta_path.read_text())
    data = path.read_bytes()
    meta["files"][path.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    meta_path.write_text(json.dumps(meta))


def test_resume_on_another_device_type_reseeds_and_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(GMM + ["--steps", "2", "--out", str(run)]) == 0
    state_path = find_checkpoint(run) / "train_state.pt"
    state = torch.load(state_path, weights_only=True)
    state["generator_device"] = "cuda"  # as if it had been trained on a GPU
    torch.save(state, state_path)
    reseal(state_path)
    capsys.readouterr()
    assert main(GMM + ["--steps", "4", "--out", str(run), "--resume"]) == 0
    assert "reseeded" in capsys.readouterr().err
    assert steps_logged(run) == [1, 2, 3, 4]


def test_checkpoint_save_cleans_leftovers_and_replaces_the_same_step(tmp_path):
    net = torch.nn.Linear(2, 2)
    (tmp_path / "checkpoints" / ".tmp-step_00000007").mkdir(parents=True)  # a crash mid-save
    meta = {"config": {}, "data_shape": [2], "data_kind": "vector"}
    save_checkpoint(tmp_path, 3, net, net, {"step": 3}, meta, keep=2)
    torch.nn.init.zeros_(net.weight)
    final = save_checkpoint(tmp_path, 3, net, net, {"step": 3}, meta, keep=2)  # saved again at the same step
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003"]
    from safetensors.torch import load_file

    assert torch.equal(load_file(final / "model.safetensors")["weight"], torch.zeros(2, 2))


def test_default_out_is_named_after_the_data_file():
    cfg, _ = resolve_config({"data": "some/where/my_vectors.npy", "method": "ddpm"})
    assert cfg.out == "runs/my_vectors-ddpm"
    cfg, _ = resolve_config({"preset": "gmm"})
    assert cfg.out == "runs/gmm-stmd"


def test_inpainting_mask_checks():
    observed = torch.zeros(3, 4, 4)
    project = inpainting_projection(observed, torch.ones(1, 4, 4))  # one mask for all channels
    assert project(torch.ones(3, 4, 4)).eq(0).all()
    with pytest.raises(ValueError, match="0 .missing. or 1"):
        inpainting_projection(observed, torch.full((1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="does not fit"):
        inpainting_projection(observed, torch.ones(2, 4, 4))


def test_device_checks():
    assert resolve_device("cpu") == torch.device("cpu")
    assert same_device(torch.device("cpu"), torch.device("cpu"))
    assert not same_device(torch.device("cpu"), torch.device("meta"))
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("bogus")
    with pytest.raises(ValueError, match="only cpu and cuda"):
        resolve_device("meta")
    with pytest.raises(ValueError, match="--device cpu:1: the CPU is one device"):  # once accepted, as cpu
        resolve_device("cpu:1")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("inside", ["checkpoints", "checkpoints/step_00000002"])
@pytest.mark.parametrize("resume", [True, False])
def test_out_inside_a_runs_checkpoints_is_refused_naming_the_run(tmp_path, capsys, inside, resume):
    # the advice "pass --resume" must not lead to a run trained inside a checkpoint (rewriting its config.json)
    run = tmp_path / "run"
    assert main(GMM + ["--steps", "2", "--out", str(run)]) == 0
    before = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(GMM + ["--steps", "3", "--out", str(run / inside), *(["--resume"] if resume else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert f"--out {run}" in err
    assert {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()} == before


def test_a_fresh_run_does_not_replace_a_config_json_it_did_not_write(tmp_path, capsys):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    assert main(GMM + ["--steps", "1", "--out", str(folder)]) == 2
    assert "config.json that is not a stmd_fast run's" in capsys.readouterr().err
    assert (folder / "config.json").read_text() == '{"_class_name": "AutoencoderKL"}'
    # a run's own config.json (one killed before its first checkpoint) is no obstacle to a fresh start
    run = tmp_path / "run"
    assert main(GMM + ["--steps", "1", "--out", str(run)]) == 0
    shutil.rmtree(run / "checkpoints")
    assert main(GMM + ["--steps", "1", "--out", str(run)]) == 0


def test_sample_grids_of_an_abandoned_timeline_are_removed(tmp_path):
    # grids after the checkpoint a run resumes from belong to a killed (or set-aside) timeline; a fresh start drops all
    run = tmp_path / "run"
    flags = GMM + ["--sample-every", "1", "--ckpt-every", "2"]
    assert main(flags + ["--steps", "4", "--out", str(run)]) == 0
    grids = lambda: sorted(p.name for p in (run / "samples").iterdir())  # noqa: E731
    assert grids() == [f"step_0000000{k}.npy" for k in (1, 2, 3, 4)]
    (run / "samples" / "notes.txt").write_text("the user's own")
    shutil.rmtree(run / "checkpoints" / "step_00000004")  # killed before step 4's checkpoint
    assert main(flags + ["--steps", "3", "--out", str(run), "--resume"]) == 0
    assert grids() == ["notes.txt", "step_00000001.npy", "step_00000002.npy", "step_00000003.npy"]
    shutil.rmtree(run / "checkpoints")  # killed before the first checkpoint: a fresh start
    assert main(flags + ["--steps", "1", "--out", str(run)]) == 0
    assert grids() == ["notes.txt", "step_00000001.npy"]


def _edit_config(run, edit) -> None:
    for path in [run / "config.json", *(run / "checkpoints").glob("step_*/config.json")]:
        meta = json.loads(path.read_text())
        edit(meta["config"])
        path.write_text(json.dumps(meta))


def _edit_state(run, edit) -> None:
    path = find_checkpoint(run) / "train_state.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    reseal(path)


def _prefix_weights(run) -> None:
    from safetensors.torch import load_file, save_file

    path = find_checkpoint(run) / "model.safetensors"
    save_file({"_orig_mod." + k: v for k, v in load_file(path).items()}, path)
    reseal(path)


OTHER_VERSIONS = {  # an intact checkpoint whose contents this code does not take
    "a config field of a newer version": lambda run: _edit_config(run, lambda c: c.update(new_field=1)),
    "a config value this version refuses": lambda run: _edit_config(run, lambda c: c.update(method="sde")),
    "a generator state of another torch": lambda run: _edit_state(
        run, lambda s: s.update(generator=torch.cat([s["generator"], torch.zeros(16, dtype=torch.uint8)]))),
    "a train_state key missing": lambda run: _edit_state(run, lambda s: s.pop("generator_device")),
    "weights saved under another module prefix": _prefix_weights,
}


@pytest.mark.parametrize("change", list(OTHER_VERSIONS))
def test_a_checkpoint_of_another_version_is_one_line_and_left_as_it_is(tmp_path, capsys, change):
    run = tmp_path / "run"
    assert main(GMM + ["--steps", "2", "--out", str(run)]) == 0
    OTHER_VERSIONS[change](run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    capsys.readouterr()
    assert main(GMM + ["--steps", "3", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume:") and len(err.splitlines()) == 1, err
    assert "step_00000002" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # not set aside as damaged
    assert steps_logged(run) == [1, 2]


def test_notes_for_tf32_and_parallel_where_they_do_nothing(tmp_path, capsys):
    assert main(GMM + ["--steps", "1", "--device", "cpu", "--no-tf32", "--parallel", "ddp",
                       "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "note: --tf32 has no effect on this run: TF32 is a CUDA matmul mode; this run is on the CPU" in err
    assert "note: --parallel has no effect on this run: DDP splits the work of torchrun's processes" in err
