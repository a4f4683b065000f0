"""Q1 part B: the student CNN, trained by knowledge distillation from the teacher of part A.

  python q1b_kd.py --T 20 --lam 0.1   one student                        -> out/kd/T20_lam0.1/
  python q1b_kd.py --table            the assignment's five students      -> out/tables/kd_table.md
  python q1b_kd.py --sweep            the bonus grid of T x lam           -> out/tables/kd_sweep.md

Loss: lam * T^2 * CE(softmax(t/T), softmax(s/T)) + (1 - lam) * CE(y, softmax(s)), with the teacher's
logits t computed in eval mode, without gradients, on the same augmented batch; accuracy at T=1.
Several students train in lock-step: the same batches, one teacher forward pass per batch for all.
"""
import argparse
import contextlib
import math
import os

import matplotlib.pyplot as plt
import torch

from common import (Batches, Parser, StudentCNN, Students, die, diverged, file_sha256, finish, finished, fit, flag, fraction, get_device,
                    kd_loss, load_cifar10, load_teacher, nonneg, nonneg_int, pct, plot_compare, positive,
                    positive_int, precision, predict, read_json, run, sgd, warmup_cosine, write_json, write_table)

# The assignment's table (Q1B (4)): label, T, lam. lam = 0 is plain cross-entropy, so its T is moot.
TABLE = [("Student Network (λ = 0)", 1.0, 0.0), ("Student Network (λ = 1)", 20.0, 1.0),
         ("KD 1", 5.0, 0.1), ("KD 2", 10.0, 0.1), ("KD 3", 20.0, 0.1)]


def parse(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data")
    p.add_argument("--out", default="out")
    p.add_argument("--device", default="")
    p.add_argument("--teacher", default="", help="teacher weights (default: OUT/teacher/model.pt)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--table", action="store_true", help="the assignment's five students, in lock-step")
    mode.add_argument("--sweep", action="store_true", help="the bonus grid --sweep-T x --sweep-lam, in lock-step groups")
    p.add_argument("--T", type=positive, default=20.0, help="temperature of the soft targets (one student)")
    p.add_argument("--lam", type=fraction, default=0.1, help="weight of the soft term (one student)")
    p.add_argument("--sweep-T", type=positive, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--sweep-lam", type=fraction, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--group", type=positive_int, default=10,
                   help="students per lock-step group in the sweep (each ~2 GB of GPU memory at batch 512)")
    p.add_argument("--epochs", type=positive_int, default=30)
    p.add_argument("--lr", type=positive, default=0.05, help="peak learning rate")
    p.add_argument("--batch", type=positive_int, default=512)
    p.add_argument("--momentum", type=nonneg, default=0.9)
    p.add_argument("--wd", type=nonneg, default=5e-4)
    p.add_argument("--warmup", type=nonneg_int, default=1, help="epochs of linear lr warm-up")
    p.add_argument("--bn", type=flag, default=1, help="BatchNorm after each conv (carried over from the teacher)")
    p.add_argument("--dropout", type=fraction, default=0.0, help="dropout before the last FC (the teacher has none)")
    p.add_argument("--augment", type=flag, default=1, help="the teacher's crop + flip")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.dropout >= 1:
        die(f"--dropout must be < 1, got {args.dropout}")
    args.teacher = args.teacher or os.path.join(args.out, "teacher", "model.pt")
    return args


def name(T, lam):
    """A student's folder name under out/kd/."""
    return "lam0" if lam == 0 else f"T{T:g}_lam{lam:g}"


def distill_loss(teacher, pairs):
    """The loss function of a lock-step group: each student's kd_loss at its own (T, lam), stacked.
    Evaluation batches bring the teacher's cached logits `t`; a training batch gets them from one
    teacher forward pass (eval mode, no gradient) on exactly the augmented images the students see."""
    def loss(students, x, y, t=None):
        if t is None:
            with torch.no_grad():
                t = teacher(x)
        s = students(x)
        return torch.stack([kd_loss(s[k], t, y, T, lam) for k, (T, lam) in enumerate(pairs)]), s
    return loss


def train_group(group, pairs, teacher, data, t_logits, args, shared, device):
    """Train the students `pairs` = [(T, lam), ...] in lock-step into out/kd/<group>/ (checkpoint,
    history) and out/kd/<student>/ (each student's curves, weights and result). `t_logits`: the
    teacher's logits on the un-augmented train and test sets, for the evaluations."""
    kd = os.path.join(args.out, "kd")
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    t_train, t_test = t_logits
    models = []
    for _ in pairs:
        torch.manual_seed(args.seed)  # every student starts from the same weights
        models.append(StudentCNN(bn=bool(args.bn), dropout=args.dropout))
    students = Students(models).to(device, memory_format=torch.channels_last)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    train = Batches(x_train, y_train, batch_size=args.batch, shuffle=True, augment=bool(args.augment), gen=gen)
    evals = {"train": Batches(x_train, y_train, t_train, batch_size=1024),
             "test": Batches(x_test, y_test, t_test, batch_size=1024)}
    opt = sgd(students.parameters(), args.lr, args.momentum, args.wd)
    sched = warmup_cosine(opt, args.epochs * len(train), args.warmup * len(train))

    print(f"-- lock-step group {group}: {len(pairs)} student(s) " + ", ".join(name(*p) for p in pairs))
    history = fit(students, distill_loss(teacher, pairs), opt, sched, train, evals, args.epochs, os.path.join(kd, group),
                  shared | {"students": [list(p) for p in pairs]}, gen, group=True)
    dead = diverged(history)
    for k, (T, lam) in enumerate(pairs):
        run = os.path.join(kd, name(T, lam))
        os.makedirs(run, exist_ok=True)
        h = [{key: v[k] if isinstance(v, list) else v for key, v in row.items()} for row in history]
        result = {key: h[-1][key] for key in ("train_acc", "test_acc", "train_loss", "test_loss")} \
            | {"T": T, "lam": lam, "epochs": args.epochs, "device": str(device)}
        if k in dead:
            result["diverged"] = "diverged at epoch {}, step {}".format(*dead[k])
        write_json(os.path.join(run, "config.json"), shared | {"T": T, "lam": lam})
        write_json(os.path.join(run, "history.json"), h)
        finish(run, None if k in dead else students[k], h, result,
               f"Student T={T:g}, λ={lam:g}" if lam else "Student λ=0 (labels only)")
    with contextlib.suppress(FileNotFoundError):  # every student is finished: the group's checkpoint goes
        os.remove(os.path.join(kd, group, "checkpoint.pt"))


def setup_rows(args, device):
    n = sum(p.numel() for p in StudentCNN(bn=bool(args.bn)).parameters())
    return [
        ["Student", "conv 5x5/32, 3x3/64, 3x3/128 (stride 1, pad 1, ReLU), each + max-pool 2x2 stride 1; "
                    "FC 93,312->500 (ReLU); FC 500->10; softmax in the loss"],
        ["Parameters", f"{n:,}" + (" (46,756,294 + BatchNorm)" if args.bn else "")],
        ["BatchNorm", "after each conv (as in the teacher)" if args.bn else "none"],
        ["Dropout", f"{args.dropout} before the last FC" if args.dropout else "none (as in the teacher)"],
        ["Augmentation", "the teacher's: random crop 32, pad 4 + horizontal flip" if args.augment else "none"],
        ["Pre-processing", "as the teacher: /255, ImageNet mean/std"],
        ["Initialisation", f"PyTorch default (Kaiming-uniform), seed {args.seed}; every student starts from the same weights"],
        ["Loss", "λ·T²·CE(softmax(t/T), softmax(s/T)) + (1-λ)·CE(y, softmax(s)); test accuracy at T = 1"],
        ["Soft targets", "teacher (part A) in eval mode, no gradient, on the same augmented batch"],
        ["Optimiser", "SGD with Nesterov momentum"],
        ["Learning rate schedule", f"linear warm-up to {args.lr} over {args.warmup} epoch(s), then cosine to 0, per step"],
        ["Momentum", args.momentum],
        ["Weight decay", args.wd],
        ["Batch size", args.batch],
        ["Epochs", args.epochs],
        ["Precision", precision(device)],
        ["Training", "students of a table or sweep trained in lock-step: same batches, one teacher pass per batch"],
        ["Loss curves", "the distillation objective on the training set (eval mode, un-augmented) and the test set"],
    ]


def teacher_result(args):
    """The teacher's result.json, beside the weights the students learnt from."""
    path = os.path.join(os.path.dirname(args.teacher), "result.json")
    if not os.path.exists(path):
        die(f"missing {path}: the teacher's run is not finished (make teacher)")
    return read_json(path)


def accuracy_cells(r):
    """Train and test accuracy of a student's result, or what stopped it."""
    return [r["diverged"]] * 2 if "diverged" in r else [pct(r["train_acc"]), pct(r["test_acc"])]


def write_table_outputs(args, shared):
    """out/tables/kd_table.md (the assignment's six rows) and the figure of every student's test accuracy."""
    kd = os.path.join(args.out, "kd")
    teacher = teacher_result(args)
    rows = [["Teacher Network (Part A)", "-", "-", pct(teacher["train_acc"]), pct(teacher["test_acc"])]]
    curves = {}
    for label, T, lam in TABLE:
        run = os.path.join(kd, name(T, lam))
        r, h = read_json(os.path.join(run, "result.json")), read_json(os.path.join(run, "history.json"))
        rows.append([label, f"{T:g}" if lam else "-", f"{lam:g}", *accuracy_cells(r)])
        curves[f"{label} (T={T:g})" if lam else label] = ([e["epoch"] for e in h], [e["test_acc"] for e in h])
    write_table(os.path.join(args.out, "tables", "kd_table.md"), "Knowledge distillation: final accuracy (last epoch)",
                ["Model", "Temperature, T", "λ", "Training Accuracy (%)", "Testing Accuracy (%)"], rows,
                note=f"Students: {args.epochs} epochs, lr {args.lr}, batch {args.batch}; test accuracy at T = 1.")
    plot_compare(curves, os.path.join(kd, "table", "test_accuracy.png"), "Students: test accuracy (T = 1 at test)",
                 "test accuracy (%)", ref=("teacher", teacher["test_acc"]))


def finite_cells(grid):
    return [a for row in grid for a in row if not math.isnan(a)]


def write_sweep_outputs(args):
    """out/tables/kd_sweep.md (test accuracy over T x lam, best marked) and a heat map."""
    kd = os.path.join(args.out, "kd")
    teacher = teacher_result(args)["test_acc"]
    results = {(T, lam): read_json(os.path.join(kd, name(T, lam), "result.json")) for T in args.sweep_T for lam in args.sweep_lam}
    grid = [[math.nan if "diverged" in results[T, lam] else results[T, lam]["test_acc"] for lam in args.sweep_lam]
            for T in args.sweep_T]
    best = max((acc, T, lam) for T, row in zip(args.sweep_T, grid) for lam, acc in zip(args.sweep_lam, row)
               if not math.isnan(acc)) if finite_cells(grid) else (math.nan, math.nan, math.nan)
    rows = [[f"{T:g}"] + [f"**{pct(a)}**" if (a, T, lam) == best else accuracy_cells(results[T, lam])[1]
                          for lam, a in zip(args.sweep_lam, row)] for T, row in zip(args.sweep_T, grid)]
    write_table(os.path.join(args.out, "tables", "kd_sweep.md"), "Bonus: student test accuracy (%) over T and λ",
                ["T \\ λ"] + [f"{lam:g}" for lam in args.sweep_lam], rows,
                note=f"Best: T = {best[1]:g}, λ = {best[2]:g}: {pct(best[0])}% against the teacher's {pct(teacher)}% "
                     f"({best[0] - teacher:+.2f} points). {args.epochs} epoch(s) per student.")
    fig, ax = plt.subplots(figsize=(1.2 * len(args.sweep_lam) + 2.5, 0.6 * len(args.sweep_T) + 2))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set(xticks=range(len(args.sweep_lam)), xticklabels=[f"{v:g}" for v in args.sweep_lam], xlabel="λ (soft-target weight)",
           yticks=range(len(args.sweep_T)), yticklabels=[f"{v:g}" for v in args.sweep_T], ylabel="temperature T",
           title=f"Student test accuracy (%); teacher {pct(teacher)}%")
    finite = finite_cells(grid) or [0.0]
    for i, row in enumerate(grid):
        for j, a in enumerate(row):
            ax.text(j, i, "diverged" if math.isnan(a) else f"{a:.1f}", ha="center", va="center",
                    color="w" if math.isnan(a) or a < (min(finite) + max(finite)) / 2 else "k")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(os.path.join(kd, "sweep_heatmap.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse(argv)
    device = get_device(args.device)
    shared = {k: v for k, v in vars(args).items()
              if k in ("epochs", "lr", "batch", "momentum", "wd", "warmup", "bn", "dropout", "augment", "seed")}
    if args.table:
        groups = [("table", [(T, lam) for _, T, lam in TABLE])]
    elif args.sweep:
        pairs = list(dict.fromkeys((T if lam else 1.0, lam) for lam in args.sweep_lam for T in args.sweep_T))
        groups = [(f"sweep{i // args.group + 1}", pairs[i:i + args.group]) for i in range(0, len(pairs), args.group)]
    else:
        groups = [(name(args.T, args.lam), [(args.T if args.lam else 1.0, args.lam)])]
    shared["teacher_sha256"] = file_sha256(args.teacher)  # a student belongs to the teacher it learnt from
    print(f"== Q1 part B: knowledge distillation -> {os.path.join(args.out, 'kd')} on {device}")
    todo = [(g, pairs) for g, pairs in groups
            if not all(finished(os.path.join(args.out, "kd", name(*p)), shared | {"T": p[0], "lam": p[1]}) for p in pairs)]
    if todo:
        teacher = load_teacher(args.teacher, device).to(memory_format=torch.channels_last)
        teacher.requires_grad_(False)
        data = load_cifar10(args.data, device)
        # the teacher is fixed: its logits on the un-augmented sets are computed once, for every group
        t_logits = [predict(teacher, Batches(data[s][0], batch_size=1024)) for s in ("train", "test")]
        for group, pairs in todo:
            train_group(group, pairs, teacher, data, t_logits, args, shared, device)
    else:
        print("every student asked for is finished (delete its folder under out/kd/ to train it again)")
    if not args.sweep:  # the setup of the assignment's students; the sweep's table notes its own epochs
        write_table(os.path.join(args.out, "tables", "kd_setup.md"), "Student training setup", ["Item", "Setting"],
                    setup_rows(args, device))
    if args.table:
        write_table_outputs(args, shared)
    if args.sweep:
        write_sweep_outputs(args)
    failed = []
    for g, pairs in groups:
        for T, lam in pairs:
            r = read_json(os.path.join(args.out, "kd", name(T, lam), "result.json"))
            print(f"student {name(T, lam)}: " + ("{}" if "diverged" in r else "train {}%, test {}%").format(*accuracy_cells(r)))
            failed += [f"{name(T, lam)} {r['diverged']}"] if "diverged" in r else []
    if failed:
        die(f"{len(failed)} student(s) diverged ({'; '.join(failed)}); the tables say so. Lower LR= and delete "
            "their folders under out/kd/ to train them again")


if __name__ == "__main__":
    run(main)
