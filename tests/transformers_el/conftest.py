"""The transformers plugin's test fixtures: tiny random causal LMs built from a config (no download) and
a repeated-pattern batch. transformers is imported inside the fixtures, so that this file loads where it is
not installed (the test modules skip themselves there)."""
import pytest
import torch

VOCAB = 101


def build_lm(kind: str, tied: bool = False, seed: int = 0, **extra):
    """A tiny random causal LM, dropout off (train mode computes what eval mode does): ``kind`` ``gpt2``
    (its head is tied to the input embeddings) or ``llama`` (``tied`` chooses)."""
    import transformers

    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0, **extra)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                      **extra)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture
def lm():
    """``lm(kind, tied=False, seed=0, **config_fields)``: a fresh tiny causal LM (:func:`build_lm`)."""
    return build_lm


@pytest.fixture
def pattern_dataset():
    """``pattern_dataset(rows=32, length=16)``: a list of ``{"input_ids", "labels"}`` examples repeating a
    7-token pattern (ids 3..9), each row starting elsewhere in it: the next token is always predictable, so
    that a few ``Trainer`` steps lower the loss."""

    def make(rows: int = 32, length: int = 16):
        ids = (torch.arange(rows).unsqueeze(1) + torch.arange(length)) % 7 + 3
        return [{"input_ids": row, "labels": row.clone()} for row in ids]

    return make


@pytest.fixture
def batch():
    """``batch(rows=4, length=12, seed=0)``: ``(input_ids, labels)``, random ids with the last tokens of
    some rows padded in ``labels`` by ``-100`` (what a padding collator does)."""

    def make(rows: int = 4, length: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, VOCAB, (rows, length), generator=g)
        labels = ids.clone()
        for r in range(rows):
            cut = length - (r * 3) % (length // 2)
            labels[r, cut:] = -100
        return ids, labels

    return make


@pytest.fixture
def run_trainer(tmp_path):
    """``run_trainer(model, dataset, steps=8, batch_size=4, accumulation=1, **trainer_kwargs)``: that many
    ``Trainer`` steps on the CPU (lr 1e-2, no saving, no reporting); returns ``(trainer, losses)``, the
    logged training loss of every step."""
    from transformers import Trainer, TrainingArguments

    def run(model, dataset, steps=8, batch_size=4, accumulation=1, **trainer_kwargs):
        args = TrainingArguments(
            output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, learning_rate=1e-2, warmup_steps=0, logging_steps=1,
            report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, **trainer_kwargs)
        trainer.train()
        return trainer, step_losses(trainer)

    return run


def step_losses(trainer) -> list:
    """The training loss of every logged step."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
