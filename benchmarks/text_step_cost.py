"""Cost of one training step (SFT loss, forward + backward + Adam) with text: frozen vs end-to-end towers.

    OMP_NUM_THREADS=2 python benchmarks/text_step_cost.py [--batch 16] [--steps 5]

Both modes run side by side in one process on the same stdlib-search groups (8 candidates each). Frozen: an MLP
two-tower on precomputed all-MiniLM-L6-v2 vectors (the one-off embedding cost is reported separately, per text).
End-to-end: ``TextTwoTower`` encoding every batch's texts, with its top ``train_layers`` layers trainable.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from v3kit.data import from_long_frame, iterate_batches
from v3kit.model import ModelConfig, build_model, model_inputs, policy_log_probs
from v3kit.stdlib_search import StdlibSearchConfig, build_table
from v3kit.text import embed_texts


def step_seconds(model: torch.nn.Module, data, batch: int, steps: int) -> float:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = list(iterate_batches(data, batch))
    times = []
    for i in range(steps + 1):  # the first step warms up (allocations, tokenizer load) and is not counted
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        logp = policy_log_probs(model, *model_inputs(model, b), b.mask, 0.05)
        loss = -logp.gather(1, b.labels.unsqueeze(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16, help="queries per step (x 8 candidates)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    frame = build_table(StdlibSearchConfig(max_queries=args.batch * 4))
    with tempfile.TemporaryDirectory() as cache:
        texts = sorted(set(frame["query_text"]) | set(frame["candidate_text"]))
        t0 = time.perf_counter()
        embed_texts(texts, cache_dir=cache, max_tokens=args.max_tokens, progress=False)
        per_text = (time.perf_counter() - t0) / len(texts)
        frozen = from_long_frame(frame, embed=lambda t: embed_texts(t, cache_dir=cache, max_tokens=args.max_tokens,
                                                                      progress=False))
    e2e = from_long_frame(frame, text_mode="end_to_end")
    rows = [("frozen (MLP on MiniLM vectors)",
             step_seconds(build_model(ModelConfig(hidden=[256], emb_dim=128, normalize=True), 384, 384), frozen,
                          args.batch, args.steps))]
    for n in (1, 2):
        cfg = ModelConfig(target="v3kit.text_model:TextTwoTower",
                          kwargs={"train_layers": n, "max_tokens": args.max_tokens})
        rows.append((f"end_to_end (MiniLM, top {n} layer{'s' if n > 1 else ''})",
                     step_seconds(build_model(cfg, 0, 0), e2e, args.batch, args.steps)))
    print(f"one SFT step, {args.batch} queries x 8 candidates, max {args.max_tokens} tokens, "
          f"torch threads {torch.get_num_threads()}")
    for name, s in rows:
        print(f"  {name:<38} {s * 1000:9.1f} ms/step  ({s / rows[0][1]:.0f}x frozen)")
    print(f"  frozen mode's one-off embedding: {per_text * 1000:.1f} ms per distinct text (cached afterwards)")


if __name__ == "__main__":
    main()
