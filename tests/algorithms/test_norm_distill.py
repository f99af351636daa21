import copy

from lpq.algorithms import norm_distill
from lpq.eval import shift

import pytest
import torch
from torch import nn

from lpq.algorithms.norm_distill import (NormDistillSettings, distill_norms, final_hidden, head_kl, next_token_labels,
                                         norm_parameters, teacher_targets)
from lpq.config import from_dict
from lpq.models.tiny import tiny_causal_lm
from lpq.quant import QuantRecipe, quantize_model
from lpq.quant.transforms import InputTransform


def _pair():
    teacher = tiny_causal_lm("tiny-llama", torch.float32).eval()
    with torch.no_grad():   # peaked next-token distributions, as a trained model has
        teacher.lm_head.weight.mul_(30)
    student = copy.deepcopy(teacher)
    quantize_model(student, from_dict({"format": "hif4"}, QuantRecipe))
    # One rotated input, so the gradient also has to cross the online Hadamard.
    student.model.layers[0].self_attn.q_proj.input_transform = InputTransform(hadamard_block=16)
    with torch.no_grad():
        q = student.model.layers[0].self_attn.q_proj
        q.weight.copy_(InputTransform(hadamard_block=16)(q.weight))
    return teacher, student


def _distill(student, teacher, ids, settings, **kw):
    return distill_norms(student, teacher_targets(teacher, ids, settings), ids, settings, **kw)


@torch.no_grad()
def _kl(teacher, student, ids):
    lt, ls = teacher(input_ids=ids).logits.log_softmax(-1), student(input_ids=ids).logits.log_softmax(-1)
    return float((lt.exp() * (lt - ls)).sum(-1).mean())


def test_distillation_lowers_the_kl_and_touches_only_the_norms():
    teacher, student = _pair()
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    norms = {id(p) for p in norm_parameters(student)}
    kl0 = _kl(teacher, student, ids)
    stats = _distill(student, teacher, ids, NormDistillSettings(steps=12, lr=1e-2, batch_size=2))
    assert _kl(teacher, student, ids) < 0.8 * kl0
    assert stats["first_loss"] > stats["last_loss"]
    assert stats["parameters"] == sum(p.numel() for p in norm_parameters(student))
    for n, p in student.named_parameters():
        assert torch.equal(p, before[n]) != (id(p) in norms), n
        assert p.requires_grad and p.grad is None


def test_refuses_what_it_cannot_train():
    teacher, student = _pair()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="steps >= 1"):
        _distill(student, teacher, ids, NormDistillSettings(steps=0))
    with pytest.raises(ValueError, match="no normalization layers"):
        _distill(nn.Sequential(nn.Linear(2, 2)), teacher, ids, NormDistillSettings())


def test_an_interrupted_distillation_continues_to_the_same_result(tmp_path, monkeypatch):
    ids = torch.randint(0, 1000, (6, 16), generator=torch.Generator().manual_seed(1))
    settings = NormDistillSettings(steps=6, lr=1e-2, batch_size=1)
    teacher, straight = _pair()
    resumed = copy.deepcopy(straight)
    a = _distill(straight, teacher, ids, settings)
    real, calls = norm_distill.head_kl, {"n": 0}

    def dies_at_step_five(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real(*args)

    monkeypatch.setattr(norm_distill, "head_kl", dies_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        _distill(resumed, teacher, ids, settings, resume_file=tmp_path / "d.pt", save_every=2)
    assert torch.load(tmp_path / "d.pt")["step"] == 4 == norm_distill.steps_done(tmp_path / "d.pt")
    monkeypatch.setattr(norm_distill, "head_kl", real)
    # The resumed run is given the teacher's targets for the steps left only (5 and 6).
    left = teacher_targets(teacher, ids, settings, first_step=4)
    assert sorted(left.hidden) == [(4,), (5,)]
    b = distill_norms(resumed, left, ids, settings, resume_file=tmp_path / "d.pt", save_every=2)
    assert (a["first_loss"], a["last_loss"]) == (b["first_loss"], b["last_loss"])
    for p, q in zip(norm_parameters(straight), norm_parameters(resumed)):
        assert torch.equal(p, q)


def test_a_finished_distillation_needs_no_targets(tmp_path):
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(6))
    settings = NormDistillSettings(steps=2, lr=1e-2, batch_size=1)
    teacher, student = _pair()
    assert norm_distill.steps_done(tmp_path / "d.pt") == 0 and norm_distill.steps_done(None) == 0
    a = _distill(student, teacher, ids, settings, resume_file=tmp_path / "d.pt")
    again = copy.deepcopy(_pair()[1])
    b = distill_norms(again, None, ids, settings, resume_file=tmp_path / "d.pt")
    assert (a["first_loss"], a["last_loss"]) == (b["first_loss"], b["last_loss"])
    assert all(torch.equal(p, q) for p, q in zip(norm_parameters(student), norm_parameters(again)))
    with pytest.raises(ValueError, match="no teacher target for step 1"):
        distill_norms(copy.deepcopy(again), None, ids, settings)


def test_recomputing_block_activations_gives_the_same_training():
    teacher, plain = _pair()
    recomputed = copy.deepcopy(plain)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(2))
    settings = NormDistillSettings(steps=3, lr=1e-2, batch_size=1)
    calls = {"plain": 0, "recomputed": 0}
    for name, model in (("plain", plain), ("recomputed", recomputed)):
        model.model.layers[0].self_attn.register_forward_pre_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    a = _distill(plain, teacher, ids, settings)
    b = _distill(recomputed, teacher, ids, settings, blocks=recomputed.model.layers)
    assert calls == {"plain": 3, "recomputed": 6}   # the backward pass ran each block's forward again
    assert (a["first_loss"], a["last_loss"]) == (b["first_loss"], b["last_loss"])
    assert all(torch.equal(p, q) for p, q in zip(norm_parameters(plain), norm_parameters(recomputed)))
    assert all("forward" not in block.__dict__ for block in recomputed.model.layers)


def test_freed_memory_is_returned_after_each_block_in_both_passes(monkeypatch):
    """With recomputation, glibc's freed pages are returned after every block's forward and backward
    (and after each step), not only between steps; the training is the same."""
    teacher, student = _pair()
    reference = copy.deepcopy(student)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(5))
    settings = NormDistillSettings(steps=3, lr=1e-2, batch_size=1)
    a = _distill(reference, teacher, ids, settings, blocks=reference.model.layers)
    calls = []
    monkeypatch.setattr(norm_distill, "release_freed_memory", lambda: calls.append(1) or True)
    b = _distill(student, teacher, ids, settings, blocks=student.model.layers)
    assert len(calls) == settings.steps * (2 * len(student.model.layers) + 1)
    assert (a["first_loss"], a["last_loss"]) == (b["first_loss"], b["last_loss"])


def test_teacher_targets_run_each_distinct_batch_once_as_the_steps_would():
    """6 steps of 2 over 4 windows read 2 distinct batches: the teacher runs twice, and each target is
    bit for bit the hidden state of that batch."""
    teacher, _ = _pair()
    ids = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(3))
    calls = []
    teacher.model.register_forward_pre_hook(lambda *_: calls.append(1))
    targets = teacher_targets(teacher, ids, NormDistillSettings(steps=6, batch_size=2))
    assert len(calls) == 2 and sorted(targets.hidden) == [(0, 1), (2, 3)]
    assert targets.head is teacher.lm_head
    with torch.no_grad():
        for idx, hidden in targets.hidden.items():
            assert torch.equal(hidden, final_hidden(teacher, ids[list(idx)]))


def test_targets_made_for_other_settings_are_refused():
    teacher, student = _pair()
    ids = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(4))
    targets = teacher_targets(teacher, ids, NormDistillSettings(steps=1, batch_size=2))
    with pytest.raises(ValueError, match=r"no teacher target for step 2's batch \[2, 3\]"):
        distill_norms(student, targets, ids, NormDistillSettings(steps=2, batch_size=2))


def test_learnable_input_scales_of_the_linears_no_norm_feeds():
    """input_scales: o_proj and down_proj (whose inputs no norm produces) get an online input scale,
    trained with the norms; q/k/v and gate/up (fed by the norms) do not; nothing else changes."""
    from lpq.algorithms.norm_distill import learnable_input_scales
    from lpq.models.adapters import get_adapter

    teacher, student = _pair()
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    scales = learnable_input_scales(student, get_adapter(student))
    layer = student.model.layers[0]
    assert len(scales) == 2 * len(student.model.layers)
    assert layer.self_attn.o_proj.input_transform.input_scale is scales[0]
    assert layer.self_attn.q_proj.input_transform.input_scale is None          # fed by input_layernorm
    assert torch.equal(scales[0], torch.ones(64))
    weights = {n: p.detach().clone() for n, p in student.named_parameters() if not n.endswith("norm.weight")}
    kl0 = _kl(teacher, student, ids)
    _distill(student, teacher, ids, NormDistillSettings(steps=12, lr=1e-2, batch_size=2), extra=scales)
    assert _kl(teacher, student, ids) < kl0
    assert not torch.equal(scales[0], torch.ones(64)) and not scales[0].requires_grad
    assert all(torch.equal(p, weights[n]) for n, p in student.named_parameters() if n in weights)


@pytest.mark.parametrize("name, per_block, flags", [("tiny-llama", 7, ("attention_bias", "mlp_bias")),
                                                    ("tiny-qwen3", 4, ("attention_bias",))])
def test_learnable_biases_are_zeros_where_the_model_class_can_carry_them(name, per_block, flags):
    """biases: a zero bias on every linear a config flag covers (the flag turned on); the model computes
    what it did; the biases of quantized linears are returned to train."""
    from lpq.algorithms.norm_distill import learnable_biases
    from lpq.models.adapters import get_adapter

    model = tiny_causal_lm(name, torch.float32).eval()
    quantize_model(model, from_dict({"format": "hif4"}, QuantRecipe))
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    biases = learnable_biases(model, get_adapter(model))
    assert len(biases) == per_block * len(model.model.layers)
    assert all(isinstance(b, nn.Parameter) and not b.any() for b in biases)
    assert all(getattr(model.config, f) for f in flags)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    again = learnable_biases(model, get_adapter(model))                   # a second call finds the same ones
    assert len(again) == len(biases) and all(a is b for a, b in zip(again, biases))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_kl_in_slices_equals_the_plain_expression_and_its_gradient(monkeypatch, dtype):
    """The KL made from hidden states and output heads a few positions at a time, its gradient made in
    the same pass, against the plain autograd expression over whole logits: value and student
    gradient agree to float32 rounding, with slices that do not divide the positions."""
    monkeypatch.setattr(shift, "KL_ROWS", 5)
    gen = torch.Generator().manual_seed(0)
    head_t, head_s = nn.Linear(16, 97, bias=False), nn.Linear(16, 97)
    with torch.no_grad():
        for p in (*head_t.parameters(), *head_s.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen))
            p.requires_grad_(False)
    head_t, head_s = head_t.to(dtype), head_s.to(dtype)
    teacher = torch.randn(2, 13, 16, generator=gen).to(dtype)
    student = (teacher.float() + 0.3 * torch.randn(2, 13, 16, generator=gen)).to(dtype).requires_grad_()
    plain_s = student.detach().clone().requires_grad_()
    lt, ls = head_t(teacher).float().log_softmax(-1), head_s(plain_s).float().log_softmax(-1)
    plain = (lt.exp() * (lt - ls)).sum(-1).mean()
    plain.backward()
    sliced = head_kl(teacher, student, head_t, head_s)
    sliced.backward()
    assert sliced.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(sliced, plain, **tol)
    assert student.grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(student.grad, plain_s.grad, **tol)
    else:   # bfloat16 matmuls round differently per element; the gradient as a whole agrees
        err = (student.grad.float() - plain_s.grad.float()).norm() / plain_s.grad.float().norm()
        assert err < 1e-2
    with pytest.raises(ValueError, match="must not require gradients"):
        head_kl(student, teacher, head_t, head_s)
    head_s.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="not the head itself"):
        head_kl(teacher, student, head_t, head_s)


@pytest.mark.parametrize("label_weight", [0.3, 0.9])
def test_head_kl_to_a_target_mixed_with_the_next_token_equals_the_plain_expression(monkeypatch, label_weight):
    """With a label weight w the teacher's side is (1 - w) teacher + w one-hot(next token) where a next
    token exists, the teacher's alone at the window's last position: value and gradient against the
    plain autograd expression, slices that do not divide the positions."""
    monkeypatch.setattr(shift, "KL_ROWS", 5)
    gen = torch.Generator().manual_seed(1)
    head_t, head_s = nn.Linear(16, 97, bias=False).requires_grad_(False), nn.Linear(16, 97).requires_grad_(False)
    teacher = torch.randn(2, 13, 16, generator=gen)
    student = (teacher + 0.3 * torch.randn(2, 13, 16, generator=gen)).requires_grad_()
    ids = torch.randint(0, 97, (2, 13), generator=gen)
    plain_s = student.detach().clone().requires_grad_()
    lt, ls = head_t(teacher).log_softmax(-1), head_s(plain_s).log_softmax(-1)
    q = (1 - label_weight) * lt.exp()
    q[:, :-1] += label_weight * nn.functional.one_hot(ids[:, 1:], 97)
    q[:, -1] = lt[:, -1].exp()
    plain = (torch.xlogy(q, q) - q * ls).sum(-1).mean()
    plain.backward()
    mixed = head_kl(teacher, student, head_t, head_s, next_token_labels(ids), label_weight)
    mixed.backward()
    torch.testing.assert_close(mixed, plain, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(student.grad, plain_s.grad, rtol=1e-5, atol=1e-7)
    assert next_token_labels(ids)[:, -1].eq(-1).all() and torch.equal(next_token_labels(ids)[:, :-1], ids[:, 1:])
    with pytest.raises(ValueError, match="needs the next tokens"):
        head_kl(teacher, student, head_t, head_s, None, label_weight)


def test_a_zero_label_weight_is_the_plain_distillation_bit_for_bit():
    """label_weight 0 (the default) takes exactly the pure-KL arithmetic: the same losses and norms as a
    run that never heard of next tokens; a positive weight trains to other norms."""
    teacher, student = _pair()
    ids = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(5))
    runs = {}
    for w in (None, 0.0, 0.5):
        s = copy.deepcopy(student)
        settings = NormDistillSettings(steps=3, sequences=4, seq_len=16) if w is None else \
            NormDistillSettings(steps=3, sequences=4, seq_len=16, label_weight=w)
        stats = _distill(s, teacher, ids, settings)
        runs[w] = (stats["first_loss"], stats["last_loss"], [p.detach().clone() for p in norm_parameters(s)])
    assert runs[None][:2] == runs[0.0][:2]
    assert all(torch.equal(a, b) for a, b in zip(runs[None][2], runs[0.0][2]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[None][2], runs[0.5][2]))


@pytest.mark.parametrize("weight", [-0.1, 1.0, 1.5])
def test_a_label_weight_outside_zero_to_one_is_refused(weight):
    with pytest.raises(ValueError, match=r"label_weight must be in \[0, 1\)"):
        NormDistillSettings(label_weight=weight)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-pangu", "tiny-qwen3", "tiny-qwen3-moe"])
def test_the_head_of_the_final_hidden_states_is_the_models_logits(name):
    model = tiny_causal_lm(name, torch.float32)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model.get_output_embeddings()(final_hidden(model, ids)), model(input_ids=ids).logits)
