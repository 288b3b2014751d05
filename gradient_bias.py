"""Gradient bias of NCE with random vs hard negatives, on synthetic data.

The synthetic experiment of Zhang & Stratos (NAACL 2021): one dummy input x, labels 1..N with a
peaked population p(y) = softmax(U[0,1) / temp), a model p_theta(y) = softmax(z) trained for a few
Adam steps on the full cross-entropy. After every step we compare the exact cross-entropy gradient
with the gradient of the NCE loss

    NCE(y; y_1..y_K) = -log( exp(z_y) / (exp(z_y) + sum_k exp(z_{y_k})) )

whose K negatives are drawn (gold excluded) from (a) the uniform distribution ("rand") or (b) the
model's own softmax ("hard"), averaged over `monte_carlo` draws per gold label and weighted by p(y):

    bias = || grad CE - grad NCE ||_2      over all model parameters.

The paper's finding: the hard-negative bias falls to about 0.01, the random-negative bias stays
between about 1.5 and 10, and the hard NCE loss tracks the cross-entropy.

Negatives: only labels with p(y) > 0 can change the weighted loss, so only they are gold labels.
By default the K negatives of a draw are distinct (drawn without replacement) and never the gold:
every Monte Carlo draw of every gold label is one row of a (G * mc, N) weight matrix whose gold
column is zeroed, and one `torch.multinomial` call draws all of them. `--replacement` draws them
as the original did: K i.i.d. draws from q itself, the gold included, and a negative that is the
gold is masked out of the NCE softmax afterwards (so such a draw has fewer than K negatives). One
batched log-softmax gives all the NCE losses and one backward pass their gradient; the
`monte_carlo` draws are independent of each other. See docs/DESIGN.md#gradient-bias.

    python gradient_bias.py --out runs/gradient_bias.json --plot docs/figures

As the original, every run also pickles `(entropy, records)` to `--pickle` (default `cukes.p` in the
current folder), which the original's plot.py reads; an existing file there that is not such a
pickle is refused, and `--pickle ''` writes none. The pickle is known as this experiment's by its
content (`is_experiment_pickle`), not by a record beside it: its default home is the user's
working folder, and a `cukes.p` of the original's main.py is the same experiment's file. `--out`
and the figures are recorded in their folder's record (run_safety.Outputs): a file there that an
earlier run of this script did not write is refused unless `--overwrite`.
"""

import json
import math
import os
import pickle
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from cli import ArgumentParser, check_flag, check_range, die
from run_safety import Outputs, main as cli_main

# Rows of the (rows, N) weight matrix sampled at once: bounds the memory of `draw_negatives`
# to about 64 MB of float32 whatever N and monte_carlo are.
SAMPLE_ELEMENTS = 1 << 24


def population(num_labels, support, temp):
    """The population p(y) = softmax(U[0,1) / temp), on the first `support` labels (-1: all), as
    the original.

    >>> p = population(10, 3, 0.1); p.nonzero().view(-1).tolist(), round(p.sum().item(), 5)
    ([0, 1, 2], 1.0)
    """
    u = torch.rand(num_labels)  # (N,)
    logits = (u - u.max()) / temp  # the same softmax as u / temp, and no overflow for a tiny temp
    if 0 < support < num_labels:
        logits[support:] = -math.inf
    return logits.softmax(0)


def entropy(p):
    """H(p) = -sum_y p(y) log p(y), with 0 log 0 = 0."""
    return -torch.special.xlogy(p, p).sum().item()


class MLPScorer(nn.Module):
    """Dummy input embedding (dim) -> Linear(dim, dim) -> ReLU -> Linear(dim, N): logits z (N,)."""

    def __init__(self, num_labels, dim):
        super().__init__()
        self.input = nn.Embedding(1, dim)
        self.hidden = nn.Linear(dim, dim)
        self.output = nn.Linear(dim, num_labels)

    def forward(self):
        x = self.input.weight[0]  # (dim,)
        return self.output(torch.relu(self.hidden(x)))  # (N,)


class LogitScorer(nn.Module):
    """A free logit vector z (N,) (`--dim -1`), initialised N(0, 1) as the original."""

    def __init__(self, num_labels):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(num_labels))

    def forward(self):
        return self.logits


def make_model(num_labels, dim):
    """The MLP scorer of hidden size `dim`, or free logits for `dim` -1 (the original's switch)."""
    return LogitScorer(num_labels) if dim == -1 else MLPScorer(num_labels, dim)


def cross_entropy(logits, p):
    """Population cross-entropy sum_y p(y) (-log softmax(z)_y); logits (N,), p (N,)."""
    return -(p * logits.log_softmax(0)).sum()


def draw_negatives(weights, gold, num_negatives, monte_carlo, replacement):
    """K negatives for every gold label and Monte Carlo draw from `weights`.

    weights: (N,) non-negative sampling weights q (need not sum to 1); gold: (G,) gold labels.
    Returns a long tensor (G, monte_carlo, K). Without `replacement` the K negatives of a row are
    distinct and row [i, m] never contains gold[i]: they are drawn with the gold's weight zeroed
    (memory: the (rows, N) weight matrix is built in chunks of at most SAMPLE_ELEMENTS floats).
    With `replacement`, as the original: K independent draws from q itself, the gold included
    (nce_loss masks a negative that is the gold).

    >>> neg = draw_negatives(torch.ones(5), torch.arange(5), 2, 3, replacement=False)
    >>> neg.shape, any((neg[y] == y).any().item() for y in range(5))
    (torch.Size([5, 3, 2]), False)
    """
    n = weights.numel()
    weights = weights.detach().float()
    if replacement:
        draws = torch.multinomial(weights, gold.numel() * monte_carlo * num_negatives,
                                  replacement=True)
        return draws.view(gold.numel(), monte_carlo, num_negatives)
    rows = gold.repeat_interleave(monte_carlo)  # (G * mc,) the gold label of each row
    chunk = max(1, SAMPLE_ELEMENTS // n)
    parts = []
    for start in range(0, rows.numel(), chunk):
        golds = rows[start:start + chunk]
        w = weights.expand(golds.numel(), n).clone()  # (rows, N)
        w[torch.arange(golds.numel()), golds] = 0.0  # the gold is never its own negative
        parts.append(torch.multinomial(w, num_negatives))  # (rows, K) distinct
    return torch.cat(parts).view(gold.numel(), monte_carlo, num_negatives)


def nce_loss(logits, p, gold, negatives):
    """sum_y p(y) mean_m NCE(y; negatives[y, m]), all (y, m) in one batched log-softmax.

    logits: (N,) scores z; p: (N,) population; gold: (G,) the labels summed over (those with
    p(y) > 0 suffice: the others add exactly nothing); negatives: (G, mc, K) label indices. A
    negative that is its row's gold (drawn with --replacement) is masked out of the softmax.
    """
    monte_carlo = negatives.shape[1]
    golds = gold.view(-1, 1, 1).expand(-1, monte_carlo, 1)  # (G, mc, 1)
    scores = logits[torch.cat([golds, negatives], dim=2)]  # (G, mc, 1 + K), gold first
    is_gold = torch.cat([torch.zeros_like(golds, dtype=torch.bool), negatives == golds], dim=2)
    nll = -scores.masked_fill(is_gold, -math.inf).log_softmax(-1)[..., 0]  # (G, mc)
    return (p[gold] * nll.mean(1)).sum()


def nce_loss_loop(logits, p, gold, negatives):
    """The same loss as `nce_loss`, one label and one Monte Carlo draw at a time (the original's way).

    Kept as the reference that `nce_loss` is tested and timed against.
    """
    monte_carlo = negatives.shape[1]
    total = logits.new_zeros(())
    for i, y in enumerate(gold.tolist()):
        for m in range(monte_carlo):
            kept = [k for k in negatives[i, m].tolist() if k != y]  # the gold is masked
            scores = torch.cat([logits[y:y + 1], logits[kept]])  # (1 + K,) or fewer
            total = total - p[y] * scores.log_softmax(0)[0] / monte_carlo
    return total


def gradient(loss, params):
    """d loss / d params, flattened into one vector."""
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    return torch.cat([g.reshape(-1) for g in grads])


def measure(model, p, gold, num_negatives, monte_carlo, replacement, loss_fn=nce_loss):
    """Cross-entropy, random and hard NCE losses and their gradient biases for the current model.

    Returns ({"xent", "rand", "hard", "diff_rand", "diff_hard"}, seconds spent in `loss_fn` and
    its gradients, excluding the sampling).
    """
    params = [q for q in model.parameters() if q.requires_grad]
    logits = model()  # (N,)
    if not torch.isfinite(logits).all():
        die("--lr: the model diverged (its scores are no longer finite numbers); lower --lr")
    xent = cross_entropy(logits, p)
    grad_xent = gradient(xent, params)
    record = {"xent": xent.item(), "rand": None, "hard": None}  # the original's key order
    seconds = 0.0
    samplers = {"rand": torch.ones_like(logits), "hard": logits.detach().softmax(0)}
    for name, weights in samplers.items():
        negatives = draw_negatives(weights, gold, num_negatives, monte_carlo, replacement)
        start = time.perf_counter()
        loss = loss_fn(logits, p, gold, negatives)
        grad = gradient(loss, params)
        seconds += time.perf_counter() - start
        record[name] = loss.item()
        record["diff_" + name] = (grad_xent - grad).norm().item()
    return record, seconds


def run(args):
    """Train for args.steps Adam steps and measure after each. Returns the JSON-ready result."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    p = population(args.num_labels, args.support, args.temp)  # (N,)
    gold = p.nonzero().view(-1)  # (G,) the labels with p(y) > 0: the others add exactly nothing
    replacement = args.replacement
    model = make_model(args.num_labels, args.dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    records = []
    times = {"vectorised": [], "reference_loop": []}  # seconds per step in NCE losses + gradients
    start = time.perf_counter()
    for step in tqdm(range(1, args.steps + 1), desc="steps", disable=args.quiet):
        labels = torch.multinomial(p, args.batch_size, replacement=True)  # (B,) drawn from p
        logits = model()
        loss = F.cross_entropy(logits.expand(args.batch_size, -1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        rng = torch.get_rng_state()
        record, seconds = measure(model, p, gold, args.num_negatives, args.monte_carlo,
                                  replacement)
        times["vectorised"].append(seconds)
        if args.reference_loop:  # the same draws, the per-label loop, timed side by side
            after = torch.get_rng_state()
            torch.set_rng_state(rng)
            reference, seconds = measure(model, p, gold, args.num_negatives, args.monte_carlo,
                                         replacement, loss_fn=nce_loss_loop)
            times["reference_loop"].append(seconds)
            for key in reference:
                if not math.isclose(reference[key], record[key], rel_tol=1e-4, abs_tol=1e-5):
                    raise AssertionError(f"step {step}: {key} vectorised {record[key]} "
                                         f"!= reference loop {reference[key]}")
            torch.set_rng_state(after)
        records.append({"loss_avg": loss.item(), **record})  # the step's loss, as the original
    timing = {"total": time.perf_counter() - start, "vectorised": sum(times["vectorised"])}
    if args.reference_loop:  # medians per step: robust to a step slowed by something else
        timing["reference_loop"] = sum(times["reference_loop"])
        timing["speedup"] = (statistics.median(times["reference_loop"])
                             / statistics.median(times["vectorised"]))
    return {"entropy": entropy(p), "records": records, "seconds": timing, "args": vars(args)}


# The record keys the original's plot.py reads from the pickle
PLOT_KEYS = ("xent", "rand", "hard", "diff_rand", "diff_hard")


def pickled(result):
    """What the original pickled: (entropy H(p) as a float, the list of per-step record dicts)."""
    return (result["entropy"], result["records"])


class _PlainUnpickler(pickle.Unpickler):
    """Reads pickles of plain values only (numbers, strings, lists, tuples, dicts): a file that
    names any class or function is refused, so reading it runs none of its code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"{module}.{name} is not a plain value")


def is_experiment_pickle(path):
    """Whether `path` holds a pickle of this experiment: `(entropy, records)` as the original's
    main.py and this script write it, or the result dict this script pickled before."""
    try:
        with open(path, "rb") as f:
            data = _PlainUnpickler(f).load()
    except Exception:  # not a pickle, a pickle of anything but plain values, unreadable
        return False
    if isinstance(data, dict):
        data = (data.get("entropy"), data.get("records"))
    return (isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], float)
            and isinstance(data[1], list)
            and all(isinstance(r, dict) and set(PLOT_KEYS) <= set(r) for r in data[1]))


def format_table(result):
    """The per-step records as a fixed-width text table."""
    keys = ["loss_avg", "xent", "rand", "hard", "diff_rand", "diff_hard"]
    lines = [f"entropy H(p) = {result['entropy']:.4f}",
             f"{'step':>4} " + " ".join(f"{k:>10}" for k in keys)]
    for step, record in enumerate(result["records"], 1):
        lines.append(f"{step:>4} " + " ".join(f"{record[k]:>10.4f}" for k in keys))
    return "\n".join(lines)


FIGURES = ("gradient_bias_loss.png", "gradient_bias_bias.png")


def plot(result, folder, outputs):
    """Draw FIGURES into `folder` through `outputs` (run_safety.Outputs); returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(result["records"]) + 1)
    series = lambda key: [r[key] for r in result["records"]]  # noqa: E731
    paths = []
    wide = {"linewidth": 4, "alpha": 0.4}  # the cross-entropy under the hard NCE line it meets
    figures = [
        (FIGURES[0], "loss",
         [("xent", "cross-entropy", wide), ("rand", "random NCE", {}), ("hard", "hard NCE", {})],
         False),
        (FIGURES[1], "gradient bias  ||grad CE - grad NCE||",
         [("diff_rand", "random negatives", {}), ("diff_hard", "hard negatives", {})], True),
    ]
    for name, ylabel, lines, log in figures:
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        for key, label, style in lines:
            ax.plot(steps, series(key), marker=".", label=label, **style)
        if not log:
            ax.axhline(result["entropy"], color="gray", linestyle="--", label="entropy H(p)")
        else:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(folder, name)
        outputs.write(path, lambda f: fig.savefig(f, format="png"))
        plt.close(fig)
        paths.append(path)
    return paths


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_labels", type=int, default=1000)
    parser.add_argument("--support", type=int, default=-1,
                        help="p(y) > 0 on the first this many labels (-1: all)")
    parser.add_argument("--temp", type=float, default=0.001,
                        help="temperature of the population softmax(U[0,1) / temp)")
    parser.add_argument("--num_negatives", type=int, default=4, help="K negatives per draw")
    parser.add_argument("--replacement", action="store_true",
                        help="draw the K negatives of a draw with replacement from q itself and "
                             "mask those that are the gold, as the original (default: K distinct "
                             "negatives other than the gold, which gives the published curves)")
    parser.add_argument("--monte_carlo", type=int, default=10,
                        help="independent draws of K negatives per gold label")
    parser.add_argument("--dim", type=int, default=300,
                        help="hidden size of the MLP scorer (embedding -> Linear -> ReLU -> "
                             "Linear); -1: a free logit vector, initialised N(0, 1)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", help="write the records here as JSON")
    parser.add_argument("--pickle", metavar="PATH", default="cukes.p",
                        help="pickle (entropy, records) here, as the original, whose plot.py reads "
                             "it (default: cukes.p in the current folder; '': none). An existing "
                             "file that is not such a pickle is refused")
    parser.add_argument("--plot", metavar="DIR", help="draw the loss and bias figures (PNG) here")
    parser.add_argument("--reference_loop", action="store_true",
                        help="also compute every NCE loss with the per-label loop on the same "
                             "draws, check it agrees and report the speed-up")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's default). The tensors here are "
                             "small: more threads mostly add synchronisation, and on a busy "
                             "machine make the run several times slower")
    parser.add_argument("--quiet", action="store_true",
                        help="print nothing but errors (no progress bar, no table)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files at --out and --plot that an earlier run of this "
                             "script did not write, and a --pickle file of anything else")
    args = parser.parse_args(argv)
    check_args(args)
    outputs(args)  # every output checked writable before any work
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            die("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    return args


# torch.multinomial draws from at most this many categories
MAX_LABELS = 2 ** 24


def check_args(args):
    """Every numeric flag within the range the experiment can run with, before any work: one
    line naming the first that is not. Floats must hold as float32 numbers (the experiment
    computes in float32: --temp 1e-300 is 0 there), and the whole run must fit in this machine's
    memory (memory_needed)."""
    for flag, lowest, highest, why in [
            ("num_labels", 2, MAX_LABELS, ", torch.multinomial's limit"),
            ("num_negatives", 1, None, ""), ("monte_carlo", 1, None, ""), ("steps", 1, None, ""),
            ("batch_size", 1, None, ""),
            ("threads", 0, os.cpu_count() or 1, ", the cores of this machine"),
            ("seed", -2 ** 63, 2 ** 64 - 1, ", torch.manual_seed's range")]:
        check_range(getattr(args, flag), f"--{flag}", lowest, highest, why)
    check_flag(args.dim == -1 or args.dim >= 1, "--dim",
               f"must be -1 (free logits) or at least 1 (got {args.dim})")
    check_flag(args.support == -1 or 1 <= args.support <= args.num_labels, "--support",
               f"must be -1 (all labels) or between 1 and --num_labels ({args.num_labels}) "
               f"(got {args.support})")
    for flag in ("temp", "lr"):
        value = getattr(args, flag)
        as_float32 = torch.tensor(value, dtype=torch.float32).item()
        check_flag(value > 0 and as_float32 > 0 and math.isfinite(as_float32), f"--{flag}",
                   f"must be a positive number that float32 holds (got {value})")
    check_flag(args.replacement or args.num_negatives < args.num_labels, "--num_negatives",
               f"({args.num_negatives}) must be below --num_labels ({args.num_labels}) to draw "
               f"distinct negatives other than the gold; use --replacement to draw with "
               f"replacement")
    needed, available = memory_needed(args), physical_memory()
    check_flag(available is None or needed <= available, "--num_labels",
               f"{args.num_labels} labels with --dim {args.dim}, --batch_size {args.batch_size} "
               f"and --monte_carlo {args.monte_carlo} need about {needed / 2 ** 30:.1f} GiB, "
               f"more than this machine's {(available or 0) / 2 ** 30:.1f} GiB")


def memory_needed(args):
    """Bytes the run holds at its peak, roughly (float32 values, int64 indices): the scorer's
    parameters with their gradients and Adam's two moments, the training batch's (B, N)
    log-softmax and its gradient, and per sampler the (G, mc, K) negatives and the
    (G, mc, 1 + K) scores with their log-softmax and gradient (G: the labels with p(y) > 0),
    and the chunks the negatives are drawn from (SAMPLE_ELEMENTS)."""
    n, d = args.num_labels, args.dim
    params = n if d == -1 else d + d * d + d + d * n + n
    draws = (n if args.support == -1 else args.support) * args.monte_carlo
    per_sampler = 8 * draws * args.num_negatives + 3 * 4 * draws * (1 + args.num_negatives)
    return 4 * 4 * params + 2 * 4 * args.batch_size * n + 2 * per_sampler + 4 * SAMPLE_ELEMENTS


def physical_memory():
    """This machine's memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def outputs(args):
    """The run's files (run_safety.Outputs), each checked writable: --out (JSON), --pickle
    (owned by its content, is_experiment_pickle) and the --plot figures. One file named by two
    of them stops the run."""
    planned = Outputs("gradient_bias", args.overwrite, flag="--out")
    if args.out:
        planned.add(args.out, "--out")
    if args.pickle:
        planned.add(args.pickle, "--pickle", own=is_experiment_pickle)
    for name in FIGURES if args.plot else ():
        planned.add(os.path.join(args.plot, name), "--plot")
    return planned


@cli_main
def main(argv=None):
    args = parse_args(argv)
    files = outputs(args)
    files.claim({"tool": "gradient_bias"})  # an earlier run's files are replaced, no one else's
    result = run(args)
    say = (lambda *a, **k: None) if args.quiet else print  # --quiet: nothing but errors
    say(format_table(result))
    timing = result["seconds"]
    line = (f"time: {timing['total']:.1f} s in all; NCE losses and gradients "
            f"{timing['vectorised']:.2f} s vectorised")
    if args.reference_loop:
        line += (f", {timing['reference_loop']:.2f} s per-label loop on the same draws "
                 f"(speed-up x{timing['speedup']:.0f}, median per step)")
    say(line)
    files.start()
    if args.out:
        files.write_json(result, args.out)
        say(f"wrote {args.out}")
    if args.pickle:
        files.write(args.pickle, lambda f: pickle.dump(pickled(result), f))  # plot.py reads it
        say(f"wrote {args.pickle}")
    if args.plot:
        for path in plot(result, args.plot, files):
            say(f"wrote {path}")


if __name__ == "__main__":
    main()
