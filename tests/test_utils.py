"""utils: --gpus on a machine with fewer GPUs, the precision, the tie rule, the schedule, logs."""
import os
from unittest import mock

import pytest
import torch

import cli
import training
import utils


@pytest.mark.parametrize("gpus, count, expected", [
    ("3,4,5,7", 1, None),      # the released command line on one GPU: use the machine's GPU
    ("0,3", 1, "0"),           # keep the ids that exist
    ("0,1", 4, "0,1"),
    ("3,4,5,7", -1, "3,4,5,7"),  # no driver to ask: do as asked
])
def test_usable_gpus(gpus, count, expected):
    with mock.patch.object(torch.cuda, "_raw_device_count_nvml", return_value=count):
        assert utils.usable_gpus(gpus) == expected


@pytest.mark.parametrize("flag", [None, "fp16", "bf16", "fp32"])
@pytest.mark.parametrize("bf16_supported", [True, False])
def test_precision_chosen_on_cuda_and_cpu(flag, bf16_supported):
    """float32 (None) unless --fp16 / --bf16 asks, on every device; a CUDA device is not needed."""
    flags = {flag: True} if flag else {}
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with mock.patch.object(torch.cuda, "is_bf16_supported", return_value=bf16_supported):
        on_cpu = utils.amp_dtype(device=cpu, **flags)
        if flag == "bf16" and not bf16_supported:
            with pytest.raises(cli.UserError, match="--bf16"):
                utils.amp_dtype(device=cuda, **flags)
            on_cuda = "stops"
        else:
            on_cuda = utils.amp_dtype(device=cuda, **flags)
    expected = {None: (None, None), "fp32": (None, None),
                "fp16": (torch.bfloat16, torch.float16),     # float16 autocast needs CUDA
                "bf16": (torch.bfloat16, torch.bfloat16 if bf16_supported else "stops")}[flag]
    assert (on_cpu, on_cuda) == expected


def test_precision_flags_are_mutually_exclusive(capsys):
    parser = cli.ArgumentParser()
    cli.add_precision_args(parser)
    assert vars(parser.parse_args([])) == {"fp16": False, "bf16": False, "fp32": False}
    for a, b in (("--fp16", "--fp32"), ("--fp16", "--bf16"), ("--bf16", "--fp32")):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([a, b])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith("error: argument ") and a in err and b in err, err


def test_best_checkpoint_tie_rule():
    # the retriever keeps the later epoch on a tie, the reranker the earlier one
    assert training.improved(90.0, 90.0, ties_replace=True)
    assert not training.improved(90.0, 90.0, ties_replace=False)
    for ties_replace in (True, False):
        assert training.improved(90.5, 90.0, ties_replace)
        assert not training.improved(89.5, 90.0, ties_replace)
        assert training.improved(0.0, float("-inf"), ties_replace)


def test_linear_warmup_then_decay():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = training.build_scheduler(opt, num_training_steps=10, warmup_proportion=0.2)
    rates = []
    for _ in range(10):
        rates.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert rates == pytest.approx([0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_no_decay_for_biases_and_layer_norm():
    from transformers import BertConfig, BertModel
    model = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=16))
    opt = training.build_optimizer(model, lr=1e-3, weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.01 and opt.param_groups[1]["weight_decay"] == 0.0
    assert decayed and not any("bias" in n or "LayerNorm" in n for n in decayed)


def test_log_never_overwrites(tmp_path):
    model = str(tmp_path / "run.pt")
    first = utils.get_logger(model).log_path
    second = utils.get_logger(model).log_path
    assert first.endswith("run.pt.log") and second.endswith("run.pt.log.1")
    assert os.path.isfile(first) and os.path.isfile(second)
