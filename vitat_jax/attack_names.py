"""The evaluation attacks' names, as configs spell them (no JAX needed).

"clean", "pgd<k>" (PGD with k steps, e.g. pgd20, pgd100), "cw<k>" (PGD on
the CW margin loss, e.g. cw20), "aa" / "autoattack" (AutoAttack), and the
names a script registers (`register_attack`, also handed out as
`vitat_jax.evaluation.register_attack`). The evaluation runner, the config
checks, the reports and the plots all read names through this module, and
every attack's randomness is keyed by its name through `key_index`: an
attack draws the same whatever list it is in.
"""

import dataclasses
import re
from typing import Callable, Dict
import zlib

from vitat_jax.errors import UserError

_ATTACK_NAME = re.compile(r"^(clean|pgd(\d+)|cw(\d+)|aa|autoattack)$")
# Names that mean the same attack (and so draw the same randomness).
_ALIASES = {"aa": "autoattack"}
_REGISTERED_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# name -> attack(logits_fn, key, x, y, *, eps, alpha) -> x_adv; stored, not
# called here (this module imports no JAX).
_REGISTERED: Dict[str, Callable] = {}


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  name: str  # as written in the config, also the metrics key prefix
  kind: str  # "clean", "pgd", "cw", "autoattack" or "registered"
  steps: int = 0


def register_attack(name: str, attack: Callable) -> None:
  """Makes `name` an evaluation attack (`eval.attacks`, `eval.epoch_attacks`)
  run as `attack(logits_fn, key, x, y, *, eps, alpha) -> x_adv`.

  Register it in the script that evaluates, before the run's checks; its
  key is `fold_in(key, key_index(name))` as every attack's. Registering a
  name again replaces it; the built-in names cannot be taken.
  """
  if not isinstance(name, str) or not _REGISTERED_NAME.match(name):
    raise UserError(f"attack name {name!r} must be lowercase letters, digits "
                    "and underscores, starting with a letter")
  if _ATTACK_NAME.match(name):
    raise UserError(f"attack name {name!r} is a built-in one ('clean', "
                    "'pgd<steps>', 'cw<steps>', 'aa'): register yours under "
                    "another name")
  if not callable(attack):
    raise UserError(f"attack {name!r} must be a function (logits_fn, key, "
                    "x, y, *, eps, alpha) -> x_adv")
  _REGISTERED[name] = attack


def registered_attack(name: str) -> Callable:
  """The function registered as `name` (KeyError if none is)."""
  return _REGISTERED[name]


def is_attack_name(name: str) -> bool:
  """Whether `name` is a valid attack name (no error)."""
  return name in _REGISTERED or (bool(_ATTACK_NAME.match(name)) and
                                 name not in ("pgd0", "cw0"))


def parse_attack(name: str) -> AttackSpec:
  """"pgd20" -> AttackSpec("pgd20", "pgd", 20); one-line error otherwise."""
  if not is_attack_name(name):
    registered = "".join(f", {n!r}" for n in _REGISTERED)
    raise UserError(f"unknown evaluation attack {name!r}: use 'clean', "
                    "'pgd<steps>' (e.g. pgd20, pgd100), 'cw<steps>' (cw20)"
                    f"{registered} or 'aa' (AutoAttack)")
  if name in _REGISTERED:
    return AttackSpec(name, "registered")
  if name == "clean":
    return AttackSpec(name, "clean")
  if name in ("aa", "autoattack"):
    return AttackSpec(name, "autoattack")
  match = _ATTACK_NAME.match(name)
  kind = "pgd" if name.startswith("pgd") else "cw"
  return AttackSpec(name, kind, int(match.group(2) or match.group(3)))


def attack_label(name: str) -> str:
  """"pgd20" -> "PGD-20", "cw20" -> "CW-20", "aa" -> "AutoAttack"."""
  if not is_attack_name(name):
    return name
  spec = parse_attack(name)
  if spec.kind == "autoattack":
    return "AutoAttack"
  if spec.kind in ("clean", "registered"):
    return name
  return f"{spec.kind.upper()}-{spec.steps}"


def key_index(name: str) -> int:
  """The number an attack named `name` folds into its key:
  `jax.random.fold_in(key, key_index(name))`, for evaluation attacks
  ("pgd20", "aa") and AutoAttack's members ("apgd-ce", "square") alike.

  A function of the name alone (CRC-32 of its canonical spelling, 31 bits),
  so adding, removing or reordering other attacks changes nothing.
  """
  canonical = _ALIASES.get(name, name)
  return zlib.crc32(canonical.encode("utf-8")) & 0x7FFFFFFF
