"""IQA data: tfds builders of the standard data sets and the input pipeline.

- `preprocess`: decode + the reference's resize/normalise (PIL; no tfds, no TensorFlow).
- `pipeline`: random-access sources (prepared tfds split, folder + CSV, in memory) and the
  deterministic, resumable, multi-process `Loader` (grain) that yields numpy batches.
- `feed`: what a run reads, train and held-out batches (`from_config`, `from_arrays`).
- `builders`: the tfds builders by name and `prepare(name, manual_dir, data_dir)`
  (`launch/prepare_data.py` is its command line). Importing it imports tfds; preparing
  needs TensorFlow (CPU), reading does not.

Kept light on purpose: importing `mobileiqa_jax.data` imports neither tfds nor TensorFlow.
"""
