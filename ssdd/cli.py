"""The ``ssdd`` command line: a thin layer over the Python API.

Every command resolves its configuration as defaults < ``--preset`` < ``--config FILE`` < explicit flags, and
reports user mistakes as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ssdd import __version__
from ssdd.errors import ConfigError, ResourceError, SsddError
from ssdd.text import terminal_safe
from ssdd.values import FRACTION, POSITIVE, POSITIVE_INT, SEED, Range


def _add_run_options(parser: argparse.ArgumentParser, group: str) -> None:
    from ssdd.config import list_presets

    presets = ", ".join(list_presets(group)) or "none"
    parser.add_argument("--preset", help=f"named preset ({presets})")
    parser.add_argument("--config", help="YAML file of settings (overrides the preset)")
    parser.add_argument("--out", required=True, help="run folder (artefact, config, log, metrics, checkpoint)")
    parser.add_argument("--seed", type=SEED.argument, help=f"seed of every random choice ({SEED.describe()})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--data-root", help="where datasets are looked for (default: $SSDD_DATA_ROOT, else the path "
                        "the installer wrote into .venv/ssdd-data-root, else ~/.cache/ssdd)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                        "(a finished run is kept as it is)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --out: its artefact, "
                        "checkpoint, log and metrics are removed and the run starts afresh")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_datasets(args: argparse.Namespace) -> int:
    from ssdd.data import DATASETS, data_root, dataset_status
    from ssdd.data.download import download_dataset

    specs = [DATASETS.get(name) for name in _csv(args.download) or []]  # every name checked before any download
    for spec in specs:
        download_dataset(spec, data_root(args.data_root))
    print(f"data root: {data_root(args.data_root)}")
    for row in dataset_status(args.data_root):
        mark = "available" if row["available"] else "missing"
        print(f"{row['name']:<14} {mark:<10} {row['description']}")
        if row["available"]:
            print(f"{'':<14} from {row['source']}")
            if "disk_bytes" in row:
                splits = ", ".join(
                    f"{split} {_size(info['decoded_bytes']) if info['decoded_bytes'] else 'not decoded yet'}"
                    + (" (memory-mapped)" if info["mapped"] else "") for split, info in row["splits"].items())
                print(f"{'':<14} source files {_size(row['disk_bytes'])}; decoded: {splits}")
        else:
            for place in row["looked_in"]:
                print(f"{'':<14} looked for {place}")
            if row["downloadable"]:
                print(f"{'':<14} (fetch it with: ssdd datasets --download {row['name']})")
    print("imagefolder:PATH  your own images: PATH/{train,test}/<class>/<images>, or PATH/<class>/<images>, "
          "or an archive")
    return 0


def _size(count: int) -> str:
    """Bytes in the largest binary unit that keeps at least one whole unit (``1.5 GiB``)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.1f} {unit}"
    return f"{count} B"


def _cmd_models(args: argparse.Namespace) -> int:
    from ssdd.models import MODELS

    for name in MODELS.names():
        options = getattr(MODELS.get(name), "options", {})
        extra = ", ".join(f"{k}={v!r}" for k, v in options.items())
        print(f"{name:<18} {extra}")
    return 0


_TRAINING_ONLY = ("preset", "config", "ssl", "epochs", "batch_size", "lr", "optimizer", "train_images", "seed",
                  "resume")


def _import_teacher(args: argparse.Namespace) -> int:
    """``ssdd teacher --import FILE``: a network trained elsewhere as a teacher artefact, and what the import found."""
    from ssdd.config import safe_load_yaml
    from ssdd.data.transforms import PixelSpace
    from ssdd.io import read_metadata
    from ssdd.teachers import import_teacher

    given = [name for name in _TRAINING_ONLY if getattr(args, name) not in (None, False)]
    if given:
        raise ConfigError(f"--{given[0].replace('_', '-')} trains a teacher; it does not apply to --import")
    pixel_space: Any = args.pixel_space
    if args.mean is not None or args.std is not None:
        mean, std = _csv(args.mean) or [], _csv(args.std) or []
        if args.pixel_space or not mean or len(mean) != len(std):
            raise ConfigError("--mean and --std go together, one number per channel each"
                              + (", instead of --pixel-space" if args.pixel_space else ""))
        try:
            pixel_space = PixelSpace.from_dict({"mean": [float(v) for v in mean], "std": [float(v) for v in std]})
        except ValueError:
            raise ConfigError(f"--mean and --std take numbers, got {args.mean!r} and {args.std!r}") from None
    arch_args = safe_load_yaml(args.arch_args, "--arch-args") if args.arch_args else {}
    if not isinstance(arch_args, dict):
        raise ConfigError(f"--arch-args takes a YAML mapping such as '{{width: 32}}', got {args.arch_args!r}")
    path = import_teacher(args.import_file, args.out, format=args.format, arch=args.arch, stem=args.stem,
                          pixel_space=pixel_space, image_size=args.image_size, arch_args=arch_args,
                          dataset=args.dataset or "cifar10", data_root=args.data_root, check=not args.no_check,
                          check_images=args.check_images, allow_missing=args.allow_missing,
                          overwrite=args.overwrite, device=args.device or "auto")
    for line in _import_summary(path, read_metadata(path)):
        print(terminal_safe(line))
    return 0


def _import_summary(path: Path, meta: dict[str, Any]) -> list[str]:
    """What ``ssdd teacher --import`` prints: format, architecture, coverage, pixel space and the check."""
    info, arch = meta["imported"], meta["architecture"]
    coverage, space = info["coverage"], meta["pixel_space"]
    how = f"auto: {info['detected']}" if info["detected"] else "given"
    options = ", ".join(f"{k} {v}" for k, v in arch.items() if k not in ("name", "num_outputs", "in_channels"))
    dropped = ", ".join(f"{k} ({n})" for k, n in coverage["dropped"].items()) or "nothing"
    lines = [f"imported {info['file']} ({info['encoding']}, {info['container']}) as {path}",
             f"  format {info['format']} ({how}); {arch['name']}, {options}; feature dim {meta['feature_dim']}",
             f"  weights: {coverage['matched']} of {coverage['expected']} backbone tensors matched "
             f"({100 * coverage['fraction']:.1f}%); left out: {dropped}",
             f"  pixel space {info['pixel_space']}: mean {space['mean']}, std {space['std']}"]
    if coverage["missing"]:
        lines.append(f"  warning: {len(coverage['missing'])} tensor(s) kept their random initialisation "
                     f"(--allow-missing): {', '.join(coverage['missing'][:5])}")
    check = info["check"]
    if check is None:
        lines.append("  check skipped (--no-check)")
    else:
        lines.append(f"  check on {check['dataset']} ({check['memory_images']} train images as memory, "
                     f"{check['query_images']} test queries): kNN top-1 {check['knn_top1']}%, random weights "
                     f"{check['random_weights_knn_top1']}%, chance {check['chance_top1']}%")
        features = check["features"]
        if features["finite"]:
            lines.append(f"  features: mean norm {features['norm_mean']:.4g}, mean std {features['std_mean']:.4g}, "
                         f"constant dims {100 * features['constant_fraction']:.1f}%, effective rank "
                         f"{features['effective_rank']:.1f}")
        lines.append(f"  verdict: {check['verdict']}")
    return lines


_IMPORT_ONLY = ("stem", "arch_args", "image_size", "pixel_space", "mean", "std", "allow_missing", "no_check")


def _cmd_teacher(args: argparse.Namespace) -> int:
    if args.import_file is not None:
        return _import_teacher(args)
    given = [name for name in _IMPORT_ONLY if getattr(args, name) not in (None, False)]
    if given or args.format != "auto":
        raise ConfigError(f"--{(given or ['format'])[0].replace('_', '-')} applies to --import FILE only")
    from ssdd.config import resolve_config
    from ssdd.distributed import init_from_env
    from ssdd.io import read_metadata
    from ssdd.teachers import TeacherConfig, train_teacher
    from ssdd.teachers.artefact import TEACHER_FILE

    overrides: dict[str, Any] = {
        "dataset": args.dataset, "ssl": args.ssl, "arch": args.arch, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "optimizer": args.optimizer,
        "train_images": args.train_images, "seed": args.seed, "device": args.device, "data_root": args.data_root,
    }
    config = resolve_config(TeacherConfig, "teacher", args.preset, args.config, overrides)
    current = init_from_env(config.device)  # under torchrun: data-parallel over the processes
    finished = args.resume and (Path(args.out) / TEACHER_FILE).exists()
    if current.is_main:
        _announce("teacher", args.out, f"{TEACHER_FILE}, run.log, metrics.jsonl")
    path = train_teacher(config, args.out, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    if not current.is_main:
        return 0
    meta = read_metadata(path)
    probe = meta.get("linear_probe_top1")
    wall = time.monotonic() - args.started
    print(f"the run was finished already; its teacher is {path}" if finished else
          f"teacher written to {path} ({wall:.1f} s wall time; log: {path.parent / 'run.log'})")
    print(f"  {meta['ssl']['method']} {meta['architecture']['name']}, {meta['epochs_trained']} epochs, "
          f"feature dim {meta['feature_dim']}, kNN top-1 {meta.get('knn_top1')}, "
          f"linear probe top-1 {'-' if probe is None else f'{probe:.2f}%'}")
    return 0


def _announce(command: str, folder: str, writes: str) -> None:
    """The first line of a long command: its run folder and what it will write there."""
    print(f"[{command}] run folder {terminal_safe(folder)}: {writes} there", flush=True)


def _setting_overrides(assignments: list[str]) -> dict[str, Any]:
    """``--set a.b=value`` pairs as a nested dict (values read as YAML: numbers, booleans, lists)."""
    import yaml

    from ssdd.config import safe_load_yaml

    out: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. settings.steps=100), got {assignment!r}")
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:  # a later --set wins over an earlier one, at any depth
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        try:
            node[leaf] = safe_load_yaml(value, f"--set {key.strip()}")
        except yaml.YAMLError:
            raise ConfigError(f"--set {key.strip()}: cannot read {value[:40]!r} as a value") from None
    return out


def _distill_config(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    """The DistillConfig of ``ssdd distill`` / ``ssdd experts``: preset (``NAME`` or ``METHOD/NAME``) < --config <
    the command line's options < --set."""
    from ssdd.config import deep_update, resolve_config
    from ssdd.methods import METHODS, DistillConfig, distill_preset

    if args.method is not None:
        METHODS.get(args.method)  # an unknown method is named as such, with the close ones, before any preset
    preset = distill_preset(args.preset, args.method)
    merged: dict[str, Any] = {"method": args.method, "teacher": args.teacher, "dataset": args.dataset,
                              "seed": args.seed, "device": args.device, "data_root": args.data_root}
    deep_update(merged, overrides)
    deep_update(merged, _setting_overrides(args.set or []))
    return resolve_config(DistillConfig, "distill", preset, args.config, merged)


def _cmd_distill(args: argparse.Namespace) -> int:
    from ssdd.distributed import init_from_env
    from ssdd.methods import Distillation

    overrides: dict[str, Any] = {"images": args.images, "bytes": args.bytes, "storage_dtype": args.storage_dtype}
    if args.pool_ageing:
        overrides["settings"] = {"pool": {"ageing": args.pool_ageing}}
    config = _distill_config(args, overrides)  # a budget on the command line replaces the preset's
    current = init_from_env(config.device)  # under torchrun: each step's real batch shared by the processes
    if current.is_main:
        _announce("distill", args.out, "distilled.safetensors, run.log, metrics.jsonl, curves.png")
    run = Distillation(config, args.out, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    distilled = run.run()
    if not current.is_main:
        return 0
    print(f"the run was finished already; its set is {distilled.path}" if run.finished else
          f"distilled set written to {distilled.path} (log: {distilled.path.parent / 'run.log'})")
    print(f"  {distilled.method}: {distilled.num_images} images, {distilled.byte_count:,} bytes, "
          f"{distilled.metadata['distill_seconds']} s in the outer loop"
          + ("" if run.finished else f", {time.monotonic() - args.started:.1f} s wall time (setup and checks included)")
          + f", monitor kNN {distilled.metadata.get('monitor_knn')}")
    return 0


def _cmd_experts(args: argparse.Namespace) -> int:
    from ssdd.distributed import init_from_env
    from ssdd.methods import METHODS, prepare

    experts = {"num_experts": args.num_experts, "epochs": args.epochs, "parallel": args.parallel}
    config = _distill_config(args, {"settings": {"experts": {k: v for k, v in experts.items() if v is not None},
                                                 "experts_dir": args.out}})
    if METHODS.get(config.method).prepares != "experts":
        trainers = [name for name in METHODS.names() if METHODS.get(name).prepares == "experts"]
        raise ConfigError(f"method {config.method} trains no experts; experts are for {', '.join(trainers)}")
    current = init_from_env(config.device)  # under torchrun the experts are dealt to the processes
    if current.is_main:
        _announce("experts", args.out, "one file per expert")
    store = prepare(config, progress=not args.no_progress)
    if current.is_main:
        print(f"{len(store)} experts of {store.epochs} epochs in {store.folder}")
    return 0


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [item.strip() for item in text.split(",") if item.strip()]


def _named_set(argument: str) -> tuple[str | None, str]:
    """``NAME=PATH`` (a row name for the set) or ``PATH``; a path that exists is never split."""
    name, sep, path = argument.partition("=")
    if not sep or Path(argument).exists() or not name:
        return None, argument
    return name, path


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ssdd.config import resolve_config
    from ssdd.device import resolve_device
    from ssdd.distributed import init_from_env
    from ssdd.environment import environment
    from ssdd.evaluation import EvaluationConfig, clear_journal, evaluate, write_report
    from ssdd.runs import folder_lock

    overrides: dict[str, Any] = {
        "protocol": args.protocol, "targets": _csv(args.targets), "archs": _csv(args.archs),
        "seeds": args.seeds, "device": args.device, "data_root": args.data_root,
    }
    if args.fractions is not None:
        overrides["readout"] = {"fractions": args.fractions}
    config = resolve_config(EvaluationConfig, "evaluate", args.preset, args.config, overrides)
    current = init_from_env(config.device)  # under torchrun the cells are spread over the processes
    if current.is_main:
        _announce("evaluate", args.out, "results.md, results.json, results.png")
    named = [_named_set(s) for s in args.sets]
    journal = Path(args.out) / ".jobs"  # a killed evaluation rerun with the same arguments skips its finished jobs
    with folder_lock(args.out, current):  # one evaluation at a time writes --out
        cells = evaluate([path for _, path in named], config, baselines=_csv(args.baselines) or [],
                         teacher=args.teacher, budget_bytes=args.bytes, budget_images=args.images,
                         progress=not args.no_progress, names=[name for name, _ in named], journal=journal)
        if not current.is_main:
            return 0
        command = "ssdd " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["evaluate"] else None
        report = write_report(args.out, cells, config, environment(resolve_device(config.device)), command)
        clear_journal(journal)
    print(report.read_text())
    print(f"results written to {report.with_suffix('.json')}, {report} and {report.with_suffix('.png')}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from ssdd.distilled import DISTILLED_FILE, load_distilled
    from ssdd.io import writable
    from ssdd.runs import is_run_folder
    from ssdd.show import describe, save_grid, save_page

    distilled = load_distilled(args.set)
    print(describe(distilled))
    folder = distilled.path.parent
    if args.grid:
        print(f"grid:         {save_grid(distilled, Path(args.grid), args.max_images)}")
    elif distilled.path.name == DISTILLED_FILE and is_run_folder(folder) and writable(folder):
        print(f"grid:         {save_grid(distilled, folder / 'grid.png', args.max_images)}")
    else:  # never beside someone else's set, nor into a folder it cannot write
        print(f"grid:         not written ({folder} is not a writable ssdd run folder); render one with --grid PATH")
    if args.html:
        print(f"html:         {save_page(distilled, Path(args.html), args.max_images)}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from ssdd.bench import run_suite
    from ssdd.distributed import init_from_env

    init_from_env(args.device or "auto")  # under torchrun: sets and evaluation cells dealt over the processes
    run_suite(args.suite, args.out, data_root=args.data_root, device=args.device or "auto",
              progress=not args.no_progress, methods=_csv(args.methods), targets=_csv(args.targets),
              seeds=args.seeds, train_teacher=args.train_teacher)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ssdd.config import list_presets
    from ssdd.methods import list_methods

    parser = argparse.ArgumentParser(prog="ssdd", description="Self-supervised dataset distillation.")
    parser.add_argument("--version", action="version", version=f"ssdd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging and full tracebacks")
    parser.add_argument("--precision", choices=("amp", "float32"),
                        help="amp (default: bf16 autocast where the CPU or GPU has it natively) or float32 for every "
                             "method and protocol, as the released code runs ($SSDD_PRECISION)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("datasets", help="list known datasets, where each is looked for, and whether it is available")
    p.add_argument("--data-root")
    p.add_argument("--download", metavar="NAMES", help="first fetch these datasets' official files (comma list, e.g. "
                   "cifar10,mnist) into the data root, each checked against its published MD5")
    p.set_defaults(func=_cmd_datasets)

    p = sub.add_parser("models", help="list the model zoo and each model's options")
    p.set_defaults(func=_cmd_models)

    from ssdd.models.resnet import STEMS
    from ssdd.teachers.importer import PIXEL_SPACES
    from ssdd.teachers.layouts import FORMATS

    p = sub.add_parser("teacher", help="train a self-supervised teacher (Barlow Twins or SimCLR), or import one "
                       "(--import)")
    _add_run_options(p, "teacher")
    p.add_argument("--dataset", help="source dataset (e.g. cifar10, imagefolder:PATH); with --import: the source "
                   "recorded and checked on (default cifar10)")
    p.add_argument("--ssl", choices=("barlow-twins", "simclr"))
    p.add_argument("--arch", help="backbone from `ssdd models`")
    p.add_argument("--epochs", type=POSITIVE_INT.argument)
    p.add_argument("--batch-size", type=Range(2, integer=True).argument)
    p.add_argument("--lr", type=POSITIVE.argument)
    p.add_argument("--optimizer", choices=("lars", "sgd", "adamw"))
    p.add_argument("--train-images", type=POSITIVE_INT.argument, help="train on this many images (a seeded subset)")
    imports = p.add_argument_group("import a teacher trained elsewhere (docs/your-own-teacher.md)")
    imports.add_argument("--import", dest="import_file", metavar="FILE",
                         help="a torch.save or safetensors file of weights to import instead of training")
    imports.add_argument("--format", choices=("auto", *FORMATS), default="auto",
                         help="the library the file comes from (default auto: read from its keys)")
    imports.add_argument("--stem", choices=STEMS, help="a ResNet's stem (default: 7x7 -> imagenet, 3x3 -> the "
                         "format's: cifar-pad2 for solo-learn and krr-st, else cifar)")
    imports.add_argument("--arch-args", help="options of --arch as a YAML mapping (state-dict format), e.g. "
                         "'{widths: [32, 64], norm: batch}'")
    imports.add_argument("--image-size", type=POSITIVE_INT.argument,
                         help="the teacher's input size (default 224 for the imagenet stem, else 32)")
    imports.add_argument("--pixel-space", choices=PIXEL_SPACES, help="normalisation the teacher was trained with "
                         "(default imagenet for torchvision, timm, lightly and the imagenet stem; else dataset: the "
                         "--dataset train split's mean/std)")
    imports.add_argument("--mean", help="per-channel mean, comma-separated (with --std, instead of --pixel-space)")
    imports.add_argument("--std", help="per-channel std, comma-separated")
    imports.add_argument("--allow-missing", action="store_true", help="tensors of the model the file lacks keep "
                         "their random initialisation (recorded in the artefact)")
    imports.add_argument("--no-check", action="store_true", help="skip the kNN check on --dataset (default cifar10)")
    imports.add_argument("--check-images", type=POSITIVE_INT.argument, default=2000,
                         help="train images the check's kNN uses as memory (half as many test queries; default 2000)")
    p.set_defaults(func=_cmd_teacher)

    p = sub.add_parser("distill", help="distil a source dataset with a method into a DistilledSet")
    _add_run_options(p, "distill")
    p.add_argument("--method", help=f"distillation method: {', '.join(list_methods())}")
    p.add_argument("--teacher", help="teacher artefact (file or run folder), or reference:cifar10, the one ssdd ships")
    p.add_argument("--dataset", help="source dataset (default: the teacher's)")
    p.add_argument("--images", type=POSITIVE_INT.argument, help="budget: this many images (with their targets)")
    p.add_argument("--bytes", type=POSITIVE_INT.argument, help="budget: this many bytes of stored tensors")
    p.add_argument("--storage-dtype", choices=("float32", "float16", "bfloat16"), help="dtype of stored values")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any setting, e.g. --set settings.steps=200 (repeatable)")
    p.add_argument("--pool-ageing", choices=("reset", "released", "fresh"),
                   help="KRR-ST/PAA/FRePo: how pool networks age (released: as the released KRR-ST code; "
                        "docs/faithfulness.md)")
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("experts", help="train (or complete) the expert trajectories of mkdt / mtt")
    p.add_argument("--method", help="mkdt (experts regress the teacher) or mtt (classifiers)")
    p.add_argument("--preset", help="a distill preset whose settings.experts to use (e.g. cifar10-cpu)")
    p.add_argument("--config", help="YAML file of settings (overrides the preset)")
    p.add_argument("--out", required=True, help="experts folder (experts already there are kept)")
    p.add_argument("--teacher", help="teacher artefact or reference:NAME (mkdt)")
    p.add_argument("--dataset", help="source dataset (default: the teacher's)")
    p.add_argument("--num-experts", type=POSITIVE_INT.argument)
    p.add_argument("--epochs", type=POSITIVE_INT.argument)
    p.add_argument("--parallel", type=POSITIVE_INT.argument, help="experts trained at once (vmapped)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any setting (repeatable)")
    p.add_argument("--seed", type=SEED.argument, help=f"seed of every random choice ({SEED.describe()})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--data-root")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_experts)

    p = sub.add_parser("evaluate", help="evaluate distilled sets and baselines under a named protocol")
    p.add_argument("sets", nargs="*", metavar="[NAME=]SET",
                   help="distilled sets (files or run folders), optionally named for the table: NAME=PATH")
    p.add_argument("--baselines", help="comma list of none, random, herding, kcenter, high-loss, full, teacher")
    p.add_argument("--teacher", help="teacher artefact or reference:NAME (needed by every baseline)")
    p.add_argument("--protocol", help="linear | knn | finetune | supervised")
    p.add_argument("--targets", help="comma list of target datasets (e.g. cifar10,fashion-mnist,mnist)")
    p.add_argument("--archs", help="comma list of student architectures")
    p.add_argument("--seeds", type=SEED.arguments(), help="comma list of seeds (e.g. 0,1,2)")
    p.add_argument("--fractions", type=FRACTION.arguments(),
                   help="label fractions of the linear protocol (e.g. 0.01,0.05,1)")
    p.add_argument("--images", type=POSITIVE_INT.argument,
                   help="budget of baselines: this many image + target pairs (float32)")
    p.add_argument("--bytes", type=POSITIVE_INT.argument,
                   help="budget of baselines in bytes (default: the first set's byte count)")
    p.add_argument("--preset", help=f"named preset ({', '.join(list_presets('evaluate'))})")
    p.add_argument("--config", help="YAML file of settings")
    p.add_argument("--out", required=True, help="folder for results.json, results.md, results.png (and, while it "
                   "runs, the journal of finished jobs that a rerun of a killed evaluation resumes from)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--data-root")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("show", help="print a distilled set's metadata and byte count; render an image grid "
                       "(and, with --html, a self-contained page of both)")
    p.add_argument("set", help="distilled set (file or run folder)")
    p.add_argument("--grid", help="PNG path (default: grid.png in the set's run folder, when it is one and writable)")
    p.add_argument("--max-images", type=POSITIVE_INT.argument, default=100, help="images in the grid (default 100)")
    p.add_argument("--html", help="also write the set's page here: its metadata and image grid in one HTML file")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("bench", help="run a benchmark suite end to end and write a report")
    p.add_argument("--suite", required=True,
                   help=f"a shipped suite ({', '.join(list_presets('bench'))}) or a suite's YAML file")
    p.add_argument("--out", default="runs/bench", help="parent of the report folder <out>/<suite> (default runs/bench)")
    p.add_argument("--methods", help="comma-separated sets and baselines to run (default: all of the suite's)")
    p.add_argument("--targets", help="comma-separated target datasets, replacing every evaluation's")
    p.add_argument("--seeds", type=SEED.arguments(), help="comma-separated seeds, replacing every evaluation's")
    p.add_argument("--train-teacher", action="store_true",
                   help="train the suite's teacher even where it names one shipped with ssdd (reference:NAME)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--data-root")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ssdd`` command; returns the exit status."""
    started = time.monotonic()  # the command's wall clock, its imports included
    parser = build_parser()
    args = parser.parse_args(argv)
    args.started = started
    if not sys.stdout.isatty() and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # printed lines and progress lines in a log in the order they came
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    finished = False
    try:
        if args.precision:
            from ssdd.device import set_precision

            set_precision(args.precision)
        status = func(args)
        sys.stdout.flush()  # a reader gone before the output reached it shows here, not at interpreter exit
        finished = True
        return status
    except SsddError as exc:
        if args.verbose:
            raise
        print(f"ssdd: error: {terminal_safe(str(exc))}", file=sys.stderr)  # one line, whatever names it quotes
        return exc.exit_code
    except BrokenPipeError:  # the reader of our output stopped (`ssdd show SET | head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141  # 128 + SIGPIPE: what a shell reports for a tool stopped by a closed pipe
    except KeyboardInterrupt:
        print("ssdd: interrupted (resume with --resume)", file=sys.stderr)
        return 130
    except OSError as exc:  # a failed write that no writer reported: disk full, read-only, not a folder
        from ssdd.io import storage_error

        error = storage_error(exc, exc.filename or ".")
        if error is None or args.verbose:
            raise
        print(f"ssdd: error: {terminal_safe(str(error))}", file=sys.stderr)
        return error.exit_code
    except (RuntimeError, MemoryError) as exc:  # an allocator's failure is the user's to fix, not a traceback
        from ssdd.resources import out_of_memory_message

        message = out_of_memory_message(exc)
        if message is None or args.verbose:
            raise
        print(f"ssdd: error: {message}", file=sys.stderr)
        return ResourceError.exit_code
    finally:
        if "torch.distributed" in sys.modules:  # only commands that loaded torch can have joined a process group
            from ssdd.distributed import leave

            leave(finished)


if __name__ == "__main__":
    sys.exit(main())
