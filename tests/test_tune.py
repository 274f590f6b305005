"""Window tuning: Pareto front, grid validation, plan evaluation against dense, and `densa tune-windows`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from densa.cli import main
from densa.data.readers import read_govreport
from densa.model.config import ModelConfig
from densa.model.llama import Transformer
from densa.train.recipe import prepare_data
from densa.train.tune import RESULT_KEYS, TuneGrid, evaluate_plan, pareto_front, parse_window

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GOVREPORT = DATA / "longdoc" / "govreport" / "gov_report_summ.jsonl"


def need_govreport() -> None:
    if not GOVREPORT.exists():
        pytest.skip(f"real data not found at {GOVREPORT}")


def test_pareto_front_two_objectives():
    # (perplexity, block sparsity): lower perplexity and higher sparsity win.
    points = [
        (10.0, 0.50),  # front: the lowest perplexity at 50%
        (12.0, 0.70),  # front: the sparsest
        (11.0, 0.50),  # dominated by the first point
        (12.0, 0.60),  # dominated by the second point
        (9.0, 0.20),   # front: the lowest perplexity overall
        (10.0, 0.50),  # duplicate of the first: neither dominates the other
        (13.0, 0.70),  # dominated by the second point (same sparsity, worse perplexity)
    ]
    assert pareto_front(points, maximize=(False, True)) == [True, True, False, False, True, True, False]


def test_pareto_front_three_objectives():
    # (perplexity, sparsity, seconds): the third point loses on perplexity and
    # sparsity but is the fastest, so it stays on the front.
    points = [(10.0, 0.5, 2.0), (10.0, 0.6, 2.0), (11.0, 0.4, 1.0), (11.0, 0.4, 1.5)]
    assert pareto_front(points, maximize=(False, True, False)) == [False, True, True, False]


def test_pareto_front_single_point_and_mismatch():
    assert pareto_front([(5.0, 0.1)], maximize=(False, True)) == [True]
    with pytest.raises(ValueError):
        pareto_front([(5.0, 0.1, 3.0)], maximize=(False, True))


@pytest.mark.parametrize("text, expected", [("128", (64, 128)), ("1", (1, 1)), ("16:48", (16, 48)), ("8:8", (8, 8))])
def test_parse_window_valid(text, expected):
    assert parse_window(text) == expected


@pytest.mark.parametrize("text", ["0", "-4", "64:32", "0:8", "a", "8:16:32", "1.5"])
def test_parse_window_invalid(text):
    with pytest.raises(ValueError, match="window"):
        parse_window(text)


def test_grid_skips_far_wider_than_near():
    grid = TuneGrid(near_windows=((16, 32), (64, 128)), far_windows=((32, 64),), thresholds=(0.5, 0.7),
                    seq_len=256, block_size=16)
    configs = grid.plan_configs()
    assert [(c.near_window, c.threshold) for c in configs] == [((64, 128), 0.5), ((64, 128), 0.7)]
    assert configs[0].near_tokens == 32
    assert configs[0].far_tokens == 128


@pytest.mark.parametrize("changes, message", [
    (dict(near_windows=((32, 512),)), "exceeds seq_len"),
    (dict(thresholds=(0.0,)), "threshold 0.0"),
    (dict(thresholds=(1.2,)), "threshold 1.2"),
    (dict(far_windows=()), "far_windows is empty"),
    (dict(block_size=24), "power of two"),
    (dict(seq_len=16), "too short"),
    (dict(near_windows=((4, 8),), far_windows=((16, 32),)), "wider than every near window"),
])
def test_grid_rejects_bad_values(changes, message):
    values = dict(near_windows=((32, 64),), far_windows=((8, 16),), thresholds=(0.7,), seq_len=256, block_size=16)
    with pytest.raises(ValueError, match=message):
        TuneGrid(**{**values, **changes})


@pytest.fixture(scope="module")
def govreport_val():
    need_govreport()
    data = prepare_data(read_govreport(GOVREPORT), seq_len=256, vocab_size=512, val_fraction=0.2, seed=0)
    return data


def test_full_window_plan_matches_dense(govreport_val):
    # Windows as long as the sequence let every query see every earlier key,
    # so the plan's perplexity must equal dense causal attention's.
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=govreport_val.tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4,
                         n_kv_heads=2, ffn_dim=128, max_seq_len=256)
    model = Transformer(config)
    grid = TuneGrid(near_windows=((256, 256),), far_windows=((256, 256), (8, 16)), thresholds=(0.7,),
                    seq_len=256, block_size=16)
    full, narrow = grid.plan_configs()
    dense = evaluate_plan(model, govreport_val.val, None, batch_size=4, max_sequences=4)
    planned = evaluate_plan(model, govreport_val.val, full, batch_size=4, max_sequences=4)
    sparse = evaluate_plan(model, govreport_val.val, narrow, batch_size=4, max_sequences=4)
    assert planned.val_ppl == pytest.approx(dense.val_ppl, rel=1e-5)
    assert planned.block_sparsity == 0.0
    assert dense.tokens == planned.tokens == 4 * 256
    assert sparse.block_sparsity > 0.5
    assert sparse.val_ppl != pytest.approx(dense.val_ppl, rel=1e-5)


@pytest.mark.slow
def test_tune_windows_cli_on_real_text(tmp_path, capsys):
    need_govreport()
    json_file, png_file = tmp_path / "tune.json", tmp_path / "front.png"
    argv = ["tune-windows", "--data", str(GOVREPORT), "--out", str(tmp_path / "run"), "--json", str(json_file),
            "--png", str(png_file), "--seq-len", "256", "--block-size", "16", "--near-windows", "64", "128",
            "--far-windows", "16", "64", "--thresholds", "0.3", "--max-dense-fraction", "0.1", "--steps", "3",
            "--batch-size", "2", "--vocab-size", "512", "--eval-sequences", "4"]
    assert main(argv) == 0
    assert "dense attention" in capsys.readouterr().out

    results = json.loads(json_file.read_text())
    assert set(results) == {"settings", "dense", "results"}
    assert results["settings"]["seq_len"] == 256
    assert results["settings"]["eval_sequences"] == 4
    assert results["settings"]["trained"]["steps"] == 3
    assert results["dense"]["block_sparsity"] == 0.0
    rows = results["results"]
    assert len(rows) == 4
    for row in rows:
        assert set(row) == set(RESULT_KEYS)
        assert row["val_ppl"] > 1.0
        assert 0.0 < row["block_sparsity"] < 1.0
    assert any(row["pareto"] for row in rows)

    by_windows = {(tuple(r["near_window"]), tuple(r["far_window"])): r["block_sparsity"] for r in rows}
    # Narrower far windows skip more blocks at either near window, and so
    # does the narrower near window at either far window.
    for near in ((32, 64), (64, 128)):
        assert by_windows[(near, (8, 16))] > by_windows[(near, (32, 64))]
    for far in ((8, 16), (32, 64)):
        assert by_windows[((32, 64), far)] > by_windows[((64, 128), far)]

    with Image.open(png_file) as image:
        assert image.format == "PNG"
        assert image.width > 100

    # The saved checkpoint, evaluated again on the same held-out split under
    # one of the grid's plans, must reproduce that row.
    again = tmp_path / "again.json"
    argv = ["tune-windows", "--data", str(GOVREPORT), "--checkpoint", results["settings"]["checkpoint"],
            "--out", str(tmp_path / "again"), "--json", str(again), "--seq-len", "256", "--block-size", "16",
            "--near-windows", "64", "--far-windows", "16", "--thresholds", "0.3", "--max-dense-fraction", "0.1",
            "--eval-sequences", "4"]
    assert main(argv) == 0
    (row,) = json.loads(again.read_text())["results"]
    (expected,) = [r for r in rows if r["near_window"] == [32, 64] and r["far_window"] == [8, 16]]
    assert row["val_ppl"] == pytest.approx(expected["val_ppl"], rel=1e-6)
    assert row["block_sparsity"] == pytest.approx(expected["block_sparsity"], rel=1e-9)


@pytest.mark.parametrize("flags, message", [
    (["--thresholds", "1.5"], "1.5 is invalid"),
    (["--near-windows", "0"], "window '0' is invalid"),
    (["--far-windows", "32:16"], "window '32:16' is invalid"),
    (["--near-windows", "4096"], "exceeds seq_len=256"),
    (["--near-windows", "8", "--far-windows", "64"], "wider than every near window"),
    (["--eval-sequences", "-1"], "--eval-sequences -1 is invalid"),
])
def test_tune_windows_cli_rejects_bad_values(flags, message, tmp_path, capsys):
    argv = ["tune-windows", "--seq-len", "256", "--block-size", "16", "--out", str(tmp_path), *flags]
    with pytest.raises(SystemExit) as exit_info:
        code = main(argv)
        raise SystemExit(code)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
