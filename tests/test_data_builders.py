"""The tfds builders on generated replicas of each release, on real LIVEC photos, and on bad input.

Preparing writes records with TensorFlow (CPU); these tests skip where it is missing.
"""

from __future__ import annotations

import csv
import io
import math
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

import data_fixtures
import support

tf = pytest.importorskip("tensorflow")

from mobileiqa_jax.data import datasets  # pylint: disable=g-import-not-at-top
from mobileiqa_jax.data import releases  # pylint: disable=g-import-not-at-top
from mobileiqa_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from mobileiqa_jax.data import preprocess  # pylint: disable=g-import-not-at-top


def _read_all(directory: pathlib.Path) -> dict[str, list[dict]]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  b = tfds.builder_from_directory(str(directory))
  return {str(s): [ds[i] for i in range(len(ds))] for s, ds in b.as_data_source().items()}


def _prepare(name, tmp_path, **kwargs):
  manual = tmp_path / "manual" / name
  manual.mkdir(parents=True)
  expected = data_fixtures.MAKERS[name](manual)
  directory = datasets.prepare(name, manual_dir=manual, data_dir=tmp_path / "tfds", **kwargs)
  return manual, expected, directory


_OFFICIAL = {
    "uhd_iqa": {"train": 6, "validation": 2, "test": 2},
    "koniq10k": {"train": 6, "validation": 2, "test": 3},
}
_SCALES = {"uhd_iqa": (0, 1), "koniq10k": (1, 100), "spaq": (0, 100), "livec": (0, 100),
           "bid": (0, 5), "kadid10k": (1, 5)}


@pytest.mark.parametrize("name", sorted(_SCALES))
def test_builder_on_replica(name, tmp_path):
  manual, expected, directory = _prepare(name, tmp_path)
  records = _read_all(directory)
  meta = pipeline.tfds_source(name, "train", data_dir=tmp_path / "tfds").metadata

  # Counts and splits.
  counts = {s: len(r) for s, r in records.items()}
  assert sum(counts.values()) == len(expected)
  if name in _OFFICIAL:
    assert counts == _OFFICIAL[name]
    assert meta["split_kind"] == "official"
  else:
    assert set(counts) == {"train", "test"}
    n_groups = len({g for *_, g in expected.values()})
    n_train_groups = len({r["group"] for r in records["train"]})
    assert n_train_groups == round(0.8 * n_groups)
    assert meta["split_kind"] == "seeded"

  lo, hi = _SCALES[name]
  assert meta["mos_scale"] == {"low": lo, "high": hi, "source": "documented"}
  for split, recs in records.items():
    for r in recs:
      n = r["image_name"].decode()
      mos, std, exp_split, group = expected[n]
      # Labels as released (float32) and normalised by the documented scale.
      assert r["mos"] == pytest.approx(mos, rel=1e-6)
      assert (math.isnan(r["mos_std"]) and math.isnan(std)) or r["mos_std"] == pytest.approx(std, rel=1e-6)
      assert r["mos_norm"] == pytest.approx((mos - lo) / (hi - lo), rel=1e-5)
      assert r["group"].decode() == group
      if exp_split:
        assert split == exp_split
      # The original bytes, exactly.
      path = next(manual.rglob(pathlib.Path(n).name))
      assert r["image"] == path.read_bytes()
      w, h = Image.open(path).size
      assert (r["width"], r["height"]) == (w, h)
    # Metadata groups line up with the records (the re-split relies on it).
    assert meta["groups"][split] == [r["group"].decode() for r in recs]

  # The label file's row order survives the split (the reference split numbers those rows).
  assert [records[s][i]["image_name"].decode() for s, i in meta["label_file_order"]] == list(expected)

  if name == "kadid10k":  # no reference image on both sides
    tr = {r["group"] for r in records["train"]}
    te = {r["group"] for r in records["test"]}
    assert not tr & te
  if name == "livec":  # the 7 rater-training images are excluded
    assert not any(r["image_name"].startswith(b"t") for rs in records.values() for r in rs)


def test_prepare_twice_is_a_noop(tmp_path):
  manual, _, directory = _prepare("bid", tmp_path)
  stamp = (directory / "dataset_info.json").stat().st_mtime_ns
  shutil.rmtree(manual)  # would fail if it looked at the download again
  assert datasets.prepare("bid", manual_dir=manual, data_dir=tmp_path / "tfds") == directory
  assert (directory / "dataset_info.json").stat().st_mtime_ns == stamp


def test_uhd_iqa_challenge_layout_without_test_labels(tmp_path):
  manual = tmp_path / "uhd"
  manual.mkdir()
  for s, n in (("training", 3), ("validation", 2), ("test", 2)):
    with open(manual / f"uhd-iqa-{s}-metadata.csv", "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["image_name", "quality_mos"] if s != "test" else ["image_name"])
      for i in range(n):
        name = f"{s}_{i}.jpg"
        (manual / "challenge" / s).mkdir(parents=True, exist_ok=True)
        (manual / "challenge" / s / name).write_bytes(data_fixtures.image_bytes(i))
        w.writerow([name, 0.5] if s != "test" else [name])
  d = datasets.prepare("uhd_iqa", manual_dir=manual, data_dir=tmp_path / "tfds")
  assert {s: len(r) for s, r in _read_all(d).items()} == {"train": 3, "validation": 2}


def test_missing_download_lists_what_and_where(tmp_path):
  with pytest.raises(releases.MissingDataError) as e:
    datasets.prepare("livec", manual_dir=tmp_path / "nowhere", data_dir=tmp_path / "tfds")
  msg = str(e.value)
  assert "nowhere" in msg and "AllMOS_release.mat" in msg and "prepare_data.py --dataset=livec" in msg

  manual = tmp_path / "koniq"
  manual.mkdir()
  data_fixtures.make_koniq10k(manual)
  first = sorted((manual / "1024x768").iterdir())[0]
  first.unlink()
  with pytest.raises(releases.MissingDataError) as e:
    datasets.prepare("koniq10k", manual_dir=manual, data_dir=tmp_path / "tfds")
  assert first.name in str(e.value) and "1024x768" in str(e.value)
  assert "1 of 11 images" in str(e.value)

  (manual / "koniq10k_distributions_sets.csv").unlink()
  with pytest.raises(releases.MissingDataError, match="koniq10k_distributions_sets.csv"):
    datasets.prepare("koniq10k", manual_dir=manual, data_dir=tmp_path / "tfds")


def _cmyk_jpeg():
  return data_fixtures.image_bytes(1, mode="CMYK", fmt="JPEG")


_BAD = {
    "truncated.jpg": (lambda: data_fixtures.image_bytes(5, (64, 64))[:300], "truncated"),
    "empty.jpg": (lambda: b"", "empty"),
    "text.jpg": (lambda: b"image_name,mos\nthis is not an image\n", "not a recognised image"),
}


@pytest.mark.parametrize("bad", sorted(_BAD))
def test_corrupt_image_is_an_error_naming_it(bad, tmp_path):
  manual = tmp_path / "folder"
  manual.mkdir()
  data_fixtures.make_folder(manual)
  make, reason = _BAD[bad]
  (manual / "images" / bad).write_bytes(make())
  with open(manual / "labels.csv", "a", newline="") as f:
    csv.writer(f).writerow([bad, 3.0, 0.1])
  with pytest.raises(preprocess.ImageDecodeError) as e:
    datasets.prepare("iqa_folder", manual_dir=manual, data_dir=tmp_path / "tfds")
  assert bad in str(e.value) and reason in str(e.value)
  # And nothing half-written is left to be reused.
  assert not list((tmp_path / "tfds").rglob("dataset_info.json"))


def test_odd_modes_are_stored_as_is_and_decode_like_convert_rgb(tmp_path):
  manual = tmp_path / "folder"
  manual.mkdir()
  data_fixtures.make_folder(manual)
  odd = {
      "cmyk.jpg": _cmyk_jpeg(),
      "grey16.png": data_fixtures.image_bytes(2, mode="I;16", fmt="PNG"),
      "rgba.png": data_fixtures.image_bytes(3, mode="RGBA", fmt="PNG"),
      "palette.png": data_fixtures.image_bytes(4, mode="P", fmt="PNG"),
      "grey.jpg": data_fixtures.image_bytes(5, mode="L", fmt="JPEG"),
  }
  with open(manual / "labels.csv", "a", newline="") as f:
    for i, (n, data) in enumerate(odd.items()):
      (manual / "images" / n).write_bytes(data)
      csv.writer(f).writerow([n, 2.0 + i * 0.1, 0.2])
  d = datasets.prepare("iqa_folder", manual_dir=manual, data_dir=tmp_path / "tfds",
                       mos_range=(1, 5))
  recs = {r["image_name"].decode(): r for rs in _read_all(d).values() for r in rs}
  for n, data in odd.items():
    assert recs[n]["image"] == data
    got = np.asarray(preprocess.decode_rgb(recs[n]["image"], n))
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(got, want)


def test_missing_csv_column(tmp_path):
  manual = tmp_path / "folder"
  manual.mkdir()
  data_fixtures.make_folder(manual)
  (manual / "labels.csv").write_text("image_name,score\nphoto_0.jpg,3\n")
  with pytest.raises(ValueError, match=r"labels.csv: missing column\(s\) \['mos'\]"):
    datasets.prepare("iqa_folder", manual_dir=manual, data_dir=tmp_path / "tfds")


def test_iqa_folder_on_real_livec_photos(tmp_path):
  root = data_fixtures.LIVEC_JPG
  if not (root / "labels.csv").is_file():
    pytest.skip(f"{root} is absent")
  with open(root / "labels.csv") as f:
    rows = list(csv.DictReader(f))[:10]
  sub = tmp_path / "subset.csv"
  with open(sub, "w", newline="") as f:
    w = csv.DictWriter(f, ["image_name", "mos", "mos_std"])
    w.writeheader()
    w.writerows(rows)
  d = datasets.prepare("iqa_folder", manual_dir=root, data_dir=tmp_path / "tfds",
                       labels_csv=str(sub), config_name="livec_subset", mos_range=(0, 100))
  recs = _read_all(d)
  assert {s: len(r) for s, r in recs.items()} == {"train": 8, "test": 2}
  by_name = {r["image_name"].decode(): r for rs in recs.values() for r in rs}
  for row in rows:
    r = by_name[row["image_name"]]
    assert r["image"] == (root / "Images" / row["image_name"]).read_bytes()
    assert r["mos"] == pytest.approx(float(row["mos"]), rel=1e-6)
    assert r["mos_norm"] == pytest.approx(float(row["mos"]) / 100, rel=1e-5)

  # The pipeline reads it back without TensorFlow, and the folder source agrees.
  code = (
      "import sys; from mobileiqa_jax.data import pipeline;"
      f"s = pipeline.tfds_source('iqa_folder/livec_subset', 'train', data_dir={str(tmp_path / 'tfds')!r});"
      "r = s[0]; assert 'tensorflow' not in sys.modules, 'TF imported';"
      "print(len(s), r['name'], r['mos'])"
  )
  out = support.run_python(["-c", code])
  assert out.returncode == 0, out.stderr[-2000:]
  n, name, mos = out.stdout.split()
  folder = pipeline.folder_source(root, "train", labels_csv=str(sub), mos_range=(0, 100))
  assert int(n) == len(folder) == 8
  assert (folder[0]["name"], folder[0]["mos"]) == (name, pytest.approx(float(mos), rel=1e-6))


def test_resplit_at_read_time(tmp_path):
  _, expected, _ = _prepare("kadid10k", tmp_path)
  tfds_dir = tmp_path / "tfds"
  stored = pipeline.tfds_source("kadid10k", "test", data_dir=tfds_dir)
  seed0 = pipeline.tfds_source("kadid10k", "test", data_dir=tfds_dir, split_seed=0)
  assert sorted(stored[i]["name"] for i in range(len(stored))) == sorted(
      seed0[i]["name"] for i in range(len(seed0)))
  tests = set()
  for seed in range(10):
    train = pipeline.tfds_source("kadid10k", "train", data_dir=tfds_dir, split_seed=seed)
    test = pipeline.tfds_source("kadid10k", "test", data_dir=tfds_dir, split_seed=seed)
    tr = {expected[train[i]["name"]][3] for i in range(len(train))}
    te = {expected[test[i]["name"]][3] for i in range(len(test))}
    assert not tr & te and len(train) + len(test) == len(expected)
    tests.add(frozenset(te))
  assert len(tests) > 1  # seeds give different splits


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(releases.MissingDataError, match="prepare_data.py --dataset=spaq"):
    pipeline.tfds_source("spaq", "train", data_dir=tmp_path)


@pytest.mark.parametrize("name,rows_from", [("livec", None), ("uhd_iqa", "train")])
def test_reference_split_source_follows_the_released_code(name, rows_from, tmp_path):
  import random  # pylint: disable=g-import-not-at-top
  _, expected, _ = _prepare(name, tmp_path)
  rows = [n for n, (*_, split, _) in expected.items() if rows_from is None or split == rows_from]
  # The released train.py, computed independently: random.seed, shuffle, first round(0.8 N).
  random.seed(3407)
  order = list(range(len(rows)))
  random.shuffle(order)
  cut = int(round(0.8 * len(rows)))
  for split, part in (("train", order[:cut]), ("test", order[cut:])):
    src = pipeline.reference_split_source(name, split, data_dir=tmp_path / "tfds",
                                          rows_from=rows_from)
    assert [src[i]["name"] for i in range(len(src))] == [rows[j] for j in part]
    assert [src[i]["mos"] for i in range(len(src))] == pytest.approx(
        [float(src.scale.to_unit(expected[rows[j]][0])) for j in part], rel=1e-5)
  with pytest.raises(ValueError, match="'train' and 'test'"):
    pipeline.reference_split_source(name, "validation", data_dir=tmp_path / "tfds")
  if name == "uhd_iqa":  # the release config reaches it, and guards the row count
    from mobileiqa_jax.training import train_data  # pylint: disable=g-import-not-at-top
    c = support.teacher_config.get_config("uhd_iqa_release")
    c.data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(ValueError, match="reference_count.*4269.*has 6"):
      train_data.sources_from_config(c)
    c.data.reference_count = 0
    tr, te = train_data.sources_from_config(c)
    assert [tr[i]["name"] for i in range(len(tr))] == [rows[j] for j in order[:cut]]
    assert len(te) == len(rows) - cut
