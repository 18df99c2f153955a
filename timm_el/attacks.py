""" Adversarial attacks on timm classifiers, through ``torchattacks``

The robustness experiments of Zhao et al., AAAI 2022 (section 5.4, appendix C;
EL_SPEC section 6) attack MNIST models with TorchAttacks (Kim 2020): FGSM and
PGD under the L-infinity norm, PGD under the L2 norm, and AutoAttack; the
adversarial training of Table 7 generates FGSM / PGD examples at every step.

Attacks work on images in ``[0, 1]``, the model's real input range: a model
trained on normalised images is wrapped in :class:`NormalizedModel`, which
normalises inside (``(x - mean) / std``), so that ``eps`` is measured in pixel
units whatever the training normalisation was.

:data:`ATTACKS` names every attack this module builds (the names of
``el-analyze --attack`` and ``timm-el-train --adv-train``); :func:`make_attack`
builds one for one ``eps``.

Evaluation (``el-analyze --attack``, the paper's Table 7 / Table 11 and Fig. 7 / Fig. 8):
:func:`attack_batch` runs one attack on one batch, seeded and projected onto its norm ball and ``[0, 1]``;
:func:`attack_logits` runs it over a data set at one ``eps``; :func:`evaluate_attack` over an epsilon grid
(accuracy and margins on the attacked inputs, through :func:`encouraging_loss.tools.analysis.attack_curve`);
:func:`input_gradient_zero_fraction` measures the gradient masking that makes FGSM / PGD fail on a
saturated softmax (:func:`encouraging_loss.tools.analysis.zero_gradient_fraction`).
"""
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, MutableMapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = [
    'ATTACKS', 'AttackSpec', 'EVAL_STEPS', 'LINF_EPS', 'L2_EPS', 'NormalizedModel', 'TRAIN_DEFAULTS',
    'attack_alpha', 'attack_batch', 'attack_logits', 'batch_seed', 'evaluate_attack', 'input_gradient_zero_fraction',
    'make_attack', 'perturbation_norms', 'project', 'require_torchattacks',
]

#: the L-infinity epsilons of the paper's tables (Table 7, Table 11; pixel values in [0, 1])
LINF_EPS: Tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
#: the L2 epsilons of the paper's tables (Table 7, Table 11)
L2_EPS: Tuple[float, ...] = (0.0, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


@dataclass(frozen=True)
class AttackSpec:
    """One attack of :data:`ATTACKS`.

    Attributes:
        norm: ``'Linf'`` or ``'L2'`` (which epsilon grid it takes).
        kind: the ``torchattacks`` class it builds.
        iterative: whether it takes ``steps`` and a step size ``alpha``.
        gradient_scale: whether it follows the input gradient of the cross-entropy loss with its scale, so that a
            saturated softmax (a zero gradient in float32) makes it fail for a reason that is not robustness
            (FGSM, PGD); ``False`` for attacks that do not depend on it (APGD with the DLR loss, AutoAttack).
        about: one line for ``--help`` and reports.
    """
    norm: str
    kind: str
    iterative: bool
    gradient_scale: bool
    about: str


ATTACKS: Dict[str, AttackSpec] = {
    'fgsm': AttackSpec('Linf', 'FGSM', False, True, 'FGSM, one signed-gradient step (Goodfellow et al. 2015)'),
    'pgd': AttackSpec('Linf', 'PGD', True, True, 'PGD, L-infinity, random start (Madry et al. 2018)'),
    'pgd_l2': AttackSpec('L2', 'PGDL2', True, True, 'PGD, L2, random start'),
    'apgd_dlr': AttackSpec('Linf', 'APGD', True, False,
                           'APGD with the DLR loss, L-infinity (Croce and Hein 2020): scale-free, a cheap check '
                           'for gradient masking'),
    'apgd_dlr_l2': AttackSpec('L2', 'APGD', True, False, 'APGD with the DLR loss, L2'),
    'autoattack': AttackSpec('Linf', 'AutoAttack', False, False,
                             'AutoAttack, standard version, L-infinity (APGD-CE, APGD-T, FAB-T, Square)'),
    'autoattack_l2': AttackSpec('L2', 'AutoAttack', False, False, 'AutoAttack, standard version, L2'),
}

#: ``timm-el-train --adv-train`` defaults (eps, steps, alpha): FGSM and PGD as TorchAttacks' "Adversarial
#: Training (MNIST)" demo (PGD eps 0.3, alpha 0.1, 7 steps; FGSM at the same eps); PGD-L2 at torchattacks'
#: own PGDL2 defaults (eps 1.0, alpha 0.2, 10 steps), as the paper gives no L2 setting.
TRAIN_DEFAULTS: Dict[str, Tuple[float, Optional[int], Optional[float]]] = {
    'fgsm': (0.3, None, None),
    'pgd': (0.3, 7, 0.1),
    'pgd_l2': (1.0, 10, 0.2),
}
#: evaluation: steps of the iterative attacks, and the step size as a fraction of eps (torchattacks' defaults:
#: PGD eps 8/255 with alpha 2/255, PGDL2 eps 1.0 with alpha 0.2, 10 steps each)
EVAL_STEPS = 10
ALPHA_FRACTION = {'Linf': 0.25, 'L2': 0.2}


def require_torchattacks():
    """Import ``torchattacks``, or raise ``ImportError`` saying how to install it."""
    try:
        import torchattacks
    except ImportError:
        raise ImportError("the attacks need torchattacks: pip install --no-deps torchattacks==3.5.1 "
                          "(or bash scripts/install.sh)") from None
    return torchattacks


class NormalizedModel(nn.Module):
    """``model((x - mean) / std)``: a classifier trained on normalised images, taking images in ``[0, 1]``.

    ``mean`` and ``std`` are per channel (sequences of length ``C``, or of length 1 for any ``C``).
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer('mean', torch.as_tensor(tuple(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer('std', torch.as_tensor(tuple(std), dtype=torch.float32).view(1, -1, 1, 1))
        if (self.std <= 0).any():
            raise ValueError(f'std must be positive, got {tuple(std)}')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of the wrapped model for images ``x`` in ``[0, 1]``."""
        logits = self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))
        return logits[0] if isinstance(logits, (tuple, list)) else logits


def attack_alpha(name: str, eps: float) -> float:
    """The evaluation step size of an iterative attack at ``eps``: :data:`ALPHA_FRACTION` of ``eps``."""
    return ALPHA_FRACTION[ATTACKS[name].norm] * float(eps)


def make_attack(name: str, model: nn.Module, eps: float, *, steps: Optional[int] = None,
                alpha: Optional[float] = None, seed: int = 0, n_classes: int = 10):
    """A ``torchattacks`` attack of :data:`ATTACKS` on ``model`` (which takes images in ``[0, 1]``).

    ``steps`` (iterative attacks; default :data:`EVAL_STEPS`) and ``alpha`` (PGD step size; default
    :func:`attack_alpha`) are ignored by the others. ``seed``: AutoAttack's own seed (it draws one from the
    clock otherwise); the random starts of PGD draw from torch's global generator, which the caller seeds.
    The attack puts the model in eval mode while it runs and restores its mode after (torchattacks' default).
    ``eps`` 0 gives torchattacks' identity attack (``VANILA``): the clean images, whatever the attack (PGD-L2's
    random start would divide by zero).
    """
    if name not in ATTACKS:
        raise ValueError(f'unknown attack {name!r} (one of {", ".join(ATTACKS)})')
    ta = require_torchattacks()
    spec = ATTACKS[name]
    eps = float(eps)
    if eps < 0 or eps != eps or eps == float('inf'):
        raise ValueError(f'eps must be a finite number >= 0, got {eps}')
    if eps == 0:
        return ta.VANILA(model)
    steps = EVAL_STEPS if steps is None else int(steps)
    if name == 'fgsm':
        return ta.FGSM(model, eps=eps)
    if name in ('pgd', 'pgd_l2'):
        alpha = attack_alpha(name, eps) if alpha is None else float(alpha)
        cls = ta.PGD if name == 'pgd' else ta.PGDL2
        return cls(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    if spec.kind == 'APGD':
        return ta.APGD(model, norm=spec.norm, eps=eps, steps=steps, n_restarts=1, loss='dlr', seed=seed)
    return ta.AutoAttack(model, norm=spec.norm, eps=eps, version='standard', n_classes=n_classes, seed=seed)


# ----------------------------------------------------------------------------- evaluation (el-analyze --attack)


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of torch's global generator for batch ``batch_index`` of a run seeded with ``seed``: the same
    command gives the same random starts whatever ran before it in the process."""
    return (int(seed) * 1_000_003 + int(batch_index)) % (2 ** 63)


def perturbation_norms(adv: torch.Tensor, images: torch.Tensor, norm: str) -> torch.Tensor:
    """The size of each example's perturbation ``adv - images`` in ``norm`` (``'Linf'``: max ``|delta|``,
    ``'L2'``: Euclidean), ``[N]``, computed in float64."""
    delta = (adv.detach().double() - images.detach().double()).flatten(1)
    if norm == 'Linf':
        return delta.abs().amax(dim=1) if delta.shape[1] else delta.new_zeros(delta.shape[0])
    if norm == 'L2':
        return delta.norm(dim=1)
    raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")


def project(adv: torch.Tensor, images: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """``adv`` moved into the ``norm`` ball of radius ``eps`` around ``images`` and into ``[0, 1]``.

    A safety net for the threat model of the paper's tables (section 5.4, appendix C): the attacks of
    :data:`ATTACKS` already stay inside up to float rounding, so this changes nothing beyond it; an
    example outside would otherwise count as broken by a perturbation larger than ``eps``. L2: ``delta``
    scaled by ``min(1, eps / ||delta||)``; clipping to ``[0, 1]`` after it only shortens ``delta``.
    """
    adv, images = adv.detach(), images.detach()
    delta = adv - images
    if norm == 'Linf':
        delta = delta.clamp(-eps, eps)
    elif norm == 'L2':
        size = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        factor = (eps / size).clamp(max=1.0).to(delta.dtype)
        delta = delta * factor.view(-1, *([1] * (delta.dim() - 1)))
    else:
        raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
    return (images + delta).clamp(0.0, 1.0)


def attack_batch(attack, images: torch.Tensor, labels: torch.Tensor, *, eps: float, norm: str, seed: int = 0,
                 batch_index: int = 0) -> torch.Tensor:
    """Adversarial versions of one batch (``images`` in ``[0, 1]``) by a ``torchattacks`` attack of
    :func:`make_attack`, within ``eps`` in ``norm`` and ``[0, 1]`` (:func:`project`).

    Deterministic: the attack runs inside ``torch.random.fork_rng()`` with the global generator (and the
    current CUDA device's) seeded by :func:`batch_seed` ``(seed, batch_index)``, so PGD's random starts and
    APGD's / AutoAttack's own re-seeding leave the caller's random state as it was. Raises ``ValueError``
    for images outside ``[0, 1]`` (a model's normalised inputs given by mistake: ``eps`` would mean
    nothing).
    """
    if images.numel() and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
        raise ValueError(f'attack inputs must be images in [0, 1] (un-normalised), got values in '
                         f'[{float(images.min()):.3g}, {float(images.max()):.3g}]')
    devices = [images.device] if images.device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(batch_seed(seed, batch_index))
        with torch.enable_grad():
            adv = attack(images, labels)
    return project(adv.to(images.device), images, float(eps), norm)


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device('cpu')


def attack_logits(model: nn.Module, batches: Iterable, name: str, eps: float, *, steps: Optional[int] = None,
                  seed: int = 0, n_classes: int = 10, total: Optional[int] = None, label: str = '',
                  progress: Optional[Callable[[str], None]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logits, targets)`` of ``model`` on every example of ``batches`` attacked by ``name`` at ``eps``
    (on the CPU, float32): one point of :func:`evaluate_attack`.

    ``model`` takes images in ``[0, 1]`` (:class:`NormalizedModel`); batch ``k`` of ``batches`` (``(images,
    labels)``) is attacked by :func:`attack_batch` seeded with ``(seed, k)``. ``progress`` gets a line every
    10 s and at the end (``label`` in front; ``total``: the number of examples, for the line).
    """
    norm = ATTACKS[name].norm
    device = _device_of(model)
    attack = make_attack(name, model, eps, steps=steps, seed=seed, n_classes=n_classes)
    logits, targets = [], []
    done, correct, start, last = 0, 0, time.time(), time.time()
    for k, (images, labels) in enumerate(batches):
        images, labels = images.to(device).float(), torch.as_tensor(labels).long().to(device)
        adv = attack_batch(attack, images, labels, eps=float(eps), norm=norm, seed=seed, batch_index=k)
        with torch.no_grad():
            out = model(adv).float().cpu()
        logits.append(out)
        targets.append(labels.cpu())
        done += len(labels)
        correct += int((out.argmax(dim=1) == labels.cpu()).sum())
        if progress is not None and (time.time() - last > 10 or done == total):
            last = time.time()
            progress(f'{label}{name} eps {float(eps):g}: {done}/{total or "?"} images, accuracy '
                     f'{100.0 * correct / max(done, 1):.2f}% ({done / max(time.time() - start, 1e-9):.1f}/s)')
    if not logits:
        raise ValueError(f'{name} eps {float(eps):g}: no examples to attack')
    return torch.cat(logits), torch.cat(targets)


def evaluate_attack(model: nn.Module, batches: Iterable, name: str, eps_grid: Sequence[float], *,
                    steps: Optional[int] = None, seed: int = 0, n_classes: int = 10, total: Optional[int] = None,
                    subset: bool = False, label: str = '', progress: Optional[Callable[[str], None]] = None,
                    cache: Optional[MutableMapping] = None) -> Tuple[dict, Dict[float, 'object']]:
    """Accuracy and margins of ``model`` under attack ``name`` at every ``eps`` of ``eps_grid`` (the paper's
    Table 7 / Table 11 and Fig. 7; margins on attacked inputs: Fig. 8; EL_SPEC 6).

    ``model`` takes images in ``[0, 1]`` (:class:`NormalizedModel`); ``batches`` is a re-iterable of
    ``(images, labels)`` (a ``DataLoader``), iterated once per ``eps`` by :func:`attack_logits`: batch ``k``
    is seeded with ``(seed, k)``, so the numbers do not depend on what ran before. ``cache``: a mapping
    ``eps -> (logits, targets)`` consulted before and filled after each ``eps`` (``el-analyze`` keeps one on
    disk, so that an interrupted run resumes). ``progress``: see :func:`attack_logits`.

    Returns ``(summary, margins)``: ``summary`` as :func:`encouraging_loss.tools.analysis.attack_curve`
    (``norm``, ``samples``, ``subset``, ``eps``, ``accuracy`` in %, ``margin_mean``) and ``margins``
    ``{eps: numpy array [samples]}``, the margins on the attacked inputs.
    """
    from encouraging_loss.tools import analysis

    if name not in ATTACKS:
        raise ValueError(f'unknown attack {name!r} (one of {", ".join(ATTACKS)})')
    was_training = model.training
    model.eval()
    logits_per_eps, target = [], None
    try:
        for eps in eps_grid:
            found = cache.get(float(eps)) if cache is not None else None
            if found is None:
                found = attack_logits(model, batches, name, float(eps), steps=steps, seed=seed, n_classes=n_classes,
                                      total=total, label=label, progress=progress)
                if cache is not None:
                    cache[float(eps)] = found
            elif progress is not None:
                progress(f'{label}{name} eps {float(eps):g}: {len(found[1])} images, done before (cached)')
            logits, targets = found
            if target is not None and not torch.equal(targets, target):
                raise ValueError(f'{name}: the examples differ between eps values (a cache of another run?)')
            logits_per_eps.append(logits)
            target = targets
    finally:
        model.train(was_training)
    return analysis.attack_curve(eps_grid, logits_per_eps, target, norm=ATTACKS[name].norm, subset=subset)


def input_gradient_zero_fraction(model: nn.Module, batches: Iterable) -> Tuple[int, float]:
    """``(n, fraction)``: how many clean examples of ``batches`` were evaluated and the fraction of them whose
    cross-entropy input gradient ``d CE(model(x), y) / d x`` is exactly zero in float32.

    The gradient-masking indicator of ``el-analyze --attack``: a steep bonus of the Encouraging Loss can
    saturate the softmax (``p_y`` rounds to 1, the others to 0), so the gradient that FGSM and PGD follow
    vanishes and they fail for a reason that is not robustness; scale-free attacks (APGD with the DLR loss,
    AutoAttack) do not depend on it. Per-example gradients: the summed loss of a batch (the examples do
    not interact in eval mode), through :func:`encouraging_loss.tools.analysis.zero_gradient_fraction`.
    """
    import torch.nn.functional as F

    from encouraging_loss.tools import analysis

    device = _device_of(model)
    was_training = model.training
    model.eval()
    grads = []
    try:
        for images, labels in batches:
            x = images.to(device).float().clone().requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(x).float(), torch.as_tensor(labels).long().to(device),
                                       reduction='sum')
                grad, = torch.autograd.grad(loss, x)
            grads.append(grad.detach().flatten(1).abs().amax(dim=1).cpu())  # zero exactly when the gradient is
    finally:
        model.train(was_training)
    sizes = torch.cat(grads) if grads else torch.zeros(0)
    return int(sizes.numel()), analysis.zero_gradient_fraction(sizes)
