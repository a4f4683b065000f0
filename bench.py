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
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from common import (CIFAR10, MEAN, RESNET18_FILE, STD, Batches, Parser, StudentCNN, Students, autocast, cross_entropy,
                    distill_loss, get_device, group_size, load_cifar10, load_teacher, md_table, normalize, positive,
                    positive_int, precision, run, sgd, teacher_resnet18, train_epoch, warmup_cosine, write_synthetic_cifar)


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


def train_seconds(model, loss_fn, data, warm, device):
    """Seconds for one pass of training steps over `data`, after one warm-up step (cuDNN autotuning)."""
    model = model.to(device, memory_format=torch.channels_last)
    opt = sgd(model.parameters(), 0.01)
    sched = warmup_cosine(opt, 10 ** 6, 0)
    train_epoch(model, loss_fn, opt, sched, warm)
    return timed(lambda: train_epoch(model, loss_fn, opt, sched, data), device)


def lr_range(args, device):
    """The students' lr range test (Smith 2017): the lr grows geometrically every step, from --lr-min to
    --lr-max, at the real batch size, on full-size synthetic CIFAR-10 (50,000 + 10,000 images written in
    the real format); each student's loss is logged per step. A student diverges where its loss turns
    non-finite or rises above both 4x its minimum and 1.5x its start. Students: λ=0 and λ=1, T=20,
    each without and with gradient clipping. Writes OUT/lr_range.png and OUT/lr_range.md."""
    with tempfile.TemporaryDirectory() as root:
        write_synthetic_cifar(root, n_train=50000, n_test=10000)
        x, y = load_cifar10(root, device)["train"]
    gen = torch.Generator(device=device).manual_seed(0)
    teacher = teacher_resnet18(pretrained=False).to(device, memory_format=torch.channels_last)
    path = os.path.join(args.out, "teacher", "model.pt")
    if os.path.exists(path):
        teacher = load_teacher(path, device).to(memory_format=torch.channels_last)
        how = f"the teacher of {path}"
    else:  # a teacher that has learnt something of these images, so that its soft targets carry information
        opt = sgd(teacher.parameters(), 0.05)
        train_epoch(teacher, cross_entropy, opt, warmup_cosine(opt, 10 ** 6, 0),
                    Batches(x[:128 * args.teacher_steps], y[:128 * args.teacher_steps], batch_size=128, shuffle=True,
                            augment=True, gen=gen), desc="teacher")
        how = f"ResNet18 from random weights, trained {args.teacher_steps} steps of 128 on these images"
    teacher.eval().requires_grad_(False)
    steps, b = args.range_steps, args.batch or 512
    data = Batches(x[:steps * b], y[:steps * b], batch_size=b, shuffle=True, augment=True, gen=gen)
    lrs = [args.lr_min * (args.lr_max / args.lr_min) ** (i / (steps - 1)) for i in range(steps)]
    students, curves = [("λ=0", 1.0, 0.0), ("λ=1, T=20", 20.0, 1.0)], {}
    for clip in (0.0, args.clip):
        torch.manual_seed(0)
        group = Students([StudentCNN(bn=True) for _ in students]).to(device, memory_format=torch.channels_last)
        opt = sgd(group.parameters(), args.lr_min)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lrs[min(i, steps - 1)] / args.lr_min)
        log = []
        train_epoch(group, distill_loss(teacher, [(T, lam, 0) for _, T, lam in students]), opt, sched, data,
                    desc=f"lr range, clip {clip:g}", clip=clip, log=log)
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
    note = (f"{steps} steps of batch {b}, lr {args.lr_min:g} to {args.lr_max:g} geometrically; full-size synthetic "
            f"CIFAR-10; teacher: {how}; SGD Nesterov 0.9, wd 5e-4; {precision(device)}. "
            + (f"Lowest lr at which a student diverges: {first:.3g}; a third of it: {first / 3:.3g}." if first else ""))
    with open(os.path.join(args.out, "lr_range.md"), "w") as f:
        f.write(f"### Student lr range test\n\n{md_table(['student', 'lr at lowest loss', 'lr where it diverges'], rows)}"
                f"\n{note}\n")
    print(md_table(["student", "lr at lowest loss", "lr where it diverges"], rows) + note)


def plan(args, device):
    """make plan: the steps of `make all` with the present variables (runs, epochs, SGD steps, students per
    lock-step group), the disk and downloads they need, and an estimated time on this device from a short
    timed probe of each kind of step (warm-up excluded). Trains nothing; writes OUT/plan.md."""
    import shlex
    import q1a_teacher
    import q1b_kd
    import q2_continual
    split = lambda s: shlex.split(s or "")  # noqa: E731
    t = q1a_teacher.parse(split(args.teacher_args))
    k = q1b_kd.parse(split(args.kd_args) + ["--table"])
    c = q2_continual.parse(split(args.cl_args))
    seeds = k.seeds or (3 if device.type == "cuda" else 1)
    cseeds = c.seeds or (3 if device.type == "cuda" else 1)
    rates = probe(device, args.probe_batch or (512 if device.type == "cuda" else 16), c.face_size)
    n, n_test, faces, face_test = 50000, 10000, c.subjects * c.train_per_subject, c.subjects * (c.per_subject - c.train_per_subject)
    fixed_k = {"teacher": 45e6, "student": 94e6, "q2": 45e6}  # students kept in float16
    pairs = {(T if lam else 1.0, lam) for lam in k.sweep_lam for T in k.sweep_T}
    sweep_students = len(pairs) * k.sweep_seeds
    group = group_size(k, device)
    steps = []  # (step, runs, SGD steps, students per group, seconds, disk bytes)
    sec = t.epochs * (n * rates["teacher_train"] + (n + n_test) * rates["teacher_eval"])
    steps.append(("teacher", "1", t.epochs * (n // t.batch), "", sec, fixed_k["teacher"]))
    g = 5 * seeds
    sec = (n + n_test) * rates["teacher_eval"] + k.epochs * (seeds * n * rates["teacher_eval"] + g * n * rates["student_train"]
                                                             + g * (n + 2 * n_test) * rates["student_eval"])
    steps.append(("kd-table", f"5 students x {seeds} seed(s)", k.epochs * (n // k.batch), g, sec, g * fixed_k["student"]))
    methods = c.methods
    sec, q2_steps = 0.0, 0
    for m in methods:
        per = faces * rates["face_train"] * (2 if m == "lwf" else 1) + (m == "joint") * faces * rates["teacher_train"]
        sec += cseeds * (c.epochs * (per + (faces + face_test) * rates["face_eval"] + n_test * rates["teacher_eval"])
                         + n * rates["teacher_eval"])
        q2_steps += cseeds * c.epochs * (faces // c.batch)
    steps.append(("continual", f"{len(methods)} methods x {cseeds} seed(s)", q2_steps, "", sec,
                  len(methods) * cseeds * fixed_k["q2"]))
    groups = -(-sweep_students // group)
    sec = k.epochs * (groups * n * rates["teacher_eval"] + sweep_students * n * rates["student_train"]
        + sweep_students * 2 * n_test * rates["student_eval"]) + sweep_students * n * rates["student_eval"]
    steps.append(("kd-sweep", f"{sweep_students} students in {groups} group(s)", groups * k.epochs * (n // k.batch),
                  group, sec, sweep_students * fixed_k["student"]))
    duration = lambda sec: f"{sec / 60:.1f} min" if sec < 7200 else f"{sec / 3600:.1f} h"  # noqa: E731
    rows = [[s, r, f"{st:,}", g, duration(sec), f"{disk / 1e9:.2f} GB"] for s, r, st, g, sec, disk in steps]
    total = sum(x[4] for x in steps)
    rows.append(["all", "", f"{sum(x[2] for x in steps):,}", "", duration(total), f"{sum(x[5] for x in steps) / 1e9:.2f} GB"])
    peak = max(5 * seeds, group) * 187e6 * 2  # float32 weights + momentum
    data = c.data
    downloads = [("CIFAR-10 (163 MB)", not os.path.exists(os.path.join(data, CIFAR10.base_folder, "test_batch"))),
                 ("ImageNet ResNet18 weights (45 MB)", t.pretrained and not os.path.exists(
                     os.path.join(torch.hub.get_dir(), "checkpoints", RESNET18_FILE))),
                 (f"DigiFace-1M: {c.subjects} identities x 72 images, by range requests", not c.faces and not os.path.exists(
                     os.path.join(data, "digiface", ".complete")))]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    text = (f"### make plan on {name}\n\n"
            + md_table(["step", "runs", "SGD steps", "students per group", "estimated time", "disk (weights)"], rows)
            + "\nEstimated from a timed probe (images/s): " + ", ".join(f"{k} {1 / v:,.0f}" for k, v in rates.items())
            + f". Evaluation passes included; checkpoint writes and the report not. A lock-step group's checkpoint "
              f"needs up to {peak / 1e9:.1f} GB more while it trains.\n\nDownloads: "
            + "; ".join(f"{d}: {'needed' if need else 'already here'}" for d, need in downloads) + ".\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "plan.md"), "w") as f:
        f.write(text)
    print(text)
    return steps


def probe(device, batch, face_size, steps=2):
    """Seconds per image of each kind of step, timed over `steps` steps after one warm-up step."""
    def rate(model, shape, train):
        model = model.to(device, memory_format=torch.channels_last)
        x = normalize(torch.randint(0, 256, (batch, *shape), dtype=torch.uint8, device=device))
        y = torch.randint(0, 10, (batch,), device=device)
        opt = sgd([q for q in model.parameters() if q.requires_grad], 0.001)

        def step():
            if train:
                model.train()
                with autocast(device):
                    loss = torch.nn.functional.cross_entropy(model(x).float(), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            else:
                model.eval()
                with torch.no_grad(), autocast(device):
                    model(x)
        step()
        return timed(lambda: [step() for _ in range(steps)], device) / (steps * batch)
    torch.manual_seed(0)
    return {"teacher_train": rate(teacher_resnet18(pretrained=False), (3, 32, 32), True),
            "teacher_eval": rate(teacher_resnet18(pretrained=False), (3, 32, 32), False),
            "student_train": rate(StudentCNN(bn=True), (3, 32, 32), True),
            "student_eval": rate(StudentCNN(bn=True), (3, 32, 32), False),
            "face_train": rate(teacher_resnet18(pretrained=False), (3, face_size, face_size), True),
            "face_eval": rate(teacher_resnet18(pretrained=False), (3, face_size, face_size), False)}


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--out", default="out")
    p.add_argument("--device", default="")
    p.add_argument("--batch", type=positive_int, default=None, help="default: 512 on a GPU, 64 on the CPU")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps per measure (default: 20 GPU, 3 CPU)")
    p.add_argument("--students", type=positive_int, default=5)
    p.add_argument("--images", type=positive_int, default=10000, help="images for the data-pipeline comparison")
    p.add_argument("--data-batch", type=positive_int, default=512, help="batch of the data-pipeline comparison "
                                                                        "(the teacher's and students' default)")
    p.add_argument("--workers", type=positive_int, default=2)
    p.add_argument("--lr-range", action="store_true", help="instead: the students' lr range test (see lr_range)")
    p.add_argument("--range-steps", type=positive_int, default=60)
    p.add_argument("--lr-min", type=positive, default=1e-4)
    p.add_argument("--lr-max", type=positive, default=3.0)
    p.add_argument("--clip", type=positive, default=5.0, help="the gradient-norm clip tried in the lr range test")
    p.add_argument("--teacher-steps", type=positive_int, default=40)
    p.add_argument("--plan", action="store_true", help="instead: make plan (see plan)")
    p.add_argument("--teacher-args", default="", help="make plan: the teacher step's arguments")
    p.add_argument("--kd-args", default="", help="make plan: the KD steps' arguments")
    p.add_argument("--cl-args", default="", help="make plan: the continual step's arguments")
    p.add_argument("--probe-batch", type=positive_int, default=None, help="make plan: default 512 on a GPU, 16 on the CPU")
    args = p.parse_args(argv)
    device = get_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    if args.lr_range:
        return lr_range(args, device)
    if args.plan:
        return plan(args, device)
    gpu = device.type == "cuda"
    batch, steps = args.batch or (512 if gpu else 64), args.steps or (20 if gpu else 3)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    print(f"== bench on {name}: batch {batch}, {steps} steps per measure, {precision(device)}")
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

    sec = train_seconds(teacher, cross_entropy, data, warm, device)
    rows.append(["teacher training step (ResNet18)", f"{n / sec:,.0f} images/s", ""])
    sec = train_seconds(StudentCNN(bn=True), cross_entropy, data, warm, device)
    rows.append(["student training step", f"{n / sec:,.0f} images/s", ""])
    sec = train_seconds(Students([StudentCNN(bn=True)]), distill_loss(frozen, [(4.0, 0.5, 0)]), data, warm, device)
    rows.append(["KD step (teacher forward + student step)", f"{n / sec:,.0f} images/s", ""])
    print(md_table(["measure", "result", "ratio"], rows), end="", flush=True)

    k = args.students
    pairs = [(2.0 ** i, 0.5, 0) for i in range(k)]
    lock = train_seconds(Students([StudentCNN(bn=True) for _ in pairs]), distill_loss(frozen, pairs), data, warm, device)
    alone = sum(train_seconds(Students([StudentCNN(bn=True)]), distill_loss(frozen, [pair]), data, warm, device)
                for pair in pairs)
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
        f.write(f"### Benchmark on {name}\n\nbatch {batch}, {steps} timed steps per measure, {precision(device)}, "
                f"torch {torch.__version__}\n\n{md_table(['measure', 'result', 'ratio'], rows)}")
    print(f"written {os.path.join(args.out, 'bench.md')}")


if __name__ == "__main__":
    run(main)
