"""Q1 part A: the teacher. torchvision's ImageNet ResNet18, strides changed for 32x32 CIFAR-10 input
(last feature map 8x8x512), a new 10-way fc, all layers fine-tuned. What changed (common.teacher_resnet18):
conv1 stride 2 -> 1, the max-pool 2 -> 1, conv5_1's first 3x3 conv and its 1x1 shortcut 2 -> 1; kernels and
paddings as they were. Outputs: conv1 32x32, conv2_x 32x32, conv3_x 16x16, conv4_x 8x8, conv5_x 8x8x512.

The assignment's items, and what answers each:
  the 8x8x512 feature map, "detail what you have changed"   common.teacher_resnet18 (M.stride_changes: its table)
  "change the softmax layer to 10 neurons"                   common.teacher_resnet18 (model.fc)
  "retrain softmax layer and finetune the rest"             main: every parameter in sgd(), fit()
  (1) the training setup                                     parse (the defaults), main (data, optimiser, schedule)
  (2), (3) loss and accuracy against epoch                   fit's history -> plot_curves (and the report)
  (4) the final accuracy                                     main: result.json, the last epoch's numbers

Writes OUT/teacher/: config.json, history.json (train and test loss and accuracy per epoch), model.pt,
curves.png and result.json. Re-running resumes an interrupted run and skips a finished one. Every `M.`
call is machinery (command line, run folder, checkpoints): a grader may skip it.
"""
import functools
import os

import torch

import machinery as M
from common import Batches, cross_entropy, features, fit, load_cifar10, sgd, teacher_resnet18, warmup_cosine
from plots import plot_curves


def parse(argv=None):
    p = M.Parser(description=__doc__)
    p.run_options(epochs=30, lr=0.1, batch=512, momentum=0.9, wd=5e-4,  # SGD, Nesterov; L2 5e-4 (the assignment's for Q2 LwF)
                  lr_help="peak learning rate (after warm-up)")
    p.add_argument("--warmup", type=M.nonneg_int, default=2, help="epochs of linear lr warm-up, then cosine to 0")
    p.add_argument("--label-smoothing", type=M.nonneg, default=0.0,
                   help="0: a smoothed teacher distils worse (Muller et al. 2019)")
    p.add_argument("--pretrained", type=M.flag, default=1, help="1: start from ImageNet weights")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.label_smoothing >= 1:
        M.die(f"--label-smoothing must be < 1, got {args.label_smoothing}")
    return args


def main(argv=None):
    args = parse(argv)
    folder = os.path.join(args.out, "teacher")
    device = M.setup(args)
    cfg = {k: v for k, v in vars(args).items() if k not in ("data", "out", "device")}
    print(f"== Q1 part A: teacher ResNet18 -> {folder} on {device}, {args.precision}")
    changes = M.stride_changes(teacher_resnet18(pretrained=False), 32)  # the changed layers, then the stage outputs
    print("changed for 32x32 input: " + "; ".join(f"{module} {old} -> {new}" for _, module, _, old, new, *_ in changes if old))

    if not M.finished(folder, cfg):
        torch.manual_seed(args.seed)
        model = teacher_resnet18(10, pretrained=bool(args.pretrained))  # the stride changes: see teacher_resnet18
        shape = tuple(features(model.eval(), torch.zeros(1, 3, 32, 32)).shape[1:])
        assert shape == (512, 8, 8), f"last feature map is {shape}, the assignment asks 8x8x512"
        model = M.prepare(model, device, args.compile)
        data = load_cifar10(args.data, device)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        train = Batches(*data["train"], batch_size=args.batch, shuffle=True, augment=True, gen=gen)
        evals = {"train": Batches(*data["train"], batch_size=1024),  # eval mode, un-augmented: comparable with test
                 "test": Batches(*data["test"], batch_size=1024)}
        opt = sgd(model.parameters(), args.lr, args.momentum, args.wd)  # every layer: the new fc and the rest
        sched = warmup_cosine(opt, args.epochs * len(train), args.warmup * len(train))
        loss_fn = functools.partial(cross_entropy, label_smoothing=args.label_smoothing)
        history = fit(model, loss_fn, opt, sched, train, evals, args.epochs, M.Run(folder, cfg, gen))
        plot_curves([("Teacher ResNet18 (CIFAR-10): ", [history])], os.path.join(folder, "curves"), "cross-entropy")
        last = history[-1]
        M.finish(folder, model, {k: last[k] for k in ("train_acc", "test_acc", "train_loss", "test_loss")}
                 | {"epochs": args.epochs, "device": str(device), "cifar10_source": data["source"],
                    "train_images": len(data["train"][1]), "test_images": len(data["test"][1])})
    else:
        print(f"{folder} is finished (delete it to train again)")
    result = M.read_json(os.path.join(folder, "result.json"))
    print(f"teacher: train {M.pct(result['train_acc'])}%, test {M.pct(result['test_acc'])}% (final epoch)")


if __name__ == "__main__":
    M.run(main)
