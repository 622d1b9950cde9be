"""VQA readers: official VQA v2 question/annotation JSONs and mPLUG/ALBEF ``vqa_*.json`` rows
(dataset_formats.md §5, §1.4). One sample per question.

Answers are kept raw (no normalisation); ``answer_weights[i]`` is the share of annotators who gave ``answers[i]``
(VQA lists) or 0.5 for a single-answer row (VG / GQA). The ten raw VQA answers are kept in
``extra["all_answers"]`` for the official accuracy metric.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from mplug_ds.data.formats.common import (
    AnnotationError,
    MalformedRow,
    ReaderArgs,
    Skip,
    load_json,
    need,
    rows_to_samples,
    safe_key,
)
from mplug_ds.data.sample import Sample

SINGLE_ANSWER_WEIGHT = 0.5


def weighted_answers(answers: list[str]) -> tuple[list[str], list[float]]:
    """Distinct answers in first-seen order with weight = count / number of answers."""
    counts = Counter(answers)
    distinct = list(dict.fromkeys(answers))
    return distinct, [counts[a] / len(answers) for a in distinct]


def read_vqa_v2(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """``v2_OpenEnded_mscoco_<subtype>_questions.json`` (+ ``v2_mscoco_<subtype>_annotations.json`` when the
    split has answers). Image = ``images/<subtype>/COCO_<subtype>_<image_id:012d>.jpg``."""
    question_files, annotations = [], {}
    annotated_subtypes: set[str] = set()
    for path in args.ann:
        data = load_json(path, dict)
        if isinstance(data.get("questions"), list):
            question_files.append((path, data))
        elif isinstance(data.get("annotations"), list):
            annotated_subtypes.add(str(data.get("data_subtype")))
            for row in data["annotations"]:
                if isinstance(row, dict) and "question_id" in row:
                    annotations[row["question_id"]] = row
        else:
            raise AnnotationError(path, "neither a 'questions' nor an 'annotations' list",
                                  "pass the official VQA v2 *_questions.json and *_annotations.json files")
    if not question_files:
        raise AnnotationError(args.ann[0], "no questions file among the --ann files",
                              "pass v2_OpenEnded_mscoco_<subtype>_questions.json as well")
    for path, data in question_files:
        subtype = str(data.get("data_subtype", ""))
        if not subtype:
            raise AnnotationError(path, "missing 'data_subtype'", "pass the official questions file unchanged")

        def convert(question: Any) -> Sample:
            question_id = need(question, "question_id", int)
            image_id = need(question, "image_id", int)
            answers, weights, extra = [], [], {}
            if subtype in annotated_subtypes:
                ann = annotations.get(question_id)
                if ann is None:
                    raise MalformedRow(f"question {question_id} has no annotation")
                raw = [need(a, "answer", str) for a in need(ann, "answers", list)]
                if not raw:
                    raise MalformedRow(f"question {question_id} has an empty 'answers' list")
                answers, weights = weighted_answers(raw)
                extra = {"all_answers": raw, **{k: ann[k] for k in ("multiple_choice_answer", "answer_type",
                                                                     "question_type") if k in ann}}
            image = args.image_root() / subtype / f"COCO_{subtype}_{image_id:012d}.jpg"
            return Sample(key=safe_key("vqa", question_id), task="vqa", image=str(image),
                          texts=[need(question, "question", str)], answers=answers, answer_weights=weights,
                          image_id=str(image_id), split=subtype, extra={"question_id": question_id, **extra})

        rows = ((f"questions[{i}]", q) for i, q in enumerate(data["questions"]))
        yield from rows_to_samples(path, rows, convert)


def read_mplug_vqa(args: ReaderArgs) -> Iterator[Sample | Skip]:
    """mPLUG ``vqa_*_ocr.json`` / ``vg_qa.json`` rows. ``dataset`` (vqa | vg | gqa) picks the image root:
    ``--root vg=DIR`` / ``--root gqa=DIR``, defaulting to ``--images``. Test rows without ``answer`` keep none."""
    for path in args.ann:
        data = load_json(path, list)

        def convert(row: Any) -> Sample:
            question_id = need(row, "question_id", (int, str))
            dataset = row.get("dataset", "vqa")
            image = need(row, "image", str)
            answers: list[str] = []
            weights: list[float] = []
            extra: dict[str, Any] = {"question_id": question_id, "dataset": dataset}
            if "answer" in row:
                answer = need(row, "answer", (str, list))
                if isinstance(answer, str):
                    answers, weights = [answer], [SINGLE_ANSWER_WEIGHT]
                else:
                    if not answer or not all(isinstance(a, str) for a in answer):
                        raise MalformedRow("field 'answer' must be a non-empty list of strings")
                    answers, weights = weighted_answers(answer)
                    extra["all_answers"] = answer
            if isinstance(row.get("ocr"), list):
                extra["ocr"] = [t[1] for t in row["ocr"] if isinstance(t, (list, tuple)) and len(t) > 1]
            if isinstance(row.get("object_label"), str):
                extra["object_label"] = row["object_label"]
            root = args.roots.get(dataset, args.image_root())
            return Sample(key=safe_key(dataset, "q", question_id), task="vqa", image=str(Path(root) / image),
                          texts=[need(row, "question", str)], answers=answers, answer_weights=weights,
                          image_id=Path(image).stem, extra=extra)

        rows = ((f"[{i}]", row) for i, row in enumerate(data))
        yield from rows_to_samples(path, rows, convert)
