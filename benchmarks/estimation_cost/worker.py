"""One benchmark configuration, in its own process: ``python worker.py SPEC_JSON OUT_JSON``.

Peak memory is per process (``ru_maxrss``/``VmHWM`` and the CUDA allocator's peak), so every (section, method,
size, N) runs alone. The spec's ``section`` picks what is measured:

- ``scale`` / ``time``: peak memory of one run of ``method`` over N batches, then ``reps`` rounds of
  [floor, method] interleaved in this process, so that both see the same machine load;
- ``throughput``: optimizer steps per second of a GoRA PeftModel vs a PEFT LoRA model, interleaved;
- ``ranks``: full vs sketch estimator on the same real batches (importance Spearman, equal ranks).
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))  # measure this checkout's gora

import torch  # noqa: E402

import methods as m  # noqa: E402
import models  # noqa: E402
from env import median_interval  # noqa: E402
from gora import GoraConfig  # noqa: E402
from gora.finite_checks import probe_flags  # noqa: E402
from gora.targets import resolve_targets  # noqa: E402

logging.basicConfig(level=logging.WARNING)


def main() -> None:
    spec = json.loads(sys.argv[1])
    out_path = sys.argv[2]
    record = dict(spec)
    try:
        torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
        record.update(SECTIONS[spec["section"]](spec))
        record["status"] = "ok"
    except BaseException as err:  # noqa: BLE001 - one failing configuration is recorded, the run goes on
        record.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])
    record["threads"] = torch.get_num_threads()
    with open(out_path, "w") as handle:
        json.dump(record, handle)


def _setup(spec: dict, count: int | None = None):
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    start = time.perf_counter()
    model, targets, weights = models.build_model(spec["size"], device, dtype, pretrained=spec.get("pretrained", True))
    build_s = time.perf_counter() - start
    count = count or spec["steps"]
    batches = None
    if spec.get("data") == "rotten_tomatoes":
        batches = models.rotten_tomatoes_batches(count, spec["batch"], spec["seq"], device)
    data = "rotten_tomatoes" if batches is not None else "random"
    if batches is None:
        batches = models.random_batches(spec["size"], count, spec["batch"], spec["seq"], device)
    layers = resolve_targets(model, m.lora_config(targets))[0]
    info = {"weights": weights, "data": data, "build_s": build_s,
            "params": sum(p.numel() for p in model.parameters()),
            "target_params": sum(t.in_features * t.out_features for t in layers), "target_layers": len(layers)}
    return model, targets, batches, device, info


# -- scale / time -------------------------------------------------------------------------------------
def _runner(method: str, model, targets, batches):
    """(run() -> result, cleanup(result)) for an estimation method."""
    if method == "floor":
        return (lambda: m.run_floor(model, batches)), (lambda result: None)
    if method in m.GORA_VARIANTS:
        return (lambda: m.run_gora(model, targets, batches, **m.GORA_VARIANTS[method])), (lambda result: None)
    if method == "loraga":
        def drop(modules):
            for module in modules:
                del module._peft_loraga_grad
        return (lambda: m.run_loraga(model, targets, batches)), drop
    if method == "official":
        return (lambda: m.run_official(model, targets, batches)), (lambda result: None)
    raise ValueError(f"unknown method {method!r}")


def measure_cost(spec: dict) -> dict:
    model, targets, batches, device, info = _setup(spec)
    m.only_targets_require_grad(model, targets)
    m.run_floor(model, batches[:1])  # warm-up: allocator, thread pools, kernels
    probe = models.PeakMemory(device)
    if spec["method"] == "lora":
        trainer = m.LoraTrainer(model, targets)
        probe.start()
        seconds, _ = m.timed(lambda: [trainer.step(b) for b in batches], device)
        return {**info, **probe.stop(), "method_s": [seconds], "floor_s": [], "step_s": seconds / len(batches)}
    run, cleanup = _runner(spec["method"], model, targets, batches)
    probe.start()
    first_s, result = m.timed(run, device)
    memory = probe.stop()
    extra = _result_info(spec["method"], result)
    cleanup(result)
    del result
    gc.collect()
    floor_s, method_s, drop_s, loop_s, train_s = [], [], [], [], []

    def time_floor() -> None:
        floor_s.append(m.timed(lambda: m.run_floor(model, batches), device)[0])

    def time_drop_floor() -> None:
        drop_s.append(m.timed(lambda: m.run_floor_dropping(model, targets, batches), device)[0])

    def time_train_floor() -> None:
        """The floor in train mode: PEFT's LoRA-GA runs its passes in train mode (``estimate_gradients`` calls
        ``model.train()``), with dropout on, where the plain floor and GoRA run in eval mode."""
        was_training = model.training
        model.train()
        try:
            train_s.append(m.timed(lambda: m.run_floor(model, batches), device)[0])
        finally:
            model.train(was_training)

    def time_method() -> None:
        seconds, result = m.timed(run, device)
        method_s.append(seconds)
        if spec["method"].startswith("gora"):
            loop_s.append(result.estimation_seconds)  # the N forward/backward passes alone, without scoring
        cleanup(result)

    round_order = ([time_floor] + ([time_drop_floor] if spec["section"] == "time" else [])
                   + ([time_train_floor] if spec["method"] == "loraga" else []) + [time_method])
    for index in range(spec.get("reps", 1) if spec["method"] != "floor" else 0):
        for timing in round_order if index % 2 == 0 else round_order[::-1]:  # ABBA: a drift in load cancels
            timing()
    out = {**info, **memory, **extra, "first_run_s": first_s, "floor_s": floor_s, "method_s": method_s}
    if loop_s:
        out["loop_s"] = loop_s
        out["loop_ratio"] = statistics.median(a / b for a, b in zip(loop_s, floor_s))
    if floor_s:
        out |= _median_ratio("time_ratio", method_s, floor_s)
        out["time_ratio_min"] = min(method_s) / min(floor_s)
        out["step_s"] = statistics.median(method_s) / len(batches)
        out["floor_step_s"] = statistics.median(floor_s) / len(batches)
    if drop_s:
        out["drop_floor_s"] = drop_s
        out["time_ratio_vs_drop_floor"] = statistics.median(a / b for a, b in zip(method_s, drop_s))
    if train_s:
        out |= {"train_floor_s": train_s, **_median_ratio("time_ratio_vs_train_floor", method_s, train_s)}
    if spec["method"] in ("gora", "gora_sketch"):
        out["finite_check_share"] = _finite_check_share(model, targets, device, out.get("floor_step_s"),
                                                         sketch=spec["method"] == "gora_sketch")
    return out


def _median_ratio(key: str, method_s: list[float], base_s: list[float]) -> dict:
    """``key``: the median over rounds of each round's method time ÷ its own base time; ``key_interval``: its
    distribution-free 95 % interval (None under 6 rounds)."""
    ratios = [a / b for a, b in zip(method_s, base_s)]
    return {key: statistics.median(ratios), f"{key}_interval": median_interval(ratios)}


def _result_info(method: str, result) -> dict:
    if method.startswith("gora"):
        return {"estimation_s_reported": result.estimation_seconds, "ranks": result.ranks,
                "accumulation": (result.notes or {}).get("accumulation_device")}
    return {}


def _finite_check_share(model, targets, device, floor_step_s: float | None, sketch: bool) -> float | None:
    """Time of one step's NaN/Inf probe per floor step: ``gora.finite_checks.probe_flags`` over every layer's running
    fp32 sum, or its sketch projection, as ``GradientAccumulator`` queues it each step (read on the host only every
    few steps on an accelerator, so no sync is timed apart from the end of the timing)."""
    if not floor_step_s:
        return None
    lora_config = m.lora_config(targets)
    layers = resolve_targets(model, lora_config)[0]
    r_max = GoraConfig().rank_bounds(lora_config.r)[1]
    shapes = [(t.out_features, r_max if sketch else t.in_features) for t in layers]
    total = sum(o * i for o, i in shapes)
    sample = shapes if 4 * total <= 2**30 else shapes[:8]  # more than 1 GiB of sums: time 8 layers, scale up
    probes = [torch.randn(shape, dtype=torch.float32, device=device) for shape in sample]
    scale = total / sum(o * i for o, i in sample)

    check = functools.partial(probe_flags, probes)
    check()  # warm-up: first kernel launches
    seconds = min(m.timed(check, device)[0] for _ in range(5))
    return seconds * scale / floor_step_s


# -- throughput --------------------------------------------------------------------------------------
def measure_throughput(spec: dict) -> dict:
    model, targets, batches, device, info = _setup(spec)
    gora_base, lora_base = m.deep_copy(model), m.deep_copy(model)  # both copies: same memory history
    del model
    lora = m.LoraTrainer(lora_base, targets)
    gora = m.gora_trainer(gora_base, targets, batches[:spec["gora_steps"]])
    train = batches[: spec["train_steps"]]
    for trainer in (lora, gora):
        trainer.step(train[0])  # warm-up, optimizer state allocated
    lora_s, gora_s = [], []  # single steps, alternated (order flipped every round): both see the same load
    for round_index in range(spec.get("reps", 3)):
        for batch in train:
            pair = [(lora, lora_s), (gora, gora_s)]
            for trainer, times in pair if round_index % 2 == 0 else pair[::-1]:
                times.append(m.timed(lambda: trainer.step(batch), device)[0])
    trainable = {name: sum(p.numel() for p in t.model.parameters() if p.requires_grad)
                 for name, t in (("lora", lora), ("gora", gora))}
    ranks = {int(mod.r[k]) for mod in gora.model.modules() if hasattr(mod, "r") and isinstance(mod.r, dict)
             for k in mod.r}
    return {**info, "lora_s": lora_s, "gora_s": gora_s, "train_steps": len(lora_s),
            "lora_steps_per_s": 1 / statistics.median(lora_s), "gora_steps_per_s": 1 / statistics.median(gora_s),
            "throughput_ratio": statistics.median(lora_s) / statistics.median(gora_s),
            "throughput_ratio_paired": statistics.median(a / b for a, b in zip(lora_s, gora_s)),
            "throughput_ratio_best": min(lora_s) / min(gora_s),
            "trainable_params": trainable, "gora_rank_range": [min(ranks), max(ranks)] if ranks else None}


# -- ranks ------------------------------------------------------------------------------------------
def measure_ranks(spec: dict) -> dict:
    model, targets, batches, device, info = _setup(spec)
    variants = {"full_mean_abs": {}, "full_frobenius": {"importance": "frobenius"},
                **{f"sketch_k{k}": {"estimator": "sketch", "importance": "frobenius", "sketch_dim": k}
                   for k in spec.get("sketch_dims", [32])}}
    states, seconds = {}, {}
    for name, config in variants.items():
        seconds[name], states[name] = m.timed(lambda: m.run_gora(model, targets, batches, **config), device)
    reference = states["full_frobenius"]
    comparisons = {}
    for name, state in states.items():
        for ref_name in ("full_frobenius", "full_mean_abs"):
            if name == ref_name:
                continue
            comparisons[f"{name}_vs_{ref_name}"] = _agreement(state, states[ref_name])
    return {**info, "seconds": seconds, "agreement": comparisons,
            "ranks": {name: s.ranks for name, s in states.items()},
            "importance": {name: s.importance for name, s in states.items()},
            "budget": reference.budget, "actual_params": {n: s.actual_params for n, s in states.items()}}


def _agreement(state, reference) -> dict:
    names = sorted(reference.importance)
    diffs = [abs(state.ranks[n] - reference.ranks[n]) for n in names]
    return {"spearman_importance": spearman([state.importance[n] for n in names],
                                            [reference.importance[n] for n in names]),
            "equal_ranks": sum(d == 0 for d in diffs) / len(diffs), "within_one": sum(d <= 1 for d in diffs) / len(diffs),
            "mean_abs_rank_diff": sum(diffs) / len(diffs), "max_abs_rank_diff": max(diffs), "layers": len(names)}


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: Pearson correlation of the (average) ranks."""
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


SECTIONS = {"scale": measure_cost, "time": measure_cost, "throughput": measure_throughput, "ranks": measure_ranks}

if __name__ == "__main__":
    main()
