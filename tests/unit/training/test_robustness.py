"""Robustness: corruptions that grow with their severity, attacks that stay within epsilon and
raise the loss, the scorer the evaluation's actor pool runs, and adversarial training steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline.analysis.robustness import RobustnessScorer, attack, conditions, corrupt, summarize
from pipeline.config import CORRUPTIONS, MAX_SEVERITY, TrainConfig
from pipeline.errors import ConfigError
from pipeline.images.decode import decode_image
from pipeline.inference.predict import Classifier
from pipeline.models.artifact import load_artifact, load_metadata
from pipeline.models.registry import create_model
from pipeline.models.transforms import EvalPreset, norm_tensors, to_model_input
from pipeline.training.loop import train_one_epoch
from pipeline.training.recipe import Adversarial, ClassificationLoss

ATTACK_EPSILON = 4.0


def photos(sample_images, size: int) -> np.ndarray:
    """The sample catalog's real photos, decoded as the preprocess stage does (uint8 NHWC)."""
    return np.stack([decode_image(p.read_bytes(), size) for p in sample_images[:6]])


def mean_change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_changes_real_photos_more_at_each_severity(name, sample_images):
    images = photos(sample_images, 96)
    changes = []
    for severity in range(1, MAX_SEVERITY + 1):
        out = corrupt(images, name, severity)
        assert out.dtype == np.uint8 and out.shape == images.shape
        changes.append(mean_change(out, images))
    assert changes[0] > 0
    assert changes == sorted(changes) and changes[-1] > 1.5 * changes[0]
    np.testing.assert_array_equal(corrupt(images, name, 3), corrupt(images, name, 3))  # seeded


def test_unknown_corruption_and_severity_name_the_valid_choices(sample_images):
    images = photos(sample_images, 32)
    with pytest.raises(ValueError, match="valid: gaussian_noise"):
        corrupt(images, "fog", 1)
    with pytest.raises(ValueError, match=r"outside 1\.\.5"):
        corrupt(images, "jpeg", 6)


@pytest.fixture(scope="module")
def bundled_torch(bundled_model):
    model, meta = load_artifact(bundled_model)
    mean, std = norm_tensors(meta.mean, meta.std, "cpu")
    return model, meta, (lambda x: model(to_model_input(x, mean, std)))


def test_fgsm_and_pgd_stay_within_epsilon_and_raise_the_loss(bundled_torch, sample_images):
    model, meta, logits_fn = bundled_torch
    images = torch.from_numpy(photos(sample_images, meta.input_size))
    labels = torch.tensor([meta.classes.index(p.parent.name) for p in sample_images[:6]])
    with torch.no_grad():
        clean_loss = F.cross_entropy(logits_fn(images.float()), labels)
    fgsm = attack(logits_fn, images, labels, ATTACK_EPSILON)
    pgd = attack(logits_fn, images, labels, ATTACK_EPSILON, steps=3, random_start=True,
                 step_size=ATTACK_EPSILON / 2, generator=torch.Generator().manual_seed(0))
    for adv in (fgsm, pgd):
        assert adv.dtype == torch.float32 and adv.shape == images.shape
        assert (adv - images.float()).abs().max() <= ATTACK_EPSILON + 1e-4
        assert adv.min() >= 0 and adv.max() <= 255
        with torch.no_grad():
            assert F.cross_entropy(logits_fn(adv), labels) > clean_loss
    assert all(p.grad is None for p in model.parameters())  # only the input got gradients


def test_scorer_judges_each_row_under_each_condition(bundled_model, sample_images):
    meta = load_metadata(bundled_model)
    images = photos(sample_images, meta.input_size)
    category = np.array([p.parent.name for p in sample_images[:6]], dtype=object)
    category[1] = "Dragon-Fruit"  # a category the model does not know: not judged
    status = np.array(["ok"] * 6, dtype=object)
    status[2] = "error"  # an unreadable row: not judged
    scorer = RobustnessScorer(bundled_model, "cpu", "jpeg,contrast", "1,5", "2")
    assert scorer.conditions == conditions(["jpeg", "contrast"], [1, 5], [2.0]) == [
        "clean", "jpeg@1", "jpeg@5", "contrast@1", "contrast@5", "fgsm@2/255"]
    out = scorer({"product_id": np.arange(6), "category": category, "status": status,
                  "image": images.copy()})
    correct = out["robust_correct"]
    assert correct.shape == (6, 6) and (correct[[1, 2]] == -1).all()
    judged = [0, 3, 4, 5]
    clf = Classifier(bundled_model, "cpu")
    labels = np.array([meta.classes.index(c) for c in category[judged]])
    expected_clean = clf.logits(images[judged]).argmax(1).numpy() == labels
    expected_jpeg5 = clf.logits(corrupt(images[judged], "jpeg", 5)).argmax(1).numpy() == labels
    np.testing.assert_array_equal(correct[judged, 0], expected_clean)
    np.testing.assert_array_equal(correct[judged, 2], expected_jpeg5)
    summary = summarize(scorer.conditions, correct)
    # PGD, the multi-step check, on the same rows: never weaker than one FGSM step here
    pgd = RobustnessScorer(bundled_model, "cpu", "jpeg", "1", "2", attacks="fgsm,pgd")
    assert pgd.conditions == ["clean", "jpeg@1", "fgsm@2/255", "pgd@2/255"]
    both = pgd({"product_id": np.arange(6), "category": category, "status": status,
                "image": images.copy()})["robust_correct"][judged]
    assert both[:, 3].sum() <= both[:, 2].sum()
    assert summary["rows"] == 4 and summary["clean_accuracy"] == pytest.approx(expected_clean.mean())
    assert [r["kind"] for r in summary["conditions"]] == ["clean"] + ["corruption"] * 4 + ["attack"]
    assert summary["conditions"][-1]["epsilon"] == 2.0


def test_bad_robustness_options_stop_the_job_before_it_writes(tmp_path):
    from jobs.evaluate import main

    for flags, message in ((["--corruptions", "fog"], "unknown fog; valid: all, gaussian_noise"),
                           (["--corruptions", "all", "--severities", "0"], "--severities: '0'"),
                           (["--corruptions", "jpeg", "--attack-epsilons", "x"],
                            "--attack-epsilons: 'x'")):
        with pytest.raises(ConfigError, match=message):
            main([*flags, "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# ---- adversarial training steps (no Ray: the recipe's own function) -------------------------

def test_adversarial_step_trains_on_clean_and_attacked_copies_in_one_forward(sample_images):
    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small", 4)
    images = torch.from_numpy(photos(sample_images, 64)[:4])
    labels = torch.arange(4)
    mean, std = norm_tensors([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], "cpu")
    train_batches = []  # batch sizes of the forwards made in train mode
    model.register_forward_hook(
        lambda m, i, o: train_batches.append(len(i[0])) if m.training else None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    recipe = Adversarial("pgd", epsilon=2.0, steps=2, weight=0.5)
    out = train_one_epoch(model, ClassificationLoss(), opt, sched, [{"image": images, "label": labels}],
                          EvalPreset(), mean, std, torch.device("cpu"), adversarial=recipe)
    # one training forward of clean + attacked images; the attack's forwards ran in eval mode
    assert train_batches == [8] and model.training
    assert np.isfinite(out["train_loss"]) and out["train_images"] == 4


def test_adversarial_options_come_from_the_training_config():
    assert Adversarial.from_config(TrainConfig()) is None
    recipe = Adversarial.from_config(TrainConfig(adversarial="fgsm", adversarial_epsilon=1.5))
    assert (recipe.kind, recipe.epsilon, recipe.weight) == ("fgsm", 1.5, 0.5)
