"""The diffusion transformer (models/dit.py), its objective and samplers (objectives/diffusion.py), the
offline image metrics (eval/diffusion.py), the PNG writer and the diffusers export — on tiny random models,
no training (tests/test_dit_train.py trains)."""

import json

import pytest
import torch

from fmforge.errors import FmforgeError
from fmforge.eval.diffusion import (
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
    prompt_classes,
)
from fmforge.models.dit import DiT, DiTModelConfig, DiTNet
from fmforge.models.registry import build_model, family_of, parse_model_config
from fmforge.objectives.diffusion import NoiseSchedule, sample, sampling_timesteps
from fmforge.runs import save_pretrained

NANO = {"arch": "dit", "size": "dit-nano"}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread avoids the spin-waits of a second one on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed(cfg: DiTModelConfig, seed: int = 0) -> DiT:
    """A DiT whose zero-initialized gates and output are nudged away from zero, so it computes something."""
    torch.manual_seed(seed)
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.update_ema(0.0)
    return model.eval()


def reference_count(model: DiT) -> int:
    """The parameters as the paper's code counts them: its fixed 2-D position table is a frozen Parameter
    (a buffer here), and it predicts the variance too (learn_sigma), so its output projection is twice as
    wide."""
    cfg = model.cfg
    return model.num_params() + cfg.num_patches * cfg.d_model + cfg.d_model * cfg.patch_dim + cfg.patch_dim


@pytest.mark.parametrize("size,millions", [("dit-s2", 33), ("dit-b2", 130), ("dit-l2", 458), ("dit-xl2", 675)])
def test_named_sizes_have_the_papers_parameter_counts(size, millions):
    """Peebles & Xie's counts (patch 2, 32x32x4 latents, 1000 classes), to their precision of a million;
    built on the meta device, so no memory is used. Measured: 32.86M, 130.30M, 457.82M, 674.82M."""
    with torch.device("meta"):
        model = DiT(DiTModelConfig(size=size))
    assert model.cfg.num_classes == 1000 and model.cfg.channels == 4 and model.cfg.image_size == 32
    assert round(model.num_params() / 1e6) == millions


def test_dit_xl2_counts_exactly_what_the_papers_code_reports():
    """The reference training script logs "DiT Parameters: 675,129,632" for DiT-XL/2; fmforge's model differs
    only by the frozen position table and the variance half of the output, so every other tensor matches."""
    with torch.device("meta"):
        model = DiT(DiTModelConfig(size="dit-xl2"))
    assert reference_count(model) == 675_129_632


def test_dit_is_a_registered_family_with_a_diffusion_objective():
    cfg = parse_model_config(NANO)
    assert family_of(cfg) == "dit" and cfg.image_size == 8 and cfg.channels == 1  # classes: from the data
    model = build_model(cfg)
    assert isinstance(model, DiT) and model.block_stacks() == [model.net.blocks, model.ema.blocks]
    assert not any(p.requires_grad for p in model.ema.parameters())
    assert build_model(parse_model_config({**NANO, "ema_decay": 0.0})).ema is None


def test_adaln_zero_blocks_start_as_the_identity_and_the_output_at_zero():
    net = DiTNet(DiTModelConfig(size="dit-nano", num_classes=10))
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10])
    h = torch.randn(3, 16, 64)
    for block in net.blocks:
        torch.testing.assert_close(block(h, net.condition(t, y)), h)
    assert torch.equal(net(x, t, y), torch.zeros_like(x))


def test_dropped_conditions_read_the_null_embedding():
    model = perturbed(DiTModelConfig(size="dit-nano", num_classes=10))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 10])
    dropped = model(x, t, torch.tensor([3, 7]), drop=torch.tensor([True, True]))
    null = model(x, t, torch.tensor([10, 10]))
    torch.testing.assert_close(dropped, null)
    assert not torch.allclose(model(x, t, torch.tensor([3, 7])), null)


def test_text_conditioned_dit_needs_the_embedding_width_and_learns_a_null_vector():
    with pytest.raises(ValueError, match="cond_dim"):
        DiTNet(DiTModelConfig(size="dit-nano", num_classes=10, condition="text"))
    net = DiTNet(DiTModelConfig(size="dit-nano", num_classes=10, condition="text", cond_dim=32))
    out = net(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.randn(2, 32), drop=torch.tensor([False, True]))
    out.sum().backward()
    assert net.null_cond.grad is not None  # in the graph even when the gates are still zero


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_schedules_fall_and_predictions_invert_to_clean_image_and_noise(kind, prediction):
    schedule = NoiseSchedule(kind, 1000)
    ab = schedule.alphas_cumprod
    assert (ab[1:] < ab[:-1]).all() and ab[0] > 0.99 and ab[-1] < 0.01
    x0, noise, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    xt = schedule.add_noise(x0, noise, t)
    got_x0, got_eps = schedule.split(schedule.target(x0, noise, t, prediction), xt, t, prediction)
    torch.testing.assert_close(got_eps, noise, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got_x0[:3], x0[:3], atol=1e-3, rtol=1e-3)  # at t=999 x0 is barely recoverable


def test_sampling_steps_span_the_chain_and_bad_requests_are_one_line_errors():
    assert sampling_timesteps(1000, 5) == [999, 749, 500, 250, 0]
    assert sampling_timesteps(1000, 1) == [0]
    with pytest.raises(FmforgeError, match="--steps"):
        sampling_timesteps(1000, 1001)
    model = perturbed(DiTModelConfig(size="dit-nano", num_classes=10))
    with pytest.raises(FmforgeError, match="--sampler"):
        sample(model.net, NoiseSchedule(), "eps", torch.tensor([1]), sampler="euler")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_is_deterministic_for_a_seed(sampler):
    model = perturbed(DiTModelConfig(size="dit-nano", num_classes=10))
    y = torch.tensor([0, 3, 7])
    run = dict(steps=5, sampler=sampler, guidance=1.0)
    a = sample(model.denoiser(), NoiseSchedule(), "eps", y, seed=1, **run)
    b = sample(model.denoiser(), NoiseSchedule(), "eps", y, seed=1, **run)
    c = sample(model.denoiser(), NoiseSchedule(), "eps", y, seed=2, **run)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert a.shape == (3, 1, 8, 8) and a.min() >= -1 and a.max() <= 1


def test_guidance_changes_the_samples_and_zero_guidance_is_the_conditional_model():
    model = perturbed(DiTModelConfig(size="dit-nano", num_classes=10))
    y = torch.tensor([2, 5])
    runs = {g: sample(model.net, NoiseSchedule(), "eps", y, steps=4, guidance=g, seed=0) for g in (0.0, 3.0)}
    assert (runs[0.0] - runs[3.0]).abs().max() > 1e-3
    with pytest.raises(FmforgeError, match="--guidance"):
        sample(model.net, NoiseSchedule(), "eps", y, guidance=-1.0)


def test_ema_update_moves_the_shadow_towards_the_trained_weights():
    model = DiT(DiTModelConfig(size="dit-nano", num_classes=10))
    with torch.no_grad():
        model.net.proj_out.weight.fill_(1.0)
    model.update_ema(0.75)
    torch.testing.assert_close(model.ema.proj_out.weight, torch.full_like(model.ema.proj_out.weight, 0.25))
    assert model.denoiser() is model.ema and model.denoiser(use_ema=False) is model.net


def test_frechet_distance_kid_and_precision_recall_on_known_distributions():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, 4, generator=g)
    b = torch.randn(1000, 4, generator=g)
    shifted = b + torch.tensor([3.0, 0, 0, 0])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) < 0.05
    assert frechet_distance(a, shifted) == pytest.approx(9.0, rel=0.05)  # |Δμ|² with equal covariances
    kid = {name: kernel_inception_distance(a, other, subsets=3, subset_size=300)
           for name, other in (("same", b), ("shifted", shifted))}
    assert abs(kid["same"]) < 0.01 < kid["shifted"]
    p, r = precision_recall(a[:300], b[:300])
    assert p > 0.8 and r > 0.8
    p, r = precision_recall(a[:300], a[:300] + 100)
    assert p == 0.0 and r == 0.0


def test_prompt_classes_are_the_one_class_name_a_prompt_contains():
    names = ["zero", "one", "two"]
    assert prompt_classes(["a handwritten two", "one or two", "someone", "ONE"], names) == [2, None, None, 1]


def test_generate_writes_a_grid_and_each_image_and_never_overwrites_unasked(tmp_path):
    from PIL import Image

    from fmforge.deploy.image_generate import generate_images

    model = perturbed(DiTModelConfig(size="dit-nano", num_classes=10))
    save_pretrained(model.state_dict(), model.cfg, tmp_path / "run")
    out = tmp_path / "out" / "grid.png"
    msgs = []
    generate_images(tmp_path / "run", class_label=4, images=5, steps=3, out=out, device="cpu", echo=msgs.append)
    assert Image.open(out).size[0] >= 3 * 64 and len(list((tmp_path / "out" / "grid").glob("*.png"))) == 5
    assert Image.open(tmp_path / "out" / "grid" / "0000.png").size == (8, 8)
    with pytest.raises(FmforgeError, match="already exists"):
        generate_images(tmp_path / "run", class_label=4, images=5, steps=3, out=out, device="cpu")
    with pytest.raises(FmforgeError, match="outside the model's classes"):
        generate_images(tmp_path / "run", class_label=10, images=1, steps=3, out=tmp_path / "x.png", device="cpu")
    with pytest.raises(FmforgeError, match="--prompt"):
        generate_images(tmp_path / "run", prompt="seven", images=1, steps=3, out=tmp_path / "x.png", device="cpu")


@pytest.mark.slow  # importing diffusers takes seconds
def test_diffusers_export_matches_dit_transformer_2d_model_outputs(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from fmforge.interop.hf.convert import export_hf

    cfg = DiTModelConfig(size="dit-nano", num_classes=10, schedule="cosine", prediction="v")
    model = perturbed(cfg, seed=1)
    save_pretrained(model.state_dict(), cfg, tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "hf", echo=lambda _m: None)
    hf = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "hf" / "transformer").eval()
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        torch.testing.assert_close(hf(x, timestep=t, class_labels=y).sample, model.ema(x, t, y), atol=1e-4, rtol=0)
    scheduler = diffusers.DDIMScheduler.from_pretrained(tmp_path / "hf" / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), NoiseSchedule("cosine").alphas_cumprod,
                               atol=1e-6, rtol=0)


def test_diffusers_export_refuses_what_dit_transformer_2d_model_cannot_express(tmp_path):
    from fmforge.interop.hf.convert import export_hf

    for i, cfg in enumerate([DiTModelConfig(size="dit-nano", num_classes=10, condition="text", cond_dim=16),
                             DiTModelConfig(size="dit-nano", num_classes=10, mlp_ratio=2.0)]):
        save_pretrained(DiT(cfg).state_dict(), cfg, tmp_path / f"run{i}")
        with pytest.raises(FmforgeError, match="class labels only|mlp_ratio") as err:
            export_hf(tmp_path / f"run{i}", tmp_path / f"hf{i}")
        assert "\n" not in str(err.value)
    assert not (tmp_path / "hf0").exists()
    assert json.loads((tmp_path / "run0" / "model.json").read_text())["family"] == "dit"


class OracleDenoiser(torch.nn.Module):
    """The perfect denoiser of a one-image data set: predicts exactly the noise (or v) that separates x_t
    from that image."""

    def __init__(self, x0: torch.Tensor, schedule: NoiseSchedule, prediction: str):
        super().__init__()
        self.cfg = DiTModelConfig(size="dit-nano", num_classes=10)
        self.x0, self.schedule, self.prediction = x0, schedule, prediction
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the sampler a device to read

    def forward(self, x, t, y, drop=None):
        a, s = self.schedule.coefficients(t, x)
        eps = (x - a * self.x0) / s
        return self.schedule.target(self.x0.expand_as(x), eps, t, self.prediction)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction,kind", [("eps", "linear"), ("v", "cosine")])
def test_samplers_reach_the_data_under_a_perfect_denoiser(sampler, prediction, kind):
    schedule = NoiseSchedule(kind, 1000)
    x0 = torch.rand(1, 1, 8, 8) * 1.6 - 0.8
    oracle = OracleDenoiser(x0, schedule, prediction)
    out = sample(oracle, schedule, prediction, torch.tensor([1, 2]), steps=10, sampler=sampler, guidance=1.0)
    torch.testing.assert_close(out, x0.expand_as(out), atol=1e-3, rtol=0)


def test_eval_and_generate_of_a_diffusion_run_say_what_they_need_in_one_line(tmp_path):
    from fmforge.deploy.chat import generate_verb
    from fmforge.eval.command import eval_command

    cfg = DiTModelConfig(size="dit-nano", num_classes=10)
    save_pretrained(DiT(cfg).state_dict(), cfg, tmp_path / "run")
    with pytest.raises(FmforgeError, match="--classifier VIT_RUN"):
        eval_command(str(tmp_path / "run"))
    with pytest.raises(FmforgeError, match="--out GRID.png"):
        generate_verb(str(tmp_path / "run"), prompt="", class_label=3)
    with pytest.raises(FmforgeError, match="--chat"):
        generate_verb(str(tmp_path / "run"), prompt="", chat=True, out="x.png")
