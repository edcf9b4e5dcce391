"""How a bad params file is reported: ParamsError, one line per problem, and did-you-mean hints.

Every problem reads `key.path: what is wrong (got value)`, every echo of the user's input
shortened (pipeline.errors.ECHO_LIMIT). An unknown key suggests the closest allowed key, by
spelling or by the name other GAN code bases use for it (KEY_ALIASES), else lists the allowed
keys. A check that spans keys raises `inconsistent(...)`, whose message already names the keys.

This module knows nothing of the schema's sections: the functions that walk it take the root
model and the tagged models of its search dimensions (pipeline.config.schema passes them), so
the schema can use them without an import cycle.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

from pydantic import BaseModel
from pydantic_core import ErrorDetails, PydanticCustomError

from pipeline.errors import ECHO_LIMIT, echo, shorten

MAX_PROBLEMS = 20  # listed in one ParamsError; the rest are counted
INCONSISTENT = "inconsistent"  # the error type of checks that span keys

# A model of a discriminated union, by the value of its tag key (the search dimensions:
# "uniform" -> Uniform); such tags appear in an error's location and are not keys.
Tagged = Mapping[str, type[BaseModel]]


class ParamsError(ValueError):
    """params.yaml (or an override) is invalid; the message lists every problem found."""


def inconsistent(message: str) -> PydanticCustomError:
    """A problem that spans keys; `message` starts with the key paths it involves."""
    return PydanticCustomError(INCONSISTENT, message)


# Names other GAN code bases use for our keys, so a familiar name gets pointed at ours.
KEY_ALIASES = {
    "learning_rate": ("lr_g", "lr_d"),
    "lr": ("lr_g", "lr_d"),
    "epochs": ("steps",),
    "iterations": ("steps",),
    "num_steps": ("steps",),
    "batch": ("batch_size",),
    "lambda_gp": ("gp_weight",),
    "gamma": ("r1_gamma",),
    "n_dis": ("n_critic",),
    "d_steps": ("n_critic",),
    "ema_decay": ("ema_kimg",),
    "ema_beta": ("ema_kimg",),
    "nz": ("z_dim",),
    "latent_dim": ("z_dim",),
    "ngf": ("g_width",),
    "ndf": ("d_width",),
}


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """A hint naming the closest allowed key: by spelling, else by a known alias."""
    if len(word) > 100:  # no key is this long; spare difflib the work
        return ""
    targets = {c: (c,) for c in candidates}
    for alias, keys in KEY_ALIASES.items():
        if all(k in targets for k in keys):
            targets.setdefault(alias, keys)
    close = difflib.get_close_matches(word, list(targets), n=1, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(k) for k in targets[close[0]]) + "?"


def _section_model(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    """The schema class under `root` that holds the key at `loc` (for listing allowed keys)."""
    model = root
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def describe_problem(error: ErrorDetails, root: type[BaseModel], tagged: Tagged) -> str:
    """One problem of validating `root` as `key.path: what is wrong (got value)`, every echo
    of the input shortened (errors.ECHO_LIMIT)."""
    loc = tuple(part for part in error["loc"] if part not in tagged)
    path = shorten(".".join(str(part) for part in loc))
    if error["type"] == "extra_forbidden":
        tags = [part for part in error["loc"] if part in tagged]
        section = tagged[tags[-1]] if tags else _section_model(loc, root)
        allowed = sorted(section.model_fields) if section else []
        hint = did_you_mean(str(loc[-1]), allowed) or f"; allowed keys: {', '.join(allowed)}"
        return f"{path}: unknown key (value {echo(error['input'])}){hint}"
    if error["type"] == INCONSISTENT:
        # Cross-key messages already start with the key paths they involve.
        return (
            error["msg"] if not path or error["msg"].startswith(path) else f"{path}: {error['msg']}"
        )
    message = error["msg"].removeprefix("Value error, ")
    prefix = f"{path}: " if path else ""
    return f"{prefix}{message} (got {echo(error['input'])})"


def invalid_params(
    errors: list[ErrorDetails], source: str, root: type[BaseModel], tagged: Tagged
) -> ParamsError:
    """The ParamsError for `source` listing the first MAX_PROBLEMS of `errors`, one per line
    (each at most 4 x ECHO_LIMIT characters), and how many more there are."""
    lines = [
        f"  - {shorten(describe_problem(e, root, tagged), 4 * ECHO_LIMIT)}"
        for e in errors[:MAX_PROBLEMS]
    ]
    if len(errors) > MAX_PROBLEMS:
        lines.append(f"  ... and {len(errors) - MAX_PROBLEMS:,} more problems")
    return ParamsError(f"{source} is invalid:\n" + "\n".join(lines))
