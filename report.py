"""Gathers every table and figure of the assignment, in its order, into out/report.md and out/report.pdf
(matplotlib only): a run's curves side by side on one page, tables drawn as tables, and the
Observations of Q1 and Q2 beside their tables, computed from the per-seed numbers under out/ only.
A part that is not there is listed as missing, with the command that makes it; nothing is invented.
"""
import csv
import math
import os
import re
import subprocess
import textwrap

import matplotlib.pyplot as plt
from matplotlib.backends.backend_pdf import PdfPages

from common import Parser, file_sha256, read_json, run
from q1b_kd import TABLE, name
from q2_continual import METHODS

A4 = (11.69, 8.27)  # landscape, inches


def sections():
    """The assignment's order: (heading, [(kind, paths, caption, command)]); kind is 'table' (one path,
    with the observations of that table if any), 'optional' (a table that make all does not make: left out
    when absent) or 'figures' (drawn side by side on one page)."""
    q1a = [("table", ["tables/teacher_setup.md"], "", "make teacher"),
           ("table", ["tables/teacher_changes.md"], "", "make teacher"),
           ("figures", ["teacher/loss.png", "teacher/accuracy.png"], "Teacher: training and test loss and accuracy vs epoch",
            "make teacher"),
           ("table", ["tables/teacher_accuracy.md"], "", "make teacher")]
    q1b = [("table", ["tables/kd_setup.md"], "", "make kd-table")]
    for label, T, lam in TABLE:
        q1b.append(("figures", [f"kd/table/{name(T, lam)}_loss.png", f"kd/table/{name(T, lam)}_accuracy.png"],
                    f"{label}" + (f", T = {T:g}" if lam else "") + ": training and test loss and accuracy vs epoch",
                    "make kd-table"))
    q1b += [("figures", ["kd/table/test_accuracy.png", "kd/table/test_ce.png"],
             "Every student: test accuracy and test cross-entropy with the labels vs epoch", "make kd-table"),
            ("table", ["tables/kd_table.md"], "", "make kd-table"),
            ("table", ["tables/kd_sweep.md"], "", "make kd-sweep"),
            ("figures", ["kd/sweep_heatmap.png"], "Bonus sweep: student test accuracy over T and λ", "make kd-sweep")]
    q2 = [("table", ["tables/continual_setup.md"], "", "make continual")]
    for m, label in METHODS.items():
        q2 += [("table", ["tables/finetune_layers.md"], "", "make ft")] if m == "ft" else []
        q2 += [("table", ["tables/lwf_setup.md"], "", "make lwf")] if m == "lwf" else []
        q2.append(("figures", [f"continual/{m}_loss.png", f"continual/{m}_accuracy.png"],
                   f"{label}: new task (faces), training and test loss and accuracy vs epoch", f"make {m}"))
    q2 += [("figures", ["continual/forgetting.png", "continual/tradeoff.png"],
            "Old task (CIFAR-10 test accuracy) per epoch, and old against new task at the end, every method",
            "make continual"),
           ("table", ["tables/continual_table.md"], "", "make continual"),
           ("optional", ["tables/lwf_sweep.md"], "", "make lwf-sweep")]
    return [("Question 1, part A: the teacher", q1a), ("Question 1, part B: the student and knowledge distillation", q1b),
            ("Question 2: continual learning", q2)]


# ----------------------------------------------------------------------------- observations, from out/ only

def read_csv(out, table):
    path = os.path.join(out, "tables", f"{table}.csv")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return list(csv.DictReader(f))


def stats(values):
    """(mean, sample variance or None for one value, n)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else None), n


def verdict(a, b, what):
    """'<what>: better by 1.20 ± 0.40 points' (difference of means ± its standard error over seeds), or
    'within noise' when the difference is under two standard errors. a, b: per-seed values."""
    (ma, va, na), (mb, vb, nb) = stats(a), stats(b)
    d = ma - mb
    if va is None and vb is None:
        return f"{what}: {d:+.2f} points from one seed each, so no spread to judge it by (SEEDS=3 gives one)"
    se = math.sqrt((va or 0) / na + (vb or 0) / nb)
    seeds = f"n = {na} and {nb}" if vb is not None and va is not None else f"n = {max(na, nb)}, against one run"
    if abs(d) < 2 * se:
        return f"{what}: within noise ({d:+.2f} ± {se:.2f} points, {seeds})"
    return f"{what}: {'better' if d > 0 else 'worse'} by {abs(d):.2f} ± {se:.2f} points ({seeds})"


def q1_observations(out):
    rows = read_csv(out, "kd_table")
    if not rows:
        return []
    acc = {}
    for r in rows:
        if not r["diverged"]:
            acc.setdefault(r["model"], []).append(float(r["test_acc"]))
    labels = {label: (T, lam) for label, T, lam in TABLE}
    base, teacher = TABLE[0][0], acc.get("Teacher Network (Part A)")
    named = {label: label + (f" (T = {T:g}, λ = {lam:g})" if label.startswith("KD") else f", T = {T:g},")
             for label, T, lam in TABLE}
    obs = [verdict(acc[label], acc[base], f"{named[label]} against λ = 0, test accuracy")
           for label, *_ in TABLE[1:] if label in acc and base in acc]
    kd = [(label, T) for label, T, lam in TABLE if lam == 0.1 and label in acc]
    obs += [verdict(acc[b], acc[a], f"effect of T at λ = 0.1: T = {tb:g} against T = {ta:g}")
            for (a, ta), (b, tb) in zip(kd, kd[1:])]
    students = {label: v for label, v in acc.items() if label in labels}
    if teacher and students:
        best = max(students, key=lambda k: sum(students[k]) / len(students[k]))
        obs.append(verdict(students[best], teacher, f"teacher-student gap: the best student of the table ({best}) "
                                                    "against the teacher"))
    sweep = read_csv(out, "kd_sweep")
    if teacher and sweep:
        cells = {}
        for r in sweep:
            if not r["diverged"]:
                cells.setdefault((float(r["T"]), float(r["lam"])), []).append(float(r["test_acc"]))
        if cells:
            (T, lam), v = max(cells.items(), key=lambda kv: sum(kv[1]) / len(kv[1]))
            obs.append(verdict(v, teacher, f"the best sweep cell (T = {T:g}, λ = {lam:g}) against the teacher"))
    return obs


def q2_observations(out):
    rows = read_csv(out, "continual_table")
    if not rows:
        return []
    runs = {}
    for r in rows:
        runs.setdefault(r["method"], []).append({k: float(v) for k, v in r.items() if k not in ("method", "seed")})
    obs = []
    for method, rs in runs.items():
        drop = [r["old_test_acc_before"] - r["old_test_acc"] for r in rs]
        (md, vd, n), (mn, vn, _) = stats(drop), stats([r["new_test_acc"] for r in rs])
        sd = lambda v: f" ± {math.sqrt(v):.2f}" if v is not None else ""  # noqa: E731
        obs.append(f"{method}: the old task drops by {md:.2f}{sd(vd)} points while the new task reaches {mn:.2f}{sd(vn)}% "
                   f"(test, n = {n})")
    for b, a in (("LwF", "Fine Tuning"), ("LwF", METHODS["ft-all"]), (METHODS["joint"], "LwF")):
        if a in runs and b in runs:
            for task in ("old", "new"):
                obs.append(verdict([r[f"{task}_test_acc"] for r in runs[b]], [r[f"{task}_test_acc"] for r in runs[a]],
                                   f"{task} task ({'kept' if task == 'old' else 'learnt'}), {b} against {a}"))
    return obs


OBSERVATIONS = {"tables/kd_table.md": q1_observations, "tables/continual_table.md": q2_observations}


# ----------------------------------------------------------------------------- the report

def provenance(out):
    """Which teacher (sha256 of its weights) and which code (git commit) made these results."""
    teacher = os.path.join(out, "teacher", "model.pt")
    sha = file_sha256(teacher) if os.path.exists(teacher) else "missing (make teacher)"
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown (not a git checkout)"
    return f"Teacher weights: sha256 {sha}. Code: git commit {commit}."


def run_config(out, path):
    """'key=value, ...' of the run that made a figure (its folder's config.json)."""
    m = re.fullmatch(r"(?:continual|kd/table)/(.+)_(?:loss|accuracy)\.png", path)  # a run's curves over its seeds
    folder = os.path.join("kd" if path.startswith("kd") else "continual", m[1]) if m else os.path.dirname(path)
    cfg_path = os.path.join(out, folder, "config.json")
    if not os.path.exists(cfg_path):
        return ""
    cfg = read_json(cfg_path)
    keys = ("method", "T", "lam", "epochs", "lr", "batch", "pretrained", "bn", "dropout", "ft_layers", "lwf_lr",
            "lwf_T", "lwf_lambda", "lwf_warmup", "seed")
    return ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def parse_table(text):
    """A table file written by common.write_table -> (title, header + rows, note lines)."""
    lines = text.strip().splitlines()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines
            if line.startswith("|") and not line.startswith("|---")]
    notes = [line for line in lines[1:] if line.strip() and not line.startswith("|")]
    return lines[0].lstrip("# "), rows, notes


def column_widths(rows, width):
    """Characters per column: natural widths, the longest cut first so that the table fits `width`."""
    n = len(rows[0])
    natural = [max(len(r[i].replace("**", "")) for r in rows) for i in range(n)]
    widths = [min(w, max(10, width // n)) for w in natural]
    spare = width - sum(widths)
    for i in sorted(range(n), key=lambda i: natural[i] - widths[i], reverse=True):
        extra = max(0, min(spare, natural[i] - widths[i]))
        widths[i], spare = widths[i] + extra, spare - extra
    return widths


def text_table(rows, width=118):
    """Aligned monospace lines of a table (the terminal summary), long cells wrapped within their column."""
    widths = column_widths(rows, width - 3 * len(rows[0]))
    out = []
    for k, row in enumerate(rows):
        cells = [textwrap.wrap(c.replace("**", ""), w) or [""] for c, w in zip(row, widths)]
        for line in range(max(map(len, cells))):
            out.append(" | ".join((c[line] if line < len(c) else "").ljust(w) for c, w in zip(cells, widths)))
        if k == 0:
            out.append("-+-".join("-" * w for w in widths))
    return out


def pdf_table_page(pdf, heading, title, rows, notes, observations):
    """A table drawn as a table (wrapped cells, header shaded, 9 pt), its notes, then its observations."""
    fig = plt.figure(figsize=A4)
    fig.text(0.04, 0.96, heading, fontsize=10, color="0.4", va="top")
    fig.text(0.04, 0.92, title, fontsize=13, weight="bold", va="top")
    widths = column_widths(rows, 150)
    plain = lambda c: re.sub(r"^\*(.+)\*$", r"\1", c.replace("**", ""))  # noqa: E731  (Markdown emphasis)
    cells = [["\n".join(textwrap.wrap(plain(c), w) or [""]) for c, w in zip(r, widths)] for r in rows]
    lines = [max(c.count("\n") + 1 for c in r) for r in cells]
    line_h = 0.024  # figure fraction per text line at 9 pt
    height = line_h * (sum(lines) + len(lines) * 0.6)
    ax = fig.add_axes((0.04, 0.88 - height, 0.92, height))
    ax.axis("off")
    table = ax.table(cellText=cells[1:], colLabels=cells[0], colWidths=[w / sum(widths) for w in widths],
                     cellLoc="left", loc="upper left", bbox=(0, 0, 1, 1))
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for (r, _), cell in table.get_celld().items():
        cell.set_height((lines[r] + 0.6) / (sum(lines) + len(lines) * 0.6))
        cell.set_edgecolor("0.75")
        if r == 0:
            cell.set_facecolor("0.92")
            cell.set_text_props(weight="bold")
    text = [w for n in notes for w in textwrap.wrap(n.replace("\\*", "*"), 170)]
    if observations:
        text += ["", "Observations (computed from the runs under out/):"] + \
                [w for o in observations for w in textwrap.wrap(o, 165, initial_indent="- ", subsequent_indent="  ")]
    fig.text(0.04, 0.86 - height, "\n".join(text), fontsize=9, va="top")
    pdf.savefig(fig)
    plt.close(fig)


def pdf_figures_page(pdf, heading, images, caption):
    """One or two figures side by side, with their caption."""
    fig = plt.figure(figsize=A4)
    fig.text(0.04, 0.96, heading, fontsize=10, color="0.4", va="top")
    for k, image in enumerate(images):
        w = 0.92 / len(images)
        ax = fig.add_axes((0.04 + k * w, 0.14, w, 0.78))
        ax.imshow(plt.imread(image))
        ax.axis("off")
    fig.text(0.5, 0.07, "\n".join(textwrap.wrap(caption, 150)), ha="center", fontsize=10)
    pdf.savefig(fig)
    plt.close(fig)


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--out", default="out")
    args = p.parse_args(argv)
    out = args.out
    prov = provenance(out)
    md, missing = ["# Assignment 2: knowledge distillation and continual learning", "",
                   f"Every table and figure below was written by a run under `{out}/`; "
                   "each figure's caption names the run and its configuration.", "", prov, ""], []
    with PdfPages(os.path.join(out, "report.pdf") + ".tmp") as pdf:
        fig = plt.figure(figsize=A4)
        fig.text(0.04, 0.9, "Assignment 2: knowledge distillation and continual learning", fontsize=18, weight="bold")
        fig.text(0.04, 0.8, "\n".join([f"Report of the runs under {os.path.abspath(out)}/.", *textwrap.wrap(prov, 120), ""]
                                      + [h for h, _ in sections()]), fontsize=11, va="top")
        pdf.savefig(fig)
        plt.close(fig)
        for heading, items in sections():
            md += [f"## {heading}", ""]
            for kind, paths, caption, command in items:
                absent = [p for p in paths if not os.path.exists(os.path.join(out, p))]
                if absent and kind == "optional":  # a bonus that make all does not run
                    continue
                if absent:
                    md += [f"*Missing: `{p}` (run `{command}`).*" for p in absent] + [""]
                    missing += [f"{p}  (run `{command}`)" for p in absent]
                elif kind in ("table", "optional"):
                    text = open(os.path.join(out, paths[0])).read()
                    obs = OBSERVATIONS.get(paths[0], lambda out: [])(out)
                    md += [text] + (["**Observations** (computed from the runs under out/):", ""]
                                    + [f"- {o}" for o in obs] + [""] if obs else [""])
                    pdf_table_page(pdf, heading, *parse_table(text), obs)
                else:
                    cfg = run_config(out, paths[0])
                    full = caption + (f". Run configuration: {cfg}." if cfg else ".")
                    md += [f"![{caption}]({p})" for p in paths] + ["", f"*Figure: {full}*", ""]
                    pdf_figures_page(pdf, heading, [os.path.join(out, p) for p in paths], full.replace("`", ""))
        if missing:
            md += ["## Missing", ""] + [f"- `{m}`" for m in missing] + [""]
            pdf_table_page(pdf, "", "Missing parts", [["part", "made by"]] + [m.split("  ") for m in missing], [], [])
    os.replace(os.path.join(out, "report.pdf") + ".tmp", os.path.join(out, "report.pdf"))
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(md))
    print(f"\n== report: {out}/report.md and {out}/report.pdf" + (f" ({len(missing)} parts missing)" if missing else ""))
    for table in ("teacher_accuracy", "kd_table", "kd_sweep", "continual_table"):
        path = os.path.join(out, "tables", f"{table}.md")
        if os.path.exists(path):
            title, rows, notes = parse_table(open(path).read())
            print(f"\n{title}\n" + "\n".join(text_table(rows)) + ("\n" + notes[0] if notes else ""))


if __name__ == "__main__":
    run(main)
