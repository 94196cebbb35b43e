"""``fmforge quantize`` (issue 19, point 1): int8 per-channel and int4 group-wise weight-only quantization
whose output run directory ``load_pretrained`` loads as is, the torchao backend, the perplexity report,
and a quantized run from someone else checked before any memory is allocated."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fmforge.data.tokenizer import train_tokenizer
from fmforge.deploy.generate import generate, sample
from fmforge.deploy.quantize import quantizable_layers, quantize
from fmforge.errors import FmforgeError
from fmforge.eval.quantization import format_report, quantization_report
from fmforge.models.config import ModelConfig
from fmforge.models.gpt import GPT
from fmforge.models.qlinear import (
    QUANT_FILE,
    QuantLinear,
    dequantize,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from fmforge.models.vit import ViT, ViTModelConfig
from fmforge.runs import load_pretrained, save_pretrained

TINY = dict(arch="llama", n_layer=2, n_head=2, n_kv_head=1, d_model=32, d_ff=64, vocab_size=320, max_seq_len=32)


def quiet(_msg):
    pass


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture
def tiny_run(tmp_path):
    """A finished run directory of a tiny random Llama with its own tokenizer."""
    cfg = ModelConfig(**TINY).resolved()
    torch.manual_seed(0)
    run = tmp_path / "run"
    save_pretrained(GPT(cfg).state_dict(), cfg, run)
    train_tokenizer([__doc__] * 4, 300).save(run / "tokenizer.json")
    return run


# ---------------------------------------------------------------------------------------------------- numerics


def test_int8_is_symmetric_per_channel_with_error_within_half_a_scale():
    w = torch.tensor([[1.27, -0.5, 0.0, 0.254], [0.0, 0.0, 0.0, 0.0], [-2.54, 1.0, 0.02, 0.0]])
    q, scales = quantize_int8(w)
    # by hand: row 0 scale 1.27/127 = 0.01; row 1 all zero (scale 1, codes 0); row 2 scale 0.02
    assert torch.allclose(scales, torch.tensor([0.01, 1.0, 0.02]))
    assert q.dtype == torch.int8
    assert q.tolist() == [[127, -50, 0, 25], [0, 0, 0, 0], [-127, 50, 1, 0]]
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different ranges
    q, scales = quantize_int8(w)
    err = (dequantize("int8", q, scales) - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-5)).all()
    assert q.abs().max() == 127  # every row's largest weight uses the whole range


def test_int4_is_symmetric_per_group_packed_two_per_byte():
    w = torch.tensor([[0.7, -0.3, 0.1, -0.7, 0.0, 0.0, 1.4, 0.2]])
    packed, scales = quantize_int4(w, group_size=4)
    # by hand: group 0 scale 0.7/7 = 0.1, codes [7, -3, 1, -7]; group 1 scale 0.2, codes [0, 0, 7, 1]
    assert torch.allclose(scales, torch.tensor([[0.1, 0.2]]))
    assert unpack_int4(packed).tolist() == [[7, -3, 1, -7, 0, 0, 7, 1]]
    # stored as code + 8, even column in the low nibble: (15, 5), (9, 1), (8, 8), (15, 9)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x5F, 0x19, 0x88, 0x9F]]
    every = torch.arange(-8, 8).repeat(3, 2)
    assert torch.equal(unpack_int4(pack_int4(every)), every.to(torch.int8))
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    packed, scales = quantize_int4(w, group_size=32)
    assert packed.shape == (16, 64) and scales.shape == (16, 4)
    err = (dequantize("int4", packed, scales) - w).abs().reshape(16, 4, 32)
    assert (err <= scales[..., None] / 2 * (1 + 1e-5)).all()


def test_quant_linear_matches_a_linear_with_the_dequantized_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    for method, group in (("int8", None), ("int4", 16)):
        q = QuantLinear.from_linear(linear, method, group)
        ref = torch.nn.functional.linear(x, q.weight_dequantized(), linear.bias)
        torch.testing.assert_close(q(x), ref, atol=1e-4, rtol=1e-4)
        assert (q(x) - linear(x)).abs().max() < (0.05 if method == "int8" else 0.3)
    odd = torch.nn.Linear(36, 5)  # a width PyTorch's int8 CPU kernel cannot take: the dequantizing path
    q = QuantLinear.from_linear(odd, "int8")
    x = torch.randn(2, 36)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.weight_dequantized(), odd.bias))


# ---------------------------------------------------------------------------------------------------- runs


def test_quantized_run_loads_through_load_pretrained_and_generates(tiny_run, tmp_path):
    source, _ = load_pretrained(tiny_run)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    for method in ("int8", "int4"):
        out = quantize(tiny_run, tmp_path / method, method=method, group_size=16 if method == "int4" else None,
                       echo=quiet)
        spec = json.loads((out / QUANT_FILE).read_text())
        assert spec["method"] == method and spec["source"] == str(tiny_run.resolve())
        assert len(spec["modules"]) == 2 * 5 and "lm_head" not in spec["modules"]  # qkv, proj, w1, w2, w3 per block
        assert (out / "model.safetensors").stat().st_size < (tiny_run / "model.safetensors").stat().st_size
        model, tok = load_pretrained(out)
        assert isinstance(model.blocks[0].attn.qkv, QuantLinear) and tok is not None
        with torch.no_grad():
            err = (model(ids) - source(ids)).abs().max()
        assert err < (0.05 if method == "int8" else 0.5)
        assert len(sample(model, [1, 2, 3], 5, temperature=0)) == 5
        assert generate(out, "def ", max_new_tokens=4, temperature=0, device="cpu").startswith("def ")


def test_quantizing_twice_writes_the_same_bytes(tiny_run, tmp_path):
    # Every tensor's bytes, and the JSON files whole. (The safetensors header's metadata map is written in
    # hash order by the safetensors library, so the file itself can differ in the order of those two keys.)
    for method in ("int8", "int4"):
        a = quantize(tiny_run, tmp_path / f"a_{method}", method=method, echo=quiet)
        b = quantize(tiny_run, tmp_path / f"b_{method}", method=method, echo=quiet)
        ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert ta.keys() == tb.keys()
        for name in ta:
            assert ta[name].dtype == tb[name].dtype
            assert ta[name].numpy().tobytes() == tb[name].numpy().tobytes(), name
        for name in ("model.json", QUANT_FILE):
            assert (a / name).read_bytes() == (b / name).read_bytes()


def test_include_head_quantizes_an_untied_head_but_never_a_tied_one(tiny_run, tmp_path):
    out = quantize(tiny_run, tmp_path / "head", include_head=True, echo=quiet)
    assert "lm_head" in json.loads((out / QUANT_FILE).read_text())["modules"]
    assert isinstance(load_pretrained(out)[0].lm_head, QuantLinear)
    tied = GPT(ModelConfig(**TINY, tie_embeddings=True).resolved())
    assert "lm_head" not in quantizable_layers(tied, include_head=True)


def test_vit_quantizes_and_loads(tmp_path):
    cfg = ViTModelConfig(size="vit-nano")
    torch.manual_seed(0)
    source = ViT(cfg).eval()
    save_pretrained(source.state_dict(), cfg, tmp_path / "vit")
    out = quantize(tmp_path / "vit", tmp_path / "q", include_head=True, echo=quiet)
    model, _ = load_pretrained(out)
    assert isinstance(model.head, QuantLinear)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert (model(x) - source(x)).abs().max() < 0.05


def test_user_mistakes_are_one_line_errors(tiny_run, tmp_path):
    with pytest.raises(FmforgeError, match="--method"):
        quantize(tiny_run, tmp_path / "o", method="int3", echo=quiet)
    with pytest.raises(FmforgeError, match="int4 only"):
        quantize(tiny_run, tmp_path / "o", method="int8", group_size=32, echo=quiet)
    with pytest.raises(FmforgeError, match="group size 24"):
        quantize(tiny_run, tmp_path / "o", method="int4", group_size=24, echo=quiet)
    with pytest.raises(FmforgeError, match="is the run being quantized"):
        quantize(tiny_run, tiny_run, echo=quiet)
    out = quantize(tiny_run, tmp_path / "q", echo=quiet)
    with pytest.raises(FmforgeError, match="--overwrite") as err:
        quantize(tiny_run, out, echo=quiet)
    one_line(err)
    quantize(tiny_run, out, method="int4", overwrite=True, echo=quiet)
    assert json.loads((out / QUANT_FILE).read_text())["method"] == "int4"
    with pytest.raises(FmforgeError, match="already quantized"):
        quantize(out, tmp_path / "qq", echo=quiet)


def test_torchao_missing_names_the_pip_install(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(FmforgeError, match="pip install 'torchao>=0.18'") as err:
        quantize(tiny_run, tmp_path / "ao", backend="torchao", echo=quiet)
    one_line(err)
    assert not (tmp_path / "ao").exists()


def test_torchao_backend_int8_and_int4_on_cpu(tiny_run, tmp_path):
    pytest.importorskip("torchao")
    source, _ = load_pretrained(tiny_run)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    for method in ("int8", "int4"):
        out = quantize(tiny_run, tmp_path / method, method=method, backend="torchao",
                       group_size=16 if method == "int4" else None, echo=quiet)
        model, _ = load_pretrained(out)
        assert type(model.blocks[0].mlp.w1.weight).__name__ != "Parameter"  # a torchao tensor subclass
        with torch.no_grad():
            assert (model(ids) - source(ids)).abs().max() < 0.5
        assert len(sample(model, [1, 2, 3], 4, temperature=0)) == 4


# ---------------------------------------------------------------------------------------------------- untrusted


def _rewrite(path, **changes):
    spec = json.loads(path.read_text())
    spec.update(changes)
    path.write_text(json.dumps(spec))


def test_tampered_quantized_run_fails_in_one_line_before_allocating(tiny_run, tmp_path):
    out = quantize(tiny_run, tmp_path / "q", method="int4", group_size=16, echo=quiet)
    spec_path, weights = out / QUANT_FILE, out / "model.safetensors"
    original_spec, original_weights = spec_path.read_text(), weights.read_bytes()
    cases = [
        (dict(sneaky=1), "unknown key 'sneaky'"),
        (dict(method="int2"), "method 'int2'"),
        (dict(group_size=3), "group_size 3"),
        (dict(group_size=10**30), "group_size"),
        (dict(modules=["blocks.0.norm1"]), "not a Linear layer"),
        (dict(modules=["blocks.99.attn.qkv"]), "not a Linear layer"),
        (dict(modules="blocks.0.attn.qkv"), "list of layer names"),
        (dict(group_size=32), "blocks.0.attn.qkv.scales has shape [64, 2]"),  # the file holds groups of 16
    ]
    for change, message in cases:
        spec_path.write_text(original_spec)
        _rewrite(spec_path, **change)
        with pytest.raises(FmforgeError) as err:
            load_pretrained(out)
        assert message in one_line(err) or "does not match model.json" in one_line(err), (change, str(err.value))
    spec_path.write_text(original_spec)
    tensors = load_file(weights)
    tensors["blocks.0.attn.qkv.scales"] = torch.ones(64, 10**4)  # a scales table far larger than the layer's
    save_file(tensors, weights)
    with pytest.raises(FmforgeError, match=r"blocks.0.attn.qkv.scales has shape \[64, 10000\]") as err:
        load_pretrained(out)
    one_line(err)
    tensors["blocks.0.attn.qkv.scales"] = torch.full((64, 2), float("nan"))
    save_file(tensors, weights)
    with pytest.raises(FmforgeError, match="blocks.0.attn.qkv.scales holds a value") as err:
        load_pretrained(out)
    weights.write_bytes(original_weights)
    load_pretrained(out)


# ---------------------------------------------------------------------------------------------------- quality


@pytest.mark.slow
def test_int8_perplexity_within_two_percent_of_the_trained_source(chat_base, tmp_path):
    out = quantize(chat_base, tmp_path / "int8", method="int8", echo=quiet)
    report = quantization_report(out, max_batches=8, batch_size=8, device="cpu")
    assert report["source"] == str(chat_base.resolve())
    assert abs(report["perplexity_change"]) < 0.02, report
    assert "vs" in format_report(report)
    out4 = quantize(chat_base, tmp_path / "int4", method="int4", echo=quiet)
    report4 = quantization_report(out4, max_batches=8, batch_size=8, device="cpu")
    assert abs(report4["perplexity_change"]) < 0.15, report4
    assert quantization_report(chat_base) is None
