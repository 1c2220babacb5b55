"""The evaluation attacks' names, as configs spell them (no JAX needed).

"clean", "pgd<k>" (PGD with k steps, e.g. pgd20, pgd100), "cw<k>" (PGD on
the CW margin loss, e.g. cw20), and "aa" / "autoattack" (AutoAttack). The
evaluation runner, the config checks, the reports and the plots all read
names through this module, and every attack's randomness is keyed by its
name through `key_index`: an attack draws the same whatever list it is in.
"""

import dataclasses
import re
import zlib

from vitat_jax.errors import UserError

_ATTACK_NAME = re.compile(r"^(clean|pgd(\d+)|cw(\d+)|aa|autoattack)$")
# Names that mean the same attack (and so draw the same randomness).
_ALIASES = {"aa": "autoattack"}


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  name: str  # as written in the config, also the metrics key prefix
  kind: str  # "clean", "pgd", "cw" or "autoattack"
  steps: int = 0


def is_attack_name(name: str) -> bool:
  """Whether `name` is a valid attack name (no error)."""
  return bool(_ATTACK_NAME.match(name)) and name not in ("pgd0", "cw0")


def parse_attack(name: str) -> AttackSpec:
  """"pgd20" -> AttackSpec("pgd20", "pgd", 20); one-line error otherwise."""
  if not is_attack_name(name):
    raise UserError(f"unknown evaluation attack {name!r}: use 'clean', "
                    "'pgd<steps>' (e.g. pgd20, pgd100), 'cw<steps>' (cw20) "
                    "or 'aa' (AutoAttack)")
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
  if spec.kind == "clean":
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
