"""The three scripts' command lines: every flag of the original keeps the original's default (read
from parse_args), and argparse mistakes end in one line naming the flag, exit status 2."""
import pytest

import main_reranker
import main_retriever
import save_candidates

# The original's argparse defaults (docs/DESIGN.md#training, #candidates, #reranker).
RETRIEVER = {"max_len": 128, "type_cands": "mixed_negative", "B": 128, "lr": 2e-5, "epochs": 3,
             "k": 64, "warmup_proportion": 0.1, "weight_decay": 0.01, "adam_epsilon": 1e-6,
             "gradient_accumulation_steps": 1, "seed": 42, "simpleoptim": False, "clip": 1.0,
             "logging_steps": 1000, "gpus": "", "eval_criterion": "recall", "pre_model": "Bert",
             "cands_ratio": 1.0, "num_cands": 128, "smoothing_value": 1.0,
             "eval_batchsize": 512, "mention_bsz": 512, "entity_bsz": 512, "exclude_golds": False,
             "type_model": "dual", "num_mention_vecs": 8, "num_entity_vecs": 8,
             "mention_use_codes": False, "entity_use_codes": False, "resume_training": False,
             "fp16": False, "bf16": False, "fp32": False}
RERANKER = {"L": 256, "C": 64, "C_eval": 64, "B": 8, "lr": 2e-5, "warmup_proportion": 0.1,
            "weight_decay": 0.01, "adam_epsilon": 1e-6, "gradient_accumulation_steps": 1,
            "epochs": 3, "logging_steps": 1000, "clip": 1.0, "init": 0.0, "seed": 42,
            "num_workers": 0, "gpus": "", "simpleoptim": False, "eval_method": "macro",
            "type_model": "full", "type_bert": "base", "num_mention_vecs": 8,
            "num_entity_vecs": 8, "mention_use_codes": False, "entity_use_codes": False,
            "inputmark": False, "resume_training": False, "fp16": False, "bf16": False,
            "fp32": False}
# save_candidates: the model's shape comes from the checkpoint unless a flag gives it
CANDIDATES = {"num_cands": 64, "entity_bsz": 512, "mention_bsz": 512, "gpus": "",
              "type_model": None, "pre_model": None, "num_mention_vecs": None,
              "num_entity_vecs": None, "max_len": None, "fp16": False, "bf16": False,
              "fp32": False}


def defaults(module, argv):
    return vars(module.parse_args(argv))


@pytest.mark.parametrize("module, argv, expected", [
    (main_retriever, ["--model", "m.pt", "--data_dir", "d"], RETRIEVER),
    (save_candidates, ["--model", "m.pt", "--data_dir", "d", "--cands_dir", "c"], CANDIDATES),
    (main_reranker, ["--model", "m.pt", "--data", "d", "--cands_dir", "{tmp}"], RERANKER),
])
def test_defaults_are_the_originals(module, argv, expected, tmp_path):
    args = defaults(module, [a.format(tmp=tmp_path) for a in argv])
    assert {k: args[k] for k in expected} == expected


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
