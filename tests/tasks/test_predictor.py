"""``mplug_ds.load`` and ``tools/predict.py`` on images of one's own (tiny model in this process): inputs as files, PIL
images or tensors, the answers printed or as JSON, the evaluation's picture, and a task the checkpoint cannot do.
That its predictions are the evaluation's is checked on every task's evaluation run (``predict_checks``)."""
import json

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import mplug_ds
from mplug_ds.data.reading import decode_sample
from mplug_ds.data.sample import Sample
from mplug_ds.models.mplug import build_model
from mplug_ds.tasks import TASKS, build_task
from mplug_ds.tasks.finetune_config import FinetuneConfig
from mplug_ds.tasks.recipe import task_data_config
from tests.tasks.task_data import _scene, write_export
from tools.predict import main as predict_main

QUICK = ["task.options.num_beams=2", "task.options.min_length=1", "task.options.max_length=4"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return write_export(tmp_path_factory.mktemp("predictor") / "export")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two image files of different sizes (a coloured box on grey) and what they show."""
    root = tmp_path_factory.mktemp("photos")
    paths, texts = [], []
    for seed, (w, h) in enumerate([(80, 48), (64, 64)]):
        jpeg, text, _ = _scene(seed, w, h)
        paths.append(root / f"photo{seed}.jpg")
        paths[-1].write_bytes(jpeg)
        texts.append(text)
    return paths, texts


def test_files_pil_images_and_tensors_are_the_same_input(export, photos):
    paths, texts = photos
    predictor = mplug_ds.load(export)
    pil = [decode_sample({"json": b'{"key": "k", "task": "caption"}', "jpg": p.read_bytes()}).image for p in paths]
    uint8 = [TF.pil_to_tensor(im) for im in pil]
    boxes = predictor.ground(paths, texts)
    assert predictor.ground(pil, texts) == predictor.ground(uint8, texts) == boxes
    assert predictor.ground([t.float() / 255 for t in uint8], texts) == boxes
    for box, image in zip(boxes, pil):  # in the pixels of each image as given
        assert len(box) == 4 and 0 <= box[0] <= box[2] <= image.width and 0 <= box[1] <= box[3] <= image.height
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        predictor.ground(paths, texts[:1])
    with pytest.raises(ValueError, match="not a readable image"):
        predictor.caption([export / "model_config.yaml"])


def test_rank_scores_every_pair_and_reranks_both_ways(export, photos):
    paths, texts = photos
    ranking = mplug_ds.load(export).rank(paths, [*texts, "a picture of nothing"])
    assert ranking.similarity.shape == (2, 3)
    for rows, n in ((ranking.image_to_texts, 3), (ranking.text_to_images, 2)):
        for row in rows:  # every candidate once, best matching score first
            assert sorted(c for c, _ in row) == list(range(n))
            assert [s for _, s in row] == sorted((s for _, s in row), reverse=True)


@pytest.mark.filterwarnings("ignore:Glyph")  # random weights write any token, in any script
def test_predict_tool_prints_the_captions_and_draws_them(export, photos, tmp_path, capsys):
    paths, _ = photos
    picture = tmp_path / "captions.png"
    assert predict_main([str(export), "--task", "caption", *map(str, paths), "--out", str(picture),
                         *(f"--set={o}" for o in QUICK)]) == 0
    printed = capsys.readouterr().out.splitlines()
    captions = mplug_ds.load(export, overrides=QUICK).caption(paths)
    assert printed == [f"{p}: {c}" for p, c in zip(paths, captions)] + [f"picture: {picture}"]
    with Image.open(picture) as drawn:
        assert drawn.format == "PNG" and drawn.width >= 300 and drawn.height >= 200


@pytest.mark.filterwarnings("ignore:Glyph")
def test_predict_tool_json_is_all_of_stdout(export, photos, tmp_path, capsys):
    paths, texts = photos
    assert predict_main([str(export), "--task", "vqa", *map(str, paths), "--question", "what colour is the box?",
                         "--out", str(tmp_path / "answers.png"), "--json", *(f"--set={o}" for o in QUICK)]) == 0
    record = json.loads(capsys.readouterr().out)
    answers = mplug_ds.load(export, overrides=QUICK).answer(paths, ["what colour is the box?"] * 2)
    assert [p["answer"] for p in record["predictions"]] == answers
    assert [p["input"] for p in record["predictions"]] == [str(p) for p in paths]
    assert record["picture"] == str(tmp_path / "answers.png") and (tmp_path / "answers.png").is_file()


def test_a_task_without_its_head_is_refused_naming_what_the_checkpoint_holds(export, photos, capsys):
    paths, texts = photos
    with pytest.raises(ValueError, match="holds no classification head: it is weights of unknown training"):
        mplug_ds.load(export).classify(paths, texts)
    assert predict_main([str(export), "--task", "ve", str(paths[0]), "--text", texts[0]]) == 2
    assert "holds no 've' head" in capsys.readouterr().err
    assert predict_main([str(export), "--task", "nlvr2", str(paths[0]), "--text", texts[0]]) == 2
    assert "pairs: got 1 images" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_tasks_predictions_run_only_the_parts_it_declares_it_uses(name, photos):
    """``uses`` decides which never-trained parts refuse a task: every part its predictions run must be listed."""
    paths, texts = photos
    task = build_task(name, {"num_beams": 1, "min_length": 1, "max_length": 3} if name in ("caption", "vqa") else None)
    model = build_model("tiny").eval()
    ran = set()
    for part_name, part in model.named_children():
        part.register_forward_hook(lambda *_, part_name=part_name: ran.add(part_name))
    data = task_data_config(FinetuneConfig(), model.cfg, task, False, [])
    images = [Image.open(p).convert("RGB") for p in paths]
    if name == "retrieval":
        task.rank(model, images, texts, data, 2, torch.device("cpu"))
    else:
        pairs = name == "nlvr2"
        samples = [(i, Sample(key=f"s{i}", task=task.sample_task, image=None if pairs else im,
                              images=[im, im] if pairs else [], texts=[t]))
                   for i, (im, t) in enumerate(zip(images, texts))]
        task.predict(task.build(model).eval(), task.eval_items(samples, data), data, torch.device("cpu"))
    declared = {prefix.rstrip(".") for prefix in task.uses}
    assert ran and ran <= declared, f"{name} runs {sorted(ran - declared)} but does not declare it in uses"
