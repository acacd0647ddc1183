"""What the command-line scripts (``train.py``, ``ablate.py``) share; no JAX import here, so a
script that only launches others stays light."""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags


def _unknown_field(error: Exception, argv: list[str]):
  """Exits naming the ``--config.X`` override whose field ``error`` (ml_collections' KeyError or
  AttributeError for a missing field) says the config lacks, with its hint if it has one."""
  message = error
  while isinstance(message, BaseException):  # AttributeError(KeyError(...)) or KeyError(str)
    message = message.args[0] if message.args else str(message)
  lines = str(message).splitlines() or [""]
  name = lines[0].strip("'\"")
  hint = " ".join(line.strip() for line in lines[1:])
  given = [a.split("=")[0] for a in argv[1:]
           if a.startswith("--config.") and name in a.split("=")[0].split(".")]
  print(f"{argv[0]}: {', '.join(given) or '--config'} names {name!r}, which the config has no "
        f"field for{': ' + hint if hint else ''}; check the spelling against vdit_jax/config.py "
        "(get_base_config) and the config file", file=sys.stderr)
  sys.exit(2)


def define_config_file(name: str, default: str, help_string: str):
  """``config_flags.DEFINE_config_file`` (locked config), which already reads ``--config.X``
  overrides of missing groups from ``sys.argv``: those exit with the name, not a traceback."""
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
  except (AttributeError, KeyError) as e:
    _unknown_field(e, sys.argv)


def parse_flags(argv: list[str]) -> list[str]:
  """``absl.app.run``'s flag parser: a ``--config.X`` override naming no field of the config
  exits with that name and the fix, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections' error for a missing field
    _unknown_field(e, argv)
