"""`densa train --nproc`: the torchrun command, and a killed worker resuming bit-identically (real torchrun)."""

import json
import os
import subprocess

import pytest
import torch

from densa.cli import build_parser
from densa.io import InputError
from densa.model.llama import Transformer
from densa.train.parallel import worker
from densa.train.parallel.engine import EngineConfig, lr_lambda, reference_loss
from densa.train.parallel.launch import torchrun_command
from densa.train.checkpoint import load_model
from densa.train.trainer import batch_indices

from test_parallel_engine import free_port


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


def test_command_forwards_density_plan_clip_and_dtype():
    args = build_parser().parse_args(["train", "--nproc", "2", "--attention", "density", "--threshold", "0.6",
                                      "--block-size", "64", "--grad-clip", "0.5", "--dtype", "bf16"])
    command = torchrun_command(args)
    worker_flags = command[command.index("densa.train.parallel.worker") + 1 :]
    assert worker_flags[worker_flags.index("--attention") + 1] == "density"
    assert worker_flags[worker_flags.index("--threshold") + 1] == "0.6"
    assert worker_flags[worker_flags.index("--block-size") + 1] == "64"
    assert worker_flags[worker_flags.index("--grad-clip") + 1] == "0.5"
    assert worker.build_parser().parse_args(worker_flags).dtype == "bf16"


def test_command_forwards_each_domain_dict(tmp_path):
    terms = [tmp_path / "finance.txt", tmp_path / "medicine.txt"]
    terms[0].write_text("不良贷款率\n", encoding="utf-8")
    terms[1].write_text("血红蛋白\n", encoding="utf-8")
    args = build_parser().parse_args(["train", "--nproc", "2", "--domain-dict", str(terms[0]),
                                      "--domain-dict", str(terms[1])])
    command = torchrun_command(args)
    worker_flags = command[command.index("densa.train.parallel.worker") + 1 :]
    forwarded = [worker_flags[i + 1] for i, flag in enumerate(worker_flags) if flag == "--domain-dict"]
    assert forwarded == [str(path) for path in terms]
    worker_args = worker.build_parser().parse_args(worker_flags)
    assert worker_args.domain_dict == terms


def test_command_warns_that_eval_every_is_single_process(caplog):
    args = build_parser().parse_args(["train", "--nproc", "2", "--eval-every", "10"])
    torchrun_command(args)
    assert "--eval-every is ignored with several processes" in caplog.text
    caplog.clear()
    torchrun_command(build_parser().parse_args(["train", "--nproc", "2"]))
    assert "--eval-every" not in caplog.text


def test_command_rejects_missing_domain_dict(tmp_path):
    missing = tmp_path / "missing.txt"
    args = build_parser().parse_args(["train", "--nproc", "2", "--domain-dict", str(missing)])
    with pytest.raises(InputError, match="domain dictionary not found"):
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
    summary["stderr"] = result.stderr
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

    # Rerun into the same folder: the snapshot already reaches --steps, so nothing changes and a warning explains it.
    again = run_job(tmp_path / "clean")
    assert again["parameter_sha256"] == clean["parameter_sha256"]
    assert "already reaches --steps 6" in again["stderr"]


def test_worker_trains_density_attention_on_pipeline(tmp_path):
    """pp2 with density attention through torchrun: losses and grad norms equal one process's, clipping included."""
    args = parse("--nproc", "2", "--pp", "2", "--microbatches", "2", "--batch-size", "4", "--steps", "2",
                 "--seq-len", "32", "--out", str(tmp_path), "--vocab-size", "96", "--attention", "density",
                 "--block-size", "16", "--grad-clip", "0.5", "--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    command = torchrun_command(args) + ["--synthetic", "16", "--dim", "64", "--n-layers", "2", "--n-heads", "8",
                                        "--n-kv-heads", "4", "--ffn-dim", "128"]
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]

    worker_args = worker.build_parser().parse_args(command[command.index("densa.train.parallel.worker") + 1 :])
    model_config = worker.model_config_from(worker_args)
    assert model_config.attention == "density"
    tokens, density = worker.load_tokens(worker_args, rank=0)
    engine_config = EngineConfig(lr=worker_args.lr, warmup_steps=worker_args.warmup_steps,
                                 max_steps=worker_args.steps)
    torch.manual_seed(worker_args.seed)
    model = Transformer(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=engine_config.lr, betas=(0.9, 0.95),
                                  weight_decay=engine_config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(engine_config))
    for step, record in enumerate(records):
        rows = batch_indices(step, len(tokens), 4, worker_args.seed)
        loss = reference_loss(model, tokens[rows], density[rows])
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5).item()
        assert record["loss"] == pytest.approx(loss.item(), rel=1e-5), f"step {record['step']} loss"
        assert record["grad_norm"] == pytest.approx(norm, rel=1e-5), f"step {record['step']} grad norm"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    assert records[0]["grad_norm"] > 0.5, "the first step's gradients should be clipped"

    # The exported checkpoint has both stages' weights, equal to the single-process model's after 2 steps.
    exported = load_model(tmp_path / "checkpoint")
    assert exported.config == model_config
    reference = dict(model.named_parameters())
    for name, value in exported.named_parameters():
        torch.testing.assert_close(value, reference[name].detach(), atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"exported {name}: {m}")
    assert not (tmp_path / "checkpoint" / "tokenizer.json").exists(), "synthetic data has no tokenizer"
