"""Q1 part B: the student CNN, trained by knowledge distillation from the teacher of part A.

  python q1b_kd.py --T 20 --lam 0.1   one student (--seeds times)        -> out/kd/T20_lam0.1[_seed<i>]/
  python q1b_kd.py --table            the assignment's five students      -> out/kd/{lam0,T20_lam1,...}/
  python q1b_kd.py --sweep            the bonus grid of T x lam           -> out/kd/T<T>_lam<lam>/

The assignment's items, and what answers each:
  the student network (its table)                  common.StudentCNN: the table's layers, BatchNorm added (--bn 1)
  (1) soft targets from the teacher at T           distill_loss (the teacher's pass), common.soft_targets;
                                                   what they hold: common.soft_target_summary (main)
  (2) the training setup, the teacher's tricks     parse: the teacher's SGD (Nesterov momentum 0.9, L2 5e-4), crop +
                                                   flip, BatchNorm; its own lr 0.02 (the teacher's: 0.1), argued at
                                                   --lr, warm-up 1 epoch (its 2); added: first FC at 10%, clip 5
  (3) the loss, a mix of soft and hard CE          common.kd_loss (the formula, T^2 included)
      one training batch, as it runs               distill_loss: the teacher's pass, then each student's kd_loss at its
                                                   T and lam; then common.train_epoch: step.backward, step.clip_norms
                                                   (--clip, each student on its own), step.sgd_step. Alone: common.kd_step
      (a), (b) loss and test accuracy per epoch    scored_loss, each epoch in fit's history; written in train_group
  (4) the table; (5) bonus: more T and lambda      TABLE, main with --table; main with --sweep

Each student trains --seeds times (seed i: its initial weights, data order, augmentation), a seed's students in
lock-step (the same batches, one teacher pass per step). Every `M.` call here is machinery (command line, folders): skip it.
"""
import argparse
import contextlib
import hashlib
import json
import os

import torch

import machinery as M
from common import (Batches, StudentCNN, Students, fidelity, fit, kd_loss, load_cifar10, load_teacher,
                    predict, sgd, soft_target_summary, student_groups, warmup_cosine)
from plots import plot_curves

# The assignment's table (Q1B (4)): label, T, lam. lam = 0 is plain cross-entropy, so its T is moot.
TABLE = [("Student Network (λ = 0)", 1.0, 0.0), ("Student Network (λ = 1)", 20.0, 1.0),
         ("KD 1", 5.0, 0.1), ("KD 2", 10.0, 0.1), ("KD 3", 20.0, 0.1)]
LOSS_LABEL = "λ·T²·KL(teacher‖student) + (1−λ)·CE"


def parse(argv=None):
    p = M.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.run_options(epochs=30, lr=0.02, batch=512, momentum=0.9, wd=5e-4, teacher=True,  # the teacher's SGD and L2
                  lr_help="peak learning rate: under a third of the lowest lr at which a clipped student diverged in "
                          "the lr range test on real CIFAR-10 images (0.067, docs/real_cifar.md)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--table", action="store_true", help="the assignment's five students, in lock-step")
    mode.add_argument("--sweep", action="store_true", help="the bonus grid --sweep-T x --sweep-lam, in lock-step groups")
    p.add_argument("--T", type=M.positive, default=20.0, help="temperature of the soft targets (one student)")
    p.add_argument("--lam", type=M.fraction, default=0.1, help="weight of the soft term (one student)")
    p.add_argument("--seeds", type=M.positive_int, default=None, help="seeds per student (default: 3 on CUDA, 1 on the CPU)")
    p.add_argument("--sweep-T", type=M.positive, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--sweep-lam", type=M.fraction, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--sweep-seeds", type=M.positive_int, default=1, help="seeds per student of the sweep")
    p.add_argument("--group", type=M.nonneg_int, default=0, help="students per lock-step group (0: as many as fit the "
                   "free GPU memory, measured; 10 on the CPU)")
    p.add_argument("--warmup", type=M.nonneg_int, default=1, help="epochs of linear lr warm-up")
    p.add_argument("--fc1-lr", type=M.positive, default=10.0, help="lr of the first FC (93,312 inputs), %% of LR: "
                   "at lr 0.04, 10 gave 66%% after 2 epochs on real CIFAR-10 images where 100 gave 57%% (docs/real_cifar.md)")
    p.add_argument("--clip", type=M.nonneg, default=5.0, help="clip each student's gradient norm to this (0: off); "
                   "on real images it widened the stable lr range 31x for λ=1, T=20 (docs/real_cifar.md)")
    p.add_argument("--ckpt-every", type=M.nonneg_int, default=0,
                   help="checkpoint a lock-step group every k epochs (0: k such that writes take < 5%% of the time)")
    p.add_argument("--bn", type=M.flag, default=1, help="BatchNorm after each conv (carried over from the teacher)")
    p.add_argument("--dropout", type=M.fraction, default=0.0, help="dropout before the last FC (the teacher has none)")
    p.add_argument("--augment", type=M.flag, default=1, help="the teacher's crop + flip")
    p.add_argument("--seed", type=int, default=0, help="the first seed; seed i of a student is SEED + i")
    args = p.parse_args(argv)
    if args.dropout >= 1:
        M.die(f"--dropout must be < 1, got {args.dropout}")
    return args


def name(T, lam, i=0):
    """A student's folder name under out/kd/ (seed i > 0 gets a suffix)."""
    return ("lam0" if lam == 0 else f"T{T:g}_lam{lam:g}") + (f"_seed{i}" if i else "")


def group_dir(args, specs):
    """The folder of a lock-step group (its checkpoint and history), named after its students."""
    return os.path.join(args.out, "kd", "lockstep_" + hashlib.sha1(json.dumps(specs).encode()).hexdigest()[:10])


def distill_loss(teacher, specs):
    """The training loss of a lock-step group of students, `specs` = [(T, lam) of each]. For one training batch (x, y):
      1. t = teacher(x): once for all the group's students, in eval mode, without gradients;
      2. s = students(x): every student's logits on the same images;
      3. loss_k = kd_loss(s[k], t, y) at student k's own T and lam.
    common.train_epoch then steps: the losses' sum goes backward (the students share no weight), each student's
    gradient is clipped to norm --clip, SGD steps. One student's step, plainly: common.kd_step (test_step: equal)."""
    teacher.eval()  # BatchNorm on its running statistics: the teacher of part A as it was trained

    def loss(students, x, y):
        with torch.no_grad():  # the teacher's logits t (zeros when every lam is 0: no soft term to make)
            t = teacher(x) if any(lam for _, lam in specs) else torch.zeros(len(x), 10, device=x.device)
        s = students(x)
        return torch.stack([kd_loss(s[k], t, y, T, lam) for k, (T, lam) in enumerate(specs)]), s
    return loss


def scored_loss(specs):
    """The evaluation loss: each student's kd_loss on the whole batch, with t computed once in main; and fidelity."""
    def loss(students, x, y, t):
        s = students(x)
        return torch.stack([kd_loss(s[k], t, y, T, lam) for k, (T, lam) in enumerate(specs)]), s, fidelity(s, t, y)
    return loss


def train_group(specs, teacher, data, t_logits, args, shared, device):
    """Train the students `specs` = [(T, lam, seed index), ...] in lock-step (the group's checkpoint and
    history in group_dir) into out/kd/<student>/: each student's curves, weights and result.
    `t_logits`: the teacher's logits on the un-augmented train and test sets, for the evaluations."""
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    assert len({i for *_, i in specs}) == 1, "a lock-step group is one seed's students (M.lockstep_groups)"
    seed = args.seed + specs[0][2]  # its students: the same initial weights and the same batches (paired by seed)
    models = []
    for _ in specs:
        torch.manual_seed(seed)  # students of one seed start from the same weights, in any group
        models.append(StudentCNN(bn=bool(args.bn), dropout=args.dropout))
    students = M.prepare(Students(models), device, args.compile)
    gen = torch.Generator(device=device).manual_seed(seed)  # the seed's data order and augmentation, in any group
    train = Batches(x_train, y_train, batch_size=args.batch, shuffle=True, augment=bool(args.augment), gen=gen)
    pairs = [(T, lam) for T, lam, _ in specs]
    evals = {"train": (scored_loss(pairs), Batches(x_train, y_train, t_logits[0], batch_size=1024)),
             "test": (scored_loss(pairs), Batches(x_test, y_test, t_logits[1], batch_size=1024))}
    opt = sgd(student_groups(students, args.lr, args.fc1_lr / 100), args.lr, args.momentum, args.wd)
    sched = warmup_cosine(opt, args.epochs * len(train), args.warmup * len(train))
    print(f"-- lock-step group of {len(specs)} student(s): " + ", ".join(name(*p) for p in specs))
    run = M.Run(group_dir(args, specs), shared | {"students": [list(p) for p in specs]}, gen, args.ckpt_every)
    # the KD training: distill_loss on each batch of `train`; each student's own gradient clipped to norm --clip
    history = fit(students, distill_loss(teacher, pairs), opt, sched, train, evals, args.epochs, run, clip=args.clip)
    dead = M.diverged(history)
    for k, (T, lam, i) in enumerate(specs):  # each student's own folder, as if it had trained alone
        folder = os.path.join(args.out, "kd", name(T, lam, i))
        h = [{key: v[k] if isinstance(v, list) else v for key, v in row.items()} for row in history]
        keys = ("train_acc", "test_acc", "train_loss", "test_loss", "test_ce", "test_agree", "test_kl")
        result = {key: h[-1][key] for key in keys} | {"T": T, "lam": lam, "seed": args.seed + i, "epochs": args.epochs,
                                                      "device": str(device)}
        if k in dead:
            result["diverged"] = "diverged at epoch {}, step {}".format(*dead[k])
        os.makedirs(folder, exist_ok=True)
        M.write_json(os.path.join(folder, "config.json"), student_config(shared, T, lam, i))
        M.write_json(os.path.join(folder, "history.json"), h)
        plot_curves([((f"T={T:g}, λ={lam:g}" if lam else "λ=0") + f", seed {args.seed + i}: ", [h])],
                    os.path.join(folder, "curves"), LOSS_LABEL)
        M.finish(folder, None if k in dead else students[k], result, half=True)
    with contextlib.suppress(FileNotFoundError):  # every student is finished: the group's checkpoint goes
        os.remove(os.path.join(group_dir(args, specs), "checkpoint.pt"))


def student_config(shared, T, lam, i):
    return shared | {"T": T, "lam": lam, "seed": shared["seed"] + i}


def main(argv=None):
    args = parse(argv)
    device = M.setup(args)
    args.seeds = args.seeds or (3 if device.type == "cuda" else 1)
    shared = {k: v for k, v in vars(args).items() if k in ("epochs", "lr", "fc1_lr", "batch", "momentum", "wd", "warmup",
                                                            "clip", "bn", "dropout", "augment", "seed", "precision")}
    shared["teacher_sha256"] = M.file_sha256(args.teacher)  # a student belongs to the teacher it learnt from
    os.makedirs(os.path.join(args.out, "kd"), exist_ok=True)
    if args.table:
        students = [(T, lam, i) for _, T, lam in TABLE for i in range(args.seeds)]
    elif args.sweep:
        pairs = list(dict.fromkeys((T if lam else 1.0, lam) for lam in args.sweep_lam for T in args.sweep_T))
        students = [(T, lam, i) for T, lam in pairs for i in range(args.sweep_seeds)]
        M.write_json(os.path.join(args.out, "kd", "sweep.json"),  # the grid, for the report
                     {"T": args.sweep_T, "lam": args.sweep_lam, "seeds": args.sweep_seeds})
    else:
        students = [(args.T if args.lam else 1.0, args.lam, i) for i in range(args.seeds)]
    print(f"== Q1 part B: knowledge distillation -> {os.path.join(args.out, 'kd')} on {device}, {args.precision}")
    todo = [s for s in students if not M.finished(os.path.join(args.out, "kd", name(*s)), student_config(shared, *s))]
    if todo:
        teacher = M.prepare(load_teacher(args.teacher, device).requires_grad_(False), device, args.compile)
        data = load_cifar10(args.data, device)
        # the teacher is fixed: its logits on the un-augmented sets are computed once, for every group
        t_logits = [predict(teacher, Batches(data[s][0], batch_size=1024), args.precision) for s in ("train", "test")]
        M.write_json(os.path.join(args.out, "kd", "soft_targets.json"),  # Q1B (1): the table's soft targets, test set
                     soft_target_summary(t_logits[1], data["test"][1], sorted({1.0} | {T for _, T, lam in TABLE if lam})))
        sizing = lambda k: Students([StudentCNN(bn=bool(args.bn)) for _ in range(k)])  # noqa: E731  (memory probe)
        M.train_lockstep(todo, lambda specs: train_group(specs, teacher, data, t_logits, args, shared, device),
                         lambda specs: group_dir(args, specs), args, device, sizing)
    else:
        print("every student asked for is finished (delete its folder under out/kd/ to train it again)")
    failed = []
    for spec in students:
        r = M.read_json(os.path.join(args.out, "kd", name(*spec), "result.json"))
        print(f"student {name(*spec)}: " + (r["diverged"] if "diverged" in r else
                                            f"train {M.pct(r['train_acc'])}%, test {M.pct(r['test_acc'])}%"))
        failed += [f"{name(*spec)} {r['diverged']}"] if "diverged" in r else []
    if failed:
        M.die(f"{len(failed)} student(s) diverged ({'; '.join(failed)}); the tables say so. Lower LR= and delete "
              "their folders under out/kd/ to train them again")


if __name__ == "__main__":
    M.run(main)
