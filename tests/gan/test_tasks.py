"""The task contract (gan/tasks.py): one entry per kind of conditioning, read by every layer."""

import pytest
import torch

from gan.export import ExportError, spec_from_dict
from gan.models import FAMILY_CONDITIONS, GeneratorSpec
from gan.sampling import LatentSampler
from gan.tasks import TASKS, get_task, task_for


def test_every_task_names_a_known_condition_and_only_two_run_today():
    assert {t.name: t.condition for t in TASKS.values()} == {
        "unconditional": "none", "class_conditional": "label",
        "image_to_image": "image", "text_to_image": "text",
    }  # fmt: skip
    assert [t.name for t in TASKS.values() if t.available] == [
        "unconditional", "class_conditional",
    ]  # fmt: skip
    assert task_for(True).name == "class_conditional" and task_for(False).name == "unconditional"
    # the paired tasks take their condition from the data; labels are drawn
    assert [t.name for t in TASKS.values() if t.paired] == ["image_to_image", "text_to_image"]
    with pytest.raises(ValueError, match="unknown task 'video'; known: unconditional"):
        get_task("video")


def test_fake_conditions_are_drawn_labels_the_batch_s_own_or_none():
    generator = torch.Generator().manual_seed(0)
    labels = TASKS["class_conditional"].fake_conditions(None, 500, 10, generator)
    assert labels.shape == (500,) and set(labels.tolist()) == set(range(10))
    assert TASKS["unconditional"].fake_conditions(None, 4, 0, generator) is None
    batch = torch.randn(4, 3, 8, 8)
    assert TASKS["image_to_image"].fake_conditions(batch, 4, 0, generator) is batch
    with pytest.raises(ValueError, match="paired task needs the batch's conditions"):
        TASKS["text_to_image"].fake_conditions(None, 4, 0, generator)


def test_the_sampler_takes_the_fakes_conditions_from_the_task():
    z, labels = LatentSampler(8, 10)(16, torch.Generator().manual_seed(3))
    assert z.shape == (16, 8) and labels.shape == (16,) and int(labels.max()) < 10
    assert LatentSampler(8)(4, torch.Generator())[1] is None
    batch = torch.randn(4, 3, 8, 8)  # a paired task's fakes are conditioned on the batch's own
    _, conditions = LatentSampler(8, task=TASKS["image_to_image"])(
        4, torch.Generator(), real_conditions=batch
    )
    assert conditions is batch


def test_a_generator_spec_carries_its_task_and_refuses_what_it_cannot_be():
    assert GeneratorSpec("dcgan", 1, 8, 8, 8).task == "unconditional"
    assert GeneratorSpec("dcgan", 1, 8, 8, 8, num_classes=10).task == "class_conditional"
    assert GeneratorSpec("dcgan", 1, 8, 8, 8).to_dict()["task"] == "unconditional"
    with pytest.raises(ValueError, match="class_conditional with num_classes 0"):
        GeneratorSpec("dcgan", 1, 8, 8, 8, task="class_conditional")
    with pytest.raises(NotImplementedError, match="'text_to_image' is declared but not"):
        GeneratorSpec("dcgan", 1, 8, 8, 8, task="text_to_image")
    assert all(c in ("none", "label") for conds in FAMILY_CONDITIONS.values() for c in conds)


def test_specs_saved_before_tasks_load_with_their_task_and_a_bad_task_is_named():
    old = {"family": "dcgan", "channels": 1, "resolution": 8, "z_dim": 8, "width": 8}
    assert spec_from_dict(old, "generator.json").task == "unconditional"
    assert spec_from_dict({**old, "num_classes": 3}, "g.json").task == "class_conditional"
    with pytest.raises(ExportError, match="g.json: unknown task 'gif'"):
        spec_from_dict({**old, "task": "gif"}, "g.json")
