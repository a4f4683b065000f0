"""Q2: continual learning. A 100-subject face task (the new task) is added on top of the teacher of Q1
(the old task: CIFAR-10) by feature extraction, fine-tuning and Learning without Forgetting (Li & Hoiem).

  python q2_continual.py                           the three methods -> out/continual/{fe,ft,lwf}/
  python q2_continual.py --methods ft --ft-layers "conv5_x:10 conv4_x:1"

One network: the teacher's backbone with two heads, old (its 10-way fc) and new (100-way, fresh).
Old-task accuracy: the old head on CIFAR-10 after the change; new-task accuracy: the new head on faces.
Writes out/tables/{continual_setup,finetune_layers,lwf_setup,continual_table}.md and the forgetting curve.
"""
import argparse
import copy
import os

import torch
import torch.nn.functional as F

from common import (DIGIFACE_URL, Batches, ContinualNet, Parser, die, evaluate, fetch_digiface, file_sha256, finish, finished,
                    fit, flag, get_device, load_cifar10, load_faces, load_teacher, nonneg,
                    nonneg_int, pct, plot_compare, positive, positive_int, precision, predict, read_json, run,
                    sgd, soft_cross_entropy, warmup_cosine, write_json, write_table)

METHODS = {"fe": "Feature Extraction", "ft": "Fine Tuning", "lwf": "LwF"}


def parse(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data", help="CIFAR-10 and the downloaded faces live here")
    p.add_argument("--out", default="out")
    p.add_argument("--device", default="")
    p.add_argument("--teacher", default="", help="teacher weights (default: OUT/teacher/model.pt)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--faces", default="", help="face image folder (<subject>/<image> or train/ + test/), or DigiFace-1M's zip "
                                               "on disk; default: DigiFace-1M, downloaded into DATA/digiface")
    p.add_argument("--faces-url", default=DIGIFACE_URL, help="the DigiFace-1M zip to read with range requests")
    p.add_argument("--subjects", type=positive_int, default=100)
    p.add_argument("--per-subject", type=positive_int, default=50)
    p.add_argument("--train-per-subject", type=positive_int, default=40)
    p.add_argument("--face-size", type=positive_int, default=64, help="faces are resized to this square")
    p.add_argument("--epochs", type=positive_int, default=20)
    p.add_argument("--batch", type=positive_int, default=128)
    p.add_argument("--lr", type=positive, default=None,
                   help="the original learning rate, 100%% (default: the teacher's); other rates are %% of it")
    p.add_argument("--momentum", type=nonneg, default=0.9)
    p.add_argument("--wd", type=nonneg, default=5e-4, help="L2 coefficient (the assignment's 0.0005)")
    p.add_argument("--ft-layers", default="conv5_x:10",
                   help="fine-tuned layers with their lr in %% of the original, e.g. 'conv5_x:10 conv4_2:1'")
    p.add_argument("--lwf-lr", type=positive, default=10.0, help="LwF: lr of backbone and old head, %% of the original")
    p.add_argument("--lwf-warmup", type=nonneg_int, default=5, help="LwF: epochs training the new head alone first")
    p.add_argument("--lwf-T", type=positive, default=2.0, help="LwF: temperature (Li & Hoiem: 2)")
    p.add_argument("--lwf-lambda", type=nonneg, default=1.0, help="LwF: weight of the old-task loss (Li & Hoiem: 1)")
    p.add_argument("--adapt-bn", type=flag, default=0, help="1: BatchNorm statistics of trained layers adapt to faces")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.train_per_subject >= args.per_subject:
        die(f"--train-per-subject ({args.train_per_subject}) must be below --per-subject ({args.per_subject})")
    if "lwf" in args.methods and args.lwf_warmup >= args.epochs:
        die(f"--lwf-warmup ({args.lwf_warmup}) must be below --epochs ({args.epochs})")
    args.teacher = args.teacher or os.path.join(args.out, "teacher", "model.pt")
    if "ft" in args.methods:
        parse_layers(args.ft_layers)  # a bad FT_LAYERS fails now, not after the other methods
    return args


# ----------------------------------------------------------------------------- layers for fine-tuning

def resnet_layers():
    """ResNet-paper names of the teacher's layers -> torchvision modules (a stage conv2_x..conv5_x, or
    one block conv2_1..conv5_2; conv1 includes its BatchNorm)."""
    names = {"conv1": ["conv1", "bn1"]}
    for stage in range(2, 6):
        names[f"conv{stage}_x"] = [f"layer{stage - 1}"]
        names.update({f"conv{stage}_{b}": [f"layer{stage - 1}.{b - 1}"] for b in (1, 2)})
    return names


def parse_layers(text):
    """'conv5_x:10 conv4_2:1' -> [('conv5_x', 10.0), ('conv4_2', 1.0)]: layers with lr in % of the original."""
    valid, out = resnet_layers(), []
    for item in text.replace(",", " ").split():
        layer, _, rate = item.partition(":")
        if layer not in valid:
            die(f"unknown layer {layer!r} in FT_LAYERS; valid names: {', '.join(valid)}")
        try:
            rate = float(rate)
        except ValueError:
            die(f"FT_LAYERS item {item!r} needs a learning rate in % of the original, e.g. {layer}:10")
        if not 0 < rate < float("inf"):
            die(f"FT_LAYERS item {item!r}: the learning rate must be > 0 %")
        out.append((layer, rate))
    if not out:
        die("FT_LAYERS is empty: name at least one layer, e.g. conv5_x:10")
    modules = [(layer, m) for layer, _ in out for m in valid[layer]]
    for a, ma in modules:
        for b, mb in modules:
            if a != b and (ma == mb or ma.startswith(mb + ".")):
                die(f"FT_LAYERS names {a} and {b}, which overlap; name each layer once")
    return out


# ----------------------------------------------------------------------------- the three methods

def old_task(net, x, y):
    """The old head's CIFAR-10 loss: a loss function of the training loop."""
    old = net(x)[0]
    return F.cross_entropy(old.float(), y), old


def new_task(net, x, y):
    """The new head's face-recognition loss (feature extraction, fine-tuning)."""
    new = net(x)[1]
    return F.cross_entropy(new.float(), y), new


def lwf_loss(original, T, lambda_o):
    """LwF (Li & Hoiem, eq. 2-3): CE(new) + lambda_o * CE(softmax(y_o/T), softmax(old/T)), where y_o is
    the ORIGINAL network's old-task output on the same batch (no T^2 factor, as in the paper)."""
    def loss(net, x, y, y_o=None):
        if y_o is None:  # a training batch: the frozen original sees the same augmented images
            with torch.no_grad():
                y_o = original(x)
        old, new = net(x)
        return F.cross_entropy(new.float(), y) + lambda_o * soft_cross_entropy(old, y_o, T), new
    return loss


def build(method, teacher, args, lr):
    """The two-headed network, its parameter groups (each with its lr) and the per-epoch hook."""
    torch.manual_seed(args.seed)  # the same fresh new head for every method
    net = ContinualNet(copy.deepcopy(teacher), args.subjects, adapt_bn=bool(args.adapt_bn))
    net.requires_grad_(False)
    net.new.requires_grad_(True)
    groups = [{"params": list(net.new.parameters()), "lr": lr}]
    on_epoch = None
    if method == "ft":  # the chosen layers at their own rates; the rest stays frozen
        for layer, rate in parse_layers(args.ft_layers):
            params = [q for m in resnet_layers()[layer] for q in net.backbone.get_submodule(m).parameters()]
            for q in params:
                q.requires_grad_(True)
            groups.append({"params": params, "lr": lr * rate / 100})
    elif method == "lwf":
        shared = [q for n, q in net.named_parameters() if not n.startswith("new.")]
        groups.append({"params": shared, "lr": lr * args.lwf_lr / 100})

        def on_epoch(epoch):  # step 1, warm-up: the new head alone; step 2: every layer jointly
            for q in shared:
                q.requires_grad_(epoch > args.lwf_warmup)
    return net, groups, on_epoch


def method_config(method, args, lr):
    keys = ["subjects", "per_subject", "train_per_subject", "face_size", "epochs", "batch", "momentum", "wd", "seed"]
    cfg = {k: getattr(args, k) for k in keys} | {"method": method, "lr": lr, "faces": args.faces or args.faces_url,
                                                 "teacher_sha256": args.teacher_sha256}
    if method != "fe":
        cfg["adapt_bn"] = args.adapt_bn
    if method == "ft":
        cfg["ft_layers"] = [list(x) for x in parse_layers(args.ft_layers)]
    if method == "lwf":
        cfg |= {k: getattr(args, k) for k in ("lwf_lr", "lwf_warmup", "lwf_T", "lwf_lambda")}
    return cfg


def run_method(method, teacher, cifar, faces, before, args, lr, device):
    """Train one method into out/continual/<method>/."""
    run = os.path.join(args.out, "continual", method)
    print(f"-- {METHODS[method]} -> {run}")
    net, groups, on_epoch = build(method, teacher, args, lr)
    net = net.to(device, memory_format=torch.channels_last)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    train = Batches(*faces["train"], batch_size=args.batch, shuffle=True, augment=True, pad=args.face_size // 8, gen=gen)
    loss_fn, y_o = new_task, {"train": (), "test": ()}
    if method == "lwf":
        original = copy.deepcopy(teacher).eval().requires_grad_(False)  # the network before any change
        loss_fn = lwf_loss(original, args.lwf_T, args.lwf_lambda)
        # its outputs on the un-augmented face sets never change: computed once for the evaluations
        y_o = {s: (predict(original, Batches(faces[s][0], batch_size=1024)),) for s in y_o}
    evals = {s: Batches(*faces[s], *y_o[s], batch_size=1024) for s in ("train", "test")}
    cifar_test = Batches(*cifar["test"], batch_size=1024)
    opt = sgd(groups, lr, args.momentum, args.wd)
    sched = warmup_cosine(opt, args.epochs * len(train), 0)
    history = fit(net, loss_fn, opt, sched, train, evals, args.epochs, run, method_config(method, args, lr), gen,
                  extra=lambda net: {"old_test_acc": evaluate(net, old_task, cifar_test)[1]}, on_epoch=on_epoch)
    write_json(os.path.join(run, "split.json"), {"subjects": faces["subjects"], **faces["files"]})
    last = history[-1]
    result = {"old_train_acc": evaluate(net, old_task, Batches(*cifar["train"], batch_size=1024))[1],
              "old_test_acc": last["old_test_acc"], "new_train_acc": last["train_acc"],
              "new_test_acc": last["test_acc"], "old_train_acc_before": before[0], "old_test_acc_before": before[1],
              "epochs": args.epochs, "device": str(device)}
    finish(run, net, history, result, f"{METHODS[method]}: new task (faces)")


# ----------------------------------------------------------------------------- tables and figures

def write_outputs(args, lr, device):
    out, tables = os.path.join(args.out, "continual"), os.path.join(args.out, "tables")
    results = {m: read_json(os.path.join(out, m, "result.json")) for m in METHODS
               if os.path.exists(os.path.join(out, m, "result.json"))}
    rows = []
    for m, label in METHODS.items():
        r = results.get(m)
        cells = lambda a, b: [pct(r[a]), pct(r[b])] if r else [f"missing (make {m})"] * 2  # noqa: E731
        rows += [[label, "Old Task*", *cells("old_train_acc", "old_test_acc")],
                 ["", "New Task", *cells("new_train_acc", "new_test_acc")]]
    ref = next(iter(results.values()), None)
    note = "\\* Old task: CIFAR-10 through the old head after the network was changed for faces."
    if ref:
        note += (f" Before any change the teacher scores {pct(ref['old_train_acc_before'])}% (train) and "
                 f"{pct(ref['old_test_acc_before'])}% (test).")
    write_table(os.path.join(tables, "continual_table.md"), "Continual learning: final accuracy (last epoch)",
                ["Method", "Task", "Training Accuracy (%)", "Testing Accuracy (%)"], rows, note=note)
    curves = {}
    for m in results:
        h = read_json(os.path.join(out, m, "history.json"))
        curves[METHODS[m]] = ([0] + [e["epoch"] for e in h], [results[m]["old_test_acc_before"]] + [e["old_test_acc"] for e in h])
    if curves:
        plot_compare(curves, os.path.join(out, "forgetting.png"), "Old task (CIFAR-10 test) while learning faces",
                     "old-task test accuracy (%)")

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
        ["Old-task accuracy", "old head on CIFAR-10: test set after every epoch, training set at the end"],
        ["Precision", precision(device)],
    ])
    # the fine-tuning and LwF tables describe the runs that made the results (their config.json)
    cfg = {m: read_json(os.path.join(out, m, "config.json")) if m in results else method_config(m, args, lr)
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
    teacher_cfg = os.path.join(os.path.dirname(args.teacher), "config.json")
    lr = args.lr or (read_json(teacher_cfg)["lr"] if os.path.exists(teacher_cfg) else 0.1)
    args.teacher_sha256 = file_sha256(args.teacher)  # a run belongs to the teacher it started from
    print(f"== Q2: continual learning -> {os.path.join(args.out, 'continual')} on {device}")
    todo = [m for m in args.methods if not finished(os.path.join(args.out, "continual", m), method_config(m, args, lr))]
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
        for m in todo:
            run_method(m, teacher, cifar, faces, before, args, lr, device)
    else:
        print("every method asked for is finished (delete its folder under out/continual/ to train it again)")
    write_outputs(args, lr, device)
    for m in args.methods:
        r = read_json(os.path.join(args.out, "continual", m, "result.json"))
        print(f"{METHODS[m]}: old task {pct(r['old_test_acc'])}% test (before {pct(r['old_test_acc_before'])}%), "
              f"new task {pct(r['new_test_acc'])}% test")


if __name__ == "__main__":
    run(main)
