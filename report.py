"""make report: the hand-in, from what the runs under OUT recorded (config, history and result .json). The prose
is report.typ's, written once; this gathers the runs, computes the tables, the statistics and the sentences that
depend on them, draws the figures and compiles: OUT/report.json (what report.typ reads), OUT/report.typ (a copy to
edit: once edited, make report leaves it and its report.json alone and writes report.new.typ, .json and .pdf),
OUT/report.pdf (typst, offline), OUT/tables/ (Markdown, LaTeX, per-seed CSV) and OUT/figures/ (SVG, PNG).
"""
import ast
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import textwrap

import torch

import common
import q1b_kd as q1b
import q2_continual as q2
from machinery import HEADER, Parser, die, file_sha256, md_table, pct, read_json, run, write_tables, write_text, written

HERE = os.path.dirname(os.path.abspath(__file__))
APPENDIX = ["q1a_teacher.py", "q1b_kd.py", "q2_continual.py", "common.py", "Makefile"]
PRECISION = {"fp32": "32-bit floating point", "bf16": "bfloat16 mixed precision (autocast), 32-bit weights",
             "fp16": "float16 mixed precision (autocast) with loss scaling, 32-bit weights"}
RESULT_KEYS = ("old_train_acc", "old_test_acc", "new_train_acc", "new_test_acc", "old_train_acc_before",
               "old_test_acc_before")
WORDS = {"fe": "feature extraction", "ft": "fine-tuning", "lwf": "LwF", "joint": "joint training",
         "ft-all": "fine-tuning every layer"}


# ----------------------------------------------------------------------------- the runs, as they recorded themselves
def load(folder):
    """A finished run: {'config', 'history', 'result'}, or None."""
    if os.path.exists(os.path.join(folder, "result.json")):
        return {k: read_json(os.path.join(folder, f"{k}.json")) for k in ("config", "history", "result")}


def seeds(folder):
    """Every finished seed of a run: folder, folder_seed1, ... (up to the first missing one)."""
    runs = []
    while run_ := load(folder + (f"_seed{len(runs)}" if runs else "")):
        runs.append(run_)
    return runs


def gather(out):
    """The teacher, the KD table's students, the sweep, the Q2 methods and the LwF λo sweep: each a list of its
    seeds' runs (empty when not run)."""
    kd, cl = os.path.join(out, "kd"), os.path.join(out, "continual")
    g = {"out": out, "teacher": load(os.path.join(out, "teacher")), "sweep": None, "lwf_sweep": {},
         "students": {label: seeds(os.path.join(kd, q1b.name(T, lam))) for label, T, lam in q1b.TABLE},
         "methods": {m: seeds(os.path.join(cl, m)) for m in q2.METHODS}}
    if os.path.exists(os.path.join(kd, "sweep.json")):
        grid = read_json(os.path.join(kd, "sweep.json"))
        g["sweep"] = {"grid": grid, "cells": {(T, lam): seeds(os.path.join(kd, q1b.name(T if lam else 1.0, lam)))
                                              for T in grid["T"] for lam in grid["lam"]}}
    if g["methods"]["lwf"] and os.path.isdir(cl):
        lams = [float(d[7:]) for d in os.listdir(cl) if re.fullmatch(r"lwf_lam[0-9.e+-]+", d)]
        sweep = {v: seeds(os.path.join(cl, f"lwf_lam{v:g}")) for v in lams}
        sweep[g["methods"]["lwf"][0]["config"]["lwf_lambda"]] = g["methods"]["lwf"]
        g["lwf_sweep"] = {v: r for v, r in sorted(sweep.items()) if r} if lams else {}
    return g


# ----------------------------------------------------------------------------- numbers with their uncertainty
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
    if bad := [r["result"]["diverged"] for r in runs if "diverged" in r["result"]]:
        return [bad[0] if len(runs) == 1 else f"{len(bad)} of {len(runs)} seeds diverged ({bad[0]})"] * len(keys)
    return [mean_sd([r["result"][k] for r in runs]) for k in keys]


def difference(a, b):
    """(mean of a - mean of b, its standard error or None): a, b per-seed values; a single value is a fixed
    reference (the one teacher), whose spread is not part of the error."""
    (ma, sa, na), (mb, sb, nb) = stats(a), stats(b)
    return ma - mb, None if sa is None and sb is None else math.sqrt((sa or 0) ** 2 / na + (sb or 0) ** 2 / nb)


def verdict(a, b, bound=None):
    """+1, -1 or 0 (within noise): a against b, at two standard errors of the seeds or, from one seed, `bound`."""
    d, se = difference(a, b)
    limit = 2 * se if se is not None else bound
    return 0 if limit is None or abs(d) < limit else (1 if d > 0 else -1)


def compared(a, b):
    """'+2.00 ± 0.50 points, more than two standard errors', '... within noise', or '+2.00 points' from one seed."""
    d, se = difference(a, b)
    return f"{d:+.2f} points" if se is None else \
        f"{d:+.2f} ± {se:.2f} points, " + ("within noise" if abs(d) < 2 * se else "more than two standard errors")


def accs(runs, key="test_acc"):
    return [r["result"][key] for r in runs if "diverged" not in r["result"]]


def two_se(p, n_test):
    """Two binomial standard errors of a difference of two accuracies near p (a fraction) on n_test images."""
    return 2 * 100 * math.sqrt(2 * p * (1 - p) / n_test)


def noise_note(n, n_test, p):
    """What one seed or n seeds let a reader conclude, said once per discussion."""
    if n > 1:
        return (f"Each number is the mean ± standard deviation over {n} seeds, each difference ± its standard error; "
                "a difference under two standard errors is within noise.")
    return (f"Each run was made with one seed, so seed-to-seed noise is unknown; the test set's own noise is the "
            f"yardstick: two standard errors of a difference of two accuracies near {100 * p:.0f}% on these "
            f"{n_test:,} test images are {two_se(p, n_test):.1f} points, and a smaller difference is within noise.")


def joined(words):
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


# ----------------------------------------------------------------------------- tables and the words of the setup
def table(name, caption, header, rows, widths=None, csv_rows=None, bold=()):
    """A table of report.json, written to out/tables/<name>.{md,tex,csv} too. A row ["---"] is a rule."""
    return {"name": name, "caption": caption, "header": header, "rows": rows, "widths": widths, "csv": csv_rows,
            "bold": [list(b) for b in bold]}


def setup_words(cfg, runs, teacher=None):
    """The words of a setup table that depend on a run's config: schedule, steps per epoch, precision, seeds."""
    w, first = cfg.get("warmup", 0), runs[0]["config"]["seed"]
    images = (teacher or runs[0])["result"].get("train_images", 50000)
    return {"cfg": cfg, "precision": PRECISION[cfg.get("precision", "fp32")], "steps": max(1, images // cfg["batch"]),
            "schedule": (f"linear warm-up to {cfg['lr']:g} over {w} epoch{'s' * (w != 1)}, then " if w else
                         f"from {cfg['lr']:g}, ") + "cosine decay to 0, updated after every step",
            "seeds": f"one (seed {first})" if len(runs) == 1 else f"{len(runs)} (seeds {first}-{first + len(runs) - 1}):"
                     " initial weights, data order and augmentation; one teacher"}


def data_words(teacher):
    r = teacher["result"]
    sizes = f"{r.get('train_images', 50000):,} training and {r.get('test_images', 10000):,} test images"
    return {"official": f"CIFAR-10: {sizes}", "other": f"CIFAR-10 images, not the official files: {sizes}",
            "synthetic": f"a synthetic substitute for CIFAR-10 (not the real images): {sizes}"
            }[r.get("cifar10_source", "official")]


def teacher_part(g):
    t = g["teacher"]
    r, times = t["result"], lambda c: re.sub(r"(?<=\d)x(?=\d)", "×", c or "")
    changes = common.stride_changes(32)
    rows = [[times(c) for i, c in enumerate(row) if i != 1] for row in changes if row[2]] + [["---"]]
    rows += [[times(row[0]), "", "", "", times(row[5]), times(row[6])] for row in changes
             if not row[2] and row[1].startswith("layer")]
    common.plot_curves([("", [t["history"]])], os.path.join(g["out"], "figures", "teacher"), "cross-entropy", svg=True)
    return setup_words(t["config"], [t], t) | {
        "data": data_words(t), "listing": listing("The teacher: torchvision's ResNet18, three strides changed",
                                                  common.teacher_resnet18),
        "changes": table("teacher_changes", "Changes to ResNet18 for 32×32 inputs: the layers whose stride changed, "
                         "then each stage's output (H×W×C, measured by running both networks on a 32×32×3 input).",
                         ["Layer", "Kernel", "Original", "New", "Output before", "Output after"], rows),
        "accuracy": table("teacher_accuracy", f"Teacher: final accuracy (epoch {r['epochs']}, the last points of the "
                          "curves).", ["Training Accuracy (%)", "Testing Accuracy (%)"],
                          [[pct(r["train_acc"]), pct(r["test_acc"])]]),
        "test": pct(r["test_acc"]), "train": pct(r["train_acc"]), "passed": r["test_acc"] >= 90,
        "gap": f"{r['train_acc'] - r['test_acc']:+.2f}"}


def student_layers(bn):
    """The student's layers with output sizes and parameters, measured by running it on a 32×32×3 input."""
    model, rows, x, stage, params = common.StudentCNN(bn=bn).eval(), [], torch.zeros(1, 3, 32, 32), 0, 0
    size, count = (lambda x: f"{x.shape[2]}×{x.shape[3]}×{x.shape[1]}"), (lambda m: sum(q.numel() for q in m.parameters()))
    with torch.no_grad():
        for m in model.features:
            x, params = m(x), params + count(m)
            if isinstance(m, torch.nn.Conv2d):
                stage, conv, out = stage + 1, (f"conv {m.kernel_size[0]}×{m.kernel_size[0]}, {m.out_channels} filters, "
                                               f"stride {m.stride[0]}, pad {m.padding[0]}, " + "BatchNorm, " * bn + "ReLU"), size(x)
            if isinstance(m, torch.nn.MaxPool2d):
                rows += [[f"{stage}", conv, out, f"{params:,}"],
                         ["", f"max-pool {m.kernel_size}×{m.kernel_size}, stride {m.stride}, pad {m.padding}", size(x), ""]]
                params = 0
    fc1, fc2 = model.classifier[0], model.classifier[-1]
    rows += [["4", f"fully connected {fc1.in_features:,}→{fc1.out_features}, ReLU", f"{fc1.out_features}", f"{count(fc1):,}"],
             ["5", f"fully connected {fc2.in_features}→10, softmax (in the loss)", "10", f"{count(fc2):,}"]]
    return rows, count(model), fc1.in_features, count(fc1)


def kd_part(g):
    t, students = g["teacher"], g["students"]
    first = next(runs for runs in students.values() if runs)
    cfg = first[0]["config"]
    layers, n_params, fc1_in, fc1_params = student_layers(bool(cfg["bn"]))
    rows = [["Teacher Network (Part A)", "-", "-", pct(t["result"]["train_acc"]), pct(t["result"]["test_acc"])]]
    per_seed = [["Teacher Network (Part A)", "", "", "", t["result"]["train_acc"], t["result"]["test_acc"], ""]]
    for label, T, lam in q1b.TABLE:
        runs = students[label]
        rows.append([label, f"{T:g}" if lam else "-", f"{lam:g}", *(cells(runs, ("train_acc", "test_acc")) if runs
                                                                   else ["not run yet (make kd-table)"] * 2)])
        per_seed += [[label, T, lam, r["result"]["seed"], r["result"]["train_acc"], r["result"]["test_acc"],
                      r["result"].get("diverged", "")] for r in runs]
    common.plot_curves([(label + (f", T = {T:g}" if lam else "") + ": ", [r["history"] for r in students[label]])
                        for label, T, lam in q1b.TABLE if students[label]], os.path.join(g["out"], "figures", "kd_students"),
                       "loss", ("test",), height=1.55, svg=True)
    return setup_words(cfg, first, t) | {
        "lr_default": q1b.parse([]).lr, "params": f"{n_params:,}", "fc1_in": f"{fc1_in:,}", "soft": soft_targets(g), "discussion": q1_discussion(g),
        "fc1_m": f"{fc1_params / 1e6:.1f}", "params_m": f"{n_params / 1e6:.1f}",
        "student": table("kd_student", "Student network (output sizes measured by running it).",
                         ["Stage", "Layer", "Output", "Parameters"], layers),
        "table": table("kd_table", "Knowledge distillation: final accuracy (last epoch; test at T = 1)" + (
            f", mean ± standard deviation over {len(first)} seeds." if len(first) > 1 else "."),
            ["Model", "Temperature, T", "λ", "Training Accuracy (%)", "Testing Accuracy (%)"], rows,
            csv_rows=(["model", "T", "lam", "seed", "train_acc", "test_acc", "diverged"], per_seed)),
        "listings": {"student": listing("The student", common.StudentCNN),
                     "loss": listing("The KD loss: one call to kd_loss per student", q1b.distill_loss, common.soft_targets,
                                     common.kd_loss)}}


def soft_targets(g):
    """Q1B (1): the teacher's soft targets at the table's temperatures (recorded by q1b_kd.py on the test set)."""
    path = os.path.join(g["out"], "kd", "soft_targets.json")
    if not os.path.exists(path):
        return None
    st = read_json(path)
    temps = [k for k in st if k != "label"]
    fig, axes = common.pyplot().subplots(1, len(temps), figsize=(6.6, 2.3), sharey=True)
    for ax, T in zip(axes, temps):
        ax.bar(range(10), st[T]["example"], color=["C1" if c == st["label"] else "C0" for c in range(10)])
        ax.set(title=f"T = {T}", xticks=range(10))
        ax.set_xticklabels(common.CIFAR_CLASSES, rotation=90)
    axes[0].set_ylabel("probability")
    common.save(fig, os.path.join(g["out"], "figures", "kd_soft_targets"))
    return table("kd_soft_targets", "The teacher's soft targets softmax(t/T) on the test set: mean probability of its "
                 "top class and of the true class, and mean entropy as a fraction of the uniform distribution's.",
                 ["T", "Top class (%)", "True class (%)", "Entropy"],
                 [[T, f"{100 * st[T]['top']:.1f}", f"{100 * st[T]['true']:.1f}", f"{st[T]['entropy']:.2f}"] for T in temps])


def best_cell(sweep):
    ok = {k: accs(v) for k, v in sweep["cells"].items() if v and len(accs(v)) == len(v)}
    return max(ok, key=lambda k: stats(ok[k])[0], default=None), ok


def sweep_part(g):
    sweep = g["sweep"]
    grid, (best, ok) = sweep["grid"], best_cell(sweep)
    rows = [[f"{T:g}"] + [(mean_sd(ok[T, lam]) if (T, lam) in ok else cells(sweep["cells"][T, lam], ["test_acc"])[0])
                          if sweep["cells"][T, lam] else "not run" for lam in grid["lam"]] for T in grid["T"]]
    epochs = next(r for v in sweep["cells"].values() for r in v)["result"]["epochs"]
    return {"discussion": bonus_discussion(g), "table": table(
        "kd_sweep", f"Bonus: student test accuracy (%) over T and λ, {epochs} epoch{'s' * (epochs != 1)} per student"
        + (f", mean ± standard deviation over {grid['seeds']} seeds" if grid["seeds"] > 1 else "") + "; the best in bold.",
        ["T \\ λ"] + [f"{lam:g}" for lam in grid["lam"]], rows,
        bold=[(grid["T"].index(best[0]), 1 + grid["lam"].index(best[1]))] if best else [],
        csv_rows=(["T", "lam", "seed", "test_acc", "diverged"], [[T, lam, r["result"]["seed"], r["result"]["test_acc"],
                                                                  r["result"].get("diverged", "")]
                                                                 for (T, lam), v in sweep["cells"].items() for r in v]))}


def q2_part(g):
    methods = g["methods"]
    ref = next(runs for runs in methods.values() if runs)
    cfg, rows, per_seed = ref[0]["config"], [], []
    for m, label in q2.METHODS.items():
        rows += [["References beyond the assignment", "", "", ""]] if m == "joint" else []
        for task in ("old", "new"):
            rows.append([label if task == "old" else "", "Old Task*" if task == "old" else "New Task",
                         *(cells(methods[m], (f"{task}_train_acc", f"{task}_test_acc")) if methods[m]
                           else [f"not run yet (make {m})"] * 2)])
        per_seed += [[label, r["result"]["seed"], *(r["result"][k] for k in RESULT_KEYS)] for r in methods[m]]
    before, ft, sweep = ref[0]["result"], methods["ft"] and methods["ft"][0]["config"], g["lwf_sweep"]
    q2_figures(g)
    return setup_words(cfg, ref, g["teacher"]) | {
        "steps": cfg["subjects"] * cfg["train_per_subject"] // cfg["batch"], "old": data_words(g["teacher"]),
        "faces": "DigiFace-1M (synthetic faces, Bae et al. 2023)" if cfg["faces"] == q2.DIGIFACE_URL or
                 cfg["faces"].endswith(".zip") else "the face images given for the run",
        "subjects": cfg["subjects"], "test_per": cfg["per_subject"] - cfg["train_per_subject"],
        "runs": {m: bool(r) for m, r in methods.items()}, "lwf": methods["lwf"] and methods["lwf"][0]["config"],
        "ft_all_lr": methods["ft-all"] and methods["ft-all"][0]["config"]["ft_all_lr"], "discussion": q2_discussion(g),
        "ft_layers": ft and joined([f"{layer} at {rate:g}%" for layer, rate in ft["ft_layers"]]),
        "ft_conv5": bool(ft) and any(x.startswith("conv5") for x, _ in ft["ft_layers"]),
        "ft_below": bool(ft) and max(rate for _, rate in ft["ft_layers"]) < 100,
        "ft": ft and table("finetune_layers", "Fine-tuning: the layers chosen and their learning rates.",
                           ["Conv layers that you choose to fine-tune", "Learning Rate (x% of the original)", "Remark"],
                           [[layer, f"{rate:g}% ({ft['lr'] * rate / 100:g})", "fine-tuned; BatchNorm statistics "
                             + ("adapt" if ft.get("adapt_bn") else "frozen")] for layer, rate in ft["ft_layers"]]
                           + [[f"new FC + softmax, {ft['subjects']} outputs", f"100% ({ft['lr']:g})", "trained from "
                               "scratch"], ["every other layer, old head", "0%", "frozen"]], [1.3, 1, 1.3]),
        "table": table("continual_table", "Continual learning: final accuracy (last epoch)" + (
            f", mean ± standard deviation over {len(ref)} seeds" if len(ref) > 1 else "") + ". *Old task: CIFAR-10 "
            "through the old head after the network was changed for faces; before any change the teacher scores "
            f"{pct(before['old_train_acc_before'])}% (training) and {pct(before['old_test_acc_before'])}% (test).",
            ["Method", "Task", "Training Accuracy (%)", "Testing Accuracy (%)"], rows, bold=[(6, 0)],
            csv_rows=(["method", "seed", *RESULT_KEYS], per_seed)),
        "lwf_sweep": sweep and table(
            "lwf_sweep", "LwF's trade-off over λo (λo = 0: every layer fine-tuned at LwF's rates, after its warm-up), "
            "test accuracy (%).", ["λo", "Old task", "New task"],
            [[f"{v:g}", *cells(r, ("old_test_acc", "new_test_acc"))] for v, r in sweep.items()],
            csv_rows=(["lambda_o", "seed", *RESULT_KEYS], [[v, r["result"]["seed"], *(r["result"][k] for k in RESULT_KEYS)]
                                                           for v, runs in sweep.items() for r in runs])) or None,
        "listings": {"net": listing("The two-headed network", common.ContinualNet),
                     "methods": listing("What each method trains", q2.trained_layers),
                     "lwf": listing("LwF's two stages and its loss", q2.train_method, common.lwf_loss)}}


# ----------------------------------------------------------------------------- the sentences that depend on results
def q1_discussion(g):
    """The discussion of Q1B (4): one conclusion per comparison, each against the noise."""
    t, students = g["teacher"], g["students"]
    acc = {label: accs(runs) for label, runs in students.items() if runs and accs(runs)}
    if not acc:
        return ["Every student diverged: there is nothing to compare."]
    n, n_test = max(len(r) for r in students.values()), t["result"].get("test_images", 10000)
    typical = stats([v for a in acc.values() for v in a])[0] / 100
    bound, base, lam1 = two_se(typical, n_test) if n == 1 else None, q1b.TABLE[0][0], q1b.TABLE[1][0]
    kd = [(label, T) for label, T, lam in q1b.TABLE if lam == 0.1 and label in acc]
    best = max(acc, key=lambda k: stats(acc[k])[0])
    v, teacher = verdict(acc[best], [t["result"]["test_acc"]], bound), [t["result"]["test_acc"]]
    out = [noise_note(n, n_test, typical), f"The teacher reaches {pct(teacher[0])}% on the test set and the best "
           f"student, {best}, {mean_sd(acc[best])}% ({compared(acc[best], teacher)}): " + (
               "every student stays below the teacher." if v < 0 else "the best student matches the teacher within "
               "noise." if v == 0 else f"a student above its teacher, which only a weak teacher allows: this one "
               f"trained {t['config']['epochs']} epochs" + ("" if t["config"]["pretrained"] else " from random weights")
               + ".") + " The student has "
           f"{STUDENT_PARAMS / TEACHER_PARAMS:.1f} times the teacher's parameters but three convolutions against "
           "seventeen: almost all its weights sit in one fully connected layer bound to positions in the image."]
    by = {}
    for label, a in acc.items():
        by.setdefault(mean_sd(a), []).append(label)
    out += [f"{joined(names)} tie at {value}%." for value, names in by.items() if len(names) > 1]
    if base in acc and kd:
        vs = {label: verdict(acc[label], acc[base], bound) for label, _ in kd}
        out.append(f"Against the student trained on the labels alone (λ = 0, {mean_sd(acc[base])}%), the KD students at "
                   "λ = 0.1 differ by " + "; ".join(f"{label} (T = {T:g}) {compared(acc[label], acc[base])}"
                                                   for label, T in kd) + ": " + (
            "none of these differences is beyond the noise, so these runs show no effect of the soft targets at "
            "λ = 0.1." if not any(vs.values()) else "every KD student does better than the labels alone: the soft "
            "targets help." if all(x > 0 for x in vs.values()) else "every KD student does worse than the labels "
            "alone." if all(x < 0 for x in vs.values()) else f"only {joined([k for k, x in vs.items() if x])} "
            "differs beyond the noise."))
        steps = [(a, ta, b, tb) for (a, ta), (b, tb) in zip(kd, kd[1:])]
        if steps:
            out.append("Between the temperatures at λ = 0.1, " + ("no step from one to the next is beyond the noise: "
                       "these runs cannot rank them." if not any(verdict(acc[b], acc[a], bound) for a, _, b, _ in steps)
                       else "; ".join(f"T = {tb:g} against T = {ta:g} {compared(acc[b], acc[a])}"
                                      for a, ta, b, tb in steps) + "."))
    if lam1 in acc and base in acc:
        v = verdict(acc[lam1], acc[base], bound)
        out.append(f"The student taught by the soft targets alone (λ = 1, T = 20) reaches {mean_sd(acc[lam1])}%, "
                   f"{compared(acc[lam1], acc[base])} from λ = 0: the teacher's distribution alone teaches " + (
                       "as well as the labels, within noise." if v == 0 else "better than the labels." if v > 0 else
                       "less than the labels do."))
    gaps = {label: [r["result"]["train_acc"] - r["result"]["test_acc"] for r in students[label]
                    if "diverged" not in r["result"]] for label in acc}
    if base in gaps and kd:
        narrower = all(verdict(gaps[base], gaps[label], bound) > 0 for label, _ in kd)
        kd_gaps = [stats(gaps[label])[0] for label, _ in kd]
        out.append(f"Training minus test accuracy is {stats(gaps[base])[0]:+.1f} points for λ = 0 and "
                   f"{min(kd_gaps):+.1f} to {max(kd_gaps):+.1f} for the KD students" + (
                       ": the soft targets narrow the gap beyond the noise, acting as a regulariser, as Hinton et al. "
                       "observed." if narrower else ", a difference within the noise."))
    if all(len(students[k][0]["history"]) > 1 and all(r["history"][-1]["test_acc"] > r["history"][-2]["test_acc"]
                                                       for r in students[k]) for k in acc):
        out.append("Every student's test accuracy still rose in its last epoch: the table compares students part of "
                   "the way through their training, not converged ones.")
    return out


def bonus_discussion(g):
    sweep, t = g["sweep"], g["teacher"]["result"]
    best, ok = best_cell(sweep)
    if best is None:
        return ["Every student of the sweep diverged: none can be compared with the teacher."]
    v, grid = ok[best], sweep["grid"]
    epochs = next(r for runs in sweep["cells"].values() for r in runs)["result"]["epochs"]
    table_epochs = next((runs[0]["result"]["epochs"] for runs in g["students"].values() if runs), None)
    reach = verdict(v, [t["test_acc"]], two_se(stats(v)[0] / 100, t.get("test_images", 10000)) if len(v) == 1 else None)
    return [f"The sweep trained {len(ok)} students over T ∈ {{{', '.join(f'{x:g}' for x in grid['T'])}}} and λ ∈ "
            f"{{{', '.join(f'{x:g}' for x in grid['lam'])}}}. The best cell, T = {best[0]:g} and λ = {best[1]:g}, "
            f"reaches {mean_sd(v)}%, {compared(v, [t['test_acc']])} from the teacher's {pct(t['test_acc'])}%: the "
            f"student {'does not reach' if reach < 0 else 'reaches'} the teacher" + (" within noise." if reach == 0 else "."),
            *([f"The sweep's students trained {epochs} epoch{'s' * (epochs != 1)}, the table's {table_epochs}: the "
               "sweep's cells compare only with each other."] if table_epochs and epochs != table_epochs else []),
            f"That cell was picked as the best of {len(ok)} on the test set itself, which flatters it: an unbiased "
            "estimate would choose the cell on a validation split of the training images, then measure it once."]


def q2_discussion(g):
    """The discussion of Q2 (4): what each method keeps and learns, each comparison against the noise."""
    runs, sweep = {m: r for m, r in g["methods"].items() if r}, g["lwf_sweep"]
    ref = next(iter(runs.values()))
    cfg, before = ref[0]["config"], ref[0]["result"]["old_test_acc_before"]
    n, n_test = max(len(r) for r in runs.values()), g["teacher"]["result"].get("test_images", 10000)
    faces_test = cfg["subjects"] * (cfg["per_subject"] - cfg["train_per_subject"])
    task = {"old": lambda m: accs(runs[m] if m in runs else sweep[m], "old_test_acc"),
            "new": lambda m: accs(runs[m] if m in runs else sweep[m], "new_test_acc")}
    p = {k: stats([v for m in runs for v in task[k](m)])[0] / 100 for k in task}
    bound = {"old": two_se(p["old"], n_test), "new": two_se(p["new"], faces_test)} if n == 1 else {"old": None, "new": None}
    old, new = task["old"], task["new"]
    out = [noise_note(n, n_test, p["old"]) + (f" The face test set is smaller, {faces_test:,} images: there two "
                                              f"standard errors of a difference near {100 * p['new']:.0f}% are "
                                              f"{bound['new']:.1f} points." if n == 1 else "")]
    if "fe" in runs:
        same = all(r["result"]["old_test_acc"] == r["result"]["old_test_acc_before"] for r in runs["fe"])
        out.append((f"As it must by construction, feature extraction keeps the old task exactly ({pct(before)}% before "
                    "and after): this confirms that the backbone, its BatchNorm statistics and the old head stayed "
                    "frozen, and is not an experimental finding." if same else f"Feature extraction changed the old "
                    f"task ({pct(before)}% before, {mean_sd(old('fe'))}% after), which frozen weights cannot do: these "
                    "runs are not to be trusted.") + f" On faces it reaches {mean_sd(new('fe'))}%.")
    if keep := [f"{WORDS[m]} {mean_sd(new(m))}% on faces, keeping {mean_sd(old(m))}% of CIFAR-10 "
                f"({compared(old(m), [before])})" for m in runs if m != "fe"]:
        out.append("At the end: " + "; ".join(keep) + ".")
    for k, what in (("new", "on faces"), ("old", "on CIFAR-10")):
        by = {}
        for m in runs:
            by.setdefault(mean_sd(task[k](m)), []).append(WORDS[m])
        out += [f"{joined(names)[0].upper() + joined(names)[1:]} tie {what} at {v}%." for v, names in by.items() if len(names) > 1]
    for a, b in (("ft", "fe"), ("lwf", "ft"), ("lwf", 0.0), ("lwf", "ft-all"), ("joint", "lwf")):
        if a in runs and (b in runs or b in sweep):
            vo, vn = (verdict(task[k](a), task[k](b), bound[k]) for k in ("old", "new"))
            name = "the same training without its old-task term (λo = 0)" if b == 0.0 else WORDS[b]
            out.append(f"{WORDS[a][0].upper() + WORDS[a][1:]} against {name}: old task {compared(old(a), old(b))}, new "
                       f"task {compared(new(a), new(b))}: " + ("within noise on both tasks." if not (vo or vn) else
                       f"it keeps {['as much of CIFAR-10, within noise,', 'more of CIFAR-10', 'less of CIFAR-10'][vo]} "
                       f"and learns the faces {['as well, within noise', 'better', 'worse'][vn]}.") + (" This is the comparison that isolates LwF's term." if b == 0.0 else ""))
            if (a, b) == ("lwf", "ft"):
                ft, lw = runs["ft"][0]["config"], runs["lwf"][0]["config"]
                out.append(f"That comparison mixes more than LwF's old-task term: fine-tuning trains "
                           f"{joined([x for x, _ in ft['ft_layers']])} from the first epoch, LwF every layer at "
                           f"{lw['lwf_lr']:g}% after a warm-up of {lw['lwf_warmup']} epoch{'s' * (lw['lwf_warmup'] != 1)}.")
    if "ft-all" in runs and (gap := stats([r["result"]["new_train_acc"] - r["result"]["new_test_acc"]
                                           for r in runs["ft-all"]])[0]) > 10:
        out.append(f"Fine-tuning every layer fits the face training images {gap:.1f} points better than the test "
                   "images: with all its weights free and few images per subject, it overfits.")
    if all(m in runs for m in ("fe", "ft", "lwf")):
        m = {k: (stats(old(k))[0], stats(new(k))[0]) for k in ("fe", "ft", "lwf")}
        claims = {"feature extraction keeps the most of CIFAR-10": verdict(old("fe"), old("lwf"), bound["old"]) > 0,
                  "LwF keeps more of it than fine-tuning": verdict(old("lwf"), old("ft"), bound["old"]) > 0,
                  "fine-tuning learns the faces better than feature extraction": verdict(new("ft"), new("fe"), bound["new"]) > 0}
        shown, unshown = [c for c, ok in claims.items() if ok], [c for c, ok in claims.items() if not ok]
        out.append("In short, " + (
            f"the assignment's three methods trade one task for the other: feature extraction keeps CIFAR-10 "
            f"({m['fe'][0]:.1f}%) and learns faces least ({m['fe'][1]:.1f}%), fine-tuning learns faces "
            f"({m['ft'][1]:.1f}%) and forgets CIFAR-10 ({m['ft'][0]:.1f}%), and LwF keeps more of CIFAR-10 than "
            f"fine-tuning ({m['lwf'][0]:.1f}%) for {m['lwf'][1]:.1f}% on faces, without the old data." if not unshown else
            (f"these runs show that {joined(shown)}, but not, beyond the noise, that " if shown else "these runs do not "
             "show, beyond the noise, that ") + joined(unshown) + "."))
    return out


# ----------------------------------------------------------------------------- figures: out/figures/<name>.svg and .png
def q2_figures(g):
    """Each method's curves (the new task's loss; accuracy on both tasks, per epoch), and the forgetting figure."""
    methods, both = g["methods"], ("train", "test", "old_train", "old_test")
    for name, ms in (("fe", ["fe"]), ("ft", ["ft"]), ("lwf", ["lwf"]), ("references", ["joint", "ft-all"])):
        if rows := [(f"{WORDS[m]}: " if len(ms) > 1 else "", [r["history"] for r in methods[m]]) for m in ms if methods[m]]:
            common.plot_curves(rows, os.path.join(g["out"], "figures", f"q2_{name}"), "loss", both, svg=True)
    fig, (a, b) = common.pyplot().subplots(1, 2, figsize=(6.6, 3.0))
    for m, label in q2.METHODS.items():
        if runs := methods[m]:
            label = label.replace(" (reference)", "*")
            common.band(a, [0] + [e["epoch"] for e in runs[0]["history"]],
                        [[r["result"]["old_test_acc_before"]] + [e["old_test_acc"] for e in r["history"]] for r in runs], label)
            (mo, so, _), (mn, sn, _) = stats(accs(runs, "old_test_acc")), stats(accs(runs, "new_test_acc"))
            b.errorbar(mn, mo, xerr=sn or 0, yerr=so or 0, fmt="o", capsize=3, label=label)
    if g["lwf_sweep"]:
        pts = [(stats(accs(r, "new_test_acc"))[0], stats(accs(r, "old_test_acc"))[0]) for r in g["lwf_sweep"].values()]
        b.plot(*zip(*pts), "k--", lw=1, label="LwF over λo")
        for v, pt in zip(g["lwf_sweep"], pts):
            b.annotate(f"λo={v:g}", pt, textcoords="offset points", xytext=(3, 3), fontsize=7)
    a.set(title="(a) old task while learning faces", xlabel="epoch", ylabel="CIFAR-10 test accuracy (%)")
    b.margins(0.15)
    b.set(title="(b) what each method keeps and learns", xlabel="faces: test accuracy (%)", ylabel="CIFAR-10 test (%)")
    common.integer_epochs(a)
    fig.legend(*b.get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=7, frameon=False)
    common.save(fig, os.path.join(g["out"], "figures", "q2_forgetting"))


# ----------------------------------------------------------------------------- listings, provenance
def listing(caption, *objects):
    """Where the source of functions or classes lies, for report.typ to read(): {caption, parts: [{file, spans}]},
    docstrings left out (the text around the listing says what they would)."""
    parts = []
    for obj in objects:
        lines, first = inspect.getsourcelines(obj)
        doc = {first + n - 1 for node in ast.walk(ast.parse(textwrap.dedent("".join(lines))))
               if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node)
               for n in range(node.body[0].lineno, node.body[0].end_lineno + 1)}
        keep = [n for n in range(first, first + len(lines)) if n not in doc]
        starts = [n for n in keep if n - 1 not in keep]
        parts.append({"file": os.path.basename(inspect.getsourcefile(obj)),
                      "spans": [[a, next(n for n in keep[keep.index(a):] if n + 1 not in keep)] for a in starts]})
    where = "; ".join(f"{p['file']}, lines " + ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in p["spans"])
                      for p in parts)
    return {"caption": f"{caption} ({where})", "parts": parts}


def reproducibility(g):
    t, git = g["teacher"], lambda *a: subprocess.run(["git", "-C", HERE, *a], capture_output=True, text=True).stdout.strip()
    devices = sorted({r["result"]["device"] for runs in [[t] if t else [], *g["students"].values(),
                                                           *g["methods"].values()] for r in runs})
    commit = git("rev-parse", "HEAD") or "unknown (not a git checkout)"
    rows = [["Teacher weights (sha256)", file_sha256(os.path.join(g["out"], "teacher", "model.pt")) if t else "none"],
            ["Code", commit + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")],
            ["PyTorch", torch.__version__], ["Device", ", ".join(devices) or "none"]]
    return {"table": table("reproducibility", "Provenance of the results.", ["", ""], rows, [0, 1])}


# ----------------------------------------------------------------------------- make report
def report_data(g, author, student_id):
    """Everything report.typ reads (drawing the figures on the way)."""
    t, ref = g["teacher"], next((r for r in g["methods"].values() if r), None)
    r = (t or {}).get("result", {})
    have = lambda key: t and any(g[key].values())  # noqa: E731
    return {"title": "Assignment 2: Knowledge Distillation and Continual Learning", "author": author,
            "course": "EEE7331-01 Special Topics in Deep Learning, 2022 Autumn", "student_id": student_id,
            "appendix": APPENDIX, "repro": reproducibility(g),
            "intro": {"task": f"{ref[0]['config']['subjects']}-subject" if ref else "100-subject",
                      "source": r.get("cifar10_source"), "random": bool(t and not t["config"]["pretrained"]),
                      "train": f"{r.get('train_images', 0):,}", "test": f"{r.get('test_images', 0):,}",
                      "full": (r.get("train_images"), r.get("test_images")) == (50000, 10000)},
            "teacher": t and teacher_part(g), "kd": have("students") and kd_part(g) or None,
            "sweep": t and g["sweep"] and any(g["sweep"]["cells"].values()) and sweep_part(g) or None,
            "q2": have("methods") and q2_part(g) or None}


def tables_in(d):
    """Every table of report.json, in document order."""
    if isinstance(d, dict):
        return [d] if "header" in d and "rows" in d else [t for v in d.values() for t in tables_in(v)]
    return [t for v in d for t in tables_in(v)] if isinstance(d, list) else []


def compile_pdf(typ, pdf, root, data):
    """typ -> pdf with the typst package (atomic), or the reason why not."""
    try:
        import typst
        typst.compile(typ, output=pdf + ".tmp", root=root, format="pdf", sys_inputs={"data": data})
    except ImportError:
        return "the typst package is not installed (pip install typst)"
    except Exception as e:  # typst reports a bad document as its own error, with where it is
        where = getattr(e, "diagnostic", "").strip().splitlines()
        return f"typst could not compile it ({str(e).strip()}{', ' + where[1].strip(' ┌─') if len(where) > 1 else ''})"
    os.replace(pdf + ".tmp", pdf)


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--out", default="out")
    p.add_argument("--author", default="", help="the student's name on the title page (empty: a line to fill in)")
    p.add_argument("--student-id", default="", help="the student's ID on the title page")
    args = p.parse_args(argv)
    out = args.out
    if not os.path.isdir(out):
        die(f"{out} does not exist: nothing has been run yet (make teacher, make all or make demo)")
    d = report_data(gather(out), args.author, args.student_id)
    write_tables(out, [t for t in tables_in(d) if t["name"] != "reproducibility"])
    os.makedirs(os.path.join(out, "code"), exist_ok=True)
    for name in APPENDIX:
        shutil.copyfile(os.path.join(HERE, name), os.path.join(out, "code", name))
    with open(os.path.join(HERE, "report.typ"), encoding="utf-8") as f:
        body = f.read()
    typ, data = os.path.join(out, "report.typ"), "report.json"
    if not written(typ):
        typ, data = os.path.join(out, "report.new.typ"), "report.new.json"
        print(f"{out}/report.typ was edited since make report wrote it: kept as it is, with the report.json it reads; "
              f"the new report is {typ}")
    write_text(os.path.join(out, data), json.dumps(d, indent=1, ensure_ascii=False))
    write_text(typ, HEADER.format(hashlib.sha256(body.encode()).hexdigest()) + body)
    pdf = typ[:-len(".typ")] + ".pdf"
    why = compile_pdf(typ, pdf, out, data)
    todo = [k for k in ("teacher", "kd", "sweep", "q2") if d[k] is None]
    print(f"\n== report: {typ}" + (f", {pdf}" if not why else "") + (f" ({len(todo)} part(s) not run yet)" if todo else ""))
    if why:
        print(f"no PDF: {why}; compile {typ} with `typst compile {typ} --input data={data}` or at typst.app")
    for t in tables_in(d):
        if t["name"] in ("teacher_accuracy", "kd_table", "kd_sweep", "continual_table", "lwf_sweep"):
            print(f"\n{t['caption']}\n" + md_table(t["header"], [r for r in t["rows"] if r != ["---"]]))


STUDENT_PARAMS = sum(q.numel() for q in common.StudentCNN().parameters())  # counted, not written down
TEACHER_PARAMS = sum(q.numel() for q in common.teacher_resnet18(pretrained=False).parameters())

if __name__ == "__main__":
    run(main)
