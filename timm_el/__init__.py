""" Encouraging Loss for timm

Zhao et al., "Well-Classified Examples are Underestimated in Classification
with Deep Neural Networks", AAAI 2022 (arXiv 2110.06537).

Importing this package calls :func:`install`, which registers the loss with
timm's classification loss factory (idempotent; :func:`uninstall` undoes it)::

    import timm_el  # noqa: F401  -- adds 'encouraging' to timm.loss.LOSS_TYPES
    from timm.loss import create_classification_loss

    train_loss = create_classification_loss(loss_type='encouraging', smoothing=0.1, log_end=0.75)
    mixup_loss = create_classification_loss(loss_type='encouraging', soft_targets=True)

    # timm's task API reaches it the same way
    task = timm.task.ClassificationTask(model, criterion_kwargs={'loss_type': 'encouraging', 'smoothing': 0.1})

Import ``timm_el`` before ``from timm.loss import create_classification_loss``
in your own code: a name imported earlier still refers to timm's original.
The loss classes can also be used directly, without the factory.
"""
from .data import load_mnist
from .encouraging import EncouragingLabelSmoothingLoss, EncouragingSoftTargetLoss
from .factory import EL_KWARGS, LOSS_TYPE, create_encouraging_loss, install, is_installed, uninstall
from .models import MnistCnn  # noqa: F401  -- registers the timm model 'mnist_cnn'

__all__ = [
    'EL_KWARGS',
    'LOSS_TYPE',
    'EncouragingLabelSmoothingLoss',
    'EncouragingSoftTargetLoss',
    'create_encouraging_loss',
    'install',
    'is_installed',
    'load_mnist',
    'uninstall',
]

install()
