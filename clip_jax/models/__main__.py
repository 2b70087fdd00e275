"""`python -m clip_jax.models`: print the model zoo with parameter counts (no allocation)."""

from __future__ import annotations

import argparse

from clip_jax.models.architectures import ARCHITECTURES, model_config
from clip_jax.models.clip import count_params, param_shapes


def zoo_table() -> str:
  rows = ['| model | image tower | image size | embed dim | parameters | image / text |',
          '|---|---|---|---|---|---|']
  for name in ARCHITECTURES:
    cfg = model_config(name)
    params = param_shapes(cfg)['params']
    v = cfg.vision
    tower = (f'ViT {v.layers}x{v.width}, patch {v.patch_size}' if v.type == 'vit'
             else f'ModifiedResNet {tuple(v.layers)}, width {v.width}')
    rows.append(f'| {name} | {tower} | {v.image_size} | {cfg.embed_dim} | '
                f'{count_params(params):,} | {count_params(params["visual"]):,} / '
                f'{count_params(params["text"]):,} |')
  return '\n'.join(rows)


def main() -> None:
  argparse.ArgumentParser(description=__doc__).parse_args()
  print(zoo_table())


if __name__ == '__main__':
  main()
