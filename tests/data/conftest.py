"""Fixtures for the format/shard tests: tiny real images, running the real make_shards CLI, reading shards back."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image

from mplug_ds.data.reading import DataErrors, iter_samples
from mplug_ds.data.sample import Sample
from tests.processes import REPO, kill_group, timeout

MAKE_SHARDS = REPO / "tools" / "make_shards.py"


class ShardHelpers:
    """Builders for tiny fixture files, plus running make_shards and reading its output back."""

    def __init__(self) -> None:
        spec = importlib.util.spec_from_file_location("make_shards_cli", MAKE_SHARDS)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self._main: Callable[[list[str]], int] = module.main

    @staticmethod
    def image(path: Path, size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (200, 30, 30),
              fmt: str = "JPEG") -> Path:
        """A solid-colour image of ``size`` (width, height) saved as ``fmt`` (the file name may lie about it)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, color).save(path, format=fmt)
        return path

    @staticmethod
    def json(path: Path, data: Any) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data), encoding="utf-8")
        return path

    @staticmethod
    def jsonl(path: Path, rows: list[Any]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    def run(self, *argv: Any) -> int:
        """``tools/make_shards.py`` run in this process (quiet); returns its exit status."""
        return self._main([str(a) for a in argv] + ["--quiet"])

    @staticmethod
    def cli(*argv: Any) -> subprocess.CompletedProcess:
        """``tools/make_shards.py`` run as its own process, as a user runs it (killed with its workers at the end)."""
        proc = subprocess.Popen([sys.executable, str(MAKE_SHARDS), *map(str, argv)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout(120))
        finally:
            kill_group(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    @staticmethod
    def manifest(out: Path) -> dict[str, Any]:
        return json.loads((out / "manifest.json").read_text())

    @staticmethod
    def skipped(out: Path) -> list[dict[str, str]]:
        return [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]

    def read(self, out: Path) -> dict[str, Sample]:
        """Every sample of the shards listed in ``out/manifest.json``, by key, read with the project's pipeline.

        Fails if the pipeline had to skip anything: shards written by make_shards must be fully readable.
        """
        listed = self.manifest(out)["shards"]
        errors = DataErrors()
        samples = {s.key: s for s in iter_samples([str(out / s["name"]) for s in listed], errors)}
        assert errors.corrupt_samples == 0 and errors.damaged_shards == 0, errors.state_dict()
        assert len(samples) == sum(s["samples"] for s in listed)
        return samples


@pytest.fixture(scope="session")
def shards() -> ShardHelpers:
    """Fixture-file builders, the make_shards CLI and a shard reader."""
    return ShardHelpers()
