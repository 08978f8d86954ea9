"""Trainer: schedule, checkpoints, exact resume (C25), DDP equivalence under torchrun (C14, C15)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from umgclip.config import load_config
from umgclip.train import checkpoint as ck
from umgclip.train.config import OptimConfig, PretrainConfig
from umgclip.train.pretrain import apply_freezing, ensure_fp32_master, param_groups, train
from umgclip.train.schedule import ScheduleLengthError, WarmupCosine

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))  # the micro stand-in model and shard maker

from _train_micro import MicroCLIP, make_shards  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("micro_shards") / "shards", n=24, per_shard=8)


def _cfg(shards: Path, out: Path, *extra: str) -> PretrainConfig:
    return load_config(
        PretrainConfig,
        None,
        [
            "model.factory=_train_micro:build_micro",
            f"data.shards={shards}",
            "data.batch_size=8",
            "data.shuffle_buffer=16",
            "schedule.steps=6",
            "schedule.warmup_steps=2",
            f"output_dir={out}",
            "checkpoint_every=3",
            "keep_last=5",
            "log_every=1",
            "progress=false",
            *extra,
        ],
    )


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


# ------------------------------------------------------------------------------------ schedule


def test_schedule_warmup_then_cosine_by_hand():
    s = WarmupCosine(total=10, warmup=2, min_ratio=0.1)
    assert s.factor(0) == pytest.approx(0.5) and s.factor(1) == pytest.approx(1.0)
    # step 6: 4 of 8 cosine steps done -> halfway: 0.1 + 0.9 * 0.5
    assert s.factor(6) == pytest.approx(0.55)
    assert s.factor(10) == pytest.approx(0.1)


def test_schedule_rebase_has_no_lr_jump_and_reaches_min():
    s = WarmupCosine(total=10, warmup=0)
    before = s.factor(4)
    s.rebase(4, 20)
    assert s.factor(4) == pytest.approx(before)
    assert s.factor(5) < before and s.factor(5) == pytest.approx(
        before * 0.5 * (1 + math.cos(math.pi / 16))
    )
    assert s.factor(20) == pytest.approx(0.0)
    t = WarmupCosine(total=10)
    t.load_state_dict(s.state_dict())
    assert t.factor(7) == s.factor(7)
    with pytest.raises(ScheduleLengthError):
        s.rebase(25, 20)


# ------------------------------------------------------------------------- optimizer, freezing


def test_param_groups_no_decay_on_norms_biases_logit_scale_and_freezing():
    m = MicroCLIP()
    counts = apply_freezing(m, ["text_tower."], ["text_tower.proj."])
    assert not m.text_tower["embed"].weight.requires_grad
    assert m.text_tower["proj"].weight.requires_grad
    assert counts["frozen"] == m.text_tower["embed"].weight.numel()
    groups = param_groups(m, OptimConfig(lr=1.0, image_lr=2.0, head_lr=3.0, weight_decay=0.1))
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(m.logit_scale)]["weight_decay"] == 0.0
    assert by_id[id(m.image_tower["norm"].weight)]["weight_decay"] == 0.0
    assert by_id[id(m.image_tower["stem"].bias)]["weight_decay"] == 0.0
    assert by_id[id(m.image_tower["stem"].weight)]["weight_decay"] == 0.1
    assert by_id[id(m.image_tower["stem"].weight)]["lr"] == 2.0
    assert by_id[id(m.region_head.weight)]["lr"] == 3.0
    assert by_id[id(m.text_tower["proj"].weight)]["lr"] == 1.0
    assert id(m.text_tower["embed"].weight) not in by_id
    with pytest.raises(ValueError, match="matches no parameter"):
        apply_freezing(MicroCLIP(), ["image_towr."], [])


def test_c13_low_precision_weights_become_fp32_masters():
    m = MicroCLIP().to(torch.bfloat16)
    assert ensure_fp32_master(m) > 0
    assert all(p.dtype == torch.float32 for p in m.parameters())


# --------------------------------------------------------------------------------- checkpoints


def test_checkpoint_atomic_prune_and_weights_only(tmp_path):
    m = MicroCLIP()
    state = {"step": 1, "rng": [ck.rng_state()], "data": {"epoch": 0, "batches": 1}}
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, step, m, dict(state, step=step), keep_last=2)
    # A half-written checkpoint (killed mid-save) is never picked up.
    (tmp_path / "checkpoints" / ".step_9.tmp").mkdir()
    (tmp_path / "checkpoints" / "step_8").mkdir()  # no train_state.pt: incomplete
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_2", "step_3"]
    assert ck.resolve_resume("latest", tmp_path).name == "step_3"
    loaded = ck.load_train_state(ck.latest_checkpoint(tmp_path))  # weights_only=True inside
    assert loaded["step"] == 3
    # The RNG state round-trips: the same random numbers after restoring.
    ck.set_rng_state(loaded["rng"][0])
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    ck.set_rng_state(loaded["rng"][0])
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    with pytest.raises(ck.CheckpointError):
        ck.resolve_resume(str(tmp_path / "nothing"), tmp_path)


# ------------------------------------------------------------------------------ the train loop


def test_c25_resume_equals_uninterrupted_run(shards, tmp_path):
    full = train(_cfg(shards, tmp_path / "full"))
    rows = _metrics(full)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "itc", "rtc", "image_tag", "region_tag", "lr", "samples_per_s"} <= set(rows[0])
    assert (full / "curves.png").stat().st_size > 0 and (
        full / "final" / "model.safetensors"
    ).is_file()
    assert (full / "config.yaml").is_file()

    # "Kill" after step 3: a new run folder holding only the periodic checkpoint of step 3.
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_3", part / "checkpoints" / "step_3")
    with pytest.raises(FileExistsError):  # a run folder with checkpoints needs --resume
        train(_cfg(shards, part))
    resumed = train(_cfg(shards, part), resume="latest")
    got = {r["step"]: r for r in _metrics(resumed)}
    want = {r["step"]: r for r in rows}
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        for k in ("loss", "itc", "rtc", "image_tag", "region_tag"):
            assert got[step][k] == pytest.approx(want[step][k], abs=1e-6), (step, k)
        assert got[step]["lr"] == want[step]["lr"]
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(resumed / "final" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_with_another_length_is_explicit(shards, tmp_path):
    first = train(_cfg(shards, tmp_path / "r"))  # 6 steps, checkpoint at step 3
    run = tmp_path / "longer"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(first / "checkpoints" / "step_3", run / "checkpoints" / "step_3")
    with pytest.raises(ScheduleLengthError, match="allow_length_change"):
        train(_cfg(shards, run, "schedule.steps=10"), resume="latest")
    train(
        _cfg(shards, run, "schedule.steps=10", "schedule.allow_length_change=true"),
        resume="latest",
    )
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(4, 11))
    # No LR jump: step 4 uses the LR the 6-step run had there; then a slower cosine to 0.
    orig = _metrics(first)
    assert rows[0]["lr_factor"] == pytest.approx(orig[3]["lr_factor"])
    assert rows[1]["lr_factor"] > orig[4]["lr_factor"]
    assert rows[-1]["lr_factor"] < rows[1]["lr_factor"]


def test_itc_only_baseline_and_accumulation(shards, tmp_path):
    run = train(
        _cfg(
            shards,
            tmp_path / "clip",
            "loss.rtc=0",
            "loss.image_tag=0",
            "loss.region_tag=0",
            "optim.accum_steps=2",
            "schedule.steps=2",
        )
    )
    rows = _metrics(run)
    assert all(set(r) & {"rtc", "image_tag", "region_tag"} == set() for r in rows)
    assert all(math.isfinite(r["itc"]) for r in rows)


def test_losses_fall_on_micro_data(shards, tmp_path):
    run = train(
        _cfg(shards, tmp_path / "fall", "schedule.steps=30", "optim.lr=3e-3", "checkpoint_every=0")
    )
    rows = _metrics(run)
    for k in ("itc", "rtc", "image_tag", "region_tag"):
        first = sum(r[k] for r in rows[:3]) / 3
        last = sum(r[k] for r in rows[-3:]) / 3
        assert last < first, (k, first, last)


def test_cli_parses_set_and_resume(shards, tmp_path):
    from umgclip.train.cli import main

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        "model: {factory: '_train_micro:build_micro'}\n"
        f"data: {{shards: '{shards}', batch_size: 8}}\n"
        "schedule: {steps: 2}\nprogress: false\n"
        f"output_dir: '{tmp_path / 'cli'}'\n"
    )
    assert main([str(cfg_path)]) == 0
    assert (
        main(
            [
                str(cfg_path),
                "--set",
                "schedule.steps=3",
                "--set",
                "schedule.allow_length_change=true",
                "--resume",
            ]
        )
        == 0
    )
    assert [r["step"] for r in _metrics(tmp_path / "cli")][-1] == 3


# ----------------------------------------------------------------------------------- torchrun


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "127.0.0.1:0",
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_c14_c15_torchrun_ddp_matches_single_process(tmp_path):
    script = TESTS / "_ddp_check.py"
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "single.pt")],
        cwd=TESTS,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _torchrun(str(script), str(tmp_path / "ddp.pt"), cwd=TESTS)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = torch.load(tmp_path / "single.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp.pt", weights_only=True)
    # C14: same loss terms on the global batch (uneven region counts per rank) ...
    for s in range(2):
        assert set(a["loss"][s]) == set(b["loss"][s])
        for k in a["loss"][s]:
            assert torch.allclose(a["loss"][s][k], b["loss"][s][k], atol=1e-5), (s, k)
    # ... and the same gradients after DDP averaging.
    for n, g in a["grads"].items():
        if g is None:
            assert b["grads"][n] is None, n
        else:
            assert torch.allclose(g, b["grads"][n], atol=1e-5, rtol=1e-4), n
    # C15: step 1 had no box anywhere, so the region head was unused (no crash, no grad);
    # step 2 had boxes and the head was updated, identically in both runs.
    assert a["grads"]["region_head.weight"] is None
    from _train_micro import build_micro

    init = build_micro()[0].state_dict()
    assert not torch.allclose(b["weights"]["region_head.weight"], init["region_head.weight"])
    for k in a["weights"]:
        assert torch.allclose(a["weights"][k], b["weights"][k], atol=1e-4), k


@pytest.mark.slow
def test_torchrun_entry_point_trains_and_checkpoints(shards, tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        "model: {factory: '_train_micro:build_micro'}\n"
        f"data: {{shards: '{shards}', batch_size: 4}}\n"
        "schedule: {steps: 3}\nprogress: false\nlog_every: 1\n"
        f"output_dir: '{tmp_path / 'ddp_run'}'\n"
    )
    res = _torchrun("-m", "umgclip.train", str(cfg_path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "ddp_run"
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    assert ck.load_train_state(ck.latest_checkpoint(run))["world_size"] == 2
    assert (run / "final" / "model.safetensors").is_file()
