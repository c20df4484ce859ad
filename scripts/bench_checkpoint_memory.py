"""Benchmark: host memory of loading the encoder from a whole-CLIP checkpoint, dsl's way against open_clip's.

dsl builds the vision tower alone and copies its tensors one by one from the file (safetensors opened lazily,
torch files memory-mapped); open_clip's `create_model_and_transforms` builds the whole CLIP and reads the whole
checkpoint into memory before copying it in. Each is measured in a process of its own, on the CPU in fp32:

- peak RSS (`ru_maxrss`): every page the process touched, the checkpoint's mapped pages included (the system
  can drop those when memory runs short: they are the file's, in the page cache);
- peak anonymous memory (`RssAnon`, sampled every 20 ms): what the process itself holds, which nothing but
  freeing can give back; this is what runs a machine out of memory.

    python scripts/bench_checkpoint_memory.py --checkpoint /tmp/bigg.safetensors      # writes it if absent
    python scripts/bench_checkpoint_memory.py --checkpoint /tmp/bigg.bin       # a torch file, as the hub's
    python scripts/bench_checkpoint_memory.py --model ViT-B-32 --checkpoint /tmp/b32.safetensors

The checkpoint written here holds random weights (seed 0) in the layout open_clip saves (`visual.*`, the text
tower's tensors at the top level): for bigG about 10 GB on disk and as long to write.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

GB = 1024**3

# The child: sample RssAnon in a thread while one loader runs, then print its peaks as JSON.
CHILD = r"""
import json, resource, sys, threading, time
peak = [0]
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
def sample():
    while True:
        peak[0] = max(peak[0], anon())
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
loader, name, path = sys.argv[1:4]
start = time.perf_counter()
if loader == "dsl":
    from dsl_cli.config import EncoderConfig
    from dsl_cli.encoder import load_encoder
    encoder, _ = load_encoder(EncoderConfig(source="open_clip", name=name, pretrained=None, checkpoint=path))
else:
    import open_clip
    encoder = open_clip.create_model_and_transforms(name, pretrained=path)[0].visual
seconds = time.perf_counter() - start
time.sleep(0.05)
held = sum(p.numel() * p.element_size() for p in encoder.parameters())
print(json.dumps({"loader": loader, "seconds": round(seconds, 1), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_anon": max(peak[0], anon()), "encoder_bytes": held}))
"""


def save_random_checkpoint(name: str, path: Path) -> None:
    """A whole CLIP with random weights, in the layout of open_clip's checkpoints: safetensors, or a torch file
    (`.bin`, `.pt`: the format of the Hugging Face hub's `open_clip_pytorch_model.bin`, which open_clip
    downloads for a pretrained tag)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model(name)
    print(f"writing {path} (random {name})", flush=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)


def measure(loader: str, name: str, path: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", CHILD, loader, name, str(path)], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        return {"loader": loader, "error": done.stderr.strip()[-1000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-bigG-14", help="open_clip model name (default ViT-bigG-14)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="whole-CLIP weights; written if absent")
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = parser.parse_args()
    if not args.checkpoint.is_file():
        save_random_checkpoint(args.model, args.checkpoint)
    print(f"{args.model}, {args.checkpoint} ({args.checkpoint.stat().st_size / GB:.2f} GiB)")
    print("| loader | peak anonymous memory | peak RSS (mapped file pages included) | vision tower | seconds |")
    print("|---|---|---|---|---|")
    results = []
    for loader in ("dsl", "open_clip"):
        r = measure(loader, args.model, args.checkpoint)
        results.append(r)
        if "error" in r:
            print(f"| {loader} | failed: {r['error'].splitlines()[-1]} | | | |")
            continue
        print(f"| {loader} | {r['peak_anon'] / GB:.2f} GiB | {r['peak_rss'] / GB:.2f} GiB | "
              f"{r['encoder_bytes'] / GB:.2f} GiB | {r['seconds']} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "checkpoint": str(args.checkpoint), "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
