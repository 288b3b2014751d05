"""link.py, Linker and the stored entity index on the toy world (docs/linking.md): Zeshel rows get
exactly save_candidates.py's candidates, the reranker's `linked` exactly main_reranker.py's test
accuracy; the index is reused, refused when it is another retriever's or other entities', never
left half-built; mistakes are one line. Every script runs in this process (main(argv))."""
import io
import json
import os
import shutil
import signal

import pytest
import torch

import entity_index
import link
import main_reranker
import main_retriever
import save_candidates
from conftest import fails_with, read_jsonl
from reranker import linking_accuracy

K = 4  # candidates per mention, and the reranker's --C / --C_eval
CHUNK = "20"  # --entity_bsz: chunks of 20, 20, 20, 12 in each world of 72 entities


def run(main, argv, capsys=None):
    """main(argv) in this process; its stderr (when capsys is given)."""
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err if capsys else e.code
    return capsys.readouterr().err if capsys else None


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """A retriever (one epoch), its candidates (save_candidates.py), a cross-encoder reranker (one
    epoch) on them, and an entity index built by link.py: their paths."""
    data, bert = toy
    out = tmp_path_factory.mktemp("linking")
    p = {"data": data, "bert": bert, "ret": str(out / "ret.pt"), "cands": str(out / "cands"),
         "rr": str(out / "rr.pt"), "index": str(out / "index"), "out": out}
    run(main_retriever.main, ["--model", p["ret"], "--data_dir", data, "--pretrained", bert,
                              "--max_len", 16, "--k", K, "--num_cands", 4, "--type_cands",
                              "mixed_negative", "--cands_ratio", 0.5, "--type_model", "sum_max",
                              "--num_mention_vecs", 8, "--num_entity_vecs", 8, "--B", 8, "--lr",
                              2e-4, "--epochs", 1, "--quiet"])
    run(save_candidates.main, ["--model", p["ret"], "--data_dir", data, "--cands_dir",
                               p["cands"], "--num_cands", K, "--entity_bsz", CHUNK,
                               "--mention_bsz", 50, "--quiet"])
    run(main_reranker.main, ["--model", p["rr"], "--data", data, "--cands_dir", p["cands"],
                             "--pretrained", bert, "--C", K, "--C_eval", K, "--L", 16, "--B", 4,
                             "--lr", 1e-3, "--epochs", 1, "--inputmark", "--quiet"])
    return p


def link_argv(p, *extra, mentions="test", out=None):
    argv = ["--retriever", p["ret"], "--index", p["index"], "--k", K, "--entity_bsz", CHUNK,
            "--quiet", *extra]
    if mentions:
        argv += ["--mentions", os.path.join(p["data"], "mentions", f"{mentions}.json")]
    return argv + ["--out", out] if out else argv


@pytest.fixture(scope="module")
def linked(trained):
    """link.py over the test mentions (Zeshel rows), the first call: it builds the index."""
    out = str(trained["out"] / "linked_test.jsonl")
    run(link.main, link_argv(trained, "--entities", os.path.join(trained["data"], "documents"),
                             out=out))
    return out


def candidate_ids(row):
    return [c["document_id"] for c in row["candidates"]]


def test_zeshel_rows_get_save_candidates_candidates_and_a_second_call_reuses_the_index(
        trained, linked, capsys):
    expected = read_jsonl(os.path.join(trained["cands"], "candidates_test.json"))
    got = read_jsonl(linked)
    assert [r["id"] for r in got] == [r["mention_id"] for r in expected]
    assert [candidate_ids(r) for r in got] == [r["candidates"] for r in expected]
    for r in got:  # best first, each with its title and score; linked is the top one
        scores = [c["retriever_score"] for c in r["candidates"]]
        assert scores == sorted(scores, reverse=True) and r["linked"] == r["candidates"][0][
            "document_id"] and all(c["title"] for c in r["candidates"])
    vectors = os.path.join(trained["index"], entity_index.VECTORS)
    before = os.stat(vectors).st_mtime_ns
    # val: mentions the first call never saw, the index reused (entities from its manifest)
    out = str(trained["out"] / "linked_val.jsonl")
    err = run(link.main, link_argv(trained, mentions="val", out=out), capsys)
    assert "reusing the entity index" in err and "building" not in err
    assert os.stat(vectors).st_mtime_ns == before
    expected = read_jsonl(os.path.join(trained["cands"], "candidates_val.json"))
    assert [candidate_ids(r) for r in read_jsonl(out)] == [r["candidates"] for r in expected]


def test_the_index_holds_every_entity_encoded_as_the_retriever_encodes_it(trained, linked):
    from retriever import load_retriever
    manifest = entity_index.read_manifest(trained["index"])
    entities = entity_index.read_entities(os.path.join(trained["data"], "documents"))
    assert manifest["entities"]["count"] == len(entities) == 7 * 72
    assert [w["world"] for w in manifest["worlds"]] == sorted(entities.worlds)
    assert [d for w in manifest["worlds"] for d in w["document_ids"]] == entities.doc_ids
    state = torch.load(trained["ret"], weights_only=True)
    tokenizer, model = load_retriever(trained["bert"], "sum_max", 8, 8)
    model.load_state_dict(state["model"])
    model.eval()
    index = entity_index.open_index(trained["index"])
    assert index.vectors.shape == (504, 8, 64) and index.vectors.dtype == "float32"
    from data_loader import encode_entities
    from types import SimpleNamespace
    pick = [0, 71, 72, 300, 503]
    ids, mask = encode_entities(tokenizer, SimpleNamespace(
        titles=[entities.titles[i] for i in pick], texts=[entities.texts[i] for i in pick]), 16)
    with torch.no_grad():
        v = model.entity_vectors(ids, mask)
    assert torch.allclose(index.chunk(0, 504, "cpu")[pick], v, atol=1e-5)


def test_store_en_hiddens_writes_the_same_index_and_ranks_the_same_candidates(trained, linked,
                                                                               capsys):
    common = ["--model", trained["ret"], "--data_dir", trained["data"], "--num_cands", K,
              "--entity_bsz", CHUNK, "--mention_bsz", 50, "--quiet", "--store_en_hiddens"]
    fresh, cands = str(trained["out"] / "hidden"), str(trained["out"] / "cands_hidden")
    run(save_candidates.main, common + ["--en_hidden_path", fresh, "--cands_dir", cands])
    with open(os.path.join(cands, "save_candidates.log")) as f:
        assert "building the entity index" in f.read()
    with open(os.path.join(fresh, entity_index.VECTORS), "rb") as a, \
            open(os.path.join(trained["index"], entity_index.VECTORS), "rb") as b:
        assert a.read() == b.read()  # the vectors link.py stored, bit for bit
    for split in ("train", "val", "test"):
        assert read_jsonl(os.path.join(cands, f"candidates_{split}.json")) == read_jsonl(
            os.path.join(trained["cands"], f"candidates_{split}.json"))
    # over link.py's index: reused, and again the same candidates
    again = str(trained["out"] / "cands_reused")
    run(save_candidates.main, common + ["--en_hidden_path", trained["index"], "--cands_dir",
                                        again])
    with open(os.path.join(again, "save_candidates.log")) as f:
        assert "reusing the entity index" in f.read()
    assert read_jsonl(os.path.join(again, "candidates_test.json")) == read_jsonl(
        os.path.join(trained["cands"], "candidates_test.json"))


def test_reranked_linked_gives_main_reranker_test_accuracy(trained, linked):
    out = str(trained["out"] / "reranked.jsonl")
    run(link.main, link_argv(trained, "--reranker", trained["rr"], out=out))
    got = read_jsonl(out)
    mentions = read_jsonl(os.path.join(trained["data"], "mentions", "test.json"))
    unranked = read_jsonl(linked)
    for r, plain in zip(got, unranked):  # the same k candidates, re-sorted by the reranker
        assert sorted(candidate_ids(r)) == sorted(candidate_ids(plain))
        scores = [c["reranker_score"] for c in r["candidates"]]
        assert scores == sorted(scores, reverse=True) and r["linked"] == candidate_ids(r)[0]
    kept = [m["label_document_id"] in candidate_ids(r) for m, r in zip(mentions, got)]
    correct = [m["label_document_id"] == r["linked"] for m, r in zip(mentions, got)]
    ours = linking_accuracy([m["corpus"] for m in mentions], kept, correct)
    theirs = json.load(open(trained["rr"] + ".results.json"))["test"]
    assert ours["per_world"] == theirs["per_world"]
    assert ours["macro"] == theirs["macro"] and ours["micro"] == theirs["micro"]
    assert sum(correct) > 0 and not all(kept)  # both counts exercised
    assert sum(r["linked"] != p["linked"] for r, p in zip(got, unranked)) > 0  # it reranked
    # each pair scored as main_reranker.py's evaluation builds and scores it (its candidates,
    # gold first, of the mentions it keeps)
    from types import SimpleNamespace
    from data_loader import Zeshel, load_encoder, load_tokenizer
    from reranker import FullRanker
    zeshel = Zeshel(trained["data"], ("test",))
    args = SimpleNamespace(cands_dir=trained["cands"], C=K, C_eval=K, type_model="full", L=16,
                           inputmark=True)
    (rows, kept), _ = main_reranker.split_candidates(args, zeshel, "test", False)
    dataset, _ = main_reranker.load_split(args, zeshel, load_tokenizer(trained["bert"]), "test",
                                          False, rows, kept)
    tokenizer = load_tokenizer(trained["bert"])
    model = FullRanker(load_encoder(trained["bert"], tokenizer))
    model.load_state_dict(torch.load(trained["rr"], weights_only=True)["model"])
    model.eval()
    doc_ids = zeshel.entities("test").doc_ids
    for i in range(len(dataset)):
        m, ids, types, mask = dataset[i]
        with torch.no_grad():
            theirs = model(ids[None], types[None], mask[None])[0]
        ours = {c["document_id"]: c["reranker_score"] for c in got[m]["candidates"]}
        assert torch.allclose(torch.tensor([ours[doc_ids[e]] for e in rows[m]]), theirs,
                              atol=1e-4), m


def test_blink_rows_typed_text_and_the_python_api_agree(trained, linked, capsys, monkeypatch):
    mentions = read_jsonl(os.path.join(trained["data"], "mentions", "test.json"))[:12]
    docs = entity_index.read_entities(os.path.join(trained["data"], "documents")).documents
    blink = []
    for m in mentions:
        words = docs[m["corpus"]][m["context_document_id"]]["text"].split()
        s, e = m["start_index"], m["end_index"]
        blink.append({"id": m["mention_id"], "context_left": " ".join(words[:s]),
                      "mention": " ".join(words[s:e + 1]),
                      "context_right": " ".join(words[e + 1:]), "world": m["corpus"]})
    path = trained["out"] / "blink.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in blink))
    out = str(trained["out"] / "blink_out.jsonl")
    run(link.main, link_argv(trained, "--mentions", path, mentions=None, out=out))
    assert [candidate_ids(r) for r in read_jsonl(out)] == [candidate_ids(r) for r in
                                                        read_jsonl(linked)[:12]]
    # without a world: ranked over all 504 entities; typed text with the mention in [[ ]]
    pooled = [{k: v for k, v in r.items() if k != "world"} for r in blink]
    linker = link.Linker(trained["ret"], trained["index"], entity_bsz=int(CHUNK))
    api = linker.link(pooled, k=K)
    typed = "".join(f"{r['context_left']} [[{r['mention']}]] {r['context_right']}\n"
                    for r in blink)
    monkeypatch.setattr("sys.stdin", io.StringIO(typed))
    capsys.readouterr()
    run(link.main, link_argv(trained, mentions=None))
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in printed] == list(range(1, 13)) and [r["id"] for r in api] == [
        m["mention_id"] for m in mentions]
    assert [r["candidates"] for r in printed] == [r["candidates"] for r in api]
    assert all(r["world"] is None for r in api + printed)
    own = read_jsonl(out)  # the best of all entities scores at least the best of the own world
    assert all(p["candidates"][0]["retriever_score"] >= o["candidates"][0]["retriever_score"]
               for p, o in zip(api, own))
    unnamed = linker.link([{k: v for k, v in pooled[1].items() if k != "id"}], k=K)[0]
    assert unnamed["id"] == 1 and unnamed["candidates"] == api[1]["candidates"]
    scores = linker.link(blink, k=K)
    assert [r["candidates"] for r in scores] == [r["candidates"] for r in read_jsonl(out)]


def copy_index(trained, name):
    path = str(trained["out"] / name)
    shutil.copytree(trained["index"], path)  # copy2: times kept, so the record still knows it
    return path


def test_an_index_of_another_retriever_or_other_entities_is_refused_and_overwrite_rebuilds(
        trained, linked, capsys):
    index = copy_index(trained, "index_refusals")
    other = str(trained["out"] / "other.pt")
    state = torch.load(trained["ret"], weights_only=True)
    state["model"] = {k: v + 1e-3 if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    torch.save(state, other)
    before = {n: os.stat(os.path.join(index, n)).st_mtime_ns for n in os.listdir(index)}
    argv = link_argv(dict(trained, index=index), out=str(trained["out"] / "refused.jsonl"))
    fails_with(link.main, capsys, [*argv[:1], other, *argv[2:]], "--retriever",
               "another retriever", "--overwrite")
    world = os.path.join(trained["data"], "documents", "frost_fjord.json")
    few = trained["out"] / "frost_fjord_mentions.jsonl"  # mentions of that world alone
    few.write_text("".join(json.dumps(m) + "\n" for m in read_jsonl(argv[argv.index(
        "--mentions") + 1]) if m["corpus"] == "frost_fjord"))
    fails_with(link.main, capsys, argv + ["--entities", world, "--mentions", few], "--entities",
               "other entities")
    fails_with(link.main, capsys, argv + ["--index_dtype", "float16"], "--index_dtype",
               "float32 vectors, not float16")
    assert {n: os.stat(os.path.join(index, n)).st_mtime_ns for n in os.listdir(index)} == before
    assert not os.path.exists(trained["out"] / "refused.jsonl")
    err = run(link.main, [*argv[:1], other, *argv[2:], "--overwrite"], capsys)
    assert "--overwrite" in err and "rebuilding" in err
    assert entity_index.read_manifest(index)["retriever"]["path"] == other


def test_an_interrupted_build_leaves_no_index_a_later_call_uses(trained, linked, capsys,
                                                                monkeypatch):
    index = str(trained["out"] / "index_interrupted")
    argv = link_argv(dict(trained, index=index), "--entities",
                     os.path.join(trained["data"], "documents"),
                     out=str(trained["out"] / "interrupted.jsonl"))
    real, calls = entity_index.encode_vectors, []

    def stopped_midway(*a, **kw):  # SIGTERM arrives while the third chunk is encoded
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)
    monkeypatch.setattr(entity_index, "encode_vectors", stopped_midway)
    with pytest.raises(SystemExit) as e:
        link.main([str(a) for a in argv])
    assert e.value.code == 128 + signal.SIGTERM and len(calls) == 3  # stopped at once
    assert "stopped by SIGTERM" in capsys.readouterr().err
    left = os.listdir(index) if os.path.isdir(index) else []
    assert not [n for n in left if n != entity_index.RECORD], left  # no vectors, no temp file
    monkeypatch.setattr(entity_index, "encode_vectors", real)
    run(link.main, argv)
    # killed between the vectors and the manifest: no manifest, so no index; built anew
    os.unlink(os.path.join(index, entity_index.MANIFEST))
    err = run(link.main, argv, capsys)
    assert "incomplete entity index" in err and "building it anew" in err
    assert entity_index.read_manifest(index) is not None
    assert read_jsonl(str(trained["out"] / "interrupted.jsonl")) == read_jsonl(linked)


def test_an_index_the_free_space_cannot_hold_is_refused_before_anything_is_written(
        trained, linked, capsys, monkeypatch):
    index = str(trained["out"] / "index_full_disk")
    usage = shutil.disk_usage(str(trained["out"]))
    monkeypatch.setattr(entity_index.shutil, "disk_usage",
                        lambda path: usage._replace(free=100_000))
    argv = link_argv(dict(trained, index=index), "--entities",
                     os.path.join(trained["data"], "documents"))
    size = entity_index.size_text(504 * 8 * 64 * 4)
    fails_with(link.main, capsys, argv, "--index", size, "100.0 kB free",
               "--index_dtype float16")
    assert not os.path.exists(index)


def test_main_retriever_still_takes_the_original_flags_and_says_they_do_nothing_there():
    from cli import COMPATIBILITY_FLAGS
    parser = main_retriever.build_parser()
    args = parser.parse_args(["--store_en_hiddens", "--en_hidden_path", "/x"])
    assert {"store_en_hiddens", "en_hidden_path"} <= parser.compat
    assert "save_candidates.py --store_en_hiddens" in COMPATIBILITY_FLAGS["store_en_hiddens"][1]
    args = save_candidates.build_parser().parse_args(["--store_en_hiddens", "--en_hidden_path",
                                                      "/x", "--index_dtype", "float16"])
    assert args.store_en_hiddens and args.en_hidden_path == "/x"


@pytest.mark.parametrize("case", ["missing field", "span", "unknown world", "blink world",
                                  "unmarked", "vocabulary", "foreign files", "en_hidden_path",
                                  "store without path"])
def test_mistakes_are_one_line_and_write_nothing(trained, linked, capsys, monkeypatch, case):
    out = trained["out"] / f"mistake_{case.replace(' ', '_')}"
    out.mkdir()
    test_rows = read_jsonl(os.path.join(trained["data"], "mentions", "test.json"))
    bad = out / "mentions.jsonl"

    def mentions(row):
        rows = [test_rows[0], row]
        bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return link_argv(trained, "--mentions", bad, mentions=None, out=out / "o.jsonl")
    m = dict(test_rows[1])
    if case == "missing field":
        del m["start_index"]
        argv, words = mentions(m), [f"{bad}:2", "missing field 'start_index'"]
    elif case == "span":
        m["end_index"] = m["start_index"] = 10_000
        argv, words = mentions(m), [f"{bad}:2", "outside its context document"]
    elif case == "unknown world":
        m["corpus"] = "atlantis"
        argv, words = mentions(m), [f"{bad}:2", "corpus 'atlantis' is not a world"]
    elif case == "blink world":
        argv, words = mentions({"id": 1, "context_left": "a", "mention": "b",
                                "context_right": "c", "world": "atlantis"}), [
            f"{bad}:2", "world 'atlantis' is not a world"]
    elif case == "unmarked":
        monkeypatch.setattr("sys.stdin", io.StringIO("the [[Zorbik]] knight\nno mark here\n"))
        argv, words = link_argv(trained, mentions=None), ["stdin:2", "[[double brackets]]"]
    elif case == "vocabulary":
        state = torch.load(trained["rr"], weights_only=True)
        state["inputs"]["pretrained"]["vocabulary"] = "0" * 64
        torch.save(state, out / "rr.pt")
        argv = link_argv(trained, "--reranker", out / "rr.pt", out=out / "o.jsonl")
        words = ["--reranker", "another encoder's vocabulary"]
    elif case == "foreign files":
        (out / "index").mkdir()
        (out / "index" / "notes.txt").write_text("mine")
        argv = link_argv(dict(trained, index=out / "index"), "--entities",
                         os.path.join(trained["data"], "documents"), out=out / "o.jsonl")
        words = ["--index", "notes.txt", "other files"]
    else:  # save_candidates.py: the index folder and its flag go together
        flags = (["--en_hidden_path", out / "x"] if case == "en_hidden_path" else
                 ["--store_en_hiddens"])
        argv = ["--model", trained["ret"], "--data_dir", trained["data"], "--cands_dir",
                out / "cands", *flags]
        fails_with(save_candidates.main, capsys, argv, flags[0])
        assert sorted(os.listdir(out)) == []
        return
    before = sorted(os.listdir(out))
    capsys.readouterr()
    fails_with(link.main, capsys, argv, *words)
    assert sorted(os.listdir(out)) == before
    if case == "foreign files":
        assert os.listdir(out / "index") == ["notes.txt"]


@pytest.mark.slow
def test_the_demo_ends_by_linking_two_typed_sentences(trained, linked, capsys):
    """demo.py's last stage (link.py in a process, fed two typed lines), here on the toy world."""
    import demo
    rows = demo.link_typed(str(trained["out"] / "demo"), trained["data"], trained["ret"],
                           trained["rr"])
    printed = capsys.readouterr().out
    lines, golds = demo.typed_sentences(trained["data"])
    assert [r["id"] for r in rows] == [1, 2] and len(lines) == 2
    for line, row, gold in zip(lines, rows, golds):
        assert "[[" in line and line in printed and f"the mention's entity: {gold}" in printed
        assert len(row["candidates"]) == demo.K and "reranker_score" in row["candidates"][0]
        assert row["linked"] == row["candidates"][0]["document_id"]
    assert "| python link.py --retriever" in printed


def test_a_float16_index_holds_the_float32_vectors_rounded_and_torchrun_only_reads(trained,
                                                                                    linked):
    from cli import UserError
    half = str(trained["out"] / "index_float16")
    linker = link.Linker(trained["ret"], half, index_dtype="float16",
                         entities=os.path.join(trained["data"], "documents"),
                         entity_bsz=int(CHUNK))
    full = entity_index.open_index(trained["index"])
    assert linker.index.vectors.dtype == "float16"
    assert (linker.index.vectors == full.vectors.astype("float16")).all()
    assert os.path.getsize(os.path.join(half, entity_index.VECTORS)) * 2 == os.path.getsize(
        os.path.join(trained["index"], entity_index.VECTORS))
    # under torchrun every process reads an existing index; none builds one
    with pytest.raises(UserError, match="without torchrun"):
        entity_index.plan_index(str(trained["out"] / "index_new"), linker.wanted,
                                distributed=True)
    assert entity_index.plan_index(half, linker.wanted, distributed=True).reuse
