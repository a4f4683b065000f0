"""The Makefile as a user runs it: the order of `make all`, a failed part not costing the others, the install step."""
import os
import shutil
import subprocess

from conftest import ROOT, as_a_user


def make(*args, cwd=ROOT, env=None):
    """`make ARGS` as a user starts it (conftest.as_a_user: none of the outer `make test`'s flags and variables)."""
    env = as_a_user(env or os.environ)
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True, env=env)


FAKE = """#!/bin/sh
# stands in for python: logs the script it runs; fails for the parts named in $FAIL
echo "$*" >> "$LOG"
case "$1" in q1a_teacher.py) mkdir -p "$OUT_DIR/teacher" && echo '{}' > "$OUT_DIR/teacher/result.json";; esac
for f in $FAIL; do case "$*" in *"$f"*) exit 1;; esac; done
exit 0
"""


def fake_python(tmp_path, fail=""):
    py = tmp_path / "python"
    py.write_text(FAKE)
    py.chmod(0o755)
    (tmp_path / ".deps-installed").touch()
    env = dict(os.environ, LOG=str(tmp_path / "log"), OUT_DIR=str(tmp_path / "out"), FAIL=fail)
    return str(py), env


def steps(tmp_path):
    """The scripts run, in order (the install step, `-m pip`, aside)."""
    return [line.split()[0] + ("" if line.split()[0] != "q1b_kd.py" else " " + line.split()[-1].lstrip("-"))
            for line in (tmp_path / "log").read_text().splitlines() if not line.startswith("-m pip")]


def test_make_all_runs_the_required_parts_first_then_the_sweep_then_the_report(tmp_path):
    py, env = fake_python(tmp_path)
    r = make("all", f"PYTHON={py}", f"OUT={tmp_path}/out", "-j4", env=env)  # -j: still one at a time
    assert r.returncode == 0, r.stderr
    assert steps(tmp_path) == ["q1a_teacher.py", "q1b_kd.py table", "q2_continual.py", "report.py",
                               "q1b_kd.py sweep", "report.py"]


def test_a_failed_part_does_not_cost_the_others_and_make_all_still_fails(tmp_path):
    py, env = fake_python(tmp_path, fail="--table --sweep")
    r = make("all", f"PYTHON={py}", f"OUT={tmp_path}/out", env=env)
    assert r.returncode != 0
    assert steps(tmp_path) == ["q1a_teacher.py", "q1b_kd.py table", "q2_continual.py", "report.py",
                               "q1b_kd.py sweep", "report.py"]


def test_without_the_venv_module_the_install_says_what_to_install(tmp_path):
    for f in ("Makefile", "requirements.txt"):
        shutil.copy(os.path.join(ROOT, f), tmp_path)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python3").write_text("#!/bin/sh\necho 'No module named ensurepip' >&2; exit 1\n")
    (bin_ / "python3").chmod(0o755)
    r = make("deps", cwd=tmp_path, env=dict(os.environ, PATH=f"{bin_}:/usr/bin:/bin"))
    assert r.returncode != 0 and "sudo apt install python3-venv" in r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        "error: python3 cannot make a virtual environment (no venv/ensurepip module); install it with "
        "'sudo apt install python3-venv', or give PYTHON="]
    assert not (tmp_path / ".venv").exists()


FAKE_VENV_PYTHON = """#!/bin/sh
# stands in for .venv/bin/python: logs pip calls; `import torch, torchvision` fails as a torchvision built
# for another torch does, until a pip install --ignore-installed has put a pair into the venv ($FIXES=1)
echo "$*" >> "$LOG"
case "$*" in
  *--ignore-installed*) cp .venv/torch.txt "$LOG.torch"; [ "$FIXES" = 1 ] && touch .venv/own-torch; exit 0;;
  "-c import torch, torchvision")
    [ -e .venv/own-torch ] || [ "$BROKEN" = 0 ] && exit 0
    printf 'Traceback (most recent call last):\\n  File "<string>"\\nRuntimeError: operator torchvision::nms does not exist\\n' >&2
    exit 1;;
esac
exit 0
"""


def fake_system_python(tmp_path, **env):
    """A python3 that makes a .venv whose python is FAKE_VENV_PYTHON."""
    for f in ("Makefile", "requirements.txt"):
        shutil.copy(os.path.join(ROOT, f), tmp_path)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (tmp_path / "venv_python").write_text(FAKE_VENV_PYTHON)
    (bin_ / "python3").write_text(f"""#!/bin/sh
case "$*" in *"-m venv"*) mkdir -p .venv/bin && cp {tmp_path}/venv_python .venv/bin/python && chmod +x .venv/bin/python;; esac
exit 0
""")
    (bin_ / "python3").chmod(0o755)
    return dict(os.environ, PATH=f"{bin_}:/usr/bin:/bin", LOG=str(tmp_path / "log"), **env)


def test_a_venv_whose_inherited_torchvision_does_not_import_gets_a_matching_pair_of_its_own(tmp_path):
    r = make("deps", cwd=tmp_path, env=fake_system_python(tmp_path, BROKEN="1", FIXES="1"))
    assert r.returncode == 0, r.stderr
    assert ("the preinstalled torch and torchvision do not import together (RuntimeError: operator "
            "torchvision::nms does not exist): installing a matching pair into .venv") in r.stdout
    log = (tmp_path / "log").read_text().splitlines()
    assert log == ["-m pip install -q -r requirements.txt", "-c import torch, torchvision",
                   "-m pip install -q --ignore-installed -r .venv/torch.txt", "-c import torch, torchvision"]
    wanted = [line for line in (tmp_path / "requirements.txt").read_text().splitlines() if line.startswith("torch")]
    assert (tmp_path / "log.torch").read_text().splitlines() == wanted and len(wanted) == 2
    assert (tmp_path / ".venv/.installed").exists()


def test_a_venv_that_imports_torch_keeps_it_and_one_that_cannot_be_mended_says_so_in_one_line(tmp_path):
    ok = tmp_path / "ok"
    ok.mkdir()
    r = make("deps", cwd=ok, env=fake_system_python(ok, BROKEN="0"))
    assert r.returncode == 0 and "--ignore-installed" not in (ok / "log").read_text()
    bad = tmp_path / "bad"
    bad.mkdir()
    r = make("deps", cwd=bad, env=fake_system_python(bad, BROKEN="1", FIXES="0"))
    assert r.returncode != 0
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        "error: torch and torchvision in .venv do not import together: RuntimeError: operator torchvision::nms "
        "does not exist"]
    assert not (bad / ".venv/.installed").exists()


def test_group_caps_the_tables_lock_step_groups_as_well_as_the_sweeps(tmp_path):
    py, env = fake_python(tmp_path)
    (tmp_path / "out" / "teacher").mkdir(parents=True)
    (tmp_path / "out" / "teacher" / "result.json").write_text("{}")
    for target in ("kd-table", "kd-sweep"):
        assert make(target, f"PYTHON={py}", f"OUT={tmp_path}/out", "GROUP=3", "PRECISION=fp16", env=env).returncode == 0
    table, sweep = (tmp_path / "log").read_text().splitlines()
    assert table.startswith("q1b_kd.py") and "--table --group 3" in table and "--precision fp16" in table
    assert "--sweep" in sweep and "--group 3" in sweep
