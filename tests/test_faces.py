import io
import os
import re
import shutil
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from common import fetch_digiface, load_faces, write_synthetic_faces
from conftest import one_line_error


def test_split_counts_are_disjoint_and_deterministic(faces_root):
    a = load_faces(faces_root, subjects=5, per_subject=10, train_per_subject=8, size=16, seed=0)
    assert a["subjects"] == [f"person_{i:03d}" for i in range(5)]  # the first 5 in sorted order
    assert a["train"][0].shape == (40, 3, 16, 16) and a["test"][0].shape == (10, 3, 16, 16)
    assert np.bincount(a["train"][1].numpy()).tolist() == [8] * 5 and np.bincount(a["test"][1].numpy()).tolist() == [2] * 5
    assert not set(a["files"]["train"]) & set(a["files"]["test"])
    for label, subject in enumerate(a["subjects"]):  # every image is filed under its own subject
        assert all(f"{os.sep}{subject}{os.sep}" in f for f, y in zip(a["files"]["train"], a["train"][1]) if y == label)
    b = load_faces(faces_root, subjects=5, per_subject=10, train_per_subject=8, size=16, seed=0)
    assert a["files"] == b["files"]
    c = load_faces(faces_root, subjects=5, per_subject=10, train_per_subject=8, size=16, seed=1)
    assert c["files"] != a["files"]


def test_subjects_are_in_natural_order(tmp_path):
    for name in ("s10", "s2", "s1"):
        write_synthetic_faces(str(tmp_path / "tmp"), subjects=1, per_subject=3, size=8)
        shutil.move(str(tmp_path / "tmp" / "person_000"), str(tmp_path / name))
    assert load_faces(str(tmp_path), subjects=2, per_subject=3, train_per_subject=2, size=8)["subjects"] == ["s1", "s2"]


def test_pre_split_layout(tmp_path):
    for split, n in (("train", 9), ("test", 3)):
        write_synthetic_faces(str(tmp_path / split), subjects=3, per_subject=n, size=12)
    f = load_faces(str(tmp_path), subjects=3, per_subject=10, train_per_subject=8, size=12)
    assert len(f["files"]["train"]) == 24 and len(f["files"]["test"]) == 6
    assert all(f"{os.sep}train{os.sep}" in p for p in f["files"]["train"])
    assert all(f"{os.sep}test{os.sep}" in p for p in f["files"]["test"])


def test_too_few_subjects_is_one_clear_line(faces_root):
    with pytest.raises(SystemExit) as e:
        load_faces(faces_root, subjects=100, per_subject=10, train_per_subject=8, size=16)
    one_line_error(e, "only 6 subjects", "100 are needed", faces_root)


def test_a_short_subject_is_skipped_and_named(tmp_path, capsys):
    write_synthetic_faces(str(tmp_path), subjects=6, per_subject=12, size=12)
    for i in range(4, 12):
        os.remove(tmp_path / "person_001" / f"{i}.png")
    f = load_faces(str(tmp_path), subjects=5, per_subject=10, train_per_subject=8, size=12)
    assert "person_001" not in f["subjects"] and len(f["subjects"]) == 5
    assert "person_001 (4)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        load_faces(str(tmp_path), subjects=6, per_subject=10, train_per_subject=8, size=12)
    one_line_error(e, "only 5 subjects")


def test_unreadable_images_are_skipped_with_a_warning_naming_them(tmp_path, capsys):
    write_synthetic_faces(str(tmp_path), subjects=2, per_subject=11, size=12)
    bad = tmp_path / "person_000" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    f = load_faces(str(tmp_path), subjects=2, per_subject=10, train_per_subject=8, size=12)
    assert str(bad) in capsys.readouterr().err and str(bad) not in f["files"]["train"] + f["files"]["test"]


def test_missing_face_folder_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        load_faces(str(tmp_path / "nope"))
    one_line_error(e, "does not exist", "nope")


# ----------------------------------------------------------------------------- DigiFace over HTTP

class RangeServer:
    """Serves one file from 127.0.0.1, honouring Range requests (and suffix ranges), counting what it sends."""

    def __init__(self, blob, ranges=True):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
                start, end = 0, len(blob) - 1
                if ranges and m:
                    if m[1]:
                        start, end = int(m[1]), int(m[2]) if m[2] else len(blob) - 1
                    else:
                        start = max(0, len(blob) - int(m[2]))
                body = blob[start:end + 1]
                server.requests += 1
                server.sent += len(body)
                self.send_response(206 if ranges and m else 200)
                if ranges and m:
                    self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(blob)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.requests = self.sent = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/subjects_0-1999_72_imgs.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def digiface_zip(identities, images):
    """A zip in DigiFace-1M's layout (<identity>/<n>.png), plus members that must never be written."""
    rng = np.random.default_rng(0)
    buf, pngs = io.BytesIO(), {}
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(identities):
            for n in range(images):
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(png, "PNG")
                pngs[(i, n)] = png.getvalue()
                zf.writestr(f"{i}/{n}.png", png.getvalue())
        zf.writestr("../evil.png", b"x")
        zf.writestr("3/../../evil2.png", b"x")
        zf.writestr("notes.txt", b"x")
    return buf.getvalue(), pngs


def test_digiface_download_fetches_only_the_needed_members_by_range_requests(tmp_path):
    blob, pngs = digiface_zip(identities=30, images=52)
    server = RangeServer(blob)
    root = tmp_path / "data" / "digiface"
    try:
        fetch_digiface(str(root), server.url, subjects=10)
        requests, sent = server.requests, server.sent
        fetch_digiface(str(root), server.url, subjects=10)  # done once: no second download
        assert server.requests == requests
    finally:
        server.close()
    assert sorted(d for d in os.listdir(root) if not d.startswith(".")) == sorted(str(i) for i in range(10))
    assert all((root / str(i) / f"{n}.png").read_bytes() == pngs[(i, n)] for i in range(10) for n in range(52))
    assert not list(tmp_path.rglob("evil*")) and not list(tmp_path.rglob("*.part"))
    assert sent < 0.45 * len(blob)  # 10 of 30 identities plus the central directory
    assert requests <= 4  # tail, central directory, one span of members
    faces = load_faces(str(root), subjects=10, per_subject=50, train_per_subject=40, size=16)
    assert faces["train"][0].shape == (400, 3, 16, 16)


def test_digiface_offline_is_one_clear_line(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    with pytest.raises(SystemExit) as e:
        fetch_digiface(str(tmp_path), f"http://127.0.0.1:{port}/x.zip", subjects=10)
    one_line_error(e, "cannot download the face data", "FACES=")


def test_a_server_without_range_requests_is_one_clear_line(tmp_path):
    blob, _ = digiface_zip(identities=2, images=2)
    server = RangeServer(blob, ranges=False)
    try:
        with pytest.raises(SystemExit) as e:
            fetch_digiface(str(tmp_path), server.url, subjects=2)
    finally:
        server.close()
    one_line_error(e, "byte-range")
