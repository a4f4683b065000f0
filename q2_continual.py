"""Q2: continual learning. A 100-subject face task (the new task) is added on top of the teacher of Q1
(the old task: CIFAR-10) by feature extraction, fine-tuning and Learning without Forgetting (Li & Hoiem),
with two references beyond the assignment that bracket LwF: joint training and fine-tuning every layer.

  python q2_continual.py                           the five methods -> out/continual/{fe,ft,lwf,joint,ft-all}/
  python q2_continual.py --methods ft --ft-layers "conv5_x:10 conv4_x:1"
  python q2_continual.py --methods --lwf-sweep 0.1 0.3 1 3   LwF at several lambda_o, and 0 -> lwf_lam*/

One network: the teacher's backbone with two heads, old (its 10-way fc) and new (100-way, fresh).
Old-task accuracy: the old head on CIFAR-10 after the change; new-task accuracy: the new head on faces.
`make report` turns the runs' folders into the assignment's tables and figures.
"""
import argparse
import copy
import functools
import os

import torch

from common import (DIGIFACE_URL, Batches, ContinualNet, JointBatches, Parser, die, evaluate, fetch_digiface,
                    file_sha256, finish, finished, fit, flag, joint_loss, load_cifar10, load_faces, load_teacher,
                    lwf_loss, new_task, nonneg, nonneg_int, old_task, parse_layers, pct, plot_curves, positive,
                    positive_int, predict, read_json, resnet_layers, run, setup, sgd, warmup_cosine, write_json)

METHODS = {"fe": "Feature Extraction", "ft": "Fine Tuning", "lwf": "LwF",  # the assignment's three, then references
           "joint": "Joint training (reference)", "ft-all": "Fine-tuning all layers (reference)"}


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
    args.layers = parse_layers(args.ft_layers, resnet_layers())  # a bad FT_LAYERS fails now, not after the others
    args.ft_all_lr = args.ft_all_lr or args.layers[0][1]
    return args


# ----------------------------------------------------------------------------- the methods

def trained_layers(method, net, args):
    """What `method` trains besides the new head (at 100% of the original rate): [(parameters, rate in %
    of the original)]. Everything else stays frozen, and its BatchNorm statistics with it."""
    if method == "ft":  # Q2 (2): the chosen layers, each at its own rate
        return [([q for m in resnet_layers()[layer] for q in net.backbone.get_submodule(m).parameters()], rate)
                for layer, rate in args.layers]
    if method == "ft-all":  # reference: every layer of the backbone, on faces only
        return [(list(net.backbone.parameters()), args.ft_all_lr)]
    if method in ("lwf", "joint"):  # Q2 (3): backbone and old head, in the second stage
        return [(net.old_task_parameters(), args.lwf_lr)]
    return []  # fe, Q2 (1): the new head alone


def optimiser(net, trained, lr, args, steps):
    """SGD over the new head at `lr` (100%) and `trained` [(parameters, rate in % of lr)], every other weight
    frozen, with a cosine decay from these full rates to 0 over `steps`."""
    net.requires_grad_(False)
    groups = [{"params": list(net.new.parameters()), "lr": lr}] + [{"params": ps, "lr": lr * rate / 100}
                                                                   for ps, rate in trained]
    for q in (q for g in groups for q in g["params"]):
        q.requires_grad_(True)
    opt = sgd(groups, lr, args.momentum, args.wd)
    return opt, warmup_cosine(opt, steps, 0)


def train_method(method, net, teacher, faces, cifar, lambda_o, args, lr, run, cfg, gen, extra=None):
    """Train `method` on the face split `faces` over the run's epochs into `run`: fe, ft and ft-all in one
    stage; LwF (Li & Hoiem) and joint training in two, each with its own optimiser and schedule."""
    fit_stage = functools.partial(fit, epochs=args.epochs, run_dir=run, config=cfg, gen=gen, extra=extra,
                                  precision=args.precision)
    data = Batches(*faces["train"], batch_size=args.batch, shuffle=True, augment=True, pad=args.face_size // 8, gen=gen)
    evals = {s: Batches(*faces[s], batch_size=1024) for s in ("train", "test")}
    steps, w = len(data), args.lwf_warmup
    if method not in ("lwf", "joint"):
        opt, sched = optimiser(net, trained_layers(method, net, args), lr, args, args.epochs * steps)
        return fit_stage(net, new_task, opt, sched, data, evals)
    # Stage 1, the warm-up (the first --lwf-warmup epochs): the new head alone, as feature extraction trains it. The old
    # task's loss would reach no trained weight: neither the original network nor a CIFAR-10 batch is needed.
    opt, sched = optimiser(net, [], lr, args, w * steps)
    fit_stage(net, new_task, opt, sched, data, evals, stage=(1, w))
    # Stage 2, every layer (the rest of the epochs): backbone and old head at --lwf-lr %, the new head at 100 %.
    if method == "lwf":
        original = copy.deepcopy(teacher).eval().requires_grad_(False)  # the network before any change
        loss_fn = lwf_loss(original, args.lwf_T, lambda_o)
        # its outputs on the un-augmented face sets never change: computed once, for the evaluations
        evals = {s: Batches(*faces[s], predict(original, b, args.precision), batch_size=1024) for s, b in evals.items()}
    else:  # joint training: old and new data together, a CIFAR-10 batch beside each face batch
        loss_fn = joint_loss
        data = JointBatches(data, Batches(*cifar["train"], batch_size=args.batch, shuffle=True, augment=True, gen=gen))
    opt, sched = optimiser(net, trained_layers(method, net, args), lr, args, (args.epochs - w) * steps)
    return fit_stage(net, loss_fn, opt, sched, data, evals, stage=(w + 1, args.epochs))


def run_dir(args, key, i=0):
    """out/continual/<key>/ for the first seed, <key>_seed<i>/ for seed i."""
    return os.path.join(args.out, "continual", key + (f"_seed{i}" if i else ""))


def runs_asked(args):
    """(folder key, method, lambda_o) of every run asked for: the methods, then the LwF sweep with lambda_o = 0
    (LwF at --lwf-lambda is the LwF run itself, trained once)."""
    sweep = sorted(set(args.lwf_sweep) | {0.0}) if args.lwf_sweep else []
    key = lambda v: "lwf" if v == args.lwf_lambda else f"lwf_lam{v:g}"  # noqa: E731
    runs = {m: (m, args.lwf_lambda) for m in args.methods} | {key(v): ("lwf", v) for v in sweep}
    return [(k, m, v) for k, (m, v) in runs.items()]


def method_config(method, args, lr, i=0, lambda_o=None):
    keys = ["subjects", "per_subject", "train_per_subject", "face_size", "epochs", "batch", "momentum", "wd", "precision"]
    cfg = {k: getattr(args, k) for k in keys} | {"method": method, "lr": lr, "faces": args.faces or args.faces_url,
                                                 "seed": args.seed + i, "split_seed": args.seed,
                                                 "teacher_sha256": args.teacher_sha256}
    if method != "fe":
        cfg["adapt_bn"] = args.adapt_bn
    if method == "ft":
        cfg["ft_layers"] = [list(x) for x in args.layers]
    if method in ("lwf", "joint"):
        cfg |= {k: getattr(args, k) for k in ("lwf_lr", "lwf_warmup")}
    if method == "lwf":
        cfg |= {"lwf_T": args.lwf_T, "lwf_lambda": args.lwf_lambda if lambda_o is None else lambda_o}
    if method == "ft-all":
        cfg["ft_all_lr"] = args.ft_all_lr
    return cfg


def run_method(key, method, lambda_o, i, teacher, cifar, faces, before, args, lr, device):
    """Train one method with seed SEED + i (its new head's weights, data order, augmentation) into run_dir(key, i)."""
    run = run_dir(args, key, i)
    print(f"-- {METHODS[method]}" + (f" λo={lambda_o:g}" if key != method else "") + f", seed {args.seed + i} -> {run}")
    torch.manual_seed(args.seed + i)  # the same fresh new head for every method of a seed
    net = ContinualNet(copy.deepcopy(teacher), args.subjects, adapt_bn=bool(args.adapt_bn))
    net = net.to(device, memory_format=torch.channels_last)
    if args.compile:
        net.compile()
    # the old task after each epoch: its test set, and (to keep the cost of a GPU epoch down) 10,000 training images
    sets = {s: Batches(*(t[:10000 if s == "train" else None] for t in cifar[s]), batch_size=1024) for s in ("train", "test")}
    old = {}

    def old_task_acc(net, epoch):  # only an epoch that trained a weight of the old task can change it; first and last measured
        if not old or epoch == args.epochs or any(q.requires_grad for q in net.old_task_parameters()):
            old.update({f"old_{s}_acc": evaluate(net, old_task, b, precision=args.precision)[1] for s, b in sets.items()})
        return dict(old)
    gen = torch.Generator(device=device).manual_seed(args.seed + i)
    history = train_method(method, net, teacher, faces, cifar, lambda_o, args, lr, run,
                           method_config(method, args, lr, i, lambda_o), gen, extra=old_task_acc)
    write_json(os.path.join(run, "split.json"), {"subjects": faces["subjects"], **faces["files"]})
    plot_curves([(f"{METHODS[method]}, seed {args.seed + i}: ", [history])], os.path.join(run, "curves"), "loss",
                ("train", "test", "old_train", "old_test"))
    last = history[-1]
    result = {"old_train_acc": evaluate(net, old_task, Batches(*cifar["train"], batch_size=1024), precision=args.precision)[1],
              "old_test_acc": last["old_test_acc"], "new_train_acc": last["train_acc"],
              "new_test_acc": last["test_acc"], "old_train_acc_before": before[0], "old_test_acc_before": before[1],
              "seed": args.seed + i, "epochs": args.epochs, "device": str(device)}
    finish(run, net, result)


def main(argv=None):
    args = parse(argv)
    device = setup(args)
    args.seeds = args.seeds or (3 if device.type == "cuda" else 1)
    teacher_cfg = os.path.join(os.path.dirname(args.teacher), "config.json")
    lr = args.lr or (read_json(teacher_cfg)["lr"] if os.path.exists(teacher_cfg) else 0.1)
    args.teacher_sha256 = file_sha256(args.teacher)  # a run belongs to the teacher it started from
    print(f"== Q2: continual learning -> {os.path.join(args.out, 'continual')} on {device}, {args.precision}")
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
        untouched = ContinualNet(copy.deepcopy(teacher), args.subjects).to(device, memory_format=torch.channels_last)
        if args.compile:  # measured as the methods are, so that feature extraction's old task compares exactly
            untouched.compile()
        before = [evaluate(untouched, old_task, Batches(*cifar[s], batch_size=1024), precision=args.precision)[1]
                  for s in ("train", "test")]
        for key, m, v, i in todo:
            run_method(key, m, v, i, teacher, cifar, faces, before, args, lr, device)
    else:
        print("every method asked for is finished (delete its folder under out/continual/ to train it again)")
    for key, _, _ in runs_asked(args):
        for i in range(args.seeds):
            r = read_json(os.path.join(run_dir(args, key, i), "result.json"))
            print(f"{key}, seed {r['seed']}: old task {pct(r['old_test_acc'])}% test (before "
                  f"{pct(r['old_test_acc_before'])}%), new task {pct(r['new_test_acc'])}% test")


if __name__ == "__main__":
    run(main)
