"""Reading and writing files, safely: CIFAR-10's download and batch files (never unpickled unless official), the
synthetic demo data, face images and DigiFace-1M's range-request download, atomic writes, locks and checkpoints, and
the report's table files. Nothing here is part of the assignment; the scripts reach it through machinery (M.<name>).
"""
import ast
import contextlib
import csv
import fcntl
import hashlib
import http.client
import inspect
import io
import json
import os
import pickle
import re
import sys
import textwrap
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


def die(msg):
    """Stop with one line on stderr and exit status 1 (no traceback)."""
    raise SystemExit(f"error: {msg}")


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)



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
# Files: atomic writes, locks, configs
# =============================================================================



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
    """torch.save, atomically (see atomic). crc32=False, for checkpoints: no zip CRC-32, which torch.load
    does not check and which is most of the time of writing one (docs/design.md, "Speed")."""
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


def md_table(header, rows):
    """A Markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def pct(x):
    return f"{x:.2f}"


def signed(x):  # '+2.3', '−0.7': a difference with its sign, a true minus
    return f"{x:+.1f}".replace("-", "−")


# ----------------------------------------------------------------------------- the report's files

def listing(caption, *objects):
    """Where the source of functions or classes lies, for report.typ to read(): {caption, parts: [{file, spans}]},
    docstrings left out (the text around the listing says what they would); (obj, text): its def line, then from
    the first line holding `text` on."""
    parts = []
    for obj, start in (o if isinstance(o, tuple) else (o, "") for o in objects):
        lines, first = inspect.getsourcelines(obj)
        doc = {first + n - 1 for node in ast.walk(ast.parse(textwrap.dedent("".join(lines))))
               if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node)
               for n in range(node.body[0].lineno, node.body[0].end_lineno + 1)}
        doc |= set(range(first + 1, first + next(i for i, line in enumerate(lines) if start in line))) if start else set()
        keep = [n for n in range(first, first + len(lines)) if n not in doc]
        starts = [n for n in keep if n - 1 not in keep]
        parts.append({"file": os.path.basename(inspect.getsourcefile(obj)),
                      "spans": [[a, next(n for n in keep[keep.index(a):] if n + 1 not in keep)] for a in starts]})
    return {"caption": f"{caption} ({', '.join(dict.fromkeys(p['file'] for p in parts))})", "parts": parts}


def table(name, caption, header, rows, widths=None, csv_rows=None, bold=()):
    """A table of report.json, written to out/tables/<name>.{md,tex,csv} too. A row ["---"] is a rule."""
    return {"name": name, "caption": caption, "header": header, "rows": rows, "widths": widths, "csv": csv_rows,
            "bold": [list(b) for b in bold]}


def tables_in(d):
    """Every table of report.json, in document order."""
    if isinstance(d, dict):
        return [d] if "header" in d and "rows" in d else [t for v in d.values() for t in tables_in(v)]
    return [t for v in d for t in tables_in(v)] if isinstance(d, list) else []


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
