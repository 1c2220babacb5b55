"""Adversarial attacks as pure functions `attack(logits_fn, key, x, y)`."""

from vitat_jax.attacks.apgd import apgd
from vitat_jax.attacks.apgd import apgd_targeted
from vitat_jax.attacks.apgd import perturb as apgd_perturb
from vitat_jax.attacks.apgd import dlr_loss
from vitat_jax.attacks.apgd import dlr_loss_targeted
from vitat_jax.attacks.autoattack import ATTACK_NAMES
from vitat_jax.attacks.autoattack import autoattack
from vitat_jax.attacks.autoattack import attack_settings
from vitat_jax.attacks.autoattack import AutoAttackResult
from vitat_jax.attacks.autoattack import combine_results
from vitat_jax.attacks.autoattack import MIN_PADDED_BATCH
from vitat_jax.attacks.autoattack import Placement
from vitat_jax.attacks.autoattack import reduces_over_features
from vitat_jax.attacks.autoattack import VERSIONS
from vitat_jax.attacks.fab import fab
from vitat_jax.attacks.fab import fab_targeted
from vitat_jax.attacks.pgd import check_budget
from vitat_jax.attacks.pgd import cross_entropy_per_example
from vitat_jax.attacks.pgd import cw
from vitat_jax.attacks.pgd import cw_margin_per_example
from vitat_jax.attacks.pgd import gaussian_init
from vitat_jax.attacks.pgd import perturb
from vitat_jax.attacks.pgd import pgd
from vitat_jax.attacks.pgd import project
from vitat_jax.attacks.pgd import uniform_init
from vitat_jax.attacks.square import square

__all__ = [
    "ATTACK_NAMES", "AutoAttackResult", "apgd", "apgd_perturb", "apgd_targeted",
    "attack_settings", "autoattack", "combine_results", "check_budget",
    "cross_entropy_per_example", "cw", "cw_margin_per_example", "dlr_loss",
    "dlr_loss_targeted", "fab", "fab_targeted", "gaussian_init", "perturb",
    "pgd", "Placement", "project", "reduces_over_features", "square",
    "uniform_init", "VERSIONS"
]
