"""picochat's Muon: the same update as torch.optim.Muon, with float32 orthogonalization on the CPU."""

import pytest
import torch

from picochat.model import ModelConfig, Transformer
from picochat.train.loop import build_optimizers
from picochat.train.muon import Muon, native_bfloat16, orthogonalize


def _matrices(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((32, 16), (16, 48), (24, 24))]


def _run(optimizer_cls, params, steps: int, **kw) -> list[torch.Tensor]:
    opt = optimizer_cls(params, **kw)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        opt.step()
    return [p.detach().clone() for p in params]


def test_orthogonalize_gives_singular_values_near_one():
    update = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    singular = torch.linalg.svdvals(orthogonalize(update, steps=5))
    assert singular.shape == (32,)
    # The quintic iteration trades exactness for speed: singular values land in about (0.5, 1.5).
    assert singular.min() > 0.5 and singular.max() < 1.5
    assert orthogonalize(update).dtype == torch.float32  # returned in the update's dtype


def test_default_iteration_dtype_follows_the_hardware():
    update = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    native = native_bfloat16(update.device)
    expected = orthogonalize(update, dtype=torch.bfloat16 if native else torch.float32)
    assert torch.equal(orthogonalize(update), expected)
    assert not native_bfloat16(torch.device("meta"))


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_same_steps_as_torch_muon_in_bfloat16():
    kw = dict(lr=0.02, momentum=0.95, weight_decay=0.1)
    ours = _run(Muon, _matrices(0), steps=5, ns_dtype=torch.bfloat16, **kw)
    theirs = _run(torch.optim.Muon, _matrices(0), steps=5, adjust_lr_fn="original", **kw)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_float32_orthogonalization_is_close_to_bfloat16():
    kw = dict(lr=0.02, momentum=0.95, weight_decay=0.0)
    ours = _run(Muon, _matrices(0), steps=5, **kw)
    theirs = _run(torch.optim.Muon, _matrices(0), steps=5, adjust_lr_fn="original", **kw)
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() < 0.02  # bfloat16 rounding, over 5 steps of size ~0.02


def test_rejects_non_matrix_parameters_and_negative_settings():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.ones(4))])
    with pytest.raises(ValueError, match="must be >= 0"):
        Muon(_matrices(0), lr=-0.01)


def test_build_optimizers_gives_hidden_matrices_to_muon():
    model = Transformer(ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=16))
    muon, adamw = build_optimizers(model, "muon", lr=3e-3)
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in in_muon}
    assert names and all(("proj" in n) for n in names)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" not in names
    loss = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    loss.backward()
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    muon.step()
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)
