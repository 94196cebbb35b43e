"""An exported decoder's tokenizer feeds transformers exactly the ids fmforge feeds the model: [bos] + text.
Without it a GPT-2-style export continued prompts differently under transformers than under fmforge."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from fmforge.config import build_config
from fmforge.deploy.generate import generate
from fmforge.interop.hf.convert import export_hf, import_hf
from fmforge.runs import load_pretrained
from fmforge.train.loop import train

transformers = pytest.importorskip("transformers")

PROMPTS = ["def parse(text):\n", "for key, value in sorted(items):", "The"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def exported(request, prepared, tmp_path_factory) -> tuple[Path, Path]:
    """(a briefly trained run of the arch, its `fmforge export hf` directory)."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"bos_{arch}")
    overrides = {"model.arch": arch, "model.n_kv_head": 4 if arch == "gpt2" else 2, "train.max_steps": 20,
                 "checkpoint.interval": 0}
    train(build_config({}, tiny_overrides(prepared, root / "run", **overrides)), echo=lambda _msg: None)
    export_hf(root / "run", root / "hf", echo=lambda _msg: None)
    return root / "run", root / "hf"


@pytest.mark.slow
def test_exported_tokenizer_prepends_bos_exactly_as_fmforge_prompts(exported):
    run, hf = exported
    _, tok = load_pretrained(run)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    for text in PROMPTS:
        assert hf_tok(text)["input_ids"] == [tok.bos_id] + tok.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf_tok.bos_token_id == tok.bos_id


@pytest.mark.slow
def test_transformers_greedy_generate_continues_like_fmforge_generate(exported):
    run, hf = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    for prompt in PROMPTS:
        ids = hf_tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=hf_tok.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        ours = generate(run, prompt, max_new_tokens=12, temperature=0, device="cpu")
        assert prompt + hf_tok.decode(new, skip_special_tokens=True) == ours


@pytest.mark.slow
def test_transformers_scores_the_tokenized_prompt_exactly_as_fmforge_scores_bos_plus_text(exported):
    run, hf = exported
    ours, tok = load_pretrained(run)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    for prompt in PROMPTS:
        ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            reference = ours(torch.tensor([[tok.bos_id] + tok.encode(prompt)]))
            torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=1e-4)
            # the bos is what made them equal: without it the last position predicts differently
            unprefixed = model(ids[:, 1:]).logits[0, -1]
        assert (unprefixed - reference[0, -1]).abs().max() > 1e-3


@pytest.mark.slow
def test_a_reimported_export_keeps_encoding_text_without_bos(exported, tmp_path):
    run, hf = exported
    import_hf(hf, tmp_path / "back", echo=lambda _msg: None)
    _, tok = load_pretrained(run)
    _, back = load_pretrained(tmp_path / "back")
    assert back.bos_id == tok.bos_id
    for text in PROMPTS:
        assert back.encode(text) == tok.encode(text)
