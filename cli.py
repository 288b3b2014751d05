"""The command line of every script: user errors, the argument parser and what each flag is to a
run, the flags several scripts share, and the original's compatibility flags.

A flag says, where it is defined, what it is to a run (docs/DESIGN.md#run-safety):

- by default it *defines* the run: it is recorded in the run's files, and resuming the run, or a
  rerun over its files, must give it the same value (a flag added after a run was recorded counts
  as its default there);
- `free=True`: it may differ between a run and its resumption or rerun (batch sizes of encoding,
  logging, progress bars, devices);
- `path=True`: it names an input (a file, folder or model) that the run records by content: runs
  are compared by what it holds, not by its name;
- compatibility flags (`add_compatibility_args`): accepted for the original's command lines,
  ignored with one notice, never recorded.
"""
import argparse
import math


class UserError(Exception):
    """A mistake of the user's (path, flag, input row): one line on stderr, exit status 2."""


def die(message):
    raise UserError(message)


def check_flag(condition, flag, message):
    if not condition:
        die(f"{flag}: {message}")


def check_range(value, flag, lowest=None, highest=None, why=""):
    """Stop with one line unless lowest <= value <= highest (None: no bound); `why` says what
    sets the bounds (", torch.manual_seed's range")."""
    if (lowest is not None and value < lowest) or (highest is not None and value > highest):
        bounds = " and ".join(b for b in (lowest is not None and f"at least {lowest}",
                                          highest is not None and f"at most {highest}") if b)
        die(f"{flag}: must be {bounds}{why} (got {value})")


def check_positive(args, *flags):
    """Stop with one line on the first of these flags whose value is not > 0."""
    for flag in flags:
        value = getattr(args, flag)
        check_flag(value > 0, f"--{flag}", f"must be positive (got {value})")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2, no usage block), float flags checked finite,
    and each flag's role (the module's docstring): `add_argument(..., free=True)` or
    `path=True`; `defining(args)` gives the flags that define a run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.free, self.paths, self.compat = {"help"}, set(), set()

    def add_argument(self, *args, free=False, path=False, **kwargs):
        action = super().add_argument(*args, **kwargs)
        (self.free if free else self.paths if path else set()).add(action.dest)
        return action

    def error(self, message):
        self.exit(2, f"error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        for name, value in vars(parsed).items():  # argparse takes "nan" and "inf" as floats
            if isinstance(value, float) and not math.isfinite(value):
                self.error(f"--{name}: {value} is not a finite number")
        return parsed

    def defining(self, args):
        """{flag: value} of the flags that define a run (neither free, nor paths, nor
        compatibility flags)."""
        skip = self.free | self.paths | self.compat
        return {k: v for k, v in vars(args).items() if k not in skip}

    def defaults(self):
        """{flag: default} of every flag: what a run that lacks a flag counts it as."""
        return {a.dest: a.default for a in self._actions}

    def recorded(self, args):
        """{flag: value} of every flag but the compatibility flags: what a checkpoint records."""
        return {k: v for k, v in vars(args).items() if k not in self.compat}


def add_data_arg(parser, flag):
    """The Zeshel folder, `args.data_dir`, as `--data_dir` or `--data` in every script; `flag` is
    the one the original script used, named in errors."""
    other = "--data" if flag == "--data_dir" else "--data_dir"
    parser.add_argument(flag, other, dest="data_dir", path=True,
                        help="Zeshel folder with documents/ and mentions/ (required)")


def add_precision_args(parser):
    """--fp16 / --bf16 / --fp32, at most one of them: the autocast dtype (utils.amp_dtype).
    --fp16 and --bf16 define the run: a change of precision moves numbers; --fp32 names the
    default, so a run given it is the run without it (free)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--fp16", action="store_true",
                       help="float16 autocast with a gradient scaler (bfloat16 on a CPU)")
    group.add_argument("--bf16", action="store_true",
                       help="bfloat16 autocast (about twice as fast as float32 on a recent GPU); "
                            "scores are still float32")
    group.add_argument("--fp32", action="store_true",
                       help="full precision, the default (TF32 matrix multiplies on a GPU)")
    parser.free.add("fp32")


# Flags of the original's command lines that have nothing to do here: accepted so that those
# command lines run unchanged, never recorded as if they acted, one notice when given.
COMPATIBILITY_FLAGS = {
    "num_hards": ({"type": int}, "the numbers of negatives come from --num_cands and "
                  "--cands_ratio"),
    "num_workers": ({"type": int}, "batches are assembled by tensor indexing in the main process"),
    "store_en_hiddens": ({"action": "store_true"}, "training streams entity vectors chunk by "
                         "chunk; save_candidates.py --store_en_hiddens stores them"),
    "en_hidden_path": ({}, "training streams entity vectors chunk by chunk; save_candidates.py "
                       "--store_en_hiddens --en_hidden_path stores them"),
    "fp16_opt_level": ({}, "mixed precision is torch.amp's (--fp16, --bf16), not apex's"),
    "seed": ({"type": int}, "ranking the candidates draws nothing at random"),
    "eval_batchsize": ({"type": int}, "val and test are ranked in batches of --mention_bsz, as "
                       "the original ranked them"),
}


def add_compatibility_args(parser, *names):
    for name in names:
        kwargs, why = COMPATIBILITY_FLAGS[name]
        parser.add_argument(f"--{name}", default=None, **kwargs,
                            help=f"accepted for the original's command lines, no effect: {why}")
        parser.compat.add(name)


def notices(args, parser, rules=()):
    """The notice lines for flags that do nothing here: the compatibility flags given, and each
    flag given a value other than its default that the chosen mode ignores (`rules`: [(flag,
    ignored(args) -> bool, why(args) -> str)])."""
    given = [n for n in sorted(parser.compat) if getattr(args, n, None) is not None]
    lines = []
    if given:
        lines.append(f"{', '.join('--' + n for n in given)} accepted for the original's command "
                     f"line and ignored ("
                     + "; ".join(dict.fromkeys(COMPATIBILITY_FLAGS[n][1] for n in given)) + ")")
    for name, ignored, why in rules:
        value = getattr(args, name)
        if value != parser.get_default(name) and ignored(args):
            lines.append(f"--{name} {value} has no effect: {why(args)}")
    return lines
