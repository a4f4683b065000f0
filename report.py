"""make report: the hand-in, from what the runs under out/ recorded (config.json, history.json,
result.json) and nothing else. Every table's wording, every figure of more than one run and every
observation of the assignment is made here:

  out/report.typ   the report's Typst source: edit it freely (once edited, make report leaves it alone)
  out/report.pdf   compiled from it by the PyPI package typst: A4, the code in an appendix
  out/report.md    the same for reading on the web (PNG figures)
  out/tables/      every table in Markdown, LaTeX (booktabs) and, with the per-seed numbers, CSV
  out/figures/     every figure as SVG (the PDF's) and PNG (the Markdown's)

A part that has not been run yet is named with the command that makes it.
"""
import ast
import csv
import hashlib
import inspect
import io
import math
import os
import re
import shutil
import subprocess
import textwrap

import torch

import common
import q1a_teacher as q1a
import q1b_kd as q1b
import q2_continual as q2
from common import Parser, die, file_sha256, pct, pyplot, read_json, run, stride_changes

HERE = os.path.dirname(os.path.abspath(__file__))
COURSE = "EEE7331-01 Special Topics in Deep Learning, 2022 Autumn"
TITLE = "Assignment 2: Knowledge Distillation and Continual Learning"
APPENDIX = ["q1a_teacher.py", "q1b_kd.py", "q2_continual.py", "common.py", "Makefile"]
STUDENT_PARAMS = sum(q.numel() for q in common.StudentCNN().parameters())  # counted, not written down
TEACHER_PARAMS = sum(q.numel() for q in common.teacher_resnet18(pretrained=False).parameters())

# =============================================================================
# The runs, as they recorded themselves
# =============================================================================


def load(folder):
    """A finished run: {'config', 'history', 'result'}, or None."""
    if not os.path.exists(os.path.join(folder, "result.json")):
        return None
    return {k: read_json(os.path.join(folder, f"{k}.json")) for k in ("config", "history", "result")}


def seeds(folder):
    """Every finished seed of a run: folder, folder_seed1, folder_seed2, ... (up to the first missing one)."""
    runs = []
    while run_ := load(folder + (f"_seed{len(runs)}" if runs else "")):
        runs.append(run_)
    return runs


def gather(out):
    """Everything the report is made of: the teacher, the KD table's students, the sweep, the Q2 methods
    and the LwF λo sweep, each a list of its seeds' runs (empty when not run)."""
    kd, cl = os.path.join(out, "kd"), os.path.join(out, "continual")
    g = {"out": out, "teacher": load(os.path.join(out, "teacher")),
         "students": {label: seeds(os.path.join(kd, q1b.name(T, lam))) for label, T, lam in q1b.TABLE},
         "methods": {m: seeds(os.path.join(cl, m)) for m in q2.METHODS}, "sweep": None, "lwf_sweep": {}}
    if os.path.exists(os.path.join(kd, "sweep.json")):
        grid = read_json(os.path.join(kd, "sweep.json"))
        g["sweep"] = {"grid": grid, "cells": {(T, lam): seeds(os.path.join(kd, q1b.name(T if lam else 1.0, lam)))
                                              for T in grid["T"] for lam in grid["lam"]}}
    lams = sorted(float(d[len("lwf_lam"):]) for d in (os.listdir(cl) if os.path.isdir(cl) else [])
                  if re.fullmatch(r"lwf_lam[0-9.e+-]+", d))
    if lams and g["methods"]["lwf"]:
        g["lwf_sweep"] = {v: seeds(os.path.join(cl, f"lwf_lam{v:g}")) for v in lams}
        g["lwf_sweep"][g["methods"]["lwf"][0]["config"]["lwf_lambda"]] = g["methods"]["lwf"]
        g["lwf_sweep"] = {v: r for v, r in sorted(g["lwf_sweep"].items()) if r}
    return g


# =============================================================================
# Numbers with their uncertainty
# =============================================================================


def stats(values):
    """(mean, sample standard deviation or None for one value, n)."""
    n, mean = len(values), sum(values) / len(values)
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None), n


def mean_sd(values):
    """'72.31 ± 0.45' (mean ± sample standard deviation over seeds); one value alone: '72.31'."""
    m, sd, _ = stats(values)
    return pct(m) if sd is None else f"{pct(m)} ± {pct(sd)}"


def cells(runs, keys):
    """Table cells of a run's seeds for `keys` of their results; a run that diverged says so."""
    bad = [r["result"]["diverged"] for r in runs if "diverged" in r["result"]]
    if bad:
        return [bad[0] if len(runs) == 1 else f"{len(bad)} of {len(runs)} seeds diverged ({bad[0]})"] * len(keys)
    return [mean_sd([r["result"][k] for r in runs]) for k in keys]


def difference(a, b):
    """(mean of a - mean of b, its standard error or None): a, b per-seed values; a single value is a
    fixed reference (the one teacher), whose spread is not part of the error."""
    (ma, sa, na), (mb, sb, nb) = stats(a), stats(b)
    if sa is None and sb is None:
        return ma - mb, None
    return ma - mb, math.sqrt((sa or 0) ** 2 / na + (sb or 0) ** 2 / nb)


def compared(a, b):
    """A difference as the report words it: '+2.00 ± 0.50 points, more than two standard errors', '... within
    noise' under two, or '+2.00 points' from one seed each (the section says that it cannot be judged)."""
    d, se = difference(a, b)
    if se is None:
        return f"{d:+.2f} points"
    return f"{d:+.2f} ± {se:.2f} points, " + ("within noise" if abs(d) < 2 * se else "more than two standard errors")


def accs(runs, key="test_acc"):
    return [r["result"][key] for r in runs if "diverged" not in r["result"]]


def noise_note(n, n_test, p=0.6):
    """What one seed or n seeds let a reader conclude, said once per section."""
    if n > 1:
        return (f"Each number is the mean ± standard deviation over {n} seeds; each difference is given ± its "
                "standard error, and called within noise when it is under two standard errors.")
    se = 100 * math.sqrt(p * (1 - p) / n_test)
    return (f"Each run was made with one seed, so differences between runs cannot be judged against seed-to-seed "
            f"noise. For scale: on {n_test:,} test images, one binomial standard error of an accuracy near "
            f"{100 * p:.0f}% is {se:.1f} points.")


# =============================================================================
# Tables: their wording, and out/tables/*.md, .tex, .csv
# =============================================================================

RULE = ["---"]  # a row that is a rule between two parts of a table
PRECISION = {"fp32": "32-bit floating point", "bf16": "bfloat16 mixed precision (autocast), 32-bit weights",
             "fp16": "float16 mixed precision (autocast) with loss scaling, 32-bit weights"}


def table(name, label, caption, header, rows, note="", csv_rows=None, widths=None):
    """A table of the report, written to out/tables/<name>.{md,tex,csv} too."""
    return {"kind": "table", "name": name, "label": label, "caption": caption, "header": header, "rows": rows,
            "note": note, "csv": csv_rows, "widths": widths}


def schedule(cfg):
    peak, w = cfg["lr"], cfg.get("warmup", 0)
    warm = f"linear warm-up from 0 to {peak:g} over the first {w} epoch{'s' * (w != 1)}, then " if w else f"from {peak:g}, "
    return warm + "cosine decay to 0, updated after every step"


def steps(teacher, batch):
    """SGD steps per epoch at `batch` on the teacher's training set (the last incomplete batch dropped)."""
    return max(1, teacher["result"].get("train_images", 50000) // batch)


def cifar_source(teacher):
    """"official", "synthetic" (the demo's images) or "other" (real images, not the official files)."""
    r = teacher["result"]
    return r.get("cifar10_source") or ("official" if r.get("cifar10_official", True) else "synthetic")


def data_words(teacher):
    r, source = teacher["result"], cifar_source(teacher)
    sizes = f"{r.get('train_images', 50000):,} training and {r.get('test_images', 10000):,} test images"
    return {"official": f"CIFAR-10: {sizes}", "other": f"CIFAR-10 images, not the official files: {sizes}",
            "synthetic": f"a synthetic substitute for CIFAR-10 (not the real images): {sizes}"}[source]


def seeds_words(runs):
    first = runs[0]["config"]["seed"]
    if len(runs) == 1:
        return f"one (seed {first})"
    return (f"{len(runs)} (seeds {first}-{first + len(runs) - 1}), each changing the initial weights, the data order "
            "and the augmentation; one teacher")


def teacher_tables(t):
    cfg, r = t["config"], t["result"]
    changes = stride_changes(32)
    init = ("ImageNet weights (torchvision IMAGENET1K_V1) for every convolution and BatchNorm"
            if cfg["pretrained"] else "random (PyTorch's default initialisation; no ImageNet weights)")
    setup = [["Data", data_words(t)],
             ["Pre-processing", "32×32×3 images as they are (no resize), scaled to [0, 1] and normalised with the "
                                "ImageNet mean and standard deviation"],
             ["Augmentation", "random 32×32 crop of the image padded with 4 pixels of zeros, horizontal flip with "
                              "probability 0.5"],
             ["Initialisation", init + "; the new 512→10 fully connected layer: PyTorch's default"],
             ["Layers trained", "all: the 17 convolutions and their BatchNorms fine-tuned, the fully connected layer "
                                "from scratch"],
             ["Loss", "cross-entropy" + (f", label smoothing {cfg['label_smoothing']:g}" if cfg["label_smoothing"] else "")],
             ["Optimiser", f"SGD, Nesterov momentum {cfg['momentum']:g}"],
             ["Learning-rate schedule", schedule(cfg)],
             ["First fully connected layer", f"{cfg.get('fc1_lr', 100):g}% of the learning rate (its 93,312 inputs "
                                             "make it the sharpest direction of the loss)"
                                             if cfg.get("fc1_lr", 100) != 100 else "the same learning rate"],
             ["Weight decay (L2)", f"{cfg['wd']:g}"],
             ["Dropout", "none (ResNet18 has none)"],
             ["Batch size", f"{cfg['batch']} ({steps(t, cfg['batch'])} steps per epoch)"],
             ["Epochs", f"{cfg['epochs']}"],
             ["Precision", PRECISION[cfg.get("precision", "fp32")]], ["Seed", f"{cfg['seed']}"],
             ["Training accuracy and loss", "after every epoch, in evaluation mode on the un-augmented training "
                                            "images, so that they compare with the test set's"]]
    times = lambda c: re.sub(r"(?<=\d)x(?=\d)", "×", c or "")  # noqa: E731
    rows = [[times(c) for i, c in enumerate(r) if i != 1] for r in changes if r[2]]
    rows += [RULE] + [[times(r[0]), "", "", "", times(r[5]), times(r[6])] for r in changes
                      if not r[2] and r[1].startswith("layer")]  # conv1's and the pool's are in the rows above
    return [
        table("teacher_changes", "tab-changes", "Changes to ResNet18 for 32×32 inputs: the layers whose stride "
              "changed, then each stage's output (H×W×C, measured by running both networks on a 32×32×3 input).",
              ["Layer", "Kernel", "Original", "New", "Output before", "Output after"], rows),
        table("teacher_setup", "tab-teacher-setup", "Teacher: training setup.", ["Item", "Setting"], setup,
              widths=("auto", "1fr")),
        table("teacher_accuracy", "tab-teacher-acc", f"Teacher: final accuracy (epoch {r['epochs']}, the last "
              "points of the curves).", ["Training Accuracy (%)", "Testing Accuracy (%)"],
              [[pct(r["train_acc"]), pct(r["test_acc"])]]),
    ]


def student_layers(bn):
    """(stage, layer, output H×W×C, parameters) of the student, measured by running it on a 32×32×3 input."""
    model, rows, x = common.StudentCNN(bn=bn).eval(), [], torch.zeros(1, 3, 32, 32)
    stage, params = 0, 0
    with torch.no_grad():
        for m in model.features:
            x = m(x)
            params += sum(q.numel() for q in m.parameters())
            if isinstance(m, torch.nn.Conv2d):
                stage += 1
                k, c, size = m.kernel_size[0], m.out_channels, f"{x.shape[2]}×{x.shape[3]}×{x.shape[1]}"
                text = f"conv {k}×{k}, {c} filters, stride {m.stride[0]}, pad {m.padding[0]}, ReLU" + (" (BatchNorm before it)" if bn else "")
            if isinstance(m, torch.nn.MaxPool2d):
                rows.append([f"{stage}", text, size, f"{params:,}"])
                rows.append(["", f"max-pool {m.kernel_size}×{m.kernel_size}, stride {m.stride}, pad {m.padding}",
                             f"{x.shape[2]}×{x.shape[3]}×{x.shape[1]}", ""])
                params = 0
        fc1, fc2 = model.classifier[0], model.classifier[3]
        rows.append(["4", f"fully connected {fc1.in_features:,}→{fc1.out_features}, ReLU", f"{fc1.out_features}",
                     f"{sum(q.numel() for q in fc1.parameters()):,}"])
        rows.append(["5", f"fully connected {fc2.in_features}→{fc2.out_features}, softmax (in the loss)",
                     f"{fc2.out_features}", f"{sum(q.numel() for q in fc2.parameters()):,}"])
    return rows, sum(q.numel() for q in model.parameters())


def kd_tables(g):
    t, students = g["teacher"], g["students"]
    first = next(runs for runs in students.values() if runs)
    cfg = first[0]["config"]
    layers, n = student_layers(bool(cfg["bn"]))
    setup = [["Architecture", f"as the assignment's table (Table {{ref:tab-student}}): {n:,} parameters"],
             ["Tricks carried over from the teacher", "augmentation (the teacher's crop and flip)" if cfg["augment"] else
              "no augmentation"],
             ["BatchNorm", "after each convolution, as in the teacher" if cfg["bn"] else "none"],
             ["Dropout", f"{cfg['dropout']:g} before the last layer" if cfg["dropout"] else "none, as in the teacher"],
             ["Pre-processing", "as the teacher's"],
             ["Initialisation", "PyTorch's default; the students of one seed start from the same weights"
                                + (", so they differ only in T and λ" if not cfg["clip"] else
                                   ": they differ in T and λ, and in how often the one clip of their gradient norms "
                                   "binds on losses of different T and λ")],
             ["Soft targets", "softmax(t/T) of the teacher's logits t, in evaluation mode and without gradient, on "
                              "the same augmented batch as the student"],
             ["Loss", "λ·T²·CE(softmax(t/T), softmax(s/T)) + (1−λ)·CE(y, softmax(s)); T = 1 at test time"],
             ["Optimiser", f"SGD, Nesterov momentum {cfg['momentum']:g}, weight decay {cfg['wd']:g}"],
             ["Learning-rate schedule", schedule(cfg)],
             ["First fully connected layer", f"{cfg.get('fc1_lr', 100):g}% of the learning rate (its 93,312 inputs "
                                             "make it the sharpest direction of the loss)"
                                             if cfg.get("fc1_lr", 100) != 100 else "the same learning rate"],
             ["Gradient clipping", f"each student's gradient norm clipped to {cfg['clip']:g}" if cfg["clip"] else "none"],
             ["Batch size", f"{cfg['batch']} ({steps(t, cfg['batch'])} steps per epoch)"],
             ["Epochs", f"{cfg['epochs']}"],
             ["Precision", PRECISION[cfg.get("precision", "fp32")]], ["Seeds", seeds_words(first)],
             ["Training", "the five students (and their seeds) side by side on the same batches, one teacher forward "
                          "pass per step for all of them"],
             ["Loss curves", "λ·T²·KL(teacher‖student) + (1−λ)·CE: the loss without the teacher's entropy (a constant, "
                             "so the same gradients), 0 when the student matches teacher and labels"]]
    out = [table("kd_student", "tab-student", "Student network (output sizes measured by running it).",
                 ["Stage", "Layer", "Output", "Parameters"], layers),
           table("kd_setup", "tab-student-setup", "Student: training setup.", ["Item", "Setting"], setup,
                 widths=("auto", "1fr"))]
    rows = [["Teacher Network (Part A)", "-", "-", pct(t["result"]["train_acc"]), pct(t["result"]["test_acc"])]]
    per_seed = [["Teacher Network (Part A)", "", "", "", t["result"]["train_acc"], t["result"]["test_acc"], ""]]
    for label, T, lam in q1b.TABLE:
        runs = students[label]
        rows.append([label, f"{T:g}" if lam else "-", f"{lam:g}",
                     *(cells(runs, ("train_acc", "test_acc")) if runs else ["not run yet (make kd-table)"] * 2)])
        per_seed += [[label, T, lam, r["result"]["seed"], r["result"]["train_acc"], r["result"]["test_acc"],
                      r["result"].get("diverged", "")] for r in runs]
    n = len(first)
    out.append(table("kd_table", "tab-kd", "Knowledge distillation: final accuracy (last epoch; test at T = 1)"
                     + (f", mean ± standard deviation over {n} seeds." if n > 1 else "."),
                     ["Model", "Temperature, T", "λ", "Training Accuracy (%)", "Testing Accuracy (%)"], rows,
                     csv_rows=(["model", "T", "lam", "seed", "train_acc", "test_acc", "diverged"], per_seed)))
    return out


def soft_target_blocks(g):
    """Q1B (1): the teacher's soft targets at the table's temperatures (recorded by q1b_kd.py on the test set)."""
    path = os.path.join(g["out"], "kd", "soft_targets.json")
    if not os.path.exists(path):
        return []
    st = read_json(path)
    temps = [k for k in st if k != "label"]
    rows = [[f"{T}", f"{100 * st[T]['top']:.1f}", f"{100 * st[T]['true']:.1f}", f"{st[T]['entropy']:.2f}"] for T in temps]
    fig, axes = style().subplots(1, len(temps), figsize=(6.6, 1.5), sharey=True)
    for ax, T in zip(axes, temps):
        ax.bar(range(10), st[T]["example"], color=["C1" if c == st["label"] else "C0" for c in range(10)])
        ax.set(title=f"T = {T}", xticks=range(10), xticklabels=[c[:3] for c in common.CIFAR_CLASSES])
        ax.tick_params(axis="x", labelsize=5, rotation=90)
    axes[0].set_ylabel("probability")
    fig.tight_layout()
    save(fig, g["out"], "kd_soft_targets")
    return [table("kd_soft_targets", "tab-soft", "The teacher's soft targets softmax(t/T) on the test set: mean "
                  "probability of its top class and of the true class, and mean entropy as a fraction of the uniform "
                  "distribution's (1 = uniform).", ["T", "Top class (%)", "True class (%)", "Entropy"], rows),
            figure("kd_soft_targets", "fig-soft", "The soft targets of the first test image at each temperature (its "
                   "true class in orange).")]


def best_cell(sweep):
    ok = {k: accs(v) for k, v in sweep["cells"].items() if v and len(accs(v)) == len(v)}
    return max(ok, key=lambda k: stats(ok[k])[0], default=None), ok


def sweep_table(g):
    sweep = g["sweep"]
    grid, (best, ok) = sweep["grid"], best_cell(sweep)
    rows = []
    for T in grid["T"]:
        row = [f"{T:g}"]
        for lam in grid["lam"]:
            runs = sweep["cells"][(T, lam)]
            text = (mean_sd(ok[T, lam]) if (T, lam) in ok else cells(runs, ["test_acc"])[0]) if runs else "not run"
            row.append(f"**{text}**" if (T, lam) == best else text)
        rows.append(row)
    epochs = next(r for v in sweep["cells"].values() for r in v)["result"]["epochs"]
    return table("kd_sweep", "tab-sweep", f"Bonus: student test accuracy (%) over T and λ, {epochs} "
                 f"epoch{'s' * (epochs != 1)} per student" + (f", mean ± standard deviation over {grid['seeds']} seeds" if grid["seeds"] > 1 else "")
                 + "; the best cell in bold.", ["T \\ λ"] + [f"{lam:g}" for lam in grid["lam"]], rows,
                 csv_rows=(["T", "lam", "seed", "test_acc", "diverged"],
                           [[T, lam, r["result"]["seed"], r["result"]["test_acc"], r["result"].get("diverged", "")]
                            for (T, lam), v in sweep["cells"].items() for r in v]))


RESULT_KEYS = ("old_train_acc", "old_test_acc", "new_train_acc", "new_test_acc", "old_train_acc_before",
               "old_test_acc_before")


def q2_tables(g):
    methods = g["methods"]
    ref = next(runs for runs in methods.values() if runs)
    cfg = ref[0]["config"]
    faces = ("DigiFace-1M (synthetic faces, Bae et al. 2023)" if cfg["faces"] == q2.DIGIFACE_URL or
             cfg["faces"].endswith(".zip") else "the face images given for the run")
    ft, lwf = (methods[m][0]["config"] if methods[m] else None for m in ("ft", "lwf"))
    bn = "running statistics frozen (evaluation mode)" if not cfg.get("adapt_bn") else "statistics adapt to faces"
    size = cfg["face_size"]
    setup = [["New task", f"{faces}: the first {cfg['subjects']} subjects with at least {cfg['per_subject']} readable "
                          f"images, {cfg['per_subject']} per subject picked with seed {cfg['split_seed']}: "
                          f"{cfg['train_per_subject']} for training, {cfg['per_subject'] - cfg['train_per_subject']} "
                          "for test"],
             ["Old task", data_words(g["teacher"]) if g["teacher"] else "CIFAR-10"],
             ["Pre-processing", f"RGB, resized to {size}×{size} (bilinear), scaled to [0, 1], ImageNet mean and "
                                "standard deviation"],
             ["Augmentation", f"random {size}×{size} crop of the image padded with {size // 8} pixels, horizontal flip"],
             ["Network", "the teacher of Question 1 with two heads on its 512 features: the old head (its 10-way "
                         f"layer) and a new 512→{cfg['subjects']} layer, freshly initialised (Listing {{ref:lst-net}})"],
             ["Original learning rate (100%)", f"{cfg['lr']:g}, the teacher's peak learning rate"],
             ["Optimiser", f"SGD, Nesterov momentum {cfg['momentum']:g}, weight decay (L2) {cfg['wd']:g}"],
             ["Schedule", "cosine decay to 0, updated after every step; LwF and joint training: one such "
                          "decay in the warm-up and another, from the full rates, in the joint stage"],
             ["Batch size, epochs", f"{cfg['batch']} ({cfg['subjects'] * cfg['train_per_subject'] // cfg['batch']} "
                                    f"steps per epoch), {cfg['epochs']}"],
             ["BatchNorm", f"frozen layers in evaluation mode; trained layers: {bn}"],
             ["Precision", PRECISION[cfg.get("precision", "fp32")]], ["Seeds", seeds_words(ref)],
             ["Old-task accuracy", "the old head on CIFAR-10: test set after every epoch, training set at the end"]]
    out = [table("continual_setup", "tab-q2-setup", "Continual learning: setup shared by every method.",
                 ["Item", "Setting"], setup, widths=("auto", "1fr"))]
    if ft:
        rows = [[layer, f"{rate:g}% ({ft['lr'] * rate / 100:g})",
                 "fine-tuned; BatchNorm " + ("statistics adapt" if ft.get("adapt_bn") else "statistics frozen")]
                for layer, rate in ft["ft_layers"]]
        rows += [[f"new fully connected layer + softmax ({ft['subjects']} outputs)", f"100% ({ft['lr']:g})",
                  "trained from scratch"], ["all other layers, old head", "0%", "frozen"]]
        out.append(table("finetune_layers", "tab-ft", "Fine-tuning: the layers chosen and their learning rates.",
                         ["Conv layers that you choose to fine-tune", "Learning Rate (x% of the original)",
                          "Remark"], rows, widths=("1.3fr", "1fr", "1.3fr")))
    if lwf:
        a, w, e, base = lwf["lwf_lr"], lwf["lwf_warmup"], lwf["epochs"], lwf["lr"]
        out.append(table("lwf_setup", "tab-lwf", "Learning without Forgetting: parameters.", ["Parameter", "Value"], [
            ["Learning rate, backbone and old head", f"{a:g}% of the original ({base * a / 100:g})"],
            ["Learning rate, new head", f"100% of the original ({base:g})"],
            ["Temperature T", f"{lwf['lwf_T']:g}"], ["λo (weight of the old-task loss)", f"{lwf['lwf_lambda']:g}"],
            ["L2 regulariser (weight decay)", f"{lwf['wd']:g}"],
            ["Epochs", f"{w} warm-up + {e - w} joint"], ["Batch size", f"{lwf['batch']}"]]))
    rows, per_seed = [], []
    for m, label in q2.METHODS.items():
        if m == "joint":
            rows.append(["**References beyond the assignment**", "", "", ""])
        runs = methods[m]
        for task in ("old", "new"):
            values = cells(runs, (f"{task}_train_acc", f"{task}_test_acc")) if runs else [f"not run yet (make {m})"] * 2
            rows.append([label if task == "old" else "", "Old Task*" if task == "old" else "New Task", *values])
        per_seed += [[label, r["result"]["seed"], *(r["result"][k] for k in RESULT_KEYS)] for r in runs]
    before = ref[0]["result"]
    n = len(ref)
    out.append(table("continual_table", "tab-q2", "Continual learning: final accuracy (last epoch)"
                     + (f", mean ± standard deviation over {n} seeds" if n > 1 else "") + ". *Old task: CIFAR-10 "
                     "through the old head after the network was changed for faces; before any change the teacher "
                     f"scores {pct(before['old_train_acc_before'])}% (training) and {pct(before['old_test_acc_before'])}%"
                     " (test).", ["Method", "Task", "Training Accuracy (%)", "Testing Accuracy (%)"], rows,
                     csv_rows=(["method", "seed", *RESULT_KEYS], per_seed)))
    if g["lwf_sweep"]:
        sweep = g["lwf_sweep"]
        out.append(table("lwf_sweep", "tab-lwf-sweep", "LwF's trade-off over λo (λo = 0: every layer fine-tuned at "
                         "LwF's rates, after its warm-up), test accuracy (%).", ["λo", "Old task", "New task"],
                         [[f"{v:g}", *cells(r, ("old_test_acc", "new_test_acc"))] for v, r in sweep.items()],
                         csv_rows=(["lambda_o", "seed", *RESULT_KEYS],
                                   [[v, r["result"]["seed"], *(r["result"][k] for k in RESULT_KEYS)]
                                    for v, runs in sweep.items() for r in runs])))
    return out


def write_tables(out, tables):
    """out/tables/<name>.md, .tex and (per-seed numbers) .csv of every table."""
    folder = os.path.join(out, "tables")
    os.makedirs(folder, exist_ok=True)
    for t in tables:
        plain = [[unref(c) for c in row] for row in [t["header"]] + t["rows"] if row != RULE]
        md = f"### {unref(t['caption'])}\n\n" + common.md_table(plain[0], plain[1:])
        tex = "\n".join([f"% {unref(t['caption'])}", r"\begin{tabular}{" + "l" * len(t["header"]) + "}", r"\toprule",
                         " & ".join(map(latex, plain[0])) + r" \\", r"\midrule",
                         *[" & ".join(map(latex, r)) + r" \\" for r in plain[1:]], r"\bottomrule", r"\end{tabular}", ""])
        files = {".md": md, ".tex": tex}
        if t["csv"]:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows([t["csv"][0], *t["csv"][1]])
            files[".csv"] = buf.getvalue()
        for ext, text in files.items():
            write_text(os.path.join(folder, t["name"] + ext), text)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
        "~": r"\textasciitilde{}", "^": r"\^{}", "λ": r"$\lambda$", "±": r"$\pm$", "²": r"$^2$", "·": r"$\cdot$",
        "‖": r"$\|$", "→": r"$\to$", "≥": r"$\geq$", "≤": r"$\leq$", "−": "-", "×": r"$\times$"}


def latex(text):
    """Plain text -> LaTeX (special characters escaped, **bold** -> \\textbf)."""
    return re.sub(r"\*\*(.+?)\*\*", r"\\textbf{\1}", "".join(_TEX.get(c, c) for c in text))


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    common._atomic(write, path)


# =============================================================================
# Figures: out/figures/<name>.svg (the PDF's) and .png (the Markdown's)
# =============================================================================


def figure(name, label, caption):
    return {"kind": "figure", "name": name, "label": label, "caption": caption}


def save(fig, out, name):
    folder = os.path.join(out, "figures")
    os.makedirs(folder, exist_ok=True)
    for ext, kw in (("svg", {}), ("png", {"dpi": 150})):
        fig.savefig(os.path.join(folder, f"{name}.{ext}"), **kw)
    pyplot().close(fig)


def style():
    plt = pyplot()
    plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "legend.fontsize": 7, "axes.grid": True,
                         "grid.alpha": 0.3, "svg.hashsalt": "report", "svg.fonttype": "path"})
    return plt


def histories(runs):
    return [r["history"] for r in runs]


def pair_figure(out, name, runs, loss_label, rows=None):
    """A run's loss and accuracy side by side (rows: [(title, runs)], a row each); a loss that spans more than a
    factor of 10 on a log scale."""
    rows = rows or [("", runs)]
    fig, axes = style().subplots(len(rows), 2, figsize=(6.6, 1.75 * len(rows)), squeeze=False)
    for (title, runs), ax in zip(rows, axes):
        common.curve_axes(ax, histories(runs), loss_label, titles=(f"{title}(a) loss", f"{title}(b) accuracy"))
        losses = [e[f"{split}_loss"] for r in runs for e in r["history"] for split in ("train", "test")]
        if min(losses) > 0 and max(losses) > 10 * min(losses):
            ax[0].set_yscale("log")
            ax[0].set_ylabel(loss_label + " (log scale)")
    fig.tight_layout()
    save(fig, out, name)


def students_figure(out, students):
    """The five students' curves as small multiples: a row each, loss and test accuracy."""
    present = [(label, T, lam, students[label]) for label, T, lam in q1b.TABLE if students[label]]
    fig, axes = style().subplots(len(present), 2, figsize=(6.6, 1.4 * len(present)), squeeze=False, sharex=True)
    for row, (label, T, lam, runs) in zip(axes, present):
        name = label + (f", T = {T:g}" if lam else "")
        common.curve_axes(row, histories(runs), "loss", ("test",), (f"{name}: loss", f"{name}: test accuracy"))
    for ax in axes[:-1].flat:
        ax.set_xlabel("")
    fig.tight_layout()
    save(fig, out, "kd_students")


def compare_figure(out, g):
    """Every student's test accuracy (and the teacher's) and test cross-entropy with the labels, per epoch."""
    from matplotlib.ticker import MaxNLocator
    fig, (a, b) = style().subplots(1, 2, figsize=(6.6, 2.6))
    for label, T, lam in q1b.TABLE:
        runs = g["students"][label]
        if runs:
            name = (label if label.startswith("KD") else f"λ={lam:g}") + (f", T={T:g}" if lam else "")
            x = [e["epoch"] for e in runs[0]["history"]]
            common._band(a, x, [[e["test_acc"] for e in r["history"]] for r in runs], name)
            common._band(b, x, [[e["test_ce"] for e in r["history"]] for r in runs], name)
    a.axhline(g["teacher"]["result"]["test_acc"], color="k", ls="--", lw=1, label="teacher")
    a.set(title="(a) test accuracy (T = 1)", xlabel="epoch", ylabel="%")
    b.set(title="(b) test cross-entropy with the labels", xlabel="epoch", ylabel="cross-entropy")
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(*a.get_legend_handles_labels(), loc="lower center", ncol=6, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    save(fig, out, "kd_compare")


def sweep_figure(out, g):
    sweep = g["sweep"]
    grid, (_, ok) = sweep["grid"], best_cell(sweep)
    values = [[stats(ok[T, lam])[0] if (T, lam) in ok else math.nan for lam in grid["lam"]] for T in grid["T"]]
    finite = [v for row in values for v in row if not math.isnan(v)] or [0.0]
    fig, ax = style().subplots(figsize=(0.7 * len(grid["lam"]) + 2.0, 0.3 * len(grid["T"]) + 1.3))
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.grid(False)
    ax.set(xticks=range(len(grid["lam"])), xticklabels=[f"{v:g}" for v in grid["lam"]], xlabel="λ (weight of the soft "
           "targets)", yticks=range(len(grid["T"])), yticklabels=[f"{v:g}" for v in grid["T"]], ylabel="temperature T")
    mid = (min(finite) + max(finite)) / 2
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, "diverged" if math.isnan(v) else f"{v:.1f}", ha="center", va="center",
                    color="w" if math.isnan(v) or v < mid else "k")
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    fig.tight_layout()
    save(fig, out, "kd_sweep")


def forgetting_figure(out, g):
    """(a) the old task's test accuracy per epoch for every method; (b) old against new task at the end."""
    fig, (a, b) = style().subplots(1, 2, figsize=(6.6, 2.5))
    before = None
    for m, label in q2.METHODS.items():
        runs = g["methods"][m]
        if not runs:
            continue
        before = runs[0]["result"]["old_test_acc_before"]
        x = [0] + [e["epoch"] for e in runs[0]["history"]]
        common._band(a, x, [[r["result"]["old_test_acc_before"]] + [e["old_test_acc"] for e in r["history"]]
                            for r in runs], label.replace(" (reference)", "*"))
        old, new = accs(runs, "old_test_acc"), accs(runs, "new_test_acc")
        (mo, so, _), (mn, sn, _) = stats(old), stats(new)
        b.errorbar(mn, mo, xerr=sn or 0, yerr=so or 0, fmt="o", capsize=3, label=label.replace(" (reference)", "*"))
    if g["lwf_sweep"]:
        pts = [(stats(accs(r, "new_test_acc"))[0], stats(accs(r, "old_test_acc"))[0]) for r in g["lwf_sweep"].values()]
        b.plot([p[0] for p in pts], [p[1] for p in pts], "k--", lw=1, label="LwF over λo")
        for v, p in zip(g["lwf_sweep"], pts):
            b.annotate(f"λo={v:g}", p, textcoords="offset points", xytext=(3, 3), fontsize=6)
    b.axhline(before, color="0.5", ls=":", lw=1, label="old task before")
    from matplotlib.ticker import MaxNLocator
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    a.set(title="(a) old task while learning faces", xlabel="epoch", ylabel="CIFAR-10 test accuracy (%)")
    b.set(title="(b) what each method keeps and learns", xlabel="faces: test accuracy (%)",
          ylabel="CIFAR-10 test accuracy (%)")
    a.legend(fontsize=6)
    b.legend(fontsize=6)
    fig.tight_layout()
    save(fig, out, "q2_forgetting")


# =============================================================================
# The code, taken from the source when the report is made
# =============================================================================


def listing(label, caption, *objects):
    """The source of functions or classes as one listing, with their line numbers in the file; docstrings
    are left out (the text around the listing says what they would), comments kept."""
    parts = []
    for obj in objects:
        lines, first = inspect.getsourcelines(obj)
        skip = set()
        for node in ast.walk(ast.parse(textwrap.dedent("".join(lines)))):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                    isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
                skip |= set(range(body[0].lineno - 1, body[0].end_lineno))
        kept = [(first + i, line) for i, line in enumerate(lines) if i not in skip]
        parts.append({"file": os.path.basename(inspect.getsourcefile(obj)), "numbers": [n for n, _ in kept],
                      "text": "".join(line for _, line in kept)})
    files = {}
    for part in parts:
        files.setdefault(part["file"], []).append(f"{part['numbers'][0]}-{part['numbers'][-1]}")
    where = "; ".join(f"{f}, lines {' and '.join(spans)}" for f, spans in files.items())
    return {"kind": "code", "label": label, "caption": f"{caption} ({where}).", "parts": parts}


# =============================================================================
# The document
# =============================================================================


def h(level, text):
    return {"kind": "h", "level": level, "text": text}


def p(text):
    return {"kind": "p", "text": text}


def items(texts, ordered=False):
    return {"kind": "list", "items": texts, "ordered": ordered}


def missing(what, command):
    return p(f"_Not run yet: {what} (`{command}` makes it)._")


def document(g, author, student_id):
    """The report as a list of blocks, in the assignment's order and numbering."""
    out, t = g["out"], g["teacher"]
    doc = [{"kind": "title", "author": author, "student_id": student_id}]
    doc += introduction(g)
    doc.append(h(1, "Question 1: Knowledge Distillation"))
    doc.append(h(2, "Part A: the teacher network"))
    if not t:
        doc.append(missing("the teacher", "make teacher"))
    else:
        changes, setup, acc = teacher_tables(t)
        r = t["result"]
        doc += [h(3, "What was changed for 32×32 inputs"),
                p("torchvision's ResNet18 halves the resolution five times (conv1, the max-pool, and the first block of "
                  "conv3_x, conv4_x and conv5_x), which leaves 1×1 of a 32×32 image. Reaching 8×8×512 needs three of the "
                  "five stride-2 steps removed. Strides 2 → 1 in the stem's two (conv1 and the max-pool), the usual "
                  "adaptation of ResNets to CIFAR's small images, and in conv5_1 (its first 3×3 convolution and its 1×1 "
                  "shortcut); conv3_1 and conv4_1 keep stride 2, so the stages run 32-32-32-16-8-8 "
                  "(Table {ref:tab-changes}). The 17 convolutions, their kernel sizes and paddings and the single "
                  "max-pool are unchanged; the 1000-way ImageNet layer is replaced by a 10-way one (Listing "
                  "{ref:lst-teacher}, which loads the ImageNet weights when asked to)."),
                changes, listing("lst-teacher", "The teacher", common.teacher_resnet18),
                h(3, "(1) Training setup"), p("Table {ref:tab-teacher-setup} lists the setup: every layer is trained, "
                                              "the new fully connected layer from scratch."),
                setup, h(3, "(2), (3) Loss and accuracy against epoch"),
                figure("teacher", "fig-teacher", "Teacher: (a) training and test loss (cross-entropy) and (b) training "
                       "and test accuracy against epoch. Training metrics are measured in evaluation mode on the "
                       "un-augmented training images after each epoch."),
                p("Figure {ref:fig-teacher} shows both curves; their last points are the numbers of Table "
                  "{ref:tab-teacher-acc}."),
                h(3, "(4) Final accuracy"), acc,
                p(f"The teacher ends at {pct(r['test_acc'])}% test accuracy "
                  + ("(the assignment requires at least 90%)" if r["test_acc"] >= 90 else
                     "(below the 90% that the assignment requires)")
                  + f", and at {pct(r['train_acc'])}% on the training images, a gap of "
                  f"{r['train_acc'] - r['test_acc']:+.2f} points (training minus test).")]
        pair_figure(out, "teacher", [t], "cross-entropy")
    doc += part_b(g)
    doc += question_2(g)
    doc += [h(1, "References"), items(REFERENCES)]
    doc += reproducibility(g)
    doc.append({"kind": "appendix"})
    return doc


REFERENCES = [
    "K. He, X. Zhang, S. Ren and J. Sun, Deep residual learning for image recognition, CVPR 2016 (ResNet18).",
    "G. Hinton, O. Vinyals and J. Dean, Distilling the knowledge in a neural network, NIPS Deep Learning Workshop "
    "2015 (soft targets, the T² factor).",
    "Z. Li and D. Hoiem, Learning without forgetting, IEEE TPAMI 40(12), 2018 (LwF, its T = 2 and λo = 1).",
    "J. Yosinski, J. Clune, Y. Bengio and H. Lipson, How transferable are features in deep neural networks?, "
    "NIPS 2014 (the last stage is the most task-specific).",
    "R. Müller, S. Kornblith and G. Hinton, When does label smoothing help?, NeurIPS 2019 (a smoothed teacher "
    "distils worse: no label smoothing).",
    "G. Bae et al., DigiFace-1M: 1 million digital face images for face recognition, WACV 2023 (the default faces).",
]


def introduction(g):
    t, ref = g["teacher"], next((r for r in g["methods"].values() if r), None)
    notes = []
    if t and cifar_source(t) == "synthetic":
        notes.append(" **These runs did not use the real data**: they ran on small synthetic substitutes for CIFAR-10 "
                     f"({t['result']['train_images']:,} training and {t['result']['test_images']:,} test images) and "
                     "for the faces, so the numbers show what the methods do, not results on CIFAR-10.")
    elif t and cifar_source(t) == "other":
        full = t["result"]["train_images"] == 50000 and t["result"]["test_images"] == 10000
        notes.append(" These runs used CIFAR-10 images, not the official files (their checksums differ: a copy "
                     "re-encoded as JPEG, whose pixels differ slightly), "
                     + ("all of them" if full else f"{t['result']['train_images']:,} training and "
                        f"{t['result']['test_images']:,} test images of them")
                     + ", so accuracies are close to, not equal to, those on the official CIFAR-10.")
    if t and not t["config"]["pretrained"]:
        notes.append(" The teacher of these runs started from random weights, not from ImageNet's (the assignment's "
                     "ImageNet weights need a download).")
    subjects = f"{ref[0]['config']['subjects']}-subject" if ref else "100-subject"
    return [h(1, "Introduction"),
            p("Question 1 fine-tunes a ResNet18 on CIFAR-10 as a teacher (Part A) and distils it into the assignment's "
              "student network with a mix of soft and hard targets (Part B), for the temperatures and weights of the "
              "assignment's table and, as the bonus, over a grid of them. Question 2 adds a "
              f"{subjects} face-recognition task to the teacher by feature extraction, fine-tuning and Learning "
              "without Forgetting (LwF), and measures how much of CIFAR-10 each keeps; two references beyond the "
              "assignment, joint training and fine-tuning every layer, frame LwF from above and below. Every number, "
              "table and figure was computed from the recorded runs, and the code that answers each item is shown "
              "beside it (the whole code is in Appendix A)." + "".join(notes))]


def part_b(g):
    doc = [h(2, "Part B: the student network and knowledge distillation")]
    if not g["teacher"]:
        return doc + [missing("the students", "make kd-table")]
    doc += table_part(g) if any(g["students"].values()) else [missing("the students of the table", "make kd-table")]
    doc.append(h(3, "(5) Bonus: more temperatures and weights"))
    if g["sweep"] and any(g["sweep"]["cells"].values()):
        doc += [sweep_table(g), figure("kd_sweep", "fig-sweep", "Bonus sweep: student test accuracy (%) over T and λ.")
                | {"width": f"{min(100, 18 + 12 * len(g['sweep']['grid']['lam']))}%"}]
        sweep_figure(g["out"], g)
        doc += [p(t) for t in bonus_observations(g)]
    else:
        doc.append(missing("the sweep", "make kd-sweep"))
    return doc


def table_part(g):
    """Part B (1)-(4): the student, its soft targets, setup, loss and curves, and the table."""
    out = g["out"]
    student, setup, kd = kd_tables(g)
    soft = soft_target_blocks(g)
    cfg = next(r for r in g["students"].values() if r)[0]["config"]
    bn = cfg.get("bn", 1)
    doc = [p("The student follows the assignment's table (Table {ref:tab-student}, Listing {ref:lst-student})"
             + (", with one departure: a BatchNorm layer after each convolution, carried over from the teacher. "
                if bn else " exactly. ")
             + "With stride-1 pools the last feature map is 27×27×128, so the first fully connected layer has 93,312 "
             f"inputs and holds {27 * 27 * 128 * 500 / 1e6:.1f} million of the student's "
             f"{STUDENT_PARAMS / 1e6:.1f} million weights."),
            student, listing("lst-student", "The student", common.StudentCNN),
            h(3, "(1) Soft targets"),
            p("For each training batch the teacher of Part A runs once, in evaluation mode and without gradients, on "
              "the same augmented images the students see; its logits t give the soft targets softmax(t/T) at each "
              "student's temperature (Listing {ref:lst-soft}). At test time T = 1."
              + (" Table {ref:tab-soft} and Figure {ref:fig-soft} show what they hold on the test set: the higher "
                 "T, the more of the probability goes to the classes the teacher finds similar." if soft else "")),
            listing("lst-soft", "Soft targets: the teacher's forward pass on the students' batch, and softmax(t/T)",
                    common.distill_loss, common.soft_targets),
            *soft,
            h(3, "(2) Training setup"),
            p("Table {ref:tab-student-setup} gives the students' setup. The teacher's tricks carried over: "
              + ", ".join(x for x in ["its augmentation" if cfg["augment"] else "", "its pre-processing",
                                      "BatchNorm after each convolution, as the teacher has" if cfg["bn"] else "",
                                      f"dropout {cfg['dropout']:g}" if cfg["dropout"] else
                                      "no dropout, as the teacher has none"] if x)
              + ". The optimiser is the teacher's; the students' own learning rate, with each one's gradient norm "
                "clipped, keeps the high-temperature students (whose soft loss is scaled by T²) stable."),
            setup,
            h(3, "(3) Loss and curves"),
            p("The loss of Lecture 7 mixes the soft and the hard cross-entropy, λ weighting the soft term and T² "
              "keeping its gradients comparable across temperatures (Hinton et al. 2015); Listing {ref:lst-kd}. "
              "Figure {ref:fig-students} shows each student's training and test loss and its test accuracy per epoch; "
              "Figure {ref:fig-compare} puts every student on one plot."),
            listing("lst-kd", "The KD loss", common.soft_cross_entropy, common.kd_loss),
            figure("kd_students", "fig-students", "The five students of Table {ref:tab-kd}: (left) training and test "
                   "loss λ·T²·KL(teacher‖student) + (1−λ)·CE, (right) test accuracy, against epoch."),
            figure("kd_compare", "fig-compare", "Every student: (a) test accuracy with the teacher's as a dashed line, "
                   "(b) test cross-entropy with the labels (comparable across T and λ), against epoch."),
            h(3, "(4) Results"),
            p("Table {ref:tab-kd} fills in the assignment's table; the last points of Figure {ref:fig-students} are its "
              "test accuracies."), kd]
    students_figure(out, g["students"])
    compare_figure(out, g)
    return doc + [p(t) for t in q1_observations(g)]


def binomial_noise(p, n_test):
    """Two binomial standard errors of a difference of two accuracies near p, on n_test images (points)."""
    return 2 * 100 * math.sqrt(2 * p * (1 - p) / n_test)


def q1_observations(g):
    """The discussion of Table (4): each comparison with its noise, then what the curves add."""
    t, students = g["teacher"]["result"], g["students"]
    acc = {label: accs(runs) for label, runs in students.items() if runs and accs(runs)}
    n, n_test = max(len(r) for r in students.values()), t.get("test_images", 10000)
    base, lam1 = q1b.TABLE[0][0], q1b.TABLE[1][0]
    typical = stats([v for a in acc.values() for v in a])[0] / 100 if acc else 0.5
    obs = [noise_note(n, n_test, typical)]
    if acc:
        best = max(acc, key=lambda k: stats(acc[k])[0])
        above = stats(acc[best])[0] > t["test_acc"]
        obs.append(f"The teacher reaches {pct(t['test_acc'])}% on the test set, and "
                   + (f"a student does better: {best} reaches {mean_sd(acc[best])}%, "
                      if above else f"stays above every student: the best of the table, {best}, reaches "
                      f"{mean_sd(acc[best])}%, ")
                   + f"{compared(acc[best], [t['test_acc']])} from the teacher. "
                   + (f"A teacher weaker than its student passes on little: these runs trained it for "
                      f"{g['teacher']['result']['epochs']} epochs{' from random weights' if not g['teacher']['config']['pretrained'] else ''}. "
                      if above else "")
                   + f"The student has {STUDENT_PARAMS / TEACHER_PARAMS:.1f} times the teacher's parameters "
                   f"({STUDENT_PARAMS / 1e6:.1f} million against {TEACHER_PARAMS / 1e6:.1f}), but three convolutions "
                   "against seventeen: almost all its weights are in one fully connected layer bound to positions in "
                   "the image, where the teacher's features are shared across it.")
    if base in acc:
        kd = [(label, T, difference(acc[label], acc[base])) for label, T, lam in q1b.TABLE if lam == 0.1 and label in acc]
        text = (f"Against the student trained on the labels alone (λ = 0, {mean_sd(acc[base])}%), the KD students at "
                "λ = 0.1 differ by " + "; ".join(f"{label} (T = {T:g}) {compared(acc[label], acc[base])}"
                                                  for label, T, _ in kd) + ".")
        if n == 1 and kd:
            bound = binomial_noise(typical, n_test)
            small = all(abs(d) < bound for _, _, (d, _) in kd)
            text += (f" Two standard errors of a difference of two accuracies on these {n_test:,} test images are "
                     f"{bound:.1f} points, " + ("so every one of these differences is within the test set's own noise: "
                                                "these runs show no effect of the soft targets that it could resolve."
                                                if small else "and not every difference is within it."))
        obs.append(text)
    kd = [(label, T) for label, T, lam in q1b.TABLE if lam == 0.1 and label in acc]
    if len(kd) > 1:
        obs.append("The temperature at λ = 0.1: " + "; ".join(
            f"T = {tb:g} against T = {ta:g}, {compared(acc[b], acc[a])}" for (a, ta), (b, tb) in zip(kd, kd[1:])) + ".")
    if lam1 in acc and base in acc:
        runs = students[lam1]
        rise = stats([r["history"][-1]["test_acc"] - r["history"][-2]["test_acc"] for r in runs])[0] \
            if len(runs[0]["history"]) > 1 else None
        others = [stats([r["history"][-1]["test_acc"] - r["history"][-2]["test_acc"] for r in students[k]])[0]
                  for k in acc if k != lam1 and len(students[k][0]["history"]) > 1]
        text = (f"The student taught by the soft targets alone (λ = 1, T = 20) reaches {mean_sd(acc[lam1])}%, "
                f"{compared(acc[lam1], acc[base])} from λ = 0.")
        if rise is not None and others and rise > max(others):
            text += (f" Its test accuracy rose by {rise:.1f} points in the last epoch, more than any other student's "
                     f"({max(others):.1f} at most): it may be learning more slowly rather than less, its only signal being the "
                     "teacher's smoothed distribution alone.")
        obs.append(text)
    gaps = {label: stats([r["result"]["train_acc"] - r["result"]["test_acc"] for r in runs])[0]
            for label, runs in students.items() if runs and label in acc}
    if base in gaps and len(gaps) > 1:
        kd_gaps = [gaps[label] for label, _, lam in q1b.TABLE if lam == 0.1 and label in gaps]
        obs.append(f"Training minus test accuracy is {gaps[base]:+.1f} points for λ = 0, "
                   f"{min(kd_gaps):+.1f} to {max(kd_gaps):+.1f} for the KD students and "
                   f"{t['train_acc'] - t['test_acc']:+.1f} for the teacher"
                   + (": the soft targets narrow the students' gap, acting as a regulariser, as Hinton et al. observed."
                      if kd_gaps and max(kd_gaps) < gaps[base] else "."))
    rising = [label for label, runs in students.items() if runs and len(runs[0]["history"]) > 1
              and all(r["history"][-1]["test_acc"] > r["history"][-2]["test_acc"] for r in runs)]
    if len(rising) == len(acc) and acc:
        epochs = len(next(iter(students.values()))[0]["history"])
        obs.append(f"Every student's test accuracy is still rising at epoch {epochs} (Figure {{ref:fig-students}}): "
                   "the table compares students part of the way through their training, not converged ones.")
    return obs


def bonus_observations(g):
    sweep, t = g["sweep"], g["teacher"]["result"]
    best, ok = best_cell(sweep)
    if best is None:
        return ["Every student of the sweep diverged (Table {ref:tab-sweep}): none can be compared with the teacher."]
    v = ok[best]
    grid = sweep["grid"]
    sweep_epochs = next(r for runs in sweep["cells"].values() for r in runs)["result"]["epochs"]
    table_epochs = next((runs[0]["result"]["epochs"] for runs in g["students"].values() if runs), None)
    reach = difference(v, [t["test_acc"]])
    verdict = ("reaches the teacher" if reach[0] >= 0 or (reach[1] and abs(reach[0]) < 2 * reach[1])
               else "does not reach the teacher")
    return [f"The sweep (Table {{ref:tab-sweep}}, Figure {{ref:fig-sweep}}) trained {len(ok)} students over T ∈ {{{', '.join(f'{x:g}' for x in grid['T'])}}} and "
            f"λ ∈ {{{', '.join(f'{x:g}' for x in grid['lam'])}}}. The best cell, T = {best[0]:g} and λ = {best[1]:g}, "
            f"reaches {mean_sd(v)}%, {compared(v, [t['test_acc']])} from the teacher's {pct(t['test_acc'])}%: the "
            f"student {verdict}.",
            *([f"The sweep's students trained {sweep_epochs} epoch{'s' * (sweep_epochs != 1)}, the table's "
               f"{table_epochs}: the two are not comparable, and the sweep's cells only with each other."]
              if table_epochs and sweep_epochs != table_epochs else []),
            f"That cell was picked as the best of {len(ok)} on the test set itself, which flatters it: its accuracy is "
            "an optimistic estimate. An unbiased one would choose the cell on a validation split of the training "
            "images and then measure it once on the test set."]


def question_2(g):
    out, methods = g["out"], g["methods"]
    doc = [h(1, "Question 2: Continual Learning")]
    if not any(methods.values()) or not g["teacher"]:
        return doc + [missing("the continual-learning methods", "make continual")]
    tables = {t["name"]: t for t in q2_tables(g)}
    doc += [p("All methods start from the teacher of Question 1 with a second head for the 100 face subjects "
              "(Listing {ref:lst-net}); Table {ref:tab-q2-setup} gives what they share. The old task is CIFAR-10 "
              "through the old head, measured after the network was changed for faces."),
            tables["continual_setup"], listing("lst-net", "The two-headed network", common.ContinualNet),
            listing("lst-methods", "What each method trains, and LwF's two stages", q2.trained_layers, q2.lwf_stage)]
    loss_words = {"fe": "new-task cross-entropy", "ft": "new-task cross-entropy", "ft-all": "new-task cross-entropy",
                  "joint": "new-task cross-entropy; the CIFAR-10 term is not part of the face evaluation",
                  "lwf": "the LwF objective CE(new) + λo·CE(old soft targets), on faces"}
    for m, heading in (("fe", "(1) Feature extraction"), ("ft", "(2) Fine-tuning"),
                       ("lwf", "(3) Learning without Forgetting (LwF)"), ("joint", None)):
        if heading is None:
            doc.append(h(3, "References beyond the assignment"))
        else:
            doc.append(h(3, heading))
        doc += method_text(g, m, tables)
        if m == "joint":  # the two references in one figure, a row each
            refs = [(f"{short}: ", methods[k]) for k, short in (("joint", "joint training"),
                                                                ("ft-all", "every layer")) if methods[k]]
            if refs:
                pair_figure(out, "q2_references", None, "loss", refs)
                doc.append(figure("q2_references", "fig-refs", "The references: " + " and ".join(
                    f"{'(top) ' if i == 0 and len(refs) > 1 else '(bottom) ' if i else ''}{q2.METHODS[k].split(' (')[0].lower()}"
                    for i, k in enumerate(k for k in ("joint", "ft-all") if methods[k])) + ": (a) training and test "
                    "loss (new-task cross-entropy; joint training's CIFAR-10 term is not part of the face evaluation) and "
                    "(b) training and test accuracy on the new task, against epoch."))
            doc += [missing(q2.METHODS[k], f"make {k}") for k in ("joint", "ft-all") if not methods[k]]
        elif methods[m]:
            pair_figure(out, f"q2_{m}", methods[m], "loss")
            doc.append(figure(f"q2_{m}", f"fig-{m}", f"{q2.METHODS[m]}: (a) training and test loss "
                              f"({loss_words[m]}) and (b) training and test accuracy on the new task, against epoch."))
        else:
            doc.append(missing(q2.METHODS[m], f"make {m}"))
    doc += [h(3, "(4) Results"),
            p("Table {ref:tab-q2} gives each method's final accuracy on both tasks, and Figure {ref:fig-forgetting} "
              "how the old task fared epoch by epoch and where each method ends on both."),
            tables["continual_table"]]
    if "lwf_sweep" in tables:
        doc.append(tables["lwf_sweep"])
    forgetting_figure(out, g)
    doc.append(figure("q2_forgetting", "fig-forgetting", "(a) Old-task (CIFAR-10) test accuracy before (epoch 0) and "
                      "after each epoch, every method; (b) old-task against new-task test accuracy at the end"
                      + (", with LwF over λo as a dashed line" if g["lwf_sweep"] else "") + "; * references."))
    doc += [p(t) for t in q2_observations(g)]
    return doc


def method_text(g, m, tables):
    runs = g["methods"][m]
    if not runs:
        return []
    cfg = runs[0]["config"]
    if m == "fe":
        return [p("Only the new 512→100 layer is trained, at 100% of the original learning rate; the backbone and the "
                  "old head are frozen and kept in evaluation mode, so that not even the BatchNorm statistics move "
                  f"(Listing {{ref:lst-methods}}, the last case). It is evaluated on the face test set, "
                  f"{cfg['per_subject'] - cfg['train_per_subject']} images per subject; Figure {{ref:fig-fe}} shows "
                  "its loss and accuracy per epoch.")]
    if m == "ft":
        layers = ", ".join(f"{layer} at {rate:g}%" for layer, rate in cfg["ft_layers"])
        why = (" The last stage holds the most task-specific features of the old task (Yosinski et al. 2014), the "
               "first to adapt to faces." if any(layer.startswith("conv5") for layer, _ in cfg["ft_layers"]) else "")
        return [p(f"This run fine-tuned {layers} of the original learning rate, with the new layer at 100% and every "
                  f"other layer frozen (Table {{ref:tab-ft}}; its curves: Figure {{ref:fig-ft}}).{why}"),
                tables["finetune_layers"]]
    if m == "lwf":
        w, e, lam = cfg["lwf_warmup"], cfg["epochs"], cfg["lwf_lambda"]
        span = lambda a, b: f"epoch {a}" if a == b else f"epochs {a}-{b}"  # noqa: E731
        return [p("What was done, following Li and Hoiem (Table {ref:tab-lwf}, Listings {ref:lst-methods} and "
                  "{ref:lst-lwf}; its curves: Figure {ref:fig-lwf}):"),
                items(["Keep a frozen copy of the original network (the teacher with its old head), in evaluation mode.",
                       f"Add the new head ({cfg['subjects']} outputs), freshly initialised.",
                       f"Warm-up, {span(1, w)}: train the new head alone, backbone and old head frozen, as in feature "
                       "extraction. The old-task term then reaches no trained weight, so it is not computed (the "
                       "first lines of Listing {ref:lst-lwf}).",
                       f"Joint stage, {span(w + 1, e)}: train every layer. For each augmented face batch, the frozen "
                       "original gives y_o, its old-head outputs on the same images.",
                       f"Minimise CE(new head, face label) + λo·CE(softmax(y_o/T), softmax(old head/T)) with T = "
                       f"{cfg['lwf_T']:g} and λo = {lam:g} (no T² factor, as in the paper), plus the L2 regulariser "
                       f"{cfg['wd']:g} as weight decay.",
                       "BatchNorm: " + ("statistics adapt to faces." if cfg.get("adapt_bn") else
                                        "running statistics frozen, as in feature extraction."),
                       "Evaluate the new head on the face test set and the old head on the CIFAR-10 test set after "
                       "every epoch."], ordered=True),
                tables["lwf_setup"],
                listing("lst-lwf", "The LwF loss", common.lwf_loss)]
    joint, ftall = g["methods"]["joint"], g["methods"]["ft-all"]
    text = ("Two references frame LwF. Joint training uses LwF's rates, warm-up and epochs, but trains on the old "
            "data too: each step a face batch and a CIFAR-10 batch of the same size, loss CE(new head, faces) + "
            "CE(old head, CIFAR-10). Having the old data, it is the usual upper reference for what a method can keep"
            + (" (Figure {ref:fig-refs})." if joint else "."))
    if ftall:
        text += (f" Fine-tuning every layer trains the whole backbone at {ftall[0]['config']['ft_all_lr']:g}% on faces "
                 "alone, with no term for the old task: what LwF's λo·CE term protects against (Figure "
                 "{ref:fig-refs}).")
    return [p(text)] if joint or ftall else []


def q2_observations(g):
    """The discussion of Table (4) of Q2: what each method keeps and learns, each comparison with its noise,
    and what the comparisons do and do not isolate."""
    methods = g["methods"]
    runs = {m: r for m, r in methods.items() if r}
    ref = next(iter(runs.values()))
    cfg = ref[0]["config"]
    n, n_test = max(len(r) for r in runs.values()), g["teacher"]["result"].get("test_images", 10000)
    faces_test = cfg["subjects"] * (cfg["per_subject"] - cfg["train_per_subject"])
    before = ref[0]["result"]["old_test_acc_before"]
    typical = stats([v for r in runs.values() for v in accs(r, "old_test_acc")])[0]
    obs = [noise_note(n, n_test, typical / 100)
           + f" The new task's test set is smaller, {faces_test:,} face images, so there one image is "
             f"{100 / faces_test:.1f} points and one standard error of an accuracy near 60% is "
             f"{100 * math.sqrt(0.24 / faces_test):.1f}."]
    old = lambda m: accs(runs[m], "old_test_acc")  # noqa: E731
    new = lambda m: accs(runs[m], "new_test_acc")  # noqa: E731
    if "fe" in runs:
        same = all(r["result"]["old_test_acc"] == r["result"]["old_test_acc_before"] for r in runs["fe"])
        obs.append((f"As it must by construction, feature extraction keeps the old task exactly ({pct(before)}% "
                    f"before and after): this confirms that the backbone, its BatchNorm statistics and the old head "
                    "stayed frozen, and is not an experimental finding." if same else
                    f"Feature extraction changed the old task ({pct(before)}% before, {mean_sd(old('fe'))}% after), "
                    "which frozen weights cannot do: these runs are not to be trusted.")
                   + f" On faces it reaches {mean_sd(new('fe'))}%"
                   + (", the least of all methods: features learnt for the objects of CIFAR-10, used as they are, "
                      "separate faces less well than features that adapt to them."
                      if all(stats(new("fe"))[0] <= stats(new(m))[0] for m in runs) else "."))
    words = {"ft": "fine-tuning", "lwf": "LwF", "joint": "joint training", "ft-all": "fine-tuning every layer"}
    keep = [f"{words[m]} reaches {mean_sd(new(m))}% on faces and keeps {mean_sd(old(m))}% of the old task "
            f"({compared(old(m), [before])} from before)" for m in runs if m != "fe"]
    if keep:
        text = "; ".join(keep) + "."
        obs.append(text[0].upper() + text[1:])
    if "ft" in runs and "fe" in runs:
        d = difference(old("ft"), old("fe"))[0]
        obs.append("Fine-tuning " + ("forgets" if d < 0 else "does not forget here")
                   + f" ({d:+.2f} points on the old task against feature extraction): the layers it changes are "
                   "shared by both heads, and nothing in its loss holds the old head's outputs in place.")
    if "lwf" in runs and "ft" in runs:
        ft, lw = runs["ft"][0]["config"], runs["lwf"][0]["config"]
        obs.append(f"LwF against fine-tuning, the assignment's two methods that change the backbone: old task "
                   f"{compared(old('lwf'), old('ft'))}; new task {compared(new('lwf'), new('ft'))}. They differ in "
                   f"more than LwF's old-task term: fine-tuning trains {', '.join(x for x, _ in ft['ft_layers'])} at "
                   f"{', '.join(f'{r:g}%' for _, r in ft['ft_layers'])} from the first epoch, LwF every layer at "
                   f"{lw['lwf_lr']:g}% after a warm-up of {lw['lwf_warmup']} epoch{'s' * (lw['lwf_warmup'] != 1)}.")
    sweep = g["lwf_sweep"]
    if "lwf" in runs and 0.0 in sweep:
        obs.append("LwF against the same training without its old-task term (λo = 0: the same rates, warm-up and "
                   f"epochs): old task {compared(old('lwf'), accs(sweep[0.0], 'old_test_acc'))}; new task "
                   f"{compared(new('lwf'), accs(sweep[0.0], 'new_test_acc'))}. This is the comparison that isolates "
                   "the term.")
    if "lwf" in runs and "ft-all" in runs:
        d = difference(old("lwf"), old("ft-all"))[0]
        obs.append(f"LwF against fine-tuning every layer at the same rate, without warm-up and without the old-task "
                   f"term: old task {compared(old('lwf'), old('ft-all'))}; new task "
                   f"{compared(new('lwf'), new('ft-all'))}. "
                   + ("LwF keeps more of the old task: its term holds the old head's responses on the face images "
                      "close to the original network's, standing in for the old data it does not have; the price is "
                      "paid on the new task, as the backbone is held back from the face features."
                      if d > 0 else "Here LwF does not keep more of the old task."))
    if "ft-all" in runs:
        gap = stats([r["result"]["new_train_acc"] - r["result"]["new_test_acc"] for r in runs["ft-all"]])[0]
        if gap > 10:
            obs.append(f"Fine-tuning every layer fits the face training images by {gap:.1f} points more than the "
                       "test images: with all its weights free and few images per subject, it overfits.")
    if "joint" in runs and "lwf" in runs:
        obs.append(f"Joint training against LwF: old task {compared(old('joint'), old('lwf'))}; new task "
                   f"{compared(new('joint'), new('lwf'))}. With the old data at hand, joint training is the usual "
                   "upper reference for what a method without it can keep.")
    if sweep:
        obs.append("Over λo (Table {ref:tab-lwf-sweep}), the old task's test accuracy goes " + ", ".join(
            f"{mean_sd(accs(r, 'old_test_acc'))}% at λo = {v:g}" for v, r in sweep.items())
            + ": the weight of the old-task term moves LwF between plasticity and stability.")
    if all(m in runs for m in ("fe", "ft", "lwf")):
        mean = {m: (stats(old(m))[0], stats(new(m))[0]) for m in ("fe", "ft", "lwf")}
        if mean["ft"][0] < mean["lwf"][0] < mean["fe"][0] and mean["fe"][1] < mean["ft"][1]:
            obs.append("In short, the assignment's three methods trade one task for the other: feature extraction "
                       f"keeps CIFAR-10 ({mean['fe'][0]:.1f}%) and learns faces least ({mean['fe'][1]:.1f}%), "
                       f"fine-tuning learns faces ({mean['ft'][1]:.1f}%) and forgets CIFAR-10 ({mean['ft'][0]:.1f}%), "
                       f"and LwF keeps more of CIFAR-10 than fine-tuning ({mean['lwf'][0]:.1f}%) for "
                       f"{mean['lwf'][1]:.1f}% on faces, without the old data.")
    return obs


def reproducibility(g):
    """The short provenance section: which teacher, which code, which device, which commands."""
    t = g["teacher"]
    rows = [["Teacher weights (sha256)", file_sha256(os.path.join(g["out"], "teacher", "model.pt")) if t else "none"],
            ["Code", git_commit()], ["PyTorch", torch.__version__]]
    devices = sorted({r["result"]["device"] for runs in [[t] if t else [], *g["students"].values(),
                                                           *g["methods"].values()] for r in runs})
    rows.append(["Device", ", ".join(devices) or "none"])
    cmds = commands(g)
    return [h(1, "Reproducibility"),
            p("Each student and continual-learning run recorded the sha256 of the teacher it learnt from, and a run "
              "made from another teacher is refused. The results were made by the code and on the device of Table "
              "{ref:tab-repro}, with these commands (the Makefile's targets run them, adding the data and output "
              "folders):"),
            table("reproducibility", "tab-repro", "Provenance of the results.", ["", ""], rows, widths=("auto", "1fr")),
            {"kind": "commands", "lines": cmds}]


def commands(g):
    """The scripts' command lines that made the results, rebuilt from the runs' configs (options at their
    default left out; data and output folders too, as they do not change a run)."""
    def line(script, parse, cfg, extra=(), skip=()):
        defaults = vars(parse([]))
        opts = list(extra)
        for k, v in cfg.items():
            if k in defaults and k not in ("data", "out", "faces", "teacher", *skip) and defaults[k] != v:
                v = " ".join(f"{a}:{b:g}" for a, b in v) if k == "ft_layers" else v
                v = " ".join(f"{x:g}" for x in v) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else v
                opts.append(f"--{k.replace('_', '-')} " + (f'"{v}"' if " " in str(v) else str(v)))
        return f"python3 {script} " + " ".join(opts)
    out = []
    if g["teacher"]:
        out.append(line("q1a_teacher.py", q1a.parse, g["teacher"]["config"]))
    first = next((r for r in g["students"].values() if r), None)
    if first:
        out.append(line("q1b_kd.py", q1b.parse, first[0]["config"], ["--table", f"--seeds {len(first)}"], ("T", "lam")))
    if g["sweep"]:
        grid = g["sweep"]["grid"]
        runs = next((r for r in g["sweep"]["cells"].values() if r), None)
        if runs:
            out.append(line("q1b_kd.py", q1b.parse, runs[0]["config"], [
                "--sweep", "--sweep-T " + " ".join(f"{x:g}" for x in grid["T"]),
                "--sweep-lam " + " ".join(f"{x:g}" for x in grid["lam"]), f"--sweep-seeds {grid['seeds']}"], ("T", "lam")))
    cfgs = {}
    for m, runs in g["methods"].items():
        for k, v in (runs[0]["config"] if runs else {}).items():
            cfgs.setdefault(k, v)
    if cfgs:
        n = max(len(r) for r in g["methods"].values())
        faces = [] if cfgs["faces"] == q2.DIGIFACE_URL else ["--faces <the face folder>"]
        cfgs.pop("seed", None)
        cfgs["seed"] = cfgs.pop("split_seed")
        out.append(line("q2_continual.py", q2.parse, cfgs, faces + [f"--seeds {n}"]))
    return out


def wrap_command(cmd, width=100):
    """A shell command broken between its options (with backslashes) into lines of about `width` characters."""
    words, lines = cmd.split(" --"), []
    line = words[0]
    for w in words[1:]:
        if len(line) + len(w) + 3 > width:
            lines.append(line + " \\")
            line = "    --" + w
        else:
            line += " --" + w
    return "\n".join(lines + [line])


def git_commit():
    try:
        commit = subprocess.run(["git", "-C", HERE, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


# =============================================================================
# Rendering: Typst and Markdown
# =============================================================================


def numbering(doc):
    """'tab-kd' -> 'Table 6', ... in document order, as Typst numbers figures (tables, images, listings apart)."""
    counts, names = {}, {"table": "Table", "figure": "Figure", "code": "Listing"}
    out = {}
    for b in doc:
        if b["kind"] in names and b.get("label"):
            counts[b["kind"]] = counts.get(b["kind"], 0) + 1
            out[b["label"]] = f"{names[b['kind']]} {counts[b['kind']]}"
    return out


def unref(text, refs=None):
    """Plain text: {ref:label} -> its number ('6'), Markdown emphasis kept."""
    return re.sub(r"\{ref:([\w-]+)\}", lambda m: (refs or {}).get(m[1], "?").split()[-1], text)


def esc(text):
    """Plain text -> Typst markup: every markup character escaped ('--' would be a dash, '//' a comment)."""
    text = re.sub(r"([\\#*_$@<>\[\]`~;])", r"\\\1", text)
    return text.replace("//", "\\/\\/").replace("/*", "\\/*").replace("--", "-\\-")


def typ_inline(text):
    """The report's inline markup in Typst: {ref:label} -> @label's number, `code`, **bold**, _italic_."""
    out = []
    for part in re.split(r"(\{ref:[\w-]+\}|`[^`]+`|\*\*.+?\*\*|(?<!\w)_[^_]+_(?!\w))", text):
        if not part:
            continue
        if part.startswith("{ref:"):
            out.append(f"#ref(<{part[5:-1]}>, supplement: none)")
        elif part.startswith("`"):
            out.append(part)
        elif part.startswith("**"):
            out.append(f"*{typ_inline(part[2:-2])}*")
        elif part.startswith("_") and part.endswith("_") and len(part) > 2:
            out.append(f"_{typ_inline(part[1:-1])}_")
        else:
            out.append(esc(part))
    return "".join(out)


PREAMBLE = r"""#set document(title: [%(title)s], author: %(author)s)
#set page(paper: "a4", margin: (x: 1.8cm, top: 1.8cm, bottom: 2cm), numbering: "1")
#set text(size: 10pt, lang: "en")
#set par(justify: true)
#set list(indent: 0.6em)
#set enum(indent: 0.6em)
#show heading.where(level: 1): set text(size: 13pt)
#show heading.where(level: 2): set text(size: 11.5pt)
#show heading.where(level: 3): set text(size: 10pt)
#show heading: set block(above: 1.2em, below: 0.7em)
#show raw: set text(font: "DejaVu Sans Mono", size: 6.6pt)
#show figure.where(kind: table): set figure.caption(position: top)
#show figure.where(kind: raw): set figure.caption(position: top)
#show figure.caption: set text(size: 9pt)
#show figure.where(kind: raw): set block(breakable: true)
#set table(stroke: none, inset: (x: 5pt, y: 3pt))
#show table: set par(justify: false)
// Code with the line numbers of its source file (`numbers`: one per line; none: 1, 2, 3, ...); a line
// that follows left-out lines (a docstring) is marked with a vertical ellipsis; long lines wrap beside
// the numbers.
#let code(numbers: none, body) = {
  show raw.line: it => {
    let n = if numbers == none { it.number } else { numbers.at(it.number - 1) }
    let gap = numbers != none and it.number > 1 and numbers.at(it.number - 2) + 1 != n
    box(width: 100%%, grid(columns: (3.6em, 1fr), column-gutter: 0.8em,
      align(right, text(fill: luma(130))[#if gap [⋮#h(0.3em)]#n]), it.body))
  }
  block(fill: luma(246), inset: 5pt, radius: 2pt, width: 100%%, align(left, body))
}
"""


def fence(text):
    ticks = "`" * max(3, max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    return ticks, text


def typst(doc, refs):
    """The report in Typst markup."""
    title = next(b for b in doc if b["kind"] == "title")
    author = f'"{title["author"]}"' if title["author"] and '"' not in title["author"] else "()"
    lines = [PREAMBLE % {"title": esc(TITLE), "author": author}]
    for b in doc:
        k = b["kind"]
        if k == "title":
            blank = lambda v, w: f"[{esc(v)}]" if v else f"box(width: {w}, stroke: (bottom: 0.5pt))[]"  # noqa: E731
            lines += ["#align(center)[",
                      f"  #text(size: 9pt)[{esc(COURSE)}]", "  #v(2pt)",
                      f"  #text(size: 16pt, weight: \"bold\")[{esc(TITLE)}]", "  #v(8pt)",
                      f"  Name: #{blank(b['author'], '6cm')} #h(1.5cm) Student ID: #{blank(b['student_id'], '3.5cm')}",
                      "]", ""]
        elif k == "h":
            if b["level"] <= 2:
                lines += ["#place.flush()"]  # the figures of a question, or of a part, stay with it
            lines += ["=" * b["level"] + " " + typ_inline(b["text"]), ""]
        elif k == "p":
            lines += [typ_inline(b["text"]), ""]
        elif k == "list":
            lines += [("+ " if b["ordered"] else "- ") + typ_inline(t) for t in b["items"]] + [""]
        elif k == "table":
            n = len(b["header"])
            cols = "(" + ", ".join(b["widths"] or ["auto"] * n) + ",)"
            body = [f"  table(columns: {cols}, align: left,", "    table.hline(),"]
            if any(b["header"]):
                body += ["    table.header(" + ", ".join(f"strong[{typ_inline(c)}]" for c in b["header"]) + "),",
                         "    table.hline(stroke: 0.5pt),"]
            for row in b["rows"]:
                body.append("    table.hline(stroke: 0.5pt)," if row == RULE else
                            "    " + ", ".join(f"[{typ_inline(c)}]" for c in row) + ",")
            body += ["    table.hline(),", "  ),"]
            lines += ["#figure(", *body, f"  caption: [{typ_inline(b['caption'])}],", f") <{b['label']}>", ""]
        elif k == "figure":
            lines += [f'#figure(image("figures/{b["name"]}.svg", width: {b.get("width", "100%")}), placement: auto,',
                      f"  caption: [{typ_inline(b['caption'])}],", f") <{b['label']}>", ""]
        elif k == "code":
            body = []
            for part in b["parts"]:
                ticks, text = fence(part["text"])
                numbers = ", ".join(map(str, part["numbers"]))
                body += [f"#code(numbers: ({numbers},))[{ticks}python", text.rstrip("\n"), f"{ticks}]"]
            lines += ["#figure(", "  [", *body, "  ],", f"  caption: [{typ_inline(b['caption'])}],",
                      f") <{b['label']}>", ""]
        elif k == "commands":
            ticks, text = fence("\n".join(wrap_command(c) for c in b["lines"]))
            lines += [f"{ticks}sh", text, ticks, ""]
        elif k == "appendix":
            lines += ["#pagebreak()", "#context [#metadata(here().page()) <appendix-page>]",
                      "= Appendix A: the code", "",
                      "The scripts as they were when this report was made, with their line numbers (the listings "
                      "above give theirs).", ""]
            for name in APPENDIX:
                lang = "make" if name == "Makefile" else "python"
                lines += [f"== {esc(name)}", "", f'#code(raw(read("code/{name}"), lang: "{lang}", block: true))', ""]
    return "\n".join(lines)


def markdown(doc, refs):
    """The report in Markdown, for reading on the web."""
    lines = []
    for b in doc:
        k = b["kind"]
        if k == "title":
            lines += [f"# {TITLE}", "", COURSE, "",
                      f"Name: {b['author'] or '________'} · Student ID: {b['student_id'] or '________'}", ""]
        elif k == "h":
            lines += ["#" * (b["level"] + 1) + " " + b["text"], ""]
        elif k == "p":
            lines += [unref(b["text"], refs), ""]
        elif k == "list":
            lines += [(f"{i}. " if b["ordered"] else "- ") + unref(t, refs) for i, t in enumerate(b["items"], 1)] + [""]
        elif k == "table":
            lines += [f"**{refs[b['label']]}.** {unref(b['caption'], refs)}", "",
                      common.md_table([unref(c, refs) for c in b["header"]],
                                      [[unref(c, refs) for c in row] for row in b["rows"] if row != RULE])]
        elif k == "figure":
            lines += [f"![{refs[b['label']]}](figures/{b['name']}.png)", "",
                      f"*{refs[b['label']]}. {unref(b['caption'], refs)}*", ""]
        elif k == "code":
            lines += [f"**{refs[b['label']]}.** {unref(b['caption'], refs)}", ""]
            for part in b["parts"]:
                lines += ["```python", part["text"].rstrip("\n"), "```", ""]
        elif k == "commands":
            lines += ["```sh", *b["lines"], "```", ""]
        elif k == "appendix":
            lines += ["## Appendix A: the code", "", "The code is in the repository: "
                      + ", ".join(f"`{n}`" for n in APPENDIX) + " (and in the PDF's appendix).", ""]
    return "\n".join(lines)


# =============================================================================
# make report
# =============================================================================

HEADER = "// Written by make report (report.py); sha256 of what follows: {}\n"
NOTE = ("// The report of the runs in this folder. Edit it as you like: once it differs from what make report\n"
        "// wrote, make report leaves it alone and writes report.new.typ beside it. Compile it with the typst\n"
        "// package (python -m typst compile report.typ) or at typst.app, with figures/ and code/ beside it.\n\n")


def written(path):
    """Whether the .typ at `path` is as make report wrote it (its header's hash matches), or absent."""
    if not os.path.exists(path):
        return True
    with open(path, encoding="utf-8", errors="replace") as f:
        first, rest = f.readline(), f.read()
    m = re.fullmatch(r"// Written by make report \(report\.py\); sha256 of what follows: ([0-9a-f]{64})\n", first)
    return bool(m) and hashlib.sha256(rest.encode()).hexdigest() == m[1]


def compile_pdf(typ, pdf, root):
    """typ -> pdf with the typst package (atomic), or None with the reason when it cannot."""
    try:
        import typst
    except ImportError:
        return "the typst package is not installed (pip install typst)"
    try:
        common._atomic(lambda tmp: typst.compile(typ, output=tmp, root=root, format="pdf"), pdf)
    except Exception as e:  # typst reports a bad document as its own error, with the line
        return f"typst could not compile it ({str(e).strip().splitlines()[0][:300]})"
    return None


def main(argv=None):
    p_ = Parser(description=__doc__)
    p_.add_argument("--out", default="out")
    p_.add_argument("--author", default="", help="the student's name on the title page (empty: a line to fill in)")
    p_.add_argument("--student-id", default="", help="the student's ID on the title page")
    args = p_.parse_args(argv)
    out = args.out
    if not os.path.isdir(out):
        die(f"{out} does not exist: nothing has been run yet (make teacher, make all or make demo)")
    g = gather(out)
    doc = document(g, args.author, args.student_id)
    refs = numbering(doc)
    tables = [b for b in doc if b["kind"] == "table" and b["name"] != "reproducibility"]
    write_tables(out, tables)
    os.makedirs(os.path.join(out, "code"), exist_ok=True)
    for name in APPENDIX:
        shutil.copyfile(os.path.join(HERE, name), os.path.join(out, "code", name))
    body = NOTE + typst(doc, refs)
    text = HEADER.format(hashlib.sha256(body.encode()).hexdigest()) + body
    typ = os.path.join(out, "report.typ")
    if not written(typ):
        typ = os.path.join(out, "report.new.typ")
        print(f"{out}/report.typ was edited since make report wrote it: kept as it is; the new report is {typ}")
    write_text(typ, text)
    write_text(os.path.join(out, "report.md"), markdown(doc, refs))
    pdf = typ[:-len(".typ")] + ".pdf"
    why = compile_pdf(typ, pdf, out)
    todo = [b["text"] for b in doc if b["kind"] == "p" and b["text"].startswith("_Not run yet")]
    print(f"\n== report: {typ}, {out}/report.md" + (f", {pdf}" if not why else "")
          + (f" ({len(todo)} part(s) not run yet)" if todo else ""))
    if why:
        print(f"no PDF: {why}; compile {typ} with `typst compile {typ}` or at typst.app")
    for t in tables:
        if t["name"] in ("teacher_accuracy", "kd_table", "kd_sweep", "continual_table", "lwf_sweep"):
            print(f"\n{unref(t['caption'], refs)}\n" + common.md_table([unref(c) for c in t["header"]],
                                                                    [[unref(c) for c in r] for r in t["rows"]]))


if __name__ == "__main__":
    run(main)
