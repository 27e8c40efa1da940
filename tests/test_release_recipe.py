"""The released code's recipe (docs/reproducing.md): last partial batch, split, init, resize."""

from __future__ import annotations

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mobileiqa_jax.training import sharding
from mobileiqa_jax.training import trainer
from mobileiqa_jax.data import releases
from mobileiqa_jax.data import preprocess
from mobileiqa_jax.models import layers
from mobileiqa_jax.models import mobileiqa
from mobileiqa_jax.models import runtime
from support import IMAGENET_MEAN, IMAGENET_STD, rel_err, tiny_config
import data_fixtures


def _step_results(config, batch):
  """(loss, params, batch_stats) after one jitted train step from the seeded init."""
  mesh = sharding.make_mesh(config.mesh)
  steps = trainer.build_steps(config, mesh, steps_per_epoch=2)
  state = steps.init_state()
  state, m = steps.train_step(state, sharding.host_to_global(batch, mesh), None)
  return jax.device_get((m["loss"], m["score_mse"], m["grad_norm"], state.params,
                         state.batch_stats))


def test_masked_batch_norm_equals_batch_norm_of_the_real_examples():
  """BatchNorm2d under a mask: outputs, running statistics and gradients of the real rows."""
  rng = np.random.default_rng(1)
  real = rng.normal(2.0, 3.0, size=(3, 2, 2, 4)).astype(np.float32)
  padded = np.concatenate([real, np.zeros((5, 2, 2, 4), np.float32)])
  mask = np.arange(8) < 3
  bn = layers.BatchNorm2d(use_running_average=False)
  variables = bn.init(jax.random.PRNGKey(0), real)
  variables = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=4), jnp.float32)},
               "batch_stats": variables["batch_stats"]}

  def run(x, m):
    def f(params):
      y, new = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                        example_mask=m, mutable=["batch_stats"])
      # A loss over the real rows only, weighting them differently so gradients are not 0.
      return jnp.sum(jnp.square(y[:3]) * jnp.arange(1.0, 4.0)[:, None, None, None]), (y, new)
    (_, (y, new)), g = jax.value_and_grad(f, has_aux=True)(variables["params"])
    return y[:3], new["batch_stats"], g

  got = run(jnp.asarray(padded), jnp.asarray(mask))
  want = run(jnp.asarray(real), None)
  unmasked = run(jnp.asarray(padded), None)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  # The padding does change plain BatchNorm, so the mask is what makes them agree.
  assert not np.allclose(unmasked[0], want[0], atol=1e-2)
  # PyTorch's reference numbers for the real rows alone (unbiased running variance).
  torch = pytest.importorskip("torch")
  tbn = torch.nn.BatchNorm2d(4)
  with torch.no_grad():
    tbn.weight.copy_(torch.from_numpy(np.asarray(variables["params"]["scale"])))
    tbn.bias.copy_(torch.from_numpy(np.asarray(variables["params"]["bias"])))
  ty = tbn.train()(torch.from_numpy(real.transpose(0, 3, 1, 2))).detach().numpy()
  np.testing.assert_allclose(got[0], ty.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1]["var"], tbn.running_var.numpy(), rtol=1e-5)
  np.testing.assert_allclose(got[1]["mean"], tbn.running_mean.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # two whole models traced with gradients (~80 CPU s); the masked
# BatchNorm itself is checked against PyTorch above
@pytest.mark.parametrize("backbone,kwargs,hw,remat,grads", [
    ("mobilenetv3_small_050", {"depth_multiplier": 0.1}, (64, 64), "block", True),
    ("mobilevitv2_050", {}, (64, 64), "stage", False),
])
def test_example_mask_reaches_every_batch_norm_of_the_model(backbone, kwargs, hw, remat, grads,
                                                            fast_compile):
  """The train step's call, `apply(..., train=True, example_mask=mask)`, through remat.

  A padded batch with its mask gives the real examples' features, score and running
  statistics as the real examples alone do: every BatchNorm of the backbone, inside the
  remat-wrapped stages or blocks too, counts only them. The student backbone also compares
  parameter gradients (the remat wrappers' backward pass); the teacher's runs forward only
  (its remat wrappers take the mask there as well), to keep the compiles short.
  """
  rng = np.random.default_rng(2)
  real, pad = 3, 2
  model = mobileiqa.build_model(
      mobileiqa.model_config("teacher", backbone=backbone, backbone_kwargs=kwargs, width=16,
                             pooled_size=6, num_mals=1, regressor_pool=2, dropout_rate=0.0),
      runtime.Runtime(remat=remat))
  images = rng.normal(size=(real, *hw, 3)).astype(np.float32)
  padded = np.concatenate([images, rng.normal(size=(pad, *hw, 3)).astype(np.float32)])
  mask = np.arange(real + pad) < real
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])

  def loss(params, x, m):
    (feats, _, score, _), new = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
        return_features=True, return_fused=True, rngs={"dropout": jax.random.PRNGKey(1)},
        mutable=["batch_stats"], example_mask=m)
    # Only the real rows enter the loss, each weighted differently.
    w = jnp.arange(1.0, real + 1.0)
    value = jnp.sum(score[:real] * w) + jnp.sum(jnp.mean(feats[:, :real], (0, 2, 3, 4)) * w)
    return value, (feats[:, :real], score[:real], new["batch_stats"])

  def run(x, m):
    if grads:
      (_, aux), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"], x, m)
      aux = (*aux, g)
    else:
      _, aux = jax.jit(loss)(variables["params"], x, m)
    flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])
    return [flat(t) for t in jax.device_get(aux)]

  got = run(padded, mask)
  want = run(images, None)
  # Every example counted: the same program as `got`'s, so no further compile.
  unmasked = run(padded, np.ones_like(mask))
  names = ("features", "score", "batch_stats", "grads")[:len(got)]
  # Float32 rounding of sums over 5 rows against 3: up to ~4e-6 here (features).
  for name, g, w in zip(names, got, want):
    assert rel_err(g, w) <= 1e-4, (name, rel_err(g, w))
  # The padding changes plain BatchNorm (by 1e-2 to 0.7 here), so the mask is what makes them
  # agree. The score of a freshly initialised head hardly depends on its input.
  for name, u, w in zip(names, unmasked, want):
    if name != "score":
      assert rel_err(u, w) > 1e-3, (name, rel_err(u, w))


@pytest.mark.slow
def test_padded_last_batch_step_equals_the_small_batch_step():
  """Padding + mask gives exactly PyTorch's smaller last batch: loss, BN statistics, update.

  Slow (two train-step compiles, minutes on a 2-core CPU). The parameters agree to
  float32 rounding of a backward pass through BatchNorm over 5 examples, compared over the
  whole tree (max abs difference / max abs value, as test_sharding does): per element, the
  rounding of 8 rows against 5 decides the updates of near-zero gradients. On a 2-core CPU
  the difference is 8.9e-6 with the mask and 0.46 without it (the bound is 1e-4); without
  the mask the loss itself differs at the first digit. An element-wise rtol 1e-4 / atol 1e-5
  is too tight: one kernel element of 144 differs by 2.0e-5 from rounding alone.
  """
  # No dropout (its masks depend on the batch shape). Adam with eps 1 and lr 1 makes the
  # first update g / (|g| + 1): the parameters then carry the gradients, not their signs.
  c = tiny_config("teacher", **{"model.dropout_rate": 0.0, "optimizer.lr": 1.0,
                                "optimizer.eps": 1.0, "optimizer.weight_decay": 0.0})
  rng = np.random.default_rng(0)
  h, w = c.data.image_size
  real = 5
  images = rng.normal(size=(real, h, w, 3)).astype(np.float32)
  mos = rng.uniform(size=(real,)).astype(np.float32)
  pad = c.batch_size - real
  padded = {"image": np.concatenate([images, np.zeros((pad, h, w, 3), np.float32)]),
            "mos": np.concatenate([mos, np.zeros((pad,), np.float32)]),
            "mask": np.arange(c.batch_size) < real}
  small = {"image": images, "mos": mos}
  got = _step_results(c, padded)
  want = _step_results(c, small)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
  np.testing.assert_allclose(got[2], want[2], rtol=1e-5)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  rel = rel_err(flat(got[3:]), flat(want[3:]))
  assert rel <= 1e-4, rel


def test_reference_split_is_the_released_codes():
  train_idx, test_idx = releases.reference_split(4269)
  assert (len(train_idx), len(test_idx)) == (3415, 854)
  # The first ten train indices the released code's training log prints.
  assert train_idx[:10] == [3361, 3322, 485, 1182, 1743, 136, 3641, 702, 2429, 2448]
  assert sorted(train_idx + test_idx) == list(range(4269))
  # An independent computation, as the released train.py does it (global random state).
  state = random.getstate()
  try:
    for n in (4269, 1162, 586):
      random.seed(3407)
      order = list(range(n))
      random.shuffle(order)
      cut = int(round(0.8 * n))
      assert releases.reference_split(n) == (order[:cut], order[cut:])
  finally:
    random.setstate(state)
  assert releases.reference_split(10, seed=1) != releases.reference_split(10)


def _head_leaves(head_init, only_lda=False):
  """{(name, kernel shape): values} of the head's Conv/Linear variables at the paper's sizes.

  Values of layers of the same shape are pooled (e.g. the five views' qConv biases). The
  LDA reads the teacher's widest feature (1024 channels); the 5-view MAL has the 2420-wide
  pixel-branch and 1280-wide channel-branch Linear layers.
  """
  from mobileiqa_jax.models.mal import MAL  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models.mobileiqa import LDA  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.models.mobileiqa import Regressor  # pylint: disable=g-import-not-at-top
  modules = [(LDA(256, 22, head_init=head_init), np.zeros((1, 23, 23, 1024), np.float32))]
  if not only_lda:
    modules += [
        (Regressor(4, 256, head_init=head_init), np.zeros((1, 22, 22, 256), np.float32)),
        (MAL(5, head_init=head_init), np.zeros((5, 1, 22, 22, 256), np.float32))]
  pooled = {}
  for seed, (module, x) in enumerate(modules):
    # lazy_init: the variables without running the forward pass.
    params = module.lazy_init(jax.random.PRNGKey(seed),
                              jax.ShapeDtypeStruct(x.shape, x.dtype))["params"]
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
      name = path[-1].key
      if name in ("kernel", "bias"):
        # The bias is keyed by its layer's kernel shape (fan_in lives there).
        kernel_shape = _sibling_kernel_shape(params, path)
        pooled.setdefault((name, kernel_shape), []).append(np.asarray(leaf).ravel())
  return {k: np.concatenate(v) for k, v in pooled.items()}


def _sibling_kernel_shape(params, path):
  node = params
  for p in path[:-1]:
    node = node[p.key]
  return tuple(node["kernel"].shape)


def _torch_samples(torch, name, kernel_shape, count):
  """`count` values of a fresh torch layer's weight or bias for that (Flax) kernel shape."""
  values = []
  while sum(v.size for v in values) < count:
    if len(kernel_shape) == 4:  # HWIO
      kh, _, cin, cout = kernel_shape
      layer = torch.nn.Conv2d(cin, cout, kh)
    else:
      layer = torch.nn.Linear(*kernel_shape)
    values.append((layer.weight if name == "kernel" else layer.bias).detach().numpy().ravel())
  return np.concatenate(values)[:count]


@pytest.mark.torch
def test_head_init_matches_pytorch_defaults_per_layer():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  ours = _head_leaves("torch")
  assert len(ours) == 20  # (kernel, bias) of every distinct Conv/Linear shape of the head
  for (name, shape), values in sorted(ours.items()):
    ref = _torch_samples(torch, name, shape, max(values.size, 4000))
    bound = 1.0 / np.sqrt(np.prod(shape[:-1]))  # fan_in = kh * kw * in (HWIO) or in
    # Same support as PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weights and biases.
    assert np.abs(values).max() <= bound * (1 + 1e-6), (name, shape)
    assert np.abs(ref).max() <= bound * (1 + 1e-6), (name, shape)
    if values.size >= 500:  # enough values for a sample std within a few percent
      ratio = values.std() / ref.std()
      assert abs(ratio - 1) < 0.1, (name, shape, ratio)
    elif values.size >= 8:  # a few dozen values: spread over the interval, not zero
      assert values.std() > 0.3 * bound, (name, shape)
    else:  # the score layer's single bias
      assert values.all(), (name, shape)
  # Flax's default is the switch's other side: lecun_normal kernels (sqrt(3) x the std),
  # zero biases.
  for (name, shape), values in _head_leaves("flax", only_lda=True).items():
    if name == "bias":
      assert not values.any()
    elif values.size >= 500:
      ratio = values.std() / ours[(name, shape)].std()
      assert abs(ratio - np.sqrt(3)) < 0.2, (name, shape, ratio)


LIVEC_JPG = data_fixtures.LIVEC_JPG


@pytest.mark.torch
def test_release_preprocessing_equals_pil_bicubic_then_torchvision_resize():
  """The released code's path on real photos: PIL bicubic to 1907x1231, Resize((512, 512))."""
  pytest.importorskip("torch")
  transforms = pytest.importorskip("torchvision.transforms")
  photos = sorted((LIVEC_JPG / "Images").glob("*"))[:3]
  if not photos:
    pytest.skip(f"no photos under {LIVEC_JPG}/Images")
  reference = transforms.Compose([
      transforms.Resize((512, 512)), transforms.ToTensor(),
      transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])
  for path in photos:
    img = Image.open(path).convert("RGB")
    want = reference(img.resize([1907, 1231])).numpy().transpose(1, 2, 0)
    got = preprocess.resize_normalize(preprocess.decode_rgb(path.read_bytes(), str(path)),
                                      (512, 512), pre_resize_hw=(1231, 1907))
    # Within uint8 rounding (one grey level is 1/255/std ~ 0.017); measured bit-identical.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # The paper's single bicubic resize to 512x512 gives other pixels.
    direct = preprocess.resize_normalize(preprocess.decode_rgb(path.read_bytes(), str(path)),
                                         (512, 512))
    assert np.abs(direct - want).max() > 0.05


def test_release_configs_select_the_released_protocol():
  from configs import student as student_config  # pylint: disable=g-import-not-at-top
  from configs import teacher as teacher_config  # pylint: disable=g-import-not-at-top
  for get in (teacher_config.get_config, student_config.get_config):
    paper, release = get("uhd_iqa"), get("uhd_iqa_release")
    # The default stays the paper's setting: official splits, 1231x1907, shuffled.
    assert paper.data.split == "stored" and tuple(paper.data.image_size) == (1231, 1907)
    assert paper.data.eval_split == "validation" and paper.data.shuffle
    assert paper.data.drop_remainder and not any(paper.data.pre_resize)
    assert release.data.name == "uhd_iqa" and release.data.split == "reference"
    assert release.data.reference_rows == "train" and release.data.reference_count == 4269
    assert tuple(release.data.image_size) == (512, 512)
    assert tuple(release.data.pre_resize) == (1231, 1907)
    assert release.data.eval_split == "test"  # the best epoch is picked on the test split
    assert not release.data.shuffle and not release.data.drop_remainder
    assert paper.model.head_init == release.model.head_init == "torch"
    assert release.init.backbone == paper.init.backbone
    for name, rows in (("livec", 1162), ("koniq10k", 10073), ("spaq", 11125), ("bid", 586)):
      r = get(f"{name}_release")
      assert (r.data.name, r.data.reference_count, r.data.reference_rows) == (name, rows, "")
      assert tuple(r.data.image_size) == (512, 512) and not any(r.data.pre_resize)
  assert teacher_config.get_config().init.backbone == "mobilevitv2_200.cvnets_in1k"
  assert student_config.get_config().init.backbone == "mobilenetv3_large_100.ra_in1k"
  assert student_config.get_config("uhd_iqa_release").teacher_checkpoint == (
      "runs/teacher_uhd_iqa_release")
  # The demo keeps the init its measured figures were reached with.
  assert teacher_config.get_config("demo").model.head_init == "flax"


def test_release_variant_loader_fixed_order_and_last_partial_batch():
  from configs import teacher as teacher_config  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.training import train_data  # pylint: disable=g-import-not-at-top
  from mobileiqa_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  c = teacher_config.get_config("uhd_iqa_release")
  c.data.image_size, c.data.pre_resize = (12, 16), (24, 32)  # small; the logic is the same
  c.data.num_workers = 1
  n = 21  # 2 full batches of 8 and a last one of 5
  images = [data_fixtures.image_bytes(i, (40, 30)) for i in range(n)]
  src = pipeline.memory_source(images, [i / n for i in range(n)])
  data = train_data.loaders(src, src, c)
  assert data.steps_per_epoch == 3
  epochs = [list(data.train_epoch(e)) for e in (0, 1)]
  for batches in epochs:
    assert [b["image"].shape[0] for b in batches] == [8, 8, 8]  # one compiled shape
    assert [int(b["mask"].sum()) for b in batches] == [8, 8, 5]
  # The same order both epochs: each position's image only differs by the random flips.
  order = [b["index"].tolist() for e in (0, 1) for b in data.train.iter_epoch(e)]
  assert order[:3] == order[3:] and sum(order[:3], [])[:n] == list(range(n))
  # The two-step resize reaches the training images.
  record = src[0]
  img = preprocess.decode_rgb(record["image"], record["name"])
  want = preprocess.resize_normalize(img, (12, 16), pre_resize_hw=(24, 32))
  first = epochs[0][0]["image"][0]
  assert any(np.array_equal(first, f) for f in (want, want[:, ::-1], want[::-1],
                                                 want[::-1, ::-1]))
