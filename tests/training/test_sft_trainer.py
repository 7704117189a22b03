"""The SFT trainer end to end on the tiny model and synthetic reasoning data: the loss falls, parallel
layouts give the single-process loss curve, a resumed run is bit-identical, SIGTERM and kill -9 never
lose the last good checkpoint, and a NaN is never trained through. Real processes (torchrun / python)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import REPO, torchrun
from megatron_ovr.config.io import dump_yaml
from megatron_ovr.config.sft import (
    BatchSection, CheckpointSection, DataSection, LoggingSection, ModelSection, OptimizerSection, SFTConfig,
)
from megatron_ovr.data.chat import tokenize_conversation
from megatron_ovr.data.indexed import write_indexed
from megatron_ovr.data.synthetic import generate_conversations
from megatron_ovr.data.synthetic_visual import write_visual_sft
from megatron_ovr.data.tokenizer import load_tokenizer, qwen_tokenizer_dir
from megatron_ovr.training.checkpointing import latest_step
from tools import preprocess_sft
from tools.make_tiny_checkpoint import make_checkpoint

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("sft_worker.py")


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    tokenizer = load_tokenizer(qwen_tokenizer_dir())
    prefix = tmp_path_factory.mktemp("sft_data") / "synthetic"
    samples = (tokenize_conversation(c["messages"], tokenizer) for c in generate_conversations(300, seed=0))
    write_indexed(prefix, samples, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    return str(prefix)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """Training starts from an HF checkpoint, as the cold start does: megatron's random init differs
    between pipeline layouts, loaded weights do not."""
    return str(make_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", "tiny", seed=0))


def write_config(tmp_path: Path, data_prefix: str, hf_dir: str, name: str = "run", *, checkpoints: bool = False,
                 **top) -> Path:
    """A tiny SFT run's config; ``checkpoints``: save them (the tiny model's full-vocabulary embedding and output
    layer make each save ~600 MB with optimizer state, several seconds: only the tests about them save)."""
    run = tmp_path / name
    cfg = SFTConfig(
        model=ModelSection(preset=None, hf_dir=hf_dir),
        data=DataSection(paths=[data_prefix], seq_length=128, packed=True, seed=7),
        batch=BatchSection(global_batch_size=4, micro_batch_size=2),
        optimizer=OptimizerSection(lr=2e-3, min_lr=2e-4, warmup_steps=top.pop("warmup_steps", 2), decay_style="cosine"),
        checkpoint=CheckpointSection(dir=str(run / "ckpt") if checkpoints else None,
                                     save_interval=top.pop("save_interval", 0)),
        logging=LoggingSection(metrics_path=str(run / "metrics.jsonl"), plot_path=str(run / "loss.png")),
        train_steps=top.pop("train_steps", 4),
        **top,
    )
    path = tmp_path / f"{name}.yaml"
    dump_yaml(cfg, path)
    return path


def history(config: Path) -> list[dict]:
    run = config.with_suffix("")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def python_worker(config: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), MASTER_PORT=str(_port()), OMP_NUM_THREADS="1")
    # Its own session: a kill takes its whole process group, as a node failure would (the checkpoint writer's
    # helper processes too, which would otherwise outlive the test).
    return subprocess.Popen([sys.executable, str(WORKER), "--config", str(config), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            start_new_session=True)


def _port() -> int:
    from conftest import free_port

    return free_port()


def test_loss_falls_and_writes_plot(tmp_path, data_prefix, hf_dir):
    config = write_config(tmp_path, data_prefix, hf_dir, train_steps=12)
    torchrun(WORKER, 1, "--config", str(config))
    losses = [h["loss"] for h in history(config)]
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 1.0, losses
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


# (name, processes, overrides): each must give the single-process loss curve (activation recomputation too).
LAYOUTS = [
    ("tp2", 2, ["parallel.tensor_parallel=2"]),
    ("pp2", 2, ["parallel.pipeline_parallel=2"]),
    ("dp2", 2, []),
    ("tp2_sp", 2, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]),
    ("recompute", 1, ["model.recompute=true"]),
]


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory, data_prefix, hf_dir):
    single = write_config(tmp_path_factory.mktemp("single"), data_prefix, hf_dir, "single", train_steps=3)
    torchrun(WORKER, 1, "--config", str(single))
    return [h["loss"] for h in history(single)]


@pytest.mark.parametrize("name,nproc,overrides", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_layout_matches_single_process(tmp_path, data_prefix, hf_dir, single_process_losses, name, nproc, overrides):
    parallel = write_config(tmp_path, data_prefix, hf_dir, name, train_steps=3)
    torchrun(WORKER, nproc, "--config", str(parallel), *[a for o in overrides for a in ("--set", o)])
    got = [h["loss"] for h in history(parallel)]
    assert got == pytest.approx(single_process_losses, rel=1e-5), (single_process_losses, got)


def test_resume_is_bit_identical(tmp_path, data_prefix, hf_dir):
    straight = write_config(tmp_path, data_prefix, hf_dir, "straight", train_steps=6)  # no saves to perturb it
    torchrun(WORKER, 2, "--config", str(straight))
    interrupted = write_config(tmp_path, data_prefix, hf_dir, "interrupted", checkpoints=True, train_steps=6,
                               save_interval=3)
    torchrun(WORKER, 2, "--config", str(interrupted), "--set", "exit_after_steps=3")
    torchrun(WORKER, 2, "--config", str(interrupted))
    expected = [(h["step"], h["loss"], h["grad_norm"]) for h in history(straight)]
    got = [(h["step"], h["loss"], h["grad_norm"]) for h in history(interrupted)]
    assert [s for s, _, _ in got] == [1, 2, 3, 4, 5, 6]
    assert got == expected  # exact equality, not approximate


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path, data_prefix, hf_dir):
    config = write_config(tmp_path, data_prefix, hf_dir, checkpoints=True, train_steps=1000)
    proc = python_worker(config)
    metrics = tmp_path / "run" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # SLURM may deliver it twice: the handler must be idempotent
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output[-3000:]
    assert "SIGTERM: saved step" in output
    saved = latest_step(tmp_path / "run" / "ckpt")
    assert saved == history(config)[-1]["step"]


def test_kill_during_save_keeps_the_last_good_checkpoint(tmp_path, data_prefix, hf_dir):
    config = write_config(tmp_path, data_prefix, hf_dir, checkpoints=True, train_steps=1000, save_interval=1)
    ckpt = tmp_path / "run" / "ckpt"
    proc = python_worker(config)
    # Wait until one checkpoint is complete and the next save is under way, then kill -9.
    _wait_for(lambda: (ckpt / "latest").exists() and any(ckpt.glob("*.partial")), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    good = latest_step(ckpt)
    assert good is not None and any(ckpt.glob("*.partial"))
    resumed = write_config(tmp_path, data_prefix, hf_dir, checkpoints=True, train_steps=good + 2, save_interval=1)
    torchrun(WORKER, 1, "--config", str(resumed))
    steps = [h["step"] for h in history(resumed)]
    assert steps[-2:] == [good + 1, good + 2]
    assert not any(ckpt.glob("*.partial"))
    assert latest_step(ckpt) == good + 2


def test_nan_step_is_skipped(tmp_path, data_prefix, hf_dir):
    config = write_config(tmp_path, data_prefix, hf_dir, train_steps=4, nan_policy="skip")
    # 2 micro-batches per step: call 2 is the first micro-batch of step 2.
    torchrun(WORKER, 1, "--config", str(config), "--nan-at-call", "2")
    steps = history(config)
    assert [h["skipped_steps"] for h in steps] == [0, 1, 1, 1]
    assert all(h["loss"] == h["loss"] for h in steps[2:]), "a NaN reached the weights"


def test_nan_step_stops_the_run(tmp_path, data_prefix, hf_dir):
    config = write_config(tmp_path, data_prefix, hf_dir, train_steps=4, nan_policy="stop")
    with pytest.raises(AssertionError, match="non-finite loss or gradient at step 2"):
        torchrun(WORKER, 1, "--config", str(config), "--nan-at-call", "2")


def test_packed_and_unpacked_give_the_same_loss(tmp_path, hf_dir):
    """The same 8 conversations as 1 packed row or 8 padded rows: the first step's loss (same weights,
    same tokens) is the same, so packing changes throughput, not the objective."""
    tokenizer = load_tokenizer(qwen_tokenizer_dir())
    prefix = tmp_path / "eight"
    samples = [tokenize_conversation(c["messages"], tokenizer) for c in generate_conversations(8, seed=3)]
    assert sum(len(s.token_ids) for s in samples) <= 512  # they all fit in one packed row
    write_indexed(prefix, samples, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    losses = {}
    for packed, rows, micro in ((True, 1, 1), (False, 8, 2)):
        config = write_config(tmp_path, str(prefix), hf_dir, f"packed_{packed}", train_steps=1, warmup_steps=0)
        torchrun(WORKER, 1, "--config", str(config), "--set", "data.seq_length=512", "--set", f"data.packed={packed}",
                 "--set", f"batch.global_batch_size={rows}", "--set", f"batch.micro_batch_size={micro}")
        [step] = history(config)
        losses[packed] = step["loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6), losses


def test_multimodal_sft_packed_unpacked_and_tp2_agree(tmp_path, hf_dir):
    """Multimodal SFT with the vision tower and merger trained too: the same 6 image conversations as 1 packed
    row or 6 padded rows, and packed at TP2, give the same losses for 2 steps (the second after an optimizer
    step that moved the ViT): images, their 3D positions and the ViT's tensor-parallel gradients all agree."""
    jsonl = write_visual_sft(tmp_path / "visual", 6, seed=2)
    prefix = tmp_path / "visual_sft"
    assert preprocess_sft.main(["--input", str(jsonl), "--tokenizer", str(qwen_tokenizer_dir()),
                                "--processor", hf_dir, "--output", str(prefix)]) == 0
    trained_vision = ("--set", "model.freeze_vision=false", "--set", "model.freeze_merger=false",
                      "--set", "data.seq_length=1024")
    runs = {"packed": (1, True, 1, 1), "unpacked": (1, False, 6, 2), "packed_tp2": (2, True, 1, 1)}
    losses = {}
    for name, (nproc, packed, rows, micro) in runs.items():
        config = write_config(tmp_path, str(prefix), hf_dir, name, train_steps=2, warmup_steps=0)
        tp = ("--set", "parallel.tensor_parallel=2", "--set", "parallel.sequence_parallel=true") if nproc == 2 else ()
        torchrun(WORKER, nproc, "--config", str(config), *trained_vision, *tp, "--set", f"data.packed={packed}",
                 "--set", f"batch.global_batch_size={rows}", "--set", f"batch.micro_batch_size={micro}")
        losses[name] = [step["loss"] for step in history(config)]
    assert len(losses["packed"]) == 2 and losses["packed"][1] < losses["packed"][0], losses
    for name in ("unpacked", "packed_tp2"):
        assert losses[name] == pytest.approx(losses["packed"], rel=1e-5), losses


def test_start_from_a_converted_megatron_checkpoint(tmp_path, data_prefix, hf_dir, single_process_losses):
    """Weights converted to a megatron checkpoint at TP2 and read at TP1 train exactly like the HF start."""
    megatron_dir = tmp_path / "megatron"
    torchrun(REPO / "tools" / "convert_hf_to_megatron.py", 2, "--hf-dir", hf_dir, "--out", str(megatron_dir),
             "--tp", "2", "--dtype", "float32")
    config = write_config(tmp_path, data_prefix, hf_dir, "from_megatron", train_steps=3)
    torchrun(WORKER, 1, "--config", str(config), "--set", "model.hf_dir=null", "--set", f"model.megatron_dir={megatron_dir}")
    assert [h["loss"] for h in history(config)] == single_process_losses
