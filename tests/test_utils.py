"""utils: --gpus on a machine with fewer GPUs, the default precision, the schedule, atomic files."""
import os
from unittest import mock

import pytest
import torch

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


def test_precision_defaults():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert utils.amp_dtype(device=cpu) is None
    assert utils.amp_dtype(fp16=True, device=cpu) == torch.bfloat16  # float16 needs CUDA
    assert utils.amp_dtype(fp16=True, device=cuda) == torch.float16
    with mock.patch.object(torch.cuda, "is_bf16_supported", return_value=True):
        assert utils.amp_dtype(device=cuda) == torch.bfloat16        # the GPU default
        assert utils.amp_dtype(device=cuda, fp32=True) is None
    with mock.patch.object(torch.cuda, "is_bf16_supported", return_value=False):
        assert utils.amp_dtype(device=cuda) is None


def test_linear_warmup_then_decay():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = utils.build_scheduler(opt, num_training_steps=10, warmup_proportion=0.2)
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
    opt = utils.build_optimizer(model, lr=1e-3, weight_decay=0.01)
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
