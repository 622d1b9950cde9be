"""Caption metrics equal pycocoevalcap's own COCO evaluation (COCOEvalCap on COCO-format files) on the same
references and candidates; SPICE is reported as unavailable, not 0, when its CoreNLP models are missing."""
import json

import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.eval import COCOEvalCap
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocotools.coco import COCO

from mplug_ds.eval.caption import caption_metrics, constant_caption_cider, spice_unavailable

REFERENCES = {
    1: ["A red circle on the left.", "a picture of a red circle on the left", "The circle is red, and on the left."],
    2: ["Two blue squares at the top.", "two blue squares at the top on a striped background"],
    3: ["A green triangle in the center and a yellow diamond on the right.", "an image showing a green triangle"],
    4: ["Three purple circles at the bottom.", "the circles are purple and at the bottom."],
}
CANDIDATES = {1: "a red circle on the left", 2: "two blue squares on the left",
              3: "a green triangle in the center", 4: "three purple circles at the bottom"}
KEYS = {"Bleu_1": "bleu_1", "Bleu_2": "bleu_2", "Bleu_3": "bleu_3", "Bleu_4": "bleu_4", "METEOR": "meteor",
        "ROUGE_L": "rouge_l", "CIDEr": "cider", "SPICE": "spice"}


def _coco_eval(tmp_path, monkeypatch, candidates):
    annotations = [{"image_id": i, "id": 10 * i + j, "caption": c}
                   for i, refs in REFERENCES.items() for j, c in enumerate(refs)]
    ann_file = tmp_path / "captions.json"
    ann_file.write_text(json.dumps({"images": [{"id": i} for i in REFERENCES], "annotations": annotations}))
    res_file = tmp_path / "results.json"  # the COCO results format the caption task writes
    res_file.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in candidates.items()]))
    coco = COCO(str(ann_file))
    evaluator = COCOEvalCap(coco, coco.loadRes(str(res_file)))
    if spice_unavailable():  # COCOEvalCap always runs SPICE, which cannot run here (no CoreNLP models, no network)
        class NoSpice:
            def method(self):
                return "SPICE (unavailable)"

            def compute_score(self, gts, res):
                return float("nan"), [float("nan")] * len(gts)

        monkeypatch.setattr("pycocoevalcap.eval.Spice", NoSpice)
    evaluator.evaluate()
    return evaluator.eval


def _official_cider(candidates):
    """pycocoevalcap's CIDEr on its PTB tokenisation, as COCOEvalCap computes it (without its other scorers)."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in REFERENCES.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in candidates.items()})
    return Cider().compute_score(gts, res)[0]


def test_caption_metrics_equal_pycocoevalcap_coco_evaluation(tmp_path, monkeypatch):
    ours, why_no_spice = caption_metrics(REFERENCES, CANDIDATES)
    official = _coco_eval(tmp_path, monkeypatch, CANDIDATES)
    for name, key in KEYS.items():
        if key == "spice" and why_no_spice:
            assert "spice" not in ours and ("SPICE" in why_no_spice or "java" in why_no_spice)
            continue
        assert ours[key] == pytest.approx(official[name], abs=1e-9), name
    assert 0 < ours["cider"] and 0 < ours["bleu_4"] < ours["bleu_1"] <= 1
    # the trivial baseline: one caption for every image scores far lower
    constant = constant_caption_cider(REFERENCES, "a red circle on the left.")
    assert constant == pytest.approx(_official_cider({i: "a red circle on the left." for i in REFERENCES}), abs=1e-9)
    assert constant < ours["cider"]
