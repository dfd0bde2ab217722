"""Training and inference throughput of the segmentation networks.

Prints one row per network: parameters, GFLOPs per image (papers' convention,
see :mod:`medtextseg.nets.profile`), train and inference images/s, peak memory
and the achieved GFLOP/s (a training step counts 3x the forward FLOPs).

Each (network, phase) pair runs in a fresh subprocess so the CPU peak memory
(the RSS high-water mark from ``resource.getrusage``, which only ever grows) is
that phase's own; on CUDA it is ``torch.cuda.max_memory_allocated``.

A training step is forward + (BCE + soft Dice) / 2 + backward + Adam step on
random images, texts and masks; inference is a forward pass in eval mode under
``torch.inference_mode``. Throughput uses the median step time.

Examples::

    python benchmarks/throughput.py --models unet lvit-t --size 224 --batch 2 --steps 5
    python benchmarks/throughput.py --models lvit-t --channels-last --infer-only
    python benchmarks/throughput.py --device cuda --bf16 --channels-last --batch 16

CPU notes: the CPU forward pass without autograd runs channels_last inside the
networks whatever ``--channels-last`` says (see ``medtextseg.nets.blocks.inference_layout``),
so that flag changes only training on CPU. On a machine shared with other jobs,
wall-clock numbers mostly measure the other jobs; ``--cpu-time`` adds an
estimate of the unloaded figure from the process CPU time. ``--malloc-tuning``
keeps glibc from unmapping freed activations between steps (see its help).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models",
        nargs="+",
        default=["unet", "lvit-t"],
        help="network names (medtextseg.nets.NETWORK_NAMES)",
    )
    p.add_argument(
        "--size", type=int, nargs="+", default=[224], help="image size: S or H W (divisible by 16)"
    )
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per phase")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per phase")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and inputs")
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    p.add_argument("--base-width", type=int, default=64)
    p.add_argument("--text-len", type=int, default=10)
    p.add_argument("--text-dim", type=int, default=768)
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--infer-only", action="store_true")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="CPU: also report throughput from process CPU time / threads, an estimate of "
        "the unloaded-machine figure when other jobs share the cores (sets "
        "OMP_WAIT_POLICY=PASSIVE unless already set, so waiting threads burn no CPU time)",
    )
    p.add_argument(
        "--malloc-tuning",
        action="store_true",
        help="CPU: run the workers with MALLOC_MMAP_MAX_=0 and a huge MALLOC_TRIM_THRESHOLD_ so "
        "glibc keeps freed activation memory instead of unmapping it and paying page faults "
        "again on the next step (LViT-T training 0.48 -> 0.62 img/s in a quiet 2-core run)",
    )
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _network_options(args: argparse.Namespace) -> dict:
    size = args.size if len(args.size) == 2 else args.size * 2
    return {
        "base_width": args.base_width,
        "img_size": tuple(size),
        "text_dim": args.text_dim,
        "text_len": args.text_len,
    }


def _worker(args: argparse.Namespace, name: str, phase: str) -> dict:
    """Time one phase of one network in this process; returns a JSON-able dict."""
    import torch
    import torch.nn.functional as F

    from medtextseg.nets import build_network

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    options = _network_options(args)
    model = build_network(name, **options).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    h, w = options["img_size"]
    images = torch.rand(args.batch, 3, h, w, device=device).contiguous(memory_format=fmt)
    text = torch.randn(args.batch, args.text_len, args.text_dim, device=device)
    text = text if getattr(model, "use_text", False) else None
    masks = (torch.rand(args.batch, 1, h, w, device=device) > 0.5).float()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if phase == "train":
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                logits = model(images, text)
            logits = logits.float()
            probs = torch.sigmoid(logits)
            inter = (probs * masks).sum((1, 2, 3))
            dice = 1 - (2 * inter + 1e-5) / (probs.sum((1, 2, 3)) + masks.sum((1, 2, 3)) + 1e-5)
            loss = 0.5 * F.binary_cross_entropy_with_logits(logits, masks) + 0.5 * dice.mean()
            loss.backward()
            optimizer.step()
    else:
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast:
                model(images, text)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    sync()
    times, cpu_times = [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "img_per_s": args.batch / statistics.median(times),
        "cpu_img_per_s": args.batch * torch.get_num_threads() / statistics.median(cpu_times),
        "step_s": times,
        "peak_mib": peak_mib,
        "threads": torch.get_num_threads(),
    }


def _run_phase(args: argparse.Namespace, argv: list[str], name: str, phase: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_worker", f"{name}:{phase}"]
    env = dict(os.environ)
    if args.cpu_time:  # waiting OpenMP threads must sleep, not spin, for CPU time to mean work
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.malloc_tuning:  # glibc reads these at start-up, hence the fresh process
        env.setdefault("MALLOC_MMAP_MAX_", "0")
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**40))
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} {phase} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_table(rows: list[dict], title: str, cpu_time: bool = False) -> None:
    columns = [
        ("model", "model", "{}"),
        ("params (M)", "params_m", "{:.2f}"),
        ("GFLOPs/img", "gflops", "{:.1f}"),
        ("train img/s", "train_img_s", "{:.3f}"),
        ("infer img/s", "infer_img_s", "{:.3f}"),
        ("train MiB", "train_peak_mib", "{:.0f}"),
        ("infer MiB", "infer_peak_mib", "{:.0f}"),
        ("train GFLOP/s", "train_gflop_s", "{:.1f}"),
        ("infer GFLOP/s", "infer_gflop_s", "{:.1f}"),
    ]
    if cpu_time:
        columns[5:5] = [
            ("train img/s (cpu)", "train_cpu_img_s", "{:.3f}"),
            ("infer img/s (cpu)", "infer_cpu_img_s", "{:.3f}"),
        ]
    headers = [c[0] for c in columns]
    keys = [c[1] for c in columns]
    fmt = {c[1]: c[2] for c in columns}
    cells = [
        [fmt.get(k, "{}").format(r[k]) if r.get(k) is not None else "-" for k in keys] for r in rows
    ]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in headers:
            table.add_column(h, justify="left" if h == "model" else "right")
        for row in cells:
            table.add_row(*row)
        Console(width=200).print(table)
    except ImportError:
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
        for row in cells:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    if args._worker:
        name, phase = args._worker.split(":")
        print(json.dumps(_worker(args, name, phase)))
        return

    import torch

    from medtextseg.nets import NETWORK_NAMES, build_network
    from medtextseg.nets.profile import count_gflops, count_parameters

    unknown = [m for m in args.models if m not in NETWORK_NAMES]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(NETWORK_NAMES)}")
    options = _network_options(args)
    phases = [
        p
        for p in ("train", "infer")
        if not (p == "train" and args.infer_only) and not (p == "infer" and args.train_only)
    ]
    rows = []
    threads = None
    for name in args.models:
        with torch.device("meta"):  # sizes and FLOPs need shapes only
            model = build_network(name, **options)
        row = {
            "model": name,
            "params_m": count_parameters(model) / 1e6,
            "gflops": count_gflops(model, options["img_size"]),
        }
        for phase in phases:
            result = _run_phase(args, argv, name, phase)
            threads = result["threads"]
            row[f"{phase}_img_s"] = result["img_per_s"]
            if args.cpu_time:
                row[f"{phase}_cpu_img_s"] = result["cpu_img_per_s"]
            row[f"{phase}_peak_mib"] = result["peak_mib"]
            row[f"{phase}_step_s"] = result["step_s"]
            row[f"{phase}_gflop_s"] = (
                result["img_per_s"] * row["gflops"] * (3 if phase == "train" else 1)
            )
        rows.append(row)
    h, w = options["img_size"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    title = (
        f"{args.device} x{threads} threads, batch {args.batch}, {h}x{w}, "
        f"{'bf16' if args.bf16 else 'fp32'}, {'channels_last' if args.channels_last else 'NCHW'}, "
        f"{args.steps} steps (median){', malloc tuning' if args.malloc_tuning else ''}, "
        f"torch {torch.__version__}, load avg {load:.2f}"
    )
    _print_table(rows, title, cpu_time=args.cpu_time)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
