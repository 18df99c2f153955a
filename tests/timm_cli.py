"""Running ``timm-el-train`` (``python -m timm_el.train``) in tests: the small recipes, the command's
environment, its one error line and its summary.csv. The ImageFolders they train on are conftest.py's
``mnist_folder_of`` fixture (tests/timm_el/conftest.py names the two sizes used)."""
import csv
import subprocess
import sys
from pathlib import Path

from timm_el import train as el_train

from helpers import command_env

# 10 digits x 60 training / x 20 validation images: a small, fast, reproducible recipe; 18 updates per epoch
FAST = ["--model", "test_resnet", "--img-size", "28", "--in-chans", "1", "-b", "32", "--lr", "0.05",
        "--warmup-epochs", "0", "--no-aug", "-j", "0", "--log-interval", "5", "--seed", "1"]
# 3 digits x 12 training / x 4 validation images: 6 updates per epoch; default augmentation (random crops and
# flips: python's and torch's RNG)
TINY = ["--model", "test_resnet", "--img-size", "28", "--in-chans", "1", "-b", "6", "--lr", "0.05",
        "--warmup-epochs", "0", "-j", "0", "--log-interval", "2", "--seed", "1", "--val-split", "val"]


def cli_env(threads: int = 2) -> dict:
    """The command's environment: the checkout on PYTHONPATH, ``threads`` threads, no digest file asked for."""
    env = command_env(threads=threads, checkout_on_path=True)
    env.pop(el_train.DIGEST_ENV, None)
    return env


def run_cli(*args, cwd, env=None, torchrun_procs=0, check=True, timeout=300) -> subprocess.CompletedProcess:
    """Run ``python -m timm_el.train ARGS`` (under ``torchrun --nproc_per_node N`` when asked)."""
    launcher = [sys.executable]
    if torchrun_procs:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_procs}"]
    cmd = launcher + ["-m", "timm_el.train", *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def read_summary(run_dir: Path):
    """summary.csv of a run: (column names, rows as dicts)."""
    with open(run_dir / "summary.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a failed run, its last line (and no traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    errors = [line for line in lines if line.startswith("timm-el-train: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    return errors[0]
