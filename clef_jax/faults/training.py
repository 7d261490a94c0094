"""Cases 1-5: faults of real `python -m clef_jax.train` runs and their Orbax checkpoints."""

from __future__ import annotations

import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

from clef_jax.faults.core import (
    ROOT,
    CaseResult,
    SaveWatch,
    Spawned,
    Suite,
    TrainSettings,
    check,
    finished_steps,
    metrics_lines,
    no_traceback,
    run_child,
    wait_until,
)

NAN_ENV = "CLEF_JAX_INJECT_NAN_AT_STEP"


# -- comparing checkpoints -----------------------------------------------------------------
def _model_leaves(workdir: Path, step: int) -> list[tuple[str, np.ndarray]]:
    import jax

    from clef_jax import checkpoint

    state, meta = checkpoint.load_model_state(workdir, step=step)
    check(meta.get("step") == step, f"{workdir} step {step}: meta says step {meta.get('step')}")
    return [(jax.tree_util.keystr(p), np.asarray(v))
            for p, v in jax.tree_util.tree_leaves_with_path(state)]


def identical(workdir: Path, reference: Path, step: int) -> str | None:
    """None if the model state of `step` equals the reference's bit for bit, else why not."""
    a, b = _model_leaves(workdir, step), _model_leaves(reference, step)
    if [k for k, _ in a] != [k for k, _ in b]:
        return f"step {step}: the leaf paths differ"
    for (key, x), (_, y) in zip(a, b, strict=True):
        # Bits, not values: NaN == NaN here and -0.0 != 0.0.
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return f"step {step}: leaf {key} differs"
    return None


def _copy_steps(reference: Path, dst: Path, steps: list[int]) -> None:
    (dst / "checkpoints").mkdir(parents=True)
    for s in steps:
        shutil.copytree(reference / "checkpoints" / str(s), dst / "checkpoints" / str(s))


# -- case 1 --------------------------------------------------------------------------------
def case_kill9(suite: Suite, r: CaseResult) -> CaseResult:
    """kill -9 at seeded random points of one run, resume each time; compare with a straight run."""
    n_kills = 4 if suite.quick else 10
    r.describe(
        case="1 kill -9 + resume",
        done=f"{n_kills} SIGKILLs of one `clef_jax.train` run ({suite.train.num_steps} steps, "
             f"checkpoint every {suite.train.every_steps}, async saves) at seeded random points "
             "(wall time after start, after k steps, while a save's temporary folder exists, "
             "just after a step was committed), the same command rerun after each",
        expected="the chained run finishes; every checkpoint it wrote equals the uninterrupted "
                 "run's at that step bit for bit (model state, leaf by leaf)")
    reference = suite.reference()
    rng = random.Random(suite.seed * 1000 + 1)
    kinds = ["startup", "save", "saved", "step"] if suite.quick else (
        ["startup"] * 2 + ["save"] * 3 + ["saved"] * 2 + ["step"] * (n_kills - 7))
    rng.shuffle(kinds)
    workdir = suite.scratch / "kill9"
    env = suite.child_env()
    delivered: list[str] = []
    for i, kind in enumerate(kinds):
        watch = SaveWatch(workdir)
        child = Spawned(suite.train_cmd(workdir), env, suite.scratch / "logs" / f"kill9-{i}")
        before_steps = finished_steps(workdir)
        base = metrics_lines(workdir)
        if kind == "startup":  # while importing, compiling or restoring
            time.sleep(rng.uniform(1.0, 12.0))
            reached = child.alive()
        elif kind == "step":
            k = rng.randint(1, 4)
            reached = wait_until(lambda k=k, b=base: metrics_lines(workdir) >= b + k, child, 300)
            time.sleep(rng.uniform(0.0, 0.3))
        elif kind == "save":
            # Orbax writes a step into "<step>.orbax-checkpoint-tmp-*" and renames it when done.
            reached = wait_until(watch.saving, child, 300, poll_s=0.005)
        else:  # "saved": just after a new step was committed (metadata/cleanup may still run)
            reached = wait_until(lambda b=before_steps: bool(set(finished_steps(workdir)) - set(b)),
                                 child, 300, poll_s=0.005)
            time.sleep(rng.uniform(0.0, 0.2))
        if not child.alive():
            done = child.wait()
            r.details.append(f"kill {i + 1} ({kind}): the run exited ({done.returncode}) before "
                             "the kill point")
            break
        mid_save = watch.saving()
        at = time.monotonic() - child.started
        child.signal(signal.SIGKILL)
        killed = child.wait(60)
        check(killed.returncode == -signal.SIGKILL,
              f"kill {i + 1}: exit status {killed.returncode}, not SIGKILL")
        steps = finished_steps(workdir)
        delivered.append(kind)
        r.details.append(
            f"kill {i + 1}: {kind}{'' if reached else ' (point not reached; killed anyway)'} at "
            f"{at:.1f} s after start, metrics line {metrics_lines(workdir)}, "
            f"{'a save in progress, ' if mid_save else ''}committed steps "
            f"{steps[-1] if steps else 'none'}")
        suite.log(f"    kill {i + 1}/{len(kinds)} ({kind}) at {at:.1f} s; newest step "
                  f"{steps[-1] if steps else '-'}{'; mid-save' if mid_save else ''}")
    final = run_child(suite.train_cmd(workdir), env, suite.scratch / "logs" / "kill9-final",
                      timeout=900)
    check(final.returncode == 0, f"the final rerun failed ({final.returncode}): "
                                 f"{final.stderr_tail(600)}")
    steps = finished_steps(workdir)
    check(steps and steps[-1] == suite.train.num_steps,
          f"the chained run ended at step {steps[-1] if steps else None}")
    mismatches = [m for s in steps if (m := identical(workdir, reference, s))]
    equal = len(steps) - len(mismatches)
    r.count = f"{equal}/{len(steps)}"
    r.observed = (f"{len(delivered)}/{n_kills} kills delivered "
                  f"({', '.join(f'{kinds.count(k)} {k}' for k in dict.fromkeys(kinds))}); "
                  f"{equal}/{len(steps)} checkpoints bit-identical to the straight run, "
                  f"final step {steps[-1]}")
    r.details.extend(mismatches)
    check(len(delivered) == n_kills, f"only {len(delivered)} of {n_kills} kills were delivered")
    check(not mismatches, "; ".join(mismatches[:3]))
    r.passed = True
    return r


# -- case 2 --------------------------------------------------------------------------------
def case_sigterm(suite: Suite, r: CaseResult) -> CaseResult:
    r.describe(
        case="2 SIGTERM",
        done="SIGTERM to a run a few steps in (periodic checkpoints off), then the same "
             "command again",
        expected="exit 0 with a checkpoint at the current step; the rerun resumes there and "
                 "finishes, ending bit-identical to the uninterrupted run")
    reference = suite.reference()
    settings = TrainSettings(num_steps=suite.train.num_steps, every_steps=1000)
    workdir = suite.scratch / "sigterm"
    env = suite.child_env()
    child = Spawned(suite.train_cmd(workdir, settings), env, suite.scratch / "logs" / "sigterm")
    k = random.Random(suite.seed * 1000 + 2).randint(2, 5)
    check(wait_until(lambda: metrics_lines(workdir) >= k, child, 300),
          f"the run did not reach step {k}")
    child.signal(signal.SIGTERM)
    done = child.wait(300)
    summary = done.summary() or {}
    last = summary.get("last_step")
    steps = finished_steps(workdir)
    check(done.returncode == 0, f"exit status {done.returncode}: {done.stderr_tail(600)}")
    check(bool(summary.get("preempted")), f"summary does not say preempted: {summary}")
    check(steps == [last], f"checkpoints {steps}, expected only the SIGTERM step {last}")
    check(f"saving step {last}" in done.stderr, "no 'saving step N' message on stderr")
    resumed = run_child(suite.train_cmd(workdir, settings), env,
                        suite.scratch / "logs" / "sigterm-resume", timeout=600)
    rs = resumed.summary() or {}
    check(resumed.returncode == 0, f"the resumed run failed ({resumed.returncode}): "
                                   f"{resumed.stderr_tail(600)}")
    check(rs.get("first_step") == last and rs.get("last_step") == settings.num_steps,
          f"the resumed run went {rs.get('first_step')} -> {rs.get('last_step')}")
    diff = identical(workdir, reference, settings.num_steps)
    r.observed = (f"SIGTERM after step {k}: exit 0 in {done.wall_s:.0f} s, checkpoint at step "
                  f"{last} (preempted); rerun resumed {last} -> {settings.num_steps}; final "
                  f"model {'bit-identical to' if diff is None else 'differs from'} the "
                  "straight run")
    check(diff is None, diff or "")
    r.count = "1/1"
    r.passed = True
    return r


# -- case 3 --------------------------------------------------------------------------------
def _truncate_largest(step_dir: Path) -> str:
    f = max((p for p in (step_dir / "model").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    size = f.stat().st_size
    with f.open("r+b") as fh:
        fh.truncate(size // 2)
    return f"truncated {f.relative_to(step_dir.parent)} ({size} -> {size // 2} bytes)"


def _delete_largest(step_dir: Path) -> str:
    f = max((p for p in (step_dir / "optimizer").rglob("*") if p.is_file()),
            key=lambda p: p.stat().st_size)
    f.unlink()
    return f"deleted {f.relative_to(step_dir.parent)}"


def _garble_meta(step_dir: Path) -> str:
    f = step_dir / "meta" / "metadata"
    text = f.read_text()
    f.write_text(text[: len(text) // 3] + "\x00garbled{")
    return f"garbled {f.relative_to(step_dir.parent)} (cut to a third, junk appended)"


DAMAGES = {"truncated": _truncate_largest, "deleted": _delete_largest, "garbled": _garble_meta}


def case_damaged(suite: Suite, r: CaseResult) -> CaseResult:
    r.describe(
        case="3 damaged newest checkpoint",
        done="the newest checkpoint (step N) damaged three ways in three copies of a finished "
             "run: a model data file truncated, an optimizer data file deleted, the meta JSON "
             "garbled; then the same command (to step N) in each",
        expected="each run warns naming step N, resumes from step N-2 and finishes at N, "
                 "bit-identical to the uninterrupted run")
    reference = suite.reference()
    n = suite.train.num_steps
    prev = n - suite.train.every_steps
    env = suite.child_env()
    children = {}
    for name, damage in DAMAGES.items():
        workdir = suite.scratch / f"damaged-{name}"
        _copy_steps(reference, workdir, [prev, n])
        r.details.append(f"{name}: {damage(workdir / 'checkpoints' / str(n))}")
        children[name] = (workdir, Spawned(suite.train_cmd(workdir), env,
                                           suite.scratch / "logs" / f"damaged-{name}"))
    ok, observed = 0, []
    for name, (workdir, child) in children.items():
        done = child.wait(600)
        s = done.summary() or {}
        # Python logging ("WARNING ...") or absl's format ("W1130 12:00:00.0 ...").
        warned = [x for x in done.stderr.splitlines() if re.search(rf"\bstep\(?s?\)? {n}\b", x)
                  and re.match(r"(W\d{4} |WARNING|.*\bwarning\b)", x, re.I)]
        problems = []
        if done.returncode != 0:
            problems.append(f"exit {done.returncode}: "
                            f"{(done.error_lines() or done.stderr.splitlines() or [''])[-1][:300]}")
        if not warned:
            problems.append(f"no warning naming step {n}")
        if s.get("first_step") != prev:
            problems.append(f"resumed from {s.get('first_step')}, not {prev}")
        if not problems and (diff := identical(workdir, reference, n)):
            problems.append(diff)
        if problems:
            observed.append(f"{name}: " + "; ".join(problems))
        else:
            ok += 1
            observed.append(f"{name}: warned, resumed {prev} -> {n}, identical")
        if warned:
            r.details.append(f"{name} warning: {warned[0][:400]}")
    r.count = f"{ok}/{len(DAMAGES)}"
    r.observed = "; ".join(observed)
    r.passed = ok == len(DAMAGES)
    return r


# -- case 4 --------------------------------------------------------------------------------
# 64 KiB: below every file the step-N save must write (its _METADATA JSON alone is ~115 KB,
# the largest array 128 KiB), and above every file the run writes before that save
# (config.json, metrics.jsonl: a few KiB). A limit between the data files' sizes would
# depend on how TensorStore happens to split them, and once let the save succeed.
FSIZE_LIMIT = 64 << 10


# Runs the training process with the limit, relaying its stdout/stderr through pipes: the
# limit applies to every regular file the process writes, and its log files outgrow 64 KiB
# (the library tracebacks of the failing write), which would lose the very error line the
# case checks. preexec_fn is safe here: this small wrapper has a single thread (the
# multithreaded suite only starts the wrapper). A write past the limit fails with EFBIG, as a
# full disk fails with ENOSPC; an ignored SIGXFSZ stays ignored across exec (else the kernel
# would kill the writer).
_UNDER_FSIZE_LIMIT = """
import os, resource, signal, subprocess, sys, threading
limit = int(sys.argv[1])
def limited():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
def relay(src, dst):
    for chunk in iter(lambda: os.read(src.fileno(), 1 << 16), b""):
        dst.buffer.write(chunk)
        dst.flush()
child = subprocess.Popen([sys.executable, *sys.argv[2:]], preexec_fn=limited,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
relays = [threading.Thread(target=relay, args=pair)
          for pair in ((child.stdout, sys.stdout), (child.stderr, sys.stderr))]
for t in relays:
    t.start()
code = child.wait()
for t in relays:
    t.join()
sys.exit(code)
"""


def case_disk_full(suite: Suite, r: CaseResult) -> CaseResult:
    r.describe(
        case="4 disk full during save",
        done=f"resume a run from step N-2 in a child whose file-size limit (RLIMIT_FSIZE "
             f"{FSIZE_LIMIT >> 10} KiB) makes the step-N save fail with EFBIG",
        expected="exit 1 with one `error:` line naming the checkpoint folder; "
                 "step N-2 intact, restorable and bit-identical; no step N")
    reference = suite.reference()
    n = suite.train.num_steps
    keep = [n - 2 * suite.train.every_steps, n - suite.train.every_steps]
    workdir = suite.scratch / "diskfull"
    _copy_steps(reference, workdir, keep)
    train = suite.train_cmd(workdir)
    done = run_child([sys.executable, "-c", _UNDER_FSIZE_LIMIT, str(FSIZE_LIMIT), *train[1:]],
                     suite.child_env(), suite.scratch / "logs" / "diskfull", timeout=600)
    errors = done.error_lines()
    ckpt_dir = str(workdir / "checkpoints")
    steps = finished_steps(workdir)
    r.observed = (f"exit {done.returncode}; error lines: {errors[:2] or 'none'}; "
                  f"committed steps afterwards {steps}")
    check(done.returncode == 1, f"exit status {done.returncode}: {done.stderr_tail(400)}")
    check(len(errors) == 1 and ckpt_dir in errors[0],
          f"expected one error line naming {ckpt_dir}, got {errors}")
    check(steps == keep, f"committed steps {steps}, expected {keep}")
    for s in keep:
        diff = identical(workdir, reference, s)
        check(diff is None, f"after the failed save: {diff}")
    r.count = f"{len(keep)}/{len(keep)}"
    r.observed += "; earlier steps restore bit-identical"
    tracebacks = done.stderr.count("Traceback (most recent call last)")
    if tracebacks:
        # Not ours to silence: Orbax's and TensorStore's writer threads print these while the
        # failing write unwinds, before clef_jax sees the error. Reported, not hidden.
        firsts = sorted({x.split(":")[0] for x in done.stderr.splitlines()
                         if re.match(r"^[A-Za-z_.]+(Error|Exception): ", x)})
        r.details.append(f"also on stderr: {tracebacks} traceback(s) ({', '.join(firsts)}) "
                         "printed by Orbax's/TensorStore's writer threads while the write "
                         "failed, before the error line")
        r.observed += f"; {tracebacks} library traceback(s) precede the error line"
    r.passed = True
    return r


# -- case 5 --------------------------------------------------------------------------------
def nan_injection_available() -> bool:
    return any(NAN_ENV in p.read_text() for p in (ROOT / "clef_jax").rglob("*.py")
               if "faults" not in p.parts)


def case_nan(suite: Suite, r: CaseResult) -> CaseResult:
    s = 5
    r.describe(
        case="5 NaN at step s",
        done=f"{NAN_ENV}={s} (the batch of step {s} becomes NaN), checkpoint every 2 steps",
        expected=f"exit 1, one error naming step {s} and the last good checkpoint (step "
                 f"{s - 1}); no checkpoint after step {s - 1}")
    if not nan_injection_available():
        r.observed = (f"not run: nothing under clef_jax/ reads {NAN_ENV} yet (the train loop "
                      "must turn the batch of that step into NaN)")
        r.count = "0/1"
        return r
    workdir = suite.scratch / "nan"
    settings = TrainSettings(num_steps=8)
    done = run_child(suite.train_cmd(workdir, settings), suite.child_env(**{NAN_ENV: str(s)}),
                     suite.scratch / "logs" / "nan", timeout=600)
    errors = done.error_lines()
    steps = finished_steps(workdir)
    r.observed = f"exit {done.returncode}; {errors[:1] or 'no error line'}; checkpoints {steps}"
    check(done.returncode == 1, f"exit status {done.returncode}")
    check(len(errors) == 1 and re.search(rf"\bstep {s}\b", errors[0])
          and re.search(rf"checkpoint: step {s - 1}\b", errors[0]),
          f"the error does not name step {s} and the last good checkpoint {s - 1}: {errors}")
    check(no_traceback(done), "a traceback was printed")
    check(steps and max(steps) < s, f"checkpoints after step {s - 1}: {steps}")
    r.count = "1/1"
    r.passed = True
    return r
