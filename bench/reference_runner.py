"""Run the 2021 code's retriever through its harness, with two additions (bench/side_by_side.md).

    ORIG_BERT=BERT_DIR VENV2021/bin/python bench/reference_runner.py REFERENCE_DIR \\
        main_retriever.py --model ... [the 2021 script's flags]

REFERENCE_DIR is the authors' 2021 folder; its harness/run_2021.py does the loading (hub names
redirected to ORIG_BERT, transformers 3.1's AdamW). Run with that venv's python (transformers 4.57),
never ours. Nothing in our code imports this file.

1. Padding: transformers 4.57 accepts `encode_plus(..., pad_to_max_length=True)` but no longer
   pads, so a window shorter than max_len would make the 2021 code's batches ragged. Here that
   flag is turned into `padding="max_length"`, which is what it meant in 2020.
2. With SBS_DRAWS=FILE, every random negative the 2021 dataset draws is written to FILE (JSON) at
   exit: per epoch, in visit order, the mention's index, its gold's document id, the drawn
   entities' document ids and their positions in the pool of all entities but the gold (the
   numbers `random.sample` picked). The train entities' document ids in the 2021 code's index
   order come with them, and each epoch's mined hard negatives (entity indices, per mention in
   file order). The draws themselves are untouched: `random.sample` is wrapped, not replaced.
"""
import atexit
import json
import os
import random
import runpy
import sys


def pad_like_2020():
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    encode_plus = PreTrainedTokenizerBase.encode_plus

    def padded(self, *args, pad_to_max_length=False, **kwargs):
        if pad_to_max_length and "padding" not in kwargs:
            kwargs["padding"] = "max_length"
        return encode_plus(self, *args, **kwargs)
    PreTrainedTokenizerBase.encode_plus = padded


def record_draws(path):
    """Wrap random.seed and random.sample to log the dataset's draws to `path` at exit."""
    record = {"entities": None, "epochs": [], "hard": []}
    seed, sample = random.seed, random.sample

    def seed_hook(*args, **kwargs):
        # the dataset re-seeds in its __init__, once per epoch: a new epoch of draws begins
        frame = sys._getframe(1)
        if frame.f_code.co_name == "__init__":
            record["epochs"].append([])
            record["hard"].append(frame.f_locals.get("candidates"))
        return seed(*args, **kwargs)

    def sample_hook(population, k, **kwargs):
        out = sample(population, k, **kwargs)
        frame = sys._getframe(1)
        local = frame.f_locals
        if frame.f_code.co_name == "__getitem__" and "target_idx" in local:
            ids = list(local["self"].all_entity_indices)  # document ids in index order
            if record["entities"] is None:
                record["entities"] = ids
            t = local["target_idx"]
            record["epochs"][-1].append({
                "mention": int(local["index"]), "gold": ids[t],
                "drawn": [ids[e] for e in out], "positions": [e - (e > t) for e in out]})
        return out

    random.seed, random.sample = seed_hook, sample_hook

    def write():
        with open(path, "w") as f:
            json.dump(record, f)
    atexit.register(write)


def main():
    reference, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    pad_like_2020()
    if os.environ.get("SBS_DRAWS"):
        record_draws(os.environ["SBS_DRAWS"])
    harness = os.path.join(reference, "harness", "run_2021.py")
    sys.argv = [harness, os.path.join(reference, script), *args]
    runpy.run_path(harness, run_name="__main__")


if __name__ == "__main__":
    main()
