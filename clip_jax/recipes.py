"""The paper's training recipes, and their small CPU variant, for `configs/<arch>.py`.

Numbers from Radford et al. 2021, Appendix F (Tables 18-20). Each config file calls
`get_config(arch, arg, ...)` with what it needs to fit the hardware (mesh, scan, remat);
`--config=configs/<arch>.py:local` selects `local_variant`.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from clip_jax import config as base
from clip_jax.models.architectures import canonical_name

BATCH_SIZE = 32_768
TOTAL_STEPS = 390_625            # 32 epochs of WIT's 400M pairs at BATCH_SIZE
WARMUP_STEPS = 2_000
WEIGHT_DECAY = 0.2
ADAM = {'resnet': dict(b1=0.9, b2=0.999, eps=1e-8),
        'vit': dict(b1=0.9, b2=0.98, eps=1e-6)}
LEARNING_RATE = {'RN50': 5e-4, 'RN101': 5e-4, 'RN50x4': 5e-4, 'RN50x16': 4e-4,
                 'RN50x64': 3.6e-4, 'ViT-B/32': 5e-4, 'ViT-B/16': 5e-4, 'ViT-L/14': 4e-4,
                 'ViT-L/14@336': 2e-5}
# ViT-L/14@336 is ViT-L/14 trained one more epoch at 336 px.
STEPS = {'ViT-L/14@336': 12_207}

# --config=configs/<arch>.py:local
LOCAL_BATCH = 2                  # the smallest batch a contrastive loss learns from
LOCAL_STEPS = 3


def paper_config(arch: str, mesh: tuple[int, int, int] = (-1, 1, 1),
                 micro_batches: int = 1, **model_options: Any) -> ml_collections.ConfigDict:
  """The paper's run of `arch`: batch, steps, AdamW, warmup + cosine, bfloat16 compute.

  `mesh` (data, fsdp, model), `micro_batches` (GradCache) and `model_options`
  (scan_layers, remat_policy) are what the model needs to fit; they change no result.
  """
  arch = canonical_name(arch)
  config = base.get_config(arch, dtype='bfloat16', **model_options)
  config.batch_size = BATCH_SIZE
  config.total_steps = STEPS.get(arch, TOTAL_STEPS)
  config.optim.update(learning_rate=LEARNING_RATE[arch], warmup_steps=WARMUP_STEPS,
                      end_lr_factor=0.0, weight_decay=WEIGHT_DECAY,
                      **ADAM[config.model.vision.type])
  config.mesh.shape = tuple(mesh)
  config.train.micro_batches = micro_batches
  return config


def local_variant(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same model, dtype and optimizer for LOCAL_STEPS steps on one CPU device: the first
  steps of the real run's warmup, on the built-in scenes drawn at the model's image size,
  then zero-shot on 2 held-out scenes."""
  config.batch_size = LOCAL_BATCH
  config.total_steps = LOCAL_STEPS
  config.train.micro_batches = 1
  config.builtin.update(enabled=True, num_train=64, num_shards=2)
  # The built-in SentencePiece tokenizer (trained with the model's 49,408 vocabulary as
  # its upper bound) ends texts with id 3, not the largest id as OpenAI's BPE does.
  config.model.update(text_pool='eot_id', eot_token_id=3)
  config.data.update(shuffle_buffer=64, cycle_length=2, prefetch=1, device_prefetch=1)
  # 36 class names, one prompt each: the text tower runs 36 times, not 36 x 4.
  config.eval.update(zeroshot='builtin', max_examples=2, batch_size=2, templates='classname')
  config.checkpoint.update(every_steps=LOCAL_STEPS, keep=1, async_save=False)
  config.log.update(every_steps=1, tensorboard=False)
  return config


def get_config(arch: str, arg: str | None = None, **options: Any) -> ml_collections.ConfigDict:
  """`paper_config(arch, **options)`; `arg='local'` (`--config=FILE:local`) the CPU variant."""
  config = paper_config(arch, **options)
  if arg in (None, ''):
    return config
  if arg == 'local':
    return local_variant(config)
  raise ValueError(f'--config=configs/...py:{arg}: unknown variant {arg!r}; expected none '
                   "or 'local'")
