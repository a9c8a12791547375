"""bench/gpu_check.sh: its stages fit the GPU's time, a failing or overrunning stage is logged and
the next one runs, and the --dry-run rehearsal (what CI runs) passes every stage on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402


def test_stage_budgets_fit_the_gpu_time():
    assert min(s.budget_s for s in gpu_check.STAGES) > 0 and gpu_check.GPU_BUDGET_S <= 9 * 60  # one ~9-minute call
    assert gpu_check.STAGES[0].name == "cuda tests"  # correctness before speed (the environment: before any stage)
    for stage in gpu_check.STAGES:  # python3 everywhere, results never into bench/results
        assert {"--no-save", "pytest", "--train-check"} & set(stage.gpu)


def test_a_failing_and_an_overrunning_stage_are_logged_and_the_next_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "DRY_RUN_TIMEOUT_S", 2)
    py = sys.executable
    stages = [gpu_check.Stage("fails", 1, [], [py, "-c", "print('boom'); raise SystemExit(3)"]),
              gpu_check.Stage("hangs", 1, [], [py, "-c", "import time; print('waiting', flush=True); time.sleep(60)"]),
              gpu_check.Stage("works", 1, [], [py, "-c", "print('fine')"])]
    results = gpu_check.run_stages(stages, tmp_path, dry_run=True)
    assert [r["status"] for r in results] == ["failed (exit 3)", "out of time (2 s)", "ok"]
    assert results[1]["seconds"] < 30  # killed, not waited for
    log = (tmp_path / "gpu_check.log").read_text()
    assert "boom" in log and "waiting" in log and "fine" in log
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in lines] == ["fails", "hangs", "works"]


def test_a_stage_that_ends_early_hands_its_seconds_to_the_next(tmp_path):
    py = sys.executable
    stages = [gpu_check.Stage("quick", 4, [py, "-c", "print('done')"], []),
              gpu_check.Stage("needs the slack", 1, [py, "-c", "import time; time.sleep(2)"], []),
              gpu_check.Stage("overruns", 1, [py, "-c", "import time; time.sleep(60)"], [])]
    results = gpu_check.run_stages(stages, tmp_path, dry_run=False)
    assert [r["status"] for r in results][:2] == ["ok", "ok"]
    assert results[2]["status"].startswith("out of time")
    assert sum(r["seconds"] for r in results) < sum(s.budget_s for s in stages) + 2  # the total still holds


def test_the_budget_counts_from_the_start_of_the_script(tmp_path):
    """The import check before the stages (88 s cold on 2 cores) spends the same GPU time: a run that started
    3 s before its stages has 3 s less for them."""
    import time

    py = sys.executable
    stages = [gpu_check.Stage("sleeps", 4, [py, "-c", "import time; time.sleep(2)"], [])]
    assert gpu_check.run_stages(stages, tmp_path, dry_run=False)[0]["status"] == "ok"
    late = gpu_check.run_stages(stages, tmp_path, dry_run=False, started=time.monotonic() - 3)
    assert late[0]["status"].startswith("out of time")


def test_a_stage_waits_for_its_warmer_and_unfinished_warmers_are_ended(tmp_path, monkeypatch):
    """The warmer writes its marker after a second; the stage that names it runs only after that (its
    command fails without the marker). A warmer still running when the stages end is killed; both
    are recorded in results.jsonl."""
    monkeypatch.setattr(gpu_check, "DRY_RUN_TIMEOUT_S", 30)
    py, marker = sys.executable, tmp_path / "compiled"
    warmers = [gpu_check.Warmer("compile", [], [py, "-c", f"import time, pathlib; time.sleep(1); "
                                                      f"pathlib.Path({str(marker)!r}).touch()"]),
               gpu_check.Warmer("endless", [], [py, "-c", "import time; time.sleep(600)"]),
               gpu_check.Warmer("gpu only", [], None)]
    stages = [gpu_check.Stage("needs it", 1, [], [py, "-c", f"import pathlib, sys; "
                                                        f"sys.exit(0 if pathlib.Path({str(marker)!r}).exists() else 3)"],
                              after=("compile",)),
              gpu_check.Stage("needs the gpu one", 1, [], [py, "-c", "pass"], after=("gpu only",))]
    results = gpu_check.run_stages(stages, tmp_path, dry_run=True, warmers=warmers)
    log = (tmp_path / "gpu_check.log").read_text()
    # a warmer that never ran (no dry version) is not said to be waited for, as the dry run's log once did
    assert "needs it: waited" in log and "for compile" in log and "needs the gpu one: waited" not in log
    assert results[0]["status"] == "ok" and results[0]["waited_s"] >= 0.5
    assert results[0]["warmers_running"] == ["endless"]  # its timings were taken beside a warmer: flagged
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    ended = {x["warmer"]: x["status"] for x in lines if "warmer" in x}
    assert ended == {"compile": "ok", "endless": "killed at the end of the run"}  # "gpu only" never started
    assert "warmer compile" in (tmp_path / "warm.log").read_text()


def test_the_dry_run_rehearses_the_gpu_runs_code_paths():
    """The GPU's sampling and DiT stages ran --sequential (rows kept as measured), their dry versions did not:
    the path the GPU run takes was never rehearsed."""
    for stage in gpu_check.STAGES:
        for flag in ("--sequential", "--train-check"):
            assert (flag in stage.gpu) == (flag in stage.dry), (stage.name, flag)


@pytest.mark.slow
def test_dry_run_passes_every_stage(tmp_path):
    # the script calls python3 (the GPU image's name): this interpreter's, even when its venv is not activated
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + (tmp_path / "gpu_check.log").read_text()[-4000:]
    for stage in gpu_check.STAGES:  # the table shows every stage with its GPU budget
        assert f"budget {stage.budget_s} s" in proc.stdout and stage.name in proc.stdout
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    stages = [x for x in lines if "stage" in x]
    assert [x["stage"] for x in stages] == [s.name for s in gpu_check.STAGES]
    assert all(x["status"] == "ok" for x in stages)
    warmers = {x["warmer"]: x["status"] for x in lines if "warmer" in x}  # rehearsed: those with a dry command
    assert warmers == {w.name: "ok" for w in gpu_check.WARMERS if w.dry is not None} and warmers
    rows = [x for x in lines if "row" in x]  # measured rows, appended by the benchmarks as they ran
    benchmarks = {x["benchmark"] for x in rows}
    assert {"environment", "kernels", "train_step/gmm/stmd", "train_step/celeba-latent/stmd", "sample/gmm/stmd",
            "train_check/cifar10"} <= benchmarks, benchmarks
    check = next(x["row"] for x in rows if x["benchmark"] == "train_check/cifar10")
    assert check["passed"] and check["loss_last"] < check["loss_first"]
    # the trainer's own log is kept in OUT_DIR (a stage cut off by its budget writes no row), its run folder is not:
    # the GPU machine sends back 8 files at most
    logged = (tmp_path / "train_check.metrics.jsonl").read_text().splitlines()
    assert sum("loss" in json.loads(x) for x in logged) == check["steps"]
    kept = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert kept == ["gpu_check.log", "results.jsonl", "train_check.metrics.jsonl", "warm.log"], kept
    env = next(x["row"] for x in rows if x["benchmark"] == "environment")
    assert env["torch"] and env["commit"]
    assert all(r["row"]["ms_per_step"] > 0 for r in rows if r["benchmark"].startswith("train_step"))


def test_a_relative_out_dir_is_the_callers_not_the_repositorys(tmp_path):
    """The script moves to the repository root before Python resolves OUT_DIR: a relative one must be
    resolved first, or the results land in the repository (outside $OUT, so they never come back)."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')  # stands in for the GPU image's python3
    (shim / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ.get('PATH', '')}"}
    for argv, expected in ((["out/check", "--dry-run"], [str(tmp_path / "out" / "check"), "--dry-run"]),
                           (["--dry-run", "out/check"], ["--dry-run", str(tmp_path / "out" / "check")]),
                           (["--help"], ["--help"])):
        proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *argv], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=30)
        assert proc.returncode == 0 and proc.stdout.splitlines() == ["bench/gpu_check.py", *expected], proc


def test_a_missing_module_stops_the_run_before_any_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "NEEDED_MODULES", ("json", "no_such_module_for_the_test"))
    with pytest.raises(SystemExit) as stop:
        gpu_check.main([str(tmp_path / "out"), "--dry-run"])
    assert "not importable: no_such_module_for_the_test (ModuleNotFoundError" in str(stop.value)
    assert "pip install -e ." in str(stop.value) and not (tmp_path / "out").exists()
    assert gpu_check.missing_modules() == ["no_such_module_for_the_test (ModuleNotFoundError: No module named "
                                           "'no_such_module_for_the_test')"]


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_an_unusable_out_dir_is_one_line_before_the_import_check(tmp_path, monkeypatch, capsys, where):
    """A file given as OUT_DIR was a FileExistsError traceback, after the import check had spent its seconds."""
    monkeypatch.setattr(gpu_check, "missing_modules", lambda: pytest.fail("the import check ran first"))
    (tmp_path / "f").write_text("a file")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "out"
    with pytest.raises(SystemExit) as stop:
        gpu_check.main([str(out), "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and f"{tmp_path / 'f'} is a file, not a folder" in err[-1]


def test_warmers_run_below_the_stages_priority(tmp_path):
    """Warmers compile while stages measure: they are niced so the stages keep the CPU."""
    py, seen = sys.executable, tmp_path / "nice"
    warmer = gpu_check.Warmer("report", [], [py, "-c", f"import os, pathlib; pathlib.Path({str(seen)!r})"
                                                     f".write_text(str(os.nice(0)))"])
    running = gpu_check.start_warmers([warmer], tmp_path, dry_run=True)
    running["report"][0].wait(timeout=30)
    assert int(seen.read_text()) == min(os.nice(0) + 10, 19)


def test_environment_names_the_files_changed_since_the_commit():
    info = gpu_check.environment()
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                             text=True).stdout.splitlines()
    if info["commit"] is None:
        pytest.skip("not a git checkout")
    assert sorted(info["uncommitted"]) == sorted(line[3:] for line in changed)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_stopped_run_kills_its_warmers_and_the_running_stage(tmp_path, sig):
    """SIGTERM (`timeout`, a scheduler) or SIGHUP (a closed terminal) once ended the script alone: the warmers
    and the running stage, each in a session of its own that the signal does not reach, ran on as orphans."""
    import signal
    import time

    py, out = sys.executable, tmp_path / "out"

    def sleeper(name):  # writes its pid, then sleeps far past the test
        return [py, "-c", f"import os, pathlib, time; pathlib.Path({str(tmp_path / name)!r}).write_text("
                          f"str(os.getpid())); time.sleep(600)"]

    script = (f"import pathlib, sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import gpu_check as g; "
              f"g.run_stages([g.Stage('hangs', 1, [], {sleeper('stage')!r})], pathlib.Path({str(out)!r}), "
              f"dry_run=True, warmers=[g.Warmer('endless', [], {sleeper('warmer')!r})])")
    proc = subprocess.Popen([py, "-c", script])
    pids = {}
    try:
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            pids = {name: int(text) for name in ("stage", "warmer")
                    if (tmp_path / name).exists() and (text := (tmp_path / name).read_text())}
            time.sleep(0.1)
        assert len(pids) == 2, "the stage and the warmer did not start"
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(timeout=30) == 128 + getattr(signal, sig)
        for name, pid in pids.items():  # killed and reaped, not left running
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        stage, warmer = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
        assert warmer == {"warmer": "endless", "status": "killed at the end of the run", "seconds": warmer["seconds"]}
        # the stage it stopped is recorded too (it had no line, and the log ended mid-stage)
        assert stage == {"stage": "hangs", "status": f"stopped: {sig}", "seconds": stage["seconds"], "budget_s": 1,
                         "waited_s": 0.0, "warmers_running": ["endless"]}  # the shape of every stage's row
        assert (out / "gpu_check.log").read_text().splitlines()[-1].startswith(f"===== hangs: stopped: {sig}, ")
    finally:  # a failed test leaves no sleepers behind
        proc.kill()
        for pid in pids.values():
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_no_prefix_of_a_flag_stands_for_it(tmp_path, capsys):
    """`--train` once reached the hidden --train-check (argparse's abbreviations)."""
    with pytest.raises(SystemExit) as stop:
        gpu_check.main([str(tmp_path / "out"), "--train"])
    assert stop.value.code == 2 and "unrecognized arguments: --train" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_environment_is_recorded_before_any_stage_whatever_the_import_check_took(tmp_path, monkeypatch):
    """The environment stage's 10 s counted from the script's start, import check included (15.8 s on 2 CPU
    cores): it could be killed after 1 s, losing the record of GPU, torch and commit. It is now written by the
    script's own process, before the stages and their clock."""
    monkeypatch.setattr(gpu_check, "STAGES", [])
    monkeypatch.setattr(gpu_check, "WARMERS", [])
    monkeypatch.setattr(gpu_check, "missing_modules", lambda: [])
    assert gpu_check.main([str(tmp_path), "--dry-run"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert lines[0]["benchmark"] == "environment" and lines[0]["row"]["torch"] and lines[0]["row"]["commit"]
