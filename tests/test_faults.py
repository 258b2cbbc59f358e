"""Faults and bad input through the real command line (issue 24): every case of tests/fault_cases.py runs
``quantlm.cli.main`` in this process, as a careless or hostile user would call it, and checks the three promises:

1. the exit code is 2 (0 where the right behaviour is success or recovery);
2. stderr shows exactly one line, ``error: ...``, that names the cause (`quantlm verify`: one such line per
   problem), with no traceback and no "unexpected ..." (the catch-all for exceptions nobody anticipated);
3. nothing already written is lost or half-written: protected files and directories are byte-identical afterwards,
   no ``.NAME.tmp-*`` / ``.NAME.old-*`` temporaries or stray ``.NAME.lock`` files remain, a failed run leaves no
   output, and the shared model and checkpoint are never modified.

stderr is judged as a terminal shows it: progress bars (tqdm, redrawn with carriage returns) are not lines of text,
but warnings (``warnings.warn``) and log records (transformers' logger, or the root logger's last resort) are,
because a real run prints them there too. A case whose ``bug`` is set is a strict xfail.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import quantlm.cli as cli
from conftest import SAMPLE_TEXT, save_tiny_model, unit_environment
from fault_cases import CASES, CATEGORIES, DOC, Case, generated_block

_PROGRESS = re.compile(r"\d+%\|.*\|\s*\d+/\d+ \[|\d+it \[\d")
_TEMPORARY = re.compile(r"^\..+\.(tmp|old)-")


def visible_lines(stream: str) -> list[str]:
    """The lines a terminal ends up showing: what follows the last carriage return of each line, without blank
    lines and progress bars."""
    lines = []
    for raw in stream.split("\n"):
        pieces = [p for p in raw.split("\r") if p.strip()]
        if pieces and not _PROGRESS.search(pieces[-1]):
            lines.append(pieces[-1].strip())
    return lines


def snapshot(path: Path) -> dict[str, str]:
    """Every file and directory under ``path`` (or the file itself) with its content hash."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        key = str(p.relative_to(path))
        out[key] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


class _NotTransformers(logging.Filter):
    def filter(self, record):  # transformers prints its own records through its own handler
        return not record.name.startswith("transformers")


@contextlib.contextmanager
def _as_a_terminal_shows_it():
    """Route what a real ``quantlm`` process prints on stderr to the current ``sys.stderr`` (pytest's capture):
    warnings with Python's default filters, transformers' log handler, and the root logger's last resort."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")  # makes sure transformers' own handler exists
    handler = hf_logging._default_handler
    old_stream = handler.stream if handler is not None else None
    root_handler = logging.StreamHandler(sys.stderr)
    root_handler.setLevel(logging.WARNING)
    root_handler.addFilter(_NotTransformers())
    logging.getLogger().addHandler(root_handler)
    if handler is not None:
        handler.stream = sys.stderr
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category)
            warnings.showwarning = _show_warning
            yield
    finally:
        logging.getLogger().removeHandler(root_handler)
        if handler is not None:
            handler.stream = old_stream


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``quantlm ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    old_argv = sys.argv
    sys.argv = ["quantlm", *args]
    escaped = ""
    try:
        with _as_a_terminal_shows_it():
            try:
                cli.main()
                code = 0
            except SystemExit as e:
                code = 0 if e.code is None else e.code
            except KeyboardInterrupt:  # would reach the user as a traceback
                code, escaped = -1, "Traceback: KeyboardInterrupt escaped quantlm.cli.main\n"
            except Exception as e:  # likewise
                code, escaped = -1, f"Traceback: {type(e).__name__} escaped quantlm.cli.main: {e}\n"
    finally:
        sys.argv = old_argv
    out, err = capsys.readouterr()
    return code, out, err + escaped


_HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


class Ctx:
    """What a case's setup and check work with (see tests/fault_cases.py)."""

    def __init__(self, case_dir: Path, shared: dict[str, Path], capsys) -> None:
        self.dir = case_dir
        self.shared = shared
        self.paths: dict[str, Path] = {**shared, "out": case_dir / "out", "dir": case_dir}
        self.monkeypatch = pytest.MonkeyPatch()  # the case's own: a setup may undo it without touching conftest's
        self.marker = case_dir / "payload-ran"
        self.protected: dict[Path, dict[str, str]] = {}
        self.held: list[Path] = []
        self.finalizers: list = []
        self._capsys = capsys

    def copy(self, kind: str) -> Path:
        """A private copy of the shared ``model`` or ``ckpt``, which ``{model}`` / ``{ckpt}`` then name."""
        target = self.dir / f"{kind}-copy"
        shutil.copytree(self.shared[kind], target)
        self.paths[kind] = target
        return target

    def protect(self, path: Path) -> None:
        self.protected[Path(path)] = snapshot(path)

    def args(self, *args: str) -> list[str]:
        names = {key: str(value) for key, value in self.paths.items()}
        return [a.format(**names) for a in args]

    def cli(self, *args: str) -> tuple[int, str, str]:
        return run_cli(self.args(*args), self._capsys)

    def hold_lock(self, target: Path) -> None:
        """Another process holds the output lock of ``target`` until the case ends."""
        lock = target.parent / f".{target.name}.lock"
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLD_LOCK, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

        def release():
            holder.stdin.close()
            try:
                holder.wait(10)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()

        self.finalizers.append(release)
        assert holder.stdout.readline().strip() == "held"
        self.held.append(lock)

    def close(self) -> None:
        self.monkeypatch.undo()
        for finalize in reversed(self.finalizers):
            finalize()


@pytest.fixture(scope="module")
def shared(tmp_path_factory, unit_home):
    """A tiny random Llama (plain Hugging Face directory), a text file, and one RTN W4 g16 checkpoint of the model,
    built once; cases that damage one of them work on a copy (``ctx.copy``)."""
    from quantlm.api import quantize_to_checkpoint

    root = tmp_path_factory.mktemp("faults-shared")
    with unit_environment(unit_home):
        model = save_tiny_model(root / "tiny-llama")
        text = root / "sample.txt"
        text.write_text(SAMPLE_TEXT)
        ckpt = quantize_to_checkpoint(model, [{"method": "rtn", "group_size": 16}], root / "ckpt", progress=False)
    paths = {"model": model, "ckpt": ckpt, "text": text}
    return paths, {key: snapshot(path) for key, path in paths.items()}


def _param(case: Case):
    marks = []
    if case.bug:
        marks.append(pytest.mark.xfail(strict=True, reason=f"BUG: {case.bug}"))
    if case.needs_non_root:
        is_root = hasattr(os, "geteuid") and os.geteuid() == 0
        marks.append(pytest.mark.skipif(is_root, reason="root ignores permission bits"))
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_fault(case: Case, shared, tmp_path, capsys):
    paths, before = shared
    ctx = Ctx(tmp_path, paths, capsys)
    try:
        if case.setup is not None:
            case.setup(ctx)
        args = ctx.args(*case.args)
        out_path = ctx.paths["out"]
        out_existed = out_path.exists()
        code, out, err = run_cli(args, capsys)
        shown = f"\n$ quantlm {' '.join(args)}\n--- stdout:\n{out[-3000:]}\n--- stderr:\n{err[-3000:]}"

        # 1. the exit code
        assert code == case.code, f"exit code {code}, expected {case.code}{shown}"
        # 2. one line that names the cause, no traceback, no catch-all
        assert "Traceback" not in err + out, shown
        assert "unexpected" not in err, shown
        lines = visible_lines(err)
        if case.code == 2:
            if case.many_lines:
                assert lines and all(line.startswith("error: ") for line in lines), shown
            else:
                assert len(lines) == 1 and lines[0].startswith("error: "), f"{len(lines)} lines on stderr{shown}"
            assert any(case.expect in line for line in lines), f"no line names {case.expect!r}{shown}"
        else:
            assert not [line for line in lines if line.startswith("error")], shown
            assert case.expect in out, f"stdout lacks {case.expect!r}{shown}"
        # 3. nothing lost or half-written
        leftovers = sorted(str(p) for p in tmp_path.rglob(".*") if _TEMPORARY.match(p.name))
        assert not leftovers, f"temporaries left behind: {leftovers}{shown}"
        locks = sorted(str(p) for p in tmp_path.rglob(".*.lock") if p not in ctx.held)
        assert not locks, f"lock files left behind: {locks}{shown}"
        for path, snap in ctx.protected.items():
            assert snapshot(path) == snap, f"{path} changed{shown}"
        if code != 0 and not out_existed and out_path.suffix != ".jsonl":  # generate-data keeps whole batches
            assert not out_path.exists(), f"a failed run left {out_path}{shown}"
        for key, snap in before.items():
            assert snapshot(paths[key]) == snap, f"the shared {key} was modified{shown}"
        if case.check is not None:
            case.check(ctx)
    finally:
        ctx.close()


def test_the_in_process_runner_shows_what_a_real_process_shows(shared, tmp_path, capsys):
    """The harness itself: a case whose stderr holds a transformers log record (today) looks the same when
    ``quantlm`` runs as its own process."""
    case = next(c for c in CASES if c.id == "src-missing-tensor")
    ctx = Ctx(tmp_path, shared[0], capsys)
    try:
        case.setup(ctx)
        args = ctx.args(*case.args)
        code, _, err = run_cli(args, capsys)
    finally:
        ctx.close()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # QUANTLM_HOME: the unit tests' (conftest)
    real = subprocess.run(
        [sys.executable, "-m", "quantlm.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert (real.returncode, visible_lines(real.stderr)) == (code, visible_lines(err))


def test_the_case_table_is_sound():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert len(CASES) >= 45
    assert {c.category for c in CASES} == set(CATEGORIES)
    for c in CASES:
        assert c.code in (0, 2) and c.expect, c.id
        assert not (c.code == 0 and c.many_lines), c.id


def test_docs_reliability_lists_every_case():
    text = DOC.read_text()
    assert generated_block() in text, "docs/reliability.md is out of date: run `python tests/fault_cases.py --write`"
