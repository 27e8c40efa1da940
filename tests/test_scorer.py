"""`mobileiqa_jax.load` and `launch/predict.py`: one scorer for checkpoints and the authors' .pkl.

The authors' .pkl cannot be downloaded here; the test writes one the converter's way back
(Flax variables -> PyTorch state dict -> torch.save) from random weights of a small student.
Photos: LIVE Challenge JPEGs from ../shared/data/livec_jpg (see its README for the terms).
"""

from __future__ import annotations

import csv
import json
import io
import os
import re
import jax
import numpy as np
import pytest

import data_fixtures
from PIL import Image

import mobileiqa_jax
from mobileiqa_jax.weights import checkpoint
from mobileiqa_jax.weights import convert
from mobileiqa_jax.scoring import scorer as scorer_lib
from mobileiqa_jax.data import preprocess
from mobileiqa_jax.models import mobileiqa
from mobileiqa_jax.models import runtime
from support import random_variables, run_launcher, run_python

LIVEC = data_fixtures.LIVEC_IMAGES
PHOTOS = [os.path.join(LIVEC, f"{n}.JPG") for n in (1000, 1001, 1002)]  # 500x500 each
SIZE = (64, 64)
MOS_RANGE = [0.0, 100.0]
# Small head (the key names and the loader do not depend on its size); the authors' backbone.
SMALL = dict(pooled_size=8, width=32)


def _csv_scores(stdout):
  rows = list(csv.reader(io.StringIO(stdout)))
  assert rows[0] == ["path", "score"]
  return {r[0]: float(r[1]) for r in rows[1:]}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """A small random student as an orbax checkpoint and as the authors' kind of .pkl."""
  torch = pytest.importorskip("torch")
  # Grouped-conv depthwise: XLA:CPU compiles it several times faster than the shifted form,
  # which the .pkl scorer (the default form) still compiles and matches.
  config = mobileiqa.model_config("student", **SMALL)
  model = mobileiqa.build_model(config, runtime.Runtime(depthwise_impl="conv"))
  variables = random_variables(model)
  # Spread the scores over the sigmoid: standardise the last layer's logits over the photos.
  s = scorer_lib.Scorer(model, variables, SIZE, config.to_dict()).score(PHOTOS)
  logits = np.log(s) - np.log1p(-s)
  fc = variables["params"]["fc_score"]["3"]
  fc["kernel"] = (fc["kernel"] / (logits.std() + 1e-6)).astype(np.float32)
  fc["bias"] = ((fc["bias"] - logits.mean()) / (logits.std() + 1e-6)).astype(np.float32)

  tmp = tmp_path_factory.mktemp("scorer")
  # Stored as a bfloat16 + remat run would have described it: the loader must still score in
  # float32 (issue 11: a checkpoint records the architecture, not how it was trained).
  trained_as = dict(config.to_dict(), dtype="bfloat16", backbone_kwargs={"remat": True})
  ckpt = checkpoint.save_model(str(tmp / "ckpt"), variables, trained_as,
                               extra={"image_size": list(SIZE), "mos_range": MOS_RANGE})
  pkl = str(tmp / "MobileNet_IQA.pkl")
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v))
              for k, v in convert.flax_to_torch(variables).items()}, pkl)
  # The reference preprocessing, spelled out: PIL decode, bicubic resize, ImageNet stats.
  images = np.stack([preprocess.resize_normalize(
      preprocess.decode_rgb(open(p, "rb").read(), p), SIZE) for p in PHOTOS])
  reference = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, images))
  return dict(ckpt=ckpt, pkl=pkl, tmp=tmp, reference=reference, variables=variables,
              scorer=mobileiqa_jax.load(ckpt))


def test_load_scores_paths_pil_and_arrays_alike(models):
  scorer = models["scorer"]
  by_path = scorer.score(PHOTOS)
  assert by_path.dtype == np.float32 and by_path.shape == (3,)
  assert by_path.std() > 0.05, by_path  # the photos get different scores
  np.testing.assert_allclose(by_path, models["reference"], rtol=1e-5, atol=1e-6)
  pil = [Image.open(p) for p in PHOTOS]
  array = np.stack([np.asarray(im.convert("RGB")) for im in pil])
  np.testing.assert_array_equal(scorer.score(pil), by_path)
  np.testing.assert_array_equal(scorer.score(array), by_path)
  np.testing.assert_array_equal(scorer.score(list(array)), by_path)
  # Input order is kept; batches of 2 (the last padded) give the same numbers.
  np.testing.assert_allclose(scorer.score(PHOTOS[::-1], batch_size=2), by_path[::-1],
                             rtol=1e-6, atol=1e-7)
  # One copy of the weights once scoring has started: the device's (no host numpy tree kept).
  leaves = jax.tree.leaves(scorer.variables)
  assert leaves and all(isinstance(x, jax.Array) for x in leaves)


def test_scoring_folds_the_attention_from_a_few_photos(models):
  # `models["scorer"]` (load's default) scores as the reference model in the test above.
  block = lambda s: set(s.variables["params"]["MALs"]["0"]["feature_attention"])  # noqa: E731
  assert block(models["scorer"]) == {"c_qk", "c_v"} and models["scorer"].model.attention == "folded"
  as_stored = mobileiqa_jax.load(models["ckpt"], attention="reference")
  assert block(as_stored) == {"c_q", "c_k", "c_v"} and as_stored.model.attention == "reference"
  # One photo does not pay for the fold; a folder does (the command and --distributed ask).
  assert scorer_lib.attention_for(1) == "reference"
  assert scorer_lib.attention_for(scorer_lib.FOLD_MIN_PHOTOS - 1) == "reference"
  assert scorer_lib.attention_for(scorer_lib.FOLD_MIN_PHOTOS) == "folded"


def test_views_one_photo_at_a_time_score_as_the_whole_batch(models):
  # On CPU the Scorer runs the backbone and LDAs per photo and the MALs on the batch; the
  # scores above (reference: one plain apply) already cover its default. Here both forms on
  # one batch, and who chooses which.
  scorer = models["scorer"]
  images = np.stack([preprocess.resize_normalize(
      preprocess.decode_rgb(open(p, "rb").read(), p), SIZE) for p in PHOTOS])
  per_photo, whole = (np.asarray(jax.jit(
      lambda v, x, each=each: scorer_lib.apply_for_scoring(scorer.model, v, x, each))(
          scorer.variables, images)) for each in (True, False))
  np.testing.assert_allclose(per_photo, whole, rtol=0, atol=1e-6)
  np.testing.assert_allclose(whole, models["reference"], rtol=1e-5, atol=1e-6)
  assert scorer.views_per_photo and scorer_lib.default_views_per_photo("cpu")
  assert not scorer_lib.default_views_per_photo("gpu")
  assert not scorer_lib.default_views_per_photo("tpu")


def test_scorer_attributes_and_mos_mapping(models):
  scorer = models["scorer"]
  assert scorer.image_size == SIZE
  assert scorer.model_config["variant"] == "student"
  assert scorer.model_config["width"] == 32 and scorer.model_config["pooled_size"] == 8
  assert (scorer.score_min, scorer.score_max, scorer.higher_is_better) == (0.0, 1.0, True)
  # The default batch follows the platform: 2 on CPU (as fast as 8 there, 0.6 GB less at
  # 512x512), 8 on an accelerator.
  assert scorer.batch_size == 2 == scorer_lib.default_batch_size("cpu")
  assert scorer_lib.default_batch_size("gpu") == 8
  assert scorer_lib.default_batch_size("tpu") == 8
  # The teacher on large photos too (it scored one at a time before its views ran per photo
  # on CPU); the Scorer decides from its backend alone (nothing compiles here).
  big = (1231, 1907)
  assert scorer_lib.Scorer(scorer.model, scorer.variables, big,
                          dict(scorer.model_config, variant="teacher")).batch_size == 2
  s = np.array([0.0, 0.25, 1.0], np.float32)
  np.testing.assert_allclose(scorer.to_mos(s), [0.0, 25.0, 100.0], rtol=1e-6)
  # Trained as bfloat16 + remat, stored as architecture + training settings, scored in float32.
  meta = checkpoint.read_json_item(models["ckpt"], "meta")
  assert "dtype" not in meta["model_config"]
  assert "remat" not in meta["model_config"]["backbone_kwargs"]
  assert meta["training"] == {"compute_dtype": "bfloat16", "remat": True,
                                "head_init": "torch"}
  assert scorer.model.dtype == np.float32 and "dtype" not in scorer.model_config
  assert mobileiqa_jax.load(models["ckpt"], compute_dtype="bfloat16").model.dtype == "bfloat16"


def test_load_state_dict_detects_the_student_and_converts_in_memory(models):
  assert mobileiqa_jax.load(models["pkl"]).image_size == (1231, 1907)  # the authors' size
  scorer = mobileiqa_jax.load(models["pkl"], image_size=SIZE)
  assert scorer.model_config["variant"] == "student"
  assert (scorer.model_config["width"], scorer.model_config["pooled_size"]) == (32, 8)
  assert scorer.model_config["backbone"] == "mobilenetv3_large_100"
  np.testing.assert_allclose(scorer.score(PHOTOS), models["reference"], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="no MOS scale"):
    scorer.to_mos([0.5])
  with pytest.raises(convert.ConversionError, match="not the teacher"):
    mobileiqa_jax.load(models["pkl"], model="teacher")


def test_a_truncated_state_dict_is_a_strict_error(models):
  torch = pytest.importorskip("torch")
  state = torch.load(models["pkl"], weights_only=True)
  del state["LDA3.cnn2.bias"]
  path = str(models["tmp"] / "broken.pkl")
  torch.save(state, path)
  with pytest.raises(convert.ConversionError, match=r"missing: LDA3\.cnn2\.bias"):
    mobileiqa_jax.load(path)


def test_detect_model_from_keys():
  assert convert.detect_model({"global_vit.stem.conv.weight": 0, "LGF1.cnn1.weight": 0}) == (
      "teacher")
  assert convert.detect_model({"local_cnn.conv_stem.weight": 0}) == "student"
  with pytest.raises(convert.ConversionError, match="neither"):
    convert.detect_model({"fc.weight": 0})


def test_unreadable_photo_speaks_of_scoring(models, tmp_path):
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(open(PHOTOS[0], "rb").read()[:200])
  with pytest.raises(scorer_lib.UnreadableImageError) as err:
    models["scorer"].score([PHOTOS[0], str(bad)])
  assert str(bad) in str(err.value) and "cannot be scored" in str(err.value)
  assert "label file" not in str(err.value)


def test_predict_cli_gives_load_scores_for_checkpoint_and_pkl(models, tmp_path):
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(open(PHOTOS[0], "rb").read()[:200])
  expected = models["scorer"].score(PHOTOS)
  # The checkpoint through a real process (exit status, stderr free of library logs), the
  # .pkl through the command's main in this process.
  for ckpt, extra, in_process in ((models["ckpt"], [], False),
                                  (models["pkl"], ["--image_size=64,64"], True)):
    args = [f"--checkpoint={ckpt}", "--batch_size=3", *extra, *PHOTOS, str(bad)]
    proc = (run_launcher("launch/predict.py", args) if in_process
            else run_python(["launch/predict.py", *args]))
    assert proc.returncode == 1, proc.stderr[-3000:]  # one unreadable file
    scores = _csv_scores(proc.stdout)
    assert list(scores) == PHOTOS
    np.testing.assert_allclose([scores[p] for p in PHOTOS], expected, atol=2e-6)
    assert f"{bad} cannot be scored" in proc.stderr and "label file" not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not re.search(r"^I\d{4} ", proc.stderr, re.M), proc.stderr  # no absl INFO lines


@pytest.mark.slow  # test_buckets runs explain too (into gs://)
def test_explain_writes_opinion_maps_and_similarities(models, tmp_path):
  out = tmp_path / "explain"
  # The command's main in this process (test_cli_errors starts it as a process).
  proc = run_launcher("launch/explain.py", [f"--checkpoint={models['ckpt']}", f"--output={out}",
                                            *PHOTOS[:2]])
  assert proc.returncode == 0, proc.stderr[-3000:]
  pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
  assert pngs == ["0000_1000.png", "0001_1001.png", "similarity_mean.png"]
  for p in pngs:
    with Image.open(out / p) as im:
      assert im.format == "PNG" and min(im.size) > 100
  with open(out / "similarity.json") as f:
    got = json.load(f)

  # Independently: the opinion features straight from the model, cosine by hand.
  model = models["scorer"].model.clone(attention="reference")  # the stored variables' form
  variables = models["variables"]
  images = np.stack([preprocess.resize_normalize(
      preprocess.decode_rgb(open(p, "rb").read(), p), SIZE) for p in PHOTOS[:2]])
  _, dof, score = jax.jit(lambda v, x: model.apply(v, x, return_features=True))(
      variables, images)
  dof = np.asarray(dof, np.float64)  # (M, B, S, S, C)
  sims = []
  for b in range(2):
    m = dof.shape[0]
    sim = np.empty((m, m))
    for i in range(m):
      for j in range(m):
        a, c = dof[i, b].ravel(), dof[j, b].ravel()
        sim[i, j] = a @ c / np.sqrt((a @ a) * (c @ c))
    sims.append(sim)
    mat = np.asarray(got["images"][b]["similarity"])
    assert mat.shape == (3, 3)
    np.testing.assert_allclose(mat, mat.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(mat), 1.0, atol=1e-6)
    np.testing.assert_allclose(mat, sim, atol=1e-5)
    assert abs(got["images"][b]["score"] - float(score[b])) < 1e-5
  np.testing.assert_allclose(got["mean_similarity"], np.mean(sims, axis=0), atol=1e-5)


@pytest.mark.slow
def test_evaluate_and_export_take_the_pkl_as_load_does(models, tmp_path):
  """launch/evaluate.py and launch/export.py accept the .pkl; both compute in float32."""
  pytest.importorskip("tensorflow")
  from configs import student  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.scoring import evaluate  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.export import exporter  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.export import runtime_scorer  # pylint: disable=g-import-not-at-top
  config = student.get_config("demo")
  config.data.eval_batch_size = 16
  by_pkl = evaluate.evaluate_checkpoint(models["pkl"], config, "test",
                                        str(tmp_path / "eval_pkl"))
  by_ckpt = evaluate.evaluate_checkpoint(models["ckpt"], config, "test",
                                         str(tmp_path / "eval_ckpt"))
  assert by_pkl["num_examples"] == by_ckpt["num_examples"] > 0
  for k in ("srocc", "plcc", "rmse"):
    assert by_pkl[k] == pytest.approx(by_ckpt[k], abs=1e-6), k

  out = str(tmp_path / "student.tflite")
  exporter.export_checkpoint(models["pkl"], out, image_size="64,64")
  tflite = runtime_scorer.ExportedScorer(out)
  np.testing.assert_allclose([tflite.score_file(p) for p in PHOTOS], models["reference"],
                             atol=1e-4)
