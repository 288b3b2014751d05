"""The bundled toy world: a small Zeshel-format folder and a tiny BERT, built offline in seconds.

    python toy_world.py OUT_DIR        # writes OUT_DIR/data (Zeshel layout) and OUT_DIR/bert

Each world has entities whose names repeat ("Zorbik (knight)", "Zorbik (river)"), so that the
name alone cannot tell them apart: only the words around a mention, which are drawn from its
entity's own topic words, do. Train, val and test worlds are disjoint (zero-shot, as Zeshel).
The tiny BERT (random weights from a config) has a word-level vocabulary holding every word of
the world plus the marker tokens, so it runs the same code paths as bert-base-uncased.
"""
import argparse
import json
import os
import random

WORLDS = {"train": ["amber_coast", "basalt_hills", "cobalt_marsh"],
          "val": ["dusk_forest", "ember_peaks"],
          "test": ["frost_fjord", "granite_bay"]}
FILLER = ["the", "of", "a", "is", "and", "was", "in", "with", "by", "to", "from", "near", ".", ",",
          "(", ")"]
SPECIAL = ["[PAD]", "[unused0]", "[unused1]", "[unused2]", "[unused3]", "[UNK]", "[CLS]", "[SEP]",
           "[MASK]"]
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"


def pseudo_words(rng, n, syllables):
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables)))
    return sorted(words)


def make_world(rng, world, names, topics, n_entities=72, n_shared=24, topic_size=6, refs=2):
    """Documents and mentions of one world. Returns (documents, mentions)."""
    base = rng.sample(names, n_entities - n_shared)
    entity_names = base + base[:n_shared]  # the first n_shared names are used twice
    pool = rng.sample(topics, n_entities * topic_size)
    ents = []
    for i, name in enumerate(entity_names):
        own = pool[i * topic_size:(i + 1) * topic_size]
        ambiguous = entity_names.count(name) > 1
        title = f"{name.capitalize()} ({own[0]})" if ambiguous else name.capitalize()
        doc_id = f"{world.upper()[:3]}{i:04d}{rng.randrange(16 ** 6):06X}"
        ents.append({"id": doc_id, "name": name, "title": title, "topics": own})
    documents, mentions = [], []
    for e in ents:
        words = [e["name"].capitalize(), "is", "a", e["topics"][0], e["topics"][1], "of", "the",
                 e["topics"][2], "and", e["topics"][3], "."]
        spans = []
        for a in rng.sample([x for x in ents if x is not e], refs):
            t = rng.sample(a["topics"], 4)
            words += [rng.choice(FILLER[:12]), t[0], t[1]]
            spans.append((len(words), a))
            words += [a["name"].capitalize(), t[2], "with", t[3], "."]
        words += [e["topics"][4], "and", e["topics"][5], rng.choice(FILLER[:12]),
                  e["topics"][0], "."]
        documents.append({"document_id": e["id"], "title": e["title"], "text": " ".join(words)})
        for start, a in spans:
            mentions.append({"mention_id": f"M{e['id']}{start:04d}", "context_document_id": e["id"],
                             "label_document_id": a["id"], "start_index": start,
                             "end_index": start, "text": a["name"].capitalize(), "corpus": world,
                             "category": "LOW_OVERLAP"})
    return documents, mentions


def make_toy_world(out_dir, seed=0, hidden=64, layers=2, heads=2, shared=24):
    """Write `out_dir/data` (Zeshel layout) and `out_dir/bert` (tiny BERT); returns both paths.
    `shared`: names that two entities of a world share (at most 36 of its 72 entities' names)."""
    rng = random.Random(seed)
    names = pseudo_words(rng, 400, 3)
    topics = [w for w in pseudo_words(rng, 900, 2) if w not in names]
    data_dir, bert_dir = os.path.join(out_dir, "data"), os.path.join(out_dir, "bert")
    os.makedirs(os.path.join(data_dir, "documents"), exist_ok=True)
    os.makedirs(os.path.join(data_dir, "mentions"), exist_ok=True)
    split_mentions = {}
    for split, worlds in WORLDS.items():
        split_mentions[split] = []
        for world in worlds:
            docs, ms = make_world(rng, world, names, topics, n_shared=shared)
            with open(os.path.join(data_dir, "documents", f"{world}.json"), "w") as f:
                f.writelines(json.dumps(d) + "\n" for d in docs)
            split_mentions[split] += ms
    train = split_mentions["train"]
    split_mentions["heldout_train_seen"] = train[::10]
    split_mentions["heldout_train_unseen"] = train[5::10]
    for split, ms in split_mentions.items():
        with open(os.path.join(data_dir, "mentions", f"{split}.json"), "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in ms)

    import torch
    from transformers import BertConfig, BertModel
    from utils import quiet_transformers
    quiet_transformers()
    os.makedirs(bert_dir, exist_ok=True)
    vocab = SPECIAL + FILLER + names + topics
    with open(os.path.join(bert_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    with open(os.path.join(bert_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                   "model_max_length": 512}, f)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        max_position_embeddings=512)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(bert_dir)
    return data_dir, bert_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write data/ and bert/ into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data_dir, bert_dir = make_toy_world(args.out_dir, args.seed)
    print(f"toy world: {data_dir}  tiny BERT: {bert_dir}")


if __name__ == "__main__":
    main()
