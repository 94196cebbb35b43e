"""Knowledge distillation (``fmforge distill``): the divergences against hand-computed values, a frozen
teacher outside the trained model, tokenizer checks, exact resume, and a distilled student that learns
more than the same student trained alone."""

import contextlib
import hashlib
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics, tiny_overrides
from safetensors import safe_open
from safetensors.torch import load_file

from fmforge.config import DistillConfig, build_config
from fmforge.data.labelled import pang_lee_polarity
from fmforge.data.tokenizer import train_tokenizer
from fmforge.errors import FmforgeError
from fmforge.objectives import make_task
from fmforge.objectives.distill import DistillTask, distill_loss, divergence
from fmforge.train.checkpoint import export_consolidated
from fmforge.train.distill import distill_command
from fmforge.train.loop import train

# A teacher that puts half its mass on the first of three tokens, a student that knows nothing (uniform).
P_TEACHER = [0.5, 0.25, 0.25]
TEACHER_LOGITS = torch.tensor([P_TEACHER]).log()
UNIFORM = torch.zeros(1, 3)


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def soften(p, temperature):
    """softmax(log p / T), by hand."""
    w = [pi ** (1 / temperature) for pi in p]
    return [wi / sum(w) for wi in w]


def quiet(_msg):
    pass


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_forward_kl_is_kl_teacher_student_at_temperature_t_scaled_by_t_squared():
    uniform = [1 / 3] * 3
    # T=1: 0.5 ln 1.5 + 2 * 0.25 ln 0.75
    assert divergence(UNIFORM, TEACHER_LOGITS, "fkl").item() == pytest.approx(0.0588915, abs=1e-6)
    assert divergence(UNIFORM, TEACHER_LOGITS, "fkl").item() == pytest.approx(kl(P_TEACHER, uniform), rel=1e-5)
    # T=2 softens the teacher to [0.4142, 0.2929, 0.2929]; the KL is multiplied by T² = 4
    expected = 4 * kl(soften(P_TEACHER, 2.0), uniform)
    assert expected == pytest.approx(0.056882, abs=1e-6)
    assert divergence(UNIFORM, TEACHER_LOGITS, "fkl", temperature=2.0).item() == pytest.approx(expected, rel=1e-5)


def test_reverse_kl_is_kl_student_teacher():
    # (1/3) (ln(2/3) + 2 ln(4/3))
    assert divergence(UNIFORM, TEACHER_LOGITS, "rkl").item() == pytest.approx(0.0566330, abs=1e-6)
    student = [0.2, 0.3, 0.5]
    value = divergence(torch.tensor([student]).log(), TEACHER_LOGITS, "rkl").item()
    assert value == pytest.approx(kl(student, P_TEACHER), rel=1e-5)


def test_generalized_jsd_is_the_mixture_divergence_and_tends_to_the_scaled_kls_at_beta_0_and_1():
    student = [0.2, 0.3, 0.5]
    s = torch.tensor([student]).log()
    for beta in (0.1, 0.5, 0.9):
        m = [beta * t + (1 - beta) * q for t, q in zip(P_TEACHER, student)]
        expected = beta * kl(P_TEACHER, m) + (1 - beta) * kl(student, m)
        assert divergence(s, TEACHER_LOGITS, "jsd", beta=beta).item() == pytest.approx(expected, rel=1e-5)
    eps = 1e-3  # small enough for the O(beta) term, large enough for fp32
    fkl, rkl = divergence(s, TEACHER_LOGITS, "fkl").item(), divergence(s, TEACHER_LOGITS, "rkl").item()
    assert divergence(s, TEACHER_LOGITS, "jsd", beta=eps).item() / eps == pytest.approx(fkl, rel=2e-3)
    assert divergence(s, TEACHER_LOGITS, "jsd", beta=1 - eps).item() / eps == pytest.approx(rkl, rel=2e-3)


def test_every_divergence_is_zero_when_the_student_is_the_teacher_and_alpha_mixes_in_the_hard_labels():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    for kind in ("fkl", "rkl", "jsd"):
        assert divergence(logits, logits, kind, temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)
    teacher = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 4])
    ce = F.cross_entropy(logits, labels).item()
    d = divergence(logits, teacher, "fkl", temperature=2.0).item()
    for alpha in (0.0, 0.3, 1.0):
        cfg = DistillConfig(teacher="t", kind="fkl", temperature=2.0, alpha=alpha)
        assert distill_loss(logits, teacher, labels, cfg).item() == pytest.approx(alpha * d + (1 - alpha) * ce, rel=1e-5)
    # A teacher over fewer outputs (an unpadded vocabulary) is compared on those; the hard loss sees all 7.
    cfg = DistillConfig(teacher="t", alpha=0.5)
    expected = 0.5 * divergence(logits[:, :5], teacher[:, :5], "fkl").item() + 0.5 * ce
    assert distill_loss(logits, teacher[:, :5], labels, cfg).item() == pytest.approx(expected, rel=1e-5)


def test_distill_without_a_teacher_is_a_one_line_error(prepared, tmp_path):
    with pytest.raises(FmforgeError, match="needs a teacher: --teacher RUN_DIR"):
        distill_command(None, tiny_overrides(prepared, tmp_path / "out"))
    with pytest.raises(FmforgeError, match=r"distill.temperature"):
        build_config({}, ["distill.temperature=0"])


@pytest.fixture
def teacher(chat_base):
    """Any trained decoder on the student's tokenizer will do for the mechanics (conftest's nano Llama)."""
    return chat_base


def test_a_teacher_with_another_tokenizer_or_family_is_a_one_line_error(prepared, teacher, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    train_tokenizer(["a different corpus, a different vocabulary " * 50], 300).save(other / "tokenizer.json")
    cfg = build_config({}, tiny_overrides(prepared, tmp_path / "out", **{"distill.teacher": str(other)}))
    with pytest.raises(FmforgeError, match="uses another tokenizer than the student's data") as err:
        make_task(cfg, prepared, quiet)
    assert "\n" not in str(err.value)
    cfg = build_config({}, tiny_overrides(prepared, tmp_path / "out", **{"distill.teacher": str(tmp_path)}))
    with pytest.raises(FmforgeError, match="holds no model"):
        make_task(cfg, prepared, quiet)


def test_the_teacher_is_frozen_in_eval_mode_and_gets_no_gradient(prepared, teacher, tmp_path):
    cfg = build_config({}, tiny_overrides(prepared, tmp_path / "out", **{"distill.teacher": str(teacher)}))
    task = make_task(cfg, prepared, quiet)
    assert isinstance(task, DistillTask)
    torch.manual_seed(0)
    student = task.build_model()
    batch = task.make_loader(4, 0, 1).next_step()[0]
    loss = task.loss(student, batch, torch.device("cpu"), contextlib.nullcontext)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert not task.teacher.training
    assert all(not p.requires_grad and p.grad is None for p in task.teacher.parameters())
    assert not any(t is p for t in task.teacher.parameters() for p in student.parameters())


def test_resumed_distillation_matches_uninterrupted_and_never_saves_or_changes_the_teacher(prepared, teacher,
                                                                                           tmp_path):
    before = sha256(teacher / "model.safetensors")
    out = tmp_path / "student"
    overrides = tiny_overrides(prepared, out, **{"train.max_steps": 20, "checkpoint.interval": 10,
                                                 "distill.kind": "jsd", "distill.temperature": 2.0})
    distill_command(None, overrides, teacher=str(teacher))
    uninterrupted = load_file(out / "model.safetensors")
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert sha256(teacher / "model.safetensors") == before
    # Checkpoints hold the student alone: exported, they name exactly the final model's tensors.
    export_consolidated(out / "checkpoints" / "step_0000010", tmp_path / "exported")
    with safe_open(str(tmp_path / "exported" / "model.safetensors"), "pt") as ckpt, \
            safe_open(str(out / "model.safetensors"), "pt") as final:
        assert set(ckpt.keys()) == set(final.keys())
    distill_command(None, overrides, teacher=str(teacher), resume=str(out / "checkpoints" / "step_0000010"))
    # Bitwise: the teacher is deterministic, so resuming is as exact as for training.
    resumed = load_file(out / "model.safetensors")
    assert {k: (resumed[k] - v).abs().max().item() for k, v in uninterrupted.items() if not torch.equal(resumed[k], v)} == {}
    assert [m["loss"] for m in read_metrics(out) if "loss" in m][-10:] == losses[-10:]
    assert sha256(teacher / "model.safetensors") == before


def _bert_run(prepared, out, **sections):
    raw = {"model": {"arch": "bert", "size": "bert-nano"}, "data": {"path": str(prepared), "seq_len": 32},
           "train": {"out_dir": str(out), "max_steps": 4, "global_batch": 256, "micro_batch_size": 8, "threads": 1,
                     "eval_interval": 0, "eval_batches": 2},
           "checkpoint": {"interval": 0}, "log": {"tensorboard": False}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return build_config(raw)


def test_an_encoder_classifier_distils_from_a_classifier_teacher_on_the_same_labels(prepared, chat_base, tmp_path):
    train(_bert_run(prepared, tmp_path / "base"), echo=quiet)  # a BERT on the corpus's tokenizer
    classify = {"data": {"path": str(pang_lee_polarity()), "seq_len": 32}, "train": {"global_batch": 16},
                "finetune": {"base": str(tmp_path / "base"), "task": "classify", "val_fraction": 0.25}}
    train(_bert_run(prepared, tmp_path / "teacher", **classify), echo=quiet)
    before, messages = sha256(tmp_path / "teacher" / "model.safetensors"), []
    result = train(_bert_run(prepared, tmp_path / "student", **classify, distill={
        "teacher": str(tmp_path / "teacher"), "temperature": 2.0}), echo=messages.append)
    assert result.step == 4 and math.isfinite(result.val_loss)
    assert any("distilling from" in m and "2 classes" in m for m in messages), messages
    assert sha256(tmp_path / "teacher" / "model.safetensors") == before
    with pytest.raises(FmforgeError, match="holds a decoder model; this student needs a bert teacher"):
        train(_bert_run(prepared, tmp_path / "wrong", **classify, distill={"teacher": str(chat_base)}), echo=quiet)


# The student: a nano Llama for 80 steps of 2 rows of 64 tokens (hard labels that noisy are where soft
# targets help most). The teacher: the same architecture trained on the same corpus for 150 steps of 8 rows
# (7.5x the tokens). Measured (2 CPU cores, seeds fixed): scratch 5.327, distilled 4.867 val loss (nats).
STUDENT_RUN = {"train.max_steps": 80, "train.global_batch": 128, "train.micro_batch_size": 2, "checkpoint.interval": 0,
           "train.eval_interval": 0, "train.eval_batches": 8}
TEACHER_RUN = {"train.max_steps": 150, "checkpoint.interval": 0, "train.eval_interval": 0, "train.eval_batches": 8}


@pytest.mark.slow
def test_a_student_distilled_from_a_trained_teacher_beats_the_same_student_trained_from_scratch(prepared, tmp_path):
    teacher = train(build_config({}, tiny_overrides(prepared, tmp_path / "teacher", **TEACHER_RUN)), echo=quiet)
    scratch = train(build_config({}, tiny_overrides(prepared, tmp_path / "scratch", **STUDENT_RUN)), echo=quiet)
    distilled = train(build_config({}, tiny_overrides(prepared, tmp_path / "distilled", **STUDENT_RUN, **{
        "distill.teacher": str(teacher.run_dir), "distill.alpha": 1.0})), echo=quiet)
    print(f"val loss: teacher {teacher.val_loss:.4f}; after {STUDENT_RUN['train.max_steps']} steps: scratch "
          f"{scratch.val_loss:.4f}, distilled {distilled.val_loss:.4f}")
    assert teacher.val_loss < scratch.val_loss - 0.5
    assert distilled.val_loss < scratch.val_loss - 0.2
