"""The stored entity index (docs/linking.md#the-entity-index): every entity's retriever vectors,
encoded once and memory-mapped by every later call, so that linking new text (link.py) or
dumping candidates (`save_candidates.py --store_en_hiddens`) does not encode the entities again.

An index is a folder:

- `vectors.bin`: the entity vectors (E, n, d) in entity order, raw C-order float32 or float16
  (`--index_dtype`), n the retriever's entity vectors per entity and d its hidden size;
- `index.json`, the manifest, written last: the retriever checkpoint's sha256, the entities'
  (their files' sha256s), what shapes the vectors (scorer, n, d, --max_len, the precision they were
  encoded in, their dtype), the sha256 of vectors.bin, and each world's document ids in order;
- the folder's record (run_safety), and `index.lock` while it is being built.

Entities are ordered as `data_loader.EntitySet` orders them (worlds by name, documents in file
order) and encoded in the chunks of `retriever.entity_chunks`, `--entity_bsz` at a time, never
straddling a world: the very batches `save_candidates.py` encodes, so that the stored float32
vectors are its vectors bit for bit and ranking over them (`retriever.stream_scores` with
`vectors=`) gives its candidates.

`plan_index` checks a folder before any work: a complete index of this retriever and these
entities is reused; one of another retriever or of other entities, or one changed since it was
written, is refused in one line (rebuilt with --overwrite); a folder holding files that are not an
index's is refused; an incomplete one (an interrupted build: there is no manifest) is built anew;
the size is said and refused when the free space cannot hold it. `build_index` then writes it
(run_safety.Outputs: vectors first, the manifest last) and `open_index` memory-maps it.
"""
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from cli import check_flag, die
from data_loader import EntitySet, encode_entities, freeze_objects, read_documents
from retriever import encode_vectors, entity_chunks
from run_safety import (RECORD, Outputs, check_stop, notice, read_record, recorded,
                        release_lock)
from utils import progress

MANIFEST, VECTORS, LOCK = "index.json", "vectors.bin", "index.lock"
FORMAT = "hard-nce-el entity index, version 1"
TOOL = "entity_index"
INDEX_DTYPES = ("float32", "float16")
# The precision the entity encoder ran in (utils.amp_dtype's dtype) and the flag that asks for it
PRECISIONS = {None: ("float32", "--fp32"), torch.bfloat16: ("bfloat16", "--bf16"),
              torch.float16: ("float16", "--fp16")}


def size_text(n):
    """Bytes as a short text.

    >>> size_text(1536), size_text(193.6e9)
    ('1.5 kB', '193.6 GB')
    """
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def vectors_bytes(entities, n, d, dtype):
    """The size of vectors.bin: entities x n vectors x d dimensions x the dtype's bytes.

    >>> vectors_bytes(492321, 128, 768, "float16")  # full Zeshel, sum-of-max over bert-base
    96794247168
    """
    return entities * n * d * np.dtype(dtype).itemsize


# ----------------------------------------------------------------------------------------------
# The entities

def entity_files(path, flag):
    """[(world, file)]: one Zeshel world file (JSON lines of document_id, title, text), the world
    named by the file's name; or every `*.json` / `*.jsonl` file of a folder (a Zeshel
    `documents/` folder, or the Zeshel folder holding one), worlds sorted by name."""
    if os.path.isdir(path):
        folder = os.path.join(path, "documents")
        folder = folder if os.path.isdir(folder) else path
        names = sorted(n for n in os.listdir(folder)
                       if n.endswith((".json", ".jsonl")) and not n.startswith("."))
        check_flag(names, flag, f"{folder} holds no entity files (<world>.json: JSON lines of "
                   f"document_id, title and text)")
        files = [(os.path.splitext(n)[0], os.path.join(folder, n)) for n in names]
    else:
        check_flag(os.path.isfile(path), flag, f"no file or folder {path}")
        files = [(os.path.splitext(os.path.basename(path))[0], path)]
    worlds = [w for w, _ in files]
    twice = sorted({w for w in worlds if worlds.count(w) > 1})
    check_flag(not twice, flag, f"world {twice[0]!r} has two files in {path}" if twice else "")
    return files


def read_entities(path, flag="--entities", known=None):
    """The entities of `path` (entity_files) as a data_loader.EntitySet, with `documents`
    ({world: {document_id: {"title", "text"}}}), `path` (absolute), `digests` ({world: sha256 of
    the file's bytes as read}) and `sha256` (one digest of them all: the entities' content,
    whatever folder holds them). `known`: {file: (documents, sha256)} of files read already
    (data_loader.read_documents'), not read again."""
    documents, digests = {}, {}
    for world, file in entity_files(path, flag):
        documents[world], digests[world] = (known or {}).get(file) or read_documents(file, flag)
    entities = EntitySet(documents, documents)
    entities.documents, entities.digests = documents, digests
    entities.path = os.path.abspath(path)
    entities.sha256 = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    freeze_objects()
    return entities


# ----------------------------------------------------------------------------------------------
# Checking a folder, and what a call will do with it

@dataclass
class Wanted:
    """The index a call needs: its retriever ({"path", "sha256"}), its entities (read_entities),
    the vectors' shape (type_model, n, d, max_len), the precision the entities are encoded in
    (`precision`, a PRECISIONS key, or "any": an existing index's, float32 for a new one) and the
    stored dtype (None: an existing index's, else `default_dtype`). `flags` names, in errors, the
    caller's flags: index, retriever, entities, index_dtype, max_len."""
    retriever: dict
    entities: object
    type_model: str
    n: int
    d: int
    max_len: int
    precision: object = "any"
    dtype: str = None
    default_dtype: str = "float32"
    entity_bsz: int = 512
    flags: dict = field(default_factory=lambda: {
        "index": "--index", "retriever": "--retriever", "entities": "--entities",
        "index_dtype": "--index_dtype", "max_len": "--max_len"})


@dataclass
class Plan:
    """What a call does with an index folder: `reuse` its complete index (manifest) or build one
    (`bytes` to write); `message`, what build_index says when it starts (once every check of
    the run has passed)."""
    folder: str
    wanted: Wanted
    manifest: dict = None
    bytes: int = 0
    message: str = ""
    dtype: str = None

    @property
    def reuse(self):
        return self.manifest is not None


def _ours(name):
    """Whether a file name belongs in an index folder: the index's files, the record, the lock,
    and the temporary files of their writes."""
    if name in (MANIFEST, VECTORS, LOCK, RECORD):
        return True
    return name.startswith(tuple(f".{n}." for n in (MANIFEST, VECTORS, RECORD))) and \
        name.endswith(".tmp")


def read_manifest(folder):
    """The manifest of a complete index in `folder`: index.json and vectors.bin both written by
    this project (unchanged since), the manifest naming that vectors.bin; else None."""
    path, vectors = os.path.join(folder, MANIFEST), os.path.join(folder, VECTORS)
    got = recorded(path)
    if got is None or got[0].get("tool") != TOOL:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    entry = read_record(folder)["files"].get(VECTORS) or {}
    if entry.get("tool") != TOOL or entry.get("sha256") != manifest["vectors"]["sha256"] or \
            recorded(vectors) is None:
        return None
    return manifest


def _mismatch(manifest, wanted):
    """The one line saying why an index (its manifest) is not the one `wanted`, or None."""
    f = wanted.flags
    if manifest["retriever"]["sha256"] != wanted.retriever["sha256"]:
        return (f["retriever"], f"is the index of another retriever ({manifest['retriever']['path']}"
                f", sha256 {manifest['retriever']['sha256'][:12]}), not of "
                f"{wanted.retriever['path']}")
    if manifest["entities"]["sha256"] != wanted.entities.sha256:
        return (f["entities"], f"was built from other entities ({manifest['entities']['path']}: "
                f"{manifest['entities']['count']} entities), not those of "
                f"{wanted.entities.path}")
    shape = {"type_model": wanted.type_model, "n": wanted.n, "d": wanted.d,
             "max_len": wanted.max_len}
    for key, value in shape.items():
        if manifest[key] != value:
            return (f["max_len"] if key == "max_len" else f["retriever"],
                    f"is an index of vectors of {key} {manifest[key]}, not {value}")
    if wanted.precision != "any" and manifest["encoded_in"] != PRECISIONS[wanted.precision][0]:
        name, flag = PRECISIONS[wanted.precision]
        return (flag, f"is an index of entities encoded in {manifest['encoded_in']}, not in "
                      f"{name}")
    if wanted.dtype is not None and manifest["dtype"] != wanted.dtype:
        return (f["index_dtype"], f"is an index of {manifest['dtype']} vectors, not "
                                  f"{wanted.dtype}")
    return None


def plan_index(folder, wanted, overwrite=False, distributed=False):
    """Check the index folder `folder` before any work (module docstring): a Plan, or one line
    (UserError) naming the flag."""
    index_flag = wanted.flags["index"]
    check_flag(not os.path.exists(folder) or os.path.isdir(folder), index_flag,
               f"{folder} is a file, not a folder")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    foreign = [n for n in names if not _ours(n)]
    check_flag(not foreign, index_flag, f"{folder} holds other files than an entity index's "
               f"(e.g. {foreign[0] if foreign else ''}); give an empty or new folder")
    present = [n for n in (MANIFEST, VECTORS) if n in names]
    said = ""
    manifest = read_manifest(folder) if MANIFEST in present else None
    if manifest is not None:
        why = _mismatch(manifest, wanted)
        if why is None:
            return Plan(folder, wanted, manifest=manifest, message=(
                f"reusing the entity index in {folder} ({manifest['entities']['count']} "
                f"entities x {manifest['n']} vectors x {manifest['d']}, {manifest['dtype']}, "
                f"encoded in {manifest['encoded_in']}: {size_text(manifest['vectors']['bytes'])})"))
        if not overwrite:
            die(f"{why[0]}: {folder} {why[1]}; pass --overwrite to rebuild it, or choose "
                f"another {index_flag}")
        said = f"--overwrite: {folder} {why[1]}: rebuilding it; "
    elif MANIFEST in present:
        check_flag(overwrite, index_flag, f"{folder} holds an index changed since it was built "
                   f"(or not built by this project): its {MANIFEST} or {VECTORS} differs from "
                   f"what was written; pass --overwrite to rebuild it")
    elif VECTORS in present:
        ours = recorded(os.path.join(folder, VECTORS))
        if ours is not None and ours[0].get("tool") == TOOL:
            said = (f"{folder} holds an incomplete entity index (an interrupted build: no "
                    f"{MANIFEST}): building it anew; ")
        else:
            check_flag(overwrite, index_flag, f"{os.path.join(folder, VECTORS)} was not written "
                       f"by this project (or changed since); pass --overwrite to replace it")
    check_flag(not distributed, index_flag, f"{folder} holds no complete index of this retriever "
               f"and these entities, and one is built by a single process: build it first "
               f"without torchrun (link.py, or save_candidates.py --store_en_hiddens), then "
               f"every process reads it")
    dtype = wanted.dtype or (manifest or {}).get("dtype") or wanted.default_dtype
    size = vectors_bytes(len(wanted.entities), wanted.n, wanted.d, dtype)
    existing = folder
    while not os.path.isdir(existing):
        existing = os.path.dirname(os.path.abspath(existing))
    free = shutil.disk_usage(existing).free
    removed = sum(os.path.getsize(os.path.join(folder, n)) for n in present)
    what = (f"{len(wanted.entities)} entities x {wanted.n} vectors x {wanted.d} dimensions in "
            f"{dtype}: {size_text(size)}")
    smaller = (" (--index_dtype float16 halves it)" if dtype == "float32" else "")
    check_flag(size + (1 << 20) <= free + removed, index_flag,
               f"the entity index needs {what} but {existing} has {size_text(free)} free"
               f"{smaller}; free some space or choose another {index_flag}")
    return Plan(folder, wanted, bytes=size, dtype=dtype, message=f"{said}building the entity "
                f"index in {folder}: {what} ({size_text(free)} free){smaller}")


# ----------------------------------------------------------------------------------------------
# Building and opening

def _manifest(wanted, dtype, precision, written):
    entities = wanted.entities
    worlds = [{"world": w, "start": start, "end": end, "sha256": entities.digests[w],
               "document_ids": entities.doc_ids[start:end]}
              for w, (start, end) in entities.world_ranges.items()]
    return {"format": FORMAT, "retriever": wanted.retriever,
            "entities": {"path": entities.path, "sha256": entities.sha256,
                         "count": len(entities)},
            "type_model": wanted.type_model, "n": wanted.n, "d": wanted.d,
            "max_len": wanted.max_len, "encoded_in": PRECISIONS[precision][0], "dtype": dtype,
            "entity_bsz": wanted.entity_bsz,
            "vectors": {"file": VECTORS, "sha256": written["sha256"], "bytes": written["bytes"]},
            "worlds": worlds}


@torch.no_grad()
def build_index(plan, model, tokenizer, device, precision=None, quiet=True):
    """Write the index `plan` (plan_index) asks for, or reuse it: the retriever `model` (its
    weights loaded) encodes every entity under autocast to `precision` (utils.amp_dtype) in the
    chunks of retriever.entity_chunks. The lock is taken and the folder checked again first (a
    run beside this one may have built it meanwhile); an earlier index's manifest is removed
    before anything is written, so that an interrupted build leaves no index a later call would
    use. Returns the EntityIndex."""
    notice(plan.message)
    if plan.reuse:
        return open_index(plan.folder, plan.manifest)
    wanted, folder = plan.wanted, os.path.abspath(plan.folder)
    lock = os.path.join(folder, LOCK)
    outputs = Outputs(TOOL, overwrite=True, lock=lock, flag=wanted.flags["index"])
    paths = {role: outputs.add(os.path.join(folder, name), role=role)
             for role, name in (("vectors", VECTORS), ("manifest", MANIFEST))}
    outputs.start()
    try:
        current = read_manifest(folder)
        if current is not None and _mismatch(current, wanted) is None:
            return open_index(folder, current)  # built meanwhile by a run beside this one
        for name in (MANIFEST, VECTORS):  # the manifest first: no complete index meanwhile
            if os.path.exists(os.path.join(folder, name)):
                os.unlink(os.path.join(folder, name))
        dtype = plan.dtype
        description = {"tool": TOOL, "flags": {
            "type_model": wanted.type_model, "n": wanted.n, "d": wanted.d,
            "max_len": wanted.max_len, "encoded_in": PRECISIONS[precision][0], "dtype": dtype},
            "inputs": {"retriever": {"path": wanted.retriever["path"],
                                     "content": {"sha256": wanted.retriever["sha256"]}},
                       "entities": {"path": wanted.entities.path,
                                    "content": {"sha256": wanted.entities.sha256}}}}
        outputs.claim(description)
        entities = wanted.entities
        model.eval()
        chunks = entity_chunks(list(entities.world_ranges.values()), wanted.entity_bsz)

        def write(f):
            for start, end, _ in progress(chunks, desc="entity index", disable=quiet):
                ids, mask = encode_entities(tokenizer, SimpleNamespace(
                    titles=entities.titles[start:end], texts=entities.texts[start:end]),
                    wanted.max_len)
                v = encode_vectors(model.entity_vectors, ids, mask, end - start, device,
                                   precision)                              # (c, n, d) float32
                f.write(v.to(getattr(torch, dtype)).cpu().numpy().tobytes())
                check_stop()  # a stop signal ends the build now, its temporary file removed
        written = outputs.write(paths["vectors"], write, needed=plan.bytes)
        manifest = _manifest(wanted, dtype, precision, written)
        outputs.write_json(manifest, paths["manifest"])
    finally:
        release_lock(lock)
    return open_index(folder, manifest)


class EntityIndex:
    """A complete index, opened: `manifest`, `vectors` (E, n, d) memory-mapped (numpy, read
    only), `world_ranges` {world: (start, end)}, `doc_ids`, `worlds`."""

    def __init__(self, folder, manifest):
        self.folder, self.manifest = folder, manifest
        self.world_ranges = {w["world"]: (w["start"], w["end"]) for w in manifest["worlds"]}
        self.worlds = list(self.world_ranges)
        self.doc_ids = [d for w in manifest["worlds"] for d in w["document_ids"]]
        shape = (len(self.doc_ids), manifest["n"], manifest["d"])
        self.vectors = (np.memmap(os.path.join(folder, VECTORS), dtype=manifest["dtype"],
                                  mode="r", shape=shape) if shape[0] else
                        np.zeros(shape, dtype=manifest["dtype"]))

    @property
    def precision(self):
        """The autocast dtype the entities were encoded in (a PRECISIONS key)."""
        return next(k for k, (name, _) in PRECISIONS.items()
                    if name == self.manifest["encoded_in"])

    def chunk(self, start, end, device):
        """Entities start..end-1: (c, n, d) float32 on `device` (scores are float32 whatever the
        stored dtype)."""
        return torch.from_numpy(np.array(self.vectors[start:end], dtype=np.float32)).to(device)

    def vectors_for(self, entities, device):
        """`vectors(start, end)` for retriever.stream_scores over the EntitySet `entities`
        (a split's, ordered alike within each world): its entity indices mapped to the index's.
        Stops unless each of its worlds is in the index with the same documents in order."""
        offsets = []
        for world, (start, end) in entities.world_ranges.items():
            check_flag(world in self.world_ranges, "--en_hidden_path",
                       f"the index {self.folder} has no world {world!r}")
            s, e = self.world_ranges[world]
            check_flag(self.doc_ids[s:e] == entities.doc_ids[start:end], "--en_hidden_path",
                       f"the documents of world {world!r} differ from those the index "
                       f"{self.folder} was built from")
            offsets.append((start, end, s - start))

        def vectors(start, end):
            shift = next(o for a, b, o in offsets if a <= start < b)
            return self.chunk(start + shift, end + shift, device)
        return vectors


def open_index(folder, manifest=None):
    """The EntityIndex of a complete index folder (its manifest when already read)."""
    manifest = manifest or read_manifest(folder)
    if manifest is None:
        die(f"--index: {folder} holds no complete entity index")
    return EntityIndex(folder, manifest)
