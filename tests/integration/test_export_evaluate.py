"""Export, evaluation and promotion on a briefly trained micro RetinaNet.

The exported artefacts are checked from the outside, the way their users load them: the
SavedModel's signatures with ``tf.saved_model.load`` and the frozen graph through a
``tf.compat.v1.Session`` as the 2019 tutorial's ``object_detection_run.py`` does."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from petdet_tasks import export as export_mod
from petdet_tasks.evaluate import EvalConfig, evaluate, promote_evaluated, read_metrics
from petdet_tasks.export import (
    FROZEN_GRAPH,
    OUTPUT_KEYS,
    SIGNATURE_ENCODED,
    SIGNATURE_IMAGES,
    ExportConfig,
    ExportError,
    call_signature,
    compare_detections,
    export,
    load_exported,
)
from petdet_tasks.layout import PRODUCTION_POINTER, step_prefix
from petdet_tasks.manifest import StepWriter, read_manifest
from petdet_tasks.registry import read_production
from petdet_tasks.store import LocalStore
from tests.support.pipeline import build_trained

pytestmark = pytest.mark.slow
# 64 or a multiple of 128 (train_config's anchor-grid rule). Not 64: the parity checks must
# compare at least 10 real detections per image, and the 30-step model at 64 px (774 anchors)
# leaves only 3 to 7 on some images
SIZE = 128


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("export")
    return build_trained(LocalStore(work / "store"), work, image_size=SIZE)


@pytest.fixture(scope="module")
def exported(trained):
    result = export(trained.store, trained.training.uri, cache_dir=trained.work / "cache")
    _, saved_model_dir, labels = load_exported(trained.store, result.uri,
                                               trained.work / "cache")
    import tensorflow as tf

    return result, tf.saved_model.load(str(saved_model_dir)), labels


@pytest.fixture(scope="module")
def exported_all(trained):
    """The same model exported with no score floor: every image gets its top 100 detections,
    however weak this briefly trained model is (with the default floor of 0.05 it finds 3 to
    10 on the fixture image, and on some images none)."""
    result = export(trained.store, trained.training.uri, ExportConfig(score_threshold=0.0),
                    cache_dir=trained.work / "cache")
    _, saved_model_dir, _ = load_exported(trained.store, result.uri, trained.work / "cache")
    import tensorflow as tf

    return result, tf.saved_model.load(str(saved_model_dir))


def _images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _check_contract(out: dict, n: int, label_ids: list[int]) -> None:
    assert sorted(out) == sorted(OUTPUT_KEYS)
    assert out["num_detections"].shape == (n,)
    assert out["detection_boxes"].shape == (n, 100, 4)
    assert out["detection_scores"].shape == (n, 100)
    assert out["detection_classes"].shape == (n, 100)
    for k in OUTPUT_KEYS:
        assert out[k].dtype == np.float32, k
    for i in range(n):
        k = int(out["num_detections"][i])
        assert 0 <= k <= 100 and out["num_detections"][i] == k
        boxes, scores, classes = (out["detection_boxes"][i], out["detection_scores"][i],
                                  out["detection_classes"][i])
        assert np.all((boxes >= 0) & (boxes <= 1))
        # no box wholly outside the image (in the letterbox padding): every box has an area
        assert np.all(boxes[:k, 2] > boxes[:k, 0]) and np.all(boxes[:k, 3] > boxes[:k, 1])
        assert np.all(np.diff(scores[:k]) <= 1e-7), "sorted by score"
        assert np.all(scores[:k] >= 0.05)
        assert set(classes[:k].astype(int)) <= set(label_ids)
        assert np.all(classes[:k] == np.round(classes[:k]))
        # padding rows are zero
        assert not boxes[k:].any() and not scores[k:].any() and not classes[k:].any()


def test_export_writes_the_artefacts_and_is_cached(trained, exported, exported_all):
    result, _, labels = exported
    files = result.manifest["files"]
    for rel in (FROZEN_GRAPH, "label_map.pbtxt", "pipeline.json", "parity.json",
                "saved_model/saved_model.pb"):
        assert rel in files, rel
    assert any(k.startswith("saved_model/variables/") for k in files)
    out = result.outputs
    assert out["num_classes"] == 6 and out["image_size"] == SIZE
    assert out["parity_checks"] == 5
    assert out["parity_max_score_diff"] <= export_mod.PARITY_ATOL
    # the parity check compares real detections: with no floor, 100 on each image, less
    # those within 1e-4 of the 100th score, which may fall on either side of the cut (this
    # model saturates many scores near 0: 70 to 96 compared on the single image here)
    everything = exported_all[0]
    assert everything.outputs["fixture_detections"] == 100
    checks = json.loads(trained.store.read_text(
        step_prefix("export", everything.fingerprint) + "parity.json"))["checks"]
    assert len(checks) == 5 and all(c["compared"] >= 10 for c in checks.values()), checks
    cache = trained.work / "cache"
    assert not (cache / "export" / result.fingerprint).exists(), "scratch kept"
    for area, name in (("export", result.fingerprint), ("tfrecords", trained.records.fingerprint)):
        assert (cache / ".locks" / area / f"{name}.lock").is_file(), (area, name)
    prefix = step_prefix("export", result.fingerprint)
    pipeline = json.loads(trained.store.read_text(prefix + "pipeline.json"))
    assert pipeline["training_uri"] == trained.training.uri
    assert pipeline["tfrecords_uri"] == trained.records.uri
    assert pipeline["train_config"]["image_size"] == SIZE
    assert pipeline["label_ids"] == list(labels.ids)
    parity = json.loads(trained.store.read_text(prefix + "parity.json"))
    assert parity["fixture"].startswith("val-"), "the fixture is a real val image"
    assert (trained.store.read_text(prefix + "label_map.pbtxt")
            == trained.store.read_text(step_prefix("train", trained.training.fingerprint)
                                       + "label_map.pbtxt"))
    again = export(trained.store, trained.training.uri, cache_dir=trained.work / "cache")
    assert again.cache_hit and again.uri == result.uri
    assert everything.fingerprint != result.fingerprint, "the score floor is in the fingerprint"


@pytest.mark.parametrize("shape", [(1, 97, 211, 3), (3, 300, 200, 3), (2, 64, 64, 3),
                                   (1, 1, 1, 3)])
def test_serving_default_contract_on_odd_sizes_and_batches(exported, shape):
    _, model, labels = exported
    out = call_signature(model, SIGNATURE_IMAGES, _images(shape))
    _check_contract(out, shape[0], labels.ids)


def test_each_image_of_a_batch_is_detected_as_if_alone(exported):
    _, model, _ = exported
    batch = _images((3, 150, 250, 3), seed=3)
    together = call_signature(model, SIGNATURE_IMAGES, batch)
    for i in range(3):
        alone = call_signature(model, SIGNATURE_IMAGES, batch[i:i + 1])
        compare_detections(alone, {k: v[i:i + 1] for k, v in together.items()},
                           atol=1e-4, score_threshold=0.05)


def test_encoded_signature_takes_jpeg_and_png_of_different_sizes(exported):
    _, model, labels = exported
    a, b = _images((1, 120, 90, 3), seed=1)[0], _images((1, 77, 300, 3), seed=2)[0]
    png, jpeg = io.BytesIO(), io.BytesIO()
    Image.fromarray(a).save(png, format="PNG")
    Image.fromarray(b).save(jpeg, format="JPEG", quality=95)
    out = call_signature(model, SIGNATURE_ENCODED, [png.getvalue(), jpeg.getvalue()])
    _check_contract(out, 2, labels.ids)
    # PNG is lossless: the same pixels give the same detections as the uint8 signature
    direct = call_signature(model, SIGNATURE_IMAGES, a[None])
    compare_detections(direct, {k: v[:1] for k, v in out.items()}, score_threshold=0.05)


def test_encoded_signature_sees_transparent_pngs_on_white_as_training_does(exported_all):
    """The TFRecords step composites transparency onto white (petdet_tasks.images); the served
    model dropped the alpha channel instead, so a transparent background reached it as black
    (or whatever colour the invisible pixels had). Each PNG must detect as its pixels on white,
    through the uint8 signature, do."""
    from petdet_tasks.images import _to_rgb

    _, model = exported_all  # 100 detections an image: the comparisons below are never empty
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (90, 120, 4), dtype=np.uint8)
    rgba[:30, :, 3] = 0  # a fully transparent band: black, noise and white must all vanish
    la = rng.integers(0, 256, (64, 80, 2), dtype=np.uint8)
    palette = Image.fromarray(rng.integers(0, 16, (70, 50), dtype=np.uint8), "P")
    palette.putpalette(rng.integers(0, 256, 768).tolist())
    cases = [(Image.fromarray(rgba, "RGBA"), {}), (Image.fromarray(la, "LA"), {}),
             (palette, {"transparency": 3})]
    for img, kw in cases:
        buf = io.BytesIO()
        img.save(buf, format="PNG", **kw)
        on_white, note = _to_rgb(Image.open(io.BytesIO(buf.getvalue())), "PNG")
        assert "composited on white" in note
        pixels = np.asarray(on_white.convert("RGB"))
        served = call_signature(model, SIGNATURE_ENCODED, [buf.getvalue()])
        direct = call_signature(model, SIGNATURE_IMAGES, pixels[None])
        assert served["num_detections"][0] == 100
        # less those within 1e-4 of the 100th score (51 to 96 compared on these images here)
        assert compare_detections(direct, served)["compared"] >= 10
        dropped = call_signature(model, SIGNATURE_IMAGES, np.asarray(img.convert("RGB"))[None])
        assert not np.allclose(dropped["detection_scores"], served["detection_scores"]), (
            img.mode, "the alpha-dropped pixels would detect differently")


def test_frozen_graph_runs_in_a_tf1_session_like_the_tutorial(trained, exported):
    import tensorflow as tf

    result, model, labels = exported
    path = trained.work / "frozen.pb"
    trained.store.download_file(step_prefix("export", result.fingerprint) + FROZEN_GRAPH, path)
    # object_detection_run.py, 2019:
    detection_graph = tf.Graph()
    with detection_graph.as_default():
        od_graph_def = tf.compat.v1.GraphDef()
        with tf.io.gfile.GFile(str(path), "rb") as fid:
            od_graph_def.ParseFromString(fid.read())
            tf.import_graph_def(od_graph_def, name="")
    images = _images((2, 133, 171, 3), seed=4)
    with detection_graph.as_default(), tf.compat.v1.Session(graph=detection_graph) as sess:
        image_tensor = detection_graph.get_tensor_by_name("image_tensor:0")
        tensors = [detection_graph.get_tensor_by_name(f"{k}:0") for k in
                   ("detection_boxes", "detection_scores", "detection_classes",
                    "num_detections")]
        boxes, scores, classes, num = sess.run(tensors, feed_dict={image_tensor: images})
    frozen = {"detection_boxes": boxes, "detection_scores": scores,
              "detection_classes": classes, "num_detections": num}
    _check_contract(frozen, 2, labels.ids)
    saved = call_signature(model, SIGNATURE_IMAGES, images)
    report = compare_detections(saved, frozen, score_threshold=0.05)
    assert report["compared"] >= 0.9 * num.sum()  # all but ties at the top-100 cut
    ops = {n.op for n in od_graph_def.node}
    assert "CombinedNonMaxSuppression" in ops
    assert not ops & {"VarHandleOp", "ReadVariableOp", "VariableV2"}, "frozen: no variables"


def test_serving_letterbox_is_the_training_eval_transform(exported):
    """The served model sees exactly the pixels the training's eval input gave it."""
    import tensorflow as tf

    from petdet_tasks.train_input import InputConfig, transform_example

    _, model, _ = exported
    fns = export_mod.ServingFunctions.__new__(export_mod.ServingFunctions)
    fns.tf, fns.size, fns.keep_aspect_ratio = tf, 96, True
    image = _images((1, 75, 130, 3), seed=5)
    x, denom = fns._letterbox(tf.constant(image), 75.0, 130.0)
    ref, _, _ = transform_example(tf.constant(image[0]), tf.zeros([0, 4]),
                                  tf.zeros([0], tf.int32), InputConfig(image_size=96))
    np.testing.assert_allclose(x.numpy()[0], ref.numpy(), atol=1e-3)
    # the normaliser: the letterboxed image's extent in model-input pixels
    np.testing.assert_allclose(denom.numpy()[0], [75 * 96 / 130, 96.0], rtol=1e-6)


def test_export_of_a_model_with_broken_weights_commits_nothing(trained, monkeypatch):
    real = export_mod._load_detector

    def nan_weights(preset):
        detector = real(preset)
        weights = detector.classification_head.get_weights()
        weights[0][...] = np.nan
        detector.classification_head.set_weights(weights)
        return detector

    monkeypatch.setattr(export_mod, "_load_detector", nan_weights)
    cfg = ExportConfig(iou_threshold=0.45)  # its own fingerprint
    with pytest.raises(ExportError, match="not finite"):
        export(trained.store, trained.training.uri, cfg, cache_dir=trained.work / "cache")
    _assert_nothing_committed(trained, cfg)


def test_an_export_that_disagrees_with_the_model_commits_nothing(trained, monkeypatch):
    def drifting(self, image_tensor):  # a frozen graph whose scores drift from the model's
        out = self.from_images(image_tensor)
        out["detection_scores"] = out["detection_scores"] * 0.99
        return {k: self.tf.identity(out[k], name=k) for k in OUTPUT_KEYS}

    monkeypatch.setattr(export_mod.ServingFunctions, "frozen_fn", drifting)
    cfg = ExportConfig(iou_threshold=0.4)
    with pytest.raises(ExportError, match="frozen_inference_graph.pb .* disagrees"):
        export(trained.store, trained.training.uri, cfg, cache_dir=trained.work / "cache")
    _assert_nothing_committed(trained, cfg)


def _assert_nothing_committed(trained, cfg):
    from petdet_tasks.layout import fingerprint

    fp = fingerprint("export", export_mod.SCHEMA_VERSION,
                     {"training": trained.training.fingerprint}, cfg.to_dict())
    assert read_manifest(trained.store, step_prefix("export", fp)) is None


def test_compare_detections_is_order_insensitive_and_catches_differences():
    ref = {"num_detections": np.array([2], np.float32),
           "detection_boxes": np.zeros((1, 100, 4), np.float32),
           "detection_scores": np.zeros((1, 100), np.float32),
           "detection_classes": np.zeros((1, 100), np.float32)}
    ref["detection_boxes"][0, :2] = [[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.6, 0.6]]
    ref["detection_scores"][0, :2] = [0.8, 0.8]
    ref["detection_classes"][0, :2] = [1, 2]
    swapped = {k: v.copy() for k, v in ref.items()}
    for k in ("detection_boxes", "detection_scores", "detection_classes"):
        swapped[k][0, :2] = swapped[k][0, :2][::-1]
    assert compare_detections(ref, swapped)["compared"] == 2
    moved = {k: v.copy() for k, v in ref.items()}
    moved["detection_boxes"][0, 1] += 0.3  # nothing of class 2 overlaps it: not an NMS flip
    with pytest.raises(ExportError, match="missing detection #2 class 2"):
        compare_detections(ref, moved)
    best = {k: v.copy() for k, v in ref.items()}
    best["detection_boxes"][0, 0, 0] += 0.01  # the best detection must always match
    with pytest.raises(ExportError, match="missing detection #1 class 1"):
        compare_detections(ref, best)
    # a detection suppressed by an overlapping same-class one in the other output is an NMS
    # flip: up to max(2, 5%) are tolerated, not more
    many = {k: v.copy() for k, v in ref.items()}
    many["num_detections"][0] = 20
    many["detection_scores"][0, :20] = np.linspace(0.9, 0.3, 20)
    many["detection_classes"][0, :20] = 1
    many["detection_boxes"][0, :20] = np.linspace(0.0, 0.5, 20)[:, None] + [0, 0, 0.4, 0.4]
    for flipped, ok in ((1, True), (2, True), (3, False)):
        other = {k: v.copy() for k, v in many.items()}
        other["detection_boxes"][0, 20 - flipped:20] += 0.05
        if ok:
            assert compare_detections(many, other)["nms_flips"] == 2 * flipped
        else:
            with pytest.raises(ExportError, match="more than the 2 NMS flips allowed"):
                compare_detections(many, other)
    # a sliver on the image's edge clips to nothing in one runtime (and is dropped there) and
    # to 1e-5 in the other: it may be missing, wherever it ranks; a box with area may not
    edge = {k: v.copy() for k, v in ref.items()}
    edge["num_detections"][0] = 3
    edge["detection_boxes"][0, 2] = [0.0, 0.0, 1.2e-5, 1.0]
    edge["detection_scores"][0, 2] = 0.9
    edge["detection_classes"][0, 2] = 7
    report = compare_detections(edge, ref)
    assert (report["compared"], report["edge_drops"]) == (2, 1)
    assert compare_detections(ref, edge)["edge_drops"] == 1
    assert compare_detections(edge, edge)["edge_drops"] == 0
    edge["detection_boxes"][0, 2, 2] = 2e-4  # 0.0002 high: the other runtime must have it
    with pytest.raises(ExportError, match="missing detection #3 class 7"):
        compare_detections(edge, ref)
    wrong_dtype = {**ref, "detection_scores": ref["detection_scores"].astype(np.float64)}
    with pytest.raises(ExportError, match="float32"):
        compare_detections(ref, wrong_dtype)


def test_evaluation_measures_the_served_model_and_is_cached(trained, exported, monkeypatch):
    result, _, labels = exported
    store = trained.store
    cache = trained.work / "cache"
    streamed = []
    upload = StepWriter.put_file

    def put_file(self, rel, path):  # detections.jsonl goes up from the step's scratch
        streamed.append((rel, Path(path), Path(path).is_file()))
        return upload(self, rel, path)

    monkeypatch.setattr(StepWriter, "put_file", put_file)
    ev = evaluate(store, result.uri, trained.records.uri, cache_dir=cache)
    assert not ev.cache_hit
    work = cache / "evaluate" / ev.fingerprint
    assert streamed == [("detections.jsonl", work / "detections.jsonl", True)]
    assert not work.exists(), "the scratch goes when the step ends"
    # what it read and wrote was held in the worker cache (worker_cache.in_use)
    for area, name in (("models", result.fingerprint), ("evaluate", ev.fingerprint),
                       ("tfrecords", trained.records.fingerprint)):
        assert (cache / ".locks" / area / f"{name}.lock").is_file(), (area, name)
    out = ev.outputs
    val = json.loads(store.read_text(step_prefix("tfrecords", trained.records.fingerprint)
                                     + "data_report.json"))
    assert out["images"] == val["splits"]["val"]["examples"]
    _, metrics = read_metrics(store, ev.uri)
    for k in ("mAP", "mAP@.5", "mAP@.75", "recall@100"):
        assert 0.0 <= metrics[k] <= 1.0, k
        assert out[k] == metrics[k]
    assert sorted(metrics["per_class"]) == sorted(labels.names)
    assert [metrics["per_class"][n]["id"] for n in labels.names] == list(labels.ids)
    assert metrics["model_uri"] == result.uri and metrics["split"] == "val"
    lines = store.read_text(step_prefix("evaluate", ev.fingerprint)
                            + "detections.jsonl").splitlines()
    assert len(lines) == out["images"]
    first = json.loads(lines[0])
    assert set(first) == {"image", "width", "height", "groundtruth", "detections", "outcome"}
    # what became of every ground-truth box, image by image and in all
    analysis = metrics["analysis"]
    outcomes = [o for line in lines for o in json.loads(line)["outcome"]]
    assert len(outcomes) == analysis["groundtruth_boxes"] == metrics["groundtruth_boxes"]
    for kind in ("correct", "confused", "missed"):
        assert analysis[kind] == sum(o["result"] == kind for o in outcomes), kind
    assert sum(n for row in analysis["confusion"].values() for n in row.values()) == len(
        outcomes)
    assert set(analysis["confusion"]) <= set(labels.names)
    again = evaluate(store, result.uri, trained.records.uri, cache_dir=trained.work / "cache")
    assert again.cache_hit and again.uri == ev.uri
    on_train = evaluate(store, result.uri, trained.records.uri, EvalConfig(split="train"),
                        cache_dir=trained.work / "cache")
    assert on_train.fingerprint != ev.fingerprint
    assert on_train.outputs["images"] == val["splits"]["train"]["examples"]
    from petdet_tasks.errors import ConfigError

    with pytest.raises(ConfigError, match="has no 'vall' shards: its splits are 'train', 'val'"):
        evaluate(store, result.uri, trained.records.uri, EvalConfig(split="vall"),
                 cache_dir=trained.work / "cache")


def test_promotion_after_evaluation_records_the_decision(trained, exported):
    result, _, _ = exported
    store = trained.store
    ev = evaluate(store, result.uri, trained.records.uri, cache_dir=trained.work / "cache")
    first = promote_evaluated(store, ev.uri, metric="mAP@.5", run_id="manual__1")
    # the step-command contract: uri (the registry pointer), fingerprint (the model), cache_hit
    assert first["uri"] == store.uri(PRODUCTION_POINTER) and not first["cache_hit"]
    assert first["fingerprint"] == result.fingerprint
    pointer, _ = read_production(store)
    assert first["promoted"] and pointer["model_uri"] == result.uri
    assert pointer["evaluation_uri"] == ev.uri and pointer["metric"] == "mAP@.5"
    decision_key = first["decision_uri"][len(store.root) + 1:]
    assert decision_key.startswith(step_prefix("evaluate", ev.fingerprint) + "promotions/")
    record = json.loads(store.read_text(decision_key))
    assert record["promoted"] and record["run_id"] == "manual__1"
    # a retry of the same promotion: still production, nothing rewritten
    _, etag = store.get_bytes(PRODUCTION_POINTER)
    second = promote_evaluated(store, ev.uri, metric="mAP@.5", run_id="manual__1")
    assert second["promoted"] and "already in production" in second["reason"]
    assert second["cache_hit"] and second["fingerprint"] == result.fingerprint
    assert store.get_bytes(PRODUCTION_POINTER)[1] == etag
    # the committed evaluation is untouched: its manifest still verifies
    assert read_manifest(store, step_prefix("evaluate", ev.fingerprint)) == ev.manifest


def test_cli_export_evaluate_promote(trained, exported):
    import subprocess
    import sys

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "petdet_tasks", *args, "--store",
                              trained.store.root], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    model = cli("export", "--training", trained.training.uri, "--cache-dir",
                str(trained.work / "cache"))
    assert model["uri"] == exported[0].uri and model["cache_hit"] is True
    ev = cli("evaluate", "--model", model["uri"], "--tfrecords", trained.records.uri,
             "--cache-dir", str(trained.work / "cache"))
    assert ev["step"] == "evaluate" and 0 <= ev["mAP"] <= 1
    decision = cli("promote", "--evaluation", ev["uri"], "--metric", "mAP@.5",
                   "--run-id", "cli-test")
    assert decision["promoted"] is True and decision["model_uri"] == model["uri"]
    bad = subprocess.run([sys.executable, "-m", "petdet_tasks", "promote", "--store",
                          trained.store.root, "--evaluation", ev["uri"], "--metric", "nope"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "nope" in bad.stderr  # 2: a retry would fail the same way
    on_train = cli("evaluate", "--model", model["uri"], "--tfrecords", trained.records.uri,
                   "--split", "train", "--cache-dir", str(trained.work / "cache"))
    refused = subprocess.run([sys.executable, "-m", "petdet_tasks", "promote", "--store",
                              trained.store.root, "--evaluation", on_train["uri"]],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "which models are fitted on" in refused.stderr


def test_the_model_is_named_by_the_weights_it_serves(trained, exported):
    """A forced retrain keeps its training fingerprint but has new weights: its export must land
    in a new prefix, not overwrite (possibly the production) model of the old weights."""
    import dataclasses

    from petdet_tasks.export import weights_digest

    result, _, _ = exported
    assert result.manifest["inputs"] == {"training": trained.training.fingerprint,
                                         "weights": weights_digest(trained.training)}
    files = dict(trained.training.manifest["files"])
    weights = "preset/model.weights.h5"
    assert weights in files
    files[weights] = {**files[weights], "sha256": "0" * 64}
    retrained = dataclasses.replace(trained.training,
                                    manifest={**trained.training.manifest, "files": files})
    assert weights_digest(retrained) != weights_digest(trained.training)
    # files outside preset/ (history, logs, checkpoints) do not name the model
    files = dict(trained.training.manifest["files"])
    files["history.jsonl"] = {**files["history.jsonl"], "sha256": "0" * 64}
    relogged = dataclasses.replace(trained.training,
                                   manifest={**trained.training.manifest, "files": files})
    assert weights_digest(relogged) == weights_digest(trained.training)


def test_forcing_the_production_model_to_rebuild_is_refused(trained, exported):
    """A forced export removes its output before rebuilding it: for the production model that
    is an outage, and a failed rebuild would leave production pointing at nothing."""
    result, _, _ = exported
    store = trained.store
    ev = evaluate(store, result.uri, trained.records.uri, cache_dir=trained.work / "cache")
    promote_evaluated(store, ev.uri, metric="mAP@.5", run_id="manual__force")
    assert read_production(store)[0]["model_uri"] == result.uri
    with pytest.raises(ExportError, match="refusing to force-rebuild .* production model"):
        export(store, trained.training.uri, cache_dir=trained.work / "cache", force=True)
    assert read_manifest(store, step_prefix("export", result.fingerprint)) == result.manifest


def test_promotion_compares_models_on_the_same_records_and_split(trained, exported):
    """The champion was promoted on one set of records; the candidate is evaluated on new ones
    (here: the same dataset in 3 shards, another fingerprint). Production is measured on the
    candidate's set before the numbers are compared, and that evaluation is an ordinary cached
    one (what the DAG's evaluate_production task finds)."""
    from petdet_tasks.evaluate import evaluate_production
    from petdet_tasks.tfrecords import TFRecordConfig, build

    champion, _, _ = exported
    store, cache = trained.store, trained.work / "cache"
    ev_a = evaluate(store, champion.uri, trained.records.uri, cache_dir=cache)
    promote_evaluated(store, ev_a.uri, metric="mAP@.5", run_id="manual__a")
    pointer, _ = read_production(store)
    assert pointer["model_fingerprint"] == champion.fingerprint
    records_2 = build(store, trained.dataset.uri, TFRecordConfig(
        num_shards=3, classes="present", max_quarantine_fraction=0.1), workers=1)
    assert records_2.fingerprint != trained.records.fingerprint
    candidate = export(store, trained.training.uri, ExportConfig(score_threshold=0.01),
                       cache_dir=cache)
    assert candidate.fingerprint != champion.fingerprint
    ev_b = evaluate(store, candidate.uri, records_2.uri, cache_dir=cache)

    decision = promote_evaluated(store, ev_b.uri, metric="mAP@.5", run_id="manual__b",
                                 cache_dir=cache)
    a_on_2 = evaluate(store, champion.uri, records_2.uri, cache_dir=cache)
    assert a_on_2.cache_hit, "promote evaluated production on the candidate's records"
    assert decision["production_evaluation"] == a_on_2.uri
    assert decision["production"] == read_metrics(store, a_on_2.uri)[1]["mAP@.5"]
    assert decision["evaluated_on"] == {"tfrecords": records_2.fingerprint, "split": "val"}
    assert f"measured again on the 'val' split of tfrecords/{records_2.fingerprint}" in (
        decision["reason"])
    now, _ = read_production(store)
    if decision["promoted"]:
        assert now["evaluated_on"] == decision["evaluated_on"]
        assert now["previous"]["evaluation_uri"] == a_on_2.uri
    else:
        assert now == pointer
    # the DAG's evaluate_production: production on these records, already there
    again = evaluate_production(store, records_2.uri, cache_dir=cache)
    assert again.cache_hit
    assert again.manifest["inputs"] == {"model": now["model_fingerprint"],
                                        "tfrecords": records_2.fingerprint}


def test_promotion_refuses_the_train_split_and_counts(trained, exported):
    """An audit promoted a model whose only merit was being scored on the images it was fitted
    on (train 0.0503 against production's val 0.0495; on val the two tied)."""
    from petdet_tasks.registry import RegistryError

    result, _, _ = exported
    store = trained.store
    on_train = evaluate(store, result.uri, trained.records.uri, EvalConfig(split="train"),
                        cache_dir=trained.work / "cache")
    before = store.get_bytes(PRODUCTION_POINTER) if read_production(store)[0] else None
    with pytest.raises(RegistryError, match="measured the 'train' split, which models are "
                                            "fitted on"):
        promote_evaluated(store, on_train.uri)
    ev = evaluate(store, result.uri, trained.records.uri, cache_dir=trained.work / "cache")
    for count in ("images", "detections", "groundtruth_boxes"):
        with pytest.raises(RegistryError, match=f"cannot promote on '{count}': promotion "
                                                "compares a quality metric"):
            promote_evaluated(store, ev.uri, metric=count)
    _, metrics = read_metrics(store, ev.uri)
    undefined = [k for k in ("mAP_small", "mAP_medium", "mAP_large") if metrics[k] is None]
    for k in undefined:  # tiny synthetic pets: no small boxes at least
        with pytest.raises(RegistryError, match=f"cannot promote on '{k}': it is undefined"):
            promote_evaluated(store, ev.uri, metric=k)
    assert (store.get_bytes(PRODUCTION_POINTER) if read_production(store)[0] else None) == before
