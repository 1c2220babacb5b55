"""Adversarial attacks as pure functions `attack(logits_fn, key, x, y)`."""

from vitat_jax.attacks.pgd import check_budget
from vitat_jax.attacks.pgd import cross_entropy_per_example
from vitat_jax.attacks.pgd import cw
from vitat_jax.attacks.pgd import cw_margin_per_example
from vitat_jax.attacks.pgd import gaussian_init
from vitat_jax.attacks.pgd import perturb
from vitat_jax.attacks.pgd import pgd
from vitat_jax.attacks.pgd import project
from vitat_jax.attacks.pgd import uniform_init

__all__ = ["check_budget", "cross_entropy_per_example", "cw",
           "cw_margin_per_example", "gaussian_init", "perturb", "pgd", "project",
           "uniform_init"]
