"""Shared pieces of q1a_teacher.py, q1b_kd.py and q2_continual.py, in the order data flows:
set-up, data (CIFAR-10, faces, synthetic demo data), models, losses, the one training loop,
checkpoints, plots and tables. Plain functions and tensors; no framework.
"""
import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import http.client
import io
import json
import math
import os
import pickle
import re
import sys
import time
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
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
# Set-up: errors, arguments, device
# =============================================================================


def die(msg):
    """Stop with one line on stderr and exit status 1 (no traceback)."""
    raise SystemExit(f"error: {msg}")


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
    return device


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


# =============================================================================
# Data: CIFAR-10
# =============================================================================

# ImageNet statistics for every input: the teacher starts from ImageNet weights, and the face
# task reuses the teacher's input pipeline (CIFAR-10's own statistics differ by < 0.03).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


CIFAR10 = torchvision.datasets.CIFAR10  # its file names, md5s and download URL; its reader is not used


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


def _read_cifar_batch(path, md5):
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


def load_cifar10(root, device):
    """CIFAR-10 as {'train': (x, y), 'test': (x, y)}: uint8 NCHW images and int64 labels on `device`,
    and 'source': "official" (every batch file is the official one, its md5), "synthetic" (written by
    write_synthetic_cifar: the demo's and the tests') or "other" (real images, not the official files,
    such as the JPEG copy); downloaded into `root` on first use by torchvision (md5-checked archive)."""
    folder = os.path.join(root, CIFAR10.base_folder)
    if not all(os.path.exists(os.path.join(folder, n)) for n, _ in CIFAR10.train_list + CIFAR10.test_list):
        try:
            torchvision.datasets.utils.download_and_extract_archive(CIFAR10.url, root, filename=CIFAR10.filename,
                                                                    md5=CIFAR10.tgz_md5)
        except Exception as e:  # URLError, a truncated or wrong archive
            die(f"CIFAR-10 is not in {folder} and could not be downloaded ({type(e).__name__}: {e}); "
                f"copy cifar-10-python.tar.gz into {root}/ or set DATA=")
    out, sources = {}, set()
    for split, files in (("train", CIFAR10.train_list), ("test", CIFAR10.test_list)):
        parts = [_read_cifar_batch(os.path.join(folder, name), md5) for name, md5 in files]
        x = torch.from_numpy(np.concatenate([p[0] for p in parts])).permute(0, 3, 1, 2).contiguous()
        y = torch.tensor([v for p in parts for v in p[1]], dtype=torch.long)
        out[split] = (x.to(device), y.to(device))
        sources |= {p[2] for p in parts}
    out["source"] = sources.pop() if len(sources) == 1 else "other"
    return out


def augment(x, pad, gen):
    """Random crop with `pad` zero pixels each side, then a horizontal flip with p=0.5, for a whole
    uint8 batch on its device (as torchvision's RandomCrop(size, pad) + RandomHorizontalFlip): two
    gathers, rows then columns; reading a crop's columns backwards is the flip."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device, generator=gen)
    rows = dy + torch.arange(h, device=x.device)
    cols = dx + torch.arange(w, device=x.device)
    flip = torch.rand(n, 1, device=x.device, generator=gen) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    xp = xp.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * pad))
    return xp.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


_NORM = {}  # device -> (scale, bias), made once: a new tensor per batch would be a host-to-GPU copy


def normalize(x):
    """uint8 images -> float (x/255 - mean)/std in one pass, channels_last (faster convolutions on GPU and CPU)."""
    if x.device not in _NORM:
        std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
        _NORM[x.device] = (1 / (255 * std), -torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1) / std)
    scale, bias = _NORM[x.device]
    return torch.addcmul(bias, x.contiguous(memory_format=torch.channels_last), scale)


class Batches:
    """Minibatches of uint8 images held on the device (airbench-style): with `shuffle`, a randperm
    order and no incomplete last batch; with `augment`, crop + flip batched on the device. Yields
    (x, *targets) where targets are per-image tensors (labels, cached teacher logits, ...)."""

    def __init__(self, x, *targets, batch_size, shuffle=False, augment=False, pad=4, gen=None):
        self.x, self.targets, self.batch_size = x, targets, batch_size
        self.shuffle, self.augment, self.pad, self.gen = shuffle, augment, pad, gen

    def __len__(self):
        n = len(self.x)
        return max(1, n // self.batch_size) if self.shuffle else -(-n // self.batch_size)

    def __iter__(self):
        n, bs = len(self.x), self.batch_size
        order = torch.randperm(n, device=self.x.device, generator=self.gen) if self.shuffle else None
        for i in range(len(self)):
            idx = order[i * bs:(i + 1) * bs] if self.shuffle else slice(i * bs, (i + 1) * bs)
            x = self.x[idx]
            if self.augment:
                x = augment(x, self.pad, self.gen)
            yield (normalize(x), *(t[idx] for t in self.targets))


class SeedBatches:
    """Lock-step training batches for several seeds: each seed's own Batches (order and augmentation),
    yielded concatenated so that the teacher sees them all in one forward pass."""

    def __init__(self, parts):
        self.parts = parts

    def __len__(self):
        return len(self.parts[0])

    def __iter__(self):
        for batch in zip(*self.parts):
            yield tuple(torch.cat(t) for t in zip(*batch))


class JointBatches:
    """Each face batch with a CIFAR-10 batch of the same size (a fixed 1:1 ratio), a fresh CIFAR-10 order each epoch."""

    def __init__(self, faces, cifar):
        self.faces, self.cifar = faces, cifar

    def __len__(self):
        return len(self.faces)

    def __iter__(self):
        for (x, y), (xc, yc) in zip(self.faces, self.cifar):
            yield x, y, xc, yc


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


# =============================================================================
# Data: faces (Q2)
# =============================================================================

DIGIFACE_URL = "https://facesyntheticspubwedata.z6.web.core.windows.net/wacv-2023/subjects_0-1999_72_imgs.zip"
_DIGIFACE_MEMBER = re.compile(r"(?:[^/]+/)?(\d{1,7})/(\d{1,4})\.png")  # <identity>/<n>.png, nothing else


def natural_key(name):
    """Sort key that orders 'id2' before 'id10'."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t]


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


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


def _read_subject(folder, size, pool):
    """(path, HxWx3 uint8) for every readable image file of one subject folder, in natural order."""
    paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder), key=natural_key)
             if not f.startswith(".") and os.path.isfile(os.path.join(folder, f))]
    return [(p, im) for p, im in zip(paths, pool.map(lambda p: _read_image(p, size), paths)) if im is not None]


def load_faces(folder, subjects=100, per_subject=50, train_per_subject=40, size=64, seed=0):
    """The face task from an image folder `folder/<subject>/<image>` or a pre-split
    `folder/train/<subject>/...` + `folder/test/<subject>/...`: the first `subjects` subjects (natural
    order) with enough readable images, `per_subject` of them picked with `seed`, `train_per_subject`
    for training and the rest for test. Returns {'train': (x, y), 'test': (x, y)} (uint8 NCHW, CPU),
    'files' (the split's file lists) and 'subjects'."""
    if not os.path.isdir(folder):
        die(f"face folder {folder} does not exist")
    test_per = per_subject - train_per_subject
    presplit = all(os.path.isdir(os.path.join(folder, s)) for s in ("train", "test"))
    top = os.path.join(folder, "train") if presplit else folder
    names = sorted((d for d in os.listdir(top) if os.path.isdir(os.path.join(top, d))), key=natural_key)
    if not names:
        die(f"{top} holds no subject folders (expected {top}/<subject>/<image>)")
    chosen, short = [], []
    with ThreadPoolExecutor(8) as pool:  # PIL decodes outside the GIL
        for name in names:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # per subject: stable
            if presplit:
                tr = _read_subject(os.path.join(folder, "train", name), size, pool)
                te_dir = os.path.join(folder, "test", name)
                te = _read_subject(te_dir, size, pool) if os.path.isdir(te_dir) else []
                if len(tr) < train_per_subject or len(te) < test_per:
                    short.append(f"{name} ({len(tr)} train, {len(te)} test)")
                    continue
                tr = [tr[i] for i in rng.permutation(len(tr))[:train_per_subject]]
                te = [te[i] for i in rng.permutation(len(te))[:test_per]]
            else:
                ims = _read_subject(os.path.join(folder, name), size, pool)
                if len(ims) < per_subject:
                    short.append(f"{name} ({len(ims)})")
                    continue
                ims = [ims[i] for i in rng.permutation(len(ims))[:per_subject]]
                tr, te = ims[:train_per_subject], ims[train_per_subject:]
            chosen.append((name, tr, te))
            if len(chosen) == subjects:
                break
    need = f"{train_per_subject} train + {test_per} test" if presplit else f"{per_subject}"
    if short:
        warn(f"skipped subjects with fewer than {need} readable images: {', '.join(short[:10])}"
             + (f" and {len(short) - 10} more" if len(short) > 10 else ""))
    if len(chosen) < subjects:
        die(f"{folder}: only {len(chosen)} subjects have at least {need} readable images, "
            f"{subjects} are needed (set SUBJECTS= or add images)")
    out = {"subjects": [c[0] for c in chosen], "files": {}}
    for k, split in ((1, "train"), (2, "test")):
        items = [(p, im, label) for label, c in enumerate(chosen) for p, im in c[k]]
        x = torch.from_numpy(np.stack([im for _, im, _ in items])).permute(0, 3, 1, 2).contiguous()
        out[split] = (x, torch.tensor([label for *_, label in items]))
        out["files"][split] = [p for p, _, _ in items]
    return out


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


def write_synthetic_faces(root, subjects=10, per_subject=12, size=40, seed=0):
    """A face-like image folder root/<subject>/<n>.png for tests and the demo: each subject is a
    pattern of its own plus noise, so the task is learnable but not trivial."""
    protos = _prototypes(subjects, size, seed + 100)
    g = torch.Generator().manual_seed(seed + 101)
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
# Models
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


def teacher_resnet18(num_classes=10, pretrained=True):
    """torchvision's ResNet18 for 32x32 inputs: conv1, the max-pool and conv5_1 (3x3 conv and 1x1
    shortcut) get stride 1, so stages run 32-32-32-16-8-8 and the last feature map is 8x8x512;
    same 17 convolutions, kernel sizes, paddings and single max-pool. `fc` is a new 10-way layer."""
    model = torchvision.models.resnet18()
    if pretrained:
        model.load_state_dict(imagenet_weights())
    model.conv1.stride = (1, 1)
    model.maxpool.stride = 1
    model.layer4[0].conv1.stride = (1, 1)
    model.layer4[0].downsample[0].stride = (1, 1)
    model.fc = nn.Linear(512, num_classes)
    return model


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


def stride_changes(size=32):
    """Table rows of what changed from torchvision's resnet18 for a size x size input: every conv or
    pool whose stride/padding differs, then each stage's output (HxWxC), both measured by running them."""
    orig, new = torchvision.models.resnet18(), teacher_resnet18(pretrained=False)
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


def features(model, x):
    """The teacher's last feature map (before average pooling)."""
    m = model
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))


def load_teacher(path, device=None):
    """The trained teacher from its model.pt (weights only), in eval mode."""
    if not os.path.exists(path):
        die(f"missing teacher checkpoint {path}: run `make teacher` first")
    state = load_checkpoint(path)
    model = teacher_resnet18(pretrained=False)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        die(f"{path} is not a checkpoint of this ResNet18 teacher ({str(e).splitlines()[0]})")
    return model.to(device or "cpu").eval()


class StudentCNN(nn.Module):
    """The assignment's student: conv 5x5/32, 3x3/64, 3x3/128 (stride 1, pad 1, ReLU), each followed by
    a 2x2 max-pool with stride 1, then FC 500 (ReLU) and FC 10. The stride-1 pools keep 27x27x128 =
    93,312 features, so the first FC holds 46.7M of the 46,756,294 weights. Options carried over from
    the teacher: BatchNorm after each conv, dropout before the last FC."""

    def __init__(self, bn=False, dropout=0.0):
        super().__init__()
        layers, cin = [], 3
        for cout, k in ((32, 5), (64, 3), (128, 3)):
            layers += [nn.Conv2d(cin, cout, k, stride=1, padding=1), *([nn.BatchNorm2d(cout)] if bn else []),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2, stride=1, padding=0)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(27 * 27 * 128, 500), nn.ReLU(inplace=True),
                                        nn.Dropout(dropout), nn.Linear(500, 10))

    def forward(self, x):
        # flattened in (h, w, c) order: the same 93,312 features, read in the order they lie in memory
        # (a (c, h, w) flatten copies them, and its gradient slows the pools' backward by 30% on the CPU)
        return self.classifier(self.features(x).permute(0, 2, 3, 1).flatten(1))


def student_groups(students, lr, fc1_rate):
    """Parameter groups of students (a StudentCNN or a lock-step group): the first FC (93,312 inputs,
    46.7M weights) at `fc1_rate` times `lr`, every other layer at `lr`."""
    fc1 = {id(q) for m in (students if isinstance(students, nn.ModuleList) else [students])
           for q in m.classifier[0].parameters()}
    return [{"params": [q for q in students.parameters() if id(q) not in fc1], "lr": lr},
            {"params": [q for q in students.parameters() if id(q) in fc1], "lr": lr * fc1_rate}]


class Students(nn.ModuleList):
    """Students trained in lock-step on the same batches: forward returns their logits stacked (K, B, 10).
    `stopped`: the indices of students that diverged, which the group's loss no longer runs."""
    stopped = frozenset()

    def forward(self, x):
        return torch.stack([m(x) for m in self])


class ContinualNet(nn.Module):
    """The teacher's backbone shared by two heads: `old` (its 10-way fc, CIFAR-10) and `new` (faces).
    Returns (old logits, new logits). A BatchNorm layer updates its running statistics only when its
    weights are trained and `adapt_bn` is set; frozen layers always run in eval mode."""

    def __init__(self, teacher, new_classes, adapt_bn=False):
        super().__init__()
        self.old, self.adapt_bn = teacher.fc, adapt_bn
        teacher.fc = nn.Identity()
        self.backbone, self.new = teacher, nn.Linear(self.old.in_features, new_classes)

    def forward(self, x):
        f = self.backbone(x)
        return self.old(f), self.new(f)

    def old_task_parameters(self):
        """The backbone and the old head: every weight the old task's output depends on."""
        return [*self.backbone.parameters(), *self.old.parameters()]

    def train(self, mode=True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train(mode and self.adapt_bn and m.weight.requires_grad)
        return self


# =============================================================================
# Losses
# =============================================================================


def soft_targets(teacher_logits, T):
    """The teacher's soft targets at temperature T: softmax(t/T) (Hinton et al. 2015; T = 1: its own output)."""
    return F.softmax(teacher_logits.float() / T, dim=-1)


def soft_cross_entropy(logits, target_logits, T=1.0):
    """Cross-entropy between softmax(target_logits/T) and softmax(logits/T), summed over classes and
    averaged over the batch (no T^2 here)."""
    return -(soft_targets(target_logits, T) * F.log_softmax(logits.float() / T, dim=-1)).sum(-1).mean()


def soft_target_summary(teacher_logits, labels, temperatures):
    """What the soft targets hold at each T, over a set of images: the mean probability of the teacher's
    top class and of the true class, the mean entropy as a fraction of the uniform distribution's, and
    the first image's targets (for the report)."""
    out = {"label": int(labels[0])}
    for T in temperatures:
        p = soft_targets(teacher_logits, T)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(p.shape[-1])
        out[f"{T:g}"] = {"top": p.max(-1).values.mean().item(), "true": p.gather(1, labels.view(-1, 1)).mean().item(),
                         "entropy": entropy.mean().item(), "example": p[0].tolist()}
    return out


def kd_loss(student_logits, teacher_logits, labels, T, lam, kl=False):
    """lam * T^2 * soft CE + (1 - lam) * hard CE (Hinton et al. 2015): lam weights the soft targets;
    T^2 keeps the soft-target gradients comparable across T. kl=True: the soft term minus the
    teacher's entropy, i.e. KL(teacher || student): the same gradients, and 0 when the student
    matches the teacher (so its curve moves; the CE form sits near T^2 * H(teacher))."""
    if not T > 0 or not 0 <= lam <= 1:
        raise ValueError(f"need T > 0 and 0 <= lam <= 1, got T={T}, lam={lam}")
    hard = F.cross_entropy(student_logits.float(), labels)
    soft = soft_cross_entropy(student_logits, teacher_logits, T)
    if kl:
        soft = soft - soft_cross_entropy(teacher_logits, teacher_logits, T)
    return lam * T * T * soft + (1 - lam) * hard


def cross_entropy(model, x, y, label_smoothing=0.0):
    """The classification loss as a loss function of the training loop: (loss, logits)."""
    logits = model(x)
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing), logits


def distill_loss(teacher, specs, chunks=1, kl=True):
    """The loss function of a lock-step group: each student's kd_loss at its own (T, lam), stacked.
    specs = [(T, lam, c)]: in training, student k learns from chunk c of the `chunks` seed batches.
    Evaluation batches bring the teacher's cached logits `t` and serve every student; a training batch
    gets them from one teacher forward pass (eval mode, no gradient) on exactly the augmented images the
    students see. kl=True: the KL form of the soft term (same gradients, a curve that moves). A student
    in `students.stopped` (diverged) is not run: its loss and logits are NaN."""
    def loss(students, x, y, t=None):
        if t is None:
            with torch.no_grad():
                t = teacher(x)
        n = chunks if students.training else 1
        xs, ys, ts = x.chunk(n), y.chunk(n), t.chunk(n)
        losses, logits = [], []
        for k, (m, (T, lam, c)) in enumerate(zip(students, specs)):
            c = c if students.training else 0
            s = m(xs[c]).float() if k not in students.stopped else ts[c].float().new_full(ts[c].shape, math.nan)
            losses.append(kd_loss(s, ts[c], ys[c], T, lam, kl=kl))
            logits.append(s)
        return torch.stack(losses), torch.stack(logits)
    return loss


def old_task(net, x, y):
    """The old head's CIFAR-10 loss: a loss function of the training loop."""
    old = net(x)[0]
    return F.cross_entropy(old.float(), y), old


def new_task(net, x, y):
    """The new head's face-recognition loss (feature extraction, fine-tuning)."""
    new = net(x)[1]
    return F.cross_entropy(new.float(), y), new


def trains_old_task(net):
    """Whether a weight the old task depends on is trained now (not in LwF's and joint training's warm-up)."""
    return any(q.requires_grad for q in net.old_task_parameters())


def lwf_loss(original, T, lambda_o):
    """LwF (Li & Hoiem, eq. 2-3): CE(new) + lambda_o * CE(softmax(y_o/T), softmax(old/T)), where y_o is
    the ORIGINAL network's old-task output on the same batch (no T^2 factor, as in the paper). In the
    warm-up the old-task term reaches no trained weight, so neither it nor the original is computed."""
    def loss(net, x, y, y_o=None):
        old, new = net(x)
        ce = F.cross_entropy(new.float(), y)
        if net.training and not trains_old_task(net):
            return ce, new
        if y_o is None:  # a training batch: the frozen original sees the same augmented images
            with torch.no_grad():
                y_o = original(x)
        return ce + lambda_o * soft_cross_entropy(old, y_o, T), new
    return loss


def joint_loss(net, x, y, x_old=None, y_old=None):
    """Joint training: CE(new head, faces) + CE(old head, CIFAR-10), each task on its own head; evaluation
    batches (faces only) measure the new task. In the warm-up the CIFAR-10 batch reaches no trained
    weight, so it is not run (it is still drawn: the data order of the later epochs stays the same)."""
    new = net(x)[1]
    loss = F.cross_entropy(new.float(), y)
    if x_old is not None and trains_old_task(net):
        loss = loss + F.cross_entropy(net(x_old)[0].float(), y_old)
    return loss, new


# =============================================================================
# Training loop
# =============================================================================


def group_size(args, device):
    """Students per lock-step group, the KD table's and the sweep's: GROUP, or as many as fit 80% of the
    free GPU memory, measured with one training step of 1 and of 2 students at the batch size and
    precision (10 on the CPU). Kept in out/kd/group.json, so that a rerun makes the same groups."""
    path = os.path.join(args.out, "kd", "group.json")
    if args.group:
        return args.group
    if os.path.exists(path):
        return read_json(path)["group"]
    if device.type != "cuda":
        return 10
    one, two = (student_memory(k, args.batch, args.bn, args.precision, device) for k in (1, 2))
    free = torch.cuda.mem_get_info(device)[0]
    size = fit_group(free, one, two)
    write_json(path, {"group": size, "free_bytes": free, "one": one, "two": two})
    print(f"lock-step groups of up to {size} students ({(two - one) / 1e9:.2f} GB each, measured; "
          f"{free / 1e9:.1f} GB free)")
    return size


def student_memory(k, batch, bn, precision, device):
    """Peak GPU bytes of one training step of k students in lock-step (weights, gradients, momentum, activations)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    students = Students([StudentCNN(bn=bool(bn)) for _ in range(k)]).to(device, memory_format=torch.channels_last)
    x = torch.zeros(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    with autocast(device, precision):
        students(x).float().sum().backward()
    sgd(students.parameters(), 0.0).step()
    del students
    return torch.cuda.max_memory_allocated(device) - base


def fit_group(free, one, two, margin=0.8):
    """How many students fit `margin` of `free` bytes when 1 student takes `one` and 2 take `two`."""
    per = max(1, two - one)
    return max(1, int((margin * free - (one - per)) / per))


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


def sgd(groups, lr, momentum=0.9, weight_decay=5e-4):
    """SGD with Nesterov momentum over parameter groups (each may carry its own lr); the fused
    kernel where this torch has it (one pass over the weights: 10x faster on the CPU)."""
    groups, kw = list(groups), dict(lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    try:
        return torch.optim.SGD(groups, fused=True, **kw)
    except (TypeError, RuntimeError):
        return torch.optim.SGD(groups, **kw)


def warmup_cosine(opt, total_steps, warmup_steps, restart=0):
    """Per-step schedule: linear warm-up to each group's lr, then cosine decay to zero. `restart` > 0: two
    stages, each its own cosine from the full rate to zero (LwF: steps before `restart`, its warm-up,
    and the joint stage after it)."""
    def factor(step):
        if restart:
            start, length = (0, restart) if step < restart else (restart, total_steps - restart)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - start) / max(1, length))))
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _num(t):
    return t.tolist() if t.ndim else t.item()


@torch.no_grad()
def evaluate(model, loss_fn, data, ce=False, precision="fp32"):
    """Mean loss and accuracy (%) of `model` in eval mode over `data`, and with `ce` the cross-entropy of
    its logits with the labels, from the same pass; lists for a lock-step group."""
    model.eval()
    loss_sum = correct = ce_sum = n = 0
    for x, y, *rest in data:
        with autocast(x.device, precision):
            loss, logits = loss_fn(model, x, y, *rest)
        loss_sum = loss_sum + loss.float() * len(y)
        correct = correct + (logits.argmax(-1) == y).sum(-1)
        if ce:  # per student of a group: logits (K, B, C)
            ce_sum = ce_sum + F.cross_entropy(logits.float().movedim(-1, 1), y.expand(logits.shape[:-1]),
                                              reduction="none").sum(-1)
        n += len(y)
    return (_num(loss_sum / n), _num(100.0 * correct / n)) + ((_num(ce_sum / n),) if ce else ())


@torch.no_grad()
def predict(model, data, precision="fp32"):
    """Logits (float32) of `model` in eval mode over `data`, in order."""
    model.eval()
    out = []
    for x, *_ in data:
        with autocast(x.device, precision):
            out.append(model(x).float())
    return torch.cat(out)


class LossScaler:
    """fp16 loss scaling as torch.amp.GradScaler does it (the scale halves and the step is skipped when a
    gradient overflows, and doubles after 2000 steps without), but with one scale per student of a
    lock-step group: one student's overflow skips that student's step alone, not its partners'.
    Does nothing unless enabled (fp16)."""

    def __init__(self, parts, enabled, scale=2.0 ** 16, interval=2000):
        self.parts, self.enabled, self.interval = parts, enabled, interval
        device = next(parts[0].parameters()).device
        self.scale = torch.full((len(parts),), scale if enabled else 1.0, device=device)
        self.good = torch.zeros(len(parts), device=device)

    def __call__(self, loss):
        """The loss of each student, times its scale."""
        return loss * self.scale if self.enabled else loss

    def unscale_(self):
        """Divide each student's gradients by its scale; a student whose gradients overflowed gets none
        (so the optimiser skips it, momentum and weight decay included) and half the scale."""
        if not self.enabled:
            return
        found = torch.zeros(len(self.parts), device=self.scale.device)
        inv = 1.0 / self.scale
        for k, part in enumerate(self.parts):
            grads = [q.grad for q in part.parameters() if q.grad is not None]
            if grads:
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found[k:k + 1], inv[k:k + 1])
        for k in found.nonzero().view(-1).tolist():  # the one host sync of an fp16 step
            for q in self.parts[k].parameters():
                q.grad = None
        self.good = torch.where(found > 0, 0, self.good + 1)
        grow = self.good >= self.interval
        self.scale = torch.where(found > 0, self.scale / 2, torch.where(grow, self.scale * 2, self.scale))
        self.good = torch.where(grow, 0, self.good)

    def state_dict(self):
        return {"scale": self.scale, "good": self.good}

    def load_state_dict(self, state):
        self.scale, self.good = state["scale"].to(self.scale.device), state["good"].to(self.scale.device)


def train_epoch(model, loss_fn, opt, sched, data, desc="", clip=0.0, log=None, precision="fp32", scaler=None):
    """One pass of SGD steps over `data`. Returns, per loss (one per student of a lock-step group), the
    first step at which that student diverged (0 if none), checked on the device so the loop never
    waits for the GPU. Diverged: its loss was not finite (fp32, bf16), or, under fp16 loss scaling, its
    loss or gradients overflowed so often that its scale fell below 1 (one overflow only skips a step
    and halves the scale, as GradScaler does). A diverged student's gradients are zeroed from that step
    to the end of the epoch, so no NaN reaches its weights and its partners' gradients stay their own.
    `clip` > 0 clips each student's gradient norm to it; `log` (a list) receives every step's losses;
    `scaler`: fp16 loss scaling (see LossScaler)."""
    model.train()
    bad = None
    parts = list(model) if isinstance(model, Students) else [model]
    scaler = scaler or LossScaler(parts, precision == "fp16")
    for step, (x, *ys) in enumerate(tqdm(data, desc=desc, leave=False, disable=None), 1):
        with autocast(x.device, precision):
            loss, _ = loss_fn(model, x, *ys)
        if log is not None:
            log.append(loss.detach().float().view(-1))
        ok = torch.isfinite(loss)
        opt.zero_grad(set_to_none=True)
        # a group: the sum's gradient is each student's own gradient
        (scaler(loss) if scaler.enabled else torch.where(ok, loss, 0)).sum().backward()
        scaler.unscale_()  # fp16: a student whose gradients overflowed gets none (its step is skipped)
        this = (scaler.scale < 1 if scaler.enabled else ~ok).long().view(-1) * step
        if bad is None:  # a student stopped in an earlier epoch counts as diverged from the first step
            this = torch.where(torch.tensor([k in getattr(model, "stopped", ()) for k in range(len(this))],
                                            device=this.device), 1, this)
        bad = this if bad is None else torch.where(bad > 0, bad, this)
        alive = bad == 0
        for k, part in enumerate(parts):  # 0 * inf in a diverged student's backward pass is NaN: zero it
            for q in part.parameters():
                if q.grad is not None:
                    q.grad.masked_fill_(~alive[k], 0)
        if clip:
            for part in parts:
                nn.utils.clip_grad_norm_(part.parameters(), clip)
        opt.step()
        sched.step()
    return [0] if bad is None else bad.tolist()


def fit(model, loss_fn, opt, sched, train, evals, epochs, run_dir, config, gen, extra=None, on_epoch=None,
        group=False, clip=0.0, final_only=(), ckpt_every=1, ce=(), precision="fp32"):
    """Train for `epochs`, then after each epoch evaluate on `evals` ({'train': ..., 'test': ...}, the
    same loss function, eval mode, un-augmented), add `extra(model, epoch)`'s metrics, print a row and
    write an atomic checkpoint. Resumes from run_dir/checkpoint.pt (refusing a changed config), also
    one written on another device; returns the history, one dict per epoch. `on_epoch(epoch)` runs
    before each epoch (e.g. to unfreeze layers). A non-finite loss stops the run; in a lock-step
    `group`, only the student whose loss it was: its rows record `diverged_at` (the step, per student),
    it leaves the group's passes from the next epoch on, and the group stops when none is left.
    `final_only`: splits of `evals` measured at the last epoch only (their rows hold None before); `ce`:
    splits whose cross-entropy with the labels is recorded too (`<split>_ce`), from the same pass.
    `ckpt_every`: checkpoint every k epochs; 0: k chosen after the first write so that writes take under
    5% of the training time. None after the last epoch: the caller finishes the run at once, which would
    remove it. The last checkpoint written resumes. `precision`: fp32, bf16 or fp16 autocast."""
    gens = gen if isinstance(gen, (list, tuple)) else [gen]  # the data generators (one per seed of a group)
    device = next(model.parameters()).device
    scaler = LossScaler(list(model) if isinstance(model, Students) else [model], precision == "fp16")
    os.makedirs(run_dir, exist_ok=True)
    hold(run_dir)
    path = os.path.join(run_dir, "checkpoint.pt")
    history = []
    if os.path.exists(path):
        ck = load_checkpoint(path)
        check_config(ck.get("config"), config, run_dir)
        history = ck["history"]
        resume(ck, model, opt, sched, scaler, gens, device, path)
        print(f"resuming {run_dir} after epoch {ck['epoch']}/{epochs}")
    else:
        write_json(os.path.join(run_dir, "config.json"), config)
    dead, every, measure = diverged(history), ckpt_every or 1, not ckpt_every
    for epoch in range(len(history) + 1, epochs + 1):
        if dead and len(dead) == len(history[-1]["diverged_at"]):
            break  # every student of the group has diverged
        if group:
            model.stopped = frozenset(dead)
        t0 = time.time()
        if on_epoch:
            on_epoch(epoch)
        bad = train_epoch(model, loss_fn, opt, sched, train, desc=f"epoch {epoch}/{epochs}", clip=clip,
                          precision=precision, scaler=scaler)
        if any(bad) and not group:
            die(f"loss is not finite at epoch {epoch}, step {max(bad)} of {run_dir}; lower the learning rate "
                f"(the checkpoint of epoch {epoch - 1} is kept)")
        row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"]}
        for split, data in evals.items():
            skip = split in final_only and epoch < epochs
            row[f"{split}_loss"], row[f"{split}_acc"], *more = (None, None) if skip else evaluate(
                model, loss_fn, data, ce=split in ce, precision=precision)
            row.update({f"{split}_ce": more[0]} if more else {})
        row.update(extra(model, epoch) if extra else {})
        row["seconds"] = round(time.time() - t0, 2)
        if group:
            row["diverged_at"] = bad
            for k, step in enumerate(bad):
                if step and k not in dead:
                    warn(f"student {k + 1} of {len(bad)} in {run_dir}: loss not finite at epoch {epoch}, step {step}; "
                         "it stops, its partners go on")
        history.append(row)
        dead = diverged(history)
        if epoch < epochs and (epoch % every == 0 or measure and not os.path.exists(path)):
            t1 = time.time()
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch, "history": history, "config": config,
                     "device": str(device), "rng": torch.get_rng_state(), "gen": [g.get_state() for g in gens],
                     "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
            save_atomic(state, path, crc32=False)
            if measure:  # writes under 5% of the time: every k epochs
                every, measure = max(1, math.ceil((time.time() - t1) / (0.05 * max(1e-9, t1 - t0)))), False
                print(f"checkpoint written in {time.time() - t1:.1f}s, epoch in {t1 - t0:.1f}s: every {every} epoch(s)")
        write_json(os.path.join(run_dir, "history.json"), history)
        print_row(row, epochs, history)
    return history


def resume(ck, model, opt, sched, scaler, gens, device, path):
    """Load a checkpoint's model, optimiser, schedule, loss scale and random states. The first four load
    on any device. A data generator's state belongs to its device kind (a CUDA generator's cannot be
    set on the CPU's), so a checkpoint written on another kind re-seeds the generators from the seed
    and the epoch, and says so: the later epochs then draw another data order and augmentation than an
    uninterrupted run, and the history is no longer the same as that run's."""
    try:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        scaler.load_state_dict(ck["scaler"])
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


def diverged(history):
    """{student index: (epoch, step)} of the first non-finite loss of each student of a lock-step group."""
    out = {}
    for row in history:
        for k, step in enumerate(row.get("diverged_at", [])):
            if step and k not in out:
                out[k] = (row["epoch"], step)
    return out


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
# Checkpoints and run folders
# =============================================================================

IGNORED = ("data", "out", "device", "compile")  # where and how a run ran does not change what it is


def _atomic(write, path):
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
    """torch.save, atomically (see _atomic). crc32=False: no zip CRC-32 (torch.load does not check it, and it
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
    _atomic(write, path)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    _atomic(write, path)


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


def finish(run_dir, model, history, result, title, loss_label=None, half=False):
    """Write a finished run's final weights (none for a diverged model; with `half`, in float16: half
    the disk), curves and result.json (it marks the run done), then remove its checkpoint: weights +
    momentum, not needed any more."""
    if model is not None:
        state = {k: v.half() if half and v.is_floating_point() else v for k, v in model.state_dict().items()}
        save_atomic(state, os.path.join(run_dir, "model.pt"))
    plot_curves([history], os.path.join(run_dir, "curves.png"), title, loss_label or "loss")
    write_json(os.path.join(run_dir, "result.json"), result)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(run_dir, "checkpoint.pt"))


# =============================================================================
# Plots and tables
# =============================================================================


def pyplot():
    """matplotlib's pyplot, imported on first use (a process that plots nothing saves a second), files only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _band(ax, x, ys, label, **kw):
    """The mean of the seeds' curves `ys`, with a band of +- one standard deviation when there are several."""
    y = np.array(ys, dtype=float)
    mean = y.mean(0)
    line = ax.plot(x, mean, marker="o", ms=3, label=label + (f" (mean of {len(y)} seeds)" if len(y) > 1 else ""), **kw)
    if len(y) > 1:
        sd = y.std(0, ddof=1)
        ax.fill_between(x, mean - sd, mean + sd, color=line[0].get_color(), alpha=0.2, lw=0)


def curve_axes(axes, histories, loss_label="loss", acc_splits=("train", "test"), titles=("(a) loss", "(b) accuracy")):
    """A run's loss (training and test) and accuracy against epoch on two axes; several histories (its seeds):
    their mean with a band of +- one standard deviation."""
    from matplotlib.ticker import MaxNLocator
    epochs = [r["epoch"] for r in histories[0]]
    for ax, metric, splits, title in zip(axes, ("loss", "acc"), (("train", "test"), acc_splits), titles):
        for split in splits:
            _band(ax, epochs, [[r[f"{split}_{metric}"] for r in h] for h in histories], split)
        ax.set(xlabel="epoch", ylabel=loss_label if metric == "loss" else "accuracy (%)", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def plot_curves(histories, path, title, loss_label="loss"):
    """A run's curves.png: loss and accuracy against epoch, side by side."""
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.2))
    curve_axes(axes, histories, loss_label)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def md_table(header, rows):
    """A Markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def pct(x):
    return f"{x:.2f}"
