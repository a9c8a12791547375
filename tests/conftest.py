import os
import shutil
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# Without a GPU, the Triton kernels run through Triton's interpreter on CPU tensors (fp32 only).
# It is read when a kernel module is imported, so it must be set before stmd_fast is imported.
# Models on CPU still use the PyTorch references (backend "auto"); only the kernel tests force
# the Triton path.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Started as a shell script's `pytest ... &`, this process ignores SIGINT, and so would every command it runs (they
# keep a signal they were started to ignore): the Ctrl-C tests need it back. A handler, not SIG_DFL, so that the
# subprocesses start with SIGINT's default (exec keeps SIG_IGN, not handlers).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def fp32_math_as_torch_sets_it():
    """Each test starts from torch's own fp32 matmul setting: a command run in-process (the trainer, or
    bench/train_step.py, which sets TF32 as the trainer does) changes it for the whole process."""
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    if (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) != before:
        torch.set_float32_matmul_precision(before[0])  # the process-wide setters, as devices.use_tf32 uses
        torch.backends.cudnn.allow_tf32 = before[1]


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory) -> str:
    """A weights file in torch-fidelity's format from a randomly initialised InceptionV3.

    Its constructor always loads weights, so loading is stubbed out while it is built. Convolutions
    are re-initialised He-normal: with PyTorch's default init the 2048 features vanish (~1e-8) and
    every distance would be ~0, testing nothing.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tfi, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
            for module in net.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return str(path)


# ----------------------------------------------------------------------------- file systems that refuse writes

def _mount_tmpfs(path: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@contextmanager
def _mounted(path: Path, options: str):
    if not _mount_tmpfs(path, options):
        pytest.skip("needs root and mount for a real tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def readonly_dir(tmp_path):
    """An existing folder nobody can write into: chmod 555 as a user, a read-only tmpfs as root (root
    ignores permissions)."""
    path = tmp_path / "readonly"
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    with _mounted(path, "ro,size=64k") as mounted:
        yield mounted


@pytest.fixture
def tiny_disk(tmp_path):
    """A real file system with 64 KiB free (root only; skipped elsewhere)."""
    with _mounted(tmp_path / "tiny", "size=64k") as mounted:
        yield mounted


def assert_one_line_error(capsys, *words: str) -> str:
    """stderr is exactly one line 'error: ...' (blank lines aside) that contains every word; returns it.
    Test modules import it: `from conftest import assert_one_line_error`."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("error:"), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]
