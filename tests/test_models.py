"""Models package: registry, architectures, weight loading, specs, torch-pruning compatibility."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from safetensors.torch import save_file
from torch import nn

from prune_lab.errors import PruneLabError
from prune_lab.models import build_from_spec, classifier_of, create_model, list_models, register_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def option_b_resnet_params(depth: int, width: int = 16, in_channels: int = 3, num_classes: int = 10) -> int:
    """Closed-form parameter count of a CIFAR ResNet with 1x1-conv+BN downsampling shortcuts."""
    bn = lambda c: 2 * c  # noqa: E731  (gamma and beta)
    blocks = (depth - 2) // 6
    total = 9 * in_channels * width + bn(width)  # stem
    in_planes = width
    for planes in (width, 2 * width, 4 * width):
        for i in range(blocks):
            a = in_planes if i == 0 else planes
            total += 9 * a * planes + bn(planes) + 9 * planes * planes + bn(planes)
            if a != planes:
                total += a * planes + bn(planes)
        in_planes = planes
    return total + 4 * width * num_classes + num_classes


def assert_one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("depth, approx", [(20, 0.27e6), (56, 0.85e6), (110, 1.7e6)])
def test_cifar_resnet_parameter_counts(depth: int, approx: float) -> None:
    model = create_model(f"resnet{depth}")
    assert n_params(model) == option_b_resnet_params(depth)
    assert abs(n_params(model) - approx) / approx < 0.03


def test_resnet_module_names() -> None:
    model = create_model("resnet20")
    names = dict(model.named_children())
    assert {"conv1", "bn1", "layer1", "layer2", "layer3", "fc"} <= set(names)
    block = model.layer2[0]
    assert isinstance(block.shortcut, nn.Sequential)
    assert isinstance(block.shortcut[0], nn.Conv2d) and block.shortcut[0].stride == (2, 2)
    assert isinstance(model.layer2[1].shortcut, nn.Identity)
    assert {"conv1", "bn1", "conv2", "bn2", "shortcut"} <= set(dict(block.named_children()))


def test_list_models() -> None:
    names = list_models()
    assert names == sorted(names)
    expected = {"resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                "vgg16", "vgg19", "wrn16_8", "wrn22_2", "wrn28_10", "logreg"}
    assert expected <= set(names)


@pytest.mark.parametrize("name", list_models())
def test_output_shapes(name: str) -> None:
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize("name", ["resnet8", "vgg16", "wrn22_2", "logreg"])
def test_small_grayscale_inputs(name: str) -> None:
    model = create_model(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 16, 16)).shape == (1, 10)
        if name == "resnet8":
            assert model(torch.randn(1, 1, 8, 8)).shape == (1, 10)


def test_wrn_parameter_counts_match_paper() -> None:
    # Zagoruyko & Komodakis, Table 1: WRN-16-8 has 11.0M parameters.
    assert abs(n_params(create_model("wrn16_8")) - 11.0e6) / 11.0e6 < 0.01


def test_torchvision_offline() -> None:
    model = create_model("resnet18", num_classes=10, source="torchvision").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert classifier_of(model)[0] == "fc"


def test_torchvision_download_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(PruneLabError) as excinfo:
        create_model("resnet18", source="torchvision", weights="DEFAULT")
    assert_one_line_error(excinfo, "resnet18", "DEFAULT", "weights=<file>")


def test_torchvision_hub_weights_get_fresh_head(monkeypatch: pytest.MonkeyPatch) -> None:
    imagenet = create_model("resnet18", num_classes=1000, source="torchvision").state_dict()
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", lambda *a, **k: imagenet)
    model = create_model("resnet18", num_classes=10, source="torchvision", weights="IMAGENET1K_V1")
    assert model.fc.out_features == 10
    assert torch.equal(model.conv1.weight, imagenet["conv1.weight"])
    rebuilt = build_from_spec(model.prune_lab_spec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(PruneLabError) as excinfo:
        create_model("resnet18", source="torchvision", weights="IMAGENET9K")
    assert_one_line_error(excinfo, "IMAGENET9K", "IMAGENET1K_V1")


def test_timm_model() -> None:
    pytest.importorskip("timm")
    model = create_model("resnet18", num_classes=10, in_channels=1, source="timm").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    assert classifier_of(model)[1].out_features == 10
    with pytest.raises(PruneLabError) as excinfo:
        create_model("resnt18", source="timm")
    assert_one_line_error(excinfo, "resnt18", "resnet18")


def _reference(name: str = "resnet8") -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return model, x, model(x)


def _outputs(path, x: torch.Tensor, name: str = "resnet8") -> torch.Tensor:
    torch.manual_seed(1)  # a different init, so equality proves the weights were loaded
    model = create_model(name, weights=str(path)).eval()
    with torch.no_grad():
        return model(x)


def test_weights_round_trip(tmp_path) -> None:
    model, x, expected = _reference()
    sd = model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "w.pt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "w.ckpt")
    torch.save({"model": sd}, tmp_path / "w.pth")
    for file in ("w.safetensors", "w.pt", "w.ckpt", "w.pth"):
        assert torch.equal(_outputs(tmp_path / file, x), expected), file


def test_missing_weights_file(tmp_path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(PruneLabError) as excinfo:
        create_model("resnet8", weights=str(missing))
    assert_one_line_error(excinfo, str(missing))


def test_classifier_shape_mismatch(tmp_path) -> None:
    torch.save(create_model("resnet8", num_classes=100).state_dict(), tmp_path / "c100.pt")
    with pytest.raises(PruneLabError) as excinfo:
        create_model("resnet8", num_classes=10, weights=str(tmp_path / "c100.pt"))
    assert_one_line_error(excinfo, "'fc'", "(100, 64)", "(10, 64)")


def test_wrong_architecture_weights(tmp_path) -> None:
    torch.save(create_model("resnet14").state_dict(), tmp_path / "r14.pt")
    with pytest.raises(PruneLabError) as excinfo:
        create_model("resnet8", weights=str(tmp_path / "r14.pt"))
    assert_one_line_error(excinfo, "r14.pt", "not in the model")


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        ({"name": "resnt20"}, ["'resnt20'", "resnet20", "resnet32"]),
        ({"name": "resnet20", "source": "keras"}, ["'keras'", "torchvision"]),
        ({"name": "resnet1800", "source": "torchvision"}, ["'resnet1800'", "list_models"]),
        ({"name": "resnet20", "widht": 8}, ["'widht'", "width"]),
        ({"name": "resnet20", "weights": "auto"}, ["auto", "pipeline"]),
        ({"name": "resnet20", "weights": "DEFAULT"}, ["'DEFAULT'", "file"]),
        ({"name": "resnet20", "num_classes": 0}, ["num_classes=0"]),
        ({"name": "resnet18", "source": "torchvision", "in_channels": 1}, ["in_channels=1"]),
    ],
)
def test_user_errors_are_one_line(kwargs: dict, needles: list[str]) -> None:
    with pytest.raises(PruneLabError) as excinfo:
        create_model(**kwargs)
    assert_one_line_error(excinfo, *needles)


@pytest.mark.parametrize(
    "name, source, kwargs",
    [("resnet20", "prune_lab", {"width": 8}), ("wrn22_2", "prune_lab", {}), ("logreg", "prune_lab", {"input_size": 8}),
     ("resnet18", "torchvision", {}), ("resnet18", "timm", {})],
)
def test_build_from_spec(name: str, source: str, kwargs: dict) -> None:
    if source == "timm":
        pytest.importorskip("timm")
    model = create_model(name, num_classes=5, in_channels=3, source=source, **kwargs)
    spec = json.loads(json.dumps(model.prune_lab_spec))
    assert spec == {"name": name, "source": source, "num_classes": 5, "in_channels": 3, "kwargs": kwargs}
    rebuilt = build_from_spec(spec)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(rebuilt) == shapes(model)
    assert rebuilt.prune_lab_spec == model.prune_lab_spec


def test_classifier_of() -> None:
    assert classifier_of(create_model("vgg16"))[0] == "fc"
    assert classifier_of(create_model("logreg"))[0] == "fc"
    name, layer = classifier_of(create_model("mobilenet_v3_small", source="torchvision"))
    assert name == "classifier.3" and layer.out_features == 10


def test_register_model_rejects_duplicates() -> None:
    with pytest.raises(ValueError):
        register_model("resnet20")(lambda num_classes, in_channels: nn.Identity())


@pytest.mark.parametrize("name", ["resnet20", "vgg16", "wrn22_2"])
def test_torch_pruning_dependency_graph(name: str) -> None:
    model = create_model(name).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    groups = list(graph.get_all_groups(ignored_layers=[classifier_of(model)[1]], root_module_types=[nn.Conv2d, nn.Linear]))
    assert groups
    # The classifier's outputs must never be a pruning target.
    fc = classifier_of(model)[1]
    for group in groups:
        root = group[0].dep.target.module
        assert root is not fc


def test_logreg_has_no_prunable_groups() -> None:
    model = create_model("logreg")
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    groups = list(graph.get_all_groups(ignored_layers=[classifier_of(model)[1]], root_module_types=[nn.Conv2d, nn.Linear]))
    assert groups == []


def test_corrupt_weights_file(tmp_path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(PruneLabError) as excinfo:
        create_model("resnet8", weights=str(junk))
    assert_one_line_error(excinfo, str(junk))


CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"


@pytest.mark.parametrize("config", sorted(p.name for p in CONF_DIR.glob("*.yaml")))
def test_model_configs_instantiate(config: str) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF_DIR / config)
    assert "num_classes" not in cfg and "in_channels" not in cfg  # supplied by the data module
    assert cfg.weights is None
    if cfg.source == "timm":
        pytest.importorskip("timm")
    model = instantiate(cfg, num_classes=10, in_channels=3)
    assert classifier_of(model)[1].out_features == 10  # forward passes are covered above
    assert model.prune_lab_spec["name"] == cfg.name and model.prune_lab_spec["source"] == cfg.source


def test_imports_registers_a_users_model_before_the_run_builds_it(tmp_path, monkeypatch):
    """`imports=[module]` makes a model registered in the user's own file buildable by name; a module
    that does not import is one line naming it."""
    from omegaconf import OmegaConf

    from prune_lab.checks import import_user_modules
    from prune_lab.errors import PruneLabError
    from prune_lab.models import create_model, list_models

    (tmp_path / "my_models_for_test.py").write_text(
        "import torch.nn as nn\n"
        "from prune_lab.models import register_model\n"
        "@register_model('my_tiny_net')\n"
        "def my_tiny_net(num_classes, in_channels, width=4):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(width, num_classes))\n")
    monkeypatch.chdir(tmp_path)
    assert "my_tiny_net" not in list_models()
    import_user_modules(OmegaConf.create({"imports": ["my_models_for_test"]}))
    model = create_model("my_tiny_net", num_classes=7, in_channels=1, width=5)
    assert model[-1].out_features == 7 and model[0].out_channels == 5
    with pytest.raises(PruneLabError, match="imports: cannot import 'no_such_module_x'") as err:
        import_user_modules(OmegaConf.create({"imports": ["no_such_module_x"]}))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_auxiliary_heads_are_removed_so_training_sees_one_logits_tensor(name):
    """GoogLeNet / Inception v3 return namedtuples with auxiliary logits in training mode; every loss here
    reads one tensor, so the auxiliary heads go and train mode returns the main head's logits."""
    model = create_model(name, num_classes=7, source="torchvision").train()
    assert not model.aux_logits and not any("aux" in n.lower() for n, _ in model.named_children())
    out = model(torch.randn(2, 3, 96 if name == "googlenet" else 299, 96 if name == "googlenet" else 299))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)


def test_a_safetensors_state_dict_loads_into_a_model_that_checks_its_module_versions(tmp_path):
    """torchvision's MNASNet refuses a state dict without module versions (safetensors keeps none);
    load_plain attaches the model's own, as the dense-reference cache and export reload them."""
    from safetensors.torch import load_file

    from prune_lab.models.weights import load_plain

    model = create_model("mnasnet0_5", num_classes=10, source="torchvision")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    plain = load_file(str(tmp_path / "w.safetensors"))
    fresh = create_model("mnasnet0_5", num_classes=10, source="torchvision")
    with pytest.raises(ValueError, match="version"):
        fresh.load_state_dict(plain)
    load_plain(fresh, plain)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_a_convolutional_classifier_is_found_and_kept_out_of_channel_pruning():
    """SqueezeNet ends in a 1x1 conv to the classes: that conv is its classifier (no nn.Linear needed)."""
    from prune_lab.sparsity import ChannelGroups

    model = create_model("squeezenet1_0", num_classes=7, source="torchvision")
    name, head = classifier_of(model)
    assert name == "classifier.1" and isinstance(head, nn.Conv2d) and head.out_channels == 7
    groups = ChannelGroups(model, torch.randn(1, 3, 64, 64), ignored=[head])
    assert all("classifier.1" != root for root in groups.roots)
