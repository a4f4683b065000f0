"""make report: the hand-in, from what the runs under OUT recorded (config, history and result .json). The prose
is report.typ's, written once; this gathers the runs, computes the tables, the statistics, the comparisons with
their verdicts and the facts the prose's conditions test, draws the figures and compiles: OUT/report.json (what
report.typ reads), OUT/report.typ (a copy to edit: once edited, make report leaves it and its report.json alone and
writes report.new.typ, .json and .pdf), OUT/report.pdf (typst, offline), OUT/tables/ and OUT/figures/.
"""
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import subprocess

import torch

import common
import plots
import q1a_teacher as q1a
import q1b_kd as q1b
import q2_continual as q2
from files import (CIFAR_CLASSES, HEADER, die, file_sha256, listing, md_table, pct, read_json, signed, table, tables_in, write_tables, write_text, written)
from machinery import Parser, run, stride_changes

HERE = os.path.dirname(os.path.abspath(__file__))
APPENDIX = ["q1a_teacher.py", "q1b_kd.py", "q2_continual.py", "common.py", "plots.py", "machinery.py", "files.py"]  # all they import
PRECISION = {"fp32": "32-bit floating point", "bf16": "bfloat16 mixed precision (autocast), 32-bit weights",
             "fp16": "float16 mixed precision (autocast) with loss scaling, 32-bit weights"}
RESULT_KEYS = (*(f"{t}_{s}_acc" for t in ("old", "new") for s in ("train", "test")), "old_train_acc_before", "old_test_acc_before")
WORDS = {"fe": "feature extraction", "ft": "fine-tuning", "lwf": "LwF", "joint": "joint training", "ft-all": "fine-tuning every layer", 0.0: "LwF at λo = 0"}
VERDICT = {1: "higher", 0: "within noise", -1: "lower"}
STYLES = ("-", "--", "-.", ":", (0, (6, 2)))  # the students' lines, told apart in grey too
CHECK = " †"  # a verdict's mark: its run (or its record) is to be checked first, as the caption says
LABEL = {"textcoords": "offset points", "fontsize": 7.5, "bbox": {"boxstyle": "square,pad=0.1", "fc": "none", "ec": "none"},
         "arrowprops": {"arrowstyle": "-", "lw": 0.5, "color": "0.45", "shrinkA": 0, "shrinkB": 4}}  # a point's label, its leader


# ----------------------------------------------------------------------------- the runs, as they recorded themselves
def load(folder):  # a finished run: {'config', 'history', 'result'}, or None
    if os.path.exists(os.path.join(folder, "result.json")):
        return {k: read_json(os.path.join(folder, f"{k}.json")) for k in ("config", "history", "result")}


def seeds(folder):
    """Every finished seed of a run: folder, folder_seed1, ... (up to the first missing one)."""
    return list(itertools.takewhile(bool, (load(folder + (f"_seed{i}" if i else "")) for i in itertools.count())))


def gather(out):
    """The teacher, the KD table's students, the sweep, the Q2 methods, LwF over λo: each its seeds' runs ([]: not run)."""
    kd, cl = os.path.join(out, "kd"), os.path.join(out, "continual")
    g = {"out": out, "teacher": load(os.path.join(out, "teacher")), "sweep": None, "lwf_sweep": {},
         "students": {label: seeds(os.path.join(kd, q1b.name(T, lam))) for label, T, lam in q1b.TABLE},
         "methods": {m: seeds(os.path.join(cl, m)) for m in q2.METHODS}}
    g["cifar"] = "synthetic CIFAR-10" if (g["teacher"] or {}).get("result", {}).get("cifar10_source") == "synthetic" else "CIFAR-10"
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


def accs(runs, key="test_acc"):
    return [r["result"][key] for r in runs if "diverged" not in r["result"] and key in r["result"]]


def two_se(p, n):
    """Two binomial standard errors of a difference of two accuracies near p (a fraction, or %) on n images each."""
    return 2 * 100 * math.sqrt(2 * (p := p / 100 if p > 1 else p) * (1 - p) / n)


def compare(a, b, n=None, bound=None):
    """a against b (per-seed values; a single value is a fixed reference whose spread is not part of the error):
    {'d': the difference of means, 'e': two standard errors of it, the seeds' spread and the test set's sampling noise
    (`bound`, or the binomial noise of two accuracies near their mean on n images) in quadrature; 'v': +1 or -1 when
    |d| is at least e, 0 (within noise) when under it or when nothing measures e}."""
    (ma, sa, na), (mb, sb, nb) = stats(a), stats(b)
    test = bound if bound is not None else two_se((ma + mb) / 2, n) if n else 0.0
    e = math.sqrt(4 * ((sa or 0) ** 2 / na + (sb or 0) ** 2 / nb) + test ** 2) or None
    return {"d": (d := ma - mb), "e": e, "v": 0 if e is None or abs(d) < e or d == 0 else (1 if d > 0 else -1)}


def row(what, c, checked=False):  # a row of a comparison table: what, difference, two standard errors, verdict (marked)
    return [what, f"{c['d']:+.2f}", said(c)["e"], VERDICT[c["v"]] + CHECK * checked]


def said(c, **more):  # a comparison as the prose gives it: verdict, the difference's size, two standard errors
    return {"v": c["v"], "d": f"{abs(c['d']):.2f}", "e": "-" if c["e"] is None else f"{c['e']:.2f}"} | more


def effect(vs):
    """What a set of verdicts says together: 'up' (all higher), 'down' (all lower), 'none' (all within noise), 'mixed'."""
    return "none" if not any(vs) else "up" if all(v > 0 for v in vs) else "down" if all(v < 0 for v in vs) else "mixed"


def joined(words):
    *rest, last = list(words) or [""]
    return ", ".join(rest) + " and " + last if rest else last


def noise(n, n_test, p):  # the yardstick, said once per discussion
    return {"n": n, "n_test": f"{n_test:,}", "p": f"{p:.0f}", "two_se": f"{two_se(p, n_test):.1f}"}


# ----------------------------------------------------------------------------- tables and the words of the setup
def setup_words(cfg, runs, images):
    """The words of a setup table that depend on a run's config: schedule, steps per epoch, precision, seeds."""
    w, first = cfg.get("warmup", 0), runs[0]["config"]["seed"]
    return {"cfg": cfg, "n": len(runs), "precision": PRECISION[cfg.get("precision", "fp32")], "steps": max(1, images // cfg["batch"]),
            "schedule": (f"linear warm-up to {cfg['lr']:g} over {w} epoch{'s' * (w != 1)}, then " if w else
                         f"from {cfg['lr']:g}, ") + "cosine decay to 0, updated after every step",
            "seeds": f"one (seed {first})" if len(runs) == 1 else f"{len(runs)} (seeds {first}-{first + len(runs) - 1}):"
                     " initial weights, data order and augmentation; one teacher"}


def data_words(teacher):
    r = teacher["result"]
    of = "" if r.get("train_images", 50000) == 50000 or r.get("cifar10_source") == "synthetic" else "of its "  # a subset
    sizes = f"{r.get('train_images', 50000):,} {of}training and {r.get('test_images', 10000):,} {of}test images"
    return {"official": f"CIFAR-10, the official files: {sizes}", None: f"CIFAR-10: {sizes}", "other": f"CIFAR-10 images, not the official files: {sizes}",
            "synthetic": f"a synthetic substitute for CIFAR-10 (not the real images): {sizes}"}[r.get("cifar10_source")]


def teacher_part(g):
    t, changes = g["teacher"], stride_changes(common.teacher_resnet18(pretrained=False), 32)
    r, times = t["result"], lambda c: re.sub(r"(?<=\d)x(?=\d)", "×", c or "")
    rows = [[times(c) for i, c in enumerate(row) if i != 1] for row in changes if row[2]] + [["---"]]
    rows += [[times(row[0]), "", "", "", times(row[5]), times(row[6])] for row in changes
             if not row[2] and row[1].startswith("layer")]
    plots.plot_curves([("", [t["history"]])], os.path.join(g["out"], "figures", "teacher"), "cross-entropy", svg=True)
    return setup_words(t["config"], [t], r.get("train_images", 50000)) | {
        "data": data_words(t), "listing": listing("The teacher: ResNet18 with four strides changed", common.teacher_resnet18),
        "changes": table("teacher_changes", "Changes to ResNet18 for 32×32 inputs: the layers whose stride changed, "
                         "then each stage's output (H×W×C, measured by running both networks on a 32×32×3 input).",
                         ["Layer", "Kernel", "Original", "New", "Output before", "Output after"], rows),
        "accuracy": table("teacher_accuracy", f"Teacher: final accuracy (epoch {r['epochs']}, the curves' last points).",
                          ["Training Accuracy (%)", "Testing Accuracy (%)"], [[pct(r["train_acc"]), pct(r["test_acc"])]]),
        "test": pct(r["test_acc"]), "train": pct(r["train_acc"]), "passed": r["test_acc"] >= 90,
        "gap": f"{r['train_acc'] - r['test_acc']:+.2f}", "train_n": f"{r.get('train_images', 50000):,}",
        "eval_n": f"{min(common.EVAL_IMAGES, r.get('train_images', 50000)):,}", "rise": next(  # an epoch whose loss rose by half
            ({"epoch": b["epoch"], "a": f"{a['train_loss']:.2f}", "b": f"{b['train_loss']:.2f}", "last": f"{h[-1]['train_loss']:.2f}", "end": b is h[-1]}
             for h in [t["history"]] for a, b in zip(h, h[1:]) if b["train_loss"] > 1.5 * a["train_loss"]), None)}


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
                rows += [[f"{stage}", conv, out, f"{params:,}"], ["", f"max-pool {m.kernel_size}×{m.kernel_size}, stride {m.stride}, pad {m.padding}", size(x), ""]]
                params = 0
    fc1, fc2 = model.classifier[0], model.classifier[-1]
    rows += [["4", f"fully connected {fc1.in_features:,}→{fc1.out_features}, ReLU", f"{fc1.out_features}", f"{count(fc1):,}"],
             ["5", f"fully connected {fc2.in_features}→10, softmax (in the loss)", "10", f"{count(fc2):,}"]]
    return rows, count(model), fc1.in_features, count(fc1)


SHORT = {"Student Network (λ = 0)": "λ = 0", "Student Network (λ = 1)": "λ = 1, T = 20", **{k: f"{k}, T = {T:g}" for k, T, _ in q1b.TABLE[2:]}}


def student_figures(g, yardstick):
    """Every student on shared axes: (a) training loss, (b) test loss, (c) test accuracy; then on the test set (a) CE,
    (b) agreement, (c) accuracy − λ = 0's, against `yardstick` (Q1's two standard errors of the test set, a grey band)."""
    runs = {label: [r["history"] for r in v] for label, v in g["students"].items() if v}
    fidelity = all("test_agree" in r for hs in runs.values() for h in hs for r in h)
    base = accs(g["students"][q1b.TABLE[0][0]]) and runs[q1b.TABLE[0][0]]  # λ = 0, when any of its seeds trained
    for name, panels in (("kd_students", [("(a) training loss", "train_loss", False), ("(b) test loss", "test_loss", False),
                                          ("(c) test accuracy (%)", "test_acc", False)]),
                         ("kd_fidelity", [("(a) cross-entropy with the labels", "test_ce", False),
                                          ("(b) agreement with the teacher (%)", "test_agree", False)]
                          + [("(c) accuracy − λ = 0's (points)", "test_acc", True)] * bool(base)))[:1 + fidelity]:
        fig, axes = plots.pyplot().subplots(1, len(panels), figsize=(6.6, 2.3), sharex=True)
        for ax, (title, key, minus_base) in zip(axes, panels):
            for i, (label, hs) in enumerate(runs.items()):
                if all(key in r for h in hs for r in h):
                    ys = [[r[key] for r in h] for h in hs]
                    if minus_base:  # seed j against λ = 0's seed j: same initial weights, same data
                        ys = [[v - r[key] for v, r in zip(y, base[j % len(base)])] for j, y in enumerate(ys)]
                    plots.band(ax, [r["epoch"] for r in hs[0]], ys, SHORT[label], seeds=False, color=f"C{i}", ms=3.5, marker="osD^v"[i % 5], ls=STYLES[i % 5])
            vals = [r[key] for hs in runs.values() for h in hs for r in h if r.get(key) is not None]
            ax.set(title=title, xlabel="epoch", yscale="log" if vals and 0 < min(vals) < max(vals) / 10 and not minus_base
                   else "linear")
            plots.integer_epochs(ax)
            if minus_base and yardstick:  # the grey band: the caption's yardstick, the test set's noise alone
                ax.axhspan(-yardstick, yardstick, color="0.9", lw=0, zorder=0)
        axes[0].set_ylabel("λ·T²·KL + (1−λ)·CE" if name == "kd_students" else "cross-entropy")  # (b) and (c) say theirs
        fig.legend(*axes[1].get_legend_handles_labels(), loc="outside lower center", ncol=5, frameon=False)
        plots.save(fig, os.path.join(g["out"], "figures", name))
    return fidelity


def kd_part(g):
    t, students = g["teacher"], g["students"]
    cfg = (first := next(runs for runs in students.values() if runs))[0]["config"]
    layers, n_params, fc1_in, fc1_params = student_layers(bool(cfg["bn"]))
    rows = [["Teacher Network (Part A)", "-", "-", pct(t["result"]["train_acc"]), pct(t["result"]["test_acc"])]]
    per_seed = [["Teacher Network (Part A)", "", "", "", t["result"]["train_acc"], t["result"]["test_acc"], ""]]
    for label, T, lam in q1b.TABLE:
        runs = students[label]
        rows.append([label, f"{T:g}" if lam else "-", f"{lam:g}", *(cells(runs, ("train_acc", "test_acc")) if runs
                                                                   else ["not run yet (make kd-table)"] * 2)])
        per_seed += [[label, T, lam, r["result"]["seed"], r["result"]["train_acc"], r["result"]["test_acc"],
                      r["result"].get("diverged", "")] for r in runs]
    q = q1_facts(g)
    fidelity_curves = student_figures(g, q and float(q["noise"]["two_se"]))
    return setup_words(cfg, first, t["result"].get("train_images", 50000)) | {"fidelity_curves": fidelity_curves,
        "lr_default": q1b.parse([]).lr, "params": f"{n_params:,}", "fc1_in": f"{fc1_in:,}", "soft": soft_targets(g),
        "fc1_m": f"{fc1_params / 1e6:.1f}", "params_m": f"{n_params / 1e6:.1f}", "q": q,
        "student": table("kd_student", "Student network (output sizes measured by running it).",
                         ["Stage", "Layer", "Output", "Parameters"], layers),
        "table": table("kd_table", "Knowledge distillation: final accuracy (last epoch; test at T = 1)" + (
            f", mean ± standard deviation over {len(first)} seeds." if len(first) > 1 else "."),
            ["Model", "Temperature, T", "λ", "Training Accuracy (%)", "Testing Accuracy (%)"], rows,
            csv_rows=(["model", "T", "lam", "seed", "train_acc", "test_acc", "diverged"], per_seed)),
        "listings": {"student": listing("The student", common.StudentCNN),
                     "loss": listing("One student's KD step, and the loss", common.kd_step, common.soft_targets, common.kd_loss)}}


def soft_targets(g):
    """Q1B (1): the teacher's soft targets at the table's temperatures (recorded by q1b_kd.py on the test set)."""
    if not os.path.exists(path := os.path.join(g["out"], "kd", "soft_targets.json")):
        return None
    st = read_json(path)
    temps = [k for k in st if k != "label"]
    fig, axes = plots.pyplot().subplots(1, len(temps), figsize=(6.6, 2.3), sharey=True)
    for ax, T in zip(axes, temps):
        ax.bar(range(10), st[T]["example"], color=["C1" if c == st["label"] else "C0" for c in range(10)])
        ax.set(title=f"T = {T}", xticks=range(10))
        ax.set_xticklabels(CIFAR_CLASSES, rotation=90)
    axes[0].set_ylabel("probability")
    plots.save(fig, os.path.join(g["out"], "figures", "kd_soft_targets"))
    top, ent = [st[T]["top"] for T in temps], [st[T]["entropy"] for T in temps]
    return {"table": table("kd_soft_targets", "The teacher's soft targets softmax(t/T) on the test set: mean probability of its top class and of the true class, and mean entropy as a fraction of the uniform distribution's.", ["T", "Top class (%)", "True class (%)", "Entropy"],
                           [[T, f"{100 * st[T]['top']:.1f}", f"{100 * st[T]['true']:.1f}", f"{st[T]['entropy']:.2f}"]
                            for T in temps]),
            "t_min": temps[0], "t_max": temps[-1], "top_min": f"{100 * top[0]:.1f}", "top_max": f"{100 * top[-1]:.1f}", "ent_min": f"{ent[0]:.2f}", "ent_max": f"{ent[-1]:.2f}", "near_uniform": ent[-1] >= 0.9,
            "flatter": all(a >= b for a, b in zip(top, top[1:])) and all(a <= b for a, b in zip(ent, ent[1:]))}


def sweep_part(g):
    sweep, t = g["sweep"], g["teacher"]["result"]
    grid, ok = sweep["grid"], {k: accs(v) for k, v in sweep["cells"].items() if v and len(accs(v)) == len(v)}
    best = max(ok, key=lambda k: stats(ok[k])[0], default=None)
    n_test, epochs = t.get("test_images", 10000), next(r for v in sweep["cells"].values() for r in v)["result"]["epochs"]
    near = [k for k in ok if best and compare(ok[best], ok[k], n_test)["v"] == 0]
    rows = [[f"{T:g}"] + [(mean_sd(ok[T, lam]) if (T, lam) in ok else cells(sweep["cells"][T, lam], ["test_acc"])[0])
                          if sweep["cells"][T, lam] else "not run" for lam in grid["lam"]] for T in grid["T"]]
    table_epochs = next((r[0]["result"]["epochs"] for r in g["students"].values() if r), None)
    reach = best and compare(ok[best], [t["test_acc"]], n_test)
    best_of = lambda ks: max((k for k in ks if accs(g["students"].get(k) or [])), key=lambda k: stats(accs(g["students"][k]))[0], default=None)  # noqa: E731
    top, kd = best_of(g["students"]) or "", best_of(k for k, _, lam in q1b.TABLE if lam == 0.1)  # the table's best; at λ = 0.1
    base = accs(g["students"].get(top) or [])  # the table's best student
    vs_base = best and base and table_epochs == epochs and compare(ok[best], base, n_test)
    tenth = max((k for k in ok if k[1] == 0.1), key=lambda k: stats(ok[k])[0], default=None)  # the table's lambda
    heavy = max((k for k in ok if k[1] == max(lam for _, lam in ok)), key=lambda k: stats(ok[k])[0], default=None)
    lam0 = accs(g["students"].get(q1b.TABLE[0][0]) or [])  # against it, the heaviest soft weight's best cell
    vs_lam0 = heavy and lam0 and heavy[1] > 0 and table_epochs == epochs and compare(ok[heavy], lam0, n_test)
    vs_tenth = best and tenth and best[1] != 0.1 and compare(ok[best], ok[tenth], n_test)
    by = [compare(ok[k], lam0, n_test)["v"] for k in ok] if lam0 and table_epochs == epochs else []  # each cell against λ = 0
    return {"table": table(
        "kd_sweep", f"Bonus: student test accuracy (%) over T and λ, {epochs} epoch{'s' * (epochs != 1)} per student"
        + (f", mean ± standard deviation over {grid['seeds']} seeds" if grid["seeds"] > 1 else "") +
        "; in bold the best cell and every cell within noise of it.", ["T \\ λ"] + [f"{lam:g}" for lam in grid["lam"]],
        rows, bold=[(grid["T"].index(T), 1 + grid["lam"].index(lam)) for T, lam in near],
        csv_rows=(["T", "lam", "seed", "test_acc", "diverged"], [[T, lam, r["result"]["seed"], r["result"]["test_acc"],
                  r["result"].get("diverged", "")] for (T, lam), v in sweep["cells"].items() for r in v])),
        "cells": len(ok), "n_T": len(grid["T"]), "n_lam": len(grid["lam"]), "diverged": len(sweep["cells"]) - len(ok),
        "Ts": ", ".join(f"{x:g}" for x in grid["T"]), "lams": ", ".join(f"{x:g}" for x in grid["lam"]),
        "best": best and said(reach, d=f"{reach['d']:+.2f}", T=f"{best[0]:g}", lam=f"{best[1]:g}", acc=mean_sd(ok[best]), near=len(near) - 1),
        "teacher": pct(t["test_acc"]), "epochs": epochs, "same_epochs": table_epochs in (None, epochs), "seeds": grid["seeds"],
        "table_epochs": table_epochs, "vs_base": said(vs_base, acc=mean_sd(base), who=SHORT.get(top)) if vs_base else None,
        "vs_tenth": said(vs_tenth, T=f"{tenth[0]:g}", acc=mean_sd(ok[tenth])) if vs_tenth else None,
        "vs_lam0": by and {"above": by.count(1), "level": by.count(0), "below": by.count(-1), "acc": mean_sd(lam0)},
        "vs_kd": said(compare(ok[best], accs(g["students"][kd]), n_test), who=SHORT[kd], acc=mean_sd(accs(g["students"][kd]))) if best and kd and table_epochs == epochs else None, "heavy": said(vs_lam0, T=f"{heavy[0]:g}", lam=f"{heavy[1]:g}", acc=mean_sd(ok[heavy])) if vs_lam0 else None}


def q2_part(g):
    ref = next(filter(None, (methods := g["methods"]).values()))  # the first method that ran
    cfg, rows, per_seed = ref[0]["config"], [], []
    for m, label in q2.METHODS.items():
        rows += [["References beyond the assignment", "", "", ""]] if m == "joint" else []
        for task in ("old", "new"):
            rows.append([label if task == "old" else "", "Old Task*" if task == "old" else "New Task",
                         *(cells(methods[m], (f"{task}_train_acc", f"{task}_test_acc")) if methods[m]
                           else [f"not run yet (make {m})"] * 2)])
        per_seed += [[label, r["result"]["seed"], *(r["result"][k] for k in RESULT_KEYS)] for r in methods[m]]
    before, ft, sweep, tcfg = ref[0]["result"], methods["ft"] and methods["ft"][0]["config"], g["lwf_sweep"], g["teacher"]["config"]
    q2_figures(g)
    old_n = g["teacher"]["result"].get("train_images", 50000)
    faces = ref[0]["result"].get("faces_source") or ("DigiFace-1M" if cfg["faces"] == q2.M.DIGIFACE_URL
                                                     or cfg["faces"].endswith(".zip") else "a face image folder")
    return setup_words(cfg, ref, cfg["subjects"] * cfg["train_per_subject"]) | {
        "old": data_words(g["teacher"]), "pretrained": bool(tcfg.get("pretrained", 1)),
        "alike": all("old_test_loss" in e for runs in methods.values() for r in runs for e in r["history"]),  # each head's loss
        "faces": faces, "synthetic_faces": faces != "a face image folder",  # report.typ words each source
        "lr_teacher": tcfg["lr"], "lr_from_teacher": cfg["lr"] == tcfg["lr"], "batch_teacher": tcfg["batch"], "old_eval_n": f"{min(common.EVAL_IMAGES, old_n):,}",
        "subjects": cfg["subjects"], "test_per": cfg["per_subject"] - cfg["train_per_subject"],
        "train_n": f"{cfg['subjects'] * cfg['train_per_subject']:,}", "old_train_n": f"{old_n:,}",
        "test_n": f"{cfg['subjects'] * (cfg['per_subject'] - cfg['train_per_subject']):,}",
        "runs": {m: bool(r) for m, r in methods.items()}, "lwf": methods["lwf"] and methods["lwf"][0]["config"],
        "ft_all_lr": methods["ft-all"] and methods["ft-all"][0]["config"]["ft_all_lr"], "q": q2_facts(g),
        "cfg_joint_w": methods["joint"] and methods["joint"][0]["config"]["lwf_warmup"],
        "ft_layers": ft and joined([f"{layer} at {rate:g}%" for layer, rate in ft["ft_layers"]]),
        "ft_conv5": bool(ft) and all(x.startswith("conv5") for x, _ in ft["ft_layers"]),
        "ft_below": bool(ft) and max(rate for _, rate in ft["ft_layers"]) < 100,
        "ft": ft and table("finetune_layers", "Fine-tuning: the layers chosen and their learning rates.",
                           ["Conv layers that you choose to fine-tune", "Learning Rate (x% of the original)", "Remark"],
                           [[layer, f"{rate:g}% ({ft['lr'] * rate / 100:g}" + (f"; {rate * ft['lr'] / tcfg['lr']:g}% of the teacher's "
                             f"{tcfg['lr']:g})" if ft["lr"] != tcfg["lr"] else ")"), "fine-tuned; BatchNorm statistics "
                             + ("adapt" if ft.get("adapt_bn") else "frozen")] for layer, rate in ft["ft_layers"]]
                           + [[f"new FC + softmax, {ft['subjects']} outputs", f"100% ({ft['lr']:g})", "trained from "
                               "scratch"], ["every other layer, old head", "0%", "frozen"]], [1.3, 1, 1.3]),
        "table": table("continual_table", "Continual learning: final accuracy (last epoch)" + (
            f", mean ± standard deviation over {len(ref)} seeds" if len(ref) > 1 else "") + f". *Old task: {g['cifar']} "
            "through the old head after the network was changed for faces; before any change the teacher scores "
            f"{pct(before['old_train_acc_before'])}% (training) and {pct(before['old_test_acc_before'])}% (test).",
            ["Method", "Task", "Training Accuracy (%)", "Testing Accuracy (%)"], rows, bold=[(6, 0)],
            csv_rows=(["method", "seed", *RESULT_KEYS], per_seed)), "lwf_sweep": len(sweep) > 1 and table(
            "lwf_sweep", "LwF over λo (λo = 0: every layer fine-tuned at LwF's rates, after its warm-up), "
            "test accuracy (%).", ["λo", "Old task", "New task"],
            [[f"{v:g}", *cells(r, ("old_test_acc", "new_test_acc"))] for v, r in sweep.items()],
            csv_rows=(["lambda_o", "seed", *RESULT_KEYS], [[v, r["result"]["seed"], *(r["result"][k] for k in RESULT_KEYS)]
                                                           for v, runs in sweep.items() for r in runs])) or None,
        "listings": {"net": listing("The two-headed network", common.ContinualNet),
                     "methods": listing("What each method trains", q2.trained),
                     "lwf": listing("LwF's and joint training's two stages, their losses", q2.two_stages, common.lwf_loss, common.joint_loss)}}


# ----------------------------------------------------------------------------- the facts the discussions' conditions test
def q1_facts(g):
    """Q1B's comparisons (rows of the comparison table, with verdicts) and the facts the discussion depends on."""
    t, students = g["teacher"], g["students"]
    acc = {label: accs(runs) for label, runs in students.items() if runs and accs(runs)}
    if not acc:
        return None
    n, n_test, n_train = max(map(len, students.values())), t["result"].get("test_images", 10000), t["result"].get("train_images", 50000)
    p, fits = stats([v for a in acc.values() for v in a])[0], max(stats(accs(students[k], "train_acc"))[0] for k in acc)
    base, lam1, teacher = q1b.TABLE[0][0], q1b.TABLE[1][0], [t["result"]["test_acc"]]
    kd = [label for label, T, lam in q1b.TABLE if lam == 0.1 and label in acc]
    rows, f = [], {"noise": noise(n, n_test, p), "teacher": pct(teacher[0]), "weak_teacher": teacher[0] < 90,
                   "teacher_train": pct(t["result"]["train_acc"]), "best_train": pct(fits),
                   "underfit": fits < 90, "undertrained": fits < teacher[0], "base_acc": None, "kd_effect": None,
                   "kd_up": "", "kd_down": "", "kd_range": "",
                   "diverged": [SHORT[k] for k, r in students.items() if r and len(accs(r)) < len(r)]}
    best = max(acc, key=lambda k: stats(acc[k])[0])
    c = compare(acc[best], teacher, n_test)
    rows.append(row(f"{SHORT[best]} (the highest{' mean' * (n > 1)}) − teacher", c))
    f |= {"best": SHORT[best], "best_acc": mean_sd(acc[best]), "vs_teacher": c["v"], "below_teacher": f"{-c['d']:.1f}",
          "ratio": f"{STUDENT_PARAMS / TEACHER_PARAMS:.1f}", "fc1_share": f"{100 * 93312 * 500 / STUDENT_PARAMS:.1f}",
          "sizes": [f"{n / 1e6:.1f}" for n in (STUDENT_PARAMS, TEACHER_PARAMS)], "train_n": f"{n_train:,}",
          "epochs": students[best][0]["result"]["epochs"], "pretrained": bool(t["config"].get("pretrained", 1)), "teacher_epochs": t["config"]["epochs"]}
    if base in acc:
        f["base_acc"], vs = mean_sd(acc[base]), [compare(acc[k], acc[base], n_test) for k in kd]
        rows += [row(f"{SHORT[k]}, λ = 0.1 − λ = 0", c) for k, c in zip(kd, vs)]
        f |= {"kd_effect": effect([c["v"] for c in vs]) if kd else None,
              "kd_up": joined(SHORT[k] for k, c in zip(kd, vs) if c["v"] > 0),
              "kd_down": joined(SHORT[k] for k, c in zip(kd, vs) if c["v"] < 0), "kd_range": joined(signed(c["d"]) for c in vs)}
        if lam1 in acc:
            c = compare(acc[lam1], acc[base], n_test)
            rows.append(row("λ = 1, T = 20 − λ = 0", c))
            f |= {"lam1": c["v"], "lam1_acc": mean_sd(acc[lam1]), "lam1_d": f"{abs(c['d']):.1f}",
                  "lam1_errors": -c["d"] <= (errs := 100 - t["result"]["train_acc"]), "lam1_few": -c["d"] > 2 * errs,
                  "lam1_above": compare(acc[lam1], teacher, n_test)["v"] > 0, "lam1_base_above": compare(acc[base], teacher, n_test)["v"] > 0,
                  "lam1_chance": compare(acc[lam1], [10.0], bound=two_se(0.1, n_test) / math.sqrt(2))["v"] <= 0}  # one sample's noise
    steps = [(a, b, compare(acc[b], acc[a], n_test)) for a, b in [*zip(kd, kd[1:]), *([(kd[0], kd[-1])] if len(kd) > 2 else [])]]
    rows += [row(f"{SHORT[b]} − {SHORT[a]}", c) for a, b, c in steps]  # its name: the prose finds its lead by it
    f["temps"] = [{"a": SHORT[a][6:], "b": SHORT[b][6:], "v": c["v"], "d": f"{abs(c['d']):.1f}", "row": f"{SHORT[b]} − {SHORT[a]}"} for a, b, c in steps]
    f["rankable"] = any(c["v"] for *_, c in steps)
    gaps = {k: [r["result"]["train_acc"] - r["result"]["test_acc"] for r in students[k] if "diverged" not in r["result"]] for k in acc}
    if base in gaps and kd:  # from one seed each: the binomial noise of the test and the training accuracy
        both, train = kd + [lam1] * (lam1 in gaps), {k: accs(students[k], "train_acc") for k in acc}  # KD, then λ = 1
        bound = math.hypot(two_se(p, n_test), two_se(p, n_train))  # a gap's noise: its test and its training accuracy
        tg = t["result"]["train_acc"] - teacher[0]  # the teacher's gap, against λ = 0's
        vs, vt = [compare(gaps[base], gaps[k], bound=bound) for k in both], compare(gaps[base], [tg], bound=bound)
        rows += [row(f"gap (training − test) of λ = 0 − that of {SHORT.get(k, k)}", c) for k, c in [*zip(both, vs), ("the teacher", vt)]]
        f["gap"] = {"base": f"{stats(gaps[base])[0]:+.1f}", "kd": joined(f"{stats(gaps[k])[0]:+.1f}" for k in kd),
                    "lam1": f"{stats(gaps[lam1])[0]:+.1f}" if lam1 in gaps else None,
                    "effect": {"up": "narrower", "down": "wider"}.get(e := effect([c["v"] for c in vs[:len(kd)]]), e),
                    "lam1_v": vs[-1]["v"] if lam1 in gaps else 0, "base_train": mean_sd(train[base]), "kd_train": joined(mean_sd(train[k]) for k in kd),
                    "lam1_train": lam1 in train and mean_sd(train[lam1]),
                    "lam1_fits_less": lam1 in train and compare(train[lam1], train[base], n_train)["v"] < 0,
                    "teacher": f"{tg:+.2f}", "wider_than_teacher": stats(gaps[base])[0] > 0 and vt["v"] > 0}
        dte, dtr = [sum(stats(x[k])[0] - stats(x[base])[0] for k in kd) / len(kd) for x in (acc, train)]  # the KD mean's
        f["gap"] |= {"d_test": signed(dte), "d_train": signed(dtr), "from_test": dte >= -dtr}  # narrowing, by side
    agree = {k: accs(students[k], "test_agree") for k in acc}
    if base in acc and all(agree.values()):
        both = kd + [lam1] * (lam1 in agree)
        vs, same = [compare(agree[k], agree[base], n_test) for k in both], [k for k in agree if len(agree[k]) > 1 and len(set(agree[k])) == 1]
        # seeds that agree exactly: how agreement is recorded is to be checked
        rows += [row(f"agreement with the teacher, {SHORT[k]} − λ = 0", c, bool(same)) for k, c in zip(both, vs)]
        f["fidelity"] = {"effect": effect([c["v"] for c in vs[:len(kd)]]), "base": mean_sd(agree[base]),
                         **{w: joined(SHORT[k] for k, c in zip(kd, vs) if c["v"] == v) for w, v in (("more", 1), ("less", -1))},
                         "kd": joined(mean_sd(agree[k]) for k in kd), "lam1": lam1 in agree and mean_sd(agree[lam1]),
                         "kl_base": f"{stats(accs(students[base], 'test_kl'))[0]:.3f}", "lam1_v": vs[-1]["v"] if lam1 in agree else 0,
                         "kl_kd": joined(f"{stats(accs(students[k], 'test_kl'))[0]:.3f}" for k in kd),
                         "same": joined(SHORT[k] for k in same), "kl_lower": all(stats(accs(students[k], "test_kl"))[0] < stats(accs(students[base], "test_kl"))[0] for k in kd),
                         "less_mean": all(stats(agree[k])[0] < stats(agree[base])[0] for k in kd)}
    hs = [r["history"] for k in acc for r in students[k] if "diverged" not in r["result"]]
    f |= {"still_rising": all(len(h) > 2 and h[-1]["test_acc"] > h[-2]["test_acc"] for h in hs),
          "lr_zero": all(h[-1]["lr"] < 1e-9 for h in hs), "clip": students[best][0]["config"].get("clip", 0),
          "lr": students[best][0]["config"]["lr"], "ce_best": min(sum((accs(students[k], "test_ce") for k in acc), []) or [None])}
    f["table"] = table("kd_compare", "Knowledge distillation: the comparisons, test accuracy (%) unless named; a difference within two "
                       "standard errors is within noise" + "; †: agreement to be checked first (Discussion)" * bool(f.get("fidelity", {}).get("same")) + ".",
                       ["Comparison", "Difference", "Two standard errors", "Verdict"], rows, [2.6, 0, 0, 0])
    return f


def q2_facts(g):
    """Q2's comparisons on both tasks (rows of the comparison table) and the facts its discussion depends on."""
    runs = {m: r for m, r in g["methods"].items() if r} | ({0.0: g["lwf_sweep"][0.0]} if 0.0 in g["lwf_sweep"] else {})
    at = lambda run, e: next((h for h in run["history"] if h["epoch"] == e), None)  # noqa: E731  (its epoch's row)
    cfg, before = (ref := next(iter(runs.values())))[0]["config"], ref[0]["result"]["old_test_acc_before"]
    n, n_test = max(len(r) for r in runs.values()), g["teacher"]["result"].get("test_images", 10000)
    faces_test = cfg["subjects"] * (cfg["per_subject"] - cfg["train_per_subject"])
    old, new = (lambda m: accs(runs[m], "old_test_acc")), (lambda m: accs(runs[m], "new_test_acc"))
    p_old, p_new = (stats([v for m in runs for v in fn(m)])[0] for fn in (old, new))
    f = {"noise": noise(n, n_test, p_old), "noise_new": noise(n, faces_test, p_new), "before": pct(before),
         "acc": {str(m): {"old": mean_sd(old(m)), "new": mean_sd(new(m))} for m in runs}}
    rows, cmp, drops = [], {}, {}
    for a, b in (("ft", "fe"), ("lwf", "ft"), ("lwf", 0.0), ("lwf", "ft-all"), (0.0, "ft-all"), ("joint", "lwf"), ("joint", 0.0), ("ft-all", "ft")):
        if a in runs and b in runs:
            co, cn = compare(old(a), old(b), n_test), compare(new(a), new(b), faces_test)
            rows += [((a, b), f"{WORDS[a]} − {WORDS[b]}", co, cn)]  # one row: the old task, then the new
            cmp[f"{a}/{b}"] = {"old": co["v"], "new": cn["v"], "old_d": f"{abs(co['d']):.1f}", "new_d": f"{abs(cn['d']):.1f}", "a": WORDS[a], "b": WORDS[b],
                               "new_up": cn["d"] > 0}
    for m in [k for k in ("ft", "lwf", 0.0, "joint", "ft-all") if k in runs]:
        c = compare(old(m), [before], n_test)
        rows += [((m,), f"{WORDS[m]} − before any change", c, None)]  # the old task alone
        w = runs[m][0]["config"].get("lwf_warmup", 0) if m in ("lwf", 0.0, "joint") else 0
        first = [at(r, w + 1)["old_test_acc"] for r in runs[m] if at(r, w + 1)]
        drop = before - stats(old(m))[0]
        drops[str(m)] = {"v": c["v"], "drop": f"{drop:.1f}", "first": f"{before - stats(first)[0]:.1f}" if first else None,
                         "mostly_first": bool(first) and drop > 0 and before - stats(first)[0] > drop / 2, "epoch": w + 1}
    f["pairs"] = [{"a": WORDS[a], "b": WORDS[b], "old": co["v"], "new": cn["v"], "mo": co["d"], "mn": cn["d"]} for a, b in
                  itertools.combinations(runs, 2) for co, cn in [(compare(old(a), old(b), n_test), compare(new(a), new(b), faces_test))]]
    f |= {"cmp": cmp, "forgets": drops}  # the comparison table, below: a run to be checked, its verdicts marked
    same = lambda m, keys=("old_test_acc",): all(r["result"].get(k, 0) == r["result"].get(k + "_before", -1)  # noqa: E731
                                                 for r in runs[m] for k in keys)
    still = [m for m in runs if m != "fe" and same(m, ("old_test_acc", "old_train_acc"))]  # trains the backbone, yet...
    f["ft_exact"] = "ft" in still  # inert: that, or its old task level with fe and before, not even lower in the mean
    unharmed = lambda m: m in runs and drops[m]["v"] == 0 and all(  # noqa: E731  (within noise of before, not even lower in the mean)
        stats(accs(runs[m], k))[0] >= runs[m][0]["result"][k + "_before"] for k in ("old_test_acc", "old_train_acc"))
    f["ft_inert"] = "ft/fe" in cmp and (f["ft_exact"] or cmp["ft/fe"]["old"] == 0 and unharmed("ft"))
    bad = lambda k: cmp.get(k, {}).get("old", 0) < 0  # noqa: E731  (the first keeps less of the old task, beyond noise)
    f["joint_bad"] = bad("joint/lwf") and ("joint/0.0" not in cmp or bad("joint/0.0"))  # below no old-task term too
    f["head_bad"] = f["joint_bad"] and bad("lwf/0.0")  # both old-task terms keep less than none: the old head's path
    checked = [m for m, v in (("joint", f["joint_bad"]), ("ft", f["ft_inert"]), ("lwf", f["head_bad"]), (0.0, f["head_bad"]),
                              ("ft-all", unharmed("ft-all"))) if v]  # every layer on faces, by fine-tuning's rule
    f["checked"] = [WORDS[m] for m in checked + [m for m in still if m not in checked]]  # left out of the summaries
    f["unread"] = [WORDS[m] for m in ["ft"] * f["ft_inert"] + still]  # ...and, checked for what they show elsewhere, of LwF's paragraphs
    rows = [row(what, co, x := any(WORDS[m] in f["checked"] for m in ms)) + (row("", cn, x)[1:] if cn else ["", "", ""]) for ms, what, co, cn in rows]
    f["table"] = table("continual_compare", f"Continual learning: the comparisons, the difference of test accuracy (points) on each task "
                       f"(old: {g['cifar']}, new: faces) with its two standard errors (2 SE); a difference within them is within noise"
                       + "; †: a run to be checked first (Discussion)" * bool(f["checked"]) + ".",
                       ["Comparison", "Old task", "2 SE", "Verdict", "New task", "2 SE", "Verdict"], rows)
    f |= {"still": joined(WORDS[m] for m in still)} | ({"fe_exact": same("fe")} if "fe" in runs else {})
    if "lwf" in runs:
        w, chance = runs["lwf"][0]["config"]["lwf_warmup"], 1 / cfg["subjects"]
        ends = [at(r, w)["test_acc"] for r in runs["lwf"] if at(r, w)]  # against chance, a fixed value: one sample's noise
        fe = [at(r, w)["test_acc"] for r in runs.get("fe", []) if at(r, w)]  # the same head, trained the same w epochs
        above = lambda v: bool(v) and compare(v, [100 * chance], bound=two_se(chance, faces_test) / math.sqrt(2))["v"] > 0  # noqa: E731
        f["warm"] = {"w": w, "new": mean_sd(ends) if ends else None, "chance": f"{100 * chance:g}", "at_chance": bool(ends) and not above(ends), "fe_w": mean_sd(fe) if fe else None,
                     "far": bool(ends) and "fe" in runs and stats(ends)[0] <= stats(new("fe"))[0] / 2,  # half of fe's end or less
                     "fe": above(fe) and bool(ends) and compare(fe, ends, faces_test)["v"] > 0 and mean_sd(fe)}  # above it, beyond noise
    if "ft-all" in runs:
        others = [m for m in ("ft", "lwf", "joint", 0.0) if m in runs and WORDS[m] not in f["checked"]]
        f["ftall_most"] = bool(others) and all(compare(old("ft-all"), old(m), n_test)["v"] < 0 for m in others)
        gap = lambda m: [r["result"]["new_train_acc"] - r["result"]["new_test_acc"] for r in runs[m]]  # noqa: E731
        f["ftall_gap"] = {"d": f"{stats(gap('ft-all'))[0]:.1f}", "fe": "fe" in runs and f"{stats(gap('fe'))[0]:.1f}", "v": compare(
            gap("ft-all"), gap("fe") if "fe" in runs else [0], bound=math.hypot(two_se(p_new, cfg["subjects"] * cfg[
                "train_per_subject"]), two_se(p_new, faces_test)))["v"]}  # against feature extraction's: two gaps' noise
    if len(sweep := g["lwf_sweep"]) > 2:
        lo, hi = min(sweep), max(sweep)
        co = compare(accs(sweep[hi], "old_test_acc"), accs(sweep[lo], "old_test_acc"), n_test)
        cn = compare(accs(sweep[hi], "new_test_acc"), accs(sweep[lo], "new_test_acc"), faces_test)
        f["sweep"] = {"lo": f"{lo:g}", "hi": f"{hi:g}", "old": co["v"], "new": cn["v"],
                      "old_lo": mean_sd(accs(sweep[lo], "old_test_acc")), "old_hi": mean_sd(accs(sweep[hi], "old_test_acc")),
                      "new_lo": mean_sd(accs(sweep[lo], "new_test_acc")), "new_hi": mean_sd(accs(sweep[hi], "new_test_acc"))}
    if all(m in runs for m in ("fe", "ft", "lwf")):
        claims = [("fine-tuning loses old-task accuracy", "fine-tuning raised the old task", -drops["ft"]["v"]),
                  ("LwF keeps more of it than fine-tuning", "LwF keeps less of it than fine-tuning", cmp["lwf/ft"]["old"]),
                  ("fine-tuning learns the faces better than feature extraction", "fine-tuning learns the faces worse "
                   "than feature extraction", cmp["ft/fe"]["new"])]  # (what is known, its reverse, its verdict)
        claims = [c for c in claims if not ("LwF" in f["checked"] and c[0].startswith("LwF") or f["ft_inert"])]  # runs to be checked
        f |= {"shown": joined(c for c, _, v in claims if v > 0), "unshown": joined(c for c, _, v in claims if v <= 0),
              "reversed": joined(r for _, r, v in claims if v < 0)}
    return f


# ----------------------------------------------------------------------------- figures: out/figures/<name>.svg and .png
def q2_figures(g):
    """Each method's curves from epoch 0 (the new task's loss; accuracy on both tasks), and the forgetting figure."""
    methods = g["methods"]
    names = {"train": "new task (faces), training", "test": "new task (faces), test",
             "old_train": f"old task ({g['cifar']}), training", "old_test": f"old task ({g['cifar']}), test"}
    for name, ms in (("fe", ["fe"]), ("ft", ["ft"]), ("lwf", ["lwf"]), ("references", ["joint", "ft-all"])):
        if rows := [(f"{WORDS[m]}: " if len(ms) > 1 else "", [r["history"] for r in methods[m]]) for m in ms if methods[m]]:
            plots.plot_curves(rows, os.path.join(g["out"], "figures", f"q2_{name}"), "cross-entropy", tuple(names), svg=True,
                               stage=[methods[m][0]["config"].get("lwf_warmup") for m in ms if methods[m]], names=names,
                               width=4.9, height=1.55, seeds=False)  # inches, as printed
    fig, (a, b) = plots.pyplot().subplots(1, 2, figsize=(6.6, 2.85))
    for (m, label), color in zip(q2.METHODS.items(), ["C4", "C5", "C6", "C8", "C9"]):  # not the splits' colours
        if runs := methods[m]:
            label = label.replace(" (reference)", "*").replace("Fine-tuning all layers", "FT all layers")
            plots.band(a, [e["epoch"] for e in runs[0]["history"]], [[e["old_test_acc"] for e in r["history"]]
                                                                       for r in runs], label, seeds=False, color=color)
            (mo, so, _), (mn, sn, _) = stats(accs(runs, "old_test_acc")), stats(accs(runs, "new_test_acc"))
            b.errorbar(mn, mo, xerr=sn or 0, yerr=so or 0, fmt="o", capsize=3, color=color)
            b.annotate(label, (mn, mo), xytext=(7, 0), va="center", color=color, **LABEL)  # coloured as its point
    if len(g["lwf_sweep"]) > 1:
        pts = [(stats(accs(r, "new_test_acc"))[0], stats(accs(r, "old_test_acc"))[0]) for r in g["lwf_sweep"].values()]
        b.plot(*zip(*pts), "k--", lw=1, marker="o", ms=3, mfc="white")
        lwf = methods["lwf"][0]["config"].get("lwf_lambda") if methods.get("lwf") else None  # its point is labelled LwF
        for v, pt in [(v, pt) for v, pt in zip(g["lwf_sweep"], pts) if v != lwf]:
            b.annotate(f"λo={v:g}", pt, xytext=(-7, 0), ha="right", va="center", **LABEL)
    b.margins(0.2)
    cfg, n_test = next(r for runs in methods.values() for r in runs)["config"], g["teacher"]["result"].get("test_images", 10000)
    mean = lambda key: stats([v for runs in methods.values() for v in accs(runs, key)])[0]  # noqa: E731
    old, new = two_se(mean("old_test_acc"), n_test), two_se(mean("new_test_acc"), cfg["subjects"] * (cfg["per_subject"] - cfg["train_per_subject"]))
    for ax, axis, e in ((a, "y", old), (b, "y", old), (b, "x", new)):  # each axis at least 3 yardsticks long: a
        lo, hi = getattr(ax, f"get_{axis}lim")()  # difference within the noise does not look like a trend
        if hi - lo < 3 * e:
            getattr(ax, f"set_{axis}lim")((lo + hi - 3 * e) / 2, (lo + hi + 3 * e) / 2)
    b.autoscale_view()
    zero = any(r["history"][0]["epoch"] == 0 for runs in methods.values() for r in runs)
    a.set(title="(a) old task while learning faces", xlabel="epoch" + " (0: before any change)" * zero,
          ylabel=f"{g['cifar']} test accuracy (%)")
    b.set(title="(b) what each method keeps and learns", xlabel="faces: test accuracy (%)", ylabel=f"{g['cifar']} test (%)")
    plots.integer_epochs(a)
    fig.legend(*a.get_legend_handles_labels(), loc="outside lower center", ncol=3, frameon=False)
    plots.label_points(fig, b)
    plots.save(fig, os.path.join(g["out"], "figures", "q2_forgetting"))


# ----------------------------------------------------------------------------- provenance
def reproducibility(g, every):
    t, git = g["teacher"], lambda *a: subprocess.run(["git", "-C", HERE, *a], capture_output=True, text=True).stdout.strip()
    commit, cmds = git("rev-parse", "HEAD") or "unknown (not a git checkout)", os.path.join(g["out"], "commands.txt")
    rows = [["Teacher weights (sha256)", file_sha256(os.path.join(g["out"], "teacher", "model.pt")) if t else "none"],
            ["Code", commit + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")],
            ["PyTorch", torch.__version__], ["Device", ", ".join(sorted({r["result"]["device"] for r in every})) or "none"]]
    return {"table": table("reproducibility", "Provenance of the results.", ["", ""], rows, [0, 1]),  # and make demo's commands
            "commands": open(cmds, encoding="utf-8").read().strip() if os.path.exists(cmds) else None}


# ----------------------------------------------------------------------------- make report
def report_data(g, author, student_id):
    """Everything report.typ reads (drawing the figures on the way)."""
    t, ref = g["teacher"], next((r for r in g["methods"].values() if r), None)
    r = (t or {}).get("result", {})
    have = lambda key: t and any(g[key].values())  # noqa: E731
    every = [r for runs in [[t] if t else [], *g["students"].values(), *g["methods"].values()] for r in runs]
    return {"title": "Assignment 2: Knowledge Distillation and Continual Learning", "author": author,
            "course": "EEE7331-01 Special Topics in Deep Learning, 2022 Autumn", "student_id": student_id,
            "appendix": APPENDIX, "repro": reproducibility(g, every),
            "from0": all(r["history"][0]["epoch"] == 0 for r in every if r.get("history")),
            "intro": {"synthetic_faces": any(r["result"].get("faces_source") == "synthetic" for r in every),
                      "task": f"{ref[0]['config']['subjects']}-subject" if ref else "100-subject",
                      "epochs": [m.parse([]).epochs for m in (q1a, q1b, q2)], "source": r.get("cifar10_source"), "cifar": g["cifar"], "pretrained": bool(t and t["config"]["pretrained"]),
                      "train": f"{r.get('train_images', 0):,}", "test": f"{r.get('test_images', 0):,}",
                      "full": (r.get("train_images"), r.get("test_images")) == (50000, 10000)},
            "teacher": t and teacher_part(g), "kd": have("students") and kd_part(g) or None,
            "sweep": t and g["sweep"] and any(g["sweep"]["cells"].values()) and sweep_part(g) or None,
            "q2": have("methods") and q2_part(g) or None}


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
    body = open(os.path.join(HERE, "report.typ"), encoding="utf-8").read()
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
