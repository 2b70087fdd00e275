"""The commands the documentation tells a user to type, as tests/test_docs.py runs them.

Sources, each command with its file and line:
- README.md and docs/*.md: every fenced ```bash / ```sh / ```shell / ```console block
  (backslash-continued lines joined, whole-line comments and trailing ` # ...` comments
  dropped, blank lines ignored) and every fenced ```python block (one snippet each);
- configs/*.py: the lines of each module docstring that start with `python ` or
  `launch/`, with their backslash continuations.

`export A=B` lines are not commands: they set the environment of the commands that
follow them in the same file (a guide is read as one terminal session; the TPU guide's
settings block sets what `launch/tpu/create.sh` and the others read afterwards). They
are evaluated by bash itself (`export_env`), so their quoting is tested too.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import pathlib
import re
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
SHELL_LANGUAGES = ('bash', 'sh', 'shell', 'console')


@dataclasses.dataclass(frozen=True)
class DocCommand:
  file: str               # relative to the repository root, e.g. 'README.md'
  line: int               # 1-based line of the command's first line
  text: str               # the command (shell) or the snippet (python), as documented
  kind: str               # 'shell' or 'python'
  exports: tuple[str, ...] = ()   # the `export ...` lines of the file before it

  @property
  def id(self) -> str:
    return f'{self.file}:{self.line}'


def strip_comment(line: str) -> str:
  """`cmd --x  # note` -> `cmd --x`; a `#` inside quotes or inside a word is kept."""
  quote = ''
  for i, char in enumerate(line):
    if quote:
      if char == quote:
        quote = ''
    elif char in '\'"':
      quote = char
    elif char == '#' and (i == 0 or line[i - 1] in ' \t'):
      return line[:i].rstrip()
  return line.rstrip()


def shell_commands(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
  """(first line, command) of shell lines: continuations joined, comments dropped."""
  commands, pending, start = [], '', 0
  for number, raw in lines:
    text = raw.rstrip()
    if not pending:
      if not text.strip() or text.lstrip().startswith('#'):
        continue
      start = number
    if text.endswith('\\'):
      pending += text[:-1].strip() + ' '
      continue
    command = (pending + strip_comment(text).strip()).strip()
    pending = ''
    if command:
      commands.append((start, command))
  if pending:
    commands.append((start, pending.strip()))
  return commands


def markdown_commands(path: pathlib.Path) -> list[DocCommand]:
  rel = str(path.relative_to(REPO))
  lines = path.read_text().splitlines()
  result: list[DocCommand] = []
  exports: list[str] = []
  i = 0
  while i < len(lines):
    match = re.match(r'^\s*```\s*([\w+-]*)', lines[i])
    if not match:
      i += 1
      continue
    language = match.group(1).lower()
    body: list[tuple[int, str]] = []
    i += 1
    while i < len(lines) and not re.match(r'^\s*```\s*$', lines[i]):
      body.append((i + 1, lines[i]))
      i += 1
    i += 1   # the closing fence
    if language in SHELL_LANGUAGES:
      for number, command in shell_commands(body):
        if re.match(r'^export\s+\w+=', command):
          exports.append(command)
          continue
        result.append(DocCommand(rel, number, command, 'shell', tuple(exports)))
    elif language == 'python' and body:
      text = '\n'.join(line for _, line in body)
      result.append(DocCommand(rel, body[0][0], text, 'python', tuple(exports)))
  return result


def config_commands(path: pathlib.Path) -> list[DocCommand]:
  """Commands in a config's module docstring: `python ...` / `launch/...` lines."""
  rel = str(path.relative_to(REPO))
  source = path.read_text()
  module = ast.parse(source)
  if not (module.body and isinstance(module.body[0], ast.Expr) and
          isinstance(module.body[0].value, ast.Constant) and
          isinstance(module.body[0].value.value, str)):
    return []
  node = module.body[0].value
  raw_lines = ast.get_source_segment(source, node).splitlines()
  # Line numbers of the docstring's own text (the literal starts at node.lineno).
  numbered = [(node.lineno + k, text) for k, text in enumerate(raw_lines)]
  result, k = [], 0
  while k < len(numbered):
    number, text = numbered[k]
    stripped = text.strip().lstrip('r').strip('"\'') if k == 0 else text.strip()
    if stripped.startswith(('python ', 'launch/')):
      block = [(number, stripped)]
      while block[-1][1].rstrip().endswith('\\') and k + 1 < len(numbered):
        k += 1
        block.append(numbered[k])
      for start, command in shell_commands(block):
        result.append(DocCommand(rel, start, command, 'shell'))
    k += 1
  return result


def documented_files() -> list[pathlib.Path]:
  return ([REPO / 'README.md'] + sorted((REPO / 'docs').glob('*.md')) +
          sorted((REPO / 'configs').glob('*.py')))


def all_commands() -> list[DocCommand]:
  commands: list[DocCommand] = []
  for path in documented_files():
    commands += markdown_commands(path) if path.suffix == '.md' else config_commands(path)
  return commands


def export_env(exports: tuple[str, ...], base: dict[str, str]) -> dict[str, str]:
  """The environment after bash ran the `export` lines verbatim (quoting included)."""
  if not exports:
    return {}
  script = '\n'.join(exports) + '\nenv -0'
  result = subprocess.run(['bash', '-c', script], env=base, capture_output=True, timeout=30,
                          check=True)
  after = dict(item.split('=', 1) for item in result.stdout.decode().split('\0') if '=' in item)
  return {k: v for k, v in after.items() if base.get(k) != v and k not in ('_', 'SHLVL', 'PWD')}


def gs_buckets(text: str) -> set[str]:
  return set(re.findall(r'gs://([^/\s\'"]+)', text))


# GCS's naming rules (cloud.google.com/storage/docs/buckets#naming): 3-63 characters of
# lowercase letters, digits, '-', '_' and '.', starting and ending with a letter or digit.
# tensorstore (orbax's checkpoint writer) refuses any other name before sending a request.
_BUCKET = re.compile(r'^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$')


def invalid_buckets(text: str) -> list[str]:
  return sorted(b for b in gs_buckets(text) if not _BUCKET.match(b))


if __name__ == '__main__':
  os.chdir(REPO)
  for c in all_commands():
    print(f'{c.id} [{c.kind}] {c.text if c.kind == "shell" else c.text.splitlines()[0] + " ..."}')
