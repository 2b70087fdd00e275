"""The sharded training step: one `jax.jit` over the mesh (by default (data, fsdp, model)).

`create_train_state` builds parameters and optimizer state directly sharded
(`jax.jit(init, out_shardings=...)`, never whole on one device); `make_train_step`
returns `step(state, batch) -> (state, metrics)` with the state donated. The same code
runs on one CPU, eight GPUs or a pod slice: only the mesh differs. Every function takes
the mesh as a `sharding.MeshLayout` (or a bare Mesh, then described by `config.mesh`)
and an optional optimizer `tx`: a caller that builds both once passes them everywhere.

Gradient accumulation (`config.train.micro_batches > 1`) is GradCache (Gao et al.
2021): a contrastive loss does not decompose over micro-batches, so the step embeds
every micro-batch without gradients, computes the loss of the whole batch once and
its gradient w.r.t. the embeddings, then back-propagates micro-batch by micro-batch
(`jax.vjp`) and sums. The result is the big batch's gradient with one micro-batch of
activations in memory.

Patch masking (FLIP, `mask_ratio > 0`, a static setting of the compiled step): the mask
key of a step is `mask_key(config.seed, step)`, a pure function of the two, so a
resumed run masks exactly as an uninterrupted one; the model draws each example's mask
from it. Under GradCache every micro-batch has its own key (`micro_batch_keys`), the
same in the embedding pass and in the recomputation, so the gradient is that of the
masked batch. With `mask_ratio = 0` no key is made and the step is the plain one.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clip_jax import losses, optim, sharding
from clip_jax.models.clip import dummy_inputs
from clip_jax.models.params import flatten_names
from clip_jax.models.vit import MASK_RNG
from clip_jax.sharding import MeshLayout

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. `loss_params` holds parameters of the loss (SigLIP's
  bias), not of the model; `batch_stats` the ResNet's BatchNorm statistics ({} for ViT)."""
  step: jax.Array
  params: Any
  loss_params: Any
  opt_state: Any
  batch_stats: Any

  @property
  def trainable(self) -> dict[str, Any]:
    """The tree the optimizer sees; optimizer rules match names under these two keys."""
    return {'params': self.params, 'loss_params': self.loss_params}


def _init_fn(config: Any, model: nn.Module, tx: optax.GradientTransformationExtraArgs
             ) -> Callable[[jax.Array], tuple[TrainState, Any]]:
  """rng -> (state, the model's variables still in their boxes): the boxes carry the
  logical axis names that place the state, so one trace gives shapes and names."""
  def init(rng: jax.Array) -> tuple[TrainState, Any]:
    boxed = model.init(rng, *dummy_inputs(config.model))
    variables = nn.meta.unbox(boxed)
    params = variables['params']
    loss_params = losses.init_loss_params(config.loss)
    opt_state = tx.init({'params': params, 'loss_params': loss_params})
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, loss_params=loss_params,
                       opt_state=opt_state, batch_stats=variables.get('batch_stats', {}))
    return state, boxed
  return init


def train_state_shardings(config: Any, model: nn.Module, mesh: Mesh | MeshLayout,
                          tx: optax.GradientTransformationExtraArgs | None = None
                          ) -> tuple[TrainState, TrainState]:
  """(abstract state of ShapeDtypeStructs, state of NamedShardings), allocating nothing.

  Parameters are placed by the layout's rules from their logical axis names; Adam's
  moments follow their parameter; BatchNorm statistics, loss parameters and counters
  are replicated. A checkpoint restore can use both trees directly.
  """
  layout = sharding.as_layout(mesh, config.mesh)
  tx = optim.make_optimizer(config) if tx is None else tx
  abstract, boxed = jax.eval_shape(_init_fn(config, model, tx), jax.random.key(0))
  logical = sharding.logical_axes_of(boxed)
  param_specs = sharding.tree_partition_specs(abstract.params, logical['params'], layout.mesh,
                                              layout.rules)
  replicate = lambda tree: jax.tree_util.tree_map(lambda _: P(), tree)
  trainable_specs = {'params': param_specs, 'loss_params': replicate(abstract.loss_params)}
  named_specs = flatten_names(trainable_specs)
  named_shapes = {n: leaf.shape for n, leaf in flatten_names(
      {'params': abstract.params, 'loss_params': abstract.loss_params}).items()}
  specs = TrainState(
      step=P(), params=param_specs, loss_params=trainable_specs['loss_params'],
      opt_state=sharding.specs_by_name_suffix(abstract.opt_state, named_specs, named_shapes),
      batch_stats=replicate(abstract.batch_stats))
  return abstract, sharding.to_named_shardings(specs, layout.mesh)


def create_train_state(config: Any, model: nn.Module, mesh: Mesh | MeshLayout, rng: jax.Array,
                       tx: optax.GradientTransformationExtraArgs | None = None
                       ) -> tuple[TrainState, TrainState]:
  """(state, state_shardings): every array created on its devices by one jitted init."""
  tx = optim.make_optimizer(config) if tx is None else tx
  _, shardings = train_state_shardings(config, model, mesh, tx)
  init = _init_fn(config, model, tx)
  state = jax.jit(lambda r: init(r)[0], out_shardings=shardings)(rng)
  return state, shardings


def describe_train_state(config: Any, state: TrainState, shardings: TrainState) -> list[str]:
  """Start-up log lines: decay / LR multiplier / freezing per leaf, then placement."""
  lines = optim.describe_param_groups(config, state.trainable)
  lines.append('placement (mesh axes per dimension):')
  lines += sharding.describe_shardings(
      state.params, jax.tree_util.tree_map(lambda s: s.spec, shardings.params))
  return lines


def _frozen_statistics(optim_config: Any, batch_stats: Any) -> Any:
  """Tree of bools over BatchNorm statistics: True where the layer's own gain is frozen."""
  names = flatten_names(batch_stats)
  frozen = [optim.is_frozen(optim_config, 'params/' + name.rsplit('/', 1)[0] + '/scale')
            for name in names]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(batch_stats), frozen)


def mask_key(seed: int, step: jax.Array) -> jax.Array:
  """The patch-mask key of the update made at `step` (the state's step counter before it)."""
  return jax.random.fold_in(jax.random.key(seed), step)


def micro_batch_keys(key: jax.Array, micro_batches: int) -> jax.Array:
  """One mask key per GradCache micro-batch (stacked): both passes over micro-batch m use
  the m-th, so the recomputed features are those the loss saw."""
  return jax.vmap(lambda m: jax.random.fold_in(key, m))(jnp.arange(micro_batches))


def _embed_fn(model: nn.Module, optim_config: Any, mask_ratio: float = 0.0
              ) -> Callable[..., tuple[tuple[jax.Array, jax.Array], Any]]:
  """(params, batch_stats, images, texts, key) -> ((image_features, text_features),
  batch_stats); `key` is the mask key (None when `mask_ratio` is 0).

  L2-normalised features in training mode; BatchNorm statistics are updated when the
  model has them (ResNet) and passed through otherwise. A frozen BatchNorm layer
  (`config.optim.freeze` matches its gain) keeps its statistics; when every one is
  frozen (a locked ResNet image tower, LiT) the tower normalises with its running
  statistics, as PyTorch's frozen BatchNorm does, so it computes what it will at eval.
  """
  def embed(params, batch_stats, images, texts, key):
    # Unmasked, the model is called as it always was (no key, no extra argument).
    masking = dict(mask_ratio=mask_ratio, rngs={MASK_RNG: key}) if mask_ratio else {}
    if not batch_stats:
      image, text, _ = model.apply({'params': params}, images, texts, train=True, **masking)
      return (image, text), batch_stats
    frozen = _frozen_statistics(optim_config, batch_stats)
    variables = {'params': params, 'batch_stats': batch_stats}
    if all(jax.tree_util.tree_leaves(frozen)):
      image, text, _ = model.apply(variables, images, texts, train=False)
      return (image, text), batch_stats
    (image, text, _), updates = model.apply(variables, images, texts, train=True,
                                            mutable=['batch_stats'], **masking)
    kept = jax.tree_util.tree_map(lambda f, old, new: old if f else new, frozen,
                                  batch_stats, updates['batch_stats'])
    return (image, text), kept
  return embed


def make_grad_fn(config: Any, model: nn.Module, mesh: Mesh | MeshLayout,
                 mask_ratio: float = 0.0
                 ) -> Callable[..., tuple[jax.Array, Metrics, Any, dict[str, Any]]]:
  """`grads(trainable, batch_stats, batch, key=None) -> (loss, metrics, batch_stats, grads)`.

  `trainable` is `TrainState.trainable`. With `config.train.micro_batches = M > 1`
  the gradient is GradCache's, equal to the full batch's. `mask_ratio > 0` drops that
  share of image patches, drawn from the mask `key` (`mask_key`). Not jitted: call it
  inside jit.
  """
  layout = sharding.as_layout(mesh, config.mesh)
  loss_fn = losses.make_loss(config.loss, layout)
  embed = _embed_fn(model, config.optim, mask_ratio)
  micro = int(config.train.micro_batches)
  constrain = lambda x: jax.lax.with_sharding_constraint(
      x, sharding.batch_sharding(layout, x.ndim))

  def loss_of_features(image, text, trainable):
    return loss_fn(constrain(image), constrain(text), trainable['params']['logit_scale'],
                   trainable['loss_params'])

  def full_batch(trainable, batch_stats, images, texts, key):
    def loss_of(trainable):
      features, new_stats = embed(trainable['params'], batch_stats, images, texts, key)
      loss, metrics = loss_of_features(*features, trainable)
      return loss, (metrics, new_stats)
    (loss, (metrics, new_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
    return loss, metrics, new_stats, grads

  def split(x):
    # Row k*M + m goes to micro-batch m: each device keeps its own rows, no transfer.
    x = x.reshape(x.shape[0] // micro, micro, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(layout.mesh, P(None, layout.batch_axes, *([None] * (x.ndim - 2)))))

  def merge(x):
    return constrain(x.swapaxes(0, 1).reshape(-1, *x.shape[2:]))

  def grad_cache(trainable, batch_stats, images, texts, key):
    params = trainable['params']
    frozen_params = jax.lax.stop_gradient(params)
    keys = None if key is None else micro_batch_keys(key, micro)   # scanned with the rows

    def embed_micro(stats, micro_batch):
      features, stats = embed(frozen_params, stats, *micro_batch)
      return stats, features
    new_stats, (image, text) = jax.lax.scan(embed_micro, batch_stats,
                                            (split(images), split(texts), keys))
    image, text = merge(image), merge(text)
    (loss, metrics), (g_image, g_text, grads) = jax.value_and_grad(
        loss_of_features, argnums=(0, 1, 2), has_aux=True)(image, text, trainable)

    def backprop_micro(acc, micro_batch):
      micro_images, micro_texts, micro_key, g_micro_image, g_micro_text = micro_batch
      # Training-mode BatchNorm normalises by the micro-batch's own statistics, and the
      # micro-batch's mask key is the first pass's, so the recomputed features equal
      # those of the first pass.
      _, vjp = jax.vjp(
          lambda p: embed(p, batch_stats, micro_images, micro_texts, micro_key)[0], params)
      (g_params,) = vjp((g_micro_image, g_micro_text))
      return jax.tree_util.tree_map(jnp.add, acc, g_params), None
    g_params, _ = jax.lax.scan(
        backprop_micro, jax.tree_util.tree_map(jnp.zeros_like, params),
        (split(images), split(texts), keys, split(g_image), split(g_text)))
    grads = dict(grads, params=jax.tree_util.tree_map(jnp.add, grads['params'], g_params))
    return loss, metrics, new_stats, grads

  def grad_fn(trainable, batch_stats, batch, key=None):
    if mask_ratio and key is None:
      raise ValueError(f'make_grad_fn: mask_ratio {mask_ratio} needs a mask key (mask_key)')
    images, texts = constrain(batch['image']), constrain(batch['text'])
    global_batch = images.shape[0]
    data_parallel = layout.data_parallel_size
    if global_batch % (micro * data_parallel):
      raise ValueError(
          f'config.train.micro_batches: the global batch {global_batch} must split into '
          f'{micro} micro-batches x {data_parallel} data-parallel devices evenly')
    if micro > 1:
      return grad_cache(trainable, batch_stats, images, texts, key)
    return full_batch(trainable, batch_stats, images, texts, key)
  return grad_fn


def make_train_step(config: Any, model: nn.Module, mesh: Mesh | MeshLayout,
                    state_shardings: TrainState,
                    tx: optax.GradientTransformationExtraArgs | None = None,
                    mask_ratio: float = 0.0
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """The jitted step `(state, batch) -> (state, metrics)`; the input state is donated.

  `batch` holds global arrays 'image' [B, H, W, 3] and 'text' [B, L] (other keys are
  ignored); H = W may be any multiple of the patch size and L <= the context length
  (a stage of config.train.stages). `mask_ratio` (static): the share of image patches
  each example drops, from `mask_key(config.seed, state.step)`. Metrics are replicated
  scalars: loss, accuracy (in-batch retrieval, both directions), temperature (after
  the update), grad_norm (trainable leaves, before clipping), learning_rate (the one
  this step used).
  """
  layout = sharding.as_layout(mesh, config.mesh)
  tx = optim.make_optimizer(config) if tx is None else tx
  schedule = optim.learning_rate_schedule(config.optim, config.total_steps)
  grad_fn = make_grad_fn(config, model, layout, mask_ratio)
  seed = int(config.seed)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    trainable = state.trainable
    key = mask_key(seed, state.step) if mask_ratio else None
    loss, metrics, batch_stats, grads = grad_fn(trainable, state.batch_stats, batch, key)
    # The norm is computed once: the metric, and the clip's (optim.clip_by_trainable_norm).
    grad_norm = optim.trainable_norm(config.optim, grads)
    updates, opt_state = tx.update(grads, state.opt_state, trainable, grad_norm=grad_norm)
    # The optimizer's last transform keeps logit_scale in [0, ln 100] (optim.clamp_logit_scale).
    trainable = optax.apply_updates(trainable, updates)
    params = trainable['params']
    metrics = dict(metrics, loss=loss,
                   temperature=jnp.exp(params['logit_scale']),
                   grad_norm=grad_norm,
                   learning_rate=schedule(state.step))
    new_state = TrainState(step=state.step + 1, params=params,
                           loss_params=trainable['loss_params'], opt_state=opt_state,
                           batch_stats=batch_stats)
    return new_state, metrics

  return jax.jit(step, out_shardings=(state_shardings, sharding.replicated(layout)),
                 donate_argnums=(0,))
