"""Link new text with a trained retriever (and reranker) over a stored entity index
(docs/linking.md).

    python link.py --retriever RET [--reranker RR] --entities PATH --index DIR \\
        --mentions FILE --out FILE [--k 64]
    echo "the [[Zorbik]] knight rode north" | python link.py --retriever RET --index DIR

`--entities`: a Zeshel `documents/` folder (one `<world>.json` per world) or one such JSON-lines
file of `{document_id, title, text}`. The first call encodes every entity once into `--index`
(entity_index.py: memory-mapped vectors and a manifest); later calls reuse it and say so, and an
index of another retriever or of other entities is refused (rebuilt with `--overwrite`). Once
built, `--entities` may be left out: the manifest names the files.

`--mentions`: JSON lines, each a Zeshel mention row (`mention_id`, `context_document_id`,
`start_index`, `end_index`, `corpus`: the context is that document of `--entities`, and the
candidates come from the mention's own world, as save_candidates.py ranks them) or a BLINK row
(`context_left`, `mention`, `context_right`, optional `id` and `world`: ranked over all entities,
or the named world's; without an id, a mention is numbered by its place in the input). Without
it, lines typed on standard input with the mention in [[double brackets]] (each pair of brackets
is one mention; ranked over all entities).

Output (`--out`, else standard output): one JSON line per mention in input order, `{"id",
"mention", "world", "candidates": [{"document_id", "title", "retriever_score"}, ...] best first,
"linked"}`, the top `--k` of the retriever; with `--reranker` (a main_reranker.py cross-encoder
checkpoint) each candidate also has its `reranker_score` and the list is re-sorted by it (ties
in the retriever's order). In Python, `Linker` does the same.
"""
import io
import json
import os
import re
import sys
from types import SimpleNamespace

import torch

from cli import ArgumentParser, UserError, add_precision_args, check_flag, check_positive, die
from data_loader import (_check_type, check_encoder, check_fields, check_positions, encode_mentions,
                         load_encoder, load_tokenizer, read_jsonl, reranker_entity_ids,
                         reranker_mention_ids)
from entity_index import (INDEX_DTYPES, PRECISIONS, Wanted, build_index, plan_index,
                          read_entities, read_manifest)
from reranker import FullRanker, PairDataset, collate
from retriever import TopK, encode_vectors, load_retriever, stream_scores
from run_safety import Outputs, load_checkpoint, main as cli_main, notice
from save_candidates import SHAPE_FLAGS, check_trained_encoder, resolve_shape
from training import absolute, load_weights
from utils import autocast, get_logger, progress, setup_runtime

ZESHEL_FIELDS = {"mention_id": "id", "context_document_id": "id", "start_index": int,
                 "end_index": int, "corpus": "id"}
BLINK_FIELDS = {"context_left": str, "mention": str, "context_right": str}
MARK = re.compile(r"\[\[(.*?)\]\]")
# Precision names (link.py's flags, Linker's `precision`) -> autocast dtype (entity_index)
PRECISION_NAMES = {name: dtype for dtype, (name, _) in PRECISIONS.items()}


# ----------------------------------------------------------------------------------------------
# Mentions: Zeshel rows, BLINK rows and typed text, each made a context and a span

class Contexts:
    """The `zeshel` argument of data_loader's window encoders (encode_mentions,
    reranker_mention_ids) for parsed mentions of any form: each carries its context's
    whitespace tokens, and its span is start_index..end_index of them."""

    @staticmethod
    def context_tokens(m):
        return m["tokens"]


def _mention(id_, tokens, start, end, world):
    return {"id": id_, "tokens": tokens, "start_index": start, "end_index": end,
            "world": world, "mention": " ".join(tokens[start:end + 1])}


def parse_typed(line, where="stdin:1", first=1):
    """The mentions of a typed line, each marked in [[double brackets]]: parsed mentions (see
    Linker.parse) numbered from `first`, whose context is the line without the brackets.

    >>> [(m["mention"], m["tokens"]) for m in parse_typed("the [[Zorbik]] knight")]
    [('Zorbik', ['the', 'Zorbik', 'knight'])]
    >>> parse_typed("no brackets here")
    Traceback (most recent call last):
    cli.UserError: stdin:1: no mention marked: put it in [[double brackets]], as in 'the [[Zorbik]] knight'
    """
    marks = list(MARK.finditer(line))
    if not marks:
        die(f"{where}: no mention marked: put it in [[double brackets]], as in "
            f"'the [[Zorbik]] knight'")
    rest = MARK.sub("", line)
    if "[[" in rest or "]]" in rest:
        die(f"{where}: a [[ without its ]] (or the other way round)")
    out = []
    for j, mark in enumerate(marks):
        left = MARK.sub(lambda m: m.group(1), line[:mark.start()]).split()
        mention = mark.group(1).split()
        right = MARK.sub(lambda m: m.group(1), line[mark.end():]).split()
        check_flag(mention, where, "an empty [[ ]]: put the mention's words between them")
        out.append(_mention(first + j, left + mention + right, len(left),
                            len(left) + len(mention) - 1, None))
    return out


def _id(row, where):
    check_flag(type(row["id"]) is int or _check_type(row["id"], "id"), where,
               f"id must be a non-empty string or an integer, not {json.dumps(row['id'])[:40]}")
    return row["id"]


# ----------------------------------------------------------------------------------------------
# The linker

class Linker:
    """A trained retriever (and reranker) over a stored entity index, linking mentions of text.

    `retriever`: a main_retriever.py checkpoint; `index`: the index folder (built on first use
    from `entities`, a Zeshel documents folder or world file; later reused: `entities` may then be
    left out); `reranker`: a main_reranker.py checkpoint of the cross-encoder, or None.
    `pretrained` / `reranker_pretrained`: the encoders' folders when the paths the checkpoints
    record are not there. `precision`: "float32", "bfloat16" or "float16" (autocast), None: the
    index's (float32 for a new one). `index_dtype`: "float32" or "float16" for a new index (None:
    the checkpoint's precision, or the existing index's). Checks everything and builds or opens
    the index (`build=False`: on the first `link`); mistakes raise cli.UserError in one line.

    >>> import contextlib, io, tempfile, main_retriever, toy_world
    >>> out = tempfile.mkdtemp()
    >>> data, bert = toy_world.make_toy_world(out)
    >>> with contextlib.redirect_stdout(io.StringIO()):  # an untrained retriever, its log aside
    ...     main_retriever.main(["--model", f"{out}/ret.pt", "--data_dir", data, "--pretrained",
    ...         bert, "--epochs", "0", "--max_len", "16", "--k", "4", "--type_model", "sum_max",
    ...         "--num_mention_vecs", "4", "--num_entity_vecs", "4", "--quiet"])
    >>> linker = Linker(retriever=f"{out}/ret.pt", index=f"{out}/index",
    ...                 entities=f"{data}/documents")
    >>> rows = linker.link([{"id": 7, "context_left": "a knight of the", "mention": "Zorbik",
    ...                      "context_right": "hills", "world": "frost_fjord"},
    ...                     "the [[Zorbik]] knight"], k=3)
    >>> [(r["id"], r["world"], len(r["candidates"])) for r in rows]
    [(7, 'frost_fjord', 3), (2, None, 3)]
    >>> sorted(rows[0]["candidates"][0]), rows[0]["linked"] == rows[0]["candidates"][0]["document_id"]
    (['document_id', 'retriever_score', 'title'], True)
    >>> again = Linker(retriever=f"{out}/ret.pt", index=f"{out}/index")  # reused, entities read
    >>> again.link([{"id": 7, "context_left": "a knight of the", "mention": "Zorbik",
    ...              "context_right": "hills", "world": "frost_fjord"}], k=3) == rows[:1]
    True
    """

    def __init__(self, retriever, index, reranker=None, entities=None, pretrained=None,
                 reranker_pretrained=None, precision=None, index_dtype=None, device=None,
                 entity_bsz=None, mention_bsz=512, rerank_bsz=8, overwrite=False, build=True,
                 quiet=True):
        self.flags = {"retriever": "--retriever", "reranker": "--reranker", "index": "--index",
                      "entities": "--entities", "pretrained": "--pretrained",
                      "reranker_pretrained": "--reranker_pretrained"}
        self._tokens = {}  # (world, document id) -> its whitespace tokens
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.mention_bsz, self.rerank_bsz, self.quiet = mention_bsz, rerank_bsz, quiet
        check_flag(precision in (None, *PRECISION_NAMES), "precision",
                   f"{precision!r} is not one of {', '.join(PRECISION_NAMES)}")
        check_flag(index_dtype in (None, *INDEX_DTYPES), "--index_dtype",
                   f"{index_dtype!r} is not one of {', '.join(INDEX_DTYPES)}")
        self._load_retriever(retriever, pretrained)
        if entities is None:  # the index's (plan_index checks the index itself later)
            manifest = read_manifest(index) if os.path.isdir(index) else None
            check_flag(manifest is not None, self.flags["entities"], f"give the entities: {index} "
                       f"holds no complete entity index yet, to read them from")
            entities = manifest["entities"]["path"]
        self.entities = read_entities(entities, self.flags["entities"])
        self.wanted = Wanted(
            {"path": absolute(retriever), "sha256": self.retriever_sha}, self.entities,
            self.args.type_model, self.model.n, self.model.mention_encoder.config.hidden_size,
            self.args.max_len, "any" if precision is None else PRECISION_NAMES[precision],
            index_dtype, self.checkpoint_dtype, entity_bsz or 512,
            {"index": self.flags["index"], "retriever": self.flags["retriever"],
             "entities": self.flags["entities"], "index_dtype": "--index_dtype",
             "max_len": self.flags["retriever"]})
        self.folder, self.overwrite, self.entity_bsz = index, overwrite, entity_bsz
        self.precision = None if precision is None else PRECISION_NAMES[precision]
        self.reranker = self.plan = self.index = None
        if reranker is not None:
            self._load_reranker(reranker, reranker_pretrained)
        if build:
            self.build()

    def _load_retriever(self, path, pretrained):
        flag = self.flags["retriever"]
        state, self.retriever_sha = load_checkpoint(path, flag, "main_retriever",
                                                    ("args", "model"))
        args = SimpleNamespace(model=path, pretrained=pretrained,
                               **{name: None for name in SHAPE_FLAGS})
        where = resolve_shape(args, state["args"])
        where = self.flags["pretrained"] if pretrained is not None else where
        check_encoder(args.pretrained, where, loadable=False)
        self.tokenizer, self.model = load_retriever(
            args.pretrained, args.type_model, args.num_mention_vecs, args.num_entity_vecs,
            args.mention_use_codes, args.entity_use_codes, flag=where)
        check_trained_encoder(state, self.model.mention_encoder.fingerprint, args.pretrained,
                              where)
        load_weights(self.model, state["model"], path, flag)
        check_positions(self.model.mention_encoder, args.max_len, flag)
        self.model.to(self.device).eval()
        self.args = args
        weights = [t for t in state["model"].values() if t.is_floating_point()]
        self.checkpoint_dtype = ("float16" if weights and weights[0].dtype == torch.float16
                                 else "float32")

    def _load_reranker(self, path, pretrained):
        flag = self.flags["reranker"]
        state, self.reranker_sha = load_checkpoint(path, flag, "main_reranker", ("args", "model"))
        args = state["args"]
        check_flag(args.get("type_model") == "full", flag,
                   f"{path} is a --type_model {args.get('type_model')} reranker; link.py runs "
                   f"the cross-encoder (--type_model full)")
        name = pretrained or args.get("pretrained")
        where = (self.flags["reranker_pretrained"] if pretrained is not None else
                 f"{self.flags['reranker_pretrained']} (from the checkpoint {path})")
        check_flag(name, where, f"{path} records no encoder; pass it")
        check_encoder(name, where, loadable=False)
        tokenizer = load_tokenizer(name, where)
        encoder = load_encoder(name, tokenizer, where)
        # Each model reads the text with its own tokenizer (the demo's retriever is a tiny BERT,
        # its reranker MiniLM); what must hold is that the reranker runs on the encoder, and so
        # the vocabulary, it was trained on.
        trained = (state.get("inputs") or {}).get("pretrained") or {}
        differ = [k for k in ("vocabulary", "config") if trained.get(k) not in (
            None, encoder.fingerprint[k])]
        check_flag(not differ, flag, f"{path} was trained on another encoder's "
                   f"{' and '.join(differ)} than {name}'s ({where}); pass --reranker_pretrained "
                   f"with the encoder it was trained from")
        model = FullRanker(encoder)
        load_weights(model, state["model"], path, flag)
        check_positions(encoder, args["L"], flag)
        self.reranker = model.to(self.device).eval()
        self.reranker_tokenizer = tokenizer
        self.L, self.inputmark = args["L"], bool(args.get("inputmark"))

    def check_index(self):
        """Check the index folder (entity_index.plan_index: reuse, refusal, or a build and its
        size) before any work; once. The precision and chunk size left unset become the
        index's."""
        if self.plan is None:
            self.plan = plan_index(self.folder, self.wanted, self.overwrite)
            manifest = self.plan.manifest or {}
            if self.wanted.precision == "any" and manifest:
                self.precision = PRECISION_NAMES[manifest["encoded_in"]]
            self.entity_bsz = self.entity_bsz or manifest.get("entity_bsz", 512)
        return self.plan

    def build(self):
        """Build the index the checks planned, or open it (saying which); once."""
        if self.index is None:
            self.index = build_index(self.check_index(), self.model, self.tokenizer, self.device,
                                     self.precision, self.quiet)
        return self.index

    # ------------------------------------------------------------------------------------------

    def parse(self, rows, source="mentions"):
        """Mentions to link, checked: each row a Zeshel mention row, a BLINK row (module
        docstring; its `id` may be left out) or a string of typed text with [[marked]] mentions;
        a mention without an id is numbered by its place in the input, from 1. A row without its
        fields, with a span outside its document or naming an unknown world stops with one line
        naming `source` and the row (file:line for a file's rows). Returns the parsed mentions
        (dicts)."""
        out = []
        for i, row in enumerate(rows):
            if isinstance(row, dict) and "_mention" in row:  # parsed already
                out.append(row)
                continue
            where = f"{row.get('_where', f'{source}:{i + 1}')}" if isinstance(row, dict) \
                else f"{source}:{i + 1}"
            if isinstance(row, str):
                parsed = parse_typed(row, where, len(out) + 1)
            elif not isinstance(row, dict):
                die(f"{where}: expected a JSON object or a string of text, not {type(row).__name__}")
            elif "context_document_id" in row:
                parsed = [self._zeshel_row(row, where)]
            else:
                parsed = [self._blink_row(row, where, len(out) + 1)]
            for m in parsed:
                m["_mention"] = True
            out.extend(parsed)
        return out

    def _world(self, world, where, field):
        worlds = self.entities.worlds
        check_flag(world in self.entities.world_ranges, where,
                   f"{field} {world!r} is not a world of the entities ({self.entities.path}: "
                   f"{', '.join(worlds[:4])}{', ...' if len(worlds) > 4 else ''})")
        return world

    def _zeshel_row(self, row, where):
        check_fields(row, ZESHEL_FIELDS, where)
        world = self._world(row["corpus"], where, "corpus")
        docs = self.entities.documents[world]
        check_flag(row["context_document_id"] in docs, where,
                   f"context_document_id {row['context_document_id']!r} is not a document of "
                   f"world {world!r}")
        tokens = self._tokens.setdefault((world, row["context_document_id"]),
                                         docs[row["context_document_id"]]["text"].split())
        s, e = row["start_index"], row["end_index"]
        check_flag(0 <= s <= e < len(tokens), where, f"mention tokens {s}..{e} are outside its "
                   f"context document ({len(tokens)} tokens) or start after they end")
        return _mention(row["mention_id"], tokens, s, e, world)

    def _blink_row(self, row, where, number):
        id_ = _id(row, where) if "id" in row else number
        check_fields(row, BLINK_FIELDS, where)
        world = row.get("world")
        if world is not None:
            check_flag(_check_type(world, "id"), where, "world must be a non-empty string")
            self._world(world, where, "world")
        left, mention, right = (row[k].split() for k in BLINK_FIELDS)
        check_flag(mention, where, "mention is empty (no words)")
        return _mention(id_, left + mention + right, len(left), len(left) + len(mention) - 1,
                        world)

    def check_k(self, mentions, k, flag="k"):
        """Stop unless k is positive and no more than the entities a mention is ranked over."""
        check_flag(isinstance(k, int) and k > 0, flag, f"must be a positive integer (got {k})")
        for m in mentions:
            start, end = (self.entities.world_ranges[m["world"]] if m["world"] is not None else
                          (0, len(self.entities)))
            check_flag(k <= end - start, flag, f"{k} is more than the {end - start} entities of "
                       + (f"world {m['world']!r}" if m["world"] is not None else "the index"))

    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def link(self, mentions, k=64):
        """The rows of link.py for `mentions` (see parse): one dict per mention, in order."""
        mentions = self.parse(mentions)
        self.check_k(mentions, k)
        if not mentions:
            return []
        index = self.build()
        values, indices = self.retrieve(mentions, k)
        rows = []
        for m, vals, idx in zip(mentions, values.tolist(), indices.tolist()):
            rows.append({"id": m["id"], "mention": m["mention"], "world": m["world"],
                         "candidates": [{"document_id": index.doc_ids[e],
                                         "title": self.entities.titles[e], "retriever_score": v}
                                        for v, e in zip(vals, idx)]})
        if self.reranker is not None:
            for row, scores in zip(rows, self.rerank(mentions, indices)):
                for c, s in zip(row["candidates"], scores):
                    c["reranker_score"] = s
                row["candidates"].sort(key=lambda c: -c["reranker_score"])  # stable: ties keep
                #                                                            the retriever's order
        for row in rows:
            row["linked"] = row["candidates"][0]["document_id"]
        return rows

    def retrieve(self, mentions, k):
        """(scores, entity indices), each (M, k) on the CPU, best first (ties: the lower entity
        index first): each mention with a world ranked within it, the others over all entities,
        by retriever.stream_scores over the index's vectors, as save_candidates.py ranks."""
        index, device = self.index, self.device
        ids, mask = encode_mentions(self.tokenizer, Contexts, mentions, self.args.max_len)
        u = encode_vectors(self.model.mention_vectors, ids, mask, self.mention_bsz, device,
                           self.precision, self.quiet, "mentions")            # (M, m, d)
        M = len(mentions)
        values = torch.empty(M, k)
        indices = torch.empty(M, k, dtype=torch.long)
        world_of = {w: i for i, w in enumerate(index.worlds)}
        ranges = list(index.world_ranges.values())
        for own_world in (True, False):
            rows = [i for i, m in enumerate(mentions) if (m["world"] is not None) == own_world]
            if not rows:
                continue
            worlds = (torch.tensor([world_of[mentions[i]["world"]] for i in rows])
                      if own_world else None)
            top = TopK(len(rows), k, worlds, device=device)
            stream_scores(self.model, u[torch.tensor(rows, device=u.device)], None, None, ranges,
                          [top], entity_bsz=self.entity_bsz, device=device, quiet=self.quiet,
                          desc="entities",
                          vectors=lambda start, end: index.chunk(start, end, device))
            values[rows], indices[rows] = top.values.cpu(), top.indices.cpu()
        return values, indices

    def rerank(self, mentions, indices):
        """The cross-encoder's score of each mention's candidates (entity indices (M, k)), as
        main_reranker.py scores a pair: [CLS] mention window [SEP] entity prefix [SEP] of --L
        tokens (reranker.PairDataset). -> [[float] * k] per mention."""
        tokenizer = self.reranker_tokenizer
        used = sorted(set(indices.flatten().tolist()))
        position = {e: i for i, e in enumerate(used)}
        rows = [[position[e] for e in row] for row in indices.tolist()]
        mention_ids = reranker_mention_ids(tokenizer, Contexts, mentions, self.L, self.inputmark)
        entity_ids = reranker_entity_ids(tokenizer, [self.entities.texts[e] for e in used],
                                         self.L)
        dataset = PairDataset(range(len(mentions)), rows, mention_ids, entity_ids, self.L,
                              tokenizer)
        out = [None] * len(mentions)
        batches = range(0, len(dataset), self.rerank_bsz)
        for s in progress(batches, desc="reranking", disable=self.quiet):
            which, *inputs = collate([dataset[i] for i in range(s, min(s + self.rerank_bsz,
                                                                        len(dataset)))])
            with autocast(self.device, self.precision):
                scores = self.reranker(*(t.to(self.device) for t in inputs))  # (B, k)
            for i, row in zip(which.tolist(), scores.float().cpu().tolist()):
                out[i] = row[:len(rows[i])]
        return out


# ----------------------------------------------------------------------------------------------
# link.py

def build_parser():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--retriever", path=True, help="retriever checkpoint of main_retriever.py "
                   "(required)")
    p.add_argument("--reranker", path=True,
                   help="cross-encoder checkpoint of main_reranker.py: re-scores the top --k")
    p.add_argument("--entities", path=True,
                   help="a Zeshel documents/ folder or one world's JSON-lines file of "
                        "{document_id, title, text} (default: those the index was built from)")
    p.add_argument("--index", free=True, help="the entity index folder: built on the first "
                   "call, reused after (required)")
    p.add_argument("--mentions", path=True, help="JSON lines of Zeshel mention rows or BLINK "
                   "rows (default: typed lines on standard input, mentions in [[brackets]])")
    p.add_argument("--out", free=True, help="JSON-lines output (default: standard output)")
    p.add_argument("--k", type=int, default=64, help="candidates per mention")
    p.add_argument("--index_dtype", choices=INDEX_DTYPES, default=None,
                   help="the stored vectors' dtype for a new index (default: the checkpoint's, "
                        "float32; float16 halves the disk and moves scores by float16 rounding)")
    add_precision_args(p)
    p.add_argument("--pretrained", path=True, help="the retriever's encoder folder (default: "
                   "the path the checkpoint records)")
    p.add_argument("--reranker_pretrained", path=True, help="the reranker's encoder folder "
                   "(default: the path its checkpoint records)")
    p.add_argument("--entity_bsz", type=int, default=None, free=True,
                   help="entities per encoded and scored chunk (default: the index's, 512 for a "
                        "new one; the same as save_candidates.py's for its candidates bit for bit)")
    p.add_argument("--mention_bsz", type=int, default=512, free=True,
                   help="mentions per encoder batch")
    p.add_argument("--rerank_bsz", type=int, default=8, free=True,
                   help="mentions per reranker batch (each with its --k pairs)")
    p.add_argument("--gpus", default="", free=True, help="visible GPUs (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("--quiet", action="store_true", free=True, help="no progress bars")
    p.add_argument("--overwrite", action="store_true", free=True,
                   help="rebuild an index of another retriever or other entities, and replace an "
                        "--out file another run wrote (a matching index is always reused)")
    return p


def precision_name(args, device):
    """The precision flags as Linker's `precision`: None when none is given (the index's)."""
    if args.fp16:
        return "float16" if device.type == "cuda" else "bfloat16"
    return "bfloat16" if args.bf16 else "float32" if args.fp32 else None


def read_mention_file(path, flag="--mentions"):
    """The rows of a mentions file (read_jsonl: any JSON objects; Linker.parse checks their
    fields), each with `_where` (file:line), and the sha256 of what was read."""
    import hashlib
    digest = hashlib.sha256()
    rows = read_jsonl(path, {}, flag, digest=digest)
    for row in rows:
        row["_where"] = f"{path}:{row.pop('_line')}"
    return rows, digest.hexdigest()


def typed_lines(stream):
    """(line number, text) of the non-blank lines of `stream`."""
    for lineno, line in enumerate(stream, 1):
        if line.strip():
            yield lineno, line.rstrip("\n")


def typed_mentions(lines, first=1):
    """The parsed mentions of typed (line number, text) pairs, numbered from `first`; a line
    without a marked mention stops with one line naming it (stdin:LINE)."""
    out = []
    for lineno, text in lines:
        out += parse_typed(text, f"stdin:{lineno}", first + len(out))
    for m in out:
        m["_mention"] = True
    return out


@cli_main
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flag(args.retriever, "--retriever", "a retriever checkpoint is required")
    check_flag(args.index, "--index", "an entity index folder is required (built on the first "
               "call)")
    check_positive(args, "k", "mention_bsz", "rerank_bsz")
    if args.entity_bsz is not None:
        check_positive(args, "entity_bsz")
    get_logger(None).handlers.clear()  # notices on stderr: standard output carries the rows
    rt = setup_runtime(args.gpus)
    check_flag(not rt.distributed, "torchrun", "link.py runs in one process")
    linker = Linker(args.retriever, args.index, args.reranker, args.entities, args.pretrained,
                    args.reranker_pretrained, precision_name(args, rt.device), args.index_dtype,
                    rt.device, args.entity_bsz, args.mention_bsz, args.rerank_bsz,
                    args.overwrite, build=False, quiet=args.quiet)
    typed = args.mentions is None
    if typed:
        check_flag(args.out is None or not sys.stdin.isatty(), "--out",
                   "typed lines are printed as they are linked; leave --out out, or give "
                   "--mentions")
        mentions = None
        if not sys.stdin.isatty():  # piped text: every line checked before any work
            mentions = typed_mentions(typed_lines(sys.stdin))
            check_flag(mentions, "stdin", "no text: type lines with the mention in [[double "
                       "brackets]], or give --mentions")
            linker.check_k(mentions, args.k, "--k")
    else:
        rows, sha = read_mention_file(args.mentions)
        mentions = linker.parse(rows)
        linker.check_k(mentions, args.k, "--k")
    linker.check_index()
    outputs = None
    if args.out:
        outputs = Outputs("link", args.overwrite, flag="--out")
        outputs.add(args.out)
        outputs.start()
        inputs = {"retriever": linker.retriever_sha, "entities": linker.entities.sha256}
        if linker.reranker is not None:
            inputs["reranker"] = linker.reranker_sha
        if not typed:
            inputs["mentions"] = sha
        outputs.claim({"tool": "link", "flags": parser.defining(args), "inputs": {
            k: {"path": absolute(getattr(args, k, None) or ""), "content": {"sha256": v}}
            for k, v in inputs.items()}}, defaults=parser.defaults())
    linker.build()  # says what it does with the index, once every check has passed
    if mentions is None:  # a terminal: each line linked as it is typed
        count = 0
        for line in typed_lines(sys.stdin):
            try:
                parsed = typed_mentions([line], count + 1)
                linker.check_k(parsed, args.k, "--k")
            except UserError as e:  # say it, and read on
                print(f"error: {e}", file=sys.stderr, flush=True)
                continue
            count += len(parsed)
            for row in linker.link(parsed, args.k):
                print(json.dumps(row), flush=True)
        return
    rows = linker.link(mentions, args.k)
    if outputs is not None:
        outputs.write_lines(rows, args.out)
        notice(f"linked {len(rows)} mentions: {args.out}")
    else:
        text = io.StringIO()
        for row in rows:
            text.write(json.dumps(row) + "\n")
        sys.stdout.write(text.getvalue())
        sys.stdout.flush()


if __name__ == "__main__":
    main()
