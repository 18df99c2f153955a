""" The MNIST network of the paper, as a timm model

The Encouraging Loss paper (Zhao et al., AAAI 2022, Section 4, EL_SPEC section 4)
trains on MNIST "the CNN of Liu et al. 2016": the MNIST network of
"Large-Margin Softmax Loss for Convolutional Neural Networks" (Liu, Wen, Yu,
Yang, ICML 2016, Table 1), here with a plain linear classifier (softmax + CE
or EL) instead of the L-Softmax layer. Importing ``timm_el`` registers it, so
``timm.create_model('mnist_cnn', num_classes=10)`` builds it.

Layout of ``mnist_cnn`` (every convolution 3x3, stride 1, padding 1, followed
by BatchNorm and ReLU; 28x28 input)::

    conv0.x  [3x3,  64] x 1                 28x28
    conv1.x  [3x3,  64] x 3, max-pool 2x2   -> 14x14
    conv2.x  [3x3, 128] x 3, max-pool 2x2   -> 7x7
    conv3.x  [3x3, 256] x 3, max-pool 2x2   -> 3x3
    feature  Linear(256 * 3 * 3, 256), BatchNorm1d, ReLU
    fc       Linear(256, num_classes)        (plain linear classifier)

The widths are those of the authors' Caffe definition
(``wy1iu/LargeMargin_Softmax_Loss``, ``myexamples/mnist/model/mnist_train_test.prototxt``:
pre-conv 64, three convolutions of 64, 128 and 256 per stage, max-pooling,
conv -> BN -> ReLU, MSRA initialisation), with the 256-d feature layer of the
paper's table (the prototxt uses 512). The PyTorch port the Encouraging Loss
release trained with (``MNISTNet`` in the release's ``models.py``) differs: all
convolutions 64 wide, four convolutions in the second stage, PReLU before
BatchNorm, an unpadded first convolution, a BatchNorm on the input, no ReLU
after the feature layer and a bias-free classifier. ``widths``, ``depths`` and
``feature_dim`` are model arguments (``timm.create_model('mnist_cnn',
widths=(64, 64, 64))``, ``--model-kwargs widths=...`` in the training CLI)
for such variants.
"""
from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ['ConvBnReLU', 'MnistCnn', 'TorchAttacksCnn', 'MNIST_MEAN', 'MNIST_STD']

#: mean and standard deviation of the MNIST training images, pixel values in [0, 1].
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
#: stage widths and depths of ``mnist_cnn`` (conv1.x, conv2.x, conv3.x).
DEFAULT_WIDTHS = (64, 128, 256)
DEFAULT_DEPTHS = (3, 3, 3)


class ConvBnReLU(nn.Module):
    """A 3x3 convolution (stride 1, padding 1, no bias), BatchNorm and ReLU."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(bn(conv(x)))``."""
        return self.act(self.bn(self.conv(x)))


class _FlatHead(nn.Module):
    """timm's classifier conventions for a network that flattens its last feature map into ``pre_logits``
    (a fully connected feature layer), ``head_drop`` and a linear classifier ``fc``: what the MNIST models share.
    A subclass defines ``forward_features`` and sets ``pre_logits``, ``head_drop``, ``fc``, ``head_hidden_size``."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing is not supported (the network is small)."""
        assert not enable, 'gradient checkpointing not supported'

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier layer."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier by a new one with ``num_classes`` outputs (0: none).

        ``global_pool`` is accepted for timm's interface; the network flattens
        its last feature map and has no global pooling to change.
        """
        self.num_classes = num_classes
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The logits from a feature map (the ``feature_dim``-d feature if ``pre_logits``)."""
        x = self.head_drop(self.pre_logits(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits, ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


class MnistCnn(_FlatHead):
    """ The MNIST CNN of Liu et al. 2016 (Large-Margin Softmax, Table 1) with a linear classifier.

    A stem convolution, then stages of ``depths[i]`` 3x3 convolutions of
    ``widths[i]`` channels each followed by a 2x2 max-pool, a fully connected
    feature layer of ``feature_dim`` units (BatchNorm, ReLU) and a linear
    classifier. Follows timm's model conventions: ``forward_features`` gives
    the last stage's feature map, ``forward_head(x, pre_logits=True)`` the
    ``feature_dim``-d feature, ``get_classifier`` / ``reset_classifier`` the
    ``fc`` layer, ``drop_rate`` is the dropout before it.

    Args:
        num_classes: Number of classes (0 leaves the classifier out: the model
            returns the feature).
        in_chans: Number of input channels (1 for MNIST).
        img_size: Input height and width; sets the feature layer's input size.
        stem_width: Channels of the stem convolution (conv0.x).
        widths: Channels of each stage (conv1.x, conv2.x, conv3.x).
        depths: Number of convolutions in each stage.
        feature_dim: Size of the feature layer before the classifier.
        drop_rate: Dropout rate before the classifier.
    """

    def __init__(
            self,
            num_classes: int = 10,
            in_chans: int = 1,
            img_size: int = 28,
            stem_width: int = 64,
            widths: Sequence[int] = DEFAULT_WIDTHS,
            depths: Sequence[int] = DEFAULT_DEPTHS,
            feature_dim: int = 256,
            drop_rate: float = 0.,
    ):
        super().__init__()
        if len(widths) != len(depths) or not widths or min(depths) < 1:
            raise ValueError(f'widths and depths must be non-empty and of equal length, depths >= 1, '
                             f'got widths={tuple(widths)}, depths={tuple(depths)}')
        grid = img_size // 2 ** len(widths)
        if grid < 1:
            raise ValueError(f'img_size {img_size} is too small for {len(widths)} 2x2 max-pools')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate

        self.stem = ConvBnReLU(in_chans, stem_width)
        stages = []
        self.feature_info = [dict(num_chs=stem_width, reduction=1, module='stem')]
        prev = stem_width
        for i, (width, depth) in enumerate(zip(widths, depths)):
            layers = [ConvBnReLU(prev if j == 0 else width, width) for j in range(depth)]
            stages.append(nn.Sequential(*layers, nn.MaxPool2d(kernel_size=2, stride=2)))
            prev = width
            self.feature_info.append(dict(num_chs=width, reduction=2 ** (i + 1), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.num_features = prev
        self.head_hidden_size = feature_dim

        self.pre_logits = nn.Sequential(OrderedDict([
            ('flatten', nn.Flatten(1)),
            ('fc', nn.Linear(prev * grid * grid, feature_dim)),
            ('bn', nn.BatchNorm1d(feature_dim)),
            ('act', nn.ReLU(inplace=True)),
        ]))
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(feature_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """MSRA (He) initialisation of the convolutions and linear layers, as the Caffe model."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (timm convention)."""
        return dict(stem=r'^stem', blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map of the last stage, ``(B, widths[-1], H / 2**len(widths), W / 2**len(widths))``."""
        return self.stages(self.stem(x))


class TorchAttacksCnn(_FlatHead):
    """ The MNIST CNN of TorchAttacks' demos (Kim 2020, ``demos/models.py``, class ``CNN``), as a timm model.

    The network of the paper's robustness experiments (section 5.4, appendix C, EL_SPEC 6), chosen there
    because it reaches about 99% on MNIST in a few epochs. Our own code, same layout (no padding, no
    normalisation layers; the demos feed ``ToTensor()`` images in ``[0, 1]`` without normalising, so the
    model's configuration has mean 0 and std 1)::

        Conv2d(in_chans, 16, 5), ReLU        28x28 -> 24x24
        Conv2d(16, 32, 5), ReLU, MaxPool 2   -> 20x20 -> 10x10
        Conv2d(32, 64, 5), ReLU, MaxPool 2   -> 6x6 -> 3x3
        Linear(64 * 3 * 3, 100), ReLU        feature (``forward_head(pre_logits=True)``)
        Linear(100, num_classes)             ``fc``

    Args:
        num_classes: Number of classes (0 leaves the classifier out).
        in_chans: Input channels (1 for MNIST).
        img_size: Input height and width (28: the feature layer takes 64 x 3 x 3).
        feature_dim: Size of the hidden fully connected layer (100).
        drop_rate: Dropout before the classifier (0, as the demos).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28, feature_dim: int = 100,
                 drop_rate: float = 0.):
        super().__init__()
        grid = ((img_size - 8) // 2 - 4) // 2
        if grid < 1:
            raise ValueError(f'img_size {img_size} is too small for mnist_ta_cnn (at least 18)')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 16, 5), nn.ReLU(),
            nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        self.num_features = 64
        self.head_hidden_size = feature_dim
        self.feature_info = [dict(num_chs=64, reduction=4, module='features')]
        self.pre_logits = nn.Sequential(OrderedDict([
            ('flatten', nn.Flatten(1)),
            ('fc', nn.Linear(64 * grid * grid, feature_dim)),
            ('act', nn.ReLU()),
        ]))
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(feature_dim, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (timm convention)."""
        return dict(stem=r'^features\.0', blocks=r'^features\.(\d+)')

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map of the last convolution, ``(B, 64, 3, 3)`` for 28x28 input."""
        return self.features(x)


def _cfg(**kwargs) -> Dict[str, Any]:
    """timm's pretrained configuration of the MNIST models (no pretrained weights)."""
    return {
        'url': '',
        'num_classes': 10, 'input_size': (1, 28, 28), 'pool_size': None,
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': MNIST_MEAN, 'std': MNIST_STD,
        'first_conv': 'stem.conv', 'classifier': 'fc',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'mnist_cnn': _cfg(),
    # TorchAttacks' demos train on ToTensor() images, not normalised
    'mnist_ta_cnn': _cfg(mean=(0.0,), std=(1.0,), first_conv='features.0'),
})


def _create_mnist_cnn(variant: str, pretrained: bool = False, **kwargs) -> MnistCnn:
    """Build an :class:`MnistCnn` through timm's builder (pretrained config, features_only)."""
    num_stages = len(kwargs.get('widths', DEFAULT_WIDTHS))
    out_indices = kwargs.pop('out_indices', tuple(range(num_stages + 1)))
    return build_model_with_cfg(
        MnistCnn,
        variant,
        pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


@register_model
def mnist_cnn(pretrained: bool = False, **kwargs) -> MnistCnn:
    """The MNIST CNN of Liu et al. 2016 (L-Softmax, Table 1) with a plain linear classifier,
    the network of the Encouraging Loss paper's MNIST experiments (SGD lr 0.1, momentum 0.9,
    weight decay 5e-4, batch 256, 100 epochs)."""
    return _create_mnist_cnn('mnist_cnn', pretrained=pretrained, **kwargs)


@register_model
def mnist_ta_cnn(pretrained: bool = False, **kwargs) -> TorchAttacksCnn:
    """TorchAttacks' MNIST CNN (its demos' ``CNN``), the network of the paper's robustness experiments
    (Adam lr 1e-3, batch 128, 5 epochs, inputs in [0, 1] without normalisation)."""
    return build_model_with_cfg(TorchAttacksCnn, 'mnist_ta_cnn', pretrained,
                                feature_cfg=dict(flatten_sequential=False, out_indices=(0,)), **kwargs)
