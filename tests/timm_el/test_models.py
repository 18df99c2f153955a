"""timm_el.models: the paper's MNIST CNN (Liu et al. 2016) and TorchAttacks' demo CNN (the robustness
experiments' ``mnist_ta_cnn``) as registered timm models."""
import pytest
import timm
import torch
import torch.nn as nn

import timm_el
from timm_el import EncouragingLabelSmoothingLoss, load_mnist
from timm_el.models import MNIST_MEAN, MNIST_STD, MnistCnn, TorchAttacksCnn


def test_registered_with_timm():
    assert "mnist_cnn" in timm.list_models("mnist*")
    model = timm.create_model("mnist_cnn")
    assert isinstance(model, MnistCnn) and timm_el.MnistCnn is MnistCnn
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (1, 28, 28) and cfg["num_classes"] == 10
    assert cfg["mean"] == MNIST_MEAN == (0.1307,) and cfg["std"] == MNIST_STD == (0.3081,)
    assert cfg["classifier"] == "fc" and cfg["first_conv"] == "stem.conv"
    assert model.get_submodule(cfg["first_conv"]).in_channels == 1
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (1, 28, 28) and data["mean"] == MNIST_MEAN


def test_layout():
    """1 x [3x3, 64], 3 x [3x3, 64] + pool, 3 x [3x3, 128] + pool, 3 x [3x3, 256] + pool,
    a 256-d feature layer, a plain linear classifier."""
    model = timm.create_model("mnist_cnn", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64] + [64] * 3 + [128] * 3 + [256] * 3
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.stride == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 10
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3 and all(p.kernel_size == 2 and p.stride == 2 for p in pools)
    assert [len(stage) for stage in model.stages] == [4, 4, 4]  # three convolutions and a pool each
    feature = model.pre_logits.fc
    assert (feature.in_features, feature.out_features) == (256 * 3 * 3, 256)
    assert model.num_features == 256 and model.head_hidden_size == 256
    fc = model.get_classifier()
    assert type(fc) is nn.Linear and (fc.in_features, fc.out_features) == (256, 10) and fc is model.fc

    x = torch.randn(2, 1, 28, 28)
    model.eval()
    features = model.forward_features(x)
    assert features.shape == (2, 256, 3, 3)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert pre_logits.shape == (2, 256)
    torch.testing.assert_close(model(x), fc(pre_logits))


def test_timm_conventions():
    model = timm.create_model("mnist_cnn", num_classes=7, in_chans=3, drop_rate=0.3)
    assert model.num_classes == 7 and model.stem.conv.in_channels == 3
    assert model.head_drop.p == 0.3
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5 and model.num_classes == 5
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    model.eval()
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 256)

    features = timm.create_model("mnist_cnn", features_only=True)
    maps = features(torch.randn(2, 1, 28, 28))
    assert [m.shape[1:] for m in maps] == [(64, 28, 28), (64, 14, 14), (128, 7, 7), (256, 3, 3)]
    assert features.feature_info.channels() == [64, 64, 128, 256]


def test_variants_and_bad_arguments():
    # the all-64 widths of the PyTorch ports, another input size
    model = timm.create_model("mnist_cnn", widths=(64, 64, 64), img_size=32)
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [64] * 10
    model.eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="widths and depths"):
        MnistCnn(widths=(64, 128), depths=(3, 3, 3))
    with pytest.raises(ValueError, match="too small"):
        MnistCnn(img_size=4)
    with pytest.raises(TypeError, match="drop_path_rate"):
        timm.create_model("mnist_cnn", drop_path_rate=0.1)


def test_trains_on_mnist(shared_data):
    """A few SGD steps with the Encouraging Loss fit a batch of real digits."""
    images, labels = load_mnist(shared_data, "train", limit=32)
    x = (torch.from_numpy(images).float().unsqueeze(1) / 255 - MNIST_MEAN[0]) / MNIST_STD[0]
    y = torch.from_numpy(labels)
    torch.manual_seed(0)
    model = timm.create_model("mnist_cnn", num_classes=10)
    loss_fn = EncouragingLabelSmoothingLoss(smoothing=0.1, log_end=0.75)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    losses = []
    model.train()
    for _ in range(6):
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1.0, losses
    with torch.no_grad():  # the batch it saw, BatchNorm with its statistics
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.5, accuracy


# ----------------------------------------------------------------------------- mnist_ta_cnn


def test_ta_cnn_registered_with_timm():
    """``import timm_el`` registers it; its configuration: 1 x 28 x 28 images in [0, 1], not normalised."""
    assert "mnist_ta_cnn" in timm.list_models("mnist*")
    model = timm.create_model("mnist_ta_cnn")
    assert isinstance(model, TorchAttacksCnn) and timm_el.models.TorchAttacksCnn is TorchAttacksCnn
    cfg = model.pretrained_cfg
    assert cfg["mean"] == (0.0,) and cfg["std"] == (1.0,)
    assert cfg["input_size"] == (1, 28, 28) and cfg["num_classes"] == 10 and cfg["classifier"] == "fc"
    assert model.get_submodule(cfg["first_conv"]).in_channels == 1
    data = timm.data.resolve_data_config({}, model=model)
    assert data["mean"] == (0.0,) and data["std"] == (1.0,) and data["input_size"] == (1, 28, 28)


def test_ta_cnn_layout():
    """TorchAttacks' demo CNN: three unpadded 5x5 convolutions (16, 32, 64) with ReLU, two 2x2 max-pools,
    Linear(576, 100), ReLU, Linear(100, 10); no normalisation layers; 123,222 parameters."""
    torch.manual_seed(0)
    model = timm.create_model("mnist_ta_cnn", num_classes=10).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 16, (5, 5), (0, 0)), (16, 32, (5, 5), (0, 0)), (32, 64, (5, 5), (0, 0))]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64 * 3 * 3, 100), (100, 10)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout2d)) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == 123_222

    x = torch.rand(4, 1, 28, 28)
    assert model(x).shape == (4, 10)
    features = model.forward_features(x)
    assert features.shape == (4, 64, 3, 3)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert pre_logits.shape == (4, 100) and (pre_logits >= 0).all()  # after the ReLU
    torch.testing.assert_close(model(x), model.get_classifier()(pre_logits))


def test_ta_cnn_timm_conventions():
    model = timm.create_model("mnist_ta_cnn", num_classes=3, in_chans=3, drop_rate=0.25).eval()
    assert model.num_classes == 3 and model.features[0].in_channels == 3 and model.head_drop.p == 0.25
    assert model(torch.rand(2, 3, 28, 28)).shape == (2, 3)
    assert sum(p.numel() for p in model.parameters()) == 123_222 - 7 * 101 + 2 * 16 * 25
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5 and model.num_classes == 5
    assert model(torch.rand(2, 3, 28, 28)).shape == (2, 5)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(torch.rand(2, 3, 28, 28)).shape == (2, 100)
    with pytest.raises(ValueError, match="too small"):
        TorchAttacksCnn(img_size=16)


def test_ta_cnn_learns_digits_in_pixel_range(shared_data):
    """Adam 1e-3 as TorchAttacks' demo, on [0, 1] images without normalisation: the loss falls."""
    images, labels = load_mnist(shared_data, "train", limit=64)
    x, y = torch.from_numpy(images).float().unsqueeze(1) / 255, torch.from_numpy(labels).long()
    torch.manual_seed(0)
    model = timm.create_model("mnist_ta_cnn").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_ta_cnn_features_only():
    """timm's features_only wrapper finds the convolution block (it did not with flatten_sequential)."""
    model = timm.create_model('mnist_ta_cnn', features_only=True)
    maps = model(torch.rand(2, 1, 28, 28))
    assert [tuple(m.shape) for m in maps] == [(2, 64, 3, 3)]
    assert model.feature_info.channels() == [64]
