"""Prompt files and the bundled prompt sets: byte-exact copies, read exactly, named by `--prompts NAME`."""

import hashlib

import pytest
from helpers import assert_bad_input, ecviz, ecviz_here

import ecviz as ev
from ecviz.errors import UsageError
from ecviz.prompts import ASSETS, BUNDLED, prompt_path, read_prompts

# SHA-256 of the source files (google-research/parti @ 5a657978, djghosh13/geneval @ af4902f2)
SOURCES = {"parti": "fab29e41bb512a169b56acab4cf2a41dcb675e285df2efcde6640c7dd3c440eb",
           "geneval": "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"}


def test_bundled_sets_are_byte_exact_copies_with_their_licences():
    for name, sha in SOURCES.items():
        assert hashlib.sha256(prompt_path(name).read_bytes()).hexdigest() == sha, name
    readme = (ASSETS / "README.md").read_text()
    for licence in ("LICENSE-PartiPrompts.txt", "LICENSE-geneval.txt"):
        assert licence in readme and (ASSETS / licence).is_file()
    assert "Apache License" in (ASSETS / "LICENSE-PartiPrompts.txt").read_text()
    assert "Dhruba Ghosh" in (ASSETS / "LICENSE-geneval.txt").read_text()
    assert set(BUNDLED) == {"parti", "geneval", "shapes", "shapes-eval"}


def test_the_shapes_eval_set_is_what_its_generator_draws():
    import json

    from ecviz.data.shapes import eval_prompts

    rows = [json.loads(line) for line in prompt_path("shapes-eval").read_text().splitlines()]
    assert rows == eval_prompts(48, seed=2026)
    ps = read_prompts("shapes-eval")
    assert len(ps) == 288 and all(ps.category.count(c) == 48 for c in set(ps.category)) and len(set(ps.category)) == 6


def test_parti_prompts_load_exactly():
    ps = read_prompts("parti")
    assert len(ps) == 1632 and ps.kind == "parti" and ps.path == ASSETS / "PartiPrompts.tsv"
    assert sum(p.startswith('"G I G G L E"') for p in ps.prompts) == 1
    raw = prompt_path("parti").read_text().split("\n")[1:-1]
    assert ps.prompts == [line.split("\t")[0] for line in raw]  # byte-exact, spaces and quotes kept
    assert len(set(ps.category)) == 12 and len(set(ps.challenge)) == 11
    assert ps.prompts[:4] == ["bond", "element", "molecule", "life"]
    ge = read_prompts("geneval")
    assert len(ge) == 553 and ge.kind == "geneval" and ge.category.count("position") == 100
    assert sum("exclude" in m for m in ge.meta) == 80  # every counting prompt keeps its exclude list
    shapes = read_prompts("shapes")
    assert len(shapes) == 36 and len(set(shapes.category)) == 6


def test_a_name_is_a_bundled_set_and_anything_else_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "parti").write_text("my own prompt\n")
    assert read_prompts("parti").kind == "parti"  # the name wins
    assert read_prompts("./parti").prompts == ["my own prompt"]  # a path says so
    with pytest.raises(UsageError, match=r"not found .*parti, geneval, shapes"):
        read_prompts("partii")


def test_a_jsonl_prompt_that_is_empty_or_not_unicode_text_is_refused_with_its_line(tmp_path):
    """Plain files skip blank lines; a JSONL `"prompt": ""` was taken as a prompt, and a `\\ud800` escape (half a
    surrogate pair) reached the tokenizer, whose TypeError was a traceback after the store was created."""
    f = tmp_path / "p.jsonl"
    for doc, words in (('{"prompt": "a circle"}\n{"prompt": "  "}', "line 2: the prompt is empty"),
                       ('{"prompt": "a \\ud800 circle"}', "line 1: the prompt is not Unicode text")):
        f.write_text(doc + "\n")
        with pytest.raises(UsageError, match=words):
            read_prompts(f)
    upper = tmp_path / "P.JSONL"  # the suffix in any case: each line was taken whole as a prompt
    upper.write_text('{"tag": "single_object", "prompt": "a circle"}\n')
    assert read_prompts(upper).prompts == ["a circle"] and read_prompts(upper).kind == "geneval"


def test_a_tsv_is_partiprompts_or_refused_and_its_empty_prompts_too(tmp_path):
    """A Parti row with an empty prompt was traced as ""; a .tsv with another header was read as plain text, its
    header becoming prompt 0 and its tabs part of every prompt."""
    f = tmp_path / "p.tsv"
    f.write_text("Prompt\tCategory\tChallenge\tNote\na circle\tAbstract\tBasic\t\n \tAbstract\tBasic\t\n")
    with pytest.raises(UsageError, match="line 3: the prompt is empty"):
        read_prompts(f)
    f.write_text("Prompt\tCategory\na circle\tAbstract\n")
    with pytest.raises(UsageError, match=r"a \.tsv whose header is not PartiPrompts'"):
        read_prompts(f)
    f.rename(tmp_path / "p.txt")  # as plain text, on purpose
    assert read_prompts(tmp_path / "p.txt").prompts == ["Prompt\tCategory", "a circle\tAbstract"]


def test_trace_and_eval_take_bundled_names(ckpts, tmp_path, capsys):
    out = tmp_path / "g.zarr"
    ecviz("trace", "--ckpt", ckpts["ec"], "--prompts", "geneval", "--limit", 2, "--steps", 1, "--quiet",
          "--out", out, check=True)
    ds = ev.open_trace(out)
    assert ds.attrs["prompt_file"] == "geneval_metadata.jsonl" and ds.attrs["prompt_file_kind"] == "geneval"
    assert ds.attrs["prompt_file_sha256"] == SOURCES["geneval"]
    assert list(ds.prompt.values) == ["a photo of a bench", "a photo of a cow"]
    assert list(ds.category.values) == ["single_object"] * 2
    assert_bad_input(ecviz("eval", "--ckpt", ckpts["ec"], "--prompts", "nosuchset"), "not found", "shapes")
    assert_bad_input(ecviz("eval", "--ckpt", ckpts["ec"], "--grid", tmp_path / "g.jpg"), "the grid is a PNG")
    assert not (tmp_path / "g.jpg").exists()  # it was written as PNG bytes under a .jpg name, after the sampling
    # GenEval's own prompts name COCO classes no Shapes model draws: refused before sampling, not scored 0%
    assert_bad_input(ecviz("eval", "--ckpt", ckpts["ec"], "--prompts", "geneval", "--steps", 1),
                     "prompt 1", "class 'bench'", "--prompts shapes-eval")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"tag": "position", "include": [{"class": "ring", "count": 1}, {"class": "square", '
                     '"count": 1, "position": ["behind", 0]}], "prompt": "a square behind a ring"}\n')
    assert_bad_input(ecviz("eval", "--ckpt", ckpts["ec"], "--prompts", wrong, "--steps", 1), "relation 'behind'",
                     "(relations: left of, right of, above, below)")  # it listed the shape classes
    # a malformed spec failed with a KeyError or AttributeError only after every image was sampled
    for include, words in (('[{"class": "circle"}]', 'object 1 needs a whole "count"'),
                           ('{"class": "circle", "count": 1}', '"include" must be a non-empty list'),
                           ('[]', '"include" must be a non-empty list'),
                           ('[{"class": "ring", "count": 1}, {"class": "square", "count": 1, "position": '
                            '["left of", 3]}]', 'object 2\'s "position" must be [relation, index of another')):
        wrong.write_text(f'{{"tag": "position", "include": {include}, "prompt": "a square left of a ring"}}\n')
        assert_bad_input(ecviz_here(capsys, "eval", "--ckpt", ckpts["ec"], "--prompts", wrong, "--steps", 1), words)
