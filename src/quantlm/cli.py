"""The ``quantlm`` command: a thin layer over the Python API.

Every QuantlmError becomes one line on stderr and exit code 2; ``--json`` puts machine-readable output on stdout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from quantlm import api
from quantlm.errors import QuantlmError, first_line, os_error_message
from quantlm.eval.zeroshot import DEFAULT_BATCH_TOKENS
from quantlm.finetune.adapters import LoraSettings
from quantlm.finetune.lora_init import LORA_INITS
from quantlm.finetune.merge import MERGE_MODES
from quantlm.finetune.run import DEFAULT_SEQLEN as FINETUNE_SEQLEN
from quantlm.finetune.run import DEFAULT_TRAINING as FINETUNE_TRAINING
from quantlm.qat.run import DEFAULT_INIT_OFFSETS, INIT_OFFSETS
from quantlm.qat.run import DEFAULT_TRAINING as QAT_TRAINING
from quantlm.quickstart import PRESETS as QUICKSTART_PRESETS

FINETUNE_LORA = LoraSettings()
app = typer.Typer(add_completion=False, no_args_is_help=True, help="Quantize Hugging Face causal LMs and measure them.")


DType = Enum("DType", {name: name for name in api.DTYPE_CHOICES}, type=str)
TrainDType = Enum("TrainDType", {name: name for name in api.TRAIN_DTYPES}, type=str)


VERBOSE_HELP = "Say which dtype was taken and why, and print the kernel of every quantized layer (stderr)."
KERNEL_HELP = (
    "Matmul kernel of the quantized layers: auto (fastest that fits each layer), int4pack, int4x2 (5-8-bit groups), "
    "int8pack, int8 (W8A8 int8 GEMM), codebook (NF4/FP4), unpacked (codes unpacked once) or torch."
)
QUANTIZE_AT_LOAD_HELP = (
    f"Quantize a float model as it loads (nothing written): {', '.join(api.load_time_methods())} with their default "
    "settings, or a JSON/YAML recipe file of calibration-free steps."
)
DTYPE_HELP = (
    "Compute dtype: auto (the faster of bfloat16 and float32 for this command's work on this CPU, by its flags and "
    "a one-off probe; --verbose says which and why), float32, bfloat16 or float16."
)
REPORT_DIR = "report"  # where quantize --report writes, inside the checkpoint
ATTENTION_HELP = (
    "Attention: auto (decode steps of a bf16/fp16 CPU model in fp32, which is faster there), quantlm_sdpa (that), "
    "sdpa or eager (transformers' own)."
)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _friendly(fn):
    """Turn QuantlmError (and anything unexpected) into one line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except QuantlmError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            _fail("interrupted")
        except Exception as e:  # keep tracebacks for debugging only
            if os.environ.get("QUANTLM_DEBUG"):
                raise
            known = os_error_message(e)  # a full disk, a read-only file system, a missing permission
            if known is not None:
                _fail(known)
            _fail(f"unexpected {first_line(e)} (set QUANTLM_DEBUG=1 for the traceback)")

    return wrapper


def _setup_threads() -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)


def _print_json(data) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _method_settings():
    """The command line's face of every pipeline method's settings, from the method registry."""
    return api.cli_settings(api.offered_methods().values())


def _with_method_options(fn):
    """Give a command one option for each method setting in the registry (flags, types and help from the settings'
    dataclass fields); the command receives the ones the user gave as ``options`` (key -> value; None: not given).
    A new method or setting therefore needs no change here."""
    import inspect
    from typing import Optional as Opt

    table = _method_settings()
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "options"]
    extra = [
        inspect.Parameter(
            key,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Opt[entry.kind],
            default=typer.Option(
                None,
                *entry.flags,
                help=f"{', '.join(sorted({c.name for c, _ in entry.targets}))}: {entry.help}",
                rich_help_panel="Method settings (defaults: docs/methods.md)",
            ),
        )
        for key, entry in table.items()
    ]

    @functools.wraps(fn)
    def wrapper(**kwargs):
        options = {key: kwargs.pop(key) for key in table}
        return fn(**kwargs, options=options)

    wrapper.__signature__ = inspect.Signature(own + extra)
    wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
    return wrapper


MethodName = Enum("MethodName", {name: name for name in api.offered_methods()}, type=str)


@app.command()
@_friendly
@_with_method_options
def quantize(
    model: str = typer.Argument(..., help="Alias, model directory, .gguf file or hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint directory."),
    method: MethodName = typer.Option("rtn", help="Quantization method."),
    weights: Optional[MethodName] = typer.Option(
        None,
        help="With a method that only smooths (smoothquant): the method that quantizes the weights after it "
        "[default: rtn].",
    ),
    head_bits: Optional[int] = typer.Option(
        None,
        "--head-bits",
        help="Any method: also round the output projection, weight-only: 8 (per channel, sym) or 4/3/2 "
        "(asym groups of 64). It is read whole for every decoded token [default: kept in float].",
    ),
    kv_bits: Optional[int] = typer.Option(
        None,
        "--kv-bits",
        help="Quantize the KV cache at run time to 8 or 4 bits (per token and head, symmetric) [default: off].",
    ),
    recipe: Optional[Path] = typer.Option(None, help="A JSON/YAML recipe file (instead of --method and its settings)."),
    target_format: Optional[str] = typer.Option(
        None,
        "--target-format",
        help="rtn/gptq with each Linear on the grid of a llama.cpp GGUF type: one type for all (as llama-quantize "
        "--pure, with its fallbacks for narrow rows) or llama-quantize's Q4_K_M mix: "
        f"{', '.join(api.GGUF_TARGETS)}. quantlm export --format gguf then writes the codes as they are.",
    ),
    calib: str = typer.Option(
        "enwiki", help="Calibration text: a built-in name, a .txt/.jsonl file, or hf:NAME[:CONFIG]."
    ),
    calib_samples: int = typer.Option(128, help="Calibration windows."),
    calib_seqlen: int = typer.Option(2048, help="Tokens per calibration window."),
    calib_seed: int = typer.Option(0, help="Seed of the calibration window offsets."),
    batch_size: int = typer.Option(8, help="Calibration windows per forward pass."),
    offload_activations: bool = typer.Option(
        False,
        "--offload-activations",
        help="Keep calibration activations in files (under the work dir) instead of memory.",
    ),
    dtype: DType = typer.Option(
        DType.float32,
        help="Dtype the model is loaded and calibrated in. float32 by default because the calibration dtype changes "
        "the result (bf16 GPTQ is slightly worse); auto takes the faster of bfloat16 and float32 on this CPU.",
    ),
    work_dir: Optional[Path] = typer.Option(
        None, help="Where finished blocks go (default .OUT.work); rerun to resume."
    ),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    evaluate: bool = typer.Option(False, "--eval", help="Measure perplexity (enwiki eval) afterwards."),
    max_windows: int = typer.Option(32, help="With --eval: number of 2048-token windows."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    report: bool = typer.Option(
        False,
        "--report",
        help=f"Also write a report of this run (Markdown, plots; with --eval its perplexity) into OUT/{REPORT_DIR}/ "
        "(docs/report.md).",
    ),
    options: Optional[dict] = None,
) -> None:
    """Quantize MODEL and write a checkpoint to OUT."""

    api.check_output(out, overwrite)  # before any work (the run checks again under the output lock)
    given = {k: v for k, v in (options or {}).items() if v is not None}
    if recipe is not None:
        if given or weights is not None or method.value != "rtn":
            raise QuantlmError("--recipe replaces --method and its settings: pass one or the other")
        steps = api.add_head_step(api.parse_recipe(recipe), head_bits)
    else:
        steps = api.recipe_from_options(
            method.value, given, weights=None if weights is None else weights.value, head_bits=head_bits
        )
    if target_format is not None:
        grid_flags = sorted("--" + k.replace("_", "-") for k in given if k in api.GRID_OPTIONS)
        if grid_flags:
            raise QuantlmError(f"--target-format sets each layer's grid: drop {', '.join(grid_flags)}")
        steps = api.target_recipe(steps, model, target_format)
        if not as_json:
            typer.echo(api.describe_target(model, target_format), err=True)
    calibration = api.Calibration(source=calib, n_samples=calib_samples, seqlen=calib_seqlen, seed=calib_seed)
    if steps.needs_calibration:
        calibration.check()
    _setup_threads()
    t0 = time.perf_counter()
    api.quantize_to_checkpoint(
        model,
        steps,
        out,
        calibration=calibration,
        dtype=_compute_dtype(dtype, verbose=False, rows=calib_seqlen).dtype,
        batch_size=batch_size,
        work_dir=work_dir,
        overwrite=overwrite,
        offload_activations=offload_activations,
        progress=not as_json,
        kv_cache=api.kv_cache_setting(kv_bits),
    )
    seconds = time.perf_counter() - t0
    qmodel = api.load(out)
    modules = api.quantized_modules(qmodel)
    summary = {
        "out": str(out),
        "recipe": steps.to_config(),
        "quantize_seconds": round(seconds, 2),
        "quantized_modules": len(modules),
        "quantized_weight_mb": round(sum(m.weight_bytes for m in modules.values()) / 1e6, 3),
        "checkpoint_mb": round(sum(f.stat().st_size for f in out.iterdir()) / 1e6, 3),
    }
    result = None
    if evaluate:
        result = api.evaluate(qmodel, tokenizer=api.load_tokenizer(out), max_windows=max_windows, progress=not as_json)
        summary.update(ppl=result.ppl, tokens=result.tokens)
    if report:
        summary["report"] = str(_write_quantize_report(out, seconds, result))
    if as_json:
        _print_json(summary)
        return
    typer.echo(
        f"{steps.describe()}: {len(modules)} modules in {seconds:.1f}s -> {out} ({summary['checkpoint_mb']:.1f} MB)"
    )
    typer.echo(summarize_log(qmodel.quantlm_record.log))
    if evaluate:
        typer.echo(f"perplexity {summary['ppl']:.3f} over {summary['tokens']} tokens")
    if report:
        typer.echo(f"report -> {summary['report']}")


def _write_quantize_report(out: Path, seconds: float, perplexity) -> Path:
    """The report of the quantize run that wrote the checkpoint ``out``, in ``OUT/report/`` (a directory, so the
    checkpoint's checksums, which cover its files, are unaffected); with ``--eval`` its perplexity."""
    import dataclasses

    from quantlm.report import gather_runs, measurement_from_dict, write_report

    measurements = []
    if perplexity is not None:
        measured = {"model": str(out), "data": "enwiki", **perplexity.to_dict()}
        measurements.append(measurement_from_dict(measured, "quantize --eval"))
    runs = gather_runs([str(out)], measurements=measurements)
    runs = [dataclasses.replace(run, quantize_seconds=seconds, seconds_from="the whole quantize run") for run in runs]
    return write_report(runs, out / REPORT_DIR)


def summarize_log(records: list[dict]) -> str:
    """A few lines on the quant log: error spread, the worst and slowest modules, any extra damping, what smoothing
    did and how many outlier columns LLM.int8() layers saw."""
    from quantlm.methods.base import method_quantizes_weights

    smoothed = [r for r in records if r.get("method") == "smoothquant"]
    scaled = [r for r in records if r.get("method") == "awq" and "alpha" in r.get("details", {})]
    records = [r for r in records if method_quantizes_weights(r.get("method"))]
    errors = [r for r in records if r.get("error") is not None]
    if not errors:
        return "quant log: empty"
    worst = max(errors, key=lambda r: r["error"])
    slowest = max(records, key=lambda r: r["seconds"])
    lines = []
    if smoothed:
        alphas = sorted({r["details"]["alpha"] for r in smoothed})
        top = max(smoothed, key=lambda r: r["details"]["act_absmax_before"])
        lines.append(
            f"smoothed {len(smoothed)} groups (alpha {alphas[0]:g}"
            + (f"-{alphas[-1]:g}" if len(alphas) > 1 else "")
            + f"); largest input |x| {top['details']['act_absmax_before']:.1f} "
            f"-> {top['details']['act_absmax_after']:.1f}"
            f" ({', '.join(top['details']['targets'])})"
        )
    if scaled:
        alphas = sorted(r["details"]["alpha"] for r in scaled)
        lines.append(
            f"awq: {len(scaled)} groups scaled (alpha {alphas[0]:g}-{alphas[-1]:g}, "
            f"median {alphas[len(alphas) // 2]:g})"
        )
    outliers = [r for r in records if "outlier_fraction_mean" in r.get("details", {})]
    if outliers:
        most = max(outliers, key=lambda r: r["details"]["outlier_fraction_mean"])
        mean = sum(r["details"]["outlier_fraction_mean"] for r in outliers) / len(outliers)
        lines.append(
            f"outlier input columns per calibration sequence: mean {100 * mean:.2f}% over layers, "
            f"most {100 * most['details']['outlier_fraction_mean']:.2f}% ({most['module']})"
        )
    lines += [
        f"relative weight error: mean {sum(r['error'] for r in errors) / len(errors):.4f}, "
        f"max {worst['error']:.4f} ({worst['module']})",
        f"time per module: total {sum(r['seconds'] for r in records):.1f}s, "
        f"slowest {slowest['seconds']:.2f}s ({slowest['module']})",
    ]
    damped = [r for r in records if r.get("details", {}).get("damp_raised")]
    if damped:
        lines.append(f"{len(damped)} modules needed more damping: {', '.join(r['module'] for r in damped[:5])}")
    tokens = {r.get("details", {}).get("hessian_tokens") for r in records} - {None}
    if tokens:
        lines.append(f"Hessian samples: {', '.join(str(t) for t in sorted(tokens))} tokens per module")
    return "\n".join(lines)


@app.command("eval")
@_friendly
def eval_cmd(
    model: str = typer.Argument(..., help="Alias, model directory, quantlm checkpoint, .gguf file or hub id."),
    tasks: Optional[str] = typer.Option(
        None,
        "--tasks",
        help="Zero-shot multiple-choice tasks, comma-separated, or all (the LLM-QAT paper's eight): piqa, hellaswag, "
        "arc_easy, arc_challenge, boolq, winogrande, siqa, openbookqa; their validation splits (lm-eval's ARC and "
        "OpenBookQA default to the test split). Scored by log-likelihood as lm-eval scores them (docs/evaluation.md).",
    ),
    limit: int = typer.Option(0, "--limit", help="With --tasks: score the first N documents of each task (0 = all)."),
    perplexity: Optional[bool] = typer.Option(
        None, "--perplexity/--no-perplexity", help="Measure perplexity [default: yes, unless --tasks is given]."
    ),
    data: str = typer.Option("enwiki", help="Text: a built-in name, a .txt/.jsonl file, or hf:NAME[:CONFIG]."),
    split: str = typer.Option("eval", help="Split of the text: eval or calibration."),
    seqlen: int = typer.Option(2048, help="Window length in tokens."),
    max_windows: int = typer.Option(32, help="Number of windows scored (0 = all)."),
    bos: Optional[bool] = typer.Option(
        None, "--bos/--no-bos", help="Prepend BOS to every window (default: per family)."
    ),
    batch_tokens: int = typer.Option(
        DEFAULT_BATCH_TOKENS,
        help="With --tasks: padded tokens per forward pass (more: faster on big machines, more memory).",
    ),
    dtype: DType = typer.Option(DType.auto, help=DTYPE_HELP),
    kernel: str = typer.Option("auto", help=KERNEL_HELP),
    quantize: Optional[str] = typer.Option(None, "--quantize", help=QUANTIZE_AT_LOAD_HELP),
    kv_bits: Optional[int] = typer.Option(
        None,
        "--kv-bits",
        help="Quantize the KV cache to 8 or 4 bits, or 16 for a float cache [default: as the checkpoint says].",
    ),
    adapter: Optional[Path] = typer.Option(
        None, "--adapter", help="LoRA adapters written by quantlm finetune for MODEL, applied unmerged."
    ),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
    as_json: bool = typer.Option(
        False, "--json", help='Print {"model": ..., "ppl": ..., "tasks": {"piqa": {"acc": ...}}} on stdout.'
    ),
) -> None:
    """Perplexity per the benchmark protocol (non-overlapping windows), and zero-shot task accuracy (--tasks)."""
    from quantlm.eval import tasks as task_data

    if seqlen < 2:
        _fail(f"--seqlen must be at least 2, got {seqlen}")
    if limit < 0 or batch_tokens < 1:
        _fail(f"--limit must be 0 or more and --batch-tokens at least 1, got {limit} and {batch_tokens}")
    task_names = task_data.parse_task_names(tasks) if tasks is not None else []
    with_ppl = perplexity if perplexity is not None else not task_names
    if not with_ppl and not task_names:
        _fail("--no-perplexity leaves nothing to measure: add --tasks")
    _setup_threads()
    t0 = time.perf_counter()
    if with_ppl:
        api.load_text(data, split)  # a bad text source fails before the model is loaded
    if task_names:
        task_data.task_data_root()  # so does missing task data
    if adapter is not None:
        from quantlm.finetune.adapters import read_adapter_info

        read_adapter_info(adapter)  # and an adapter directory that is not one
    kv = api.kv_cache_setting(kv_bits)
    compute = _compute_dtype(dtype, verbose, rows=seqlen if with_ppl else batch_tokens)
    lm, kernels, _ = _load_for_inference(model, compute, kernel, verbose, quantize=quantize)
    if kv_bits is not None:
        api.enable_kv_quantization(lm, kv)
    if adapter is not None:
        lm = api.load_adapters(lm, adapter).eval()
    tokenizer = api.load_tokenizer(model)
    summary: dict = {"model": _measured_model(model, quantize)}
    if adapter is not None:
        summary["adapter"] = str(adapter)
    if with_ppl:
        result = api.evaluate(
            lm,
            tokenizer=tokenizer,
            data=data,
            split=split,
            seqlen=seqlen,
            max_windows=max_windows or None,
            add_bos=bos,
            progress=not as_json,
        )
        summary.update(data=data, split=split, **result.to_dict())
        summary.pop("nll")
    if task_names:
        scored = api.evaluate_tasks(
            lm, task_names, tokenizer=tokenizer, limit=limit or None, batch_tokens=batch_tokens, progress=not as_json
        )
        summary["tasks"] = {name: r.to_dict() for name, r in scored.items()}
    seconds = time.perf_counter() - t0
    kv_now = getattr(lm, "quantlm_kv_config", None)
    summary.update(
        seconds=round(seconds, 2),
        dtype=compute.name,
        kernels=api.kernel_summary(kernels),
        kv_cache=None if kv_now is None else kv_now.describe(),
    )
    if as_json:
        _print_json(summary)
        return
    if with_ppl:
        typer.echo(
            f"perplexity {summary['ppl']:.4f} over {summary['tokens']} tokens ({summary['windows']} x "
            f"{summary['seqlen']})"
        )
    if task_names:
        typer.echo(api.format_task_table(scored))
    typer.echo(f"in {seconds:.1f}s ({compute.name})")


def _compute_dtype(dtype: DType, verbose: bool, rows: int):
    """The dtype ``--dtype`` stands for on this machine, for work that multiplies ``rows`` tokens at a time
    (``auto``: quantlm.hardware.choose_dtype); with ``verbose`` say on stderr which it is and why."""
    choice = api.choose_dtype(dtype.value, rows=rows)
    if verbose:
        typer.echo(f"dtype: {choice.describe()}; CPU {api.describe_cpu()}", err=True)
    return choice


def _measured_model(model: str, quantize: str | None) -> str:
    """What the JSON of eval/bench calls the model measured: with --quantize, the model and how it was quantized
    (``quantlm report`` keeps it apart from the float model's own measurements)."""
    return model if quantize is None else f"{model} --quantize {quantize}"


def _load_for_inference(
    model: str, compute, kernel: str, verbose: bool, attention: str = "auto", quantize: str | None = None
):
    """Load a model (quantized or dense; with ``quantize``, quantized as it loads) in the ``compute`` dtype with
    ``kernel`` and ``attention``; print each layer's kernel with ``verbose``."""
    if kernel not in api.KERNEL_CHOICES:
        raise QuantlmError(f"unknown kernel '{kernel}': choose one of {', '.join(api.KERNEL_CHOICES)}")
    t0 = time.perf_counter()
    lm = api.load(model, dtype=compute.dtype, kernel=kernel, attention=attention, quantize=quantize, progress=verbose)
    seconds = time.perf_counter() - t0
    kernels = getattr(lm, "quantlm_kernels", {})
    if verbose:
        for name, chosen in kernels.items():
            typer.echo(f"{name}\t{chosen}", err=True)
        typer.echo(
            f"kernels: {api.kernel_summary(kernels)}; attention {lm.config._attn_implementation}; "
            f"loaded in {seconds:.2f}s",
            err=True,
        )
    return lm, kernels, seconds


@app.command()
@_friendly
def generate(
    model: str = typer.Argument(..., help="Alias, model directory, quantlm checkpoint, .gguf file or hub id."),
    prompt: str = typer.Option(..., help="The text to continue."),
    max_new_tokens: int = typer.Option(64, help="How many tokens to generate."),
    sample: bool = typer.Option(False, "--sample/--greedy", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, help="With --sample."),
    top_p: float = typer.Option(1.0, help="With --sample."),
    seed: int = typer.Option(0, help="Random seed for sampling."),
    dtype: DType = typer.Option(DType.auto, help=DTYPE_HELP),
    kernel: str = typer.Option("auto", help=KERNEL_HELP),
    attention: str = typer.Option("auto", help=ATTENTION_HELP),
    quantize: Optional[str] = typer.Option(None, "--quantize", help=QUANTIZE_AT_LOAD_HELP),
    compile: bool = typer.Option(
        False, "--compile", help="Static KV cache and a torch.compile'd forward (slow first call)."
    ),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
    as_json: bool = typer.Option(False, "--json", help='Print {"text": ...} on stdout instead of streaming.'),
) -> None:
    """Continue a prompt with a full-precision or quantized model, streaming the tokens."""

    if max_new_tokens < 1:
        _fail(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    _setup_threads()
    tokenizer = api.load_tokenizer(model)
    lm, _, _ = _load_for_inference(
        model, _compute_dtype(dtype, verbose, rows=1), kernel, verbose, attention, quantize=quantize
    )
    prompt_tokens = len(tokenizer(prompt)["input_ids"])
    api.check_generation_request(lm, prompt_tokens, max_new_tokens, sample, temperature, top_p)
    if not as_json:
        typer.echo(prompt, nl=False)
    text = api.generate_text(
        lm,
        tokenizer,
        prompt,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stream=not as_json,
        compile=compile,
    )
    if as_json:
        _print_json({"prompt": prompt, "text": text})
    else:
        typer.echo()


@app.command()
@_friendly
def bench(
    model: str = typer.Argument(..., help="Alias, model directory or quantlm checkpoint."),
    dtype: DType = typer.Option(DType.auto, help=DTYPE_HELP),
    kernel: str = typer.Option("auto", help=KERNEL_HELP),
    attention: str = typer.Option("auto", help=ATTENTION_HELP),
    quantize: Optional[str] = typer.Option(None, "--quantize", help=QUANTIZE_AT_LOAD_HELP),
    compile: bool = typer.Option(
        False, "--compile", help="Decode with a static KV cache and a torch.compile'd forward."
    ),
    prefill_tokens: int = typer.Option(2048, help="Prompt length of the prefill measurement."),
    decode_prompt: int = typer.Option(128, help="Prompt length of the decode measurement."),
    decode_tokens: int = typer.Option(128, help="New tokens of the decode measurement."),
    repeats: int = typer.Option(3, help="Timed runs of each (after one warm-up); the median is reported."),
    data: str = typer.Option("enwiki", help="Text the prompts are cut from (its eval split)."),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON on stdout."),
) -> None:
    """Prefill and decode tokens/s, weight bytes and peak memory of a model (docs/benchmarks.md protocol)."""

    for flag, value, least in (
        ("--prefill-tokens", prefill_tokens, 1),
        ("--decode-prompt", decode_prompt, 1),
        ("--decode-tokens", decode_tokens, 2),
        ("--repeats", repeats, 1),
    ):
        if value < least:
            _fail(f"{flag} must be at least {least}, got {value}")
    _setup_threads()
    tokenizer = api.load_tokenizer(model)
    api.load_text(data, "eval")  # a bad text source fails before the model is loaded
    # each phase in the dtype auto takes for it: on CPUs without bf16 instructions decoding (one row per matmul)
    # can pay in bf16 while prefill (many rows) is several times slower there
    prefill_dtype = _compute_dtype(dtype, verbose, rows=prefill_tokens)
    decode_dtype = _compute_dtype(dtype, verbose, rows=1)
    lm, kernels, load_seconds = _load_for_inference(model, prefill_dtype, kernel, verbose, attention, quantize=quantize)

    def to_decode_dtype(lm) -> None:
        if decode_dtype.dtype != prefill_dtype.dtype:
            api.recast(lm, decode_dtype.dtype, kernel=kernel, attention=attention)

    report = api.measure_speed(
        lm,
        tokenizer,
        prefill_tokens=prefill_tokens,
        decode_prompt=decode_prompt,
        decode_tokens=decode_tokens,
        repeats=repeats,
        compile=compile,
        text=data,
        before_decode=to_decode_dtype,
    )
    report.extra.update(
        model=_measured_model(model, quantize),
        load_seconds=round(load_seconds, 3),
        kernels=api.kernel_summary(getattr(lm, "quantlm_kernels", kernels)),
        attention=lm.config._attn_implementation,
    )
    if as_json:
        _print_json({"model": _measured_model(model, quantize), **report.to_dict()})
        return
    w = report.weight_bytes
    typer.echo(
        f"{model} ({_dtypes(report)}, {report.extra['kernels']}, attention {report.extra['attention']}, "
        f"{report.threads} threads{', compiled' if compile else ''})"
    )
    typer.echo(
        f"prefill {report.prefill_tok_s:8.1f} tok/s  ({report.prefill_tokens}-token prompt, median of {repeats})"
    )
    typer.echo(
        f"decode  {report.decode_tok_s:8.1f} tok/s  ({report.decode_prompt}-token prompt, {report.decode_tokens} new, "
        f"median of {repeats}; bandwidth bound {report.decode_bound_tok_s:.1f} tok/s = "
        f"{report.bytes_per_token / 1e6:.1f} MB per token at {report.bandwidth_gb_s:.1f} GB/s)"
    )
    typer.echo(
        f"weights {w['total'] / 1e6:8.1f} MB stored (quantized Linears {w['quantized_linear'] / 1e6:.1f} MB, "
        f"{w['quantized_linear'] / max(w['quantized_linear_bf16'], 1):.2f}x their bf16 size); "
        f"load {load_seconds:.2f}s; "
        f"peak RSS {report.peak_rss_gb:.2f} GB"
    )


@app.command()
@_friendly
def report(
    runs: Optional[list[str]] = typer.Argument(
        None,
        metavar="RUN",
        help="Checkpoint directories, model directories or aliases, and .json files that `quantlm eval --json` or "
        '`quantlm bench --json` printed (each joins the run its "model" names).',
        show_default=False,
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The report directory (report.md, report.json, PNG plots)."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it is an earlier report (or an empty directory)."),
    label: Optional[list[str]] = typer.Option(
        None, "--label", help="RUN=TEXT: call that run TEXT in the tables and plots (repeatable)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Write a Markdown report with plots (perplexity against size, quantization error across depth, speed) of
    checkpoints and models, from their quant logs and saved eval/bench JSON (docs/report.md)."""
    from quantlm.report import check_report_output, gather_runs, write_report

    check_report_output(out, overwrite)  # before reading anything (checked again when written)
    gathered = gather_runs(runs or [], labels=_parse_labels(label or []))
    path = write_report(gathered, out, overwrite=overwrite)
    plots = sorted(p.name for p in out.glob("*.png"))
    if as_json:
        _print_json({"report": str(path), "runs": [run.label for run in gathered], "plots": plots})
        return
    typer.echo(f"{len(gathered)} run{'s' if len(gathered) != 1 else ''}, plots: {', '.join(plots) or 'none'} -> {path}")


def _parse_labels(pairs: list[str]) -> dict[str, str]:
    """``--label RUN=TEXT`` options as {RUN: TEXT}."""
    labels = {}
    for pair in pairs:
        run, sep, text = pair.partition("=")
        if not sep or not run or not text.strip():
            raise QuantlmError(f"--label wants RUN=TEXT (e.g. --label out/w4=GPTQ-w4), got '{pair}'")
        labels[run] = text.strip()
    return labels


def _dtypes(report) -> str:
    if report.prefill_dtype and report.prefill_dtype != report.dtype:
        return f"prefill {report.prefill_dtype}, decode {report.dtype}"
    return report.dtype


@app.command()
@_friendly
def models(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the built-in model aliases."""
    if as_json:
        _print_json({a.name: a.description for a in api.ALIASES.values()})
    else:
        for a in api.ALIASES.values():
            typer.echo(f"{a.name}\t{a.description}")


@app.command()
@_friendly
def export(
    checkpoint: str = typer.Argument(..., help="A quantlm checkpoint directory (for gguf, also any float model)."),
    format: str = typer.Option(
        "gptq",
        "--format",
        help="gptq (v1 when every layer is symmetric, else gptq_v2), gptq-v2, compressed-tensors (pack-quantized; "
        "int-quantized for W8A8), or gguf (llama.cpp's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0). docs/export.md says who reads each.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The directory to write (for gguf: a .gguf file)."),
    gguf_type: str = typer.Option("f32", help="gguf: the type of float tensors, f32, f16 or bf16."),
    overwrite: bool = typer.Option(False, help="Replace an earlier export at --out."),
) -> None:
    """Write a model in another runtime's format: the same codes, scales and zero points, bit for bit. A layer the
    format cannot hold exactly is refused in one line (nothing is re-rounded)."""
    if format not in api.EXPORT_FORMAT_NAMES:
        raise QuantlmError(f"unknown --format {format!r}: use one of {', '.join(api.EXPORT_FORMAT_NAMES)}")
    path = api.export(checkpoint, out, format=format, overwrite=overwrite, gguf_type=gguf_type)
    typer.echo(f"wrote {path} ({format})")


@app.command()
@_friendly
def verify(checkpoint: Path = typer.Argument(..., help="A quantlm checkpoint directory.")) -> None:
    """Check a checkpoint: every file against its recorded checksum, the tensors against the config, finite
    scales, and that the model loads. Exit 0, or one line per problem and exit 2."""
    problems = api.verify(checkpoint)
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    if problems:
        raise typer.Exit(2)
    typer.echo(f"{checkpoint}: ok")


@app.command()
@_friendly
def methods(
    markdown: bool = typer.Option(False, "--markdown", help="Print docs/methods.md (every method's settings)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List the quantization methods and their settings (from the method registry)."""
    if markdown:
        typer.echo(api.catalog_markdown())
    elif as_json:
        _print_json(api.catalog())
    else:
        for name, entry in api.catalog().items():
            typer.echo(f"{name}\t{entry['summary']}")


@app.command()
@_friendly
def data(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the built-in text sources."""
    if as_json:
        _print_json({t.name: t.description for t in api.BUILTIN_TEXTS.values()})
    else:
        for t in api.BUILTIN_TEXTS.values():
            typer.echo(f"{t.name}\t{t.description}")


_FAST, _FULL = QUICKSTART_PRESETS["fast"], QUICKSTART_PRESETS["full"]


@app.command()
@_friendly
def quickstart(
    model: str = typer.Option("smollm2-135m", help="Model to quantize."),
    out: Path = typer.Option(Path("out/quickstart"), help="Where the quantized checkpoint goes (replaced)."),
    full: bool = typer.Option(
        False,
        "--full",
        help=f"The benchmark protocol: {_FULL.calib_samples} x 2048 calibration, {_FULL.max_windows} x 2048 "
        f"evaluation ({_FULL.note}).",
    ),
    max_windows: Optional[int] = typer.Option(
        None, help=f"Evaluation windows of 2048 tokens (default {_FAST.max_windows}; {_FULL.max_windows} with --full)."
    ),
    calib_samples: Optional[int] = typer.Option(
        None,
        help="Calibration windows of 2048 tokens (fewer: faster, less accurate) "
        f"(default {_FAST.calib_samples}; {_FULL.calib_samples} with --full).",
    ),
    dtype: DType = typer.Option(DType.auto, help=DTYPE_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Quantize the default model with the best recipe and print size, perplexity and time (fast by default: a first
    result within minutes; --full for the benchmark protocol)."""
    from quantlm import quickstart as qs  # the main job of a fresh checkout

    preset = qs.PRESETS["full" if full else "fast"]
    calib_samples = preset.calib_samples if calib_samples is None else calib_samples
    max_windows = preset.max_windows if max_windows is None else max_windows
    if calib_samples < 1 or max_windows < 1:
        raise QuantlmError(f"--calib-samples and --max-windows must be at least 1, got {calib_samples}, {max_windows}")
    _setup_threads()
    rows = qs.run(model=model, out=out, max_windows=max_windows, calib_samples=calib_samples, dtype=dtype.value)
    if as_json:
        typer.echo(qs.rows_to_json(rows))
        return
    typer.echo(qs.format_table(rows))
    typer.echo(f"\nthe quantized row: {qs.recipe_command(model, out, calib_samples)}")
    typer.echo(
        f"perplexity: enwiki eval split, {max_windows} x 2048 tokens, computed in {rows[-1].dtype} "
        f"(quantlm eval {out} --max-windows {max_windows})"
    )
    if not full:
        typer.echo(f"this was the fast preset ({preset.note}); the full protocol: quantlm quickstart --full")


class GenMode(str, Enum):
    hybrid = "hybrid"
    greedy = "greedy"
    sample = "sample"


class Loss(str, Enum):
    kd = "kd"
    ce = "ce"


WeightRange = Enum("WeightRange", {c: c for c in api.QAT_WEIGHT_CLIPS}, type=str)
ActClip = Enum("ActClip", {c: c for c in api.QAT_ACT_CLIPS}, type=str)
InitOffsets = Enum("InitOffsets", {c: c for c in INIT_OFFSETS}, type=str)


@app.command("generate-data")
@_friendly
def generate_data(
    model: str = typer.Argument(..., help="Alias, model directory, .gguf file or hub id (the full-precision model)."),
    out: Path = typer.Option(..., "--out", "-o", help="The jsonl file to write (or to complete, when rerun)."),
    samples: int = typer.Option(
        512, "--samples", help="How many samples (rerun with more to extend a file written with fewer)."
    ),
    max_length: int = typer.Option(512, help="Tokens per sample at most (a sample also ends at end-of-sequence)."),
    greedy_tokens: str = typer.Option(
        "3-5", help="Top-1 tokens after the random first one: a count or a range (drawn per sample)."
    ),
    mode: GenMode = typer.Option(
        GenMode.hybrid, help="hybrid (greedy first tokens, then sampled: the paper's), greedy or sample."
    ),
    batch_size: int = typer.Option(64, help="Samples generated together."),
    seed: int = typer.Option(0, help="Seed of the first tokens and of the sampling."),
    dtype: DType = typer.Option(DType.auto, help=DTYPE_HELP),
    verbose: bool = typer.Option(False, "--verbose", help="Say which dtype was taken and why (stderr)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """LLM-QAT's data-free training text: MODEL writes its own samples (token ids, one jsonl line each)."""

    settings = api.GenerationSettings(
        n_samples=samples,
        max_length=max_length,
        greedy_tokens=api.parse_greedy_tokens(greedy_tokens),
        mode=mode.value,
        batch_size=batch_size,
        seed=seed,
    )
    _setup_threads()
    tokenizer = api.load_tokenizer(model)
    compute = _compute_dtype(dtype, verbose, rows=batch_size)
    lm = api.load_float_model(model, dtype=compute.dtype)
    t0 = time.perf_counter()
    api.generate_training_data(lm, tokenizer, out, settings, progress=not as_json)
    rows = api.read_samples(out)
    summary = {
        "out": str(out),
        "samples": len(rows),
        "tokens": sum(len(r) for r in rows),
        "seconds": round(time.perf_counter() - t0, 1),
        "dtype": compute.name,
        "settings": settings.to_dict(),
    }
    if as_json:
        _print_json(summary)
    else:
        typer.echo(f"{summary['samples']} samples, {summary['tokens']} tokens -> {out} ({summary['seconds']}s)")


@app.command()
@_friendly
def qat(
    model: str = typer.Argument(..., help="Alias, model directory, .gguf file or hub id (the full-precision teacher)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint directory (the converted quantized model)."),
    data: str = typer.Option(
        "enwiki", help="Training text: a jsonl file from generate-data, or a text source (its calibration split)."
    ),
    w_bits: Optional[int] = typer.Option(None, "--w-bits", help="Weight bits (16: full precision) [default: 4]."),
    a_bits: Optional[int] = typer.Option(
        None, "--a-bits", help="Activation bits, per token (16: full precision) [default: 8]."
    ),
    kv_bits: Optional[int] = typer.Option(
        None, "--kv-bits", help="KV-cache bits, per token (16: full precision) [default: 4]."
    ),
    group_size: Optional[int] = typer.Option(
        None,
        "--group-size",
        "-g",
        help="Weight columns per group; -1 = per output channel (the paper's) [default: -1].",
    ),
    sym: Optional[bool] = typer.Option(
        None, "--sym/--asym", help="Symmetric (MinMax, the paper's) or asymmetric weight grids [default: sym]."
    ),
    learnable_clip: bool = typer.Option(
        False, "--learnable-clip", help="Train the weight scales too (LSQ-style clipping)."
    ),
    clip: Optional[WeightRange] = typer.Option(
        None,
        help="Weight range, recomputed every step: none (MinMax, the paper's) or stats (2 x mean|w| per channel, "
        "StatsQ) [default: none].",
    ),
    act_clip: Optional[ActClip] = typer.Option(
        None,
        help="Activation grid: minmax (per token, the paper's) or lsq (one learned step per layer, static) "
        "[default: minmax].",
    ),
    init: Optional[Path] = typer.Option(
        None,
        help="Start from this quantlm checkpoint (RTN or GPTQ of MODEL, same weight grid) instead of the float "
        "weights.",
    ),
    init_offsets: Optional[InitOffsets] = typer.Option(
        None,
        "--init-offsets",
        help="With --init: where each trained weight starts inside its code's bin: centre (the checkpoint's "
        "dequantized weight), or float (the point of the bin nearest the float weight, so that small updates can "
        f"change codes) [default: {DEFAULT_INIT_OFFSETS}].",
    ),
    smooth_alpha: Optional[str] = typer.Option(
        None,
        "--smooth-alpha",
        help="Start from the model smoothed by SmoothQuant with this alpha: a number in [0, 1], or auto (searched per "
        "layer group for the W and A bits), calibrated on the first training windows [default: no smoothing].",
    ),
    smooth_folds: Optional[str] = typer.Option(
        None, "--smooth-folds", help="With --smooth-alpha: where scales are folded, a comma list of norm, v-o, up-down."
    ),
    steps: int = typer.Option(QAT_TRAINING.steps, help="Optimizer steps."),
    batch_size: int = typer.Option(QAT_TRAINING.batch_size, help="Windows per micro-batch (per process)."),
    grad_accum: int = typer.Option(QAT_TRAINING.grad_accum, help="Micro-batches per optimizer step."),
    seqlen: int = typer.Option(512, help="Tokens per training window."),
    lr: float = typer.Option(QAT_TRAINING.lr, help="Peak learning rate (AdamW, cosine decay)."),
    warmup: int = typer.Option(QAT_TRAINING.warmup_steps, help="Linear warmup steps."),
    weight_decay: float = typer.Option(QAT_TRAINING.weight_decay, help="AdamW weight decay."),
    loss: Loss = typer.Option(
        Loss(QAT_TRAINING.loss), help="kd: distill the teacher's logits (the paper's); ce: next-token cross-entropy."
    ),
    dtype: TrainDType = typer.Option(
        TrainDType(QAT_TRAINING.dtype),
        help="Autocast dtype of the forward passes: auto (bfloat16 where this CPU runs it natively and a one-off probe "
        "finds it faster for training-sized matmuls, else float32), bfloat16 or float32 (no autocast).",
    ),
    gradient_checkpointing: bool = typer.Option(
        QAT_TRAINING.gradient_checkpointing,
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute each block's activations in the backward pass: about half the peak memory, for 0-19% more "
        "time per step in the CPU runs measured so far (docs/qat.md).",
    ),
    save_every: int = typer.Option(
        QAT_TRAINING.save_every, help="Save the training state every N steps (rerun to resume)."
    ),
    fsdp: bool = typer.Option(
        False, "--fsdp", help="Under torchrun: shard the model across the processes (FSDP2) instead of DDP."
    ),
    seed: int = typer.Option(QAT_TRAINING.seed, help="Seed of the data order."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    evaluate: bool = typer.Option(False, "--eval", help="Measure perplexity (enwiki eval) of the result."),
    max_windows: int = typer.Option(32, help="With --eval: number of 2048-token windows."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """LLM-QAT: train MODEL fake-quantized (W-A-KV bits) by distillation, then save it as a real quantized model.

    Runs on many processes with torchrun (DDP; gloo on CPU, nccl on CUDA)."""

    api.check_output(out, overwrite)  # before any work (the run checks again under the output lock)
    config = api.QATConfig.from_options(
        w_bits=w_bits,
        a_bits=a_bits,
        kv_bits=kv_bits,
        group_size=group_size,
        symmetric=sym,
        learnable_clip=learnable_clip,
        clip=clip and clip.value,
        act_clip=act_clip and act_clip.value,
        smooth_alpha=smooth_alpha,
        smooth_folds=smooth_folds,
    )
    settings = api.TrainSettings(
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup_steps=warmup,
        weight_decay=weight_decay,
        loss=loss.value,
        dtype=dtype.value,
        gradient_checkpointing=gradient_checkpointing,
        save_every=save_every,
        seed=seed,
        fsdp=fsdp,
    )
    if not str(data).endswith(".jsonl"):
        api.load_text(data, "calibration")
    _setup_threads()
    t0 = time.perf_counter()
    api.qat_to_checkpoint(
        model,
        out,
        config,
        settings,
        data=data,
        seqlen=seqlen,
        init=init,
        init_offsets=init_offsets and init_offsets.value,
        overwrite=overwrite,
        progress=not as_json,
    )
    seconds = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) != 0:
        return
    record = api.read_record(out)
    summary = {
        "out": str(out),
        "bits": str(config.bits),
        "seconds": round(seconds, 1),
        "recipe": record.recipe,
        "training": record.training,
    }
    if evaluate:
        qmodel = api.load(out)
        result = api.evaluate(qmodel, tokenizer=api.load_tokenizer(out), max_windows=max_windows, progress=not as_json)
        summary.update(ppl=result.ppl, tokens=result.tokens)
    if as_json:
        _print_json(summary)
        return
    typer.echo(f"QAT {config.bits} in {seconds:.1f}s ({summary['training'].get('compute_dtype')}) -> {out}")
    if evaluate:
        typer.echo(f"perplexity {summary['ppl']:.3f} over {summary['tokens']} tokens")


MergeMode = Enum("MergeMode", {name: name for name in MERGE_MODES}, type=str)
LoraInit = Enum("LoraInit", {name: name for name in LORA_INITS}, type=str)


@app.command()
@_friendly
def finetune(
    checkpoint: str = typer.Argument(
        ..., help="A quantized quantlm checkpoint (the frozen base); with --float-base, any float model source."
    ),
    data: str = typer.Option(
        ...,
        help="Domain text: a .txt/.jsonl file (its last 10% of characters held out) or a built-in text such as "
        "tiny-shakespeare (its eval split held out).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Adapter directory (peft's format; --merge adds OUT/merged)."),
    lora_r: int = typer.Option(FINETUNE_LORA.r, "--lora-r", help="Adapter rank."),
    lora_alpha: float = typer.Option(
        FINETUNE_LORA.alpha, "--lora-alpha", help="Adapter scale numerator (scale = alpha / r)."
    ),
    lora_dropout: float = typer.Option(FINETUNE_LORA.dropout, "--lora-dropout", help="Dropout on the adapters' input."),
    targets: str = typer.Option(
        FINETUNE_LORA.targets, help="Layers that get adapters: all, attn, mlp, or names such as q_proj,v_proj."
    ),
    pooled: bool = typer.Option(
        FINETUNE_LORA.pooled,
        "--pooled",
        help="QA-LoRA group-pooled adapters: they fold exactly into the zero points (what --merge exact needs).",
    ),
    merge: MergeMode = typer.Option(
        MergeMode.none,
        help="Also write a merged model: float (dequantized + adapters), requant (the base's own recipe run again on "
        "its calibration) or exact (pooled adapters folded into the zero points: stays low-bit).",
    ),
    float_base: bool = typer.Option(
        False, "--float-base", help="CHECKPOINT is a float model: plain LoRA (the reference QAF is compared with)."
    ),
    lora_init: LoraInit = typer.Option(
        LoraInit(FINETUNE_LORA.init),
        "--lora-init",
        help="How adapters on quantized layers start: cloq (the rank-r correction of the rounding error that is best "
        "on the first training windows' inputs), loftq (best on the weights alone), default (peft's: B = 0), or auto "
        "(cloq where the base's weights are the float model's rounded, else default).",
    ),
    float_model: Optional[str] = typer.Option(
        None,
        "--float-model",
        help="The float model the checkpoint was made from, for the cloq/loftq start (default: the one its config "
        "records).",
    ),
    steps: int = typer.Option(FINETUNE_TRAINING.steps, help="Optimizer steps."),
    batch_size: int = typer.Option(FINETUNE_TRAINING.batch_size, help="Windows per micro-batch (per process)."),
    grad_accum: int = typer.Option(FINETUNE_TRAINING.grad_accum, help="Micro-batches per optimizer step."),
    seqlen: int = typer.Option(FINETUNE_SEQLEN, help="Tokens per training (and held-out) window."),
    lr: float = typer.Option(FINETUNE_TRAINING.lr, help="Peak learning rate (AdamW, cosine decay)."),
    warmup: int = typer.Option(FINETUNE_TRAINING.warmup_steps, help="Linear warmup steps."),
    weight_decay: float = typer.Option(FINETUNE_TRAINING.weight_decay, help="AdamW weight decay."),
    dtype: TrainDType = typer.Option(
        TrainDType(FINETUNE_TRAINING.dtype),
        help="Autocast dtype: auto (bfloat16 only where this CPU runs it natively and a probe finds it faster), "
        "bfloat16 or float32.",
    ),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="Recompute activations in the backward pass (less memory, slower)."
    ),
    save_every: int = typer.Option(
        FINETUNE_TRAINING.save_every, help="Save the training state every N steps (rerun the command to resume)."
    ),
    seed: int = typer.Option(
        FINETUNE_TRAINING.seed, help="Seed of the data order, the adapters' initialization and dropout."
    ),
    resume: bool = typer.Option(
        True, "--resume/--no-resume", help="Continue from OUT's saved training state, if any (else start over)."
    ),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """QAF: train LoRA adapters on a frozen quantized model (QLoRA-style, through peft) and optionally merge them.

    Runs on many processes with torchrun (DDP; gloo on CPU, nccl on CUDA)."""
    from quantlm.finetune.adapters import check_adapter_output
    from quantlm.finetune.run import finetune as run_finetune

    check_adapter_output(out, overwrite)  # before any work (the run checks again under the output lock)
    lora = LoraSettings(
        r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=targets, pooled=pooled, init=lora_init.value
    )
    settings = dataclasses.replace(
        FINETUNE_TRAINING,
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup_steps=warmup,
        weight_decay=weight_decay,
        dtype=dtype.value,
        gradient_checkpointing=gradient_checkpointing,
        save_every=save_every,
        seed=seed,
    )
    _setup_threads()
    result = run_finetune(
        checkpoint,
        data,
        out,
        lora,
        settings,
        seqlen=seqlen,
        merge=merge.value,
        float_base=float_base,
        float_model=float_model,
        resume=resume,
        overwrite=overwrite,
        progress=not as_json,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return
    losses = result.training.losses
    summary = {
        "out": str(result.out),
        "merged": None if result.merged is None else str(result.merged),
        "steps": settings.steps,
        "resumed_from": result.training.resumed_from,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "seconds": round(result.training.seconds, 1),
        "tokens": result.training.tokens,
        "compute_dtype": result.training.dtype,
        "held_out_perplexity": result.held_out,
        "lora_init": result.lora_init,
    }
    if as_json:
        _print_json(summary)
        return
    loss_text = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, " if losses else ""
    seconds = summary["seconds"]
    typer.echo(f"fine-tuned {settings.steps} steps in {seconds}s ({loss_text}{result.training.dtype}) -> {result.out}")
    for name, ppl in result.held_out.items():
        typer.echo(f"held-out perplexity ({name}): {ppl:.3f}")
    if result.merged is not None:
        typer.echo(f"merged ({merge.value}) -> {result.merged}")


def main() -> None:
    """Run the command; a usage error (a missing argument, an unknown option, a bad choice) is one line on stderr
    that names ``--help``, with exit code 2, instead of the usage block."""
    try:
        from typer._click.exceptions import UsageError  # typer vendors click (0.2x)
    except ImportError:  # pragma: no cover - older typer on plain click
        from click.exceptions import UsageError

    command = typer.main.get_command(app)
    try:
        code = command.main(standalone_mode=False)
    except UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else "quantlm"
        typer.echo(f"error: {e.format_message()} (see {where} --help)", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("error: interrupted", err=True)
        sys.exit(2)
    except BrokenPipeError:  # e.g. piped into head
        sys.exit(0)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
