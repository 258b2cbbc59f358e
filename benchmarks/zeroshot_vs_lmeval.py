"""quantlm's zero-shot scorer against the lm-evaluation-harness on the default model, side by side in one run:
the same model files, the same documents (the first --limit of each validation split; 0 = all), fp32 on both
sides. lm-eval 0.4.13 runs in its own cached environment (tests/clients/lm_eval_env.py) with its own task configs,
only the dataset swapped for the local Arrow files; quantlm runs in this process.

Writes benchmarks/results/zeroshot_vs_lmeval.{md,json}: per task, both accuracies and their difference in points,
the largest per-choice log-likelihood difference, and each side's wall time.

Run: .venv/bin/python benchmarks/zeroshot_vs_lmeval.py [--limit 100] [--tasks all]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from clients.lm_eval_env import lm_eval_python, lm_eval_scores, lm_eval_spec  # noqa: E402
from quantlm import api  # noqa: E402
from quantlm.eval import zeroshot  # noqa: E402
from quantlm.eval.tasks import TASKS, load_questions, parse_task_names  # noqa: E402
from quantlm.hardware import describe_cpu  # noqa: E402
from quantlm.models.sources import resolve_model_dir  # noqa: E402
from quantlm.paths import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def quantlm_side(model_dir: Path, names: list[str], limit: int | None) -> dict:
    model, tokenizer = api.load(model_dir, dtype=torch.float32), api.load_tokenizer(model_dir)
    out = {}
    for name in names:
        t0 = time.perf_counter()
        questions = load_questions(name, limit)
        tally, lls, _ = zeroshot.score_questions(model, tokenizer, questions, desc=name)
        out[name] = {
            "n": len(questions),
            "acc": sum(tally.acc) / len(questions),
            "acc_norm": sum(tally.acc_norm) / len(questions) if "acc_norm" in TASKS[name].metrics else None,
            "lls": lls,
            "seconds": time.perf_counter() - t0,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--name", default="zeroshot_vs_lmeval")
    args = ap.parse_args()
    names, limit = parse_task_names(args.tasks), args.limit or None
    model_dir = resolve_model_dir(args.model)
    lm_eval_python()  # made before anything is timed
    with tempfile.TemporaryDirectory() as tmp:
        spec = lm_eval_spec(names, limit)
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        t0 = time.perf_counter()
        lm_eval_scores(model_dir, Path(tmp) / "spec.json", Path(tmp) / "out.json")
        lm_eval_s = time.perf_counter() - t0
        theirs = json.loads((Path(tmp) / "out.json").read_text())
    t0 = time.perf_counter()
    ours = quantlm_side(model_dir, names, limit)
    quantlm_s = time.perf_counter() - t0
    rows = []
    for name in names:
        flat_theirs = [ll for doc in theirs[name]["lls"] for ll in doc]
        rows.append(
            {
                "task": name,
                "n": ours[name]["n"],
                "quantlm_acc": ours[name]["acc"],
                "lm_eval_acc": theirs[name]["acc"],
                "quantlm_acc_norm": ours[name].get("acc_norm"),
                "lm_eval_acc_norm": theirs[name].get("acc_norm"),
                "max_abs_ll_diff": max(abs(a - b) for a, b in zip(ours[name]["lls"], flat_theirs, strict=True)),
            }
        )
    report = {
        "model": args.model,
        "limit": limit,
        "rows": rows,
        "quantlm_seconds": round(quantlm_s, 1),
        "lm_eval_seconds": round(lm_eval_s, 1),
        "cpu": describe_cpu(),
    }
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / f"{args.name}.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(RESULTS / f"{args.name}.md", to_markdown(report))
    print(to_markdown(report))


def _points(a, b) -> str:
    return "-" if a is None or b is None else f"{100 * a:.2f} / {100 * b:.2f} ({100 * (a - b):+.2f})"


def to_markdown(report: dict) -> str:
    lines = [
        f"# quantlm's zero-shot scorer against lm-eval 0.4.13, {report['model']}",
        "",
        f"The first {report['limit'] or 'all'} validation documents of each task, fp32 on both sides, one run. "
        "Accuracy in % as quantlm / lm-eval (difference in points). Written by benchmarks/zeroshot_vs_lmeval.py.",
        "",
        "| task | n | acc | acc_norm | largest per-choice log-likelihood difference (nats) |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['task']} | {r['n']} | {_points(r['quantlm_acc'], r['lm_eval_acc'])} "
            f"| {_points(r['quantlm_acc_norm'], r['lm_eval_acc_norm'])} | {r['max_abs_ll_diff']:.2e} |"
        )
    lines += [
        "",
        f"Wall time for all tasks: quantlm {report['quantlm_seconds']} s, lm-eval {report['lm_eval_seconds']} s "
        "(with its start-up). "
        f"CPU: {report['cpu']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
