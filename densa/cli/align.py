"""`densa align`: train, evaluate and search a shared text-image encoder.

    densa align train --data emoji --out runs/align
    densa align train --nproc 2 --batch-size 64     # data parallel on this machine (torchrun)
    densa align eval --checkpoint runs/align
    densa align search --checkpoint runs/align "red heart"
    densa align search --checkpoint runs/align --image photo.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError

from densa.cli import HelpFormatter
from densa.cli.common import positive_float, positive_int, unit_float
from densa.data.tokenizer import DensaTokenizer
from densa.io import InputError, atomic_write_text
from densa.multimodal.data import (
    LANGS,
    CaptionTokens,
    PairDataset,
    square_image,
    load_pairs,
    split_items,
    to_pixels,
    tokenize_text,
)
from densa.multimodal.encoder import PRESETS
from densa.multimodal.heads import AlignModel
from densa.multimodal.index import RetrievalIndex
from densa.multimodal.moco import METHODS, ContrastConfig, rank_and_world_size
from densa.multimodal.train import (
    TrainConfig,
    embed_captions,
    embed_images,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    train_align,
)
from densa.train.parallel.launch import init_worker_process_group, run_torchrun, torchrun_prefix

logger = logging.getLogger(__name__)

METRIC_COLUMNS = ("r1_t2i", "r5_t2i", "r10_t2i", "r1_i2t", "r5_i2t", "r10_i2t", "match_acc")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "align", help="cross-modal contrastive alignment (text and images)", description=__doc__,
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="align_command", metavar="ACTION", required=True)
    _register_train(commands)
    _register_eval(commands)
    _register_search(commands)


def _add_data_args(parser: argparse.ArgumentParser, default: str | None) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=default,
                       help="'emoji' (built-in emoji with English and Chinese names) or a folder with "
                            "captions.jsonl (file_name, captions) and its images"
                            + ("" if default else "; unset means the checkpoint's training data"))
    group.add_argument("--cache-dir", default=None,
                       help="folder for the rendered emoji cache; unset means $DENSA_CACHE or ~/.cache/densa")
    group.add_argument("--emoji-font", default=None,
                       help="path of NotoColorEmoji.ttf; unset means the fonts-noto-color-emoji install path")


def _register_train(commands) -> None:
    parser = commands.add_parser(
        "train", help="train the shared encoder and save a checkpoint", formatter_class=HelpFormatter,
        description="Train one transformer on image-caption pairs with momentum contrast (or in-batch "
                    "negatives), evaluate it on held-out images, and save a checkpoint folder.",
    )
    _add_data_args(parser, "emoji")
    parser.add_argument("--out", default="runs/align", help="checkpoint folder to write")
    parser.add_argument("--eval-fraction", type=unit_float, default=0.2,
                        help="fraction of images held out for evaluation (split by image)")
    parser.add_argument("--langs", default="en,zh", help="caption languages to train on, comma-separated")

    model = parser.add_argument_group("model")
    model.add_argument("--config", default="tiny", choices=sorted(PRESETS), help="encoder preset")
    model.add_argument("--vocab-size", type=positive_int, default=2048,
                       help="maximum tokenizer vocabulary, trained on the training captions")
    model.add_argument("--image-size", type=positive_int, default=32, help="image side in pixels")
    model.add_argument("--patch-size", type=positive_int, default=None, help="patch side in pixels")
    model.add_argument("--embed-dim", type=positive_int, default=None, help="size of the common embedding space")
    model.add_argument("--text-head-dim", type=positive_int, default=None, help="hidden width of the text head")
    model.add_argument("--image-head-dim", type=positive_int, default=None, help="hidden width of the image head")

    objective = parser.add_argument_group("objective")
    objective.add_argument("--method", default="moco_queue", choices=METHODS,
                           help="momentum encoder with a queue of negatives, or in-batch negatives only")
    objective.add_argument("--queue-size", type=positive_int, default=4096,
                           help="negatives queued per modality (sized for the emoji set; large data sets use 16K-64K)")
    objective.add_argument("--momentum", type=float, default=0.995,
                           help="EMA decay of the key encoder, in [0, 1)")
    objective.add_argument("--weights", default="ema", choices=("ema", "online"),
                           help="weights to evaluate and save: an EMA of the trained weights with decay "
                                "--momentum (for moco_queue, its key encoder), or the last weights (online)")
    objective.add_argument("--temperature", type=unit_float, default=0.1, help="softmax temperature")
    objective.add_argument("--learn-temperature", action="store_true", help="learn the temperature")

    schedule = parser.add_argument_group("schedule")
    schedule.add_argument("--steps", type=positive_int, default=1000, help="optimizer steps")
    schedule.add_argument("--batch-size", type=positive_int, default=64,
                          help="image-caption pairs per step, summed over all --nproc processes")
    schedule.add_argument("--lr", type=positive_float, default=1e-4, help="peak learning rate")
    schedule.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps")
    schedule.add_argument("--decay-every", type=positive_int, default=100_000,
                          help="multiply the learning rate by --decay-factor every this many steps")
    schedule.add_argument("--decay-factor", type=unit_float, default=0.1, help="step decay factor")
    schedule.add_argument("--seed", type=int, default=0, help="seed for the split, initialisation and batches")

    parallel = parser.add_argument_group("data parallel (torchrun)")
    parallel.add_argument("--nproc", type=positive_int, default=1,
                          help="processes on this machine; more than 1 reruns this command under torchrun, each "
                               "process training on --batch-size / N pairs of every batch")
    parser.set_defaults(func=run_train)


def _register_eval(commands) -> None:
    parser = commands.add_parser(
        "eval", help="evaluate a checkpoint on held-out pairs", formatter_class=HelpFormatter,
        description="Report Recall@1/5/10 both ways and matching accuracy per caption language. Without "
                    "--data, evaluates the images held out when the checkpoint was trained; with --data, "
                    "evaluates every pair of that data.",
    )
    parser.add_argument("--checkpoint", required=True, help="folder written by `densa align train`")
    _add_data_args(parser, None)
    parser.add_argument("--n-candidates", type=positive_int, default=10,
                        help="captions per image in the matching-accuracy test (chance is 1/N)")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    parser.set_defaults(func=run_eval)


def _register_search(commands) -> None:
    parser = commands.add_parser(
        "search", help="search images by text, or captions by image", formatter_class=HelpFormatter,
        description="Embed the query and return the nearest items of an index. A text query searches "
                    "images and an --image query searches captions. The index is built from the data on "
                    "first use and saved next to the checkpoint.",
    )
    parser.add_argument("text", nargs="?", default=None, help="text query (English or Chinese)")
    parser.add_argument("--image", default=None, help="image file to use as the query")
    parser.add_argument("--checkpoint", required=True, help="folder written by `densa align train`")
    _add_data_args(parser, None)
    parser.add_argument("--index", default=None,
                        help="index file; unset means index-images.safetensors or index-captions.safetensors "
                             "in the checkpoint folder")
    parser.add_argument("--rebuild-index", action="store_true", help="rebuild the index even if it exists")
    parser.add_argument("-k", "--top-k", type=positive_int, default=5, help="results to show")
    parser.set_defaults(func=run_search)


# -- train -------------------------------------------------------------------------------------------------------


def _parse_langs(text: str) -> tuple[str, ...]:
    langs = tuple(lang.strip() for lang in text.split(",") if lang.strip())
    unknown = [lang for lang in langs if lang not in LANGS]
    if not langs or unknown:
        raise InputError(f"--langs {text!r} is invalid; use a comma-separated subset of {','.join(LANGS)}")
    return langs


def _data_source(data: str) -> str:
    # A folder is recorded as an absolute path so eval and search find it from anywhere.
    return data if data == "emoji" else str(Path(data).resolve())


def run_train(args: argparse.Namespace) -> int:
    langs = _parse_langs(args.langs)
    if not 0.0 <= args.momentum < 1.0:
        raise InputError(f"--momentum {args.momentum} is invalid; use a value in [0, 1), such as 0.99")
    if args.warmup_steps < 0:
        raise InputError(f"--warmup-steps {args.warmup_steps} is invalid; use an integer >= 0")
    if args.eval_fraction >= 1.0:
        raise InputError(f"--eval-fraction {args.eval_fraction} is invalid; use a value in (0, 1)")
    out = Path(args.out)
    if out.exists() and not (out / "config.json").is_file():
        raise InputError(f"--out {out} exists and is not a densa align checkpoint; choose another folder")
    if args.nproc > 1:
        return launch_torchrun(args)

    distributed = _init_process_group()
    try:
        _train_and_save(args, langs, out)
    except BaseException:
        # No barrier here: peers may wait in a collective that this rank will never join.
        if distributed:
            dist.destroy_process_group()
        raise
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _train_and_save(args: argparse.Namespace, langs: tuple[str, ...], out: Path) -> None:
    rank, world_size = rank_and_world_size()
    pairs = load_pairs(args.data, args.image_size, args.cache_dir, args.emoji_font)
    train_items, eval_items = split_items(len(pairs), args.eval_fraction, args.seed)
    train_set, eval_set = pairs.subset(train_items), pairs.subset(eval_items)
    logger.info("data %s: %d training images (%d captions), %d held-out images (%d captions)", args.data,
                len(train_set), len(train_set.captions), len(eval_set), len(eval_set.captions))

    try:
        train_config = TrainConfig(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
            decay_every=args.decay_every, decay_factor=args.decay_factor, seed=args.seed,
            log_every=max(args.steps // 20, 1), langs=langs,
        )
        contrast = ContrastConfig(method=args.method, queue_size=args.queue_size, momentum=args.momentum,
                                  temperature=args.temperature, learn_temperature=args.learn_temperature)
        # Every rank trains the same tokenizer on the same captions; DDP checks that the models match.
        tokenizer = DensaTokenizer.train(train_set.captions, args.vocab_size)
        overrides = {name: getattr(args, name) for name in
                     ("patch_size", "embed_dim", "text_head_dim", "image_head_dim") if getattr(args, name)}
        model_config = PRESETS[args.config](vocab_size=tokenizer.vocab_size, image_size=args.image_size,
                                            **overrides)
    except ValueError as err:
        raise InputError(str(err)) from None

    torch.manual_seed(args.seed)
    model = AlignModel(model_config)
    logger.info("model: %.2fM parameters, %s, %d process(es)", model.num_params() / 1e6, args.method, world_size)
    if world_size > 1 and torch.cuda.is_available():
        # NOTE: the CUDA path (NCCL) is written but has only run on CPU with gloo.
        model.to(torch.device("cuda", torch.cuda.current_device()))
    train_tokens = CaptionTokens(train_set.captions, tokenizer, model_config.max_text_len)
    result = train_align(model, contrast, train_config, train_set, train_tokens)
    # The weight average retrieves better on held-out emoji than the last weights, for both methods
    # (see docs/benchmarks.md).
    model = (result.average_model if args.weights == "ema" else model).cpu()
    if rank != 0:
        return

    eval_tokens = CaptionTokens(eval_set.captions, tokenizer, model_config.max_text_len)
    metrics = evaluate(model, eval_set, eval_tokens)
    extra = {
        "data": {"source": _data_source(args.data), "image_size": args.image_size,
                 "eval_fraction": args.eval_fraction, "seed": args.seed},
        "contrast": dataclasses.asdict(contrast),
        "train": dataclasses.asdict(train_config),
        "world_size": world_size,
        "weights": args.weights,
        "images_per_s": result.images_per_s,
        "eval": metrics,
    }
    save_checkpoint(out, model, tokenizer, extra)
    _print_metrics(metrics)
    print(f"checkpoint: {out}")


# -- data parallel ------------------------------------------------------------------------------------------------

# Namespace entries that are not `densa align train` flags, or that the workers must not get.
_NOT_FORWARDED = {"command", "align_command", "func", "verbose", "nproc"}


def _in_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _init_process_group() -> bool:
    """Join the process group that torchrun describes in the environment; return whether one was joined."""
    if not _in_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return False
    init_worker_process_group(timedelta(minutes=10))
    if dist.get_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    return True


def torchrun_command(args: argparse.Namespace) -> list[str]:
    """Build the torchrun command that reruns this `densa align train` on --nproc local processes.

    Every train flag is forwarded as --flag VALUE (a set switch as --flag),
    except --nproc, so each worker gets the command it would run alone.
    """
    if _in_torchrun():
        raise InputError("--nproc is set inside a process that torchrun already started; drop --nproc")
    if args.batch_size % args.nproc:
        raise InputError(
            f"--batch-size {args.batch_size} does not split over --nproc {args.nproc} processes; use a multiple of "
            f"{args.nproc}, because every process trains on the same number of pairs"
        )
    worker = ["-v"] if args.verbose else []
    worker += ["align", "train"]
    for name, value in vars(args).items():
        if name in _NOT_FORWARDED or value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        worker += [flag] if value is True else [flag, str(value)]
    return [*torchrun_prefix(args.nproc), "-m", "densa", *worker]


def launch_torchrun(args: argparse.Namespace) -> int:
    """Run `densa align train` data-parallel on --nproc processes of this machine; return torchrun's exit code."""
    return run_torchrun(torchrun_command(args))


# -- eval --------------------------------------------------------------------------------------------------------


def _checkpoint_data(args: argparse.Namespace, config: dict) -> tuple[PairDataset, bool]:
    """Return the pairs to use and whether they are the checkpoint's own held-out split."""
    data = config.get("data", {})
    image_size = config["model"]["image_size"]
    if args.data is not None:
        return load_pairs(args.data, image_size, args.cache_dir, args.emoji_font), False
    if "source" not in data:
        raise InputError("the checkpoint does not record its training data; pass --data")
    pairs = load_pairs(data["source"], image_size, args.cache_dir, args.emoji_font)
    return pairs, True


def run_eval(args: argparse.Namespace) -> int:
    model, tokenizer, config = load_checkpoint(args.checkpoint)
    pairs, own_data = _checkpoint_data(args, config)
    if own_data:
        data = config["data"]
        _, eval_items = split_items(len(pairs), data["eval_fraction"], data["seed"])
        pairs = pairs.subset(eval_items)
    tokens = CaptionTokens(pairs.captions, tokenizer, model.config.max_text_len)
    metrics = evaluate(model, pairs, tokens, n_candidates=args.n_candidates)
    _print_metrics(metrics)
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics, indent=2) + "\n")
    return 0


def _print_metrics(metrics: dict[str, dict]) -> None:
    header = ["lang", "images"] + list(METRIC_COLUMNS)
    print(" ".join(f"{name:>9}" for name in header))
    for lang, values in metrics.items():
        row = [lang, str(values["n_images"])] + [f"{100 * values[name]:.1f}" for name in METRIC_COLUMNS]
        print(" ".join(f"{cell:>9}" for cell in row))
        row = ["chance", ""] + [f"{100 * values['chance'][name]:.1f}" for name in METRIC_COLUMNS]
        print(" ".join(f"{cell:>9}" for cell in row))
        print(f"(percent; match_acc picks the right caption for each image among {values['n_candidates']})")


# -- search ------------------------------------------------------------------------------------------------------


def _read_query_image(path: str, image_size: int) -> torch.Tensor:
    file = Path(path)
    if not file.is_file():
        raise InputError(f"image not found: {file}; check the --image path")
    try:
        with Image.open(file) as image:
            pixels = square_image(image, image_size)
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"cannot read image {file}: {err}; pass a PNG or JPEG file") from None
    return to_pixels(pixels[None])  # [1, 3, S, S]


def _load_or_build_index(args, model: AlignModel, tokenizer, config: dict, kind: str) -> RetrievalIndex:
    source = _data_source(args.data) if args.data else config.get("data", {}).get("source")
    if source is None:
        raise InputError("the checkpoint does not record its training data; pass --data")
    path = Path(args.index) if args.index else Path(args.checkpoint) / f"index-{kind}.safetensors"
    expected_kind = f"{kind}|{source}"
    if path.is_file() and not args.rebuild_index:
        index = RetrievalIndex.load(path)
        if index.kind == expected_kind:
            return index
        logger.info("index %s was built for %r; rebuilding it for %r", path, index.kind, expected_kind)

    pairs = load_pairs(source, model.config.image_size, args.cache_dir, args.emoji_font)
    if kind == "images":
        index = RetrievalIndex(embed_images(model, pairs.images), pairs.names, expected_kind)
    else:
        tokens = CaptionTokens(pairs.captions, tokenizer, model.config.max_text_len)
        labels = [f"{caption}  [{pairs.names[image]}]"
                  for caption, image in zip(pairs.captions, pairs.caption_image.tolist())]
        index = RetrievalIndex(embed_captions(model, tokens), labels, expected_kind)
    index.save(path)
    logger.info("built an index of %d %s at %s", len(index), kind, path)
    return index


def run_search(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.image is None):
        raise InputError("pass either a text query or --image FILE, not both and not neither")
    if args.text is not None and not args.text.strip():
        raise InputError("the text query is empty; pass some words, for example \"red heart\"")
    model, tokenizer, config = load_checkpoint(args.checkpoint)

    with torch.no_grad():
        if args.image is not None:
            query = model.embed_image(_read_query_image(args.image, model.config.image_size))
            kind = "captions"
        else:
            ids, mask = tokenize_text(args.text, tokenizer, model.config.max_text_len)
            query = model.embed_text(ids, mask)
            kind = "images"
    index = _load_or_build_index(args, model, tokenizer, config, kind)
    scores, rows = index.search(query, args.top_k)
    for rank, (score, row) in enumerate(zip(scores[0].tolist(), rows[0].tolist()), start=1):
        print(f"{rank:>3}  {score:6.3f}  {index.labels[row]}")
    return 0
