"""Train the small classifier used for classifier FID and the classifier Inception Score.

    python scripts/train_classifier.py --dataset fashion-mnist --epochs 4 --out neurosdm/assets/fashion_classifier.pt

Adam with a cosine learning rate, light augmentation (random 2-pixel shifts); the test accuracy on the dataset's
test split is measured at the end and stored in the checkpoint (``test_accuracy``). CPU, a few minutes.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from neurosdm.classifier import ClassifierConfig, SmallClassifier, accuracy, load_labels, save_classifier
from neurosdm.data import dataset_info, load_dataset


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels (zero-padded in the [-1, 1] background value -1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("neurosdm/assets/fashion_classifier.pt"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    info = dataset_info(args.dataset)
    x_train = load_dataset(args.dataset, args.data_dir, "train", limit=args.limit)
    y_train = torch.as_tensor(load_labels(args.dataset, "train", args.data_dir)[:len(x_train)], dtype=torch.long)
    x_test = load_dataset(args.dataset, args.data_dir, "test")
    y_test = load_labels(args.dataset, "test", args.data_dir)
    cfg = ClassifierConfig(img_ch=info["img_ch"], image_size=x_train.shape[-1], num_classes=info["num_classes"])
    model = SmallClassifier(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    print(f"{args.dataset}: {len(x_train)} train / {len(x_test)} test images; "
          f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        run_loss = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            xb = random_shift(x_train[idx], g)
            flip = torch.rand(len(idx), generator=g) < 0.5  # clothes are left-right symmetric
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss += loss.item()
            if (i + 1) % 100 == 0:
                print(f"epoch {epoch + 1} step {i + 1}/{steps_per_epoch} loss {run_loss / 100:.4f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
                run_loss = 0.0
        acc = accuracy(model, x_test, y_test)
        print(f"epoch {epoch + 1}: test accuracy {acc:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    acc = accuracy(model, x_test, y_test)
    save_classifier(args.out, model, dataset=args.dataset, train_images=int(len(x_train)),
                    test_images=int(len(x_test)), test_accuracy=float(acc), epochs=int(args.epochs),
                    seed=int(args.seed))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): test accuracy {acc:.4f} on "
          f"{len(x_test)} {args.dataset} test images, {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
