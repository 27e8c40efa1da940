"""TFLite export: under XNNPACK the model scores real photos like JAX; quantised ones rank like it.

Needs `tensorflow` (or `tensorflow-cpu`) for the converter and `ai-edge-litert` for the
interpreter; skipped without them. Uses a small student (pooled side 8, width 64) at a
mid-size 328x488 input, so that the first LDA's hidden activation (164x244x128) is above
`tflite.LDA_STRIP_ELEMENTS` and is exported in row bands (with overlapping windows: 164 and
244 are not multiples of 8) while the others are exported whole. Weights are non-trivial: every
parameter and BN statistic is drawn at random (the self-attention gammas are non-zero) and the
last layer is standardised so that the photos' scores spread over the sigmoid rather than
crowding at 0.5. The quantised exports (whose test is the ranking, not the banding) use the
smallest student (MobileNetV3-small 0.5, pooled side 6, width 16) at 96x144: each conversion
and its XNNPACK run cost a fraction of the mid-size model's.
"""

import csv
import json
import os

import numpy as np
import pytest

import data_fixtures
from support import IMAGENET_MEAN, IMAGENET_STD, REPO as ROOT, random_variables
from support import run_launcher, run_python

tf = pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from mobileiqa_jax.weights import checkpoint
from mobileiqa_jax import storage
from mobileiqa_jax.export import exporter
from mobileiqa_jax.export import runtime_scorer
from mobileiqa_jax.export import sidecar
from mobileiqa_jax.export import tflite
from mobileiqa_jax import metrics
from mobileiqa_jax.data import preprocess
from mobileiqa_jax.models import mobileiqa
from mobileiqa_jax.models import runtime

LIVEC = str(data_fixtures.LIVEC_JPG)
SIZE = (328, 488)
NUM_PHOTOS = 8
SMALL = dict(pooled_size=8, width=64)
SMALLEST = dict(backbone="mobilenetv3_small_050", pooled_size=6, width=16, regressor_pool=2)
SMALLEST_SIZE = (96, 144)
MOS_RANGE = [3.42, 92.43]


def _photos(size=SIZE):
  labels = os.path.join(LIVEC, "labels.csv")
  if not os.path.exists(labels):
    pytest.skip(f"no LIVEC subset at {LIVEC}")
  with open(labels) as f:
    rows = sorted(csv.DictReader(f), key=lambda r: float(r["mos"]))
  # Spread over the MOS range.
  pick = [rows[i] for i in np.linspace(0, len(rows) - 1, NUM_PHOTOS).astype(int)]
  out = []
  for r in pick:
    path = os.path.join(LIVEC, "Images", r["image_name"])
    with open(path, "rb") as f:
      out.append(preprocess.resize_normalize(preprocess.decode_rgb(f.read(), path), size))
  return np.stack(out)


def _student(tmp_path_factory, size, save=True, **overrides):
  """A random student whose scores spread over the photos, and (`save`) its checkpoint."""
  photos = _photos(size)
  config = mobileiqa.model_config("student", **overrides)
  model = mobileiqa.build_model(config, runtime.FOR_EXPORT)
  variables = random_variables(model, size)
  gammas = [v for p, v in jax.tree_util.tree_leaves_with_path(variables["params"])
            if str(getattr(p[-1], "key", "")) == "gamma"]
  assert gammas and all(np.all(g != 0) for g in gammas)

  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  scores = np.asarray(apply(variables, photos))
  # Standardise the last layer's logits over the photos: scores spread over the sigmoid.
  logits = np.log(scores) - np.log1p(-scores)
  mu, sd = logits.mean(), logits.std() + 1e-6
  fc = variables["params"]["fc_score"]["3"]
  fc["kernel"] = (fc["kernel"] / sd).astype(np.float32)
  fc["bias"] = ((fc["bias"] - mu) / sd).astype(np.float32)
  jax_scores = np.asarray(apply(variables, photos))
  assert jax_scores.std() > 0.1, jax_scores

  tmp = tmp_path_factory.mktemp("export")
  ckpt = None
  if save:
    ckpt = checkpoint.save_model(str(tmp / "ckpt"), variables, config.to_dict(),
                                 extra={"image_size": list(size), "mos_range": MOS_RANGE})
  return dict(photos=photos, model=model, variables=variables, jax_scores=jax_scores,
              config=config, ckpt=ckpt, tmp=tmp, size=size)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  return _student(tmp_path_factory, SIZE, **SMALL)


@pytest.fixture(scope="module")
def smallest(tmp_path_factory):
  return _student(tmp_path_factory, SMALLEST_SIZE, save=False, **SMALLEST)


@pytest.fixture(scope="module")
def float32_export(setup):
  out = str(setup["tmp"] / "student.tflite")
  # Exported in `runtime.FOR_EXPORT`'s form ('conv'), whatever form this host would score in.
  meta = exporter.export_checkpoint(setup["ckpt"], out, quantize="none")
  return out, meta


def test_float32_export_runs_under_xnnpack_and_matches_jax(setup, float32_export):
  out, meta = float32_export
  assert os.path.getsize(out) == meta["file_bytes"]
  assert not meta["requires_flex"], meta["ops"]
  assert not any(op.startswith("Flex") for op in meta["ops"])

  with open(sidecar.sidecar_path(out)) as f:
    side = json.load(f)
  assert side["input"]["shape"] == [1, *SIZE, 3]
  assert side["input"]["layout"] == "NHWC"
  np.testing.assert_allclose(side["input"]["mean"], IMAGENET_MEAN)
  np.testing.assert_allclose(side["input"]["std"], IMAGENET_STD)
  assert side["mos_mapping"]["range"] == MOS_RANGE
  assert side["quantization"] == "none"
  assert side["output"]["range"] == [0.0, 1.0]
  # Measured by running the written file in a fresh LiteRT process with XNNPACK.
  runtime = side["runtime"]
  assert runtime["delegate"] == "XNNPACK" and runtime["num_threads"] == 2
  assert 10 * 2**20 < runtime["expected_peak_rss_bytes"] < 4 * 2**30, runtime
  assert runtime["measured_invoke_ms"] > 0

  scorer = runtime_scorer.ExportedScorer(out, xnnpack=True)
  assert scorer.image_size == SIZE
  tfl = scorer(setup["photos"])
  err = np.abs(tfl - setup["jax_scores"])
  print("\nfloat32 (XNNPACK): max |tflite - jax| =", err.max(), "scores", np.round(tfl, 4))
  assert err.max() < 1e-3, (tfl, setup["jax_scores"])


_ELEMENTWISE = {"ADD", "SUB", "MUL", "DIV", "NEG", "ABS", "EXP", "SELECT", "SELECT_V2", "LESS",
                "GREATER", "MAXIMUM", "MINIMUM", "SQUARE", "RSQRT", "SQRT", "TANH", "LOGISTIC",
                "POW", "CAST", "SIGN", "FLOOR"}


def test_lda_hidden_activation_has_no_full_size_elementwise_chain(setup, float32_export):
  """The first LDA's (H/2, W/2, 2C) hidden activation: never whole, and GELU is one op.

  The erf expansion of an exact GELU written by the StableHLO legaliser is ~20 elementwise
  ops (MUL/ADD/DIV/EXP/SELECT...) per GELU, each writing a tensor the size of its input; that
  is what took XNNPACK past 13 GB at 1231x1907.
  """
  out, meta = float32_export
  assert meta["ops"].get("GELU", 0) >= 1 and "EXP" not in meta["ops"], meta["ops"]
  h1, w1 = -(-SIZE[0] // 2), -(-SIZE[1] // 2)
  hidden = 2 * SMALL["width"]
  it = tflite.make_interpreter(model_path=out, delegate=False)
  producer = {}
  for op in it._get_ops_details():  # pylint: disable=protected-access
    for t in op["outputs"]:
      producer[t] = op["op_name"]
  lda1 = [(tuple(int(s) for s in d["shape"]), producer[d["index"]])
          for d in it.get_tensor_details()
          if d["index"] in producer and len(d["shape"]) == 4
          and tuple(d["shape"][2:]) == (w1, hidden)]
  assert lda1, "no tensor of the first LDA's hidden activation found"
  assert all(shape[1] < h1 for shape, _ in lda1), [s for s in lda1 if s[0][1] >= h1]
  # Per window of rows: its projection (CONV_2D), its GELU and its mean (AVERAGE_POOL_2D).
  bad = [(shape, op) for shape, op in lda1 if op in _ELEMENTWISE]
  assert not bad, bad
  band = [(shape, op) for shape, op in lda1 if shape[1] > 1 and op != "CONCATENATION"]
  assert {op for _, op in band} == {"CONV_2D", "GELU"}, band
  assert len(band) == 2 * SMALL["pooled_size"], band


@pytest.mark.parametrize("banded", [False, True])
@pytest.mark.parametrize("shape", [(1, 37, 29, 6), (1, 16, 24, 5), (1, 5, 7, 3)])
def test_lda_tf_matches_the_model(monkeypatch, shape, banded):
  """The TF-ops LDA against the Flax LDA: overlapping windows, windows of repeated rows."""
  monkeypatch.setattr(tflite, "LDA_STRIP_ELEMENTS", 0 if banded else 2**40)
  lda = mobileiqa.LDA(width=4, pooled_size=8)
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  variables = lda.init(jax.random.PRNGKey(0), x)
  params = jax.tree_util.tree_map(
      lambda a: np.random.default_rng(a.size).standard_normal(a.shape).astype(np.float32),
      variables["params"])
  want = np.asarray(lda.apply({"params": params}, x))
  got = tflite._lda_tf(tf.constant(x), params, 8).numpy()  # pylint: disable=protected-access
  assert got.shape == want.shape == (1, 8, 8, 4)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize", [
    "float16", pytest.param("dynamic_int8", marks=pytest.mark.slow)])
def test_quantised_export_runs_under_xnnpack_and_ranks_like_float(smallest, quantize, request):
  out = str(smallest["tmp"] / f"student_{quantize}.tflite")
  if quantize == "float16":  # written into a gs:// bucket (conftest.bucket_servers' emulator)
    request.getfixturevalue("bucket_servers")
    out = "gs://mobileiqa-test/export/student_float16.tflite"
  meta = exporter.export(smallest["model"], smallest["variables"], out, SMALLEST_SIZE, quantize,
                       smallest["config"].to_dict(), {"mos_range": MOS_RANGE}, measure=False)
  assert meta["quantization"] == quantize and not meta["requires_flex"]
  assert storage.getsize(out) == meta["file_bytes"] and storage.exists(out + ".json")
  with storage.local_file(out, ".tflite") as local:
    tfl = runtime_scorer.ExportedScorer(local, xnnpack=True)(smallest["photos"])
  ref = smallest["jax_scores"]
  srocc = metrics.srocc(tfl, ref)
  print(f"\n{quantize} (XNNPACK): SROCC vs float {srocc:.4f}, max |diff| "
        f"{np.abs(tfl - ref).max():.4f}, {meta['file_bytes'] / 1e6:.2f} MB")
  assert np.all(np.isfinite(tfl)) and np.all((tfl >= 0) & (tfl <= 1))
  assert srocc >= 0.95


@pytest.mark.parametrize("size", ["16,128", "0,64", "-32,64", "64.5,64", "64", "64,64,3",
                                  "big,64"])
def test_bad_image_size_is_a_clear_error(setup, size):
  with pytest.raises(ValueError, match=r"--image_size must be HEIGHT,WIDTH"):
    exporter.export_checkpoint(setup["ckpt"], str(setup["tmp"] / "bad.tflite"),
                               image_size=size)
  assert not os.path.exists(setup["tmp"] / "bad.tflite")


def test_bad_settings_direct_api():
  with pytest.raises(ValueError, match="image_size"):
    tflite.to_tflite(None, None, (31, 64))
  with pytest.raises(ValueError, match="--quantize"):
    exporter.check_quantize("int4")


def test_launcher_reports_bad_image_size(tmp_path):
  proc = run_python(["launch/export.py", f"--checkpoint={tmp_path}",
                     f"--output={tmp_path / 'm.tflite'}", "--image_size=20,20"], timeout=120)
  assert proc.returncode != 0
  assert "--image_size must be HEIGHT,WIDTH" in proc.stderr and "20" in proc.stderr


@pytest.mark.slow
def test_full_student_at_paper_resolution_fits_a_phone(tmp_path):
  """The full student at 1231x1907 under XNNPACK: <= 1.5 GB peak RSS, JAX's score on a photo.

  Peak RSS is the sidecar's `runtime`, measured by `runtime_scorer.probe` in a fresh LiteRT
  process.
  Needs ~5 GB for the conversion.
  """
  size = (1231, 1907)
  labels = os.path.join(LIVEC, "labels.csv")
  if not os.path.exists(labels):
    pytest.skip(f"no LIVEC subset at {LIVEC}")
  with open(labels) as f:
    name = next(csv.DictReader(f))["image_name"]
  path = os.path.join(LIVEC, "Images", name)
  with open(path, "rb") as f:
    photo = preprocess.resize_normalize(preprocess.decode_rgb(f.read(), path), size)
  model = mobileiqa.mobileiqa_student(runtime.FOR_EXPORT)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.float32)))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(
      lambda a: (rng.uniform(0.5, 1.5, a.shape) if a.ndim == 1 and a.shape[0] > 1
                 else 0.05 * rng.standard_normal(a.shape)).astype(np.float32), abstract)
  jax_score = float(np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, photo[None]))[0])
  out = str(tmp_path / "student.tflite")
  meta = exporter.export(model, variables, out, size, "none",
                         mobileiqa.model_config("student").to_dict())
  rss = meta["runtime"]["expected_peak_rss_bytes"]
  print(f"\n1231x1907 XNNPACK: peak RSS {rss / 2**30:.2f} GB, "
        f"{meta['runtime']['measured_invoke_ms']:.0f} ms")
  assert rss <= 1.5 * 2**30, meta["runtime"]
  tfl = runtime_scorer.ExportedScorer(out, xnnpack=True)(photo)
  assert abs(float(tfl[0]) - jax_score) < 1e-3, (tfl, jax_score)


# ----------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def onnx_export(setup):
  """The mid-size banded student exported once to ONNX (jax2onnx), measured in ONNX Runtime."""
  pytest.importorskip("onnxruntime")
  pytest.importorskip("onnx")
  pytest.importorskip("jax2onnx")
  out = str(setup["tmp"] / "student.onnx")
  meta = exporter.export_checkpoint(setup["ckpt"], out, fmt="onnx")
  return out, meta


def test_onnx_export_matches_jax_on_photos_with_a_dynamic_batch(setup, onnx_export):
  from mobileiqa_jax.export import onnx  # pylint: disable=g-import-not-at-top
  out, meta = onnx_export
  assert os.path.getsize(out) == meta["file_bytes"]
  with open(sidecar.sidecar_path(out)) as f:
    side = json.load(f)
  assert side["format"] == sidecar.ONNX_SIDECAR_FORMAT and side["model_file"] == "student.onnx"
  assert side["input"]["shape"] == ["batch", *SIZE, 3] and side["input"]["dynamic_batch"]
  assert side["output"]["shape"] == ["batch"]
  assert side["mos_mapping"]["range"] == MOS_RANGE and side["quantization"] == "none"
  assert side["exported_with"]["opset"] == onnx.OPSET
  assert side["ops"].get("Loop", 0) >= 1 and side["ops"].get("Gelu", 0) >= 1, side["ops"]
  runtime = side["runtime"]  # measured in a fresh onnxruntime process
  assert runtime["execution_provider"] == "CPUExecutionProvider"
  assert 10 * 2**20 < runtime["expected_peak_rss_bytes"] < 4 * 2**30, runtime
  assert runtime["measured_invoke_ms"] > 0

  scorer = runtime_scorer.ExportedScorer(out)
  assert scorer.image_size == SIZE and scorer.input_shape[0] == "batch"
  photos, want = setup["photos"], setup["jax_scores"]
  got = scorer(photos)  # all 8 photos in one run
  err = np.abs(got - want)
  print("\nONNX Runtime (CPU): max |onnx - jax| =", err.max(), "scores", np.round(got, 4))
  assert err.max() < 1e-5, (got, want)
  # Batches of 1 and 3 give the same scores as the batch of 8.
  np.testing.assert_allclose(runtime_scorer.ExportedScorer(out, batch_size=3)(photos), got,
                             rtol=0, atol=1e-6)
  np.testing.assert_allclose(scorer(photos[:1]), got[:1], rtol=0, atol=1e-6)


def test_onnx_lda_hidden_activation_is_never_whole(setup, onnx_export, tmp_path):
  """The first LDA's (H/2, W/2, 2C) hidden activation, in the shapes ONNX Runtime ran.

  Read from ONNX Runtime's profile of one run (every node's output shape, Loop bodies
  included): the projection, bias and GELU exist only per pooled row band (a Loop
  iteration), each fewer rows than H/2; no tensor of the full (H/2, W/2, 2C) is produced.
  """
  from mobileiqa_jax.export import onnx  # pylint: disable=g-import-not-at-top
  out, _ = onnx_export
  h1, w1 = -(-SIZE[0] // 2), -(-SIZE[1] // 2)
  hidden = 2 * SMALL["width"]
  session = onnx.make_session(out, enable_profiling=True,
                              profile_prefix=str(tmp_path / "ort"))
  session.run(None, {"image": setup["photos"][:2]})
  with open(session.end_profiling()) as f:
    events = json.load(f)
  lda1 = []
  for e in events:
    if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
      continue
    for o in e["args"].get("output_type_shape", []):
      for shape in o.values():
        if len(shape) == 4 and tuple(shape[2:]) == (w1, hidden):
          lda1.append((tuple(shape), e["args"]["op_name"]))
  assert lda1, "no tensor of the first LDA's hidden activation found"
  assert all(shape[1] < h1 for shape, _ in lda1), [s for s in lda1 if s[0][1] >= h1]
  gelus = [shape for shape, op in lda1 if op == "Gelu"]
  # One GELU per pooled row band, on that band's rows (windows overlap: 164 is not 8 * k).
  assert len(gelus) == SMALL["pooled_size"], lda1
  assert all(1 < shape[1] <= -(-h1 // SMALL["pooled_size"]) + 1 for shape in gelus), gelus


def test_onnx_settings_are_clear_errors(setup):
  with pytest.raises(ValueError, match=r"--quantize=float16 applies to --format=tflite"):
    exporter.export_checkpoint(setup["ckpt"], str(setup["tmp"] / "q.onnx"),
                               quantize="float16", fmt="onnx")
  with pytest.raises(ValueError, match=r"--output must name a \.onnx file"):
    exporter.export_checkpoint(setup["ckpt"], str(setup["tmp"] / "m.tflite"), fmt="onnx")
  with pytest.raises(ValueError, match=r"--format must be one of tflite, onnx"):
    exporter.check_format("coreml", "m.mlmodel")


def test_launcher_reports_onnx_settings_in_one_line(tmp_path):
  proc = run_launcher("launch/export.py", [f"--checkpoint={tmp_path}", "--format=onnx",
                                           f"--output={tmp_path / 'm.onnx'}",
                                           "--quantize=dynamic_int8"])
  assert proc.returncode == 1, proc.stderr
  assert proc.stderr.count("\n") == 1 and "applies to --format=tflite only" in proc.stderr


# ----------------------------------------------------------------------------- sidecars


def test_each_export_keeps_its_own_sidecar(float32_export, onnx_export):
  """student.tflite and student.onnx in one folder: two sidecars, neither replacing the other."""
  for (out, _), fmt in ((float32_export, "tflite"), (onnx_export, "onnx")):
    path = sidecar.sidecar_path(out)
    assert path == out + ".json"
    with open(path) as f:
      side = json.load(f)
    assert side["format"] == sidecar.SIDECAR_FORMATS[fmt], (path, side["format"])
    assert side["model_file"] == os.path.basename(out)
    assert runtime_scorer.ExportedScorer(out).format == fmt
  assert not os.path.exists(os.path.join(os.path.dirname(float32_export[0]), "student.json"))


def _contents(path):
  with open(path, "rb") as f:
    return f.read()


def test_export_refuses_to_replace_a_model_without_overwrite(setup, float32_export):
  out, _ = float32_export
  before = _contents(out), _contents(sidecar.sidecar_path(out))
  proc = run_launcher("launch/export.py", [f"--checkpoint={setup['ckpt']}", f"--output={out}"])
  assert proc.returncode == 1, proc.stderr
  assert proc.stderr.count("\n") == 1, proc.stderr
  assert out in proc.stderr and "pass --overwrite" in proc.stderr, proc.stderr
  assert (_contents(out), _contents(sidecar.sidecar_path(out))) == before


def test_export_refuses_to_replace_a_sidecar_without_overwrite(setup, tmp_path):
  out = str(tmp_path / "m.tflite")
  side = sidecar.sidecar_path(out)
  with open(side, "w") as f:
    f.write("{}\n")
  with pytest.raises(FileExistsError, match=r"m\.tflite\.json .*pass --overwrite"):
    exporter.export_checkpoint(setup["ckpt"], out)
  assert not os.path.exists(out) and _contents(side) == b"{}\n"
  exporter.check_overwrite(out, overwrite=True)  # asked to: nothing refused


def test_model_format_from_sidecar_or_extension(tmp_path):
  assert sidecar.model_format("a/m.tflite") == "tflite"
  assert sidecar.model_format("a/m.onnx") == "onnx"
  assert sidecar.model_format("m.bin", {"format": sidecar.ONNX_SIDECAR_FORMAT}) == "onnx"
  with pytest.raises(ValueError, match=r"m\.bin is not a \.tflite or \.onnx file"):
    sidecar.model_format(str(tmp_path / "m.bin"))

