"""The ``medtextseg`` command. Thin: parse, load a config, call one function.

User errors (bad path, option or data) print one message and exit with code 2;
set ``MEDTEXTSEG_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Text-guided, semi-supervised medical image segmentation: synthesise or check data, "
         "train, evaluate, predict and report.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

USER_ERROR_EXIT = 2


def _user_errors():
    """Exception types that mean "the user asked for something impossible"."""
    from medtextseg.config import ConfigError
    from medtextseg.data.io import ImageReadError
    from medtextseg.data.readers import DatasetError
    from medtextseg.data.validation import DataError
    from medtextseg.engine import RunError, RunInterrupted
    from medtextseg.methods import NonFiniteLossError

    return (ConfigError, DataError, DatasetError, ImageReadError, RunError, RunInterrupted, NonFiniteLossError,
            FileExistsError, FileNotFoundError, ValueError)


def friendly(fn):
    """Turn user errors into one red message and exit code 2 instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as e:
            if os.environ.get("MEDTEXTSEG_DEBUG"):
                raise
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(USER_ERROR_EXIT) from None
    return wrapper


@app.command()
@friendly
def synth(
    kind: Annotated[str, typer.Argument(help="Generator: chest-xray.")],
    out: Annotated[Path, typer.Option(help="Folder to write the dataset to (LViT layout).")],
    n: Annotated[int, typer.Option(help="Number of images over all splits.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same files.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 256,
    text_noise: Annotated[float, typer.Option(help="Fraction of texts with real-world annotation noise (QaTa: 0.07).")] = 0.0,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
):
    """Write a synthetic image+text dataset (Train/Val/Test folders + xlsx texts)."""
    from medtextseg.data.synthetic import GENERATORS

    if kind not in GENERATORS:
        raise ValueError(f"unknown generator {kind!r}; available: {', '.join(GENERATORS)}")
    summary = GENERATORS[kind](out, n=n, seed=seed, size=size, text_noise=text_noise, overwrite=overwrite)
    console.print(f"wrote {out}: {summary}")


@app.command("check-data")
@friendly
def check_data(
    data: Annotated[Path, typer.Argument(help="Dataset folder (LViT layout) or CSV manifest.")],
    num_classes: Annotated[int, typer.Option(help="2 for binary masks; K for multi-class label maps.")] = 2,
):
    """Validate a dataset and list every problem with its file and the fix."""
    from medtextseg.data.validation import validate_dataset

    samples = validate_dataset(data, num_classes=num_classes)
    table = Table(title=f"{data}: OK")
    for col in ("split", "images", "labeled", "unique texts"):
        table.add_column(col)
    for split in ("Train", "Val", "Test"):
        sub = [s for s in samples if s.split == split]
        if sub:
            table.add_row(split, str(len(sub)), str(sum(s.labeled for s in sub)), str(len({s.text for s in sub})))
    console.print(table)


@app.command()
@friendly
def train(
    preset: Annotated[str, typer.Option(help="Preset name (see `medtextseg models`).")],
    data: Annotated[Path, typer.Option(help="Dataset folder (LViT layout) or CSV manifest.")],
    out: Annotated[Path | None, typer.Option(help="Run directory to create (default: runs/<preset>-<tier>[-r<ratio>]-s<seed>).")] = None,
    tier: Annotated[str, typer.Option(help="smoke (seconds) | cpu (minutes on 2 cores) | paper (the paper's setting).")] = "cpu",
    labeled_ratio: Annotated[float | None, typer.Option(help="Keep the masks of this fraction of the Train images (seeded split, written to split.json).")] = None,
    labeled_ids: Annotated[Path | None, typer.Option(help="Keep the masks of these Train ids only: a split.json of another run or a text file, one id per line.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key, e.g. --set optim.lr=3e-4 (repeatable).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    devices: Annotated[str | None, typer.Option(help="Lightning devices, e.g. 1, 2 or auto.")] = None,
    accelerator: Annotated[str | None, typer.Option(help="cpu | gpu | auto.")] = None,
    strategy: Annotated[str | None, typer.Option(help="Lightning strategy, e.g. ddp.")] = None,
    num_nodes: Annotated[int | None, typer.Option(help="Number of nodes for DDP.")] = None,
    precision: Annotated[str | None, typer.Option(help="32-true | bf16-mixed | 16-mixed.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: the preset's).")] = None,
):
    """Train a preset on a dataset; then evaluate the best checkpoint on Val and Test."""
    from medtextseg.config import load_preset
    from medtextseg.engine import train as run_train

    overrides = list(set_ or [])
    for key, value in (("devices", devices), ("accelerator", accelerator), ("strategy", strategy),
                       ("num_nodes", num_nodes), ("precision", precision), ("seed", seed)):
        if value is not None:
            overrides.append(f"train.{key}={value}")
    if labeled_ratio is not None:
        overrides.append(f"data.labeled_ratio={labeled_ratio}")
    if labeled_ids is not None:
        overrides.append(f"data.labeled_ids={labeled_ids}")
    cfg = load_preset(preset, tier, overrides)
    if out is None:
        ratio = f"-r{cfg.data.labeled_ratio:g}" if cfg.data.labeled_ratio < 1 or cfg.data.labeled_ids else ""
        out = Path("runs") / f"{preset}-{tier}{ratio}-s{cfg.train.seed}"
    metrics = run_train(cfg, data, out, resume=resume, overwrite=overwrite)
    if metrics:
        _print_metrics(metrics, f"{out}")


def _print_metrics(metrics: dict, title: str) -> None:
    table = Table(title=title)
    for col in ("split", "images", "Dice %", "IoU %", "Dice % (orig.)", "IoU % (orig.)"):
        table.add_column(col, justify="right")
    for split, m in metrics.items():
        if split == "model":
            continue
        table.add_row(split, str(m["n"]), *(f"{100 * m[k]:.2f}" for k in ("dice", "iou", "dice_orig", "iou_orig")))
    console.print(table)


@app.command()
@friendly
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory or .ckpt file.")],
    data: Annotated[Path, typer.Option(help="Dataset folder or CSV manifest.")],
    split: Annotated[list[str], typer.Option(help="Split(s) to score (repeatable).")] = ["Test"],  # noqa: B006
):
    """Score a trained run on a split: Dice/IoU per image at network and original resolution."""
    from medtextseg.engine import evaluate as run_eval

    _print_metrics({k: v for k, v in run_eval(run, data, splits=split).items() if k in split}, f"{run}")


@app.command()
@friendly
def predict(
    run: Annotated[Path, typer.Argument(help="Run directory or .ckpt file.")],
    images: Annotated[Path, typer.Option(help="Folder of images.")],
    out: Annotated[Path, typer.Option(help="Output folder (masks/ and overlays/).")],
    texts: Annotated[Path | None, typer.Option(help="CSV with columns image,text.")] = None,
    text: Annotated[str | None, typer.Option(help="One description for every image.")] = None,
):
    """Predict a mask (original size) and an overlay PNG for every image."""
    from medtextseg.predict import predict as run_predict

    written = run_predict(run, images, out, texts=texts, text=text)
    console.print(f"wrote {len(written)} masks to {out / 'masks'} and overlays to {out / 'overlays'}")


@app.command()
@friendly
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories to compare.")],
    out: Annotated[Path, typer.Option(help="Folder for report.md and overlays.png.")],
    data: Annotated[Path | None, typer.Option(help="Dataset for the overlay grid (default: the first run's).")] = None,
    split: Annotated[str, typer.Option(help="Split to report.")] = "Test",
    n_images: Annotated[int, typer.Option(help="Rows in the overlay grid.")] = 6,
):
    """Markdown table of Dice/IoU (mean ± std over seeds) and a PNG grid of overlays."""
    from medtextseg.report import report as run_report

    md = run_report(runs, out, data=data, split=split, n_images=n_images)
    console.print(md.read_text(), markup=False, highlight=False)


@app.command()
@friendly
def models(
    tier: Annotated[str, typer.Option(help="Tier whose input size and width are profiled.")] = "paper",
    gflops: Annotated[bool, typer.Option(help="Count GFLOPs (a forward pass per preset).")] = True,
):
    """Table of presets: network, parameters and GFLOPs at the preset's input size."""
    from medtextseg.config import load_preset, preset_names
    from medtextseg.nets import build_network
    from medtextseg.nets.profile import count_gflops, count_parameters
    from medtextseg.text import build_text_encoder

    table = Table(title=f"presets ({tier} tier)")
    for col in ("preset", "method", "network", "text", "input", "params (M)", "GFLOPs"):
        table.add_column(col)
    for name in preset_names():
        cfg = load_preset(name, tier)
        text_dim = build_text_encoder(cfg.text.encoder, max_len=cfg.text.max_len, dim=cfg.text.dim).dim
        net = build_network(cfg.network.name, in_channels=cfg.data.in_channels, num_classes=cfg.data.num_classes,
                            base_width=cfg.network.base_width, img_size=cfg.data.img_size, text_dim=text_dim,
                            text_len=cfg.text.max_len, use_text=cfg.network.use_text)
        g = count_gflops(net, img_size=(cfg.data.img_size, cfg.data.img_size), in_channels=cfg.data.in_channels,
                         text_len=cfg.text.max_len, text_dim=text_dim) if gflops else float("nan")
        table.add_row(name, cfg.method, cfg.network.name, cfg.text.encoder if cfg.network.use_text else "—",
                      f"{cfg.data.img_size}²", f"{count_parameters(net) / 1e6:.2f}", f"{g:.1f}")
    console.print(table)


if __name__ == "__main__":
    app()
