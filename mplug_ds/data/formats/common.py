"""Pieces every format reader shares: reader arguments, skip records, file loading and box/text helpers."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from mplug_ds.data.sample import VIDEO_EXTS, Sample

# A box that the shard writer resolves to the whole stored image (used when the image size is not yet known).
FULL_IMAGE_BOX: list[float] = [0.0, 0.0, math.inf, math.inf]


class AnnotationError(Exception):
    """An annotation file cannot be read at all (missing, not parseable, or not the expected format)."""

    def __init__(self, path: Path | str, problem: str, fix: str) -> None:
        super().__init__(f"cannot read annotation file {path}: {problem}. Fix: {fix}")
        self.path = str(path)


@dataclass
class Skip:
    """One rejected input: where it came from, which row/key, and why."""

    source: str
    key: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        """The ``skipped.jsonl`` record."""
        return {"source": self.source, "key": self.key, "reason": self.reason}


class MalformedRow(ValueError):
    """Raised inside a reader for one bad row; turned into a ``Skip``."""


@dataclass
class ReaderArgs:
    """What a reader needs: annotation files, the image root and a few per-format options."""

    ann: list[Path]
    images: Path | None = None
    dataset: str | None = None  # refcoco: refcoco | refcoco+ | refcocog; transvg: unc | unc+ | gref | ...
    split_by: str | None = None  # refcoco: unc | google | umd
    roots: dict[str, Path] = field(default_factory=dict)  # extra image roots by name (mplug-vqa: vg, gqa)
    split_files: dict[str, Path] = field(default_factory=dict)  # msrvtt: split name → list of its video ids

    def image_root(self) -> Path:
        """The image directory (the current directory when none was given)."""
        return self.images if self.images is not None else Path(".")


ReaderFn = Callable[[ReaderArgs], Iterator["Sample | Skip"]]


def load_json(path: Path, expect: type | tuple[type, ...]) -> Any:
    """Parse a whole JSON file and check its top-level type, or raise ``AnnotationError`` naming the file."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise AnnotationError(path, "file not found", "check the --ann path") from None
    except OSError as err:
        raise AnnotationError(path, f"{type(err).__name__}: {err}", "check the file exists and is readable") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(path, f"not valid JSON ({err})",
                              "pass the original annotation file (re-download it if it was cut short)") from None
    if not isinstance(data, expect):
        names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        raise AnnotationError(path, f"top level is a JSON {type(data).__name__}, expected {names}",
                              "check that --format matches this file")
    return data


def is_json_array(path: Path) -> bool:
    """Whether a file starts like a JSON array (``[``) rather than JSON lines (``{``)."""
    try:
        with open(path, "rb") as f:
            return f.read(64).lstrip()[:1] == b"["
    except OSError:
        return False


def iter_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line_number, parsed_object)`` for each non-blank line of a JSON-lines file.

    Unparseable lines come back as ``(line_number, MalformedRow)`` so the caller can report them.
    """
    try:
        f = open(path, encoding="utf-8")
    except OSError as err:
        raise AnnotationError(path, f"{type(err).__name__}: {err}", "check the --ann path") from None
    with f:
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    yield number, MalformedRow(f"line is not valid JSON ({err})")
        except UnicodeDecodeError as err:
            raise AnnotationError(path, f"not UTF-8 text ({err})", "pass the original JSON-lines file") from None


def rows_to_samples(path: Path, rows: Iterable[tuple[str, Any]],
                    convert: Callable[[Any], Sample | None]) -> Iterator[Sample | Skip]:
    """Apply ``convert`` to each ``(row_key, row)``; ``MalformedRow``/lookup errors become ``Skip`` records.

    ``convert`` may return ``None`` for rows that are legitimately not samples (nothing is reported).
    A row that is itself a ``MalformedRow`` (e.g. a JSON line that failed to parse) is reported as is.
    """
    for key, row in rows:
        if isinstance(row, MalformedRow):
            yield Skip(str(path), key, f"malformed row: {row}")
            continue
        try:
            sample = convert(row)
        except (MalformedRow, KeyError, TypeError, ValueError, IndexError) as err:
            yield Skip(str(path), key, f"malformed row: {_describe(err)}")
            continue
        if sample is not None:
            yield sample


def _describe(err: Exception) -> str:
    if isinstance(err, KeyError):
        return f"missing field {err}"
    return str(err) or type(err).__name__


def need(row: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    """``row[name]`` checked to be of ``kind``; raises ``MalformedRow`` naming the field otherwise."""
    if not isinstance(row, dict):
        raise MalformedRow(f"expected a JSON object, got {type(row).__name__}")
    if name not in row:
        raise MalformedRow(f"missing field '{name}'")
    value = row[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise MalformedRow(f"field '{name}' is {type(value).__name__}, expected "
                           + " or ".join(k.__name__ for k in kinds))
    return value


def text_list(value: Any, field_name: str) -> list[str]:
    """A caption field that may be a string, a list of strings or ``{"en": str}`` → list of strings."""
    if isinstance(value, dict) and "en" in value:
        value = value["en"]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise MalformedRow(f"field '{field_name}' must be a string or a list of strings, got {type(value).__name__}")


def xywh_to_xyxy(box: Any, field_name: str = "bbox") -> list[float]:
    """``[x, y, w, h]`` → ``[x0, y0, x1, y1]`` (numbers checked, NaN rejected)."""
    x, y, w, h = number_list(box, 4, field_name)
    return [x, y, x + w, y + h]


def number_list(value: Any, length: int, field_name: str) -> list[float]:
    """A list of ``length`` finite numbers, or ``MalformedRow``."""
    if (not isinstance(value, (list, tuple)) or len(value) < length
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value[:length])):
        raise MalformedRow(f"field '{field_name}' must be a list of {length} numbers, got {value!r}")
    numbers = [float(v) for v in value[:length]]
    if not all(math.isfinite(v) for v in numbers):
        raise MalformedRow(f"field '{field_name}' has a non-finite number: {value!r}")
    return numbers


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(*parts: object) -> str:
    """Join parts with ``_`` into a WebDataset key: letters, digits, ``_`` and ``-`` only (no dots, no slashes)."""
    text = "_".join(str(p) for p in parts if p is not None and str(p) != "")
    return _KEY_UNSAFE.sub("_", text.replace("+", "plus")).strip("_")


def first_existing(root: Path, candidates: Iterable[str | Path]) -> str:
    """The first ``root/candidate`` that exists, else the first candidate (the writer then reports it missing)."""
    paths = [root / c for c in candidates]
    for path in paths:
        if path.is_file():
            return str(path)
    return str(paths[0])


def video_file(root: Path, name: str, folders: Iterable[str] = ("",)) -> str:
    """The video ``name`` under ``root`` (or one of its ``folders``): as given when it has a container suffix, else
    the first existing ``name.<ext>`` of ``sample.VIDEO_EXTS`` (``name.mp4`` when none exists: the writer reports
    it)."""
    has_suffix = Path(name).suffix.lower().lstrip(".") in VIDEO_EXTS
    names = [name] if has_suffix else [f"{name}.{ext}" for ext in VIDEO_EXTS]
    return first_existing(root, [str(Path(folder) / n) for n in names for folder in folders])


def split_in_name(path: Path) -> str | None:
    """``train`` / ``val`` / ``test`` when the file name says so (``msrvtt_train.jsonl``, ``val_qa.json``)."""
    words = set(re.split(r"[^a-z0-9]+", path.name.lower()))
    for split, names in (("train", {"train", "training"}), ("val", {"val", "validate", "validation", "dev"}),
                         ("test", {"test"})):
        if words & names:
            return split
    return None


def ann_name(path: Path) -> str:
    """The file name without directory and extension (for deriving splits from file names)."""
    return path.name.split(".")[0]
