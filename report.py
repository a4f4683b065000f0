"""Gathers every table and figure of the assignment, in its order, into out/report.md and out/report.pdf
(matplotlib only: one page per table or figure). A part that is not there is listed as missing, with
the command that makes it; nothing is invented.
"""
import os
import subprocess
import textwrap

import matplotlib.pyplot as plt
from matplotlib.backends.backend_pdf import PdfPages

from common import Parser, file_sha256, read_json, run
from q1b_kd import TABLE, name
from q2_continual import METHODS


def sections():
    """The assignment's order: (heading, [(kind, path under out/, caption, command)])."""
    fig, tab = "figure", "table"
    q1a = [(tab, "tables/teacher_setup.md", "", "make teacher"),
           (tab, "tables/teacher_changes.md", "", "make teacher"),
           (fig, "teacher/loss.png", "Teacher: training and test loss vs epoch", "make teacher"),
           (fig, "teacher/accuracy.png", "Teacher: training and test accuracy vs epoch", "make teacher"),
           (tab, "tables/teacher_accuracy.md", "", "make teacher")]
    q1b = [(tab, "tables/kd_setup.md", "", "make kd-table")]
    for label, T, lam in TABLE:
        run = f"kd/{name(T, lam)}"
        q1b += [(fig, f"{run}/loss.png", f"{label}: training and test loss vs epoch", "make kd-table"),
                (fig, f"{run}/accuracy.png", f"{label}: accuracy vs epoch", "make kd-table")]
    q1b += [(fig, "kd/table/test_accuracy.png", "Every student's test accuracy vs epoch", "make kd-table"),
            (tab, "tables/kd_table.md", "", "make kd-table"),
            (tab, "tables/kd_sweep.md", "", "make kd-sweep"),
            (fig, "kd/sweep_heatmap.png", "Bonus sweep: student test accuracy over T and λ", "make kd-sweep")]
    q2 = [(tab, "tables/continual_setup.md", "", "make continual")]
    for m, label in METHODS.items():
        q2 += [(tab, "tables/finetune_layers.md", "", "make ft")] if m == "ft" else []
        q2 += [(tab, "tables/lwf_setup.md", "", "make lwf")] if m == "lwf" else []
        q2 += [(fig, f"continual/{m}/loss.png", f"{label}: new task, training and test loss vs epoch", f"make {m}"),
               (fig, f"continual/{m}/accuracy.png", f"{label}: new task, training and test accuracy vs epoch", f"make {m}")]
    q2 += [(fig, "continual/forgetting.png", "Old task (CIFAR-10 test accuracy) per epoch, all methods", "make continual"),
           (tab, "tables/continual_table.md", "", "make continual")]
    return [("Question 1, part A: the teacher", q1a), ("Question 1, part B: the student and knowledge distillation", q1b),
            ("Question 2: continual learning", q2)]


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
    cfg_path = os.path.join(out, os.path.dirname(path), "config.json")
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


def text_table(rows, width=118):
    """Aligned monospace lines of a table, long cells wrapped within their column."""
    n = len(rows[0])
    natural = [max(len(r[i]) for r in rows) for i in range(n)]
    widths = [min(w, max(10, (width - 3 * n) // n)) for w in natural]
    spare = width - 3 * n - sum(widths)
    for i in sorted(range(n), key=lambda i: natural[i] - widths[i], reverse=True):  # to the columns cut most
        extra = max(0, min(spare, natural[i] - widths[i]))
        widths[i], spare = widths[i] + extra, spare - extra
    out = []
    for k, row in enumerate(rows):
        cells = [textwrap.wrap(c.replace("**", ""), w) or [""] for c, w in zip(row, widths)]
        for line in range(max(map(len, cells))):
            out.append(" | ".join((c[line] if line < len(c) else "").ljust(w) for c, w in zip(cells, widths)))
        if k == 0:
            out.append("-+-".join("-" * w for w in widths))
    return out


def pdf_text_page(pdf, title, lines):
    for start in range(0, max(1, len(lines)), 64):
        fig = plt.figure(figsize=(11.69, 8.27))  # A4 landscape
        fig.text(0.04, 0.95, title, fontsize=13, weight="bold", va="top")
        fig.text(0.04, 0.90, "\n".join(lines[start:start + 64]), family="monospace", fontsize=7.5, va="top")
        pdf.savefig(fig)
        plt.close(fig)


def pdf_figure_page(pdf, heading, image, caption):
    fig = plt.figure(figsize=(11.69, 8.27))
    fig.text(0.04, 0.96, heading, fontsize=11, color="0.4", va="top")
    ax = fig.add_axes((0.1, 0.12, 0.8, 0.78))
    ax.imshow(plt.imread(image))
    ax.axis("off")
    fig.text(0.5, 0.05, "\n".join(textwrap.wrap(caption, 140)), ha="center", fontsize=9)
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
        pdf_text_page(pdf, "Assignment 2: knowledge distillation and continual learning",
                      [f"Report of the runs under {os.path.abspath(out)}/.", *textwrap.wrap(prov, 150), "",
                       "Question 1, part A: the teacher", "Question 1, part B: the student and knowledge distillation",
                       "Question 2: continual learning"])
        for heading, items in sections():
            md += [f"## {heading}", ""]
            for kind, path, caption, command in items:
                full = os.path.join(out, path)
                if not os.path.exists(full):
                    md += [f"*Missing: `{path}` (run `{command}`).*", ""]
                    missing.append(f"{path}  (run `{command}`)")
                elif kind == "table":
                    text = open(full).read()
                    md += [text, ""]
                    title, rows, notes = parse_table(text)
                    pdf_text_page(pdf, title, text_table(rows, width=160) + [""] + [w for n in notes for w in textwrap.wrap(n, 160)])
                else:
                    cfg = run_config(out, path)
                    full_caption = f"{caption}. Run `{os.path.dirname(path)}`" + (f": {cfg}." if cfg else ".")
                    md += [f"![{caption}]({path})", "", f"*Figure: {full_caption}*", ""]
                    pdf_figure_page(pdf, heading, full, full_caption.replace("`", ""))
        if missing:
            md += ["## Missing", ""] + [f"- `{m}`" for m in missing] + [""]
            pdf_text_page(pdf, "Missing parts", missing)
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
