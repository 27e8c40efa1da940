"""`train_and_evaluate(config, workdir)`: teacher training and student distillation.

Reads top to bottom in labelled sections, like big_vision's train.py:

  setup -> mesh -> data -> model -> teacher (distillation only) -> step -> checkpoint -> loop

One jitted step for 1 CPU, 8 GPUs or a TPU pod: parameters and optimizer state are replicated
over the mesh's `data` axis (optionally split over `fsdp`), the batch is split over both axes,
and the train state is donated. BatchNorm statistics inside the step are those of the GLOBAL
batch (XLA makes the batch mean a cross-device reduction), i.e. SyncBatchNorm semantics; on one
device this is exactly the reference.

Distillation (config.teacher_checkpoint set): the frozen teacher runs in inference mode
(running BN statistics, no dropout) outside the differentiated function, the student in
training mode on the same batch; loss = w_x MSE(x) + w_dof MSE(DOF) + w_score MSE(score, MOS),
each term logged, plus, for monitoring only, the MSE of the teacher's regressor applied to the
student's fused feature (`monitor_teacher_regressor_mse`).

Outputs in the workdir (process 0 writes, every process takes part in checkpointing):
  config.json                 the resolved config
  metrics.jsonl               one JSON object per logged train step and per evaluation
  events.out.tfevents.*       TensorBoard (tensorboardX)
  checkpoints/<step>/         orbax; last `checkpoint.keep` plus the best epoch
  best_scatter.png            predicted vs MOS of the best checkpoint (matplotlib)
  best_predictions.csv        its predictions on the held-out split

Resume is automatic: a workdir with checkpoints continues from the latest one (parameters,
optimizer, step, data position); the dropout key is a function of the step, so a resumed run
matches an uninterrupted one. SIGTERM finishes the current step, saves, waits and returns.
A NaN/inf loss stops the run (FloatingPointError naming the step) without saving it, so the
last good checkpoint stays the latest.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging as std_logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mobileiqa_jax import checkpoint as ckpt_lib
from mobileiqa_jax import metrics as metrics_lib
from mobileiqa_jax import objectives
from mobileiqa_jax import optim
from mobileiqa_jax import sharding
from mobileiqa_jax.models import layers
from mobileiqa_jax.models import mobileiqa

PyTree = Any


# ============================================================================ train state


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree

  @property
  def variables(self) -> dict[str, PyTree]:
    return {"params": self.params, "batch_stats": self.batch_stats}


# ============================================================================ data


class Data:
  """What the loop needs from the input pipeline (process-local numpy batches).

  `train_epoch(epoch, start)` yields this process's slice of global batches `start..` of
  epoch `epoch` as dict(image [b, H, W, 3] float32 normalised, mos [b] float32, and, where
  the last partial batch is kept padded, mask [b] bool: False on padding), the order
  and flips a pure function of (seed, epoch), so (epoch, step_in_epoch) is the whole resume
  position. `eval_batches()` yields dict(image, mos, mask) with padded final batches
  (mask 0 on padding).
  """

  num_train: int
  num_eval: int
  steps_per_epoch: int
  mos_range: list[float] | None = None

  def train_epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    raise NotImplementedError

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    raise NotImplementedError


class ArrayData(Data):
  """In-memory data: preprocessed images and labels held as arrays (tests, benchmarks, demo).

  Shuffling and flips per epoch from `np.random.default_rng([seed, epoch])`; drop-remainder
  training batches; each process takes rows [p * b/P, (p+1) * b/P) of every global batch.
  """

  def __init__(self, train_images: np.ndarray, train_mos: np.ndarray, eval_images: np.ndarray,
               eval_mos: np.ndarray, batch_size: int, eval_batch_size: int, *, seed: int = 0,
               flips: bool = True, shuffle: bool = True, mos_range: list[float] | None = None):
    self._xt, self._yt = np.asarray(train_images, np.float32), np.asarray(train_mos, np.float32)
    self._xe, self._ye = np.asarray(eval_images, np.float32), np.asarray(eval_mos, np.float32)
    self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
    self.seed, self.flips, self.shuffle = seed, flips, shuffle
    self.num_train, self.num_eval = len(self._yt), len(self._ye)
    self.steps_per_epoch = self.num_train // batch_size
    self.mos_range = mos_range
    if self.steps_per_epoch == 0:
      raise ValueError(f"{self.num_train} training examples < batch size {batch_size}")

  def _local(self, rows: np.ndarray, b: int) -> np.ndarray:
    n = sharding.local_batch_size(b)
    p = jax.process_index()
    return rows[p * n:(p + 1) * n]

  def train_epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    rng = np.random.default_rng([self.seed, epoch])
    order = rng.permutation(self.num_train) if self.shuffle else np.arange(self.num_train)
    flips = rng.random((self.num_train, 2)) < 0.5 if self.flips else np.zeros(
        (self.num_train, 2), bool)
    b = self.batch_size
    for i in range(start, self.steps_per_epoch):
      rows = self._local(order[i * b:(i + 1) * b], b)
      images = self._xt[rows].copy()
      for j, r in enumerate(rows):
        if flips[r, 0]:
          images[j] = images[j][:, ::-1]
        if flips[r, 1]:
          images[j] = images[j][::-1]
      yield {"image": images, "mos": self._yt[rows]}

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    b = self.eval_batch_size
    for i in range(0, self.num_eval, b):
      rows = np.arange(i, i + b)
      mask = rows < self.num_eval
      rows = self._local(np.where(mask, rows, 0), b)
      mask = self._local(mask, b)
      yield {"image": self._xe[rows], "mos": self._ye[rows], "mask": mask.astype(np.float32)}


class PipelineData(Data):
  """`Data` over two `data.pipeline` sources (train and held-out), read per process."""

  def __init__(self, train_source: Any, eval_source: Any, config: ml_collections.ConfigDict):
    from mobileiqa_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    common = dict(image_size=tuple(config.data.image_size), seed=config.seed,
                  process_index=jax.process_index(), process_count=jax.process_count(),
                  num_workers=config.data.num_workers or None,
                  pre_resize_size=tuple(config.data.pre_resize) if all(config.data.pre_resize)
                  else None)
    crop = tuple(config.data.train_crop)
    self.train = pipeline.Loader(train_source, sharding.local_batch_size(config.batch_size),
                                 train=True, flips=config.data.flips,
                                 crop_size=crop if all(crop) else None,
                                 shuffle=config.data.shuffle,
                                 drop_remainder=config.data.drop_remainder, **common)
    self.eval = pipeline.Loader(eval_source,
                                sharding.local_batch_size(config.data.eval_batch_size),
                                train=False, **common)
    self.num_train, self.num_eval = len(train_source), len(eval_source)
    self.steps_per_epoch = self.train.steps_per_epoch
    scale = getattr(train_source, "scale", None)
    self.mos_range = [float(scale.low), float(scale.high)] if scale is not None else None

  def train_epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    keep_last = not self.train.drop_remainder
    for batch in self.train.iter_epoch(epoch, start):
      out = {"image": batch["image"], "mos": batch["mos"]}
      if keep_last:  # a padded last batch: the step weights loss and BatchNorm by the mask
        out["mask"] = batch["mask"]
      yield out

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    for batch in self.eval.iter_epoch(0, 0):
      yield {"image": batch["image"], "mos": batch["mos"], "mask": batch["mask"]}


def make_sources(config: ml_collections.ConfigDict, split: str | None = None) -> tuple[Any, Any]:
  """(train source, held-out source) of `config.data` (`split` overrides the held-out split).

  'demo' is the built-in demo data (no files needed); anything else is a prepared tfds data
  set by name (uhd_iqa, koniq10k, livec, spaq, bid, kadid10k, iqa_folder/<config>) or folder.
  A data set that is not prepared raises an error naming the expected files and the command
  that prepares them.
  """
  from mobileiqa_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  eval_split = split or config.data.eval_split
  if config.data.name == "demo":
    from mobileiqa_jax.data import demo  # pylint: disable=g-import-not-at-top
    return demo.memory_source("train"), demo.memory_source(eval_split)
  data_dir = config.data.data_dir or None
  if config.data.split == "reference":  # the released code's random.shuffle split
    rows_from = config.data.reference_rows or None
    sources = tuple(pipeline.reference_split_source(config.data.name, s, data_dir, rows_from,
                                                    config.data.reference_split_seed)
                    for s in ("train", eval_split))
    rows = sum(len(s) for s in sources)
    if config.data.reference_count and rows != config.data.reference_count:
      raise ValueError(
          f"config.data.reference_count: the released code splits {config.data.reference_count} "
          f"rows of {config.data.name}'s label file, the prepared data set has {rows}; the "
          "split would differ. Prepare the complete release, or set "
          "--config.data.reference_count=0 to split what is there.")
    return sources
  if config.data.split != "stored":
    raise ValueError(f"config.data.split must be 'stored' or 'reference', got "
                     f"{config.data.split!r}.")
  return (pipeline.tfds_source(config.data.name, config.data.train_split, data_dir),
          pipeline.tfds_source(config.data.name, eval_split, data_dir))


def make_data(config: ml_collections.ConfigDict) -> Data:
  """The configured data set (tfds records, or the built-in demo data) as `Data`."""
  return PipelineData(*make_sources(config), config)


# ============================================================================ helpers


class MetricWriter:
  """JSON lines + TensorBoard event files; a no-op on processes other than 0."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
        self._tb = tensorboardX.SummaryWriter(logdir=workdir, flush_secs=30)
      except ImportError:
        logging.warning("tensorboardX not installed: no TensorBoard event files")

  def write(self, step: int, scalars: Mapping[str, float], kind: str) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "kind": kind, **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(f"{kind}/{k}", v, int(step))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class _Preemption:
  """SIGTERM -> a flag the loop polls after each step (the step in flight finishes)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: finishing this step, then saving and exiting")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _model_config(config: ml_collections.ConfigDict) -> mobileiqa.MobileIQAConfig:
  """config.model + compute dtype + remat -> the serialisable model config."""
  d = config.model.to_dict()
  d["dtype"] = config.compute_dtype
  d["depthwise_impl"] = d.get("depthwise_impl") or None  # '' in configs: the backend's default
  kwargs = dict(d.get("backbone_kwargs") or {})
  if config.remat:
    if not d["backbone"].startswith("mobilevitv2"):
      logging.warning("config.remat: only MobileViTv2 backbones rematerialise; ignored for %s",
                      d["backbone"])
    else:
      kwargs["remat"] = config.get("remat_granularity") or True
  d["backbone_kwargs"] = kwargs
  return mobileiqa.MobileIQAConfig.from_dict(d)


def _load_backbone_init(spec: str, arch: str) -> PyTree:
  """`config.init.backbone` -> backbone variables {'params', 'batch_stats'}.

  A local file is read as it is; anything else is a timm hub name, fetched with huggingface_hub
  (`timm/<name>`, model.safetensors) when the hub is reachable.
  """
  from mobileiqa_jax import convert  # pylint: disable=g-import-not-at-top
  if os.path.exists(spec):
    path = spec
  else:
    try:
      import huggingface_hub  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"config.init.backbone={spec!r} is not a local file and "
                        "huggingface_hub is not installed to fetch it") from e
    name = spec if "/" in spec else f"timm/{spec}"
    try:
      path = huggingface_hub.hf_hub_download(name, "model.safetensors")
    except Exception as e:  # pylint: disable=broad-except
      raise RuntimeError(
          f"config.init.backbone={spec!r}: could not fetch {name}/model.safetensors from the "
          f"Hugging Face hub ({type(e).__name__}: {e}). Download it where the hub is reachable "
          "and pass the local file: --config.init.backbone=/path/model.safetensors") from e
  logging.info("backbone %s initialised from %s", arch, path)
  return convert.load_timm_backbone(path, arch)


def _loud_random_init_warning(arch: str) -> None:
  bar = "!" * 78
  msg = (f"\n{bar}\n!! config.init.backbone is empty: the {arch} backbone starts from RANDOM "
         f"weights.\n!! IQA accuracy depends on ImageNet initialisation; the paper's numbers "
         f"need it.\n!! Set --config.init.backbone to a timm file or hub name.\n{bar}")
  logging.warning(msg)


def _merge_backbone(variables: PyTree, backbone_name: str, loaded: PyTree) -> PyTree:
  """Puts loaded backbone variables under `backbone_name`, checking the tree matches."""
  out = {k: dict(v) for k, v in variables.items()}
  for col in ("params", "batch_stats"):
    have = out.get(col, {}).get(backbone_name)
    new = loaded.get(col, {})
    if have is None:
      continue
    want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), have)
    got = jax.tree.map(lambda x: (tuple(np.shape(x)), str(np.asarray(x).dtype)), new)
    if want != got:
      raise ValueError(f"backbone init {col} does not match the model's {backbone_name}: "
                       f"first difference in {_first_difference(want, got)}")
    out[col][backbone_name] = jax.tree.map(jnp.asarray, new)
  return out


def _first_difference(a: Any, b: Any) -> str:
  fa = dict(flax.traverse_util.flatten_dict(a, sep="/"))
  fb = dict(flax.traverse_util.flatten_dict(b, sep="/"))
  for k in sorted(set(fa) | set(fb)):
    if fa.get(k) != fb.get(k):
      return f"{k}: model {fa.get(k)} vs file {fb.get(k)}"
  return "?"


def _to_global(tree: PyTree, shardings: PyTree) -> PyTree:
  """Host arrays (identical on every process) -> global arrays with the given shardings."""
  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(put, tree, shardings)


def resolved_config_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(ckpt_lib._to_plain(config), indent=2, sort_keys=True)  # pylint: disable=protected-access


# ============================================================================ steps


def make_train_step(model: Any, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                    teacher: Any | None = None) -> Callable[..., tuple[TrainState, dict]]:
  """The un-jitted train step `(state, batch, teacher_variables) -> (state, metrics)`."""
  base_key = jax.random.PRNGKey(config.seed)
  term_weights = dict(config.distill.weights)

  def step_fn(state: TrainState, batch: dict[str, jax.Array],
              teacher_variables: PyTree | None = None) -> tuple[TrainState, dict]:
    # The dropout key is a function of the step: a resumed run draws the same masks.
    rng = jax.random.fold_in(base_key, state.step)
    images, mos = batch["image"], batch["mos"]
    # A kept last partial batch arrives padded with mask False: the loss is the mean over the
    # real examples and BatchNorm counts only them, i.e. exactly PyTorch's smaller last batch.
    mask = batch.get("mask")
    weights = None if mask is None else mask.astype(jnp.float32)

    if teacher is not None:
      # Frozen teacher, inference mode, outside the differentiated function.
      t_x, t_dof, _ = teacher.apply(teacher_variables, images, train=False,
                                    return_features=True)
      t_x, t_dof = jax.lax.stop_gradient(t_x), jax.lax.stop_gradient(t_dof)

    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      with layers.batch_norm_example_mask(mask):
        out, new_model_state = model.apply(
            variables, images, train=True, return_features=True, return_fused=True,
            rngs={"dropout": rng}, mutable=["batch_stats"])
      x, dof, score, fused = out
      if teacher is None:
        loss = objectives.regression_loss(score, mos, config.loss, weights)
        aux = {}
      else:
        loss, terms = objectives.distillation_loss(
            x.astype(jnp.float32), t_x.astype(jnp.float32), dof.astype(jnp.float32),
            t_dof.astype(jnp.float32), score, mos, term_weights, weights)
        aux = {f"loss_{k}": v for k, v in terms.items()}
        aux["fused"] = fused
      return loss, (new_model_state, score, aux)

    (loss, (new_model_state, score, aux)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "score_mse": objectives.mse(score, mos, weights),
               "grad_norm": optax.global_norm(grads)}
    if teacher is not None:
      fused = jax.lax.stop_gradient(aux.pop("fused"))
      # Monitoring only: the teacher's regressor on the student's image quality feature.
      t_on_s = teacher.apply(teacher_variables, fused, method="regress")
      metrics["monitor_teacher_regressor_mse"] = objectives.mse(t_on_s, mos, weights)
      metrics.update(aux)
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=new_model_state.get("batch_stats", {}),
                              opt_state=opt_state)
    return new_state, metrics

  return step_fn


def make_eval_step(model: Any) -> Callable[[PyTree, jax.Array], jax.Array]:
  def eval_fn(variables: PyTree, images: jax.Array) -> jax.Array:
    return model.apply(variables, images, train=False)
  return eval_fn


def evaluate(eval_fn: Callable, variables: PyTree, loader: Any, mesh: Any,
             max_batches: int = -1) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
  """Scores a held-out split: (metrics, predictions, MOS) over the valid (unpadded) examples."""
  preds, moses = [], []
  for i, batch in enumerate(loader):
    if 0 <= max_batches <= i:
      break
    g = sharding.host_to_global(batch, mesh)
    scores = eval_fn(variables, g["image"])
    # Every process gets the full global batch of scores, MOS and validity mask.
    s, m, valid = sharding.global_to_host((scores, g["mos"], g["mask"]))
    valid = valid.astype(bool)
    preds.append(s[valid])
    moses.append(m[valid])
  pred = np.concatenate(preds) if preds else np.zeros((0,), np.float32)
  mos = np.concatenate(moses) if moses else np.zeros((0,), np.float32)
  try:
    result = metrics_lib.iqa_metrics(pred, mos, logistic=False)
    result["selection"] = metrics_lib.selection_score(result)
  except ValueError as e:
    # A collapsed model (one score for every image) has no correlation; training goes on,
    # and this evaluation can never be the best one.
    logging.warning("evaluation: %s", e)
    result = {"srocc": np.nan, "plcc": np.nan, "krocc": np.nan,
              "rmse": float(np.sqrt(np.mean((pred - mos) ** 2))) if len(pred) else np.nan,
              "mae": float(np.mean(np.abs(pred - mos))) if len(pred) else np.nan,
              "selection": np.nan}
  result["num_examples"] = float(len(pred))
  return result, pred, mos


def write_scatter(path: str, pred: np.ndarray, mos: np.ndarray, title: str) -> bool:
  """Predicted vs MOS scatter PNG (matplotlib, Agg backend); False when matplotlib is absent."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("matplotlib not installed: no scatter plot (pip install matplotlib)")
    return False
  fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
  ax.scatter(mos, pred, s=8, alpha=0.6)
  lo = float(min(np.min(mos), np.min(pred))) if len(pred) else 0.0
  hi = float(max(np.max(mos), np.max(pred))) if len(pred) else 1.0
  ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
  ax.set_xlabel("MOS")
  ax.set_ylabel("predicted")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True


def write_predictions(path: str, pred: np.ndarray, mos: np.ndarray) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write("index,predicted,mos\n")
    for i, (p, m) in enumerate(zip(pred, mos)):
      f.write(f"{i},{float(p):.6f},{float(m):.6f}\n")


@dataclasses.dataclass
class Setup:
  """Model, optimizer, shardings and jitted steps of one run (see `build_setup`)."""

  model: Any
  model_config: mobileiqa.MobileIQAConfig
  tx: optax.GradientTransformation
  abstract_vars: PyTree
  var_shardings: PyTree
  abstract_opt: PyTree
  opt_shardings: PyTree
  state_shardings: TrainState
  init_variables: Callable[[], PyTree]
  train_step: Callable[..., tuple[TrainState, dict]]
  eval_step: Callable[[PyTree, jax.Array], jax.Array]
  teacher: Any = None
  teacher_vars: PyTree = None

  def init_state(self) -> TrainState:
    """Fresh state: random init (+ the configured backbone weights), optimizer init."""
    variables = self.init_variables()
    opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(variables["params"])
    return TrainState(step=jax.device_put(np.zeros((), np.int32),
                                          self.state_shardings.step),
                      params=variables["params"], batch_stats=variables["batch_stats"],
                      opt_state=opt_state)


def build_setup(config: ml_collections.ConfigDict, mesh: Any, steps_per_epoch: int,
                teacher: tuple[Any, PyTree] | None = None) -> Setup:
  """Builds the model (and frozen teacher), its shardings on `mesh`, and the jitted steps.

  `teacher`: (module, sharded variables) of the frozen teacher instead of reading
  `config.teacher_checkpoint`; the variables may be abstract (`aot.py` compiles without
  weights).
  """
  # ------------------------------------------------------------------ model
  model_cfg = _model_config(config)
  model = mobileiqa.build_model(model_cfg)
  tx = optim.make_optimizer(config.optimizer, steps_per_epoch)
  h, w = config.data.image_size
  dummy = jnp.zeros((1, h, w, 3), jnp.float32)

  def init_fn(key):
    variables = model.init({"params": key, "dropout": key}, dummy, train=False)
    variables = {"params": variables["params"],
                 "batch_stats": variables.get("batch_stats", {})}
    return variables

  abstract_vars = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed))
  var_shardings = {
      "params": sharding.param_shardings(abstract_vars["params"], mesh, config.fsdp_min_size),
      "batch_stats": jax.tree.map(lambda _: sharding.replicated(mesh),
                                  abstract_vars["batch_stats"]),
  }
  abstract_opt = jax.eval_shape(tx.init, abstract_vars["params"])
  # The fsdp rule depends on shape only, so Adam moments get their parameter's sharding and
  # scalars (the step count) stay replicated.
  opt_shardings = sharding.param_shardings(abstract_opt, mesh, config.fsdp_min_size)
  state_shardings = TrainState(step=sharding.replicated(mesh), params=var_shardings["params"],
                               batch_stats=var_shardings["batch_stats"],
                               opt_state=opt_shardings)

  def init_variables() -> PyTree:
    variables = jax.jit(init_fn, out_shardings=var_shardings)(jax.random.PRNGKey(config.seed))
    if config.init.backbone:
      loaded = _load_backbone_init(config.init.backbone, model_cfg.backbone)
      host = sharding.global_to_host(variables)
      variables = _to_global(_merge_backbone(host, model_cfg.backbone_name, loaded),
                             var_shardings)
    else:
      _loud_random_init_warning(model_cfg.backbone)
    return variables

  # ------------------------------------------------------------------ teacher (distillation)
  teacher, teacher_vars = teacher if teacher is not None else (None, None)
  if teacher is None and config.teacher_checkpoint:
    _, t_host, t_meta = ckpt_lib.load_model(config.teacher_checkpoint)
    # The teacher computes in the run's compute dtype too (its weights stay as stored).
    teacher = mobileiqa.build_model(dict(t_meta["model_config"], dtype=config.compute_dtype))
    t_shard = {k: sharding.param_shardings(v, mesh, config.fsdp_min_size)
               for k, v in t_host.items()}
    teacher_vars = _to_global(t_host, t_shard)
    logging.info("teacher from %s", t_meta["path"])
    _check_distill_shapes(model, teacher, abstract_vars, t_host, dummy)

  # ------------------------------------------------------------------ step
  train_step = jax.jit(
      make_train_step(model, tx, config, teacher),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh),
                    None if teacher_vars is None else jax.tree.map(lambda a: a.sharding,
                                                                    teacher_vars)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(model),
                      in_shardings=(var_shardings, sharding.batch_sharding(mesh)),
                      out_shardings=sharding.batch_sharding(mesh))
  return Setup(model=model, model_config=model_cfg, tx=tx, abstract_vars=abstract_vars,
               var_shardings=var_shardings, abstract_opt=abstract_opt,
               opt_shardings=opt_shardings, state_shardings=state_shardings,
               init_variables=init_variables, train_step=train_step, eval_step=eval_step,
               teacher=teacher, teacher_vars=teacher_vars)


# ============================================================================ main


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       data: Data | None = None) -> dict[str, Any]:
  """Trains (or distils) and evaluates.

  Args:
    config: an experiment config (configs/teacher.py, configs/student.py).
    workdir: where config, metrics, checkpoints and plots go; resumes from its checkpoints.
    data: optional `Data` to use instead of `make_data(config)` (tests, benchmarks).

  Returns:
    A summary: final step, whether preempted, best and last eval metrics, final params.
  """
  # ------------------------------------------------------------------ setup
  sharding.maybe_initialize_distributed(config.distributed)
  is_main = jax.process_index() == 0
  workdir = os.path.abspath(workdir)
  ckpt_lib.check_resume_config(workdir, config)  # before anything is written
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(resolved_config_json(config))
  writer = MetricWriter(workdir, enabled=is_main)

  # ------------------------------------------------------------------ mesh
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.data.eval_batch_size, mesh)
  logging.info("mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size,
               jax.process_count())

  # ------------------------------------------------------------------ data
  # Each process reads only its slice (process_index of process_count) of every global batch.
  data = data or make_data(config)
  steps_per_epoch = data.steps_per_epoch
  total_steps = steps_per_epoch * config.num_epochs
  if config.max_steps > 0:
    total_steps = min(total_steps, config.max_steps)
  logging.info("data %s: %d train examples, %d steps/epoch, %d eval examples", config.data.name,
               data.num_train, steps_per_epoch, data.num_eval)

  # ------------------------------------------------------------------ model, teacher, step
  setup = build_setup(config, mesh, steps_per_epoch)
  model_cfg, train_step, eval_step = setup.model_config, setup.train_step, setup.eval_step
  abstract_vars, var_shardings = setup.abstract_vars, setup.var_shardings
  abstract_opt, opt_shardings = setup.abstract_opt, setup.opt_shardings
  teacher_vars = setup.teacher_vars

  # ------------------------------------------------------------------ checkpoint
  ckpt = ckpt_lib.TrainCheckpointer(workdir, keep=config.checkpoint.keep,
                                    async_save=config.checkpoint.async_save)
  ckpt_meta = {"format": ckpt_lib.FORMAT, "model_config": model_cfg.to_dict(),
               "extra": {"image_size": list(config.data.image_size),
                         "mos_range": data.mos_range, "data": config.data.name,
                         "distilled_from": config.teacher_checkpoint or None}}
  latest = ckpt.latest_step()
  if latest is not None:
    abstract = lambda t, s: jax.tree.map(  # noqa: E731
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), t, s)
    variables, opt_state, train_meta = ckpt.restore(
        latest, abstract(abstract_vars, var_shardings), abstract(abstract_opt, opt_shardings))
    # Host numpy -> a replicated global array (device_put of a host value is multi-host safe).
    state = TrainState(step=jax.device_put(np.asarray(train_meta["step"], np.int32),
                                           sharding.replicated(mesh)),
                       params=variables["params"], batch_stats=variables["batch_stats"],
                       opt_state=opt_state)
    data_pos = dict(train_meta["data_state"])
    best = dict(train_meta.get("best") or {})
    logging.info("resumed from step %d (%s)", latest, data_pos)
  else:
    state = setup.init_state()
    data_pos = {"epoch": 0, "step_in_epoch": 0}
    best = {}

  def save(step: int, pos: Mapping[str, int], metrics: Mapping[str, float] | None = None):
    ckpt.save(step, state.variables, state.opt_state, ckpt_meta,
              {"step": step, "data_state": dict(pos), "best": best},
              metrics=metrics)

  # ------------------------------------------------------------------ loop
  step = int(jax.device_get(state.step))
  epoch, start = int(data_pos["epoch"]), int(data_pos["step_in_epoch"])
  pending: list[tuple[int, Any]] = []  # (step, device metrics) not yet checked on the host
  progress = _progress_bar(total_steps, step, enabled=is_main and config.progress_bar)
  t_last, n_last = time.perf_counter(), 0
  preempted = False
  last_eval: dict[str, float] = {}

  def drain(keep_last: int = 0):
    """Fetches finished steps' metrics; NaN/inf stops the run naming the step."""
    nonlocal t_last, n_last
    while len(pending) > keep_last:
      s, m = pending.pop(0)
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      if not np.isfinite(m["loss"]):
        ckpt.wait()
        raise FloatingPointError(
            f"non-finite loss {m['loss']} at step {s} (epoch {s // steps_per_epoch}); stopping. "
            f"The last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}.")
      n_last += config.batch_size
      if progress is not None:
        progress.update(1)
        progress.set_postfix(loss=f"{m['loss']:.4g}", epoch=s // steps_per_epoch)
      if s % config.log_every_steps == 0 or s == total_steps:
        now = time.perf_counter()
        m["images_per_sec"] = n_last / max(now - t_last, 1e-9)
        m["lr"] = float(optim.lr_at(config.optimizer, steps_per_epoch, s - 1))
        t_last, n_last = now, 0
        if progress is not None:
          progress.set_postfix(loss=f"{m['loss']:.4g}", img_s=f"{m['images_per_sec']:.1f}",
                               epoch=s // steps_per_epoch)
        writer.write(s, m, "train")

  with _Preemption() as preemption:
    while step < total_steps and not preempted:
      for batch in data.train_epoch(epoch, start):
        state, m = train_step(state, sharding.host_to_global(batch, mesh), teacher_vars)
        step += 1
        start += 1
        pending.append((step, m))
        drain(keep_last=1)  # one step in flight keeps the device busy
        end_of_epoch = start == steps_per_epoch
        if sharding.any_process(preemption.requested):
          drain()
          save(step, {"epoch": epoch, "step_in_epoch": start})
          preempted = True
          break
        if (step % config.checkpoint.every_steps == 0 and not end_of_epoch
            and step < total_steps):  # the last step's save comes with its evaluation
          drain()
          save(step, {"epoch": epoch, "step_in_epoch": start})
        if step >= total_steps:
          break
      if preempted:
        break
      drain()
      if start == steps_per_epoch:
        epoch, start = epoch + 1, 0
      eval_now = start == 0 and (epoch % config.eval_every_epochs == 0 or step >= total_steps)
      if step >= total_steps and not eval_now:
        eval_now = True  # always evaluate the final state
      metrics = None
      if eval_now:
        metrics, _, _ = evaluate(eval_step, state.variables, data.eval_batches(), mesh)
        metrics["epoch"] = float(epoch)
        last_eval = metrics
        writer.write(step, metrics, "eval")
        logging.info("step %d epoch %d: %s", step, epoch,
                     " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if np.isfinite(metrics["selection"]) and (
            not best or metrics["selection"] > best["selection"]):
          best = dict(metrics, step=float(step))
      save(step, {"epoch": epoch, "step_in_epoch": start},
           {"selection": metrics["selection"]}
           if metrics and np.isfinite(metrics["selection"]) else None)
  if progress is not None:
    progress.close()
  ckpt.wait()

  summary: dict[str, Any] = {"step": step, "preempted": preempted, "workdir": workdir,
                             "best": best, "last_eval": last_eval}
  # ------------------------------------------------------------------ final report (best)
  if not preempted and best:
    best_path = ckpt_lib.resolve_checkpoint(workdir, which="best")
    host_vars, _ = ckpt_lib.load_variables(best_path)
    best_vars = _to_global({"params": host_vars["params"],
                            "batch_stats": host_vars["batch_stats"]}, var_shardings)
    metrics, pred, mos = evaluate(eval_step, best_vars, data.eval_batches(), mesh)
    summary["best_eval"] = metrics
    if is_main:
      write_predictions(os.path.join(workdir, "best_predictions.csv"), pred, mos)
      if config.scatter_plot:
        title = (f"{config.name or 'model'} step {os.path.basename(best_path)}: "
                 f"SROCC {metrics['srocc']:.3f} PLCC {metrics['plcc']:.3f}")
        if write_scatter(os.path.join(workdir, "best_scatter.png"), pred, mos, title):
          summary["scatter"] = os.path.join(workdir, "best_scatter.png")
      with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(ckpt_lib._to_plain(summary), f, indent=2)  # pylint: disable=protected-access
  ckpt.close()
  writer.close()
  summary["final_params"] = state.params
  return summary


def _check_distill_shapes(student: Any, teacher: Any, abstract_vars: PyTree, t_vars: PyTree,
                          dummy: jax.Array) -> None:
  s = jax.eval_shape(lambda v: student.apply(v, dummy, return_features=True), abstract_vars)
  t = jax.eval_shape(lambda v: teacher.apply(v, dummy, return_features=True), t_vars)
  for name, a, b in (("x", s[0], t[0]), ("DOF", s[1], t[1])):
    if a.shape != b.shape:
      raise ValueError(
          f"distillation needs the student's {name} shape to equal the teacher's: "
          f"{a.shape} vs {b.shape}. Give both the same model.pooled_size and model.width.")


def _progress_bar(total: int, initial: int, enabled: bool):
  if not enabled:
    return None
  try:
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                   mininterval=1.0)
