"""The argparse tree of ``gora``: its verbs, their options and help texts (``gora init``'s GoRA settings come from
GoraConfig's fields, see :mod:`gora.cli.config_options`)."""

from __future__ import annotations

import argparse

from .. import __version__
from ..atomic import RANK_PLOT_FILE
from .config_options import add_gora_options
from .loading import DTYPES

DESCRIPTION = """GoRA (gradient-driven adaptive LoRA) for Hugging Face PEFT.

  gora init MODEL DATA -o STATE     estimate ranks and initialisation, save a GoraState
  gora inspect STATE_OR_ADAPTER     rank table, budget, and a PNG of ranks per layer x module type
  gora export MODEL STATE -o OUT    a PEFT adapter (--portable, default; --native) or a merged model (--merged)
  gora bench ... / gora demo ...    GoRA vs LoRA benchmarks (gora.bench)

Models are local directories (save_pretrained); nothing is downloaded."""


def build_parser() -> argparse.ArgumentParser:
    """``gora``'s parser; the verb parsed is ``args.verb`` (``None`` without one)."""
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


def _add_init(verbs: argparse._SubParsersAction) -> None:
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
    add_gora_options(p.add_argument_group("GoRA settings (GoraConfig's fields)"))
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load the model in (default float32)")
    _add_no_progress(p)


def _add_inspect(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("inspect", help="rank table, budget and a rank plot of a state or an exported adapter",
                         description="Print the rank table and budget of a GoraState directory or of an adapter "
                                     "directory with a gora_config.json sidecar, and plot ranks per layer.")
    p.add_argument("path", help="a GoraState directory (gora init) or an adapter directory (gora export)")
    p.add_argument("--plot", default=None,
                   help=f"image to write; PNG unless the name ends in another format matplotlib writes, e.g. .pdf "
                        f"or .svg (default: PATH/{RANK_PLOT_FILE})")
    p.add_argument("--no-plot", action="store_true", help="print the table only")
    p.add_argument("--json", action="store_true", help="print ranks, importances and budget as JSON instead")


def _add_export(verbs: argparse._SubParsersAction) -> None:
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


def _add_no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="show no progress bar (gora's, nor transformers' loading and saving bars)")


__all__ = ["DESCRIPTION", "build_parser"]
