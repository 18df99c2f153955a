"""fairseq_el.evaluate with stock fairseq-generate on a real IWSLT14 slice.

A tiny Transformer is trained on the 40 test pairs themselves
(``--train-subset test``) until it nearly memorizes them, so that BLEU is far
from 0 and the comparison with fairseq's own BLEU4 means something.
"""
import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest

from fairseq_el import evaluate as ev
from fairseq_el import train as recipe
from fairseq_el.evaluate import (
    GenerateOutput,
    parse_generate_output,
    score,
    tokenized_bleu,
)
from fairseq_el.logs import write_curve

from helpers import BIN, ROOT, USER_DIR, command_env, error_lines, iwslt14_prep

N_TEST = 40
PREP = dict(iwslt14_prep(test=N_TEST), test_set="IWSLT14 test slice")  # the set prep.json names
RECORD_KEYS = {"schema", "task", "loss", "seed", "run", "checkpoint", "metrics", "info", "curve"}
INFO_KEYS = {"sacrebleu_signature", "n_sentences", "checkpoint_path", "generate_cmd", "hypotheses", "bleu_fairseq",
             "subset", "data_set"}
FAST = ["--", "--max-len-b", "60"]  # passed through to fairseq-generate


def evaluate_cli(*args):
    """``python -m fairseq_el.evaluate ARGS`` -> (rc, stdout, stderr's error lines, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "fairseq_el.evaluate", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=command_env(), timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode, proc.stdout, [line for line in proc.stderr.splitlines() if "error:" in line], proc.stderr


@pytest.fixture(scope="module")
def prep_dir(iwslt14_slice):
    """The binarized slice plus the prep.json the data preparation would write."""
    return iwslt14_slice(200, 20, N_TEST, prep=PREP)


@pytest.fixture(scope="module")
def prep_with_references(prep_dir, shared_data, tmp_path_factory):
    """The same data with the raw (cased, untokenized) test references named in prep.json."""
    out = tmp_path_factory.mktemp("eval_refs") / "prep"
    shutil.copytree(prep_dir, out)
    with gzip.open(shared_data / "iwslt14-de-en" / "test.raw.en.gz", "rt", encoding="utf-8") as f:
        raw = [next(f).rstrip("\n") for _ in range(N_TEST)]
    (out / "text" / "test.ref.en").write_text("".join(line + "\n" for line in raw), encoding="utf-8")
    (out / "prep.json").write_text(json.dumps(dict(PREP, references={"test": "text/test.ref.en"})))
    return out


@pytest.fixture(scope="module")
def run(prep_dir, tmp_path_factory):
    save = tmp_path_factory.mktemp("runs") / "iwslt14_el_seed1"
    proc = subprocess.run(
        [str(BIN / "fairseq-train"), str(prep_dir / "bin"), "--user-dir", USER_DIR, "--train-subset", "test",
         "--arch", "transformer_iwslt_de_en", "--share-all-embeddings",
         "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
         "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128",
         "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--dropout", "0",
         "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "1e-2", "--lr-scheduler", "inverse_sqrt",
         "--warmup-updates", "20", "--max-tokens", "4000", "--num-workers", "0", "--cpu", "--seed", "1",
         "--criterion", "encouraging_label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--log-end", "0.5",
         "--max-epoch", "80", "--save-interval", "40", "--validate-interval", "40", "--no-epoch-checkpoints",
         "--log-format", "json", "--log-interval", "50", "--save-dir", str(save)],
        capture_output=True, text=True, env=command_env(), timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    (save / "train.log").write_text(log)
    return save


@pytest.fixture(scope="module")
def record(run, prep_dir):
    """The record of checkpoint_last.pt, with a curve."""
    curve = run / "curve.csv"
    write_curve(run / "train.log", curve)
    out = run / "eval" / "last.json"
    rc, stdout, errors, stderr = evaluate_cli("--data", prep_dir, "--checkpoint", run / "checkpoint_last.pt",
                                              "--tag", "last", "--loss", "el", "--seed", "1", "--output", out,
                                              "--curve", curve, *FAST)
    assert rc == 0, stderr[-3000:]
    assert "warning" not in stderr
    return out, stdout


def test_record_schema_and_both_bleu_figures(record, run):
    out, stdout = record
    rec = json.loads(out.read_text())
    assert set(rec) == RECORD_KEYS
    assert set(rec["info"]) == INFO_KEYS
    assert set(rec["metrics"]) == {"bleu", "sacrebleu"}
    assert rec["schema"] == "el-result/1"
    assert (rec["task"], rec["loss"], rec["seed"], rec["run"], rec["checkpoint"]) == (
        "iwslt14_de_en", "el", 1, "iwslt14_el_seed1", "last")
    bleu, sacre = rec["metrics"]["bleu"], rec["metrics"]["sacrebleu"]
    assert isinstance(bleu, float) and isinstance(sacre, float)
    assert bleu > 10, "the memorizing model should score far above 0"
    assert sacre > 10
    assert rec["info"]["sacrebleu_signature"].startswith("nrefs:1|case:lc|eff:no|tok:13a|smooth:exp|version:")
    assert rec["info"]["n_sentences"] == N_TEST
    assert rec["info"]["checkpoint_path"] == str((run / "checkpoint_last.pt").resolve())
    cmd = rec["info"]["generate_cmd"]
    assert os.path.basename(cmd[0]) == "fairseq-generate"
    joined = " ".join(cmd)
    for part in ("--beam 5", "--gen-subset test", "--remove-bpe subword_nmt", f"--user-dir {USER_DIR}", "--cpu",
                 "--max-len-b 60", "--batch-size 128"):
        assert part in joined, part
    hyps = (out.parent / rec["info"]["hypotheses"]).read_text(encoding="utf-8").splitlines()
    assert len(hyps) == N_TEST
    assert (out.parent / rec["curve"]).resolve() == (run / "curve.csv").resolve()
    assert f"BLEU {bleu:.2f}" in stdout and "sacreBLEU" in stdout
    assert (rec["info"]["subset"], rec["info"]["data_set"]) == ("test", "IWSLT14 test slice")
    assert " on IWSLT14 test slice: BLEU " in stdout  # the line names the test set


def test_tokenized_bleu_equals_fairseqs_bleu4(record):
    out, _ = record
    rec = json.loads(out.read_text())
    assert rec["info"]["bleu_fairseq"] is not None
    assert abs(rec["metrics"]["bleu"] - rec["info"]["bleu_fairseq"]) <= 0.01
    # not only the rounded figure: the same n-gram precisions and lengths
    generated = parse_generate_output((out.parent / "last.generate.txt").read_text(encoding="utf-8").splitlines())
    stats = score(generated, dict(PREP))["bleu_stats"]
    assert stats["sys_len"] == generated.fairseq_stats["sys_len"]
    assert stats["ref_len"] == generated.fairseq_stats["ref_len"]
    for ours, theirs in zip(stats["precisions"], generated.fairseq_stats["precisions"]):
        assert abs(ours - theirs) <= 0.05 + 1e-9
    assert abs(stats["bp"] - generated.fairseq_stats["bp"]) <= 0.0005 + 1e-9
    # the hypotheses file is the H- lines in id order
    hyps = (out.parent / "last.hyp").read_text(encoding="utf-8").splitlines()
    assert hyps == [generated.hypotheses[i] for i in range(N_TEST)]


def test_rerun_skips_then_refuses_a_stale_record_then_force(record, run, prep_dir):
    out, _ = record
    ckpt = run / "checkpoint_last.pt"
    before = out.read_bytes()
    rc, stdout, errors, _ = evaluate_cli("--data", prep_dir, "--checkpoint", ckpt, "--output", out, *FAST)
    assert rc == 0 and "skipped" in stdout and not errors
    assert out.read_bytes() == before
    # a checkpoint newer than the record (re-averaged, say): refused without --force
    stamp = os.path.getmtime(out)
    os.utime(ckpt, (stamp + 10, stamp + 10))
    rc, _, errors, _ = evaluate_cli("--data", prep_dir, "--checkpoint", ckpt, "--output", out, *FAST)
    assert rc == 2 and len(errors) == 1 and "older than --checkpoint" in errors[0] and "--force" in errors[0], errors
    assert out.read_bytes() == before
    # --curve as the recipes give it: relative to the record's directory
    rc, _, errors, stderr = evaluate_cli("--data", prep_dir, "--checkpoint", ckpt, "--output", out,
                                         "--tag", "last", "--loss", "el", "--seed", "1", "--force", "--quiet",
                                         "--curve", "../curve.csv", *FAST)
    assert rc == 0, stderr[-2000:]
    rec, old = json.loads(out.read_text()), json.loads(before)
    assert rec["metrics"] == old["metrics"]  # decoding is deterministic
    assert rec["curve"] == os.path.join("..", "curve.csv") == old["curve"]


def test_defaults_from_the_checkpoint_and_raw_references(record, run, prep_with_references, tmp_path):
    """No --loss/--seed/--tag/--output: read from the checkpoint and its file
    name; sacreBLEU against the raw references that prep.json names."""
    other = tmp_path / "iwslt14_el_seed1_copy"
    other.mkdir()
    shutil.copy(run / "checkpoint_last.pt", other / "checkpoint_best.pt")
    shutil.copy(run / "curve.csv", other / "curve.csv")
    # --curve relative to the record's directory, which does not exist yet
    rc, stdout, errors, stderr = evaluate_cli("--data", prep_with_references, "--checkpoint",
                                              other / "checkpoint_best.pt", "--curve", "../curve.csv", *FAST)
    assert rc == 0, stderr[-3000:]
    out = other / "eval" / "best.json"
    rec = json.loads(out.read_text())
    assert (rec["loss"], rec["seed"], rec["run"], rec["checkpoint"]) == ("el", 1, other.name, "best")
    first = json.loads(record[0].read_text())
    assert rec["metrics"]["bleu"] == first["metrics"]["bleu"]  # same hypotheses, same tokenized references
    assert rec["metrics"]["sacrebleu"] > 10
    assert rec["metrics"]["sacrebleu"] != first["metrics"]["sacrebleu"]  # other references: the raw text
    assert rec["info"]["sacrebleu_signature"].startswith("nrefs:1|case:lc|")
    assert rec["curve"] == os.path.join("..", "curve.csv")


def test_untokenized_data_is_moses_tokenized_for_the_tokenized_bleu(record):
    """The sentencepiece path: hypotheses and references are plain text. The
    tokenized BLEU Moses-tokenizes both first, so on detokenized IWSLT text it
    comes back close to the BLEU of the Moses-tokenized originals."""
    out, _ = record
    generated = parse_generate_output((out.parent / "last.generate.txt").read_text(encoding="utf-8").splitlines())
    tokenized = score(generated, dict(PREP))
    plain = GenerateOutput()
    plain.hypotheses = dict(enumerate(tokenized["hypotheses_detok"]))
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang="en")
    plain.references = {i: detok.detokenize(generated.references[i].split(), return_str=True, unescape=True)
                        for i in generated.ids()}
    untokenized = score(plain, dict(PREP, moses_tokenized=False, lowercase=False, remove_bpe="sentencepiece"))
    # not exactly: on lowercased text Moses keeps "born. we" together (a period
    # before a lowercase word may end an abbreviation), and <<unk>> splits up
    assert abs(untokenized["bleu"] - tokenized["bleu"]) < 6.0
    from sacremoses import MosesTokenizer

    tok = MosesTokenizer(lang="en")
    explicit = tokenized_bleu([tok.tokenize(h, return_str=True) for h in plain.hypotheses.values()],
                              [tok.tokenize(r, return_str=True) for r in plain.references.values()]).score
    assert untokenized["bleu"] == explicit
    as_is = tokenized_bleu(plain.hypotheses.values(), plain.references.values(), moses_tokenized=True).score
    assert untokenized["bleu"] != as_is  # the tokenization happened
    assert untokenized["sacrebleu_signature"].startswith("nrefs:1|case:mixed|")
    assert untokenized["hypotheses_detok"] == untokenized["hypotheses"]  # plain text is not detokenized again


def test_parse_generate_output_lines():
    lines = [
        "S-1\tdas ist gut .",
        "T-1\tthat is good .",
        "H-1\t-0.5\tthat is good .",
        "H-1\t-0.9\tthis is good .",  # --nbest 2: the first is kept
        "T-0\t",
        "H-0\t-1.0\t",  # empty hypothesis
        "D-0\t-1.0\t",
        "P-0\t-1.0",
        "Generate test with beam=5: BLEU4 = 12.34, 50.0/20.0/10.0/5.0 (BP=0.900, ratio=0.905, syslen=9, reflen=10)",
    ]
    g = parse_generate_output(lines)
    assert g.hypotheses == {0: "", 1: "that is good ."}
    assert g.references == {0: "", 1: "that is good ."}
    assert g.bleu_fairseq == 12.34
    assert g.fairseq_stats == {"precisions": [50.0, 20.0, 10.0, 5.0], "bp": 0.9, "ratio": 0.905,
                               "sys_len": 9, "ref_len": 10}


def test_refusals_are_one_line(record, run, prep_dir, tmp_path, capsys):
    ckpt = run / "checkpoint_last.pt"
    no_prep = tmp_path / "no_prep"
    no_prep.mkdir()
    bad_schema = tmp_path / "bad_schema"
    bad_schema.mkdir()
    (bad_schema / "prep.json").write_text(json.dumps(dict(PREP, schema="el-prep/0")))
    bad_bpe = tmp_path / "bad_bpe"
    bad_bpe.mkdir()
    (bad_bpe / "prep.json").write_text(json.dumps(dict(PREP, remove_bpe="wordpiece")))
    out = tmp_path / "r.json"
    cases = [
        (["--data", prep_dir, "--checkpoint", tmp_path / "absent.pt"], "--checkpoint", "no such file"),
        (["--data", tmp_path / "absent", "--checkpoint", ckpt], "--data", "no such directory"),
        (["--data", no_prep, "--checkpoint", ckpt], "--data", "no prep.json"),
        (["--data", bad_schema, "--checkpoint", ckpt], "--data", "'el-prep/0'"),
        (["--data", bad_bpe, "--checkpoint", ckpt], "--data", "'wordpiece'"),
        (["--data", prep_dir, "--checkpoint", ckpt, "--beam", "0"], "--beam", "got 0"),
        (["--data", prep_dir, "--checkpoint", ckpt, "--curve", tmp_path / "absent.csv"], "--curve", "no such file"),
        (["--data", prep_dir, "--checkpoint", ckpt, "--", "--beam", "4"], "--beam", "after '--'"),
        (["--data", prep_dir, "--checkpoint", ckpt, "--", "--quiet"], "--quiet", "after '--'"),
        (["--data", prep_dir], "--checkpoint", "required"),
        (["--data", prep_dir, "--checkpoint", ckpt, "--gen-subset", "nosuch"], "--gen-subset", "no binarized"),
    ]
    for args, flag, needle in cases:  # in-process: the command's main(), the same parser (its exit is tested above)
        with pytest.raises(SystemExit) as exit_:
            ev.main([*map(str, args), "--output", str(out)])
        stderr = capsys.readouterr().err
        errors = error_lines(stderr)
        assert exit_.value.code == 2 and len(errors) == 1, (args, stderr[-1000:])
        assert flag in errors[0] and needle in errors[0], (args, errors)
    assert not out.exists()
    # fairseq-generate failing (an unknown flag passed through): one line, its output kept
    rc, _, errors, stderr = evaluate_cli("--data", prep_dir, "--checkpoint", ckpt, "--output", out, "--quiet",
                                         "--loss", "el", "--seed", "1", "--", "--no-such-flag")
    assert rc == 2 and len(errors) == 1 and "fairseq-generate failed" in errors[0], stderr[-2000:]
    assert (tmp_path / "r.generate.txt").is_file() and not out.exists()


BAD_JSON = {
    "array": ("[]", "prep.json holds a JSON array, expected an object"),
    "truncated": ('{"schema": "el-prep/1", "src": "de', "prep.json is not valid JSON"),
    "number": ("5", "prep.json holds a JSON number, expected an object"),
    "bin": (json.dumps(dict(PREP, bin=5)), "prep.json bin is 5, expected the name of a folder"),
}


def _prep_copy(prep_dir, tmp_path, text):
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(prep_dir / "bin", data / "bin")
    (data / "prep.json").write_text(text)
    return data


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_damaged_prep_json_is_one_line(case, prep_dir, tmp_path, capsys):
    from fairseq_el import analyze

    text, needle = BAD_JSON[case]
    data = _prep_copy(prep_dir, tmp_path, text)
    ckpt = tmp_path / "checkpoint_last.pt"  # prep.json is read first: any file will do
    ckpt.write_bytes(b"")
    expect = f"--data {data}: {needle}"
    # evaluate
    with pytest.raises(SystemExit) as exc:
        ev.main(["--data", str(data), "--checkpoint", str(ckpt), "--output", str(tmp_path / "e.json")])
    errors = error_lines(capsys.readouterr().err)
    assert exc.value.code == 2 and len(errors) == 1 and expect in errors[0], errors
    # the recipes' training runner
    rc = recipe.main(["--preset", "iwslt14_de_en", "--data", str(data), "--save-dir", str(tmp_path / "run"),
                      "--loss", "el", "--dry-run"])
    errors = error_lines(capsys.readouterr().err)
    assert rc == 2 and len(errors) == 1 and expect in errors[0], errors
    # analyze (DATA is positional: the flag is DATA)
    with pytest.raises(SystemExit) as exc:
        analyze.main([str(data), "--path", str(ckpt), "--names", "m", "--out", str(tmp_path / "report"), "--quiet"])
    errors = error_lines(capsys.readouterr().err)
    assert exc.value.code == 2 and len(errors) == 1 and f"DATA {data}: {needle}" in errors[0], errors
    assert not (tmp_path / "run").exists() and not (tmp_path / "report").exists()


def test_smoke_data_caps_the_hypotheses_and_flags_after_dashes_win(tmp_path):
    """Data prepared with --smoke (prep.json's smoke) decodes with SMOKE_GENERATE's length limit; flags passed
    after ``--`` come later, so fairseq-generate takes theirs."""
    prep = iwslt14_prep(test=N_TEST)
    plain = ev.generate_command(tmp_path, tmp_path / "c.pt", prep, cpu=True)
    assert "--max-len-a" not in plain and "--max-len-b" not in plain
    smoke = ev.generate_command(tmp_path, tmp_path / "c.pt", dict(prep, smoke=True), cpu=True,
                                extra=["--max-len-b", "30"])
    assert smoke[-6:] == ["--max-len-a", "1.2", "--max-len-b", "10", "--max-len-b", "30"]
