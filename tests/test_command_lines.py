"""The four scripts' command lines: every flag of the original's argparse parses here, each keeps
the original's default but for a named list of exceptions that docs/deviations.md explains, and
argparse mistakes end in one line naming the flag, exit status 2."""
import os

import pytest

import main_reranker
import main_retriever
import save_candidates
from conftest import ROOT

# The original's argparse, flag by flag with its default, as its four parsers define them
# (main_retriever.py, save_candidates.py, main_reranker.py, gradient-bias/main.py of the 2021 code).
ORIGINAL_DEFAULTS = {
    "main_retriever": {
        "model": None, "resume_training": False, "max_len": 128, "num_hards": 10,
        "type_cands": "mixed_negative", "data_dir": None, "B": 128, "lr": 2e-5, "epochs": 3,
        "k": 64, "warmup_proportion": 0.1, "weight_decay": 0.01, "adam_epsilon": 1e-6,
        "gradient_accumulation_steps": 1, "seed": 42, "num_workers": 0, "simpleoptim": False,
        "clip": 1, "logging_steps": 1000, "gpus": "", "eval_criterion": "recall",
        "pre_model": "Bert", "cands_ratio": 1.0, "num_cands": 128, "smoothing_value": 1,
        "eval_batchsize": 512, "mention_bsz": 512, "entity_bsz": 512, "exclude_golds": False,
        "type_model": "dual", "num_mention_vecs": 8, "num_entity_vecs": 8,
        "mention_use_codes": False, "entity_use_codes": False, "en_hidden_path": None,
        "store_en_hiddens": False},
    "save_candidates": {
        "model": None, "max_len": 128, "data_dir": None, "seed": 42, "num_workers": 0,
        "gpus": "", "mention_bsz": 128, "entity_bsz": 512, "cands_dir": None, "num_cands": 64,
        "type_model": "dual", "num_mention_vecs": 8, "num_entity_vecs": 8,
        "mention_use_codes": False, "entity_use_codes": False, "en_hidden_path": None,
        "pre_model": "Bert", "store_en_hiddens": False},
    "main_reranker": {
        "model": None, "data": None, "cands_dir": None, "L": 256, "C": 64, "C_eval": 64, "B": 8,
        "lr": 2e-5, "warmup_proportion": 0.1, "weight_decay": 0.01, "adam_epsilon": 1e-6,
        "gradient_accumulation_steps": 1, "epochs": 3, "logging_steps": 1000, "clip": 1,
        "init": 0, "seed": 42, "num_workers": 1, "gpus": "", "simpleoptim": False,
        "eval_method": "macro", "type_model": "full", "type_bert": "base", "num_mention_vecs": 8,
        "num_entity_vecs": 8, "mention_use_codes": False, "entity_use_codes": False,
        "inputmark": False, "fp16": False, "fp16_opt_level": "O1"},
    "gradient_bias": {
        "num_labels": 1000, "support": -1, "temp": 0.001, "num_negatives": 4, "replacement": False,
        "monte_carlo": 10, "dim": 300, "steps": 30, "batch_size": 128, "lr": 0.001,
        "pickle": "cukes.p", "seed": 42},
}
ORIGINAL_FLAGS = {script: tuple(flags) for script, flags in ORIGINAL_DEFAULTS.items()}

# Our defaults that are not the original's, each listed in docs/deviations.md: the flags that do
# nothing here default to None, which tells whether one was given (it gets a notice), and
# save_candidates.py reads the model's shape from the checkpoint unless a flag gives it.
COMPATIBILITY = None
FROM_CHECKPOINT = None
EXCEPTIONS = {
    "main_retriever": {"num_hards": COMPATIBILITY, "num_workers": COMPATIBILITY,
                       "store_en_hiddens": COMPATIBILITY, "eval_batchsize": COMPATIBILITY},
    "save_candidates": {"seed": COMPATIBILITY, "num_workers": COMPATIBILITY, **{
                            flag: FROM_CHECKPOINT for flag in (
                                "pre_model", "type_model", "num_mention_vecs", "num_entity_vecs",
                                "mention_use_codes", "entity_use_codes", "max_len")}},
    "main_reranker": {"fp16_opt_level": COMPATIBILITY},
    "gradient_bias": {},
}


def our_defaults(script, monkeypatch):
    """{dest: default} of a script's parser, as built (nothing parsed, nothing checked)."""
    import importlib
    parser = parser_of(importlib.import_module(script), monkeypatch)
    return {a.dest: a.default for a in parser._actions}


def dest(flag):
    return "data_dir" if flag == "data" else flag  # --data and --data_dir name one folder here


@pytest.mark.parametrize("script", sorted(ORIGINAL_DEFAULTS))
def test_defaults_are_the_originals_but_the_listed_exceptions(script, monkeypatch):
    ours = our_defaults(script, monkeypatch)
    original, exceptions = ORIGINAL_DEFAULTS[script], EXCEPTIONS[script]
    assert set(exceptions) <= set(original)
    for flag, default in original.items():
        expected = exceptions.get(flag, default)
        assert ours[dest(flag)] == expected, (flag, ours[dest(flag)], expected)
        if flag in exceptions:
            assert exceptions[flag] != default, f"--{flag} is the original's again: unlist it"


def test_every_exception_is_in_the_deviation_list():
    with open(os.path.join(ROOT, "docs", "deviations.md"), encoding="utf-8") as f:
        text = f.read()
    missing = [f"{script} --{flag}" for script, flags in EXCEPTIONS.items() for flag in flags
               if f"--{flag}" not in text]
    assert not missing, missing


@pytest.mark.parametrize("module, argv", [
    (main_retriever, ["--model", "m.pt", "--data_dir", "d"]),
    (save_candidates, ["--model", "m.pt", "--data_dir", "d", "--cands_dir", "c"]),
    (main_reranker, ["--model", "m.pt", "--data", "d", "--cands_dir", "{tmp}"]),
])
@pytest.mark.parametrize("bad, flag", [(["--fp16", "--fp32"], "--fp32"),
                                       (["--bf16", "--fp16"], "--fp16"),
                                       (["--B", "x"], "--B"),
                                       (["--no_such_flag"], "--no_such_flag")])
def test_argparse_errors_are_one_line(module, argv, bad, flag, tmp_path, capsys):
    if flag == "--B" and module is save_candidates:
        bad, flag = ["--num_cands", "x"], "--num_cands"
    with pytest.raises(SystemExit) as e:
        module.main([a.format(tmp=tmp_path) for a in argv] + bad)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert flag in err, err


@pytest.mark.parametrize("module, argv", [
    (main_retriever, ["--model", "m.pt"]),
    (save_candidates, ["--model", "m.pt", "--cands_dir", "c"]),
    (main_reranker, ["--model", "m.pt", "--cands_dir", "{tmp}"]),
])
@pytest.mark.parametrize("flag", ["--data", "--data_dir"])
def test_data_and_data_dir_both_name_the_zeshel_folder(module, argv, flag, tmp_path):
    args = module.parse_args([a.format(tmp=tmp_path) for a in argv] + [flag, "zeshel"])
    assert args.data_dir == "zeshel"


def test_compatibility_flags_do_nothing_and_say_so():
    """The original's flags that have nothing to do here parse, default to None, are left out
    of what a run records, and one notice names those given."""
    from cli import COMPATIBILITY_FLAGS, notices
    parser = main_retriever.build_parser()
    args = parser.parse_args(["--model", "m.pt", "--data_dir", "d"])
    assert all(getattr(args, name) is None for name in
               ("num_hards", "num_workers", "store_en_hiddens", "en_hidden_path",
                "eval_batchsize"))
    given = parser.parse_args(["--model", "m.pt", "--data_dir", "d", "--num_hards", "10",
                               "--store_en_hiddens", "--en_hidden_path", "/x"])
    assert given.num_hards == 10 and given.store_en_hiddens is True
    assert not set(parser.recorded(given)) & parser.compat
    assert parser.compat <= set(COMPATIBILITY_FLAGS)
    assert parser.recorded(given)["B"] == 128
    assert notices(args, parser) == []
    lines = notices(given, parser)
    assert len(lines) == 1 and lines[0].startswith("--en_hidden_path, --num_hards, "
                                                   "--store_en_hiddens accepted"), lines
    # the reranker's --num_workers acts (its DataLoader's workers): recorded, no notice
    rr_parser = main_reranker.build_parser()
    rr = rr_parser.parse_args(["--model", "m", "--data", "d", "--cands_dir", ".",
                               "--num_workers", "2"])
    assert rr_parser.recorded(rr)["num_workers"] == 2 and notices(rr, rr_parser) == []
    # save_candidates draws nothing at random and has no loader: its --seed, --num_workers
    # are compatibility flags (the retriever's --seed acts)
    sc_parser = save_candidates.build_parser()
    sc = sc_parser.parse_args(["--model", "m", "--data_dir", "d", "--cands_dir", "c",
                               "--seed", "3", "--num_workers", "2"])
    assert "seed" not in sc_parser.recorded(sc) and "seed" in parser.recorded(given)
    lines = notices(sc, sc_parser)
    assert len(lines) == 1 and lines[0].startswith("--num_workers, --seed accepted")
    assert rr_parser.parse_args(["--model", "m", "--data", "d", "--cands_dir", ".",
                                 "--fp16_opt_level", "O2"]).fp16_opt_level == "O2"


def test_scorer_choices_come_from_the_registry():
    import reranker
    from retriever import SCORERS
    for module, extra in ((main_retriever, ()), (save_candidates, ()), (main_reranker, ("full",))):
        assert tuple(type_model_choices(module)) == extra + tuple(SCORERS)
    assert reranker.TYPE_MODELS == ("full",) + tuple(SCORERS)


def type_model_choices(module):
    """The --type_model choices of a script's parser (read through argparse's error message)."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        module.parse_args(["--type_model", "nonsense"])
    message = err.getvalue()
    inside = message[message.index("(choose from") + len("(choose from"):message.rindex(")")]
    return [c.strip(" '") for c in inside.split(",")]


# A value of each flag that takes one, where the type's own sample would not do
VALUES = {"cands_dir": "{tmp}", "pickle": "{tmp}/bias.pkl", "gpus": "0", "dim": "-1",
          "support": "-1", "type_model": "sum_max", "max_len": "128", "L": "256"}


class Built(Exception):
    """Raised with the parser a script built, before it parses anything."""


def parser_of(module, monkeypatch):
    import cli

    def stop(self, *args, **kwargs):
        raise Built(self)
    with monkeypatch.context() as m:
        m.setattr(cli.ArgumentParser, "parse_args", stop)
        with pytest.raises(Built) as built:
            module.parse_args([])
    return built.value.args[0]


@pytest.mark.parametrize("script", sorted(ORIGINAL_FLAGS))
def test_every_flag_of_the_original_parses(script, tmp_path, monkeypatch):
    """All the original's flags of a script on one command line: it parses, and each flag that
    takes a value holds the value given (none swallowed by another, none renamed)."""
    import importlib
    module = importlib.import_module(script)
    actions = {o: a for a in parser_of(module, monkeypatch)._actions for o in a.option_strings}
    argv, given = [], {}
    for name in ORIGINAL_FLAGS[script]:
        action = actions.get("--" + name)
        assert action is not None, f"--{name} of the original is not accepted by {script}.py"
        argv.append("--" + name)
        if action.nargs == 0:  # store_true
            given[action.dest] = True
            continue
        value = VALUES.get(name) or (action.choices[0] if action.choices else
                                     {int: "2", float: "0.5"}.get(action.type, "x"))
        value = value.format(tmp=tmp_path)
        argv.append(value)
        given[action.dest] = action.type(value) if action.type else value
    args = vars(module.parse_args(argv))
    assert {dest: args[dest] for dest in given} == given
