"""Image-caption pairs: a folder with captions in JSON lines, or emoji drawn from a colour font.

A PairDataset stores every image as uint8 pixels [N, 3, S, S] and a flat list
of captions, each pointing at its image and tagged with a language ("en" or
"zh"). Splits are made by image, so held-out images and their captions are
never seen in training.

The built-in emoji set needs no download: Debian's fonts-noto-color-emoji
draws each emoji and the `emoji` package names it in English and Chinese.
Rendered images are cached as a safetensors file, so later runs skip drawing.

Legend: N images, Nc captions, S image side in pixels, B batch, T tokens.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from densa.data.tokenizer import DensaTokenizer
from densa.io import InputError, atomic_path

logger = logging.getLogger(__name__)

LANGS = ("en", "zh")
EMOJI_FONT_NAME = "NotoColorEmoji.ttf"
EMOJI_FONT_DIRS = ("/usr/share/fonts/truetype/noto", "/usr/share/fonts/noto", "/usr/local/share/fonts")
# NotoColorEmoji is a CBDT bitmap font with one strike: FreeType loads it only at this size.
EMOJI_FONT_SIZE = 109
_SKIN_TONES = frozenset(chr(code) for code in range(0x1F3FB, 0x1F400))
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


@dataclass
class PairDataset:
    """Images [N, 3, S, S] uint8, and captions with their image index [Nc] and language."""

    images: torch.Tensor
    names: list[str]
    captions: list[str]
    caption_image: torch.Tensor
    caption_lang: list[str]

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.shape[0] != len(self.names):
            raise ValueError(f"images have shape {tuple(self.images.shape)} for {len(self.names)} names")
        if len(self.captions) != len(self.caption_image) or len(self.captions) != len(self.caption_lang):
            raise ValueError("captions, caption_image and caption_lang must have one entry per caption")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def subset(self, items: torch.Tensor) -> "PairDataset":
        """Return the images `items` [n] with all their captions, images renumbered 0..n-1."""
        new_index = torch.full((len(self),), -1, dtype=torch.long)
        new_index[items] = torch.arange(len(items))
        keep = (new_index[self.caption_image] >= 0).nonzero().flatten().tolist()
        return PairDataset(
            images=self.images[items],
            names=[self.names[i] for i in items.tolist()],
            captions=[self.captions[c] for c in keep],
            caption_image=new_index[self.caption_image[keep]],
            caption_lang=[self.caption_lang[c] for c in keep],
        )

    def languages(self) -> list[str]:
        return [lang for lang in LANGS if lang in self.caption_lang]

    def view(self, lang: str) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """Return (image indices [n], captions, caption_image [Nc] into those n) for one language."""
        keep = [c for c, caption_lang in enumerate(self.caption_lang) if caption_lang == lang]
        if not keep:
            raise InputError(f"no {lang!r} captions in this data set; choose one of {self.languages()}")
        images = self.caption_image[keep].unique()  # sorted
        new_index = torch.full((len(self),), -1, dtype=torch.long)
        new_index[images] = torch.arange(len(images))
        return images, [self.captions[c] for c in keep], new_index[self.caption_image[keep]]


def split_items(n_items: int, eval_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split image indices into (train, eval) with a seeded permutation; eval gets round(n * fraction)."""
    if not 0.0 < eval_fraction < 1.0:
        raise InputError(f"eval fraction {eval_fraction} is invalid; use a value in (0, 1), such as 0.2")
    n_eval = round(n_items * eval_fraction)
    if n_eval < 1 or n_eval >= n_items:
        raise InputError(
            f"an eval fraction of {eval_fraction} leaves {n_eval} of {n_items} images for evaluation; "
            "use more images or another fraction"
        )
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed))
    return order[n_eval:].sort().values, order[:n_eval].sort().values


def caption_language(text: str) -> str:
    return "zh" if _CJK.search(text) else "en"


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 images [B, 3, S, S] to float in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def square_image(image: Image.Image, size: int) -> torch.Tensor:
    """Composite on white, pad to a square, resize to size x size; return uint8 [3, size, size]."""
    image = image.convert("RGBA")
    side = max(image.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(image, ((side - image.width) // 2, (side - image.height) // 2))
    canvas = canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    return torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


# -- a folder of images with captions.jsonl ------------------------------------------------------------------------


def folder_pairs(root: str | os.PathLike, image_size: int) -> PairDataset:
    """Load `root/captions.jsonl` (one object per image: file_name, captions) and the images it names.

    `file_name` is relative to `root`. A caption's language is "zh" if it
    contains CJK characters, else "en".
    """
    root = Path(root)
    index_path = root / "captions.jsonl"
    if not index_path.is_file():
        raise InputError(
            f"captions file not found: {index_path}; pass a folder with captions.jsonl "
            "(one JSON object per line with file_name and captions)"
        )
    images, names, captions, caption_image, caption_lang = [], [], [], [], []
    for line_number, line in enumerate(index_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            file_name, texts = record["file_name"], record["captions"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(
                f"{index_path}:{line_number}: invalid record ({err}); each line needs file_name and captions"
            ) from None
        if isinstance(texts, str):
            texts = [texts]
        texts = [text.strip() for text in texts if isinstance(text, str) and text.strip()]
        if not texts:
            raise InputError(f"{index_path}:{line_number}: no captions for {file_name}; add at least one")
        try:
            with Image.open(root / file_name) as image:
                pixels = square_image(image, image_size)
        except FileNotFoundError:
            raise InputError(f"{index_path}:{line_number}: image not found: {root / file_name}") from None
        except (UnidentifiedImageError, OSError) as err:
            raise InputError(f"{index_path}:{line_number}: cannot read image {root / file_name}: {err}") from None
        for text in texts:
            captions.append(text)
            caption_image.append(len(images))
            caption_lang.append(caption_language(text))
        images.append(pixels)
        names.append(str(file_name))
    if not images:
        raise InputError(f"{index_path} lists no images; add one JSON object per image")
    return PairDataset(torch.stack(images), names, captions, torch.tensor(caption_image), caption_lang)


# -- emoji -------------------------------------------------------------------------------------------------------


def find_emoji_font(font: str | os.PathLike | None = None) -> Path:
    """Return the path of NotoColorEmoji.ttf, or raise an InputError with the command that installs it."""
    if font is not None:
        path = Path(font)
        if not path.is_file():
            raise InputError(f"emoji font not found: {path}; pass the path of {EMOJI_FONT_NAME}")
        return path
    for directory in EMOJI_FONT_DIRS:
        path = Path(directory) / EMOJI_FONT_NAME
        if path.is_file():
            return path
    raise InputError(
        f"emoji font {EMOJI_FONT_NAME} not found in {', '.join(EMOJI_FONT_DIRS)}; install it with "
        "`apt-get install fonts-noto-color-emoji` (Debian, Ubuntu) or pass its path with --emoji-font"
    )


def emoji_names(include_skin_tones: bool = False) -> list[tuple[str, str, str]]:
    """Return (emoji, English name, Chinese name) for every fully-qualified emoji with both names.

    Skin-tone variants are left out by default: they differ from their base
    emoji only in colour and would put near-copies on both sides of a split.
    """
    import emoji

    emoji.config.load_language("zh")
    fully_qualified = emoji.STATUS["fully_qualified"]
    entries = []
    for char, data in emoji.EMOJI_DATA.items():
        if data.get("status") != fully_qualified or "zh" not in data:
            continue
        if not include_skin_tones and _SKIN_TONES.intersection(char):
            continue
        entries.append((char, _readable(data["en"]), _readable(data["zh"])))
    return entries


def _readable(name: str) -> str:
    # The emoji package writes names as ":thumbs_up:".
    return name.strip(":").replace("_", " ").strip()


def _render_emoji(chars: list[str], font_path: Path, image_size: int) -> tuple[torch.Tensor, list[bool]]:
    """Draw each emoji at the font's native size; return uint8 [n, 3, S, S] and which drew any pixel."""
    font = ImageFont.truetype(str(font_path), EMOJI_FONT_SIZE)
    side = 160  # the font's bitmaps are 136 x 128 pixels
    images, drawn = [], []
    for char in chars:
        canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((side // 2, side // 2), char, font=font, embedded_color=True, anchor="mm")
        box = canvas.getbbox()
        # Emoji newer than the font draw nothing and are dropped.
        drawn.append(box is not None)
        images.append(square_image(canvas.crop(box) if box else canvas, image_size))
    return torch.stack(images), drawn


def _emoji_cache_path(cache_dir: Path, font_path: Path, image_size: int, include_skin_tones: bool) -> Path:
    import emoji

    stat = font_path.stat()
    tones = "-tones" if include_skin_tones else ""
    return cache_dir / f"emoji-{emoji.__version__}-font{stat.st_size}-{image_size}px{tones}.safetensors"


def default_cache_dir() -> Path:
    return Path(os.environ.get("DENSA_CACHE", Path.home() / ".cache" / "densa"))


def emoji_pairs(
    image_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    font: str | os.PathLike | None = None,
    include_skin_tones: bool = False,
) -> PairDataset:
    """Return the emoji data set: one image per emoji with an English and a Chinese caption.

    Images are read from the cache under `cache_dir` (default $DENSA_CACHE or
    ~/.cache/densa) when present, else drawn and cached.
    """
    font_path = find_emoji_font(font)
    entries = emoji_names(include_skin_tones)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_path = _emoji_cache_path(cache_dir, font_path, image_size, include_skin_tones)

    images, chars = _read_emoji_cache(cache_path)
    if images is None:
        all_chars = [char for char, _, _ in entries]
        rendered, drawn = _render_emoji(all_chars, font_path, image_size)
        keep = [i for i, ok in enumerate(drawn) if ok]
        images, chars = rendered[keep].contiguous(), [all_chars[i] for i in keep]
        logger.info("drew %d emoji (%d missing from the font) into %s", len(chars), len(all_chars) - len(chars),
                    cache_path)
        with atomic_path(cache_path) as tmp:
            save_file({"images": images}, str(tmp), metadata={"chars": json.dumps(chars, ensure_ascii=False)})

    names_by_char = {char: (en, zh) for char, en, zh in entries}
    captions, caption_image, caption_lang = [], [], []
    for index, char in enumerate(chars):
        for lang, text in zip(LANGS, names_by_char[char]):
            captions.append(text)
            caption_image.append(index)
            caption_lang.append(lang)
    names = [f"{char} {names_by_char[char][0]}" for char in chars]
    return PairDataset(images, names, captions, torch.tensor(caption_image), caption_lang)


def _read_emoji_cache(path: Path) -> tuple[torch.Tensor | None, list[str]]:
    if not path.is_file():
        return None, []
    try:
        with safe_open(str(path), framework="pt") as handle:
            chars = json.loads((handle.metadata() or {})["chars"])
            images = handle.get_tensor("images")
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as err:
        logger.warning("ignoring unreadable emoji cache %s (%s); drawing again", path, err)
        return None, []
    return images, chars


def load_pairs(source: str, image_size: int, cache_dir: str | os.PathLike | None = None,
               font: str | os.PathLike | None = None) -> PairDataset:
    """Load "emoji" (the built-in set) or a folder holding captions.jsonl."""
    if source == "emoji":
        return emoji_pairs(image_size, cache_dir, font)
    path = Path(source)
    if not path.is_dir():
        raise InputError(f"data {source!r} is neither 'emoji' nor a folder; pass 'emoji' or a folder with "
                         "captions.jsonl and the images it names")
    return folder_pairs(path, image_size)


# -- tokenised batches ---------------------------------------------------------------------------------------------


class CaptionTokens:
    """Token ids [Nc, T] of every caption, padded with the pad id, and their mask [Nc, T], tokenised once."""

    def __init__(self, captions: list[str], tokenizer: DensaTokenizer, max_len: int):
        encoded = tokenizer.encode_batch(captions) if captions else []
        self.ids = torch.full((len(captions), max_len), tokenizer.pad_id, dtype=torch.long)
        self.mask = torch.zeros(len(captions), max_len, dtype=torch.bool)
        for row, (ids, _) in enumerate(encoded):
            ids = ids[:max_len] or [tokenizer.pad_id]  # an empty caption still gets one position
            self.ids[row, : len(ids)] = torch.tensor(ids)
            self.mask[row, : len(ids)] = True

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ids and mask [B, T'] for `rows`, cut to the longest caption among them."""
        mask = self.mask[rows]
        length = max(int(mask.sum(dim=1).max()), 1)
        return self.ids[rows, :length], mask[:, :length]


def tokenize_text(text: str, tokenizer: DensaTokenizer, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ids and mask [1, T] for one query."""
    tokens = CaptionTokens([text], tokenizer, max_len)
    return tokens.batch(torch.tensor([0]))


class PairSampler:
    """Draw training batches of distinct images, each with one random caption in `langs`.

    Images are visited in a fresh random order each epoch. The last partial
    batch of an epoch is dropped, so every batch has exactly `batch_size`
    images, because all_gather under data parallelism needs equal shapes.
    """

    def __init__(self, dataset: PairDataset, tokens: CaptionTokens, batch_size: int, langs: tuple[str, ...],
                 seed: int = 0):
        if batch_size > len(dataset):
            raise InputError(
                f"batch size {batch_size} exceeds the {len(dataset)} training images; lower --batch-size"
            )
        self.dataset, self.tokens, self.batch_size = dataset, tokens, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        # captions_of[i]: rows of image i's captions in the requested languages.
        self.captions_of: list[list[int]] = [[] for _ in range(len(dataset))]
        for row, (image, lang) in enumerate(zip(dataset.caption_image.tolist(), dataset.caption_lang)):
            if lang in langs:
                self.captions_of[image].append(row)
        self.items = torch.tensor([i for i, rows in enumerate(self.captions_of) if rows])
        if len(self.items) < batch_size:
            raise InputError(
                f"only {len(self.items)} training images have {'/'.join(langs)} captions, fewer than "
                f"batch size {batch_size}; lower --batch-size or choose other languages"
            )
        self._order = torch.empty(0, dtype=torch.long)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return tokens [B, T], mask [B, T], pixels [B, 3, S, S] and image ids [B]."""
        if len(self._order) < self.batch_size:
            self._order = self.items[torch.randperm(len(self.items), generator=self.generator)]
        items, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        choices = torch.randint(0, 1 << 30, (len(items),), generator=self.generator).tolist()
        rows = torch.tensor([self.captions_of[i][c % len(self.captions_of[i])]
                             for i, c in zip(items.tolist(), choices)])
        tokens, mask = self.tokens.batch(rows)
        return tokens, mask, to_pixels(self.dataset.images[items]), items
