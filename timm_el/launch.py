""" The Encouraging Loss inside an upstream timm ``train.py``, unchanged

Zhao et al., "Well-Classified Examples are Underestimated in Classification
with Deep Neural Networks", AAAI 2022 (EL_SPEC 2.3 / 2.4: label-smoothed and
soft-target EL, mean over the batch).

``python -m timm_el.launch path/to/train.py [its args] --loss encouraging
--log-end 0.75 [--bonus ...]`` runs that script, as it is on disk, with the
Encouraging Loss as its *training* loss; its validation loss, and everything
else, stays the script's own. The launcher's flags (``--loss``, ``--log-end``,
``--bonus``, ``--bonus-start``, ``--bonus-gamma``, ``--bonus-rho``,
``--bonus-smoothing``) may stand before or after the script path; they are
taken out of the argument list before the script parses it (exact names,
``--flag value`` or ``--flag=value``; a literal ``--`` after the script ends
this and is dropped). ``--loss ce``, or no ``--loss``, runs the script as is.
Under ``torchrun`` every rank runs the launcher
(``torchrun --nproc_per_node N -m timm_el.launch train.py ...``).

The patch rule
--------------
timm's ``train.py`` (today's, and the 0.4-era one the paper's release
started from) builds exactly two losses, the training loss first::

    train_loss_fn = SoftTargetCrossEntropy()            # Mixup / CutMix active
                  | LabelSmoothingCrossEntropy(smoothing=args.smoothing)
                  | nn.CrossEntropyLoss()                # --smoothing 0
                  | BinaryCrossEntropy(...) / JsdCrossEntropy(...)
    validate_loss_fn = nn.CrossEntropyLoss()

and scripts written for timm >= 1.0.20 may build the first one with
``timm.loss.create_classification_loss(...)`` (directly, or through
``timm.task.ClassificationTask(criterion_kwargs=...)``). So:

**The first loss the script builds is its training loss and becomes EL;
every loss built after it is left alone.** A loss counts when it is built

* by calling ``LabelSmoothingCrossEntropy``, ``SoftTargetCrossEntropy``,
  ``BinaryCrossEntropy`` or ``JsdCrossEntropy`` as named in ``timm.loss``
  (``from timm.loss import ...``), or ``torch.nn.CrossEntropyLoss`` as named
  in ``torch.nn``, from the script's code: the script file, or any module
  it calls outside the ``timm`` and ``torch`` packages. Losses that timm and
  torch build inside themselves (``JsdCrossEntropy``'s inner loss,
  ``timm.task``'s default evaluator criterion) do not count; or
* by ``timm.loss.create_classification_loss`` (every ``timm`` module's
  reference to it), called from anywhere.

Replacements: ``LabelSmoothingCrossEntropy(smoothing=s)`` and
``nn.CrossEntropyLoss(label_smoothing=s)`` become
:class:`~timm_el.EncouragingLabelSmoothingLoss` with smoothing ``s``,
``SoftTargetCrossEntropy()`` becomes :class:`~timm_el.EncouragingSoftTargetLoss`,
and ``create_classification_loss(loss_type='ce' | None | 'encouraging', ...)``
is called with ``loss_type='encouraging'`` and the launcher's EL options.
``BinaryCrossEntropy``, ``JsdCrossEntropy``, another ``loss_type``,
multi-label targets, or an ``nn.CrossEntropyLoss`` with class weights,
``ignore_index`` or a reduction other than ``'mean'`` are refused with one
line (EL is a softmax loss over single-label targets). Once the training loss
is built every patched name is put back, so ``validate_loss_fn =
nn.CrossEntropyLoss()`` is timm's and torch's own class; names the script
imported earlier (``from timm.loss import LabelSmoothingCrossEntropy``) keep
a pass-through stand-in that builds the original class.

Why this rule: it needs no change to the script and no knowledge of its
arguments, it follows the order timm's ``train.py`` uses (training loss,
then ``validate_loss_fn``), it covers both ways of building the loss, and it
cannot touch validation, which is built later. Telling the two apart by
class would not work: both can be ``nn.CrossEntropyLoss()`` (``--smoothing
0``). The names are replaced with stand-in subclasses, never in the module
that defines the class (timm's classes call ``super(ClassName, self)``). A script
that builds its validation loss *before* its training loss is not supported.
If the script returns without having built a training loss, the launcher
exits with an error rather than let a CE run pass for an EL one.

The launcher prints one line (on stderr, on every rank, prefixed with the
rank under torchrun) naming the loss it installed, what it replaced and
where. EL options are checked before the script runs.
"""
import argparse
import inspect
import os
import runpy
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from encouraging_loss.tools.cli import HelpFormatter, Parser

__all__ = ["LOSSES", "EL_FLAGS", "LaunchError", "split_argv", "build_parser", "parse_args", "LossPatch", "main"]

PROG = "timm_el.launch"
#: ``--loss`` values: timm's own loss (the script as is) or the Encouraging Loss.
LOSSES = ("ce", "encouraging")
#: launcher flag -> keyword of :func:`timm_el.create_encouraging_loss`.
EL_FLAGS = {
    "--log-end": "log_end",
    "--bonus": "bonus",
    "--bonus-start": "bonus_start",
    "--bonus-gamma": "bonus_gamma",
    "--bonus-rho": "bonus_rho",
    "--bonus-smoothing": "bonus_smoothing",
}
_OUR_FLAGS = ("--loss",) + tuple(EL_FLAGS)
_HELP_FLAGS = ("-h", "--help")


class LaunchError(SystemExit):
    """A problem the launcher reports as one line and exit status 2.

    A ``SystemExit`` so that a script's ``except Exception`` cannot swallow it.
    """


# ------------------------------------------------------------------ arguments


def split_argv(argv: Sequence[str]) -> Tuple[List[str], Optional[str], List[str]]:
    """Split the command line into (launcher tokens, script path, script arguments).

    Before the script only launcher flags and ``-h/--help`` may stand; after
    it, exact launcher flags (``--loss x`` / ``--loss=x``) are taken out and
    the rest is the script's, in order. A ``--`` after the script stops the
    extraction and is dropped.
    """
    ours: List[str] = []
    rest: List[str] = []
    script: Optional[str] = None
    i = 0
    argv = list(argv)
    while i < len(argv):
        tok = argv[i]
        name = tok.split("=", 1)[0]
        if script is not None and tok == "--":
            rest.extend(argv[i + 1:])
            break
        if name in _OUR_FLAGS:
            if "=" in tok:
                ours.append(tok)
                i += 1
            elif i + 1 >= len(argv):
                raise LaunchError(f"argument {tok}: expected one argument")
            else:
                ours.extend(argv[i:i + 2])
                i += 2
            continue
        if script is None:
            if tok in _HELP_FLAGS:
                ours.append(tok)
            elif tok.startswith("-"):
                raise LaunchError(f"unknown option {tok} before the script (see --help)")
            else:
                script = tok
        else:
            rest.append(tok)
        i += 1
    return ours, script, rest


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        usage=f"python -m {PROG} [-h] SCRIPT [script args] [--loss {{ce,encouraging}}] [EL options]",
        description=(
            "Run an upstream timm train.py unchanged with the Encouraging Loss (Zhao et al., AAAI 2022)\n"
            "as its training loss.\n\n"
            "The first loss the script builds is its training loss and becomes EL: timm's\n"
            "LabelSmoothingCrossEntropy -> EncouragingLabelSmoothingLoss, SoftTargetCrossEntropy (Mixup/CutMix)\n"
            "-> EncouragingSoftTargetLoss, nn.CrossEntropyLoss -> EncouragingLabelSmoothingLoss, and\n"
            "timm.loss.create_classification_loss(loss_type='ce') -> loss_type='encouraging'. Losses built\n"
            "after it (train.py's validate_loss_fn = nn.CrossEntropyLoss()) stay the script's own.\n\n"
            "The options below may stand before or after SCRIPT; they are removed before the script parses\n"
            "its arguments (a '--' after SCRIPT passes everything after it through untouched). One line on\n"
            "stderr names the loss installed. Under torchrun every rank runs the launcher:\n"
            "  torchrun --nproc_per_node N -m timm_el.launch train.py ..."),
        epilog=(
            "examples:\n"
            f"  python -m {PROG} train.py /data/imagenet --model resnet50 --loss encouraging --log-end 0.75\n"
            f"  torchrun --nproc_per_node 2 -m {PROG} train.py /data/imagenet --model efficientnet_b0 "
            "--loss encouraging\n"
            "BinaryCrossEntropy (--bce-loss) and JsdCrossEntropy (--jsd-loss) are refused: EL replaces softmax "
            "cross-entropy over single-label targets."),
        formatter_class=_Formatter,
    )
    parser.add_argument("script", nargs="?", metavar="SCRIPT", help="the training script (timm's train.py)")
    parser.add_argument("--loss", choices=LOSSES, default="ce",
                        help="ce: run the script as is; encouraging: EL as its training loss")
    el = parser.add_argument_group("Encouraging Loss options (--loss encouraging only)")
    el.add_argument("--log-end", type=float, default=None,
                    help="conservative bonus end point in (0, 1]; 1 is the normal bonus (default: 0.75)")
    el.add_argument("--bonus", choices=("log", "power", "cosine"), default=None, help="bonus kind (default: log)")
    el.add_argument("--bonus-start", type=float, default=None,
                    help="aggressive bonus threshold in [0, 1); 0 is off (default: 0)")
    el.add_argument("--bonus-gamma", type=float, default=None,
                    help="exponent of the power bonus, > 0 (default: 1)")
    el.add_argument("--bonus-rho", type=float, default=None,
                    help="weight of the bonus, >= 0; 0 gives the script's CE (default: 1)")
    el.add_argument("--bonus-smoothing", type=float, default=None,
                    help="label smoothing of the bonus term in [0, 1) (default: the script's smoothing)")
    return parser


class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults where there is one, description and epilog as written."""


def parse_args(argv: Sequence[str]) -> Tuple[argparse.Namespace, str, List[str], Dict[str, object]]:
    """Parse and check the launcher's part of the command line.

    Returns ``(args, script, script_args, el_kwargs)``. Exits 2 with one line on
    a bad flag value, a missing script, or EL options without ``--loss encouraging``.
    """
    parser = build_parser()
    try:
        ours, script, rest = split_argv(argv)
    except LaunchError as e:
        parser.error(str(e))
    args = parser.parse_args(ours + ([script] if script else []))
    if args.script is None:
        parser.error("the training script is missing: python -m timm_el.launch path/to/train.py [its args]")
    if not Path(args.script).is_file():
        parser.error(f"training script {args.script} not found")
    given = {flag: getattr(args, key) for flag, key in EL_FLAGS.items() if getattr(args, key) is not None}
    if args.loss != "encouraging":
        if given:
            parser.error(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --loss encouraging "
                         f"(got --loss {args.loss})")
        return args, args.script, rest, {}
    el_kwargs = {EL_FLAGS[flag]: value for flag, value in given.items()}
    el_kwargs.setdefault("log_end", 0.75)
    try:
        from timm_el.factory import create_encouraging_loss
        create_encouraging_loss(smoothing=0.0, **el_kwargs)  # checks every value
    except ValueError as e:
        parser.error(_flag_message(str(e)))
    return args, args.script, rest, el_kwargs


def _flag_message(message: str) -> str:
    """'log_end must be in (0, 1], got 1.5' -> '--log-end must be in (0, 1], got 1.5'."""
    for flag, key in EL_FLAGS.items():
        if message.startswith(key + " "):
            return flag + message[len(key):]
    return message


# ------------------------------------------------------------------ the patch


def _describe_call(name: str, args, kwargs) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def _package_dirs(*names) -> Tuple[str, ...]:
    dirs = []
    for name in names:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            dirs.append(os.path.dirname(os.path.abspath(module.__file__)) + os.sep)
    return tuple(dirs)


class LossPatch:
    """Make the first loss a script builds the Encouraging Loss (see the module docstring).

    Args:
        el_kwargs: Options for :func:`timm_el.create_encouraging_loss` (``log_end``, ``bonus``, ...).
        script: The script's path, for messages.
        log: Where the one-line report goes (a callable taking a string).
    """

    def __init__(self, el_kwargs: Dict[str, object], script: str = "train.py", log=None):
        import timm.loss  # noqa: F401
        import torch.nn  # noqa: F401

        import timm_el  # noqa: F401  (registers loss_type='encouraging')

        self.el_kwargs = dict(el_kwargs)
        self.script = os.path.abspath(script)
        self.log = log or _stderr_line
        self.pending = False
        self.installed = None  # the EL module, once built
        self.report = None  # the line printed
        self._undo: List[Tuple[object, str, object]] = []
        self._internal = _package_dirs("timm", "torch")

    # -- what counts as the script's code
    def _caller(self, frame):
        """The first frame outside timm, torch and the launcher, or None."""
        while frame is not None:
            filename = os.path.abspath(frame.f_code.co_filename)
            if not filename.startswith(self._internal) and not frame.f_code.co_filename.startswith("<"):
                return frame
            frame = frame.f_back
        return None

    def _from_script_code(self, frame) -> bool:
        if frame is None:
            return False
        filename = frame.f_code.co_filename
        return not filename.startswith("<") and not os.path.abspath(filename).startswith(self._internal)

    @staticmethod
    def _where(frame) -> str:
        if frame is None:
            return "?"
        return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"

    # -- install / restore
    def __enter__(self):
        self.install()
        return self

    def __exit__(self, *exc):
        self.restore()
        return False

    def install(self) -> None:
        import timm.loss
        import torch.nn as nn
        from timm.loss import BinaryCrossEntropy, JsdCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        self.pending = True
        self.installed = None
        converters = {
            LabelSmoothingCrossEntropy: self._from_label_smoothing,
            SoftTargetCrossEntropy: self._from_soft_target,
            nn.CrossEntropyLoss: self._from_torch_ce,
            BinaryCrossEntropy: self._refuse_class,
            JsdCrossEntropy: self._refuse_class,
        }
        for original, convert in converters.items():
            proxy = self._proxy(original, convert)
            for module in self._class_modules():
                # never in the module that defines the class: its own methods refer to it by name
                # (timm's ``super(LabelSmoothingCrossEntropy, self).__init__()``)
                if module.__name__ != original.__module__ and module.__dict__.get(original.__name__) is original:
                    self._set(module, original.__name__, proxy)
        hook = timm.loss.create_classification_loss
        wrapper = self._factory(hook)
        for module in self._timm_modules():
            if module.__dict__.get("create_classification_loss") is hook:
                self._set(module, "create_classification_loss", wrapper)

    def restore(self) -> None:
        """Put every patched name back (names the script imported keep pass-through stand-ins)."""
        while self._undo:
            module, name, value = self._undo.pop()
            setattr(module, name, value)
        self.pending = False

    def _set(self, module, name, value) -> None:
        self._undo.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    @staticmethod
    def _class_modules():
        return [m for n, m in list(sys.modules.items())
                if m is not None and (n in ("timm.loss", "torch.nn", "torch.nn.modules") or n.startswith("timm.loss."))]

    @staticmethod
    def _timm_modules():
        return [m for n, m in list(sys.modules.items())
                if m is not None and (n == "timm" or n.startswith("timm.")) and hasattr(m, "__dict__")]

    # -- the stand-ins
    def _proxy(self, original, convert):
        patch = self

        def __new__(cls, *args, **kwargs):
            if cls is not proxy:  # a subclass of the stand-in: built like a subclass of the original
                return super(proxy, cls).__new__(cls)
            frame = sys._getframe(1)
            if patch.pending and patch._from_script_code(frame):
                return patch._train_loss(convert(original, args, kwargs), original.__name__, args, kwargs, frame)
            return original(*args, **kwargs)

        proxy = type(original.__name__, (original,), {
            "__new__": __new__,
            "__module__": original.__module__,
            "__qualname__": original.__qualname__,
            "__doc__": original.__doc__,
            "_timm_el_launch_original": original,
        })
        return proxy

    def _factory(self, hook):
        import functools

        patch = self
        sig = inspect.signature(hook)

        @functools.wraps(hook)  # also copies the hook's marker, so timm_el.install() stays idempotent
        def create_classification_loss(*args, **kwargs):
            if not patch.pending:
                return hook(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            call = dict(bound.arguments)
            loss_type = call.get("loss_type")
            if call.get("multi_label"):
                patch._refuse("create_classification_loss(multi_label=True): EL is a softmax loss over "
                              "single-label targets")
            if loss_type not in (None, "ce", "encouraging"):
                patch._refuse(f"create_classification_loss(loss_type={loss_type!r}): EL replaces softmax "
                              f"cross-entropy (loss_type 'ce'); run with --loss ce to keep {loss_type!r}")
            for key in patch.el_kwargs:
                call.pop(key, None)
            call.update(loss_type="encouraging", **patch.el_kwargs)
            try:
                loss = hook(**call)
            except ValueError as e:
                patch._refuse(f"create_classification_loss: {e}")
            frame = patch._caller(sys._getframe(1)) or sys._getframe(1)
            return patch._train_loss(loss, "create_classification_loss", args, kwargs, frame)

        return create_classification_loss

    # -- conversions
    def _el(self, smoothing=0.0, soft_targets=False):
        from timm_el.factory import create_encouraging_loss
        return create_encouraging_loss(smoothing=smoothing, soft_targets=soft_targets, **self.el_kwargs)

    def _from_label_smoothing(self, original, args, kwargs):
        bound = inspect.signature(original.__init__).bind(None, *args, **kwargs)
        bound.apply_defaults()
        return self._el(smoothing=float(bound.arguments["smoothing"]))

    def _from_soft_target(self, original, args, kwargs):
        if args or kwargs:
            self._refuse(f"{_describe_call(original.__name__, args, kwargs)}: unexpected arguments")
        return self._el(soft_targets=True)

    def _from_torch_ce(self, original, args, kwargs):
        bound = inspect.signature(original.__init__).bind(None, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if a["weight"] is not None or a["ignore_index"] != -100 or a["reduction"] != "mean" \
                or a["size_average"] is not None or a["reduce"] is not None:
            self._refuse(f"{_describe_call('nn.CrossEntropyLoss', args, kwargs)}: EL supports the plain mean "
                         "loss only (no class weights, ignore_index or other reduction)")
        return self._el(smoothing=float(a["label_smoothing"]))

    def _refuse_class(self, original, args, kwargs):
        flag = {"BinaryCrossEntropy": " (--bce-loss)", "JsdCrossEntropy": " (--jsd-loss)"}.get(original.__name__, "")
        self._refuse(f"the script's training loss is {original.__name__}{flag}: EL replaces softmax cross-entropy "
                     "over single-label targets; drop that option, or run with --loss ce")

    def _refuse(self, message: str):
        self.restore()
        raise LaunchError(message)

    def _train_loss(self, loss, replaced: str, args, kwargs, frame):
        self.restore()
        self.installed = loss
        self.report = (f"{PROG}: training loss {type(loss).__name__}({loss.extra_repr()}) in place of "
                       f"{_describe_call(replaced, args, kwargs)} at {self._where(frame)}; "
                       "losses built after it (validation) are unchanged")
        self.log(_rank_prefix() + self.report)
        return loss


def _stderr_line(line: str) -> None:
    """One write per line, so that the lines of several ranks do not interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _rank_prefix() -> str:
    world = os.environ.get("WORLD_SIZE")
    if world and world != "1":
        return f"[rank {os.environ.get('RANK', '?')}/{world}] "
    return ""


# ------------------------------------------------------------------ running


def run_script(script: str, script_args: Sequence[str]) -> None:
    """Run ``script`` as ``__main__`` with ``sys.argv = [script, *script_args]`` (as ``python script`` would)."""
    path = os.path.abspath(script)
    old_argv = sys.argv[:]
    sys.argv = [path] + list(script_args)
    sys.path.insert(0, os.path.dirname(path))
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = old_argv
        if sys.path and sys.path[0] == os.path.dirname(path):
            del sys.path[0]


def _die(message: str, code: int = 2):
    _stderr_line(f"{_rank_prefix()}{PROG}: error: {message}")
    raise SystemExit(code)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, script, script_args, el_kwargs = parse_args(argv)
    name = os.path.basename(script)
    if args.loss == "ce":
        _stderr_line(f"{_rank_prefix()}{PROG}: --loss ce: running {name} unchanged, with its own losses")
        run_script(script, script_args)
        return 0
    patch = LossPatch(el_kwargs, script)
    try:
        with patch:
            run_script(script, script_args)
    except LaunchError as e:
        _die(str(e))
    if patch.installed is None:
        _die(f"{name} returned without building a training loss through timm's LabelSmoothingCrossEntropy, "
             "SoftTargetCrossEntropy, nn.CrossEntropyLoss or create_classification_loss; EL was not used", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
