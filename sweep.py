"""Run the paper's experiments as named recipes, one run after another, then print the tables.

    python sweep.py paper --data_dir ZESHEL --out runs/paper        # the three steps
    python sweep.py appendix --data_dir ZESHEL --out runs/appendix  # 3 scorers x 5 shares of hard
    python sweep.py appendix ... --dry_run                          # print the command lines only
    python sweep.py appendix ... --only dual_p0 sum_max_p50 -- --fp16   # some runs; extra flags

Each recipe expands into command lines of `main_retriever.py`, `save_candidates.py` and
`main_reranker.py` with the values of the paper (the README's command lines); `--data_dir`,
`--pretrained` and every flag after `--` (or any flag sweep.py does not know) are passed on to each
run whose script takes it, in place of the recipe's value of that flag. With
`--nproc_per_node N` each run goes under `torchrun --standalone --nproc_per_node N`.

A run whose results are complete (`<model>.results.json` with a "test" entry; `recall.json` for the
candidates) is skipped; one that stopped after a saved epoch (`<model>.last`) is continued with
`--resume_training`. `OUT/sweep.json` records each run's command line: a finished or interrupted
run is never continued under other flags (the sweep stops and names it). At the end the tables of
`report.py --paper` are printed for OUT.
"""
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys

from recipe import CANDIDATES, HARD_SHARES, RERANKER, RETRIEVER, SCORERS, merge, split_flags
from cli import ArgumentParser, check_flag, die
from run_safety import atomic_write, main as cli_main

ROOT = os.path.dirname(os.path.abspath(__file__))



class Run:
    """One command line of a recipe: `script` with `args`; resumable when `last` exists (None:
    the script cannot resume). Done when `done_file` exists and, for a training run (one with
    `last`), holds the test evaluation (save_candidates.py writes recall.json after the
    candidates)."""

    def __init__(self, name, script, args, done_file, last=None):
        self.name, self.script, self.args = name, script, args
        self.done_file, self.last = done_file, last

    def done(self):
        if not os.path.isfile(self.done_file):
            return False
        if self.last is None:
            return True
        try:
            with open(self.done_file) as f:
                return json.load(f).get("test") is not None
        except (OSError, ValueError, AttributeError):
            return False

    def resumable(self):
        return self.last is not None and os.path.isfile(self.last)


def model_run(name, script, model, args):
    return Run(name, script, ["--model", model] + args, model + ".results.json", model + ".last")


def paper_runs(out, data_dir):
    """The main pipeline: the sum-of-max retriever with mixed negatives, its candidates (from the
    retriever's best checkpoint), the cross-encoder reranker on them (a new checkpoint path)."""
    retriever, cands = os.path.join(out, "retriever.pt"), os.path.join(out, "cands")
    return [model_run("retriever", "main_retriever.py", retriever,
                      ["--data_dir", data_dir] + RETRIEVER + SCORERS["sum_max"]),
            Run("candidates", "save_candidates.py",
                ["--model", retriever, "--data_dir", data_dir, "--cands_dir", cands] + CANDIDATES,
                os.path.join(cands, "recall.json")),
            model_run("reranker", "main_reranker.py", os.path.join(out, "reranker.pt"),
                      ["--data", data_dir, "--cands_dir", cands] + RERANKER)]


def appendix_runs(out, data_dir):
    """15 retrievers: dual / multi-vector (8 entity vectors) / sum-of-max at p = 0..100% hard."""
    runs = []
    for scorer, shape in SCORERS.items():
        for p in HARD_SHARES:
            name = f"{scorer}_p{p}"
            ratio = ["--cands_ratio", f"{(100 - p) / 100:g}"]
            runs.append(model_run(name, "main_retriever.py", os.path.join(out, name + ".pt"),
                                  merge(["--data_dir", data_dir] + RETRIEVER, shape + ratio)))
    return runs


RECIPES = {"paper": paper_runs, "appendix": appendix_runs}


def script_flags(script):
    """The option names `script` accepts, read from its own --help."""
    module = __import__(script[:-len(".py")])
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        module.parse_args(["--help"])
    return set(re.findall(r"(?<![\w-])--\w+", text.getvalue())) - {"--help"}


def add_extras(runs, extras):
    """Append the extra flags to every run whose script takes them; stop on a flag none takes."""
    groups = split_flags(extras)
    if not groups:
        return
    accepted = {script: script_flags(script) for script in {r.script for r in runs}}
    for group in groups:
        check_flag(any(group[0] in flags for flags in accepted.values()), group[0],
                   f"no script of this recipe takes it ({', '.join(sorted(accepted))})")
    for run in runs:
        run.args = merge(run.args, [t for g in groups if g[0] in accepted[run.script] for t in g])


def command(run, nproc):
    """The argv of a run (python, or torchrun through `python -m torch.distributed.run`)."""
    script = os.path.join(ROOT, run.script)
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(nproc), script, *run.args]
    return [sys.executable, script, *run.args]


def shown(run, nproc, resume=False):
    head = f"torchrun --standalone --nproc_per_node {nproc} " if nproc > 1 else "python "
    args = run.args + (["--resume_training"] if resume else [])
    return head + run.script + " " + " ".join(shlex.quote(a) for a in args)


def check_recorded(record, run):
    """Stop when a run that has begun (outputs on disk) was recorded with another command line."""
    before = record.get(run.name)
    if before is not None and before != run.args and (run.done() or run.resumable()):
        die(f"{run.name}: its outputs in the --out folder come from other flags "
            f"({shlex.join(before)}); remove them or use another --out")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Flags after -- (or unknown ones) go to every run.")
    p.add_argument("recipe", choices=sorted(RECIPES))
    p.add_argument("--data_dir", help="Zeshel folder (required)")
    p.add_argument("--out", help="folder for the runs' checkpoints, logs and results (required)")
    p.add_argument("--pretrained", help="encoder folder or hub name, for every run")
    p.add_argument("--only", nargs="+", metavar="RUN", help="run only these runs of the recipe")
    p.add_argument("--nproc_per_node", type=int, default=1,
                   help="processes per run (torchrun --standalone); 1: plain python")
    p.add_argument("--dry_run", action="store_true", help="print the command lines and stop")
    args, extras = p.parse_known_args(argv)
    args.extras = [a for a in extras if a != "--"]
    check_flag(args.data_dir, "--data_dir", "the Zeshel folder is required")
    check_flag(args.out, "--out", "a folder for the runs is required")
    check_flag(args.nproc_per_node >= 1, "--nproc_per_node",
               f"must be 1 or more (got {args.nproc_per_node})")
    return args


def expand(args):
    """The recipe's runs, with --only, --pretrained and the extra flags applied."""
    out, data_dir = os.path.abspath(args.out), os.path.abspath(args.data_dir)
    runs = RECIPES[args.recipe](out, data_dir)
    if args.only:
        names = [r.name for r in runs]
        for name in args.only:
            check_flag(name in names, "--only", f"{args.recipe} has no run {name} "
                       f"(its runs: {' '.join(names)})")
        runs = [r for r in runs if r.name in args.only]
    extras = (["--pretrained", args.pretrained] if args.pretrained else []) + args.extras
    add_extras(runs, extras)
    return runs


@cli_main
def main(argv=None):
    args = parse_args(argv)
    runs = expand(args)
    if args.dry_run:
        for run in runs:
            print(shown(run, args.nproc_per_node))
        return 0
    check_flag(os.path.isdir(args.data_dir), "--data_dir", f"{args.data_dir} is not a folder")
    out = os.path.abspath(args.out)
    record_path = os.path.join(out, "sweep.json")
    record = {}
    if os.path.isfile(record_path):
        try:
            with open(record_path) as f:
                record = json.load(f)
        except ValueError:
            die(f"{record_path}: not a readable JSON file")
    for run in runs:
        check_recorded(record, run)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    for i, run in enumerate(runs, 1):
        if run.done():
            print(f"[{i}/{len(runs)}] {run.name}: finished already, skipped", flush=True)
            continue
        resume = run.resumable()
        print(f"[{i}/{len(runs)}] {run.name}{' (resumed)' if resume else ''}\n"
              f"$ {shown(run, args.nproc_per_node, resume)}", flush=True)
        record[run.name] = run.args
        text = json.dumps(record, indent=2).encode()
        atomic_write(record_path, lambda f: f.write(text))
        argv = command(run, args.nproc_per_node) + (["--resume_training"] if resume else [])
        code = subprocess.run(argv, env=env).returncode
        if code != 0:
            die(f"{run.name} failed (exit status {code}); its log is beside its checkpoint, and "
                f"running the same sweep again continues from its last saved epoch")
        if not run.done():
            die(f"{run.name} ended without its results ({run.done_file}); see its log")
    import report
    print()
    report.main([out, "--paper"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
