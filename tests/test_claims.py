"""The report's computed sentences, over generated result sets (hypothesis): any order of teacher, students and
methods, one to three seeds, test sets of any size. What is checked is report.json's facts and the conditions
report.typ reads from them (no PDF is compiled): the verdicts say "within noise" exactly when a difference is
under two standard errors, recomputed here; the summaries never contradict the verdicts; every condition report.typ
tests is one the facts can answer, and every value they take is one report.typ words."""
import itertools
import math
import os
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import q1b_kd as q1b
import report
from conftest import ROOT

TYP = open(os.path.join(ROOT, "report.typ"), encoding="utf-8").read()
Q1_BLOCK = TYP[TYP.index("#if k.q != none"):TYP.index("=== (5) Bonus")]
Q2_BLOCK = TYP[TYP.index("#let f = q.q"):TYP.index("\n= References")]
assert Q1_BLOCK and Q2_BLOCK, "report.typ's discussions not found"
LABELS = [label for label, _, _ in q1b.TABLE]
acc = st.floats(min_value=5.0, max_value=99.0, allow_nan=False).map(lambda x: round(x, 2))


def run(result, config=None, history=None):
    return {"result": result, "config": config or {}, "history": history or []}


@st.composite
def result_sets(draw):
    """A teacher, the table's five students and the five Q2 methods with LwF at λo = 0, n seeds each, as gather
    returns them."""
    n, n_test = draw(st.integers(1, 3)), draw(st.sampled_from([100, 2000, 10000]))
    teacher = draw(acc)
    t = run({"test_acc": teacher, "train_acc": min(100.0, teacher + draw(acc) / 10), "test_images": n_test,
             "train_images": draw(st.sampled_from([120, 5000, 50000]))}, {"pretrained": draw(st.integers(0, 1)),
                                                                          "epochs": 3, "lr": 0.1})
    students = {}
    for label in LABELS:
        seeds = []
        for i in range(n):
            a = draw(acc)
            history = [{"epoch": e, "test_acc": draw(acc) if e < 3 else a, "lr": 0.1 * (3 - e) / 3} for e in range(4)]
            result = {"test_acc": a, "train_acc": min(100.0, a + draw(st.floats(-5, 30))), "test_agree": draw(acc),
                      "test_kl": draw(st.floats(0, 3)), "epochs": 3, "seed": i}
            if draw(st.integers(0, 30)) == 0:
                result["diverged"] = "diverged at epoch 2, step 3"
            seeds.append(run(result, {"clip": 5.0, "lr": 0.02}, history))
        students[label] = seeds
    cfg = {"subjects": 100, "per_subject": 50, "train_per_subject": 40, "lwf_warmup": 2, "lr": 0.1}
    before, before_train = draw(acc), draw(acc)
    methods = {}
    for m in ["fe", "ft", "lwf", "joint", "ft-all", 0.0]:
        seeds = []
        for i in range(n):
            still = m == "fe" or draw(st.integers(0, 8)) == 0  # the old task unchanged to the last digit
            old, old_train = (before, before_train) if still else (draw(acc), draw(acc))
            hist = [{"epoch": e, "old_test_acc": before if e == 0 else draw(acc) if e < 4 else old,
                     "test_acc": draw(acc)} for e in range(5)]
            seeds.append(run({"old_test_acc": old, "new_test_acc": draw(acc), "new_train_acc": draw(acc),
                              "old_test_acc_before": before, "old_train_acc": old_train,
                              "old_train_acc_before": before_train}, cfg, hist))
        methods[m] = seeds
    sweep = {0.0: methods.pop(0.0), 1.0: methods["lwf"]}
    return {"teacher": t, "students": students, "methods": methods, "lwf_sweep": sweep, "sweep": None, "out": "",
            "cifar": "CIFAR-10"}


def rows(table):
    """(what, difference, two standard errors or None, verdict) of each row of a comparison table."""
    out = []
    for r in table["rows"]:  # what, then (difference, two standard errors, verdict) of one task, or of the old and the new
        for task, (d, e, v) in ([("old", r[1:4]), ("new", r[4:7])] if len(r) == 7 else [("", r[1:4])]):
            if d:  # a comparison of the old task alone leaves the new task's cells empty
                out.append((r[0] + (f" / {task}" if task else ""), float(d), None if e == "-" else float(e), v))
    return out


def independent(a, b, n_test):
    """The difference of means and its two standard errors, computed here: the variance of each mean over its seeds
    (none for a single value) plus the binomial variance of the difference of two accuracies near their mean on
    n_test images."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    var = lambda v, m: sum((x - m) ** 2 for x in v) / (len(v) - 1) if len(v) > 1 else 0.0  # noqa: E731
    p = (ma + mb) / 2 / 100
    return ma - mb, 2 * math.sqrt(var(a, ma) / len(a) + var(b, mb) / len(b) + 100 ** 2 * 2 * p * (1 - p) / n_test)


def check_verdicts(table, checked=(), marked=lambda what: False):
    """A verdict is "within noise" exactly under two standard errors, and marked (to be checked) exactly in a row of
    a run the discussion leaves out to be checked first."""
    for what, d, e, verdict in rows(table):
        unchecked = bool(set(what.split(" / ")[0].split(" − ")) & set(checked)) or marked(what)
        assert verdict.endswith(report.CHECK) == unchecked, (what, verdict, checked)
        verdict = verdict.removesuffix(report.CHECK)
        if e is None:
            assert verdict == "within noise", what
        elif abs(abs(d) - e) > 0.011:  # the table rounds both to two decimals
            assert (verdict == "within noise") == (abs(d) < e), (what, d, e, verdict)
            assert verdict == "within noise" or verdict == ("higher" if d > 0 else "lower"), what


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(result_sets())
def test_q1_verdicts_are_within_noise_exactly_under_two_standard_errors_and_the_summaries_follow_them(g):
    q = report.q1_facts(g)
    if q is None:  # every student diverged: no discussion
        assert all(len(report.accs(r)) == 0 for r in g["students"].values())
        return
    same = any(len(a) > 1 and len(set(a)) == 1 for r in g["students"].values() for a in [report.accs(r, "test_agree")])
    check_verdicts(q["table"], marked=lambda what: same and what.startswith("agreement with the teacher"))
    table = {what: (d, e, v.removesuffix(report.CHECK)) for what, d, e, v in rows(q["table"])}
    base, n_test = report.accs(g["students"][LABELS[0]]), g["teacher"]["result"]["test_images"]
    kd = [label for label in LABELS[2:] if report.accs(g["students"][label])]
    verdicts = []
    for label in kd:
        if base:
            d, e = independent(report.accs(g["students"][label]), base, n_test)
            got = table[f"{report.SHORT[label]}, λ = 0.1 − λ = 0"]
            assert math.isclose(got[0], d, abs_tol=0.006) and math.isclose(got[1], e, abs_tol=0.006)
            verdicts.append(0 if abs(d) < e else 1 if d > 0 else -1)
    if base and kd and all(abs(abs(d) - e) > 0.011 for _, d, e, _ in rows(q["table"])):
        assert q["kd_effect"] == report.effect(verdicts)
        words = {"up": "higher", "down": "lower", "none": "within noise"}
        assert q["kd_effect"] == "mixed" or all(table[f"{report.SHORT[k]}, λ = 0.1 − λ = 0"][2] == words[q["kd_effect"]]
                                                for k in kd)
    first = rows(q["table"])[0]
    assert first[0].endswith(f"(the highest{' mean' * (q['noise']['n'] > 1)}) − teacher") and q["vs_teacher"] == {"higher": 1, "lower": -1,
                                                                                     "within noise": 0}[first[3]]
    assert q["noise"]["n"] == max(len(r) for r in g["students"].values())
    if "gap" in q:  # λ = 0's train-test gap against the teacher's: the capacity paragraph's reading, either way
        gap = [r["result"]["train_acc"] - r["result"]["test_acc"] for r in g["students"][LABELS[0]] if "diverged" not in r["result"]]
        t = g["teacher"]["result"]
        p = sum(a for r in g["students"].values() for a in report.accs(r)) / sum(len(report.accs(r)) for r in g["students"].values()) / 100
        m = sum(gap) / len(gap)
        var = sum((x - m) ** 2 for x in gap) / (len(gap) - 1) if len(gap) > 1 else 0.0
        e = math.sqrt(4 * var / len(gap) + 200 ** 2 * 2 * p * (1 - p) * (1 / n_test + 1 / t["train_images"]))
        d = m - (t["train_acc"] - t["test_acc"])
        if abs(abs(d) - e) > 0.011:
            assert q["gap"]["wider_than_teacher"] == (m > 0 and d >= e), (m, d, e)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(result_sets())
def test_q2_verdicts_and_the_summary_never_contradict_each_other(g):
    f = report.q2_facts(g)
    check_verdicts(f["table"], f["checked"])
    table = {what: v.removesuffix(report.CHECK) for what, _, _, v in rows(f["table"])}
    value = {"higher": 1, "lower": -1, "within noise": 0}
    for key, c in f["cmp"].items():
        a, b = key.split("/")
        a, b = (0.0 if x == "0.0" else x for x in (a, b))
        name = f"{report.WORDS[a]} − {report.WORDS[b]}"
        assert c["old"] == value[table[f"{name} / old"]] and c["new"] == value[table[f"{name} / new"]]
    for m, drop in f["forgets"].items():
        m = 0.0 if m == "0.0" else m
        assert drop["v"] == value[table[f"{report.WORDS[m]} − before any change / old"]]
    shown, unshown = f["shown"], f["unshown"]
    lower = lambda pair: table.get(f"{pair} / old") == "lower"  # noqa: E731
    joint_bad = lower("joint training − LwF") and lower("joint training − LwF at λo = 0")  # below LwF and no term
    assert f["joint_bad"] == joint_bad and f["head_bad"] == (joint_bad and lower("LwF − LwF at λo = 0"))
    fa = g["methods"].get("ft-all") or []  # every layer on faces, its old task within noise of before and not even lower in the mean
    ftall_up = bool(fa) and table["fine-tuning every layer − before any change / old"] == "within noise" and all(
        sum(r["result"][k] for r in fa) / len(fa) >= fa[0]["result"][k + "_before"] for k in ("old_test_acc", "old_train_acc"))
    flagged = [w for w, v in (("joint training", joint_bad), ("fine-tuning", f["ft_inert"]), ("LwF", f["head_bad"]),
                              ("LwF at λo = 0", f["head_bad"]), ("fine-tuning every layer", ftall_up)) if v]
    unmoved = [m for m, runs in [*g["methods"].items(), (0.0, g["lwf_sweep"][0.0])] if m != "fe" and all(
        r["result"]["old_test_acc"] == r["result"]["old_test_acc_before"] and r["result"]["old_train_acc"] == r["result"]["old_train_acc_before"]
        for r in runs)]  # a method that trains the backbone, yet its old task did not move: to be checked too
    assert f["checked"] == flagged + [w for w in (report.WORDS[m] for m in unmoved) if w not in flagged]
    claims = {"fine-tuning loses old-task accuracy": f["forgets"]["ft"]["v"] < 0,
              "LwF keeps more of it than fine-tuning": f["cmp"]["lwf/ft"]["old"] > 0,
              "fine-tuning learns the faces better than feature extraction": f["cmp"]["ft/fe"]["new"] > 0}
    for claim, holds in claims.items():
        if f["ft_inert"]:  # every claim involves fine-tuning, whose run is to be checked: the summary says none
            assert shown == unshown == f["reversed"] == ""
            continue
        if "LwF" in claim and "LwF" in f["checked"]:  # its runs are to be checked: the summary says nothing of them
            assert "LwF" not in shown + unshown + f["reversed"]
            continue
        assert (claim in shown) == holds and (claim in unshown) == (not holds), claim
    assert f["fe_exact"]  # feature extraction's old task as before, in every generated set
    # to check: fine-tuning left the old task as it was (to the last digit, or within noise of both fe's and the network's
    # before any change and not even lower in the mean), whatever it did to the faces
    level = table["fine-tuning − feature extraction / old"] == table["fine-tuning − before any change / old"] == "within noise" and all(
        sum(r["result"][k] for r in g["methods"]["ft"]) / len(g["methods"]["ft"]) >= g["methods"]["ft"][0]["result"][k + "_before"]
        for k in ("old_test_acc", "old_train_acc"))  # and its old task not even lower in the mean
    assert f["ft_inert"] == ("ft" in unmoved or level)
    assert sorted(f["still"].replace(" and ", ", ").split(", ")) == sorted(report.WORDS[m] for m in unmoved) or (
        not unmoved and f["still"] == "")
    methods, n_test = g["methods"] | {0.0: g["lwf_sweep"][0.0]}, g["teacher"]["result"]["test_images"]
    pairs = {(c["a"], c["b"]): (c["old"], c["new"]) for c in f["pairs"]}
    for a, b in itertools.combinations(methods, 2):  # every pair, its verdict on each task
        verdicts = []
        for task, n in (("old", n_test), ("new", 1000)):
            d, e = independent(*(report.accs(methods[m], f"{task}_test_acc") for m in (a, b)), n)
            verdicts.append(None if abs(abs(d) - e) < 0.011 else 0 if abs(d) < e else 1 if d > 0 else -1)
        if None not in verdicts:
            assert pairs[(report.WORDS[a], report.WORDS[b])] == tuple(verdicts), (a, b)
    if f["ftall_most"]:  # fine-tuning every layer below every other method that moves the backbone, beyond noise
        assert (f["cmp"]["lwf/ft-all"]["old"] > 0 or "LwF" in f["checked"]) and (  # a run to be checked: left out
            f["cmp"]["ft-all/ft"]["old"] < 0 or "fine-tuning" in f["checked"])


def test_every_value_a_fact_takes_is_one_report_typ_words():
    for key, values in (("kd_effect", {"up", "none", "down", "mixed"}), ("effect", {"narrower", "none", "wider", "mixed"})):
        handled = set(re.findall(rf'{key} == "(\w+)"', Q1_BLOCK))
        assert values <= handled, (key, values - handled)
    assert {"up", "none", "down", "mixed"} <= set(re.findall(r'fidelity\.effect == "(\w+)"', Q1_BLOCK))
    assert {"fe.new > 0", "fe.new < 0", 'cmp("ft/fe").new == 0'} <= set(re.findall(r'(?:fe|cmp\("ft/fe"\))\.new [<>=]=? 0',
                                                                             Q2_BLOCK))  # fine-tuning on faces
    for key in ("lam1", "vs_teacher"):  # verdicts: each of the three has its sentence
        assert {f"q.{key} < 0", f"q.{key} == 0", f"q.{key} > 0"} <= set(re.findall(rf"q\.{key} [<>=]=? 0", Q1_BLOCK))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(result_sets())
def test_every_fact_report_typ_reads_is_there_or_its_reading_is_guarded(g):
    """A field report.typ reads that the facts lack would stop the compile: every `q.x` of Q1's discussion and `f.x`
    of Q2's is in the facts, or read under `"x" in q` (x, or x_y beside it)."""
    q, f = report.q1_facts(g), report.q2_facts(g)
    for block, var, facts in ((Q1_BLOCK, "q", q), (Q2_BLOCK, "f", f)):
        if facts is None:
            continue
        guards = set(re.findall(rf'"(\w+)" in {var}\b', block))  # read only under `"x" in q`: x and x_* with it
        for name in set(re.findall(rf"\b{var}\.(\w+)", block)):
            assert name in facts or any(name == g or name.startswith(g + "_") for g in guards), (var, name)
            if name in guards and name in facts:  # a guarded field: the fields read with it come with it
                assert all(k in facts for k in re.findall(rf"\b{var}\.({name}_\w+)", block)), name


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(result_sets(), st.lists(st.sampled_from([0.1, 0.5, 0.9]), min_size=1, max_size=3, unique=True),
       st.lists(acc, min_size=6, max_size=6), st.sampled_from([1, 3]))
def test_the_bonus_grid_weighs_its_heaviest_soft_weight_against_the_labels_alone_only_at_the_tables_epochs(g, lams, a, epochs):
    Ts = [2.0, 8.0]
    cells = {(T, lam): [run({"test_acc": a[2 * j + i], "epochs": epochs, "seed": 0})] for i, T in enumerate(Ts)
             for j, lam in enumerate(lams)}
    g["sweep"] = {"grid": {"T": Ts, "lam": lams, "seeds": 1}, "cells": cells}
    s = report.sweep_part(g)
    lam0 = report.accs(g["students"][LABELS[0]])
    heavy = max(((T, lam) for T, lam in cells if lam == max(lams)), key=lambda k: cells[k][0]["result"]["test_acc"])
    if epochs != 3 or not lam0:  # the table's students train 3 epochs: another budget does not compare
        assert s["heavy"] is None
        return
    d, e = independent([cells[heavy][0]["result"]["test_acc"]], lam0, g["teacher"]["result"]["test_images"])
    assert s["heavy"]["T"] == f"{heavy[0]:g}" and s["heavy"]["lam"] == f"{max(lams):g}"
    if abs(abs(d) - e) > 0.011:
        assert s["heavy"]["v"] == (0 if abs(d) < e else 1 if d > 0 else -1)
    assert "h.v < 0 [The" in Q1_BLOCK and "#if h == none [These runs do not say" in Q1_BLOCK  # its two readings, gated
