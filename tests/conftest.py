import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import machinery  # noqa: E402
import q1a_teacher  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test reaches the internet: every download goes to a proxy that refuses at once (the local
    test server on 127.0.0.1 stays reachable), and torchvision's weight cache starts empty."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """A small synthetic CIFAR-10 in the real cifar-10-batches-py format."""
    root = str(tmp_path_factory.mktemp("cifar"))
    machinery.write_synthetic_cifar(root, n_train=60, n_test=30)
    return root


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory):
    """A tinier one (20 + 10 images), for the tests that start a script as a process and stop it."""
    root = str(tmp_path_factory.mktemp("tiny_cifar"))
    machinery.write_synthetic_cifar(root, n_train=20, n_test=10)
    return root


@pytest.fixture(scope="session")
def faces_root(tmp_path_factory):
    """A synthetic face folder: 6 subjects x 12 images of 24x24."""
    root = str(tmp_path_factory.mktemp("faces"))
    machinery.write_synthetic_faces(root, subjects=6, per_subject=12, size=24)
    return root


@pytest.fixture(scope="session")
def teacher_out(tmp_path_factory, cifar_root):
    """A finished teacher run (random weights, 1 epoch): copy it before changing anything in it."""
    out = str(tmp_path_factory.mktemp("teacher_out"))
    q1a_teacher.main(["--data", cifar_root, "--out", out, "--pretrained", "0", "--epochs", "1", "--batch", "20",
                      "--lr", "0.01", "--warmup", "0", "--device", "cpu"])
    return out


_DEMO = {}
# the Makefile's variables (PYTHON, OUT, ...): make puts those given on its command line into its recipes' environment
MAKE_VARS = set(re.findall(r"^([A-Z_0-9]+) +\?=", open(os.path.join(ROOT, "Makefile")).read(), re.M))


def as_a_user(env):
    """The environment of a make started by hand: without the MAKEFLAGS, MFLAGS and MAKELEVEL of the `make test` that
    runs this suite, nor the variables it was given (`make test PYTHON=python3` hands its PYTHON to every make started
    here, in MAKEFLAGS and in the environment both)."""
    return {k: v for k, v in env.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"} | MAKE_VARS}


def pytest_collection_modifyitems(config, items):
    """`make demo` starts as soon as a collected test reads its outputs, in the background, and those tests go
    last: on 2 cores the demo runs beside the tests of small models (half of whose time is Python, not
    arithmetic), and the `demo` fixture waits for it. Offline, as every test: no proxy reaches out."""
    if not any("demo" in getattr(item, "fixturenames", ()) for item in items):
        return
    items.sort(key=lambda item: "demo" in getattr(item, "fixturenames", ()))  # stable: the order otherwise kept
    _DEMO["threads"] = torch.get_num_threads()
    torch.set_num_threads(1)  # one core for the tests (and the scripts they start), one for make demo, until it ends
    os.environ["OMP_NUM_THREADS"] = "1"
    root = tempfile.mkdtemp(prefix="pytest-demo-")
    env = dict(as_a_user(os.environ), OMP_NUM_THREADS="1", http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", no_proxy="127.0.0.1",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", TORCH_HOME=f"{root}/torch_home")
    log = open(f"{root}/make.log", "w")
    _DEMO.update(root=root, folder=f"{root}/demo", log=log, proc=subprocess.Popen(
        ["make", "--no-print-directory", "demo", f"DEMO={root}/demo", f"PYTHON={sys.executable}"], cwd=ROOT,
        stdout=log, stderr=subprocess.STDOUT, text=True, env=env))


def pytest_runtest_setup(item):
    if _DEMO.get("threads") and _DEMO["proc"].poll() is not None:  # make demo is over: both cores for the tests
        torch.set_num_threads(_DEMO.pop("threads"))
        os.environ.pop("OMP_NUM_THREADS")


def pytest_sessionfinish(session, exitstatus):
    if _DEMO:
        _DEMO["proc"].kill()
        _DEMO["proc"].wait()
        if exitstatus == 0:
            shutil.rmtree(_DEMO["root"], ignore_errors=True)


@pytest.fixture(scope="session")
def demo():
    """`make demo`, run once for every test that reads its outputs: (its folder, the finished process with
    its output as .stdout)."""
    proc = _DEMO["proc"]
    proc.wait()
    _DEMO["log"].close()
    proc.stdout = open(os.path.join(_DEMO["root"], "make.log")).read()
    assert proc.returncode == 0, proc.stdout[-5000:]
    return pathlib.Path(_DEMO["folder"]), proc


class SmallStudent(torch.nn.Module):
    """Stands in for the 46.7M-weight StudentCNN where a test is about how students train (groups, seeds,
    divergence, teachers), not what they are: the same constructor, 10 logits for a 32x32 image."""

    def __init__(self, bn=False, dropout=0.0):
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *([nn.BatchNorm2d(8)] if bn else []), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(4))
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(128, 10))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


@pytest.fixture
def small_students(monkeypatch):
    import q1b_kd
    monkeypatch.setattr(q1b_kd, "StudentCNN", SmallStudent)


def one_line_error(excinfo, *fragments):
    """The SystemExit of a bad input: one line, 'error: ...', naming what is wrong."""
    msg = str(excinfo.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def pdf_text(path):
    """The text of each page of a PDF (pypdf: CI has no pdftotext), its page number (the last line) left out,
    non-breaking spaces as spaces, Typst's minus signs as hyphens and math italics (𝑇, 𝜆) as letters (T, λ)."""
    import re
    import unicodedata
    import pypdf
    letters = lambda m: unicodedata.normalize("NFKC", m.group())  # noqa: E731
    return [re.sub("[\U0001D400-\U0001D7FF]", letters, re.sub(r"\n\d+\s*$", "", page.extract_text()))
            .replace("\xa0", " ").replace("\u2212", "-") for page in pypdf.PdfReader(path).pages]


def appendix_page(out):
    """The page the code appendix starts on, as the compiled report.typ itself says (its metadata)."""
    import typst
    return json.loads(typst.query(os.path.join(out, "report.typ"), "<appendix-page>", field="value", root=str(out)))[0]
