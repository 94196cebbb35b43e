"""fmforge plan: scaling-law optima, known points, model shapes, repetition, inference-aware sizing, hardware
time/cost, batch/lr guidance, the proposed config, and bad inputs."""

import json
import math

import pytest
import torch
from conftest import read_metrics, run_cli

from fmforge.config import ModelConfig, load_config
from fmforge.errors import FmforgeError
from fmforge.models.gpt import GPT
from fmforge.plan import hparams
from fmforge.plan.hardware import flops_from_budget, get_hardware, mfu_from_run, time_and_cost
from fmforge.plan.laws import (
    BESIROGLU,
    CHINCHILLA,
    KAPLAN,
    LAWS,
    ChinchillaLaw,
    TokensPerParameter,
    effective_data,
    flops_for,
    inference_aware_optimum,
    numeric_optimum,
    repeated_loss,
)
from fmforge.plan.planner import plan
from fmforge.plan.shapes import count_params, flops_per_token, propose_model, resolve_proposal

BUDGETS = [1e15, 1e18, 1e21, 5.76e23, 1e26]


@pytest.mark.parametrize("law", [KAPLAN, CHINCHILLA, BESIROGLU, ChinchillaLaw("other", 2.0, 50.0, 900.0, 0.5, 0.2)],
                         ids=lambda law: law.name)
def test_closed_form_optimum_equals_numeric_minimization_under_6nd(law):
    for c in BUDGETS:
        n, d = law.optimum(c)
        n_num, d_num = numeric_optimum(law, c)
        assert 6 * n * d == pytest.approx(c, rel=1e-12)
        assert n_num == pytest.approx(n, rel=1e-6)
        assert d_num == pytest.approx(d, rel=1e-6)
        # and it is a minimum: moving N either way at fixed C raises the loss
        for k in (0.8, 1.25):
            assert law.loss(n * k, c / (6 * n * k)) > law.loss(n, d)


def test_chinchilla_budget_gives_70b_and_1_4t_under_20_tokens_rule():
    n, d = TokensPerParameter().optimum(5.76e23)
    assert n == pytest.approx(69.3e9, rel=0.01)
    assert d == pytest.approx(1.386e12, rel=0.01)


def test_approach3_constants_imply_50_to_120_tokens_per_parameter_and_refit_about_20():
    ratios = {c: CHINCHILLA.optimum(c)[1] / CHINCHILLA.optimum(c)[0] for c in (1e21, 1e22, 1e23, 1e24, 1e25)}
    assert 45 < ratios[1e21] < 55 and 115 < ratios[1e25] < 125
    assert all(ratios[a] < ratios[b] for a, b in zip(list(ratios), list(ratios)[1:]))  # D/N grows with C
    # closed form of the ratio: D/N = (C/6)^((alpha-beta)/(alpha+beta)) / G^2
    law = CHINCHILLA
    g = (law.alpha * law.A / (law.beta * law.B)) ** (1 / (law.alpha + law.beta))
    assert ratios[1e23] == pytest.approx((1e23 / 6) ** ((law.alpha - law.beta) / (law.alpha + law.beta)) / g**2)
    n, d = BESIROGLU.optimum(5.76e23)
    assert 15 < d / n < 25 and n == pytest.approx(72e9, rel=0.05)


def test_budget_inversions_round_trip():
    for law in (CHINCHILLA, BESIROGLU, KAPLAN):
        n, d = law.optimum(1e22)
        assert flops_for(law, n=n) == pytest.approx(1e22, rel=1e-6)
        assert flops_for(law, d=d) == pytest.approx(1e22, rel=1e-6)
        assert flops_for(law, loss=law.loss(n, d)) == pytest.approx(1e22, rel=1e-6)
    with pytest.raises(ValueError, match="irreducible"):
        flops_for(CHINCHILLA, loss=1.5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_parameter_and_flop_counts_equal_the_real_model(arch):
    for target in (3e4, 2e6, 1.2e8, 7e9):
        fields = propose_model(target, arch, vocab_size=50257, seq_len=1024)
        cfg = resolve_proposal(fields, 50257)
        with torch.device("meta"):
            model = GPT(cfg)
        total, non_embedding = count_params(cfg)
        assert total == model.num_params()
        assert non_embedding == model.num_params(exclude_embeddings=True)
        assert flops_per_token(cfg, 1024) == model.flops_per_token(1024)
        assert non_embedding == pytest.approx(target, rel=0.25)


def test_proposed_shapes_are_valid_and_close_for_both_counts():
    for target in (1e5, 1e7, 1e9, 3e10, 7e10):
        for count in ("non_embedding", "total") if target > 1e6 else ("non_embedding",):
            cfg = resolve_proposal(propose_model(target, "llama", 32000, 4096, count=count), 32000)
            total, non_emb = count_params(cfg)
            got = total if count == "total" else non_emb
            assert got == pytest.approx(target, rel=0.12), (target, count, cfg)
            assert cfg.n_head % cfg.n_kv_head == 0 and cfg.d_model % cfg.n_head == 0
            assert 16 <= cfg.d_model / cfg.n_layer <= 256  # width/depth like published models
    with pytest.raises(FmforgeError, match="embeddings of a 32000-token vocabulary alone exceed it"):
        propose_model(1e5, "llama", 32000, 4096, count="total")
    big = resolve_proposal(propose_model(7e10, "llama", 32000, 4096, count="total"), 32000)
    assert 60 <= big.n_layer <= 100 and 8192 <= big.d_model <= 10240  # Chinchilla/Llama-2 70B: 80 x 8192


def test_repetition_penalty_follows_muennighoff():
    u = 1e11
    assert effective_data(5e10, u) == 5e10
    assert effective_data(4 * u, u) == pytest.approx(u * (1 + 15.387 * (1 - math.exp(-3 / 15.387))))
    assert effective_data(1000 * u, u) == pytest.approx(u * (1 + 15.387))  # repeated data saturates
    assert effective_data(100 * u, u) < effective_data(1000 * u, u) < u * (1 + 15.387 + 1e-9)
    n = CHINCHILLA.optimum(flops_for(CHINCHILLA, d=u))[0]  # the compute-optimal size for the unique data
    assert repeated_loss(CHINCHILLA, n, u, u) == CHINCHILLA.loss(n, u)
    fresh = CHINCHILLA.loss(n, 4 * u)
    # ~4 epochs cost almost nothing (their headline result); 40 epochs cost clearly more
    assert repeated_loss(CHINCHILLA, n, 4 * u, u) - fresh < 0.01
    assert repeated_loss(CHINCHILLA, n, 40 * u, u) - CHINCHILLA.loss(n, 40 * u) > 0.03


def test_inference_aware_optimum_is_smaller_model_on_more_tokens_at_same_loss():
    for law in (CHINCHILLA, BESIROGLU):
        n, d = law.optimum(1e23)
        target = law.loss(n, d)
        n_ia, d_ia = inference_aware_optimum(law, target, inference_tokens=1e13)
        assert n_ia < n and d_ia > d
        assert law.loss(n_ia, d_ia) == pytest.approx(target, abs=1e-9)
        assert 6 * n_ia * d_ia + 2 * n_ia * 1e13 < 6 * n * d + 2 * n * 1e13
        # no inference demand: back to the compute-optimal size
        n0, _ = inference_aware_optimum(law, target, inference_tokens=1.0)
        assert n0 == pytest.approx(n, rel=1e-3)


def test_time_cost_and_budget_arithmetic():
    h100 = get_hardware("H100")
    hours, usd = time_and_cost(989e12 * 0.5 * 3600 * 8, h100, devices=8, mfu=0.5)
    assert hours == pytest.approx(1.0) and usd == pytest.approx(8 * h100.usd_per_hour)
    assert flops_from_budget(h100, 8, 0.5, usd=usd) == pytest.approx(989e12 * 0.5 * 3600 * 8)
    assert get_hardware("h100", {"h100": 1.5}).usd_per_hour == 1.5
    assert get_hardware("A100").name == "a100-80gb" and get_hardware("Trainium").name == "trn1"
    assert get_hardware("cpu").peak_tflops > 0  # measured here
    with pytest.raises(FmforgeError, match="unknown hardware 'tpu-v9'"):
        get_hardware("tpu-v9")


def test_mfu_is_read_from_a_runs_metrics(tmp_path):
    lines = [{"step": 10, "loss": 3.0, "mfu": 0.9}, {"step": 20, "loss": 2.9, "mfu": 0.41},
             {"step": 30, "loss": 2.8, "mfu": 0.43}, {"step": 30, "val_loss": 2.9}, {"step": 40, "mfu": 0.42}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert mfu_from_run(tmp_path) == pytest.approx(0.42)  # first (warm-up) window left out
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    with pytest.raises(FmforgeError, match="no mfu values"):
        mfu_from_run(tmp_path)


def test_batch_and_lr_guidance_cites_sources_and_rescaling_rules():
    rows = hparams.guidance(1.3e9, 1.2e9, 2.3e21, 2.3, 2048)
    by = {r["heuristic"]: r for r in rows}
    assert by["gpt3-table"]["lr"] == pytest.approx(2e-4) and by["gpt3-table"]["batch_tokens"] == pytest.approx(1e6)
    b, lr = hparams.deepseek(1e24)
    assert b == pytest.approx(0.2920 * 1e24**0.3271) and lr == pytest.approx(0.3118 * 1e24**-0.125)
    assert all(r["source"] for r in rows)
    assert hparams.rescale_lr(1e-3, 1000, 4000, "sqrt") == pytest.approx(2e-3)
    assert hparams.rescale_lr(1e-3, 1000, 4000, "linear") == pytest.approx(4e-3)


@pytest.mark.slow
def test_rescale_keeps_tokens_and_warmup_tokens_and_splits_over_ranks(tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("data: {seq_len: 128}\ntrain: {global_batch: 65536, max_steps: 1000, "
                        "micro_batch_size: 8}\noptim: {lr: 0.001, warmup_steps: 100}\n")
    out = tmp_path / "new.yaml"
    r = run_cli("plan", "--rescale", cfg_path, "--global-batch-tokens", 262144, "--world-size", 8,
                "--write-config", out)
    assert r.returncode == 0, r.stderr
    new = load_config(out)
    assert new.optim.lr == pytest.approx(0.002)  # sqrt(4)
    assert new.train.max_steps == 250 and new.optim.warmup_steps == 25
    assert new.train.global_batch == 262144 and "256 sequences per rank" in r.stdout
    r = run_cli("plan", "--rescale", cfg_path, "--world-size", 7)
    assert r.returncode == 2 and "do not split over 7 ranks" in r.stderr


@pytest.mark.slow
def test_plan_reports_every_law_and_proposes_a_config_train_accepts_unchanged(prepared, tmp_path):
    """The full loop: plan from a FLOP budget on real prepared data, write the config, train it as written;
    the run's parameter count is the one the plan promised."""
    cfg_path, png = tmp_path / "planned.yaml", tmp_path / "plan.png"
    r = run_cli("plan", "--flops", "1.5e11", "--data", prepared, "--seq-len", 64, "--gpu", "cpu",
                "--inference-tokens", "1e9", "--json", "--write-config", cfg_path, "--plot", png)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    rows = {row["law"]: row for row in report["laws"]}
    assert set(rows) == set(LAWS)
    assert report["chosen"] == "besiroglu"
    pick = rows["besiroglu"]
    assert pick["params"] == pytest.approx(BESIROGLU.optimum(1.5e11)[0])
    assert pick["hours"] > 0 and pick["cost_usd"] > 0 and "inference_aware" in pick
    assert pick["flops"] > pick["flops_6nd"] * 0.5
    assert png.stat().st_size > 10_000
    # data has far fewer unique tokens than the plan wants: the repetition penalty is reported
    assert "repetition" in pick and pick["repetition"]["epochs"] > 1
    cfg = load_config(cfg_path)
    assert cfg.data.path == str(prepared.resolve())
    cfg.train.out_dir = str(tmp_path / "run")
    run = run_cli("train", cfg_path, "--out", tmp_path / "run", "log.tensorboard=false", "train.threads=1",
                  "log.progress=none")
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"{pick['params_total'] / 1e6:.2f}M parameters" in run.stdout
    assert read_metrics(tmp_path / "run")[-1]["step"] == cfg.train.max_steps


def test_plan_refuses_a_fitted_law_with_a_constant_at_its_bound_unless_allowed(tmp_path):
    law = {"form": "E + A/N^alpha + B/D^beta", "E": math.exp(-20), "A": 300.0, "B": 600.0, "alpha": 0.3,
           "beta": 0.3, "n_definition": "non-embedding parameters", "d_definition": "training tokens", "ci": {},
           "points": [], "source": "test", "at_bound": ["E"]}
    path = tmp_path / "law.json"
    path.write_text(json.dumps(law))
    with pytest.raises(FmforgeError, match=r"E = 2.061e-09 at its lower bound .* --allow-bounded-fit"):
        plan(flops=1e20, law=str(path), seq_len=512, vocab_size=8192)
    assert plan(flops=1e20, law=str(path), seq_len=512, vocab_size=8192, allow_bounded_fit=True)["chosen"] == "fitted"


def test_plan_with_fitted_law_file_uses_it(tmp_path):
    law = {"form": "E + A/N^alpha + B/D^beta", "E": 1.5, "A": 300.0, "B": 600.0, "alpha": 0.3, "beta": 0.3,
           "n_definition": "non-embedding parameters", "d_definition": "training tokens", "ci": {},
           "points": [], "source": "test"}
    path = tmp_path / "law.json"
    path.write_text(json.dumps(law))
    report = plan(flops=1e20, law=str(path), seq_len=512, vocab_size=8192)
    assert report["chosen"] == "fitted"
    row = next(r for r in report["laws"] if r["law"] == "fitted")
    fitted = ChinchillaLaw("f", 1.5, 300.0, 600.0, 0.3, 0.3)
    assert row["params"] == pytest.approx(fitted.optimum(1e20)[0]) and row["loss"] == pytest.approx(
        fitted.loss(*fitted.optimum(1e20)))


def test_plan_from_target_size_loss_or_dataset():
    r = plan(params=7e9, seq_len=4096)
    for row in r["laws"]:
        assert row["params"] == pytest.approx(7e9, rel=1e-6)
    r = plan(target_loss=2.1)
    row = next(x for x in r["laws"] if x["law"] == "chinchilla")
    assert row["loss"] == pytest.approx(2.1, abs=1e-6)
    r = plan(tokens=1e12)
    row = next(x for x in r["laws"] if x["law"] == "besiroglu")
    assert row["tokens"] == pytest.approx(1e12, rel=1e-6)
    model = ModelConfig(**r["config"]["model"]).resolved()
    assert model.n_layer == row["model_resolved"]["n_layer"]


@pytest.mark.parametrize("args, message", [
    (["--flops=-1e20"], "--flops must be a positive number"),
    (["--gpu", "h100", "--hours=0"], "--hours must be a positive number"),
    (["--gpu", "tpu-v9", "--hours", "10"], "unknown hardware 'tpu-v9'"),
    (["--hours", "10"], "--hours and --usd need --gpu"),
    (["--flops", "1e20", "--data", "/nonexistent/data"], "--data: not a directory"),
    ([], "nothing to plan from"),
    (["--flops", "1e20", "--mfu", "1.5"], "--mfu must be in (0, 1]"),
    (["--flops", "1e20", "--law", "nosuchlaw"], "neither a known law"),
    (["--flops", "1e20", "--law", "/nonexistent/law.json"], "law"),
    (["--flops", "1e20", "--price", "h100"], "bad --price"),
])
@pytest.mark.slow
def test_bad_plan_inputs_fail_in_one_line(args, message):
    r = run_cli("plan", *args)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
