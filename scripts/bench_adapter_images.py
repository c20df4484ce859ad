"""How many images an adapter needs: held-out cosine, R^2 and top-1 retrieval against the number of
training images, on tiny random ViTs (no download; minutes on a CPU).

Source -> target pairs (the target is the tiny encoder's embedding, q = 32, as the tiny Kandinsky 2.2 decoder
decodes): another tiny open_clip ViT's embedding (width 48, 3 layers, p = 40) and the tiny encoder's own
residual after block 2 (p = 64). Pictures are synthetic (smooth random colour fields with a random crop and
flip); the same 300 held-out pictures score every fit, and lambda is picked on them as `dsl adapter fit` does.

    python scripts/bench_adapter_images.py
    python scripts/bench_adapter_images.py --counts 50,100,200,400 --heldout 500
"""

from __future__ import annotations

import argparse


def pictures(count: int, seed: int):
    import numpy as np
    from PIL import Image, ImageOps

    rng = np.random.default_rng(seed)
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (int(rng.integers(2, 9)), int(rng.integers(2, 9)), 3),
                                              dtype=np.uint8))
        picture = coarse.resize((96, 80), Image.Resampling.BICUBIC)
        x, y = int(rng.integers(0, 20)), int(rng.integers(0, 16))
        picture = picture.crop((x, y, x + 76, y + 64))
        yield ImageOps.mirror(picture) if rng.random() < 0.5 else picture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="25,50,100,200,400,800,1600", help="training image counts")
    parser.add_argument("--heldout", type=int, default=300, help="held-out images scoring every fit")
    options = parser.parse_args()
    counts = [int(c) for c in options.counts.split(",")]

    import open_clip
    import torch
    from open_clip.transformer import VisionTransformer

    from dsl_cli.adapters import Partial, Readout, fit
    from dsl_cli.encoder import HookedEncoder, build_tiny_visual

    torch.set_num_threads(1)
    preprocess = open_clip.image_transform(64, False)
    target = HookedEncoder(build_tiny_visual())
    torch.manual_seed(5)
    other = HookedEncoder(VisionTransformer(image_size=64, patch_size=16, width=48, layers=3, heads=4, mlp_ratio=2.0,
                                            output_dim=40).eval())
    pairs = {"other ViT embedding (p=40)": (other, Readout("embed")),
             "tiny residual after block 2 (p=64)": (target, Readout("resid", 2))}

    def read(count: int, seed: int):
        pixels = torch.stack([preprocess(p) for p in pictures(count, seed)])
        with torch.inference_mode():
            t = torch.cat([target.embed(chunk) for chunk in pixels.split(256)]).double()
            s = {name: torch.cat([r.read(enc, chunk) for chunk in pixels.split(256)]).double()
                 for name, (enc, r) in pairs.items()}
        return s, t

    train_s, train_t = read(max(counts), seed=1)
    held_s, held_t = read(options.heldout, seed=2)
    print("| training images | " + " | ".join(f"{name}: cos / centred cos / R^2 / top-1" for name in pairs) + " |")
    print("|---:|" + "---|" * len(pairs))
    for n in counts:
        cells = []
        for name in pairs:
            partial = Partial.empty(train_s[name].shape[1], 32)
            partial.train.add(train_s[name][:n], train_t[:n])
            partial.add_heldout([f"h{i}" for i in range(options.heldout)], held_s[name], held_t)
            m = fit(partial).meta["metrics"]
            cells.append(f"{m['cosine_mean']:.3f} / {m['cosine_centred']:.2f} / {m['r2']:.2f} / {m['top1']:.2f}")
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
