"""Batched generation throughput: a DCGAN at several batch sizes, in each form of its transposed convolutions,
against PyTorch eager and the GEMM ceiling at the same FLOPs, all measured in one run at each thread count;
optionally pix2pix FP32 vs INT8 latency at batch 1.

    python -m edgepix.benchmarks.generate_throughput runs/dcgan/last.pt --threads 1 2 [--pix2pix runs/p2p/last.pt]
    python -m edgepix.benchmarks.generate_throughput --threads 1 2     # the standard DCGAN-64, random weights

1. Export the checkpoint once per form (`--forms`: ONNX ConvTranspose, sub-pixel 2x2 Convs, MatMul + Col2Im; see
   export/generators.py), each with a dynamic batch and through the parity gate, and count its FLOPs per image
   from the graph (benchmarks.flops: multiply-add = 2 FLOPs; every form has the same). Without a checkpoint, the
   standard DCGAN-64 (ngf 64, latent 100) with seeded random weights: speed does not depend on the weights.
2. For each thread count and batch size B, `--rounds` rounds, each running in turn (the order rotating): every form
   generating `--num` images in batches of B (the runtime's NoiseGenerator, the same call as `edgepix generate`),
   PyTorch eager on the same latents with the same uint8 conversion, and a plain ONNX Runtime MatMul with the FLOPs
   of one batch (square, n = (B * FLOPs per image / 2) ** (1/3)) run as many times. Medians over rounds.
3. The ceiling at B: that MatMul's GFLOP/s, or the best square GEMM of numpy and ONNX Runtime (benchmarks.ceiling:
   fresh interpreter, same threads, sizes 512..2048) where higher, turned into images/s by the FLOPs per image.
4. Per layer, at each thread count's best batch: ONNX Runtime's profile of every form (kernel times grouped by the
   model's layers) against each layer's FLOPs at the ceiling; then `edgepix generate` with the best form and batch
   in a fresh process, as a user runs it.
5. `--pix2pix CKPT`: FP32 and INT8 (QDQ U8S8, calibrated on palette-coloured masks) exports of that checkpoint,
   batch-1 latency round-robin, and the INT8 output's PSNR against FP32 on held-out masks. Without a checkpoint
   the paper's unet_256 (ngf 64) with seeded random weights gives the latency only (`--unet256-random`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgepix.benchmarks.ceiling import gemm_session
from edgepix.benchmarks.environment import describe, environment
from edgepix.runtime.core.cpuinfo import usable_cores

GOAL_CEILING_SHARE = 0.70  # the best batch at the largest thread count should reach this share of the ceiling
FORMS = ("convtranspose", "subpixel", "col2im")
PAUSE_S = 0.05  # between timed blocks, so one runtime's spinning worker threads do not slow the next


def run_generate_cli(onnx_path: Path, batch: int, num: int, threads: int, tmp: Path) -> tuple[float, str]:
    """`edgepix generate` in a fresh process; returns (images/s from its closing line, the line)."""
    cmd = [sys.executable, "-m", "edgepix", "-q", "generate", str(onnx_path), "--num", str(num), "--batch",
           str(batch), "--seed", "0", "--grid", str(tmp / f"grid_b{batch}.png"), "--backend", "ort-cpu",
           "--threads", str(threads), "--warmup", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("generated"))
    return float(re.search(r"([\d.]+) images/s", line).group(1)), line


def standard_dcgan_checkpoint(tmp: Path) -> Path:
    """The DCGAN paper's 64x64 generator (ngf 64, latent 100) with seeded random weights, as a checkpoint. The
    weights keep each layer's output near unit scale: the paper's N(0, 0.02) initialisation gives near-uniform grey
    images, on which the parity gate would pass trivially."""
    import torch
    from torch import nn

    from edgepix.runtime.description.spec import ModelSpec
    from edgepix.train.checkpoint import save_checkpoint, wrap_state_dict
    from edgepix.train.registry import create_model

    torch.manual_seed(0)
    kwargs = {"image_size": 64, "ngf": 64, "latent_size": 100}
    model = create_model("dcgan", **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.ConvTranspose2d):
                m.weight.normal_(0.0, (2 * m.in_channels) ** -0.5)  # He: 4 taps per output, ReLU halves
    spec = ModelSpec(task="generation-noise", model_name="dcgan", input_size=(64, 64), latent_size=100,
                     output_range=(-1.0, 1.0), output_kind="image", mean=(0.5,) * 3, std=(0.5,) * 3)
    path = tmp / "dcgan64_random.pt"
    save_checkpoint(path, wrap_state_dict(model.state_dict(), arch="dcgan", arch_kwargs=kwargs, spec=spec))
    return path


def export_forms(checkpoint: Path, forms: list[str], tmp: Path) -> dict[str, dict]:
    """Each form exported with a dynamic batch through the parity gate: {form: {"path", "gate_psnr_db"}}."""
    from edgepix.export.generators import COL2IM_MIN_OPSET, TransposedConvForm
    from edgepix.export.pipeline import ExportRequest, run_export
    from edgepix.export.to_onnx import DEFAULT_OPSET, OnnxExportOptions

    exports = {}
    for form in forms:
        opset = COL2IM_MIN_OPSET if form == TransposedConvForm.COL2IM.value else DEFAULT_OPSET
        result = run_export(ExportRequest(checkpoint, out=tmp / f"dcgan_{form}.onnx", onnx=OnnxExportOptions(
            dynamic_batch=True, deconv=TransposedConvForm(form), opset=opset)))
        exports[form] = {"path": result.path, "gate_psnr_db": result.report.checks[0].measured}
    return exports


def measure_batch(generators: dict, model, gemm, batch: int, num: int, rounds: int) -> dict[str, float]:
    """Median images/s of every form, of PyTorch eager and of the same-FLOPs MatMul (`gemm`, one call = one batch)
    over `rounds` rounds whose order rotates."""
    import torch

    z = next(iter(generators.values())).latents(num, seed=0)
    starts = range(0, num, batch)

    def torch_eager() -> None:
        with torch.inference_mode():
            for s in starts:
                y = model(torch.from_numpy(z[s:s + batch]))
                # the same conversion to uint8 BGR images the runtime does
                ((y.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).flip(-1).numpy()

    contenders = {form: (lambda g=g: [g.generate_from(z[s:s + batch]) for s in starts])
                  for form, g in generators.items()}
    contenders["torch"] = torch_eager
    contenders["gemm"] = lambda: [gemm() for _ in starts]
    units = {name: len(starts) if name == "gemm" else num for name in contenders}  # images, or MatMul calls
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for name in names:  # warm-up
        contenders[name]()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(PAUSE_S)
            t = time.perf_counter()
            contenders[name]()
            rates[name].append(units[name] / (time.perf_counter() - t))
    return {name: float(np.median(v)) for name, v in rates.items()}


def dcgan_layers(model, latent_size: int) -> dict[int, dict]:
    """The DCGAN's layers by the index in `model.net` of their transposed convolution: a label and GFLOP per
    image. The first one, the 1x1 latent map to 4x4, is computed by forward() as a MatMul."""
    import torch
    from torch import nn

    convs = {i: m for i, m in enumerate(model.net) if isinstance(m, nn.ConvTranspose2d)}
    shapes: dict[int, tuple] = {}
    hooks = [m.register_forward_hook(lambda m, args, out, i=i: shapes.__setitem__(i, (args[0].shape, out.shape)))
             for i, m in convs.items()]
    with torch.no_grad():
        model(torch.zeros(1, latent_size))
    for h in hooks:
        h.remove()
    layers = {}
    for i, m in convs.items():
        (hi, wi), (ho, wo) = ((s[-2], s[-1]) for s in shapes[i]) if i in shapes else ((1, 1), m.kernel_size)
        gflop = 2 * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * hi * wi / 1e9
        layers[i] = {"label": f"{m.in_channels}->{m.out_channels} ch, {hi}x{wi}->{ho}x{wo}", "gflop": gflop}
    return layers


def _layer_of(node: str, starts: list[int]) -> int | None:
    """The layer of an exported node ("/net.7/Relu" belongs to the layer whose transposed convolution is net.6;
    nodes of forward() itself to the first); None for nodes ONNX Runtime inserted (layout reorders)."""
    match = re.match(r"/net\.(\d+)/", node)
    if match:
        return max(s for s in starts if s <= int(match.group(1)))
    return starts[0] if node.startswith("/") else None


def profile_layers(path: Path, batch: int, threads: int, latent_size: int, starts: list[int], tmp: Path,
                   runs: int = 10) -> dict[int, float]:
    """Mean kernel milliseconds per call of each layer, from ONNX Runtime's profile of `runs` calls at `batch`.
    A layout reorder ONNX Runtime inserted counts for the layer it feeds (ReorderInput) or comes from."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.enable_profiling, so.profile_file_prefix = True, str(tmp / f"profile_{path.stem}")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((batch, latent_size), np.float32)}
    warmup = 2
    for _ in range(warmup + runs):
        session.run(None, feed)
    profile = Path(session.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    calls = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[warmup:]
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                    and any(a <= e["ts"] <= b for a, b in calls)), key=lambda e: e["ts"])
    layers = [_layer_of(e["name"], starts) for e in nodes]
    total: dict[int, float] = {}
    for k, (event, layer) in enumerate(zip(nodes, layers)):
        if layer is None:  # the next named node's layer for an input reorder, else the previous one's
            search = layers[k + 1:] if event["args"].get("op_name") == "ReorderInput" else layers[:k][::-1]
            layer = next((x for x in search if x is not None), starts[0])
        total[layer] = total.get(layer, 0.0) + event["dur"] / 1e3
    return {layer: ms / len(calls) for layer, ms in total.items()}


def pix2pix_int8(ckpt: Path | None, threads: int, tmp: Path, rounds: int, n_eval: int) -> dict:
    """FP32 vs INT8 latency at batch 1 and the INT8 PSNR against FP32, for a pix2pix checkpoint."""
    import onnxruntime as ort
    import torch

    from edgepix.export.generators import generator_input_image
    from edgepix.export.pipeline import ExportFormat, ExportRequest, run_export
    from edgepix.export.verify import VERIFY_SEED, preprocess, synthetic_samples, to_uint8_image
    from edgepix.runtime.data.metrics import psnr
    from edgepix.runtime.description.spec import ModelSpec
    from edgepix.train.checkpoint import save_checkpoint, wrap_state_dict
    from edgepix.train.registry import create_model

    trained = ckpt is not None
    if ckpt is None:  # the paper's unet_256, seeded random weights: latency only
        torch.manual_seed(0)
        model = create_model("pix2pix", variant="unet_256", ngf=64).eval()
        spec = ModelSpec(task="generation-image", model_name="pix2pix", input_size=(256, 256), mean=(0.5,) * 3,
                         std=(0.5,) * 3, output_range=(-1, 1), output_kind="image", size_divisor=256)
        ckpt = tmp / "unet256_random.pt"
        save_checkpoint(ckpt, wrap_state_dict(model.state_dict(), arch="pix2pix",
                                              arch_kwargs={"variant": "unet_256", "ngf": 64}, spec=spec))
    fp32 = run_export(ExportRequest(ckpt, out=tmp / "p2p_fp32.onnx", verify_n=4))
    int8 = run_export(ExportRequest(ckpt, out=tmp / "p2p_int8.onnx", format=ExportFormat.ONNX_INT8, verify_n=4,
                                    calib_n=32, verify=False))
    spec = fp32.spec
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sessions = {k: ort.InferenceSession(str(r.path), so, providers=["CPUExecutionProvider"])
                for k, r in (("fp32", fp32), ("int8", int8))}
    samples = synthetic_samples(n_eval, spec.input_size, seed=VERIFY_SEED)
    inputs = [preprocess(generator_input_image(s.image, s.mask, spec), spec) for s in samples]
    outs = {k: [to_uint8_image(sess.run(None, {spec.input_name: x})[0], spec) for x in inputs]
            for k, sess in sessions.items()}
    int8_psnr = float(np.mean([psnr(a, b) for a, b in zip(outs["fp32"], outs["int8"])]))
    lat: dict[str, list[float]] = {"fp32": [], "int8": []}
    for sess in sessions.values():
        sess.run(None, {spec.input_name: inputs[0]})
    for _ in range(rounds):
        for k, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, {spec.input_name: inputs[0]})
            lat[k].append((time.perf_counter() - t) * 1e3)
    from edgepix.benchmarks.flops import model_flops

    return {"checkpoint": str(ckpt), "trained_weights": trained, "input": list(spec.input_size),
            "gflops_per_image": model_flops(fp32.path, spec) / 1e9,
            "fp32_ms_p50": float(np.median(lat["fp32"])), "int8_ms_p50": float(np.median(lat["int8"])),
            "fp32_ms_p90": float(np.percentile(lat["fp32"], 90)), "int8_ms_p90": float(np.percentile(lat["int8"], 90)),
            "int8_psnr_vs_fp32_db": int8_psnr, "fp32_gate": fp32.report.checks[0].measured}


def measure_threads(exports: dict, checkpoint: Path, threads: int, batches: list[int], num: int, rounds: int,
                    gflop: float, square_gemm_gflops: float) -> dict:
    """One thread count: every batch size measured (see the module docstring) and printed as a table row."""
    import torch

    from edgepix.runtime.tasks.generator import NoiseGenerator
    from edgepix.train.checkpoint import load_checkpoint, model_from_checkpoint

    torch.set_num_threads(threads)
    model = model_from_checkpoint(load_checkpoint(checkpoint)).eval()
    generators = {form: NoiseGenerator.load(e["path"], "ort-cpu", threads=threads) for form, e in exports.items()}
    print(f"{threads} thread(s): images/s, share of the GEMM ceiling (the higher of ONNX Runtime's MatMul of one "
          f"batch's FLOPs and the best square GEMM's {square_gemm_gflops:.1f} GFLOP/s), ratio to PyTorch eager at the "
          "same batch")
    print(f"{'batch':>5} {'ORT GEMM GFLOP/s':>16} {'ceiling img/s':>13} {'torch img/s':>11} "
          + " ".join(f"{form + ' img/s':>20} {'%':>4} {'x torch':>7}" for form in exports))
    rows = {}
    try:
        for b in batches:
            n = round((b * gflop * 1e9 / 2) ** (1 / 3))
            rates = measure_batch(generators, model, gemm_session(threads, n), b, num, rounds)
            ceiling_gflops = max(rates["gemm"] * 2 * n**3 / 1e9, square_gemm_gflops)
            row = {"gemm_n": n, "gemm_ort_gflops": rates["gemm"] * 2 * n**3 / 1e9, "ceiling_gflops": ceiling_gflops,
                   "ceiling_images_per_s": ceiling_gflops / gflop, "torch_images_per_s": rates["torch"],
                   "torch_ceiling_share": rates["torch"] * gflop / ceiling_gflops, "forms": {}}
            for form in exports:
                row["forms"][form] = {"images_per_s": rates[form], "gflops": rates[form] * gflop,
                                      "ceiling_share": rates[form] * gflop / ceiling_gflops,
                                      "over_torch": rates[form] / rates["torch"]}
            rows[b] = row
            print(f"{b:>5} {row['gemm_ort_gflops']:>16.1f} {row['ceiling_images_per_s']:>13.0f} "
                  f"{rates['torch']:>11.1f} "
                  + " ".join(f"{f['images_per_s']:>20.1f} {100 * f['ceiling_share']:>3.0f}% {f['over_torch']:>6.2f}x"
                             for f in row["forms"].values()), flush=True)
    finally:
        for g in generators.values():
            g.close()
    return rows


def report_layers(exports: dict, layers: dict[int, dict], threads: int, batch: int, ceiling_gflops: float,
                  latent_size: int, tmp: Path) -> dict:
    """Per layer at `batch`: microseconds per image of every form (ONNX Runtime's profile) against the layer's
    FLOPs at the ceiling."""
    starts = sorted(layers)
    times = {form: profile_layers(e["path"], batch, threads, latent_size, starts, tmp) for form, e in exports.items()}
    print(f"per layer, {threads} thread(s), batch {batch} (kernel time per image, mean of 10 calls; share = time at "
          f"the ceiling of {ceiling_gflops:.0f} GFLOP/s / time taken):")
    print(f"{'layer':>28} {'GFLOP':>6} {'at ceiling us':>13} " + " ".join(f"{form + ' us':>17} {'share':>5}"
                                                                          for form in exports))
    result = {}
    for i in starts + ["all"]:
        gflop = layers[i]["gflop"] if i != "all" else sum(x["gflop"] for x in layers.values())
        ideal_us = gflop / ceiling_gflops * 1e6
        took = {form: (t[i] if i != "all" else sum(t.values())) * 1e3 / batch for form, t in times.items()}
        label = f"net.{i} {layers[i]['label']}" if i != "all" else "whole graph"
        result[label] = {"gflop": gflop, "ceiling_us": ideal_us, "us": took}
        print(f"{label:>28} {gflop:>6.3f} {ideal_us:>13.1f} "
              + " ".join(f"{took[form]:>17.1f} {100 * ideal_us / took[form]:>4.0f}%" for form in exports))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, nargs="?",
                        help="a DCGAN checkpoint (edgepix train gan); default: DCGAN-64, ngf 64, random weights")
    parser.add_argument("--num", type=int, default=256, help="images per timed block")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[usable_cores()])
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    parser.add_argument("--rounds", type=int, default=5, help="rotating rounds per batch size")
    parser.add_argument("--pix2pix", type=Path, help="also time FP32 vs INT8 of this pix2pix checkpoint")
    parser.add_argument("--unet256-random", action="store_true",
                        help="also time the paper's unet_256 (ngf 64, random weights) FP32 vs INT8")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    from edgepix.benchmarks.ceiling import measure_ceiling
    from edgepix.benchmarks.flops import flops_per_image
    from edgepix.train.checkpoint import load_checkpoint, model_from_checkpoint

    results: dict = {"environment": environment(threads=None), "num": args.num, "threads": {}}
    print(describe(results["environment"]))
    with tempfile.TemporaryDirectory(prefix="edgepix-genbench-") as tmp_name:
        tmp = Path(tmp_name)
        checkpoint = args.checkpoint or standard_dcgan_checkpoint(tmp)
        ckpt = load_checkpoint(checkpoint)
        spec = ckpt["spec"]
        exports = export_forms(checkpoint, args.forms, tmp)
        # Every form computes the same function. The count stops where ONNX shape inference does (after a Col2Im),
        # so the largest count is the model's.
        flops = {form: flops_per_image(e["path"], (spec.latent_size,)) / 1e9 for form, e in exports.items()}
        gflop = max(flops.values())
        layers = dcgan_layers(model_from_checkpoint(ckpt).eval(), spec.latent_size)
        results.update({"model": f"{spec.model_name} {spec.input_size[0]}x{spec.input_size[1]}, latent "
                                 f"{spec.latent_size}", "checkpoint": str(args.checkpoint or "random weights"),
                        "gflop_per_image": gflop, "gate_psnr_db": {f: e["gate_psnr_db"] for f, e in exports.items()}})
        print(f"{results['model']}: {gflop:.4f} GFLOP per image; parity gate PSNR "
              + ", ".join(f"{f} {e['gate_psnr_db']:.1f} dB" for f, e in exports.items()))
        for threads in args.threads:
            ceiling = measure_ceiling(threads)
            square_gemm_gflops = ceiling.gemm_gflops
            print(f"square GEMM, {threads} thread(s): {square_gemm_gflops:.1f} GFLOP/s ({ceiling.gemm_library}, best "
                  "of n = 512..2048 for numpy and ONNX Runtime)")
            rows = measure_threads(exports, checkpoint, threads, args.batches, args.num, args.rounds, gflop,
                                   square_gemm_gflops)
            best_form, best = max(((f, b) for b in rows for f in rows[b]["forms"]),
                                  key=lambda fb: rows[fb[1]]["forms"][fb[0]]["images_per_s"])
            top = rows[best]["forms"][best_form]
            goal = "met" if top["ceiling_share"] >= GOAL_CEILING_SHARE else "missed"
            print(f"best at {threads} thread(s): {best_form} at batch {best}, {top['images_per_s']:.1f} images/s = "
                  f"{100 * top['ceiling_share']:.0f}% of the GEMM ceiling (goal {100 * GOAL_CEILING_SHARE:.0f}%: "
                  f"{goal}), {top['over_torch']:.2f}x PyTorch eager at batch {best}")
            per_layer = report_layers(exports, layers, threads, best, rows[best]["ceiling_gflops"], spec.latent_size,
                                      tmp)
            cli_rate, line = run_generate_cli(exports[best_form]["path"], best, args.num, threads, tmp)
            print(f"edgepix generate --batch {best} ({best_form}, fresh process): {line}")
            results["threads"][threads] = {"square_gemm_gflops": square_gemm_gflops, "batches": rows, "best": {
                "form": best_form, "batch": best, **top, "goal_met": goal == "met", "generate_cli_images_per_s":
                cli_rate, "generate_cli_line": line}, "per_layer": per_layer}
        run_pix2pix(args, tmp, results, threads=args.threads[-1])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


def run_pix2pix(args: argparse.Namespace, tmp: Path, results: dict, *, threads: int) -> None:
    """The optional pix2pix FP32 vs INT8 latency (`--pix2pix`, `--unet256-random`)."""
    for label, path in (("pix2pix", args.pix2pix), ("unet_256 (random weights)", None)):
        if (label == "pix2pix" and path is None) or (label.startswith("unet") and not args.unet256_random):
            continue
        p = pix2pix_int8(path, threads, tmp, rounds=20, n_eval=8)
        results[label] = p
        psnr_note = (f"INT8 PSNR vs FP32 {p['int8_psnr_vs_fp32_db']:.1f} dB" if p["trained_weights"]
                     else f"INT8 PSNR vs FP32 {p['int8_psnr_vs_fp32_db']:.1f} dB (untrained weights: not "
                          "meaningful)")
        print(f"{label} {p['input'][0]}x{p['input'][1]} ({p['gflops_per_image']:.1f} GFLOP), {threads} thread(s): "
              f"batch 1 FP32 {p['fp32_ms_p50']:.1f} ms p50 ({p['fp32_ms_p90']:.1f} p90), INT8 "
              f"{p['int8_ms_p50']:.1f} ms p50 ({p['int8_ms_p90']:.1f} p90), "
              f"{p['fp32_ms_p50'] / p['int8_ms_p50']:.2f}x; {psnr_note}")


if __name__ == "__main__":
    sys.exit(main())
