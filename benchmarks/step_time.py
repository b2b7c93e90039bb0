"""Per-step wall time of SFT, RCE and GRPO through the real stage runners, side by side in one process.

Every stage trains the same tiny default model (16-d features, towers 64 -> 32) on the same data with batches of
B=32 groups of G=8, one CPU thread. A step's time is read between two held-out evaluations (one epoch of
``--steps`` optimizer steps; the evaluation runs on 8 groups so it costs about one step), so it includes
everything the loop does per step: the forward pass, the loss and its statistics, backward, clipping, Adam and
the ``metrics.csv`` row. Stages are interleaved within each repeat; the number is the median over epochs and
repeats (the first epoch of each run is a warm-up and is dropped); the minimum is printed too, as the estimate
least disturbed by other jobs on a shared machine. The clock is the process's CPU time
(``time.process_time``) by default: with one thread it is the step's cost, and unlike wall time it barely moves
when other jobs share the cores; ``--clock wall`` measures wall time instead.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/step_time.py [--steps 60 --epochs 4 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from v3kit.data import Splits
from v3kit.data.synthetic import SyntheticConfig, make_world
from v3kit.train.grpo import GRPOConfig, run_grpo
from v3kit.train.model import ModelConfig, build_model, compute_log_probs
from v3kit.train.rce import RCEConfig, run_rce
from v3kit.train.sft import SFTConfig, freeze, train_sft

B = 32


class EvalClock:
    """Timestamps of the held-out evaluations (epoch 0 = before the first step)."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.times: list[float] = []

    def on_eval(self, row: dict) -> None:
        self.times.append(self.clock())


def per_step(run, steps: int, clock) -> list[float]:
    clock = EvalClock(clock)
    run(clock)
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return [g / steps for g in gaps[1:]]  # drop the first epoch (warm-up)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per epoch")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    world = make_world(SyntheticConfig(n_queries=B * args.steps + 16))
    n = B * args.steps
    splits = Splits(train=world.subset(range(n)), val=world.subset(range(n, n + 8)), test=world.subset(range(n, n + 8)))
    model_cfg = ModelConfig()
    torch.manual_seed(0)
    base = build_model(model_cfg, splits.train.query_dim, splits.train.cand_dim)
    old = compute_log_probs(base, splits.train, 1.0)
    ref = freeze(base)
    common = dict(progress=False)
    e = args.epochs

    def fresh():
        return freeze(base).requires_grad_(True).train()

    runs = {
        "sft": lambda cb: train_sft(splits, model_cfg, SFTConfig(epochs=e, batch_size=B), callbacks=[cb], **common),
        "rce": lambda cb: run_rce(
            fresh(), splits, RCEConfig(epochs=e, batch_size=B), reference=ref, callbacks=[cb], **common
        ),
        "grpo": lambda cb: run_grpo(
            fresh(), splits, old, GRPOConfig(epochs=e, batch_size=B), reference=ref, callbacks=[cb], **common
        ),
        "grpo kl_reference=sft": lambda cb: run_grpo(
            fresh(),
            splits,
            old,
            GRPOConfig(epochs=e, batch_size=B, kl_reference="sft"),
            reference=ref,
            callbacks=[cb],
            **common,
        ),
        "grpo samples=sampled": lambda cb: run_grpo(
            fresh(),
            splits,
            old,
            GRPOConfig(epochs=e, batch_size=B, samples="sampled"),
            reference=ref,
            callbacks=[cb],
            **common,
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name] += per_step(run, args.steps, time.process_time if args.clock == "cpu" else time.perf_counter)
    sft = statistics.median(times["sft"])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), B={B}, G=8, "
        f"{args.steps} steps x {e - 1} timed epochs x {args.repeats} repeats, {args.clock} time"
    )
    sft_min = min(times["sft"])
    print(f"{'stage':<24}{'median ms/step':>15}{'x SFT':>7}{'min ms/step':>13}{'x SFT':>7}")
    for name, t in times.items():
        m, lo = statistics.median(t), min(t)
        print(f"{name:<24}{m * 1e3:>15.3f}{m / sft:>7.2f}{lo * 1e3:>13.3f}{lo / sft_min:>7.2f}")


if __name__ == "__main__":
    main()
