"""Performance of the kit itself: per-step cost of every stage and switch, where a step's time goes, data ingest,
per-epoch memory, and many runs trained as one stacked model (``benchmarks/stacked.py``). Prints ONE table and
writes ``benchmarks/results.json``.

    python benchmarks/bench.py [--quick] [--out benchmarks/results.json]     (or: make bench / make bench-quick)

Everything runs through v3kit's own code: steps are timed inside ``training.fit`` (the interval between two
``on_step`` callbacks: batch gather, the stage's step function, backward, clipping, Adam, logging), via
``train_sft`` / ``run_rce`` / ``run_grpo``. Every figure is the median of repeats (steps, or whole runs in fresh
subprocesses for memory); the ``n`` column says how many. Torch runs on 1 thread.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from v3kit.data import FEATURE_DTYPES, Splits, split_by_query  # noqa: E402
from v3kit.data.synthetic import SyntheticConfig, make_world  # noqa: E402
from v3kit.train.grpo import GRPOConfig, grpo_step_loss, per_group_terms, run_grpo  # noqa: E402
from v3kit.train.model import ModelConfig, build_model, compute_log_probs, policy_log_probs  # noqa: E402
from v3kit.train.rce import RCEConfig, run_rce  # noqa: E402
from v3kit.train.sft import SFTConfig, load_sft, train_sft  # noqa: E402

SIZES = {  # name: (batch B, group G, feature dim, tower hidden widths, embedding dim)
    "tiny": (32, 8, 16, [64], 32),
    "realistic": (256, 16, 384, [512, 512], 128),
}
GRPO_VARIANTS = {  # the default and each switch that costs compute
    "grpo": {},
    "grpo kl_reference=sft": {"kl_reference": "sft"},
    "grpo samples=sampled": {"samples": "sampled"},
    "grpo samples=exact": {"samples": "exact"},
    "grpo refresh_each_epoch": {"old_policy": "refresh_each_epoch"},
}
ROWS: list[dict[str, Any]] = []


def add(section: str, item: str, value: float, unit: str, n: int, note: str = "") -> None:
    ROWS.append({"section": section, "item": item, "value": value, "unit": unit, "n": n, "note": note})


class StepTimer:
    """Callback: wall time between consecutive ``on_step`` calls within an epoch (epoch boundaries excluded)."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.epoch: int | None = None
        self.steps: list[float] = []

    def on_step(self, row: dict[str, Any]) -> None:
        now = time.perf_counter()
        if self.last is not None and row["epoch"] == self.epoch:
            self.steps.append(now - self.last)
        self.last, self.epoch = now, row["epoch"]


def world(size: str, n_train: int) -> Splits:
    b, g, d, _, _ = SIZES[size]
    data = make_world(
        SyntheticConfig(n_queries=n_train + 40, group_size=g, min_group_size=max(2, g // 2), feature_dim=d, seed=0)
    )
    s = split_by_query(data, val_frac=20 / len(data), test_frac=20 / len(data), seed=0)
    return s


def model_cfg(size: str) -> ModelConfig:
    _, _, _, hidden, emb = SIZES[size]
    return ModelConfig(hidden=hidden, emb_dim=emb)


def stage_steps(size: str, name: str, splits: Splits, callbacks: list[Any]) -> StepTimer:
    """Run ``name`` for 2 epochs over ``splits.train`` and return the step timer."""
    b = SIZES[size][0]
    timer = StepTimer()
    cbs = callbacks + [timer]
    mc = model_cfg(size)
    torch.manual_seed(0)
    policy = build_model(mc, splits.train.query_dim, splits.train.cand_dim)
    # log_every=1: each step's row reaches the callbacks right after the step, so the timer sees every step (on
    # the CPU the per-step read costs what the batched one does).
    common = dict(seed=0, run_dir=None, callbacks=cbs, progress=False, log_every=1)
    if name == "sft":
        train_sft(splits, mc, SFTConfig(epochs=2, batch_size=b), **common)
    elif name == "rce":
        stage1 = load_sft(policy, splits.train, model_config=mc)
        run_rce(
            stage1.policy,
            splits,
            RCEConfig(epochs=2, batch_size=b),
            model_config=mc,
            reference=stage1.reference,
            **common,
        )
    else:
        stage1 = load_sft(policy, splits.train, model_config=mc)
        cfg = GRPOConfig(epochs=2, batch_size=b, **GRPO_VARIANTS[name])
        run_grpo(
            stage1.policy,
            splits,
            stage1.old_log_probs,
            cfg,
            reference=stage1.reference,
            temperature=mc.sim_temperature,
            model_config=mc,
            **common,
        )
    return timer


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def forward_backward(size: str, splits: Splits, repeats: int, objective: str = "sft") -> float:
    """One policy forward + backward on a training batch: the part of a step that is the model's own compute.

    ``objective="grpo"``: the same pass through the default GRPO objective (``grpo_step_loss`` with its per-step
    statistics, old policy = the current one) instead of SFT's cross-entropy: the difference is what the GRPO
    objective itself adds to a step."""
    b = SIZES[size][0]
    mc = model_cfg(size)
    model = build_model(mc, splits.train.query_dim, splits.train.cand_dim)
    d = splits.train
    qx, cx, mask, labels = d.query_x[:b].float(), d.cand_x[:b].float(), d.mask[:b], d.labels[:b]
    if objective == "grpo":
        cfg, rewards = GRPOConfig(), d.rewards[:b]
        with torch.no_grad():
            old = policy_log_probs(model, qx, cx, mask, 1.0)
        terms = per_group_terms(rewards, mask, cfg)

    def fb() -> None:
        model.zero_grad(set_to_none=True)
        logp = policy_log_probs(model, qx, cx, mask, 1.0)
        if objective == "sft":
            loss = -logp.gather(1, labels.unsqueeze(1)).mean()
        else:
            loss = grpo_step_loss(logp, old, rewards, mask, cfg, group_terms=terms)[0]
        loss.backward()

    return median_time(fb, repeats)


def model_flops(size: str) -> tuple[float, list[tuple[int, int, int]]]:
    """Forward+backward FLOPs of the towers' linear layers per step (3x forward), and the mm shapes."""
    b, g, d, hidden, emb = SIZES[size]
    shapes = []
    for rows in (b, b * g):  # query tower, candidate tower
        dims = [d] + hidden + [emb]
        shapes += [(rows, i, o) for i, o in zip(dims[:-1], dims[1:])]
    fwd = sum(2 * r * i * o for r, i, o in shapes)
    return 3 * fwd, shapes


def mm_rate(shapes: list[tuple[int, int, int]], repeats: int) -> float:
    """FLOP/s of plain ``torch.mm`` over the same shapes."""
    mats = [(torch.randn(r, i), torch.randn(i, o)) for r, i, o in shapes]
    t = median_time(lambda: [torch.mm(a, w) for a, w in mats], repeats)
    return sum(2 * r * i * o for r, i, o in shapes) / t


def bench_steps(quick: bool) -> None:
    """Per-step cost of every stage and switch. The variants run round-robin for several rounds and each figure is
    the median over all rounds, so load from other processes on the machine falls on all of them alike."""
    try:
        from v3kit.notebook.live import LivePlot
    except ImportError:  # plotting extras missing
        LivePlot = None
    names = ["sft", "rce", *GRPO_VARIANTS]
    rounds = 3 if quick else 5
    for size in SIZES:
        steps_per_epoch = (3 if quick else 8) if size == "realistic" else (10 if quick else 40)
        b = SIZES[size][0]
        splits = world(size, b * steps_per_epoch)
        fb_reps = 6 if size == "realistic" else 20
        times: dict[str, list[float]] = {n: [] for n in names + ["live off", "live on"]}
        fbs: list[float] = []
        fbs_grpo: list[float] = []
        rates: list[float] = []
        flops, shapes = model_flops(size)
        for _ in range(rounds):
            for name in names:
                times[name] += stage_steps(size, name, splits, []).steps
            fbs.append(forward_backward(size, splits, fb_reps))
            fbs_grpo.append(forward_backward(size, splits, fb_reps, "grpo"))
            rates.append(mm_rate(shapes, fb_reps))
            if LivePlot is not None:
                times["live off"] += stage_steps(size, "sft", splits, []).steps
                times["live on"] += stage_steps(size, "sft", splits, [LivePlot(display=False, live=True)]).steps
        fb, rate = statistics.median(fbs), statistics.median(rates)
        sec = f"step {size}"
        for name in names:
            step = statistics.median(times[name])
            note = "per-epoch refresh is extra: see old_log_probs" if "refresh" in name else ""
            add(sec, f"{name} step time", step * 1e3, "ms", len(times[name]), note)
            add(sec, f"{name} share outside policy fwd/bwd", 1 - fb / step, "frac", len(times[name]))
        sft_step = statistics.median(times["sft"])
        add(sec, "policy fwd+bwd (one batch)", fb * 1e3, "ms", rounds * fb_reps)
        fb_grpo = statistics.median(fbs_grpo)
        add(
            sec,
            "policy fwd+bwd through the GRPO objective",
            fb_grpo * 1e3,
            "ms",
            rounds * fb_reps,
            f"+{(fb_grpo - fb) * 1e3:.3f} ms over SFT's loss (objective, its backward, statistics)",
        )
        add(
            sec,
            "SFT model FLOP/s / torch.mm FLOP/s",
            flops / sft_step / rate,
            "frac",
            len(times["sft"]),
            f"tower linears {flops / 1e9:.3f} GFLOP/step; mm {rate / 1e9:.1f} GFLOP/s",
        )
        # old_log_probs (stage 1, refreshes) and the reference pass: inference vs training throughput
        model = build_model(model_cfg(size), splits.train.query_dim, splits.train.cand_dim)
        t = median_time(lambda model=model, splits=splits: compute_log_probs(model, splits.train, 1.0), 3)
        add(
            sec,
            "old_log_probs throughput",
            len(splits.train) / t,
            "groups/s",
            3,
            f"SFT training {b / sft_step:,.0f} groups/s",
        )
        if LivePlot is None:
            add(sec, "live-plot overhead", float("nan"), "frac", 0, "skipped: plotting extras not installed")
            continue
        # The plot redraws every few steps: compare mean step times (a median would skip the redraws).
        t_on, t_off = statistics.fmean(times["live on"]), statistics.fmean(times["live off"])
        add(
            sec,
            "live-plot overhead (SFT, mean step)",
            t_on / t_off - 1,
            "frac",
            len(times["live on"]),
            f"on {t_on * 1e3:.2f} ms vs off {t_off * 1e3:.2f} ms",
        )


# ----------------------------------------------------------------------------------- subprocess measurements
PROBE = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
{setup}
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) now that the imports are done
base = status("VmRSS")
t0 = time.perf_counter()
{body}
out["seconds"] = out.get("seconds", time.perf_counter() - t0)
out["peak_rss_growth"] = status("VmHWM") - base
out["anon_rss_end"] = status("RssAnon")
print(json.dumps(out))
"""


def probe(body: str, setup: str = "") -> dict[str, float]:
    code = PROBE.format(root=str(ROOT), body=body, setup=setup)
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def median_probe(body: str, repeats: int, setup: str = "") -> dict[str, float]:
    runs = [probe(body, setup) for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def bench_ingest(quick: bool, tmp: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from make_table import write_table

    n_q, g, d = (2000 if quick else 20000), 16, 384
    path = tmp / "ingest.parquet"
    rows = write_table(path, n_q, g, d)
    arrow = tmp / "ingest.arrow"  # the same rows as an uncompressed Arrow IPC file (Feather v2)
    write_table(arrow, n_q, g, d)
    payload = n_q * g * d * 4 + n_q * d * 4
    reps = 3
    setup = (
        "import shutil\nimport v3kit.data.ingest\nfrom v3kit.data import split_by_query\n"
        "from v3kit.data.tables import load_groups\n"
        "from v3kit.data.cache import cache_dir, cached_splits, load_cached\n"
        "from v3kit.train.model import ModelConfig\nfrom v3kit.train.sft import SFTConfig, train_sft\n"
    )
    section = f"ingest {n_q:,} x {g} x {d}-d"
    for fmt, file in (("Parquet", path), ("Arrow IPC", arrow)):
        load = median_probe(f"d = load_groups({str(file)!r})\nout = {{}}", reps, setup)
        size = f"{file.stat().st_size / 1e9:.2f} GB file"
        add(section, f"{fmt} -> GroupData", rows / load["seconds"], "rows/s", reps, f"{rows:,} rows; {size}")
        add(
            section,
            f"{fmt} -> GroupData: peak RSS growth / payload",
            load["peak_rss_growth"] / payload,
            "x",
            reps,
            f"{load['peak_rss_growth'] / 1e9:.2f} GB for a float32 payload of {payload / 1e9:.2f} GB",
        )
    arrow.unlink()
    for dtype in FEATURE_DTYPES:
        build = median_probe(
            f"d = load_cached({str(path)!r}, {dtype!r})\nout = {{}}",
            reps,
            setup + f"shutil.rmtree(cache_dir({str(path)!r}, {dtype!r}), ignore_errors=True)\n",
        )
        again = median_probe(f"d = load_cached({str(path)!r}, {dtype!r})\nout = {{}}", reps, setup)
        add(section, f"cache build ({dtype})", rows / build["seconds"], "rows/s", reps, "first load: parse + write")
        add(
            section,
            f"cached load ({dtype})",
            rows / again["seconds"],
            "rows/s",
            reps,
            f"{again['seconds'] * 1e3:.1f} ms; memory-mapped",
        )
        add(section, f"cached load ({dtype}): peak RSS growth", again["peak_rss_growth"] / 1e6, "MB", reps)
        # What verifying the cache costs: the same load with the per-file CRC-32 check skipped (open_cache without
        # the file listing reads no page), side by side with the verified load above.
        unchecked = median_probe(
            f"from v3kit.data.cache import open_cache\nd = open_cache(cache_dir({str(path)!r}, {dtype!r}))\nout = {{}}",
            reps,
            setup,
        )
        add(
            section,
            f"cached load ({dtype}) without the CRC-32 check",
            rows / unchecked["seconds"],
            "rows/s",
            reps,
            f"{unchecked['seconds'] * 1e3:.1f} ms; the check costs {(again['seconds'] - unchecked['seconds']) * 1e3:.1f}"
            " ms per load",
        )
    # One SFT epoch (tiny towers, B=64) over this data: in memory vs memory-mapped float16 splits.
    train = "r = train_sft(s, ModelConfig(), SFTConfig(epochs=1), progress=False)\nout = {'anon': 0}\n"
    for label, make in (
        ("in memory (float32)", f"s = split_by_query(load_groups({str(path)!r}))\n"),
        ("cached splits (float16)", f"s = cached_splits({str(path)!r}, 'float16')\n"),
    ):
        r = median_probe(
            make + train, reps, setup + (f"cached_splits({str(path)!r}, 'float16')\n" if "cached" in label else "")
        )
        add(
            section,
            f"load + SFT epoch, {label}: peak RSS growth / payload",
            r["peak_rss_growth"] / payload,
            "x",
            reps,
            f"{r['peak_rss_growth'] / 1e9:.2f} GB; anonymous RSS at end {r['anon_rss_end'] / 1e9:.2f} GB; "
            f"{r['seconds']:.1f} s",
        )
    path.unlink()


def bench_epochs(quick: bool) -> None:
    sizes = [10_000, 100_000] + ([] if quick else [1_000_000])
    b, g, d, hidden, emb = SIZES["tiny"]
    for n in sizes:
        setup = f"""
from v3kit.data import GroupData, Splits
from v3kit.train.model import ModelConfig
from v3kit.train.sft import SFTConfig, train_sft
gen = torch.Generator().manual_seed(0)
def groups(n):
    mask = torch.ones(n, {g}, dtype=torch.bool)
    return GroupData(query_x=torch.randn(n, {d}, generator=gen), cand_x=torch.randn(n, {g}, {d}, generator=gen),
                     mask=mask, labels=torch.randint(0, {g}, (n,), generator=gen),
                     rewards=torch.randn(n, {g}, generator=gen), query_ids=[str(i) for i in range(n)])
splits = Splits(groups({n}), groups(200), groups(200))
class T:
    def on_stage_start(self, *a): self.t = time.perf_counter()
    def on_step(self, row): self.end = time.perf_counter()
"""
        body = f"""
t = T()
train_sft(splits, ModelConfig(hidden={hidden}, emb_dim={emb}), SFTConfig(epochs=1), callbacks=[t], progress=False)
out = {{"seconds": t.end - t.t, "payload": ({g} * {d} + {d} + 2 * {g}) * 4 * {n}}}
"""
        reps = 3 if n < 1_000_000 else 1
        r = median_probe(body, reps, setup)
        sec = f"SFT epoch (tiny, {g} x {d}-d)"
        add(sec, f"{n:,} groups: epoch time", r["seconds"], "s", reps, f"{n / r['seconds']:,.0f} groups/s")
        add(
            sec,
            f"{n:,} groups: peak RSS growth in the epoch",
            r["peak_rss_growth"] / 1e6,
            "MB",
            reps,
            f"data in memory {r['payload'] / 1e6:.0f} MB",
        )


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg()[0],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'section':<28} {'item':<44} {'value':>12} {'unit':<9} {'n':>4}  note", "-" * 120]
    for r in rows:
        v = r["value"]
        text = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        lines.append(f"{r['section']:<28} {r['item']:<44} {text:>12} {r['unit']:<9} {r['n']:>4}  {r['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and smaller data (under 3 minutes)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results.json"))
    ap.add_argument("--only", choices=["steps", "ingest", "epochs", "stacked"], action="append")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    parts = args.only or ["steps", "ingest", "epochs", "stacked"]
    info = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "quick": args.quick, **machine()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if "steps" in parts:
            bench_steps(args.quick)
        if "ingest" in parts:
            bench_ingest(args.quick, Path(tmp))
        if "epochs" in parts:
            bench_epochs(args.quick)
        if "stacked" in parts:  # K runs as one stacked model vs one after another (benchmarks/stacked.py)
            from stacked import bench_stacked

            bench_stacked(args.quick, add)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    print(
        f"v3kit benchmarks, {info['date']}, {info['cpu']} ({info['cores']} cores, "
        f"load {info['load_avg_at_start']:.1f}), "
        f"torch {info['torch']} on 1 thread{', --quick' if args.quick else ''}; {info['seconds']} s"
    )
    print(table(ROWS))
    Path(args.out).write_text(json.dumps({"machine": info, "rows": ROWS}, indent=1) + "\n")


if __name__ == "__main__":
    main()
