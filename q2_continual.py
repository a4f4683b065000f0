"""Q2: continual learning. A 100-subject face task (the new task) is added on top of the teacher of Q1
(the old task: CIFAR-10) by feature extraction, fine-tuning and Learning without Forgetting (Li & Hoiem),
with two references beyond the assignment that bracket LwF: joint training and fine-tuning every layer.

  python q2_continual.py                           the five methods -> out/continual/{fe,ft,lwf,joint,ft-all}/
  python q2_continual.py --methods ft --ft-layers "conv5_x:10 conv4_x:1"
  python q2_continual.py --methods --lwf-sweep 0.1 0.3 1 3   LwF at several lambda_o, and 0 -> lwf_lam*/

One network: the teacher's backbone with two heads, old (its 10-way fc) and new (100-way, fresh).
Old-task accuracy: the old head on CIFAR-10 after the change; new-task accuracy: the new head on faces.
Writes out/tables/{continual_setup,finetune_layers,lwf_setup,continual_table}.md and the forgetting curve.
"""
import argparse
import copy
import os

import torch

from common import (DIGIFACE_URL, Batches, ContinualNet, JointBatches, Parser, die, evaluate, fetch_digiface,
                    file_sha256, finish, finished, fit, flag, get_device, joint_loss, load_cifar10, load_faces,
                    load_teacher, lwf_loss, new_task, nonneg, nonneg_int, old_task, parse_layers, pct, plot_compare,
                    plot_curves, plot_tradeoff, positive, positive_int, precision, predict, read_json, resnet_layers,
                    run, seed_cells, seed_runs, sgd, warmup_cosine, write_json, write_table)

METHODS = {"fe": "Feature Extraction", "ft": "Fine Tuning", "lwf": "LwF",  # the assignment's three, then references
           "joint": "Joint training (reference)", "ft-all": "Fine-tuning all layers (reference)"}
RESULT_KEYS = ("old_train_acc", "old_test_acc", "new_train_acc", "new_test_acc", "old_train_acc_before", "old_test_acc_before")


def parse(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.run_options(epochs=20, lr=None, batch=128, teacher=True,
                  lr_help="the original learning rate, 100%% (default: the teacher's); other rates are %% of it")
    p.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--lwf-sweep", type=nonneg, nargs="*", default=[],
                   help="LwF at these lambda_o too, and at 0 (fine-tuning at LwF's rates): the trade-off curve")
    p.add_argument("--faces", default="", help="face image folder (<subject>/<image> or train/ + test/), or DigiFace-1M's zip "
                                               "on disk; default: DigiFace-1M, downloaded into DATA/digiface")
    p.add_argument("--faces-url", default=DIGIFACE_URL, help="the DigiFace-1M zip to read with range requests")
    p.add_argument("--subjects", type=positive_int, default=100)
    p.add_argument("--per-subject", type=positive_int, default=50)
    p.add_argument("--train-per-subject", type=positive_int, default=40)
    p.add_argument("--face-size", type=positive_int, default=64, help="faces are resized to this square")
    p.add_argument("--ft-layers", default="conv5_x:10",
                   help="fine-tuned layers with their lr in %% of the original, e.g. 'conv5_x:10 conv4_2:1'")
    p.add_argument("--ft-all-lr", type=positive, default=None,
                   help="ft-all: lr of every layer, %% of the original (default: FT_LAYERS' first rate)")
    p.add_argument("--lwf-lr", type=positive, default=10.0,
                   help="LwF and joint: lr of backbone and old head, %% of the original")
    p.add_argument("--lwf-warmup", type=nonneg_int, default=5, help="LwF: epochs training the new head alone first")
    p.add_argument("--lwf-T", type=positive, default=2.0, help="LwF: temperature (Li & Hoiem: 2)")
    p.add_argument("--lwf-lambda", type=nonneg, default=1.0, help="LwF: weight of the old-task loss (Li & Hoiem: 1)")
    p.add_argument("--adapt-bn", type=flag, default=0, help="1: BatchNorm statistics of trained layers adapt to faces")
    p.add_argument("--seeds", type=positive_int, default=None, help="seeds per method (default: 3 on CUDA, 1 on the CPU)")
    p.add_argument("--seed", type=int, default=0, help="the face split's seed, and the first training seed")
    args = p.parse_args(argv)
    if args.train_per_subject >= args.per_subject:
        die(f"--train-per-subject ({args.train_per_subject}) must be below --per-subject ({args.per_subject})")
    if ({"lwf", "joint"} & set(args.methods) or args.lwf_sweep) and args.lwf_warmup >= args.epochs:
        die(f"--lwf-warmup ({args.lwf_warmup}) must be below --epochs ({args.epochs})")
    first = parse_layers(args.ft_layers)[0][1]  # a bad FT_LAYERS fails now, not after the other methods
    args.ft_all_lr = args.ft_all_lr or first
    return args


# ----------------------------------------------------------------------------- the methods

def build(method, teacher, args, lr, seed=None):
    """The two-headed network, its parameter groups (each with its lr) and the per-epoch hook."""
    torch.manual_seed(args.seed if seed is None else seed)  # the same fresh new head for every method of a seed
    net = ContinualNet(copy.deepcopy(teacher), args.subjects, adapt_bn=bool(args.adapt_bn))
    net.requires_grad_(False)
    net.new.requires_grad_(True)
    shared = [q for n, q in net.named_parameters() if not n.startswith("new.")]  # backbone + old head
    trained = []  # (parameters, rate in % of the original) besides the new head at 100%
    if method == "ft":  # the chosen layers at their own rates; the rest stays frozen
        trained = [([q for m in resnet_layers()[layer] for q in net.backbone.get_submodule(m).parameters()], rate)
                   for layer, rate in parse_layers(args.ft_layers)]
    elif method == "ft-all":  # every layer of the backbone, faces only
        trained = [(list(net.backbone.parameters()), args.ft_all_lr)]
    elif method in ("lwf", "joint"):  # the same rates, warm-up and epochs
        trained = [(shared, args.lwf_lr)]
    for params, _ in trained:
        for q in params:
            q.requires_grad_(True)
    groups = [{"params": list(net.new.parameters()), "lr": lr}] + [{"params": ps, "lr": lr * rate / 100}
                                                                   for ps, rate in trained]

    def on_epoch(epoch):  # LwF and joint: step 1, warm-up: the new head alone; step 2: every layer jointly
        for q in shared:
            q.requires_grad_(epoch > args.lwf_warmup)
    return net, groups, on_epoch if method in ("lwf", "joint") else None


def run_dir(args, key, i=0):
    """out/continual/<key>/ for the first seed, <key>_seed<i>/ for seed i."""
    return os.path.join(args.out, "continual", key + (f"_seed{i}" if i else ""))


def sweep_key(args, lambda_o):
    """The folder of LwF at lambda_o: the LwF run itself at LWF_LAMBDA (trained once), lwf_lam<λo> otherwise."""
    return "lwf" if lambda_o == args.lwf_lambda else f"lwf_lam{lambda_o:g}"


def runs_asked(args):
    """(folder key, method, lambda_o) of every run asked for: the methods, then the LwF sweep with lambda_o = 0."""
    sweep = sorted(set(args.lwf_sweep) | {0.0}) if args.lwf_sweep else []
    runs = {m: (m, args.lwf_lambda) for m in args.methods} | {sweep_key(args, v): ("lwf", v) for v in sweep}
    return [(key, m, v) for key, (m, v) in runs.items()]


def method_config(method, args, lr, i=0, lambda_o=None):
    keys = ["subjects", "per_subject", "train_per_subject", "face_size", "epochs", "batch", "momentum", "wd"]
    cfg = {k: getattr(args, k) for k in keys} | {"method": method, "lr": lr, "faces": args.faces or args.faces_url,
                                                 "seed": args.seed + i, "split_seed": args.seed,
                                                 "teacher_sha256": args.teacher_sha256}
    if method != "fe":
        cfg["adapt_bn"] = args.adapt_bn
    if method == "ft":
        cfg["ft_layers"] = [list(x) for x in parse_layers(args.ft_layers)]
    if method in ("lwf", "joint"):
        cfg |= {k: getattr(args, k) for k in ("lwf_lr", "lwf_warmup")}
    if method == "lwf":
        cfg |= {"lwf_T": args.lwf_T, "lwf_lambda": args.lwf_lambda if lambda_o is None else lambda_o}
    if method == "ft-all":
        cfg["ft_all_lr"] = args.ft_all_lr
    return cfg


def run_method(key, method, lambda_o, i, teacher, cifar, faces, before, args, lr, device):
    """Train one method with seed SEED + i (the new head's initial weights, data order, augmentation)
    into run_dir(key, i)."""
    run = run_dir(args, key, i)
    print(f"-- {METHODS[method]}, seed {args.seed + i} -> {run}")
    net, groups, on_epoch = build(method, teacher, args, lr, args.seed + i)
    net = net.to(device, memory_format=torch.channels_last)
    if args.compile:
        net.compile()
    gen = torch.Generator(device=device).manual_seed(args.seed + i)
    train = Batches(*faces["train"], batch_size=args.batch, shuffle=True, augment=True, pad=args.face_size // 8, gen=gen)
    loss_fn, y_o = new_task, {"train": (), "test": ()}
    if method == "joint":  # old and new data together: a CIFAR-10 batch beside each face batch
        loss_fn = joint_loss
        train = JointBatches(train, Batches(*cifar["train"], batch_size=args.batch, shuffle=True, augment=True, gen=gen))
    if method == "lwf":
        original = copy.deepcopy(teacher).eval().requires_grad_(False)  # the network before any change
        loss_fn = lwf_loss(original, args.lwf_T, lambda_o)
        # its outputs on the un-augmented face sets never change: computed once for the evaluations
        y_o = {s: (predict(original, Batches(faces[s][0], batch_size=1024)),) for s in y_o}
    evals = {s: Batches(*faces[s], *y_o[s], batch_size=1024) for s in ("train", "test")}
    cifar_test = Batches(*cifar["test"], batch_size=1024)
    opt = sgd(groups, lr, args.momentum, args.wd)
    sched = warmup_cosine(opt, args.epochs * len(train), 0)
    history = fit(net, loss_fn, opt, sched, train, evals, args.epochs, run, method_config(method, args, lr, i, lambda_o), gen,
                  extra=lambda net: {"old_test_acc": evaluate(net, old_task, cifar_test)[1]}, on_epoch=on_epoch)
    write_json(os.path.join(run, "split.json"), {"subjects": faces["subjects"], **faces["files"]})
    last = history[-1]
    result = {"old_train_acc": evaluate(net, old_task, Batches(*cifar["train"], batch_size=1024))[1],
              "old_test_acc": last["old_test_acc"], "new_train_acc": last["train_acc"],
              "new_test_acc": last["test_acc"], "old_train_acc_before": before[0], "old_test_acc_before": before[1],
              "seed": args.seed + i, "epochs": args.epochs, "device": str(device)}
    title = METHODS[method] + (f" λo={lambda_o:g}" if key != method else "")
    finish(run, net, history, result, f"{title}, seed {args.seed + i}: new task (faces)")


# ----------------------------------------------------------------------------- tables and figures

def collect(args, key):
    """(results, histories) of every seed of a run, or None if one is missing."""
    folders = [run_dir(args, key, i) for i in range(args.seeds)]
    return seed_runs(folders) if all(os.path.exists(os.path.join(f, "result.json")) for f in folders) else None


def write_outputs(args, lr, device):
    out, tables = os.path.join(args.out, "continual"), os.path.join(args.out, "tables")
    runs = {m: collect(args, m) for m in METHODS}
    rows, per_seed, forgetting, points = [], [], {}, {}
    for m, label in METHODS.items():
        if m == "joint":
            rows.append(["*References beyond the assignment*", "", "", ""])
        if not runs[m]:
            rows += [[label, "Old Task*", *[f"missing (make {m})"] * 2], ["", "New Task", *[f"missing (make {m})"] * 2]]
            continue
        results, hs = runs[m]
        rows += [[label, "Old Task*", *seed_cells(results, ("old_train_acc", "old_test_acc"))],
                 ["", "New Task", *seed_cells(results, ("new_train_acc", "new_test_acc"))]]
        per_seed += [[label, r["seed"], *(r[k] for k in RESULT_KEYS)] for r in results]
        plot_curves(hs, "loss", os.path.join(out, f"{m}_loss.png"), f"{label}: new task (faces), loss")
        plot_curves(hs, "acc", os.path.join(out, f"{m}_accuracy.png"), f"{label}: new task (faces), accuracy")
        forgetting[label] = ([0] + [e["epoch"] for e in hs[0]],
                             [[r["old_test_acc_before"]] + [e["old_test_acc"] for e in h] for r, h in zip(results, hs)])
        points[label] = results
    ref = next((r for r in runs.values() if r), None)
    note = (f"\\* Old task: CIFAR-10 through the old head after the network was changed for faces. Mean ± std over "
            f"{args.seeds} seed(s) (n) of the new head's initial weights, data order and augmentation; one teacher. "
            "Per-seed numbers: continual_table.csv.")
    if ref:
        note += (f" Before any change the teacher scores {pct(ref[0][0]['old_train_acc_before'])}% (train) and "
                 f"{pct(ref[0][0]['old_test_acc_before'])}% (test).")
    write_table(os.path.join(tables, "continual_table.md"), "Continual learning: final accuracy (last epoch)",
                ["Method", "Task", "Training Accuracy (%)", "Testing Accuracy (%)"], rows, note=note,
                csv=(["method", "seed", *RESULT_KEYS], per_seed))
    if forgetting:
        plot_compare(forgetting, os.path.join(out, "forgetting.png"), "Old task (CIFAR-10 test) while learning faces",
                     "old-task test accuracy (%)")
    done = {float(d[len("lwf_lam"):]) for d in (os.listdir(out) if os.path.isdir(out) else [])
            if d.startswith("lwf_lam") and "_seed" not in d}
    sweep = {v: collect(args, sweep_key(args, v)) for v in done | ({args.lwf_lambda} if done else set())}
    sweep = {v: r[0] for v, r in sorted(sweep.items()) if r}
    if sweep:
        write_table(os.path.join(tables, "lwf_sweep.md"), "LwF's trade-off over λo (λo = 0: fine-tuning at LwF's rates)",
                    ["λo", "Old task, test (%)", "New task, test (%)"],
                    [[f"{v:g}", *seed_cells(rs, ("old_test_acc", "new_test_acc"))] for v, rs in sweep.items()],
                    csv=(["lambda_o", "seed", *RESULT_KEYS], [[v, r["seed"], *(r[k] for k in RESULT_KEYS)]
                                                             for v, rs in sweep.items() for r in rs]))
    if points:
        plot_tradeoff(points, sweep, os.path.join(out, "tradeoff.png"), ref[0][0]["old_test_acc_before"])

    faces = args.faces or f"DigiFace-1M (synthetic faces, {args.faces_url})"
    write_table(os.path.join(tables, "continual_setup.md"), "Continual learning setup", ["Item", "Setting"], [
        ["New task data", f"{faces}: first {args.subjects} subjects with >= {args.per_subject} readable images, "
                          f"{args.per_subject} per subject picked with seed {args.seed}, "
                          f"{args.train_per_subject} train / {args.per_subject - args.train_per_subject} test"],
        ["Pre-processing", f"RGB, resized to {args.face_size}x{args.face_size} (bilinear), /255, ImageNet mean/std"],
        ["Augmentation", f"random crop {args.face_size} with {args.face_size // 8} px zero padding + horizontal flip"],
        ["Network", "teacher of Q1 (ResNet18, 8x8x512 features for 32x32) + old head 512->10 (its fc) + "
                    f"new head 512->{args.subjects} (fresh, PyTorch default init, seed {args.seed})"],
        ["Original learning rate (100%)", f"{lr} (the teacher's peak learning rate)"],
        ["Optimiser", f"SGD, Nesterov momentum {args.momentum}, weight decay {args.wd}"],
        ["Schedule", "cosine decay to 0, per step"],
        ["Batch size / epochs", f"{args.batch} / {args.epochs}"],
        ["BatchNorm", "frozen layers always in eval mode; trained layers: "
                      + ("statistics adapt to faces" if args.adapt_bn else "running statistics frozen (eval mode)")],
        ["Feature extraction", "backbone and old head frozen, in eval mode; new head trained at 100%"],
        ["Fine tuning", "layers of out/tables/finetune_layers.md at their rates + new head at 100%; the rest frozen"],
        ["LwF", "out/tables/lwf_setup.md"],
        ["Joint training (reference)", f"LwF's rates, warm-up and epochs; each step a face batch + a CIFAR-10 batch of "
                                       f"{args.batch} (1:1), CE(new head, faces) + CE(old head, CIFAR-10)"],
        ["Fine-tuning all layers (reference)", f"every backbone layer at {args.ft_all_lr:g}% + new head at 100%, faces only"],
        ["Seeds", f"{args.seeds} per method (seed {args.seed} + i: new head, data order, augmentation); one face split"],
        ["Old-task accuracy", "old head on CIFAR-10: test set after every epoch, training set at the end"],
        ["Precision", precision(device)],
    ])
    # the fine-tuning and LwF tables describe the runs that made the results (their config.json)
    cfg = {m: read_json(os.path.join(out, m, "config.json")) if runs[m] else method_config(m, args, lr)
           for m in ("ft", "lwf")}
    layers, ft, lw = resnet_layers(), cfg["ft"], cfg["lwf"]
    ft_rows = [[layer, ", ".join(layers[layer]), f"{rate:g}% of the original ({ft['lr'] * rate / 100:g})",
                "fine-tuned" + ("; BatchNorm statistics adapt" if ft["adapt_bn"] else "; BatchNorm statistics frozen")]
               for layer, rate in ft["ft_layers"]]
    ft_rows.append([f"new FC + softmax ({ft['subjects']} outputs)", "new", f"100% of the original ({ft['lr']:g})",
                    "trained from scratch"])
    ft_rows.append(["all other layers, old head", "", "0%", "frozen"])
    write_table(os.path.join(tables, "finetune_layers.md"), "Fine-tuning: layers and learning rates",
                ["Conv layers that you choose to fine-tune", "torchvision modules", "Learning Rate", "Remark"], ft_rows,
                note="Default conv5_x: faces share low-level features with CIFAR-10 objects, but the last stage holds "
                     "the most task-specific ones (Yosinski et al. 2014); a low rate limits forgetting.")
    a, w, e, base = lw["lwf_lr"], lw["lwf_warmup"], lw["epochs"], lw["lr"]
    write_table(os.path.join(tables, "lwf_setup.md"), "Learning without Forgetting: parameters", ["Parameter", "Value"], [
        ["Learning rate, backbone + old head", f"{a:g}% of the original ({base * a / 100:g})"],
        ["Learning rate, new head", f"100% of the original ({base:g})"],
        ["Temperature T", f"{lw['lwf_T']:g}"], ["λo (old-task loss weight)", f"{lw['lwf_lambda']:g}"],
        ["L2 weight decay", f"{lw['wd']:g}"],
        ["Epochs", f"{w} warm-up + {e - w} joint"],
        ["Batch size", lw["batch"]],
    ], note="\n".join([
        "Steps:",
        "1. Keep the original network (teacher backbone + old head) as a frozen copy in eval mode.",
        f"2. Add the new head ({lw['subjects']} outputs), freshly initialised.",
        f"3. Warm-up, epochs 1-{w}: train the new head alone (backbone and old head frozen), as in feature extraction.",
        f"4. Joint training, epochs {w + 1}-{e}: every layer; for each augmented face batch "
        "the frozen original gives y_o, the old-task responses, on the same images.",
        f"5. Loss: CE(new head, face label) + λo · CE(softmax(y_o/T), softmax(old head/T)), T = {lw['lwf_T']:g}, "
        f"λo = {lw['lwf_lambda']:g}, plus L2 {lw['wd']:g} (weight decay); no T² factor, as in the paper.",
        "6. BatchNorm: " + ("statistics adapt to faces." if lw["adapt_bn"] else "running statistics frozen."),
        "7. Evaluate: new head on the face test set, old head on the CIFAR-10 test set, after every epoch."]))


def main(argv=None):
    args = parse(argv)
    device = get_device(args.device)
    args.seeds = args.seeds or (3 if device.type == "cuda" else 1)
    teacher_cfg = os.path.join(os.path.dirname(args.teacher), "config.json")
    lr = args.lr or (read_json(teacher_cfg)["lr"] if os.path.exists(teacher_cfg) else 0.1)
    args.teacher_sha256 = file_sha256(args.teacher)  # a run belongs to the teacher it started from
    print(f"== Q2: continual learning -> {os.path.join(args.out, 'continual')} on {device}")
    todo = [(key, m, v, i) for key, m, v in runs_asked(args) for i in range(args.seeds)
            if not finished(run_dir(args, key, i), method_config(m, args, lr, i, v))]
    if todo:
        teacher = load_teacher(args.teacher, device).to(memory_format=torch.channels_last)
        cifar = load_cifar10(args.data, device)
        folder = args.faces
        if not folder or os.path.isfile(folder):  # DigiFace-1M: its URL, or the zip given as FACES=
            folder = fetch_digiface(os.path.join(args.data, "digiface"), args.faces or args.faces_url, args.subjects)
        faces = load_faces(folder, args.subjects, args.per_subject, args.train_per_subject, args.face_size, args.seed)
        faces |= {s: tuple(t.to(device) for t in faces[s]) for s in ("train", "test")}
        print(f"faces: {len(faces['train'][0])} train / {len(faces['test'][0])} test images of "
              f"{args.subjects} subjects from {folder}")
        untouched = ContinualNet(copy.deepcopy(teacher), args.subjects).to(device)
        before = [evaluate(untouched, old_task, Batches(*cifar[s], batch_size=1024))[1] for s in ("train", "test")]
        for key, m, v, i in todo:
            run_method(key, m, v, i, teacher, cifar, faces, before, args, lr, device)
    else:
        print("every method asked for is finished (delete its folder under out/continual/ to train it again)")
    write_outputs(args, lr, device)
    for key, _, _ in runs_asked(args):
        results = collect(args, key)[0]
        old, new = seed_cells(results, ["old_test_acc", "new_test_acc"])
        print(f"{key}: old task {old}% test (before {pct(results[0]['old_test_acc_before'])}%), new task {new}% test")


if __name__ == "__main__":
    run(main)
