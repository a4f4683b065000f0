"""make bench: where the time goes, measured in one run on whatever device is present.

1. Training throughput (images/s) of a teacher step, a student step and a KD step (teacher forward +
   student step), through the project's own training loop.
2. The data pipeline: common.Batches (uint8 tensor on the device, crop + flip + normalise batched there)
   against torchvision's DataLoader over the same CIFAR-10 files with PIL RandomCrop(32, 4) +
   RandomHorizontalFlip + ToTensor + Normalize and 2 workers, each delivering batches on the device.
3. N students distilled in lock-step (one teacher pass per batch) against N separate KD runs.
The table goes to the terminal and to OUT/bench.md.
"""
import copy
import math
import os
import platform
import tempfile
import time

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

import machinery as M
from common import (MEAN, STD, Batches, StudentCNN, Students, cross_entropy, evaluate, load_cifar10, load_teacher,
                    normalize, sgd, student_groups, teacher_resnet18, train_epoch, warmup_cosine)
from machinery import (CIFAR10, PRECISIONS, RESNET18_FILE, Parser, autocast, die, group_size, lockstep_groups,
                       nonneg, positive, positive_int, run, setup, write_synthetic_cifar)
from files import md_table
import q1b_kd
from q1b_kd import distill_loss


class PilDataset(Dataset):
    """What torchvision's CIFAR10 dataset does per image: HxWx3 uint8 -> PIL image -> transform."""

    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.x[i])), self.y[i]


def timed(fn, device):
    """Wall-clock seconds of fn(), with the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def train_seconds(model, loss_fn, data, warm, device, precision, clip=5.0):
    """Seconds for one pass of training steps over `data`, after one warm-up step (cuDNN autotuning): the project's
    own step (machinery.Step: each student's clip, fp16 scale and divergence on the device)."""
    model = model.to(device, memory_format=torch.channels_last)
    opt = sgd(student_groups(model, 0.01, 0.1) if isinstance(model, Students) else model.parameters(), 0.01)
    sched, step = warmup_cosine(opt, 10 ** 6, 0), M.Step(model, opt, precision, clip)
    train_epoch(model, loss_fn, sched, warm, step)
    return timed(lambda: train_epoch(model, loss_fn, sched, data, step), device)


def cifar_or_synthetic(args, device):
    """The training images of the CIFAR-10 in DATA when it is there (and words for them), else full-size
    synthetic CIFAR-10 (50,000 + 10,000 images written in the real format)."""
    if os.path.exists(os.path.join(args.data, CIFAR10.base_folder)):
        data = load_cifar10(args.data, device)
        words = {"official": "CIFAR-10", "other": "CIFAR-10 images, not the official files",
                 "synthetic": "synthetic CIFAR-10"}[data["source"]]
        return data, f"{words} of {args.data} ({len(data['train'][1]):,} training, {len(data['test'][1]):,} test images)"
    with tempfile.TemporaryDirectory() as root:
        write_synthetic_cifar(root, n_train=50000, n_test=10000)
        return load_cifar10(root, device), "full-size synthetic CIFAR-10 (no CIFAR-10 in DATA)"


def lr_range(args, device):
    """The students' lr range test (Smith 2017): the lr grows geometrically every step, from --lr-min to
    --lr-max, at the real batch size, on the CIFAR-10 in DATA (synthetic images if there is none);
    each student's loss is logged per step. A student diverges where its loss turns non-finite or
    rises above both 4x its minimum and 1.5x its start. Students: λ=0 and λ=1, T=20 (the two extremes of
    the soft term's weight), each with the clip of --clips. Writes OUT/lr_range.png and OUT/lr_range.md."""
    data, words = cifar_or_synthetic(args, device)
    x, y = data["train"]
    gen = torch.Generator(device=device).manual_seed(0)
    teacher = teacher_resnet18(pretrained=False).to(device, memory_format=torch.channels_last)
    path = os.path.join(args.out, "teacher", "model.pt")
    if os.path.exists(path):
        teacher = load_teacher(path, device).to(memory_format=torch.channels_last)
        how = f"the teacher of {path}"
    else:  # a teacher that has learnt something of these images, so that its soft targets carry information
        opt = sgd(teacher.parameters(), 0.05)
        train_epoch(teacher, cross_entropy, warmup_cosine(opt, 10 ** 6, 0),
                    Batches(x[:128 * args.teacher_steps], y[:128 * args.teacher_steps], batch_size=128, shuffle=True,
                            augment=True, gen=gen), M.Step(teacher, opt, args.precision), desc="teacher")
        how = f"ResNet18 from random weights, trained {args.teacher_steps} steps of 128 on these images"
    teacher.eval().requires_grad_(False)
    steps, b = args.range_steps, args.batch or 512
    data = Batches(x[:steps * b], y[:steps * b], batch_size=b, shuffle=True, augment=True, gen=gen)
    lrs = [args.lr_min * (args.lr_max / args.lr_min) ** (i / (steps - 1)) for i in range(steps)]
    students, curves = [("λ=0", 1.0, 0.0), ("λ=1, T=20", 20.0, 1.0)], {}
    for clip in args.clips:
        torch.manual_seed(0)
        group = Students([StudentCNN(bn=True) for _ in students]).to(device, memory_format=torch.channels_last)
        opt = sgd(student_groups(group, args.lr_min, args.fc1_lr / 100), args.lr_min)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lrs[min(i, steps - 1)] / args.lr_min)
        step = M.Step(group, opt, args.precision, clip)
        step.log = log = []
        train_epoch(group, distill_loss(teacher, [(T, lam) for _, T, lam in students]), sched, data, step,
                    desc=f"lr range, clip {clip:g}")
        for k, (label, _, _) in enumerate(students):
            curves[f"{label}, " + (f"clip {clip:g}" if clip else "no clip")] = [float(v[k]) for v in log]
    rows, fig, ax = [], *plt.subplots(figsize=(7, 4.5))
    for label, loss in curves.items():
        start, low, div = loss[0], math.inf, None
        for i, v in enumerate(loss):
            low = min(low, v)
            if not math.isfinite(v) or (v > 4 * low and v > 1.5 * start):
                div = i
                break
        best = min(range(len(loss) if div is None else div), key=lambda i: loss[i])
        rows.append([label, f"{lrs[best]:.3g}", f"{lrs[div]:.3g}" if div is not None else f"none up to {lrs[-1]:.3g}"])
        line = ax.plot(lrs[:len(loss)], [v if math.isfinite(v) else float("nan") for v in loss], label=label)
        if div is not None:
            ax.axvline(lrs[div], color=line[0].get_color(), ls=":", lw=1)
    first = min((float(r[2]) for r in rows if not r[2].startswith("none")), default=None)
    ax.set(xscale="log", xlabel="learning rate (batch %d)" % b, ylabel="training loss (λ·T²·KL + (1−λ)·CE)",
           title="Student lr range test; dotted: where each diverges", ylim=(0, 3 * max(c[0] for c in curves.values())))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "lr_range.png"), dpi=120)
    plt.close(fig)
    note = (f"{steps} steps of batch {b}, lr {args.lr_min:g} to {args.lr_max:g} geometrically "
            f"({(args.lr_max / args.lr_min) ** (1 / (steps - 1)):.3f}x a step); {words}; teacher: {how}; "
            f"SGD Nesterov 0.9, wd 5e-4, the first FC at {args.fc1_lr:g}% of the lr; {args.precision}. "
            + (f"Lowest lr at which a student diverges: {first:.3g}; a third of it: {first / 3:.3g}." if first else ""))
    with open(os.path.join(args.out, "lr_range.md"), "w") as f:
        f.write(f"### Student lr range test\n\n{md_table(['student', 'lr at lowest loss', 'lr where it diverges'], rows)}"
                f"\n{note}\n")
    print(md_table(["student", "lr at lowest loss", "lr where it diverges"], rows) + note)


def _flat_dropout(p):
    def make():
        m = StudentCNN(bn=True)
        m.classifier.insert(0, nn.Dropout(p))  # on the 93,312 flattened features, before the first FC
        return m
    return make


# Student recipes compared on the real images (λ = 0): name -> (model, optimiser, clip). The first is the default.
RECIPES = {
    "sgd": ("SGD Nesterov 0.9, lr 0.04, wd 5e-4, clip 5 (the default)",
            lambda: StudentCNN(bn=True), lambda m: sgd(m.parameters(), 0.04), 5.0),
    "sgd-noclip": ("SGD Nesterov 0.9, lr 0.04, wd 5e-4, no clip",
                   lambda: StudentCNN(bn=True), lambda m: sgd(m.parameters(), 0.04), 0.0),
    "sgd-fc1": ("SGD as the default, the 93,312-input FC at 10% of the lr",
                lambda: StudentCNN(bn=True), lambda m: sgd(student_groups(m, 0.04, 0.1), 0.04), 5.0),
    "sgd-dropout": ("SGD as the default, dropout 0.5 on the flattened features",
                    _flat_dropout(0.5), lambda m: sgd(m.parameters(), 0.04), 5.0),
    "adamw": ("AdamW, lr 1e-3, wd 0.05, no clip",
              lambda: StudentCNN(bn=True), lambda m: torch.optim.AdamW(m.parameters(), 1e-3, weight_decay=0.05), 0.0),
}


def compare(args, device):
    """Student recipes on the CIFAR-10 in DATA, λ = 0, --epochs each, batch 512, crop + flip, BatchNorm,
    cosine to 0 over the run after a warm-up of a tenth of it; the same seed, data order and
    augmentation for every recipe. Test accuracy after every epoch -> OUT/compare.md (one row per
    recipe, written as each finishes)."""
    names = args.compare or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        die(f"--compare: unknown recipe {unknown[0]!r}; the recipes are {', '.join(RECIPES)}")
    data, words = cifar_or_synthetic(args, device)
    b, rows = args.batch or 512, []
    test = Batches(*data["test"], batch_size=1024)
    header = ["recipe"] + [f"epoch {e}" for e in range(1, args.epochs + 1)] + ["train loss, last epoch", "minutes"]
    for name in names:
        what, make, optimiser, clip = RECIPES[name]
        torch.manual_seed(0)
        model = make().to(device, memory_format=torch.channels_last)
        gen = torch.Generator(device=device).manual_seed(0)
        train = Batches(*data["train"], batch_size=b, shuffle=True, augment=True, gen=gen)
        opt = optimiser(model)
        total = args.epochs * len(train)
        sched = warmup_cosine(opt, total, max(1, total // 10))
        accs, t0, step = [], time.time(), M.Step(model, opt, args.precision, clip)
        for epoch in range(1, args.epochs + 1):
            step.log = log = []
            step.epoch()
            train_epoch(model, cross_entropy, sched, train, step, desc=f"{name} epoch {epoch}")
            accs.append("diverged" if step.bad.any() else f"{evaluate(model, cross_entropy, test, args.precision)['acc']:.2f}")
            print(f"{name} epoch {epoch}: test {accs[-1]}%, train loss {float(torch.cat(log[-len(log) // 5:]).mean()):.3f}",
                  flush=True)
        rows.append([what] + accs + [f"{float(torch.cat(log[-len(log) // 5:]).mean()):.3f}", f"{(time.time() - t0) / 60:.1f}"])
        with open(os.path.join(args.out, "compare.md"), "w") as f:
            f.write(f"### Student recipes, λ = 0: test accuracy (%) after each epoch\n\n{md_table(header, rows)}\n"
                    f"{words}; batch {b}, {len(train)} steps per epoch, crop + flip, BatchNorm, warm-up over a tenth of "
                    f"the {total} steps then cosine to 0; seed 0 for all; {args.precision}; train loss: mean of the last "
                    f"fifth of the epoch's steps.\n")
    print(md_table(header, rows))


def plan(args, device):
    """make plan: the steps of `make all` with the present variables (runs, epochs, SGD steps, students per
    lock-step group), the memory of each step on this card, the disk and downloads they need, and an
    estimated time on this device from a short timed probe of each kind of step (warm-up excluded).
    Trains nothing; writes OUT/plan.md."""
    import shlex
    import q1a_teacher
    import q2_continual
    split = lambda s: shlex.split(s or "")  # noqa: E731
    t = q1a_teacher.parse(split(args.teacher_args))
    k = q1b_kd.parse(split(args.kd_args) + ["--table"])
    c = q2_continual.parse(split(args.cl_args))
    cuda = device.type == "cuda"
    for a in (t, k, c):
        a.precision = args.precision
    seeds, cseeds = k.seeds or (3 if cuda else 1), c.seeds or (3 if cuda else 1)
    rates, peaks = probe(device, args.probe_batch or (t.batch if cuda else 16), c.face_size, args.precision, t.batch, c.batch)
    n, n_test, faces, face_test = 50000, 10000, c.subjects * c.train_per_subject, c.subjects * (c.per_subject - c.train_per_subject)
    weights = {"teacher": 45e6, "student": 94e6, "q2": 45e6}  # on disk at the end (students in float16)
    per_ckpt = 187e6 * 2  # a student in a group checkpoint while it trains: float32 weights + momentum
    sizing = lambda j: Students([StudentCNN(bn=bool(k.bn)) for _ in range(j)])  # noqa: E731  (memory probe)
    size = group_size(k, device, sizing)
    table = lockstep_groups([(T, lam, i) for _, T, lam in q1b_kd.TABLE for i in range(seeds)], size)
    pairs = list(dict.fromkeys((T if lam else 1.0, lam) for lam in k.sweep_lam for T in k.sweep_T))
    sweep = lockstep_groups([(T, lam, i) for T, lam in pairs for i in range(k.sweep_seeds)], size)
    steps = []  # (step, runs, SGD steps, students per group, seconds, disk bytes at the end)
    sec = t.epochs * (n * rates["teacher_train"] + (n + n_test) * rates["teacher_eval"])
    steps.append(("teacher", "1", t.epochs * (n // t.batch), "", sec, weights["teacher"]))
    sec = (n + n_test) * rates["teacher_eval"] + k.epochs * sum(
        n * rates["teacher_eval"] + len(g) * n * rates["student_train"]
        + len(g) * (n + 2 * n_test) * rates["student_eval"] for g in table)
    steps.append(("kd-table", f"5 students x {seeds} seed(s)", len(table) * k.epochs * (n // k.batch),
                  "+".join(str(len(g)) for g in table), sec, 5 * seeds * weights["student"]))
    sec, q2_steps = 0.0, 0
    for m in c.methods:
        per = faces * rates["face_train"] * (2 if m == "lwf" else 1) + (m == "joint") * faces * rates["teacher_train"]
        sec += cseeds * (c.epochs * (per + (faces + face_test) * rates["face_eval"] + n_test * rates["teacher_eval"])
                         + n * rates["teacher_eval"])
        q2_steps += cseeds * c.epochs * (faces // c.batch)
    steps.append(("continual", f"{len(c.methods)} methods x {cseeds} seed(s)", q2_steps, "", sec,
                  len(c.methods) * cseeds * weights["q2"]))
    sweep_students = sum(len(g) for g in sweep)
    sec = k.epochs * sum(n * rates["teacher_eval"] + len(g) * n * rates["student_train"]
                         + len(g) * 2 * n_test * rates["student_eval"] for g in sweep) + sweep_students * n * rates["student_eval"]
    steps.append(("kd-sweep", f"{sweep_students} students in {len(sweep)} group(s)", len(sweep) * k.epochs * (n // k.batch),
                  f"{len(sweep[0])}" + (f" (last {len(sweep[-1])})" if len(sweep[-1]) != len(sweep[0]) else ""), sec,
                  sweep_students * weights["student"]))
    duration = lambda sec: f"{sec / 60:.1f} min" if sec < 7200 else f"{sec / 3600:.1f} h"  # noqa: E731
    rows = [[s, r, f"{st:,}", g, duration(sec), f"{disk / 1e9:.2f} GB"] for s, r, st, g, sec, disk in steps]
    total = sum(x[4] for x in steps)
    rows.append(["all", "", f"{sum(x[2] for x in steps):,}", "", duration(total), f"{sum(x[5] for x in steps) / 1e9:.2f} GB"])
    # disk: the weights of everything before, plus the largest group's checkpoint twice while it is rewritten
    # (written to a temporary file, then renamed over the old one)
    done, peak = 0.0, 0.0
    for step, _, _, _, _, disk in steps:
        groups = {"kd-table": table, "kd-sweep": sweep}.get(step, [])
        peak = max(peak, done + (2 * max(len(g) for g in groups) * per_ckpt if groups else 0))
        done += disk
    peak = max(peak, done)
    downloads = [("CIFAR-10 (163 MB)", not os.path.exists(os.path.join(c.data, CIFAR10.base_folder, "test_batch"))),
                 ("ImageNet ResNet18 weights (45 MB)", t.pretrained and not os.path.exists(
                     os.path.join(torch.hub.get_dir(), "checkpoints", RESNET18_FILE))),
                 (f"DigiFace-1M: {c.subjects} identities x 72 images, by range requests", not c.faces and not os.path.exists(
                     os.path.join(c.data, "digiface", ".complete")))]
    name = f"CPU ({os.cpu_count()} cores)"
    memory = ""
    if cuda:
        props = torch.cuda.get_device_properties(device)
        free = torch.cuda.mem_get_info(device)[0]
        name = f"{props.name} ({props.total_memory / 2 ** 30:.0f} GiB, compute capability {props.major}.{props.minor})"
        g = M.measure_group(sizing, k.batch, args.precision, device)
        kept = os.path.join(k.out, "kd", "group.json")
        chosen = f"GROUP={k.group}" if k.group else f"{size} (kept in {kept})" if os.path.exists(kept) else str(size)
        need = {"teacher": peaks["teacher_train"], "continual": peaks["face_train"],
                "kd-table": g["fixed"] + max(map(len, table)) * g["per_student"],
                "kd-sweep": g["fixed"] + max(map(len, sweep)) * g["per_student"]}
        memory = (f"\nGPU memory against {free / 2 ** 30:.1f} GiB free, peaks measured (a teacher step, a face step; "
                  f"lock-step groups from steps of {' and '.join(g['measured'])} students after a discarded warm-up): "
                  + "; ".join(f"{s} {v / 2 ** 30:.1f} GiB" + ("" if v < 0.9 * free else " (DOES NOT FIT: give a smaller "
                                                             + ("GROUP=" if s.startswith("kd") else "BATCH=") + ")")
                              for s, v in need.items())
                  + ". Lock-step groups: measured " + ", ".join(f"{j} students {v / 2 ** 30:.2f} GiB" for j, v in
                                                                 g["measured"].items())
                  + f"; one more student {g['per_student'] / 2 ** 30:.2f} GiB (arithmetic floor {g['floor'] / 2 ** 30:.2f}"
                  f" GiB), fixed {g['fixed'] / 2 ** 30:.2f} GiB; groups of up to {g['group']} fit 80% of the free memory;"
                  f" chosen: {chosen}.\n")
    text = (f"### make plan on {name}, {args.precision}\n\n"
            + md_table(["step", "runs", "SGD steps", "students per lock-step group", "estimated time", "disk (weights)"],
                       rows)
            + "\nEstimated from a timed probe (images/s): " + ", ".join(f"{k} {1 / v:,.0f}" for k, v in rates.items())
            + f". Evaluation passes included; checkpoint writes and the report not.\n{memory}\n"
              f"Disk: {done / 1e9:.1f} GB at the end, {peak / 1e9:.1f} GB at the peak (a lock-step group's checkpoint, "
              f"{per_ckpt / 1e9:.2f} GB per student, is there twice while it is rewritten).\n\nDownloads: "
            + "; ".join(f"{d}: {'needed' if need_ else 'already here'}" for d, need_ in downloads) + ".\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "plan.md"), "w") as f:
        f.write(text)
    M.write_json(os.path.join(args.out, "plan.json"), {  # what docs/gpu_check.sh sets the run against
        "device": name, "precision": args.precision, "seconds": {s: sec for s, _, _, _, sec, _ in steps},
        "groups": {"kd-table": [len(g) for g in table], "kd-sweep": [len(g) for g in sweep]},
        "peak_bytes": need if cuda else {}, "images_per_s": {k: 1 / v for k, v in rates.items()}})
    print(text)
    return steps


def probe(device, batch, face_size, precision, teacher_batch=None, face_batch=None, steps=2):
    """Seconds per image of each kind of step, timed over `steps` steps after one warm-up step, and on CUDA
    the peak memory of a teacher step and a face step at their batch sizes."""
    cuda = device.type == "cuda"
    peaks, teacher_batch, face_batch = {}, teacher_batch if cuda and teacher_batch else batch, face_batch if cuda and face_batch else batch

    def rate(model, shape, train, b=batch, key=None):
        model = model.to(device, memory_format=torch.channels_last)
        x = normalize(torch.randint(0, 256, (b, *shape), dtype=torch.uint8, device=device))
        y = torch.randint(0, 10, (b,), device=device)
        opt = sgd([q for q in model.parameters() if q.requires_grad], 0.001)

        def step():
            if train:
                model.train()
                with autocast(device, precision):
                    loss = torch.nn.functional.cross_entropy(model(x).float(), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            else:
                model.eval()
                with torch.no_grad(), autocast(device, precision):
                    model(x)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        step()
        if key and device.type == "cuda":
            peaks[key] = torch.cuda.max_memory_allocated(device)
        return timed(lambda: [step() for _ in range(steps)], device) / (steps * b)
    torch.manual_seed(0)
    return {"teacher_train": rate(teacher_resnet18(pretrained=False), (3, 32, 32), True, teacher_batch, "teacher_train"),
            "teacher_eval": rate(teacher_resnet18(pretrained=False), (3, 32, 32), False),
            "student_train": rate(StudentCNN(bn=True), (3, 32, 32), True),
            "student_eval": rate(StudentCNN(bn=True), (3, 32, 32), False),
            "face_train": rate(teacher_resnet18(pretrained=False), (3, face_size, face_size), True, face_batch, "face_train"),
            "face_eval": rate(teacher_resnet18(pretrained=False), (3, face_size, face_size), False, face_batch)}, peaks


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--out", default="out")
    p.add_argument("--device", default="")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--batch", type=positive_int, default=None, help="default: 512 on a GPU, 64 on the CPU")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps per measure (default: 20 GPU, 3 CPU)")
    p.add_argument("--students", type=positive_int, default=5)
    p.add_argument("--images", type=positive_int, default=10000, help="images for the data-pipeline comparison")
    p.add_argument("--data-batch", type=positive_int, default=512, help="batch of the data-pipeline comparison "
                                                                        "(the teacher's and students' default)")
    p.add_argument("--workers", type=positive_int, default=2)
    p.add_argument("--lr-range", action="store_true", help="instead: the students' lr range test (see lr_range)")
    p.add_argument("--data", default="data", help="lr range test and comparison: the CIFAR-10 to use (synthetic if none)")
    p.add_argument("--range-steps", type=positive_int, default=120, help="lr range test: steps (>= 100, so the loss "
                   "has time to react)")
    p.add_argument("--lr-min", type=positive, default=1e-4)
    p.add_argument("--lr-max", type=positive, default=3.0)
    p.add_argument("--fc1-lr", type=positive, default=10.0, help="lr range test: the first FC's lr, %% of the lr "
                   "(q1b_kd.py's default)")
    p.add_argument("--clips", type=nonneg, nargs="+", default=[0.0, 5.0], help="lr range test: gradient-norm clips "
                   "to try (0: none)")
    p.add_argument("--compare", nargs="*", default=None, help="instead: train the student recipes named "
                   "(default: all of RECIPES) with λ=0 and record test accuracy per epoch")
    p.add_argument("--epochs", type=positive_int, default=2, help="--compare: epochs per recipe")
    p.add_argument("--teacher-steps", type=positive_int, default=40)
    p.add_argument("--plan", action="store_true", help="instead: make plan (see plan)")
    p.add_argument("--teacher-args", default="", help="make plan: the teacher step's arguments")
    p.add_argument("--kd-args", default="", help="make plan: the KD steps' arguments")
    p.add_argument("--cl-args", default="", help="make plan: the continual step's arguments")
    p.add_argument("--probe-batch", type=positive_int, default=None, help="make plan: default 512 on a GPU, 16 on the CPU")
    args = p.parse_args(argv)
    device = setup(args)
    os.makedirs(args.out, exist_ok=True)
    if args.lr_range:
        return lr_range(args, device)
    if args.compare is not None:
        return compare(args, device)
    if args.plan:
        return plan(args, device)
    gpu = device.type == "cuda"
    batch, steps = args.batch or (512 if gpu else 64), args.steps or (20 if gpu else 3)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    print(f"== bench on {name}: batch {batch}, {steps} steps per measure, {args.precision}")
    torch.manual_seed(0)
    x = torch.randint(0, 256, (batch * steps, 3, 32, 32), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (batch * steps,), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    data = Batches(x, y, batch_size=batch, shuffle=True, augment=True, gen=gen)
    warm = Batches(x[:batch], y[:batch], batch_size=batch, shuffle=True, augment=True, gen=gen)
    n = batch * steps
    teacher = teacher_resnet18(pretrained=False).to(device, memory_format=torch.channels_last)
    frozen = copy.deepcopy(teacher).eval().requires_grad_(False)
    rows = []

    sec = train_seconds(teacher, cross_entropy, data, warm, device, args.precision)
    rows.append(["teacher training step (ResNet18)", f"{n / sec:,.0f} images/s", ""])
    sec = train_seconds(StudentCNN(bn=True), cross_entropy, data, warm, device, args.precision)
    rows.append(["student training step", f"{n / sec:,.0f} images/s", ""])
    sec = train_seconds(Students([StudentCNN(bn=True)]), distill_loss(frozen, [(4.0, 0.5)]), data, warm, device,
                        args.precision)
    rows.append(["KD step (teacher forward + student step)", f"{n / sec:,.0f} images/s", ""])
    print(md_table(["measure", "result", "ratio"], rows), end="", flush=True)

    k = args.students
    pairs = [(2.0 ** i, 0.5) for i in range(k)]
    lock = train_seconds(Students([StudentCNN(bn=True) for _ in pairs]), distill_loss(frozen, pairs), data, warm, device,
                         args.precision)
    alone = sum(train_seconds(Students([StudentCNN(bn=True)]), distill_loss(frozen, [pair]), data, warm, device,
                              args.precision) for pair in pairs)
    rows.append([f"{k} students in lock-step vs {k} separate KD runs", f"{lock:.2f} s vs {alone:.2f} s",
                 f"{lock / alone:.2f}x the time"])
    print(md_table(["measure", "result", "ratio"], rows[-1:]).splitlines()[-1], flush=True)

    with tempfile.TemporaryDirectory() as root:  # the same CIFAR-10 files for both pipelines
        write_synthetic_cifar(root, n_train=args.images, n_test=10)
        xs, ys = load_cifar10(root, device)["train"]
        ours = Batches(xs, ys, batch_size=args.data_batch, shuffle=True, augment=True, gen=gen)
        t_ours = timed(lambda: [b for b in ours], device)
        pil = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                  transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
        dataset = PilDataset(xs.permute(0, 2, 3, 1).cpu().numpy(), ys.tolist(), pil)  # as torchvision holds CIFAR-10
        loader = DataLoader(dataset, batch_size=args.data_batch, shuffle=True, drop_last=True,
                            num_workers=args.workers, pin_memory=gpu, persistent_workers=False)
        t_pil = timed(lambda: [(a.to(device, non_blocking=True), b.to(device, non_blocking=True)) for a, b in loader],
                      device)
    m = len(ours) * args.data_batch
    rows.append([f"data pipeline, {m:,} images, batch {args.data_batch}: on-device Batches vs DataLoader + PIL "
                 f"({args.workers} workers)",
                 f"{m / t_ours:,.0f} vs {m / t_pil:,.0f} images/s", f"{t_pil / t_ours:.1f}x faster"])
    print(md_table(["measure", "result", "ratio"], rows[-1:]).splitlines()[-1], flush=True)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(f"### Benchmark on {name}\n\nbatch {batch}, {steps} timed steps per measure, {args.precision}, "
                f"torch {torch.__version__}\n\n{md_table(['measure', 'result', 'ratio'], rows)}")
    print(f"written {os.path.join(args.out, 'bench.md')}")


if __name__ == "__main__":
    run(main)
