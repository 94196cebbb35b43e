"""``fmforge export onnx`` (issue 19, point 3): decoders, BERT and ViT exported with torch's dynamo exporter;
onnxruntime's outputs equal PyTorch's within 1e-4 at batch sizes and sequence lengths other than the
example the graph was traced with. Each export takes tens of seconds on a loaded CPU: the file is slow."""

import sys

import pytest
import torch

from fmforge.data.tokenizer import train_tokenizer
from fmforge.deploy.onnx_export import export_onnx, run_onnx
from fmforge.errors import FmforgeError
from fmforge.models.bert import Bert, BertModelConfig
from fmforge.models.clip import CLIP, CLIPModelConfig
from fmforge.models.config import ModelConfig
from fmforge.models.gpt import GPT
from fmforge.models.vit import ViT, ViTModelConfig
from fmforge.runs import save_pretrained

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def onnx_packages():
    """Imported per test, not at collection: onnxscript alone takes seconds to import."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")

TOL = 1e-4


def quiet(_msg):
    pass


def _run(tmp_path, name, model, cfg, tokenizer=True):
    run = tmp_path / name
    save_pretrained(model.state_dict(), cfg, run)
    if tokenizer:
        train_tokenizer([__doc__] * 4, 300).save(run / "tokenizer.json")
    return run


def _close(onnx_out, torch_out):
    assert onnx_out.shape == tuple(torch_out.shape)
    assert (torch.from_numpy(onnx_out) - torch_out).abs().max() <= TOL


@torch.no_grad()
def test_decoder_logits_match_pytorch_at_any_batch_and_length(tmp_path):
    cfg = ModelConfig(arch="llama", n_layer=2, n_head=2, n_kv_head=1, d_model=32, d_ff=64, vocab_size=320,
                      max_seq_len=32).resolved()
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    path = export_onnx(_run(tmp_path, "llama", model, cfg), tmp_path / "onnx", echo=quiet)
    assert (tmp_path / "onnx" / "tokenizer.json").is_file() and (tmp_path / "onnx" / "model.json").is_file()
    for shape in ((1, 1), (3, 20), (1, 32)):
        ids = torch.randint(0, cfg.vocab_size, shape)
        _close(run_onnx(path, {"input_ids": ids})[0], model(ids))
    with pytest.raises(FmforgeError, match="--overwrite"):
        export_onnx(tmp_path / "llama", tmp_path / "onnx", echo=quiet)


@torch.no_grad()
def test_bert_hidden_states_and_classifier_match_pytorch_with_padding(tmp_path):
    cfg = BertModelConfig(size="bert-nano", vocab_size=320, max_seq_len=32, num_labels=3, dropout=0.0)
    torch.manual_seed(0)
    model = Bert(cfg).eval()
    path = export_onnx(_run(tmp_path, "bert", model, cfg), tmp_path / "onnx", echo=quiet)
    for batch, length in ((1, 5), (4, 19)):
        ids = torch.randint(0, cfg.vocab_size, (batch, length))
        mask = torch.ones_like(ids)
        mask[0, length // 2:] = 0
        types = torch.zeros_like(ids)
        types[-1, length // 3:] = 1
        hidden, logits = run_onnx(path, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
        expected = model(ids, mask, types)
        _close(hidden, expected)
        _close(logits, model.cls_logits(expected))


@torch.no_grad()
def test_vit_logits_match_pytorch_at_any_batch(tmp_path):
    cfg = ViTModelConfig(size="vit-nano")
    torch.manual_seed(0)
    model = ViT(cfg).eval()
    path = export_onnx(_run(tmp_path, "vit", model, cfg, tokenizer=False), tmp_path / "onnx", echo=quiet)
    for batch in (1, 5):
        images = torch.randn(batch, 1, 8, 8)
        _close(run_onnx(path, {"pixel_values": images})[0], model(images))


def test_unsupported_family_and_missing_packages_are_one_line_errors(tmp_path, monkeypatch):
    cfg = CLIPModelConfig(size="clip-nano")
    run = _run(tmp_path, "clip", CLIP(cfg), cfg)
    with pytest.raises(FmforgeError, match="decoders, BERT and ViT"):
        export_onnx(run, tmp_path / "onnx", echo=quiet)
    assert not (tmp_path / "onnx" / "model.onnx").exists()
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(FmforgeError, match="pip install onnx onnxscript onnxruntime"):
        export_onnx(run, tmp_path / "onnx", echo=quiet)
