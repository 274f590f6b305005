"""The `densa` command as a user runs it: real processes, real files, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_parallel_engine import free_port

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GOVREPORT = DATA / "longdoc" / "govreport" / "gov_report_summ.jsonl"
ANNUAL_REPORT = DATA / "longdoc" / "annual_reports" / "601658_2019_annual_report.jsonl"


def densa(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "densa", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.fixture
def bad_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10)
    return {"missing": tmp_path / "missing.txt", "empty": empty, "binary": binary}


def assert_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_commands_and_defaults():
    result = densa("--help")
    assert result.returncode == 0
    for command in ("demo", "train", "generate", "analyze"):
        assert command in result.stdout
    train_help = densa("train", "--help").stdout
    assert "(default: 200)" in train_help
    assert "tokens per sequence" in train_help


@pytest.mark.parametrize("kind, fragment", [("missing", "not found"), ("empty", "empty"), ("binary", "binary")])
def test_analyze_bad_file_exits_2(bad_files, tmp_path, kind, fragment):
    out = tmp_path / "analysis.json"
    result = densa("analyze", str(bad_files[kind]), "--json", str(out))
    assert_usage_error(result, fragment, str(bad_files[kind]))
    assert not out.exists()


@pytest.mark.parametrize("nproc", ["1", "2"])
@pytest.mark.parametrize("kind, fragment", [("missing", "not found"), ("empty", "empty"), ("binary", "binary")])
def test_train_bad_data_exits_2(bad_files, tmp_path, kind, fragment, nproc):
    out = tmp_path / "run"
    result = densa("train", "--data", str(bad_files[kind]), "--out", str(out), "--steps", "1", "--nproc", nproc)
    assert_usage_error(result, fragment)
    assert not (out / "checkpoint").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train", "--threshold", "1.5"], "1.5 is invalid"),
        (["train", "--steps", "0"], "0 is invalid"),
        (["train", "--block-size", "48", "--steps", "1"], "block_size=48 is invalid"),
        (["train", "--seq-len", "4096", "--steps", "1"], "exceeds the tiny preset's max_seq_len"),
        (["train", "--attention", "linear"], "invalid choice"),
        (["demo", "--seq-len", "16"], "seq_len=16 is too short"),
        (["analyze"], "the following arguments are required"),
        (["generate", "--checkpoint", "nowhere", "--prompt", "hi"], "no checkpoint at nowhere"),
        (["train", "--domain-dict", "no-such-dict.txt", "--steps", "1"], "domain dictionary not found"),
        (["train", "--resume", "nowhere", "--steps", "1"], "--resume nowhere: path not found"),
        (["train", "--nproc", "2", "--resume", "nowhere"], "no snapshot in --resume nowhere"),
        (["train", "--nproc", "0"], "0 is invalid; use a positive integer"),
        (["train", "--nproc", "2", "--node-rank", "2"], "--node-rank 2 is outside 0 to 0"),
        (["train", "--nproc", "2", "--rdzv-endpoint", "127.0.0.1"], "use HOST:PORT"),
    ],
)
def test_invalid_values_exit_2(tmp_path, args, fragment):
    result = densa(*args, cwd=tmp_path)
    assert_usage_error(result, fragment)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("model.safetensors"))


def test_resume_rejects_the_other_format(tmp_path):
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    (snapshots / "latest").write_text("step_00000002\n")
    assert_usage_error(densa("train", "--resume", str(snapshots), "--steps", "1"), "contains multi-process snapshots")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    assert_usage_error(densa("train", "--resume", str(checkpoint), "--steps", "1"), "has no trainer state")
    assert_usage_error(densa("train", "--nproc", "2", "--resume", str(checkpoint)), "no snapshot in --resume")


def test_analyze_real_chinese_report(tmp_path):
    text = "\n".join(json.loads(line).get("inside", "") for line in ANNUAL_REPORT.read_text().splitlines()[:400])
    report = tmp_path / "report.txt"
    report.write_text(text, encoding="utf-8")
    result = densa("analyze", str(report), "--json", str(tmp_path / "a.json"), "--png", str(tmp_path / "a.png"))
    assert result.returncode == 0, result.stderr
    assert "block plan" in result.stdout
    assert "GFLOP" in result.stdout
    record = json.loads((tmp_path / "a.json").read_text())
    assert len(record["density"]) == record["tokens"]
    assert 0.0 < record["block_sparsity"] < 1.0
    assert record["plan_gflops"] < record["dense_causal_gflops"]
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_train_then_generate(tmp_path):
    out = tmp_path / "run"
    result = densa("train", "--data", str(GOVREPORT), "--out", str(out), "--steps", "4", "--seq-len", "256",
                   "--batch-size", "2", "--vocab-size", "1024", "--eval-every", "2", "--block-size", "32")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == 4
    assert summary["val_ppl"] > 1
    assert "step 4 | loss" in result.stderr  # one log line per step

    result = densa("generate", "--checkpoint", str(out / "checkpoint"), "--prompt", "The agency",
                   "--max-new-tokens", "8", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The agency")


@pytest.mark.slow
def test_parallel_train_then_generate(tmp_path):
    out = tmp_path / "run"
    result = densa("train", "--nproc", "2", "--pp", "2", "--microbatches", "2", "--data", str(GOVREPORT),
                   "--out", str(out), "--steps", "2", "--seq-len", "64", "--batch-size", "2",
                   "--vocab-size", "512", "--block-size", "32", "--dtype", "bf16",
                   "--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    assert result.returncode == 0, result.stderr
    assert (out / "checkpoint" / "tokenizer.json").exists()

    result = densa("generate", "--checkpoint", str(out / "checkpoint"), "--prompt", "The agency",
                   "--max-new-tokens", "8", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The agency")


@pytest.mark.slow
def test_demo_writes_results(tmp_path):
    out = tmp_path / "demo"
    result = densa("demo", "--steps", "2", "--batch-size", "2", "--seq-len", "256", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads((out / "demo_results.json").read_text())
    assert [row["attention"] for row in rows] == ["dense", "sliding", "density"]
    for row in rows:
        assert set(row) == {"attention", "val_ppl", "tokens_per_s", "block_sparsity", "peak_mem_mb"}
        assert row["val_ppl"] > 1
        assert row["tokens_per_s"] > 0
        assert row["peak_mem_mb"] > 0
    assert rows[0]["block_sparsity"] == 0.0
    assert rows[1]["block_sparsity"] > 0
    assert rows[2]["block_sparsity"] > 0
    assert (out / "density_heatmap.png").exists()
    for variant in ("dense", "sliding", "density"):
        assert (out / variant / "checkpoint" / "model.safetensors").exists()
    assert "sample from the density model" in result.stdout
