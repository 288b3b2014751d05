"""Run the paper's experiments as named recipes, one run after another, then print the tables.

    python sweep.py paper --data_dir ZESHEL --out runs/paper        # the three steps
    python sweep.py appendix --data_dir ZESHEL --out runs/appendix  # 3 scorers x 5 shares of hard
    python sweep.py blink --data_dir ZESHEL --out runs/blink        # BLINK's bi-encoder
    python sweep.py appendix ... --dry_run                          # print the command lines only
    python sweep.py appendix ... --only dual_p0 sum_max_p50 -- --fp16   # some runs; extra flags
    python sweep.py paper ... --seeds 1 2 3                         # every run once per seed

Each recipe expands into command lines of `main_retriever.py`, `save_candidates.py` and
`main_reranker.py` with the values of recipe.py; `--data_dir`, `--pretrained` and every flag after
`--` (or any flag sweep.py does not know) are passed on to each run whose script takes it, in place
of the recipe's value of that flag. With `--nproc_per_node N` each run goes under `torchrun
--standalone --nproc_per_node N`. With `--seeds S1 S2 ...` the recipe runs once per seed, in
OUT/seed<S>/, with `--seed S` for each script whose runs it defines.

A run is known by the flags recorded in its own files (the record of its folder, run_safety): one
whose flags are those the sweep would pass (as the script's own parser reads the command line) is
skipped when finished (its results hold the test evaluation; recall.json for the candidates) and
continued with `--resume_training` when it stopped after a saved epoch; one recorded with other
flags, or a file there that this project did not write, stops the sweep in one line naming the run
and the flag, before any run starts. The sweep holds OUT/sweep.lock while it runs: a second sweep
into the same OUT is refused at once. A stop signal (Ctrl-C, SIGTERM, SIGHUP) is passed on to the
run in progress, which ends after the file it is writing; running the same sweep again continues
it. At the end the tables of `report.py --paper` are printed for OUT.
"""
import importlib
import json
import os
import shlex
import sys

from cli import ArgumentParser, check_flag, die
from recipe import BLINK, CANDIDATES, HARD_SHARES, RERANKER, SCORERS, merge, retriever_flags, \
    split_flags
from run_safety import Outputs, main as cli_main, on_stop, read_hashed, recorded, run_child
from training import absolute

ROOT = os.path.dirname(os.path.abspath(__file__))


def script_parser(script):
    """The argument parser of one of the scripts (`main_retriever.py`, ...)."""
    return importlib.import_module(script[:-len(".py")]).build_parser()


class Run:
    """One command line of a recipe: `script` with `args`. Done when `done_file` is this
    project's and, for a training run (one with `last`, its saved state), holds the test
    evaluation; resumable when `last` is this project's. `label`: its name in the sweep's lines
    (seed<S>/<name> with --seeds)."""

    def __init__(self, name, script, args, done_file, last=None):
        self.name, self.label, self.script, self.args = name, name, script, args
        self.done_file, self.last = done_file, last

    def parser(self):
        return script_parser(self.script)

    def state(self):
        """"run" (nothing of it yet, or unfinished with nothing to resume), "done" or "resume",
        from the run's files; stops in one line when one of them is not this project's (or
        changed since written) or holds a run with other flags than these (`differences`)."""
        done = resumable = False
        tool = self.script[:-len(".py")]
        for path in (self.done_file, self.last):
            if path is None or not os.path.lexists(path):
                continue
            data, sha = read_hashed(path, self.label) if path == self.done_file else (None, None)
            got = recorded(path, sha)
            if got is None or got[1] is None or got[0].get("tool") != tool:
                die(f"{self.label}: {path} was not written by a run of {self.script} (or changed "
                    f"since); remove it, or choose another --out")
            differ = differences(self.parser(), self.args, got[1])
            if differ:
                flag, old, new = differ
                die(f"{self.label}: {path} holds a run with --{flag} {old}, and the sweep gives "
                    f"--{flag} {new}; remove that run's files, or choose another --out")
            if path == self.last:
                resumable = True
            else:
                done = self.last is None or has_test(data)
        return "done" if done else "resume" if resumable else "run"


def has_test(data):
    """Whether a training run's results file (bytes) holds its test evaluation."""
    try:
        return isinstance(json.loads(data.decode("utf-8")).get("test"), dict)
    except (ValueError, AttributeError):
        return False


def differences(parser, argv, description):
    """The first (flag, recorded value, value now) on which a recorded run (`description`, as
    run_safety records it) differs from the run `argv` gives, read by the script's own `parser`;
    None when it does not. A defining flag the run records counts as its default where absent;
    one the command line leaves at a default of None is the script's to decide (save_candidates
    reads the model's shape from the checkpoint) and matches any; an input given by path must be
    the path recorded."""
    args = parser.parse_args(argv)
    now, was = parser.defining(args), description.get("flags") or {}
    defaults = parser.defaults()
    for flag in sorted(set(now) | set(was)):
        new, old = now.get(flag, defaults.get(flag)), was.get(flag, defaults.get(flag))
        if new is None and defaults.get(flag) is None:
            continue
        if old != new:
            return flag, old, new
    for flag in sorted(parser.paths):
        given = getattr(args, flag, None)
        old = ((description.get("inputs") or {}).get(flag) or {}).get("path")
        if given is not None and old is not None and absolute(given) != old:
            return flag, old, absolute(given)
    return None


def model_run(name, script, model, args):
    return Run(name, script, ["--model", model] + args, model + ".results.json", model + ".last")


def paper_runs(out, data_dir):
    """The main pipeline: the sum-of-max retriever with mixed negatives, its candidates (from the
    retriever's best checkpoint), the cross-encoder reranker on them (a new checkpoint path)."""
    retriever, cands = os.path.join(out, "retriever.pt"), os.path.join(out, "cands")
    return [model_run("retriever", "main_retriever.py", retriever,
                      ["--data_dir", data_dir] + retriever_flags("sum_max", 50)),
            Run("candidates", "save_candidates.py",
                ["--model", retriever, "--data_dir", data_dir, "--cands_dir", cands] + CANDIDATES,
                os.path.join(cands, "recall.json")),
            model_run("reranker", "main_reranker.py", os.path.join(out, "reranker.pt"),
                      ["--data", data_dir, "--cands_dir", cands] + RERANKER)]


def appendix_runs(out, data_dir):
    """15 retrievers: dual / multi-vector (8 entity vectors) / sum-of-max at p = 0..100% hard."""
    return [model_run(f"{scorer}_p{p}", "main_retriever.py",
                      os.path.join(out, f"{scorer}_p{p}.pt"),
                      ["--data_dir", data_dir] + retriever_flags(scorer, p))
            for scorer in SCORERS for p in HARD_SHARES]


def blink_runs(out, data_dir):
    """BLINK's Zeshel bi-encoder (recipe.BLINK): a dual encoder with in-batch negatives."""
    return [model_run("blink", "main_retriever.py", os.path.join(out, "blink.pt"),
                      ["--data_dir", data_dir] + BLINK)]


RECIPES = {"paper": paper_runs, "appendix": appendix_runs, "blink": blink_runs}


def script_flags(script):
    """The option names `script` accepts, from its own parser."""
    parser = script_parser(script)
    return {o for a in parser._actions for o in a.option_strings} - {"-h", "--help"}


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


def seeded(runs, seed):
    """`runs` with --seed `seed` for each script whose parser records it (the scripts that draw
    at random; save_candidates takes --seed only for the original's command line)."""
    for run in runs:
        parser = run.parser()
        if "seed" in parser.defining(parser.parse_args([])):
            run.args = merge(run.args, ["--seed", str(seed)])
    return runs


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


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       epilog="Flags after -- (or unknown ones) go to every run.")
    p.add_argument("recipe", choices=sorted(RECIPES))
    p.add_argument("--data_dir", help="Zeshel folder (required)")
    p.add_argument("--out", help="folder for the runs' checkpoints, logs and results (required)")
    p.add_argument("--pretrained", help="encoder folder or hub name, for every run")
    p.add_argument("--only", nargs="+", metavar="RUN", help="run only these runs of the recipe")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                   help="run the recipe once per seed, in OUT/seed<SEED>/")
    p.add_argument("--nproc_per_node", type=int, default=1,
                   help="processes per run (torchrun --standalone); 1: plain python")
    p.add_argument("--dry_run", action="store_true", help="print the command lines and stop")
    args, extras = p.parse_known_args(argv)
    args.extras = [a for a in extras if a != "--"]
    check_flag(args.data_dir, "--data_dir", "the Zeshel folder is required")
    check_flag(args.out, "--out", "a folder for the runs is required")
    check_flag(args.nproc_per_node >= 1, "--nproc_per_node",
               f"must be 1 or more (got {args.nproc_per_node})")
    check_flag(not args.seeds or len(set(args.seeds)) == len(args.seeds), "--seeds",
               f"a seed is given twice ({' '.join(map(str, args.seeds or []))})")
    return args


def expand(args):
    """The recipe's runs (per seed with --seeds), with --only, --pretrained and the extra flags
    applied."""
    out, data_dir = os.path.abspath(args.out), os.path.abspath(args.data_dir)
    extras = (["--pretrained", args.pretrained] if args.pretrained else []) + args.extras
    runs = []
    for seed in args.seeds or [None]:
        folder = out if seed is None else os.path.join(out, f"seed{seed}")
        these = RECIPES[args.recipe](folder, data_dir)
        if args.only:
            names = [r.name for r in these]
            for name in args.only:
                check_flag(name in names, "--only", f"{args.recipe} has no run {name} "
                           f"(its runs: {' '.join(names)})")
            these = [r for r in these if r.name in args.only]
        add_extras(these, extras)
        if seed is not None:
            for run in seeded(these, seed):
                run.label = f"seed{seed}/{run.name}"
        runs += these
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
    Outputs("sweep", flag="--out", lock=os.path.join(out, "sweep.lock")).start()
    states = [run.state() for run in runs]  # every run's files checked before any run starts
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    for i, (run, state) in enumerate(zip(runs, states), 1):
        if state == "done":
            print(f"[{i}/{len(runs)}] {run.label}: finished already, skipped", flush=True)
            continue
        resume = state == "resume"
        print(f"[{i}/{len(runs)}] {run.label}{' (resumed)' if resume else ''}\n"
              f"$ {shown(run, args.nproc_per_node, resume)}", flush=True)
        on_stop(lambda name, run=run: f"stopped by {name}: {run.label} was stopped after the "
                f"file it was writing; running the same sweep again continues it")
        code = run_child(command(run, args.nproc_per_node)
                         + (["--resume_training"] if resume else []), env=env)
        if code != 0:
            die(f"{run.label} failed (exit status {code}); its log is beside its checkpoint, and "
                f"running the same sweep again continues from its last saved epoch")
        if run.state() != "done":
            die(f"{run.label} ended without its results ({run.done_file}); see its log")
    import report
    print()
    report.main([out, "--paper"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
