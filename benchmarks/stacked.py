"""Many runs in one: K whole pipeline runs (SFT, stage 1, RCE, GRPO) trained as one stacked model
(``v3kit.pipeline_stacked.run_stacked``) against the same K runs one after another (``run_pipeline``), side by side
in one process, the stacked run between the two halves of the sequential ones so a drift of the machine's speed
falls on both alike; and the memory each member adds, in fresh subprocesses.

    python benchmarks/stacked.py [--quick] [--device cuda] [--k 8]     (also a section of benchmarks/bench.py)
    python benchmarks/stacked.py --user-model    # the default world with a user's module: the torch.func path,
                                                 # and one training step of each stack (and one after another)
    python benchmarks/stacked.py --switch-grid   # a grid of 8 single-seed variants that differ only in switches,
                                                 # run_grid --stack off against auto
    python benchmarks/stacked.py --compile       # torch.compile's compile time against the step time it saves

Worlds: ``default`` is the default config (3,000 queries x 8 candidates, 16-d, towers 64-32, SFT 15 / RCE 3 /
GRPO 8 epochs); ``384-d`` is 2,000 queries x 8 candidates with 384-d features and the same built-in towers (the
shape of a real-text table embedded by a sentence encoder). Every run shares the split (``data.split_seed=0``), as a
grid's runs do; the K runs differ in ``seed``. ``user-towers`` (``--user-model``) is the default world with the
built-in towers' architecture written as a user's module (``benchmarks/user_towers.py``), which stacks through
``torch.func.vmap`` instead of the built-in towers' batched matmuls; it runs beside ``default``, so one run gives
both ratios. ``module_routing`` (``--worlds module_routing,module_routing-dense``) is the real-text table of
``benchmarks/real_text_tasks.py`` (``$V3KIT_TASKS``; 2,400 queries, 384-d MiniLM features, 59 distinct candidates),
whose candidates the towers embed once a batch (``candidate_table``); ``-dense`` is the same with the table off.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from v3kit.config import load_config  # noqa: E402
from v3kit.pipeline import run_pipeline  # noqa: E402
from v3kit.pipeline_stacked import run_stacked  # noqa: E402
from v3kit.train import stacked_plan  # noqa: E402
from v3kit.train.losses import score_log_probs  # noqa: E402
from v3kit.train.model import ModelConfig, build_model, scores  # noqa: E402
from v3kit.train.stacked_func import StackedFunc  # noqa: E402
from v3kit.train.stacked_towers import StackedTowers  # noqa: E402

USER_TARGET = f"{ROOT / 'benchmarks' / 'user_towers.py'}:UserTowers"
TASKS = Path(os.environ.get("V3KIT_TASKS", Path.home() / ".cache" / "v3kit" / "tasks"))
WORLDS = {
    "default": [],
    "384-d": ["data.synthetic.n_queries=2000", "data.synthetic.feature_dim=384"],
    "user-towers": [f"model.target={USER_TARGET}"],
    # a real-text table (benchmarks/real_text_tasks.py) whose groups share 59 candidates: the candidate table's world
    "module_routing": [f"data.path={TASKS / 'module_routing.parquet'}"],
    "module_routing-dense": [f"data.path={TASKS / 'module_routing.parquet'}", "candidate_table=false"],
}
DEFAULT_WORLDS = ("default", "384-d")
QUICK = ["data.synthetic.n_queries=600", "sft.epochs=4", "rce.epochs=1", "grpo.epochs=2"]
# Rounds of each world: this kind of machine (a VM) drifts 15-40% within minutes; with the stacked run between the
# halves, one round's ratio still ranges about 4.2-4.9x for the same code, so the median of 5 is steadier than of 3.
ROUNDS = 5


def configs(world: str, k: int, root: Path, tag: str, extra: list[str], first: int = 0) -> list[Any]:
    """The configs of seeds ``first .. first + k - 1`` of ``world``."""
    sets = ["progress=false", "threads=1", "data.split_seed=0", *WORLDS[world], *extra]
    seeds = range(first, first + k)
    return [load_config(None, [*sets, f"seed={s}", f"run_dir={root / tag / f'seed{s}'}"]) for s in seeds]


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall seconds and CPU seconds of this process (all its threads) of ``fn()``. On a machine other jobs share,
    the wall time moves with their load; the CPU time mostly does not, so both ratios are reported."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def warm_up(tmp: Path, dev: Sequence[str] = ()) -> None:
    """One small run of each path: the lazy imports and first calls (torch's first Adam step, allocations) that
    would otherwise fall on whichever side a round times first."""
    warm = [*QUICK, "sft.epochs=1", *dev]
    run_pipeline(configs("default", 1, tmp, "warm", warm)[0])
    run_stacked(configs("default", 2, tmp, "warm-stacked", warm))


def side_by_side(world: str, k: int, rounds: int, extra: list[str], tmp: Path) -> dict[str, Any]:
    """Seconds of K sequential runs and of the K runs stacked, per round. The stacked run sits in the middle of
    the sequential ones (half of them before it, half after), so a drift of the machine's speed during a round
    falls on both sides alike (callers warm both paths up first: :func:`warm_up`)."""
    seq, stk = [], []
    half = k // 2
    for r in range(rounds):
        root = tmp / f"{world}-{r}"

        def sequential(first: int, n: int, root: Path = root) -> None:
            for cfg in configs(world, n, root, "seq", extra, first):
                run_pipeline(cfg)

        def stacked(root: Path = root) -> None:
            out = run_stacked(configs(world, k, root, "stk", extra))
            assert out.stacked, out.notes
            assert not [e for e in out.results if isinstance(e, BaseException)]

        first = timed(partial(sequential, 0, half))
        stk.append(timed(stacked))
        second = timed(partial(sequential, half, k - half))
        seq.append((first[0] + second[0], first[1] + second[1]))
        shutil.rmtree(root, ignore_errors=True)
    ratios = [a[0] / b[0] for a, b in zip(seq, stk)]
    cpu_ratios = [a[1] / b[1] for a, b in zip(seq, stk)]
    return {
        "seq": [t[0] for t in seq],
        "stk": [t[0] for t in stk],
        "ratios": ratios,
        "cpu_ratios": cpu_ratios,
        "load": os.getloadavg()[0],
    }


PROBE = """
import json, sys, time
sys.path.insert(0, {root!r})
from v3kit.config import load_config
from v3kit.pipeline_stacked import run_stacked
from v3kit.pipeline import run_pipeline
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
sets = {sets!r}
cfgs = [load_config(None, [*sets, f"seed={{s}}", "run_dir=" + {tmp!r} + f"/seed{{s}}"]) for s in range({k})]
out = run_stacked(cfgs) if {k} > 1 else run_pipeline(cfgs[0])
print(json.dumps({{"peak": status("VmHWM")}}))
"""


def peak_rss(world: str, k: int, extra: list[str], tmp: Path) -> float:
    sets = ["progress=false", "threads=1", "data.split_seed=0", *WORLDS[world], *extra]
    code = PROBE.format(root=str(ROOT), sets=sets, tmp=str(tmp / f"mem{k}"), k=k)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    shutil.rmtree(tmp / f"mem{k}", ignore_errors=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak"]


def bench_stacked(
    quick: bool, add: Callable[..., None], k: int = 8, device: str = "cpu", worlds: tuple[str, ...] = DEFAULT_WORLDS
) -> None:
    """Rows of the stacked-vs-sequential comparison (``add(section, item, value, unit, n, note)``)."""
    dev = [f"device={device}"] if device != "cpu" else []
    extra = (QUICK if quick else []) + dev
    rounds = 1 if quick else ROUNDS
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        warm_up(tmp, dev)
        for world in worlds:
            section = f"stacked {world} x{k}" + (" (quick)" if quick else "")
            got = side_by_side(world, k, rounds, extra, tmp)
            med_seq, med_stk = statistics.median(got["seq"]), statistics.median(got["stk"])
            spread = f"ratios per round {', '.join(f'{r:.2f}' for r in got['ratios'])}"
            add(section, f"{k} runs one after another", med_seq, "s", rounds, f"{med_seq / k:.2f} s per run")
            add(section, f"{k} runs stacked", med_stk, "s", rounds, f"{med_stk / k:.2f} s per run")
            add(section, "stacked speed-up", statistics.median(got["ratios"]), "x", rounds, spread)
            cpu_spread = f"CPU-time ratios per round {', '.join(f'{r:.2f}' for r in got['cpu_ratios'])}"
            note = f"{cpu_spread}; load {got['load']:.1f} after the rounds"
            add(section, "stacked speed-up in CPU time", statistics.median(got["cpu_ratios"]), "x", rounds, note)
            if device == "cpu":
                small, big = peak_rss(world, 2, extra, tmp), peak_rss(world, k, extra, tmp)
                one = peak_rss(world, 1, extra, tmp)
                note = f"peak RSS {one / 2**20:.0f} MB for one run, {big / 2**20:.0f} MB for {k} stacked"
                add(section, "memory per stacked member", (big - small) / (k - 2) / 2**20, "MB", 1, note)


def bench_sweep(add: Callable[..., None], sizes: list[str], k: int, rounds: int, user: bool) -> None:
    """The stacked speed-up by the towers' arithmetic: the ``384-d`` world with towers ``HIDDEN-EMB`` (each of
    ``sizes``), the K runs one after another against stacked, with the CPU's arithmetic limit lifted so every size
    stacks; ``user``: the same architecture as a user's module (the ``torch.vmap`` stack). The multiply-adds per run
    and step are ``arithmetic_reason``'s estimate, the number its limits (``CPU_STACK_MAX_MACS`` for the built-in
    towers, ``CPU_VMAP_MAX_MACS`` for a user's module) are compared with."""
    stacked_plan.CPU_STACK_MAX_MACS = stacked_plan.CPU_VMAP_MAX_MACS = float("inf")
    tmp = Path(tempfile.mkdtemp())
    try:
        warm_up(tmp)
        for size in sizes:
            hidden, emb = (int(x) for x in size.split("-"))
            if user:
                extra = [f"model.target={USER_TARGET}", f"model.kwargs={{hidden: [{hidden}], emb_dim: {emb}}}"]
            else:
                extra = [f"model.hidden=[{hidden}]", f"model.emb_dim={emb}"]
            cfg = configs("384-d", 1, tmp, "size", extra)[0]
            model = build_model(cfg.model, 384, 384)
            # arithmetic_reason's estimate: a batch's candidates (no candidate table here) times the parameters
            rows = cfg.sft.batch_size * cfg.data.synthetic.group_size
            macs = rows * sum(p.numel() for p in model.parameters())
            got = side_by_side("384-d", k, rounds, extra, tmp)
            section = f"stacked 384-d {size}" + (" (user's module)" if user else "")
            spread = f"ratios per round {', '.join(f'{r:.2f}' for r in got['ratios'])}"
            note = f"{macs / 1e6:.0f} M multiply-adds per run and step; {spread}"
            add(section, "stacked speed-up", statistics.median(got["ratios"]), "x", rounds, note)
            add(section, f"{k} runs one after another", statistics.median(got["seq"]), "s", rounds)
            add(section, f"{k} runs stacked", statistics.median(got["stk"]), "s", rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


STEP_DIMS, STEP_BATCH, STEP_GROUP = 16, 64, 8  # the default world's features, batch and group


def _members(k: int, target: str) -> list[Any]:
    """k models of ``target`` at the default world's size, member j initialised from seed j."""
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(build_model(ModelConfig(target=target), STEP_DIMS, STEP_DIMS))
    return out


def _step_batch(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k members' batches of queries, candidates and (all-true) masks at the default world's size."""
    q = torch.randn(k, STEP_BATCH, STEP_DIMS)
    c = torch.randn(k, STEP_BATCH, STEP_GROUP, STEP_DIMS)
    return q, c, torch.ones(k, STEP_BATCH, STEP_GROUP, dtype=torch.bool)


def _stacked_loss(st: Any, q: torch.Tensor, c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The members' SFT losses summed: the label's log-prob (candidate 0) under temperature 1."""
    return (-score_log_probs(st.scores(q, c), 1.0, mask)[..., 0].mean(dim=1)).sum()


def _stacked_step(st: Any, loss: Callable[[], torch.Tensor]) -> None:
    """One step of a stack ``st``: ``loss()``'s backward, every member's clipping (norm 1) and Adam (lr 1e-3)."""
    st.zero_grad()
    loss().backward()
    st.clip(torch.ones(st.k))
    st.adam_step([1e-3] * st.k, [False] * st.k)


def _step_fns(k: int) -> dict[str, Callable[[], None]]:
    """One training step (forward, SFT loss, backward, clipping, Adam) of k members at the default world's size:
    the built-in towers stacked, the user's module stacked by vmap, and k user's modules one after another."""
    towers, func = StackedTowers(_members(k, "v3kit.model:TwoTower")), StackedFunc(_members(k, USER_TARGET))
    alone = _members(k, USER_TARGET)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in alone]
    q, c, mask = _step_batch(k)

    def stacked(st: Any) -> None:
        _stacked_step(st, lambda: _stacked_loss(st, q, c, mask))

    def one_after_another() -> None:
        for j, (m, opt) in enumerate(zip(alone, opts)):
            opt.zero_grad()
            (-score_log_probs(scores(m, q[j], c[j]), 1.0, mask[j])[:, 0].mean()).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()

    return {
        "built-in towers, stacked": lambda: stacked(towers),
        "user's module, vmap stack": lambda: stacked(func),
        "user's module, one after another": one_after_another,
    }


def bench_steps(add: Callable[..., None], k: int, rounds: int = 5, steps: int = 200) -> None:
    """Milliseconds per training step of k members, the three ways of :func:`_step_fns`, in interleaved rounds."""
    fns = _step_fns(k)
    got: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in list(fns.items())[:: 1 if r % 2 == 0 else -1]:
            for _ in range(steps // 10):  # warm up
                fn()
            got[name].append(timed(lambda fn=fn: [fn() for _ in range(steps)])[0] / steps * 1e3)
    seq = statistics.median(got["user's module, one after another"])
    for name, ms in got.items():
        med = statistics.median(ms)
        note = f"{seq / med:.2f}x one after another; rounds {', '.join(f'{x:.2f}' for x in ms)}"
        add(f"one step x{k}", name, med, "ms", rounds, note)


def compile_probe(k: int, rounds: int = 3, steps: int = 200) -> dict[str, Any]:
    """In this process: seconds of the first step through ``torch.compile`` (the compile, or the read of torch's
    compile cache), then ms per stacked step (forward, SFT loss, backward, clipping, Adam) with the forward and
    loss eager and compiled, in interleaved rounds. Printed as JSON by the child of :func:`bench_compile`."""
    towers = StackedTowers(_members(k, "v3kit.model:TwoTower"))
    q, c, mask = _step_batch(k)

    def step(fn: Callable[..., torch.Tensor]) -> None:
        _stacked_step(towers, lambda: fn(towers, q, c, mask))

    fns = {"eager": _stacked_loss, "compiled": torch.compile(_stacked_loss)}
    first = timed(lambda: step(fns["compiled"]))[0]
    got: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in list(fns.items())[:: 1 if r % 2 == 0 else -1]:
            for _ in range(steps // 10):  # warm up
                step(fn)
            got[name].append(timed(lambda fn=fn: [step(fn) for _ in range(steps)])[0] / steps * 1e3)
    return {"first": first, **{name: statistics.median(ms) for name, ms in got.items()}}


def bench_compile(add: Callable[..., None], k: int) -> None:
    """Whether ``torch.compile`` would pay in a stacked run: :func:`compile_probe` in two fresh processes that
    share an empty inductor cache (the first compiles, the second reads the cache), against the steps it saves."""
    code = f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import stacked; "
    rounds = 3
    code += f"print(json.dumps(stacked.compile_probe({k}, {rounds})))"
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
        out = []
        for _ in ("cold", "warm"):
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
            if res.returncode:
                raise RuntimeError(res.stderr[-2000:])
            out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    section = f"torch.compile, one step x{k}"
    add(section, "first step, empty compile cache", out[0]["first"], "s", 1)
    add(section, "first step, compile cache warm", out[1]["first"], "s", 1)
    eager, compiled = out[1]["eager"], out[1]["compiled"]
    add(section, "stacked step, eager", eager, "ms", rounds)
    add(section, "stacked step, compiled", compiled, "ms", rounds, f"{eager / compiled:.2f}x eager")
    saved = (eager - compiled) / 1e3
    repay = out[1]["first"] / saved if saved > 0 else float("inf")
    add(section, "steps to repay a warm compile", repay, "", 1, "a default-world run has 1,221 steps")


# A grid of single-seed variants that differ only in switches, each a structure of its own: v3kit.ablate stacks
# them by v3kit.stack_structure (one objective per switch setting inside the stack, a member's own step for
# sampled GRPO), where each ran alone before.
SWITCH_GRID = {
    "seed": [],
    "sampled": ["grpo.samples=sampled"],
    "debias": ["reward.debias=candidate_features"],
    "zscore": ["rce.reward_norm=zscore"],
    "refresh": ["grpo.old_policy=refresh_each_epoch"],
    "k2": ["grpo.kl_estimator=k2"],
    "cispo": ["grpo.loss_type=cispo"],
    "anchored": ["grpo.kl_reference=sft"],
}


def bench_switch_grid(add: Callable[..., None], quick: bool, rounds: int = 3) -> None:
    """``run_grid`` of :data:`SWITCH_GRID` on the default world, ``--stack off`` against ``auto``, side by side in
    each round (off, then auto); the rows of both are checked equal to float32 rounding."""
    from v3kit.ablate import parse_grid, run_grid

    raw = {"name": "switches", "base": ["threads=1", *(QUICK if quick else [])], "seeds": [0], "reference": "seed"}
    raw["variants"] = SWITCH_GRID
    offs, autos, stacked = [], [], 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        warm_up(tmp)
        for r in range(1 if quick else rounds):
            out: dict[str, Any] = {}
            for mode, times in (("off", offs), ("auto", autos)):
                t0 = time.perf_counter()
                out[mode] = run_grid(parse_grid(raw), tmp / f"{mode}{r}", progress=False, stack=mode).frame
                times.append(time.perf_counter() - t0)
            keys = ["world", "variant", "seed", "split", "stage", "epoch"]
            a, b = (out[m].sort_values(keys).reset_index(drop=True) for m in ("off", "auto"))
            assert a[keys].equals(b[keys]) and not a["stacked"].any()
            assert ((a["acc@1"] - b["acc@1"]).abs() <= 1e-4).all(), "a stacked row is not its run alone's"
            stacked = int(b["stacked"].sum())
    n = len(offs)
    section = "switch grid x8" + (" (quick)" if quick else "")
    add(
        section,
        "8 variants --stack off",
        statistics.median(offs),
        "s",
        n,
        f"rounds {', '.join(f'{t:.1f}' for t in offs)}",
    )
    note = f"rounds {', '.join(f'{t:.1f}' for t in autos)}; {stacked} of the grid's rows stacked"
    add(section, "8 variants --stack auto", statistics.median(autos), "s", n, note)
    ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(offs, autos))
    add(section, "stacked speed-up", statistics.median(a / b for a, b in zip(offs, autos)), "x", n, f"rounds {ratios}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller worlds, one round")
    ap.add_argument("--k", type=int, default=8, help="runs per stack")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--user-model", action="store_true", help="the default world and a user's module (torch.func)")
    ap.add_argument("--worlds", default="", help=f"comma-separated, of {', '.join(WORLDS)} (default: default,384-d)")
    ap.add_argument(
        "--sweep",
        default="",
        help="HIDDEN-EMB,... tower sizes on the 384-d world, each stacked with the CPU limit lifted "
        "(e.g. 64-32,128-64,192-96,256-128,384-192); with --user-model, as a user's module (vmap)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="rounds of each --sweep size")
    ap.add_argument(
        "--switch-grid", action="store_true", help="a grid of 8 single-seed switch variants, --stack off against auto"
    )
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile's compile time against the step time it saves"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []

    def add(section: str, item: str, value: float, unit: str, n: int, note: str = "") -> None:
        rows.append({"section": section, "item": item, "value": value, "unit": unit, "n": n, "note": note})

    print(f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, torch {torch.__version__}, device {args.device}")
    worlds = ("default", "user-towers") if args.user_model else DEFAULT_WORLDS
    if args.worlds:
        worlds = tuple(args.worlds.split(","))
        unknown = [w for w in worlds if w not in WORLDS]
        if unknown:
            ap.error(f"--worlds: unknown {unknown}; choose from {list(WORLDS)}")
    if args.switch_grid:
        bench_switch_grid(add, args.quick)
    elif args.compile:
        bench_compile(add, args.k)
    elif args.sweep:
        bench_sweep(add, args.sweep.split(","), args.k, args.rounds, args.user_model)
    else:
        if args.user_model and args.device == "cpu":
            bench_steps(add, args.k)
        bench_stacked(args.quick, add, args.k, args.device, worlds)
    for r in rows:
        print(f"{r['section']:<26} {r['item']:<30} {r['value']:>9.2f} {r['unit']:<3} {r['n']:>3}  {r['note']}")


if __name__ == "__main__":
    main()
