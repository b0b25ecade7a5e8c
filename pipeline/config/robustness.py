"""The robustness measurement's names and limits (`jobs.evaluate --corruptions`, `jobs.train
--adversarial`) and the parsers of its comma-separated options, shared by the configs that
validate them and by pipeline.analysis.robustness that runs them."""

from __future__ import annotations

# Common corruptions `jobs.evaluate --corruptions` measures (pipeline.analysis.robustness: ImageNet-C's
# recipes), their severity scale, and the FGSM strengths measured with them (pixel levels of 255).
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "jpeg", "brightness", "contrast")
MAX_SEVERITY = 5
MAX_EPSILON = 64.0


def _items(value: str) -> list[str]:
    """The non-empty comma-separated items of `value`, stripped."""
    return [v.strip() for v in value.split(",") if v.strip()]


def _pick(value: str, valid: tuple[str, ...], option: str) -> list[str]:
    """'all' or comma-separated names from `valid` -> at least one name, in `valid`'s order."""
    names = list(valid) if value.strip() == "all" else _items(value)
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ValueError(f"--{option}: {'unknown ' + ', '.join(unknown) if unknown else 'none given'}"
                         f"; valid: all, {', '.join(valid)}")
    return [n for n in valid if n in names]


def parse_corruptions(value: str) -> list[str]:
    """Corruption names from --corruptions, in CORRUPTIONS order."""
    return _pick(value, CORRUPTIONS, "corruptions")


def parse_severities(value: str) -> list[int]:
    """Severities from --severities, sorted and distinct."""
    out = []
    for item in _items(value):
        if not item.isdigit() or not 1 <= int(item) <= MAX_SEVERITY:
            raise ValueError(f"--severities: {item!r} is not a whole number from 1 to {MAX_SEVERITY}")
        out.append(int(item))
    if not out:
        raise ValueError(f"--severities: give at least one of 1..{MAX_SEVERITY}, e.g. 1,3,5")
    return sorted(set(out))


ATTACK_NAMES = ("fgsm", "pgd")
# PGD steps when evaluating (training takes --adversarial-steps): enough for a multi-step attack
# to find what a single gradient-sign step misses on a model that masks its gradients.
PGD_EVAL_STEPS = 5


def parse_attacks(value: str) -> list[str]:
    """Attack names from --attacks, in ATTACK_NAMES order."""
    return _pick(value, ATTACK_NAMES, "attacks")


def parse_attack_epsilons(value: str) -> list[float]:
    """Attack strengths from --attack-epsilons, sorted and distinct."""
    out = []
    for item in _items(value):
        try:
            eps = float(item)
        except ValueError:
            eps = -1.0
        if not 0 < eps <= MAX_EPSILON:
            raise ValueError(f"--attack-epsilons: {item!r} is not a pixel change in (0, "
                             f"{MAX_EPSILON:g}] levels of 255, e.g. 1,2,4")
        out.append(eps)
    return sorted(set(out))
