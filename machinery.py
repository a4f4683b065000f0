"""Nothing in this module is part of the assignment. It is what makes the runs safe, resumable and fast:
one-line errors and the command line, device and precision, safe reading of downloaded files, the
synthetic demo data, the DigiFace-1M range-request download, lock-step group sizing, checkpoints and
resume, atomic writes and locks. common.py (the assignment's shared pieces) uses it; a grader need not
read it.
"""
import argparse
import contextlib
import csv
import ctypes
import fcntl
import gc
import hashlib
import http.client
import io
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageOps
from tqdm import tqdm

warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # _read_image refuses those itself, naming the file


def _keep_freed_memory():
    """glibc gives every freed block of over 32 MB back to the OS (munmap), so a CPU step page-faults the
    student's 187 MB gradient in anew each time: 1.8x the time of the step with the blocks kept (make bench).
    Kept in the heap instead (M_MMAP_MAX = 0, M_TRIM_THRESHOLD at its maximum); nothing to do elsewhere."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        libc = ctypes.CDLL(None)
        libc.mallopt(-4, 0)
        libc.mallopt(-1, 2 ** 31 - 1)


_keep_freed_memory()

# =============================================================================
# Errors and the command line
# =============================================================================


def die(msg):
    """Stop with one line on stderr and exit status 1 (no traceback)."""
    raise SystemExit(f"error: {msg}")


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


def run(main):
    """A script's entry point: Ctrl-C ends with one line, not a traceback (the last checkpoint resumes)."""
    try:
        main()
    except KeyboardInterrupt:
        die("interrupted; run the same command again to resume from the last finished epoch")


def run_commands(text):
    """Run the command lines `<python> <script>.py <options>` of `text` (as `make -n` prints them, lines
    continued with a backslash) in this one process, one after the other, each as its script would run:
    make demo imports torch and torchvision once, not once per step (3.5 s each here). Stops at the first
    that fails, with its exit status."""
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

    def run_options(self, epochs, lr, batch, lr_help, teacher=False):
        """--data --out --device [--teacher] --epochs --lr --batch --momentum --wd --compile."""
        self.add_argument("--data", default="data", help="CIFAR-10 (downloaded on first use) and the faces' cache")
        self.add_argument("--out", default="out", help="results folder")
        self.add_argument("--device", default="", help="cpu, cuda or cuda:N (default: cuda if present)")
        if teacher:
            self.add_argument("--teacher", default="", help="teacher weights (default: OUT/teacher/model.pt)")
        self.add_argument("--epochs", type=positive_int, default=epochs)
        self.add_argument("--lr", type=positive, default=lr, help=lr_help)
        self.add_argument("--batch", type=positive_int, default=batch)
        self.add_argument("--momentum", type=nonneg, default=0.9, help="Nesterov momentum")
        self.add_argument("--wd", type=nonneg, default=5e-4, help="weight decay, L2 (the assignment's 0.0005)")
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
        loss = loss.float().view(-1)
        if self.log is not None:
            self.log.append(loss.detach())
        self.opt.zero_grad(set_to_none=True)
        (loss * self.scale if self.fp16 else loss).sum().backward()  # a group: each student's own gradient
        grads = [[q.grad for q in part.parameters() if q.grad is not None] for part in self.parts]
        key = tuple(map(len, grads))
        if key not in self.index:
            self.index[key] = torch.tensor([k for k, g in enumerate(grads) for _ in g], device=self.device)
        flat = [g for gs in grads for g in gs]
        sq = torch.stack(torch._foreach_norm(flat)).square() if flat else torch.zeros(0, device=self.device)
        norm = torch.zeros(len(self.parts), device=self.device).index_add_(0, self.index[key], sq).sqrt() / self.scale
        found = ~(torch.isfinite(norm) & torch.isfinite(loss))
        mult = (1 / self.scale) * ((self.clip / (norm + 1e-6)).clamp(max=1) if self.clip else 1)
        for k, gs in enumerate(grads):
            if gs and (self.fp16 or self.clip):
                torch._foreach_mul_(gs, mult[k])
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
        skip = (found | self.dead).float()
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
# Data files: CIFAR-10's download and safe reading, the synthetic demo data
# =============================================================================


CIFAR10 = torchvision.datasets.CIFAR10  # its file names, md5s and download URL; its reader is not used
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR-10 batch holds: dicts, lists, strings, bytes, ints and numpy uint8
    arrays. Any other global (a function a planted pickle would call) is refused."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}")
        if name == "dtype":
            return _uint8_dtype
        return super().find_class(module, name)


def _uint8_dtype(name, *args):
    if np.dtype(name) != np.uint8:
        raise pickle.UnpicklingError(f"it holds an array of {name}, not uint8")
    return np.dtype(name, *args)


def read_cifar_batch(path, md5):
    """One batch file -> (N x 32 x 32 x 3 uint8, labels). The official file (its md5, checked as
    torchvision does) is unpickled; any other file only through _CifarUnpickler, so it cannot run code."""
    try:
        with open(path, "rb") as f:
            official = torchvision.datasets.utils.check_integrity(path, md5)
            if official:
                entry = pickle.load(f, encoding="latin1")
            else:
                entry = _CifarUnpickler(f, encoding="latin1").load()
        x, y = entry["data"], entry["labels"]
        if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3072
                and isinstance(y, list) and len(y) == len(x) and all(isinstance(v, int) and 0 <= v < 10 for v in y)):
            raise ValueError("no uint8 'data' of N x 3072 with N 'labels' in 0-9")
    except Exception as e:  # a truncated, foreign or planted pickle
        die(f"cannot read CIFAR-10 batch {path} ({type(e).__name__}: {e}); delete it to download again")
    synthetic = str(entry.get("batch_label", "")).startswith("synthetic")  # what write_synthetic_cifar wrote
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y, "official" if official else \
        "synthetic" if synthetic else "other"


def download_cifar10(root):
    """The folder of CIFAR-10's batch files under `root`, downloaded there on first use by torchvision (its
    md5-checked archive)."""
    folder = os.path.join(root, CIFAR10.base_folder)
    if not all(os.path.exists(os.path.join(folder, n)) for n, _ in CIFAR10.train_list + CIFAR10.test_list):
        try:
            torchvision.datasets.utils.download_and_extract_archive(CIFAR10.url, root, filename=CIFAR10.filename,
                                                                    md5=CIFAR10.tgz_md5)
        except Exception as e:  # URLError, a truncated or wrong archive
            die(f"CIFAR-10 is not in {folder} and could not be downloaded ({type(e).__name__}: {e}); "
                f"copy cifar-10-python.tar.gz into {root}/ or set DATA=")
    return folder


def write_synthetic_cifar(root, n_train=500, n_test=100, seed=0, shift=4):
    """A small CIFAR-10 in the real `cifar-10-batches-py` format (five pickled train batches, the
    test batch, batches.meta), for tests and the demo: images are class patterns plus noise."""
    folder = os.path.join(root, CIFAR10.base_folder)
    os.makedirs(folder, exist_ok=True)
    protos = _prototypes(10, 32, seed)
    g = torch.Generator().manual_seed(seed + 1)
    files = [(name, n_train // 5 + (i < n_train % 5)) for i, (name, _) in enumerate(CIFAR10.train_list)]
    files.append((CIFAR10.test_list[0][0], n_test))
    for name, n in files:
        labels = torch.randperm(n, generator=g) % 10
        x = _samples(protos, labels, g, shift=shift)
        batch = {"batch_label": f"synthetic {name}", "labels": labels.tolist(),
                 "data": x.reshape(n, -1).numpy(), "filenames": [f"synthetic_{i}.png" for i in range(n)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    with open(os.path.join(folder, CIFAR10.meta["filename"]), "wb") as f:
        pickle.dump({"label_names": list(CIFAR_CLASSES), "num_cases_per_batch": n_train // 5, "num_vis": 3072}, f)


def _prototypes(n_classes, size, seed):
    """One smooth random colour field per class (a 4x4 grid upsampled): the class-dependent pattern."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(n_classes, 3, 4, 4, generator=g)
    return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def _samples(protos, labels, g, noise=0.15, blend=0.3, shift=None):
    """Images of the given classes: the class pattern blended with another class's (up to `blend`),
    shifted by up to size/8 pixels, plus Gaussian noise; uint8 NCHW. Learnable, not trivial."""
    n, size = len(labels), protos.shape[-1]
    other = torch.randint(0, len(protos), (n,), generator=g)
    mix = blend * torch.rand(n, 1, 1, 1, generator=g)
    x = (1 - mix) * protos[labels] + mix * protos[other]
    shift = size // 8 if shift is None else shift
    shifts = torch.randint(-shift, shift + 1, (n, 2), generator=g)
    x = torch.stack([torch.roll(img, (int(a), int(b)), dims=(1, 2)) for img, (a, b) in zip(x, shifts)])
    x = x + noise * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def write_synthetic_faces(root, subjects=10, per_subject=12, size=40, seed=0):
    """A face-like image folder root/<subject>/<n>.png for tests and the demo: each subject is a
    pattern of its own plus noise, so the task is learnable but not trivial."""
    protos = _prototypes(subjects, size, seed + 100)
    g = torch.Generator().manual_seed(seed + 101)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".synthetic"), "w") as f:  # load_faces says so, and so does the report
        f.write("synthetic faces written by machinery.write_synthetic_faces\n")
    for s in range(subjects):
        folder = os.path.join(root, f"person_{s:03d}")
        os.makedirs(folder, exist_ok=True)
        x = _samples(protos, torch.full((per_subject,), s), g)
        for i, img in enumerate(x):
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i}.png"))


def write_demo_data(root):
    """The demo's data under root: a synthetic CIFAR-10 and a synthetic face folder (once)."""
    if not os.path.exists(os.path.join(root, CIFAR10.base_folder, "test_batch")):
        # shifts of up to 8 px: a convolutional teacher with global pooling takes them in its stride, the
        # student's position-bound 46.7M-weight FC needs far more data (a teacher well above its students)
        write_synthetic_cifar(root, n_train=120, n_test=100, shift=8)
    if not os.path.isdir(os.path.join(root, "faces")):
        write_synthetic_faces(os.path.join(root, "faces"), subjects=10, per_subject=12)


# =============================================================================
# Face images and DigiFace-1M
# =============================================================================

DIGIFACE_URL = "https://facesyntheticspubwedata.z6.web.core.windows.net/wacv-2023/subjects_0-1999_72_imgs.zip"
_DIGIFACE_MEMBER = re.compile(r"(?:[^/]+/)?(\d{1,7})/(\d{1,4})\.png")  # <identity>/<n>.png, nothing else


def natural_key(name):
    """Sort key that orders 'id2' before 'id10'."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def _to_rgb(im):
    """Any PIL image as 8-bit RGB: 16/32-bit greyscale scaled to 0-255 (not clipped to white), alpha
    (also a palette's transparency) composited on black, CMYK/palette/greyscale converted."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0  # 16-bit range 0-65535 -> 0-255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if "A" in im.mode or "transparency" in im.info:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im).convert("RGB")
    return im.convert("RGB")


def _read_image(path, size):
    """One image file as size x size x 3 uint8, or None (skipped with a warning that names it): EXIF
    orientation applied, any mode converted, images of over Image.MAX_IMAGE_PIXELS refused (decompression bombs)."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > Image.MAX_IMAGE_PIXELS:
                warn(f"skipped {path}: {im.width}x{im.height} pixels is over the limit of "
                     f"{Image.MAX_IMAGE_PIXELS:,} (a decompression bomb?)")
                return None
            im = _to_rgb(ImageOps.exif_transpose(im))
            return np.asarray(im.resize((size, size), Image.BILINEAR))
    except Image.DecompressionBombError:
        warn(f"skipped {path}: a decompression bomb (over twice Image.MAX_IMAGE_PIXELS)")
    except Exception as e:  # any file PIL cannot decode is skipped, whatever the reason
        warn(f"skipped unreadable image {path} ({type(e).__name__})")
    return None


def read_subject(folder, size, pool):
    """(path, HxWx3 uint8) for every readable image file of one subject folder, in natural order."""
    paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder), key=natural_key)
             if not f.startswith(".") and os.path.isfile(os.path.join(folder, f))]
    return [(p, im) for p, im in zip(paths, pool.map(lambda p: _read_image(p, size), paths)) if im is not None]


class DownloadError(Exception):
    """A download that cannot go on: the message says why, in one line."""


class _HttpFile(io.RawIOBase):
    """A remote file read through HTTP Range requests and seekable, so that zipfile reads only the
    central directory and the members it is asked for; `prefetch` fetches a span of members at once.
    Only the two Range forms Azure storage documents are sent, `bytes=a-b` and `bytes=a-` (never a
    suffix `bytes=-n`): the size comes from `bytes=0-0`'s Content-Range. Timeouts, resets, truncated
    bodies and 5xx answers are retried with backoff; every answer's Content-Range and length are checked."""

    def __init__(self, url, timeout=60, tries=5, backoff=2.0):
        self.url, self.timeout, self.tries, self.backoff = url, timeout, tries, backoff
        self.pos, self.requests, self.received = 0, 0, 0
        self.size = None
        self.size = self._get(0, 0)[2]
        self.prefetch(max(0, self.size - 65536), self.size)  # the tail holds the zip's end records

    def _get(self, start, end):
        """Bytes start..end (inclusive) -> (start, data, total size), retried; DownloadError when it cannot be had."""
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={start}-{end}", "User-Agent": "kd-continual"})
        for attempt in range(1, self.tries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", r.headers.get("Content-Range", ""))
                    if r.status != 206 or not m:  # the whole file follows: stop before reading it
                        raise DownloadError(f"{self.url} does not answer byte-range requests (HTTP {r.status}); "
                                            "download the zip yourself and give FACES=<file.zip>")
                    a, b, total = int(m[1]), int(m[2]), int(m[3])
                    if a != start or b != min(end, total - 1) or (self.size is not None and total != self.size):
                        raise _Retry(f"asked bytes {start}-{end}, got {m[0]}")
                    data = r.read()
                    if len(data) != b - a + 1:
                        raise _Retry(f"{len(data)} of {b - a + 1} bytes")
                self.requests += 1
                self.received += len(data)
                return a, data, total
            except urllib.error.HTTPError as e:
                if e.code < 500:
                    raise DownloadError(f"{self.url} answered HTTP {e.code} {e.reason}") from None
                why = f"HTTP {e.code}"
            except (_Retry, OSError, http.client.HTTPException) as e:  # timeouts, resets, IncompleteRead
                why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if attempt < self.tries:
                warn(f"range request {start}-{end} failed ({why}); retry {attempt}/{self.tries - 1}")
                time.sleep(self.backoff * 2 ** (attempt - 1))
        raise DownloadError(f"{self.tries} tries to read bytes {start}-{end} of {self.url} failed (last: {why})")

    def prefetch(self, start, end):
        self.buf = self._get(start, end - 1)[:2]

    def read(self, n=-1):
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        start, data = self.buf
        if not start <= self.pos <= end <= start + len(data):
            self.prefetch(self.pos, max(end, min(self.size, self.pos + 65536)))
            start, data = self.buf
        out = data[self.pos - start:end - start]
        self.pos = end
        return out

    def seek(self, offset, whence=0):
        self.pos = (offset, self.pos + offset, self.size + offset)[whence]
        return self.pos

    def tell(self):
        return self.pos

    def readable(self):
        return True

    def seekable(self):
        return True


class _Retry(Exception):
    """An answer that was not what was asked (wrong range, short body): ask again."""


def fetch_digiface(root, source=DIGIFACE_URL, subjects=100, span=32 << 20, **http):
    """The first `subjects` identities of DigiFace-1M (all their images) from its zip, into
    root/<identity>/<n>.png. `source` is the zip's URL, read by HTTP range requests so that only those
    members travel (in spans of up to `span` bytes), or a zip file already on disk, read by the same
    code. Done once; an interrupted download resumes. Returns root."""
    marker = os.path.join(root, ".complete")
    if os.path.exists(marker) and int(open(marker).read() or 0) >= subjects:
        return root
    remote = None
    try:
        if re.match(r"https?://", source):
            remote = _HttpFile(source, **http)
        elif os.path.isfile(source):
            remote = open(source, "rb")
        else:
            die(f"face zip {source} does not exist")
        zf = zipfile.ZipFile(remote)
    except (DownloadError, OSError, zipfile.BadZipFile, ValueError) as e:
        die(f"cannot read the face data from {source} ({e}); offline? give FACES=<folder or file.zip> "
            f"(see README) or put the images in {root}/<identity>/<n>.png")
    members = {}
    for info in zf.infolist():
        m = _DIGIFACE_MEMBER.fullmatch(info.filename)
        if m:  # any other name (folders, paths with '..', other files) is never written
            members.setdefault(int(m[1]), []).append((int(m[2]), info))
    ids = sorted(members)[:subjects]
    if len(ids) < subjects:
        die(f"{source} holds {len(ids)} identities, {subjects} are needed")
    todo = sorted((info for i in ids for n, info in members[i]
                   if not os.path.exists(os.path.join(root, str(i), f"{n}.png"))), key=lambda m: m.header_offset)
    starts = sorted(m.header_offset for m in zf.infolist()) + [zf.start_dir]
    end_of = {a: b for a, b in zip(starts, starts[1:])}  # a member ends where the next begins
    spans = []  # runs of wanted members, contiguous in the archive, one request each
    for info in todo:
        a, b = info.header_offset, end_of[info.header_offset]
        if spans and a - spans[-1][1] <= 65536 and b - spans[-1][0] <= span:
            spans[-1][1] = b
            spans[-1][2].append(info)
        else:
            spans.append([a, b, [info]])
    with tqdm(total=sum(b - a for a, b, _ in spans), unit="B", unit_scale=True, desc="DigiFace-1M") as bar:
        for a, b, infos in spans:
            try:
                if isinstance(remote, _HttpFile):
                    remote.prefetch(a, b)
                for info in infos:
                    ident, n = _DIGIFACE_MEMBER.fullmatch(info.filename).groups()
                    path = os.path.join(root, str(int(ident)), f"{int(n)}.png")  # built here, not taken from the archive
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path + ".part", "wb") as f:
                        f.write(zf.read(info))
                    os.replace(path + ".part", path)
            except (DownloadError, OSError, zipfile.BadZipFile, zlib.error) as e:
                die(f"reading the face data from {source} failed ({e}); run the same command again to resume "
                    f"(the {sum(1 for _ in _files_under(root))} images already in {root} are kept)")
            bar.update(b - a)
    with open(marker, "w") as f:
        f.write(str(subjects))
    return root


def _files_under(root):
    for _, _, files in os.walk(root):
        yield from (f for f in files if f.endswith(".png"))


# =============================================================================
# ImageNet weights, FT_LAYERS
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
    """`specs` ([(T, lam, seed index)], each student's seeds next to each other) in groups of at most
    `size`, each student's seeds in one group where they fit, so that its seeds share teacher passes."""
    students = {}
    for spec in specs:
        students.setdefault(spec[:2], []).append(spec)
    groups = [[]]
    for seeds in students.values():
        for i in range(0, len(seeds), size):
            part = seeds[i:i + size]
            if len(groups[-1]) + len(part) > size:
                groups.append([])
            groups[-1] += part
    return [g for g in groups if g]


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
    """A run's folder while it trains (locked against a second process) and its config, whose epochs, precision and
    clip are the run's: config.json, history.json, and checkpoint.pt holding all that resumes the run (model,
    optimiser, schedule, loss scale, epoch, history, config, random states), written atomically every `every` epochs
    (0: every k epochs, k such that writes take under 5% of the time, measured at the first write) and at the end of
    a stage (a span of epochs with its own optimiser); none after the last epoch: the caller finishes the run at
    once, which would remove it. `gens`: the data generators (one per seed of a group)."""

    def __init__(self, folder, config, gens, every=1):
        os.makedirs(folder, exist_ok=True)
        hold(folder)
        self.dir, self.config, self.every, self.measure = folder, config, every or 1, not every
        self.epochs, self.precision, self.clip = config["epochs"], config.get("precision", "fp32"), config.get("clip", 0.0)
        self.path = os.path.join(folder, "checkpoint.pt")
        self.gens = gens if isinstance(gens, (list, tuple)) else [gens]

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
        resume(ck, model, *((opt, sched) if same else (None, None)), step, self.gens, self.device, self.path)
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
                     "gen": [g.get_state() for g in self.gens],
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


def resume(ck, model, opt, sched, step, gens, device, path):
    """Load a checkpoint's model, optimiser and schedule (unless None: a new stage's), loss scale and random
    states. The first four load on any device. A data generator's state belongs to its device kind (a CUDA
    generator's cannot be set on the CPU's), so a checkpoint written on another kind re-seeds the generators
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
            for g, state in zip(gens, ck["gen"], strict=True):
                g.set_state(state)
            if device.type == "cuda":
                torch.cuda.set_rng_state(ck["cuda_rng"], device)
        else:
            for g in gens:
                g.manual_seed(g.initial_seed() + 1_000_003 * ck["epoch"])
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
# Files: atomic writes, locks, configs
# =============================================================================

IGNORED = ("data", "out", "device", "compile")  # where and how a run ran does not change what it is


def atomic(write, path):
    """write(temporary name), then rename: a kill never leaves half a file, and a write that fails (a
    full disk) ends in one line with the previous file intact."""
    try:
        write(path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        die(f"cannot write {path} ({reason}); free some disk space and run the same command again "
            f"(the previous {os.path.basename(path)} is kept)")


def save_atomic(obj, path, crc32=True):
    """torch.save, atomically (see atomic). crc32=False: no zip CRC-32 (torch.load does not check it, and it
    is 3/4 of the time of writing a checkpoint: 4.6 s against 1.1 s for 1.9 GB here), for checkpoints."""
    def write(tmp):
        crc = getattr(torch.serialization, "set_crc32_options", None)  # torch >= 2.6
        if crc and not crc32:
            crc(False)
        try:
            torch.save(obj, tmp)
        finally:
            if crc:
                crc(True)
    atomic(write, path)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic(write, path)


_HELD = {}  # run folder -> its open lock file, held until the process ends


def hold(run_dir):
    """Refuse a run folder that another process is training in (e.g. `make -j`, two terminals)."""
    key = os.path.realpath(run_dir)
    if key in _HELD:
        return
    f = open(os.path.join(run_dir, ".lock"), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        die(f"another process is training in {run_dir}; wait for it to finish, or stop it")
    _HELD[key] = f


def file_sha256(path):
    """The sha256 of a file (the teacher's weights: every student and Q2 run records the one it learnt from)."""
    if not os.path.exists(path):
        die(f"missing teacher checkpoint {path}: run `make teacher` first")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path):
    with open(path) as f:
        return json.load(f)


def load_checkpoint(path):
    """A checkpoint read with weights_only=True (it can never run code); a clear error if unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        die(f"cannot read checkpoint {path} ({type(e).__name__}); delete it to start this run over")


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
    disk) and result.json (it marks the run done), then remove its checkpoint: weights + momentum, not
    needed any more."""
    if model is not None:
        state = {k: v.half() if half and v.is_floating_point() else v for k, v in model.state_dict().items()}
        save_atomic(state, os.path.join(run_dir, "model.pt"))
    write_json(os.path.join(run_dir, "result.json"), result)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(run_dir, "checkpoint.pt"))


def md_table(header, rows):
    """A Markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def pct(x):
    return f"{x:.2f}"


# ----------------------------------------------------------------------------- the report's files

def write_tables(out, tables):
    """The report's tables ({name, caption, header, rows: a row ["---"] is a rule, bold: [[row, column]], csv}) as
    out/tables/<name>.md, .tex and, with the per-seed numbers, .csv."""
    tex = dict(zip("\\&%$#_{}~^λ±²·→−×", [r"\textbackslash{}", r"\&", r"\%", r"\$", r"\#", r"\_", r"\{", r"\}",
                                          r"\textasciitilde{}", r"\^{}", r"$\lambda$", r"$\pm$", r"$^2$", r"$\cdot$",
                                          r"$\to$", "-", r"$\times$"]))
    latex = lambda text: re.sub(r"\*\*(.+?)\*\*", r"\\textbf{\1}", "".join(tex.get(c, c) for c in text))  # noqa: E731
    os.makedirs(os.path.join(out, "tables"), exist_ok=True)
    for t in tables:
        rows = [[f"**{c}**" if [i, j] in t.get("bold", []) else c for j, c in enumerate(r)]
                for i, r in enumerate(t["rows"]) if r != ["---"]]
        files = {".md": f"### {t['caption']}\n\n" + md_table(t["header"], rows),
                 ".tex": "\n".join([f"% {t['caption']}", r"\begin{tabular}{" + "l" * len(t["header"]) + "}", r"\toprule",
                                    *[" & ".join(map(latex, r)) + r" \\" for r in [t["header"]]], r"\midrule",
                                    *[" & ".join(map(latex, r)) + r" \\" for r in rows], r"\bottomrule",
                                    r"\end{tabular}", ""])}
        if t["csv"]:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows([t["csv"][0], *t["csv"][1]])
            files[".csv"] = buf.getvalue()
        for ext, text in files.items():
            write_text(os.path.join(out, "tables", t["name"] + ext), text)


def write_text(path, text):
    atomic(lambda tmp: open(tmp, "w", encoding="utf-8").write(text), path)


HEADER = "// Written by make report (report.py); sha256 of what follows: {}\n"


def written(path):
    """Whether the .typ at `path` is as make report wrote it (its header's hash matches), or absent."""
    if not os.path.exists(path):
        return True
    with open(path, encoding="utf-8", errors="replace") as f:
        m = re.fullmatch(HEADER.format("([0-9a-f]{64})").replace("(report.py)", r"\(report\.py\)"), f.readline())
        return bool(m) and hashlib.sha256(f.read().encode()).hexdigest() == m[1]
