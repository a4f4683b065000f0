"""make bench: where the time goes, measured in one run on whatever device is present.

1. Training throughput (images/s) of a teacher step, a student step and a KD step (teacher forward +
   student step), through the project's own training loop.
2. The data pipeline: common.Batches (uint8 tensor on the device, crop + flip + normalise batched there)
   against torchvision's DataLoader over the same CIFAR-10 files with PIL RandomCrop(32, 4) +
   RandomHorizontalFlip + ToTensor + Normalize and 2 workers, each delivering batches on the device.
3. N students distilled in lock-step (one teacher pass per batch) against N separate KD runs.
The table goes to the terminal and to OUT/bench.md.
"""
import copy
import os
import platform
import tempfile
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from common import (MEAN, STD, Batches, Parser, StudentCNN, Students, cross_entropy, get_device,
                    load_cifar10, md_table, positive_int, precision, run, sgd, teacher_resnet18, train_epoch,
                    warmup_cosine, write_synthetic_cifar)
from q1b_kd import distill_loss


class PilDataset(Dataset):
    """What torchvision's CIFAR10 dataset does per image: HxWx3 uint8 -> PIL image -> transform."""

    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.x[i])), self.y[i]


def timed(fn, device):
    """Wall-clock seconds of fn(), with the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def train_seconds(model, loss_fn, data, warm, device):
    """Seconds for one pass of training steps over `data`, after one warm-up step (cuDNN autotuning)."""
    model = model.to(device, memory_format=torch.channels_last)
    opt = sgd(model.parameters(), 0.01)
    sched = warmup_cosine(opt, 10 ** 6, 0)
    train_epoch(model, loss_fn, opt, sched, warm)
    return timed(lambda: train_epoch(model, loss_fn, opt, sched, data), device)


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--out", default="out")
    p.add_argument("--device", default="")
    p.add_argument("--batch", type=positive_int, default=None, help="default: 512 on a GPU, 64 on the CPU")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps per measure (default: 20 GPU, 3 CPU)")
    p.add_argument("--students", type=positive_int, default=5)
    p.add_argument("--images", type=positive_int, default=10000, help="images for the data-pipeline comparison")
    p.add_argument("--data-batch", type=positive_int, default=512, help="batch of the data-pipeline comparison "
                                                                        "(the teacher's and students' default)")
    p.add_argument("--workers", type=positive_int, default=2)
    args = p.parse_args(argv)
    device = get_device(args.device)
    gpu = device.type == "cuda"
    batch, steps = args.batch or (512 if gpu else 64), args.steps or (20 if gpu else 3)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    print(f"== bench on {name}: batch {batch}, {steps} steps per measure, {precision(device)}")
    torch.manual_seed(0)
    x = torch.randint(0, 256, (batch * steps, 3, 32, 32), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (batch * steps,), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    data = Batches(x, y, batch_size=batch, shuffle=True, augment=True, gen=gen)
    warm = Batches(x[:batch], y[:batch], batch_size=batch, shuffle=True, augment=True, gen=gen)
    n = batch * steps
    teacher = teacher_resnet18(pretrained=False).to(device, memory_format=torch.channels_last)
    frozen = copy.deepcopy(teacher).eval().requires_grad_(False)
    rows = []

    sec = train_seconds(teacher, cross_entropy, data, warm, device)
    rows.append(["teacher training step (ResNet18)", f"{n / sec:,.0f} images/s", ""])
    sec = train_seconds(StudentCNN(bn=True), cross_entropy, data, warm, device)
    rows.append(["student training step", f"{n / sec:,.0f} images/s", ""])
    sec = train_seconds(Students([StudentCNN(bn=True)]), distill_loss(frozen, [(4.0, 0.5)]), data, warm, device)
    rows.append(["KD step (teacher forward + student step)", f"{n / sec:,.0f} images/s", ""])
    print(md_table(["measure", "result", "ratio"], rows), end="", flush=True)

    k = args.students
    pairs = [(2.0 ** i, 0.5) for i in range(k)]
    lock = train_seconds(Students([StudentCNN(bn=True) for _ in pairs]), distill_loss(frozen, pairs), data, warm, device)
    alone = sum(train_seconds(Students([StudentCNN(bn=True)]), distill_loss(frozen, [pair]), data, warm, device)
                for pair in pairs)
    rows.append([f"{k} students in lock-step vs {k} separate KD runs", f"{lock:.2f} s vs {alone:.2f} s",
                 f"{lock / alone:.2f}x the time"])
    print(md_table(["measure", "result", "ratio"], rows[-1:]).splitlines()[-1], flush=True)

    with tempfile.TemporaryDirectory() as root:  # the same CIFAR-10 files for both pipelines
        write_synthetic_cifar(root, n_train=args.images, n_test=10)
        xs, ys = load_cifar10(root, device)["train"]
        ours = Batches(xs, ys, batch_size=args.data_batch, shuffle=True, augment=True, gen=gen)
        t_ours = timed(lambda: [b for b in ours], device)
        pil = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                  transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
        dataset = PilDataset(xs.permute(0, 2, 3, 1).cpu().numpy(), ys.tolist(), pil)  # as torchvision holds CIFAR-10
        loader = DataLoader(dataset, batch_size=args.data_batch, shuffle=True, drop_last=True,
                            num_workers=args.workers, pin_memory=gpu, persistent_workers=False)
        t_pil = timed(lambda: [(a.to(device, non_blocking=True), b.to(device, non_blocking=True)) for a, b in loader],
                      device)
    m = len(ours) * args.data_batch
    rows.append([f"data pipeline, {m:,} images, batch {args.data_batch}: on-device Batches vs DataLoader + PIL "
                 f"({args.workers} workers)",
                 f"{m / t_ours:,.0f} vs {m / t_pil:,.0f} images/s", f"{t_pil / t_ours:.1f}x faster"])
    print(md_table(["measure", "result", "ratio"], rows[-1:]).splitlines()[-1], flush=True)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(f"### Benchmark on {name}\n\nbatch {batch}, {steps} timed steps per measure, {precision(device)}, "
                f"torch {torch.__version__}\n\n{md_table(['measure', 'result', 'ratio'], rows)}")
    print(f"written {os.path.join(args.out, 'bench.md')}")


if __name__ == "__main__":
    run(main)
