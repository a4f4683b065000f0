"""Q1 part B: the student CNN, trained by knowledge distillation from the teacher of part A.

  python q1b_kd.py --T 20 --lam 0.1   one student                        -> out/kd/T20_lam0.1/
  python q1b_kd.py --table            the assignment's five students      -> out/tables/kd_table.md
  python q1b_kd.py --sweep            the bonus grid of T x lam           -> out/tables/kd_sweep.md

Loss: lam * T^2 * CE(softmax(t/T), softmax(s/T)) + (1 - lam) * CE(y, softmax(s)), with the teacher's
logits t computed in eval mode, without gradients, on the same augmented batch; accuracy at T=1.
Every student is trained --seeds times (seed i: its initial weights, data order and augmentation).
Students train in lock-step: one teacher forward pass per step for all of them and all their seeds.
"""
import argparse
import contextlib
import math
import os

import torch

from common import (Batches, Parser, SeedBatches, StudentCNN, Students, die, distill_loss, diverged,
                    file_sha256, finish, finished, fit, flag, fraction, get_device, group_size,
                    load_cifar10, load_teacher, mean_std, nonneg, nonneg_int, pct, plot_compare, plot_curves,
                    plot_heatmap, positive, positive_int, precision, predict, read_json, run, seed_cells, seed_runs,
                    sgd, warmup_cosine, write_json, write_table)

# The assignment's table (Q1B (4)): label, T, lam. lam = 0 is plain cross-entropy, so its T is moot.
TABLE = [("Student Network (λ = 0)", 1.0, 0.0), ("Student Network (λ = 1)", 20.0, 1.0),
         ("KD 1", 5.0, 0.1), ("KD 2", 10.0, 0.1), ("KD 3", 20.0, 0.1)]
LOSS_LABEL = "λ·T²·KL(teacher‖student) + (1−λ)·CE"


def parse(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.run_options(epochs=30, lr=0.04, batch=512, teacher=True,
                  lr_help="peak learning rate: a third of the lowest lr at which a student diverged in the lr range "
                          "test (README), with clipping")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--table", action="store_true", help="the assignment's five students, in lock-step")
    mode.add_argument("--sweep", action="store_true", help="the bonus grid --sweep-T x --sweep-lam, in lock-step groups")
    p.add_argument("--T", type=positive, default=20.0, help="temperature of the soft targets (one student)")
    p.add_argument("--lam", type=fraction, default=0.1, help="weight of the soft term (one student)")
    p.add_argument("--seeds", type=positive_int, default=None, help="seeds per student (default: 3 on CUDA, 1 on the CPU)")
    p.add_argument("--sweep-T", type=positive, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--sweep-lam", type=fraction, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--sweep-seeds", type=positive_int, default=1, help="seeds per student of the sweep")
    p.add_argument("--group", type=nonneg_int, default=0, help="students per lock-step group in the sweep "
                   "(0: as many as fit the free GPU memory, measured; 10 on the CPU)")
    p.add_argument("--warmup", type=nonneg_int, default=1, help="epochs of linear lr warm-up")
    p.add_argument("--clip", type=nonneg, default=5.0, help="clip each student's gradient norm to this (0: off); "
                   "it widened the stable lr range 2.7x (λ=0) and 19x (λ=1, T=20) in the lr range test")
    p.add_argument("--ckpt-every", type=nonneg_int, default=0,
                   help="checkpoint a lock-step group every k epochs (0: k such that writes take < 5%% of the time)")
    p.add_argument("--bn", type=flag, default=1, help="BatchNorm after each conv (carried over from the teacher)")
    p.add_argument("--dropout", type=fraction, default=0.0, help="dropout before the last FC (the teacher has none)")
    p.add_argument("--augment", type=flag, default=1, help="the teacher's crop + flip")
    p.add_argument("--seed", type=int, default=0, help="the first seed; seed i of a student is SEED + i")
    args = p.parse_args(argv)
    if args.dropout >= 1:
        die(f"--dropout must be < 1, got {args.dropout}")
    return args


def name(T, lam, i=0):
    """A student's folder name under out/kd/ (seed i > 0 gets a suffix)."""
    return ("lam0" if lam == 0 else f"T{T:g}_lam{lam:g}") + (f"_seed{i}" if i else "")


def train_group(group, specs, teacher, data, t_logits, args, shared, device):
    """Train the students `specs` = [(T, lam, seed index), ...] in lock-step into out/kd/<group>/
    (checkpoint, history) and out/kd/<student>/ (each student's curves, weights and result). `t_logits`:
    the teacher's logits on the un-augmented train and test sets, for the evaluations."""
    kd = os.path.join(args.out, "kd")
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    seeds = sorted({i for *_, i in specs})
    models = []
    for _, _, i in specs:
        torch.manual_seed(args.seed + i)  # students of one seed start from the same weights
        models.append(StudentCNN(bn=bool(args.bn), dropout=args.dropout))
    students = Students(models).to(device, memory_format=torch.channels_last)
    if args.compile:
        for m in students:
            m.compile()
    gens = [torch.Generator(device=device).manual_seed(args.seed + i) for i in seeds]
    train = SeedBatches([Batches(x_train, y_train, batch_size=args.batch, shuffle=True, augment=bool(args.augment), gen=g)
                         for g in gens])
    evals = {"train": Batches(x_train, y_train, t_logits[0], batch_size=1024),
             "test": Batches(x_test, y_test, t_logits[1], batch_size=1024)}
    opt = sgd(students.parameters(), args.lr, args.momentum, args.wd)
    sched = warmup_cosine(opt, args.epochs * len(train), args.warmup * len(train))

    print(f"-- lock-step group {group}: {len(specs)} student(s) " + ", ".join(name(*p) for p in specs))
    loss_fn = distill_loss(teacher, [(T, lam, seeds.index(i)) for T, lam, i in specs], len(seeds))
    history = fit(students, loss_fn, opt, sched, train, evals, args.epochs, os.path.join(kd, group),
                  shared | {"students": [list(p) for p in specs]}, gens, group=True, clip=args.clip,
                  ce=("test",), ckpt_every=args.ckpt_every,  # test_ce: students of any T and λ compared
                  final_only=("train",) if args.sweep else ())  # the sweep's table needs final numbers only
    dead = diverged(history)
    for k, (T, lam, i) in enumerate(specs):
        folder = os.path.join(kd, name(T, lam, i))
        os.makedirs(folder, exist_ok=True)
        h = [{key: v[k] if isinstance(v, list) else v for key, v in row.items()} for row in history]
        result = {key: h[-1][key] for key in ("train_acc", "test_acc", "train_loss", "test_loss")} \
            | {"T": T, "lam": lam, "seed": args.seed + i, "epochs": args.epochs, "device": str(device)}
        if k in dead:
            result["diverged"] = "diverged at epoch {}, step {}".format(*dead[k])
        write_json(os.path.join(folder, "config.json"), student_config(shared, T, lam, i))
        write_json(os.path.join(folder, "history.json"), h)
        finish(folder, None if k in dead else students[k], h, result,
               (f"Student T={T:g}, λ={lam:g}" if lam else "Student λ=0 (labels only)") + (f", seed {args.seed + i}"),
               LOSS_LABEL, half=True)  # 94 MB, not 187: 45 students fit the 8 GB that make all may use
    with contextlib.suppress(FileNotFoundError):  # every student is finished: the group's checkpoint goes
        os.remove(os.path.join(kd, group, "checkpoint.pt"))


def student_config(shared, T, lam, i):
    return shared | {"T": T, "lam": lam, "seed": shared["seed"] + i}


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
        ["Initialisation", "PyTorch default (Kaiming-uniform); the students of one seed start from the same weights"],
        ["Seeds", f"{args.seeds} per student (seeds {args.seed}..{args.seed + args.seeds - 1}: initial weights, data order, "
                  "augmentation), one teacher; tables give mean ± std (n)"],
        ["Loss", "λ·T²·CE(softmax(t/T), softmax(s/T)) + (1-λ)·CE(y, softmax(s)); test accuracy at T = 1"],
        ["Soft targets", "teacher (part A) in eval mode, no gradient, on the same augmented batch"],
        ["Optimiser", "SGD with Nesterov momentum"],
        ["Learning rate schedule", f"linear warm-up to {args.lr} over {args.warmup} epoch(s), then cosine to 0, per step"],
        ["Gradient clipping", f"each student's gradient norm clipped to {args.clip:g}" if args.clip else "none"],
        ["Momentum", args.momentum],
        ["Weight decay", args.wd],
        ["Batch size", args.batch],
        ["Epochs", args.epochs],
        ["Precision", precision(device)],
        ["Training", "all students and seeds in lock-step: one teacher forward pass per step for all"],
        ["Loss curves", f"{LOSS_LABEL}: the loss minus the teacher's entropy (a constant, so the same gradients), 0 when "
                        "the student matches teacher and labels; train set in eval mode, un-augmented, and test set"],
    ]


def teacher_result(args):
    """The teacher's result.json, beside the weights the students learnt from."""
    path = os.path.join(os.path.dirname(args.teacher), "result.json")
    if not os.path.exists(path):
        die(f"missing {path}: the teacher's run is not finished (make teacher)")
    return read_json(path)


def student_runs(args, T, lam, seeds):
    """(results, histories) of a student's seeds."""
    return seed_runs([os.path.join(args.out, "kd", name(T, lam, i)) for i in range(seeds)])


def write_table_outputs(args):
    """out/tables/kd_table.md (the assignment's six rows, mean ± std over seeds, per-seed CSV), each
    student's curves over its seeds, and the figures comparing every student."""
    kd, teacher = os.path.join(args.out, "kd"), teacher_result(args)
    rows = [["Teacher Network (Part A)", "-", "-", pct(teacher["train_acc"]), pct(teacher["test_acc"])]]
    per_seed = [["Teacher Network (Part A)", "", "", "", teacher["train_acc"], teacher["test_acc"], ""]]
    acc, ce = {}, {}
    for label, T, lam in TABLE:
        results, hs = student_runs(args, T, lam, args.seeds)
        rows.append([label, f"{T:g}" if lam else "-", f"{lam:g}", *seed_cells(results, ("train_acc", "test_acc"))])
        per_seed += [[label, T, lam, r["seed"], r["train_acc"], r["test_acc"], r.get("diverged", "")] for r in results]
        title = f"{label}" + (f", T={T:g}" if lam else "")
        plot_curves(hs, "loss", os.path.join(kd, "table", f"{name(T, lam)}_loss.png"), f"{title}: loss", LOSS_LABEL)
        plot_curves(hs, "acc", os.path.join(kd, "table", f"{name(T, lam)}_accuracy.png"), f"{title}: accuracy")
        key = f"{label} (T={T:g})" if lam else label
        acc[key] = ([e["epoch"] for e in hs[0]], [[e["test_acc"] for e in h] for h in hs])
        ce[key] = ([e["epoch"] for e in hs[0]], [[e["test_ce"] for e in h] for h in hs])
    write_table(os.path.join(args.out, "tables", "kd_table.md"), "Knowledge distillation: final accuracy (last epoch)",
                ["Model", "Temperature, T", "λ", "Training Accuracy (%)", "Testing Accuracy (%)"], rows,
                note=f"Students: mean ± std over {args.seeds} seed(s) (n), one teacher; {args.epochs} epochs, lr {args.lr}, "
                     f"batch {args.batch}; test accuracy at T = 1. Per-seed numbers: kd_table.csv.",
                csv=(["model", "T", "lam", "seed", "train_acc", "test_acc", "diverged"], per_seed))
    plot_compare(acc, os.path.join(kd, "table", "test_accuracy.png"), "Students: test accuracy (T = 1 at test)",
                 "test accuracy (%)", ref=("teacher", teacher["test_acc"]))
    plot_compare(ce, os.path.join(kd, "table", "test_ce.png"), "Students: test cross-entropy with the labels (T = 1)",
                 "cross-entropy")


def write_sweep_outputs(args):
    """out/tables/kd_sweep.md (test accuracy over T x lam, mean over seeds, best marked; per-seed CSV) and a heat map."""
    kd = os.path.join(args.out, "kd")
    teacher = teacher_result(args)["test_acc"]
    results = {(T, lam): student_runs(args, T, lam, args.sweep_seeds)[0] for T in args.sweep_T for lam in args.sweep_lam}
    ok = {k: [r["test_acc"] for r in rs] for k, rs in results.items() if not any("diverged" in r for r in rs)}
    mean = {k: sum(v) / len(v) for k, v in ok.items()}
    best = max(mean, key=mean.get, default=None)
    rows = [[f"{T:g}"] + [(f"**{mean_std(ok[T, lam])}**" if (T, lam) == best else mean_std(ok[T, lam]))
                          if (T, lam) in ok else seed_cells(results[T, lam], ["test_acc"])[0] for lam in args.sweep_lam]
            for T in args.sweep_T]
    note = (f"Best: T = {best[0]:g}, λ = {best[1]:g}: {mean_std(ok[best])}% against the teacher's {pct(teacher)}% "
            f"({mean[best] - teacher:+.2f} points). " if best else "Every student diverged. ")
    write_table(os.path.join(args.out, "tables", "kd_sweep.md"), "Bonus: student test accuracy (%) over T and λ",
                ["T \\ λ"] + [f"{lam:g}" for lam in args.sweep_lam], rows,
                note=note + f"{args.epochs} epoch(s) per student; {args.sweep_seeds} seed(s) per cell, one teacher for all.",
                csv=(["T", "lam", "seed", "test_acc", "diverged"],
                     [[T, lam, r["seed"], r["test_acc"], r.get("diverged", "")] for (T, lam), rs in results.items() for r in rs]))
    grid = [[mean.get((T, lam), math.nan) for lam in args.sweep_lam] for T in args.sweep_T]
    plot_heatmap(grid, [f"{v:g}" for v in args.sweep_lam], [f"{v:g}" for v in args.sweep_T], "λ (soft-target weight)",
                 "temperature T", f"Student test accuracy (%); teacher {pct(teacher)}%", os.path.join(kd, "sweep_heatmap.png"))


def main(argv=None):
    args = parse(argv)
    device = get_device(args.device)
    args.seeds = args.seeds or (3 if device.type == "cuda" else 1)
    shared = {k: v for k, v in vars(args).items() if k in
              ("epochs", "lr", "batch", "momentum", "wd", "warmup", "clip", "bn", "dropout", "augment", "seed")}
    if args.table:
        groups = [("table", [(T, lam, i) for _, T, lam in TABLE for i in range(args.seeds)])]
    elif args.sweep:
        pairs = list(dict.fromkeys((T if lam else 1.0, lam) for lam in args.sweep_lam for T in args.sweep_T))
        specs = [(T, lam, i) for T, lam in pairs for i in range(args.sweep_seeds)]
        size = group_size(args, device)
        groups = [(f"sweep{i // size + 1}", specs[i:i + size]) for i in range(0, len(specs), size)]
    else:
        one = name(args.T, args.lam) + ("_seeds" if args.seeds > 1 else "")  # a group's folder of its own for seeds
        groups = [(one, [(args.T if args.lam else 1.0, args.lam, i) for i in range(args.seeds)])]
    shared["teacher_sha256"] = file_sha256(args.teacher)  # a student belongs to the teacher it learnt from
    print(f"== Q1 part B: knowledge distillation -> {os.path.join(args.out, 'kd')} on {device}")
    todo = [(g, specs) for g, specs in groups
            if not all(finished(os.path.join(args.out, "kd", name(*p)), student_config(shared, *p)) for p in specs)]
    if todo:
        teacher = load_teacher(args.teacher, device).to(memory_format=torch.channels_last)
        teacher.requires_grad_(False)
        if args.compile:
            teacher.compile()
        data = load_cifar10(args.data, device)
        # the teacher is fixed: its logits on the un-augmented sets are computed once, for every group
        t_logits = [predict(teacher, Batches(data[s][0], batch_size=1024)) for s in ("train", "test")]
        for group, specs in todo:
            train_group(group, specs, teacher, data, t_logits, args, shared, device)
    else:
        print("every student asked for is finished (delete its folder under out/kd/ to train it again)")
    if not args.sweep:  # the setup of the assignment's students; the sweep's table notes its own epochs
        write_table(os.path.join(args.out, "tables", "kd_setup.md"), "Student training setup", ["Item", "Setting"],
                    setup_rows(args, device))
    if args.table:
        write_table_outputs(args)
    if args.sweep:
        write_sweep_outputs(args)
    failed = []
    for g, specs in groups:
        for spec in specs:
            r = read_json(os.path.join(args.out, "kd", name(*spec), "result.json"))
            print(f"student {name(*spec)}: " + (r["diverged"] if "diverged" in r else
                                                f"train {pct(r['train_acc'])}%, test {pct(r['test_acc'])}%"))
            failed += [f"{name(*spec)} {r['diverged']}"] if "diverged" in r else []
    if failed:
        die(f"{len(failed)} student(s) diverged ({'; '.join(failed)}); the tables say so. Lower LR= and delete "
            "their folders under out/kd/ to train them again")


if __name__ == "__main__":
    run(main)
