"""``python -m transformers_el.train``: a tiny GPT-2 / Llama from a config file, a WordLevel tokenizer and a
few hundred lines of text built here (no downloads); CE and EL train end to end through ``Trainer``, the
bonus schedule switches EL on at its epoch, the fused projection trains as the logits path, a resumed run
continues exactly, the records are read by ``el-results``, bad flags stop with one line.
"""
import contextlib
import csv
import io
import json
import math
import random
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from encouraging_loss.tools.results.records import read_record  # noqa: E402
from transformers_el import train as el_train  # noqa: E402

from helpers import ROOT, command_env  # noqa: E402

WORDS = "the a cat dog bird sat ran slept on under near mat rug bed . and".split()
COMMON = ["--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--logging_steps", "1",
          "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--seed", "0"]
STEPS_PER_EPOCH = 17  # 131 training blocks of 16 tokens in batches of 8


def _sentence(rng):
    return (f"the {rng.choice(['cat', 'dog', 'bird'])} {rng.choice(['sat', 'ran', 'slept'])} "
            f"{rng.choice(['on', 'under', 'near'])} the {rng.choice(['mat', 'rug', 'bed'])} .")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A WordLevel tokenizer saved as transformers saves one, a text corpus, tiny GPT-2 and Llama configs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("clm_data")
    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(root / "tok")
    rng = random.Random(0)
    (root / "train.txt").write_text("\n".join(_sentence(rng) for _ in range(300)) + "\n")
    (root / "valid.txt").write_text("\n".join(_sentence(rng) for _ in range(40)) + "\n")
    ids = {"bos_token_id": 1, "eos_token_id": 1}
    (root / "gpt2-tiny.json").write_text(json.dumps(
        {"model_type": "gpt2", "vocab_size": 20, "n_positions": 32, "n_embd": 32, "n_layer": 1, "n_head": 2, **ids}))
    (root / "llama-tiny.json").write_text(json.dumps(
        {"model_type": "llama", "vocab_size": 20, "max_position_embeddings": 32, "hidden_size": 32,
         "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
         "tie_word_embeddings": False, **ids}))
    return root


def _own(data, config="gpt2-tiny.json", *more):
    return ["--config", str(data / config), "--tokenizer", str(data / "tok"), "--train-file", str(data / "train.txt"),
            "--validation-file", str(data / "valid.txt"), "--block-size", "16", *more]


def _main(argv):
    """``main(argv)`` in this process -> (exit status, stdout + stderr)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = el_train.main(argv)
        except SystemExit as exc:
            rc = exc.code
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Five short trainings (each a few seconds at most): CE and EL (bonus deferred by one epoch) on GPT-2,
    CE resumed from the CE run's step-15 checkpoint, EL deferred by one epoch on Llama from the logits and
    with the fused projection."""
    out = tmp_path_factory.mktemp("clm_runs")
    plans = {
        "ce": (_own(data, "gpt2-tiny.json", "--loss", "ce"), ["--max_steps", "30", "--save_steps", "15"]),
        "el": (_own(data, "gpt2-tiny.json", "--loss", "encouraging", "--defer-start", "1"),
               ["--max_steps", "30", "--save_strategy", "no"]),
        "resumed": (_own(data, "gpt2-tiny.json", "--loss", "ce"),
                    ["--max_steps", "30", "--save_strategy", "no", "--resume_from_checkpoint",
                     str(out / "ce" / "checkpoint-15")]),
        "llama_el": (_own(data, "llama-tiny.json", "--loss", "encouraging", "--defer-start", "1"),
                     ["--max_steps", "20", "--save_strategy", "no"]),
        "llama_fused": (_own(data, "llama-tiny.json", "--loss", "encouraging", "--defer-start", "1",
                             "--fused-projection"), ["--max_steps", "20", "--save_strategy", "no"]),
    }
    done = {}
    for name, (own, hf) in plans.items():
        rc, text = _main(own + ["--", "--output_dir", str(out / name), *COMMON, *hf])
        assert rc == 0, f"{name}: {text[-3000:]}"
        done[name] = (out / name, text)
    return done


def _curve(folder):
    with open(folder / "curve.csv", newline="") as f:
        return list(csv.DictReader(f))


def _train_losses(folder):
    return {int(r["step"]): float(r["train_loss"]) for r in _curve(folder) if r["train_loss"]}


def test_ce_and_el_train_and_write_records_that_el_results_reads(runs):
    for name, loss in (("ce", "ce"), ("el", "el")):
        folder, text = runs[name]
        rec = read_record(folder / "result.json")
        assert (rec.task, rec.loss, rec.seed, rec.run, rec.checkpoint) == ("clm/gpt2-tiny", loss, 0, name, "last")
        assert set(rec.metrics) == {"eval_loss", "perplexity", "train_loss"}
        # from log(20) ~ 3.0 at the start to well below it: the loss drops
        losses = _train_losses(folder)
        assert losses[1] > 2.5 and rec.metrics["eval_loss"] < 1.6 < losses[1]
        assert rec.metrics["perplexity"] == pytest.approx(math.exp(rec.metrics["eval_loss"]))
        assert rec.curve == folder / "curve.csv" and rec.info["steps"] == 30
        assert f"eval loss {rec.metrics['eval_loss']:.4f}, perplexity" in text
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_defer_start_trains_as_ce_then_switches_the_bonus_on(runs):
    ce, el = _train_losses(runs["ce"][0]), _train_losses(runs["el"][0])
    rho = {int(r["step"]): float(r["bonus_rho"]) for r in _curve(runs["el"][0])}
    assert all(rho[s] == 0.0 for s in range(1, STEPS_PER_EPOCH + 1))
    assert all(rho[s] == 1.0 for s in range(STEPS_PER_EPOCH + 1, 31))
    # EL at bonus_rho 0 is cross-entropy: the same steps, the same losses; with the bonus on they part
    for s in range(1, STEPS_PER_EPOCH + 1):
        assert el[s] == pytest.approx(ce[s], rel=1e-4, abs=1e-5), s
    assert all(abs(el[s] - ce[s]) > 1e-2 for s in range(STEPS_PER_EPOCH + 1, 31))
    # and the evaluation loss is cross-entropy for both (comparable): EL's is not its training loss
    el_rec = read_record(runs["el"][0] / "result.json")
    assert el_rec.metrics["eval_loss"] > el[30]


def test_fused_projection_trains_as_the_logits_path(runs):
    logits_path, fused = runs["llama_el"][0], runs["llama_fused"][0]
    a, b = _train_losses(logits_path), _train_losses(fused)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for s in a:  # the bonus switched on at step 18 in both (fused_el_settings' bonus_rho set by the schedule)
        assert b[s] == pytest.approx(a[s], rel=1e-3, abs=1e-4), s
    assert a[20] < a[1]
    assert "fused with the output projection" in runs["llama_fused"][1]
    rec_a, rec_b = read_record(logits_path / "result.json"), read_record(fused / "result.json")
    assert rec_b.info["fused_projection"] is True and rec_b.task == "clm/llama-tiny"
    assert rec_b.metrics["eval_loss"] == pytest.approx(rec_a.metrics["eval_loss"], rel=1e-3)


def test_resumed_run_continues_exactly(runs):
    full, resumed = _train_losses(runs["ce"][0]), _train_losses(runs["resumed"][0])
    assert sorted(resumed) == list(range(1, 31))  # the steps before the checkpoint come from its trainer state
    for s in range(16, 31):
        assert resumed[s] == pytest.approx(full[s], rel=1e-5), s
    rec = read_record(runs["resumed"][0] / "result.json")
    assert rec.info["resumed_from"].endswith("checkpoint-15") and rec.info["steps"] == 30


def test_el_results_summarises_the_records(runs, tmp_path):
    from encouraging_loss.tools.results import main as el_results

    root = runs["ce"][0].parent
    rc = el_results([str(root / "ce"), str(root / "el"), "--out", str(tmp_path / "summary"),
                     "--curve-column", "eval_loss"])
    assert rc in (0, None)
    summary = (tmp_path / "summary" / "summary.md").read_text()
    assert "clm/gpt2-tiny" in summary and "eval_loss" in summary


def test_existing_output_dir_is_refused_with_a_hint(runs, data):
    rc, text = _main(_own(data, "gpt2-tiny.json") + ["--", "--output_dir", str(runs["ce"][0]), *COMMON])
    lines = text.strip().splitlines()
    assert rc == 2 and len(lines) == 1
    assert "exists and is not empty" in lines[0] and "--resume_from_checkpoint" in lines[0]
    assert "checkpoint-30" in lines[0] and "--overwrite-output-dir" in lines[0]


@pytest.mark.parametrize("own, hf, expected", [
    (["--loss", "ce", "--log-end", "0.5"], [], "--log-end applies to the Encouraging Loss only, not --loss ce"),
    (["--loss", "encouraging", "--log-end", "2"], [], "--log-end"),
    (["--loss", "encouraging", "--log-ends", "0.5"], [], "unrecognized argument '--log-ends'"),
    (["--smoothing", "1.5"], [], "--smoothing must be in [0, 1), got 1.5"),
    ([], ["--max_stepz", "3"], "--max_stepz"),
    ([], ["--label_smoothing_factor", "0.1"], "use --smoothing"),
    (["--max_steps", "3"], [], "TrainingArguments flags go after --"),
])
def test_bad_flags_stop_with_one_line(data, tmp_path, own, hf, expected):
    rc, text = _main(_own(data, "gpt2-tiny.json", *own) + ["--", "--output_dir", str(tmp_path / "o"), *hf])
    lines = text.strip().splitlines()
    assert rc == 2 and len(lines) == 1, text
    assert expected in lines[0] and "error" in lines[0]
    assert not (tmp_path / "o").exists()


def test_missing_train_file_and_output_dir_stop_with_one_line(data, tmp_path):
    rc, text = _main(["--config", str(data / "gpt2-tiny.json"), "--tokenizer", str(data / "tok"), "--",
                      "--output_dir", str(tmp_path / "o")])
    assert rc == 2 and len(text.strip().splitlines()) == 1 and "--train-file" in text
    rc, text = _main(_own(data))
    assert rc == 2 and len(text.strip().splitlines()) == 1 and "--output_dir DIR is required" in text
    rc, text = _main(["--config", str(data / "gpt2-tiny.json"), "--train-file", str(data / "train.txt"), "--",
                      "--output_dir", str(tmp_path / "o")])
    assert rc == 2 and "--config needs --tokenizer" in text


def test_command_line_entry_point_one_line_no_traceback(data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "transformers_el.train", *_own(data), "--log-end", "0.5", "--",
                           "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, env=command_env(threads=1), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "python -m transformers_el.train: error: --log-end applies to the Encouraging Loss only, not --loss ce"]


def test_help_shows_defaults():
    rc, text = _main(["--help"])
    assert rc == 0 and "--block-size N" in text and "(default: 128)" in text and "--fused-projection" in text


def test_resume_last_finds_the_newest_checkpoint_and_overwrite_is_accepted_after_dashes(runs, tmp_path):
    ce = runs["ce"][0]
    args, overwrite = el_train.parse_training_args(["--output_dir", str(ce), "--resume_from_checkpoint", "last"])
    assert el_train.resolve_resume(args, overwrite) == str(ce / "checkpoint-30")
    args, overwrite = el_train.parse_training_args(["--output_dir", str(ce), "--overwrite_output_dir"])
    assert overwrite is True and el_train.resolve_resume(args, overwrite) is None
    (tmp_path / "empty").mkdir()
    args, overwrite = el_train.parse_training_args(["--output_dir", str(tmp_path / "empty"),
                                                    "--resume_from_checkpoint", "last"])
    with pytest.raises(el_train.UsageError, match="no checkpoint-N folder"):
        el_train.resolve_resume(args, overwrite)


def test_blocks_run_clm_style_and_held_out_validation(data):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data / "tok")
    ids = el_train.tokenize_file(tok, str(data / "train.txt"), "--train-file")
    assert ids.numel() == 300 * 7  # 7 words a line, no special tokens added by this tokenizer
    assert el_train.group_blocks(ids, 16).shape == (131, 16)  # 2100 tokens: 131 blocks, 4 tokens dropped
    assert el_train.group_blocks(ids, 7).tolist()[1] == ids[7:14].tolist()  # the remainder dropped, no padding
    args = el_train.build_parser().parse_args(["--config", str(data / "gpt2-tiny.json"), "--train-file",
                                               str(data / "train.txt"), "--block-size", "16"])
    train, valid = el_train.load_blocks(args, tok, say=lambda line: None)
    assert (train.shape[0], valid.shape[0]) == (125, 6)  # 5 % of 131 blocks held out, from the end
    assert valid[-1].tolist() == ids[130 * 16:131 * 16].tolist()
