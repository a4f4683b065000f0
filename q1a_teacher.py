"""Q1 part A: the teacher. torchvision's ImageNet ResNet18, strides changed for 32x32 CIFAR-10 input
(last feature map 8x8x512), a new 10-way fc, all layers fine-tuned.

Writes OUT/teacher/: config.json, history.json (train and test loss and accuracy per epoch),
checkpoint.pt while it trains, model.pt, curves.png and result.json. `make report` turns
them into the assignment's tables and figures. Re-running resumes an interrupted run and skips a
finished one.
"""
import functools
import os

import torch

from common import (Batches, Parser, cross_entropy, die, features, finish, finished, fit, flag, load_cifar10, nonneg,
                    nonneg_int, pct, plot_curves, read_json, run, setup, sgd, stride_changes, teacher_resnet18,
                    warmup_cosine)


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


def main(argv=None):
    args = parse(argv)
    run = os.path.join(args.out, "teacher")
    device = setup(args)
    cfg = {k: v for k, v in vars(args).items() if k not in ("data", "out", "device")}
    print(f"== Q1 part A: teacher ResNet18 -> {run} on {device}, {args.precision}")
    print("changed for 32x32 input: " + "; ".join(f"{r[1]} {r[3]} -> {r[4]}" for r in stride_changes(32) if r[2]))

    if not finished(run, cfg):
        torch.manual_seed(args.seed)
        model = teacher_resnet18(10, pretrained=bool(args.pretrained))  # the stride changes: see teacher_resnet18
        shape = tuple(features(model.eval(), torch.zeros(1, 3, 32, 32)).shape[1:])
        assert shape == (512, 8, 8), f"last feature map is {shape}, the assignment asks 8x8x512"
        model = model.to(device, memory_format=torch.channels_last)
        if args.compile:
            model.compile()  # in place: the state_dict keeps its keys
        data = load_cifar10(args.data, device)
        (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
        gen = torch.Generator(device=device).manual_seed(args.seed)
        train = Batches(x_train, y_train, batch_size=args.batch, shuffle=True, augment=True, gen=gen)
        evals = {"train": Batches(x_train, y_train, batch_size=1024),  # eval mode, un-augmented: comparable with test
                 "test": Batches(x_test, y_test, batch_size=1024)}
        opt = sgd(model.parameters(), args.lr, args.momentum, args.wd)
        sched = warmup_cosine(opt, args.epochs * len(train), args.warmup * len(train))
        loss_fn = functools.partial(cross_entropy, label_smoothing=args.label_smoothing)
        history = fit(model, loss_fn, opt, sched, train, evals, args.epochs, run, cfg, gen, precision=args.precision)
        plot_curves([("Teacher ResNet18 (CIFAR-10): ", [history])], os.path.join(run, "curves"), "cross-entropy")
        last = history[-1]
        finish(run, model, {k: last[k] for k in ("train_acc", "test_acc", "train_loss", "test_loss")}
               | {"epochs": args.epochs, "device": str(device), "cifar10_source": data["source"],
                  "train_images": len(y_train), "test_images": len(y_test)})
    else:
        print(f"{run} is finished (delete it to train again)")
    result = read_json(os.path.join(run, "result.json"))
    print(f"teacher: train {pct(result['train_acc'])}%, test {pct(result['test_acc'])}% (final epoch)")


if __name__ == "__main__":
    run(main)
