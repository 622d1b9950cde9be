"""Grounding: box maths, coordinate tokens, per-sample loss weighting, boxes mapped back to original pixels."""

import pytest
import torch
from PIL import Image

from mplug_ds.data.tokenizer import get_tokenizer
from mplug_ds.data.transforms import box_from_letterbox, grounding_transform
from mplug_ds.eval.boxes import box_iou, cxcywh_to_xyxy, generalized_box_iou, xyxy_to_cxcywh
from mplug_ds.eval.grounding import grounding_accuracy, trivial_box_baselines
from mplug_ds.models.mplug import build_model
from mplug_ds.tasks import TASKS, build_task
from mplug_ds.tasks.grounding import (
    BIN_SCALE,
    FIRST_BIN_ID,
    NUM_BINS,
    PREFIX_ID,
    GroundingConfig,
    GroundingModel,
    box_tokens,
    boxes_to_original,
    dequantize,
    quantize,
)


def test_iou_and_giou_of_known_boxes():
    a = torch.tensor([0.0, 0.0, 10.0, 10.0])
    assert box_iou(a, a).item() == pytest.approx(1.0)
    assert box_iou(a, torch.tensor([5.0, 0.0, 15.0, 10.0])).item() == pytest.approx(50 / 150)
    assert box_iou(a, torch.tensor([20.0, 20.0, 30.0, 30.0])).item() == 0.0
    assert box_iou(a, torch.tensor([0.0, 0.0, 5.0, 5.0])).item() == pytest.approx(0.25)
    # GIoU of disjoint boxes is negative: enclosing 30×30 = 900, union 200 → 0 − 700/900
    assert generalized_box_iou(a, torch.tensor([20.0, 20.0, 30.0, 30.0])).item() == pytest.approx(-700 / 900)
    box = torch.tensor([[0.2, 0.3, 0.6, 0.9]])
    assert torch.allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(box)), box)


def test_box_quantisation_round_trip_and_token_ids():
    values = torch.rand(1000)
    back = dequantize(quantize(values))
    assert (back <= values + 1e-6).all() and (values - back < 1 / BIN_SCALE + 1e-6).all()
    bins = torch.arange(NUM_BINS)
    assert torch.equal(quantize(dequantize(bins)), bins)
    tokens = box_tokens(torch.tensor([[0.0, 0.5, 1.0, 0.25]]))
    assert tokens.tolist() == [[PREFIX_ID, FIRST_BIN_ID, FIRST_BIN_ID + 168, FIRST_BIN_ID + 336, FIRST_BIN_ID + 84]]
    vocab = get_tokenizer().convert_ids_to_tokens([PREFIX_ID, FIRST_BIN_ID, FIRST_BIN_ID + 336])
    assert vocab == ["[unused339]", "[unused340]", "[unused676]"]


@pytest.mark.parametrize("size", [(200, 120), (90, 160), (64, 64)])
def test_box_survives_resize_pad_and_back(size):
    width, height = size
    box = [width * 0.2, height * 0.35, width * 0.55, height * 0.9]
    image = Image.new("RGB", size, (10, 200, 30))
    _, norm_box, _ = grounding_transform(image, box, "x", res=64, train=False)
    back = boxes_to_original(norm_box[None], torch.tensor([[width, height]]), res=64)[0]
    assert back == pytest.approx(box, abs=1e-3 * max(size))
    padded = (cxcywh_to_xyxy(norm_box) * 64).tolist()
    assert box_from_letterbox(padded, width, height, 64) == pytest.approx(box, abs=1e-3 * max(size))


def _batch(texts, boxes, seed):
    g = torch.Generator().manual_seed(seed)
    ids = get_tokenizer()(texts, padding="max_length", max_length=12, return_tensors="pt")
    return {"image": torch.randn(len(texts), 3, 64, 64, generator=g), "text_ids": ids["input_ids"],
            "text_mask": ids["attention_mask"], "box": torch.tensor(boxes)}


def test_grounding_loss_of_a_sample_ignores_the_rest_of_the_batch():
    torch.manual_seed(0)
    head = GroundingModel(build_model("tiny"), GroundingConfig()).eval()
    a = _batch(["red circle", "blue square"], [[0.3, 0.4, 0.1, 0.2], [0.7, 0.2, 0.3, 0.3]], seed=1)
    b = _batch(["red circle", "the leftmost green diamond"], [[0.3, 0.4, 0.1, 0.2], [0.1, 0.9, 0.05, 0.1]], seed=2)
    b["image"][0] = a["image"][0]
    with torch.no_grad():
        loss_a, _ = head.sample_losses(a)
        loss_b, _ = head.sample_losses(b)
    assert loss_a[0].item() == pytest.approx(loss_b[0].item(), rel=1e-5)
    assert loss_a[1].item() != pytest.approx(loss_b[1].item(), rel=1e-3)
    out = head(a)
    assert out["loss"].item() == pytest.approx(loss_a.mean().item(), rel=1e-6)


def test_prediction_is_four_coordinate_tokens_in_range():
    torch.manual_seed(0)
    head = GroundingModel(build_model("tiny"), GroundingConfig()).eval()
    boxes = head.predict_boxes(_batch(["red circle", "blue square", "x"], [[0.5] * 4] * 3, seed=3))
    assert boxes.shape == (3, 4) and (boxes >= 0).all() and (boxes <= 1).all()
    assert torch.equal(quantize(boxes), (boxes * BIN_SCALE).round().long())


def test_accuracy_per_split_and_trivial_baselines():
    preds = [{"pred_box": [0, 0, 10, 10], "gt_box": [0, 0, 10, 10], "split": "testA", "image_size": [100, 100]},
             {"pred_box": [0, 0, 10, 10], "gt_box": [50, 50, 60, 60], "split": "testA", "image_size": [100, 100]},
             {"pred_box": [1, 1, 11, 11], "gt_box": [0, 0, 10, 10], "split": "testB", "image_size": [100, 100]}]
    metrics = grounding_accuracy(preds)
    assert metrics["acc"] == pytest.approx(2 / 3)
    assert metrics["acc/testA"] == 0.5 and metrics["acc/testB"] == 1.0
    baseline = trivial_box_baselines(preds + [{"gt_box": [0, 0, 100, 90], "image_size": [100, 100]}])
    assert baseline["whole_image"] == 0.25


def test_unknown_task_name_is_a_clear_error():
    from mplug_ds.config import ConfigError

    with pytest.raises(ConfigError, match=f"unknown task 'grouding'.*{', '.join(sorted(TASKS))}"):
        build_task("grouding")
    with pytest.raises(ConfigError, match="task.loss_weight"):
        build_task("grounding", {"loss_weight": True})
