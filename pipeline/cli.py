"""`ganpipe`: the command line. Each subcommand is a thin layer over one function.

Every command that reads params.yaml validates it (with --set overrides) and its own arguments
(output paths, counts) before doing any work; invalid params or arguments exit with code 2 and
write nothing. Bad data (an unreadable source, damaged shards) exits with code 1 and a message
naming the file and the fix, never a traceback. Messages are capped (MESSAGE_LINES lines of at
most MESSAGE_WIDTH characters) whatever they echo.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gan.export import ExportError
from pipeline.artifacts import EVALUATE_REPORT
from pipeline.checkpoint import CheckpointError
from pipeline.config import DEFAULT_PARAMS_FILE, Params, ParamsError, load_params
from pipeline.console import VERBOSE_ENV, quiet_libraries
from pipeline.errors import (
    ClusterError,
    DataError,
    EvaluationError,
    RegistryError,
    SweepError,
    SynthesisError,
    shorten,
)
from pipeline.files import OutputError
from pipeline.params_yaml import dump_yaml
from pipeline.sources import SourceError
from pipeline.tracking import TrackingError
from pipeline.training.identity import ResumeMismatchError

# Errors that mean "the input is wrong" (data, files, URIs, servers), reported in one line.
BAD_INPUT = (
    SourceError, DataError, TrackingError, ResumeMismatchError, CheckpointError, ExportError,
    EvaluationError, RegistryError, SweepError, ClusterError, OutputError, SynthesisError,
)  # fmt: skip
EXIT_BAD_INPUT = 1
EXIT_BAD_PARAMS = 2
EXIT_INTERRUPTED = 130
MESSAGE_LINES = 40
MESSAGE_WIDTH = 1_000


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _truncation(text: str) -> float:
    """An argparse type: psi of the truncation trick (gan.sampling.check_truncation)."""
    from gan.sampling import check_truncation

    try:
        return check_truncation(float(text))
    except ValueError as exc:  # float() names the text; check_truncation the range
        raise argparse.ArgumentTypeError(str(exc)) from None


def _frames(text: str) -> int:
    """An argparse type: the frames of an interpolation, both ends included (at least 2)."""
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 frames (both ends), got {value}")
    return value


def _params_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--params",
        type=Path,
        default=DEFAULT_PARAMS_FILE,
        help="params file (default: %(default)s)",
    )
    parent.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one param for this run, e.g. --set train.lr_g=1e-4 (repeatable)",
    )
    return parent


def resolved_yaml(params: Params) -> str:
    """The full configuration, defaults included, as YAML."""
    return dump_yaml(params.model_dump(mode="json"))


def cmd_validate(params: Params, args: argparse.Namespace) -> int:
    text = resolved_yaml(params)
    if not args.out:
        sys.stdout.write(text)
        return 0
    try:
        args.out.write_text(text, encoding="utf-8")
    except OSError as exc:
        print(f"ganpipe validate: --out {args.out}: cannot write ({exc.strerror})", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def cmd_prepare(params: Params, args: argparse.Namespace) -> int:
    from pipeline.prepare import prepare

    manifest = prepare(params)
    counts = ", ".join(f"{k} {v['rows']}" for k, v in manifest["splits"].items())
    print(
        f"prepared {manifest['source']} into {params.prepare.out_dir}: {counts} images, "
        f"dataset {manifest['dataset_hash'][:12]}"
    )
    return 0


def cmd_train(params: Params, args: argparse.Namespace) -> int:
    from pipeline.train import train

    summary = train(params)
    if "sweep_name" in summary:
        ended = ", ".join(f"{t['stop_reason']}" for t in summary["trials"])
        print(
            f"sweep {summary['sweep_name']}: {len(summary['trials'])} trials ({ended}); "
            f"{len(summary['candidates'])} candidates in {params.train.out_dir}/result.json"
        )
        return 0
    state = f"diverged at step {summary['diverged_at_step']}" if summary["diverged"] else "finished"
    print(
        f"train {summary['run_name']}: {state} after {summary['steps']} steps; "
        f"{params.train.out_dir}/result.json"
    )
    return 0


def cmd_featurenet(params: Params, args: argparse.Namespace) -> int:
    from pipeline.featurenet import train_featurenet

    report = train_featurenet(params)
    if not report["available"]:
        print(f"featurenet: none ({report['reason']})")
        return 0
    print(
        f"featurenet: test accuracy {report['test_accuracy']:.4f}, skill "
        f"{report['test_skill']:.3f} (minimum {params.featurenet.min_skill}), domain scores' "
        f"trust {report['domain_trust']}; {params.featurenet.out_dir}"
    )
    return 0


def cmd_evaluate(params: Params, args: argparse.Namespace) -> int:
    from pipeline.evaluate import evaluate

    report = evaluate(params)
    metric = params.register.metric
    for name, scores in report["candidates"].items():
        value = scores.get(metric)
        shown = f"{value:.4f}" if isinstance(value, float) else "n/a"
        print(f"evaluate {name}: {metric} {shown}")
    report_file = Path(params.evaluate.out_dir) / EVALUATE_REPORT
    print(f"evaluate: {report_file}; DVC metrics in {params.evaluate.metrics_dir}")
    return 0


def cmd_augment(params: Params, args: argparse.Namespace) -> int:
    from pipeline.augment import augment, figure_text

    report = augment(params)
    if not report["enabled"]:
        print("augment: off (augment.enabled: false)")
        return 0
    for name, result in report["candidates"].items():
        print(
            f"augment {name}: accuracy {result['accuracy']:.4f} with synthetic images "
            f"({report['headline_ratio']}, mean over the shots), gain "
            f"{result['augment_gain']:+.4f} over real only, "
            f"{result['augment_gain_vs_classical']:+.4f} over classical; "
            f"CAS {figure_text(result['augment_cas'])}"
        )
    return 0


def cmd_register(params: Params, args: argparse.Namespace) -> int:
    from pipeline.registry import register

    summary = register(params)
    print(
        f"register {summary['model_name']} version {summary['version']} "
        f"({', '.join(summary['aliases'])}): {summary['message']}"
    )
    return 0


def _model_uri(params: Params, args: argparse.Namespace) -> str:
    return args.model or f"models:/{params.register.model_name}@{params.register.alias}"


def cmd_sample(params: Params, args: argparse.Namespace) -> int:
    from pipeline.serving import sample_grid

    uri = _model_uri(params, args)
    path = sample_grid(
        uri, args.out, args.num, args.seed, label=args.label, params=params, nrow=args.nrow,
        truncation=args.truncation,
    )  # fmt: skip
    psi = f", truncation {args.truncation:g}" if args.truncation != 1.0 else ""
    print(f"sample: {args.num} images from {uri} (seed {args.seed}{psi}) -> {path}")
    return 0


def cmd_interpolate(params: Params, args: argparse.Namespace) -> int:
    from pipeline.serving import interpolation_file

    uri = _model_uri(params, args)
    path = interpolation_file(
        uri, args.out, args.from_seed, args.to_seed, args.steps, args.method, args.label,
        args.truncation, params, args.nrow, args.frame_ms,
    )  # fmt: skip
    psi = f", truncation {args.truncation:g}" if args.truncation != 1.0 else ""
    print(
        f"interpolate: {args.steps} frames from {uri} (seed {args.from_seed} to "
        f"{args.to_seed}, {args.method}{psi}) -> {path}"
    )
    return 0


def _class_weights(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated non-negative numbers, one per class."""
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, one per class (e.g. 1,1,2), got {text!r}"
        ) from None
    return weights


def cmd_synthesize(params: Params, args: argparse.Namespace) -> int:
    from pipeline.synthesize import SynthesisRequest, synthesize
    from pipeline.tracking import tracking_uri

    request = SynthesisRequest(
        model_uri=_model_uri(params, args), num_images=args.num, out=str(args.out),
        format=args.format, seed=args.seed, truncation=args.truncation,
        class_weights=args.class_weights, min_confidence=args.min_confidence,
        featurenet_dir=str(args.featurenet or params.featurenet.out_dir),
        chunk_size=args.chunk_size, tracking_uri=tracking_uri(params),
    )  # fmt: skip
    made = synthesize(request)
    labels = made["labels"]["source"]
    rejected = f", {made['rejected_share']:.1%} of samples rejected" if made["rejected"] else ""
    print(
        f"synthesize: {made['num_images']} images from {request.model_uri} (version "
        f"{made['model_version'] or '-'}, labels: {labels}{rejected}) -> {args.out} "
        f"({args.format})"
    )
    return 0


def _add_toy_options(parser: argparse.ArgumentParser) -> None:
    """One flag per ToyGANConfig field, with its default."""
    from gan.losses import LOSSES
    from gan.toy import MIXTURES, ToyGANConfig

    choices = {"loss": sorted(LOSSES), "mixture": sorted(MIXTURES)}
    for field in dataclasses.fields(ToyGANConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        elif field.name == "betas":
            parser.add_argument(flag, type=float, nargs=2, default=field.default)
        else:
            kind = {"int": int, "float": float}.get(field.type, str)
            parser.add_argument(
                flag, type=kind, default=field.default, choices=choices.get(field.name)
            )


def cmd_toy(args: argparse.Namespace) -> int:
    """Train the 2-D mode-coverage test bed and print its figures as JSON."""
    from gan.toy import ToyGANConfig, train_toy_gan

    names = {f.name for f in dataclasses.fields(ToyGANConfig)}
    options = {k: v for k, v in vars(args).items() if k in names}
    options["betas"] = tuple(options["betas"])
    print(json.dumps(train_toy_gan(ToyGANConfig(**options)), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ganpipe", description="Distributed GAN training and evaluation pipeline."
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help=f"show Ray's and MLflow's routine logging too (or set {VERBOSE_ENV}=1)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    params = _params_options()
    validate = commands.add_parser(
        "validate",
        parents=[params],
        help="check params.yaml and print the full configuration with defaults",
    )
    validate.add_argument("--out", type=Path, help="write the resolved YAML here instead")
    commands.add_parser(
        "prepare", parents=[params], help="prepare the dataset as sharded Parquet (DVC stage)"
    )
    commands.add_parser(
        "train", parents=[params], help="train G and D with Ray Train DDP (DVC stage)"
    )
    commands.add_parser(
        "featurenet",
        parents=[params],
        help="train the domain classifier that scores generators offline (DVC stage)",
    )
    commands.add_parser(
        "evaluate",
        parents=[params],
        help="FID/IS/KID/precision-recall of every trained candidate (DVC stage)",
    )
    commands.add_parser(
        "augment",
        parents=[params],
        help="measure what the generators' images add to a classifier of few real images "
        "(DVC stage)",
    )
    commands.add_parser(
        "register",
        parents=[params],
        help="register the best candidate in the MLflow Model Registry (DVC stage)",
    )
    sample = commands.add_parser(
        "sample", parents=[params], help="write a PNG grid of samples from a registered model"
    )
    sample.add_argument(
        "--model",
        help="model URI (default: models:/<register.model_name>@<register.alias>)",
    )
    sample.add_argument(
        "--num", type=_positive_int, default=64, help="images (default: %(default)s)"
    )
    sample.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    sample.add_argument(
        "--label", type=int, help="class of every image (conditional models; -1: cycle the classes)"
    )
    sample.add_argument("--nrow", type=_positive_int, default=8, help="images per grid row")
    sample.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG to write")
    truncation_help = "truncation psi from 0 to 1: z' = psi * z (default: 1, no truncation)"
    sample.add_argument("--truncation", type=_truncation, default=1.0, help=truncation_help)
    interpolate = commands.add_parser(
        "interpolate",
        parents=[params],
        help="write the frames between two seeds' samples as a PNG grid or an animated GIF",
    )
    interpolate.add_argument(
        "--model",
        help="model URI (default: models:/<register.model_name>@<register.alias>)",
    )
    interpolate.add_argument("--from-seed", type=int, required=True, help="the first frame's seed")
    interpolate.add_argument("--to-seed", type=int, required=True, help="the last frame's seed")
    interpolate.add_argument(
        "--steps", type=_frames, default=8, help="frames, both ends included (default: %(default)s)"
    )
    interpolate.add_argument(
        "--method", choices=("slerp", "lerp"), default="slerp",
        help="slerp: along the sphere, the norm between the ends'; lerp: a straight line "
        "(default: %(default)s)",
    )  # fmt: skip
    interpolate.add_argument(
        "--label", type=int, help="class of every frame (conditional models; default: class 0)"
    )
    interpolate.add_argument("--truncation", type=_truncation, default=1.0, help=truncation_help)
    interpolate.add_argument(
        "--nrow", type=_positive_int, help="frames per grid row (.png; default: all in one row)"
    )
    interpolate.add_argument(
        "--frame-ms", type=_positive_int, default=100, help="ms per frame (.gif; default: 100)"
    )
    interpolate.add_argument(
        "--out", type=Path, required=True, help="FILE.png (a grid) or FILE.gif (an animation)"
    )
    synth = commands.add_parser(
        "synthesize",
        parents=[params],
        help="write a labeled synthetic dataset from a registered model (image folder or shards)",
    )
    synth.add_argument(
        "--model",
        help="model URI (default: models:/<register.model_name>@<register.alias>)",
    )
    synth.add_argument("--num", type=_positive_int, required=True, help="images to write")
    synth.add_argument("--out", type=Path, required=True, help="the dataset's directory (new)")
    synth.add_argument(
        "--format", choices=("imagefolder", "parquet"), default="imagefolder",
        help="imagefolder: <class>/<index>.png, what prepare reads; parquet: prepared shards "
        "with a manifest (default: %(default)s)",
    )  # fmt: skip
    synth.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    synth.add_argument("--truncation", type=_truncation, default=1.0, help=truncation_help)
    synth.add_argument(
        "--class-weights", type=_class_weights,
        help="conditional models: the share of each class, e.g. 1,1,2 (default: balanced)",
    )  # fmt: skip
    synth.add_argument(
        "--min-confidence", type=float, default=0.9,
        help="unconditional models: keep a sample when the featurenet's softmax probability "
        "of its class reaches this (default: %(default)s)",
    )  # fmt: skip
    synth.add_argument(
        "--featurenet", type=Path,
        help="unconditional models: the labeling featurenet (default: featurenet.out_dir)",
    )  # fmt: skip
    synth.add_argument(
        "--chunk-size", type=_positive_int, default=1024,
        help="images drawn, written and resumable at a time (default: %(default)s)",
    )  # fmt: skip
    toy = commands.add_parser(
        "toy", help="train a small GAN on a 2-D Gaussian mixture and report mode coverage"
    )
    _add_toy_options(toy)
    return parser


def output_problem(path: Path, *, create_parents: bool) -> str | None:
    """Why a file cannot be written at `path` (None if it can be tried): it is a directory, or
    its directory is missing (when the command does not create it) or is a file."""
    if path.is_dir():
        return f"{path} is a directory; give a file name, e.g. {path / 'out'}"
    parent = path.parent
    while not parent.exists() and create_parents and parent != parent.parent:
        parent = parent.parent
    if not parent.exists():
        return f"directory {parent} does not exist; create it (mkdir -p) or choose another path"
    if not parent.is_dir():
        return f"{parent} is not a directory"
    return None


def _argument_problem(args: argparse.Namespace) -> str | None:
    """A problem with the command's own arguments, found before any params are read."""
    if args.command == "validate" and args.out is not None:
        problem = output_problem(args.out, create_parents=False)
        return problem and f"--out {args.out}: {problem}"
    if args.command in ("sample", "interpolate"):
        problem = output_problem(args.out, create_parents=True)  # the writer creates them
        if problem is None and args.command == "interpolate":
            from pipeline.serving import image_format_problem

            problem = image_format_problem(args.out)
        return problem and f"--out {args.out}: {problem}"
    return None


def _report(prefix: str, exc: BaseException) -> None:
    """Print an error in MESSAGE_LINES lines of at most MESSAGE_WIDTH characters."""
    lines = [shorten(line, MESSAGE_WIDTH) for line in str(exc).splitlines()] or [repr(exc)]
    if len(lines) > MESSAGE_LINES:
        lines = [*lines[:MESSAGE_LINES], f"... and {len(lines) - MESSAGE_LINES:,} more lines"]
    print(f"{prefix}: " + "\n".join(lines), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    quiet_libraries()
    if args.command == "toy":
        return cmd_toy(args)
    problem = _argument_problem(args)
    if problem:
        print(f"ganpipe {args.command}: {problem}", file=sys.stderr)
        return EXIT_BAD_PARAMS
    try:
        params = load_params(args.params, args.overrides)
    except ParamsError as exc:
        _report("ganpipe", exc)
        return EXIT_BAD_PARAMS
    stage = {
        "validate": cmd_validate,
        "prepare": cmd_prepare,
        "featurenet": cmd_featurenet,
        "train": cmd_train,
        "evaluate": cmd_evaluate,
        "augment": cmd_augment,
        "register": cmd_register,
        "sample": cmd_sample,
        "interpolate": cmd_interpolate,
        "synthesize": cmd_synthesize,
    }[args.command]
    try:
        return stage(params, args)
    except BAD_INPUT as exc:
        _report(f"ganpipe {args.command}", exc)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"ganpipe {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
