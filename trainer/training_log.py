"""What a run leaves to look at: `train_log.csv` always, TensorBoard events when tensorboard is
installed, and `curves.png`, a picture of the curves that a host can show as an image (drawn with PIL,
like ComfyUI's loss graph node, so no plotting library is needed)."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

LOG_FILE = "train_log.csv"
CURVES_FILE = "curves.png"
COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


class TrainingLog:
    """Append-only metrics by step. On resume, rows after the checkpoint's step are dropped first, so
    the file matches the run that continues."""

    def __init__(self, run_dir: Path, columns: Sequence[str], *, resume_step: int | None = None,
                 tensorboard: bool = True, enabled: bool = True):
        self.path = Path(run_dir) / LOG_FILE
        self.columns = ["step", *columns]
        self.enabled = enabled
        self.rows: list[dict] = []
        self._tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        else:
            self.rows = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed run hides the events a killed process wrote after its checkpoint
                purge = resume_step + 1 if resume_step is not None else None
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)
            except Exception:  # tensorboard is not installed: CSV and PNG only
                self._tb = None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _fmt(v) for k, v in metrics.items() if k in self.columns}}
        self.rows.append(row)
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(int(r["step"]), float(r[key])) for r in self.rows if r.get(key) not in (None, "")]

    def draw(self, panels: dict[str, Sequence[str]], title: str = "") -> Image.Image:
        return plot_curves({name: {k: self.series(k) for k in keys} for name, keys in panels.items()}, title)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def logged_series(run_dir: Path, keys, before: int) -> dict[str, list[tuple[int, float]]]:
    """The (step, value) series of `keys` in a run's train_log.csv, for steps before `before`: the part of
    the curve a resumed run already drew (hosts prepend it to their live preview)."""
    series: dict[str, list[tuple[int, float]]] = {k: [] for k in keys}
    path = Path(run_dir) / LOG_FILE
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if int(row["step"]) < before:
                    for k in series:
                        if row.get(k) not in (None, ""):
                            series[k].append((int(row["step"]), float(row[k])))
    return series


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def plot_curves(panels: dict[str, dict[str, list[tuple[int, float]]]], title: str = "",
                size: tuple[int, int] = (640, 280)) -> Image.Image:
    """One panel per entry, each with its series as lines, a legend, and the y range printed."""
    width, height = size
    image = Image.new("RGB", (width, height * max(len(panels), 1)), "white")
    draw = ImageDraw.Draw(image)
    for row, (name, series) in enumerate(panels.items()):
        top = row * height
        left, right, plot_top, bottom = 56, width - 12, top + 28, top + height - 28
        draw.rectangle([left, plot_top, right, bottom], outline=(160, 160, 160))
        draw.text((left, top + 6), f"{title}  {name}".strip(), fill="black")
        points = [p for values in series.values() for p in values if math.isfinite(p[1])]
        if not points:
            draw.text((left + 10, plot_top + 10), "no data yet", fill=(120, 120, 120))
            continue
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
        draw.text((4, plot_top), f"{y1:.4g}", fill="black")
        draw.text((4, bottom - 12), f"{y0:.4g}", fill="black")
        draw.text((left, bottom + 6), str(x0), fill="black")
        draw.text((right - 40, bottom + 6), str(x1), fill="black")

        sx, sy = (right - left) / (x1 - x0), (bottom - plot_top) / (y1 - y0)
        for i, (label, values) in enumerate(series.items()):
            color = COLORS[i % len(COLORS)]
            pts = [(left + (x - x0) * sx, bottom - (y - y0) * sy) for x, y in values if math.isfinite(y)]
            if len(pts) == 1:
                draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
            elif pts:
                draw.line(pts, fill=color, width=2)
            draw.text((right - 150, plot_top + 6 + 14 * i), f"-- {label}", fill=color)
    return image
