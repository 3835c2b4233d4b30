"""The GPU measurements of issue 15, in one prepared run of a few minutes.

Stages, in this order (each writes its part of the report as soon as it ends, so a run stopped
at its time limit still reports what it finished):

1. ``machine``: the GPU, driver, torch and CUDA versions, and the device's matrix-product
   rates (float32 as the renderer runs it, without TF32; TF32; bfloat16) on 8192^3 products.
2. ``render``: ``bench/render.py --device cuda --routes gemm``: renderer images/s forward +
   backward, peak GPU memory and error against float64, at 1,656, 44,712 and 149,040 atoms
   and 128 / 256 px.
3. ``epoch``: the paper's scale end to end through the command line: ``nmaem simulate``
   45,000 particles of 192 px (0.8 A, -20 dB, the adenylate kinase morph), then ``nmaem
   train`` with the paper's encoder, batch 256, 16 modes, a few epochs, in float32 and with
   ``--bf16``. Seconds per epoch are read from each run's log.csv (an epoch there includes
   the batch-norm statistics pass and the validation); the GPU's memory and load are sampled
   by ``nvidia-smi`` during training.
4. ``step``: ``bench/train_speed.py --device cuda`` at 192 px with the encoder at 128 px (as
   ``nmaem train``), batch 256, the paper's and the small encoder: one training step's
   images/s and its encoder / decoder split, in float32 and bf16, with cuDNN's default
   algorithms or ``cudnn.benchmark``, NCHW or channels_last; and the profiler's top GPU
   kernels of one variant.

    python bench/gpu.py --out DIR [--device cuda] [--modes MODES.npz] [--quick]
                        [--stages machine render epoch step]

``--modes``: modes of the simulation's reference.pdb made beforehand (``nmaem modes`` needs
PyKeOps, which a bare GPU machine may lack); without it they are computed here. ``--quick``:
a rehearsal on any device (tiny sizes, at most 1,024 particles). Writes DIR/gpu_report.md;
the scratch folder (``--work``, default nmaem_gpu_work in the temporary folder) holds the
data, the runs and one log per command (``logs/``).
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
DATA = os.path.join(ROOT, "nmaem_plugin", "data")
OPEN = os.path.join(DATA, "ak_open_4ake.pdb")

sys.path.insert(0, ROOT)
from nmaem_plugin.core.io.runfolder import read_log_rows  # noqa: E402
CLOSED = os.path.join(DATA, "ak_closed_1ake.pdb")


class Report:
    """Markdown written to disk after every addition (a killed run keeps what it wrote)."""

    def __init__(self, path):
        self.path = path
        self.lines = []

    def add(self, *lines):
        self.lines.extend(lines)
        for line in lines:
            print(line, flush=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            fh.write("\n".join(self.lines) + "\n")
        os.replace(tmp, self.path)


def run(cmd, log_path, timeout=None, env=None):
    """Run ``cmd``, its output to ``log_path``; (seconds, return code, output)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            res = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout,
                                 env=env, cwd=ROOT)
            rc = res.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    with open(log_path) as fh:
        out = fh.read()
    return time.perf_counter() - t0, rc, out


def nmaem():
    return [sys.executable, "-m", "nmaem_plugin"]


def show(cmd, args):
    """A command as the report prints it: the interpreter dropped, folders shortened."""
    text = " ".join(cmd[1:])
    return text.replace(args.work, "$WORK").replace(ROOT + os.sep, "")


def tail(text, n=3):
    return " / ".join(line.strip() for line in text.strip().splitlines()[-n:])


def stage_machine(args, rep):
    import torch
    dev = torch.device(args.device)
    rep.add("## Machine", "")
    lines = ["- python %s, torch %s (CUDA %s), numpy %s"
             % (sys.version.split()[0], torch.__version__, torch.version.cuda,
                __import__("numpy").__version__)]
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        lines.append("- GPU: %s, %.0f GiB, %d multiprocessors, compute capability %d.%d"
                     % (p.name, p.total_memory / 2 ** 30, p.multi_processor_count,
                        p.major, p.minor))
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm",
                                "--format=csv,noheader"], capture_output=True, text=True)
            lines.append("- driver, max SM clock: %s" % q.stdout.strip())
    lines.append("- CPU cores visible: %d" % os.cpu_count())
    n = 2048 if args.quick else 8192
    from train_speed import matmul_rate

    def rate(dtype, tf32=False):
        return matmul_rate(n, reps=10, device=dev, dtype=dtype, tf32=tf32) / 1e12
    rates = [("float32", rate(torch.float32))]
    if dev.type == "cuda":
        rates += [("TF32", rate(torch.float32, True)), ("bfloat16", rate(torch.bfloat16))]
    lines.append("- matrix product %d^3: %s" % (n, ", ".join("%s %.1f TFLOP/s" % r
                                                              for r in rates)))
    rep.add(*lines)
    rep.add("")


def stage_render(args, rep):
    atoms = ["1656"] if args.quick else ["1656", "44712", "149040"]
    sizes = ["64"] if args.quick else ["128", "256"]
    cmd = [sys.executable, os.path.join(HERE, "render.py"), "--device", args.device,
           "--routes", "gemm", "--atoms"] + atoms + ["--sizes"] + sizes + [
           "--batch", str(args.render_batch), "--repeats", "3"]
    t, rc, out = run(cmd, os.path.join(args.logs, "render.log"), timeout=args.stage_timeout)
    rep.add("## Renderer (`bench/render.py`, route gemm, batch %d, forward + backward)"
            % args.render_batch, "", "`%s` (%.0f s, exit %d)" % (show(cmd, args), t, rc), "")
    rep.add(*[line for line in out.splitlines() if line.startswith("|")
              or line.startswith("machine")])
    if rc:
        rep.add("failed: " + tail(out))
    rep.add("")


STEP_VARIANTS = (      # label, bench/train_speed.py flags
    ("float32, cuDNN default algorithms", []),
    ("float32, cudnn.benchmark (as nmaem train)", ["--cudnn-benchmark"]),
    ("float32, cudnn.benchmark, channels_last", ["--cudnn-benchmark", "--channels-last"]),
    ("bf16, cudnn.benchmark", ["--cudnn-benchmark", "--bf16"]),
    ("bf16, cudnn.benchmark, channels_last", ["--cudnn-benchmark", "--bf16", "--channels-last"]),
)


def stage_step(args, rep):
    box, ebox = ("64", "32") if args.quick else ("192", "128")
    batch = "16" if args.quick else "256"
    rep.add("## One training step (`bench/train_speed.py`): %s px, the encoder at %s px (as "
            "`nmaem train`), batch %s" % (box, ebox, batch), "")
    rows = []
    for i, (label, flags) in enumerate(STEP_VARIANTS):
        cmd = [sys.executable, os.path.join(HERE, "train_speed.py"), "--device", args.device,
               "--sizes", box, "--encoder-box", ebox, "--encoders", "paper", "small",
               "--batch", batch, "--steps", "3" if args.quick else "10"] + flags
        if i == 1:
            cmd.append("--profile")
        t, rc, out = run(cmd, os.path.join(args.logs, "step%d.log" % i),
                         timeout=args.stage_timeout)
        if rc:
            rep.add("- %s: failed: %s" % (label, tail(out)))
            continue
        for line in out.splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) > 4 and cells[1] == box:
                rows.append("| %s | %s |" % (label, " | ".join(cells[2:-1])))
        if i == 1:
            rep.add("`%s`" % show(cmd, args), "", "```")
            keep, on = [], False
            for line in out.splitlines():
                on = on or line.startswith("profile:")
                if on and (line.strip() and not line.startswith("|")):
                    keep.append(line[:160])
            rep.add(*keep[:60])
            rep.add("```", "")
    rep.add("| variant | encoder | train img/s | infer img/s | encoder GFLOP/img (fwd+bwd) "
            "| decoder GFLOP/img (fwd+bwd) | counted GFLOP/img (whole step) | achieved GFLOP/s "
            "| share of float32 matmul rate | encoder / decoder time share |",
            "|---|---|---|---|---|---|---|---|---|---|", *rows)
    rep.add("")


class GpuSampler:
    """``nvidia-smi`` memory and utilisation every 200 ms, in the background."""

    def __init__(self, path):
        self.proc = None
        smi = shutil.which("nvidia-smi")
        self.path = path
        if smi:
            self.fh = open(path, "w")
            self.proc = subprocess.Popen(
                [smi, "--query-gpu=memory.used,utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "200"], stdout=self.fh, stderr=subprocess.DEVNULL)

    def stop(self):
        if self.proc is None:
            return None
        self.proc.terminate()
        self.proc.wait()
        self.fh.close()
        mem, util = [], []
        with open(self.path) as fh:
            for line in fh:
                try:
                    m, u = [float(x) for x in line.split(",")]
                except ValueError:
                    continue
                mem.append(m)
                util.append(u)
        if not mem:
            return None
        busy = [u for u in util if u > 0]
        return dict(peak_mib=max(mem), util_median=statistics.median(busy) if busy else 0.0)


def stage_epoch(args, rep):
    n = min(args.n, 1024) if args.quick else args.n
    box = 64 if args.quick else 192
    apix = 0.8 * 192 / box
    epochs = 2 if args.quick else args.epochs
    work = os.path.join(args.work, "epoch")
    os.makedirs(work, exist_ok=True)
    sim = os.path.join(work, "sim")
    rep.add("## Paper-scale epochs (`nmaem simulate`, `nmaem train`)", "")
    cmd = nmaem() + ["simulate", "--ref", OPEN, "--target", CLOSED, "--frames", "50", "-o", sim,
                     "--n", str(n), "--distribution", "discontinuous", "--box", str(box),
                     "--apix", "%g" % apix, "--snr-db", "-20", "--device", args.device,
                     "--overwrite"]
    t, rc, out = run(cmd, os.path.join(args.logs, "simulate.log"), timeout=args.stage_timeout)
    rep.add("- `nmaem simulate` %d particles of %d px: %.1f s (exit %d)%s"
            % (n, box, t, rc, "" if rc == 0 else ": " + tail(out)))
    if rc:
        return
    modes = args.modes
    if not modes:
        modes = os.path.join(work, "modes.npz")
        t, rc, out = run(nmaem() + ["modes", os.path.join(sim, "reference.pdb"), "-o", modes,
                                    "--n-modes", "16", "--force"],
                         os.path.join(args.logs, "modes.log"), timeout=args.stage_timeout)
        rep.add("- `nmaem modes`: %.1f s (exit %d)%s" % (t, rc, "" if rc == 0 else ": "
                                                          + tail(out)))
        if rc:
            return
    for bf16 in (False, True):
        name = "run_bf16" if bf16 else "run_fp32"
        run_dir = os.path.join(work, name)
        if os.path.exists(run_dir):
            shutil.rmtree(run_dir)
        cmd = nmaem() + ["train", "--particles", os.path.join(sim, "particles.star"),
                         "--ref", os.path.join(sim, "reference.pdb"), "--modes", modes,
                         "--n-modes", "16", "-o", run_dir, "--epochs", str(epochs),
                         "--batch", "16" if args.quick else "256", "--encoder", "paper",
                         "--device", args.device, "--num-workers", str(args.num_workers)]
        cmd += ["--bf16"] if bf16 else []
        sampler = GpuSampler(os.path.join(args.logs, name + "_smi.csv"))
        t, rc, out = run(cmd, os.path.join(args.logs, name + ".log"), timeout=args.stage_timeout)
        gpu = sampler.stop()
        if rc:
            rep.add("- `%s`: failed (exit %d): %s" % (name, rc, tail(out)))
            continue
        rows = read_log_rows(run_dir)
        later = rows[1:] or rows
        peak = [line for line in out.splitlines() if "GPU peak" in line]
        rep.add("- %s (`%s`, %.0f s in all, the fit check, noise estimate and set-up "
                "included):" % ("bf16" if bf16 else "float32", show(cmd, args), t))
        rep.add("  - seconds per epoch: %s (epoch 1 includes the warm-up); median of epochs "
                "2-%d: **%.2f s**, %.0f training images/s"
                % (", ".join("%.2f" % r["seconds"] for r in rows), len(rows),
                   statistics.median(r["seconds"] for r in later),
                   statistics.median(r["images_per_s"] for r in later)))
        if peak:
            rep.add("  - torch peak GPU memory (last epoch): %s"
                    % peak[-1].split("GPU peak")[1].split("ETA")[0].strip())
        if gpu:
            rep.add("  - nvidia-smi during training: peak %.0f MiB used, median utilisation "
                    "%.0f %% (samples with any load)" % (gpu["peak_mib"], gpu["util_median"]))
        rep.add("  - final train / val loss: %.6g / %.6g"
                % (rows[-1]["train_loss"], rows[-1]["val_loss"]))
    rep.add("")


STAGES = dict(machine=stage_machine, render=stage_render, epoch=stage_epoch, step=stage_step)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_bench")
    ap.add_argument("--work", default=None,
                    help="scratch folder (default: nmaem_gpu_work in the temporary folder)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--modes", help="modes.npz of the simulation's reference.pdb")
    ap.add_argument("--n", type=int, default=45000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--num-workers", type=int, default=8)
    ap.add_argument("--render-batch", type=int, default=32)
    ap.add_argument("--stage-timeout", type=float, default=None)
    ap.add_argument("--quick", action="store_true", help="a rehearsal at tiny sizes")
    args = ap.parse_args(argv)
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    args.work = os.path.abspath(args.work or os.path.join(tempfile.gettempdir(),
                                                          "nmaem_gpu_work"))
    os.makedirs(args.work, exist_ok=True)
    args.logs = os.path.join(args.work, "logs")
    os.makedirs(args.logs, exist_ok=True)
    if args.modes:
        args.modes = os.path.abspath(args.modes)
    rep = Report(os.path.join(args.out, "gpu_report.md"))
    rep.add("# GPU benchmark (`bench/gpu.py%s`), %s" % (" --quick" if args.quick else "",
                                                       time.strftime("%Y-%m-%d %H:%M UTC",
                                                                     time.gmtime())), "")
    for name in args.stages:
        t0 = time.perf_counter()
        try:
            STAGES[name](args, rep)
        except Exception as exc:   # a failed stage must not lose the others
            rep.add("stage %s failed: %s: %s" % (name, type(exc).__name__, exc), "")
        print("[stage %s: %.0f s]" % (name, time.perf_counter() - t0), flush=True)


if __name__ == "__main__":
    main()
