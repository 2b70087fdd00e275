r"""RN50x64: 64x compute scaling of RN50 at 448 px, the largest ResNet. 623,258,305 parameters.

The paper's run (its numbers: clip_jax/recipes.py) on img2dataset .tar shards, on a TPU
v5p-512 (256 chips, 128 pairs each), FSDP:
  python -m clip_jax.main --config=configs/rn50x64.py --workdir=gs://my-bucket/rn50x64 \
      --config.data.train.pattern='gs://my-bucket/shards/*.tar'
about 7 days (an estimate: 2.1e22 model FLOPs at 40% of the v5p's bf16 peak, plus a third
for the recomputation). Expected: OpenAI's weights reach 73.9% zero-shot ImageNet top-1
(the run's, by
`python -m clip_jax.evaluate --workdir=gs://my-bucket/rn50x64 --task=zeroshot
--dataset=tfds:imagenet2012 --data_dir=DATA_DIR`).

FSDP shards the 10 GB of float32 parameters and Adam moments; each bottleneck is
recomputed in the backward pass (an estimated 2.8 GiB of saved activations per pair
without remat, 0.4 GiB with it). The paper: 18 days on 592 V100s.

The same recipe on a CPU: 3 steps of 2 built-in scenes, then zero-shot on 2 held-out ones.
It needs more than 20 GB of memory (the float32 parameters, Adam moments and gradients
alone are 10 GB; the process was at 19.7 GB when a 24 GB 2-core VM shared with other
jobs ran out of memory, 2026-12-01), so it is not among the variants CI trains:
  python -m clip_jax.main --config=configs/rn50x64.py:local --workdir=./rn50x64_local
"""

import ml_collections

from clip_jax import recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return recipes.get_config('RN50x64', arg, mesh=(1, -1, 1), remat_policy='full')
