"""Instruction SFT on chat JSONL (real dialogs from chatterbot-corpus): labels only on assistant tokens, the
chat template travels with the model, bad lines are counted and skipped."""

import json

import pytest
from conftest import read_metrics, run_cli, tiny_overrides

from fmforge.config import build_config
from fmforge.data.builtin_chat import write_chatterbot_chats
from fmforge.data.chat import CHAT_TEMPLATE, encode_chat, read_chats, segments
from fmforge.data.tokenizer import load_tokenizer
from fmforge.errors import FmforgeError
from fmforge.objectives.clm import IGNORE_INDEX
from fmforge.train.loop import train

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is AI?"},
        {"role": "assistant", "content": "Machines that think."}, {"role": "user", "content": "Really?"},
        {"role": "assistant", "content": "Sort of."}]


def quiet(_msg):
    pass


def test_labels_are_masked_everywhere_except_assistant_tokens(prepared):
    tok = load_tokenizer(prepared / "tokenizer.json")
    ids, labels = encode_chat(tok, CHAT, 200)
    kept = labels != IGNORE_INDEX
    assert (labels[kept] == ids[kept]).all()
    # What is learned is exactly the two replies, each closed by end-of-text.
    pieces = [seg for seg, assistant in segments(CHAT) if assistant]
    expected = sum((tok.encode(p) + [tok.eos_id] for p in pieces), [])
    assert labels[kept].tolist() == expected
    assert tok.decode(ids[~kept & (ids != tok.pad_id)]).startswith("Be brief.\n\n### User:\nWhat is AI?")


def test_the_jinja_chat_template_renders_what_training_tokenized(prepared):
    jinja2 = pytest.importorskip("jinja2")
    tok = load_tokenizer(prepared / "tokenizer.json")
    rendered = jinja2.Template(CHAT_TEMPLATE).render(messages=CHAT, eos_token="<|eos|>")
    text = "".join(seg + ("<|eos|>" if assistant else "") for seg, assistant in segments(CHAT))
    assert rendered == text
    assert tok.tokenizer.encode(rendered.replace("<|eos|>", "")).ids  # plain text for any tokenizer


@pytest.mark.slow
def test_sft_on_real_dialogs_lowers_the_assistant_loss_and_ships_the_template(chat_base, tmp_path):
    chats = tmp_path / "chats.jsonl"
    n = write_chatterbot_chats(chats)
    assert n > 1000
    with open(chats, "a") as f:  # malformed lines are counted and skipped
        f.write("{not json\n" + json.dumps({"messages": [{"role": "narrator", "content": "x"}]}) + "\n")
    out, messages = tmp_path / "sft", []
    train(build_config({}, tiny_overrides(chats, out, **{
        "finetune.base": str(chat_base), "finetune.task": "sft", "data.seq_len": 64, "train.max_steps": 40,
        "train.eval_interval": 20, "train.eval_batches": 4, "checkpoint.interval": 0, "optim.lr": 2e-3})),
        echo=messages.append)
    warning = next(m for m in messages if "skipped" in m and "conversation(s)" in m)
    # Two malformed lines; replies that start past 64 tokens are counted too (assistant_cut_off).
    assert "bad_role 1" in warning and "invalid_json 1" in warning and "assistant_cut_off" in warning, warning
    val = [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE and config["eos_token"] == "<|eos|>"
    proc = run_cli("eval", out)  # perplexity needs prepared data, which a chat file is not
    assert proc.returncode == 2 and "not on prepared data; pass --data" in proc.stderr, proc.stderr


def test_sft_mistakes_are_one_line_errors(prepared, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[]\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n")
    chats, dropped = read_chats(bad)
    assert chats == [] and dropped == {"no_messages": 1, "no_assistant_message": 1}
    with pytest.raises(FmforgeError, match="finetune.task=sft fine-tunes a model"):
        train(build_config({}, tiny_overrides(bad, tmp_path / "a", **{"finetune.task": "sft"})), echo=quiet)
    with pytest.raises(FmforgeError, match="chat data not found"):
        read_chats(tmp_path / "missing.jsonl")
