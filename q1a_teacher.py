"""Q1 part A: the teacher. torchvision's ImageNet ResNet18, strides changed for 32x32 CIFAR-10 input
(last feature map 8x8x512), a new 10-way fc, all layers fine-tuned.

Writes out/teacher/ (config.json, history.json, checkpoint.pt, model.pt, loss.png, accuracy.png,
result.json) and out/tables/ (teacher_setup.md, teacher_changes.md, teacher_accuracy.md).
Re-running resumes an interrupted run and skips a finished one.
"""
import functools
import os

import torch

from common import (Batches, Parser, cross_entropy, die, features, finish, finished, fit, flag, get_device,
                    load_cifar10, nonneg, nonneg_int, pct, precision, read_json,
                    run, sgd, stride_changes, teacher_resnet18, warmup_cosine, write_table)


def parse(argv=None):
    p = Parser(description=__doc__)
    p.run_options(epochs=30, lr=0.1, batch=512, lr_help="peak learning rate (after warm-up)")
    p.add_argument("--warmup", type=nonneg_int, default=2, help="epochs of linear lr warm-up, then cosine to 0")
    p.add_argument("--label-smoothing", type=nonneg, default=0.0,
                   help="0: a smoothed teacher distils worse (Muller et al. 2019)")
    p.add_argument("--pretrained", type=flag, default=1, help="1: start from ImageNet weights")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.label_smoothing >= 1:
        die(f"--label-smoothing must be < 1, got {args.label_smoothing}")
    return args


def setup_rows(cfg, device):
    """The training-setup table (assignment Q1A (1))."""
    return [
        ["Pre-processing", "32x32x3 CIFAR-10 images as they are (no resize); /255, normalised with ImageNet mean/std"],
        ["Augmentation", "random crop 32 from the image zero-padded by 4 px; horizontal flip (p=0.5); on the device"],
        ["Initialisation", ("ImageNet weights (torchvision IMAGENET1K_V1) for all convolutions and BatchNorms"
                            if cfg["pretrained"] else "random (PyTorch default; PRETRAINED=0)")
         + "; new fc 512->10 with PyTorch's default (Kaiming-uniform)"],
        ["Layers trained", "all (fine-tuned), fc from scratch"],
        ["Loss", f"cross-entropy, label smoothing {cfg['label_smoothing']}"],
        ["Optimiser", "SGD with Nesterov momentum"],
        ["Learning rate schedule", f"linear warm-up to {cfg['lr']} over {cfg['warmup']} epoch(s), "
                                   "then cosine decay to 0, updated every step"],
        ["Momentum", cfg["momentum"]],
        ["Weight decay", cfg["wd"]],
        ["Dropout", "none (ResNet18 has none)"],
        ["BatchNorm", "yes (ResNet18's own), batch statistics in training"],
        ["Batch size", cfg["batch"]],
        ["Epochs", cfg["epochs"]],
        ["Precision", precision(device)],
        ["Seed", cfg["seed"]],
        ["Train metrics", "eval mode on the un-augmented training set, after each epoch; final epoch reported"],
    ]


def main(argv=None):
    args = parse(argv)
    run = os.path.join(args.out, "teacher")
    tables = os.path.join(args.out, "tables")
    cfg = {k: v for k, v in vars(args).items() if k not in ("data", "out", "device")}
    device = get_device(args.device)
    print(f"== Q1 part A: teacher ResNet18 -> {run} on {device}")

    changes = stride_changes(32)
    write_table(os.path.join(tables, "teacher_changes.md"), "Changes to ResNet18 for 32x32 input",
                ["Layer (paper)", "torchvision module", "Kernel", "Original", "New", "Output, original", "Output, new"],
                changes, note="Output sizes are HxWxC for a 32x32x3 input, measured by running both networks. "
                              "The 17 convolutions, their kernel sizes and paddings, and the single max-pool are unchanged.")
    if not finished(run, cfg):
        torch.manual_seed(args.seed)
        model = teacher_resnet18(10, pretrained=bool(args.pretrained))
        shape = tuple(features(model.eval(), torch.zeros(1, 3, 32, 32)).shape[1:])
        assert shape == (512, 8, 8), f"last feature map is {shape}, the assignment asks 8x8x512"
        model = model.to(device, memory_format=torch.channels_last)
        if args.compile:
            model.compile()  # in place: the state_dict keeps its keys
        data = load_cifar10(args.data, device)
        (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
        gen = torch.Generator(device=device).manual_seed(args.seed)
        train = Batches(x_train, y_train, batch_size=args.batch, shuffle=True, augment=True, gen=gen)
        evals = {"train": Batches(x_train, y_train, batch_size=1024),
                 "test": Batches(x_test, y_test, batch_size=1024)}
        opt = sgd(model.parameters(), args.lr, args.momentum, args.wd)
        sched = warmup_cosine(opt, args.epochs * len(train), args.warmup * len(train))
        loss_fn = functools.partial(cross_entropy, label_smoothing=args.label_smoothing)
        history = fit(model, loss_fn, opt, sched, train, evals, args.epochs, run, cfg, gen)
        last = history[-1]
        finish(run, model, history, {k: last[k] for k in ("train_acc", "test_acc", "train_loss", "test_loss")}
               | {"epochs": args.epochs, "device": str(device)}, "Teacher ResNet18 (CIFAR-10)")
    else:
        print(f"{run} is finished (delete it to train again)")

    result = read_json(os.path.join(run, "result.json"))
    write_table(os.path.join(tables, "teacher_setup.md"), "Teacher training setup", ["Item", "Setting"],
                setup_rows(cfg, torch.device(result["device"])))
    write_table(os.path.join(tables, "teacher_accuracy.md"), "Teacher final accuracy (last epoch)",
                ["Training Accuracy (%)", "Testing Accuracy (%)"], [[pct(result["train_acc"]), pct(result["test_acc"])]],
                note=f"Epoch {result['epochs']} of {result['epochs']}: the last point of out/teacher/accuracy.png.")
    print(f"teacher: train {pct(result['train_acc'])}%, test {pct(result['test_acc'])}%")


if __name__ == "__main__":
    run(main)
