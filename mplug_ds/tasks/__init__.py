"""Fine-tuning tasks behind one interface (``FinetuneTask``), found by name in ``TASKS``."""
from __future__ import annotations

from typing import Any, Mapping

from mplug_ds.config import ConfigError
from mplug_ds.tasks.base import EvalResult, FinetuneTask
from mplug_ds.tasks.caption import CaptionTask
from mplug_ds.tasks.grounding import GroundingTask
from mplug_ds.tasks.nlvr2 import NLVR2Task
from mplug_ds.tasks.retrieval import RetrievalTask
from mplug_ds.tasks.ve import VETask
from mplug_ds.tasks.video_caption import VideoCaptionTask
from mplug_ds.tasks.video_qa import VideoQATask
from mplug_ds.tasks.video_retrieval import VideoRetrievalTask
from mplug_ds.tasks.vqa import VQATask

TASKS: dict[str, type[FinetuneTask]] = {"grounding": GroundingTask, "retrieval": RetrievalTask, "vqa": VQATask,
                                        "caption": CaptionTask, "nlvr2": NLVR2Task, "ve": VETask,
                                        "video_retrieval": VideoRetrievalTask, "video_qa": VideoQATask,
                                        "video_caption": VideoCaptionTask}

__all__ = ["TASKS", "EvalResult", "FinetuneTask", "build_task"]


def build_task(name: str, options: Mapping[str, Any] | None = None) -> FinetuneTask:
    """The task called ``name`` with its ``task.options``; an unknown name is a ``ConfigError`` listing the known."""
    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}': choose one of {', '.join(sorted(TASKS))} (--task NAME)")
    return TASKS[name](options)
