"""Bounds on every number a config or a command line may ask for, and the memory check that runs before anything
is built.

A typo such as ``sft.epochs=100000000000000000000`` or ``model.emb_dim=1000000000000`` must fail at load time with
one line naming the key, not fill a disk with checkpoints or die in a 256 TB allocation. Each bound is a constant
beside the field it limits (documented in that field's docstring) and is far above any run this kit is meant for;
the memory check then refuses a combination of in-bound values that still cannot be allocated.

Imports nothing of v3kit but ``rundir`` at load time (the config modules import it).
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Callable, Iterable

import torch

from .rundir import human_bytes

# Every float config key lies within +-MAX_CONFIG_FLOAT and every int key within +-MAX_CONFIG_INT (checked where the
# config is read, v3kit.config); a field with a narrower range (temperatures, sizes) checks it beside its definition.
# 1e6 is the features' bound too (v3kit.data.contract.MAX_FEATURE_ABS): far past any learning rate, loss weight,
# temperature or noise level a run uses, and small enough that products of two such values stay finite in float32.
MAX_CONFIG_FLOAT = 1e6
MAX_CONFIG_INT = 2**63 - 1  # int64: what torch (seeds, sizes) can hold
# Temperatures divide logits and rewards: within [1e-6, 1e6] a reward of up to 1e30 (MAX_REWARD_ABS) over one
# stays finite in float32.
MIN_TEMPERATURE = 1e-6


def check_range(key: str, value: float, low: float, high: float, why: str) -> None:
    """One line naming ``key``, the range and ``why`` when ``value`` lies outside ``[low, high]`` (or is NaN)."""
    if not low <= value <= high:
        raise ValueError(f"{key} must be in [{low:g}, {high:g}], got {value:g}; {why}")


def check_temperature(key: str, value: float) -> None:
    """A temperature: in ``[MIN_TEMPERATURE, MAX_CONFIG_FLOAT]``, so dividing by it keeps every logit finite."""
    check_range(key, value, MIN_TEMPERATURE, MAX_CONFIG_FLOAT, "it divides logits or rewards")


def cli_number(kind: type, low: float, high: float) -> Callable[[str], Any]:
    """The argparse ``type=`` of every numeric command-line option: ``kind`` (int or float), finite, within
    ``[low, high]``; anything else is argparse's one-line error naming the option (``v3kit.cli`` prints it)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(
                f"expects {'an integer' if kind is int else 'a number'} in [{low:g}, {high:g}], got {text!r}"
            ) from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}], got {text}")
        return value

    parse.bounds = (low, high)  # type: ignore[attr-defined]  # for the test that walks every option
    return parse


def check_max(key: str, value: int, bound: int, why: str) -> None:
    """One line naming ``key``, its ``bound`` and ``why`` the bound is there, when ``value`` exceeds it."""
    if value > bound:
        raise ValueError(f"{key} must be <= {bound:_}, got {value:_}; {why}")


def check_all_max(key: str, values: Iterable[int], bound: int, why: str) -> None:
    for v in values:
        check_max(key, v, bound, why)


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes free for new allocations on ``device`` (CPU: ``MemAvailable`` of ``/proc/meminfo``, or psutil); None
    when unknown (the check is then skipped: a wrong refusal would be worse than a late failure)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:
            return None
    if device.type != "cpu":
        return None
    if os.environ.get("V3KIT_TEST_AVAILABLE_MEMORY"):  # tests: a machine of a given size
        return int(os.environ["V3KIT_TEST_AVAILABLE_MEMORY"])
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        try:
            import psutil

            free = int(psutil.virtual_memory().available)
        except Exception:
            pass
    limit = _cgroup_headroom()  # a container's limit is often far below the host's free memory
    return limit if free is None else free if limit is None else min(free, limit)


def _cgroup_headroom() -> int | None:
    """``memory.max - memory.current`` of this process's cgroup (v2), None without a limit."""
    try:
        root = "/sys/fs/cgroup"
        with open(f"{root}/memory.max") as f:
            cap = f.read().strip()
        if cap == "max":
            return None
        with open(f"{root}/memory.current") as f:
            return max(0, int(cap) - int(f.read().strip()))
    except (OSError, ValueError):
        return None


def require_memory(needed: int, what: str, fix: str, device: torch.device | str = "cpu") -> None:
    """Refuse, in one line, a build of ``needed`` bytes that ``device`` cannot hold (``what`` names the keys)."""
    free = available_memory(device)
    if free is not None and needed > free:
        raise ValueError(
            f"{what} needs about {human_bytes(needed)} of memory but {torch.device(device).type} has "
            f"{human_bytes(free)} available; {fix}"
        )
