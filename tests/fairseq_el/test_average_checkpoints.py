"""fairseq_el.average_checkpoints on checkpoints of a real (tiny) fairseq-train
run: the mean is the mean, the output decodes with stock fairseq-generate,
mismatched inputs are refused naming the difference, nothing is overwritten
without --force."""
import argparse
import os
import re
import subprocess
import sys

import pytest
import torch

from fairseq_el import average_checkpoints as avg
from fairseq_el import compat
from fairseq_el.average_checkpoints import CheckpointMismatch, average_checkpoints, find_checkpoints, model_config

from helpers import BIN, ROOT, USER_DIR, command_env, error_lines

N_TEST = 20


def tiny(ffn=64):
    return [
        "--arch", "transformer_iwslt_de_en", "--share-all-embeddings",
        "--encoder-layers", "1", "--decoder-layers", "1",
        "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--encoder-ffn-embed-dim", str(ffn), "--decoder-ffn-embed-dim", str(ffn),
        "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
        "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "5",
        "--max-tokens", "2000", "--num-workers", "0", "--cpu", "--seed", "1",
        "--criterion", "encouraging_label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--log-end", "0.5",
        "--log-format", "simple", "--log-interval", "10",
    ]


def tool(name, *args, check=True):
    proc = subprocess.run([str(BIN / name), *map(str, args)], capture_output=True, text=True, env=command_env(),
                          timeout=600)
    out = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, out[-3000:]
    return out


def average_cli(*args):
    """``python -m fairseq_el.average_checkpoints ARGS`` -> (rc, stdout, the error lines)."""
    proc = subprocess.run([sys.executable, "-m", "fairseq_el.average_checkpoints", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=command_env(), timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    return proc.returncode, proc.stdout, errors


def load(path):
    return compat.read_checkpoint(path)  # weights_only=True with fairseq's checkpoint types allowed


@pytest.fixture(scope="module")
def data_bin(iwslt14_slice):
    return iwslt14_slice(600, 30, N_TEST) / "bin"


@pytest.fixture(scope="module")
def run_dir(data_bin, tmp_path_factory):
    """Three epochs, an update checkpoint every 4 updates (all kept)."""
    save = tmp_path_factory.mktemp("run")
    tool("fairseq-train", data_bin, "--user-dir", USER_DIR, *tiny(), "--max-epoch", "3",
         "--save-interval-updates", "4", "--save-dir", save)
    return save


@pytest.fixture(scope="module")
def other_size(data_bin, tmp_path_factory):
    """A checkpoint of the same architecture with a wider feed-forward layer."""
    save = tmp_path_factory.mktemp("other")
    tool("fairseq-train", data_bin, "--user-dir", USER_DIR, *tiny(ffn=48), "--max-update", "2",
         "--no-epoch-checkpoints", "--disable-validation", "--save-dir", save)
    return save / "checkpoint_last.pt"


def mean_of(paths, keep_dtype=False):
    """The expected average, recomputed here: float64 sum in input order, / n, cast back to the
    input dtype, except float16 / bfloat16 means, which stay float32 unless ``keep_dtype``."""
    total, dtypes = {}, {}
    for p in paths:
        model = load(p)["model"]
        for k, v in model.items():
            dtypes[k] = v.dtype
            total[k] = total[k] + v.double() if k in total else v.double()
    half = (torch.float16, torch.bfloat16)
    return {k: (v / len(paths)).to(torch.float32 if dtypes[k] in half and not keep_dtype else dtypes[k])
            for k, v in total.items()}


def test_find_checkpoints(run_dir):
    epochs = find_checkpoints(run_dir, 3, "epochs")
    assert [os.path.basename(p) for p in epochs] == ["checkpoint1.pt", "checkpoint2.pt", "checkpoint3.pt"]
    matches = (re.match(r"checkpoint_(\d+)_(\d+)\.pt$", n) for n in os.listdir(run_dir))
    updates = sorted(int(m.group(2)) for m in matches if m)
    assert len(updates) >= 5
    last3 = find_checkpoints(run_dir, 3, "updates")
    assert [int(os.path.basename(p)[:-3].split("_")[2]) for p in last3] == updates[-3:]
    bounded = find_checkpoints(run_dir, 2, "updates", upper_bound=updates[2])
    assert [int(os.path.basename(p)[:-3].split("_")[2]) for p in bounded] == updates[1:3]
    assert [os.path.basename(p) for p in find_checkpoints(run_dir, 1, "epochs", upper_bound=2)] == ["checkpoint2.pt"]
    with pytest.raises(ValueError, match=r"asked for the last 4 epoch checkpoints .* found 3: "
                                         r"checkpoint1\.pt, checkpoint2\.pt, checkpoint3\.pt"):
        find_checkpoints(run_dir, 4, "epochs")


def test_average_of_the_last_epochs_is_their_mean(run_dir, tmp_path):
    out = tmp_path / "avg_last3.pt"
    rc, stdout, errors = average_cli("--run-dir", run_dir, "--last", "3", "--epochs", "--output", out)
    assert rc == 0, errors
    assert "[3/3]" in stdout and "averaged 3 checkpoints" in stdout
    inputs = [run_dir / f"checkpoint{e}.pt" for e in (1, 2, 3)]
    state = load(out)
    expected = mean_of(inputs)
    assert list(state["model"]) == list(expected)
    for k, v in expected.items():
        assert state["model"][k].dtype == v.dtype, k
        assert torch.equal(state["model"][k], v), k  # bitwise: same sum order, same cast
    # and the mean is not just one of the inputs
    last = load(inputs[-1])["model"]
    key = "decoder.layers.0.fc1.weight"
    assert not torch.equal(state["model"][key], last[key])
    torch.testing.assert_close(state["model"][key],
                               torch.stack([load(p)["model"][key] for p in inputs]).mean(0), rtol=1e-6, atol=1e-7)
    # the last input's configuration, no optimizer state, the averaged files recorded
    last_state = load(inputs[-1])
    assert "last_optimizer_state" not in state
    assert model_config(state) == model_config(last_state)
    assert state["cfg"]["common"]["seed"] == last_state["cfg"]["common"]["seed"]
    assert state["optimizer_history"] == last_state["optimizer_history"]
    assert state["extra_state"]["averaged_checkpoints"] == [str(p.resolve()) for p in inputs]
    # tied embeddings stay one tensor
    m = state["model"]
    assert m["encoder.embed_tokens.weight"].data_ptr() == m["decoder.embed_tokens.weight"].data_ptr()
    assert os.path.getsize(out) < os.path.getsize(inputs[-1])


def test_update_checkpoints_and_an_explicit_list(run_dir, tmp_path):
    last4 = find_checkpoints(run_dir, 4, "updates")
    summary = average_checkpoints(last4, tmp_path / "a.pt")
    assert summary["n"] == 4 and summary["inputs"] == [os.path.abspath(p) for p in last4]
    assert summary["num_updates"] == [int(os.path.basename(p)[:-3].split("_")[2]) for p in last4]
    rc, _, errors = average_cli("--run-dir", run_dir, "--last", "4", "--updates", "--output", tmp_path / "b.pt",
                                "--quiet")
    assert rc == 0, errors
    rc, _, errors = average_cli("--inputs", *last4, "--output", tmp_path / "c.pt")
    assert rc == 0, errors
    expected = mean_of(last4)
    for name in ("a.pt", "b.pt", "c.pt"):
        model = load(tmp_path / name)["model"]
        assert all(torch.equal(model[k], v) for k, v in expected.items()), name
    # in-memory use: no file, the state returned
    in_memory = average_checkpoints(last4[:2], None)
    assert all(torch.equal(in_memory["state"]["model"][k], v) for k, v in mean_of(last4[:2]).items())


def test_the_average_decodes_with_stock_generate(run_dir, data_bin, tmp_path):
    out = tmp_path / "checkpoint_avg.pt"
    average_checkpoints(find_checkpoints(run_dir, 3, "epochs"), out)
    log = tool("fairseq-generate", data_bin, "--user-dir", USER_DIR, "--path", out, "--gen-subset", "test",
               "--beam", "2", "--max-len-b", "20", "--batch-size", "32", "--remove-bpe", "--cpu")
    assert f"Translated {N_TEST} sentences" in log, log[-2000:]
    assert {int(i) for i in re.findall(r"^H-(\d+)\t", log, flags=re.M)} == set(range(N_TEST))
    assert re.search(r"BLEU4 = [\d.]+", log)


def test_a_different_architecture_size_is_refused(run_dir, other_size, tmp_path):
    out = tmp_path / "avg.pt"
    first = run_dir / "checkpoint3.pt"
    rc, _, errors = average_cli("--inputs", first, other_size, "--output", out)
    assert rc == 2 and len(errors) == 1, errors
    message = errors[0]
    assert "refusing to average" in message
    assert "encoder_ffn_embed_dim=48" in message and "encoder_ffn_embed_dim=64" in message
    assert f"checkpoint 2 ({other_size})" in message and f"checkpoint 1 ({first})" in message
    assert not out.exists()


def _edited_copy(src, dst, edit):
    state = load(src)
    edit(state)
    torch.save(state, dst)
    return dst


def test_a_renamed_or_missing_parameter_is_refused(run_dir, tmp_path):
    good = run_dir / "checkpoint2.pt"
    key = "decoder.layers.0.fc2.weight"

    def rename(state):
        state["model"]["decoder.layers.0.fc2.weight_renamed"] = state["model"].pop(key)

    def drop(state):
        del state["model"][key]

    renamed = _edited_copy(run_dir / "checkpoint3.pt", tmp_path / "renamed.pt", rename)
    with pytest.raises(CheckpointMismatch) as err:
        average_checkpoints([good, renamed], tmp_path / "x.pt")
    message = str(err.value)
    assert f"checkpoint 2 ({renamed}) has no parameter '{key}'" in message
    assert "'decoder.layers.0.fc2.weight_renamed'" in message and str(good) in message

    missing = _edited_copy(run_dir / "checkpoint3.pt", tmp_path / "missing.pt", drop)
    rc, _, errors = average_cli("--inputs", good, missing, "--output", tmp_path / "y.pt")
    assert rc == 2 and len(errors) == 1 and f"has no parameter '{key}'" in errors[0], errors
    # the other way round: the extra parameter is named
    rc, _, errors = average_cli("--inputs", missing, good, "--output", tmp_path / "z.pt")
    assert rc == 2 and f"checkpoint 2 ({good}) has parameter '{key}'" in errors[0], errors
    assert not any((tmp_path / n).exists() for n in ("x.pt", "y.pt", "z.pt"))


def test_a_shape_dtype_or_configuration_difference_is_refused(run_dir, tmp_path):
    good = run_dir / "checkpoint2.pt"
    key = "encoder.layers.0.fc1.bias"

    def reshape(state):
        state["model"][key] = torch.zeros(65)

    def half(state):
        state["model"][key] = state["model"][key].half()

    def activation(state):
        model_args = state["cfg"]["model"]
        assert isinstance(model_args, argparse.Namespace)
        model_args.activation_fn = "gelu"

    cases = [(reshape, f"'{key}' is (65,) in checkpoint 2"), (half, f"'{key}' is torch.float16 in checkpoint 2"),
             (activation, "activation_fn='gelu' in checkpoint 2")]
    for i, (edit, needle) in enumerate(cases):
        bad = _edited_copy(run_dir / "checkpoint3.pt", tmp_path / f"bad{i}.pt", edit)
        with pytest.raises(CheckpointMismatch, match=re.escape(needle)):
            average_checkpoints([good, bad], None)


def test_run_flags_that_differ_do_not_matter(run_dir, tmp_path):
    """A run resumed with other training flags (a longer --max-update, another
    save dir) still averages: only the model's configuration is compared."""
    def other_run_flags(state):
        state["cfg"]["optimization"]["max_update"] = 12345
        state["cfg"]["model"].max_update = 12345
        state["cfg"]["checkpoint"]["save_dir"] = "/elsewhere"
        state["cfg"]["model"].save_dir = "/elsewhere"

    edited = _edited_copy(run_dir / "checkpoint3.pt", tmp_path / "resumed.pt", other_run_flags)
    average_checkpoints([run_dir / "checkpoint2.pt", edited], None)


def test_no_overwrite_without_force(run_dir, tmp_path):
    out = tmp_path / "avg.pt"
    assert average_cli("--run-dir", run_dir, "--last", "2", "--output", out, "--quiet")[0] == 0
    before = (os.path.getmtime(out), out.read_bytes())
    rc, _, errors = average_cli("--run-dir", run_dir, "--last", "3", "--output", out)
    assert rc == 2 and len(errors) == 1 and f"--output {out} exists; pass --force" in errors[0], errors
    assert (os.path.getmtime(out), out.read_bytes()) == before
    with pytest.raises(FileExistsError):
        average_checkpoints(find_checkpoints(run_dir, 3), out)
    rc, _, errors = average_cli("--run-dir", run_dir, "--last", "3", "--output", out, "--force", "--quiet")
    assert rc == 0, errors
    assert load(out)["extra_state"]["averaged_checkpoints"] == [
        str((run_dir / f"checkpoint{e}.pt").resolve()) for e in (1, 2, 3)]
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_cli_refusals_are_one_line(run_dir, tmp_path):
    out = tmp_path / "avg.pt"
    cases = [
        (["--run-dir", run_dir, "--last", "9", "--epochs"], "--last 9: asked for the last 9 epoch checkpoints"),
        (["--run-dir", run_dir, "--last", "999", "--updates"], "--last 999: asked for the last 999 update checkpoints"),
        (["--run-dir", tmp_path / "nowhere", "--last", "2"], "no such directory"),
        (["--run-dir", run_dir], "needs --last N"),
        (["--run-dir", run_dir, "--last", "0"], "--last must be >= 1, got 0"),
        (["--inputs", run_dir / "checkpoint1.pt", "--last", "2"], "--last goes with --run-dir"),
        (["--inputs", run_dir / "checkpoint1.pt", tmp_path / "absent.pt"], "absent.pt: no such file"),
        (["--inputs", run_dir / "checkpoint1.pt", run_dir / "checkpoint1.pt"], "is given twice"),
        ([], "give --run-dir RUN --last N"),
    ]
    for args, needle in cases:
        rc, _, errors = average_cli(*args, "--output", out)
        assert rc == 2 and len(errors) == 1 and needle in errors[0], (args, errors)
    # found checkpoints are named when there are too few
    _, _, errors = average_cli("--run-dir", run_dir, "--last", "9", "--output", out)
    assert "found 3: checkpoint1.pt, checkpoint2.pt, checkpoint3.pt" in errors[0]
    assert not out.exists()


def _average(capsys, *args):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        avg.main([str(a) for a in args] + ["--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exc.value.code, error_lines(err)


def test_average_checkpoints_names_the_bad_input(run_dir, tmp_path, capsys):
    good = run_dir / "checkpoint1.pt"
    text = tmp_path / "checkpoint5.pt"
    text.write_text("epoch 5\nloss 3.2\n")
    truncated = tmp_path / "checkpoint6.pt"
    data = (run_dir / "checkpoint2.pt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    no_model = tmp_path / "checkpoint7.pt"
    torch.save({"cfg": {}, "extra_state": {}}, no_model)
    not_tensors = tmp_path / "checkpoint8.pt"
    torch.save({"model": {"encoder.version": "2"}}, not_tensors)
    state = compat.read_checkpoint(run_dir / "checkpoint2.pt")
    key = "encoder.layers.0.fc1.weight"
    state["model"][key] = torch.zeros(65, 32)
    other_shape = tmp_path / "checkpoint9.pt"
    torch.save(state, other_shape)
    out = tmp_path / "avg.pt"
    cases = [
        (tmp_path / "checkpoint4.pt", "checkpoint4.pt: no such file"),
        (text, f"checkpoint 2 {text}: not a PyTorch checkpoint file"),
        (truncated, f"checkpoint 2 {truncated}: not a readable PyTorch checkpoint (a damaged or truncated file"),
        (no_model, f"({no_model}) holds no 'model' state dict"),
        (not_tensors, f"({not_tensors}): its 'model' holds str under 'encoder.version', not a tensor"),
        (other_shape, f"'{key}' is (65, 32) in checkpoint 2 ({other_shape}), (64, 32) in checkpoint 1"),
    ]
    for bad, needle in cases:
        code, errors = _average(capsys, "--inputs", good, bad, "--output", out)
        assert code == 2 and len(errors) == 1 and needle in errors[0], (bad, errors)
        assert "pop from empty list" not in errors[0] and "miniz" not in errors[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".avg.pt")]


def _half_precision_copies(run_dir, tmp_path, dtype, epochs=(1, 2, 3), more=None):
    """The run's epoch checkpoints as ``fairseq-train --fp16`` (``--bf16``) on a GPU saves them: every
    floating-point tensor of the model in ``dtype`` (tied embeddings still one tensor), the run's
    configuration saying fp16 (bf16); ``more(i)``: tensors to add to the i-th model."""
    flag = "fp16" if dtype == torch.float16 else "bf16"
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, e in enumerate(epochs):
        def cast(state):
            memo, model = {}, {}
            for k, v in state["model"].items():
                view = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride())
                if view not in memo:
                    memo[view] = v.to(dtype) if v.is_floating_point() else v
                model[k] = memo[view]
            state["model"] = {**model, **(more(i) if more else {})}
            state["cfg"]["common"][flag] = True
            setattr(state["cfg"]["model"], flag, True)

        paths.append(_edited_copy(run_dir / f"checkpoint{e}.pt", tmp_path / f"checkpoint{e}.pt", cast))
    return paths


def test_float16_inputs_are_averaged_into_float32(run_dir, tmp_path):
    """fp16 checkpoints: the mean is written in float32 (as fairseq's own average_checkpoints.py),
    bitwise the float64 mean cast to float32; --keep-dtype writes float16 as before."""
    inputs = _half_precision_copies(run_dir, tmp_path / "in", torch.float16)
    assert all(v.dtype == torch.float16 for v in load(inputs[0])["model"].values())
    out = tmp_path / "avg.pt"
    rc, stdout, errors = average_cli("--inputs", *inputs, "--output", out)
    assert rc == 0, errors
    model = load(out)["model"]
    expected = mean_of(inputs)
    assert list(model) == list(expected)
    for k, v in expected.items():
        assert v.dtype == torch.float32 and model[k].dtype == torch.float32, k
        assert torch.equal(model[k], v), k
    assert f"{len(model)} half-precision tensors written as float32" in stdout
    # the float32 mean is not a float16 number: writing float16 would have rounded it
    key = "decoder.layers.0.fc1.weight"
    assert not torch.equal(model[key], model[key].half().float())
    assert model["encoder.embed_tokens.weight"].data_ptr() == model["decoder.embed_tokens.weight"].data_ptr()

    kept = tmp_path / "avg_fp16.pt"
    rc, stdout, errors = average_cli("--inputs", *inputs, "--output", kept, "--keep-dtype")
    assert rc == 0, errors
    assert "written as float32" not in stdout
    half_model = load(kept)["model"]
    for k, v in mean_of(inputs, keep_dtype=True).items():
        assert v.dtype == torch.float16 and half_model[k].dtype == torch.float16, k
        assert torch.equal(half_model[k], v), k
    # rounding to float16 costs at most half a float16 ulp of the exact mean
    exact = mean_of(inputs)[key].double()
    ulp = torch.finfo(torch.float16).eps * exact.abs().clamp_min(torch.finfo(torch.float16).tiny)
    assert ((half_model[key].double() - exact).abs() <= ulp / 2 + 1e-12).all()
    assert os.path.getsize(kept) < 0.7 * os.path.getsize(out)


def test_bfloat16_and_integer_tensors(run_dir, tmp_path):
    """bfloat16 means are float32 too (--keep-dtype: bfloat16); float32 inputs stay float32 and
    integer tensors are the last input's, in their own dtype, either way."""
    inputs = _half_precision_copies(run_dir, tmp_path / "in", torch.bfloat16, epochs=(2, 3),
                                    more=lambda i: {"counter": torch.tensor([7 + i])})
    for keep in (False, True):
        state = average_checkpoints(inputs, None, keep_dtype=keep)["state"]
        expected = mean_of(inputs, keep_dtype=keep)
        for k, v in state["model"].items():
            if k == "counter":
                assert v.dtype == torch.int64 and v.tolist() == [8]
            else:
                assert v.dtype == (torch.bfloat16 if keep else torch.float32), k
                assert torch.equal(v, expected[k]), k
    summary = average_checkpoints(find_checkpoints(run_dir, 2), None)
    assert summary["widened"] == 0
    assert all(v.dtype == torch.float32 for v in summary["state"]["model"].values())


def test_a_float32_average_of_fp16_checkpoints_decodes_with_stock_generate(run_dir, data_bin, tmp_path):
    inputs = _half_precision_copies(run_dir, tmp_path / "in", torch.float16)
    out = tmp_path / "checkpoint_avg.pt"
    assert average_checkpoints(inputs, out)["widened"] > 0
    assert load(out)["model"]["decoder.layers.0.fc1.weight"].dtype == torch.float32
    log = tool("fairseq-generate", data_bin, "--user-dir", USER_DIR, "--path", out, "--gen-subset", "test",
               "--beam", "2", "--max-len-b", "20", "--batch-size", "32", "--remove-bpe", "--cpu")
    assert f"Translated {N_TEST} sentences" in log, log[-2000:]
    assert {int(i) for i in re.findall(r"^H-(\d+)\t", log, flags=re.M)} == set(range(N_TEST))
    assert re.search(r"BLEU4 = [\d.]+", log)
