import dataclasses
import math
import pickle
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from growth_checks import SEED
from torch.utils.flop_counter import FlopCounterMode

from depthgrow import DepthgrowError, OptimConfig, build_model, build_optimizer, preset
from depthgrow.models import ResNetConfig
from depthgrow.vision import ImageBatches, ImageData, holdout_split, load_images

TEST = ResNetConfig(n_layer=1, width=4, in_channels=1, image_size=8)  # the resnet-test preset
RGB7 = ResNetConfig(n_layer=1, width=3, n_stage=3, in_channels=3, num_classes=5, image_size=7)  # sides 7, 4, 2
CONV_TRANSITIONS = [dataclasses.replace(c, transition="conv") for c in (TEST, RGB7)]


def images(config: ResNetConfig, seed: int, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, config.in_channels, config.image_size, config.image_size)
    return torch.randn(shape, generator=generator), torch.randint(0, config.num_classes, (batch,), generator=generator)


def config_id(config: ResNetConfig) -> str:
    shape = f"C{config.in_channels}-s{config.image_size}-w{config.width}-S{config.n_stage}-L{config.n_layer}"
    return f"{shape}-{config.transition}"


def loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


# --- the model: parameters, FLOPs, depth 0 ---


def test_resnet_test_preset_is_what_the_tests_use():
    assert preset("resnet-test") == TEST
    # He et al.'s option-A shortcuts carry no weights: ResNet-20's zero-layer model is stem + classifier
    assert preset("resnet20").with_depth(0).num_params() == (9 * 3 * 16 + 2 * 16) + (64 * 10 + 10)


@pytest.mark.parametrize(
    "config", [c.with_depth(d) for c in (TEST, RGB7, *CONV_TRANSITIONS) for d in (0, 1, 3)], ids=config_id
)
def test_parameter_count_formula_matches_the_model(config):
    model = build_model(config, seed=0)
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    assert config.num_params(embeddings=False) == config.num_params()


def test_parameter_count_by_hand():
    # stem 9·1·4 + 8; conv transitions 9·4·8 + 16 and 9·8·16 + 32 (shortcuts: none); a block 18c² + 4c at
    # c = 4, 8, 16; classifier 16·10 + 10
    assert TEST.with_depth(0).num_params() == 44 + 170
    assert TEST.num_params() == 214 + (304 + 1184 + 4672)
    conv = dataclasses.replace(TEST, transition="conv")
    assert conv.with_depth(0).num_params() == 44 + 304 + 1184 + 170
    assert conv.num_params() == 1702 + (304 + 1184 + 4672)


@pytest.mark.parametrize(
    "config",
    [c.with_depth(d) for c in (TEST, RGB7, *CONV_TRANSITIONS) for d in (0, 1, 2)]
    + [dataclasses.replace(RGB7, n_stage=1)],
    ids=config_id,
)
def test_flops_per_image_match_torch_flop_counter(config):
    model = build_model(config, seed=0)
    x, y = images(config, 0, batch=2)
    with FlopCounterMode(display=False) as counter:
        loss(model, x, y).backward()
    assert counter.get_total_flops() == config.flops_per_unit() * 2
    assert config.flops_per_unit(count_embeddings=True) == config.flops_per_unit()
    # the stem's input needs no gradient: its backward is the weight gradient alone, 2x forward in all
    stem_forward = 2 * 2 * 9 * config.in_channels * config.width * config.image_size**2  # two images
    aten = torch.ops.aten
    assert counter.get_flop_counts()["ResNet.stem"] == {
        aten.convolution: stem_forward,
        aten.convolution_backward: stem_forward,
    }


def test_flops_by_hand_at_odd_sizes():
    # 7 -> 4 -> 2 at widths 3, 6, 12; conv transitions cost 3x forward (shortcuts nothing), each block conv 3x
    transitions = 3 * 2 * 9 * (3 * 6 * 16 + 6 * 12 * 4)
    block_convs = 2 * 3 * 2 * 9 * (9 * 49 + 36 * 16 + 144 * 4)
    stem = 2 * 2 * 9 * 3 * 3 * 49
    classifier = 6 * 12 * 5
    assert RGB7.with_depth(0).flops_per_unit() == stem + classifier
    assert RGB7.flops_per_unit() == stem + block_convs + classifier
    conv = dataclasses.replace(RGB7, transition="conv")
    assert conv.with_depth(0).flops_per_unit() == stem + transitions + classifier
    assert conv.flops_per_unit() == stem + transitions + block_convs + classifier


def reference_forward(state: dict[str, torch.Tensor], config: ResNetConfig, x: torch.Tensor) -> torch.Tensor:
    """The documented network in functional form, on a state dict, BatchNorm in eval mode."""

    def conv_bn(x, prefix, conv, bn, stride=1):
        x = F.conv2d(x, state[f"{prefix}.{conv}.weight"], stride=stride, padding=1)
        stats = [state[f"{prefix}.{bn}.{key}"] for key in ("running_mean", "running_var", "weight", "bias")]
        return F.batch_norm(x, *stats, training=False)

    x = F.relu(conv_bn(x, "stem", "conv", "bn"))
    for i in range(config.n_stage):
        if i > 0 and config.transition == "conv":
            x = F.relu(conv_bn(x, f"stages.{i}.transition", "conv", "bn", stride=2))
        elif i > 0:  # option A: every other pixel, the new channels zero
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, x.shape[1]))
        for j in range(config.n_layer):
            block = f"stages.{i}.blocks.{j}"
            x = F.relu(x + conv_bn(F.relu(conv_bn(x, block, "conv1", "bn1")), block, "conv2", "bn2"))
    return F.linear(x.mean(dim=(2, 3)), state["classifier.weight"], state["classifier.bias"])


@pytest.mark.parametrize(
    "config", [c.with_depth(d) for c in (RGB7, CONV_TRANSITIONS[1]) for d in (0, 2)], ids=config_id
)
def test_forward_is_the_documented_network(config):
    model = build_model(config, seed=0)
    train_steps(model, build_optimizer(model, OptimConfig(name="adamw", lr=1e-2)), 2)  # non-trivial BN statistics
    x, _ = images(config, 9)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference_forward(model.state_dict(), config, x))


def test_zero_layer_resnet_classifies_without_blocks():
    model = build_model(TEST.with_depth(0), seed=0)
    assert all(len(stack) == 0 for stack in model.block_stacks().values())
    assert list(model.block_stacks()) == ["stages.0.blocks", "stages.1.blocks", "stages.2.blocks"]
    # the paper's zero-layer ResNet: stem and classifier (the option-A transitions have no weights)
    assert sorted({name.rsplit(".", 1)[0] for name, _ in model.named_parameters()}) == [
        "classifier",
        "stem.bn",
        "stem.conv",
    ]
    x, y = images(TEST, 0, batch=3)
    logits = model(x)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    loss(model, x, y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_init_follows_the_table():
    config = ResNetConfig(n_layer=2, width=32, n_stage=2, in_channels=3, image_size=8, weight_init="standard")
    model = build_model(config, seed=0)
    block = model.stages[1].blocks[1]  # 64 channels: fan_out = 64·9
    assert block.conv1.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.03)
    assert model.stem.conv.weight.std().item() == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.1)
    assert model.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.equal(block.bn2.weight, torch.ones(64)) and torch.equal(block.bn2.bias, torch.zeros(64))
    assert torch.equal(block.bn1.running_var, torch.ones(64)) and block.bn1.num_batches_tracked.item() == 0
    assert not torch.equal(model.stages[1].blocks[0].conv1.weight, block.conv1.weight)


def test_zero_init_residual_starts_every_block_as_the_identity():
    config = dataclasses.replace(TEST, n_layer=3, zero_init_residual=True)
    model = build_model(config, seed=SEED).eval()
    assert all(torch.equal(b.bn2.weight, torch.zeros_like(b.bn2.weight)) for s in model.stages for b in s.blocks)
    # the stem, transitions and classifier do not depend on the depth, so this is the zero-layer model
    shallow = build_model(config.with_depth(0), seed=SEED).eval()
    x, _ = images(config, 1)
    with torch.no_grad():
        assert torch.equal(model(x), shallow(x))


def test_problems_name_the_bad_fields():
    bad = ResNetConfig(n_layer=-1, width=0, n_stage=0, num_classes=0)
    assert bad.problems() == [
        "model.n_layer must be >= 0, got -1",
        "model.width must be >= 1, got 0",
        "model.n_stage must be >= 1, got 0",
        "model.num_classes must be >= 1, got 0",
    ]
    assert preset("resnet-digits").problems() == []


# --- data ---


@pytest.fixture(scope="module")
def digits() -> ImageData:
    pytest.importorskip("sklearn")
    return load_images(None, 0.1)


def test_digits_load_normalised_and_split(digits):
    assert digits.train_x.shape == (1617, 1, 8, 8) and digits.val_x.shape == (180, 1, 8, 8)
    assert digits.train_x.dtype == np.float32 and digits.train_y.dtype == np.int64
    assert (digits.channels, digits.size, digits.num_classes) == (1, 8, 10)
    assert set(digits.train_y) == set(digits.val_y) == set(range(10))
    assert abs(digits.train_x.mean()) < 1e-5 and digits.train_x.std() == pytest.approx(1.0, abs=1e-5)
    # the validation images are the held-out raw images, scaled by the training split's statistics
    from sklearn.datasets import load_digits

    raw = load_digits()
    train, val = holdout_split(1797, 0.1)
    mean, std = (raw.images[train] / 16).mean(), (raw.images[train] / 16).std()
    np.testing.assert_allclose(digits.val_x[:, 0], (raw.images[val] / 16 - mean) / std, atol=1e-5)
    np.testing.assert_array_equal(digits.val_y, raw.target[val])
    assert load_images(None, 0.1).val_y.tolist() == digits.val_y.tolist()


def test_holdout_split_is_fixed_and_disjoint():
    train, val = holdout_split(1797, 0.25)
    assert len(val) == 449 and len(train) == 1348
    assert sorted({*train, *val}) == list(range(1797))
    np.testing.assert_array_equal(holdout_split(1797, 0.25)[1], val)
    assert val.tolist() != list(range(1348, 1797))  # shuffled, not the tail: the digits are ordered by writer
    with pytest.raises(DepthgrowError, match="empty"):
        holdout_split(10, 0.01)


def _cifar_batch(path, labels, seed, marked=None):
    data = np.random.default_rng(seed).integers(0, 200, size=(len(labels), 3072), dtype=np.uint8)
    if marked is not None:
        data[0, marked] = 255  # brightest pixel of image 0
    with open(path, "wb") as handle:
        pickle.dump({b"batch_label": b"fake", b"labels": labels, b"data": data}, handle, protocol=2)
    return data


def write_cifar(folder, *, skip=()):
    folder.mkdir(parents=True)
    train = [_cifar_batch(folder / f"data_batch_{i}", [i, i + 1, 0], i) for i in range(1, 6) if i not in skip]
    # green plane (1024 pixels further), row 2, column 5
    test = _cifar_batch(folder / "test_batch", [9, 3], 0, marked=1024 + 2 * 32 + 5)
    return train, test


@pytest.mark.parametrize("holder", [False, True], ids=["batches-folder", "parent-folder"])
def test_cifar_folder_loads_in_the_real_format(tmp_path, holder):
    train, test = write_cifar(tmp_path / "cifar-10-batches-py")
    data = load_images(str(tmp_path if holder else tmp_path / "cifar-10-batches-py"), 0.5)
    assert data.train_x.shape == (15, 3, 32, 32) and data.val_x.shape == (2, 3, 32, 32)
    assert data.train_y.tolist() == [1, 2, 0, 2, 3, 0, 3, 4, 0, 4, 5, 0, 5, 6, 0] and data.val_y.tolist() == [9, 3]
    assert (data.channels, data.size, data.num_classes) == (3, 32, 10)
    pixels = np.concatenate(train).reshape(15, 3, 32, 32) / 255
    mean, std = pixels.mean(axis=(0, 2, 3)), pixels.std(axis=(0, 2, 3))
    np.testing.assert_allclose(data.train_x.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(data.train_x.std(axis=(0, 2, 3)), 1, atol=1e-5)
    assert np.unravel_index(data.val_x[0, 1].argmax(), (32, 32)) == (2, 5)
    np.testing.assert_allclose(data.val_x[0, 1, 2, 5], (1 - mean[1]) / std[1], rtol=1e-5)


def test_cifar_folder_with_a_missing_batch_is_refused(tmp_path):
    write_cifar(tmp_path / "c", skip=(3,))
    with pytest.raises(DepthgrowError, match="lacks data_batch_3"):
        load_images(str(tmp_path / "c"), 0.1)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    write_cifar(tmp_path / "c")
    (tmp_path / "c" / "test_batch").write_bytes(pickle.dumps({b"data": print}, protocol=2))
    with pytest.raises(DepthgrowError, match="test_batch is not a CIFAR-10 python batch"):
        load_images(str(tmp_path / "c"), 0.1)


def test_other_paths_are_refused(tmp_path, monkeypatch):
    with pytest.raises(DepthgrowError, match="does not exist"):
        load_images(str(tmp_path / "missing"), 0.1)
    (tmp_path / "notes.txt").write_text("hello")
    for path in (tmp_path, tmp_path / "notes.txt"):
        with pytest.raises(DepthgrowError, match="is not CIFAR-10: expected a folder with its python batches"):
            load_images(str(path), 0.1)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if scikit-learn were not installed
    with pytest.raises(DepthgrowError, match=r"pip install 'depthgrow\[vision\]'"):
        load_images(None, 0.1)


def test_training_batches_are_a_function_of_seed_and_step(digits):
    batches = ImageBatches(digits, batch_size=32, eval_batches=2, seed=5)
    assert (batches.unit, batches.units_per_step) == ("image", 32)
    x, y = batches.train_batch(7)
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    again = ImageBatches(digits, batch_size=32, eval_batches=2, seed=5).train_batch(7)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert not torch.equal(x, batches.train_batch(8)[0])
    assert not torch.equal(x, ImageBatches(digits, batch_size=32, eval_batches=2, seed=6).train_batch(7)[0])
    rows = {row.tobytes() for row in x.numpy()}
    assert len(rows) == 32  # no image twice in a batch (the digits hold no duplicate at these indices)


def test_validation_batches_are_the_first_images_in_order(digits):
    batches = ImageBatches(digits, batch_size=64, eval_batches=5, seed=0)
    val = batches.val_batches()
    assert [len(y) for _, y in val] == [64, 64, 52]  # all 180, the last batch short
    torch.testing.assert_close(torch.cat([x for x, _ in val]), torch.from_numpy(digits.val_x), rtol=0, atol=0)
    other = ImageBatches(digits, batch_size=64, eval_batches=2, seed=9).val_batches()
    assert [len(y) for _, y in other] == [64, 64]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(val, other, strict=False))
    val[0][0].zero_()
    assert digits.val_x[0].any(), "a batch is a copy of the data"


def test_augmentation_shifts_and_flips_reproducibly(digits):
    plain = ImageBatches(digits, batch_size=16, eval_batches=1, seed=1).train_batch(3)
    augmenting = ImageBatches(digits, batch_size=16, eval_batches=1, seed=1, augment=True)
    x, y = augmenting.train_batch(3)
    assert torch.equal(y, plain[1])  # the same images, drawn first
    assert torch.equal(x, augmenting.train_batch(3)[0])
    assert not torch.equal(x, plain[0])
    padded = F.pad(plain[0], (4, 4, 4, 4))
    for i in range(16):
        candidates = [
            crop.flip(-1) if flip else crop
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            for crop in [padded[i, :, dy : dy + 8, dx : dx + 8]]
        ]
        assert any(torch.equal(x[i], c) for c in candidates), i
    val = ImageBatches(digits, batch_size=16, eval_batches=1, seed=1, augment=True).val_batches()
    assert torch.equal(val[0][0], torch.from_numpy(digits.val_x[:16]))


def test_batch_larger_than_the_training_split_is_refused(digits):
    with pytest.raises(DepthgrowError, match="exceeds the 1617 training images"):
        ImageBatches(digits, batch_size=1618, eval_batches=1, seed=0)


def train_steps(model, optimizer, steps: int) -> None:
    model.train()
    for step in range(steps):
        loss(model, *images(model.config, step)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("labels", [[0, 10], [-1, 3]], ids=["too-large", "negative"])
def test_cifar_labels_outside_the_ten_classes_are_refused(tmp_path, labels):
    write_cifar(tmp_path / "c")
    _cifar_batch(tmp_path / "c" / "test_batch", labels, 0)
    with pytest.raises(DepthgrowError, match="labels outside 0..9"):
        load_images(str(tmp_path / "c"), 0.5)


def test_a_language_model_pointed_at_images_is_told_so(tmp_path):
    from depthgrow import load_config, train

    write_cifar(tmp_path / "cifar-10-batches-py")
    with pytest.raises(DepthgrowError, match="holds CIFAR-10 images, not text"):
        train(load_config(None, {"data.path": str(tmp_path), "train.out_dir": str(tmp_path / "run")}))
    with pytest.raises(DepthgrowError, match="an image model reads images"):
        load_config(None, {"model.preset": "resnet-test", "data.tokenizer": "gpt2"})
    with pytest.raises(DepthgrowError, match="a language model has none"):
        load_config(None, {"data.augment": "true"})
