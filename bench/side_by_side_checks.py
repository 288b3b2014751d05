"""What bench/side_by_side.py compares, checked to be the same in both codes (bench/side_by_side.md).

    python bench/side_by_side_checks.py --reference REFERENCE_DIR \\
        --python2021 VENV2021/bin/python --out /tmp/sbs [--seed 1]

On the data of side_by_side.py (OUT/data, OUT/bert, written if missing):
1. weights: the retriever each code builds from OUT/bert before training, parameter by parameter;
2. windows: the token ids and masks of every train and test entity window (matched by document
   id) and mention window (in file order), and each mention's gold;
3. stream (--seed S): one run of each code with side_by_side.py's flags and seed S, ours as it
   comes (no --random_negatives), recording every random negative drawn: per epoch and visit
   position, the numbers drawn (positions in the pool of all entities but the gold) and the
   entities (as document ids) given to that position's mention; and the hard negatives both
   codes mine before epoch 1 (from the same untrained model), shown but not required to agree
   (the 2021 code's topk may order tied scores otherwise).
The 2021 side runs in --python2021 with the 2021 folder on its path, writing what it built to
OUT/checks; the comparisons run here.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

# Run by --python2021: the 2021 code's model and windows, saved to OUT
# (argv: REF DATA BERT OUT MAX_LEN BENCH_DIR).
REFERENCE_SIDE = r"""
import sys, torch
ref, data, bert, out, max_len = sys.argv[1:6]
sys.path[:0] = [ref, sys.argv[6]]
from reference_runner import pad_like_2020
pad_like_2020()
from transformers import BertModel, BertTokenizer
from retriever import UnifiedRetriever
from data_retriever import MentionSet, load_data, transform_entities
max_len = int(max_len)
tok = BertTokenizer.from_pretrained(bert)
model = UnifiedRetriever(BertModel.from_pretrained(bert), torch.device("cpu"), 32, 32, False,
                         False, "hard_attention", None, False)
loaded = load_data(data)
saved = {"state": model.state_dict()}
for split, mentions, doc in (("train", loaded[0], loaded[5]), ("test", loaded[4], loaded[10])):
    ids, masks = transform_entities(doc, max_len, tok)
    items = [MentionSet(tok, mentions, doc, max_len)[i] for i in range(len(mentions))]
    saved[split] = {"doc_ids": list(doc), "entity_ids": torch.tensor(ids),
                    "entity_mask": torch.tensor(masks),
                    "mention_ids": torch.stack([x[0] for x in items]),
                    "mention_mask": torch.stack([x[1] for x in items]),
                    "golds": torch.cat([x[2] for x in items])}
torch.save(saved, out)
"""


def reference_side(args, data, bert, max_len=32):
    out = os.path.join(args.out, "checks", "reference_side.pt")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    subprocess.run([args.python2021, "-c", REFERENCE_SIDE, args.reference, data, bert, out,
                    str(max_len), os.path.join(ROOT, "bench")], check=True, env=env,
                   cwd=os.path.dirname(out))
    import torch
    return torch.load(out, weights_only=True)


def compare_weights(ref_state, model):
    """Lines saying whether each parameter and buffer of both retrievers is equal."""
    ours = model.state_dict()
    lines = []
    only_ref, only_ours = sorted(set(ref_state) - set(ours)), sorted(set(ours) - set(ref_state))
    both = sorted(set(ref_state) & set(ours))
    differ = [k for k in both if ref_state[k].shape != ours[k].shape
              or not (ref_state[k].to(ours[k].dtype) == ours[k]).all()]
    params = dict(model.named_parameters())
    lines.append(f"weights: {len(both)} tensors in both ({sum(k in params for k in both)} "
                 f"parameters), {len(differ)} differ{': ' + ', '.join(differ) if differ else ''}")
    if only_ref or only_ours:
        lines.append(f"  only in the 2021 model: {only_ref or 'none'}; only in ours: "
                     f"{only_ours or 'none'}")
    # the 2021 model also keeps BERT's pooler, which its scores never use (last hidden states)
    return lines, not differ and not only_ours


def compare_windows(ref, ours, split):
    """Lines comparing one split's windows: entities matched by document id."""
    import torch
    doc_ids = ours.entities.doc_ids
    order = [ref["doc_ids"].index(d) for d in doc_ids]  # 2021 index of our entity i
    same_order = order == list(range(len(order)))
    checks = {
        "entity ids": (ref["entity_ids"][order], ours.entity_ids.long()),
        "entity masks": (ref["entity_mask"][order], ours.entity_mask.long()),
        "mention ids": (ref["mention_ids"], ours.mention_ids.long()),
        "mention masks": (ref["mention_mask"], ours.mention_mask.long()),
        "golds (by document id)": (torch.tensor([doc_ids.index(ref["doc_ids"][g])
                                                 for g in ref["golds"].tolist()]), ours.golds)}
    rows = []
    ok = True
    for name, (a, b) in checks.items():
        same = a.shape == b.shape and bool((a == b).all())
        rows.append(f"{name} {'equal' if same else 'DIFFER'}")
        ok &= same
    return [f"{split}: {len(doc_ids)} entities (2021 index order = ours: {same_order}), "
            f"{ours.golds.shape[0]} mentions: " + ", ".join(rows)], ok


def record_ours(path, argv):
    """Run our main_retriever.main(argv), recording each batch's random negatives to `path`."""
    import retriever
    from main_retriever import main as train
    epochs, hard, last = [], [], [None]
    batch = retriever.EpochNegatives.batch

    def recorded(self, mentions, stream, rank=0, world_size=1):
        c = batch(self, mentions, stream, rank, world_size)  # retriever.BatchCandidates
        if stream is not last[0]:  # a new stream: a new epoch
            last[0] = stream
            epochs.append([])
            hard.append(None if self.hard is None else self.hard.tolist())
        golds = self.golds[c.mentions]
        cands = c.entities[c.index]  # (b, 1 + C) entity ids, gold first (no in-batch negatives)
        drawn = cands[:, 1:1 + self.num_rands]
        positions = drawn - (drawn > golds[:, None]).long()
        for m, g, d, j in zip(c.mentions.tolist(), golds.tolist(), drawn.tolist(),
                              positions.tolist()):
            epochs[-1].append({"mention": m, "gold": g, "drawn": d, "positions": j})
        return c
    retriever.EpochNegatives.batch = recorded
    try:
        train(argv)
    finally:
        with open(path, "w") as f:
            json.dump({"epochs": epochs, "hard": hard}, f)


def check_stream(args, data, bert, epochs=(1, 2, 3)):
    """Run both codes once with --seed args.seed, recording their random negatives; lines
    comparing them position by position."""
    from data_loader import Zeshel
    from side_by_side import ENV, FLAGS, reference_command
    folder = os.path.join(args.out, "checks", f"stream-s{args.seed}")
    os.makedirs(folder, exist_ok=True)
    env = {**os.environ, **ENV}
    common = ["--data_dir", data, *FLAGS, "--seed", str(args.seed)]
    runs = {"2021": reference_command(args),
            "ours": [sys.executable, os.path.abspath(__file__), "--record"]}
    for code, cmd in runs.items():
        model = os.path.join(folder, f"{code}.pt")
        for stale in (model, model + ".log", model + ".results.json", model + ".last"):
            if os.path.exists(stale):
                os.remove(stale)
        record = os.path.join(folder, f"draws_{code}.json")
        extra = ["--pretrained", bert, "--quiet"] if code == "ours" else []
        run_env = {**env, "ORIG_BERT": bert, "SBS_DRAWS": record}
        with open(os.path.join(folder, f"{code}.txt"), "w") as out:
            subprocess.run([*cmd, "--model", model, *common, *extra], env=run_env, cwd=folder,
                           stdout=out, stderr=subprocess.STDOUT, check=True)
    with open(os.path.join(folder, "draws_2021.json")) as f:
        ref = json.load(f)
    with open(os.path.join(folder, "draws_ours.json")) as f:
        ours = json.load(f)
    our_ids = Zeshel(data, ("train",)).entities("train").doc_ids
    ref_index = {d: i for i, d in enumerate(ref["entities"])}
    lines = [f"stream, seed {args.seed}: 2021 entity order = ours: {ref['entities'] == our_ids}"]
    ok = True
    for e in epochs:
        a, b = ref["epochs"][e - 1], ours["epochs"][e - 1]
        n = min(len(a), len(b))
        same_numbers = sum(x["positions"] == y["positions"] for x, y in zip(a, b))
        # what the 2021 code deals to our visited mention, by document id
        same_docs = 0
        for x, y in zip(a, b):
            t = ref_index[our_ids[y["gold"]]]
            dealt = [ref["entities"][j + (j >= t)] for j in x["positions"]]
            same_docs += dealt == [our_ids[i] for i in y["drawn"]]
        same_mention = sum(x["mention"] == y["mention"] for x, y in zip(a, b))
        lines.append(f"  epoch {e}: {len(a)} positions (2021) / {len(b)} (ours); numbers drawn "
                     f"equal at {same_numbers} of {n}; entities (document ids) equal at "
                     f"{same_docs} of {n} once mapped to our visit order; the same mention "
                     f"visited at {same_mention} of {n} positions")
        ok &= len(a) == len(b) == same_numbers == same_docs
    # epoch 1's hard negatives come from the same untrained model in both codes
    a = [[ref["entities"][i] for i in row] for row in ref["hard"][0]]
    b = [[our_ids[i] for i in row] for row in ours["hard"][0]]
    lines.append(f"  hard negatives mined before epoch 1 (untrained model): equal lists at "
                 f"{sum(x == y for x, y in zip(a, b))} of {len(b)} mentions, equal sets at "
                 f"{sum(set(x) == set(y) for x, y in zip(a, b))}")
    if len(ref["epochs"]) > 1:
        repeat = sum(x["positions"] == y["positions"] for x, y in zip(*ref["epochs"][:2]))
        lines.append(f"  2021 code, epoch 2 against epoch 1: numbers drawn equal at {repeat} of "
                     f"{len(ref['epochs'][0])} positions")
    return lines, ok


def main(argv=None):
    from side_by_side import comparison_world
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True)
    p.add_argument("--python2021", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1, help="the seed of the stream check")
    p.add_argument("--no_stream", action="store_true", help="skip the stream check")
    args = p.parse_args(argv)
    args.out = os.path.abspath(args.out)
    data, bert = comparison_world(args.out)
    from data_loader import Zeshel
    from retriever import encode_retriever_split, load_retriever
    ref = reference_side(args, data, bert)
    tokenizer, model = load_retriever(bert, "sum_max", 32, 32)
    lines, ok = compare_weights(ref["state"], model)
    zeshel = Zeshel(data, ("train", "test"))
    for split in ("train", "test"):
        more, same = compare_windows(ref[split], encode_retriever_split(tokenizer, zeshel, split,
                                                                        32), split)
        lines += more
        ok &= same
    if not args.no_stream:
        more, same = check_stream(args, data, bert)
        lines += more
        ok &= same
    print("\n".join(lines))
    print("all equal" if ok else "SOMETHING DIFFERS")
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--record"]:  # check_stream's run of ours: SBS_DRAWS names the record
        record_ours(os.environ["SBS_DRAWS"], sys.argv[2:])
    else:
        sys.exit(main())
