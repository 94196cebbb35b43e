"""DPO on preference pairs built from real dialogs: the chosen-over-rejected margin rises, the reference
(the base model) stays untouched, bad lines are counted."""

import hashlib
import json
import random

import pytest
import torch
from conftest import read_metrics, tiny_overrides

from fmforge.config import build_config
from fmforge.data.builtin_chat import write_chatterbot_chats
from fmforge.data.preferences import PreferenceRows, read_preferences
from fmforge.errors import FmforgeError
from fmforge.objectives.dpo import dpo_loss, policy_logps, reference_logps
from fmforge.runs import load_pretrained
from fmforge.train.loop import train


def quiet(_msg):
    pass


def preference_file(tmp_path, limit=600):
    """chatterbot's statements with their own first reply as chosen and the same reply with its words in
    scrambled order as rejected: a preference for fluent answers that a model can learn in a few steps."""
    chats = tmp_path / "chats.jsonl"
    write_chatterbot_chats(chats)
    convs = [json.loads(line)["messages"] for line in chats.read_text().splitlines()][:limit]
    path = tmp_path / "prefs.jsonl"
    rng = random.Random(0)
    with open(path, "w") as f:
        for conv in convs:
            words = conv[1]["content"].split()
            rng.shuffle(words)
            scrambled = " ".join(words)
            if scrambled != conv[1]["content"]:
                f.write(json.dumps({"prompt": conv[0]["content"], "chosen": conv[1]["content"],
                                    "rejected": scrambled}) + "\n")
        f.write('{"prompt": "x", "chosen": "same", "rejected": "same"}\n{"prompt": "y"}\nnot json\n')
    return path


@pytest.mark.slow
def test_dpo_raises_the_chosen_over_rejected_margin_and_leaves_the_reference_alone(chat_base, tmp_path):
    prefs = preference_file(tmp_path)
    digest = hashlib.sha256((chat_base / "model.safetensors").read_bytes()).hexdigest()
    out, messages = tmp_path / "dpo", []
    train(build_config({}, tiny_overrides(prefs, out, **{
        "finetune.base": str(chat_base), "finetune.task": "dpo", "finetune.dpo_beta": 0.1, "data.seq_len": 64,
        "train.max_steps": 60, "train.eval_interval": 30, "checkpoint.interval": 0, "optim.lr": 5e-3,
        "train.global_batch": 16, "train.micro_batch_size": 8, "train.log_interval": 1})),
        echo=messages.append)
    warning = next(m for m in messages if "comparison(s)" in m)
    assert "chosen_equals_rejected 1" in warning and "missing_field 1" in warning and "invalid_json 1" in warning
    losses = torch.tensor([r["loss"] for r in read_metrics(out) if "loss" in r])
    # Step 1 scores the base against itself: exactly log 2. Then the loss falls, i.e. the margin rises.
    assert losses[0].item() == pytest.approx(0.693147, abs=1e-5)
    assert losses[-5:].mean() < 0.65
    assert all("val_reward_margin" in r for r in read_metrics(out) if "val_loss" in r)
    # On the training comparisons, against the untouched base as reference:
    base, tok = load_pretrained(chat_base)
    policy, _ = load_pretrained(out)
    rows = PreferenceRows(prefs, tok, 64, "train", echo=quiet)
    with torch.no_grad():
        reference = reference_logps(base, rows.tokens, torch.device("cpu"))
        margin = dpo_loss(policy_logps(policy, rows.tokens), reference, 0.1)[1]
    assert margin.mean() > 0.1 and (margin > 0).float().mean() > 0.7, (margin.mean(), (margin > 0).float().mean())
    assert hashlib.sha256((chat_base / "model.safetensors").read_bytes()).hexdigest() == digest
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())


def test_dpo_loss_is_log_2_when_the_policy_is_the_reference_and_falls_with_the_margin():
    ref = torch.tensor([[-5.0, -6.0], [-3.0, -2.0]])
    loss, margin = dpo_loss(ref.clone(), ref, beta=0.1)
    assert torch.allclose(loss, torch.log(torch.tensor(2.0))) and torch.equal(margin, torch.zeros(2))
    better = ref + torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    assert dpo_loss(better, ref, beta=0.1)[0] < loss


def test_preference_mistakes_are_counted_or_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b"}\n')
    pairs, dropped = read_preferences(bad)
    assert pairs == [] and dropped == {"missing_field": 1}
    with pytest.raises(FmforgeError, match="preference data not found"):
        read_preferences(tmp_path / "missing.jsonl")
