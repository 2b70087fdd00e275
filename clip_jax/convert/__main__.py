"""`python -m clip_jax.convert`: PyTorch CLIP weights into a clip_jax workdir, and back.

  python -m clip_jax.convert import --source ViT-B-32.pt --workdir runs/vit_b32
  python -m clip_jax.convert import --source hf_clip_dir/ --workdir runs/hf_b32
  python -m clip_jax.convert export --workdir runs/vit_b32 --format openai --out out/vit_b32.safetensors
  python -m clip_jax.convert export --workdir runs/vit_b32 --format hf --out out/hf_vit_b32
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from clip_jax import convert, storage
from clip_jax.convert import infer
from clip_jax.models import count_params


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m clip_jax.convert', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  imp = commands.add_parser(
      'import', help='a PyTorch CLIP (OpenAI/open_clip file or Hugging Face directory) into a '
      'clip_jax workdir')
  imp.add_argument('--source', required=True,
                   help='.pt/.pth/.bin (state dict or OpenAI TorchScript archive), .safetensors, '
                   'or a Hugging Face CLIPModel directory')
  imp.add_argument('--workdir', required=True, help='where the checkpoint and config.json go')
  imp.add_argument('--config', default=None,
                   help='an architecture name (e.g. ViT-B/32) the weights must match; by '
                   'default the architecture is read from the tensor shapes')
  imp.add_argument('--activation', choices=('quick_gelu', 'gelu'), default=None,
                   help="MLP activation (default: quick_gelu for OpenAI-layout files, the "
                   "config's hidden_act for Hugging Face); open_clip models without "
                   "'-quickgelu' in their name use gelu")
  imp.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16', 'source'),
                   default='float32', help='dtype the weights are stored in (source: as in the '
                   'file); the original dtypes are remembered for export either way')
  imp.add_argument('--scan-layers', action='store_true',
                   help='store transformer blocks stacked (config.model.scan_layers=True)')
  exp = commands.add_parser('export', help='a clip_jax workdir to PyTorch')
  exp.add_argument('--workdir', required=True, help='a clip_jax workdir (imported or trained)')
  exp.add_argument('--format', choices=convert.LAYOUTS, required=True,
                   help='openai: an OpenAI/open_clip state dict + open_clip_config.json; '
                   'hf: a transformers CLIPModel directory')
  exp.add_argument('--out', required=True,
                   help='openai: a .safetensors or .pt file, or a directory; hf: a directory')
  exp.add_argument('--dtype', choices=('source', 'float32', 'bfloat16', 'float16'),
                   default='source', help='dtype of the written tensors (source: the dtype '
                   'each had when imported, float32 for models trained here)')
  exp.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
  return parser


def _describe(cfg) -> str:
  v = cfg.vision
  tower = (f'ViT {v.layers}x{v.width}, patch {v.patch_size}' if v.type == 'vit' else
           f'ModifiedResNet {tuple(v.layers)}, width {v.width}')
  kind = cfg.name if infer.is_zoo_architecture(cfg) else f'custom (nearest zoo entry {cfg.name})'
  return (f'{kind}: {tower}, image {v.image_size}, text {cfg.text.layers}x{cfg.text.width}, '
          f'embed {cfg.embed_dim}, activation {cfg.activation}')


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    return _run(args)
  except (ValueError, OSError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1


def _run(args: argparse.Namespace) -> int:
  if args.command == 'import':
    imported = convert.import_to_workdir(
        args.source, args.workdir, config=args.config, activation=args.activation,
        weights_dtype=args.dtype, scan_layers=args.scan_layers)
    print(f'read {len(imported.source.key_order)} tensors ({imported.source.layout} layout) '
          f'from {args.source}')
    print(f'architecture {_describe(imported.config)}; '
          f'{count_params(imported.variables["params"]):,} parameters')
    print(f'wrote a clip_jax checkpoint (step 0) and config.json to {args.workdir}')
    print(f'load it with clip_jax.load({args.workdir!r})')
    return 0
  cfg, paths = convert.export_workdir(args.workdir, args.format, args.out, dtype=args.dtype,
                                      step=args.step)
  print(f'exported {_describe(cfg)} from {args.workdir}')
  for path in paths:
    print(f'wrote {path}')
  if args.format == 'openai':
    name = infer.open_clip_name(cfg)
    if name:
      print(f"open_clip: open_clip.create_model('{name}', pretrained='{paths[0]}')")
    if not paths[0].endswith('.pt'):   # open_clip's local-dir: finds .safetensors/.bin/.pth
      print(f"open_clip: open_clip.create_model('local-dir:{storage.resolve(paths[1]).parent}')")
  else:
    print(f"transformers: CLIPModel.from_pretrained('{args.out}')")
  return 0


if __name__ == '__main__':
  sys.exit(main())
