"""Manifests as spreadsheets and scripts write them: what ``read_manifest`` takes (Excel's
``sep=`` line, rows of blanks) and what it refuses with the file and line named instead of
misreading or crashing (another encoding, an unclosed quote, a header without an image
column, a JSON key twice or a list where a path goes, a line nested past the parser)."""
from __future__ import annotations

import pytest
from PIL import Image

from cgidm.manifest import read_manifest


@pytest.fixture()
def tree(tmp_path):
    for name in ("base", "ft"):
        (tmp_path / name).mkdir()
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / name)
    return tmp_path


def _read(tree, name, text, encoding="utf-8"):
    path = tree / name
    path.write_bytes(text.encode(encoding))
    return read_manifest(path, str(tree / "base"), str(tree / "ft"))


def test_what_spreadsheets_write_is_read(tree):
    entries = _read(tree, "m.csv", "sep=,\r\nimage,label\r\nimg/a.png,member\r\n  ,  \r\n,,\r\nimg/b.png,holdout\r\n")
    assert [(e.path.name, e.label) for e in entries] == [("a.png", "member"), ("b.png", "holdout")]


@pytest.mark.parametrize("name,text,encoding,message", [
    ("latin1.csv", "image,label\nimg/caf\u00e9.png,member\n", "latin-1", r"not UTF-8 text .*save the manifest as UTF-8"),
    ("open.csv", 'image,label\n"img/a.png,member\nimg/b.png,holdout\n', "utf-8", r"open.csv:2: not valid CSV"),
    ("semi.csv", "image;label\nimg/a.png;member\n", "utf-8", r"semi.csv:1: the header has no 'image' column \(found 'image;label'\)"),
    ("tabs.csv", "image\tlabel\nimg/a.png\tmember\n", "utf-8", r"tabs.csv:1: the header has no 'image' column"),
    ("twice.jsonl", '{"image": "img/a.png", "Image": "img/b.png"}\n', "utf-8", r"twice.jsonl:1: the key 'image' is given twice"),
    ("list.jsonl", '{"image": ["img/a.png"]}\n', "utf-8", r"list.jsonl:1: image must be a string, got a list"),
    ("deep.jsonl", '{"image": "img/a.png", "x": ' + "[" * 100000 + "]" * 100000 + "}\n", "utf-8",
     r"deep.jsonl:1: not a JSON object \(RecursionError\)"),
])
def test_a_manifest_that_cannot_be_read_says_where(tree, name, text, encoding, message):
    with pytest.raises(ValueError, match=message):
        _read(tree, name, text, encoding)


def test_a_quote_left_open_across_lines_is_not_one_image(tree):
    """A quote opened on line 2 and closed on line 4 is valid CSV: one cell over three
    lines, which is no image path. Refused naming the line where it starts."""
    text = 'image,label\n"img/a.png,member\nimg/b.png,holdout\nimg/c.png",holdout\n'
    with pytest.raises(ValueError, match=r"m.csv:2: the image cell spans lines"):
        _read(tree, "m.csv", text)


def test_a_json_array_of_rows_is_read_and_its_entries_named(tree):
    """A ``.json`` file holding an array of rows (what a script's ``json.dump`` of a list
    writes) is read as JSON Lines is; a bad entry is named by its number."""
    entries = _read(tree, "m.json", '[{"image": "img/a.png", "label": "member"},\n {"image": "img/b.png"}]\n')
    assert [(e.path.name, e.label) for e in entries] == [("a.png", "member"), ("b.png", None)]
    with pytest.raises(ValueError, match=r"m.json: entry 2: not a JSON object"):
        _read(tree, "m.json", '[{"image": "img/a.png"}, "img/b.png"]')
    with pytest.raises(ValueError, match=r"m.json: entry 1: label must be one of"):
        _read(tree, "m.json", '[{"image": "img/a.png", "label": "maybe"}]')
    with pytest.raises(ValueError, match=r"m.json: not a JSON array of objects"):
        _read(tree, "m.json", '[{"image": "img/a.png"}')


def test_one_file_under_two_names_and_two_labels_is_refused(tree):
    """A link to a member listed as a control for the same models would score against
    itself: refused, as authenticate refuses it; the same file for another pair is fine."""
    (tree / "img" / "alias.png").symlink_to(tree / "img" / "a.png")
    with pytest.raises(ValueError, match=r"m.csv:3: img/alias.png is the file img/a.png \(labelled 'member'\) for "
                                         r"the same models, here labelled 'control'"):
        _read(tree, "m.csv", "image,label\nimg/a.png,member\nimg/alias.png,control\n")
    (tree / "ft2").mkdir()
    entries = _read(tree, "m.csv", "image,label,finetuned\nimg/a.png,member,ft\nimg/alias.png,control,ft2\n")
    assert len(entries) == 2


def test_one_image_listed_labelled_and_unlabelled_is_said_in_words(tree):
    with pytest.raises(ValueError, match=r"listed twice for the same models with labels 'holdout' and none "
                                         r"\(unlabelled\)"):
        _read(tree, "m.csv", "image,label\nimg/a.png,holdout\nimg/a.png,\n")
