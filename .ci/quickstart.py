"""Prints the README's two quickstart commands, one per line (CI runs exactly these).

The quickstart is the first ```bash block after '## Quickstart'; comment lines are
left out. Standard library only: it runs before anything is installed.
"""

import pathlib
import sys

QUICKSTART_HEADING = '## Quickstart'


def quickstart_commands(readme: str) -> list[str]:
  section = readme.split(QUICKSTART_HEADING, 1)[1]
  block = section.split('```bash\n', 1)[1].split('```', 1)[0]
  commands = [line.strip() for line in block.splitlines()
              if line.strip() and not line.strip().startswith('#')]
  if len(commands) != 2:
    sys.exit(f'README.md: expected two quickstart commands, found {len(commands)}: {commands}')
  return commands


if __name__ == '__main__':
  text = (pathlib.Path(__file__).resolve().parent.parent / 'README.md').read_text()
  print('\n'.join(quickstart_commands(text)))
