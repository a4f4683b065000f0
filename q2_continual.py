"""Q2: continual learning. A 100-subject face task (the new task) is added on top of the teacher of Q1
(the old task: CIFAR-10) by feature extraction, fine-tuning and Learning without Forgetting (Li & Hoiem),
with two references beyond the assignment: joint training (with the old data) and fine-tuning every layer.

  python q2_continual.py                 the five methods, LwF at lambda_o = 0 -> out/continual/{fe,...,lwf_lam0}/
  python q2_continual.py --methods ft --ft-layers "conv5_x:10 conv4_x:1"
  python q2_continual.py --methods --lwf-sweep 0.1 0.3 3   LwF alone at these lambda_o and 0 -> lwf_lam<v>/

The assignment's items, and what answers each:
  the network: the teacher's backbone, its old head, a new one   common.ContinualNet
  (1) feature extraction: the new 100-way layer alone           trained("fe"), train_method
  (2) fine-tuning chosen layers at x% of the rate (the table)   FT_LAYERS: the choice and why; trained("ft")
  (3) LwF: its steps in point form, lr, T, lambda_o, L2          two_stages (its docstring, in points), common.lwf_loss
  (a), (b) loss and accuracy against epoch, every method        fit's history (train_method)
  (4) the table: old and new task, training and test            run_method: result.json
  references beyond the assignment                              trained("joint"), trained("ft-all")

Old task: the old head on CIFAR-10, after the change; new task: the new head on faces. The original lr: the teacher's
peak (0.1 at batch 512; faces: batch 128) unless --lr. BatchNorm statistics stay frozen. `M.` calls: machinery, skip them.
"""
import argparse
import copy
import os

import torch

import machinery as M
from common import (Batches, ContinualNet, JointBatches, evaluate, fit, joint_loss, layer_parameters, load_cifar10,
                    load_faces, load_teacher, lwf_loss, new_task, old_task, resnet_layers, sgd, warmup_cosine)
from plots import plot_curves

METHODS = {"fe": "Feature Extraction", "ft": "Fine Tuning", "lwf": "LwF",  # the assignment's three, then references
           "joint": "Joint training (reference)", "ft-all": "Fine-tuning all layers (reference)"}
# Q2 (2), the layers fine-tuned (ResNet-paper names: conv5_x is torchvision's layer4) at their lr, % of the original; the
# new FC head at 100%; all else frozen, the old FC head and BatchNorm's statistics too. Why conv5_x: the last stage holds
# the old task's most specific features (Yosinski et al. 2014), the first to need changing for faces; the more generic
# earlier stages are kept (though conv5_x holds 3/4 of the weights), and a tenth of the rate moves it slowly (less forgetting):
FT_LAYERS = [("conv5_x", 10.0)]  # (layer, lr in % of the original): lr 0.01 at the default original lr 0.1


def parse(argv=None):
    p = M.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.run_options(epochs=20, lr=None, batch=128, momentum=0.9, wd=5e-4, teacher=True,  # the assignment's L2 0.0005
                  lr_help="the original lr, 100%% (default: the teacher's peak, at its batch 512); rates are %% of it")
    p.add_argument("--methods", nargs="*", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--lwf-sweep", type=M.nonneg, nargs="*", default=[],
                   help="LwF at these lambda_o too, and at 0 (fine-tuning at LwF's rates): the trade-off curve")
    p.add_argument("--lwf-zero", type=M.flag, default=1, help="1: with LwF, LwF at lambda_o = 0 too (every layer on "
                   "faces at LwF's rates, after its warm-up): what LwF's old-task term buys")
    p.add_argument("--faces", default="", help="<subject>/<image> or train/+test/ folder, DigiFace-1M zip (default: downloaded)")
    p.add_argument("--faces-url", default=M.DIGIFACE_URL, help="the DigiFace-1M zip to read with range requests")
    p.add_argument("--subjects", type=M.positive_int, default=100)
    p.add_argument("--per-subject", type=M.positive_int, default=50)
    p.add_argument("--train-per-subject", type=M.positive_int, default=40)
    p.add_argument("--face-size", type=M.positive_int, default=64, help="faces are resized to this square")
    p.add_argument("--ft-layers", default=" ".join(f"{layer}:{rate:g}" for layer, rate in FT_LAYERS), help="fine-tuned "
                   "layers (conv5_x is layer4), lr in %% of the original: 'conv5_x:10 conv4_2:1'; why the default: FT_LAYERS")
    p.add_argument("--ft-all-lr", type=M.positive, default=None,
                   help="ft-all: lr of every layer, %% of the original (default: --ft-layers' first rate)")
    p.add_argument("--lwf-lr", type=M.positive, default=10.0,
                   help="LwF and joint: lr of backbone and old head, %% of the original")
    p.add_argument("--lwf-warmup", type=M.nonneg_int, default=5, help="LwF: epochs training the new head alone first")
    p.add_argument("--lwf-T", type=M.positive, default=2.0, help="LwF: temperature (Li & Hoiem: 2)")
    p.add_argument("--lwf-lambda", type=M.nonneg, default=1.0, help="LwF: weight of the old-task loss (Li & Hoiem: 1)")
    p.add_argument("--adapt-bn", type=M.flag, default=0, help="1: BatchNorm statistics of trained layers adapt to faces")
    p.add_argument("--seeds", type=M.positive_int, default=None, help="seeds per method (default: 3 on CUDA, 1 on the CPU)")
    p.add_argument("--seed", type=int, default=0, help="the face split's seed, and the first training seed")
    args = p.parse_args(argv)
    if args.train_per_subject >= args.per_subject:
        M.die(f"--train-per-subject ({args.train_per_subject}) must be below --per-subject ({args.per_subject})")
    if ({"lwf", "joint"} & set(args.methods) or args.lwf_sweep) and args.lwf_warmup >= args.epochs:
        M.die(f"--lwf-warmup ({args.lwf_warmup}) must be below --epochs ({args.epochs})")
    args.layers = M.parse_layers(args.ft_layers, resnet_layers())  # a bad FT_LAYERS fails now, not after the others
    args.ft_all_lr = args.ft_all_lr or args.layers[0][1]
    return args


# ----------------------------------------------------------------------------- the methods

def trained(method, net, args):
    """What `method` trains, {what: (parameters, lr in % of the original)}; all else is frozen, BatchNorm statistics
    too (ContinualNet). "warm-up": the first stage of LwF and joint training; "lwf", "joint": their second."""
    head = {"new head": (list(net.new.parameters()), 100.0)}
    if method in ("fe", "warm-up"):  # Q2 (1), and the warm-up: the new head alone
        return head
    if method == "ft":  # Q2 (2): the chosen layers (--ft-layers, default FT_LAYERS: conv5_x at 10%), each at its rate
        return head | {layer: (layer_parameters(net.backbone, layer), rate) for layer, rate in args.layers}
    if method == "ft-all":  # reference: every layer of the backbone, on faces only
        return head | {"backbone": (list(net.backbone.parameters()), args.ft_all_lr)}
    assert method in ("lwf", "joint"), method  # their second stage: every layer, the old head too (--lwf-lr)
    return head | {"backbone and old head": (net.old_task_parameters(), args.lwf_lr)}


def optimiser(net, groups, lr, args, steps):
    """SGD over `groups` ({what: (parameters, rate in % of lr)}), all else in `net` frozen; a cosine to 0 over `steps`."""
    net.requires_grad_(False)
    for q in [q for params, _ in groups.values() for q in params]:
        q.requires_grad_(True)
    print("   trains " + ", ".join(f"{what} at lr {lr * rate / 100:g}" for what, (_, rate) in groups.items()))
    opt = sgd([{"params": params, "lr": lr * rate / 100} for params, rate in groups.values()], lr, args.momentum, args.wd)
    return opt, warmup_cosine(opt, steps, 0)


def train_method(method, net, original, faces, cifar, lambda_o, args, lr, run, gen):
    """Train `method` on the faces into `run`, rates in % of the original `lr`; its history: per epoch, each head's own CE
    on its task (for every method alike, not its training objective) and accuracy."""
    train = Batches(*faces["train"], batch_size=args.batch, shuffle=True, augment=True, pad=args.face_size // 8, gen=gen)
    evals = {"train": (new_task, Batches(*faces["train"], batch_size=1024)),
             "test": (new_task, Batches(*faces["test"], batch_size=1024)),
             "old_train": (old_task, Batches(*cifar["train"], batch_size=1024)),
             "old_test": (old_task, Batches(*cifar["test"], batch_size=1024))}
    if method in ("fe", "ft", "ft-all"):  # one stage: what trained() names, on the new task's loss alone
        opt, sched = optimiser(net, trained(method, net, args), lr, args, args.epochs * len(train))
        return fit(net, new_task, opt, sched, train, evals, args.epochs, run)
    return two_stages(method, net, original, train, evals, cifar, lambda_o, args, lr, run, gen)


def two_stages(method, net, original, train, evals, cifar, lambda_o, args, lr, run, gen):
    """Q2 (3), LwF (Li & Hoiem) in points, the defaults in brackets; joint training is the same but for its old-task loss:
      - y_o: the old head's logits of the original network (`original`, frozen) on each augmented face batch
      - stage 1, the warm-up, epochs 1..w (w = --lwf-warmup, 5): the new head alone, at the original lr; faces' CE
      - stage 2, epochs w+1..end (20), from stage 1's weights: the new head at the original lr, backbone and old head at
        --lwf-lr (10%); loss: faces' CE + lambda_o (--lwf-lambda, 1) * CE_T(y_o, old head), T = --lwf-T (2), lwf_loss;
        joint: faces' CE + CIFAR-10's CE on a CIFAR-10 batch beside each face batch (joint_loss)
      - each stage: a fresh SGD (Nesterov momentum 0.9, L2 5e-4) and cosine to 0; BatchNorm statistics frozen. Returns one
        history, epochs 0..end: stage 2's epochs follow stage 1's."""
    steps, w = len(train), args.lwf_warmup
    opt, sched = optimiser(net, trained("warm-up", net, args), lr, args, w * steps)
    warmup = fit(net, new_task, opt, sched, train, evals, range(1, w + 1), run)  # epochs 0..w
    if method == "lwf":
        loss_fn, data = lwf_loss(original, args.lwf_T, lambda_o), train
    else:  # joint
        loss_fn, data = joint_loss, JointBatches(train, Batches(*cifar["train"], batch_size=args.batch, shuffle=True,
                                                                augment=True, gen=gen))
    opt, sched = optimiser(net, trained(method, net, args), lr, args, (args.epochs - w) * steps)
    return warmup + fit(net, loss_fn, opt, sched, data, evals, range(w + 1, args.epochs + 1), run)  # epochs w+1..end


def run_dir(args, key, i=0):  # out/continual/<key>/ for the first seed, <key>_seed<i>/ for seed i
    return os.path.join(args.out, "continual", key + (f"_seed{i}" if i else ""))


def runs_asked(args):
    """(folder key, method, lambda_o) of each run asked: the methods, then the LwF sweep and lambda_o = 0 (once each)."""
    sweep = sorted(set(args.lwf_sweep) | ({0.0} if args.lwf_sweep or args.lwf_zero and "lwf" in args.methods else set()))
    key = lambda v: "lwf" if v == args.lwf_lambda else f"lwf_lam{v:g}"  # noqa: E731
    runs = {m: (m, args.lwf_lambda) for m in args.methods} | {key(v): ("lwf", v) for v in sweep}
    return [(k, m, v) for k, (m, v) in runs.items()]


def method_config(method, args, lr, i=0, lambda_o=None):
    keys = ["subjects", "per_subject", "train_per_subject", "face_size", "epochs", "batch", "momentum", "wd", "precision"]
    cfg = {k: getattr(args, k) for k in keys} | {"method": method, "lr": lr, "faces": args.faces or args.faces_url,
                                                 "seed": args.seed + i, "split_seed": args.seed,
                                                 "teacher_sha256": args.teacher_sha256}
    cfg |= {"adapt_bn": args.adapt_bn} if method != "fe" else {}
    cfg |= {"ft_layers": [list(x) for x in args.layers]} if method == "ft" else {}
    cfg |= {k: getattr(args, k) for k in ("lwf_lr", "lwf_warmup")} if method in ("lwf", "joint") else {}
    cfg |= {"lwf_T": args.lwf_T, "lwf_lambda": args.lwf_lambda if lambda_o is None else lambda_o} if method == "lwf" else {}
    cfg |= {"ft_all_lr": args.ft_all_lr} if method == "ft-all" else {}
    return cfg


def run_method(key, method, lambda_o, i, teacher, cifar, faces, before, args, lr, device):
    """Train one method with seed SEED + i (its new head's weights, data order, augmentation) into run_dir(key, i)."""
    folder = run_dir(args, key, i)
    print(f"-- {METHODS[method]}" + (f" λo={lambda_o:g}" if key != method else "") + f", seed {args.seed + i} -> {folder}")
    torch.manual_seed(args.seed + i)  # the same fresh new head for every method of a seed
    net = M.prepare(ContinualNet(copy.deepcopy(teacher), args.subjects, adapt_bn=bool(args.adapt_bn)), device, args.compile)
    original = copy.deepcopy(teacher).eval().requires_grad_(False)  # the network before any change: LwF's y_o
    gen = torch.Generator(device=device).manual_seed(args.seed + i)
    run = M.Run(folder, method_config(method, args, lr, i, lambda_o), gen)
    history = train_method(method, net, original, faces, cifar, lambda_o, args, lr, run, gen)
    M.write_json(os.path.join(folder, "split.json"), {"subjects": faces["subjects"], **faces["files"]})
    plot_curves([(f"{METHODS[method]}, seed {args.seed + i}: ", [history])], os.path.join(folder, "curves"), "cross-entropy",
                ("train", "test", "old_train", "old_test"), stage=[args.lwf_warmup if method in ("lwf", "joint") else None])
    last = history[-1]  # the last epoch, measured on every image of each set
    M.finish(folder, net, {"old_train_acc": last["old_train_acc"], "old_test_acc": last["old_test_acc"],
                           "new_train_acc": last["train_acc"], "new_test_acc": last["test_acc"],
                           "old_train_acc_before": before[0], "old_test_acc_before": before[1],
                           "faces_source": faces["source"], "seed": args.seed + i, "epochs": args.epochs, "device": str(device)})


def main(argv=None):
    args = parse(argv)
    device = M.setup(args)
    args.seeds = args.seeds or (3 if device.type == "cuda" else 1)
    teacher_cfg = os.path.join(os.path.dirname(args.teacher), "config.json")
    lr = args.lr or (M.read_json(teacher_cfg)["lr"] if os.path.exists(teacher_cfg) else 0.1)
    source = "--lr" if args.lr else "the teacher's" if os.path.exists(teacher_cfg) else "no config.json by the teacher"
    args.teacher_sha256 = M.file_sha256(args.teacher)  # a run belongs to the teacher it started from
    print(f"== Q2: continual learning -> {os.path.join(args.out, 'continual')} on {device}, {args.precision}, "
          f"original lr {lr:g} ({source})")
    todo = [(key, m, v, i) for key, m, v in runs_asked(args) for i in range(args.seeds)
            if not M.finished(run_dir(args, key, i), method_config(m, args, lr, i, v))]
    if todo:
        teacher = M.prepare(load_teacher(args.teacher, device), device)
        cifar = load_cifar10(args.data, device)
        folder = args.faces
        if not folder or os.path.isfile(folder):  # DigiFace-1M: its URL, or the zip given as FACES=
            folder = M.fetch_digiface(os.path.join(args.data, "digiface"), args.faces or args.faces_url, args.subjects)
        faces = load_faces(folder, args.subjects, args.per_subject, args.train_per_subject, args.face_size, args.seed)
        faces |= {s: tuple(t.to(device) for t in faces[s]) for s in ("train", "test")}
        print(f"faces: {len(faces['train'][0])} train / {len(faces['test'][0])} test, {args.subjects} subjects, {folder}")
        # measured as the methods are (compiled if they are), so that feature extraction's old task compares exactly
        untouched = M.prepare(ContinualNet(copy.deepcopy(teacher), args.subjects), device, args.compile)
        before = [evaluate(untouched, old_task, Batches(*cifar[s], batch_size=1024), args.precision)["acc"]
                  for s in ("train", "test")]
        for key, m, v, i in todo:
            run_method(key, m, v, i, teacher, cifar, faces, before, args, lr, device)
    else:
        print("every method asked for is finished (delete its folder under out/continual/ to train it again)")
    for key, i in [(key, i) for key, _, _ in runs_asked(args) for i in range(args.seeds)]:
        r = M.read_json(os.path.join(run_dir(args, key, i), "result.json"))
        print(f"{key}, seed {r['seed']}: old task {M.pct(r['old_test_acc'])}% test (before "
              f"{M.pct(r['old_test_acc_before'])}%), new task {M.pct(r['new_test_acc'])}% test")


if __name__ == "__main__":
    M.run(main)
