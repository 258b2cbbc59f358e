"""Scores a model with the lm-evaluation-harness itself, offline: run by the Python of the lm-eval test environment
(tests/clients/lm_eval_env.py makes it), never imported by quantlm.

Each task is lm-eval's own task config (its prompts, its metrics) with only the dataset swapped for the local
Arrow file quantlm reads, so a difference in the numbers can only come from the scoring.

    python lm_eval_scores.py MODEL_DIR SPEC.json OUT.json
SPEC: {"limit": N or null, "dtype": "float32", "batch_size": 8, "tasks": {"piqa": ["/path/to/data.arrow"], ...}}
OUT: {"piqa": {"acc": ..., "acc_norm": ..., "n": ..., "lls": [[ll of each choice] for each document]}, ...}
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

# quantlm's task name -> lm-eval's config of it (relative to lm_eval/tasks)
LM_EVAL_CONFIG = {
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "winogrande": "winogrande/default.yaml",
    "siqa": "siqa/siqa.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}
# the local BoolQ (google/boolq's columns) says True/False in "answer" where lm-eval's (super_glue's) has "label"
BOOLQ_LABELS = """
def process_docs(dataset):
    return dataset.map(lambda doc: {"label": int(doc["answer"])})
"""


def write_task_configs(directory: Path, data_files: dict[str, str]) -> list[str]:
    """One YAML per task in ``directory``: lm-eval's config, included by path, with the local data file."""
    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    (directory / "quantlm_boolq_labels.py").write_text(BOOLQ_LABELS)
    names = []
    for name, arrow_files in data_files.items():
        lines = [
            f"include: {tasks_root / LM_EVAL_CONFIG[name]}",
            f"task: quantlm_{name}",
            "tag: []",
            "dataset_path: arrow",
            "dataset_name: null",
            "dataset_kwargs:",
            "  data_files:",
            f"    validation: {json.dumps(arrow_files)}",
            "training_split: null",
            "test_split: null",
            "validation_split: validation",
        ]
        if name == "boolq":
            lines.append("process_docs: !function quantlm_boolq_labels.process_docs")
        (directory / f"quantlm_{name}.yaml").write_text("\n".join(lines) + "\n")
        names.append(f"quantlm_{name}")
    return names


def main(model_dir: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        names = write_task_configs(Path(tmp), spec["tasks"])
        manager = TaskManager(include_path=tmp, include_defaults=False)
        model = HFLM(
            pretrained=model_dir, device="cpu", dtype=spec.get("dtype", "float32"), batch_size=spec.get("batch_size", 8)
        )
        output = lm_eval.simple_evaluate(
            model=model, tasks=names, task_manager=manager, limit=spec.get("limit"), log_samples=True
        )
    scores = {}
    for name in spec["tasks"]:
        metrics = output["results"][f"quantlm_{name}"]
        samples = sorted(output["samples"][f"quantlm_{name}"], key=lambda s: s["doc_id"])
        scores[name] = {
            "acc": metrics["acc,none"],
            "acc_norm": metrics.get("acc_norm,none"),
            "n": len(samples),
            "lls": [[resp[0][0] for resp in s["resps"]] for s in samples],
        }
    Path(out_path).write_text(json.dumps(scores))


if __name__ == "__main__":
    main(*sys.argv[1:4])
