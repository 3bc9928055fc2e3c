"""The ``gora`` command: ``init`` (estimate and save a state), ``inspect``, ``export``, ``bench``, ``demo``.

Only the standard library is imported here; torch, transformers, peft and matplotlib load inside
the verbs, so ``gora --help`` answers at once. Errors of the gora family print their message and
exit with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import __version__
from .atomic import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    META_FILE,
    RANK_PLOT_FILE,
    SIDECAR_FILE,
    TENSOR_FILE,
    atomic_directory,
    check_output_directory,
)
from .errors import GoraConfigError, GoraDataError, GoraError, GoraStateError, GoraUnsupportedError

logger = logging.getLogger("gora.cli")
PASSTHROUGH = ("bench", "demo")  # verbs whose options belong to gora.bench
SHARD_NAME = re.compile(r"model-\d+-of-\d+\.safetensors")
MODEL_CLASSES = {"seq-cls": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM"}
PEFT_TO_TASK = {"SEQ_CLS": "seq-cls", "CAUSAL_LM": "causal-lm"}
DTYPES = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model")

DESCRIPTION = """GoRA (gradient-driven adaptive LoRA) for Hugging Face PEFT.

  gora init MODEL DATA -o STATE     estimate ranks and initialisation, save a GoraState
  gora inspect STATE_OR_ADAPTER     rank table, budget, and a PNG of ranks per layer x module type
  gora export MODEL STATE -o OUT    a PEFT adapter (--portable, default; --native) or a merged model (--merged)
  gora bench ... / gora demo ...    GoRA vs LoRA benchmarks (gora.bench)

Models are local directories (save_pretrained); nothing is downloaded."""


# -- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gora", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO level)")
    parser.add_argument("-V", "--version", action="version", version=f"gora {__version__}",
                        help="print gora's version and exit")
    verbs = parser.add_subparsers(dest="verb", metavar="{init,inspect,export,bench,demo}")
    _add_init(verbs)
    _add_inspect(verbs)
    _add_export(verbs)
    verbs.add_parser("bench", add_help=False, help="run GoRA-vs-LoRA benchmarks (options: gora bench --help)")
    verbs.add_parser("demo", add_help=False, help="a short GoRA-vs-LoRA demo on CPU (options: gora demo --help)")
    return parser


def _add_init(verbs) -> None:
    p = verbs.add_parser("init", help="estimate GoRA's ranks and initialisation; save a GoraState",
                         description="Run GoRA's gradient estimation on MODEL with batches from DATA and save the "
                                     "state (ranks, importances, A and C per layer) to --output.")
    p.add_argument("model", help="local model directory (written by save_pretrained)")
    p.add_argument("data", help="CSV/TSV or JSONL with a 'text' column (optional 'text_pair'; 'label' for "
                                "classification), or a plain text file (one document per line) for a causal LM")
    p.add_argument("-o", "--output", required=True, help="directory to write the GoraState to (replaced atomically)")
    p.add_argument("--task", choices=("auto", "seq-cls", "causal-lm"), default="auto",
                   help="seq-cls: sequence classification (needs 'label'); causal-lm: next-token loss; "
                        "auto: seq-cls when the data has labels (default)")
    p.add_argument("--r", type=int, default=8, help="LoRA reference rank r; the budget is LoRA's at rank r (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="lora_alpha; scaling is alpha/sqrt(r_i) (default 16)")
    p.add_argument("--targets", default="all-linear",
                   help="comma-separated module names or dotted suffixes (e.g. query,key,value,dense), "
                        "or 'all-linear' (default; the head is left out)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per estimation batch (default 8)")
    p.add_argument("--max-length", type=int, default=128, help="truncate inputs to this many tokens (default 128)")
    _add_gora_options(p.add_argument_group("GoRA settings (GoraConfig's fields)"))
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load the model in (default float32)")
    _add_no_progress(p)
    p.set_defaults(run=cmd_init)


CLI_EXCLUDED_FIELDS = {"extra": "gora init writes its own notes there (model, data, LoRA settings)",
                       "show_progress": "given as --no-progress, shared with gora export"}
"""GoraConfig fields with no ``gora init`` option of their own, and why."""
CLI_FIELD_NOTES = {"seed": "gora init also seeds the batch shuffle and a new head with it."}
"""What the CLI adds to a field's docstring (never a default or a choice list: those come from GoraConfig)."""


def gora_option_fields() -> list[Any]:
    """The GoraConfig fields that ``gora init`` offers as options, in the dataclass's order."""
    import dataclasses

    from .config import GoraConfig

    return [f for f in dataclasses.fields(GoraConfig) if f.name not in CLI_EXCLUDED_FIELDS]


def _add_gora_options(p) -> None:
    """One option per GoraConfig field, its type, default, choices and help read from the dataclass, so a new
    field or a changed default reaches ``gora init`` without an edit here."""
    import typing

    from .config import GoraConfig, field_default, field_docs

    hints, docs = typing.get_type_hints(GoraConfig), field_docs()
    for spec in gora_option_fields():
        name, default = spec.name, field_default(spec.name)
        kind = hints[name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        text = " ".join(filter(None, (docs[name].replace("``", ""), CLI_FIELD_NOTES.get(name))))
        options: dict[str, Any] = {"default": default, "dest": name}
        if kind is bool and default is False:
            options["action"] = "store_true"
        elif kind is bool or (args == [bool]):
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is typing.Literal:
            options["choices"] = typing.get_args(kind)
        elif args and typing.get_origin(args[0]) is list:
            options.update(nargs="+", type=typing.get_args(args[0])[0], metavar="VALUE")
        else:
            options["type"] = args[0] if args else kind
        if not (kind is bool and default is False):
            text += f" (default: {default})"
        p.add_argument("--" + name.replace("_", "-"), help=text.replace("%", "%%"), **options)


def _add_inspect(verbs) -> None:
    p = verbs.add_parser("inspect", help="rank table, budget and a rank plot of a state or an exported adapter",
                         description="Print the rank table and budget of a GoraState directory or of an adapter "
                                     "directory with a gora_config.json sidecar, and plot ranks per layer.")
    p.add_argument("path", help="a GoraState directory (gora init) or an adapter directory (gora export)")
    p.add_argument("--plot", default=None,
                   help=f"image to write; PNG unless the name ends in another format matplotlib writes, e.g. .pdf "
                        f"or .svg (default: PATH/{RANK_PLOT_FILE})")
    p.add_argument("--no-plot", action="store_true", help="print the table only")
    p.add_argument("--json", action="store_true", help="print ranks, importances and budget as JSON instead")
    p.set_defaults(run=cmd_inspect)


def _add_export(verbs) -> None:
    p = verbs.add_parser("export", help="write a PEFT adapter or a merged model from MODEL and a state",
                         description="Apply SOURCE (a GoraState directory, or a trained adapter directory) to "
                                     "MODEL and write an adapter or a merged model to --output.")
    p.add_argument("model", help="local base-model directory (the one the state was estimated on)")
    p.add_argument("source", help="a GoraState directory (gora init) or a PEFT adapter directory (after training)")
    p.add_argument("-o", "--output", required=True, help="directory to write (replaced atomically; a directory "
                                                           "holding anything else is refused)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--portable", dest="form", action="store_const", const="portable",
                      help="adapter that vanilla PEFT and vLLM read alike: r = max rank, scaling folded into "
                           "lora_B, use_rslora false (default)")
    form.add_argument("--native", dest="form", action="store_const", const="native",
                      help="adapter as PEFT saves it (rsLoRA, rank_pattern); for further training")
    form.add_argument("--merged", dest="form", action="store_const", const="merged",
                      help="full model with the adapter merged into the weights (merge_and_unload)")
    p.set_defaults(form="portable")
    p.add_argument("--pad-to-max-rank", action="store_true",
                   help="portable adapter with every layer zero-padded to the max rank: one rank and one scaling "
                        "for all layers (SGLang, vLLM <= 0.31), same outputs")
    p.add_argument("--gamma", type=float, default=None, help="override the state's gamma (B is linear in gamma)")
    p.add_argument("--task", choices=("auto", "seq-cls", "causal-lm"), default="auto",
                   help="model head; auto: from the state (gora init) or the adapter's task_type")
    p.add_argument("--num-labels", type=int, default=None, help="classes of a seq-cls head (default: from the state)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load the model in (default float32)")
    _add_no_progress(p)
    p.set_defaults(run=cmd_export)


def _add_no_progress(p) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="show no progress bar (gora's, nor transformers' loading and saving bars)")


# -- verbs --------------------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    from . import GoraConfig
    from .data_files import PEFT_TASK_TYPES, load_text_data

    _check_positive(num_steps=args.num_steps, batch_size=args.batch_size, max_length=args.max_length, r=args.r)
    gora_config = GoraConfig(**{f.name: getattr(args, f.name) for f in gora_option_fields()},
                             show_progress=not args.no_progress)
    model_dir = _model_dir(args.model)
    _check_max_length(model_dir, args.max_length)
    from .estimation import check_device

    device = check_device(args.device)  # resolved once ("auto" → cuda or cpu), before anything loads
    _check_not_an_input(args.output, model_dir)
    check_output_directory(args.output, (META_FILE, TENSOR_FILE))  # refused now, not after minutes of estimation
    data = load_text_data(args.data, args.task)  # cheap checks first: the heavy imports come after
    if data.task == "causal-lm":
        _check_causal_lm(model_dir, args.data, chosen=args.task == "auto")
    lora = {"r": args.r, "lora_alpha": args.alpha, "target_modules": _targets(args.targets),
            "task_type": PEFT_TASK_TYPES[data.task]}
    gora_config.extra = {"cli": {"model": str(model_dir.resolve()), "data": str(Path(args.data).resolve()),
                                 "task": data.task, "label_names": data.label_names, "batch_size": args.batch_size,
                                 "max_length": args.max_length, "dtype": args.dtype, "lora_config": lora}}

    from peft import LoraConfig

    from . import estimate_gora
    from .batches import batches_needed
    from .data_files import collator_for, subsample, tokenize
    from .targets import resolve_targets
    from .trainer import estimation_batches

    tokenizer = _load_tokenizer(model_dir)
    model = _load_model(model_dir, data.task, data.label_names, args.dtype, device, args.seed)
    lora_config = LoraConfig(**lora)
    resolve_targets(model, lora_config)  # targets that match nothing are refused before the data is prepared
    steps = batches_needed(gora_config)
    features = tokenize(subsample(data, steps * args.batch_size, args.seed), tokenizer, args.max_length)
    batches = estimation_batches(features, collator_for(data.task, tokenizer), args.batch_size, steps, args.seed)
    state = estimate_gora(model, lora_config, batches, gora_config=gora_config)
    state.save(args.output)
    print(state.summary())
    print(f"saved GoRA state to {args.output} ({state.estimation_seconds:.1f}s of estimation)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    info = _read_rank_info(path)
    if args.json:
        from .serving import vllm_max_lora_rank

        adapted = [r for r in info["ranks"].values() if r > 0]
        info["vllm_max_lora_rank"] = vllm_max_lora_rank(max(adapted)) if adapted else None
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print(_rank_table(info))
    if not args.no_plot:
        from .plotting import plot_ranks

        target = Path(args.plot) if args.plot else path / RANK_PLOT_FILE
        try:
            target = plot_ranks({n: r for n, r in info["ranks"].items() if r > 0}, target,
                                title=f"GoRA ranks: {path.name}")
        except GoraUnsupportedError as error:  # no matplotlib: the default plot is skipped, an asked-for one fails
            if args.plot:
                raise
            print(f"rank plot skipped: {error}", file=sys.stderr)
            return 0
        except OSError as error:
            raise GoraStateError(f"cannot write the rank plot to {target} ({error.strerror or error}); pass "
                                 "--plot PATH in a directory you can write to, or --no-plot.") from error
        print(f"wrote rank plot to {target}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.pad_to_max_rank and args.form != "portable":
        raise GoraConfigError(f"--pad-to-max-rank pads the portable adapter; it does not apply to --{args.form}. "
                              "Drop one of the two.")
    source = Path(args.source)
    model_dir = _model_dir(args.model)
    _check_not_an_input(args.output, model_dir, source)
    check_output_directory(args.output, _export_names(args.form, model_dir, Path(args.output)))  # before loading
    if (source / META_FILE).is_file():
        peft_model, state, task = _model_from_state(model_dir, source, args)
    elif (source / ADAPTER_CONFIG).is_file():
        peft_model, state, task = _model_from_adapter(model_dir, source, args)
    else:
        raise GoraStateError(f"{source} holds neither {META_FILE} (a state from gora init) nor {ADAPTER_CONFIG} "
                             "(a PEFT adapter); pass one of those directories.")
    if args.form == "merged":
        merged = peft_model.merge_and_unload()
        with atomic_directory(args.output) as tmp:  # a previous merged export is replaced; other content refused
            merged.save_pretrained(str(tmp))
            _save_tokenizer(model_dir, str(tmp))
        print(f"wrote merged {task} model to {args.output}")
        return 0
    from . import export_adapter

    export_adapter(peft_model, args.output, portable=args.form == "portable", pad_to_max_rank=args.pad_to_max_rank,
                   state=state)
    from .peft_bridge import lora_layers
    from .serving import serving_hint

    form = "uniform-rank portable" if args.pad_to_max_rank else args.form
    print(f"wrote {form} adapter to {args.output}; {serving_hint(max(r for r, _ in lora_layers(peft_model).values()))}")
    return 0


def cmd_passthrough(verb: str, argv: list[str]) -> int:
    """``gora bench`` and ``gora demo`` belong to ``gora.bench``: hand it the remaining arguments."""
    try:
        bench_cli = importlib.import_module("gora.bench.cli")
    except ModuleNotFoundError as error:
        if error.name not in ("gora.bench.cli", "gora.bench"):
            raise GoraUnsupportedError(f"gora {verb} needs the benchmark extras ({error.name} is missing): "
                                       "pip install 'gora-peft[bench]'.") from error
        return _demo_fallback(verb, argv)
    main_fn = getattr(bench_cli, "main", None)
    if main_fn is None:
        raise GoraUnsupportedError(f"gora.bench.cli has no main(argv); this gora cannot run 'gora {verb}'.")
    result = main_fn([verb, *argv] if verb == "demo" else argv)
    return int(result or 0)


def _demo_fallback(verb: str, argv: list[str]) -> int:
    run_demo = getattr(_optional_module("gora.bench.demo"), "run_demo", None)
    if verb == "demo" and run_demo is not None and not argv:
        run_demo()
        return 0
    raise GoraUnsupportedError(
        f"'gora {verb}' is provided by gora.bench.cli, which this installation lacks. Install the full package "
        "(pip install 'gora-peft[bench]') or run the benchmark scripts under benchmarks/ directly.")


def _optional_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        return None


# -- helpers -------------------------------------------------------------------------------------
def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise GoraConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")


def _targets(text: str) -> list[str] | str:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise GoraConfigError("--targets is empty; pass module names like query,value or 'all-linear'.")
    return "all-linear" if names == ["all-linear"] else names


def _model_dir(path: str) -> Path:
    model_dir = Path(path)
    if not (model_dir / "config.json").is_file():
        raise GoraDataError(f"{model_dir} is not a model directory (no config.json); pass a local directory "
                            "written by save_pretrained. gora never downloads models.")
    return model_dir


def _check_not_an_input(output: str, model_dir: Path, source: Path | None = None) -> None:
    """Refuse an output that is the base model's directory or the source being exported."""
    resolved = Path(output).resolve()
    for role, path in (("the base model's", model_dir), ("the source", source)):
        if path is not None and resolved == path.resolve():
            raise GoraStateError(f"-o {output} is {role} directory; write to another directory.")


def _check_max_length(model_dir: Path, max_length: int) -> None:
    """Refuse --max-length beyond a learned position table (BERT, GPT-2): else a tensor-size error deep inside."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise GoraDataError(f"{model_dir / 'config.json'} cannot be read ({error}).") from error
    if any(key.startswith("rope") for key in config):
        return  # rotary positions: no table to run past
    positions = config.get("max_position_embeddings", config.get("n_positions"))
    if isinstance(positions, int) and max_length > positions:
        raise GoraConfigError(f"--max-length {max_length} exceeds the {positions} positions of the model in "
                              f"{model_dir}; pass --max-length {positions} or less.")


def _check_causal_lm(model_dir: Path, data: str, chosen: bool) -> None:
    """Refuse causal-LM estimation on a checkpoint that is no causal LM (MiniLM, a BERT classifier): transformers
    would add a newly initialised LM head, and the gradients through it say nothing about the task."""
    try:
        architectures = json.loads((model_dir / "config.json").read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return  # _check_max_length reports an unreadable config
    if not isinstance(architectures, list) or not architectures:
        return  # nothing recorded: transformers decides
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if any(name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for name in architectures):
        return
    why = f"{data} has no 'label' column, so it is read as causal-LM text" if chosen else "--task causal-lm was given"
    raise GoraDataError(
        f"{why}, but {model_dir} holds a {'/'.join(map(str, architectures))}, not a causal language model: its LM head "
        "would be newly initialised and the gradients through it meaningless. For classification, add a 'label' "
        "column to the data file (the classification path reads the class from it); for a causal LM, pass a model "
        "saved as a ...ForCausalLM.")


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    hint = f"save one next to the model with tokenizer.save_pretrained('{model_dir}')"
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):  # transformers would build an empty one
        raise GoraDataError(f"{model_dir} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); {hint}.")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as error:
        raise GoraDataError(f"cannot load the tokenizer in {model_dir} ({error}); {hint}.") from error


def _load_model(model_dir: Path, task: str, label_names: list[str], dtype: str, device: Any, seed: int):
    """The base model for ``task`` on ``device`` (a torch device or its name, already checked); a new classification
    head is drawn from ``seed`` (the same in init and export)."""
    import torch
    import transformers

    model_class = getattr(transformers, MODEL_CLASSES[task])
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if task == "seq-cls":
        names = label_names if len(label_names) >= 2 else ["0", "1"]
        kwargs |= {"num_labels": len(names), "id2label": dict(enumerate(names)),
                   "label2id": {name: i for i, name in enumerate(names)},
                   "ignore_mismatched_sizes": True}  # a head for another label count is drawn anew
    transformers.set_seed(seed)
    model = model_class.from_pretrained(str(model_dir), **kwargs)
    if task == "causal-lm" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if task == "seq-cls" and model.config.pad_token_id is None:
        model.config.pad_token_id = 0  # decoders classify at the last non-pad token
    return model.to(device).eval()


def _cli_info(state) -> dict[str, Any]:
    return dict(state.config.get("extra", {}).get("cli", {}))


def _model_from_state(model_dir: Path, source: Path, args: argparse.Namespace):
    from peft import LoraConfig

    from . import GoraState, apply_gora

    state = GoraState.load(source)
    info = _cli_info(state)
    task = args.task if args.task != "auto" else info.get("task", "causal-lm")
    names = info.get("label_names") or [str(i) for i in range(args.num_labels or 2)]
    if args.num_labels and len(names) != args.num_labels:
        names = [str(i) for i in range(args.num_labels)]
    model = _load_model(model_dir, task, names, args.dtype, "cpu", state.seed)
    saved = info.get("lora_config", {})
    lora_config = LoraConfig(r=state.reference_rank, lora_alpha=state.lora_alpha,  # type: ignore[arg-type]
                             target_modules=state.adapted,
                             task_type=saved.get("task_type", {"seq-cls": "SEQ_CLS"}.get(task, "CAUSAL_LM")))
    return apply_gora(model, lora_config, state, gamma=args.gamma), state, task


def _model_from_adapter(model_dir: Path, source: Path, args: argparse.Namespace):
    from peft import PeftModel

    adapter = _read_adapter_config(source)
    task = args.task if args.task != "auto" else PEFT_TO_TASK.get(str(adapter.get("task_type")), "causal-lm")
    labels = args.num_labels or (_saved_head_classes(source, adapter) if task == "seq-cls" else None) or 2
    model = _load_model(model_dir, task, [str(i) for i in range(labels)], args.dtype, "cpu", 0)
    try:
        return PeftModel.from_pretrained(model, str(source)), None, task
    except RuntimeError as error:  # torch's load_state_dict: "size mismatch for ..."
        if "size mismatch" not in str(error):
            raise _damaged_adapter(source, error) from error
        raise GoraStateError(
            f"the adapter in {source} does not fit the model in {model_dir}: {str(error).strip().splitlines()[-1]} "
            f"Pass the base model it was trained on{' and --num-labels N for its head' if task == 'seq-cls' else ''}."
        ) from error
    except Exception as error:  # a damaged adapter fails deep inside PEFT or safetensors, with any exception type
        raise _damaged_adapter(source, error) from error


def _read_adapter_config(source: Path) -> dict[str, Any]:
    try:
        adapter = json.loads((source / ADAPTER_CONFIG).read_bytes())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise _damaged_adapter(source, error) from None
    if not isinstance(adapter, dict):
        raise _damaged_adapter(source, ValueError(f"{ADAPTER_CONFIG} holds a {type(adapter).__name__}, not an object"))
    return adapter


def _damaged_adapter(source: Path, error: BaseException) -> GoraStateError:
    return GoraStateError(f"cannot load the adapter in {source} ({type(error).__name__}: {error}); its "
                          f"{ADAPTER_CONFIG} or {ADAPTER_WEIGHTS} is damaged, or it is not a LoRA adapter. Save or "
                          "export the adapter again (peft_model.save_pretrained, or gora export).")


def _saved_head_classes(source: Path, adapter: dict[str, Any]) -> int | None:
    """Classes of the classification head saved with the adapter (its ``modules_to_save``), or ``None``."""
    from safetensors import safe_open

    weights = source / "adapter_model.safetensors"
    heads = tuple(f"{name}{part}.weight" for name in adapter.get("modules_to_save") or () for part in ("", ".out_proj"))
    if not heads or not weights.is_file():
        return None
    try:
        with safe_open(str(weights), "pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                if key.endswith(heads) and len(shape) == 2:
                    return int(shape[0])
    except Exception as error:  # safetensors' own error type for a truncated file
        raise _damaged_adapter(source, error) from error
    return None


def _export_names(form: str, model_dir: Path, output: Path) -> set[str]:
    """What an export of this form may write, so that a directory holding anything else is refused before the model
    loads. Generous for a merged model (its weights' and tokenizer's file names depend on the model): the exact check
    runs again when the export is written."""
    if form != "merged":
        return {ADAPTER_CONFIG, ADAPTER_WEIGHTS, SIDECAR_FILE, "README.md"}
    names = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "special_tokens_map.json", "added_tokens.json", "merges.txt", "chat_template.jinja", *TOKENIZER_FILES}
    names |= {entry.name for entry in model_dir.iterdir()}  # the tokenizer's files keep the base model's names
    if output.is_dir():  # shards of a previous merged export
        names |= {entry.name for entry in output.iterdir() if SHARD_NAME.fullmatch(entry.name)}
    return names


def _save_tokenizer(model_dir: Path, output: str) -> None:
    """Copy the base model's tokenizer next to a merged model (skipped, with a warning, if it has none)."""
    try:
        _load_tokenizer(model_dir).save_pretrained(output)
    except GoraDataError as error:
        logger.warning("merged model written without a tokenizer: %s", error)


def _read_rank_info(path: Path) -> dict[str, Any]:
    """Ranks, importances and budget from a state directory or an adapter's ``gora_config.json``."""
    if (path / META_FILE).is_file():
        from . import GoraState

        state = GoraState.load(path)
        return {"kind": "state", "ranks": state.ranks, "importance": state.importance, "skipped": state.skipped,
                "shapes": {n: list(s) for n, s in state.shapes.items()}, "budget": state.budget,
                "actual_params": state.actual_params, "r": state.reference_rank, "gamma": state.gamma,
                "num_steps": state.num_steps, "num_samples": state.num_samples,
                "estimation_seconds": state.estimation_seconds, "init_stats": state.init_stats}
    if not (path / SIDECAR_FILE).is_file():
        raise GoraStateError(f"{path} holds neither {META_FILE} (gora init) nor {SIDECAR_FILE} (an adapter "
                             "written by gora export / gora.export_adapter); nothing to inspect.")
    from .peft_bridge import read_sidecar

    return {"kind": "adapter", **read_sidecar(path)}


def _rank_table(info: dict[str, Any]) -> str:
    importance, shapes = info.get("importance", {}), info.get("shapes", {})
    rows = [f"{'module':<60} {'shape':>12} {'rank':>5} {'importance':>11}"]
    for name in sorted(info["ranks"]):
        shape = "x".join(str(v) for v in shapes[name]) if name in shapes else ""
        rows.append(f"{name:<60} {shape:>12} {info['ranks'][name]:>5} {importance.get(name, float('nan')):>11.4g}")
    for name, reason in sorted(info.get("skipped", {}).items()):
        if name not in info["ranks"] or reason != "no gradient":
            rows.append(f"{name:<60} {'':>12} {'-':>5}  skipped: {reason}")
    adapted = [r for r in info["ranks"].values() if r > 0]
    spread = f"ranks {min(adapted)}..{max(adapted)} over {len(adapted)} layers" if adapted else "no adapted layer"
    if "budget" in info:
        actual = info.get("actual_params", 0)
        rows.append(f"budget {info['budget']:,} params (LoRA r={info.get('r')}), actual {actual:,} "
                    f"({actual / max(info['budget'], 1):.1%}); {spread}")
    else:
        rows.append(spread)
    if "num_steps" in info:
        rows.append(f"{info['num_steps']} estimation steps, {info.get('num_samples', 0)} samples, "
                    f"gamma={info.get('gamma', float('nan')):g}")
    if info.get("init_stats"):
        from .diagnostics import describe

        rows.append(describe(info["init_stats"]))
    if adapted:
        from .serving import serving_hint

        rows.append(serving_hint(max(adapted)))
    return "\n".join(rows)


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """With ``enabled`` false, transformers' and huggingface_hub's bars (loading, saving) are off for the verb, and
    tqdm starts no monitor thread (it would for the disabled bars that PEFT's merge still creates)."""
    if enabled:
        yield
        return
    import tqdm
    from transformers.utils import logging as hf_logging

    was_enabled, interval = hf_logging.is_progress_bar_enabled(), tqdm.tqdm.monitor_interval
    hf_logging.disable_progress_bar()
    tqdm.tqdm.monitor_interval = 0
    try:
        yield
    finally:
        tqdm.tqdm.monitor_interval = interval
        if was_enabled:
            hf_logging.enable_progress_bar()


# -- entry point -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = bool(argv) and argv[0] in ("-v", "--verbose")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    rest = argv[1:] if verbose else argv
    try:
        if rest and rest[0] in PASSTHROUGH:
            return cmd_passthrough(rest[0], rest[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.verb is None:
            parser.print_help()
            return 2
        with _progress_bars(not getattr(args, "no_progress", False)):
            return args.run(args)
    except GoraError as error:
        print(f"gora: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
