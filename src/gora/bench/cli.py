"""``python -m gora.bench {grid,rank-sweep,demo,report,export-assets}`` (``decoder`` is gone: a grid task kind).

Heavy libraries (torch, transformers, peft, matplotlib) are imported inside the verbs, so ``--help`` is instant.
The argparse namespace stops here: verbs turn it into dataclass configs before calling library functions.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from gora.bench import set_offline_env
from gora.config import ESTIMATOR_NAMES, IMPORTANCE_NAMES, field_default

logger = logging.getLogger(__name__)

METHOD_IDS = ("full", "lora", "rslora", "dora", "loraplus", "rslora_loraplus", "pissa", "olora", "loraga", "eva",
              "adalora", "gora", "gora_loraplus")
TASK_IDS = ("rotten_tomatoes", "clinc150", "yahoo_answers", "tweet_sentiment", "vitaminc", "multiemo", "epistemic")
LM_TASK_IDS = ("gsm_symbolic", "rotten_tomatoes_lm", "tweet_sentiment_lm")
"""Causal-LM tasks (``gora.bench.lm_tasks.LM_TASKS``): SmolLM2-135M through its pretrained LM head; protocol 2 only."""


ARM_IDS = ("lora", "rslora", "rslora_loraplus", "gora", "gora_loraplus", "gora_gamma0", "gora_fixed_rank",
           "gora_head_warmup", "gora_adaptive_gamma", "gora_warmup_adaptive", "pissa", "loraga", "eva", "dora",
           "adalora", "full", "loraplus", "olora")
GRID_DESCRIPTION = """\
Protocol 2 (default): every arm trains --steps steps at batch --batch-size; the new classifier head has its own
AdamW group at --head-lr for every arm; each arm's lr is chosen per task on the mean final validation loss over
--selection-seeds (runs kept in lr_search.json, never results), from a factor-2 grid that is extended past its edge
when the choice sits there; then the --seeds runs are the results (results.json), each with its learning curve
(train loss, validation loss and accuracy at 25, 50, 100, ... steps and the last), GoRA's init diagnostics and how
its lr was chosen. Resumable: finished runs are never recomputed. Two single-thread workers on one folder:
  gora bench grid --out-dir D --worker 0/2 --threads 1 &  gora bench grid --out-dir D --worker 1/2 --threads 1
Arms: lora, rslora (alpha/sqrt(r)), rslora_loraplus (LoRA+ ratio 16), gora, gora_loraplus, gora_gamma0 (gamma 0:
allocation only), gora_fixed_rank (every rank r: initialisation only), gora_head_warmup (50 head-only steps before
estimation), gora_adaptive_gamma, gora_warmup_adaptive (both); the wider field: pissa, loraga, eva, dora, adalora,
full, loraplus, olora.
Causal-LM tasks (gsm_symbolic, rotten_tomatoes_lm, tweet_sentiment_lm) run SmolLM2-135M through its pretrained LM
head with the same arms, lr selection and curves (no new head: head-warm-up arms are refused); gsm_symbolic's metric
is the answer loss on held-out templates (lower is better), exact match of greedy answers a secondary field.
Protocol 1 (--protocol 1, superseded): epochs, lr chosen on seed 0's validation accuracy and reused as its result.
"""

THREADS_HELP = ("CPU threads for torch (default: torch's choice); on a shared machine use the cores actually free: "
                "2 threads on 1 free core ran 7x slower than 1 thread")


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _lr_override(text: str) -> tuple[str, tuple[float, ...]]:
    method, _, values = text.partition("=")
    try:
        return method, tuple(float(v) for v in values.split(",") if v)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--lr expects METHOD=LR[,LR...], e.g. gora=1e-4,5e-4; got {text!r}") from err


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--max-train", type=int, help="subsample the training split to this many examples")
    g.add_argument("--max-val", type=int, help="subsample the validation split")
    g.add_argument("--max-test", type=int, help="subsample the test split")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the data split (separate from --seeds)")
    g.add_argument("--data-dir", help="folder of exported <task>.csv.gz and model/ (default $GORA_DATA_DIR)")
    g.add_argument("--model-path", help="model folder (default: $GORA_MODEL_DIR, <data-dir>/model, installed MiniLM)")
    g.add_argument("--user-task", nargs=3, action="append", default=[], metavar=("NAME", "TRAIN", "TEST"),
                   help="add a task from CSV/JSONL files with text, [text_pair], label columns; use NAME in --tasks")
    t = p.add_argument_group("training")
    t.add_argument("--max-length", type=int, default=64, help="tokens per example")
    t.add_argument("--batch-size", type=int, help="training batch size (default 16 in protocol 2, else 32)")
    t.add_argument("--epochs", type=float, help="passes over the training split (protocol 1; default 1)")
    t.add_argument("--warmup-ratio", type=float, default=0.06, help="share of steps with linear warmup")
    t.add_argument("--device", default="auto", help="auto, cpu or cuda")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA")
    t.add_argument("--no-progress", action="store_true", help="hide progress bars")
    t.add_argument("--threads", type=int, help=THREADS_HELP)
    m = p.add_argument_group("methods")
    m.add_argument("--lrs", type=float, nargs="+", help="one learning-rate grid for every method")
    m.add_argument("--lr", type=_lr_override, action="append", default=[], metavar="METHOD=LR[,LR]",
                   help="learning-rate grid of one method (repeatable); one value skips the search")
    m.add_argument("--gora-steps", type=int, default=field_default("num_steps"),
                   help="batches for GoRA/LoRA-GA gradient estimation (N)")
    m.add_argument("--eva-steps", type=int, default=32, help="distinct batches EVA cycles through")
    m.add_argument("--gamma", type=float, default=field_default("gamma"), help="GoRA's initialisation scale")
    m.add_argument("--adaptive-gamma", action="store_true",
                   help="GoRA picks gamma per run on 4 held-out training batches (the value goes in the record)")
    m.add_argument("--gora-min-rank", type=int, help="GoRA's smallest rank (default r/2; r with --gora-max-rank r "
                                                     "keeps LoRA's ranks and isolates the initialisation)")
    m.add_argument("--gora-max-rank", type=int, help="GoRA's largest rank (default 4r)")
    m.add_argument("--gora-importance", choices=IMPORTANCE_NAMES, default=field_default("importance"),
                   help="GoRA's layer importance (default mean|W ⊙ Ḡ|, the paper's)")
    m.add_argument("--gora-estimator", choices=ESTIMATOR_NAMES, default=field_default("estimator"),
                   help="GoRA's gradient estimator; sketch needs --gora-importance frobenius")
    m.add_argument("--seeds", type=int, nargs="+", help="training seeds of the results (default 0 1 2 3 4 in "
                                                           "protocol 2, else 0)")
    m.add_argument("--out-dir", required=True, help="grid folder: results.json, lr_search.json, table, plots")
    m.add_argument("--no-report", action="store_true", help="skip the table and plots at the end")


def _grid_kwargs(args: argparse.Namespace, methods: Sequence[str]) -> dict:
    from gora.bench.builders import MethodConfig
    from gora.bench.runner import DataConfig
    from gora.bench.train import TrainConfig

    v2 = getattr(args, "protocol", 1) == 2
    lr_grid = {m: tuple(args.lrs) for m in methods} if args.lrs else {}
    lr_grid.update(dict(args.lr))
    batch_size = args.batch_size if args.batch_size is not None else (16 if v2 else 32)
    return {
        "out_dir": args.out_dir,
        "lr_grid": lr_grid,
        "model_path": args.model_path,
        "train_config": TrainConfig(max_length=args.max_length, batch_size=batch_size,
                                    epochs=1.0 if args.epochs is None else args.epochs,
                                    steps=getattr(args, "steps", None) if v2 else None, curve=v2,
                                    warmup_ratio=args.warmup_ratio, device=args.device, bf16=args.bf16,
                                    progress=not args.no_progress),
        "method_config": MethodConfig(init_steps=args.gora_steps, eva_steps=args.eva_steps, gora_gamma=args.gamma,
                                      gora_adaptive_gamma=args.adaptive_gamma, gora_min_rank=args.gora_min_rank,
                                      gora_max_rank=args.gora_max_rank, gora_importance=args.gora_importance,
                                      gora_estimator=args.gora_estimator,
                                      head_lr=getattr(args, "head_lr", None) if v2 else None, gora_eval_batches=v2),
        "data_config": DataConfig(split_seed=args.split_seed, max_train=args.max_train, max_val=args.max_val,
                                  max_test=args.max_test, data_dir=args.data_dir,
                                  user_tasks={name: (train, test) for name, train, test in args.user_task}),
    }


def _report(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    if not args.no_report:
        from gora.bench.provenance import write_folder_readme
        from gora.bench.report import write_report

        command = list(argv) if argv is not None else None
        for path in [*write_report(args.out_dir).values(), write_folder_readme(args.out_dir, command)]:
            logger.info("wrote %s", path)


V2_ONLY = ("arms", "steps", "head_lr", "selection_seeds", "worker", "max_extensions", "lm_max_length",
           "exact_match_size", "max_new_tokens")


def _lm_config(args: argparse.Namespace):
    from gora.bench.lm_tasks import LMConfig

    given = {"max_length": args.lm_max_length, "exact_match_size": args.exact_match_size,
             "max_new_tokens": args.max_new_tokens}
    return LMConfig(**{k: v for k, v in given.items() if v is not None})


def _refuse(args: argparse.Namespace, names: Sequence[str], why: str) -> None:
    from gora.errors import GoraConfigError

    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is not None]
    if given:
        raise GoraConfigError(f"{', '.join(given)}: {why}")


def cmd_grid(args: argparse.Namespace) -> int:
    if args.protocol == 1:
        from gora.bench.grid import run_grid

        _refuse(args, V2_ONLY, "protocol 2 options; drop them or leave out --protocol 1.")
        methods = args.methods or ["lora", "gora"]
        records = run_grid(methods, args.tasks, args.seeds or [0], ranks=args.ranks, **_grid_kwargs(args, methods))
        logger.info("%d records in %s (protocol 1, superseded)", len(records), args.out_dir)
        _report(args, args.argv)
        return 0
    from gora.bench.protocol2 import DEFAULT_ARMS, DEFAULT_TEST_SEEDS, parse_worker, run_arm_grid
    from gora.errors import GoraConfigError

    _refuse(args, ["epochs"], "protocol 2 trains a fixed number of --steps; --epochs belongs to --protocol 1.")
    if args.adaptive_gamma:
        raise GoraConfigError("--adaptive-gamma would change every GoRA arm; protocol 2 has arms for it "
                              "(gora_adaptive_gamma, gora_warmup_adaptive): add them to --arms.")
    if args.methods and args.arms:
        raise GoraConfigError("Pass the arms once: --arms (--methods is its protocol-1 name).")
    if len(args.ranks) != 1:
        raise GoraConfigError(f"Protocol 2 runs one reference rank (--ranks R), got {args.ranks}; use "
                              "`rank-sweep` for several.")
    arms = args.arms or args.methods or list(DEFAULT_ARMS)
    worker = parse_worker(args.worker) if args.worker else (0, 1)
    records = run_arm_grid(arms, args.tasks, args.seeds or list(DEFAULT_TEST_SEEDS), r=args.ranks[0],
                           selection_seeds=args.selection_seeds or (100, 101), worker=worker,
                           max_extensions=3 if args.max_extensions is None else args.max_extensions,
                           lm_config=_lm_config(args), **_grid_kwargs(args, arms))
    logger.info("%d records in %s (protocol 2)", len(records), args.out_dir)
    if worker[1] == 1:
        _report(args, args.argv)
    else:
        logger.info("Worker %d/%d done; when every worker has finished: python -m gora.bench report %s",
                    *worker, args.out_dir)
    return 0


def cmd_rank_sweep(args: argparse.Namespace) -> int:
    from gora.bench.sweep import run_rank_sweep

    kwargs = _grid_kwargs(args, args.methods)
    run_rank_sweep(args.task, args.seeds or [0], methods=args.methods, ranks=args.ranks, **kwargs)
    _report(args, args.argv)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gora.bench.demo import DemoConfig, run_demo

    run_demo(DemoConfig(max_train=args.max_train, out_dir=args.out_dir, progress=not args.no_progress))
    return 0


DECODER_MOVED = ("The decoder task is a task kind of the grid now (protocol 2: lr chosen on validation loss, "
                 "learning curves, the same arms): gora bench grid --tasks gsm_symbolic --arms lora rslora gora "
                 "gora_gamma0 gora_fixed_rank --out-dir DIR (see benchmarks/decoder/ and "
                 "benchmarks/grid/cpu_decoder_evidence.sh). The earlier results in benchmarks/results/cpu/decoder/ "
                 "were made by the removed `decoder` command.")


def cmd_decoder(args: argparse.Namespace) -> int:
    from gora.errors import GoraConfigError

    raise GoraConfigError(DECODER_MOVED)


def cmd_report(args: argparse.Namespace) -> int:
    from gora.bench.report import write_report

    for path in write_report(args.results, args.out_dir).values():
        sys.stdout.write(f"wrote {path}\n")
    return 0


def cmd_evidence(args: argparse.Namespace) -> int:
    from gora.bench.evidence import write_evidence

    for path in write_evidence(args.folder, args.out_dir).values():
        sys.stdout.write(f"wrote {path}\n")
    return 0


def cmd_export_assets(args: argparse.Namespace) -> int:
    from gora.bench.assets import export_assets

    for name, size in export_assets(args.out_dir, args.tasks).items():
        sys.stdout.write(f"{size / 2**20:8.2f} MB  {name}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gora.bench", description="GoRA benchmark harness (MiniLM).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    grid = sub.add_parser("grid", help="arms x tasks x seeds, resumable, lr chosen on validation loss (protocol 2)",
                          description=GRID_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    grid.add_argument("--protocol", type=int, choices=[1, 2], default=2,
                      help="2 (default): controlled comparisons, see above; 1: the superseded grid (epochs, lr "
                           "chosen on seed 0's validation accuracy, head at the adapter's lr)")
    grid.add_argument("--arms", nargs="+", help=f"protocol 2: from {', '.join(ARM_IDS)} "
                      "(default: the first ten)")
    grid.add_argument("--methods", nargs="+", help=f"protocol 1: from {', '.join(METHOD_IDS)} (default lora gora); "
                      "in protocol 2 the same as --arms")
    grid.add_argument("--tasks", nargs="+", default=["rotten_tomatoes"],
                      help=f"from {', '.join(TASK_IDS)} or user (MiniLM classifier); causal-LM tasks (SmolLM2-135M, "
                           f"protocol 2): {', '.join(LM_TASK_IDS)}")
    grid.add_argument("--ranks", type=int, nargs="+", default=[8], help="reference rank(s) r (alpha = 2r); "
                      "protocol 2 takes one")
    v2 = grid.add_argument_group("protocol 2")
    v2.add_argument("--steps", type=int, help="optimizer steps per run (default 200); curve at 25, 50, 100, ... "
                    "and the last step")
    v2.add_argument("--head-lr", type=float, help="lr of the new classifier head's own AdamW group, the same for "
                    "every arm (default 1e-3)")
    v2.add_argument("--selection-seeds", type=int, nargs="+",
                    help="seeds whose mean final validation loss chooses each arm's lr; disjoint from --seeds "
                         "(default 100 101)")
    v2.add_argument("--max-extensions", type=int,
                    help="times a grid is extended past its edge when the choice sits there (default 3)")
    v2.add_argument("--worker", metavar="I/N",
                    help="run worker I of N on one --out-dir (e.g. 0/2 and 1/2 in two processes, each with "
                         "--threads 1); each takes every N-th (task, arm) and merges into results.json")
    lm = grid.add_argument_group("causal-LM tasks (protocol 2: gsm_symbolic, rotten_tomatoes_lm, "
                                 "tweet_sentiment_lm)")
    lm.add_argument("--lm-max-length", type=int, help="tokens per training example, prompt + answer (default 256); "
                    "longer GSM items are skipped, classification prompts shortened")
    lm.add_argument("--exact-match-size", type=int, help="gsm_symbolic test items scored by greedy generation in "
                    "test runs (default 16; 0 skips the slow generation)")
    lm.add_argument("--max-new-tokens", type=int, help="generation limit per item (default 256)")
    _add_run_options(grid)
    grid.set_defaults(func=cmd_grid)

    sweep = sub.add_parser("rank-sweep", help="LoRA, GoRA, full at r = 2, 8, 32, 64 on one task")
    sweep.add_argument("--task", default="rotten_tomatoes", help="task id")
    sweep.add_argument("--methods", nargs="+", default=["lora", "gora", "full"], help="methods to sweep")
    sweep.add_argument("--ranks", type=int, nargs="+", default=[2, 8, 32, 64], help="reference ranks r")
    _add_run_options(sweep)
    sweep.set_defaults(func=cmd_rank_sweep)

    demo = sub.add_parser("demo", help="GoRA vs LoRA on Rotten Tomatoes, CPU, under 10 minutes")
    demo.add_argument("--max-train", type=int, default=6400, help="training reviews (200 steps at batch 32)")
    demo.add_argument("--out-dir", help="where results and plots go (default: a new temporary folder)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.add_argument("--threads", type=int, help=THREADS_HELP)
    demo.set_defaults(func=cmd_demo)

    dec = sub.add_parser("decoder", help="removed: the decoder task runs in `grid --tasks gsm_symbolic`",
                         description=DECODER_MOVED, add_help=False, prefix_chars="\x00")
    dec.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    dec.set_defaults(func=cmd_decoder)

    report = sub.add_parser("report", help="Markdown table and PNG plots from a results.json")
    report.add_argument("results", help="results.json, or the folder holding it")
    report.add_argument("--out-dir", help="where to write (default: next to results.json)")
    report.set_defaults(func=cmd_report)

    evidence = sub.add_parser("evidence", help="paired differences with 95 %% intervals, arms table and plots of a "
                                               "protocol-2 study folder")
    evidence.add_argument("folder", help="a protocol-2 study folder (results.json, lr_search.json)")
    evidence.add_argument("--out-dir", help="where to write (default: the study folder)")
    evidence.set_defaults(func=cmd_evidence)

    export = sub.add_parser("export-assets", help="fp16 MiniLM + task pools as .csv.gz for the GPU machine")
    export.add_argument("--out-dir", default="gpu_assets", help="target folder (git-ignored gpu_assets/)")
    export.add_argument("--tasks", nargs="+", default=list(TASK_IDS), help="tasks to export")
    export.set_defaults(func=cmd_export_assets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m gora.bench``; returns the exit status."""
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    set_offline_env()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _set_threads(getattr(args, "threads", None))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
