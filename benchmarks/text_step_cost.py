"""Cost of one training step (SFT loss, forward + backward + Adam) with text: frozen vs end-to-end towers.

    OMP_NUM_THREADS=2 python benchmarks/text_step_cost.py [--batch 16] [--steps 5]

Both modes run side by side in one process on the same stdlib-search groups (8 candidates each), taking turns
step by step; the median step time is reported. Frozen: an MLP
two-tower on precomputed all-MiniLM-L6-v2 vectors (the one-off embedding cost is reported separately, per text).
End-to-end: ``TextTwoTower`` encoding every batch's texts, with its top ``train_layers`` layers trainable.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from v3kit.data import from_long_frame, iterate_batches
from v3kit.data.stdlib_search import StdlibSearchConfig, build_table
from v3kit.data.text import embed_texts
from v3kit.train.model import ModelConfig, build_model, model_inputs, policy_log_probs


def median_step_seconds(models: list[tuple[torch.nn.Module, object]], batch: int, steps: int) -> list[float]:
    """Median seconds per step of each (model, data); the models take turns step by step, so a load spike on a
    shared machine hits all of them alike, and the median ignores it."""
    runs = []
    for model, data in models:
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs.append((model, opt, list(iterate_batches(data, batch))))
    times: list[list[float]] = [[] for _ in models]
    for i in range(steps + 1):  # step 0 warms up (allocations, tokenizer load) and is not counted
        for k, (model, opt, batches) in enumerate(runs):
            b = batches[i % len(batches)]
            t0 = time.perf_counter()
            logp = policy_log_probs(model, *model_inputs(model, b), b.mask, 0.05)
            loss = -logp.gather(1, b.labels.unsqueeze(1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:
                times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16, help="queries per step (x 8 candidates)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    frame = build_table(StdlibSearchConfig(max_queries=args.batch * 4))
    with tempfile.TemporaryDirectory() as cache:
        texts = sorted(set(frame["query_text"]) | set(frame["candidate_text"]))
        t0 = time.perf_counter()
        embed_texts(texts, cache_dir=cache, max_tokens=args.max_tokens, progress=False)
        per_text = (time.perf_counter() - t0) / len(texts)
        frozen = from_long_frame(
            frame, embed=lambda t: embed_texts(t, cache_dir=cache, max_tokens=args.max_tokens, progress=False)
        )
    e2e = from_long_frame(frame, text_mode="end_to_end")
    names = ["frozen (MLP on MiniLM vectors)"]
    models = [(build_model(ModelConfig(hidden=[256], emb_dim=128, normalize=True), 384, 384), frozen)]
    for n in (1, 2):
        cfg = ModelConfig(
            target="v3kit.text_model:TextTwoTower", kwargs={"train_layers": n, "max_tokens": args.max_tokens}
        )
        names.append(f"end_to_end (MiniLM, top {n} layer{'s' if n > 1 else ''})")
        models.append((build_model(cfg, 0, 0), e2e))
    rows = list(zip(names, median_step_seconds(models, args.batch, args.steps)))
    print(
        f"one SFT step, {args.batch} queries x 8 candidates, max {args.max_tokens} tokens, "
        f"torch threads {torch.get_num_threads()}"
    )
    for name, s in rows:
        print(f"  {name:<38} {s * 1000:9.1f} ms/step  ({s / rows[0][1]:.0f}x frozen)")
    print(f"  frozen mode's one-off embedding: {per_text * 1000:.1f} ms per distinct text (cached afterwards)")


if __name__ == "__main__":
    main()
