"""TextMoE benchmarks (issue 12): the paper's Table 1 and Table 2 layouts on two synthetic
domains, the modality indicator, and the cost.

    medtextseg synth chest-xray --n 500 --out bench/cxr500 --seed 0
    medtextseg synth lung-ct --n 500 --out bench/ct500 --seed 0
    # Table 1 (25 %): per-dataset baselines, TextMoE per dataset and one joint TextMoE
    python benchmarks/textmoe.py --domains cxr=bench/cxr500 ct=bench/ct500 --tier cpu --out bench/textmoe \\
        --ratios 0.25 --seeds 0 --rows unet mean-teacher textmoe-single textmoe
    # Table 2 ablation and the indicator (joint models)
    python benchmarks/textmoe.py ... --rows sup plain tmoe tmoe+cr textmoe no-indicator
    # cost: parameters, GFLOPs, img/s, the frequency exchange's share of a step
    python benchmarks/textmoe.py ... --cost

Rows (``<out>/r<ratio>/<row>-s<seed>[-<domain>]``); every run of one (ratio, seed) keeps
the masks of the same images (the labeled split is stratified per domain, and each
domain's stream is its own, so a per-dataset run and the joint run label the same images):

- per dataset (one run per domain): ``unet`` (labeled only, step-matched as in
  benchmarks/semi.py), ``mean-teacher``, ``lvit-epi`` (LViT-T + EPI + LV, the ``lvit-t-semi``
  preset), ``textmoe-single`` (TextMoE on that domain alone), ``textmoe-single-steps`` (the
  same with the joint run's optimizer steps). DuSSS per dataset needs a VLM per domain:
  benchmarks/dusss.py on each root with the same ratio, seed and ``--set``;
- joint (one run on all domains, figures per domain): ``textmoe`` (TMoE + L_cr + L_diff),
  and the Table 2 rows ``sup`` (L_sup only: the supervised method on the TextMoE network),
  ``plain`` (Plain-MoE decoder, Mean Teacher's naive consistency), ``tmoe`` (TMoE decoder,
  naive consistency), ``tmoe+cr`` (+ L_cr), ``textmoe`` (+ L_diff); ``no-indicator`` is
  TextMoE whose gates do not see the modality (``network.options.indicator=false``).

For the joint runs the gate weights of every TMoE layer are averaged per domain over the
Test images (mean ± std over images of the first expert's weight, and its mean over the
layers). Finished runs are reused; ``--collect`` trains nothing. Writes ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from runs import fmt, optimizer_steps, train_in_child

from medtextseg.config import load_preset
from medtextseg.utils import atomic_write_text

PER_DOMAIN = {"unet": ("unet", []), "mean-teacher": ("mean-teacher", []), "lvit-epi": ("lvit-t-semi", []),
              "textmoe-single": ("textmoe", []), "textmoe-single-steps": ("textmoe", [])}
JOINT = {
    "sup": ("textmoe", ["method=supervised", "textmoe.diff=false"]),
    "plain": ("textmoe-plain", ["textmoe.cr=false", "textmoe.diff=false"]),
    "tmoe": ("textmoe", ["textmoe.cr=false", "textmoe.diff=false"]),
    "tmoe+cr": ("textmoe", ["textmoe.diff=false"]),
    "textmoe": ("textmoe", []),
    "no-indicator": ("textmoe", ["network.options={indicator: false}"]),
}
LABELS = {"unet": "U-Net (labeled only, per dataset)", "mean-teacher": "Mean Teacher (U-Net, per dataset)",
          "lvit-epi": "LViT-T + EPI + LV (per dataset)",
          "textmoe-single": "TextMoE (per dataset)",
          "textmoe-single-steps": "TextMoE (per dataset, as many steps as the joint run)", "sup": "L_sup only (joint)",
          "plain": "Plain-MoE + naive MT (joint)", "tmoe": "TMoE + naive MT (joint)",
          "tmoe+cr": "TMoE + L_cr (joint)", "textmoe": "TextMoE: TMoE + L_cr + L_diff (joint)",
          "no-indicator": "TextMoE, indicator off (joint)"}
# TextMoE paper, Dice % (QaTa-COV19 X-ray, MosMedData+ CT) at 25 / 50 % labels: Table 1 (LViT,
# TextMoE) and Table 2 (the ablation rows; its L_sup-only row is the paper's baseline).
# Mean Teacher is not in Table 1.
PAPER = {("lvit-epi", 0.25): ("78.12", "71.38"), ("lvit-epi", 0.5): ("80.32", "72.25"),
         ("sup", 0.25): ("77.88", "67.55"), ("sup", 0.5): ("79.64", "69.27"),
         ("plain", 0.25): ("84.54", "68.48"), ("plain", 0.5): ("87.23", "70.91"),
         ("tmoe", 0.25): ("85.63", "70.72"), ("tmoe", 0.5): ("87.66", "71.86"),
         ("tmoe+cr", 0.25): ("87.59", "72.60"), ("tmoe+cr", 0.5): ("88.60", "73.00"),
         ("textmoe", 0.25): ("88.61", "74.15"), ("textmoe", 0.5): ("89.55", "75.17")}


def overrides(row: str, preset: str, sets: list[str], ratio: float, seed: int, tier: str,
              extra: list[str], joint_scale: float = 1.0) -> list[str]:
    out = [f"train.seed={seed}", f"data.labeled_ratio={ratio}", *sets, *extra]
    if row == "textmoe-single-steps":
        # A joint epoch passes over every domain's images: a per-dataset run needs
        # joint_scale (= all Train images / this domain's) times the epochs for its steps.
        cfg = load_preset(preset, tier, out)
        out += [f"train.max_epochs={math.ceil(cfg.train.max_epochs * joint_scale)}",
                f"train.patience={math.ceil(cfg.train.patience * joint_scale)}"]
    if row in ("unet", "sup") and ratio < 1.0:
        # Labeled-only rows get as many optimizer steps as the semi-supervised ones.
        cfg = load_preset(preset, tier, out)
        scale = max(ratio, 1.0 - ratio) / ratio
        out += [f"train.max_epochs={math.ceil(cfg.train.max_epochs * scale)}",
                f"train.patience={math.ceil(cfg.train.patience * scale)}"]
    return out


def gate_stats(run: Path, data: list[str], split: str) -> dict[str, dict]:
    """Per domain: the first expert's gate weight of every TMoE layer over ``split``'s images."""
    import torch

    from medtextseg.data.module import make_dataset, make_loader
    from medtextseg.data.validation import validate_dataset
    from medtextseg.engine import load_run

    method, cfg, encoder, _ = load_run(run, device="cpu")
    samples = [s for s in validate_dataset(data, need_splits=(split,)) if s.split == split]
    loader = make_loader(make_dataset(samples, encoder, cfg.data), cfg.data.eval_batch_size, shuffle=False)
    per: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for batch in loader:
            tokens = method.text_embedder(batch["text"]) if method.use_text else None
            _, aux = method.net(batch["image"], tokens, domain=batch["domain"], return_aux=True)
            w = torch.stack([g[:, 0] for g in aux["gates"]], dim=1)  # [B, layers]
            for j, idx in enumerate(batch["index"].tolist()):
                per.setdefault(samples[idx].domain, []).append(w[j])
    out = {}
    for domain, rows in sorted(per.items()):
        w = torch.stack(rows)  # [N, layers]
        out[domain] = {"mean": float(w.mean()), "std": float(w.mean(1).std()),
                       "layers": [round(float(v), 4) for v in w.mean(0)]}
    return out


def cost(domains: list[str], tier: str, extra: list[str]) -> list[str]:
    """Parameters, GFLOPs at the tier's size, train / inference img/s of one step on this CPU,
    and the frequency exchange's share of a training step."""
    import torch

    from medtextseg.methods import method_class
    from medtextseg.methods.frequency import exchange_partners, frequency_exchange
    from medtextseg.nets.profile import count_gflops, count_parameters
    from medtextseg.text import build_text_encoder

    lines = ["| Network | Input | Params (M) | GFLOPs | Train img/s | Inference img/s | FFT exchange share of a step |",
             "|---|---|---|---|---|---|---|"]
    for preset in ("textmoe", "textmoe-plain"):
        cfg = load_preset(preset, tier, [*extra, f"data.domains=[{', '.join(sorted(domains))}]"])
        enc = build_text_encoder(cfg.text.encoder, max_len=cfg.text.max_len, dim=cfg.text.dim)
        enc.fit(["two infected areas, upper left lung and lower right lung"])
        torch.manual_seed(0)
        m = method_class(cfg.method)(cfg.to_dict(), text_state=enc.state(), text_dim=enc.dim)
        s, b = cfg.data.img_size, cfg.data.batch_size
        feat = enc.features(["two infected areas, upper left lung and lower right lung"])
        texts = feat.expand(b, *feat.shape[1:])
        dom = torch.arange(b) % len(domains)
        lab = {"image": torch.rand(b, 3, s, s), "mask": (torch.rand(b, 1, s, s) > 0.5).long(), "text": texts,
               "domain": dom}
        unl = {"image": torch.rand(b, 3, s, s), "text": texts, "domain": dom}
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        m.log = lambda *a, **k: None  # no Trainer here

        def step(m=m, opt=opt, lab=lab, unl=unl):
            opt.zero_grad()
            m.training_step({"labeled": lab, "unlabeled": unl}, 0).backward()
            opt.step()

        m.train()
        step()
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        t_step = (time.perf_counter() - t0) / 3
        partners = exchange_partners(b, dom)
        t0 = time.perf_counter()
        for _ in range(20):
            frequency_exchange(unl["image"], partners, cfg.textmoe.band)
        t_fft = (time.perf_counter() - t0) / 20
        m.eval()
        with torch.inference_mode():
            m.infer(lab["image"], texts, dom)
            t0 = time.perf_counter()
            for _ in range(3):
                m.infer(lab["image"], texts, dom)
            t_inf = (time.perf_counter() - t0) / 3
        g = count_gflops(m.net, img_size=(s, s), in_channels=3, text_len=cfg.text.max_len, text_dim=enc.dim)
        lines.append(f"| {preset} (base {cfg.network.base_width}) | {s}² | {count_parameters(m.net) / 1e6:.2f} | "
                     f"{g:.2f} | {2 * b / t_step:.1f} ({b} + {b} per step) | {b / t_inf:.1f} | "
                     f"{100 * t_fft / t_step:.2f} % ({1000 * t_fft:.1f} of {1000 * t_step:.0f} ms) |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--domains", nargs="+", required=True, help="NAME=PATH per domain (e.g. cxr=bench/cxr500)")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--rows", nargs="*", default=["unet", "mean-teacher", "textmoe-single", "textmoe"])
    ap.add_argument("--tier", default="cpu")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], help="overrides for every run")
    ap.add_argument("--split", default="Test")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--collect", action="store_true", help="train nothing: tabulate the finished runs")
    ap.add_argument("--cost", action="store_true", help="also measure parameters, GFLOPs, img/s and the FFT share")
    args = ap.parse_args()
    names = [d.split("=", 1)[0] for d in args.domains]
    unknown = [r for r in args.rows if r not in PER_DOMAIN and r not in JOINT]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; choose from {', '.join([*PER_DOMAIN, *JOINT])}")

    from medtextseg.data.readers import read_dataset

    train_all = [s for s in read_dataset(args.domains) if s.split == "Train"]
    n_train = {n: sum(s.domain == n for s in train_all) for n in names}
    n_train_all = len(train_all)
    head = ["Method", "Labels", *[f"{n} Dice %" for n in names], "Mean of domains Dice %",
            "All images Dice %", "Paper X-ray / CT", "Steps", "s/epoch", "Seeds"]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    gates: list[str] = []
    for ratio in args.ratios:
        for row in args.rows:
            per: dict[str, list[float]] = {n: [] for n in names}
            mean_d, all_i, steps, spe = [], [], [], []
            seeds_done: set[int] = set()
            for seed in args.seeds:
                if row in PER_DOMAIN:
                    preset, sets = PER_DOMAIN[row]
                    got = {}
                    for name, root in zip(names, args.domains, strict=True):
                        run = args.out / f"r{ratio:g}" / f"{row}-s{seed}-{name}"
                        if args.collect and not (run / "metrics.json").is_file():
                            continue
                        scale = n_train_all / n_train[name]
                        m = train_in_child(preset, args.tier, overrides(row, preset, sets, ratio, seed, args.tier,
                                                                        args.overrides, scale), [root], run)
                        got[name] = m[args.split]["dice"]
                        per[name].append(got[name])
                        steps.append(optimizer_steps(run))
                        spe.append(m["seconds_per_epoch"])
                    if len(got) == len(names):  # this seed ran on every domain
                        mean_d.append(statistics.mean(got.values()))
                        seeds_done.add(seed)
                else:
                    preset, sets = JOINT[row]
                    run = args.out / f"r{ratio:g}" / f"{row}-s{seed}"
                    if args.collect and not (run / "metrics.json").is_file():
                        continue
                    m = train_in_child(preset, args.tier, overrides(row, preset, sets, ratio, seed, args.tier,
                                                                    args.overrides), args.domains, run)
                    fig = m[args.split]
                    for n in names:
                        per[n].append(fig["domains"][n]["dice"])
                    mean_d.append(fig["domain_mean"]["dice"])
                    all_i.append(fig["dice"])
                    seeds_done.add(seed)
                    steps.append(optimizer_steps(run))
                    spe.append(m["seconds_per_epoch"])
                    if load_preset(preset, args.tier, sets).network.name.startswith("textmoe"):
                        stats = gate_stats(run, args.domains, args.split)
                        atomic_write_text(run / "gates.json", json.dumps(stats, indent=1))
                        gates.append(f"| {LABELS[row]} | {ratio:.0%} | {seed} | " + " | ".join(
                            f"{stats[n]['mean']:.3f} ± {stats[n]['std']:.3f}" for n in names) + " | " + " / ".join(
                            f"{abs(a - b):.3f}" for a, b in zip(stats[names[0]]["layers"], stats[names[-1]]["layers"],
                                                                 strict=True)) + " |")
            if not steps:
                continue
            paper = PAPER.get((row, ratio), ("—", "—"))
            table.append("| " + " | ".join([
                LABELS[row], f"{ratio:.0%}", *[fmt(per[n]) for n in names], fmt(mean_d), fmt(all_i),
                " / ".join(paper), "/".join(str(s) for s in sorted(set(steps))),
                f"{statistics.mean(spe):.1f}", str(len(seeds_done))]) + " |")
    parts = [(f"{' + '.join(args.domains)}: {args.split} split, tier {args.tier}, overrides: "
             f"{' '.join(args.overrides) or 'none'}"), "", *table, "",
             ("Per-dataset rows: one run per domain on that domain alone; joint rows: one model on all "
             "domains, scored per domain. `Mean of domains` is the unweighted mean of the domain Dice; "
             "`All images` the mean over every image of both domains (joint rows).")]
    if gates:
        parts += ["", ("**Gate weights** (first visual expert, mean ± std over the images of each domain, "
                  "averaged over the TMoE layers; last column: per-layer |difference| between the domains):"), "",
                  "| Model | Labels | Seed | " + " | ".join(names) + " | per-layer gap |",
                  "|---|---|---|" + "---|" * len(names) + "---|", *gates]
    if args.cost:
        parts += ["", "**Cost** (this CPU, 2 threads, one step after a warm-up):", "",
                  *cost(names, args.tier, args.overrides)]
    text = "\n".join(parts) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.md", text)


if __name__ == "__main__":
    main()
