"""transformers_el.fused: the causal LM's training loss from its last hidden states with the projection and
EL fused (no logits), against the logits path (the model's logits + EncouragingLMLoss) and the library's loss."""
import copy
import inspect

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

from transformers_el import (  # noqa: E402
    EncouragingLMLoss,
    disable_fused_el,
    enable_fused_el,
    fused_el_settings,
    is_fused_el_enabled,
)

EL = dict(log_end=0.75, bonus_rho=1.0, smoothing=0.1)
MODELS = [("gpt2", False), ("llama", False), ("llama", True)]  # GPT-2's head is tied to its input embeddings
CLOSE = dict(rtol=1e-4, atol=1e-6)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got, want):
    assert got.keys() == want.keys() and len(want) > 5
    for name in want:
        torch.testing.assert_close(got[name], want[name], **CLOSE, msg=name)


def _head_is_tied(model):
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("kind,tied", MODELS)
def test_rho0_equals_the_library_loss(lm, batch, kind, tied):
    model = lm(kind, tied=tied).train()
    ids, labels = batch()
    n = (labels[:, 1:] != -100).sum() + 3
    with torch.no_grad():
        want, want_n = model(input_ids=ids, labels=labels), model(input_ids=ids, labels=labels, num_items_in_batch=n)
    assert enable_fused_el(model, bonus_rho=0) is model and is_fused_el_enabled(model)
    with torch.no_grad():
        got, got_n = model(input_ids=ids, labels=labels), model(input_ids=ids, labels=labels, num_items_in_batch=n)
    assert type(got) is type(want) and got.logits is None and got.cache is not None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_n.loss, want_n.loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,tied", MODELS)
def test_gradients_equal_the_logits_path(lm, batch, kind, tied):
    model = lm(kind, tied=tied).train()
    assert _head_is_tied(model) == (tied or kind == "gpt2")
    ids, labels = batch()
    loss = EncouragingLMLoss(**EL)(model(input_ids=ids), labels)
    loss.backward()
    want = _grads(model)
    model.zero_grad()
    enable_fused_el(model, **EL)
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=1e-6)
    _assert_same_grads(_grads(model), want)
    # the EL really differs from cross-entropy here (so the comparison above tests the bonus)
    model.zero_grad()
    fused_el_settings(model).bonus_rho = 0.0
    with torch.no_grad():
        assert abs(model(input_ids=ids, labels=labels).loss.item() - loss.item()) > 1e-3


def test_gradient_accumulation_equals_one_big_batch(lm, batch):
    model = enable_fused_el(lm("llama").train(), **EL)
    ids, labels = batch(rows=4)
    model(input_ids=ids, labels=labels).loss.backward()
    big = _grads(model)
    model.zero_grad()
    total = (labels[:, 1:] != -100).sum()
    for half in ([0, 2], [1, 3]):  # 22 and 16 target tokens
        model(input_ids=ids[half], labels=labels[half], num_items_in_batch=total).loss.backward()
    _assert_same_grads(_grads(model), big)


def test_trainer_steps_lower_the_loss_on_the_fused_path(lm, pattern_dataset, run_trainer):
    model = enable_fused_el(lm("llama"), **EL)
    seen = []

    def record(module, args, kwargs, out):
        seen.append((out.logits is None, out.loss is not None, kwargs.get("num_items_in_batch")))

    model.register_forward_hook(record, with_kwargs=True)
    trainer, losses = run_trainer(model, pattern_dataset(), steps=8, accumulation=2)
    assert trainer.model_accepts_loss_kwargs  # the wrapped forward still shows the model's **kwargs
    assert len(losses) == 8 and len(seen) == 16
    # every step took the fused path, with Trainer's count of the target tokens of both micro-batches
    assert all(no_logits and has_loss and int(n) == 2 * 4 * 15 for no_logits, has_loss, n in seen), seen
    assert losses[-1] < 0.7 * losses[0], losses


def test_generation_and_eval_are_unchanged_and_disable_restores(lm, batch):
    model = lm("gpt2").eval()
    ids, labels = batch()
    prompt = ids[:2, :4]
    with torch.no_grad():
        want_logits = model(input_ids=ids, labels=labels).logits
    want_tokens = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    signature = inspect.signature(model.forward)
    enable_fused_el(model, **EL)
    assert inspect.signature(model.forward) == signature
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, want_logits, rtol=0, atol=0)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), want_tokens)
    model.train()  # generation in training mode gives no labels: the original forward too
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0), want_tokens)
    with torch.no_grad():
        assert model(input_ids=ids, labels=labels).logits is None
    assert disable_fused_el(model) is model and not is_fused_el_enabled(model)
    assert "forward" not in model.__dict__ and fused_el_settings(model) is None
    with torch.no_grad():
        back = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(back.logits, want_logits, rtol=0, atol=0)
    assert disable_fused_el(model) is model  # twice: nothing to undo


def test_settings_are_live_and_enable_again_replaces_them(lm, batch):
    model = lm("llama").train()
    ids, labels = batch()
    with torch.no_grad():
        ce = model(input_ids=ids, labels=labels).loss
        enable_fused_el(model, **EL)
        wrapper = model.__dict__["forward"]
        el = model(input_ids=ids, labels=labels).loss
        settings = fused_el_settings(model)
        assert isinstance(settings, EncouragingLMLoss) and settings.smoothing == 0.1
        settings.smoothing = 0.0
        settings.bonus_rho = 0.0  # what a bonus schedule's callback does between steps
        torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, ce, rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="bonus_rho"):
            settings.bonus_rho = -0.5
        enable_fused_el(model, **EL)  # again: new settings, the same single wrapper
        assert model.__dict__["forward"] is wrapper and fused_el_settings(model).bonus_rho == 1.0
        torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, el, rtol=1e-6, atol=1e-6)
        twin = copy.deepcopy(model)  # the copy's forward serves the copy
        assert is_fused_el_enabled(twin) and twin.__dict__["forward"].model is twin
        torch.testing.assert_close(twin(input_ids=ids, labels=labels).loss, el, rtol=1e-6, atol=1e-6)
        as_tuple = model(input_ids=ids, labels=labels, return_dict=False)
        assert isinstance(as_tuple, tuple)
        torch.testing.assert_close(as_tuple[0], el, rtol=1e-6, atol=1e-6)


def test_autocast_computes_the_head_in_the_autocast_dtype(lm, batch):
    model = lm("llama").train()
    ids, labels = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = EncouragingLMLoss(**EL)(model(input_ids=ids), labels)
        got = enable_fused_el(model, **EL)(input_ids=ids, labels=labels).loss
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_moe_load_balancing_loss_is_added_as_the_model_does(lm, batch):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=101, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5,
                                        max_position_embeddings=64)
    model = transformers.MixtralForCausalLM(config).train()
    ids, labels = batch()
    with torch.no_grad():
        want = model(input_ids=ids, labels=labels)
        got = enable_fused_el(model, bonus_rho=0)(input_ids=ids, labels=labels)
    assert want.aux_loss is not None and float(want.aux_loss) > 0
    torch.testing.assert_close(got.aux_loss, want.aux_loss)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)


def _tiny(name, **fields):
    config = getattr(transformers, f"{name}Config")(vocab_size=101, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=1, num_attention_heads=2,
                                                     num_key_value_heads=2, head_dim=16, **fields)
    return getattr(transformers, f"{name}ForCausalLM")(config)


class _HeadNeverCalled(transformers.LlamaForCausalLM):
    """Computes its logits from the head's weight without calling the head."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids).last_hidden_state
        return transformers.modeling_outputs.CausalLMOutputWithPast(logits=F.linear(hidden, self.lm_head.weight))


def test_models_it_cannot_serve_are_refused_in_one_line(lm, batch):
    plain_head = lm("llama")
    plain_head.set_output_embeddings(nn.Sequential(plain_head.lm_head))
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=101, d_model=16, d_ff=32,
                                                                       num_layers=1, num_heads=2, d_kv=8))
    cases = [
        (nn.Linear(3, 3), "must be a transformers \\*ForCausalLM model, got Linear"),
        (plain_head, "must be an nn.Linear for the fused path, got Sequential"),
        (_tiny("Gemma2", final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
        (_tiny("Cohere", logit_scale=0.0625), "logit_scale=0.0625"),
        (_tiny("Granite", logits_scaling=8.0), "logits_scaling=8.0"),
        (t5, "encoder-decoder"),
    ]
    for model, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            enable_fused_el(model)
        assert "\n" not in str(info.value) and not is_fused_el_enabled(model)
    enable_fused_el(_tiny("Granite", logits_scaling=1.0))  # a scaling that changes nothing is served
    model = lm("gpt2")
    for kwargs, message in ((dict(bonus_rho=-1), "bonus_rho"), (dict(chunk_rows=0), "chunk_rows"),
                            (dict(log_end=0), "log_end"), (dict(smoothing=2), "smoothing")):
        with pytest.raises(ValueError, match=message):
            enable_fused_el(model, **kwargs)
        assert not is_fused_el_enabled(model)
    ids, labels = batch()
    enable_fused_el(model).train()
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        model(input_ids=ids, labels=labels.float())
    direct = enable_fused_el(_HeadNeverCalled(lm("llama").config)).train()
    with pytest.raises(RuntimeError, match="called its output embeddings 0 times"):
        direct(input_ids=ids, labels=labels)
    assert "forward" not in direct.lm_head.__dict__  # the head's forward is restored after the call
