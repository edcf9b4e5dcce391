"""The task contract: what a generated sample is conditioned on.

Each layer reads the task's entry in TASKS instead of branching on "has classes":

    prepare     what a row of the shards carries besides its image (`columns`), written
                into the manifest as `task`
    models      the condition the generator and discriminator take (`condition`)
    step        where the fake samples' conditions come from (`paired`): drawn at random
                (class labels), or the real batch's own (an input image, a caption)
    evaluate    the figures that apply beyond FID/IS/KID/precision-recall (`metrics`)
    export,     what a request carries (`request`) and the MLflow signature made from it;
    serving     every task answers with an image batch

Two tasks run today (unconditional, class_conditional). image_to_image and text_to_image are
declared so the contract is shaped by them; they plug in by filling their entries, with a
family that takes their condition, without new branches in the stages:

- image_to_image: paired shards (an `input_image` column beside `image`), fakes conditioned on
  the real batch's input images, image-in / image-out serving, paired metrics (L1, LPIPS-like
  distances to the target, FID of the outputs).
- text_to_image: a `caption` per row, a text encoder whose identity (name, weights sha256) is
  part of the run's identity like the dataset version, prompt-in serving, text-image alignment
  figures (a CLIP-style score).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor
CONDITIONS = ("none", "label", "image", "text")


@dataclass(frozen=True)
class RequestField:
    """One column of a served request."""

    name: str
    required: bool


@dataclass(frozen=True)
class Task:
    name: str
    condition: str  # one of CONDITIONS
    columns: tuple[str, ...]  # what a shard row carries besides "image"
    paired: bool  # True: a fake's condition is a real sample's (from the batch); False: drawn
    request: tuple[RequestField, ...]
    metrics: tuple[str, ...]  # evaluation figures that apply beyond the unconditional set
    available: bool = True  # False: declared for the design, refused with a message

    def __post_init__(self):
        if self.condition not in CONDITIONS:
            raise ValueError(f"task {self.name}: condition {self.condition!r} not in {CONDITIONS}")

    def check_available(self) -> None:
        if not self.available:
            runnable = ", ".join(t.name for t in TASKS.values() if t.available)
            raise NotImplementedError(
                f"task {self.name!r} is declared but not implemented yet; available: {runnable}"
            )

    def fake_conditions(
        self, real_conditions: Tensor | None, n: int, num_classes: int, generator: torch.Generator
    ) -> Tensor | None:
        """The conditions of a batch of `n` fakes: uniform class labels (drawn on the CPU from
        `generator`), the real batch's own conditions (paired tasks), or None."""
        if self.condition == "none":
            return None
        if self.paired:
            if real_conditions is None:
                raise ValueError(f"task {self.name}: a paired task needs the batch's conditions")
            return real_conditions
        return torch.randint(0, num_classes, (n,), generator=generator)


COUNT = RequestField("num_images", True)
SEED = RequestField("seed", True)
# Accepted even by unconditional models: a label sent to one is refused with a message,
# where a column missing from the signature would be dropped by MLflow without one.
LABEL = RequestField("label", False)
# The sampling tools of every task that draws noise, all optional: a request without them gets
# what it got before they existed (psi 1 changes nothing; no interpolation). A record with
# `interpolate_to_seed` asks for `num_images` frames from `seed`'s noise to that seed's, by
# `interpolation` ("slerp" or "lerp"; gan.sampling.INTERPOLATIONS).
TRUNCATION = RequestField("truncation", False)
NOISE_TOOLS = (
    TRUNCATION,
    RequestField("interpolate_to_seed", False),
    RequestField("interpolation", False),
)

TASKS = {
    task.name: task
    for task in (
        Task("unconditional", "none", (), False, (COUNT, SEED, LABEL, *NOISE_TOOLS), ()),
        Task(
            "class_conditional",
            "label",
            ("label",),
            False,
            (COUNT, SEED, LABEL, *NOISE_TOOLS),
            ("label_accuracy", "per_class_fid", "cas"),
        ),  # fmt: skip
        Task(
            "image_to_image",
            "image",
            ("input_image",),
            True,
            (RequestField("image", True), RequestField("seed", False)),
            ("paired_l1", "paired_perceptual"),
            available=False,
        ),  # fmt: skip
        Task(
            "text_to_image",
            "text",
            ("caption",),
            True,
            (RequestField("prompt", True), COUNT, SEED, *NOISE_TOOLS),
            ("text_alignment",),
            available=False,
        ),  # fmt: skip
    )
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def task_for(conditional: bool) -> Task:
    """The task of a label-conditioned or an unconditional model (model.conditional)."""
    return TASKS["class_conditional" if conditional else "unconditional"]
