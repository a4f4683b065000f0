"""The figures: a run's own curves (plot_curves, called by the three scripts after each run) and the pieces the
report's figures are drawn with (report.py). matplotlib only; nothing here trains or measures.
"""
import os

import numpy as np


def pyplot():
    """matplotlib's pyplot, imported on first use (a process that plots nothing saves a second), files only; every
    text at 7 pt or more where a figure 6.6 inches wide is printed across an A4 page."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "legend.fontsize": 7.5, "xtick.labelsize": 7.5,
                         "ytick.labelsize": 7.5, "axes.grid": True, "grid.alpha": 0.3, "svg.hashsalt": "report",
                         "svg.fonttype": "path", "figure.constrained_layout.use": True})
    return plt


def save(fig, path, svg=True):
    """`path`.svg (the report's) and .png; svg=False: a run's own curves, .png alone."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    for ext, kw in ((("svg", {}), ("png", {"dpi": 150})) if svg else (("png", {"dpi": 100}),)):
        fig.savefig(f"{path}.{ext}", **kw)
    pyplot().close(fig)


def band(ax, x, ys, label, seeds=True, **kw):
    """The mean of the seeds' curves `ys`, with a band of +- one standard deviation when there are several (and with
    `seeds`, the legend saying so)."""
    y = np.array(ys, dtype=float)
    mean = y.mean(0)
    line = ax.plot(x, mean, label=label + (f" (mean of {len(y)} seeds)" if seeds and len(y) > 1 else ""),
                   **{"marker": "o", "ms": 2.5} | kw)
    if len(y) > 1:
        sd = y.std(0, ddof=1)
        ax.fill_between(x, mean - sd, mean + sd, color=line[0].get_color(), alpha=0.2, lw=0)


def integer_epochs(*axes):
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


SPLITS = {"train": "training", "test": "test", "old_train": "old task (CIFAR-10), training",
          "old_test": "old task (CIFAR-10), test"}


def label_points(fig, ax):
    """Each label of `ax` (its annotations) to the first place near its point that covers no point, no line or error bar
    of `ax`, no earlier label, and stays inside the axes (as saved)."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox
    fig.canvas.draw()
    extent = Text.get_window_extent  # of the text alone, not of its leader line
    labels, places = list(ax.texts), [((7, 0), "left", "center"), ((-7, 0), "right", "center"), ((0, 6), "center", "bottom"),
                                      ((0, -6), "center", "top"), *(((x, y), h, "center") for y in (9, -9, 17, -17, 26, -26, 36, -36)
                                                                    for x, h in ((7, "left"), (-7, "right")))]
    taken = [Bbox.from_extents(*(xy := ax.transData.transform(t.xy)) - 5, *xy + 5) for t in labels]  # the points
    paths = [line.get_xydata() for line in ax.lines] + [seg for c in ax.collections if hasattr(c, "get_segments")
                                                          for seg in c.get_segments()]  # lines, and error bars
    for path in paths:  # every few pixels along each
        xy = ax.transData.transform(path)
        for a, b in zip(xy, xy[1:]):
            taken += [Bbox.from_extents(*p - 2, *p + 2) for p in np.linspace(a, b, max(2, int(np.hypot(*(b - a)) / 4)))]
    for i, t in enumerate(labels):
        first = (t.xyann, t.get_ha(), "center")
        for xy, ha, va in [first, *places]:
            t.xyann = xy
            t.set_ha(ha)
            t.set_va(va)
            box = extent(t)
            if ax.bbox.contains(box.x0, box.y0) and ax.bbox.contains(box.x1, box.y1) and not any(
                    box.overlaps(u) for u in [*taken, *(extent(u) for u in labels[:i])]):
                break
        else:  # nowhere free: where it was asked to be
            t.xyann = first[0]
            t.set_ha(first[1])
            t.set_va(first[2])


def plot_curves(rows, path, loss_label="loss", acc_splits=("train", "test"), height=2.0, svg=False, stage=None,
                names=SPLITS, width=6.6, seeds=True):
    """Loss and accuracy of each split of `acc_splits` (those the histories hold) against epoch from epoch 0 (before
    training), side by side, a row per (title, [the history of each seed]): the mean of the seeds with a band of +- one
    standard deviation; a loss spanning more than 10x on a log scale; one legend under the figure; `stage`: the last
    epoch of a first stage, marked by a dotted line, one per row (None: no line); `width` in inches, as printed;
    `seeds`: the legend says how many (else the caption does).
    Writes path.png (and with `svg`, path.svg)."""
    fig, axes = pyplot().subplots(len(rows), 2, figsize=(width, height * len(rows) + 0.45), squeeze=False, sharex=True)
    for (title, hs), (a, b), stage in zip(rows, axes, stage or [None] * len(rows)):
        epochs = [r["epoch"] for r in hs[0]]
        for i, split in enumerate(acc_splits):
            for ax, key in ((a, f"{split}_loss"), (b, f"{split}_acc")):
                if all(key in r for h in hs for r in h):
                    band(ax, epochs, [[r[key] for r in h] for h in hs], names[split], seeds, color=f"C{i}")
        losses = [r[f"{s}_loss"] for h in hs for r in h for s in acc_splits if f"{s}_loss" in r]
        a.set(ylabel=loss_label, title=f"{title}(a) loss", yscale="log" if 0 < min(losses) < max(losses) / 10 else "linear")
        for axis in (a.yaxis.set_major_formatter, a.yaxis.set_minor_formatter) if a.get_yscale() == "log" else ():
            axis(pyplot().FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "125" else ""))  # 0.5, not 5×10⁻¹
        b.set(ylabel="accuracy (%)", title=f"{title}(b) accuracy")
        for ax in (a, b) if stage else ():
            ax.axvline(stage, color="0.4", ls=":", lw=1)
        integer_epochs(a, b)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    handles, labels = axes[0][1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels) if len(labels) < 3 else 2,
               frameon=False)
    save(fig, path, svg)
