"""The torch.func stacked path (``v3kit.train.stacked_func``) for models other than the built-in towers: a user's
two-tower module and a cross-encoder-like scorer, trained K at once under ``torch.vmap``, must give each run what its
own sequential run gives (within float32 rounding); a model vmap cannot run as its members run (data-dependent
control flow, an in-place buffer update, a forward that raises under vmap, dropout in training) runs one after
another with a one-line note, and gives exactly the sequential results."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_config
from test_stacked import SMALL, _assert_same_run
from torch import nn

from v3kit.pipeline import run_pipeline
from v3kit.pipeline_stacked import run_stacked
from v3kit.train.model import ModelConfig, attach_interface, build_model, scores
from v3kit.train.stacked_func import StackedFunc, choose_stack
from v3kit.train.stacked_towers import StackedTowers

ROOT = Path(__file__).resolve().parents[1]

# The models a user might write, in a file named by model.target (and imported here for the unit tests). No output
# bias adds one constant to every candidate of a group: the group softmax cannot see it, so its gradient is float32
# noise that Adam scales up (tests/test_stacked.py's GAUGE).
MODELS = '''
import torch
from torch import nn


class UserTowers(nn.Module):
    def __init__(self, query_dim, cand_dim, hidden=16, emb=8):
        super().__init__()
        self.q = nn.Sequential(nn.Linear(query_dim, hidden), nn.Tanh(), nn.Linear(hidden, emb))
        self.c = nn.Sequential(nn.Linear(cand_dim, hidden), nn.Tanh(), nn.Linear(hidden, emb, bias=False))

    def encode_query(self, query_x):
        return self.q(query_x)

    def encode_candidates(self, cand_x):
        return self.c(cand_x)


class CrossScorer(nn.Module):
    """A cross-encoder-like scorer: an MLP over each (query, candidate) pair."""

    def __init__(self, query_dim, cand_dim, hidden=16):
        super().__init__()
        self.inp = nn.Linear(query_dim + cand_dim, hidden)
        self.out = nn.Linear(hidden, 1, bias=False)

    def forward(self, query_x, cand_x):
        q = query_x.unsqueeze(1).expand(-1, cand_x.shape[1], -1)
        return self.out(torch.relu(self.inp(torch.cat([q, cand_x], dim=-1)))).squeeze(-1)


class Branchy(UserTowers):
    """Data-dependent Python control flow."""

    def encode_query(self, query_x):
        out = self.q(query_x)
        return out if out.sum() > 0 else -out


class Normed(UserTowers):
    """BatchNorm: its running statistics are updated in place in training."""

    def __init__(self, query_dim, cand_dim):
        super().__init__(query_dim, cand_dim)
        self.bn = nn.BatchNorm1d(8)

    def encode_query(self, query_x):
        return self.bn(self.q(query_x))


class ItemScale(UserTowers):
    """Reads a tensor's value into Python: raises under vmap."""

    def encode_query(self, query_x):
        return self.q(query_x) * float(query_x.abs().max())


class Dropped(UserTowers):
    """Dropout, kept on in SFT (RCE and GRPO turn it off)."""

    def __init__(self, query_dim, cand_dim):
        super().__init__(query_dim, cand_dim)
        self.drop = nn.Dropout(0.2)

    def encode_query(self, query_x):
        return self.drop(self.q(query_x))
'''


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "user_models.py"
    path.write_text(MODELS)
    return path


def _build(models: Path, name: str, k: int, dims=(6, 5), **kw) -> list[nn.Module]:
    cfg = ModelConfig(target=f"{models}:{name}", **kw)
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(build_model(cfg, *dims))
    return out


def _batch(k: int, b: int = 5, g: int = 4, dims=(6, 5), seed: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(k, b, dims[0], generator=gen), torch.randn(k, b, g, dims[1], generator=gen)


# ---------------------------------------------------------------------------------------------- pieces
class Tied(nn.Module):
    """Both towers share one layer (tied weights), plus a frozen projection and a constant buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.q_head = nn.Linear(6, 4)
        self.frozen = nn.Linear(6, 6).requires_grad_(False)
        self.register_buffer("scale", torch.rand(4) + 0.5)

    def encode_query(self, query_x):
        return self.q_head(torch.tanh(self.shared(query_x))) * self.scale

    def encode_candidates(self, cand_x):
        return self.q_head(torch.tanh(self.shared(self.frozen(cand_x))))


def _tied(k: int) -> list[nn.Module]:
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(attach_interface(Tied(), ModelConfig()))
    return out


@pytest.mark.parametrize("name", ["UserTowers", "CrossScorer", "tied"])
def test_vmap_scores_and_gradients_equal_each_members_own(models, name):
    members = _tied(3) if name == "tied" else _build(models, name, 3)
    dims = (6, 6) if name == "tied" else (6, 5)
    stack = StackedFunc(members)
    q, c = _batch(3, dims=dims)
    out = stack.scores(q, c)
    assert out.shape == (3, 5, 4)
    (out * torch.arange(1.0, 4.0).view(3, 1, 1)).sum().backward()
    for k, m in enumerate(members):
        own = scores(m, q[k], c[k])  # the sequential code's scores
        torch.testing.assert_close(out[k], own)
        (own.sum() * (k + 1)).backward()
        for pname, p in m.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(stack.member(pname, k, stack.params[pname].grad), p.grad)
    if name == "tied":  # one tied weight in the stack, its gradient from both towers
        assert "shared.weight" in stack.names and "frozen.weight" not in stack.names


def test_training_and_eval_mode_follow_autograd_as_the_sequential_code_runs_them():
    class ModeAware(Tied):
        def encode_query(self, query_x):
            return super().encode_query(query_x) * (2.0 if self.training else 1.0)

    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        members.append(attach_interface(ModeAware(), ModelConfig()))
    stack = StackedFunc(members)
    q, c = _batch(2, dims=(6, 6))
    trained = stack.scores(q, c)
    with torch.inference_mode():  # how the stacked evaluation calls it
        evaluated = stack.scores(q, c)
    for k, m in enumerate(members):
        torch.testing.assert_close(trained[k], scores(m.train(), q[k], c[k]))
        torch.testing.assert_close(evaluated[k], scores(m.eval(), q[k], c[k]))
    assert not torch.allclose(trained, evaluated)


def test_stacked_clipping_and_adam_equal_torch_per_member_with_frozen_parameters():
    """Steps of the vmap stack (forward, backward, clip, Adam) against each member trained alone with torch's
    ``clip_grad_norm_`` and ``Adam(model.parameters())``; the Adam state lists every parameter as torch's does."""
    members, alone = _tied(3), _tied(3)
    stack = StackedFunc(members)
    lrs, max_norms, wds = [1e-2, 3e-2, 1e-3], [0.5, math.inf, 2.0], [0.0, 0.1, 0.0]
    opts = [torch.optim.Adam(m.parameters(), lr=lr, weight_decay=wd) for m, lr, wd in zip(alone, lrs, wds)]
    for step in range(4):
        q, c = _batch(3, dims=(6, 6), seed=step)
        frozen = [False, step == 2, False]  # member 1 skips a batch
        stack.zero_grad()
        stack.scores(q, c).pow(2).mean(dim=(1, 2)).sum().backward()
        norms = stack.clip(torch.tensor(max_norms))
        stack.adam_step(lrs, frozen, wds)
        for k, (m, opt) in enumerate(zip(alone, opts)):
            opt.zero_grad()
            scores(m, q[k], c[k]).pow(2).mean().backward()
            norm = torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], max_norms[k])
            torch.testing.assert_close(norms[k], norm)
            if not frozen[k]:
                opt.step()
    stack.to_members(members)
    for k, (m, own) in enumerate(zip(members, alone)):
        for (name, p), (_, p_own) in zip(m.named_parameters(), own.named_parameters()):
            torch.testing.assert_close(p.detach(), p_own.detach(), rtol=1e-5, atol=1e-6, msg=name)
        state = stack.adam_state(k)
        assert len(state) == len(list(own.parameters()))
        for p, s in zip(own.parameters(), state):
            if not p.requires_grad:
                assert float(s["step"]) == 0 and p not in opts[k].state  # a checkpoint stores no state for it
                continue
            assert float(s["step"]) == float(opts[k].state[p]["step"])
            torch.testing.assert_close(s["exp_avg"], opts[k].state[p]["exp_avg"], rtol=1e-5, atol=1e-7)


def test_the_built_in_towers_keep_their_batched_matmuls_and_a_user_model_gets_vmap(models):
    q, c = _batch(1)
    built = [build_model(ModelConfig(), 6, 5) for _ in range(2)]
    assert isinstance(choose_stack(built, q[0], c[0])[0], StackedTowers)
    for name in ("UserTowers", "CrossScorer"):
        stack, reason = choose_stack(_build(models, name, 2), q[0], c[0])
        assert isinstance(stack, StackedFunc) and reason is None


class Unused(Tied):
    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(2, 2)  # never called: torch's Adam never steps it


class Featurized(Tied):
    def featurize(self, batch):
        return batch.query_x, batch.cand_x


@pytest.mark.parametrize(
    "name, why",
    [
        ("Branchy", "data-dependent Python control flow"),
        ("Normed", "updates the buffer bn.running_mean in place"),
        ("ItemScale", "fails under torch.vmap (RuntimeError: vmap: It looks like you're calling .item()"),
        ("Dropped", "draws random numbers in training (dropout)"),
        ("unused", "spare.weight gets no gradient"),
        ("featurize", "builds its own inputs (featurize)"),
        ("shared", "share a parameter"),
        ("shapes", "differ in parameter or buffer names, shapes"),
        ("attribute", "scores under torch.vmap differ from its own"),
    ],
)
def test_a_model_vmap_cannot_run_as_its_members_run_is_refused_with_a_reason(models, name, why):
    q, c = _batch(1)
    if name in ("unused", "featurize"):
        cls = Unused if name == "unused" else Featurized
        members = [attach_interface(cls(), ModelConfig()) for _ in range(2)]
        q, c = _batch(1, dims=(6, 6))
    elif name == "shared":
        members = _build(models, "UserTowers", 2)
        members[1].c = members[0].c  # the candidate tower of one run is the other's
    elif name == "attribute":  # the stack runs member 0's code: a number the forward reads must be the same
        members = _build(models, "UserTowers", 2)
        members[1].encode_query = lambda x, m=members[1]: m.q(x) * 3.0
    elif name == "shapes":
        members = [*_build(models, "UserTowers", 1), *_build(models, "UserTowers", 1, kwargs={"hidden": 9})]
    else:
        members = _build(models, name, 2)
    before = [{n: t.clone() for n, t in m.state_dict().items()} for m in members]
    stack, reason = choose_stack(members, q[0], c[0])
    assert stack is None and why in reason, reason
    assert "\n" not in reason and type(members[0]).__name__ in reason
    for m, state in zip(members, before):  # the probe leaves the members as they were (BatchNorm's statistics too)
        assert all(torch.equal(t, state[n]) for n, t in m.state_dict().items())


# ---------------------------------------------------------------------------------------------- pipelines
def _configs(root: Path, tag: str, variants: list[list[str]], common: list[str]) -> list:
    return [tiny_config(root / f"{tag}{i}", *SMALL, *common, *v) for i, v in enumerate(variants)]


NUMERIC = ["grpo.kl_beta=0.3", "sft.lr=3e-3", "rce.label_weight=0.4", "model.sim_temperature=0.5"]


@pytest.mark.parametrize("name", ["UserTowers", "CrossScorer", "residual linear"])
def test_a_user_model_stacked_by_vmap_matches_its_sequential_runs(tmp_path, models, name):
    """Seeds and numeric hyperparameters: every member's per-step loss, KL, ratio, clipping and gradient norm, its
    evaluations, selected epoch, test table and final weights equal its sequential run's. ``residual linear``: the
    built-in TwoTower in a shape the batched matmuls do not cover (a linear layer without bias) takes vmap too."""
    variants = [["seed=0"], ["seed=1", *NUMERIC], ["seed=0", *NUMERIC]]
    common = [f"model.target={models}:{name}"]
    if name == "residual linear":
        common = ["model.residual=true", "model.residual_kind=linear", "model.sim_temperature=0.1"]
        variants = [[x for x in v if not x.startswith("model.sim_temperature")] for v in variants]
    for cfg in _configs(tmp_path, "seq", variants, common):
        run_pipeline(cfg)
    out = run_stacked(_configs(tmp_path, "stk", variants, common))
    assert out.stacked and out.notes == [], out.notes
    for i, r in enumerate(out.results):
        assert not isinstance(r, BaseException), r
        _assert_same_run(tmp_path / f"seq{i}", tmp_path / f"stk{i}")


def _fallback(tmp_path: Path, models: Path, name: str, stages: set[str]) -> None:
    variants = [["seed=0"], ["seed=1", "grpo.kl_beta=0.3"]]
    common = [f"model.target={models}:{name}", "sft.epochs=1", "rce.epochs=1", "grpo.epochs=1"]
    for cfg in _configs(tmp_path, "seq", variants, common):
        run_pipeline(cfg)
    out = run_stacked(_configs(tmp_path, "stk", variants, common))
    assert not out.stacked  # some stage ran one after another
    assert {n.split(":")[0] for n in out.notes} == stages, out.notes
    assert all(f"one after another: torch.vmap cannot stack the {name}: " in n for n in out.notes), out.notes
    for i in range(2):  # a stage that fell back is the sequential code: bit for bit
        a = pd.read_csv(tmp_path / f"seq{i}/metrics.csv")
        b = pd.read_csv(tmp_path / f"stk{i}/metrics.csv")
        a, b = (x[x["stage"].isin(stages)].reset_index(drop=True) for x in (a, b))
        pd.testing.assert_frame_equal(a, b)
        if stages != {"sft", "rce", "grpo"}:  # the others stacked
            _assert_same_run(tmp_path / f"seq{i}", tmp_path / f"stk{i}")


def test_data_dependent_control_flow_runs_one_after_another_with_a_note(tmp_path, models):
    _fallback(tmp_path, models, "Branchy", {"sft", "rce", "grpo"})


@pytest.mark.parametrize("name", ["Normed", "ItemScale"])
def test_in_place_buffers_and_a_forward_that_raises_under_vmap_run_one_after_another(tmp_path, models, name):
    _fallback(tmp_path, models, name, {"sft", "rce", "grpo"})


def test_dropout_in_sft_runs_one_after_another_and_the_stages_without_it_stack(tmp_path, models):
    _fallback(tmp_path, models, "Dropped", {"sft"})


# ---------------------------------------------------------------------------------------------- resume
RESUME_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from v3kit.pipeline_stacked import run_stacked
common = [*{small!r}, "model.target=" + {target!r}]
cfgs = [tiny_config({root!r} + f"/m{{i}}", *common, f"seed={{i}}", f"grpo.kl_beta={{0.1 * (i + 1)}}") for i in range(2)]
out = run_stacked(cfgs, resume={resume})
assert out.stacked, out.notes
assert not [r for r in out.results if isinstance(r, BaseException)]
"""


def _resume_process(root: Path, target: str, resume: bool, kill_at: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("V3KIT_TEST_KILL_AT", None)
    if kill_at:
        env["V3KIT_TEST_KILL_AT"] = kill_at
    script = RESUME_SCRIPT.format(tests=str(ROOT / "tests"), root=str(root), small=SMALL, target=target, resume=resume)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_resume_after_a_kill_mid_vmap_stack_is_bit_identical(tmp_path, models):
    target = f"{models}:UserTowers"
    ref = _resume_process(tmp_path / "ref", target, False, None)
    assert ref.returncode == 0, ref.stderr
    crash = tmp_path / "crash"
    for kill_at in ("sft:epoch2:step3", "grpo:epoch1:before_checkpoint"):
        killed = _resume_process(crash, target, True, kill_at)
        assert killed.returncode == -9, killed.stderr  # SIGKILL at that point
    done = _resume_process(crash, target, True, None)
    assert done.returncode == 0, done.stderr
    for i in range(2):
        a, b = tmp_path / f"ref/m{i}", crash / f"m{i}"
        assert (a / "metrics.csv").read_bytes() == (b / "metrics.csv").read_bytes()
        assert (a / "summary.csv").read_bytes() == (b / "summary.csv").read_bytes()
        for ckpt in sorted(a.glob("*_epoch*.pt")):
            wa, wb = torch.load(ckpt, weights_only=True), torch.load(b / ckpt.name, weights_only=True)
            assert all(torch.equal(t, wb["model"][n]) for n, t in wa["model"].items()), ckpt.name
            for pid, s in wa["optimizer"]["state"].items():
                assert all(torch.equal(v, wb["optimizer"]["state"][pid][n]) for n, v in s.items())


STACK_HF = """
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class StackConfig(PretrainedConfig):
    model_type = "v3kit_test_stacked_scorer"

    def __init__(self, query_dim=16, doc_dim=16, width=8, **kwargs):
        self.query_dim, self.doc_dim, self.width = query_dim, doc_dim, width
        super().__init__(**kwargs)


class StackScorer(PreTrainedModel):
    config_class = StackConfig

    def __init__(self, config):
        super().__init__(config)
        self.q = nn.Linear(config.query_dim, config.width)
        self.d = nn.Linear(config.doc_dim, config.width, bias=False)
        self.post_init()

    def forward(self, query_x, cand_x):
        return torch.einsum("bd,bgd->bg", torch.tanh(self.q(query_x)), self.d(cand_x))
"""


def test_a_hugging_face_save_pretrained_scorer_stacks_and_matches(tmp_path):
    """A ``PreTrainedModel`` directory as ``model.target`` (its ``train()`` reads the device: the stack's copy of
    the module must live on a real one)."""
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    (tmp_path / "stack_hf.py").write_text(STACK_HF)
    sys.path.insert(0, str(tmp_path))
    try:
        import stack_hf

        torch.manual_seed(0)
        stack_hf.StackConfig.register_for_auto_class()
        stack_hf.StackScorer.register_for_auto_class("AutoModel")
        stack_hf.StackScorer(stack_hf.StackConfig()).save_pretrained(tmp_path / "v2")
        variants = [["seed=0"], ["seed=1", "grpo.kl_beta=0.3", "sft.lr=3e-3"]]
        common = [f"model.target={tmp_path / 'v2'}", "sft.epochs=1", "rce.epochs=1", "grpo.epochs=1"]
        for cfg in _configs(tmp_path, "seq", variants, common):
            run_pipeline(cfg)
        out = run_stacked(_configs(tmp_path, "stk", variants, common))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("stack_hf", None)
    assert out.stacked and out.notes == [], out.notes
    for i in range(2):
        _assert_same_run(tmp_path / f"seq{i}", tmp_path / f"stk{i}")
