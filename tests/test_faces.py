import io
import os
import re
import shutil
import socket
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

import files
import machinery
from common import load_faces
from machinery import fetch_digiface, write_synthetic_faces
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
    """Serves one file from 127.0.0.1 like Azure storage: `bytes=a-b` and `bytes=a-` only (a suffix
    range `bytes=-n` is refused with 416). `faults` are played on the requests after the first, one
    each: 'drop' sends half the body and closes the connection, '503' answers Service Unavailable.
    With ranges=False it ignores Range and answers 200 with the whole file. Counts what it sends."""

    def __init__(self, blob, ranges=True, faults=()):
        server = self
        self.faults = list(faults)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                server.ranges.append(self.headers.get("Range", ""))
                if not ranges:
                    return self.send(200, blob, {})
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if not m or int(m[1]) >= len(blob):  # suffix ranges are not served
                    return self.send(416, b"", {"Content-Range": f"bytes */{len(blob)}"})
                fault = server.faults.pop(0) if server.faults and server.requests > 1 else None
                if fault == "503":
                    return self.send(503, b"busy", {})
                start, end = int(m[1]), min(len(blob) - 1, int(m[2]) if m[2] else len(blob) - 1)
                body = blob[start:end + 1]
                self.send(206, body, {"Content-Range": f"bytes {start}-{end}/{len(blob)}"},
                          cut=len(body) // 2 if fault == "drop" else None)

            def send(self, status, body, headers, cut=None):
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    for i in range(0, len(body) if cut is None else cut, 65536):
                        self.wfile.write(body[i:min(i + 65536, cut or len(body))])
                        server.sent += min(65536, (cut or len(body)) - i)
                except OSError:  # the client hung up
                    pass
                if cut is not None:
                    self.close_connection = True

            def log_message(self, *a):
                pass

        self.requests = self.sent = 0
        self.ranges = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/subjects_0-1999_72_imgs.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


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


FAST = {"backoff": 0.01, "timeout": 5}


def test_the_default_url_is_digifaces_current_host():
    assert machinery.DIGIFACE_URL == ("https://facesyntheticspubwedata.z6.web.core.windows.net/wacv-2023/"
                                   "subjects_0-1999_72_imgs.zip")


def test_digiface_download_fetches_only_the_needed_members_by_range_requests(tmp_path):
    blob, pngs = digiface_zip(identities=30, images=52)
    server = RangeServer(blob)
    root = tmp_path / "data" / "digiface"
    try:
        fetch_digiface(str(root), server.url, subjects=10, **FAST)
        requests, sent = server.requests, server.sent
        fetch_digiface(str(root), server.url, subjects=10, **FAST)  # done once: no second download
        assert server.requests == requests
    finally:
        server.close()
    assert all(re.fullmatch(r"bytes=\d+-\d*", r) for r in server.ranges), server.ranges  # never a suffix range
    assert server.ranges[0] == "bytes=0-0"  # the size first
    assert sorted(d for d in os.listdir(root) if not d.startswith(".")) == sorted(str(i) for i in range(10))
    assert all((root / str(i) / f"{n}.png").read_bytes() == pngs[(i, n)] for i in range(10) for n in range(52))
    assert not list(tmp_path.rglob("evil*")) and not list(tmp_path.rglob("*.part"))
    assert sent < 0.45 * len(blob)  # 10 of 30 identities plus the central directory
    assert requests <= 5  # size, tail, central directory, one span of members
    faces = load_faces(str(root), subjects=10, per_subject=50, train_per_subject=40, size=16)
    assert faces["train"][0].shape == (400, 3, 16, 16)


def test_a_dropped_connection_and_a_503_are_retried(tmp_path, capsys):
    blob, pngs = digiface_zip(identities=6, images=3)
    server = RangeServer(blob, faults=["drop", "503", None, "drop"])
    try:
        fetch_digiface(str(tmp_path), server.url, subjects=4, **FAST)
    finally:
        server.close()
    assert all((tmp_path / str(i) / f"{n}.png").read_bytes() == pngs[(i, n)] for i in range(4) for n in range(3))
    err = capsys.readouterr().err
    assert "IncompleteRead" in err and "HTTP 503" in err  # each retry said why


def test_when_the_retries_run_out_it_is_one_line_and_the_next_run_resumes(tmp_path):
    blob, pngs = digiface_zip(identities=6, images=20)
    server = RangeServer(blob)
    try:
        # a span of 1 KB: one request per member; the 5th request onwards fails 5 times in a row
        server.faults = [None, None, None, "503", "503", "503", "503", "503"]
        with pytest.raises(SystemExit) as e:
            fetch_digiface(str(tmp_path), server.url, subjects=4, span=1024, **FAST)
        one_line_error(e, "5 tries", "HTTP 503", "run the same command again to resume")
        done = len(list(tmp_path.rglob("*.png")))
        assert 0 < done < 80 and not list(tmp_path.rglob("*.part"))
        server.requests = 0
        fetch_digiface(str(tmp_path), server.url, subjects=4, span=1024, **FAST)
    finally:
        server.close()
    assert all((tmp_path / str(i) / f"{n}.png").read_bytes() == pngs[(i, n)] for i in range(4) for n in range(20))
    assert 80 - done < server.requests <= 3 + 80 - done  # size, tail (+ directory), then only what was missing


def test_a_local_zip_is_read_by_the_same_code(tmp_path):
    blob, pngs = digiface_zip(identities=5, images=4)
    (tmp_path / "subjects_0-1999_72_imgs.zip").write_bytes(blob)
    root = tmp_path / "digiface"
    fetch_digiface(str(root), str(tmp_path / "subjects_0-1999_72_imgs.zip"), subjects=3)
    assert all((root / str(i) / f"{n}.png").read_bytes() == pngs[(i, n)] for i in range(3) for n in range(4))
    assert not (root / "3").exists() and not list(tmp_path.rglob("evil*"))
    with pytest.raises(SystemExit) as e:
        fetch_digiface(str(tmp_path / "x"), str(tmp_path / "nope.zip"), subjects=3)
    one_line_error(e, "nope.zip does not exist")


def test_digiface_offline_is_one_clear_line(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    with pytest.raises(SystemExit) as e:
        fetch_digiface(str(tmp_path), f"http://127.0.0.1:{port}/x.zip", subjects=10, **FAST)
    one_line_error(e, "cannot read the face data", "FACES=")


def test_a_server_that_ignores_range_stops_at_once_without_reading_the_body(tmp_path):
    blob = os.urandom(48 << 20)  # 48 MB: far more than the socket buffers hold
    server = RangeServer(blob, ranges=False)
    try:
        t = time.time()
        with pytest.raises(SystemExit) as e:
            fetch_digiface(str(tmp_path), server.url, subjects=2, **FAST)
        assert time.time() - t < 5
        time.sleep(0.2)
        assert server.requests == 1 and server.sent < len(blob) // 2  # no retry, and the body was not read
    finally:
        server.close()
    one_line_error(e, "does not answer byte-range requests (HTTP 200)", "FACES=")


# ----------------------------------------------------------------------------- real-world image files

def test_real_world_image_files_load_right(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)  # 8 high, 12 wide
    # a camera JPEG stored sideways with EXIF orientation 6 ("rotate 90 CW to view"): read upright
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "exif.png", exif=exif)
    up = files._read_image(str(tmp_path / "exif.png"), 12)
    assert np.array_equal(up, np.asarray(Image.fromarray(rgb).resize((12, 12), Image.BILINEAR)))
    # 16-bit greyscale: 0..65535 scaled to 0..255, not clipped to white
    grey16 = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert files._read_image(str(tmp_path / "grey16.png"), 4)[0, :, 0].tolist() == [0, 64, 128, 255]
    # greyscale, palette, CMYK: converted to RGB
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    assert np.array_equal(files._read_image(str(tmp_path / "grey.png"), 12)[..., 2],
                          np.asarray(Image.fromarray(rgb[..., 0]).resize((12, 12), Image.BILINEAR)))
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "pal.png")
    assert np.array_equal(files._read_image(str(tmp_path / "pal.png"), 12),
                          np.asarray(pal.convert("RGB").resize((12, 12), Image.BILINEAR)))
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    assert np.abs(files._read_image(str(tmp_path / "cmyk.jpg"), 12).astype(int)
                  - np.asarray(Image.fromarray(rgb).resize((12, 12), Image.BILINEAR)).astype(int)).mean() < 20
    # alpha: composited on black, so a transparent pixel is black whatever colour it hides
    rgba = np.dstack([np.full((4, 4, 3), 200, np.uint8), np.array([[0, 255, 255, 255]] * 4, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    assert files._read_image(str(tmp_path / "alpha.png"), 4)[:, :, 0].tolist() == [[0, 200, 200, 200]] * 4


def test_a_decompression_bomb_is_refused_with_a_warning_naming_it(tmp_path, monkeypatch, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert files._read_image(str(tmp_path / "big.png"), 8) is None
    err = capsys.readouterr().err
    assert str(tmp_path / "big.png") in err and "decompression bomb" in err
