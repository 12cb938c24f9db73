import pytest
import torch
from torch import nn

import depthgrow
from depthgrow import GPT2Config, NormalizedSGD, OptimConfig, build_model, build_optimizer
from depthgrow.optim import Muon, check_coverage, hidden_matrix_names

CONFIG = GPT2Config(n_layer=2, n_embd=16, n_head=2, block_size=8, vocab_size=32)


def names_in(optimizer, model, role):
    by_id = {id(p): name for name, p in model.named_parameters()}
    return {by_id[id(p)] for group in optimizer.param_groups if group["role"] == role for p in group["params"]}


def test_adamw_decays_matrices_and_embeddings_but_not_vectors():
    model = build_model(CONFIG, seed=0)
    optimizer = build_optimizer(model, OptimConfig(name="adamw", weight_decay=0.1))
    assert names_in(optimizer, model, "decay") == {n for n, p in model.named_parameters() if p.ndim == 2}
    assert names_in(optimizer, model, "no_decay") == {n for n, p in model.named_parameters() if p.ndim == 1}
    decay = {group["role"]: group["weight_decay"] for group in optimizer.param_groups}
    assert decay == {"decay": 0.1, "no_decay": 0.0}
    assert optimizer.optimizers[0].param_groups[0]["betas"] == (0.9, 0.95)


def test_muon_nsgd_puts_every_matrix_in_muon_and_the_rest_in_normalized_sgd():
    model = build_model(CONFIG, seed=0)
    optimizer = build_optimizer(model, OptimConfig(name="muon-nsgd", lr=0.02, weight_decay=0.01))
    muon, nsgd = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(nsgd, NormalizedSGD)
    blocks = {
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert hidden_matrix_names(model) == blocks
    # the paper's scope: the (tied) embedding and the position embedding too
    assert names_in(optimizer, model, "matrix") == blocks | {"transformer.wte.weight", "transformer.wpe.weight"}
    assert names_in(optimizer, model, "other_no_decay") == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert {group["lr"] for group in optimizer.param_groups} == {0.02}
    decay = {group["role"]: group["weight_decay"] for group in optimizer.param_groups}
    assert decay == {"matrix": 0.01, "other_no_decay": 0.0}


def test_muon_scope_blocks_keeps_embeddings_on_normalized_sgd():
    model = build_model(CONFIG, seed=0)
    optimizer = build_optimizer(model, OptimConfig(name="muon-nsgd", muon_scope="blocks"))
    assert names_in(optimizer, model, "matrix") == hidden_matrix_names(model)
    assert names_in(optimizer, model, "other") == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert [type(o) for o in build_optimizer(build_model(CONFIG.with_depth(0), seed=0), OptimConfig(
        name="muon-nsgd", muon_scope="blocks")).optimizers] == [NormalizedSGD]  # fmt: skip


@pytest.mark.parametrize("preset", ["gpt2-test", "llama-test", "moe-test", "resnet-test"])
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_default_muon_nsgd_trains_every_matrix_of_every_family_with_muon_also_after_growth(preset, depth):
    model = build_model(depthgrow.preset(preset).with_depth(depth), seed=0)
    optimizer = build_optimizer(model, OptimConfig())
    matrices = {name for name, p in model.named_parameters() if p.ndim >= 2}
    assert matrices and names_in(optimizer, model, "matrix") == matrices
    assert isinstance(optimizer.optimizers[0], torch.optim.Muon)
    grown = depthgrow.grow(model, optimizer, depth + 2, "random", seed=0)
    matrices = {name for name, p in grown.model.named_parameters() if p.ndim >= 2}
    assert names_in(grown.optimizer, grown.model, "matrix") == matrices
    check_coverage(grown.model, grown.optimizer)


def test_a_zero_layer_models_embedding_moves_under_muon_by_the_orthogonalised_step():
    """Muon steps a V x d matrix by lr·sqrt(V/d) along an orthogonalised update (singular values near 1):
    about lr/sqrt(d) per entry, sqrt(V) times normalised SGD's lr/sqrt(V·d)."""
    model = build_model(CONFIG.with_depth(0), seed=0)
    optimizer = build_optimizer(model, OptimConfig(name="muon-nsgd", lr=0.01, weight_decay=0.0))
    embedding = model.transformer.wte.weight
    before = embedding.detach().clone()
    x = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.block_size))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
    optimizer.step()
    step = embedding.detach() - before
    V, d = embedding.shape
    assert torch.linalg.matrix_norm(step, ord=2).item() == pytest.approx(0.01 * (V / d) ** 0.5, rel=0.5)
    assert step.norm().item() > 3 * 0.01  # normalised SGD would move it by exactly lr in Frobenius norm


def test_muon_orthogonalises_a_conv_kernel_as_the_matrix_it_applies():
    kernel = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    kernel.grad = torch.randn(8, 4, 3, 3)
    start = kernel.detach().clone()
    optimizer = Muon([kernel], lr=0.1, weight_decay=0.0, momentum=0.0, nesterov=False)
    optimizer.step()
    assert optimizer.state[kernel]["momentum_buffer"].shape == kernel.shape  # state keeps the kernel's shape
    update = (start - kernel.detach()).reshape(8, 36) / 0.1  # rows 8 <= columns 36: no lr adjustment
    singular = torch.linalg.svdvals(update)
    assert singular.min() > 0.3 and singular.max() < 1.3  # Newton-Schulz's near-orthogonal output


def test_learning_rate_multiplier_scales_every_group_from_its_peak():
    model = build_model(CONFIG, seed=0)
    optimizer = build_optimizer(model, OptimConfig(name="muon-nsgd", lr=0.04, muon_scope="blocks"))
    optimizer.set_lr_multiplier(0.5)
    assert [group["lr"] for group in optimizer.param_groups] == [0.02, 0.02, 0.02]


def test_normalized_sgd_takes_steps_of_length_lr():
    p = torch.nn.Parameter(torch.tensor([3.0, -4.0, 12.0]))
    optimizer = NormalizedSGD([p], lr=0.1, momentum=0.9, weight_decay=0.0)
    for scale in (1e-2, 1e3):  # the step has length lr whatever the gradient's scale
        start = p.detach().clone()
        p.grad = scale * torch.tensor([1.0, 2.0, -2.0])
        optimizer.step()
        assert (p - start).norm().item() == pytest.approx(0.1, rel=1e-5)
        direction = (start - p.detach()) / 0.1
        torch.testing.assert_close(direction, torch.tensor([1.0, 2.0, -2.0]) / 3.0)


def test_normalized_sgd_matches_a_hand_written_reference_with_momentum_and_decay():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    reference = p.detach().clone()
    buffer = torch.zeros(5)
    lr, momentum, wd = 0.05, 0.9, 0.1
    optimizer = NormalizedSGD([p], lr=lr, momentum=momentum, weight_decay=wd, nesterov=True)
    for _ in range(4):
        grad = torch.randn(5)
        p.grad = grad.clone()
        optimizer.step()
        buffer = momentum * buffer + (1 - momentum) * grad
        update = (1 - momentum) * grad + momentum * buffer
        reference = reference * (1 - lr * wd) - lr * update / (update.norm() + 1e-8)
    torch.testing.assert_close(p.detach(), reference)


def test_normalized_sgd_leaves_a_zero_gradient_alone():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.zeros(4)
    NormalizedSGD([p], lr=0.1).step()
    assert torch.equal(p.detach(), torch.ones(4))


def test_coverage_check_finds_missing_and_repeated_parameters():
    model = build_model(CONFIG, seed=0)
    params = list(model.parameters())
    with pytest.raises(RuntimeError, match="missing"):
        check_coverage(model, torch.optim.SGD(params[1:], lr=0.1))
    with pytest.raises(RuntimeError, match="several groups"):
        check_coverage(model, [torch.optim.SGD(params, lr=0.1), torch.optim.SGD(params[:1], lr=0.1)])
    check_coverage(model, torch.optim.SGD(params, lr=0.1))


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_batched_newton_schulz_steps_exactly_as_torch_muon(nesterov, adjust_lr_fn):
    # same-shaped matrices (an MoE's experts) are orthogonalised as one batch: the steps must stay torch's
    generator = torch.Generator().manual_seed(0)
    shapes = [(48, 48)] * 5 + [(96, 48)] * 3 + [(48, 96)] * 2 + [(7, 5)]
    ours = [nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    options = dict(lr=0.02, weight_decay=0.01, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    batched, reference = Muon(ours, **options), torch.optim.Muon(theirs, **options)
    start = [p.detach().clone() for p in ours]
    for _ in range(3):
        for a, b in zip(ours, theirs, strict=True):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        batched.step()
        reference.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(ours, start, strict=True))
