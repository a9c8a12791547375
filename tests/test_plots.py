"""stmd_fast.plots: each figure is written as a real PNG that matplotlib reads back, with no
pyplot or global backend state touched, and a clear error when matplotlib is missing."""
import subprocess
import sys

import pytest

from stmd_fast.plots import plot_kernel_heatmap, plot_metric_vs_nfe

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path):
    """The image as an (H, W, C) array, after checking the file's signature."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300, image.shape
    assert image.std() > 0.01, "a blank image"
    return image


def grid_row(s_from, s_to, m, model, mean):
    return {"s_from": s_from, "s_to": s_to, "flow_steps": m, "energy_model": model, "energy_mean_bridge": mean,
            "energy_floor": 1e-3, "sw2_model": 0.1, "sw2_mean_bridge": 0.5, "sw2_floor": 0.1}


# A 2 x 2 grid, s_from in {0.5, 1.0} by s_to in {0.1, 0.6}: (0.5, 0.6) is empty (s_to >= s_from).
GRID = [grid_row(0.5, 0.1, 1, 0.01, 0.45), grid_row(1.0, 0.1, 1, -0.002, 0.5), grid_row(1.0, 0.6, 1, 0.003, 0.001),
        grid_row(0.5, 0.1, 2, 0.02, 0.45), grid_row(1.0, 0.1, 2, 0.0, 0.5), grid_row(1.0, 0.6, 2, 0.001, 0.001)]


def test_metric_vs_nfe_writes_a_png(tmp_path):
    rows = [{"label": "stmd M=1 (runs/digits-stmd)", "nfe": n, "value": 30 / n**0.5} for n in (4, 1, 2, 8)]
    rows += [{"label": "ddpm (runs/digits-ddpm)", "nfe": n, "value": 90 / n**0.7} for n in (1, 2, 4, 8, 16)]
    path = tmp_path / "figs" / "fd_vs_nfe.png"  # the folder is made
    plot_metric_vs_nfe(rows, path, metric="FD")
    read_png(path)
    plot_metric_vs_nfe(rows[:4], str(tmp_path / "one.png"), metric="FID")  # a str path, one line
    read_png(tmp_path / "one.png")


def test_kernel_heatmap_writes_a_png(tmp_path):
    for m in (1, 2):
        path = tmp_path / f"kernel_M{m}.png"
        plot_kernel_heatmap(GRID, path, flow_steps=m)
        read_png(path)


def test_bad_rows_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        plot_metric_vs_nfe([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="lacks"):
        plot_metric_vs_nfe([{"label": "a", "nfe": 1}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="nfe must be > 0"):
        plot_metric_vs_nfe([{"label": "a", "nfe": 0, "value": 1.0}], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"M in \[1, 2\]"):
        plot_kernel_heatmap(GRID, tmp_path / "x.png", flow_steps=4)
    with pytest.raises(ValueError, match="two rows"):
        plot_kernel_heatmap(GRID + GRID[:1], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    # A None entry makes that import fail; the submodules too, since earlier tests loaded them.
    for name in ["matplotlib", *(m for m in list(sys.modules) if m.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, name, None)
    for plot, rows in ((plot_metric_vs_nfe, [{"label": "a", "nfe": 1, "value": 1.0}]), (plot_kernel_heatmap, GRID)):
        with pytest.raises(ImportError, match=r"pip install matplotlib \(or stmd_fast\[plot\]\)"):
            plot(rows, tmp_path / "x.png")


def test_importing_plots_does_not_import_matplotlib_or_pyplot(tmp_path):
    code = ("import sys, stmd_fast.plots as p; assert 'matplotlib' not in sys.modules; "
            f"p.plot_metric_vs_nfe([{{'label': 'a', 'nfe': 1, 'value': 1.0}}], {str(tmp_path / 'a.png')!r}); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
