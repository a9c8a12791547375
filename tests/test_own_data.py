"""The pieces for training on your own images: the image-folder loader, horizontal flip, the U-Net
sized per resolution, the DiT chosen per latent size, and dropout (which must keep the JVP exact)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stmd_fast.config import _cifar10
from stmd_fast.data.datasets import DataError, TensorData
from stmd_fast.data.images import load_image_folder
from stmd_fast import dit
from stmd_fast.dit import DIT_MODELS, choose_dit
from stmd_fast.models import NetConfig, build_net, unet_config


def _noise_image(path, size, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    w, h = size
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    image = image.convert(mode) if mode != "RGB" else image
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _reference(path, resolution) -> np.ndarray:
    """Resize the shorter side to R (bicubic), crop the center R x R: written out here with PIL alone, each
    channel as float (no rounding between the horizontal and vertical pass), as (C, R, R) float."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        w, h = image.size
        if w <= h:
            size = (resolution, max(resolution, round(h * resolution / w)))
        else:
            size = (max(resolution, round(w * resolution / h)), resolution)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        channels = [Image.fromarray(np.asarray(image)[..., c].astype(np.float32), "F").resize(size, Image.BICUBIC)
                    for c in range(3)]
        return np.clip(np.stack([np.asarray(c)[top:top + resolution, left:left + resolution] for c in channels]),
                       0, 255)


def _assert_resized_as(pixels: torch.Tensor, reference: np.ndarray):
    """uint8 pixels against the float reference: Pillow rounds to uint8 between its two passes (and clips
    the bicubic overshoot there), which on noise images moves a few pixels by several levels."""
    diff = np.abs(pixels.numpy().astype(np.float64) - reference)
    assert diff.mean() < 0.5 and np.quantile(diff, 0.99) <= 3, (diff.mean(), np.quantile(diff, 0.99))


def test_image_folder_loads_every_image_resized_and_center_cropped(tmp_path, capsys):
    sizes = {"a.png": (40, 30), "b.jpg": (24, 48), "sub/c.PNG": (32, 32), "d.jpeg": (17, 50)}
    for seed, (name, size) in enumerate(sizes.items()):
        _noise_image(tmp_path / name, size, seed=seed)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (tmp_path / "notes.txt").write_text("ignored")
    data = load_image_folder(tmp_path, 32)
    assert data.kind == "image" and data.values.dtype == torch.uint8 and data.shape == (3, 32, 32)
    order = sorted(sizes)  # sorted relative paths: a.png, b.jpg, d.jpeg, sub/c.PNG
    for row, name in zip(data.values, order):
        _assert_resized_as(row, _reference(tmp_path / name, 32))
    out = capsys.readouterr().err
    assert "skipped 1 unreadable image(s)" in out and "\n  broken.png: " in out and len(data) == 4  # each named
    assert "3 of the 4 images are smaller than --resolution 32" in out  # 30, 24 and 17 pixels: enlarged
    x = data.batch(5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 3, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_a_grayscale_folder_gives_one_channel(tmp_path):
    for i in range(3):
        _noise_image(tmp_path / f"{i}.png", (20, 20), mode="L", seed=i)
    data = load_image_folder(tmp_path, 16)
    assert data.shape == (1, 16, 16)
    _assert_resized_as(data.values[0], _reference(tmp_path / "0.png", 16)[:1])


def test_an_unreadable_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no images under"):
        load_image_folder(tmp_path, 32)
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="could be read"):
        load_image_folder(tmp_path, 32)


def test_an_exif_rotated_photo_is_read_upright(tmp_path):
    """A camera's portrait photo: landscape pixels plus EXIF Orientation 6 (rotate 90 degrees clockwise to
    view). The loader must see what a viewer shows: the pixels rotated, red on the top, not the left."""
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)  # stored 64 wide, 32 high; red left half
    pixels[:, :32, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(pixels).save(tmp_path / "photo.png", exif=exif)
    data = load_image_folder(tmp_path, 16)
    upright = data.values[0].numpy()  # the viewer's 32 wide, 64 high, red on top, center-cropped
    assert upright[0, 0].tolist() == [255] * 16 and upright[0, -1].tolist() == [0] * 16


def test_broken_links_are_skipped_and_named_and_special_files_left_out(tmp_path, capsys):
    """A data set of links into a drive that is not mounted: each link is an image that could not be read,
    not a file that is not there (which made a folder of them "no images")."""
    import os

    _noise_image(tmp_path / "good.png", (20, 20))
    os.symlink(tmp_path / "unmounted" / "photo.jpg", tmp_path / "gone.jpg")
    os.symlink("loop-b.png", tmp_path / "loop-a.png")
    os.symlink("loop-a.png", tmp_path / "loop-b.png")
    os.mkfifo(tmp_path / "pipe.png")  # would block a reader: not an image file
    data = load_image_folder(tmp_path, 16)
    err = capsys.readouterr().err
    assert len(data) == 1 and "skipped 3 unreadable image(s)" in err
    assert "\n  gone.jpg: FileNotFoundError" in err and "\n  loop-a.png: " in err and "pipe" not in err
    (tmp_path / "good.png").unlink()
    with pytest.raises(DataError, match="none of the 3 images under .* could be read"):
        load_image_folder(tmp_path, 16)


def test_links_that_name_one_file_twice_read_it_once_and_say_so(tmp_path, capsys):
    """A set assembled from links can list one image under two names (a symlink, a hard link, a linked folder
    that overlaps a real one): it would weigh double in training and in FD's reference statistics."""
    import os

    _noise_image(tmp_path / "a.png", (20, 20))
    _noise_image(tmp_path / "b.png", (20, 20), seed=1)
    os.symlink("a.png", tmp_path / "c.png")
    os.link(tmp_path / "b.png", tmp_path / "d.png")
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path / "a.png", tmp_path / "sub" / "e.png")
    data = load_image_folder(tmp_path, 16)
    err = capsys.readouterr().err
    assert len(data) == 2
    assert "note: 3 image path(s) under " in err and "(a link or hard link: c.png is a.png)" in err


def test_a_folder_that_cannot_be_listed_is_named_not_passed_over(tmp_path, monkeypatch, capsys):
    """os.walk passes over a folder it cannot list (permissions, a stale network mount) without a word: a part of
    the set was left out silently, and an unlistable --data itself read as "no images under it"."""
    import os

    _noise_image(tmp_path / "ok" / "a.png", (20, 20))
    _noise_image(tmp_path / "locked" / "b.png", (20, 20), seed=1)
    real_scandir = os.scandir

    def scandir(path="."):  # as root, chmod cannot take the right to list away
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    data = load_image_folder(tmp_path, 16)
    assert len(data) == 1
    assert f"note: left out 1 folder(s) under {tmp_path}, e.g. {tmp_path / 'locked'} (Permission denied)" in \
        capsys.readouterr().err
    with pytest.raises(DataError, match=r"locked: cannot list it \(Permission denied\); make it readable"):
        load_image_folder(tmp_path / "locked", 16)


def test_a_run_folder_linked_into_the_data_is_not_read_as_images(tmp_path, capsys):
    """--out reached through a symlinked part of --data (the config check compares real paths of the two folders
    only): the run's own sample grids joined the training set on --resume."""
    import json
    import os

    _noise_image(tmp_path / "parts" / "real" / "a.png", (20, 20))
    run = tmp_path / "parts" / "out" / "run"
    _noise_image(run / "samples" / "step_00000002.png", (20, 20), seed=1)
    (run / "config.json").write_text(json.dumps({"config": {}, "data_shape": [3, 16, 16]}))
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "parts" / "real", tmp_path / "data" / "real")
    os.symlink(tmp_path / "parts" / "out", tmp_path / "data" / "out")
    assert len(load_image_folder(tmp_path / "data", 16)) == 1
    assert f"e.g. {tmp_path / 'data' / 'out' / 'run'} (a training run's folder)" in capsys.readouterr().err
    (run / "config.json").unlink()
    (run / ".lock").touch()  # another tool's lock file: not a run
    assert len(load_image_folder(tmp_path / "data", 16)) == 2
    (run / "metrics.jsonl").touch()  # a run starting: its lock and metrics before its config.json
    assert len(load_image_folder(tmp_path / "data", 16)) == 1
    with pytest.raises(DataError, match=r"run: a training run's folder, whose sample grids are not training images"):
        load_image_folder(run, 16)


def test_a_file_name_that_is_not_utf8_is_read_and_named_printably(tmp_path, capsys):
    import os

    _noise_image(tmp_path / "ok.png", (20, 20))
    _noise_image(Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png")), (20, 20), seed=1)  # latin-1 name
    Path(os.fsdecode(bytes(tmp_path) + b"/bad\xff.png")).write_bytes(b"junk")
    data = load_image_folder(tmp_path, 16)
    assert len(data) == 2 and "\n  bad\\xff.png: " in capsys.readouterr().err


def test_hidden_folders_are_left_out_and_other_formats_read(tmp_path):
    for i, name in enumerate(["a.webp", "b.bmp", "c.tif", "d.gif", ".ipynb_checkpoints/a.webp", ".e.png"]):
        _noise_image(tmp_path / name, (20, 20), seed=i)
    data = load_image_folder(tmp_path, 16)
    assert len(data) == 4
    _assert_resized_as(data.values[1], _reference(tmp_path / "b.bmp", 16))


def test_flip_mirrors_about_half_and_leaves_the_draws_unflipped_otherwise():
    values = torch.arange(200 * 2 * 3, dtype=torch.float32).reshape(200, 1, 2, 3) / 1200
    plain, flipped = TensorData("x", values, "image"), TensorData("x", values, "image", flip=True)
    x_plain = plain.batch(4000, torch.Generator().manual_seed(1))
    # without flip the batch is exactly the rows that the indices pick (the draws predate flip)
    indices = torch.randint(200, (4000,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(x_plain, values[indices])
    x_flip = flipped.batch(4000, torch.Generator().manual_seed(1))
    same = (x_flip == x_plain).flatten(1).all(1)
    mirrored = (x_flip == x_plain.flip(-1)).flatten(1).all(1)
    assert bool((same ^ mirrored).all())  # each image is itself or its mirror (rows are not symmetric)
    assert abs(mirrored.float().mean().item() - 0.5) < 0.03  # 4000 fair coins: std 0.008
    with pytest.raises(DataError, match="flip"):
        TensorData("v", torch.zeros(3, 2), "vector", flip=True)


@pytest.mark.parametrize("resolution, levels, attention", [(8, 2, 0), (28, 3, 1), (32, 4, 1), (64, 5, 2),
                                                           (256, 6, 4)])
def test_unet_sized_for_the_resolution(resolution, levels, attention):
    cfg = unet_config("S", (3, resolution, resolution))
    assert len(cfg.channels) == levels and cfg.attention_levels == (attention,)
    assert resolution // 2 ** attention <= 16 or attention == levels - 1


def test_unet_L_at_32_pixels_is_the_cifar10_preset_network():
    assert unet_config("L", (3, 32, 32)).channels == _cifar10().net.channels
    net = build_net(unet_config("S", (3, 48, 48)), (3, 48, 48), True, 3)
    assert net(torch.zeros(2, 3, 48, 48), torch.zeros(2, 3, 48, 48), torch.zeros(2, 3)).shape == (2, 3, 48, 48)
    with pytest.raises(ValueError, match="S, B, L"):
        unet_config("XL", (3, 32, 32))


def test_dit_default_per_latent_size_and_checked_names():
    assert [choose_dit(None, (4, s, s)) for s in (8, 16, 32, 64)] == ["DiT-S/2", "DiT-B/2", "DiT-M/2", "DiT-M/2"]
    assert choose_dit("DiT-XL/8", (4, 32, 32)) == "DiT-XL/8"
    for bad, why in [("DiT-Q/2", "not in the registry"), ("DiT-S/8", "does not divide the latents 12x12")]:
        with pytest.raises(ValueError) as err:
            choose_dit(bad, (4, 12, 12))
        message = str(err.value)
        assert why in message and "\n" not in message
        listed = message.split("choose one of ")[1].split(", ")
        assert listed == [n for n in DIT_MODELS if not n.endswith("/8")]  # exactly the names that fit 12x12
    with pytest.raises(ValueError, match="no DiT patch"):
        choose_dit(None, (4, 7, 7))


@pytest.mark.parametrize("cfg, shape", [
    (NetConfig(channels=(8, 16), norm_groups=4, head_dim=4, time_freqs=8), (1, 8, 8)),
    (NetConfig(kind="dit", width=32, depth=1, heads=2, patch_size=2, time_freqs=16), (4, 8, 8)),
], ids=["unet", "dit"])
def test_dropout_keeps_the_jvp_exact_and_is_off_in_eval(cfg, shape):
    """Under torch.func.jvp the tangent goes through the same dropout mask as the primal: with the mask
    fixed by the seed, du/dt equals float64 central differences. Eval mode (sampling) has no dropout."""
    torch.manual_seed(0)
    net = build_net(cfg, shape, True, 3, dropout=0.3).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the zero-initialised output layers would hide everything
    z, cond = torch.randn(2, *shape, dtype=torch.float64), torch.randn(2, *shape, dtype=torch.float64)
    t, dt = torch.rand(2, 3, dtype=torch.float64), torch.tensor([[1.0, 1.0, 0.0]] * 2, dtype=torch.float64)

    def f(times, seed=5):
        torch.manual_seed(seed)  # the same dropout mask in every call
        return net(z, cond, times)

    u, du = torch.func.jvp(f, (t,), (dt,))
    eps = 1e-6
    fd = (f(t + eps * dt) - f(t - eps * dt)) / (2 * eps)
    # the same mask: a different one moves outputs by about 0.1; the dual path's float64 rounding differs
    # from the plain forward's by a few ulps on some CPUs (1e-15 seen on an AVX-512 Xeon)
    torch.testing.assert_close(u, f(t), rtol=0, atol=1e-12)
    assert ((du - fd).abs().max() / fd.abs().max()).item() < 1e-6
    assert not torch.equal(f(t, seed=5), f(t, seed=6))  # dropout is on while training
    net.eval()
    assert torch.equal(f(t, seed=5), f(t, seed=6))


def test_use_tf32_sets_and_clears_cuda_fp32_math():
    """--tf32 on CUDA: matmuls and convolutions of fp32 tensors in TF32, or full fp32 (flags only; no GPU needed)."""
    from stmd_fast.devices import use_tf32

    cudnn = torch.backends.cudnn
    try:
        use_tf32(True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" and cudnn.conv.fp32_precision == "tf32"
        assert torch.get_float32_matmul_precision() == "high" and cudnn.allow_tf32
        use_tf32(False)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee" and cudnn.conv.fp32_precision != "tf32"
        # every reader still works: cuDNN conv and RNN set alike (conv alone made torch.export raise)
        assert torch.get_float32_matmul_precision() == "highest" and not cudnn.allow_tf32
        assert cudnn.conv.fp32_precision == cudnn.rnn.fp32_precision
    finally:
        torch.set_float32_matmul_precision("highest")  # torch's defaults
        cudnn.allow_tf32 = True


@pytest.mark.parametrize("side", [8, 16, 28, 32, 48, 64, 128])
def test_the_network_chosen_for_an_image_array_attends_over_at_most_16_x_16_positions(side):
    """A .npy of images (or a preset run on images of another size) gets a U-Net whose attention runs where
    the image has been halved to 16 pixels or fewer: at 64 pixels the mnist U-Net's would see 32 x 32."""
    from stmd_fast.config import net_for_shape

    cfg = net_for_shape((3, side, side))
    (level,) = cfg.attention_levels
    assert side // 2 ** level <= 16


def test_choose_net_follows_the_data_and_refuses_a_flag_for_other_data():
    from stmd_fast.config import PRESETS, choose_net

    images, latent, digits = PRESETS["images"](), PRESETS["latent"](), PRESETS["digits"]()
    assert choose_net(images, (3, 32, 32), "image") == unet_config("B", (3, 32, 32))
    assert choose_net(latent, (4, 16, 16), "latent").width == dit.DIT_SIZES["B"][1]
    assert choose_net(digits, (1, 8, 8), "image") == digits.net  # a preset keeps its own network
    digits.unet = "S"
    assert choose_net(digits, (1, 8, 8), "image") == unet_config("S", (1, 8, 8))
    latent.unet = "S"
    with pytest.raises(ValueError, match="--unet for images"):
        choose_net(latent, (4, 16, 16), "latent")


def test_a_resolution_beyond_memory_is_refused_before_any_image_is_read(tmp_path, monkeypatch):
    from stmd_fast.data import images

    for i in range(3):
        _noise_image(tmp_path / f"{i}.png", (20, 20), seed=i)
    monkeypatch.setattr(images, "read_image", lambda *a: pytest.fail("an image was read"))
    with pytest.raises(DataError, match=r"3 images at 1000000x1000000 pixels take .* GB in memory, more than half of "
                                        r"this machine's .*: lower --resolution"):
        load_image_folder(tmp_path, 10 ** 6, workers=2)


def test_unet_size_error_names_fixes_that_build():
    import dataclasses

    from stmd_fast.config import PRESETS, choose_net
    from stmd_fast.methods import METHODS

    cfg = PRESETS["digits"]()  # --data img7.npy: the digits U-Net (2 levels) for images up to 16 pixels
    stmd = METHODS["stmd"]
    with pytest.raises(ValueError) as err:
        stmd.build_net(choose_net(cfg, (1, 7, 7), "image"), (1, 7, 7))
    message = str(err.value)
    assert "\n" not in message and "channel levels" not in message  # no flag sets those
    assert "8x8" in message and "--unet S, B or L" in message
    stmd.build_net(choose_net(cfg, (1, 8, 8), "image"), (1, 8, 8))  # padded to 8x8: builds
    for size in ("S", "B", "L"):  # or --unet: a U-Net laid out for 7x7, which runs
        net = stmd.build_net(choose_net(dataclasses.replace(cfg, unet=size), (1, 7, 7), "image"), (1, 7, 7))
        z = torch.randn(2, 1, 7, 7)
        assert net(z, z, torch.rand(2, len(stmd.times))).shape == z.shape


def test_pixels_outside_the_modes_range_are_skipped_and_named_not_guessed(tmp_path, capsys):
    """Float images are read as 0..1 and 32-bit integer ones as 0..65535; a float image at 0..1.02 used to be
    read as 0..255 (black), one NaN blacked out its image, 0..1000 was clipped to white, without a word."""
    ramp = np.linspace(0, 1, 60, dtype=np.float32)[None].repeat(40, 0)
    Image.fromarray(ramp).save(tmp_path / "unit.tif")
    Image.fromarray(ramp * 1.02).save(tmp_path / "over.tif")
    nan = ramp.copy()
    nan[0, 0] = np.nan
    Image.fromarray(nan).save(tmp_path / "nan.tif")
    Image.fromarray((ramp * 70000).astype(np.int32)).save(tmp_path / "wide.tif")  # mode I
    Image.fromarray(np.full_like(ramp, np.nan)).save(tmp_path / "void.tif")  # numpy warned "All-NaN slice" first
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_image_folder(tmp_path, 16)
    err = capsys.readouterr().err
    assert len(data) == 1 and data.shape == (1, 16, 16) and "skipped 4 unreadable image(s)" in err
    assert "\n  void.tif: ValueError: float pixels all NaN or inf, outside" in err
    assert "\n  over.tif: ValueError: float pixels in [0, 1.02]" in err and "in 0..1" in err
    assert "\n  nan.tif: ValueError: float pixels in [0, 1] with NaN or inf" in err
    assert "\n  wide.tif: ValueError: integer pixels in [0, 7e+04], outside the 0..65535" in err
    _assert_resized_as(data.values[0], _reference_gray(ramp * 255, 16))


def _reference_gray(values: np.ndarray, resolution: int) -> np.ndarray:
    """(1, R, R): a (H, W) array of 0..255 floats resized and center-cropped as _reference does."""
    h, w = values.shape
    size = (resolution, max(resolution, round(h * resolution / w))) if w <= h else \
        (max(resolution, round(w * resolution / h)), resolution)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    resized = np.asarray(Image.fromarray(values.astype(np.float32), "F").resize(size, Image.BICUBIC))
    return np.clip(resized[None, top:top + resolution, left:left + resolution], 0, 255)


def test_other_names_of_image_formats_are_read_and_other_files_counted(tmp_path, capsys):
    """.jfif is the JPEG that Windows and browsers save; such files were left out without a word."""
    for i, name in enumerate(["a.jfif", "b.jpe", "c.ppm", "d.tga", "e.png"]):
        _noise_image(tmp_path / name, (20, 20), seed=i)
    (tmp_path / "e.txt").write_text("a caption")
    (tmp_path / "f.svg").write_text("<svg/>")
    (tmp_path / "README").write_text("about")
    data = load_image_folder(tmp_path, 16)
    err = capsys.readouterr().err
    assert len(data) == 5 and "note: left out 3 file(s) under" in err
    assert ".txt x1" in err and ".svg x1" in err and "(no suffix) x1" in err
    for name in ["a.jfif", "b.jpe", "c.ppm", "d.tga", "e.png"]:
        (tmp_path / name).unlink()
    with pytest.raises(DataError, match=r"no images under .* \(only 3 file\(s\) under .* not images by their suffix"):
        load_image_folder(tmp_path, 16)


def test_grayscale_is_read_from_the_pixels_and_a_colour_stray_is_named(tmp_path, capsys):
    """A GIF or palette PNG of grays opens in mode P, a 16-bit gray+alpha PNG as RGBA: grayscale all the same."""
    ramp = np.linspace(0, 255, 60).astype(np.uint8)[None].repeat(40, 0)
    Image.fromarray(ramp).save(tmp_path / "a.gif")
    Image.fromarray(ramp).convert("P").save(tmp_path / "b.png")
    data = load_image_folder(tmp_path, 16)
    assert data.shape == (1, 16, 16)
    _assert_resized_as(data.values[0], _reference_gray(ramp.astype(np.float32), 16))
    _noise_image(tmp_path / "c.png", (20, 20))
    capsys.readouterr()
    data = load_image_folder(tmp_path, 16)
    assert data.shape == (3, 16, 16)
    assert "note: 1 of the 3 images are in colour (first: c.png), so all are read as RGB" in capsys.readouterr().err
    for i in range(3):  # now mostly colour: a few gray photos among colour ones are no stray to name
        _noise_image(tmp_path / f"d{i}.png", (20, 20), seed=i)
    assert load_image_folder(tmp_path, 16).shape == (3, 16, 16) and "in colour" not in capsys.readouterr().err


def test_a_long_strip_is_resized_for_its_crop_alone(tmp_path, monkeypatch):
    """A 2 x 400 strip at R = 16 was resized whole to 3200 x 16 for one 16 x 16 crop (a 2 x 40000 one: 10 s
    and 1 GB); now only the crop's footprint is resampled, to the same pixels."""
    _noise_image(tmp_path / "strip.png", (400, 2))
    sizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **k: sizes.append(tuple(size)) or
                        resize(self, size, *a, **k))
    data = load_image_folder(tmp_path, 16)
    assert sizes and max(w * h for w, h in sizes) <= 16 * 16, sizes
    _assert_resized_as(data.values[0], _reference(tmp_path / "strip.png", 16))


def test_an_image_over_pillows_pixel_limit_is_skipped_with_the_fix(tmp_path, capsys, monkeypatch):
    _noise_image(tmp_path / "a.png", (20, 20))
    _noise_image(tmp_path / "scan.png", (200, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # as a 200-megapixel scan is to the default limit
    data = load_image_folder(tmp_path, 16)
    err = capsys.readouterr().err
    assert len(data) == 1 and "\n  scan.png: DecompressionBombError: " in err and "downscale the file" in err


def test_reading_says_what_it_reads_when_there_is_no_progress_bar(tmp_path, capsys):
    for i in range(3):
        _noise_image(tmp_path / f"{i}.png", (20, 20), seed=i)
    load_image_folder(tmp_path, 16)  # pytest's stderr is not a terminal, as a log file is not
    assert f"reading 3 images under {tmp_path} at 16x16" in capsys.readouterr().err


def test_archives_and_a_foreign_manifest_are_named_for_what_they_are(tmp_path):
    """A folder of images holding another program's manifest.json was taken for latent shards ("format None, this
    loader reads 'stmd_fast.latents/2'"); CelebA's img_align_celeba.zip was "an .npz archive"; a tar of images
    was "no manifest.json beside the shards"."""
    import tarfile
    import zipfile

    from stmd_fast.config import preset_for_data
    from stmd_fast.data.datasets import load_npy
    from stmd_fast.data.latents import LatentShards

    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(2):
        _noise_image(photos / f"{k}.png", (12, 12), seed=k)
    (photos / "manifest.json").write_text('{"name": "my photos"}')
    assert preset_for_data(str(photos)) == "images"
    (photos / "manifest.json").write_text('{"format": "stmd_fast.latents/1"}')  # ours, older: latent says re-encode
    assert preset_for_data(str(photos)) == "latent"
    with zipfile.ZipFile(tmp_path / "img_align_celeba.zip", "w") as archive:
        archive.write(photos / "0.png", "img_align_celeba/0.png")
    with pytest.raises(DataError, match="a zip archive of images, not an .npy: unzip it and pass the folder"):
        load_npy(str(tmp_path / "img_align_celeba.zip"))
    np.savez(tmp_path / "arrays.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="an .npz archive, not an .npy"):
        load_npy(str(tmp_path / "arrays.npz"))
    (tmp_path / "tarred").mkdir()
    with tarfile.open(tmp_path / "tarred" / "images.tar", "w") as archive:
        archive.add(photos / "0.png", "photos/0.png")
    with pytest.raises(DataError, match=r"images.tar is a tar archive of images, not latent shards: extract it"):
        LatentShards(str(tmp_path / "tarred" / "images.tar"))
    np.save(tmp_path / "x.npy", np.zeros((2, 4)))  # under --preset latent
    with pytest.raises(DataError, match=r"x.npy is a file, not latent shards: .*without a latent --preset"):
        LatentShards(str(tmp_path / "x.npy"))


def test_under_torchrun_only_rank_0_says_the_datas_notes(tmp_path, capsys):
    """Every rank reads the data: each printed the notes (a file left out, a stray colour image), 8 copies on 8 GPUs."""
    import dataclasses

    from stmd_fast.config import PRESETS
    from stmd_fast.distributed import Dist
    from stmd_fast.train import load_training_data

    for i in range(3):
        _noise_image(tmp_path / "imgs" / f"{i}.png", (12, 12), seed=i)
    (tmp_path / "imgs" / "captions.txt").write_text("three noise images")
    cfg = dataclasses.replace(PRESETS["images"](), data=str(tmp_path / "imgs"), resolution=8)
    seen = {}
    for rank in (0, 1):
        seen[rank] = load_training_data(cfg, Dist(rank=rank, world_size=2, launched=True))
        seen[f"err{rank}"] = capsys.readouterr().err
    assert "note: left out 1 file(s)" in seen["err0"] and seen["err1"] == ""
    assert torch.equal(seen[0].values, seen[1].values)  # the same data, read by both
