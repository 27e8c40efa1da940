"""`train_and_evaluate(config, workdir)`: teacher training and student distillation.

The run reads top to bottom in labelled sections, like big_vision's train.py: setup -> mesh ->
data -> model (+ frozen teacher) and steps -> checkpoint/resume -> loop -> final report.
`build_steps(config, mesh, steps_per_epoch)` builds the model, optimizer and jitted steps
without touching data or disk (the AOT compile tool builds the same steps).

One jitted step for 1 CPU, 8 GPUs or a TPU pod: parameters and optimizer state replicated over
the mesh's `data` axis (optionally split over `fsdp`), the batch split over both, the state
donated; BatchNorm sees the GLOBAL batch (SyncBatchNorm). Distillation: the frozen teacher
runs in inference mode outside the differentiated function, the loss is docs/model.md's
section 4, each term logged, plus (monitoring only) the teacher's regressor on the student's
fused feature. Outputs in the workdir (process 0 writes): config.json, metrics.jsonl,
TensorBoard events, checkpoints/<step>/ (orbax: the last `checkpoint.keep` and the best), and
best_scatter.png, best_predictions.csv, summary.json for the best checkpoint.

Resume is automatic, from the newest checkpoint that reads (a damaged newer one is moved to
damaged_checkpoints/ with a warning). The step is the only counter: epoch and position follow
from it, the data order from (seed, epoch), the dropout key from (seed, step), so a resumed
run matches an uninterrupted one, also after a kill -9 (metrics.jsonl rows past the resumed
step are re-done, not repeated). SIGTERM finishes the step, saves and returns; a NaN/inf loss
stops the run naming the step, the last good checkpoint and the lever, without saving it.
One run per workdir: a second is refused before it writes anything (workdir_lock.py).
The workdir and the teacher may be gs:// or s3:// URLs: every file goes through `storage`
(docs/training.md, "Runs in a bucket").
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from typing import Any, Callable

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mobileiqa_jax import storage
from mobileiqa_jax.models import mobileiqa
from mobileiqa_jax.models import runtime as runtime_lib
from mobileiqa_jax.training import checkpointer
from mobileiqa_jax.training import evaluation
from mobileiqa_jax.training import metric_writer
from mobileiqa_jax.training import objectives
from mobileiqa_jax.training import optim
from mobileiqa_jax.training import preemption
from mobileiqa_jax.training import sharding
from mobileiqa_jax.training import train_data
from mobileiqa_jax.training import workdir_lock
from mobileiqa_jax.weights import checkpoint as ckpt_lib
from mobileiqa_jax.weights import convert

PyTree = Any


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       data: train_data.Data | None = None) -> dict[str, Any]:
  """Trains (or distils) and evaluates.

  Args:
    config: an experiment config (configs/teacher.py, configs/student.py).
    workdir: where config, metrics, checkpoints and plots go; resumes from its checkpoints.
    data: optional `train_data.Data` to use instead of `train_data.from_config(config)` (tests).

  Returns:
    A summary: final step, whether preempted, best and last eval metrics, final params.

  Raises:
    workdir_lock.WorkdirLockedError: another live run holds `workdir` (nothing was written).
    metric_writer.NonFiniteLossError: the loss became NaN/inf (names the step and the lever).
    checkpointer.CheckpointDiskFullError: a checkpoint did not fit (earlier ones are intact).
  """
  sharding.maybe_initialize_distributed(config.distributed)
  workdir = storage.absolute(workdir)  # a bucket URL stays one (never a local `gs:` folder)
  _check_paths(config, workdir)
  created = _first_missing(workdir)
  # One writer per workdir, held for the whole job by process 0 and refused before anything
  # is written (workdir_lock.py); released however the run ends.
  lock = workdir_lock.acquire_for_job(workdir, jax.process_index() == 0, jax.process_count())
  try:
    # Whatever ends the run (a finished loop, a non-finite loss, a full disk), the checkpoint
    # under way is finished, files are closed and the lock is given back, in that order.
    with contextlib.ExitStack() as cleanup:
      if lock is not None:
        cleanup.callback(lock.release)
      return _train_and_evaluate(config, workdir, data, cleanup)
  except BaseException:
    # A run that failed to start leaves no folder it made: only the lock was in it.
    if created is not None and jax.process_index() == 0:
      _remove_empty_dirs(workdir, created)
    raise


def _check_paths(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses, before anything is written, what cannot work in a bucket: a missing bucket or
  refused credentials (one line naming the bucket), and tfds data read from a bucket."""
  for path in (workdir, config.teacher_checkpoint, config.init.backbone):
    if path and storage.is_bucket(path):
      storage.check_bucket(path)
  if config.data.name != "demo":
    train_data.check_data_dir(config)
  checkpointer.check_workdir(workdir)


def _first_missing(path: str) -> str | None:
  """The outermost folder of `path` that does not exist yet, or None when `path` exists.

  None for a bucket too: it has no folders to make or remove; a run that fails to start
  there has written only its lock, which it removes.
  """
  if storage.is_bucket(path):
    return None
  missing = None
  while not os.path.exists(path):
    missing, parent = path, os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return missing


def _remove_empty_dirs(path: str, up_to: str) -> None:
  """Removes `path` and its parents up to `up_to`, each only while it is empty."""
  while True:
    try:
      os.rmdir(path)
    except OSError:
      return
    if path == up_to:
      return
    path = os.path.dirname(path)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        data: train_data.Data | None, cleanup: contextlib.ExitStack
                        ) -> dict[str, Any]:
  """`train_and_evaluate` once the workdir is this run's; `cleanup` closes what it opens."""
  # ------------------------------------------------------------------ resume check
  is_main = jax.process_index() == 0
  checkpointer.check_resume_config(workdir, config)  # before anything is written

  # ------------------------------------------------------------------ mesh
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.data.eval_batch_size, mesh)
  logging.info("mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size,
               jax.process_count())

  # ------------------------------------------------------------------ data
  # Each process reads only its slice (process_index of process_count) of every global batch.
  data = data or train_data.from_config(config)
  steps_per_epoch = data.steps_per_epoch
  total_steps = steps_per_epoch * config.num_epochs
  if config.max_steps > 0:
    total_steps = min(total_steps, config.max_steps)
  logging.info("data %s: %d train examples, %d steps/epoch, %d eval examples", config.data.name,
               data.num_train, steps_per_epoch, data.num_eval)

  # ------------------------------------------------------------------ model (+ teacher), steps
  # How the models run, decided once from the config and the mesh's devices.
  rt = runtime_lib.for_training(config, runtime_lib.platform_of(mesh.devices.flat[0]))
  logging.info("runtime %s", rt)
  teacher, teacher_host = (load_teacher(config, rt) if config.teacher_checkpoint
                           else (None, None))
  steps = build_steps(config, mesh, steps_per_epoch, teacher, rt)
  teacher_vars = (None if teacher is None else
                  sharding.host_tree_to_global(teacher_host, steps.teacher_shardings))

  # ------------------------------------------------------------------ run record
  # Written only now: a run that cannot start (data not prepared, no teacher, a bad setting)
  # leaves no config.json, metrics or events behind.
  storage.makedirs(workdir)
  if is_main:
    storage.write_atomic(storage.join(workdir, "config.json"),
                         config.to_json_best_effort(indent=2, sort_keys=True))
  writer = metric_writer.MetricWriter(workdir, enabled=is_main)
  cleanup.callback(writer.close)

  # ------------------------------------------------------------------ checkpoint / resume
  ckpt = cleanup.enter_context(checkpointer.TrainCheckpointer(
      workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save))
  ckpt_meta = {"format": ckpt_lib.FORMAT, "model_config": steps.model_config.to_dict(),
               "training": steps.runtime.to_dict(),  # how it was trained, not what it is
               "extra": {"image_size": list(config.data.image_size),
                         "mos_range": data.mos_range, "data": config.data.name,
                         "distilled_from": config.teacher_checkpoint or None}}
  # The newest step that reads; damaged newer ones are moved aside with a warning each.
  restored = ckpt.restore_latest_good(steps.abstract_state.variables,
                                      steps.abstract_state.opt_state)
  if restored is not None:
    latest, variables, opt_state, train_meta = restored
    abstract = steps.abstract_state
    # Host numpy -> a replicated global array (device_put of a host value is multi-host safe).
    state = TrainState(step=jax.device_put(np.asarray(train_meta["step"], np.int32),
                                           abstract.step.sharding),
                       params=variables["params"], batch_stats=variables["batch_stats"],
                       opt_state=opt_state)
    best = dict(train_meta.get("best") or {})
    logging.info("resumed from step %d", latest)
  else:
    state = steps.init_state()
    best = {}
  # Rows a killed run logged after its last checkpoint are re-done now: drop them, so every
  # step appears once in metrics.jsonl.
  writer.rewind(int(jax.device_get(state.step)))

  def save(step: int, metrics: dict[str, float] | None = None) -> None:
    # In a bucket the rows so far are uploaded before each checkpoint: a resume from it
    # never lacks a row (rows past it are dropped by `rewind`).
    writer.flush()
    ckpt.save(step, state.variables, state.opt_state, ckpt_meta,
              {"step": step, "best": best}, metrics=metrics)

  # ------------------------------------------------------------------ loop
  step = int(jax.device_get(state.step))

  def last_good() -> str:
    ckpt.wait()  # a save under way holds a good state: finish it
    latest, lr = ckpt.latest_step(), config.optimizer.lr
    if latest is None:
      return (f"No checkpoint yet. Rerun with a lower learning rate, e.g. "
              f"--config.optimizer.lr={lr / 10:g} (now {lr:g}).")
    return (f"The last good checkpoint is step {latest} in {ckpt.directory}. Lower the "
            f"learning rate, e.g. --config.optimizer.lr={lr / 10:g} (now {lr:g}), with a new "
            f"--workdir (this one's checkpoints resume only with their own optimizer).")
  log = metric_writer.StepLog(
      writer, batch_size=config.batch_size, log_every_steps=config.log_every_steps,
      steps_per_epoch=steps_per_epoch, total_steps=total_steps, initial_step=step,
      lr_at=lambda s: optim.lr_at(config.optimizer, steps_per_epoch, s), on_nonfinite=last_good,
      progress_bar=is_main and config.progress_bar)
  cleanup.callback(log.close)
  preempted = False
  last_eval: dict[str, float] = {}
  with preemption.Preemption() as sigterm:
    while step < total_steps and not preempted:
      epoch, start = divmod(step, steps_per_epoch)
      for batch in data.train_epoch(epoch, start):
        state, m = steps.train_step(state, sharding.host_to_global(batch, mesh), teacher_vars)
        step += 1
        log.add(step, m)  # checks the previous step: one step in flight keeps the device busy
        preempted = sharding.any_process(sigterm.requested)
        if preempted or step >= total_steps:
          break
        if step % config.checkpoint.every_steps == 0 and step % steps_per_epoch:
          log.drain()  # the epoch-end save comes with its evaluation
          save(step)
      log.drain()
      if preempted:
        save(step)
        break
      at_epoch_end = step % steps_per_epoch == 0
      metrics = None
      if step >= total_steps or (at_epoch_end and
                                 (step // steps_per_epoch) % config.eval_every_epochs == 0):
        metrics, _, _ = evaluation.score_batches(steps.eval_step, state.variables,
                                               data.eval_batches(), mesh)
        metrics["epoch"] = float(step // steps_per_epoch)
        last_eval = metrics
        writer.write(step, metrics, "eval")
        logging.info("step %d epoch %d: %s", step, step // steps_per_epoch,
                     " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if np.isfinite(metrics["selection"]) and (
            not best or metrics["selection"] > best["selection"]):
          best = dict(metrics, step=float(step))
      save(step, {"selection": metrics["selection"]}
           if metrics and np.isfinite(metrics["selection"]) else None)
  log.close()
  ckpt.wait()

  # ------------------------------------------------------------------ final report (best)
  summary: dict[str, Any] = {"step": step, "preempted": preempted, "workdir": workdir,
                             "best": best, "last_eval": last_eval}
  if not preempted and best:
    best_path = ckpt_lib.resolve_checkpoint(workdir, which="best")
    host_vars, _ = ckpt_lib.load_variables(best_path)
    best_vars = sharding.host_tree_to_global(
        {k: host_vars[k] for k in ("params", "batch_stats")},
        jax.tree.map(lambda a: a.sharding, steps.abstract_state.variables))
    metrics, pred, mos = evaluation.score_batches(steps.eval_step, best_vars, data.eval_batches(),
                                                mesh)
    summary["best_eval"] = metrics
    if is_main:
      title = (f"{config.name or 'model'} step {storage.basename(best_path)}: "
               f"SROCC {metrics['srocc']:.3f} PLCC {metrics['plcc']:.3f}")
      summary["scatter"] = evaluation.write_outputs(workdir, pred, mos, title, prefix="best_",
                                                  scatter=config.scatter_plot)
      storage.write_atomic(storage.join(workdir, "summary.json"),
                           json.dumps(ckpt_lib.to_plain(summary), indent=2))
  summary["final_params"] = state.params
  return summary


# ============================================================================ model and steps


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree

  @property
  def variables(self) -> dict[str, PyTree]:
    return {"params": self.params, "batch_stats": self.batch_stats}


# The random initialisation runs once per run and compiles to inlined random-number code (a
# threefry and a truncated normal per parameter; the forward pass is dead code): XLA's
# optimisation passes cost more than they save (tiny teacher on a 2-core CPU: 20.6 s -> 13.2 s
# of compile). These are the passes jax_disable_most_optimizations
# turns off, for this one program only.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                         "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass(frozen=True)
class Steps:
  """The model of one run and its jitted steps (see `build_steps`)."""

  model: mobileiqa.MobileIQA
  model_config: mobileiqa.MobileIQAConfig  # what checkpoints store
  runtime: runtime_lib.Runtime  # how the model runs (never stored with it)
  abstract_state: TrainState  # of jax.ShapeDtypeStructs carrying their shardings
  train_step: Callable[..., tuple[TrainState, dict]]  # (state, batch, teacher_vars), donated
  eval_step: Callable[[PyTree, jax.Array], jax.Array]  # (variables, images) -> scores
  teacher_shardings: PyTree  # None without a teacher
  init_variables: Callable[[], PyTree]  # random init + config.init.backbone's weights
  tx: optax.GradientTransformation

  def init_state(self, variables: PyTree | None = None) -> TrainState:
    """Step 0: `variables` (default `init_variables()`) and a fresh optimizer state.

    `variables` ({"params", "batch_stats"}) must be laid out as `abstract_state`'s are (e.g.
    `sharding.host_tree_to_global`), so that the train step compiles once.
    """
    if variables is None:
      variables = self.init_variables()
    shardings = jax.tree.map(lambda a: a.sharding, self.abstract_state)
    opt_state = jax.jit(self.tx.init, out_shardings=shardings.opt_state)(variables["params"])
    return TrainState(step=jax.device_put(np.zeros((), np.int32), shardings.step),
                      params=variables["params"], batch_stats=variables["batch_stats"],
                      opt_state=opt_state)


def build_steps(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                steps_per_epoch: int, teacher: mobileiqa.MobileIQA | None = None,
                runtime: runtime_lib.Runtime | None = None) -> Steps:
  """Builds the model, the optimizer, their shardings on `mesh` and the jitted steps.

  Reads no data and no files (the backbone weights are read by `Steps.init_variables`).
  `teacher` is the frozen teacher of a distillation run (see `load_teacher`). `runtime` is how
  the trained model runs; None: `runtime.for_training(config, <the platform of mesh's
  devices>)`, which for an ahead-of-time mesh is the target's, not this host's.
  """
  if runtime is None:
    runtime = runtime_lib.for_training(config, runtime_lib.platform_of(mesh.devices.flat[0]))
  model_cfg = mobileiqa.MobileIQAConfig.from_dict(config.model.to_dict())
  model = mobileiqa.build_model(model_cfg, runtime)
  tx = optim.make_optimizer(config.optimizer, steps_per_epoch)
  h, w = config.data.image_size
  dummy = jnp.zeros((1, h, w, 3), jnp.float32)

  def init_fn(module, key):
    variables = module.init({"params": key, "dropout": key}, dummy, train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

  def with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)

  key = jax.random.PRNGKey(config.seed)
  abstract_vars = jax.eval_shape(functools.partial(init_fn, model), key)
  abstract_opt = jax.eval_shape(tx.init, abstract_vars["params"])
  # The fsdp rule depends on shape only, so Adam moments get their parameter's sharding and
  # scalars (the step count) stay replicated.
  shardings = TrainState(
      step=sharding.replicated(mesh),
      params=sharding.param_shardings(abstract_vars["params"], mesh, config.fsdp_min_size),
      batch_stats=jax.tree.map(lambda _: sharding.replicated(mesh),
                               abstract_vars["batch_stats"]),
      opt_state=sharding.param_shardings(abstract_opt, mesh, config.fsdp_min_size))
  abstract_state = with_shardings(
      TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_vars["params"],
                 batch_stats=abstract_vars["batch_stats"], opt_state=abstract_opt), shardings)
  var_shardings = {"params": shardings.params, "batch_stats": shardings.batch_stats}

  def init_variables() -> PyTree:
    init = jax.jit(functools.partial(init_fn, model), out_shardings=var_shardings)
    variables = init.lower(key).compile(compiler_options=INIT_COMPILER_OPTIONS)(key)
    loaded = convert.fetch_timm_backbone(config.init.backbone, model_cfg.backbone,
                                         model_cfg.backbone_kwargs,
                                         config.init.get("from_scratch", False))
    if loaded is None:
      return variables
    merged = convert.merge_backbone(sharding.global_to_host(variables),
                                    model_cfg.backbone_name, loaded)
    return sharding.host_tree_to_global(merged, var_shardings)

  teacher_shardings = None
  if teacher is not None:
    t_abstract = jax.eval_shape(functools.partial(init_fn, teacher), key)
    teacher_shardings = {k: sharding.param_shardings(v, mesh, config.fsdp_min_size)
                         for k, v in t_abstract.items()}
    _check_distill_shapes(model, teacher, abstract_vars, t_abstract, dummy)

  train_step = jax.jit(
      make_train_step(model, tx, config, teacher),
      in_shardings=(shardings, sharding.batch_sharding(mesh), teacher_shardings),
      out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))
  eval_step = jax.jit(evaluation.make_eval_step(model),
                      in_shardings=(var_shardings, sharding.batch_sharding(mesh)),
                      out_shardings=sharding.batch_sharding(mesh))
  return Steps(model=model, model_config=model_cfg, runtime=runtime,
               abstract_state=abstract_state,
               train_step=train_step, eval_step=eval_step, teacher_shardings=teacher_shardings,
               init_variables=init_variables, tx=tx)


def load_teacher(config: ml_collections.ConfigDict, runtime: runtime_lib.Runtime
                 ) -> tuple[mobileiqa.MobileIQA, PyTree]:
  """The frozen teacher of `config.teacher_checkpoint`: (module, host variables).

  The teacher may be anything `weights.loader` reads: a checkpoint, a teacher run's workdir
  (its best step), or the authors' `.pkl`. `runtime` is the run's (the teacher computes in
  the run's dtype too; its weights stay as stored), without remat: the teacher is never
  differentiated.
  """
  teacher, host_vars, meta = ckpt_lib.load_model(config.teacher_checkpoint,
                                                 runtime=runtime.frozen())
  logging.info("teacher from %s", meta["path"])
  return teacher, {"params": host_vars["params"], "batch_stats": host_vars["batch_stats"]}


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
      out, new_model_state = model.apply(
          variables, images, train=True, return_features=True, return_fused=True,
          example_mask=mask, rngs={"dropout": rng}, mutable=["batch_stats"])
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


def _check_distill_shapes(student: Any, teacher: Any, abstract_vars: PyTree, t_vars: PyTree,
                          dummy: jax.Array) -> None:
  s = jax.eval_shape(lambda v: student.apply(v, dummy, return_features=True), abstract_vars)
  t = jax.eval_shape(lambda v: teacher.apply(v, dummy, return_features=True), t_vars)
  for name, a, b in (("x", s[0], t[0]), ("DOF", s[1], t[1])):
    if a.shape != b.shape:
      raise ValueError(
          f"distillation needs the student's {name} shape to equal the teacher's: "
          f"{a.shape} vs {b.shape}. Give both the same model.pooled_size and model.width.")
