"""The optimizer (docs/DESIGN.md#optimizer): the default is the original's AdamW (transformers
3.1's), checked step by step against the published update; torch's AdamW differs from it where the
gradients are small; --optimizer torch_fused runs or stops with one line; the optimizer's state
survives a checkpoint loaded with weights_only=True."""
import io
import math

import pytest
import torch

import main_reranker
import main_retriever
import training
from cli import UserError

EPS, LR, BETAS = 1e-6, 1e-3, (0.9, 0.999)
# Gradient scales of the parameters: far below eps, near it, and far above.
SCALES = (1e-9, 1e-7, 1e-6, 1e-4, 1.0, 1e3)


def reference_adamw(groups, grads, lrs, betas=BETAS, eps=EPS):
    """The AdamW update of transformers 3.1, transcribed literally from its formula, one element
    at a time in Python floats (double precision). groups: [(params: list of lists of floats,
    weight_decay)]; grads[t][g][i]: the gradient of parameter i of group g at step t (a list of
    floats); lrs[t]: the rate of step t. Returns the parameters after every step."""
    beta1, beta2 = betas
    params = [[list(p) for p in ps] for ps, _ in groups]
    m = [[[0.0] * len(p) for p in ps] for ps in params]
    v = [[[0.0] * len(p) for p in ps] for ps in params]
    for t, (step_grads, lr) in enumerate(zip(grads, lrs), start=1):
        for g, (_, wd) in enumerate(groups):
            for i, p in enumerate(params[g]):
                for j, grad in enumerate(step_grads[g][i]):
                    m[g][i][j] = beta1 * m[g][i][j] + (1 - beta1) * grad
                    v[g][i][j] = beta2 * v[g][i][j] + (1 - beta2) * grad * grad
                    denom = math.sqrt(v[g][i][j]) + eps
                    step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                    p[j] = p[j] - step_size * m[g][i][j] / denom
                    if wd > 0:
                        p[j] = p[j] - lr * wd * p[j]
    return params


def gradient_sequence(steps, shapes, seed=0):
    """grads[t][g][i]: random gradients, parameter i of group g scaled by SCALES[i]."""
    gen = torch.Generator().manual_seed(seed)
    return [[[(torch.randn(n, generator=gen, dtype=torch.float64) * SCALES[i]).tolist()
              for i, n in enumerate(group)] for group in shapes] for _ in range(steps)]


def run_optimizer(make, groups, grads, lrs, dtype):
    """The parameters after each step of the optimizer `make(param_groups)` fed `grads`, the rate
    set to lrs[t] before step t (as the schedule does)."""
    tensors = [[torch.nn.Parameter(torch.tensor(p, dtype=dtype)) for p in ps] for ps, _ in groups]
    opt = make([{"params": ts, "weight_decay": wd} for ts, (_, wd) in zip(tensors, groups)])
    for step_grads, lr in zip(grads, lrs):
        for group, ts, gs in zip(opt.param_groups, tensors, step_grads):
            group["lr"] = lr
            for t, g in zip(ts, gs):
                t.grad = torch.tensor(g, dtype=dtype)
        opt.step()
    return [[t.detach().double().tolist() for t in ts] for ts in tensors]


def problem(steps=8):
    """Two groups (weight decay 0.01 and 0) of parameters whose gradients span SCALES, a rate
    that warms up and decays."""
    gen = torch.Generator().manual_seed(1)
    shapes = [[3] * len(SCALES), [2] * len(SCALES)]
    groups = [([torch.randn(n, generator=gen, dtype=torch.float64).tolist() for n in group], wd)
              for group, wd in zip(shapes, (0.01, 0.0))]
    lrs = [LR * f for f in (0.25, 0.5, 0.75, 1.0, 0.9, 0.8, 0.7, 0.6)[:steps]]
    return groups, gradient_sequence(steps, shapes), lrs


def original(groups):
    return training.OriginalAdamW(groups, lr=LR, eps=EPS)


class PerParameterAdamW(torch.optim.Optimizer):
    """The same update as OriginalAdamW, one parameter at a time with in-place tensor ops (the
    way the original's optimizer was written): the reference its multi-tensor pass must equal
    bit for bit."""

    def __init__(self, params, lr, eps):
        super().__init__(params, dict(lr=lr, betas=BETAS, eps=eps, weight_decay=0.0))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (beta1, beta2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                t = state["step"]
                state["m"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["v"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                p.addcdiv_(state["m"], state["v"].sqrt().add_(group["eps"]), value=-step_size)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-lr * group["weight_decay"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_multi_tensor_pass_equals_the_per_parameter_update_bit_for_bit(dtype):
    """OriginalAdamW updates a group in one torch._foreach_* pass; over 200 steps, with decay on
    (group 0) and off (group 1), and a parameter without a gradient at some steps (its own step
    count), it gives the per-parameter update's values exactly."""
    gen = torch.Generator().manual_seed(3)
    init = [[torch.randn(5, 4, generator=gen, dtype=dtype) for _ in range(3)] for _ in range(2)]
    runs = []
    for make in (training.OriginalAdamW, PerParameterAdamW):
        params = [[torch.nn.Parameter(p.clone()) for p in group] for group in init]
        opt = make([{"params": ps, "weight_decay": wd} for ps, wd in zip(params, (0.01, 0.0))],
                   lr=LR, eps=EPS)
        g = torch.Generator().manual_seed(4)
        for step in range(200):
            for i, group in enumerate(params):
                for j, p in enumerate(group):
                    grad = torch.randn(p.shape, generator=g, dtype=dtype) * SCALES[j % len(SCALES)]
                    p.grad = None if (i, j, step % 7) == (1, 2, 3) else grad
            opt.step()
        runs.append([p.detach() for group in params for p in group])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_original_adamw_is_the_published_update_step_by_step(dtype, tolerance):
    """After each of 8 steps, every parameter equals the literal formula's, to the precision of
    the dtype (relative to the size of the updates)."""
    groups, grads, lrs = problem()
    for steps in range(1, len(lrs) + 1):
        ours = run_optimizer(original, groups, grads[:steps], lrs[:steps], dtype)
        ref = reference_adamw(groups, grads[:steps], lrs[:steps])
        for ours_group, ref_group in zip(ours, ref):
            for a, b in zip(ours_group, ref_group):
                # the parameters moved by about lr per step: compare to that scale
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=tolerance,
                                           atol=tolerance * LR, msg=f"step {steps}")


def first_update(make, scale):
    """The first update of a parameter at 1 with gradient `scale`, no weight decay."""
    groups = [([[1.0]], 0.0)]
    after = run_optimizer(make, groups, [[[[scale]]]], [LR], torch.float64)
    return 1.0 - after[0][0][0]


def test_torch_adamw_differs_where_gradients_are_small():
    """The default must stay the original's: torch's AdamW adds eps after the bias correction,
    so for gradients near eps its first update is several times the original's."""
    torch_adamw = lambda groups: torch.optim.AdamW(groups, lr=LR, eps=EPS)  # noqa: E731
    small = first_update(original, 1e-6) / first_update(torch_adamw, 1e-6)
    assert small < 0.1  # sqrt(1 - b2) / (sqrt(1 - b2) + eps / g) against 1 / (1 + eps / g)
    root = math.sqrt(1 - BETAS[1])  # the first step's sqrt(v) / |g|
    assert small == pytest.approx((root * 1e-6 / (root * 1e-6 + EPS)) / (1e-6 / (1e-6 + EPS)),
                                  rel=1e-9)
    large = first_update(original, 1.0) / first_update(torch_adamw, 1.0)
    assert large == pytest.approx(1.0, abs=1e-4)  # far above eps the two agree


def small_model():
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))


def test_build_optimizer_defaults_to_the_original():
    model = small_model()
    assert type(training.build_optimizer(model, LR, 0.01, EPS)) is training.OriginalAdamW
    assert type(training.build_optimizer(model, LR, 0.01, EPS, optimizer="torch")) is \
        torch.optim.AdamW
    assert type(training.build_optimizer(model, LR, simpleoptim=True)) is torch.optim.Adam
    for module, argv in ((main_retriever, ["--model", "m", "--data_dir", "d"]),
                         (main_reranker, ["--model", "m", "--data", "d", "--cands_dir", "."])):
        assert module.parse_args(argv).optimizer == "original"
        assert module.parse_args(argv + ["--optimizer", "torch_fused"]).optimizer == "torch_fused"


def step_model(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 4, generator=gen)
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()


def test_torch_fused_runs_or_stops_with_one_line():
    """On a CPU with this torch the fused kernel runs and follows torch's AdamW; where it cannot
    (parameters on a device it does not support) the run stops naming the flag."""
    torch.manual_seed(0)
    plain, fused = small_model(), small_model()
    fused.load_state_dict(plain.state_dict())
    opts = [training.build_optimizer(m, LR, 0.01, EPS, optimizer=o)
            for m, o in ((plain, "torch"), (fused, "torch_fused"))]
    assert opts[1].defaults["fused"] is True
    step_model(plain, opts[0], 3, seed=5)
    step_model(fused, opts[1], 3, seed=5)
    for a, b in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(UserError) as e:
        training.build_optimizer(torch.nn.Linear(2, 2, device="meta"), LR,
                                 optimizer="torch_fused")
    message = str(e.value)
    assert message.startswith("--optimizer torch_fused: ") and "\n" not in message


@pytest.mark.parametrize("optimizer", ["original", "torch"])
def test_state_survives_a_weights_only_checkpoint(optimizer):
    """Three steps, the optimizer's state saved in a checkpoint and loaded with weights_only=True
    into a fresh optimizer, three more steps: the same weights as six uninterrupted steps."""
    torch.manual_seed(0)
    whole, resumed = small_model(), small_model()
    resumed.load_state_dict(whole.state_dict())
    opt = training.build_optimizer(whole, LR, 0.01, EPS, optimizer=optimizer)
    step_model(whole, opt, 3, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": whole.state_dict(), "optimizer": opt.state_dict()}, buffer)
    step_model(whole, opt, 3, seed=2)

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(state["model"])
    opt2 = training.build_optimizer(resumed, LR, 0.01, EPS, optimizer=optimizer)
    opt2.load_state_dict(state["optimizer"])
    step_model(resumed, opt2, 3, seed=2)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_doctests():
    import doctest
    assert doctest.testmod(training).failed == 0
