"""Prompt templates for zero-shot classification: named sets, or one per line from a file.

A template is a `str.format` pattern with one placeholder for the class name: `{}`, or
`{c}` as clip_benchmark's files (`zeroshot_classification_templates.txt`) write it. Averaging the
text embeddings of many prompts per class (a prompt ensemble) is worth several points
of zero-shot accuracy over the bare class name (Radford et al. 2021, section 3.1.4).
The sets below follow the spirit of the paper's published prompt lists.
"""

from __future__ import annotations

from typing import Sequence

from clip_jax import storage

# For natural photographs when nothing better is known about the dataset.
GENERIC = (
    'a photo of a {}.',
    'a photo of the {}.',
    'a blurry photo of a {}.',
    'a cropped photo of a {}.',
    'a close-up photo of a {}.',
    'a bright photo of a {}.',
    'a dark photo of a {}.',
    'a good photo of a {}.',
    'a bad photo of a {}.',
    'a photo of a small {}.',
    'a photo of a large {}.',
    'a low resolution photo of a {}.',
    'a black and white photo of a {}.',
    'art of a {}.',
    'a drawing of a {}.',
)

# Small low-resolution photographs (CIFAR-10 and CIFAR-100).
CIFAR = (
    'a photo of a {}.',
    'a blurry photo of a {}.',
    'a black and white photo of a {}.',
    'a low contrast photo of a {}.',
    'a high contrast photo of a {}.',
    'a bad photo of a {}.',
    'a good photo of a {}.',
    'a photo of a small {}.',
    'a photo of a big {}.',
    'a photo of the {}.',
    'a blurry photo of the {}.',
    'a black and white photo of the {}.',
    'a low contrast photo of the {}.',
    'a high contrast photo of the {}.',
    'a bad photo of the {}.',
    'a good photo of the {}.',
    'a photo of the small {}.',
    'a photo of the big {}.',
)

# The 80-prompt ImageNet ensemble: renditions, styles and qualities of an object.
IMAGENET = (
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
)

# Handwritten or rendered digits (MNIST, scikit-learn digits, SVHN): the class is a number.
DIGITS = (
    'a photo of the number: "{}".',
    'a photo of the digit {}.',
    'a handwritten {}.',
    'the number {} written by hand.',
    'a blurry photo of the number: "{}".',
    'a low resolution image of the digit {}.',
)

# Fine-grained sets: naming the super-category disambiguates the class name.
PETS = (
    'a photo of a {}, a type of pet.',
    'a close-up photo of a {}, a type of pet.',
    'a blurry photo of a {}, a type of pet.',
    'a photo of my {}, a type of pet.',
)

FLOWERS = (
    'a photo of a {}, a type of flower.',
    'a close-up photo of a {}, a type of flower.',
    'a blurry photo of a {}, a type of flower.',
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    'generic': GENERIC,
    'cifar10': CIFAR,
    'cifar100': CIFAR,
    'imagenet': IMAGENET,
    'digits': DIGITS,
    'pets': PETS,
    'flowers': FLOWERS,
    'classname': ('{}',),    # the bare class name: the baseline prompt ensembles improve on
}

# Substrings of a dataset name -> the template set `auto` picks for it (first match wins).
_AUTO = (
    ('cifar100', 'cifar100'), ('cifar10', 'cifar10'), ('imagenet', 'imagenet'),
    ('mnist', 'digits'), ('digits', 'digits'), ('svhn', 'digits'),
    ('pet', 'pets'), ('flower', 'flowers'),
)


# Where the class name goes: ours, and clip_benchmark's (`template.format(c=name)`).
PLACEHOLDERS = ('{}', '{c}')


def fill_template(template: str, classname: str) -> str:
  """The prompt of one class: `{}` or `{c}` replaced by the class name."""
  return template.format(classname, c=classname)


def check_templates(templates: Sequence[str], source: str) -> tuple[str, ...]:
  """Every template must have exactly one `{}` or `{c}`; `source` names where they came from."""
  templates = tuple(templates)
  if not templates:
    raise ValueError(f'{source}: no templates; expected at least one line with "{{}}"')
  for template in templates:
    if sum(template.count(p) for p in PLACEHOLDERS) != 1:
      raise ValueError(f'{source}: template {template!r} must contain exactly one "{{}}" (or '
                       '"{c}") where the class name goes')
  return templates


def get_templates(name_or_path: str, dataset_name: str = '') -> tuple[str, ...]:
  """A named set (see TEMPLATE_SETS), `auto` (chosen from `dataset_name`), or a file path.

  A file has one template per line; blank lines and lines starting with `#` are ignored.
  """
  if name_or_path == 'auto':
    key = dataset_name.lower().replace('-', '').replace('_', '')
    name_or_path = next((tset for sub, tset in _AUTO if sub in key), 'generic')
  if name_or_path in TEMPLATE_SETS:
    return TEMPLATE_SETS[name_or_path]
  if storage.is_file(name_or_path):
    lines = [line.strip() for line in storage.read_text(name_or_path).splitlines()]
    return check_templates([l for l in lines if l and not l.startswith('#')], name_or_path)
  raise ValueError(f'templates: {name_or_path!r} is neither a template set '
                   f'({", ".join(TEMPLATE_SETS)}, auto) nor an existing file with one '
                   'template per line')
