"""transformers_el.loss: token-level EL with transformers' causal-LM conventions, against the library's own
loss (``ForCausalLMLoss``, the model's ``outputs.loss``) and the core's ``encouraging_loss``."""
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers.loss.loss_utils import ForCausalLMLoss  # noqa: E402

from encouraging_loss import encouraging_loss  # noqa: E402
from transformers_el import EL_DEFAULTS, EncouragingLMLoss, encouraging_lm_loss  # noqa: E402

EL = dict(log_end=0.75, bonus_rho=1.0, smoothing=0.1)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_rho0_equals_the_library_loss(lm, batch, kind):
    model = lm(kind).eval()
    ids, labels = batch()
    assert (labels == -100).any()
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        n = (labels[:, 1:] != -100).sum()
        out_n = model(input_ids=ids, labels=labels, num_items_in_batch=n + 5)  # the model's loss, GA form
    ce = EncouragingLMLoss(bonus_rho=0)
    torch.testing.assert_close(ce(out, labels), out.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ce(out, labels, num_items_in_batch=n + 5), out_n.loss, rtol=1e-6, atol=1e-6)
    V = out.logits.shape[-1]
    for items in (None, n, int(n) + 3, float(n) / 2):
        torch.testing.assert_close(
            encouraging_lm_loss(out.logits, labels, num_items_in_batch=items, bonus_rho=0),
            ForCausalLMLoss(out.logits, labels, V, num_items_in_batch=items), rtol=1e-6, atol=1e-6)
    # smoothing matches label-smoothed cross-entropy on the shifted tokens
    shifted = out.logits[:, :-1].reshape(-1, V)
    target = labels[:, 1:].reshape(-1)
    torch.testing.assert_close(
        encouraging_lm_loss(out.logits, labels, bonus_rho=0, smoothing=0.1),
        F.cross_entropy(shifted, target, ignore_index=-100, label_smoothing=0.1), rtol=1e-6, atol=1e-6)


def test_el_value_is_the_core_loss_on_the_shifted_logits(lm, batch):
    ids, labels = batch()
    logits = _logits(lm("gpt2"), ids)
    V = logits.shape[-1]
    shifted, target = logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1)
    by_hand = encouraging_loss(shifted, target, **EL)
    loss = encouraging_lm_loss(logits, labels, **EL)
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=1e-6)
    assert abs(float(loss) - float(encouraging_lm_loss(logits, labels, bonus_rho=0, smoothing=0.1))) > 1e-3
    # the sum over num_items_in_batch
    summed = encouraging_loss(shifted, target, reduction="sum", **EL)
    torch.testing.assert_close(encouraging_lm_loss(logits, labels, num_items_in_batch=torch.tensor(40), **EL),
                               summed / 40, rtol=1e-6, atol=1e-6)
    # already-aligned labels (seq2seq, token classification): no shift
    torch.testing.assert_close(encouraging_lm_loss(logits, labels, shift_labels=False, **EL),
                               encouraging_loss(logits.reshape(-1, V), labels.reshape(-1), **EL), rtol=1e-6, atol=1e-6)
    # the other EL settings reach the core
    for extra in (dict(bonus="power", bonus_gamma=2.0), dict(bonus_start=0.3, log_end=1.0), dict(bonus_smoothing=0.0)):
        kw = {**EL, **extra}
        torch.testing.assert_close(encouraging_lm_loss(logits, labels, **kw), encouraging_loss(shifted, target, **kw),
                                   rtol=1e-6, atol=1e-6)


def test_half_precision_logits_are_scored_in_float32(lm, batch):
    ids, labels = batch()
    logits = _logits(lm("llama"), ids).to(torch.bfloat16)
    loss = encouraging_lm_loss(logits, labels, **EL)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, encouraging_lm_loss(logits.float(), labels, **EL), rtol=1e-5, atol=1e-5)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_equals_one_big_batch(lm, batch):
    model = lm("llama").train()
    ids, labels = batch(rows=4)
    loss_fn = EncouragingLMLoss(**EL)
    loss_fn(model(input_ids=ids), labels).backward()
    big = _grads(model)
    model.zero_grad()
    total = (labels[:, 1:] != -100).sum()
    halves = ([0, 2], [1, 3])  # 22 and 16 target tokens
    for half in halves:
        loss_fn(model(input_ids=ids[half]), labels[half], num_items_in_batch=total).backward()
    accumulated = _grads(model)
    assert big.keys() == accumulated.keys() and len(big) > 5
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-6, msg=name)
    # without num_items_in_batch each half is its own mean: not the big batch's gradient (the rows differ in length)
    model.zero_grad()
    for half in halves:
        (loss_fn(model(input_ids=ids[half]), labels[half]) / 2).backward()
    assert not torch.allclose(_grads(model)["lm_head.weight"], big["lm_head.weight"], rtol=1e-4, atol=1e-6)


def test_trainer_with_compute_loss_func_lowers_the_loss(lm, pattern_dataset, run_trainer):
    loss_fn = EncouragingLMLoss(**EL)
    calls = []

    def seen(module, args, kwargs, loss):
        outputs, labels = args
        assert outputs.logits is not None and labels is not None
        calls.append(kwargs["num_items_in_batch"])

    loss_fn.register_forward_hook(seen, with_kwargs=True)
    trainer, losses = run_trainer(lm("llama"), pattern_dataset(), steps=8, accumulation=2, compute_loss_func=loss_fn)
    assert len(losses) == 8 and len(calls) == 16
    # the target tokens of both micro-batches (Trainer counts labels[..., 1:] for a ForCausalLM loss_type)
    assert all(int(n) == 2 * 4 * 15 for n in calls), calls
    assert losses[-1] < 0.7 * losses[0], losses


def test_settings_are_checked_attributes():
    loss_fn = EncouragingLMLoss(bonus_rho=0.5, smoothing=0.1)
    assert loss_fn.settings == {**EL_DEFAULTS, "bonus_rho": 0.5, "smoothing": 0.1}
    assert repr(loss_fn) == (
        "EncouragingLMLoss(log_end=0.75, bonus='log', bonus_start=0.0, bonus_gamma=1.0, "
        "bonus_rho=0.5, smoothing=0.1, bonus_smoothing=None, ignore_index=-100, shift_labels=True)")
    loss_fn.bonus_rho = 0.0  # a schedule's callback between steps
    assert loss_fn.bonus_rho == 0.0
    for name, bad in (("bonus_rho", -1.0), ("log_end", 1.5), ("smoothing", 1.0), ("shift_labels", "yes"),
                      ("bonus", "square"), ("ignore_index", 0.5), ("reduction", "sum")):
        with pytest.raises(ValueError, match=name) as info:
            setattr(loss_fn, name, bad)
        assert "\n" not in str(info.value)
        if name != "reduction":  # not a constructor argument
            with pytest.raises(ValueError, match=name):
                EncouragingLMLoss(**{name: bad})
    assert loss_fn.bonus_rho == 0.0 and loss_fn.log_end == 0.75 and loss_fn.shift_labels is True


def test_bad_inputs_give_one_line_errors():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    cases = [
        (dict(labels=labels.float()), "labels must be an integer tensor"),
        (dict(labels=labels[:, :4]), r"labels must have shape \(2, 5\)"),
        (dict(labels=labels + 20), "labels holds class index"),
        (dict(num_items_in_batch=0), "num_items_in_batch must be a number > 0"),
        (dict(num_items_in_batch=True), "num_items_in_batch"),
        (dict(num_items_in_batch=torch.ones(3)), "one-element tensor"),
        (dict(shift_labels=1), "shift_labels must be True or False"),
        (dict(bonus_rho=float("nan")), "bonus_rho"),
    ]
    for change, message in cases:
        kw = {"labels": labels, **change}
        with pytest.raises(ValueError, match=message) as info:
            encouraging_lm_loss(logits, kw.pop("labels"), **kw)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="holds no logits"):
        EncouragingLMLoss()({"loss": torch.tensor(1.0)}, labels)
    with pytest.raises(ValueError, match="labels must be given"):
        EncouragingLMLoss()({"logits": logits}, None)
