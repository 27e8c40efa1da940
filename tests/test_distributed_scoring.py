"""`predict --distributed`: shares, parts, merge and resume (mobileiqa_jax/scoring/distributed.py).

The cheap tests drive the share/merge logic in this process with a fake scorer; one test starts
two CPU processes (jax.distributed on 127.0.0.1) and compares their CSV with one process's.
"""

from __future__ import annotations

import os
import sys

import data_fixtures
from mobileiqa_jax.scoring import distributed as ds
from mobileiqa_jax.scoring import scorer
from support import REPO, free_port, python_env, random_variables, run_launcher, run_peers

LIVEC = data_fixtures.LIVEC_IMAGES
PHOTOS = [os.path.join(LIVEC, f"{n}.JPG") for n in (1000, 1001, 1002, 1003, 1004)]


def test_parts_cover_the_files_in_order_in_whole_batches():
  for n, procs, part, batch in ((10, 2, 3, 2), (7, 3, 1024, 2), (1, 4, 5, 1), (100, 2, 8, 4)):
    parts = ds.plan_parts(n, procs, part, batch)
    assert [p.start for p in parts] == [0] + [p.stop for p in parts[:-1]]
    assert parts[-1].stop == n
    assert all((p.stop - p.start) % batch == 0 for p in parts[:-1])
    shares = [ds.share(parts, i, procs) for i in range(procs)]
    assert sum(shares, []) == parts  # every part once, process order = input order
    for i, mine in enumerate(shares):
      assert all(ds.owner(p, len(parts), procs) == i for p in mine)


def test_share_is_written_once_reused_and_merged(tmp_path):
  files = [f"f{i}.jpg" for i in range(5)]
  calls = []

  def fake_score(chunk):
    calls.append(list(chunk))
    return [scorer.Result(f, error=f"{f} cannot be scored") if f == "f3.jpg"
            else scorer.Result(f, float(files.index(f)) / 10) for f in chunk]

  parts = ds.plan_parts(len(files), 2, 2, 2)
  parts_dir = str(tmp_path / "s.csv.parts")
  os.makedirs(parts_dir)
  paths_of = lambda p: ds.part_path(parts_dir, p, len(parts), files, "settings")
  import io
  err = io.StringIO()
  for i in range(2):
    ds.score_share(ds.share(parts, i, 2), paths_of, files, fake_score, err)
  assert sum(calls, []) == files and "f3.jpg cannot be scored" in err.getvalue()
  calls.clear()
  ds.score_share(ds.share(parts, 1, 2), paths_of, files, fake_score, io.StringIO())
  assert calls == []  # a rerun reuses the written parts
  written, failed = ds.merge_parts([paths_of(p) for p in parts], str(tmp_path / "s.csv"),
                                   parts_dir)
  assert (written, failed) == (4, 1) and not os.path.exists(parts_dir)
  assert (tmp_path / "s.csv").read_text() == (
      "path,score\nf0.jpg,0.000000\nf1.jpg,0.100000\nf2.jpg,0.200000\nf4.jpg,0.400000\n")
  msg = ds.missing_parts_message(parts[1:2], len(parts), 2, {0}, {1: "hostb"}, parts_dir)
  assert "process 1 on hostb stopped" in msg and "rerun" in msg


def test_two_processes_give_the_one_process_csv(tmp_path, bucket_servers):
  """Two processes on 127.0.0.1; their parts and the merged CSV in a gs:// bucket (the GCS
  emulator of conftest.bucket_servers), as a pod writes them."""
  del bucket_servers
  from mobileiqa_jax import storage
  from mobileiqa_jax.weights import checkpoint
  from mobileiqa_jax.models import mobileiqa
  config = mobileiqa.model_config(
      "student", backbone="mobilenetv3_small_050", num_mals=1, width=16, pooled_size=6,
      regressor_pool=2, backbone_kwargs={"depth_multiplier": 0.1})
  variables = random_variables(mobileiqa.build_model(config), (32, 32))
  ckpt = checkpoint.save_model(str(tmp_path / "ckpt"), variables, config.to_dict(),
                               extra={"image_size": [32, 32]})
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(open(PHOTOS[0], "rb").read()[:200])
  args = [f"--checkpoint={ckpt}", "--batch_size=2", "--noprogress", *PHOTOS, str(bad)]
  one = run_launcher("launch/predict.py", args)
  assert one.returncode == 1, one.stderr[-2000:]
  out = "gs://mobileiqa-test/distributed/scores.csv"
  port = str(free_port())
  results = run_peers(
      [[sys.executable, os.path.join(REPO, "launch/predict.py"), *args, "--distributed",
        f"--output={out}", "--part_size=2"] for _ in range(2)],
      [python_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                  JAX_PROCESS_ID=str(i)) for i in range(2)], tmp_path, timeout=300,
      cwd=str(tmp_path))
  assert [r.returncode for r in results] == [1, 1], [r.stderr[-2000:] for r in results]
  assert f"{bad} cannot be scored" in results[1].stderr  # the process that read it says so
  assert storage.read_text(out) == one.stdout
  assert not storage.exists(out + ".parts")  # read back from the bucket, then removed
  assert not os.path.exists(tmp_path / "gs:")
