"""The bundled toy world: a small Zeshel-format folder and a tiny BERT, built offline in seconds.

    python toy_world.py OUT_DIR        # writes OUT_DIR/data (Zeshel layout) and OUT_DIR/bert
    python toy_world.py OUT_DIR --zeshel_scale F   # instead a synthetic Zeshel of the real sizes
    python toy_world.py OUT_DIR --demo             # instead the demo's world (make_demo_world)

Each world has entities whose names repeat ("Zorbik (knight)", "Zorbik (river)"), so that the
name alone cannot tell them apart: only the words around a mention, which are drawn from its
entity's own topic words, do. Train, val and test worlds are disjoint (zero-shot, as Zeshel).
The tiny BERT (random weights from a config) has a word-level vocabulary holding every word of
the world plus the marker tokens, so it runs the same code paths as bert-base-uncased.

`--zeshel_scale F` writes Zeshel's 16 real worlds instead, each world's entity and mention counts
times F (at least 1 each), documents of log-normal lengths and a tiny BERT over their words: the
full-size rehearsal of bench/SCALE.md (F = 1: 492,321 entities, 69,275 mentions, 626 MB, under
two minutes).
"""
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


def add_document(documents, mentions, e, words, spans, world):
    """Entity `e`'s document (its `words`) and a mention of entity a at each (start, a) of
    `spans`, a one-word name."""
    documents.append({"document_id": e["id"], "title": e["title"], "text": " ".join(words)})
    for start, a in spans:
        mentions.append({"mention_id": f"M{e['id']}{start:04d}", "context_document_id": e["id"],
                         "label_document_id": a["id"], "start_index": start, "end_index": start,
                         "text": a["name"].capitalize(), "corpus": world,
                         "category": "LOW_OVERLAP"})


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
        add_document(documents, mentions, e, words, spans, world)
    return documents, mentions


SPLITS = ("train", "heldout_train_seen", "heldout_train_unseen", "val", "test")
# The tiny BERT's files: its tokenizer's and those save_pretrained writes
BERT_FILES = ("vocab.txt", "tokenizer_config.json", "config.json", "model.safetensors")


def world_outputs(out_dir, worlds, overwrite=False):
    """The files a world writes in `out_dir`: data/documents/<world>.json for `worlds`,
    data/mentions/<split>.json, bert/...; checked before any work (run_safety.Outputs): a file
    there that toy_world.py did not write stops it in one line, unless `overwrite`."""
    from run_safety import Outputs
    outputs = Outputs("toy_world", overwrite, flag="OUT_DIR")
    for world in worlds:
        outputs.add(os.path.join(out_dir, "data", "documents", f"{world}.json"))
    for split in SPLITS:
        outputs.add(os.path.join(out_dir, "data", "mentions", f"{split}.json"))
    for name in BERT_FILES:
        outputs.add(os.path.join(out_dir, "bert", name))
    outputs.claim({"tool": "toy_world"})  # before anything is made: a refusal leaves no folder
    return outputs.start()


class Text:
    """A binary file written as text (UTF-8)."""

    def __init__(self, f):
        self.f = f

    def write(self, text):
        self.f.write(text.encode("utf-8"))


def lines(rows):
    """JSON lines of `rows`, as bytes."""
    return b"".join((json.dumps(r) + "\n").encode() for r in rows)


def write_worlds(outputs, data_dir, split_worlds, make):
    """Write `data_dir` in the Zeshel layout: for each split's worlds (in order), `make(world)`
    gives (documents, mentions); the two heldout splits are every tenth train mention."""
    split_mentions = {}
    for split, worlds in split_worlds.items():
        split_mentions[split] = []
        for world in worlds:
            docs, ms = make(world)
            outputs.write(os.path.join(data_dir, "documents", f"{world}.json"),
                          lambda f: f.write(lines(docs)))
            split_mentions[split] += ms
    train = split_mentions["train"]
    split_mentions["heldout_train_seen"] = train[::10]
    split_mentions["heldout_train_unseen"] = train[5::10]
    for split, ms in split_mentions.items():
        outputs.write(os.path.join(data_dir, "mentions", f"{split}.json"),
                      lambda f: f.write(lines(ms)))


def make_toy_world(out_dir, seed=0, hidden=64, layers=2, heads=2, shared=24, overwrite=False):
    """Write `out_dir/data` (Zeshel layout) and `out_dir/bert` (tiny BERT); returns both paths.
    `shared`: names that two entities of a world share (at most 36 of its 72 entities' names).
    An existing `data` or `bert` that an earlier toy world did not write stops it with one line
    (UserError), unless `overwrite`."""
    outputs = world_outputs(out_dir, [w for ws in WORLDS.values() for w in ws], overwrite)
    rng = random.Random(seed)
    names = pseudo_words(rng, 400, 3)
    topics = [w for w in pseudo_words(rng, 900, 2) if w not in names]
    data_dir, bert_dir = os.path.join(out_dir, "data"), os.path.join(out_dir, "bert")
    write_worlds(outputs, data_dir, WORLDS, lambda world: make_world(rng, world, names, topics,
                                                                     n_shared=shared))
    write_tiny_bert(bert_dir, SPECIAL + FILLER + names + topics, seed, hidden, layers, heads,
                    outputs)
    return data_dir, bert_dir


# ----------------------------------------------------------------------------------------------
# The demo's world (`--demo`): families of confusable siblings

DEMO_WORLDS = {"train": ["amber_coast", "basalt_hills"], "val": ["cobalt_marsh"],
               "test": ["dusk_forest", "ember_peaks"]}
# What a name's bearers are: common English words (one word piece each in bert-base-uncased's
# vocabulary), shared by all worlds, as "character", "episode" or "location" are in Zeshel.
KINDS = ("knight river castle song ship village sword king queen battle tower mountain lake forest "
         "island bridge temple dragon horse book city armor wizard priest soldier captain merchant "
         "farmer hunter poet singer dancer painter doctor garden market harbor valley desert cave "
         "mine road wall gate church school prison palace").split()


def make_demo_family_world(rng, world, names, topics, families, siblings, refs):
    """Documents and mentions of one demo world: `families` names, each borne by `siblings`
    entities of different kinds ("Zorbik (knight)", "Zorbik (river)", ...) that share two topic
    words; each entity has two topic words of its own. A mention reads `river , knight the KIND
    NAME ...`: the kinds of two of its entity's siblings, then its own kind right before the
    name. Returns (documents, mentions)."""
    ents, fams = [], []
    for name in rng.sample(names, families):
        shared = rng.sample(topics, 2)
        fam = []
        for kind in rng.sample(KINDS, siblings):
            doc_id = f"{world.upper()[:3]}{len(ents):04d}{rng.randrange(16 ** 6):06X}"
            e = {"id": doc_id, "name": name, "kind": kind, "shared": shared,
                 "own": rng.sample(topics, 2), "title": f"{name.capitalize()} ({kind})"}
            ents.append(e)
            fam.append(e)
        fams.append(fam)
    family_of = {e["id"]: fam for fam in fams for e in fam}
    documents, mentions = [], []
    for e in ents:
        name = e["name"].capitalize()
        words = [name, "is", "a", e["kind"], "of", e["shared"][0], e["shared"][1], "and",
                 e["own"][0], e["own"][1], "."]
        spans = []
        for a in rng.sample([x for x in ents if x["name"] != e["name"]], refs):
            others = rng.sample([s for s in family_of[a["id"]] if s is not a], 2)
            f = rng.sample(FILLER[:12], 4)
            # 5 words left, the name, 6 right: one retriever window of 16 pieces
            words += [others[0]["kind"], f[0], others[1]["kind"], f[1], a["kind"]]
            spans.append((len(words), a))
            words += [a["name"].capitalize(), a["shared"][0], f[2], a["shared"][1], f[3], "and",
                      "."]
        add_document(documents, mentions, e, words, spans, world)
    return documents, mentions


def make_demo_world(out_dir, seed=0, families=32, siblings=4, refs=3, hidden=64, layers=2,
                    heads=2, overwrite=False):
    """The demo's world: `out_dir/data` (Zeshel layout, DEMO_WORLDS) and `out_dir/bert` (a tiny
    random BERT over its words); returns both paths.

    Every world has `families` names, each borne by `siblings` entities of different kinds; the
    kinds are common words shared by all worlds, the names and topic words are each world's own.
    A mention's context names its entity's kind right after the name, but also the kinds of two
    of the entity's siblings: counting the words a mention shares with an entity cannot pick the
    right sibling, only learning that the kind after the name is the one that counts can. A
    random negative of a world of families * siblings entities is almost never a sibling (it has
    another name), while the highest-scoring wrong entities are the siblings themselves. As
    make_toy_world, it replaces only what it wrote before, unless `overwrite`.
    """
    if siblings < 3:
        raise ValueError("siblings: at least 3 (a mention names the kinds of two siblings)")
    outputs = world_outputs(out_dir, [w for ws in DEMO_WORLDS.values() for w in ws], overwrite)
    rng = random.Random(seed)
    names = pseudo_words(rng, 400, 3)
    topics = [w for w in pseudo_words(rng, 1200, 2) if w not in names]
    data_dir, bert_dir = os.path.join(out_dir, "data"), os.path.join(out_dir, "bert")
    write_worlds(outputs, data_dir, DEMO_WORLDS, lambda world: make_demo_family_world(
        rng, world, names, topics, families, siblings, refs))
    write_tiny_bert(bert_dir, SPECIAL + FILLER + KINDS + names + topics, seed, hidden, layers,
                    heads, outputs)
    return data_dir, bert_dir


def write_tiny_bert(bert_dir, vocab, seed=0, hidden=64, layers=2, heads=2, outputs=None):
    """A BERT with random weights from a config and a word-level vocabulary `vocab` (the
    special tokens first), saved with its tokenizer files in `bert_dir` (BERT_FILES, through
    `outputs`, run_safety.Outputs, when given)."""
    import tempfile
    import torch
    from transformers import BertConfig, BertModel
    from utils import quiet_transformers
    quiet_transformers()
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        max_position_embeddings=512)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        BertModel(config).save_pretrained(tmp)
        with open(os.path.join(tmp, "vocab.txt"), "w") as f:
            f.write("\n".join(vocab) + "\n")
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                       "model_max_length": 512}, f)
        assert sorted(os.listdir(tmp)) == sorted(BERT_FILES), os.listdir(tmp)
        os.makedirs(bert_dir, exist_ok=True)
        for name in BERT_FILES:
            with open(os.path.join(tmp, name), "rb") as f:
                data = f.read()
            if outputs is None:
                with open(os.path.join(bert_dir, name), "wb") as f:
                    f.write(data)
            else:
                outputs.write(os.path.join(bert_dir, name), lambda f: f.write(data))


# ----------------------------------------------------------------------------------------------
# A synthetic Zeshel of the real sizes (`--zeshel_scale F`)

# Entities / mentions per world, from the Zeshel paper's statistics (train 332,632 / 49,275;
# val 89,549 / 10,000; test 70,140 / 10,000).
ZESHEL_WORLDS = {
    "train": {"american_football": (31929, 3898), "doctor_who": (40281, 8334),
              "fallout": (16992, 3286), "final_fantasy": (14044, 6041),
              "military": (104520, 13063), "pro_wrestling": (10133, 1392),
              "starwars": (87056, 11824), "world_of_warcraft": (27677, 1437)},
    "val": {"coronation_street": (17809, 1464), "muppets": (21344, 2028),
            "ice_hockey": (28684, 2233), "elder_scrolls": (21712, 4275)},
    "test": {"forgotten_realms": (15603, 1200), "lego": (10076, 1199),
             "star_trek": (34430, 4227), "yugioh": (10031, 3374)},
}
HELDOUT = 5000  # mentions of heldout_train_seen and of heldout_train_unseen, from train worlds
# Words per document: log-normal, median DOC_MEDIAN words, log-space deviation DOC_SIGMA
# (mean = median * exp(sigma^2 / 2), about 198 words), clipped to [DOC_MIN, DOC_MAX].
DOC_MEDIAN, DOC_SIGMA, DOC_MIN, DOC_MAX = 120, 1.0, 8, 5000
VOCAB_SIZE, ZIPF_EXPONENT = 30000, 1.0
CATEGORIES = ["LOW_OVERLAP", "HIGH_OVERLAP", "MULTIPLE_CATEGORIES", "AMBIGUOUS_SUBSTRING"]


def scaled_count(n, scale):
    """round(n * scale), at least 1: every world keeps an entity and a mention at any scale.

    >>> scaled_count(1199, 0.05), scaled_count(1199, 0.0001)
    (60, 1)
    """
    return max(1, int(round(n * scale)))


def _hex_ids(first, count, salt):
    """`count` distinct 16-digit upper-case hex ids (the Zeshel form): the counter first..first+
    count-1 times an odd constant modulo 2^64 (a bijection), so they never collide."""
    return [f"{((i * 0x9E3779B97F4A7C15) ^ salt) & 0xFFFFFFFFFFFFFFFF:016X}"
            for i in range(first, first + count)]


def make_scaled_world(rng, world, n_entities, n_mentions, words, zipf_cdf, first_id, out):
    """Write world's documents to the open file `out`; return its mentions (dicts, no ids).

    Each document: its title's words, then words drawn from a Zipf law over `words`, its length
    from the log-normal above. A mention: a context document and a label document of the world
    drawn uniformly, at a uniform position of the context; the label's title replaces the words
    there, preceded by two words of the label's own text (context that can tell entities apart).
    """
    import numpy as np
    V = len(words) // 2  # words: V lower-case forms, then their capitalized forms
    lengths = np.clip(np.round(rng.lognormal(np.log(DOC_MEDIAN), DOC_SIGMA, n_entities)),
                      DOC_MIN, DOC_MAX).astype(np.int64)                      # (E,)
    offsets = np.zeros(n_entities + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    text = np.searchsorted(zipf_cdf, rng.random(int(offsets[-1]))).astype(np.int32)  # (W,)
    name_len = rng.choice([1, 2, 3], n_entities, p=[0.5, 0.35, 0.15])       # (E,)
    names = rng.integers(0, V, (n_entities, 3)).astype(np.int32) + V      # capitalized forms
    for j in range(3):  # every document opens with its title
        has = name_len > j
        text[offsets[:-1][has] + j] = names[has, j]
    ctx = rng.integers(0, n_entities, n_mentions)
    label = rng.integers(0, n_entities, n_mentions)
    room = lengths[ctx] - name_len[label] - 2                 # >= 3 since DOC_MIN = 8
    start = 2 + (rng.random(n_mentions) * (room + 1)).astype(np.int64)
    for i in range(n_mentions):
        pos = offsets[ctx[i]] + start[i]
        lab = offsets[label[i]]
        text[pos - 2:pos] = text[lab + 3:lab + 5] % V      # two words of the label's text
        text[pos:pos + name_len[label[i]]] = names[label[i], :name_len[label[i]]]
    doc_ids = _hex_ids(first_id, n_entities, 0x5A17)
    chunk = 4096
    for s in range(0, n_entities, chunk):
        e = min(s + chunk, n_entities)
        toks = text[offsets[s]:offsets[e]].tolist()
        for d in range(s, e):
            a, b = offsets[d] - offsets[s], offsets[d + 1] - offsets[s]
            doc_words = [words[t] for t in toks[a:b]]
            title = " ".join(doc_words[:name_len[d]])
            out.write(json.dumps({"document_id": doc_ids[d], "title": title,
                                  "text": " ".join(doc_words)}) + "\n")
    mentions = []
    for i in range(n_mentions):
        c, s = int(ctx[i]), int(start[i])
        e = s + int(name_len[label[i]]) - 1
        toks = text[offsets[c] + s:offsets[c] + e + 1].tolist()
        mentions.append({"context_document_id": doc_ids[c],
                         "label_document_id": doc_ids[int(label[i])], "start_index": s,
                         "end_index": e, "text": " ".join(words[t] for t in toks),
                         "corpus": world, "category": CATEGORIES[int(rng.integers(4))]})
    return mentions


def make_zeshel_scale(out_dir, scale, seed=0, hidden=64, layers=2, heads=2, overwrite=False):
    """Write `out_dir/data`, a synthetic Zeshel with the real worlds and each world's entity and
    mention counts times `scale` (0 < scale <= 1), and `out_dir/bert`, a tiny BERT whose
    word-level vocabulary holds every word; returns both paths and the counts written. As
    make_toy_world, it replaces only what it wrote before, unless `overwrite`."""
    import numpy as np
    if not 0 < scale <= 1:
        raise ValueError(f"--zeshel_scale {scale} is not in (0, 1]")
    outputs = world_outputs(out_dir, [w for ws in ZESHEL_WORLDS.values() for w in ws], overwrite)
    rng = np.random.default_rng(seed)
    pseudo = pseudo_words(random.Random(seed), VOCAB_SIZE - len(FILLER), 3)
    random.Random(seed).shuffle(pseudo)  # frequency rank unrelated to spelling
    lower = FILLER + pseudo                                                   # Zipf rank order
    words = lower + [w.capitalize() for w in lower]         # id + V: the capitalized form
    zipf = 1.0 / np.arange(1, len(lower) + 1) ** ZIPF_EXPONENT
    zipf_cdf = np.cumsum(zipf / zipf.sum())
    zipf_cdf[-1] = 1.0
    data_dir, bert_dir = os.path.join(out_dir, "data"), os.path.join(out_dir, "bert")
    total_train = sum(m for _, m in ZESHEL_WORLDS["train"].values())
    split_mentions, counts, first_id = {}, {}, 0
    for split, worlds in ZESHEL_WORLDS.items():
        split_mentions[split] = []
        for world, (n_ent, n_men) in sorted(worlds.items()):
            E, M = scaled_count(n_ent, scale), scaled_count(n_men, scale)
            extra = [scaled_count(HELDOUT * n_men / total_train, scale)
                     for _ in range(2)] if split == "train" else [0, 0]
            ms = []
            outputs.write(os.path.join(data_dir, "documents", f"{world}.json"), lambda f: ms.extend(
                make_scaled_world(rng, world, E, M + sum(extra), words, zipf_cdf, first_id,
                                  Text(f))))
            first_id += E
            counts[world] = (split, E, M)
            split_mentions[split] += ms[:M]
            if split == "train":
                split_mentions.setdefault("heldout_train_seen", []).extend(
                    ms[M:M + extra[0]])
                split_mentions.setdefault("heldout_train_unseen", []).extend(ms[M + extra[0]:])
    first_mention = 0
    for split, ms in split_mentions.items():
        ids = _hex_ids(first_mention, len(ms), 0x3E17)
        first_mention += len(ms)
        outputs.write(os.path.join(data_dir, "mentions", f"{split}.json"), lambda f: f.write(
            lines({"mention_id": i, **m} for i, m in zip(ids, ms))))
    write_tiny_bert(bert_dir, SPECIAL + lower, seed, hidden, layers, heads, outputs)
    return data_dir, bert_dir, counts


def main(argv=None):
    from run_safety import main as cli_main
    return cli_main(_main)(argv)


def _main(argv=None):
    from cli import ArgumentParser, check_range
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write data/ and bert/ into (what is there "
                                        "already is replaced only when an earlier toy_world.py "
                                        "wrote it, or with --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR/data and OUT_DIR/bert whoever wrote them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zeshel_scale", type=float, default=None, metavar="F",
                        help="instead of the toy world, a synthetic Zeshel of the real worlds "
                             "with each world's entity and mention counts times F (0 < F <= 1)")
    parser.add_argument("--demo", action="store_true",
                        help="instead of the toy world, the demo's world of confusable siblings")
    args = parser.parse_args(argv)
    check_range(args.seed, "--seed", 0, 2 ** 64 - 1, ", what numpy and torch seed with")
    if args.demo:
        if args.zeshel_scale is not None:
            parser.error("--demo and --zeshel_scale: give one of them")
        data_dir, bert_dir = make_demo_world(args.out_dir, args.seed, overwrite=args.overwrite)
        print(f"demo world: {data_dir}  tiny BERT: {bert_dir}")
        return
    if args.zeshel_scale is None:
        data_dir, bert_dir = make_toy_world(args.out_dir, args.seed, overwrite=args.overwrite)
        print(f"toy world: {data_dir}  tiny BERT: {bert_dir}")
        return
    if not 0 < args.zeshel_scale <= 1:
        parser.error(f"--zeshel_scale {args.zeshel_scale} is not in (0, 1]")
    data_dir, bert_dir, counts = make_zeshel_scale(args.out_dir, args.zeshel_scale, args.seed,
                                                   overwrite=args.overwrite)
    for split in ZESHEL_WORLDS:
        rows = [(E, M) for s, E, M in counts.values() if s == split]
        print(f"{split}: {len(rows)} worlds, {sum(r[0] for r in rows)} entities, "
              f"{sum(r[1] for r in rows)} mentions")
    print(f"Zeshel at scale {args.zeshel_scale}: {data_dir}  tiny BERT: {bert_dir}")


if __name__ == "__main__":
    main()
