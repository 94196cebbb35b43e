"""Counterfactual data augmentation (``data/augment.py``, ``data/augment_rows.py``): whole-word, case-keeping
swaps, the her/his role rule, names, pair files and their errors, the hash-drawn choice of documents, and the
wiring into ``data prepare`` (single-process and sharded give the same shards) and ``data augment``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fmforge.cli import main
from fmforge.data import text_units
from fmforge.data.augment import Augmenter, augment_settings, load_swapper, parse_pairs
from fmforge.data.augment_rows import augment_jsonl
from fmforge.data.prepare import prepare_data
from fmforge.data.shards import read_shard
from fmforge.data.tokenizer import load_tokenizer
from fmforge.errors import FmforgeError
from fmforge.launch.data_prepare import prepare_sharded

TEMPLATES = (
    "Report {i}: he said his sister would visit her uncle on day {i}.",
    "Entry {i}. The actress thanked the waiter, and she gave him {i} coins.",
    "Note {i}: the weather was mild and the river rose by {i} centimetres.",
    "Letter {i}: My father met the King; his brother was there with {i} men.",
)


def swap(text: str, **settings) -> str:
    return load_swapper(augment_settings("cda", **settings)).swap(text)[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cda")
    with open(root / "docs.jsonl", "w") as f:
        for i in range(120):
            f.write(json.dumps({"text": TEMPLATES[i % len(TEMPLATES)].format(i=i)}) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("tok") / "plain"
    prepare_data([str(corpus / "docs.jsonl")], out, vocab_size=300, val_fraction=0.0, log=None)
    return str(out / "tokenizer.json")


def documents(out: Path, split: str = "train") -> list[str]:
    tok = load_tokenizer(out / "tokenizer.json")
    ids = np.concatenate([read_shard(p) for p in sorted(out.glob(f"{split}_*.bin"))]).tolist()
    docs, cur = [], []
    for t in ids:
        if t == tok.eos_id:
            docs.append(tok.decode(cur))
            cur = []
        elif t != tok.bos_id:
            cur.append(t)
    return docs


# ---------------------------------------------------------------------------------------------- swapping


def test_swaps_keep_the_case_of_the_replaced_word_and_leave_mixed_case_alone():
    assert swap("he He HE hE") == "she She SHE hE"
    assert swap("The KING met the queen's Son.") == "The QUEEN met the king's Daughter."


def test_swaps_are_whole_words_only():
    text = "The shell, history and mention of heat, hero-worship aside: herself."
    assert swap(text) == "The shell, history and mention of heat, heroine-worship aside: himself."


def test_her_before_a_noun_or_adjective_becomes_his_otherwise_him():
    assert swap("She lost her book and her old coat.") == "He lost his book and his old coat."
    assert swap("her family, her only son, her 'friend'") == "his family, his only daughter, his 'friend'"
    assert swap("I saw her. I gave her the pen, told her that, and love her dearly.") == \
        "I saw him. I gave him the pen, told him that, and love him dearly."


def test_his_before_a_noun_becomes_her_otherwise_hers():
    assert swap("His car is red; the blue one is his.") == "Her car is red; the blue one is hers."
    assert swap("It was his, and his own.") == "It was hers, and her own."
    assert swap("his elderly aunt; comforts her back") == "her elderly uncle; comforts him back"
    assert swap("him and hers") == "her and his"


def test_names_swap_only_when_asked_and_only_capitalized():
    assert swap("John met Mary.") == "John met Mary."
    assert swap("John met Mary; john, JAMES.", names=True) == "Patricia met James; john, MARY."


# -------------------------------------------------------------------------------------------- pair files


@pytest.mark.parametrize("content, message", [
    (b"", "holds no pairs"),
    (b"# only a comment\n\n", "holds no pairs"),
    (b"good\tbad\nthree words here\n", "line 2: expected two words"),
    (b"christian\tmuslim\njew\tchristian\n", "line 2: 'christian' is paired with 'jew' but line 1 pairs it"),
    (b"same\tsame\n", "line 1: 'same' is paired with itself"),
    (b"a1\tb\n", "line 1: 'a1' is not a word"),
    (b"\xff\xfe\tx\n", "not UTF-8"),
])
def test_a_bad_pair_file_is_one_line_error_naming_the_line(content, message):
    with pytest.raises(FmforgeError, match=message) as err:
        parse_pairs(content, "pairs.tsv")
    assert "\n" not in str(err.value)


def test_a_pair_file_allows_repeated_lines_and_the_two_pronoun_ambiguities():
    table = parse_pairs(b"he she\nhe she  # again\nhis her\nhim her\nhis hers\n", "p")
    assert table["her"] == ("his", "him") and table["his"] == ("her", "hers") and table["she"] == "he"


def test_a_user_pair_file_swaps_its_attribute_and_must_not_change_after_planning(tmp_path):
    pairs = tmp_path / "religion.tsv"
    pairs.write_text("# attribute: religion\nchristian\tmuslim\nchurch\tmosque\n")
    settings = augment_settings(f"cda={pairs}")
    assert load_swapper(settings).swap("A Christian went to church; he prayed.")[0] == \
        "A Muslim went to mosque; he prayed."
    pairs.write_text("christian\tjewish\n")
    with pytest.raises(FmforgeError, match="changed since this preparation started"):
        load_swapper(settings)


@pytest.mark.parametrize("kwargs, message", [
    ({"augment": "mixup"}, "unknown --augment"),
    ({"augment": "cda="}, "names no pair file"),
    ({"augment": "cda=/no/such/pairs.tsv"}, "pair file not found"),
    ({"augment": "cda", "mode": "both"}, "unknown --augment-mode"),
    ({"augment": "cda", "p": 0.0}, "--augment-p must be above 0"),
    ({"augment": "cda", "p": 1.5}, "--augment-p must be above 0"),
    ({"augment": None, "mode": "substitute"}, "need --augment cda"),
])
def test_bad_augment_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(FmforgeError, match=message):
        augment_settings(**kwargs)


# ------------------------------------------------------------------------------------------------ choice


def test_substitution_draws_documents_by_hash_of_seed_and_text_reproducibly():
    texts = [f"Story {i}: he walked home." for i in range(400)]

    def picked(seed: int) -> list[bool]:
        aug = Augmenter(augment_settings("cda", mode="substitute", p=0.5, seed=seed))
        return [aug.expand(t)[0][0].startswith(f"Story {i}: she") for i, t in enumerate(texts)]

    first = picked(0)
    assert first == picked(0)
    assert 0.4 < sum(first) / len(first) < 0.6
    assert first != picked(1)


def test_two_sided_adds_a_copy_only_where_a_word_was_swapped():
    aug = Augmenter(augment_settings("cda"))
    assert aug.expand("He left.") == [("He left.", False), ("She left.", True)]
    assert aug.expand("It rained.") == [("It rained.", False)]
    assert aug.counts == {"documents_seen": 2, "documents_augmented": 1, "documents_without_pair_words": 1,
                          "words_swapped": 1}


# ---------------------------------------------------------------------------------------------- prepare


def test_prepare_two_sided_adds_counterfactual_documents_and_counts_them(corpus, tokenizer, tmp_path):
    out = tmp_path / "cda"
    m = prepare_data([str(corpus / "docs.jsonl")], out, tokenizer=tokenizer, val_fraction=0.0, augment="cda",
                     log=None)
    a = m["augment"]
    assert (a["mode"], a["p"], a["pairs"], a["names"]) == ("two-sided", 1.0, "builtin:gender", False)
    assert (a["documents_seen"], a["documents_augmented"], a["documents_without_pair_words"]) == (120, 90, 30)
    assert a["words_swapped"] == 30 * (5 + 4 + 5)  # he his sister her uncle; actress waiter she him; father ...
    assert m["documents"]["kept"] == 210
    docs = set(documents(out))
    assert "Report 0: she said her brother would visit his aunt on day 0." in docs
    assert "Report 0: he said his sister would visit her uncle on day 0." in docs
    assert "Letter 3: My mother met the Queen; her sister was there with 3 women." in docs


def test_prepare_substitute_replaces_documents_and_keeps_their_number(corpus, tokenizer, tmp_path):
    m = prepare_data([str(corpus / "docs.jsonl")], tmp_path / "sub", tokenizer=tokenizer, val_fraction=0.0,
                     augment="cda", augment_mode="substitute", augment_p=0.5, log=None)
    docs = documents(tmp_path / "sub")
    assert m["documents"]["kept"] == len(docs) == 120
    swapped = sum(d.startswith("Report") and " she said " in d for d in docs)
    assert swapped == sum(1 for i in range(0, 120, 4)
                          if Augmenter(augment_settings("cda", mode="substitute")).expand(
                              TEMPLATES[0].format(i=i))[0][0] != TEMPLATES[0].format(i=i))
    assert 0 < m["augment"]["documents_augmented"] < 90


def test_a_counterfactual_copy_lands_in_the_same_split_as_its_original(corpus, tokenizer, tmp_path):
    out = tmp_path / "split"
    prepare_data([str(corpus / "docs.jsonl")], out, tokenizer=tokenizer, val_fraction=0.3, augment="cda",
                 allow_uneven_split=True, log=None)
    swapper = load_swapper(augment_settings("cda"))
    for split, other in (("train", "val"), ("val", "train")):
        mine, theirs = set(documents(out, split)), set(documents(out, other))
        originals = [d for d in mine if swapper.swap(d)[0] != d]
        assert originals
        assert not any(swapper.swap(d)[0] in theirs for d in originals)


def test_the_unit_pass_augments_exactly_like_prepare(corpus, tokenizer, tmp_path):
    single = prepare_data([str(corpus / "docs.jsonl")], tmp_path / "single", tokenizer=tokenizer,
                          val_fraction=0.0, augment="cda", augment_mode="substitute", log=None)
    staged = tmp_path / "unit"
    staged.mkdir()
    s = {"text_field": "text", "max_document_bytes": 1 << 26, "max_line_bytes": 1 << 26, "document_bytes": 1 << 20,
         "encoding_errors": "drop-line", "val_fraction": 0.0, "augment": augment_settings("cda", mode="substitute")}
    stats = text_units._encode_unit([str(corpus / "docs.jsonl")], s, load_tokenizer(tokenizer), staged)
    unit_tokens = np.fromfile(staged / "tokens.bin", dtype=np.dtype(stats["dtype"]))
    single_tokens = np.concatenate([read_shard(p) for p in sorted((tmp_path / "single").glob("train_*.bin"))])
    assert np.array_equal(unit_tokens, single_tokens)
    assert stats["augment"]["counts"]["words_swapped"] == single["augment"]["words_swapped"]
    sample = list(text_units.sample_texts([str(corpus / "docs.jsonl")], s, 1 << 20))
    assert sample == documents(tmp_path / "single")  # the tokenizer sample holds what the shards hold


@pytest.mark.slow
def test_sharded_prepare_with_augmentation_matches_single_process(corpus, tokenizer, tmp_path):
    lines = (corpus / "docs.jsonl").read_text().splitlines(keepends=True)
    files = []
    for k in range(3):  # units are runs of whole files
        files.append(str(tmp_path / f"part{k}.jsonl"))
        Path(files[-1]).write_text("".join(lines[k * 40:(k + 1) * 40]))
    kw = {"tokenizer": tokenizer, "val_fraction": 0.2, "augment": "cda", "allow_uneven_split": True, "log": None}
    single = prepare_data(files, tmp_path / "single", **kw)
    sharded = prepare_sharded(files, tmp_path / "sharded", engine="local", workers=2, unit_bytes=3000, **kw)
    assert sharded["engine"]["units"] > 1
    assert sharded["augment"] == single["augment"]
    assert sharded["documents"] == single["documents"]
    assert [s["sha256"] for s in sharded["shards"]] == [s["sha256"] for s in single["shards"]]


def test_cli_prepare_with_a_bad_pair_file_exits_2_with_one_line(corpus, tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("he\tshe\nhe\tit\n")
    with pytest.raises(SystemExit) as exit_:
        main(["data", "prepare", str(corpus / "docs.jsonl"), "--out", str(tmp_path / "o"), "--augment", f"cda={bad}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "line 2" in err and "'he' is paired with 'it'" in err
    assert not (tmp_path / "o").exists()


def test_a_unit_table_written_before_augmentation_existed_still_merges():
    old = np.dtype([("digest", "V16"), ("n_bytes", "<i8"), ("n_tokens", "<i8"), ("source", "<i4"), ("has_sig", "?")])
    table = np.array([(b"\x01" * 16, 5, 3, 0, True)], dtype=old)
    current = text_units._current(table)
    assert current.dtype == text_units.DOCS and not current["copy"][0] and current["n_bytes"][0] == 5
    assert current["u"][0] == int.from_bytes(b"\x01" * 8, "little") / 2**64


# ----------------------------------------------------------------------------------------- data augment


def test_data_augment_rewrites_chat_sft_and_labelled_rows_and_keeps_other_fields(tmp_path):
    src = tmp_path / "rows.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Is he a nurse?"},
                          {"role": "assistant", "content": "Yes, his ward is big."}]},
            {"prompt": "Tell me about the king.", "response": "He ruled.", "id": "he-1"},
            {"text": "She is a doctor.", "label": "he"},
            {"text": "It rained."}]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n[1, 2]\n")
    result = augment_jsonl(src, tmp_path / "out.jsonl", log=None)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == 7 and out[0] == rows[0] and out[6] == rows[3]
    assert out[1]["messages"] == [{"role": "user", "content": "Is she a nurse?"},
                                  {"role": "assistant", "content": "Yes, her ward is big."}]
    assert out[3] == {"prompt": "Tell me about the queen.", "response": "She ruled.", "id": "he-1"}
    assert out[5] == {"text": "He is a doctor.", "label": "he"}
    assert (result["rows_read"], result["rows_augmented"], result["rows_written"], result["words_swapped"]) == \
        (4, 3, 7, 5)
    assert result["skipped"] == {"invalid_json": 1, "not_an_object": 1}


def test_data_augment_fields_choose_what_is_rewritten(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text(json.dumps({"prompt": "he", "response": "he"}) + "\n")
    augment_jsonl(src, tmp_path / "new" / "out.jsonl", augment_mode="substitute", augment_p=1.0,
                  fields=["response"], log=None)
    assert json.loads((tmp_path / "new" / "out.jsonl").read_text()) == {"prompt": "he", "response": "she"}


def test_data_augment_bad_inputs_are_one_line_errors_and_leave_no_output(tmp_path, capsys):
    src = tmp_path / "rows.jsonl"
    src.write_text(json.dumps({"question": "Is he here?"}) + "\n")
    with pytest.raises(FmforgeError, match="none of the fields .* its rows have 'question'"):
        augment_jsonl(src, tmp_path / "out.jsonl", log=None)
    assert not list(tmp_path.glob("out.jsonl*"))
    (tmp_path / "empty.jsonl").write_text("garbage\n")
    with pytest.raises(FmforgeError, match="nothing to augment .* invalid_json 1"):
        augment_jsonl(tmp_path / "empty.jsonl", tmp_path / "out.jsonl", log=None)
    (tmp_path / "taken.jsonl").write_text("mine\n")
    with pytest.raises(SystemExit) as exit_:
        main(["data", "augment", str(src), "--out", str(tmp_path / "taken.jsonl"), "--fields", "question"])
    assert exit_.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "taken.jsonl").read_text() == "mine\n"
    main(["data", "augment", str(src), "--out", str(tmp_path / "taken.jsonl"), "--fields", "question",
          "--overwrite", "--json"])
    assert json.loads(capsys.readouterr().out)["rows_written"] == 2
