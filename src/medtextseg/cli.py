"""The ``medtextseg`` command. Thin: parse, load a config, call one function.

User errors (bad path, option or data) print one message and exit with code 2;
set ``MEDTEXTSEG_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Text-guided, semi-supervised medical image segmentation: synthesise or check data, "
         "pre-train a vision-language model, train, evaluate, predict and report.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what shells report for Ctrl-C
# Whether this process has said it was interrupted: Typer turns a Ctrl-C that lands in its
# own code (parsing, the app callback, which imports Lightning) into a silent exit 130.
_INTERRUPT_SHOWN = threading.Event()
# The libraries whose banners, tips and notes the default console hides (--verbose shows them).
_QUIET_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "transformers",
                  "torch", "monai", "matplotlib", "PIL")


def _user_errors():
    """Exception types that mean "the user asked for something impossible"."""
    from medtextseg.config import ConfigError
    from medtextseg.data.io import ImageReadError
    from medtextseg.data.problems import DataError
    from medtextseg.data.readers import DatasetError
    from medtextseg.engine import RunError
    from medtextseg.methods import NonFiniteLossError

    return (ConfigError, DataError, DatasetError, ImageReadError, RunError, NonFiniteLossError,
            FileExistsError, FileNotFoundError, ValueError)


def _interrupted(message: str = "stopped before the command started") -> typer.Exit:
    _INTERRUPT_SHOWN.set()
    err_console.print(f"[bold yellow]interrupted:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(INTERRUPTED_EXIT)


def friendly(fn):
    """User errors: one red message and exit code 2; Ctrl-C / SIGTERM: one line and exit
    code 130; never a traceback (``MEDTEXTSEG_DEBUG=1`` shows it)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            if os.environ.get("MEDTEXTSEG_DEBUG"):
                raise
            raise _interrupted("stopped by the user; nothing half-written was left") from None
        except Exception as e:
            from medtextseg.engine import RunInterrupted

            if os.environ.get("MEDTEXTSEG_DEBUG"):
                raise
            if isinstance(e, RunInterrupted):
                raise _interrupted(str(e)) from None
            if isinstance(e, _user_errors()):
                err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
                raise typer.Exit(USER_ERROR_EXIT) from None
            raise
    return wrapper


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def _show_warning(message, category, filename, lineno, file=None, line=None):
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def _configure_console(verbose: bool) -> None:
    """Process-wide console settings; only the command line may make them (DESIGN §8)."""
    import logging

    from rich.logging import RichHandler

    handler = RichHandler(console=err_console, show_time=False, show_path=False, show_level=False,
                          markup=False, rich_tracebacks=False)
    ours = logging.getLogger("medtextseg")
    ours.handlers[:] = [handler]
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    ours.propagate = False
    warnings.showwarning = _show_warning
    if verbose:
        logging.basicConfig(level=logging.INFO)
        return
    # Before transformers / huggingface_hub are imported: their progress bars read these.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Lightning sets its own loggers' level when it is imported: import it first, or it
    # would undo this (commands that train or predict import it anyway).
    import lightning.pytorch  # noqa: F401

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"medtextseg(\.|$)")
    from medtextseg.text import TextWarning

    warnings.filterwarnings("default", category=TextWarning)


def _version(value: bool) -> None:
    if value:
        from medtextseg import __version__

        console.print(f"medtextseg {__version__}")
        raise typer.Exit()


@app.callback()
@friendly
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show the libraries' own messages "
                                          "(Lightning, transformers) and their warnings.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
):
    """Text-guided, semi-supervised medical image segmentation."""
    _configure_console(verbose)


def main() -> None:
    """The ``medtextseg`` entry point: SIGTERM stops a command like Ctrl-C does."""
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        app()
    except KeyboardInterrupt:  # between commands' own handling, e.g. while parsing
        raise SystemExit(_interrupted().exit_code) from None
    except SystemExit as e:
        if e.code == INTERRUPTED_EXIT and not _INTERRUPT_SHOWN.is_set():
            _interrupted()
        raise


def _overrides(set_: list[str] | None, extra: list[str]) -> list[str]:
    """``--set a=1 b=2`` and ``--set a=1 --set b=2`` alike: key=value words after --set."""
    pairs = list(set_ or [])
    for arg in extra:
        if "=" not in arg or arg.startswith("-"):
            raise ValueError(f"unexpected argument {arg!r}; config overrides look like key=value "
                             "(e.g. --set train.max_epochs=5 optim.lr=3e-4)")
        pairs.append(arg)
    return pairs


# images of a non-case generator when --n is not given
_DEFAULT_SYNTH_N = 1000


@app.command()
@friendly
def synth(
    kind: Annotated[str, typer.Argument(help="Generator: chest-xray, lung-ct or spine-mr.")],
    out: Annotated[Path, typer.Option(help="Folder to write the dataset to (LViT layout).")],
    n: Annotated[int | None, typer.Option(help="Number of images over all splits (default 1000; spine-mr: at most this many slices).", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same files.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels (spine-mr: width; height is twice it).")] = 256,
    text_noise: Annotated[float, typer.Option(help="Fraction of texts with real-world annotation noise (QaTa: 0.07).")] = 0.0,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    n_cases: Annotated[int | None, typer.Option(help="Case-based generators (spine-mr): number of cases (default 60).", show_default=False)] = None,
):
    """Write a synthetic image+text dataset (Train/Val/Test folders + xlsx texts)."""
    import inspect

    from medtextseg.data.synthetic import GENERATORS

    if kind not in GENERATORS:
        raise ValueError(f"unknown generator {kind!r}; available: {', '.join(GENERATORS)}")
    generate = GENERATORS[kind]
    extra = {}
    if "n_cases" in inspect.signature(generate).parameters:
        extra["n_cases"] = n_cases
    elif n_cases is not None:
        raise ValueError(f"--n-cases applies to case-based generators only; {kind} takes --n")
    elif n is None:
        n = _DEFAULT_SYNTH_N
    summary = generate(out, n=n, seed=seed, size=size, text_noise=text_noise, overwrite=overwrite, **extra)
    _print_summary(summary, out)


@app.command("import-h5")
@friendly
def import_h5(
    fold: Annotated[Path, typer.Argument(help="One fold of the PromptSSL release: an HDF5 file with groups "
                                         "train_sup, train_weak and val (mr, mask, filename).")],
    texts: Annotated[Path, typer.Option(help="The slices' texts: a table with columns Image, Description "
                                        "(MRSpineSeg: train_val_text.xlsx).")],
    out: Annotated[Path, typer.Option(help="Folder to write the dataset to (LViT layout).")],
    num_classes: Annotated[int, typer.Option(help="K: class ids 0..K-1 with 0 = background (MRSpineSeg: 20).")] = 20,
    keep_weak_masks: Annotated[bool, typer.Option(help="Keep train_weak's masks (default: dropped, so those "
                                                  "slices are unlabeled, as in the release).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
):
    """Convert a PromptSSL HDF5 fold (MRSpineSeg) and its text table into an LViT-layout dataset."""
    from medtextseg.data.hdf5 import import_hdf5_fold

    summary = import_hdf5_fold(fold, texts, out, num_classes=num_classes, keep_weak_masks=keep_weak_masks,
                               overwrite=overwrite)
    _print_summary(summary, out)


def _print_summary(summary: dict, out: Path) -> None:
    table = Table(title=f"wrote {summary.get('out', out)}", show_header=False)
    for key, value in summary.items():
        if key == "out":
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.3g}"
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        err_console.print(f"[cyan]note:[/] {note}", highlight=False, soft_wrap=True)


@app.command("check-data")
@friendly
def check_data(
    data: Annotated[list[str], typer.Argument(help="Dataset folder (LViT layout) or CSV manifest; several (or "
                                              "NAME=PATH) make a composite dataset, one domain each.")],
    num_classes: Annotated[int, typer.Option(help="1 for binary masks ({0,255} or {0,1}); K >= 2 for label maps "
                                             "with class ids 0..K-1 (0 = background), as data.num_classes.")] = 1,
    need: Annotated[list[str], typer.Option(help="Splits that must exist and hold images (repeatable); "
                                            "training needs Train and Val.")] = ["Train", "Val"],  # noqa: B006
):
    """Validate a dataset and list every problem with its file and the fix."""
    from medtextseg.data.sources import DataSources, domain_names
    from medtextseg.data.validation import check_split_names, dataset_notes, validate_dataset

    need = check_split_names(need)
    sources = DataSources.parse(data)
    samples = validate_dataset(sources, num_classes=num_classes, need_splits=need)
    domains = domain_names(samples)
    for domain in domains:
        title = f"{sources}: OK" if len(domains) == 1 else f"domain {domain}"
        table = Table(title=title)
        for col in ("split", "images", "labeled", "unique texts"):
            table.add_column(col)
        for split in ("Train", "Val", "Test"):
            sub = [s for s in samples if s.split == split and s.domain == domain]
            if sub:
                table.add_row(split, str(len(sub)), str(sum(s.labeled for s in sub)),
                              str(len({s.text for s in sub})))
        console.print(table)
    if len(domains) > 1:
        console.print(f"{sources}: OK ({len(domains)} domains, {len(samples)} images)")
    if num_classes > 1:
        _print_classes(sources, samples, num_classes)
    _print_notes(dataset_notes(samples, data=sources, need_splits=need))


def _print_classes(sources, samples, num_classes: int) -> None:
    """Label maps (K >= 2): a table of each class id 0..K-1, its name (the dataset roots'
    classes.txt, else ``class 1`` ...) and how many masks of each split contain it."""
    from medtextseg.classes import default_names, roots_class_names
    from medtextseg.data.validation import class_presence

    notes = []
    try:
        names = roots_class_names((path for _, path in sources.roots), num_classes) or default_names(num_classes)
    except ValueError as e:
        # Not an error here: --set data.classes=[...] lets train name the classes instead.
        names = default_names(num_classes)
        notes.append(f"{e}; train refuses it unless data.classes is set")
    counts = class_presence(samples, num_classes)
    table = Table(title="classes present (labeled images whose mask contains each class id)")
    for col in ("id", "class", *counts):
        table.add_column(col, justify="right" if col != "class" else "left")
    for c in range(num_classes):
        table.add_row(str(c), names[c], *(str(n[c]) for n in counts.values()))
    console.print(table)
    _print_notes(notes)


def _run_config(ctx: typer.Context, preset: str | None, data: list[str] | None, out: Path | None, tier: str,
                labeled_ratio: float | None, labeled_ids: Path | None, set_: list[str] | None, resume: bool,
                trainer: dict):
    """The config and run directory of ``train`` / ``pretrain``: the saved config with
    ``--set`` and the trainer options on ``--resume``, else the preset at its tier."""
    from medtextseg.config import load_preset
    from medtextseg.engine import resume_config

    overrides = _overrides(set_, ctx.args)
    overrides += [f"train.{key}={value}" for key, value in trainer.items() if value is not None]
    if labeled_ratio is not None:
        overrides.append(f"data.labeled_ratio={labeled_ratio}")
    if labeled_ids is not None:
        overrides.append(f"data.labeled_ids={labeled_ids}")
    if resume:
        if out is None:
            raise ValueError("--resume needs --out, the run directory to continue")
        cfg = resume_config(out, overrides)
        if preset is not None and preset != cfg.preset:
            raise ValueError(f"{out} was trained with preset {cfg.preset!r}, not {preset!r}; drop --preset")
        return cfg, out
    if preset is None:
        raise ValueError("--preset is required (see `medtextseg models`)")
    if not data:
        raise ValueError("--data is required: a dataset folder (LViT layout) or a CSV manifest")
    cfg = load_preset(preset, tier, overrides)
    if out is None:
        ratio = f"-r{cfg.data.labeled_ratio:g}" if cfg.data.labeled_ratio < 1 or cfg.data.labeled_ids else ""
        out = Path("runs") / f"{preset}-{tier}{ratio}-s{cfg.train.seed}"
    return cfg, out


# The options that `train` and `pretrain` share: one declaration, one help text.
TierOpt = Annotated[str, typer.Option(help="smoke (seconds) | cpu (minutes on 2 cores) | paper (the paper's setting).")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue an interrupted run from its last checkpoint (only "
                                         "devices and train.max_epochs may change).")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace an existing run directory.")]
DevicesOpt = Annotated[str | None, typer.Option(help="Lightning devices: a count (1, 2), ids (0,1), -1 for all, or auto.")]
AcceleratorOpt = Annotated[str | None, typer.Option(help="cpu | gpu | auto.")]
StrategyOpt = Annotated[str | None, typer.Option(help="Lightning strategy, e.g. ddp.")]
NumNodesOpt = Annotated[int | None, typer.Option(help="Number of nodes for DDP.")]
PrecisionOpt = Annotated[str | None, typer.Option(help="32-true | bf16-mixed | 16-mixed.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed (default: the preset's).")]


@app.command(context_settings={"allow_extra_args": True})
@friendly
def train(
    ctx: typer.Context,
    preset: Annotated[str | None, typer.Option(help="Preset name (see `medtextseg models`); not needed with --resume.")] = None,
    data: Annotated[list[str] | None, typer.Option(help="Dataset folder (LViT layout) or CSV manifest; repeat it "
                                                   "(or NAME=PATH) for a composite dataset, one domain per root "
                                                   "(with --resume: default the run's).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory to create (default: "
                                             "runs/<preset>-<tier>\\[-r<ratio>]-s<seed>).")] = None,
    tier: TierOpt = "cpu",
    labeled_ratio: Annotated[float | None, typer.Option(help="Keep the masks of this fraction of the Train images (seeded split, written to split.json).")] = None,
    labeled_ids: Annotated[Path | None, typer.Option(help="Keep the masks of these Train ids only: a split.json of another run or a text file, one id per line.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override config keys: --set optim.lr=3e-4 train.max_epochs=5 "
                                                   "(several pairs after one flag, or the flag repeated).")] = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    devices: DevicesOpt = None,
    accelerator: AcceleratorOpt = None,
    strategy: StrategyOpt = None,
    num_nodes: NumNodesOpt = None,
    precision: PrecisionOpt = None,
    seed: SeedOpt = None,
    vlm: Annotated[Path | None, typer.Option(help="Pre-trained vision-language run (`medtextseg pretrain`) for "
                                             "methods that use one (dusss); copied into the run.")] = None,
):
    """Train a preset on a dataset; then evaluate the best checkpoint on Val and Test."""
    from medtextseg.engine import train as run_train
    from medtextseg.utils import keep_freed_memory

    cfg, out = _run_config(ctx, preset, data, out, tier, labeled_ratio, labeled_ids, set_, resume,
                           {"devices": devices, "accelerator": accelerator, "strategy": strategy,
                            "num_nodes": num_nodes, "precision": precision, "seed": seed})
    # CPU training re-faults its activations every step unless glibc keeps freed memory.
    keep_freed_memory()
    metrics = run_train(cfg, data or None, out, vlm=vlm, resume=resume, overwrite=overwrite)
    if metrics:
        _print_metrics(metrics, f"{out}", _run_class_names(out))


@app.command(context_settings={"allow_extra_args": True})
@friendly
def pretrain(
    ctx: typer.Context,
    preset: Annotated[str | None, typer.Option(help="Pre-training preset (e.g. dusss-vlm); not needed with --resume.")] = None,
    data: Annotated[list[str] | None, typer.Option(help="Dataset folder (LViT layout) or CSV manifest; masks are "
                                                   "optional; repeat it (or NAME=PATH) for a composite dataset "
                                                   "(with --resume: default the run's).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory to create (default: runs/<preset>-<tier>-s<seed>).")] = None,
    tier: TierOpt = "cpu",
    labeled_ratio: Annotated[float | None, typer.Option(help="Masks the VLM may learn from (vlm.mask_supervision): those "
                                                        "of this fraction of the Train images, the split the "
                                                        "segmentation runs of the same seed use.")] = None,
    labeled_ids: Annotated[Path | None, typer.Option(help="Or the masks of these Train ids only (a split.json or one id per line).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override config keys: --set vlm.imc=false optim.lr=1e-4 "
                                                   "(several pairs after one flag, or the flag repeated).")] = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    devices: DevicesOpt = None,
    accelerator: AcceleratorOpt = None,
    strategy: StrategyOpt = None,
    num_nodes: NumNodesOpt = None,
    precision: PrecisionOpt = None,
    seed: SeedOpt = None,
):
    """Pre-train a vision-language model on image+text pairs; then score retrieval and the text mask on Val and Test."""
    from medtextseg.engine import pretrain as run_pretrain
    from medtextseg.utils import keep_freed_memory

    cfg, out = _run_config(ctx, preset, data, out, tier, labeled_ratio, labeled_ids, set_, resume,
                           {"devices": devices, "accelerator": accelerator, "strategy": strategy,
                            "num_nodes": num_nodes, "precision": precision, "seed": seed})
    if not cfg.pretrain:
        raise ValueError(f"preset {cfg.preset!r} trains a segmentation method, not a vision-language model: run "
                         f"`medtextseg train --preset {cfg.preset}` instead of `pretrain`")
    keep_freed_memory()
    metrics = run_pretrain(cfg, data or None, out, resume=resume, overwrite=overwrite)
    if metrics:
        _print_retrieval(metrics, f"{out}")


def _print_retrieval(metrics: dict, title: str) -> None:
    from medtextseg.data.fingerprint import data_label

    table = Table(title=title)
    for col in ("split", "images", "texts", "I→T R@1 %", "I→T R@5 %", "T→I R@1 %", "T→I R@5 %",
                "text-mask Dice %", "data"):
        table.add_column(col, justify="right")
    for split, m in metrics.items():
        if not isinstance(m, dict) or "i2t_r1" not in m:
            continue
        d = m.get("data") or {}
        where = data_label(d) if d else "—"
        dice = f"{100 * m['text_dice']:.2f} ({m['n_masks']})" if "text_dice" in m else "—"
        table.add_row(split, str(m["n"]), str(m["n_texts"]),
                      *(f"{100 * m[k]:.2f}" for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")), dice, where)
    console.print(table)


def _run_class_names(run: Path) -> list[str]:
    """The names of class ids 0..K-1 of a multi-class run (its config.yaml), else []."""
    from medtextseg.classes import class_names
    from medtextseg.config import read_config
    from medtextseg.engine import CONFIG_FILE, resolve_checkpoint

    try:
        _, run_dir = resolve_checkpoint(run)
        data = read_config(run_dir / CONFIG_FILE).data
        return class_names(data.num_classes, data.classes) if data.num_classes > 1 else []
    except (OSError, *_user_errors()):  # it only orders the per-class rows: show them unordered
        return []


def _print_metrics(metrics: dict, title: str, class_names: list[str] | None = None) -> None:
    """Tables of ``metrics`` (a metrics.json's splits); ``class_names``: the names of class ids
    0..K-1, to list a multi-class run's per-class rows in id order."""
    from medtextseg.classes import in_class_order
    from medtextseg.data.fingerprint import data_label

    splits = {k: m for k, m in metrics.items() if isinstance(m, dict) and "dice" in m}
    composite = any(m.get("domains") for m in splits.values())
    # Composite data: a row per domain, then "mean", the unweighted mean of the domain means.
    table = Table(title=title, caption="domain 'all': every image; 'mean': the mean of the domain means"
                  if composite else None)
    keys = ("dice", "iou", "dice_orig", "iou_orig")
    for col in ("split", *(["domain"] if composite else []), "images", "Dice %", "IoU %", "Dice % (orig.)",
                "IoU % (orig.)", "data"):
        table.add_column(col, justify="right")
    for split, m in splits.items():
        d = m.get("data") or {}
        row = [f"{100 * m[k]:.2f}" for k in keys]
        table.add_row(split, *(["all"] if composite else []), str(m["n"]), *row, data_label(d) if d else "—")
        for name, fig in (m.get("domains") or {}).items():
            table.add_row(split, name, str(fig["n"]), *(f"{100 * fig[k]:.2f}" for k in keys), "")
        if m.get("domain_mean"):
            table.add_row(split, "mean", "", *(f"{100 * m['domain_mean'][k]:.2f}" for k in keys), "")
    console.print(table)
    multi = {split: m["classes"] for split, m in splits.items() if m.get("classes")}
    if multi:
        per = Table(title=f"{title}: per class (Dice % / IoU %)",
                    caption="each class over the images whose mask or prediction holds it; the Dice / IoU "
                            "above are the means over a split's classes; —: in no mask or prediction of the split")
        per.add_column("class")
        for split in multi:
            per.add_column(split, justify="right")

        def cell(fig: dict | None) -> str:
            # A class may be scored at the original size only (a sliver the resize drops).
            pct = [f"{100 * fig[k]:.2f}" if fig and k in fig else "—" for k in ("dice", "iou")]
            return "—" if pct == ["—", "—"] else " / ".join(pct)

        for name in in_class_order((c for figs in multi.values() for c in figs), class_names or ()):
            per.add_row(name, *(cell(f.get(name)) for f in multi.values()))
        console.print(per)


@app.command()
@friendly
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory or .ckpt file.")],
    data: Annotated[list[str] | None, typer.Option(help="Dataset folder or CSV manifest, repeatable for a composite "
                                                   "dataset (default: the run's).")] = None,
    split: Annotated[list[str], typer.Option(help="Split(s) to score (repeatable): Train, Val or Test.")] = ["Test"],  # noqa: B006
    out: Annotated[Path | None, typer.Option(help="Folder for metrics.json and per_image.csv (default: the run's "
                                             "own files for the run's data, else <run>/evaluations/<data>-<fp>/).")] = None,
    device: Annotated[str, typer.Option(help="auto (a GPU when there is one) | cpu | cuda | cuda:N.")] = "auto",
):
    """Score a trained run on a split: Dice/IoU per image at network and original resolution
    (a pre-trained VLM run: retrieval R@1/R@5 both ways and text-mask Dice)."""
    import json

    from medtextseg.data.validation import check_split_names
    from medtextseg.engine import RUN_FILE, resolve_checkpoint
    from medtextseg.engine import evaluate as run_eval

    splits = check_split_names(split)
    if data is None:
        _, run_dir = resolve_checkpoint(run)
        info = run_dir / RUN_FILE
        if not info.is_file():
            raise ValueError(f"{run_dir} has no {RUN_FILE}; pass --data")
        data = json.loads(info.read_text())["data"]
    metrics = run_eval(run, data, splits=splits, out=out, device=device)
    shown = {k: v for k, v in metrics.items() if k in splits}
    if any(isinstance(v, dict) and "i2t_r1" in v for v in shown.values()):
        _print_retrieval(shown, f"{run}")
    else:
        _print_metrics(shown, f"{run}", _run_class_names(run))


@app.command()
@friendly
def predict(
    run: Annotated[Path, typer.Argument(help="Run directory or .ckpt file.")],
    images: Annotated[Path, typer.Option(help="Folder of images.")],
    out: Annotated[Path, typer.Option(help="Output folder for masks/, overlays/ and (multi-class runs) legend.png; new "
                                      "or empty (see --overwrite), and not the --images folder, inside it, or "
                                      "containing it.")],
    texts: Annotated[Path | None, typer.Option(help="CSV whose first row is image,text: image = an image's file "
                                               "name (a.png) or stem (a), exact case; text = its description; one "
                                               "row per image. Quote texts that contain commas.")] = None,
    text: Annotated[str | None, typer.Option(help="One description for every image.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the masks/, overlays/ and legend.png of an earlier predict in --out. "
                                            "Deletes nothing else: an --out that holds other files is refused.")] = False,
    device: Annotated[str, typer.Option(help="auto (a GPU when there is one) | cpu | cuda | cuda:N.")] = "auto",
    batch_size: Annotated[int | None, typer.Option(help="Images per forward pass (default: the run's eval batch size); windows per pass for a patch-trained run.")] = None,
    domain: Annotated[str | None, typer.Option(help="The images' domain, one of the run's data.domains: needed for "
                                               "a run trained on several (composite data).")] = None,
):
    """Predict a mask (original size; class ids 0..K-1 for a multi-class run) and an overlay PNG
    for every image; a multi-class run also writes legend.png (each class's overlay colour)."""
    from medtextseg.predict import LEGEND
    from medtextseg.predict import predict as run_predict

    written = run_predict(run, images, out, texts=texts, text=text, overwrite=overwrite, device=device,
                          batch_size=batch_size, domain=domain)
    legend = f" (colours: {out / LEGEND})" if (out / LEGEND).is_file() else ""
    console.print(f"wrote {len(written)} masks to {out / 'masks'} and overlays to {out / 'overlays'}{legend}")


@app.command()
@friendly
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories to compare.")],
    out: Annotated[Path, typer.Option(help="Folder for report.md and overlays.png.")],
    data: Annotated[list[str] | None, typer.Option(help="Dataset for the overlay grid, repeatable for a composite "
                                                   "dataset (default: the first run's).")] = None,
    split: Annotated[str, typer.Option(help="Split to report.")] = "Test",
    n_images: Annotated[int, typer.Option(help="Rows in the overlay grid.")] = 6,
):
    """Markdown table of Dice/IoU (mean ± std over seeds) and a PNG grid of overlays."""
    from medtextseg.data.validation import check_split_names
    from medtextseg.report import report as run_report

    (split,) = check_split_names([split])
    md = run_report(runs, out, data=data or None, split=split, n_images=n_images)
    console.print(md.read_text(), markup=False, highlight=False)


@app.command()
@friendly
def models(
    tier: Annotated[str, typer.Option(help="Tier whose input size and width are profiled.")] = "paper",
    gflops: Annotated[bool, typer.Option(help="Count GFLOPs (a forward pass per preset).")] = True,
):
    """Table of presets: network, parameters and GFLOPs at the preset's input size."""
    from medtextseg.config import load_preset, preset_names
    from medtextseg.methods.base import network_from_config
    from medtextseg.nets.profile import count_gflops, count_parameters
    from medtextseg.text import build_text_encoder

    table = Table(title=f"presets ({tier} tier)")
    for col in ("preset", "method", "network", "text", "input", "params (M)", "GFLOPs"):
        table.add_column(col)
    for name in preset_names():
        cfg = load_preset(name, tier)
        if cfg.pretrain:
            from medtextseg.pretrain import pretrain_class

            module = pretrain_class(cfg.pretrain)(cfg.to_dict())
            table.add_row(name, f"pretrain: {cfg.pretrain}", f"vlm ({cfg.vlm.image_encoder})", cfg.vlm.text_encoder,
                          cfg.data.size_label, f"{count_parameters(module) / 1e6:.2f}", "—")
            continue
        text_dim = build_text_encoder(cfg.text.encoder, max_len=cfg.text.max_len, dim=cfg.text.dim).dim
        net = network_from_config(cfg, text_dim)
        g = count_gflops(net, img_size=cfg.data.size, in_channels=cfg.data.in_channels,
                         text_len=cfg.text.max_len, text_dim=text_dim) if gflops else float("nan")
        table.add_row(name, cfg.method, cfg.network.name, cfg.text.encoder if cfg.network.use_text else "—",
                      cfg.data.size_label, f"{count_parameters(net) / 1e6:.2f}", f"{g:.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
