"""toy_world.py's command line: every mistake refused in one line before anything is made."""
import pytest

from conftest import assert_refused, run_in_process, tree

REFUSED = [
    (["--seed", "-1"], ["--seed", "at least 0"]),
    (["--seed", str(2 ** 64)], ["--seed", "at most"]),
    (["--zeshel_scale", "0"], ["--zeshel_scale"]),
    (["--zeshel_scale", "1.5"], ["--zeshel_scale"]),
    (["--zeshel_scale", "nan"], ["--zeshel_scale", "finite"]),
    (["--demo", "--zeshel_scale", "0.1"], ["--demo", "--zeshel_scale"]),
    (["--no_such_flag"], ["--no_such_flag"]),
]


@pytest.mark.parametrize("argv, words", REFUSED, ids=[" ".join(r[0]) for r in REFUSED])
def test_mistakes_are_refused_before_anything_is_made(argv, words, tmp_path, capfd):
    before = tree(tmp_path)
    code, lines, _ = run_in_process("toy_world.py", [str(tmp_path / "world")] + argv, capfd)
    assert_refused(code, lines, words, [tmp_path], [before])


@pytest.mark.parametrize("demo", [[], ["--demo"]])
def test_a_users_file_where_the_world_goes_is_refused_and_kept(demo, tmp_path, capfd):
    """A file in data/ or bert/ that toy_world.py did not write stops it before anything is
    written, unless --overwrite; OUT_DIR a file: one line."""
    (tmp_path / "w" / "data" / "mentions").mkdir(parents=True)
    (tmp_path / "w" / "data" / "mentions" / "train.json").write_text("the user's own\n")
    (tmp_path / "file").write_text("x")
    before = tree(tmp_path)
    code, lines, _ = run_in_process("toy_world.py", [str(tmp_path / "w")] + demo, capfd)
    assert_refused(code, lines, ["OUT_DIR", "train.json", "--overwrite"], [tmp_path], [before])
    code, lines, _ = run_in_process("toy_world.py", [str(tmp_path / "file" / "w")] + demo, capfd)
    assert_refused(code, lines, ["OUT_DIR", "is a file"], [tmp_path], [before])
