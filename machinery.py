"""Nothing in this module is part of the assignment. It is what makes the runs safe, resumable and fast: one-line
errors and the command line, device and precision, the optimiser step (per-student clipping, loss scaling, divergence,
no host sync), lock-step group sizing, checkpoints, resume and run folders. Reading and writing files (CIFAR-10's
batches, face images, DigiFace-1M's download, atomic writes, the report's tables) is in files.py, whose names the
scripts reach here too, as M.<name>. common.py (the assignment's shared pieces) uses both; a grader need not read
either.
"""
import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import re
import shutil
import time

import torch
import torch.nn as nn
import torchvision

from files import (CIFAR10, CIFAR_CLASSES, DIGIFACE_URL, atomic, die, download_cifar10, fetch_digiface,  # noqa: F401
                   file_sha256, hold, load_checkpoint, natural_key, pct, read_cifar_batch, read_json, read_subject,
                   save_atomic, warn, write_demo_data, write_json, write_synthetic_cifar, write_synthetic_faces)


def _keep_freed_memory():
    """glibc gives every large freed block back to the OS (munmap), so each CPU step would page-fault the student's
    gradient in anew; kept in the heap instead (M_MMAP_MAX = 0, M_TRIM_THRESHOLD at its maximum). The time it saves:
    docs/design.md, "Speed"."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        libc = ctypes.CDLL(None)
        libc.mallopt(-4, 0)
        libc.mallopt(-1, 2 ** 31 - 1)


_keep_freed_memory()

# =============================================================================
# Errors and the command line
# =============================================================================


def run(main):
    """A script's entry point: Ctrl-C ends with one line, not a traceback (the last checkpoint resumes)."""
    try:
        main()
    except KeyboardInterrupt:
        die("interrupted; run the same command again to resume from the last finished epoch")


def run_commands(text):
    """Run the command lines `<python> <script>.py <options>` of `text` (as `make -n` prints them, lines
    continued with a backslash) in this one process, one after the other, each as its script would run:
    make demo imports torch and torchvision once, not once per step. Stops at the first that fails, with its exit
    status."""
    import functools
    import importlib
    import shlex
    for line in text.replace("\\\n", " ").splitlines():
        if line.strip():
            _, script, *argv = shlex.split(line)
            print(f"$ {' '.join(shlex.quote(a) for a in [script, *argv])}", flush=True)
            t = time.time()
            run(functools.partial(importlib.import_module(os.path.basename(script)[:-3]).main, argv))
            print(f"({script}: {time.time() - t:.0f} s)", flush=True)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, and the options the three training scripts share."""

    def error(self, message):
        die(f"{message} (see --help)")

    def run_options(self, epochs, lr, batch, lr_help, momentum, wd, teacher=False):
        """--data --out --device [--teacher] --epochs --lr --batch --momentum --wd --compile."""
        self.add_argument("--data", default="data", help="CIFAR-10 (downloaded on first use) and the faces' cache")
        self.add_argument("--out", default="out", help="results folder")
        self.add_argument("--device", default="", help="cpu, cuda or cuda:N (default: cuda if present)")
        if teacher:
            self.add_argument("--teacher", default="", help="teacher weights (default: OUT/teacher/model.pt)")
        self.add_argument("--epochs", type=positive_int, default=epochs)
        self.add_argument("--lr", type=positive, default=lr, help=lr_help)
        self.add_argument("--batch", type=positive_int, default=batch)
        self.add_argument("--momentum", type=nonneg, default=momentum, help="Nesterov momentum")
        self.add_argument("--wd", type=nonneg, default=wd, help="weight decay, L2")
        self.add_argument("--precision", choices=PRECISIONS, default="auto",
                          help="auto: bf16 on GPUs of compute capability >= 8.0, fp16 (loss scaling) below, fp32 on the CPU")
        self.add_argument("--compile", type=flag, default=0, help="1: torch.compile the models")

    def parse_args(self, argv=None, namespace=None):
        args = super().parse_args(argv, namespace)
        if getattr(args, "teacher", None) == "":
            args.teacher = os.path.join(args.out, "teacher", "model.pt")
        return args


def _number(kind, ok, what):
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return x
    return parse


positive_int = _number(int, lambda x: x >= 1, "an integer >= 1")
nonneg_int = _number(int, lambda x: x >= 0, "an integer >= 0")
positive = _number(float, lambda x: x > 0 and math.isfinite(x), "a number > 0")
nonneg = _number(float, lambda x: x >= 0 and math.isfinite(x), "a number >= 0")
fraction = _number(float, lambda x: 0 <= x <= 1, "in [0, 1]")
flag = _number(int, lambda x: x in (0, 1), "0 or 1")

# =============================================================================
# Device and precision
# =============================================================================

NVIDIA_DRIVER = "/proc/driver/nvidia/version"  # there when the box has an NVIDIA GPU and its driver


def get_device(name=""):
    """The training device: `name` (cpu, cuda, cuda:N) or, when empty, CUDA if present else CPU. On a GPU
    box whose torch cannot use the GPU, an empty `name` stops: hours on the CPU are not what anyone wants."""
    if not name:
        if not torch.cuda.is_available() and os.path.exists(NVIDIA_DRIVER):
            die(f"this box has an NVIDIA GPU but torch {torch.__version__} cannot use it (a CPU build, or a CUDA "
                "build newer than the driver: see nvidia-smi); install a CUDA build of torch that the driver "
                "supports, or give DEVICE=cpu to train on the CPU")
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        die(f"unknown DEVICE {name!r}: use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        die(f"unsupported DEVICE {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            die(f"DEVICE={name} but no CUDA GPU is visible; use DEVICE=cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            die(f"DEVICE={name} but only {torch.cuda.device_count()} GPU(s) are visible")
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 on Ampere+: TF32 tensor cores
    return device


def prepare(model, device, compile_=False):
    """A model on the device, channels_last (faster convolutions on GPU and CPU), compiled in place if asked (its
    state_dict keeps its keys)."""
    model = model.to(device, memory_format=torch.channels_last)
    for part in (model if isinstance(model, torch.nn.ModuleList) else [model]) if compile_ else ():
        part.compile()
    return model


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def get_precision(name, device):
    """'auto' -> the device's fast arithmetic: bf16 autocast on GPUs of compute capability >= 8.0 (bf16
    tensor cores), fp16 autocast with loss scaling below (T4, V100: fast fp16, no bf16), fp32 on the CPU."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def setup(args):
    """The run's device (DEVICE, or CUDA if present), with args.precision resolved for it in place."""
    device = get_device(args.device)
    args.precision = get_precision(args.precision, device)
    return device


def autocast(device, precision="fp32"):
    """Autocast to bf16 or fp16 (matrix products and convolutions), or plain fp32."""
    return torch.autocast(device.type, dtype=_AMP[precision] or torch.float32, enabled=_AMP[precision] is not None)


class Step:
    """The optimiser step of a model, or of a lock-step group of students (Students, one loss each), on the device
    and without a host sync at any precision. Backward of the losses (fp16: each times its student's scale); per
    student, the norm of its gradients (one foreach kernel for all); a student whose loss or gradients are not
    finite takes no step: under fp32 and bf16 it has diverged (for good), under fp16 it overflowed, as GradScaler
    handles it (its scale halves; 2,000 good steps double it; a scale below 1 is a divergence). The others'
    gradients are unscaled and clipped to `clip` (0: off) on their own norm (one foreach kernel per student), then
    SGD takes its fused step per parameter group, told on the device to skip the groups of students that take none
    (found_inf, as GradScaler tells it): no weight decay or momentum step either. `bad`: per student, the first step
    of the epoch at which it diverged (0: none). Optimisers other than fused SGD: the same, with a host sync."""

    def __init__(self, model, opt, precision="fp32", clip=0.0, scale=2.0 ** 16, interval=2000):
        self.parts = list(model) if isinstance(model, torch.nn.ModuleList) else [model]
        self.opt, self.precision, self.clip, self.interval, self.fp16 = opt, precision, clip, interval, precision == "fp16"
        self.device = next(model.parameters()).device
        owner = {q: k for k, part in enumerate(self.parts) for q in part.parameters()}
        self.owner = [owner[g["params"][0]] if g["params"] else 0 for g in opt.param_groups]  # a group: one student
        assert all(owner[q] == k for g, k in zip(opt.param_groups, self.owner) for q in g["params"]), \
            "a parameter group spans students: give each student its own groups"
        self.fused = isinstance(opt, torch.optim.SGD) and all(g.get("fused") for g in opt.param_groups)
        for g in opt.param_groups if self.fused else ():  # zero momentum: the same first step, and one a skip cannot leave unset
            for q in g["params"] if g["momentum"] else ():
                opt.state[q].setdefault("momentum_buffer", torch.zeros_like(q, memory_format=torch.preserve_format))
        k = len(self.parts)
        self.scale = torch.full((k,), scale if self.fp16 else 1.0, device=self.device)
        self.good = torch.zeros(k, device=self.device)
        self.dead = torch.zeros(k, dtype=torch.bool, device=self.device)  # diverged in an earlier epoch or step
        self.index = {}  # which student each gradient belongs to, per set of gradients present (built once: no copy)
        self.log, self.step, self.bad = None, 0, torch.zeros(k, dtype=torch.long, device=self.device)

    def __call__(self, loss):
        """One whole step: backward, clip_norms, sgd_step (train_epoch calls the three in turn)."""
        self.backward(loss)
        self.clip_norms()
        self.sgd_step()

    def backward(self, loss):
        """opt.zero_grad(); the losses' sum backward: each student's own gradients (fp16: each times its scale)."""
        self.loss = loss.float().view(-1)  # one loss a student
        if self.log is not None:
            self.log.append(self.loss.detach())
        self.opt.zero_grad(set_to_none=True)
        (self.loss * self.scale if self.fp16 else self.loss).sum().backward()

    def clip_norms(self):
        """Each student's gradients clipped to norm `clip` on its own norm (0: none; fp16: unscaled first); notes the
        students whose loss or gradient norm is not finite."""
        grads = [[q.grad for q in part.parameters() if q.grad is not None] for part in self.parts]
        norm = self.norms(grads)  # each student's gradient norm, unscaled
        self.found = ~(torch.isfinite(norm) & torch.isfinite(self.loss))
        self.clip_(grads, norm)

    def sgd_step(self):
        """opt.step(), but a student whose loss or gradients are not finite takes none (fp16: its loss scale halves;
        fp32, bf16: it has diverged for good)."""
        self.count(self.found)
        self.sgd(self.found | self.dead)  # SGD, skipping those students' parameter groups

    def norms(self, grads):
        key = tuple(map(len, grads))
        if key not in self.index:
            self.index[key] = torch.tensor([k for k, g in enumerate(grads) for _ in g], device=self.device)
        flat = [g for gs in grads for g in gs]
        sq = torch.stack(torch._foreach_norm(flat)).square() if flat else torch.zeros(0, device=self.device)
        return torch.zeros(len(self.parts), device=self.device).index_add_(0, self.index[key], sq).sqrt() / self.scale

    def clip_(self, grads, norm):
        mult = (1 / self.scale) * ((self.clip / (norm + 1e-6)).clamp(max=1) if self.clip else 1)
        for k, gs in enumerate(grads):
            if gs and (self.fp16 or self.clip):
                torch._foreach_mul_(gs, mult[k])

    def count(self, found):
        self.step += 1
        if self.fp16:
            self.good = torch.where(found, 0, self.good + 1)
            grow = self.good >= self.interval
            self.scale = torch.where(found, self.scale / 2, torch.where(grow, self.scale * 2, self.scale))
            self.good = torch.where(grow, 0, self.good)
            self.dead |= self.scale < 1
        else:
            self.dead |= found
        self.bad = torch.where((self.bad == 0) & self.dead, self.step, self.bad)

    def sgd(self, skip):
        skip = skip.float()
        for g, k in zip(self.opt.param_groups, self.owner):
            params = [q for q in g["params"] if q.grad is not None]
            if not params:
                continue
            if self.fused:
                torch._fused_sgd_(params, [q.grad for q in params],
                                  [self.opt.state[q]["momentum_buffer"] for q in params] if g["momentum"] else [],
                                  weight_decay=g["weight_decay"], momentum=g["momentum"], lr=g["lr"],
                                  dampening=g["dampening"], nesterov=g["nesterov"], maximize=False,
                                  is_first_step=False, grad_scale=None, found_inf=skip[k])
            elif skip[k]:  # a host sync: the fused kernel is what avoids it
                for q in params:
                    q.grad = None
        if not self.fused:
            self.opt.step()
        self.opt._opt_called = True  # what the lr scheduler's wrapper of opt.step sets: it stepped

    def epoch(self):
        """Start an epoch: the step count from 0; returns the students that have diverged (a set of indices)."""
        self.step, self.bad = 0, torch.zeros_like(self.bad)
        return {k for k, d in enumerate(self.dead.tolist()) if d}

    def state_dict(self):
        return {"scale": self.scale, "good": self.good, "dead": self.dead}

    def load_state_dict(self, state):
        self.scale, self.good = state["scale"].to(self.device), state["good"].to(self.device)
        self.dead = state.get("dead", self.dead).to(self.device)


# =============================================================================
# The teacher: ImageNet weights, the table of what changed, FT_LAYERS
# =============================================================================

RESNET18_FILE = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)


def imagenet_weights():
    """ResNet18's ImageNet weights through torchvision's weights API (cached under $TORCH_HOME)."""
    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    path = os.path.join(torch.hub.get_dir(), "checkpoints", RESNET18_FILE)
    try:
        return w.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except OSError as e:
        die(f"ImageNet weights are not in {path} and could not be downloaded ({e}); "
            f"put {RESNET18_FILE} there, or set PRETRAINED=0")
    except Exception as e:
        die(f"cannot read ImageNet weights {path} ({type(e).__name__}); delete it to download again")


def paper_name(module):
    """ResNet-paper name of a torchvision resnet18 module path (conv1, conv2_x, conv5_1, ...)."""
    if module in ("conv1", "bn1"):
        return "conv1"
    if module == "maxpool":
        return "conv2_x max-pool"
    m = re.match(r"layer(\d)(?:\.(\d))?(?:\.(conv\d|downsample))?", module)
    stage = int(m[1]) + 1
    if m[2] is None:
        return f"conv{stage}_x"
    name = f"conv{stage}_{int(m[2]) + 1}"
    return name + {None: "", "conv1": " (1st 3x3)", "conv2": " (2nd 3x3)", "downsample": " shortcut 1x1"}[m[3]]


def _outputs(model, names, size):
    shapes = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda mod, inp, out, n=n: shapes.__setitem__(n, "x".join(map(str, (*out.shape[2:], out.shape[1])))))
        for n in names]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return shapes


def stride_changes(new, size=32):
    """Table rows of what changed from torchvision's resnet18 in `new` (the teacher) for a size x size input: every
    conv or pool whose stride/padding differs, then each stage's output (HxWxC), both measured by running them."""
    orig = torchvision.models.resnet18()
    changed = [n for n, m in new.named_modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d))
               and (m.stride, m.padding) != (orig.get_submodule(n).stride, orig.get_submodule(n).padding)]
    stages = ["conv1", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    before, after = _outputs(orig, changed + stages, size), _outputs(new, changed + stages, size)

    def sp(m):
        k, s, p = (getattr(m, a) for a in ("kernel_size", "stride", "padding"))
        k, s, p = (v if isinstance(v, tuple) else (v, v) for v in (k, s, p))
        return f"{k[0]}x{k[1]}", f"stride {s[0]}, pad {p[0]}"
    rows = []
    for n in changed:
        kernel, s_old = sp(orig.get_submodule(n))
        rows.append([paper_name(n), n, kernel, s_old, sp(new.get_submodule(n))[1], before[n], after[n]])
    for n in stages:
        rows.append([paper_name(n) + " output", n, "", "", "", before[n], after[n]])
    return rows


def parse_layers(text, valid):
    """'conv5_x:10 conv4_2:1' -> [('conv5_x', 10.0), ('conv4_2', 1.0)]: layers with lr in % of the original.
    `valid`: layer name -> its modules (common.resnet_layers())."""
    out = []
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


# =============================================================================
# Lock-step groups of students
# =============================================================================


def group_size(args, device, make):
    """Students per lock-step group, the KD table's and the sweep's: GROUP; else the size kept in out/kd/group.json
    (a rerun makes the same groups); else 10 on the CPU, and on CUDA as many as fit 80% of the free memory, from
    measure_group. What was measured and chosen goes to group.json (and make plan prints it)."""
    path = os.path.join(args.out, "kd", "group.json")
    if args.group:
        return args.group
    if os.path.exists(path):
        return read_json(path)["group"]
    if device.type != "cuda":
        return 10
    sizing = measure_group(make, args.batch, args.precision, device)
    write_json(path, sizing)
    print(f"lock-step groups of up to {sizing['group']} students ({sizing['per_student'] / 1e9:.2f} GB each; measured "
          f"{', '.join(f'{k}: {v / 1e9:.2f} GB' for k, v in sizing['measured'].items())}; floor "
          f"{sizing['floor'] / 1e9:.2f} GB; {sizing['free'] / 1e9:.1f} GB free)")
    return sizing["group"]


def measure_group(make, batch, precision, device, sizes=(2, 4)):
    """The peak GPU bytes of one training step of groups of `sizes` students, after a discarded warm-up step (the
    first CUDA step at these shapes pays cuDNN's trial workspaces, which later steps reuse), and plan_group's choice."""
    student_memory(make, 1, batch, precision, device)
    measured = {k: student_memory(make, k, batch, precision, device) for k in sizes}
    return plan_group(torch.cuda.mem_get_info(device)[0], measured, student_floor(make(1), batch, precision))


def student_memory(make, k, batch, precision, device):
    """Peak GPU bytes of one training step of make(k), k students in lock-step (weights, gradients, momentum,
    activations), above what was allocated before."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    students = make(k).to(device, memory_format=torch.channels_last)
    x = torch.zeros(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    with autocast(device, precision):
        students(x).float().sum().backward()
    torch.optim.SGD(students.parameters(), 0.0, momentum=0.9).step()  # its momentum buffers, updated in place
    del students, x
    return torch.cuda.max_memory_allocated(device) - base


def student_floor(model, batch, precision):
    """The least one student can take in training, by arithmetic: weights, gradients and momentum in float32, and
    every layer's output at the batch size (2 bytes an element under autocast, 4 in fp32)."""
    sizes, hooks = [], [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel()))
                        for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    return 3 * 4 * sum(q.numel() for q in model.parameters()) + (4 if precision == "fp32" else 2) * batch * sum(sizes)


def plan_group(free, measured, floor, margin=0.8):
    """How many students fit `margin` of `free` bytes: one more student costs the slope between the two largest group
    sizes `measured` ({students: peak bytes}), never less than `floor` (a tiny, zero or negative slope measures
    nothing); the rest of the largest reading is fixed (the batch, workspaces)."""
    (a, ma), (b, mb) = sorted(measured.items())[-2:]
    per = max(floor, (mb - ma) / (b - a))
    fixed = max(0.0, mb - b * per)
    return {"group": max(1, int((margin * free - fixed) / per)), "per_student": per, "fixed": fixed, "floor": floor,
            "free": free, "measured": {str(k): v for k, v in sorted(measured.items())}}


def lockstep_groups(specs, size):
    """`specs` ([(T, lam, seed index)]) in lock-step groups of one seed each (its students see the same batches, so
    one teacher pass serves them all; two seeds' batches differ in order and crops), of at most `size` students."""
    seeds = {}
    for spec in specs:
        seeds.setdefault(spec[2], []).append(spec)
    return [part[i:i + size] for part in seeds.values() for i in range(0, len(part), size)]


def train_lockstep(todo, train, folder, args, device, make):
    """train(group) for each lock-step group of the students `todo`, groups as large as fit (group_size): a
    group that runs out of GPU memory on its first step (nothing trained yet: no checkpoint in folder(group))
    splits in two and starts again; later, it stops, keeping its checkpoint."""
    queue = lockstep_groups(todo, group_size(args, device, make))
    while queue:
        specs = queue.pop(0)
        try:
            train(specs)
            continue
        except torch.cuda.OutOfMemoryError:
            if len(specs) == 1 or os.path.exists(os.path.join(folder(specs), "checkpoint.pt")):
                die(f"out of GPU memory with {len(specs)} student(s) in lock-step in {folder(specs)} (its last "
                    f"checkpoint is kept); give a smaller GROUP= (or BATCH=) and run the same command again")
        size = (len(specs) + 1) // 2
        print(f"out of GPU memory on the first step of {len(specs)} students in lock-step: "
              f"starting again in groups of at most {size}")
        shutil.rmtree(folder(specs), ignore_errors=True)  # nothing trained: only its config
        if not args.group:  # a rerun makes the same groups
            write_json(os.path.join(args.out, "kd", "group.json"), {"group": size, "reason": "out of memory"})
        gc.collect()
        torch.cuda.empty_cache()
        queue[:0] = lockstep_groups(specs, size)


def diverged(history):
    """{student index: (epoch, step)} of the first non-finite loss of each student of a lock-step group."""
    out = {}
    for row in history:
        for k, step in enumerate(row.get("diverged_at", [])):
            if step and k not in out:
                out[k] = (row["epoch"], step)
    return out




# =============================================================================
# Checkpoints, resume and run folders
# =============================================================================


class Run:
    """A run's folder while it trains (locked against a second process) and its config, whose epochs and precision
    are the run's: config.json, history.json, and checkpoint.pt holding all that resumes the run (model,
    optimiser, schedule, loss scale, epoch, history, config, random states), written atomically every `every` epochs
    (0: every k epochs, k such that writes take under 5% of the time, measured at the first write) and at the end of
    a stage (a span of epochs with its own optimiser); none after the last epoch: the caller finishes the run at
    once, which would remove it. `gen`: the data generator (its order and augmentation)."""

    def __init__(self, folder, config, gen, every=1):
        os.makedirs(folder, exist_ok=True)
        hold(folder)
        self.dir, self.config, self.every, self.measure = folder, config, every or 1, not every
        self.epochs, self.precision = config["epochs"], config.get("precision", "fp32")
        self.path = os.path.join(folder, "checkpoint.pt")
        self.gen = gen

    def resume(self, model, opt, sched, step, stage):
        """The history so far: [] for a new run (its config.json written), or the checkpoint's (refusing a changed
        config), the run's states loaded from it. A checkpoint of this stage resumes it whole; one of the epoch
        before the stage (the end of the stage before) starts this stage with its own optimiser and schedule; a
        stage the checkpoint is past is skipped (the next loads it)."""
        self.parts, self.first, self.device = (model, opt, sched, step), stage.start, next(model.parameters()).device
        if not os.path.exists(self.path):
            if stage.start > 1:
                die(f"{self.dir} has no checkpoint of epoch {stage.start - 1} to train epochs {stage.start}-"
                    f"{stage.stop - 1} from; delete the folder to start over")
            write_json(os.path.join(self.dir, "config.json"), self.config)
            return []
        ck = load_checkpoint(self.path)
        check_config(ck.get("config"), self.config, self.dir)
        if ck["epoch"] >= stage.stop - 1:
            return ck["history"]
        same = ck.get("first", 1) == stage.start
        if not same and ck["epoch"] != stage.start - 1:
            die(f"{self.path} (epoch {ck['epoch']}) cannot start epochs {stage.start}-{stage.stop - 1}; delete it to "
                "start over")
        resume(ck, model, *((opt, sched) if same else (None, None)), step, self.gen, self.device, self.path)
        if same:
            print(f"resuming {self.dir} after epoch {ck['epoch']}/{self.epochs}")
        return ck["history"]

    def record(self, history, last):
        """After an epoch: the checkpoint when one is due (`last`: the stage's last epoch), history.json, and the
        epoch's printed row."""
        epoch = history[-1]["epoch"]
        model, opt, sched, step = self.parts
        if 0 < epoch < self.epochs and (epoch % self.every == 0 or epoch == last):
            t = time.time()
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "scaler": step.state_dict(), "epoch": epoch, "first": self.first, "history": history,
                     "config": self.config, "device": str(self.device), "rng": torch.get_rng_state(),
                     "gen": self.gen.get_state(),
                     "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
            save_atomic(state, self.path, crc32=False)
            if self.measure:  # writes under 5% of the time: every k epochs
                took, self.measure = time.time() - t, False
                self.every = max(1, math.ceil(took / (0.05 * max(1e-9, history[-1]["seconds"]))))
                print(f"checkpoint written in {took:.1f}s, epoch in {history[-1]['seconds']:.1f}s: "
                      f"every {self.every} epoch(s)")
        write_json(os.path.join(self.dir, "history.json"), history)
        print_row(history[-1], self.epochs, history)

    def diverged(self, bad, epoch, history, group):
        """What Step's `bad` (per loss, the step at which it turned non-finite; 0: none) means: a single run stops with
        one line (its last checkpoint kept); in a lock-step group the student stops alone, its partners go on
        ({'diverged_at': bad} for the history row)."""
        if not group:
            if any(bad):
                die(f"loss is not finite at epoch {epoch}, step {max(bad)} of {self.dir}; lower the learning rate "
                    f"(the checkpoint of epoch {epoch - 1} is kept)")
            return {}
        dead = diverged(history)
        for k, s in enumerate(bad):
            if s and k not in dead:
                warn(f"student {k + 1} of {len(bad)} in {self.dir}: loss not finite at epoch {epoch}, step {s}; "
                     "it stops, its partners go on")
        return {"diverged_at": bad}


def resume(ck, model, opt, sched, step, gen, device, path):
    """Load a checkpoint's model, optimiser and schedule (unless None: a new stage's), loss scale and random
    states. The first four load on any device. A data generator's state belongs to its device kind (a CUDA
    generator's cannot be set on the CPU's), so a checkpoint written on another kind re-seeds the generator
    from the seed and the epoch, and says so: the later epochs then draw another data order and augmentation
    than an uninterrupted run, and the history is no longer the same as that run's."""
    try:
        model.load_state_dict(ck["model"])
        if opt is not None:
            opt.load_state_dict(ck["opt"])
            sched.load_state_dict(ck["sched"])
        step.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"])
        written = torch.device(ck["device"])
        if written.type == device.type:
            gen.set_state(ck["gen"])
            if device.type == "cuda":
                torch.cuda.set_rng_state(ck["cuda_rng"], device)
        else:
            gen.manual_seed(gen.initial_seed() + 1_000_003 * ck["epoch"])
            warn(f"{path} was written on {written}, this run is on {device}: weights, optimiser, schedule and loss "
                 f"scale carry over; the data order and augmentation of epochs {ck['epoch'] + 1}- are re-seeded "
                 "(a generator's state cannot move between device kinds), so they differ from an uninterrupted run's")
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        die(f"{path} (written on {ck.get('device', 'an unknown device')}) does not match this run "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); it is kept: resume it where it was written, "
            "or delete it to start over")


def print_row(row, epochs, history):
    """One line per epoch (airbench-style) with the time left."""
    def fmt(k, v):
        if v is None:
            return f"{k} -"
        if isinstance(v, list):
            return f"{k} " + " ".join(f"{x:.4g}" for x in v)
        return f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
    left = (epochs - row["epoch"]) * sum(r["seconds"] for r in history) / len(history)
    cols = [fmt(k, v) for k, v in row.items() if k not in ("epoch", "seconds")]
    print(f"epoch {row['epoch']:>3}/{epochs} | " + " | ".join(cols) + f" | {row['seconds']:.1f}s, eta {left / 60:.1f} min",
          flush=True)


# =============================================================================
# Run folders: what is finished, and what a resumed run must match
# =============================================================================

IGNORED = ("data", "out", "device", "compile")  # where and how a run ran does not change what it is


def check_config(saved, config, run_dir):
    """Refuse to continue a run that was started with another configuration."""
    saved = {k: v for k, v in (saved or {}).items() if k not in IGNORED}
    config = {k: v for k, v in json.loads(json.dumps(config)).items() if k not in IGNORED}
    diff = [f"{k}: {saved.get(k)} -> {config.get(k)}" for k in sorted(set(saved) | set(config))
            if saved.get(k) != config.get(k)]
    if "teacher_sha256" in config and saved.get("teacher_sha256") != config["teacher_sha256"]:
        die(f"{run_dir} was made with another teacher (sha256 {str(saved.get('teacher_sha256'))[:12]}, this teacher's "
            f"is {config['teacher_sha256'][:12]}); delete {run_dir} to train it again from this teacher, "
            "or choose another OUT=")
    if diff:
        die(f"{run_dir} holds a run with another config ({', '.join(diff)}); "
            f"delete {run_dir} to start over, or choose another OUT=")


def finished(run_dir, config):
    """True if run_dir holds a finished run of this config (so it is not trained again)."""
    if not os.path.exists(os.path.join(run_dir, "result.json")):
        return False
    try:
        saved = read_json(os.path.join(run_dir, "config.json"))
    except (OSError, ValueError):
        saved = None
    check_config(saved, config, run_dir)
    return True


def finish(run_dir, model, result, half=False):
    """Write a finished run's final weights (none for a diverged model; with `half`, in float16: half the
    disk) and result.json (it marks the run done; on CUDA with the process's peak GPU memory so far, which
    docs/gpu_check.sh sets against make plan's), then remove its checkpoint: weights + momentum, not needed any more."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        result = result | {"peak_gpu_bytes": torch.cuda.max_memory_allocated()}
    if model is not None:
        state = {k: v.half() if half and v.is_floating_point() else v for k, v in model.state_dict().items()}
        save_atomic(state, os.path.join(run_dir, "model.pt"))
    write_json(os.path.join(run_dir, "result.json"), result)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(run_dir, "checkpoint.pt"))
