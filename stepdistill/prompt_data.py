"""Text-to-image data: prompt lists, image-caption folders, and their one-time encoding to cached tensors.

- ``read_prompts``: a ``.txt`` file (one prompt a line), ``.json`` / ``.jsonl`` / ``.csv`` with a
  column, a folder of those, or a ``datasets`` dataset name or folder (``pip install datasets``).
- ``read_image_captions``: an image folder with captions in ``metadata.jsonl`` / ``metadata.csv``
  (diffusers' imagefolder layout: ``file_name`` plus a caption column) or same-name ``.txt`` files.
- ``ConditionDataset.from_prompts`` (data-free objectives) and ``ConditionDataset.from_image_captions``
  (objectives with real data) encode once through a ``TextToImageTeacher`` and cache safetensors shards.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .conditions import flatten_condition, tree_map, unflatten_condition

PROMPT_COLUMNS = ("prompt", "text", "caption")
PROMPT_SUFFIXES = (".txt", ".json", ".jsonl", ".csv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _pick_column(columns: list[str], column: str | None, where: str) -> str:
    if column is not None:
        if column not in columns:
            raise ValueError(
                f"{where} has no column {column!r}; its columns are {', '.join(map(str, columns))}."
            )
        return column
    for name in PROMPT_COLUMNS:
        if name in columns:
            return name
    raise ValueError(
        f"{where} has none of the columns {', '.join(PROMPT_COLUMNS)}; pass the prompt column (it has {', '.join(map(str, columns))})."
    )


def _rows(path: Path) -> list[dict]:
    """Rows of a ``.json`` (list of objects or of strings), ``.jsonl`` or ``.csv`` file."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):  # {"prompt": [...]} column layout
        data = [dict(zip(data, values)) for values in zip(*data.values())]
    return [{"prompt": row} if isinstance(row, str) else row for row in data]


def _prompts_of_file(path: Path, column: str | None) -> list[str]:
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = _rows(path)
    if not rows:
        return []
    name = _pick_column(list(rows[0]), column, f"{path.name}")
    return [str(row[name]).strip() for row in rows if row.get(name) is not None and str(row[name]).strip()]


def read_prompts(source: str | os.PathLike, column: str | None = None, split: str = "train") -> list[str]:
    """Prompts from a file, a folder of prompt files, or a ``datasets`` dataset (name or folder).

    ``column`` names the prompt column of JSON/CSV/datasets sources (default: the first of
    ``prompt``, ``text``, ``caption`` present). Empty lines and empty prompts are skipped.
    """
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        if path.suffix not in PROMPT_SUFFIXES:
            raise ValueError(f"prompt file {str(path)!r} must end in {', '.join(PROMPT_SUFFIXES)}.")
        prompts = _prompts_of_file(path, column)
    elif path.is_dir() and any(p.suffix in PROMPT_SUFFIXES for p in path.iterdir()):
        files = sorted(p for p in path.iterdir() if p.suffix in PROMPT_SUFFIXES)
        prompts = [p for f in files for p in _prompts_of_file(f, column)]
    elif path.suffix in PROMPT_SUFFIXES and not path.exists():
        raise ValueError(f"prompt file {str(path)!r} does not exist.")
    else:
        prompts = _prompts_of_dataset(str(source), column, split)
    if not prompts:
        raise ValueError(f"no prompts found in {str(source)!r}.")
    return prompts


def _prompts_of_dataset(name: str, column: str | None, split: str) -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise ValueError(
            f"{name!r} is not a prompt file or folder; reading it as a `datasets` dataset needs `pip install datasets`."
        ) from err
    data = datasets.load_dataset(name, split=split)
    key = _pick_column(list(data.column_names), column, f"dataset {name!r}")
    return [str(p).strip() for p in data[key] if p is not None and str(p).strip()]


def read_image_captions(
    folder: str | os.PathLike, caption_column: str | None = None
) -> list[tuple[Path, str]]:
    """``(image path, caption)`` pairs of an image folder (metadata.jsonl/csv or same-name .txt captions)."""
    root = Path(os.path.expanduser(str(folder)))
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist.")
    meta = next(
        (root / n for n in ("metadata.jsonl", "metadata.csv", "metadata.json") if (root / n).exists()), None
    )
    if meta is not None:
        rows = _rows(meta)
        if not rows:
            raise ValueError(f"{meta.name} in {str(root)!r} has no rows.")
        if "file_name" not in rows[0]:
            raise ValueError(f"{meta.name} in {str(root)!r} has no column 'file_name' (the image path).")
        key = _pick_column(list(rows[0]), caption_column, meta.name)
        pairs = [(root / row["file_name"], str(row[key] or "").strip()) for row in rows]
        missing = [str(p) for p, _ in pairs if not p.exists()]
        if missing:
            raise ValueError(f"{meta.name} lists {len(missing)} missing image(s), e.g. {missing[0]!r}.")
        return pairs
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"image folder {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    pairs = []
    for image in images:
        caption = image.with_suffix(".txt")
        if not caption.exists():
            raise ValueError(f"image {str(image)!r} has no caption: add {caption.name} or a metadata.jsonl.")
        pairs.append((image, caption.read_text(encoding="utf-8").strip()))
    return pairs


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """An RGB image resized (shorter side) and centre-cropped to ``resolution``, in [-1, 1], ``(3, H, W)``."""
    import numpy as np
    from PIL import Image

    image = Image.open(path).convert("RGB")
    scale = resolution / min(image.size)
    w, h = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1


def _fingerprint(teacher, items: list) -> str:
    spec = {"source": teacher.source, "resolution": teacher.resolution, "family": teacher.family,
            "max_sequence_length": teacher.prompt_encoder.max_sequence_length, "items": items}  # fmt: skip
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_cached(count: int, encode, cache_dir: str | Path | None, fingerprint: str, batch_size: int,
                  desc: str) -> dict[str, torch.Tensor]:  # fmt: skip
    """Run ``encode(start, stop) -> {name: tensor}`` over ``count`` items once, cached as safetensors shards.

    A cache folder is reused when its manifest matches ``fingerprint`` and ``count``; otherwise it
    is rewritten (shards first, manifest last, so an interrupted run is never taken for complete).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .checkpoint import cached_tensors

    cache = Path(cache_dir) if cache_dir is not None else None
    manifest = cache / "manifest.json" if cache is not None else None
    if manifest is not None and manifest.exists():
        try:
            info = json.loads(manifest.read_text())
        except ValueError:  # a corrupt manifest: rebuild the cache
            info = {}
        if info.get("fingerprint") == fingerprint and info.get("count") == count:
            parts = [cached_tensors(cache / name) for name in info["shards"]]
            if parts and all(p is not None for p in parts):  # a corrupt shard: rebuild the cache
                return tree_map(lambda *shards: torch.cat(shards), *(p[0] for p in parts))
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        if manifest.exists():
            manifest.unlink()
    parts, shards = [], []
    for start in tqdm(
        range(0, count, batch_size), desc=desc, disable=os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    ):
        part = tree_map(
            lambda v: v.detach().cpu().contiguous(), encode(start, min(count, start + batch_size))
        )
        parts.append(part)
        if cache is not None:
            shards.append(f"shard-{len(shards):05d}.safetensors")
            save_file(part, str(cache / shards[-1]))
    if cache is not None:
        manifest.write_text(
            json.dumps({"fingerprint": fingerprint, "count": count, "shards": shards}, indent=1)
        )
    return tree_map(lambda *shards: torch.cat(shards), *parts)


class ConditionDataset(Dataset):
    """Cached conditions (and, with real data, latents as ``pixel_values``), one dict per item.

    Items are ``{"encoder_hidden_states", "added_cond_kwargs": {...}}`` (plus ``"pixel_values"``:
    the VAE latents the objectives take as real samples), as the Denoiser and objectives consume them.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]):
        lengths = {len(v) for v in tensors.values()}
        if not tensors or len(lengths) != 1 or 0 in lengths:
            raise ValueError("a condition dataset needs at least one item and equal-length tensors.")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict:
        item = unflatten_condition(tree_map(lambda v: v[index], self.tensors))
        first = {"encoder_hidden_states": item.pop("encoder_hidden_states")}  # batch size is read from it
        return {**first, **item}

    @classmethod
    def from_prompts(cls, prompts: list[str], teacher, cache_dir: str | Path | None = None,
                     batch_size: int = 16) -> ConditionDataset:  # fmt: skip
        """Encode ``prompts`` with the teacher's prompt encoder once (cached in ``cache_dir``)."""
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt.")

        def encode(i, j):
            return flatten_condition(teacher.prompt_encoder(prompts[i:j], device="cpu"))

        tensors = encode_cached(
            len(prompts), encode, cache_dir, _fingerprint(teacher, prompts), batch_size, "prompts"
        )
        return cls(tensors)

    @classmethod
    def from_image_captions(cls, pairs: list[tuple[Path, str]], teacher, cache_dir: str | Path | None = None,
                            batch_size: int = 8, seed: int = 0) -> ConditionDataset:  # fmt: skip
        """Encode images to latents (``pixel_values``) and captions to conditions, once (cached)."""
        if not pairs:
            raise ValueError("the image-caption list is empty: give at least one pair.")
        gen = torch.Generator().manual_seed(seed)

        def encode(i, j):
            images = torch.stack([load_image(p, teacher.resolution) for p, _ in pairs[i:j]])
            cond = teacher.prompt_encoder([c for _, c in pairs[i:j]], device="cpu")
            return {"pixel_values": teacher.codec.encode(images, gen), **flatten_condition(cond)}

        items = [[str(p), c, os.path.getmtime(p)] for p, c in pairs]
        tensors = encode_cached(
            len(pairs), encode, cache_dir, _fingerprint(teacher, items), batch_size, "images"
        )
        return cls(tensors)
