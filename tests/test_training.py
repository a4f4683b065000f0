import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

import torch.nn.functional as F

import common
import machinery
import q1a_teacher
import q1b_kd
from common import Batches, cross_entropy, fit, sgd, warmup_cosine
from conftest import ROOT, one_line_error
from machinery import diverged, finish, load_checkpoint, save_atomic


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.body(x))


def data():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 10
    x = (y.view(-1, 1, 1, 1) * 20 + torch.randint(0, 60, (200, 3, 16, 16), generator=g)).clamp(0, 255).to(torch.uint8)
    return x, y


class Killed(machinery.Run):
    """A run killed in epoch `stop` after its evaluation, before its checkpoint (stop=None: never)."""

    def __init__(self, *args, stop=None, **kw):
        super().__init__(*args, **kw)
        self.stop = stop

    def record(self, history, last):
        if history[-1]["epoch"] == self.stop:
            raise KeyboardInterrupt
        super().record(history, last)


def per_part(model):
    """Parameter groups, one per student of a lock-step group (what machinery.Step needs)."""
    return [{"params": list(m.parameters())} for m in model]


def run(run_dir, epochs=3, config=None, loss_fn=cross_entropy, stop=None, lr=0.05, every=1, evals=None):
    torch.manual_seed(0)
    model = Tiny()
    x, y = data()
    gen = torch.Generator().manual_seed(0)
    train = Batches(x, y, batch_size=20, shuffle=True, augment=True, pad=2, gen=gen)
    evals = evals or {"train": Batches(x, y, batch_size=64), "test": Batches(x[:50], y[:50], batch_size=64)}
    opt = sgd(model.parameters(), lr)
    sched = warmup_cosine(opt, epochs * len(train), len(train))
    return fit(model, loss_fn, opt, sched, train, evals, epochs,
               Killed(str(run_dir), {"epochs": epochs} | (config or {"lr": lr}), gen, every, stop=stop))


def without_time(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_fit_lowers_the_loss_and_records_every_field(tmp_path):
    h = run(tmp_path / "run", epochs=4, lr=0.3)
    assert [r["epoch"] for r in h] == [0, 1, 2, 3, 4]  # epoch 0: before any training
    assert set(h[0]) == {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"}
    assert h[-1]["train_loss"] < h[1]["train_loss"] < h[0]["train_loss"] and h[-1]["train_acc"] > 30
    assert json.load(open(tmp_path / "run" / "history.json")) == h
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["epoch"] == 3  # none after the last: finish follows


def test_an_interrupted_run_resumes_to_the_same_history(tmp_path):
    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", stop=2)  # as a kill after epoch 1's checkpoint
    assert load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))["epoch"] == 1
    resumed = run(tmp_path / "cut")
    assert [r["epoch"] for r in resumed] == [0, 1, 2, 3]
    assert without_time(resumed) == without_time(full)  # same RNG streams: the same numbers, exactly


def run_in_stages(run_dir, stop=None):
    """Five epochs in two stages with their own optimisers, as LwF's: epochs 1-2 train the last layer alone,
    epochs 3-5 every layer at a tenth of the rate, each stage's own cosine from its full rate."""
    torch.manual_seed(0)
    model = Tiny()
    x, y = data()
    gen = torch.Generator().manual_seed(0)
    train = Batches(x, y, batch_size=20, shuffle=True, augment=True, pad=2, gen=gen)
    evals = {"test": Batches(x[:50], y[:50], batch_size=64)}
    folder = Killed(str(run_dir), {"epochs": 5}, gen, stop=stop)
    model.requires_grad_(False)
    model.fc.requires_grad_(True)
    opt = sgd(model.fc.parameters(), 0.05)
    warmup = fit(model, cross_entropy, opt, warmup_cosine(opt, 2 * len(train), 0), train, evals, range(1, 3), folder)
    assert [r["epoch"] for r in warmup] == [0, 1, 2]  # epoch 0 opens the run's first stage
    frozen = {k: v.clone() for k, v in model.body.state_dict().items()}
    model.requires_grad_(True)
    opt = sgd([{"params": model.fc.parameters(), "lr": 0.05}, {"params": model.body.parameters(), "lr": 0.005}], 0.05)
    history = fit(model, cross_entropy, opt, warmup_cosine(opt, 3 * len(train), 0), train, evals, range(3, 6), folder)
    assert [r["epoch"] for r in history] == [3, 4, 5]
    return warmup + history, frozen


@pytest.mark.parametrize("stop", [2, 3, 4])  # in stage 1; in stage 2's first epoch; later in stage 2
def test_a_run_in_two_stages_resumes_in_either_to_the_same_history(tmp_path, stop):
    full, frozen = run_in_stages(tmp_path / "full")
    assert [r["epoch"] for r in full] == [0, 1, 2, 3, 4, 5]
    torch.manual_seed(0)
    start = Tiny().body.state_dict()  # stage 1 trains the last layer alone (BatchNorm statistics move: Tiny is no ContinualNet)
    assert all(torch.equal(v, start[k]) for k, v in frozen.items() if "running" not in k and "num_batches" not in k)
    assert full[2]["lr"] == pytest.approx(0) and full[3]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi / 3)))
    with pytest.raises(KeyboardInterrupt):
        run_in_stages(tmp_path / "cut", stop=stop)
    assert load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))["epoch"] == stop - 1
    resumed, _ = run_in_stages(tmp_path / "cut")
    assert without_time(resumed) == without_time(full)  # each epoch once, the same numbers


def test_a_changed_config_is_refused_and_the_run_is_left_alone(tmp_path):
    run(tmp_path / "run", epochs=2, config={"lr": 0.1, "epochs": 2})
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", epochs=2, config={"lr": 0.2, "epochs": 2})
    one_line_error(e, "another config", "lr: 0.1 -> 0.2")
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_a_corrupt_checkpoint_is_refused_and_kept(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", epochs=1)
    one_line_error(e, "cannot read checkpoint", "delete it")
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == b"garbage"


def test_a_non_finite_loss_stops_the_run_naming_epoch_and_step(tmp_path):
    calls = []

    def explode(model, x, y, *rest):
        loss, logits = cross_entropy(model, x, y)
        if model.training:
            calls.append(1)
            if len(calls) == 13:  # 10 steps per epoch: epoch 2, step 3
                loss = loss * float("nan")
        return loss, logits
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "run", loss_fn=explode)
    one_line_error(e, "not finite at epoch 2, step 3")
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["epoch"] == 1


def teacher_cmd(cifar_root, out, epochs):
    return [sys.executable, os.path.join(ROOT, "q1a_teacher.py"), "--data", cifar_root, "--out", str(out),
            "--pretrained", "0", "--epochs", str(epochs), "--batch", "20", "--lr", "0.01", "--warmup", "0",
            "--device", "cpu"]


def test_the_teacher_script_killed_mid_run_resumes_and_then_skips(tmp_path, tiny_cifar, capsys):
    out = tmp_path / "out"
    proc = subprocess.Popen(teacher_cmd(tiny_cifar, out, 2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "teacher" / "checkpoint.pt"
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # in epoch 2, after epoch 1's checkpoint
    proc.wait()
    assert not (out / "teacher" / "result.json").exists(), "the run finished before it could be killed"
    q1a_teacher.main(teacher_cmd(tiny_cifar, out, 2)[2:])  # the same command again (in this process: no 2nd import)
    assert "resuming" in capsys.readouterr().out
    assert [r["epoch"] for r in json.load(open(out / "teacher" / "history.json"))] == [0, 1, 2]
    model = (out / "teacher" / "model.pt").stat().st_mtime_ns
    q1a_teacher.main(teacher_cmd(tiny_cifar, out, 2)[2:])
    assert "is finished" in capsys.readouterr().out
    assert (out / "teacher" / "model.pt").stat().st_mtime_ns == model


def test_ctrl_c_ends_with_one_line_and_the_run_resumes(tmp_path, tiny_cifar, capsys):
    out = tmp_path / "out"
    proc = subprocess.Popen(teacher_cmd(tiny_cifar, out, 2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's Ctrl-C
    while not (out / "teacher" / "checkpoint.pt").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate()[1]
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "error: interrupted; run the same command again to resume from the last finished epoch"
    q1a_teacher.main(teacher_cmd(tiny_cifar, out, 2)[2:])
    assert "resuming" in capsys.readouterr().out


from common import Students as Pair  # two Tiny models in lock-step


def run_pair(run_dir, nan_at=None, epochs=3):
    """Two students in lock-step; the second one's loss turns NaN at training step `nan_at` (1-based, over the run)."""
    torch.manual_seed(0)
    model = Pair([Tiny(), Tiny()])
    x, y = data()
    gen = torch.Generator().manual_seed(0)
    train = Batches(x, y, batch_size=20, shuffle=True, augment=True, pad=2, gen=gen)
    evals = {"test": Batches(x[:50], y[:50], batch_size=64)}
    steps = []

    def loss_fn(m, xb, yb):
        logits = m(xb)
        loss = torch.stack([F.cross_entropy(lg, yb) for lg in logits])
        if m.training:
            steps.append(1)
            if nan_at and len(steps) >= nan_at:
                loss = loss * torch.tensor([1.0, float("nan")])
        return loss, logits
    opt = sgd(per_part(model), 0.05)
    sched = warmup_cosine(opt, epochs * len(train), 0)
    return fit(model, loss_fn, opt, sched, train, evals, epochs, machinery.Run(str(run_dir), {"epochs": epochs}, gen)), model


def test_a_student_that_diverges_stops_alone_and_its_partner_trains_on_unchanged(tmp_path):
    clean, a = run_pair(tmp_path / "clean")
    broken, b = run_pair(tmp_path / "broken", nan_at=13)  # 10 steps per epoch: epoch 2, step 3
    assert diverged(broken) == {1: (2, 3)}
    assert [r["diverged_at"] for r in broken[1:]] == [[0, 0], [0, 3], [0, 1]]
    assert [r["test_acc"][0] for r in broken] == [r["test_acc"][0] for r in clean]  # the partner, exactly
    assert all(torch.equal(p, q) for p, q in zip(a[0].parameters(), b[0].parameters()))
    again, _ = run_pair(tmp_path / "broken", nan_at=13)  # a rerun does not train or die again
    assert json.dumps(without_time(again)) == json.dumps(without_time(broken))  # NaN included


def test_no_nan_reaches_the_weights_of_a_student_whose_loss_turned_nan(tmp_path):
    """A NaN loss sends NaN into that student's gradients; SGD would write them into its weights and train on them
    to the end of the epoch: its steps are skipped instead."""
    _, b = run_pair(tmp_path / "broken", nan_at=13)  # epoch 2, step 3; the group goes on to the end of epoch 2
    assert all(torch.isfinite(q).all() for q in b[1].parameters())
    assert all(torch.isfinite(v).all() for v in b[1].state_dict().values())


def test_a_single_run_whose_loss_turns_nan_keeps_finite_weights_to_the_end_of_the_epoch():
    torch.manual_seed(0)
    model = Tiny()
    x, y = data()
    opt = sgd(model.parameters(), 0.05)
    steps = []

    def nan_at_3(m, xb, yb):
        loss, logits = cross_entropy(m, xb, yb)
        steps.append(1)
        return (loss * float("nan") if len(steps) == 3 else loss), logits
    from common import train_epoch
    step = machinery.Step(model, opt)
    train_epoch(model, nan_at_3, warmup_cosine(opt, 10, 0), Batches(x, y, batch_size=20), step)
    assert step.bad.tolist() == [3] and all(torch.isfinite(q).all() for q in model.parameters())


def test_a_group_stops_when_every_student_has_diverged(tmp_path):
    torch.manual_seed(0)
    model = Pair([Tiny(), Tiny()])
    x, y = data()
    gen = torch.Generator().manual_seed(0)
    train = Batches(x, y, batch_size=20, shuffle=True, gen=gen)
    opt = sgd(per_part(model), 0.05)
    nan = lambda m, xb, yb: (m(xb).mean((1, 2)) * float("nan"), m(xb))  # noqa: E731
    h = fit(model, nan, opt, warmup_cosine(opt, 50, 0), train, {}, 5, machinery.Run(str(tmp_path / "r"), {"epochs": 5}, gen))
    assert [r["epoch"] for r in h] == [0, 1] and diverged(h) == {0: (1, 1), 1: (1, 1)}


def test_finish_keeps_weights_history_and_result_and_removes_the_checkpoint(tmp_path):
    h = run(tmp_path / "run", epochs=2)
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    finish(str(tmp_path / "run"), Tiny(), {"test_acc": 1.0})
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == [
        "config.json", "history.json", "model.pt", "result.json"]


def test_a_write_that_fails_for_lack_of_space_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_atomic({"epoch": 1, "w": torch.zeros(10)}, str(path))
    before = path.read_bytes()
    code = ("import resource, signal, sys, torch; sys.path.insert(0, %r); import machinery\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # a full disk: writes past 1 MB fail (EFBIG)
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
            "machinery.save_atomic({'epoch': 2, 'w': torch.zeros(1 << 20)}, %r)\n") % (ROOT, str(path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"error: cannot write {path}") and "the previous checkpoint.pt is kept" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert path.read_bytes() == before and not (tmp_path / "checkpoint.pt.tmp").exists()
    assert load_checkpoint(str(path))["epoch"] == 1


def test_a_run_folder_held_by_another_process_is_refused(tmp_path, tiny_cifar):
    out = tmp_path / "out"
    (out / "teacher").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(%r, 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"
                               % str(out / "teacher" / ".lock")], stdout=subprocess.PIPE, text=True)  # as machinery.hold
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as e:
            q1a_teacher.main(teacher_cmd(tiny_cifar, out, 1)[2:])
    finally:
        holder.kill()
        holder.wait()
    assert str(e.value) == f"error: another process is training in {out / 'teacher'}; wait for it to finish, or stop it"
    assert not (out / "teacher" / "checkpoint.pt").exists()
    q1a_teacher.main(teacher_cmd(tiny_cifar, out, 1)[2:])  # free again
    assert (out / "teacher" / "result.json").exists()


def test_cudnn_autotuning_is_on_for_every_cuda_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert machinery.get_device("") == torch.device("cuda")  # the default path, DEVICE not given
    assert torch.backends.cudnn.benchmark is True


def test_a_gpu_box_whose_torch_cannot_use_the_gpu_stops_unless_device_is_given(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machinery, "NVIDIA_DRIVER", str(tmp_path / "version"))
    assert machinery.get_device("") == torch.device("cpu")  # no driver: a CPU box, the CPU is the default
    (tmp_path / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05\n")
    with pytest.raises(SystemExit) as e:
        machinery.get_device("")
    one_line_error(e, "has an NVIDIA GPU but torch", torch.__version__, "DEVICE=cpu")
    assert machinery.get_device("cpu") == torch.device("cpu")  # asked for by name: trains there


def test_checkpoints_every_k_epochs_resume_from_the_last_one_written(tmp_path):
    full = run(tmp_path / "full", epochs=5)
    with pytest.raises(KeyboardInterrupt):  # in epoch 5: the checkpoint of epoch 3 (every 3 epochs) is the last
        run(tmp_path / "cut", epochs=5, stop=5, every=3)
    assert load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))["epoch"] == 3
    assert len(json.load(open(tmp_path / "cut" / "history.json"))) == 5  # the history is written every epoch (0-4)
    resumed = run(tmp_path / "cut", epochs=5, every=3)
    assert without_time(resumed) == without_time(full)  # epochs 4 and 5 once each, the same numbers


def test_automatic_checkpoint_interval_keeps_writes_under_5_percent(tmp_path, monkeypatch, capsys):
    real = machinery.save_atomic

    def slow(obj, path, **kw):  # a write that takes far longer than the tiny epoch
        time.sleep(0.5)
        real(obj, path, **kw)
    monkeypatch.setattr(machinery, "save_atomic", slow)
    run(tmp_path / "run", epochs=4, every=0)
    k = int(re.search(r"every (\d+) epoch", capsys.readouterr().out)[1])
    assert k > 4  # so only the first epoch was written (none after the last: the run is finished at once)
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["epoch"] == 1


def test_a_training_set_is_measured_on_a_fixed_subset_each_epoch_and_whole_after_the_last(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "EVAL_IMAGES", 60)
    x, y = data()
    seen = {"train": [], "test": []}

    def counting(split):
        def loss(model, xb, yb):
            seen[split].append(xb.clone())
            return cross_entropy(model, xb, yb)
        return loss
    run(tmp_path / "run", epochs=3, evals={s: (counting(s), Batches(x if s == "train" else x[:50], y if s == "train"
                                                                      else y[:50], batch_size=64)) for s in seen})
    sizes = [len(b) for b in seen["train"]]
    assert sizes == [60] * 3 + [64, 64, 64, 8]  # epochs 0-2 on 60 of the 200 images, epoch 3 on all of them
    assert all(torch.equal(seen["train"][0], seen["train"][e]) for e in (1, 2))  # the same 60 each time
    assert not torch.equal(seen["train"][0], Batches(x, y, batch_size=60).__iter__().__next__()[0])  # not the first 60
    assert [len(b) for b in seen["test"]] == [50] * 4  # a test set: always whole


def test_a_loss_functions_third_item_is_recorded_for_each_split(tmp_path):
    def with_ce(model, xb, yb):
        loss, logits = cross_entropy(model, xb, yb)
        return loss, logits, {"ce": F.cross_entropy(logits, yb), "twice": 2 * loss}
    h = run(tmp_path / "run", epochs=2, loss_fn=with_ce)
    assert all(r["test_ce"] == pytest.approx(r["test_loss"], rel=1e-5) for r in h)
    assert all(r["train_twice"] == pytest.approx(2 * r["train_loss"], rel=1e-5) for r in h)


def checkpoint_from_elsewhere(run_dir, **fields):
    """A run interrupted after epoch 1, its checkpoint then changed as another device would have written it."""
    with pytest.raises(KeyboardInterrupt):
        run(run_dir, stop=2)
    path = run_dir / "checkpoint.pt"
    save_atomic(load_checkpoint(str(path)) | fields, str(path))
    return path


def test_a_checkpoint_written_on_another_device_resumes_with_re_seeded_data_and_says_so(tmp_path, capsys):
    full = run(tmp_path / "full")
    # as CUDA writes it: its generators' states are 16 bytes (seed and offset)
    path = checkpoint_from_elsewhere(tmp_path / "cut", device="cuda:0", gen=[torch.zeros(16, dtype=torch.uint8)])
    capsys.readouterr()
    resumed = run(tmp_path / "cut")
    err = capsys.readouterr().err
    assert f"{path} was written on cuda:0, this run is on cpu" in err and "re-seeded" in err
    assert len(err.strip().splitlines()) == 1
    assert without_time(resumed)[:2] == without_time(full)[:2]  # the epochs before: as written
    assert [r["epoch"] for r in resumed] == [0, 1, 2, 3] and resumed[2]["test_loss"] != full[2]["test_loss"]
    again = run(tmp_path / "again_a", epochs=3), run(tmp_path / "again_b", epochs=3)
    assert without_time(again[0]) == without_time(again[1])  # (the runs themselves stay deterministic)


def test_a_checkpoint_that_cannot_be_resumed_here_names_its_device_and_is_kept(tmp_path):
    path = checkpoint_from_elsewhere(tmp_path / "cut", device="cuda:1", model={"w": torch.zeros(1)})  # not this model
    before = path.read_bytes()
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "cut")
    one_line_error(e, f"{path} (written on cuda:1) does not match this run", "it is kept")
    assert path.read_bytes() == before


def test_a_diverged_student_leaves_the_groups_passes_and_its_partner_is_unchanged(tmp_path, monkeypatch):
    from common import Students

    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 16 * 16, 10)
            self.calls = []

        def forward(self, x):
            self.calls.append(self.training)
            return self.fc(x.flatten(1))

    def train(folder, nan_at=None):
        torch.manual_seed(0)
        students, teacher = Students([Student(), Student()]), Tiny().eval()
        x, y = data()
        gen = torch.Generator().manual_seed(0)
        batches = Batches(x, y, batch_size=20, shuffle=True, gen=gen)
        real, steps = q1b_kd.kd_loss, []

        def kd_loss(s, t, yb, T, lam):  # the second student's loss turns NaN at step `nan_at` of the run
            loss = real(s, t, yb, T, lam)
            if T == 8.0 and torch.is_grad_enabled():
                steps.append(1)
                if nan_at and len(steps) >= nan_at:
                    loss = loss * float("nan")
            return loss
        monkeypatch.setattr(q1b_kd, "kd_loss", kd_loss)
        opt = sgd(per_part(students), 0.05)
        h = fit(students, q1b_kd.distill_loss(teacher, [(4.0, 0.5), (8.0, 0.5)]), opt, warmup_cosine(opt, 30, 0),
                batches, {"test": Batches(x[:50], y[:50], batch_size=64)}, 3, machinery.Run(str(folder), {"epochs": 3}, gen))
        return h, students
    clean, a = train(tmp_path / "clean")
    broken, b = train(tmp_path / "broken", nan_at=4)  # 10 steps per epoch: epoch 1, step 4
    assert diverged(broken) == {1: (1, 4)}
    assert len(a[1].calls) == 1 + 3 * 11 and len(b[1].calls) == 1 + 11  # epoch 0's evaluation, epoch 1 only, then out
    assert [r["test_loss"][0] for r in broken] == [r["test_loss"][0] for r in clean]  # the partner, exactly
    assert all(torch.equal(p, q) for p, q in zip(a[0].parameters(), b[0].parameters()))
