"""The lm-evaluation-harness in a virtualenv of its own, made once and cached (about 2 minutes), with torch and
transformers at the versions quantlm's lock pins, so both sides run the same model code."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

LM_EVAL = "lm-eval[hf]==0.4.13"
REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("lm_eval_scores.py")


def clients_home() -> Path:
    """Where test clients are cached: $QUANTLM_CLIENTS, else ~/.cache/quantlm-clients (kept across test runs)."""
    return Path(os.environ.get("QUANTLM_CLIENTS", Path.home() / ".cache" / "quantlm-clients"))


def lm_eval_python() -> Path:
    """The Python of the lm-eval environment, made when missing."""
    venv = clients_home() / ("lm-eval-" + LM_EVAL.split("==")[1])
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / ".lm-eval.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.is_file():
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            pip = [str(python), "-m", "pip", "install", "-q"]
            subprocess.run([*pip, "torch==2.13.0"], check=True)  # the local CPU wheel first
            subprocess.run([*pip, "-c", str(REPO / "requirements" / "lock.txt"), "torch==2.13.0", LM_EVAL], check=True)
            stamp.touch()
    return python


def lm_eval_spec(names, limit: int | None, dtype: str = "float32", batch_size: int = 8) -> dict:
    """What lm_eval_scores.py reads: the tasks' local Arrow files (those quantlm reads), the limit, the dtype."""
    from quantlm.eval.tasks import task_files

    files = {name: [str(f) for f in task_files(name)] for name in names}
    return {"limit": limit, "dtype": dtype, "batch_size": batch_size, "tasks": files}


def lm_eval_scores(model_dir: Path, spec_file: Path, out_file: Path) -> None:
    """Run tests/clients/lm_eval_scores.py in the lm-eval environment."""
    subprocess.run(
        [str(lm_eval_python()), str(SCRIPT), str(model_dir), str(spec_file), str(out_file)],
        check=True,
        cwd=out_file.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
