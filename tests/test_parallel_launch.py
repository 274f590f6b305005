"""`densa train --nproc`: the torchrun command, and a killed worker resuming bit-identically (real torchrun)."""

import json
import os
import socket
import subprocess

import pytest

from densa.cli import build_parser
from densa.io import InputError
from densa.train.parallel.launch import torchrun_command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse(*flags: str):
    return build_parser().parse_args(["train", "--attention", "dense", *flags])


def test_command_infers_dp_and_forwards_flags(tmp_path):
    args = parse("--nproc", "8", "--tp", "2", "--pp", "2", "--batch-size", "64", "--out", str(tmp_path),
                 "--max-restarts", "3", "--rdzv-endpoint", "10.0.0.1:29400", "--nnodes", "2", "--node-rank", "1")
    command = torchrun_command(args)
    joined = " ".join(command)
    assert "-m torch.distributed.run" in joined
    assert "--nproc-per-node 8 --nnodes 2 --node-rank 1" in joined
    assert "--rdzv-endpoint 10.0.0.1:29400" in joined
    assert "--max-restarts 3" in joined
    worker = command[command.index("densa.train.parallel.worker") + 1 :]
    # 2 machines x 8 processes / (tp 2 x pp 2) = dp 4; 64 sequences = 4 replicas x 8 micro-batches x 2.
    assert worker[worker.index("--dp") + 1] == "4"
    assert worker[worker.index("--microbatch-size") + 1] == "2"
    assert worker[worker.index("--out") + 1] == str(tmp_path)


def test_command_splits_batch_into_microbatches(tmp_path):
    args = parse("--nproc", "4", "--dp", "2", "--pp", "2", "--batch-size", "32", "--out", str(tmp_path))
    worker = torchrun_command(args)
    assert worker[worker.index("--microbatches") + 1] == "8"
    assert worker[worker.index("--microbatch-size") + 1] == "2"


@pytest.mark.parametrize("flags, message", [
    (("--nproc", "4", "--dp", "3"), "does not match 4 processes"),
    (("--nproc", "6", "--tp", "4"), "cannot hold tp x pp = 4"),
    (("--nproc", "2", "--pp", "2", "--batch-size", "6"), "does not split"),
])
def test_command_rejects_bad_layouts(flags, message):
    with pytest.raises(InputError, match=message):
        torchrun_command(parse(*flags))


def test_command_rejects_density_attention():
    args = build_parser().parse_args(["train", "--nproc", "2", "--attention", "density"])
    with pytest.raises(InputError, match="density"):
        torchrun_command(args)


def run_job(out, *extra: str) -> dict:
    """Train 6 steps as dp2 with synthetic data through torchrun; return the summary and the losses per step."""
    args = parse("--nproc", "2", "--dp", "2", "--batch-size", "4", "--steps", "6", "--seq-len", "16",
                 "--ckpt-every", "2", "--out", str(out), "--max-restarts", "1", "--vocab-size", "96",
                 "--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    command = torchrun_command(args) + ["--synthetic", "32", "--dim", "64", "--n-layers", "2", "--n-heads", "8",
                                        "--n-kv-heads", "4", "--ffn-dim", "128", *extra]
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # After a restart the resumed steps overwrite the losses of the failed attempt.
    summary["losses"] = {r["step"]: r["loss"] for r in records}
    summary["records"] = records
    return summary


@pytest.mark.slow
def test_killed_worker_resumes_bit_identical(tmp_path):
    clean = run_job(tmp_path / "clean")
    killed = run_job(tmp_path / "killed", "--fail-at-step", "3", "--fail-rank", "1")
    assert clean["restarts"] == 0
    assert killed["restarts"] == 1
    assert json.loads((tmp_path / "killed" / "fault.json").read_text())["step"] == 3
    # Steps 3 and 4 ran twice in the killed job: before the fault (step 3) and after resuming at step 2.
    assert [r["step"] for r in killed["records"]].count(3) == 2
    assert killed["losses"] == clean["losses"]
    assert killed["parameter_sha256"] == clean["parameter_sha256"]
