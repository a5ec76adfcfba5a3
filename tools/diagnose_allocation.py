#!/usr/bin/env python
"""Why does an allocated FLOP target lose what it loses? (issue 10)

Reruns one ``--target-flops`` allocation from a cached variant database (``tools/bench_allocation.py ...
--database DIR`` builds it; nothing is solved again when the database holds every variant) and measures, without
statistics correction:

* the plan: every layer's chosen sparsity, its share of the dense MACs and its single-swap output error, and the
  MAC-weighted sparsity per layer kind (stem, expand, depthwise, project, head, classifier);
* additivity: the DP's objective (the sum of the chosen layers' single-swap output errors) against the output
  change measured with every chosen layer swapped in at once, on the same calibration samples;
* generalisation: top-1 / top-5 agreement and output change of the allocated model on the calibration samples
  that scored the swaps, on every calibration sample (the Hessians saw them), on ``--heldout`` data (e.g. new
  crops of the calibration photos) and on the test data;
* ``--oracle N``: the same DP with every variant's single-swap error scored on the first N TEST samples instead:
  how far an allocation that knew the test distribution would get with the same variants (agreement reported on
  the test samples after the first N, which scored nothing).

The variants are matched in ``index.json`` by layer name and sparsity, so the database directory must hold ONE
model / calibration set / sample count (as a ``--database`` directory per calibration set does).

Example:
  python tools/diagnose_allocation.py --model /tmp/models2/effnet_lite0.onnx --calib /tmp/models2/effnet_calib.npz \\
      --test /tmp/models2/effnet_test.npz --database /tmp/db_nat --flops 0.5 \\
      --sparsity 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9 --samples 256 --heldout /tmp/heldout.npz
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxobc import CompressConfig, compress  # noqa: E402
from onnxobc.allocation import Database, OutputProbe  # noqa: E402
from onnxobc.engine.allocate import allocate  # noqa: E402
from onnxobc.graph.layers import find_layers  # noqa: E402
from onnxobc.graph.model_io import load_model  # noqa: E402


def layer_kind(layer) -> str:
    """stem / expand / depthwise / project / head / classifier (EfficientNet's names), else a shape-based kind."""
    n = layer.name.lower()
    for key, kind in (("stem", "stem"), ("expand", "expand"), ("depthwise", "depthwise"), ("project", "project"),
                      ("head", "head"), ("fc", "classifier"), ("gemm", "classifier")):
        if key in n:
            return kind
    return "depthwise" if layer.groups > 1 else "other"


def variant_table(index: dict, layers) -> dict[str, dict[float, str]]:
    """{layer name: {sparsity: variant key}} from a database index; refuses a directory that mixes models, data or
    sample counts (two variants of one layer at one sparsity)."""
    names = {l.name for l in layers}
    table: dict[str, dict[float, str]] = {n: {} for n in names}
    for key, e in index.items():
        if e["layer"] not in names:
            continue
        sp = e["applied"].get("sparsity")
        if sp is None or e["applied"].get("nm") or e["applied"].get("bits"):
            continue
        if sp in table[e["layer"]]:
            raise SystemExit(f"{e['layer']} has two variants at sparsity {sp}: the database mixes runs (one model, "
                             f"one calibration set, one sample count per directory)")
        table[e["layer"]][sp] = key
    return table


def logits(probe: OutputProbe, swaps: dict) -> np.ndarray:
    """The first output over every batch of the probe, with ``swaps`` ({layer name: weight}) swapped in."""
    feed_w = dict(probe.dense)
    for name, w in swaps.items():
        feed_w[probe.names[name]] = w
    return np.concatenate([probe.sess.run(None, {**f, **feed_w})[0] for f in probe.feeds])


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    top1 = float(np.mean(ref.argmax(1) == got.argmax(1)))
    top5 = float(np.mean([r in g for r, g in zip(ref.argmax(1), np.argsort(-got, 1)[:, :5])]))
    d = got.astype(np.float64) - ref
    err = float(np.sum(d * d) / np.sum(ref.astype(np.float64) ** 2))
    return dict(samples=len(ref), top1=top1, top5=top5, output_error=err, rel_l2=err ** 0.5)


def kind_summary(rows: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in rows:
        k = out.setdefault(r["kind"], dict(layers=0, macs=0.0, kept=0.0, error=0.0))
        k["layers"] += 1
        k["macs"] += r["macs"]
        k["kept"] += r["macs"] * (1 - r["sparsity"])
        k["error"] += r["error"]
    total = sum(k["macs"] for k in out.values())
    for k in out.values():
        k["mac_share"] = k["macs"] / total
        k["sparsity"] = 1 - k["kept"] / k["macs"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--database", required=True)
    ap.add_argument("--flops", type=float, default=0.5)
    ap.add_argument("--sparsity", required=True, help="the candidate sparsities the database was built with")
    ap.add_argument("--samples", type=int, help="calibration samples the database was built with")
    ap.add_argument("--method", default="exact")
    ap.add_argument("--allocation-samples", type=int, default=32)
    ap.add_argument("--heldout", help="more data from the calibration distribution (e.g. new crops of its photos)")
    ap.add_argument("--oracle", type=int, default=0, help="also allocate with single-swap errors scored on the "
                                                         "first N test samples (0: off)")
    ap.add_argument("--mask-only", action="store_true", help="also measure the same masks applied to the dense "
                                                                "weights without the OBS reconstruction")
    ap.add_argument("--variants-from", help="another database of the same model and ladder (e.g. built from fewer "
                                            "calibration samples): also measure THIS plan with ITS variants")
    ap.add_argument("--json", help="write everything measured here")
    args = ap.parse_args()
    cand = tuple(float(x) for x in args.sparsity.split(","))
    t0 = time.perf_counter()
    cfg = CompressConfig(samples=args.samples, method=args.method, target_flops=args.flops, cand_sparsity=cand,
                         database=args.database, allocation_error="output",
                         allocation_samples=args.allocation_samples, stats_correction="none")
    res = compress(args.model, None, args.calib, cfg)
    a = res.allocation
    print(f"allocation from the database: {time.perf_counter() - t0:.1f} s (solved {a['variants_solved']}, "
          f"reused {a['variants_reused']}), cost {a['achieved']:.4f}", file=sys.stderr)
    model = load_model(args.model)
    layers, _ = find_layers(model)
    db = Database(args.database)
    table = variant_table(db.index, layers)
    chosen = {}
    for rule in res.plan:
        name = rule["match"][1:-1].replace("\\", "")
        chosen[name] = None if rule.get("skip") else rule.get("sparsity")
    by_name = {l.name: l for l in layers}
    assert set(chosen) == set(by_name), "the plan's layers are not the model's"

    def weight(l, sp):
        return l.layout.from_matrices(db.get(table[l.name][sp]).mats.astype(l.weight.dtype), l.weight.shape)

    # the same DP on the database's numbers must give the library's picks (else the table below is not its plan)
    from onnxobc.export.cost import layer_cost

    from onnxobc.allocation import probe_key

    pkey = probe_key(model, cfg)  # where the library stored the swap scores (real tokens only, for a masked model)
    costs, errors = [], []
    for l in layers:
        macs = db.index[table[l.name][cand[0]]]["macs"]
        costs.append([float(layer_cost(l, None, "float", macs).eff_macs)] + [macs * (1 - sp) for sp in cand])
        errors.append([0.0] + [db.index[table[l.name][sp]]["output_error"][pkey] for sp in cand])
    picks = allocate(costs, errors, args.flops * sum(c[0] for c in costs))
    mine = {l.name: (cand[p - 1] if p > 0 else None) for l, p in zip(layers, picks)}
    if mine != chosen:
        raise SystemExit("the DP on the database's errors does not give the library's plan: is --sparsity the "
                         "database's ladder?")
    rows = []
    for l in layers:
        sp = chosen[l.name]
        e = db.index[table[l.name][cand[0]]]
        rows.append(dict(layer=l.name, kind=layer_kind(l), macs=float(e["macs"]), sparsity=sp or 0.0,
                         error=a["errors"][l.name]))
    total = sum(r["macs"] for r in rows)
    print("\n| layer | kind | MAC share | sparsity | single-swap output error |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layer']} | {r['kind']} | {r['macs'] / total:.3f} | {r['sparsity']:.1f} | {r['error']:.2e} |")
    kinds = kind_summary(rows)
    print("\n| kind | layers | MAC share | MAC-weighted sparsity | summed single-swap error |\n|---|---:|---:|---:|---:|")
    for k, v in kinds.items():
        print(f"| {k} | {v['layers']} | {v['mac_share']:.3f} | {v['sparsity']:.3f} | {v['error']:.3e} |")

    swaps = {l.name: weight(l, chosen[l.name]) for l in layers if chosen[l.name] is not None}
    probes = {}
    t1 = time.perf_counter()
    probes["calib (swap-scoring samples)"] = OutputProbe(model, layers, args.calib, cfg, args.allocation_samples)
    probes["calib (all: the Hessians' samples)"] = OutputProbe(model, layers, args.calib, cfg, args.samples or 10 ** 9)
    if args.heldout:
        probes["held-out crops of the calibration photos"] = OutputProbe(model, layers, args.heldout, cfg, 10 ** 9)
    probes["test"] = OutputProbe(model, layers, args.test, cfg, 10 ** 9)
    gen, masked = {}, {}
    plain = {name: np.where(w == 0, 0, by_name[name].weight).astype(w.dtype) for name, w in swaps.items()}
    for label, p in probes.items():
        ref = np.concatenate([r[0] for r in p.ref])
        gen[label] = compare(ref, logits(p, swaps))
        if args.mask_only:
            masked[label] = compare(ref, logits(p, plain))
    print(f"\nmodels run: {time.perf_counter() - t1:.1f} s")
    print(f"\nDP objective (sum of the chosen single-swap errors, {args.allocation_samples} calibration samples): "
          f"{a['predicted_error']:.4f}; measured with all swapped at once on the same samples: "
          f"{gen['calib (swap-scoring samples)']['output_error']:.4f} "
          f"(ratio {gen['calib (swap-scoring samples)']['output_error'] / a['predicted_error']:.2f})")
    print("\n| data | samples | top-1 agree | top-5 agree | output error (sum sq / sum sq) | rel L2 |\n|---|---:|---:|---:|---:|---:|")
    other = {}
    if args.variants_from:
        odb = Database(args.variants_from)
        otable = variant_table(odb.index, layers)
        oswaps = {name: by_name[name].layout.from_matrices(
            odb.get(otable[name][chosen[name]]).mats.astype(by_name[name].weight.dtype), by_name[name].weight.shape)
            for name in swaps}
        for label, p in probes.items():
            other[label] = compare(np.concatenate([r[0] for r in p.ref]), logits(p, oswaps))
    for what, table_ in (("", gen), (" (same masks, no reconstruction)", masked),
                         (f" (this plan, the variants of {args.variants_from})", other)):
        for label, g in table_.items():
            print(f"| {label}{what} | {g['samples']} | {g['top1']:.4f} | {g['top5']:.4f} | {g['output_error']:.4f} | "
                  f"{g['rel_l2']:.4f} |")
    out = dict(allocation={k: a[k] for k in ("achieved", "predicted_error", "seconds")}, layers=rows, kinds=kinds,
               generalisation=gen, mask_only=masked or None, variants_from=other or None)

    if args.oracle:
        t2 = time.perf_counter()
        tp = probes["test"]
        ref_all = np.concatenate([r[0] for r in tp.ref])
        oracle_probe = OutputProbe(model, layers, args.test, cfg, args.oracle)
        errors = [[0.0] + [oracle_probe.error(l, weight(l, sp)) for sp in cand] for l in layers]
        picks = allocate(costs, errors, args.flops * sum(c[0] for c in costs))
        o_swaps = {l.name: weight(l, cand[p - 1]) for l, p in zip(layers, picks) if p > 0}
        got = logits(tp, o_swaps)
        n = args.oracle
        oracle = dict(scored_on=n, predicted_error=float(sum(errors[i][p] for i, p in enumerate(picks))),
                      sparsity={l.name: (cand[p - 1] if p > 0 else 0.0) for l, p in zip(layers, picks)},
                      scored=compare(ref_all[:n], got[:n]), unseen=compare(ref_all[n:], got[n:]),
                      seconds=time.perf_counter() - t2)
        # the DP's own picks on the same split, for a like-for-like row
        mine = logits(tp, swaps)
        print(f"\noracle allocation (single-swap errors on the first {n} test samples; {oracle['seconds']:.0f} s):")
        print("\n| allocation | test samples | top-1 agree | top-5 agree | rel L2 |\n|---|---|---:|---:|---:|")
        for label, (r, g) in (("calibration-scored (the DP above)", (ref_all[n:], mine[n:])),
                              ("test-scored (oracle)", (ref_all[n:], got[n:]))):
            c = compare(r, g)
            print(f"| {label} | the {len(r)} after the first {n} | {c['top1']:.4f} | {c['top5']:.4f} | {c['rel_l2']:.4f} |")
        c = oracle["scored"]
        print(f"| test-scored (oracle) | the first {n} (in-sample) | {c['top1']:.4f} | {c['top5']:.4f} | {c['rel_l2']:.4f} |")
        okinds = kind_summary([dict(r, sparsity=oracle["sparsity"][r["layer"]], error=0.0) for r in rows])
        print("\noracle MAC-weighted sparsity per kind: " + ", ".join(
            f"{k} {v['sparsity']:.2f}" for k, v in okinds.items()))
        out["oracle"] = oracle
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
